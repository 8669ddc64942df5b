"""Helpers for tests, yours included: a clock that moves only when told to."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from .checks import check_seconds

__all__ = ["FakeClock"]


class _Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FakeClock:
    """A ``Clock`` whose time moves only through ``advance()`` (or, with ``autojump``, sleeps).

    ``sleep(s)`` waits until the clock has been advanced by ``s``; ``call_later`` timers run
    inside ``advance()``, in time order, on the caller's thread. With ``autojump=True`` a
    sleep moves the clock forward by itself, so retries and backoff run instantly.
    """

    def __init__(self, start: float = 1000.0, *, autojump: bool = False) -> None:
        self._now = float(start)
        self.autojump = autojump
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self.slept: list[float] = []  #: every duration passed to ``sleep``, in order

    def monotonic(self) -> float:
        """The fake time."""
        return self._now

    def call_later(self, delay: float, callback: Callable[[], object]) -> _Timer:
        """Run ``callback`` once the clock has been advanced by ``delay``."""
        timer = _Timer(self._now + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        """Wait for ``seconds`` of fake time (at once with ``autojump``)."""
        self.slept.append(seconds)
        if self.autojump:
            self.advance(max(0.0, seconds))
            await asyncio.sleep(0)
            return
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_later(seconds, lambda: _wake(fut))
        try:
            await fut
        finally:
            timer.cancel()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running every timer that comes due, in order."""
        check_seconds("seconds", seconds, zero=True)
        target = self._now + seconds
        timers = self._timers
        while timers and timers[0][0] <= target:
            when, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
        self._now = target

    @property
    def pending(self) -> int:
        """Timers not yet run or cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def __repr__(self) -> str:
        return f"FakeClock({self._now:g})"
