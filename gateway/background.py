"""Stopping the gateway's background tasks: the ledger writer, the health sync, the policy
watcher and the reload follower each run one long-lived task on the app's loop; at shutdown
it is cancelled and awaited here, so nothing is left running and a cancel is never mistaken
for a failure.
"""

from __future__ import annotations

import asyncio
import contextlib


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
