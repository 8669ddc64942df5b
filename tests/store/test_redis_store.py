"""RedisStore specifics: keys, TTLs, garbage in Redis, pub/sub, strict mode, Redis failing."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    StoreDataReset,
    StoreDegraded,
    StoreRecovered,
    TimeWindow,
)
from resilience.events import Event
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import boom, ok, raises_each, unique_prefix, until
from ..helpers import breaker as small_breaker
from ..redis_server import RedisServer
from .support import subscribed


def breaker(store: RedisStore, name: str = "dep", **options: Any) -> CircuitBreaker:
    """The tests' small breaker, open thirty seconds: longer than any test here waits."""
    return small_breaker(store, name, **{"open_for": 30.0, **options})


async def fail(b: CircuitBreaker, times: int) -> None:
    await raises_each(times, ValueError, b.call, boom, match="boom")


@pytest.fixture
def make_store(stores: Callable[..., RedisStore]) -> Callable[..., RedisStore]:
    """RedisStores on the shared test server under one prefix per test (replicas of one
    fleet, unless given another prefix); closed at the end."""
    return functools.partial(stores, prefix=unique_prefix())


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["plain", "a}b", "{x}", "a:b:state", "line\nbreak", "pct%7B", "é€", "n" * 10_000]
)
async def test_hostile_names_get_one_hash_tag_each(
    make_store: Callable[..., RedisStore], raw: aioredis.Redis, name: str
) -> None:
    """Any name maps to keys with exactly one hash tag of its own, reachable by no other name."""
    store = make_store()
    for suffix in ("state", "win", "probes"):
        key = store.key(name, suffix)
        assert key.count("{") == 1
        assert key.count("}") == 1
        assert key.startswith(f"{store.prefix}:{{")
        assert key.endswith(f"}}:{suffix}")
    assert store.key(name, "state") != store.key(name + "}", "state")
    b = breaker(store, name)
    await fail(b, 4)
    await store.sync()
    assert b.state is CircuitState.OPEN
    assert await raw.hget(store.key(name, "state"), "state") == b"open"
    assert name in await store.known_names()


async def test_every_key_has_a_ttl(
    make_store: Callable[..., RedisStore], raw: aioredis.Redis, clock: FakeClock
) -> None:
    """Nothing this store writes lives forever."""
    store = make_store(clock=clock)
    b = breaker(store, half_open_calls=2, open_for=0.05)
    await fail(b, 4)
    await store.sync()
    gate = asyncio.Event()

    async def probe() -> None:
        await gate.wait()

    tasks: list[asyncio.Task[None]] = []

    async def probing() -> bool:
        # the published open may come back after the fake clock moved and, stamped by the
        # server's clock, start the open time again: wait it out and try again
        if not tasks or tasks[-1].done():
            clock.advance(0.06)
            tasks.append(asyncio.create_task(b.call(probe)))
            await asyncio.sleep(0.005)
        return b.state is CircuitState.HALF_OPEN

    await until(probing)
    task = tasks[-1]
    await store.acquire_lease("pool", limit=1, ttl=10)
    await store.rate_take("api", interval=0.1, burst=1)
    await store.budget_add("budget", delta=-1, maximum=5, ttl=10)
    await store.cache_set("fallback", "item", b"1", ttl=10)
    await store.sync()
    keys = [k async for k in raw.scan_iter(match=f"{store.prefix}:*")]
    assert len(keys) >= 6
    for key in keys:
        assert await raw.pttl(key) > 0, key
    gate.set()
    await task
    await asyncio.gather(*tasks[:-1], return_exceptions=True)


async def test_prefixes_do_not_collide(make_store: Callable[..., RedisStore]) -> None:
    """Two prefixes on one server keep separate breakers of the same name."""
    a = breaker(make_store(prefix="one"))
    b = breaker(make_store(prefix="two"))
    await fail(a, 4)
    await a.store.sync()
    await b.store.sync()
    assert (a.state, b.state) == (CircuitState.OPEN, CircuitState.CLOSED)


