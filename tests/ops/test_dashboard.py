"""The dashboard ASGI app: status JSON, event stream, control auth, mounting, failing stores."""

from __future__ import annotations

import asyncio
import gc
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from resilience import (
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    Fallback,
    HealthCheck,
    MemoryStore,
    PolicyStatus,
    RateLimitedError,
    RateLimiter,
    ResilienceTimeoutError,
    status,
)
from resilience.events import TimedOut
from resilience.ops.cards import Cards
from resilience.ops.dashboard import Dashboard
from resilience.ops.dashboard.figures import percentiles
from resilience.store.records import LATENCY_BUCKETS, REPORTING, ReplicaReport
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import advance, raises_each, until

TOKEN = "s3cret-token"
BREAKER = "circuit_breaker"


async def _fail() -> None:
    raise ConnectionError("upstream down")


async def trip(breaker: CircuitBreaker, store: RedisStore | None = None) -> None:
    """Fail calls through ``breaker`` until it opens (bounded; a shared store syncs each time)."""
    for _ in range(20):
        if breaker.metrics().state is CircuitState.OPEN:
            return
        with pytest.raises((ConnectionError, CircuitOpenError)):
            await breaker.call(_fail)
        if store is not None:
            await store.sync()
    assert breaker.metrics().state is CircuitState.OPEN


async def refuse(breaker: CircuitBreaker, times: int) -> None:
    """Call ``breaker`` ``times`` times, each refused (it must be open)."""
    await raises_each(times, CircuitOpenError, breaker.call, asyncio.sleep, 0)


def memory_breaker(clock: FakeClock) -> tuple[MemoryStore, CircuitBreaker]:
    """A MemoryStore on a fake clock and a small breaker in it."""
    store = MemoryStore(clock=clock)
    breaker = CircuitBreaker(
        "payments", window=CountWindow(4), minimum_calls=2, open_for=30, store=store, clock=clock
    )
    return store, breaker


def client(app: Any) -> httpx.AsyncClient:
    """An httpx client that calls the ASGI app in-process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dash")


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A RedisStore under a prefix of this test's own."""
    store = RedisStore.from_url(redis_url, prefix=f"dash-{uuid.uuid4().hex[:8]}", timeout=1.0)
    try:
        yield store
    finally:
        await store.aclose()


def test_control_without_token_is_refused() -> None:
    """allow_control=True without a token is a ValueError at construction."""
    with pytest.raises(ValueError, match="token"):
        Dashboard(MemoryStore(), allow_control=True)
    with pytest.raises(ValueError, match="refresh"):
        Dashboard(MemoryStore(), refresh=0)
    with pytest.raises(TypeError, match="Store"):
        Dashboard(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"refresh": 10**400}, ValueError, "refresh"),
        ({"refresh": -(10**400)}, ValueError, "refresh"),
        ({"refresh": float("nan")}, ValueError, "refresh"),
        ({"refresh": float("inf")}, ValueError, "refresh"),
        ({"refresh": True}, TypeError, "refresh"),
        ({"refresh": "1"}, TypeError, "refresh"),
        ({"refresh": None}, TypeError, "refresh"),
        ({"allow_control": "false", "token": TOKEN}, TypeError, "allow_control"),
        ({"allow_control": 1, "token": TOKEN}, TypeError, "allow_control"),
        ({"token": b"bytes"}, TypeError, "token"),
        ({"token": 12345}, TypeError, "token"),
        ({"token": ""}, ValueError, "token"),
        ({"token": "   "}, ValueError, "token"),
        ({"token": "a\nb"}, ValueError, "token"),
        ({"token": "päss"}, ValueError, "token"),
        ({"token": "s€cret"}, ValueError, "token"),
        ({"token": "two words"}, ValueError, "token"),
        ({"clock": object()}, TypeError, "clock"),
    ],
)
def test_every_argument_is_validated(
    kwargs: dict[str, Any], error: type[Exception], argument: str
) -> None:
    """Bad arguments raise ValueError or TypeError naming the argument (never OverflowError)."""
    with pytest.raises(error, match=argument):
        Dashboard(MemoryStore(), **kwargs)


