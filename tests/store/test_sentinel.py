"""RedisStore through Redis Sentinel: the primary is SIGKILLed under load and a replica is
promoted; calls never fail because of it, and the fleet's breakers converge on the new primary."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.retry import Retry as RedisRetry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from resilience import (
    CircuitBreaker,
    CircuitState,
    CountWindow,
    Event,
    StoreDegraded,
    StoreRecovered,
)
from resilience.store.redis import RedisStore

from ..cluster_support import SentinelSetup, command, trip
from ..helpers import unique_prefix, until
from .support import TIMEOUT, Load, recovered, started, subscribed

pytestmark = [pytest.mark.redis, pytest.mark.slow]  # servers of its own, started here


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    """A primary, a replica and three sentinels of this test's own, killed at the end."""
    yield from started(SentinelSetup(down_after_ms=500, failover_timeout_ms=2000))


@contextlib.asynccontextmanager
async def sentinel_store(
    setup: SentinelSetup, prefix: str, events: list[Event]
) -> AsyncIterator[RedisStore]:
    """A replica's store over `Sentinel(...).master_for(...)`; every client closed at the end."""
    sentinel = Sentinel(
        setup.sentinel_addresses, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
    )
    client = sentinel.master_for(
        SentinelSetup.MASTER,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        retry=RedisRetry(NoBackoff(), 0),
        health_check_interval=0,
    )
    store = RedisStore(client, prefix=prefix, timeout=TIMEOUT, listeners=[events.append])
    try:
        async with store:
            yield store
    finally:
        await client.aclose()
        for s in sentinel.sentinels:
            await s.aclose()


def breaker(store: RedisStore, name: str, open_for: float = 60.0) -> CircuitBreaker:
    """A shared breaker every replica builds alike."""
    return CircuitBreaker(
        name, store=store, window=CountWindow(20), minimum_calls=10, open_for=open_for
    )


async def test_failover_under_load_calls_go_on_and_state_survives(
    sentinel_setup: SentinelSetup,
) -> None:
    """SIGKILL the primary under load: no call fails, the store follows the promoted replica,
    a breaker opened (and replicated) before the kill is still open at the same generation,
    and a trip after the failover reaches the other replica."""
    setup = sentinel_setup
    fleet = unique_prefix("sentinel")
    events_a: list[Event] = []
    events_b: list[Event] = []
    async with (
        sentinel_store(setup, fleet, events_a) as store_a,
        sentinel_store(setup, fleet, events_b) as store_b,
    ):
        # a breaker opened before the failover, replicated (WAIT) before the kill
        pre_a, pre_b = breaker(store_a, "pre"), breaker(store_b, "pre")
        await trip(pre_a)
        await until(lambda: pre_b.state is CircuitState.OPEN, 5, "B to see 'pre' open")
        gen_before = (await status_of(store_a, "pre")).generation
        assert "1" in command(setup.primary.port, "WAIT", "1", "2000")

        live_a, live_b = breaker(store_a, "live"), breaker(store_b, "live")
        load = Load()
        for b in (live_a, live_b):
            for _ in range(5):
                load.start([b], pause=0.001)
        try:
            await until(lambda: load.calls > 0, 5, "the load under way")
            old_primary = setup.primary.port
            setup.primary.kill()
            killed = time.monotonic()
            await until(
                lambda: setup.master_port() == setup.replica.port, 20, "the sentinels' failover"
            )
            failover = time.monotonic() - killed
            await recovered(store_a, store_b)
            back_after = time.monotonic() - killed
            calls_at_recovery = load.calls
            await asyncio.sleep(0.3)  # load goes on against the new primary
        finally:
            await load.stop()

        assert load.failures == []
        assert load.calls > calls_at_recovery > 0
        assert setup.master_port() != old_primary
        # the store went degraded while no primary answered, and came back
        assert any(isinstance(e, StoreDegraded) for e in events_a)
        assert any(isinstance(e, StoreRecovered) for e in events_a)
        assert any(isinstance(e, StoreRecovered) for e in events_b)

        # what survived: the replicated open breaker, same generation, still open
        pre = await status_of(store_a, "pre")
        assert pre.state is CircuitState.OPEN
        assert pre.generation == gen_before
        assert pre_a.state is CircuitState.OPEN
        assert pre_b.state is CircuitState.OPEN

        # the fleet converges after the failover: A trips, B learns it from the new primary
        # (at first through its periodic refresh: its subscriber may still be backing off)
        await trip(live_a)
        took = await until(lambda: live_b.state is CircuitState.OPEN, 3, "B to see 'live' open")
        live = await status_of(store_b, "live")
        assert live.state is CircuitState.OPEN
        # once the subscriber is back (its backoff is at most 2 s), a trip arrives by pub/sub
        late_a, late_b = breaker(store_a, "late"), breaker(store_b, "late")
        await store_b.sync()
        await subscribed(store_b.client, store_b.channel, 2)
        await trip(late_a)
        pubsub = await until(lambda: late_b.state is CircuitState.OPEN, 3, "B to see 'late'")
        assert pubsub < 0.5
        print(
            f"failover {failover:.2f}s, stores recovered {back_after:.2f}s after the kill, "
            f"{load.calls} calls, 0 failed, 'pre' gen {gen_before} -> {pre.generation}, "
            f"trip seen by the other replica after {took * 1000:.0f} ms just after recovery, "
            f"{pubsub * 1000:.0f} ms once both subscribers were back"
        )


async def status_of(store: RedisStore, name: str) -> Any:
    """The circuit-breaker status of `name`, read from Redis."""
    for s in await store.status():
        if s.name == name and s.kind == "circuit_breaker":
            return s
    raise AssertionError(f"no breaker {name!r} in status()")
