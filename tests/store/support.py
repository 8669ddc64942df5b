"""What the store tests share: breakers built alike, a load, Redis counters, subscribers.

The fixtures they use (``raw``, ``stores``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, Self, TypeVar

import redis.asyncio as aioredis

from resilience import CircuitBreaker, CircuitOpenError, CircuitState, CountWindow
from resilience.store.redis import RedisStore

from ..helpers import boom, ok, until

__all__ = [
    "TIMEOUT",
    "Load",
    "command_calls",
    "evalsha_calls",
    "fleet_breaker",
    "fleet_gen",
    "quorum_breaker",
    "recovered",
    "report",
    "started",
    "subscribed",
    "trip",
]

TIMEOUT = 0.25  #: seconds: the store's default bound on a Redis call


class Setup(Protocol):
    """Servers a test starts and stops (``cluster_support``'s setups)."""

    def start(self) -> Self: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Setup)


async def trip(b: CircuitBreaker, calls: int = 4) -> None:
    """Fail calls until this replica's own window opens its breaker."""
    for _ in range(calls):
        with contextlib.suppress(ValueError, CircuitOpenError):
            await b.call(boom)
    assert b.state is CircuitState.OPEN


def quorum_breaker(store: RedisStore, k: int, **options: Any) -> CircuitBreaker:
    """Breaker "dep" opening the fleet once ``k`` replicas' own windows (4 calls) trip."""
    options.setdefault("open_for", 30.0)
    return CircuitBreaker(
        "dep",
        store=store,
        window=CountWindow(4),
        minimum_calls=4,
        open_when="quorum",
        quorum=k,
        **options,
    )


async def synced(*stores: RedisStore, **options: Any) -> list[CircuitBreaker]:
    """Breaker "dep" (``options``) on each of ``stores``, called once and synced: every
    replica has read the fleet's state."""
    breakers = [CircuitBreaker("dep", store=s, **options) for s in stores]
    for b in breakers:
        await b.call(ok)
    for s in stores:
        await s.sync()
    return breakers


def fleet_breaker(store: RedisStore) -> CircuitBreaker:
    """The shared breaker every replica of the chaos tests builds alike (a window of 50: 5%
    upstream failures never trip it)."""
    return CircuitBreaker(
        "dep", store=store, window=CountWindow(50), minimum_calls=50, open_for=30.0
    )


def report(name: str, *lines: str) -> None:
    """Print measured numbers under a chaos scenario's heading (shown with ``pytest -s``)."""
    print(f"\n[chaos-redis] {name}")
    for line in lines:
        print(f"  {line}")


async def fleet_gen(raw: aioredis.Redis, store: RedisStore, name: str = "dep") -> int:
    """The generation Redis holds for breaker ``name`` (-1: none)."""
    return int(await raw.hget(store.key(name, "state"), "gen") or -1)


async def evalsha_calls(raw: aioredis.Redis) -> int:
    """How many EVALSHA commands the server has run."""
    return await command_calls(raw, "evalsha")


async def subscribed(client: aioredis.Redis, channel: str, count: int) -> None:
    """Wait until ``count`` connections listen on ``channel`` (every replica's subscriber has
    attached), as the server ``client`` talks to counts them."""

    async def listening() -> bool:
        ((_, listeners),) = await client.pubsub_numsub(channel)
        return int(listeners) >= count

    await until(listening, 10, f"{count} subscribers on {channel}", every=0.01)


async def command_calls(raw: aioredis.Redis, command: str) -> int:
    """How many ``command`` commands (lower case) the server has run."""
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def started(setup: S) -> Iterator[S]:
    """``setup`` started, and stopped at the end: a fixture's ``yield from``."""
    try:
        yield setup.start()
    finally:
        setup.stop()


class Load:
    """Calls through breakers from background tasks until ``stop()``: how many succeeded,
    and every failure the store caused (anything but an open breaker's rejection)."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures: list[BaseException] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, breakers: Sequence[CircuitBreaker], *, pause: float) -> None:
        """One more task, calling each of ``breakers`` in turn, ``pause`` s between rounds."""
        self._tasks.append(asyncio.create_task(self._drive(breakers, pause)))

    async def _drive(self, breakers: Sequence[CircuitBreaker], pause: float) -> None:
        while not self._stopping.is_set():
            for b in breakers:
                try:
                    await b.call(ok)
                    self.calls += 1
                except CircuitOpenError:
                    pass
                except Exception as exc:  # a failure caused by the store
                    self.failures.append(exc)
            await asyncio.sleep(pause)

    async def stop(self) -> None:
        """End every task (each finishes its round)."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)


async def recovered(*stores: RedisStore, seconds: float = 20.0) -> None:
    """Wait (bounded) until every store syncs with Redis again, every Cluster node back."""

    async def synced(store: RedisStore) -> bool:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.sync(), 2)
        return not store.degraded and not store.supervisor.away

    async def all_synced() -> bool:
        for store in stores:
            if not await synced(store):
                return False
        return True

    deadline = time.monotonic() + seconds
    while not await all_synced():
        assert time.monotonic() < deadline, "the stores never recovered"
        await asyncio.sleep(0.05)