@pytest.mark.parametrize("prefix", ["", "a{b", "a b", "x}"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    """A prefix that would break hash tags or key parsing is refused."""
    with pytest.raises(ValueError, match="prefix"):
        RedisStore.from_url("redis://127.0.0.1:1", prefix=prefix)


@given(st.text(min_size=1, max_size=40))
def test_a_name_is_escaped_as_percent_encoding_would(name: str) -> None:
    """The fast path for plain names gives what ``quote(name, safe="")`` gives."""
    from urllib.parse import quote

    from resilience.store.redis.primitives import escape

    assert escape(name) == quote(name, safe="")


# --- garbage in Redis -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "vandalism",
    [
        lambda r, k: r.set(k("state"), "not a hash"),
        lambda r, k: r.hset(k("state"), mapping={"state": "melted", "gen": "x"}),
        lambda r, k: r.rpush(k("win"), "garbage", "1 2"),
        lambda r, k: r.set(k("win"), "oops"),
        lambda r, k: r.sadd(k("probes"), "x"),
    ],
)
async def test_garbage_is_reported_and_reset(
    make_store: Callable[..., RedisStore],
    raw: aioredis.Redis,
    vandalism: Callable[[aioredis.Redis, Callable[[str], str]], Awaitable[Any]],
) -> None:
    """Keys someone else wrote are reset with an event; calls never see an error."""
    events: list[Event] = []
    store = make_store(listeners=[events.append])
    b = breaker(store)
    await store.sync()
    await vandalism(raw, lambda suffix: store.key("dep", suffix))
    for _ in range(5):  # more than the window holds: the flush reads its oldest chunks
        assert await b.call(ok) == "ok"
    await store.sync()
    # trips on the local window at once, or after the reset one
    await raises_each(4, (ValueError, CircuitOpenError), b.call, boom)
    await store.sync()
    assert b.state is CircuitState.OPEN
    assert any(isinstance(e, StoreDataReset) for e in events)


@pytest.mark.parametrize("value", ["1.5", "inf", " 2", "-1"])
async def test_garbage_in_a_time_window_is_that_breakers_alone(
    make_store: Callable[..., RedisStore], raw: aioredis.Redis, value: str
) -> None:
    """A bucket count that is not ours in a breaker's time window is reset and reported,
    round after round the store stays healthy, and the breaker still trips."""
    events: list[Event] = []
    store = make_store(listeners=[events.append])
    b = breaker(store, window=TimeWindow(60), minimum_calls=4)
    await b.call(ok)
    await store.sync()
    window = store.key("dep", "win")
    await raw.hset(window, mapping=dict.fromkeys(await raw.hkeys(window), value))
    for _ in range(3):
        assert await b.call(ok) == "ok"
        await store.sync()
    assert not any(isinstance(e, StoreDegraded) for e in events), events
    assert [type(e) for e in events] == [StoreDataReset]
    await fail(b, 4)
    await store.sync()
    assert b.state is CircuitState.OPEN


async def test_garbage_in_shared_primitives_is_reset(
    make_store: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """A rate bucket, a budget or a cached value holding garbage is reset and reported,
    never raised, and the store stays healthy."""
    events: list[Event] = []
    store = make_store(listeners=[events.append])
    await raw.set(store.key("api", "gcra"), "garbage")
    await raw.hset(store.key("bud", "budget"), "x", "y")
    await raw.hset(store.key("fb", "cache:item"), "x", "y")
    assert await store.rate_take("api", interval=1.0, burst=1) == 0.0
    assert await store.budget_add("bud", delta=0, maximum=3, ttl=10) == 3
    assert await store.cache_get("fb", "item") is None
    await store.cache_set("fb", "item", b"v", ttl=10)
    assert await store.cache_get("fb", "item") == b"v"
    assert [type(e) for e in events] == [StoreDataReset] * 3
    assert not store.degraded


@pytest.mark.parametrize("value", ["1.5", "inf", "nan", "-3", " 2", "1e3", "0x10", "text"])
async def test_garbage_in_a_shared_window_is_that_windows_alone(
    make_store: Callable[..., RedisStore], raw: aioredis.Redis, value: str
) -> None:
    """A count that is not a whole number we wrote, under a shared window, is reset and
    reported; the window counts on and the store stays healthy."""
    events: list[Event] = []
    store = make_store(listeners=[events.append], clock=FakeClock())
    assert await store.window_add("th", [2, 1], window=10) == (2, 1)
    counts = store.key("th", "counts")
    fields = await raw.hkeys(counts)
    await raw.hset(counts, mapping=dict.fromkeys(fields, value))  # the current bucket
    totals = [await store.window_add("th", [1, 0], window=10) for _ in range(3)]
    assert totals == [(1, 0), (2, 0), (3, 0)]  # the garbage went, the window counts on
    assert not store.degraded
    assert not any(isinstance(e, StoreDegraded) for e in events), events
    assert [type(e) for e in events] == [StoreDataReset]
    await raw.set(counts, "not a hash")
    assert await store.window_add("th", [1, 1], window=10) == (1, 1)
    assert [type(e) for e in events] == [StoreDataReset] * 2
    assert not store.degraded


# --- propagation -----------------------------------------------------------------------------


async def test_a_local_trip_flushes_at_once_and_is_pushed(
    make_store: Callable[..., RedisStore],
) -> None:
    """With a long sync_interval, outcomes that trip locally still reach every replica fast."""
    a_store, b_store = make_store(sync_interval=60), make_store(sync_interval=60)
    a, b = breaker(a_store), breaker(b_store)
    await a_store.sync()
    await b_store.sync()
    await subscribed(a_store.client, a_store.channel, 2)
    await fail(a, 4)
    await until(lambda: b.state is CircuitState.OPEN, 5.0)  # no flush due for 60 s: pushed
    assert a.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await b.call(ok)


async def test_the_fleets_sum_trips_within_an_interval(
    make_store: Callable[..., RedisStore],
) -> None:
    """Two replicas each below the threshold trip the breaker together at their flushes."""
    stores = [make_store(sync_interval=0.02) for _ in range(2)]
    bs = [breaker(s, minimum_calls=8, window=CountWindow(8)) for s in stores]
    for s in stores:
        await s.sync()
    for b in bs:
        await fail(b, 2)
        for _ in range(2):
            await b.call(ok)
    assert all(b.state is CircuitState.CLOSED for b in bs)  # 2 of 4 locally: under minimum
    for b in bs:
        await fail(b, 1)
    await until(lambda: all(b.state is CircuitState.OPEN for b in bs))


async def test_time_windows_are_shared(make_store: Callable[..., RedisStore]) -> None:
    """Time-bucketed windows merge across replicas too."""
    stores = [make_store() for _ in range(2)]
    bs = [breaker(s, window=TimeWindow(60, 6), minimum_calls=6) for s in stores]
    for b in bs:
        await fail(b, 3)
    for s in stores:
        await s.sync()
    for s in stores:
        await s.sync()
    assert all(b.state is CircuitState.OPEN for b in bs)


async def test_strict_mode_writes_before_returning(
    make_store: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """In strict mode the shared window holds an outcome as soon as its call has returned."""
    store = make_store(strict=True, sync_interval=60)
    b = breaker(store, minimum_calls=10, window=CountWindow(10))
    await b.call(ok)
    await fail(b, 1)
    chunks = await raw.lrange(store.key("dep", "win"), 0, -1)
    total = [sum(int(c.split()[i]) for c in chunks) for i in range(2)]
    assert total == [2, 1]
    results = await asyncio.gather(*(b.call(ok) for _ in range(20)))
    assert results == ["ok"] * 20
    chunks = await raw.lrange(store.key("dep", "win"), 0, -1)
    assert sum(int(c.split()[0]) for c in chunks) == 10  # the window holds the last 10


# --- Redis failing ---------------------------------------------------------------------------


async def test_calls_go_on_while_redis_is_down_and_state_converges(
    redis_server: RedisServer,
) -> None:
    """Kill Redis mid-load: no call fails or waits; after a restart the fleet agrees again."""
    events: list[Event] = []
    a_store = RedisStore.from_url(redis_server.url, sync_interval=0.01, listeners=[events.append])
    b_store = RedisStore.from_url(redis_server.url, sync_interval=0.01)
    try:
        a, b = breaker(a_store, minimum_calls=20, window=CountWindow(20)), breaker(b_store)
        await a_store.sync()
        await b_store.sync()
        redis_server.kill()
        slowest = 0.0
        for i in range(300):
            start = time.perf_counter()
            assert await a.call(ok) == "ok"
            slowest = max(slowest, time.perf_counter() - start)
            if i % 50 == 0:
                await asyncio.sleep(0.005)
        await until(lambda: any(isinstance(e, StoreDegraded) for e in events))
        # no call waited on Redis: the slowest stayed well under one store timeout (0.25 s)
        assert slowest < a_store.timeout / 2, slowest
        redis_server.start()  # same port, empty: no persistence
        await until(lambda: any(isinstance(e, StoreRecovered) for e in events), 15)
        await fail(b, 4)
        await until(lambda: a.state is CircuitState.OPEN, 15)
    finally:
        await a_store.aclose()
        await b_store.aclose()


async def test_a_degraded_replica_trips_on_its_own(redis_server: RedisServer) -> None:
    """With Redis gone, a replica's own failures still open its breaker locally."""
    store = RedisStore.from_url(redis_server.url, sync_interval=0.01)
    try:
        b = breaker(store)
        await store.sync()
        redis_server.kill()
        for _ in range(40):
            try:
                await b.call(boom)
            except (ValueError, CircuitOpenError):
                pass
            if b.state is CircuitState.OPEN:
                break
            await asyncio.sleep(0.01)
        assert store.degraded
        assert b.state is CircuitState.OPEN
    finally:
        await store.aclose()


async def test_a_frozen_redis_costs_calls_nothing(redis_server: RedisServer) -> None:
    """SIGSTOP Redis: calls stay fast; after SIGCONT the store recovers."""
    events: list[Event] = []
    store = RedisStore.from_url(
        redis_server.url, sync_interval=0.01, timeout=0.1, listeners=[events.append]
    )
    try:
        b = breaker(store, minimum_calls=50, window=CountWindow(50))
        await store.sync()
        redis_server.pause()
        try:
            slowest = 0.0
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                start = time.perf_counter()
                assert await b.call(ok) == "ok"
                slowest = max(slowest, time.perf_counter() - start)
                await asyncio.sleep(0.001)
            assert store.degraded
            assert slowest < store.timeout / 2, slowest  # no call waited on the frozen Redis
        finally:
            redis_server.resume()
        await until(lambda: any(isinstance(e, StoreRecovered) for e in events), 15)
        assert await b.call(ok) == "ok"
    finally:
        await store.aclose()


async def test_an_unreachable_redis_never_raises(unreachable_store: RedisStore) -> None:
    """A store that never connects: breakers work locally, primitives raise the store error."""
    b = breaker(unreachable_store)
    assert await b.call(ok) == "ok"
    await b.force_open()  # applied locally
    with pytest.raises(CircuitOpenError):
        await b.call(ok)
    from resilience import StoreUnavailableError

    with pytest.raises(StoreUnavailableError):
        await unreachable_store.acquire_lease("x", limit=1, ttl=1)


async def test_scripts_flushed_from_the_server_are_loaded_again(
    make_store: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """After SCRIPT FLUSH (a restart, a failover) the next rounds reload and carry on."""
    store = make_store()
    b = breaker(store)
    await store.sync()
    await raw.script_flush()
    await fail(b, 4)
    await store.sync()
    await store.sync()
    assert b.state is CircuitState.OPEN
    assert await raw.hget(store.key("dep", "state"), "state") == b"open"


def test_a_store_built_outside_a_loop_starts_flushing_on_first_use(redis_url: str) -> None:
    """A store and breaker made at import time (no loop yet) flush once calls start."""
    store = RedisStore.from_url(redis_url, prefix=f"import-time-{time.monotonic_ns()}")
    b = breaker(store)

    async def scenario() -> None:
        try:
            await fail(b, 4)
            await until(lambda: b.state is CircuitState.OPEN)
        finally:
            await store.aclose()

    asyncio.run(scenario())


async def test_status_says_which_replica_reported_what(
    make_store: Callable[..., RedisStore],
) -> None:
    """Each replica's last report on a shared breaker shows in status()."""
    from resilience import status

    stores = [make_store(), make_store()]
    for n, s in enumerate(stores):
        b = breaker(s, minimum_calls=10, window=CountWindow(10))
        await fail(b, n + 1)
        await s.sync()
    (pay,) = [p for p in await status(stores[0]) if p.name == "dep"]
    reports = {r.replica: r for r in pay.replicas}
    assert set(reports) == {s.replica for s in stores}
    assert all(r.last_seen < 5 for r in pay.replicas)
    assert sorted(r.failures for r in pay.replicas) == [1, 2]
    assert pay.failures == 3


async def test_a_degraded_replica_trips_on_a_success_that_completes_the_window(
    redis_server: RedisServer,
) -> None:
    """Degraded, the local rules still apply on the fast success path (2 of 4 failed: trip)."""
    store = RedisStore.from_url(redis_server.url, sync_interval=0.01)
    try:
        b = breaker(store)
        await store.sync()
        redis_server.kill()
        await store.sync()  # the round fails: the store knows Redis is gone
        assert store.degraded
        await fail(b, 2)
        assert await b.call(ok) == "ok"
        assert b.state is CircuitState.CLOSED
        assert await b.call(ok) == "ok"
        assert b.state is CircuitState.OPEN
    finally:
        await store.aclose()


async def test_status_falls_back_to_the_local_view(redis_server: RedisServer) -> None:
    """With Redis gone, status() lists this replica's breakers as it sees them, marked local."""
    from resilience import StoreUnavailableError, status

    store = RedisStore.from_url(redis_server.url, timeout=0.2)
    empty = RedisStore.from_url(redis_server.url, timeout=0.2, prefix="empty")
    try:
        b = breaker(store)
        await fail(b, 2)
        await store.sync()
        redis_server.kill()
        (seen,) = await status(store)
        assert seen.local
        assert (seen.name, seen.state) == ("dep", CircuitState.CLOSED)
        with pytest.raises(StoreUnavailableError):
            await status(empty)
    finally:
        await store.aclose()
        await empty.aclose()
