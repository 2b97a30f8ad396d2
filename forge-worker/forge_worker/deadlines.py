"""Time limits of a node's running jobs, watched by one timer instead of one per job.

A job's ``asyncio.timeout`` cost a timer, a context manager and a cancellation bookkeeping per
job: about a third of a no-op job's time on the node. Here a job costs a dict entry; the single
timer is armed for the earliest limit and, when it fires, expires every entry past its limit and
re-arms for the next one. A job that ends first is simply removed, so with the usual limits (an
hour by default) the timer rarely fires at all.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable

#: a loop timer may fire up to its clock resolution early; limits this close count as reached
_EARLY = 0.001


class Deadlines:
    """Keys with a time limit. ``on_expired(key)`` is called once for each key whose limit passes
    before :meth:`done` removes it; ``loop`` is the running asyncio loop (its ``time`` and
    ``call_at``)."""

    def __init__(self, loop: Any, on_expired: Callable[[Hashable], None]) -> None:
        self._loop = loop
        self._on_expired = on_expired
        self._at: dict[Hashable, float] = {}
        self._timer: Any = None
        self._timer_at = math.inf

    def watch(self, key: Hashable, seconds: float) -> None:
        """``key`` must be done within ``seconds`` from now."""
        at = self._loop.time() + seconds
        self._at[key] = at
        if at < self._timer_at:
            self._arm(at)

    def done(self, key: Hashable) -> None:
        """``key`` ended (in time or not); forget it."""
        self._at.pop(key, None)

    def __len__(self) -> int:
        return len(self._at)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        self._at.clear()

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time() + _EARLY
        expired = [key for key, at in self._at.items() if at <= now]
        for key in expired:
            del self._at[key]
        if self._at:
            self._arm(min(self._at.values()))
        for key in expired:
            self._on_expired(key)
