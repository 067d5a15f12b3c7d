"""Hot reload: watch the policy directory and swap in a new policy set when a file changes.

:class:`PolicyWatcher` polls the modification time and size of every policy file
(cheap: a few ``stat`` calls a second, no extra dependency) and calls its ``reload``
callback when anything changed, a file appeared or one went away. The callback
(``AppState.reload``) loads and validates the whole set and swaps it in atomically;
an invalid set raises :class:`PolicyError`, which is logged with its file, line and
key while the last good policies stay in force. Requests already in flight finish
on the set they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from gateway.background import cancel
from gateway.policy import PolicyError
from gateway.policy import policy_files as list_policy_files

log = logging.getLogger("gateway.reload")
Signature = tuple[tuple[str, int, int], ...]


def signature(config_dir: str) -> Signature:
    out = []
    for path in list_policy_files(config_dir):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size))
    return tuple(out)


class PolicyWatcher:
    def __init__(self, config_dir: str, reload: Callable[[], object], interval_s: float) -> None:
        self.config_dir = config_dir
        self.reload = reload
        self.interval_s = interval_s
        self.seen = signature(config_dir)
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def poll(self) -> bool:
        """Reload if the files changed; True when a new set is in force."""
        now = signature(self.config_dir)
        if now == self.seen:
            return False
        self.seen = now
        try:
            self.reload()
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy files changed but are invalid; keeping the last good set: %s", exc)
            return False
        self.last_error = None
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.poll()
            except Exception:   # the watcher must outlive any one failure
                log.exception("policy watcher failed")

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
