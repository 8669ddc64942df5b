"""``FlightWakes``: the waiters of each single flight in this process, woken when it ends.

Both stores use it for ``Store.flight_wait``: ``MemoryStore`` wakes a flight's waiters as its
holder lands it; ``RedisStore`` when the message its holder's script published arrives on
the store's channel. A waiter that misses a wake-up (one that arrived before it began to
wait, a lost message) looks again after its timeout.
"""

from __future__ import annotations

import asyncio

from ..clock import Clock

__all__ = ["FlightWakes"]


class FlightWakes:
    """One event per flight that has waiters in this process; none kept once they left."""

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, int]] = {}  # flight -> event, waiters

    async def wait(self, flight: str, clock: Clock, longest: float) -> None:
        """Return when ``flight`` ends (``wake``) or after ``longest`` seconds of ``clock``."""
        event, waiters = self._events.get(flight) or (asyncio.Event(), 0)
        self._events[flight] = (event, waiters + 1)
        woken = asyncio.ensure_future(event.wait())
        slept = asyncio.ensure_future(clock.sleep(longest))
        try:
            await asyncio.wait((woken, slept), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            slept.cancel()
            current = self._events.get(flight)
            if current is not None and current[0] is event:  # not woken: leave it
                if current[1] > 1:
                    self._events[flight] = (event, current[1] - 1)
                else:
                    del self._events[flight]

    def wake(self, flight: str) -> None:
        """Wake every waiter of ``flight`` (a new wait after this waits for the next end)."""
        found = self._events.pop(flight, None)
        if found is not None:
            found[0].set()
