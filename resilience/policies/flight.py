"""``FleetFlight``: one execution of a call for a whole fleet (``Coalesce(store=...)``).

Each replica's callers already share one execution per key (``Coalesce``); that execution
joins the key's flight in the store (``Store.flight_join``). The replica that finds it free
holds its lease and runs the call, renewing the lease every third of ``lease`` seconds; when
the call returns, it publishes the result, encoded (``serializer``, at most ``max_bytes``),
and frees the lease in one step (``flight_land``), which wakes the waiting replicas
(``flight_wait``: through the store's pub/sub channel on Redis); they look for what the
holder they saw published then, and every ``poll`` seconds in case a wake-up was missed.
A holder that dies or stops (SIGKILL, SIGSTOP, a partition) stops renewing: its lease
lapses and the next replica to look takes the flight over and runs the call; a holder that
comes back late cannot publish (fenced).

Only a result travels. A call that fails, a result that does not encode or is too long: the
holder publishes that it has nothing to share, and each waiting replica runs the call
itself. A holder whose callers all left gives the lease back, and a waiter takes over. A
store that is down (or fails) is no reason to fail a call: the replica runs it itself.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from ..checks import check_int, check_seconds, store_down
from ..clock import Clock
from ..store.records import MAX_PUBLISHED
from .base import check_store
from .cache import Serializer, check_serializer, encoded

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["FleetFlight", "check_fleet_options"]

logger = logging.getLogger("resilience")

_VALUE = b"="  # a published frame: a result follows
_NOTHING = b"!"  # a published frame: the holder has no result to share
_PRIMITIVES = ("flight_join", "flight_renew", "flight_land", "flight_wait")


def check_fleet_options(
    lease: object, poll: object, serializer: object, max_bytes: object
) -> tuple[float, float, Serializer, int]:
    """``lease``, ``poll`` (shorter), ``serializer`` (``None``: JSON) and ``max_bytes``,
    checked."""
    seconds: float = check_seconds("lease", lease)
    every: float = check_seconds("poll", poll)
    if every >= seconds:
        raise ValueError(f"poll must be shorter than lease ({seconds:g}s), got {poll!r}")
    checked = check_serializer("serializer", serializer)
    return seconds, every, checked, check_int("max_bytes", max_bytes, maximum=MAX_PUBLISHED - 1)


class FleetFlight:
    """Runs a call once for every replica sharing ``store`` (see the module docstring)."""

    __slots__ = ("_landing", "clock", "lease", "max_bytes", "name", "poll", "serializer", "store")

    def __init__(
        self,
        store: object,
        *,
        name: str,
        clock: Clock,
        lease: float,
        poll: float,
        serializer: Serializer | None,
        max_bytes: int,
    ) -> None:
        self.store = cast("Store", check_store("store", store, *_PRIMITIVES))
        self.name = name
        self.clock = clock
        self.lease, self.poll, self.serializer, self.max_bytes = check_fleet_options(
            lease, poll, serializer, max_bytes
        )
        self._landing: set[asyncio.Future[None]] = set()

    async def run(self, item: str, start: Callable[[], Awaitable[Any]]) -> Any:
        """The outcome of the fleet's one execution of ``start()`` for ``item``: the result
        another replica published, or this replica's own call's."""
        store = self.store
        me = uuid.uuid4().hex
        awaited = ""
        while not store_down(store):
            try:
                holder, raw = await store.flight_join(
                    self.name, item, holder=me, awaited=awaited, ttl=self.lease
                )
            except Exception as exc:  # the store failed: no reason to fail the call
                logger.debug("coalesce %r runs %r alone: %r", self.name, item, exc)
                break
            except BaseException:  # cancelled: the store may have given this replica the
                self._land_later(item, me, None)  # lease already; give it back (if held)
                raise
            if holder == me:
                return await self._lead(item, me, start)
            if raw is not None:
                found, value = self._decode(raw)
                if found:
                    return value
                break  # the holder has nothing to share: run it here
            awaited = holder
            try:  # until the flight ends (the store's message) or for a poll at most
                await store.flight_wait(self.name, item, longest=self.poll)
            except Exception:
                await self.clock.sleep(self.poll)
        return await start()

    async def _lead(self, item: str, me: str, start: Callable[[], Awaitable[Any]]) -> Any:
        """Run the call as the flight's holder: renew the lease meanwhile, publish after."""
        renewing = asyncio.ensure_future(self._renew(item, me))
        frame: bytes | None = _NOTHING
        try:
            result = await start()
            frame = self._encode(result)
            return result
        except Exception:  # nothing to share: each waiting replica runs its own call
            raise
        except BaseException:  # cancelled: give the lease back, a waiter takes over
            frame = None
            raise
        finally:
            renewing.cancel()
            self._land_later(item, me, frame)

    def _land_later(self, item: str, me: str, frame: bytes | None) -> None:
        """``_land`` in the background: the caller does not wait for the store."""
        landing = asyncio.ensure_future(self._land(item, me, frame))
        self._landing.add(landing)
        landing.add_done_callback(self._landing.discard)

    async def _renew(self, item: str, me: str) -> None:
        """Keep the lease while the call runs (every third of ``lease``)."""
        while True:
            await self.clock.sleep(self.lease / 3)
            try:
                if not await self.store.flight_renew(self.name, item, holder=me, ttl=self.lease):
                    return  # lapsed (this replica stalled): another took over
            except Exception as exc:
                logger.debug("coalesce %r could not renew %r: %r", self.name, item, exc)

    async def _land(self, item: str, me: str, frame: bytes | None) -> None:
        """Publish ``frame`` (``None``: nothing) and free the lease; if the store fails, the
        lease lapses on its own."""
        try:
            await self.store.flight_land(self.name, item, holder=me, value=frame, ttl=self.lease)
        except Exception as exc:
            logger.debug("coalesce %r could not publish %r: %r", self.name, item, exc)

    def _encode(self, result: Any) -> bytes:
        """A result as published: ``=`` and its encoding, or ``!`` when it cannot be."""
        # a result that cannot be shared is no news (the docs say so): debug only
        data = encoded(
            self.serializer, result, f"coalesce {self.name!r} cannot share", logging.DEBUG
        )
        if data is None or len(data) > self.max_bytes:
            return _NOTHING
        return _VALUE + data

    def _decode(self, raw: bytes) -> tuple[bool, Any]:
        """``(True, result)`` from a published frame, ``(False, None)`` if it holds none."""
        if raw[:1] == _VALUE:
            try:
                return True, self.serializer.loads(raw[1:])
            except Exception as exc:
                logger.warning("coalesce %r: a published result did not decode: %r", self.name, exc)
        return False, None
