"""Time, injected: every policy reads its clock, so tests can replace it.

A clock answers three questions: what time is it (``monotonic``), wait a while (``sleep``) and
run this later (``call_later``). ``SystemClock`` is the real one; ``resilience.testing.FakeClock``
jumps only when told to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "TimerHandle"]


class TimerHandle(Protocol):
    """What ``Clock.call_later`` returns: something that can be cancelled."""

    def cancel(self) -> None:
        """Stop the callback from running (no-op if it already ran)."""


@runtime_checkable
class Clock(Protocol):
    """Monotonic time in seconds, a sleep and a timer, all on the same time line."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    async def sleep(self, seconds: float) -> None:
        """Suspend the current task for ``seconds`` of this clock's time."""

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Run ``callback()`` on the running event loop after ``delay`` seconds."""


class SystemClock:
    """The real clock: ``time.monotonic``, ``asyncio.sleep`` and the event loop's timers."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(asyncio.sleep)

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Schedule ``callback`` on the running loop after ``delay`` seconds."""
        return asyncio.get_running_loop().call_later(delay, callback)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
