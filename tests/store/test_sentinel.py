"""RedisStore through Redis Sentinel: the primary is SIGKILLed under load and a replica is
promoted; calls never fail because of it, and the fleet's breakers converge on the new primary.
A switch whose old primary stays up (`SENTINEL FAILOVER`) is followed within a second."""

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

from resilience import Bulkhead, CircuitBreaker, CircuitState, CountWindow
from resilience.errors import BulkheadFullError, StoreUnavailableError
from resilience.events import Event, StoreDegraded, StoreRecovered
from resilience.store.redis import RedisStore

from ..cluster_support import SentinelSetup, command, info_field, trip
from ..fork_support import in_forked_child
from ..helpers import unique_prefix, until
from .support import TIMEOUT, Load, recovered, started, subscribed

pytestmark = [pytest.mark.redis, pytest.mark.slow]  # servers of its own, started here


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    """A primary, a replica and three sentinels of this test's own, killed at the end."""
    yield from started(SentinelSetup(down_after_ms=500, failover_timeout_ms=2000))


@contextlib.asynccontextmanager
async def sentinel_store(
    setup: SentinelSetup, prefix: str, events: list[Event], **options: Any
) -> AsyncIterator[RedisStore]:
    """A replica's store over `Sentinel(...).master_for(...)` (`options`: the Sentinel's);
    every client closed at the end."""
    sentinel = Sentinel(
        setup.sentinel_addresses,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        **options,
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


def pool_address(store: RedisStore) -> tuple[str, int] | None:
    """The primary the store's pooled connections point at (as its Sentinel pool knows it)."""
    address = store.client.connection_pool.master_address
    return None if address is None else (str(address[0]), int(address[1]))


async def same_primary(writer: RedisStore, reader: RedisStore) -> bool:
    """Whether what `writer` writes now is what `reader` reads (both on the same primary)."""
    token = str(time.monotonic_ns()).encode()
    try:
        await writer.cache_set("agree", "token", token, ttl=60)
        return await reader.cache_get("agree", "token") == token
    except StoreUnavailableError:  # one of them is moving to the new primary
        return False


async def test_after_a_sentinel_failover_every_replica_writes_to_the_new_primary(
    sentinel_setup: SentinelSetup,
) -> None:
    """`SENTINEL FAILOVER` leaves the old primary up and writable for seconds: a replica
    connected before it and one connected after it agree within about 2 s (what one writes the
    other reads; a trip on either is seen open by the other; a fleet-wide bulkhead's limit
    holds across both), while the old primary is still a writable primary."""
    setup = sentinel_setup
    fleet = unique_prefix("switch")
    events_a: list[Event] = []
    events_b: list[Event] = []
    async with sentinel_store(setup, fleet, events_a) as store_a:
        await trip(breaker(store_a, "before"))
        await store_a.sync()
        await subscribed(store_a.client, store_a.channel, 1)
        old, new = setup.primary.port, setup.replica.port
        assert pool_address(store_a) == ("127.0.0.1", old)
        assert "OK" in command(setup.sentinels[0].port, "SENTINEL", "FAILOVER", setup.MASTER)
        await until(
            lambda: all(setup.master_port(s) == new for s in setup.sentinels), 10, "the switch"
        )
        switched = time.monotonic()
        async with sentinel_store(setup, fleet, events_b) as store_b:
            await until(lambda: same_primary(store_a, store_b), 4, "A and B to agree")
            agreed = time.monotonic() - switched
            assert await same_primary(store_b, store_a)
            assert pool_address(store_a) == ("127.0.0.1", new)
            # the old primary is still a writable primary: the agreement is the store's doing
            assert info_field(old, "replication", "role") == "master"

            a, b = breaker(store_a, "after-a"), breaker(store_b, "after-a")
            await store_b.sync()
            await trip(a)
            seen_by_b = await until(lambda: b.state is CircuitState.OPEN, 3, "B to see A's trip")
            a2, b2 = breaker(store_a, "after-b"), breaker(store_b, "after-b")
            await store_a.sync()
            await trip(b2)
            seen_by_a = await until(lambda: a2.state is CircuitState.OPEN, 3, "A to see B's trip")

            # one fleet-wide limit of 4 concurrent calls, not one on each primary
            bulkheads = [
                Bulkhead(4, distributed=True, shares=True, store=s, name="pool")
                for s in (store_a, store_b)
            ]
            gate = asyncio.Event()

            async def held() -> str:
                await gate.wait()
                return "ok"

            calls = [asyncio.ensure_future(bh.call(held)) for bh in bulkheads for _ in range(4)]
            await until(lambda: sum(bh.in_flight for bh in bulkheads) >= 4, 5, "4 calls in")
            await asyncio.sleep(0.3)  # the shares settle: nothing more gets in
            in_flight = sum(bh.in_flight for bh in bulkheads)
            gate.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
            for bh in bulkheads:
                await bh.aclose()
            assert in_flight == 4
            assert results.count("ok") == 4
            assert all(isinstance(r, BulkheadFullError) for r in results if r != "ok")
            assert info_field(old, "replication", "role") == "master"
        degraded = [e for e in events_a if isinstance(e, StoreDegraded)]
        assert degraded
        assert "sentinel failover" in degraded[-1].error
        print(
            f"both replicas on the new primary {agreed:.2f}s after the sentinels switched; "
            f"trips seen by the other replica after {seen_by_b * 1000:.0f} / "
            f"{seen_by_a * 1000:.0f} ms; the old primary still a primary after "
            f"{time.monotonic() - switched:.2f}s"
        )


async def test_while_no_sentinel_answers_the_store_keeps_its_primary(
    sentinel_setup: SentinelSetup,
) -> None:
    """With every sentinel killed, asking where the primary is changes nothing: the primary
    the store knows stays, and the watch does not degrade the store (it asks again a second
    later)."""
    setup = sentinel_setup
    events: list[Event] = []
    async with sentinel_store(setup, unique_prefix("blind"), events) as store:
        await store.sync()
        assert not await store.supervisor.check_primary()  # the primary it uses
        assert store.supervisor.primary == ("127.0.0.1", setup.primary.port)
        for sentinel in setup.sentinels:
            sentinel.kill()
        assert not await store.supervisor.check_primary()
        await asyncio.sleep(2.5)  # the store's own watch asks twice more
        assert store.supervisor.primary == ("127.0.0.1", setup.primary.port)
        assert not [e for e in events if isinstance(e, StoreDegraded)]
        assert not store.degraded


async def test_only_a_store_on_a_sentinel_primary_watches_where_the_primary_is() -> None:
    """The watch (one command a second) runs only for a `master_for` client: a plain client
    or a `slave_for` one costs nothing more."""
    sentinel = Sentinel([("127.0.0.1", 1)], socket_timeout=TIMEOUT)
    clients = {
        "plain": RedisStore.from_url("redis://127.0.0.1:1"),
        "primary": RedisStore(sentinel.master_for("x")),
        "replica": RedisStore(sentinel.slave_for("x")),
    }
    watching = {name: s.supervisor.sentinel_pool is not None for name, s in clients.items()}
    assert watching == {"plain": False, "primary": True, "replica": False}
    for store in clients.values():
        store.engine.start()
    tasks = {name: len(s.engine._tasks) for name, s in clients.items()}
    for store in clients.values():
        await store.aclose()
    assert tasks == {"plain": 2, "primary": 3, "replica": 2}


def pooled(client: Any) -> int:
    """Connections a redis-py client's pool holds (idle and in use)."""
    pool = client.connection_pool
    return len(pool._available_connections) + len(pool._in_use_connections)


async def test_a_forked_child_asks_the_sentinels_on_connections_of_its_own(
    sentinel_setup: SentinelSetup,
) -> None:
    """A store over Sentinel, forked: the child holds none of its parent's connections to
    the sentinels (the watch asks them every second, from both processes), and finds the
    same primary through new ones."""
    setup = sentinel_setup
    async with sentinel_store(setup, unique_prefix("forked"), []) as store:
        await store.sync()
        assert not await store.supervisor.check_primary()
        sentinels = store.supervisor.sentinel_pool.sentinel_manager.sentinels
        assert sum(pooled(s) for s in sentinels) >= 1

        async def child() -> str:  # in a forked child: the inherited store
            inherited = sum(pooled(s) for s in sentinels)
            moved = await store.supervisor.check_primary()
            return f"{inherited} {moved} {store.supervisor.primary}"

        assert in_forked_child(child) == f"0 False {('127.0.0.1', setup.primary.port)}"
        assert not await store.supervisor.check_primary()


async def test_the_primary_is_named_as_the_client_finds_it(
    sentinel_setup: SentinelSetup,
) -> None:
    """A Sentinel client that names the primary its own way (`force_master_ip`, or a
    subclass that maps addresses) is asked the way its pool asks: no failover is seen where
    there is none, and the store neither degrades nor drops its connections."""
    setup = sentinel_setup
    events: list[Event] = []
    options = {"force_master_ip": "localhost"}
    async with sentinel_store(setup, unique_prefix("named"), events, **options) as store:
        await store.sync()
        for _ in range(3):
            assert not await store.supervisor.check_primary()
        assert store.supervisor.primary == ("localhost", setup.primary.port)
        assert not [e for e in events if isinstance(e, StoreDegraded)]