async def test_rates_come_from_successive_snapshots(
    redis_store: RedisStore, clock: FakeClock
) -> None:
    """calls/s and failures/s are the growth of the replicas' reports between two snapshots,
    and the replicas reporting are counted; no rate before a second snapshot."""
    breaker = CircuitBreaker("rated", window=CountWindow(100), store=redis_store)
    app = Dashboard(redis_store, refresh=0.05, clock=clock)  # times the snapshots
    await breaker.call(asyncio.sleep, 0)
    await redis_store.sync()
    _, first = await app.snapshot()
    (before,) = [p for p in first["policies"] if p["name"] == "rated"]
    assert before["rates"] is None
    assert before["replicas_reporting"] == 1
    for _ in range(30):
        await breaker.call(asyncio.sleep, 0)
    await raises_each(10, ConnectionError, breaker.call, _fail)
    await redis_store.sync()
    clock.advance(0.06)  # past the snapshots' minimum gap
    _, second = await app.snapshot()
    (after,) = [p for p in second["policies"] if p["name"] == "rated"]
    assert after["rates"]["calls"] > 0
    assert after["rates"]["failures"] > 0
    assert after["rates"]["calls"] > after["rates"]["failures"]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def fake_time_store(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[MemoryStore | RedisStore]:
    """A MemoryStore, or a RedisStore under a prefix of its own, on the test's fake clock."""
    if request.param == "memory":
        yield MemoryStore(clock=clock)
        return
    url = request.getfixturevalue("redis_url")
    prefix = f"dash-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(url, prefix=prefix, clock=clock, timeout=2.0)
    try:
        yield store
    finally:
        await store.aclose()


async def breaker_status(app: Dashboard, name: str, gap: float) -> dict[str, Any]:
    """The breaker ``name`` in a fresh snapshot, ``gap`` seconds after the last one (the
    dashboard and the store share the fake clock, so ``gap`` is exactly the interval)."""
    clock = app.clock
    assert isinstance(clock, FakeClock)
    await app.store.sync()
    clock.advance(gap)
    _, doc = await app.snapshot()
    (policy,) = [p for p in doc["policies"] if p["name"] == name and p["kind"] == BREAKER]
    return policy


async def test_rejections_and_latency_between_snapshots(
    fake_time_store: MemoryStore | RedisStore, clock: FakeClock
) -> None:
    """Rejections per second and latency percentiles come from what happened between two
    snapshots: the calls sampled (one in 8) in their buckets, the calls refused; none when
    nothing happened. Calls per second only where the store keeps their running totals."""
    store = fake_time_store
    shared = isinstance(store, RedisStore)
    breaker = CircuitBreaker(
        "timed",
        window=CountWindow(20),
        minimum_calls=20,
        open_for=600,
        failure_if=lambda result: False,  # a result check: calls are sampled in memory too
        store=store,
    )

    async def takes(seconds: float) -> str:
        clock.advance(seconds)
        return "ok"

    app = Dashboard(store, refresh=0.05)
    await breaker.call(takes, 0.001)  # the 1st call: timed (then the 9th, the 17th, ...)
    first = await breaker_status(app, "timed", 1.0)
    assert (first["rates"], first["percentiles"]) == (None, None)

    # calls 2 to 81: the 9th to the 73rd take 3 ms, the 81st 300 ms (10 timed calls)
    for i in range(80):
        await breaker.call(takes, 0.3 if i >= 72 else 0.003)
    calm = await breaker_status(app, "timed", 5.0 - (0.003 * 72 + 0.3 * 8))
    assert calm["percentiles"] == {
        "samples": 10,
        "p50": [0.002, 0.004],
        "p90": [0.002, 0.004],
        "p99": [0.256, 0.512],
        "p99.5": [0.256, 0.512],
        "mean": pytest.approx(0.003 * 0.9 + 0.384 * 0.1),  # each at its bucket's middle
    }
    assert calm["rates"]["rejected"] == 0
    assert calm["rates"]["calls"] == (16.0 if shared else None)
    assert calm["rates"]["failures"] == (0 if shared else None)

    failed = 0
    while breaker.metrics().state is not CircuitState.OPEN:  # bounded: 20 failures open it
        assert failed < 20
        with pytest.raises(ConnectionError):
            await breaker.call(_fail)
        failed += 1
        await store.sync()
    await raises_each(6, CircuitOpenError, breaker.call, takes, 0.001)
    tripped = await breaker_status(app, "timed", 2.0)
    assert tripped["state"] == "open"
    assert tripped["rates"]["rejected"] == 3.0  # 6 refused in 2 s
    assert tripped["rates"]["failures"] == (failed / 2 if shared else None)
    assert tripped["rejected"] == 6  # the running total, as the store reports it
    timed = failed // 8  # the failures are calls 82 onwards: their 8th (the 89th) is timed
    assert timed >= 1
    assert tripped["percentiles"]["samples"] == timed
    assert tripped["percentiles"]["p99"] == [0.0, 0.0005]  # failures fail at once

    quiet = await breaker_status(app, "timed", 1.0)
    assert quiet["rates"]["rejected"] == 0
    assert quiet["percentiles"] == dict.fromkeys(["p50", "p90", "p99", "p99.5", "mean"], None) | {
        "samples": 0
    }


def test_percentiles_and_mean_of_a_histogram() -> None:
    """Each percentile is the bucket its rank falls in (p99.5 of 1000 samples: the 995th),
    the open last bucket has no upper edge, and the mean puts each sample at its bucket's
    middle (the open bucket's at its lower edge)."""
    counts = [0] * len(LATENCY_BUCKETS)
    counts[0], counts[3], counts[-1] = 900, 94, 6  # < 0.5 ms, 2-4 ms, >= 4.096 s
    got = percentiles(counts)
    assert got["samples"] == 1000
    assert got["p50"] == got["p90"] == [0.0, 0.0005]
    assert got["p99"] == [0.002, 0.004]
    assert got["p99.5"] == [LATENCY_BUCKETS[-2], None]
    mean = (900 * 0.00025 + 94 * 0.003 + 6 * LATENCY_BUCKETS[-2]) / 1000
    assert got["mean"] == pytest.approx(mean, abs=1e-6)


def test_only_replicas_heard_from_lately_are_reporting() -> None:
    """A replica silent for longer than REPORTING seconds no longer counts as reporting."""
    reports = tuple(
        ReplicaReport(replica=f"r{i}", last_seen=seen, calls=1, failures=0, slow_calls=0)
        for i, seen in enumerate([0.0, REPORTING, REPORTING + 0.1, 180.0])
    )
    policy = PolicyStatus(name="b", kind="circuit_breaker", replicas=reports)
    assert policy.reporting() == 2
    assert policy.reporting(within=200) == 4


async def test_in_process_breakers_reporting_their_calls_get_rates(clock: FakeClock) -> None:
    """A breaker of an in-process store that reports its calls to ``dashboard.calls`` gets
    calls/s and failed/s (timeouts failed, refusals not calls), and every call's latency;
    one that does not keeps none, as before."""
    store = MemoryStore(clock=clock)
    app = Dashboard(store, refresh=0.05, clock=clock)
    told = CircuitBreaker("told", minimum_calls=100, store=store, listeners=[app.calls])
    silent = CircuitBreaker("silent", store=store)

    async def takes(seconds: float) -> str:
        clock.advance(seconds)
        return "ok"

    async def too_slow() -> None:
        raise ResilienceTimeoutError("upstream", 0.1)

    await told.call(takes, 0)
    await silent.call(takes, 0)
    await breaker_status(app, "told", 1.0)
    for _ in range(6):
        await told.call(takes, 0.003)
    with pytest.raises(ConnectionError):
        await told.call(_fail)
    with pytest.raises(ResilienceTimeoutError):
        await told.call(too_slow)
    await told.force_open()
    with pytest.raises(CircuitOpenError):
        await told.call(takes, 0)
    policy = await breaker_status(app, "told", 2.0 - 6 * 0.003)  # 2 s since the last
    assert policy["rates"] == {
        "calls": 4.0,
        "failures": 1.0,
        "slow_calls": None,
        "rejected": 0.5,
        "timeouts": 0.0,
        "bulkhead_rejected": 0.0,
        "fallbacks": 0.0,
    }
    assert policy["percentiles"]["samples"] == 8  # every call, not one in 8
    assert policy["percentiles"]["p50"] == [0.002, 0.004]
    quiet = await breaker_status(app, "silent", 0.0)
    assert quiet["rates"]["calls"] is None
    assert quiet["rates"]["timeouts"] is None


async def test_timeouts_bulkhead_refusals_and_fallbacks_under_a_breakers_name(
    clock: FakeClock,
) -> None:
    """Policies named as a breaker that report to ``dashboard.calls`` add, per second, the
    timeouts that expired, the calls their bulkhead refused and the fallbacks served to that
    breaker's figures (as Hystrix groups a command's); a store's replicas report none."""
    store = MemoryStore(clock=clock)
    app = Dashboard(store, refresh=0.05, clock=clock)
    told = [app.calls]
    breaker = CircuitBreaker("dep", store=store, listeners=told)
    pool = Bulkhead(1, name="dep", listeners=told)
    fallback = Fallback(on=ConnectionError, value="cached", name="dep", listeners=told)
    await breaker.call(asyncio.sleep, 0)
    await breaker_status(app, "dep", 1.0)
    gate = asyncio.Event()
    holding = asyncio.create_task(pool.call(gate.wait))
    await asyncio.sleep(0)
    await raises_each(3, BulkheadFullError, pool.call, asyncio.sleep, 0)
    for _ in range(4):
        assert await fallback.call(_fail) == "cached"
    app.calls(TimedOut(name="dep", seconds=0.1))  # as a Timeout named "dep" reports one
    gate.set()
    await holding
    rates = (await breaker_status(app, "dep", 2.0))["rates"]
    assert (rates["timeouts"], rates["bulkhead_rejected"], rates["fallbacks"]) == (0.5, 1.5, 2.0)


async def test_a_total_that_goes_down_counts_from_zero(redis_url: str, clock: FakeClock) -> None:
    """A replica's running total that goes down (its breaker was forgotten, then made again)
    is a reset: the interval counts it from zero, never as a negative rate."""
    prefix = f"dash-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(redis_url, prefix=prefix, clock=clock, forget_after=1.0)
    options: dict[str, Any] = {"window": CountWindow(2), "minimum_calls": 2, "open_for": 600}
    try:
        app = Dashboard(store, refresh=0.05)
        breaker = CircuitBreaker("reborn", store=store, **options)
        await trip(breaker, store)
        await refuse(breaker, 10)
        before = await breaker_status(app, "reborn", 1.0)
        assert before["rejected"] == 10
        del breaker
        clock.advance(2.0)  # past forget_after: this replica drops the breaker
        await store.sync()
        gc.collect()
        again = CircuitBreaker("reborn", store=store, **options)
        await store.sync()  # it reads the fleet's state: open
        await refuse(again, 4)
        after = await breaker_status(app, "reborn", 2.0)
    finally:
        await store.aclose()
    assert after["rejected"] == 4  # this replica's total went from 10 down to 4
    assert after["rates"]["rejected"] == 1.0  # 4 refused since the reset, in 4 s


async def test_a_replica_first_seen(redis_url: str, clock: FakeClock) -> None:
    """A replica that appears between two snapshots adds the calls the store counted from its
    first report; its refusals (totals since its breaker was made, maybe long before) count
    from the next snapshot on."""
    prefix = f"dash-{uuid.uuid4().hex[:8]}"
    one = RedisStore.from_url(redis_url, prefix=prefix, clock=clock)
    two = RedisStore.from_url(redis_url, prefix=prefix, clock=clock)
    options: dict[str, Any] = {"window": CountWindow(100), "open_for": 600}
    try:
        app = Dashboard(one, refresh=0.05)
        first = CircuitBreaker("shared", store=one, **options)
        await first.call(asyncio.sleep, 0)
        start = await breaker_status(app, "shared", 1.0)
        assert [r["replica"] for r in start["replicas"]] == [one.replica]
        second = CircuitBreaker("shared", store=two, **options)
        for _ in range(4):
            await second.call(asyncio.sleep, 0)
        await two.sync()
        await one.control("shared", CircuitState.FORCED_OPEN)
        await two.sync()
        await refuse(second, 5)
        await refuse(first, 2)
        await two.sync()
        joined = await breaker_status(app, "shared", 2.0)
        assert len(joined["replicas"]) == 2
        assert joined["rejected"] == 7  # the running totals, as the store reports them
        assert joined["rates"]["calls"] == 2.0  # the newcomer's 4 calls in 2 s
        assert joined["rates"]["rejected"] == 1.0  # 2 refused by the replica seen before
        await refuse(second, 3)
        await two.sync()
        later = await breaker_status(app, "shared", 1.0)
        assert later["rates"]["rejected"] == 3.0
        assert later["rates"]["calls"] == 0
    finally:
        await one.aclose()
        await two.aclose()


async def test_bulkhead_limit_beside_in_flight(fake_time_store: MemoryStore | RedisStore) -> None:
    """A fleet-wide bulkhead shows its leases in flight and its limit."""
    pool = Bulkhead(3, distributed=True, store=fake_time_store, name="pool")
    release = asyncio.Event()
    held = [asyncio.create_task(pool.call(release.wait)) for _ in range(2)]
    try:

        async def taken() -> bool:
            return await fake_time_store.count_leases("pool") == 2

        await until(taken, 10, "both leases taken", every=0.01)
        async with client(Dashboard(fake_time_store)) as c:
            doc = (await c.get("/status")).json()
    finally:
        release.set()
        await asyncio.gather(*held)
    (policy,) = [p for p in doc["policies"] if p["kind"] == "bulkhead" and p["name"] == "pool"]
    assert (policy["in_flight"], policy["limit"]) == (2, 3)
    assert (policy["rates"], policy["percentiles"]) == (None, None)
    # fleet-wide permits are never waited for: this process queues none; it reports no
    # refusals to this dashboard, so their rate is unknown (None), not 0
    shared = isinstance(fake_time_store, RedisStore)
    assert policy["pool"] == {
        "active": 2,
        "queued": 0,
        "limit": 3,
        "rejected": None,
        "fleet": shared,
    }


async def pool_of(app: Dashboard, name: str, gap: float) -> dict[str, Any]:
    """The ``"pool"`` figures of bulkhead ``name`` in a snapshot ``gap`` seconds later."""
    clock = app.clock
    assert isinstance(clock, FakeClock)
    clock.advance(gap)
    _, doc = await app.snapshot()
    (policy,) = [p for p in doc["policies"] if p["name"] == name and p["kind"] == "bulkhead"]
    pool: dict[str, Any] = policy["pool"]
    return pool


async def test_a_local_bulkheads_pool_card(clock: FakeClock) -> None:
    """A bulkhead of this process only (no store lists it) gets a card with all four
    figures: active, queued, its limit, and refusals per second when it reports them to
    ``dashboard.calls``; one that does not report has no refusal rate (None), not 0."""
    app = Dashboard(MemoryStore(clock=clock), refresh=0.05, clock=clock)
    told = Bulkhead(2, max_waiting=1, name="local-pool", listeners=[app.calls])
    quiet = Bulkhead(1, name="quiet-pool")
    gate = asyncio.Event()
    running = [asyncio.create_task(told.call(gate.wait)) for _ in range(3)]
    running.append(asyncio.create_task(quiet.call(gate.wait)))
    await asyncio.sleep(0)
    try:
        first = await pool_of(app, "local-pool", 1.0)
        assert first == {"active": 2, "queued": 1, "limit": 2, "rejected": None, "fleet": False}
        for _ in range(3):
            with pytest.raises(BulkheadFullError):
                await told.call(asyncio.sleep, 0)
            with pytest.raises(BulkheadFullError):
                await quiet.call(asyncio.sleep, 0)
        assert (await pool_of(app, "local-pool", 2.0))["rejected"] == 1.5
        assert await pool_of(app, "quiet-pool", 0.0) == {
            "active": 1,
            "queued": 0,
            "limit": 1,
            "rejected": None,
            "fleet": False,
        }
    finally:
        gate.set()
        await asyncio.gather(*running)
    assert (await pool_of(app, "local-pool", 1.0))["active"] == 0


async def test_page_carries_the_first_snapshot_as_data(clock: FakeClock) -> None:
    """GET / embeds the first status document as JSON data, with "<" escaped, so the page
    shows figures before its stream connects and no name can inject markup."""
    store = MemoryStore(clock=clock)
    breaker = CircuitBreaker("</script><img src=x>", store=store, clock=clock)
    await breaker.call(asyncio.sleep, 0)
    async with client(Dashboard(store)) as c:
        page = (await c.get("/")).text
    data = page.split('<script type="application/json" id="initial">')[1].split("</script>")[0]
    assert "<" not in data
    assert json.loads(data)["policies"][0]["name"] == "</script><img src=x>"


async def test_status_after_a_trip(clock: FakeClock) -> None:
    """GET /status lists the tripped breaker as open, with its retry-after and the store kind."""
    store, breaker = memory_breaker(clock)
    await trip(breaker)
    clock.advance(10)
    async with client(Dashboard(store)) as c:
        r = await c.get("/status")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["store"] == {"kind": "memory", "degraded": False}
    assert doc["control"] is False
    (policy,) = doc["policies"]
    assert policy["name"] == "payments"
    assert policy["kind"] == "circuit_breaker"
    assert policy["state"] == "open"
    assert policy["retry_after"] == pytest.approx(20)
    assert isinstance(doc["time"], float)


async def test_status_through_redis(redis_store: RedisStore) -> None:
    """A breaker tripped through a RedisStore shows open, with this replica's report."""
    breaker = CircuitBreaker(
        "search", window=CountWindow(4), minimum_calls=2, open_for=30, store=redis_store
    )
    await trip(breaker, redis_store)
    async with client(Dashboard(redis_store)) as c:
        doc = (await c.get("/status")).json()
    assert doc["store"] == {"kind": "redis", "degraded": False}
    (policy,) = [p for p in doc["policies"] if p["kind"] == "circuit_breaker"]
    assert policy["name"] == "search"
    assert policy["state"] == "open"
    assert 0 < policy["retry_after"] <= 30
    assert [r["replica"] for r in policy["replicas"]] == [redis_store.replica]


async def test_page_is_self_contained(clock: FakeClock) -> None:
    """GET / serves the HTML page with a strict CSP and no external resource."""
    store, _ = memory_breaker(clock)
    async with client(Dashboard(store)) as c:
        r = await c.get("/")
        head = await c.head("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert '<meta name="resilience-base" content="/">' in r.text
    assert "EventSource" in r.text
    for external in ("http://", "https://", "//fonts.", "<link"):
        assert external not in r.text.replace("http://www.w3.org/2000/svg", "")
    assert head.status_code == 200
    assert head.content == b""


@pytest.mark.parametrize(
    ("allow", "header", "expected"),
    [
        (False, f"Bearer {TOKEN}", 403),
        (True, None, 403),
        (True, "Bearer wrong-token", 403),
        (True, f"Basic {TOKEN}", 403),
        (True, f"Bearer {TOKEN}", 200),
    ],
    ids=["control-disabled", "no-token", "wrong-token", "wrong-scheme", "right-token"],
)
async def test_control_auth(
    clock: FakeClock, allow: bool, header: str | None, expected: int
) -> None:
    """POST /control/{name} needs control allowed and the right Bearer token."""
    store, _ = memory_breaker(clock)
    app = Dashboard(store, allow_control=allow, token=TOKEN if allow else None)
    headers = {} if header is None else {"Authorization": header}
    async with client(app) as c:
        r = await c.post("/control/payments", json={"state": "forced_open"}, headers=headers)
        doc = (await c.get("/status")).json()
    assert r.status_code == expected, r.text
    assert doc["control"] is allow
    state = doc["policies"][0]["state"]
    assert state == ("forced_open" if expected == 200 else "closed")
    if expected == 200:
        assert r.json() == {"name": "payments", "state": "forced_open"}


async def test_control_through_redis(redis_store: RedisStore) -> None:
    """Closing and disabling through the dashboard changes the state Redis holds."""
    breaker = CircuitBreaker(
        "search", window=CountWindow(4), minimum_calls=2, open_for=30, store=redis_store
    )
    await trip(breaker, redis_store)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with client(Dashboard(redis_store, allow_control=True, token=TOKEN)) as c:
        for state in ("closed", "disabled"):
            r = await c.post("/control/search", json={"state": state}, headers=auth)
            assert r.status_code == 200, r.text
            (policy,) = [p for p in await status(redis_store) if p.kind == "circuit_breaker"]
            assert policy.state is CircuitState(state)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/control/nobody", b'{"state": "closed"}', 404),
        ("/control/", b'{"state": "closed"}', 404),
        ("/control/payments", b"not json", 400),
        ("/control/payments", b'{"state": "open"}', 400),
        ("/control/payments", b'{"state": 3}', 400),
        ("/control/payments", b'["closed"]', 400),
        ("/control/payments", b'{"state": "closed", "pad": "' + b"x" * 5000 + b'"}', 400),
    ],
    ids=[
        "unknown-name",
        "no-name",
        "not-json",
        "bad-state",
        "state-not-text",
        "not-object",
        "huge",
    ],
)
async def test_control_errors(clock: FakeClock, path: str, body: bytes, expected: int) -> None:
    """Unknown breakers are 404 and malformed bodies 400, both as JSON with an error."""
    store, _ = memory_breaker(clock)
    app = Dashboard(store, allow_control=True, token=TOKEN)
    async with client(app) as c:
        r = await c.post(path, content=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == expected
    assert "error" in r.json()
    if expected == 404 and path.endswith("nobody"):
        assert r.json()["error"] == "no breaker named 'nobody'"


async def test_wrong_methods_and_paths(clock: FakeClock) -> None:
    """Wrong methods are 405 with an Allow header; unknown paths are 404."""
    store, _ = memory_breaker(clock)
    async with client(Dashboard(store, allow_control=True, token=TOKEN)) as c:
        get_control = await c.get("/control/payments")
        post_status = await c.post("/status")
        missing = await c.get("/nothing-here")
    assert get_control.status_code == 405
    assert get_control.headers["allow"] == "POST"
    assert post_status.status_code == 405
    assert "GET" in post_status.headers["allow"]
    assert missing.status_code == 404


async def test_events_stream_until_the_client_leaves(clock: FakeClock) -> None:
    """GET /events pushes status documents, then stops once the client disconnects."""
    store, _ = memory_breaker(clock)
    app = Dashboard(store, refresh=0.05)
    sent: list[dict[str, Any]] = []
    two_events = asyncio.Event()
    leave = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if sum(b"data: " in m.get("body", b"") for m in sent) >= 2:
            two_events.set()

    scope = {"type": "http", "method": "GET", "path": "/events", "root_path": "", "headers": []}
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(two_events.wait(), 10)
    leave.set()
    await asyncio.wait_for(task, 10)
    assert sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    events = [m["body"] for m in sent[1:] if m["body"].startswith(b"data: ")]
    doc = json.loads(events[0][len(b"data: ") :])
    assert doc["policies"][0]["name"] == "payments"
    count = len(sent)
    await asyncio.sleep(0.15)  # bounded: nothing more is sent once the client has gone
    assert len(sent) == count


async def test_mounted_under_starlette(clock: FakeClock) -> None:
    """Under Starlette's Mount the routes and the page's base URL follow the mount path."""
    store, breaker = memory_breaker(clock)
    await trip(breaker)
    app = Starlette(routes=[Mount("/resilience", app=Dashboard(store))])
    async with client(app) as c:
        page = await c.get("/resilience/")
        doc = await c.get("/resilience/status")
        outside = await c.get("/status")
    assert page.status_code == 200
    assert '<meta name="resilience-base" content="/resilience/">' in page.text
    assert doc.status_code == 200
    assert doc.json()["policies"][0]["state"] == "open"
    assert outside.status_code == 404


async def test_failing_store_is_a_503() -> None:
    """A store that cannot reach Redis gives 503 JSON (status and control), never a crash."""
    store = RedisStore.from_url("redis://127.0.0.1:1/0", prefix="dash-down", timeout=0.2)
    app = Dashboard(store, allow_control=True, token=TOKEN)
    try:
        async with client(app) as c:
            r = await c.get("/status")
            ctl = await c.post(
                "/control/payments",
                json={"state": "closed"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
    finally:
        await store.aclose()
    assert r.status_code == 503
    doc = r.json()
    assert doc["store"] == {"kind": "redis", "degraded": True}
    assert doc["error"].startswith("store unavailable")
    assert "127.0.0.1" not in r.text  # where the store is stays in the server's log
    assert "127.0.0.1" not in ctl.text
    assert doc["policies"] == []
    assert ctl.status_code == 503
    assert ctl.json()["error"].startswith("store unavailable")


async def test_lifespan_and_websocket() -> None:
    """Lifespan startup/shutdown are acknowledged; a WebSocket is refused."""
    app = Dashboard(MemoryStore())
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app({"type": "lifespan"}, receive, send), 5)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent.clear()
    inbox.append({"type": "websocket.connect"})
    await app({"type": "websocket", "path": "/events"}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_no_password_or_location_reaches_the_page_or_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With an unreachable store whose URL has a password, neither the page, the feed nor
    the dashboard's log holds the password; viewers do not see the host either."""
    url = "redis://:pw-s3cr3t@127.0.0.1:1/0?password=pw-s3cr3t"
    store = RedisStore.from_url(url, prefix="dash-secret", timeout=0.2)
    try:
        async with client(Dashboard(store)) as c:
            page = (await c.get("/")).text
            doc = (await c.get("/status")).text
    finally:
        await store.aclose()
    for text in (page, doc, caplog.text):
        assert "pw-s3cr3t" not in text
    assert "127.0.0.1:1" not in doc


async def test_a_rate_limiters_tokens_rate_and_refusals(clock: FakeClock) -> None:
    """A shared rate limiter's card has its rate and burst in code with live values on top,
    the tokens available (burst - backlog / interval, within [0, burst]) and the calls it
    refused per second when it reports them to ``dashboard.calls``; without a report, no
    refusal rate (None), not 0. Settings changed through the dashboard show at once."""
    store = MemoryStore(clock=clock)
    app = Dashboard(store, refresh=0.05, clock=clock, allow_control=True, token=TOKEN)
    limiter = RateLimiter(10, burst=5, store=store, name="quota", listeners=[app.calls])
    quiet = RateLimiter(10, burst=5, store=store, name="quiet-quota")

    async def bucket(name: str, gap: float) -> dict[str, Any]:
        clock.advance(gap)
        _, doc = await app.snapshot()
        (policy,) = [p for p in doc["policies"] if p["name"] == name]
        figures: dict[str, Any] = policy["bucket"]
        return figures

    await store.configure("quota", rate=20)  # live: an interval of 0.05 s, not 0.1 s
    await limiter.call(asyncio.sleep, 0)
    await quiet.call(asyncio.sleep, 0)
    await bucket("quota", 1.0)
    clock.advance(1.9)
    for _ in range(5):
        await limiter.call(asyncio.sleep, 0)
    await raises_each(4, RateLimitedError, limiter.call, asyncio.sleep, 0)
    figures = await bucket("quota", 0.1)  # 2 s since the last snapshot; 0.15 s of backlog
    assert figures == {"tokens": 2.0, "rate": 20, "per": 1.0, "burst": 5, "refused": 2.0}
    assert (await bucket("quiet-quota", 0.0))["refused"] is None
    async with client(app) as c:
        changed = await c.post(
            "/api/config/quota",
            json={"values": {"burst": 8}},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert changed.status_code == 200
    assert (await bucket("quota", 0.0))["burst"] == 8
    assert (await bucket("quota", 10.0))["tokens"] == 8.0  # full, never over the burst


async def test_a_rate_limiter_without_settings_has_no_token_count(clock: FakeClock) -> None:
    """A rate limiter whose rate and burst no replica reported (none alive here, or a store
    that keeps no settings) has no token count (None), only its backlog."""
    store = MemoryStore(clock=clock)
    await store.rate_take("elsewhere", interval=0.1, burst=5)
    _, doc = await Dashboard(store, clock=clock).snapshot()
    (policy,) = [p for p in doc["policies"] if p["name"] == "elsewhere"]
    assert policy["bucket"]["tokens"] is None
    assert policy["backlog"] == pytest.approx(0.1)


async def test_a_health_checks_result_age(clock: FakeClock) -> None:
    """A fleet-wide health check's card carries the age of its last published result: not
    known (None) for a result already there when the dashboard first looked, then the
    seconds since the dashboard saw a new one (its sequence number changed)."""
    store = MemoryStore(clock=clock)
    app = Dashboard(store, refresh=0.05, clock=clock)
    key = "health:db"
    lease = await store.acquire_lease(key, limit=1, ttl=60)
    assert lease is not None

    async def publish(seq: int, ok: bool) -> None:
        error = None if ok else "ConnectionError: no route"
        result = {"id": "runner", "seq": seq, "ok": ok, "duration": 0.01, "error": error}
        assert await store.publish(key, "result", json.dumps(result).encode(), lease=lease, ttl=30)

    async def card(gap: float) -> dict[str, Any]:
        clock.advance(gap)
        _, doc = await app.snapshot()
        (policy,) = [p for p in doc["policies"] if p["name"] == key]
        return policy

    await publish(1, True)
    assert (await card(1.0))["result_age"] is None  # published before the dashboard looked
    assert (await card(4.0))["result_age"] is None  # the same result: still not known
    await publish(2, False)
    fresh = await card(1.0)
    assert (fresh["healthy"], fresh["result_age"]) == (False, 0.0)
    assert (await card(2.5))["result_age"] == 2.5


async def test_a_health_check_of_this_process_shows_its_phi(clock: FakeClock) -> None:
    """A health check living in the dashboard's process gives its card its phi and whether it
    is suspected now; one known only through the store has no suspicion (None)."""
    store = MemoryStore(clock=clock)
    answers = [True]

    async def check() -> bool:
        return answers[-1]

    elsewhere = await store.acquire_lease("health:cache", limit=1, ttl=600)
    assert elsewhere is not None
    app = Dashboard(store, refresh=0.05, clock=clock)

    async def cards() -> dict[str, dict[str, Any]]:
        _, doc = await app.snapshot()
        return {p["name"]: p for p in doc["policies"] if p["kind"] == "health_check"}

    async with HealthCheck(check, name="db", interval=1.0, store=store, clock=clock) as hc:
        for _ in range(10):
            await advance(clock, 1.0)
        seen = await cards()
        assert seen["health:cache"]["suspicion"] is None
        trusted = seen["health:db"]["suspicion"]
        assert trusted == {"phi": round(hc.phi, 2), "threshold": 8.0, "suspected": False}
        answers.append(False)
        for _ in range(10):
            await advance(clock, 1.0)
        suspected = (await cards())["health:db"]["suspicion"]
        assert suspected["suspected"] is True
        assert suspected["phi"] == round(hc.phi, 2) >= 8.0 > trusted["phi"]


async def test_a_shared_rate_limiters_tokens(fake_time_store: MemoryStore | RedisStore) -> None:
    """Through either store, a rate limiter's card has the tokens its bucket holds, from the
    rate and burst its replica reported to live settings and the store's backlog."""
    name = f"quota-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(10, burst=5, store=fake_time_store, name=name)
    for _ in range(3):
        await limiter.call(asyncio.sleep, 0)
    await fake_time_store.sync()
    _, doc = await Dashboard(fake_time_store).snapshot()
    (policy,) = [p for p in doc["policies"] if p["name"] == name]
    assert policy["bucket"]["tokens"] == pytest.approx(2.0, abs=0.01)
    assert (policy["bucket"]["rate"], policy["bucket"]["burst"]) == (10, 5)


async def test_a_rate_limiters_settings_are_read_every_few_seconds(clock: FakeClock) -> None:
    """Snapshots read a rate limiter's settings from the store at most every
    ``SETTINGS_AGE`` seconds, not once per update."""
    from resilience.ops.cards import SETTINGS_AGE

    reads: list[str] = []

    class Counting(MemoryStore):
        async def config(self, name: str) -> Any:
            reads.append(name)
            return await super().config(name)

    store = Counting(clock=clock)
    limiter = RateLimiter(10, burst=5, store=store, name="counted-quota")
    await limiter.call(asyncio.sleep, 0)
    app = Dashboard(store, refresh=0.05, clock=clock)
    for _ in range(10):
        clock.advance(SETTINGS_AGE / 4)
        await app.snapshot()
    assert len(reads) == 3  # at 0, after SETTINGS_AGE and after 2 * SETTINGS_AGE


async def test_a_card_that_fails_is_a_503_not_a_crash(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A figure of the cards that raises makes the status a 503 with its error, and the
    page still loads: the page reports; it never crashes."""

    async def broken(*args: object) -> None:
        raise RuntimeError("a card could not be read")

    monkeypatch.setattr(Cards, "look", broken)
    store = MemoryStore(clock=clock)
    CircuitBreaker("svc", store=store, clock=clock)
    async with client(Dashboard(store, clock=clock)) as c:
        answer = await c.get("/status")
        assert answer.status_code == 503
        assert answer.json()["error"]
        assert (await c.get("/")).status_code == 200


class _OwnDetector:
    """A detector of one's own, whose threshold can be taken away after construction."""

    def __init__(self) -> None:
        self.threshold: object = 8.0

    def watch(self, now: float) -> None:
        pass

    def heartbeat(self, now: float) -> None:
        pass

    def phi(self, now: float) -> float:
        return 0.5

    def suspect(self, now: float) -> bool:
        return False


async def test_a_threshold_that_cannot_be_read_is_none(clock: FakeClock) -> None:
    """A detector whose threshold is gone (or not a finite number) by the time the
    dashboard looks gives its card ``"threshold": None``; the status is still a 200."""
    store = MemoryStore(clock=clock)

    async def check() -> bool:
        return True

    detector = _OwnDetector()
    name = f"own-{uuid.uuid4().hex[:8]}"  # no other test's check of that name
    app = Dashboard(store, refresh=0.05, clock=clock)

    async def suspicion() -> tuple[int, Any]:
        clock.advance(1.0)
        code, doc = await app.snapshot()
        (card,) = [p for p in doc["policies"] if p["name"] == f"health:{name}"]
        return code, card["suspicion"]

    async with HealthCheck(
        check, name=name, interval=1.0, store=store, clock=clock, detector=detector
    ):
        await advance(clock, 1.0)
        for broken in (None, float("nan"), "8"):
            detector.threshold = broken
            assert await suspicion() == (200, {"phi": 0.5, "threshold": None, "suspected": False})
        del detector.threshold
        assert (await suspicion())[1]["threshold"] is None


async def test_calls_of_names_the_store_forgot_are_forgotten(clock: FakeClock) -> None:
    """What breakers reported to ``dashboard.calls`` is dropped for every name the store
    no longer lists, so per-origin breakers that come and go hold no memory forever."""
    store = MemoryStore(clock=clock, forget_after=1.0)
    app = Dashboard(store, refresh=0.05, clock=clock)
    names = [f"https://host{i}.example" for i in range(5)]
    for name in names:
        breaker = CircuitBreaker(name, store=store, clock=clock, listeners=[app.calls])
        await breaker.call(asyncio.sleep, 0)
    del breaker
    gc.collect()
    _, doc = await app.snapshot()
    assert all(app.calls.totals(name) is not None for name in names)
    clock.advance(5.0)
    kept = CircuitBreaker("kept", store=store, clock=clock, listeners=[app.calls])
    await kept.call(asyncio.sleep, 0)
    gc.collect()
    _, doc = await app.snapshot()
    listed = {p["name"] for p in doc["policies"]}
    assert listed == {"kept"}
    assert [app.calls.totals(name) for name in names] == [None] * len(names)
    assert app.calls.totals("kept") is not None


class _GatedStore(MemoryStore):
    """A MemoryStore whose ``status()`` answers only once ``gate`` is set (a slow reply)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.gate = asyncio.Event()
        self.asked = asyncio.Event()

    async def status(self, *args: Any, **kwargs: Any) -> list[PolicyStatus]:
        found = await super().status(*args, **kwargs)
        self.asked.set()
        await self.gate.wait()
        return found


async def test_a_change_made_while_a_snapshot_is_taken_shows_next(clock: FakeClock) -> None:
    """A breaker forced open while a snapshot is on its way: that older snapshot is not
    cached, so the next status shows the change (not the state read before it)."""
    store = _GatedStore(clock)
    breaker = CircuitBreaker("svc", store=store, clock=clock)
    await breaker.call(asyncio.sleep, 0)
    app = Dashboard(store, allow_control=True, token=TOKEN, refresh=10, clock=clock)
    async with client(app) as c:
        viewer = asyncio.ensure_future(c.get("/status"))
        await asyncio.wait_for(store.asked.wait(), 10)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        store.gate.set()  # the reply is already read: it says "closed"
        control = await c.post("/control/svc", json={"state": "forced_open"}, headers=headers)
        assert control.status_code == 200
        before = (await viewer).json()["policies"]
        after = (await c.get("/status")).json()["policies"]
    assert [p["state"] for p in before if p["name"] == "svc"] == ["closed"]
    assert [p["state"] for p in after if p["name"] == "svc"] == ["forced_open"]


async def test_a_token_authorises_only_as_sent(clock: FakeClock) -> None:
    """A header holding bytes outside ASCII is refused (403), never an error of the app."""
    store = MemoryStore(clock=clock)
    CircuitBreaker("svc", store=store, clock=clock)
    async with client(Dashboard(store, allow_control=True, token=TOKEN)) as c:
        for raw in ("Bearer " + TOKEN + "ä").encode(), ("Bearer " + TOKEN + "é").encode("latin-1"):
            answer = await c.post(
                "/control/svc", json={"state": "closed"}, headers=[(b"authorization", raw)]
            )
            assert answer.status_code == 403
        answer = await c.post(
            "/control/svc", json={"state": "closed"}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert answer.status_code == 200
