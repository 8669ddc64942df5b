"""Single flights on Redis (``flight.lua``): a mixin of ``RedisStore``, whose ``Store``
protocol says what each primitive does. A flight's end is published on the store's channel;
the subscriber hands it to ``FlightWakes``, which wakes the replicas waiting for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...checks import check_name, check_seconds
from ...clock import Clock
from ..base import check_published
from ..wakes import FlightWakes
from .primitives import escape, number, parse_flight, ttl_ms

if TYPE_CHECKING:
    from .engine import SyncEngine
    from .supervisor import Supervisor

__all__ = ["RedisFlights"]


class RedisFlights:
    """``flight_join``, ``flight_renew``, ``flight_land`` and ``flight_wait`` on Redis."""

    engine: SyncEngine
    supervisor: Supervisor
    channel: str
    clock: Clock
    _wakes: FlightWakes

    def key(self, name: str, suffix: str) -> str:
        raise NotImplementedError

    def _register(self, name: str) -> None:
        raise NotImplementedError

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        raise NotImplementedError

    def _flights_start(self) -> None:
        """Wake the waiters of a flight when its message comes (``__init__`` calls it once
        the engine exists)."""
        self._wakes = FlightWakes()
        self.engine.subscriber.on_flight = self._wakes.wake

    async def flight_join(
        self, key: str, item: str, *, holder: str, awaited: str, ttl: float
    ) -> tuple[str, bytes | None]:
        """What ``awaited`` published for flight ``item``, or the holder of its lease."""
        reply = await self._flight("join", key, item, holder, ttl, awaited)
        return self.supervisor.parsed(parse_flight, reply)

    async def flight_renew(self, key: str, item: str, *, holder: str, ttl: float) -> bool:
        """Extend ``holder``'s lease on flight ``item``; ``False`` if it lost it."""
        reply = await self._flight("renew", key, item, holder, ttl, "")
        return bool(self.supervisor.parsed(number, reply))

    async def flight_land(
        self, key: str, item: str, *, holder: str, value: bytes | None, ttl: float
    ) -> bool:
        """Publish ``value`` (``None``: nothing) and free the lease, if ``holder`` held it."""
        if value is not None:
            check_published(key, value)
        op, data = ("give", "") if value is None else ("land", value)
        reply = await self._flight(op, key, item, holder, ttl, data)
        return bool(self.supervisor.parsed(number, reply))

    async def flight_wait(self, key: str, item: str, *, longest: float) -> None:
        """Wait for flight ``item``'s message (it landed, or was given back), or ``longest``."""
        check_seconds("longest", longest)
        await self._wakes.wait(self.key(key, "flight:" + escape(item)), self.clock, longest)

    async def _flight(
        self, op: str, key: str, item: str, holder: str, ttl: float, data: Any
    ) -> Any:
        check_name(key, "key")
        check_name(holder, "holder")
        self._register(key)
        keys = [self.key(key, "flight:" + escape(item)), self.key(key, "landed:" + escape(item))]
        args = [op, self.engine.now_arg(), holder, ttl_ms(ttl), data, self.channel]
        return await self._script("flight", keys, args)
