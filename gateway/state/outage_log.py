"""Rate-limited logging of a store outage: one warning when writes start failing, then at most one
every ``every_s`` seconds (with how many failures it stands for), and one line when they resume.

The ledger writer retries every ``FLUSH_EVERY_S`` (0.1 s) in every worker, so logging each failed
attempt would print ten lines a second per worker for the whole outage. :class:`OutageLog` takes
the clock as a parameter (``time.monotonic`` by default) so its behaviour is tested without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class OutageLog:
    """Say that a store is failing, without repeating it on every retry."""

    def __init__(self, log: logging.Logger, what: str, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.what = what              # e.g. "ledger write"
        self.every_s = every_s
        self.clock = clock
        self.failures = 0             # failed attempts since the outage began
        self.suppressed = 0           # failed attempts not logged since the last line
        self._since = 0.0             # when the outage began
        self._last = 0.0              # when the last line was logged

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException, waiting: int) -> None:
        """One failed attempt; ``waiting``: the records (or writes) still waiting."""
        now = self.clock()
        self.failures += 1
        if self.failures == 1:
            self._since = self._last = now
            self.log.warning("%s failed, %d records waiting: %r", self.what, waiting, exc)
        elif now - self._last >= self.every_s:
            self.log.warning("%s still failing after %.0f s (%d failures not logged), %d records waiting: %r",
                             self.what, now - self._since, self.suppressed, waiting, exc)
            self._last, self.suppressed = now, 0
        else:
            self.suppressed += 1

    def succeeded(self) -> None:
        """Everything waiting was written: if an outage was being reported, say it is over."""
        if self.failures:
            self.log.warning("%ss resumed after %.0f s and %d failed attempts", self.what,
                             self.clock() - self._since, self.failures)
            self.failures = self.suppressed = 0
