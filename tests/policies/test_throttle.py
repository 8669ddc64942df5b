"""The throttle: the SRE book's adaptive throttling, local and fleet-wide."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.errors import (
    CircuitOpenError,
    RateLimitedError,
    RejectedError,
    StoreUnavailableError,
    ThrottledError,
)
from resilience.events import CallFinished, CallRejected, Event, StoreDataReset, StoreDegraded
from resilience.policies.pipeline import Pipeline
from resilience.policies.retry import Retry
from resilience.policies.throttle import SharedCounts, Throttle, default_accepted
from resilience.rules.throttle import rejection_probability
from resilience.store import MemoryStore
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import advance, cancelled, ok, unique_prefix, until


class Overloaded(RejectedError):
    """What the simulated backend raises when it refuses a call (an HTTP 503, say): a
    ``RejectedError``, so not an accept under the default rule either."""


def not_overloaded(exc: Exception) -> bool:
    return not isinstance(exc, Overloaded)


async def refused() -> None:
    raise Overloaded


def never() -> float:
    """A draw that never refuses (random() is always below 1)."""
    return 0.999999


def always() -> float:
    """A draw that refuses whenever the probability is above zero."""
    return 0.0


async def outcome(throttle: Throttle, fn: Callable[[], Any]) -> str:
    """One call: "ok", "refused" (by the backend) or "throttled" (here)."""
    try:
        await throttle.call(fn)
    except Overloaded:
        return "refused"
    except ThrottledError:
        return "throttled"
    return "ok"


# --- the formula ---------------------------------------------------------------------------


def test_rejection_probability_values() -> None:
    """max(0, (requests - k * accepts) / (requests + 1)), as in the SRE book."""
    assert rejection_probability(0, 0, 2.0) == 0.0
    assert rejection_probability(100, 50, 2.0) == 0.0
    assert rejection_probability(100, 60, 2.0) == 0.0
    assert rejection_probability(100, 25, 2.0) == pytest.approx(50 / 101)
    assert rejection_probability(100, 0, 2.0) == pytest.approx(100 / 101)
    assert rejection_probability(10, 5, 1.0) == pytest.approx(5 / 11)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.integers(min_value=0, max_value=10**9),
    share=st.floats(min_value=0, max_value=1),
    k=st.floats(min_value=1, max_value=100),
)
def test_probability_in_unit_interval(requests: int, share: float, k: float) -> None:
    """The probability is in [0, 1), and zero exactly when k * accepts covers the requests."""
    accepts = math.floor(requests * share)
    p = rejection_probability(requests, accepts, k)
    assert 0.0 <= p < 1.0
    assert (p == 0.0) == (k * accepts >= requests)


async def test_ratio_follows_the_window(clock: FakeClock) -> None:
    """The ratio is the formula over the window's counts; slices that slide out are forgotten."""
    throttle = Throttle(k=2, window=10, buckets=10, random=never, clock=clock)
    for _ in range(30):
        await outcome(throttle, refused)
    for _ in range(10):
        await outcome(throttle, ok)
    assert throttle.counts.totals() == (40, 10)
    assert throttle.ratio == pytest.approx((40 - 2 * 10) / 41)
    clock.advance(5)
    for _ in range(20):
        await outcome(throttle, ok)
    assert throttle.counts.totals() == (60, 30)
    assert throttle.ratio == 0.0
    clock.advance(5)  # the first 40 calls leave the window
    assert throttle.counts.totals() == (20, 20)
    for _ in range(50):
        await outcome(throttle, refused)
    assert throttle.ratio == pytest.approx((70 - 40) / 71)
    clock.advance(10)
    assert throttle.counts.totals() == (0, 0)
    assert throttle.ratio == 0.0


async def test_refuses_with_the_drawn_probability(clock: FakeClock) -> None:
    """A call is refused iff the draw falls below the probability; refusals count as requests."""
    draw = [0.999999]
    throttle = Throttle(k=1, window=10, buckets=10, random=lambda: draw[0], name="api", clock=clock)
    for _ in range(9):
        await outcome(throttle, refused)
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    # 9 requests, 0 accepts: p = 9/10; a draw of 0.5 refuses, and the refusal is a request
    draw[0] = 0.5
    with pytest.raises(ThrottledError) as info:
        await throttle.call(counted)
    assert calls == 0
    assert info.value.name == "api"
    assert info.value.ratio == pytest.approx(0.9)
    assert info.value.retry_after == pytest.approx(1.0)  # one slice of 10 s / 10
    assert throttle.counts.totals() == (10, 0)
    assert throttle.ratio == pytest.approx(10 / 11)
    draw[0] = 0.95
    assert await throttle.call(counted) == "ok"
    assert calls == 1
    assert throttle.counts.totals() == (11, 1)


async def test_draw_at_or_above_probability_passes(clock: FakeClock) -> None:
    """A draw at or above the probability lets the call through."""
    throttle = Throttle(k=1, random=lambda: 0.9, clock=clock)
    for _ in range(9):
        await outcome(throttle, refused)
    assert throttle.ratio == pytest.approx(0.9)
    assert await throttle.call(ok) == "ok"  # 0.9 is not below 0.9
    for _ in range(10):
        await outcome(throttle, refused)
    assert await outcome(throttle, ok) == "throttled"


async def test_rejection_event(clock: FakeClock) -> None:
    """A refusal emits CallRejected carrying the ThrottledError."""
    events: list[Event] = []
    throttle = Throttle(
        random=always,
        name="t",
        clock=clock,
        listeners=[lambda e: None if isinstance(e, CallFinished) else events.append(e)],
    )
    await outcome(throttle, refused)
    with pytest.raises(ThrottledError) as info:
        await throttle.call(ok)
    assert events == [CallRejected(name="t", policy="throttle", error=info.value)]
    assert "refusing 50% of calls" in str(info.value)


# --- what counts as accepted -----------------------------------------------------------------


def test_default_accepted() -> None:
    """By default refusals, timeouts and connection errors are not accepts; other errors are."""
    assert default_accepted(ValueError("bad request"))
    assert default_accepted(KeyError("not found"))
    assert not default_accepted(TimeoutError())
    assert not default_accepted(ConnectionRefusedError())
    assert not default_accepted(RateLimitedError("x", 1.0))
    assert not default_accepted(CircuitOpenError("x", "open", 1.0))


async def test_accepted_by_default_rule(clock: FakeClock) -> None:
    """An error of the call's own is an accept; a timeout is not."""
    throttle = Throttle(random=never, clock=clock)

    async def raises(exc: Exception) -> None:
        raise exc

    for exc in (ValueError(), TimeoutError(), ConnectionResetError(), LookupError()):
        with pytest.raises(type(exc)):
            await throttle.call(raises, exc)
    assert throttle.counts.totals() == (4, 2)


async def test_accepted_if_and_result_predicates(clock: FakeClock) -> None:
    """accepted_if judges exceptions; accepted_if_result judges returned values."""

    async def answer(status: int) -> int:
        if status >= 500:
            raise Overloaded(status)
        return status

    throttle = Throttle(
        accepted_if=not_overloaded,
        accepted_if_result=lambda status: status != 429,
        random=never,
        clock=clock,
    )
    for status in (200, 429, 404, 503):
        try:
            await throttle.call(answer, status)
        except Overloaded:
            pass
    assert throttle.counts.totals() == (4, 2)


async def test_cancelled_call_counts_as_nothing(clock: FakeClock) -> None:
    """A cancelled call is neither an accept nor a request; the cancellation propagates."""
    throttle = Throttle(clock=clock)
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(throttle.call(hangs))
    await started.wait()
    await cancelled(task)
    assert throttle.counts.totals() == (0, 0)


async def test_in_a_pipeline_not_retried(clock: FakeClock) -> None:
    """Inside Retry (excluding rejections), each attempt counts and refusals are not retried."""
    throttle = Throttle(k=1, random=always, accepted_if=not_overloaded, clock=clock)
    pipeline = Pipeline(
        Retry(on=Overloaded, attempts=3, wait=lambda state: 0.0, clock=clock), throttle
    )
    with pytest.raises(ThrottledError):
        await pipeline.call(refused)  # attempt 1 refused by the backend, attempt 2 here
    assert throttle.counts.totals() == (2, 0)


# --- load shedding ---------------------------------------------------------------------------


async def simulate(throttle: Throttle | None, clock: FakeClock, seconds: int) -> tuple[int, int]:
    """A backend that can accept 100 calls a second, offered 200: half are refused without
    throttling. Returns the calls that reached it and those it accepted, after a warm-up of
    20 s."""
    served = reached = accepted = 0

    async def backend() -> str:
        nonlocal served
        served += 1
        if served > 100:
            raise Overloaded
        return "ok"

    for second in range(seconds):
        served = 0
        for _ in range(200):
            try:
                if throttle is None:
                    await backend()
                else:
                    await throttle.call(backend)
            except Overloaded:
                pass
            except ThrottledError:
                continue
            if second >= 20:
                reached += 1
                accepted += served <= 100
        clock.advance(1.0)
    return reached, accepted


async def test_throttling_cuts_the_load_and_keeps_the_throughput(clock: FakeClock) -> None:
    """Against a backend refusing half the calls, throttling (k=1.1) cuts the calls reaching
    it by >= 40 % while the calls it accepts stay the same (within 2 %)."""
    base_reached, base_accepted = await simulate(None, clock, 60)
    throttle = Throttle(
        k=1.1,
        window=10,
        buckets=10,
        accepted_if=not_overloaded,
        random=random.Random(7).random,
        clock=clock,
    )
    reached, accepted = await simulate(throttle, clock, 60)
    assert base_accepted == base_reached // 2
    assert reached <= 0.6 * base_reached
    assert accepted >= 0.98 * base_accepted


async def test_default_k_sheds_a_mostly_refusing_backend(clock: FakeClock) -> None:
    """With k=2, a backend accepting a quarter of its calls gets about half of them."""
    served = 0
    reached = 0

    async def backend() -> str:
        nonlocal served, reached
        served += 1
        reached += 1
        if served > 5:
            raise Overloaded
        return "ok"

    throttle = Throttle(
        window=10, accepted_if=not_overloaded, random=random.Random(3).random, clock=clock
    )
    for tick in range(600):
        served = 0
        if tick == 200:
            reached = 0
        for _ in range(20):
            await outcome(throttle, backend)
        clock.advance(0.1)
    assert 0.4 * 8000 <= reached <= 0.6 * 8000


# --- shared through a store ------------------------------------------------------------------


class DownStore(MemoryStore):
    """A store whose windows cannot be reached."""

    async def window_add(self, key: str, deltas: Any, *, window: float, buckets: int = 10) -> Any:
        raise StoreUnavailableError("down")


async def test_memory_store_fleet_counts_drive_both(clock: FakeClock) -> None:
    """Two throttles of one name on one store decide on their summed counts."""
    store = MemoryStore(clock=clock)
    a = Throttle(name="api", store=store, random=never, accepted_if=not_overloaded, clock=clock)
    b = Throttle(name="api", store=store, random=never, accepted_if=not_overloaded, clock=clock)
    for _ in range(20):
        await outcome(a, refused)
    for _ in range(4):
        await outcome(b, ok)
    assert b.counts.totals() == (4, 4)  # nothing exchanged yet: b's own counts
    assert b.ratio == 0.0
    await advance(clock, 1.0)  # the background syncs run, one interval after the first count
    clock.advance(1.0)  # a has pushed before b read, so b syncs again to see a's counts
    await outcome(b, ok)
    await advance(clock, 1.0)
    assert a.counts.shared
    assert b.counts.shared
    assert b.counts.totals() == (25, 5)
    assert b.ratio == pytest.approx(rejection_probability(25, 5, 2.0))
    await a.sync()
    assert a.counts.totals() == (25, 5)


async def test_no_sync_while_idle(clock: FakeClock) -> None:
    """A shared throttle arms one sync after a call, and none once it is idle."""
    store = MemoryStore(clock=clock)
    throttle = Throttle(name="api", store=store, clock=clock)
    assert clock.pending == 0
    await throttle.call(ok)
    await throttle.call(ok)
    assert clock.pending == 1
    await advance(clock, 1.0)
    assert clock.pending == 0
    assert throttle.counts.totals() == (2, 2)
    await throttle.call(ok)
    assert throttle.counts.totals() == (3, 3)  # fleet totals plus the pending delta
    assert clock.pending == 1


async def test_stale_fleet_totals_give_way_to_local(clock: FakeClock) -> None:
    """Fleet totals not refreshed for a few intervals are no longer trusted."""
    store = MemoryStore(clock=clock)
    other = Throttle(name="api", store=store, accepted_if=not_overloaded, clock=clock)
    for _ in range(10):
        await outcome(other, refused)
    await other.sync()
    mine = Throttle(name="api", store=store, window=120, clock=clock)
    await mine.sync()
    assert mine.counts.totals() == (10, 0)
    clock.advance(30)  # 3 intervals and a slice (10 s) without a sync
    assert not mine.counts.shared
    assert mine.counts.totals() == (0, 0)


async def test_degraded_store_keeps_working_locally(clock: FakeClock) -> None:
    """A store that cannot answer never fails a call: the local counts decide."""
    throttle = Throttle(
        name="api",
        store=DownStore(clock=clock),
        random=always,
        accepted_if=not_overloaded,
        clock=clock,
    )
    for _ in range(5):
        assert await outcome(throttle, ok) == "ok"
    await advance(clock, 1.0)
    await throttle.sync()
    assert not throttle.counts.shared
    assert throttle.counts.totals() == (5, 5)
    for _ in range(10):
        await outcome(throttle, refused)
    assert await outcome(throttle, ok) == "throttled"
    assert throttle.counts.totals() == (16, 5)


async def test_redis_fleet_counts_drive_both(
    redis_pair: tuple[RedisStore, RedisStore], clock: FakeClock
) -> None:
    """Two RedisStores on one server: each throttle decides on the fleet's counts."""
    one, two = redis_pair
    a = Throttle(name="api", store=one, random=always, accepted_if=not_overloaded, clock=clock)
    b = Throttle(name="api", store=two, random=always, accepted_if=not_overloaded, clock=clock)
    for _ in range(30):
        await outcome(a, refused)
    for _ in range(5):
        assert await outcome(b, ok) == "ok"  # b alone has seen only accepts
    await a.sync()
    await b.sync()
    assert b.counts.totals() == (35, 5)
    assert b.ratio == pytest.approx(25 / 36)
    assert await outcome(b, ok) == "throttled"  # the fleet's refusals throttle b
    await b.sync()
    await a.sync()
    assert a.counts.totals() == (36, 5)


async def test_redis_background_sync(stores: Callable[..., RedisStore]) -> None:
    """With the system clock, counts reach the fleet by themselves within a few intervals."""
    one = stores()
    two = stores(prefix=one.prefix)  # a replica of one
    a = Throttle(name="api", store=one, sync_interval=0.02, accepted_if=not_overloaded)
    b = Throttle(name="api", store=two, sync_interval=0.02)
    for _ in range(10):
        await outcome(a, refused)
    await b.call(ok)
    await until(lambda: b.counts.totals() == (11, 1), 10, "the fleet's counts", every=0.02)


@pytest.mark.parametrize("value", ["1.5", "inf"])
async def test_garbage_under_the_window_costs_the_store_nothing(
    redis_url: str, clock: FakeClock, value: str
) -> None:
    """A count that is not ours under a throttle's shared window is reset once and reported;
    the store never turns degraded and the fleet's counts stay shared."""
    events: list[Event] = []
    prefix = unique_prefix("th")
    store = RedisStore.from_url(redis_url, prefix=prefix, clock=clock, listeners=[events.append])
    raw = aioredis.Redis.from_url(redis_url)
    try:
        throttle = Throttle(name="api", store=store, random=never, clock=clock)
        await outcome(throttle, ok)
        await throttle.sync()
        counts = store.key("throttle:api", "counts")  # a throttle's window, by kind
        await raw.hset(counts, mapping=dict.fromkeys(await raw.hkeys(counts), value))
        for _ in range(5):
            await outcome(throttle, ok)
            await throttle.sync()
            assert throttle.counts.shared
        assert not any(isinstance(e, StoreDegraded) for e in events), events
        assert [type(e) for e in events] == [StoreDataReset]
        assert throttle.counts.totals() == (5, 5)  # the garbage bucket went; the rest counts
    finally:
        await raw.aclose()
        await store.aclose()


async def test_redis_unreachable_keeps_working_locally(
    unreachable_store: RedisStore, clock: FakeClock
) -> None:
    """A RedisStore that cannot connect: calls go on, decided by local counts."""
    throttle = Throttle(name="api", store=unreachable_store, random=always, clock=clock)
    assert await throttle.call(ok) == "ok"
    await throttle.sync()
    assert await throttle.call(ok) == "ok"
    assert throttle.counts.totals() == (2, 2)


def test_shared_counts_outside_a_loop(clock: FakeClock) -> None:
    """Counting with a store but without an event loop arms nothing and loses nothing."""
    counts = SharedCounts(
        "x", window=10, buckets=10, store=MemoryStore(clock=clock), clock=clock, sync_interval=1
    )
    counts.add(2, 1)
    assert clock.pending == 0
    assert counts.totals() == (2, 1)


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"k": 0.5}, ValueError, "k"),
        ({"k": math.inf}, ValueError, "k"),
        ({"k": "2"}, TypeError, "k"),
        ({"k": True}, TypeError, "k"),
        ({"window": 0}, ValueError, "window"),
        ({"window": -1}, ValueError, "window"),
        ({"buckets": 0}, ValueError, "buckets"),
        ({"buckets": 4000}, ValueError, "buckets"),
        ({"buckets": 2.0}, TypeError, "buckets"),
        ({"window": 0.001, "buckets": 10}, ValueError, "window / buckets"),
        ({"sync_interval": 0}, ValueError, "sync_interval"),
        ({"sync_interval": 200}, ValueError, "sync_interval"),
        ({"accepted_if": 3}, TypeError, "accepted_if"),
        ({"accepted_if_result": 3}, TypeError, "accepted_if_result"),
        ({"random": 0.5}, TypeError, "random"),
        ({"store": object()}, TypeError, "store"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_input_rejected(kwargs: dict[str, Any], error: type[Exception], names: str) -> None:
    """Bad parameters are refused at construction, naming the parameter."""
    with pytest.raises(error, match=names):
        Throttle(**kwargs)


async def test_shared_store_needs_a_name(redis_url: str) -> None:
    """On a shared store the default name is refused (two services would share counts)."""
    store = RedisStore.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="name"):
            Throttle(store=store)
    finally:
        await store.aclose()


def test_defaults() -> None:
    """The documented defaults."""
    throttle = Throttle()
    assert (throttle.k, throttle.window, throttle.buckets) == (2.0, 120.0, 12)
    assert throttle.sync_interval == 1.0
    assert throttle.retry_after == 10.0
    assert throttle.accepted_if is default_accepted
    assert repr(throttle) == "Throttle(k=2, window=120, name='throttle')"


async def test_decorator(clock: FakeClock) -> None:
    """Decorating keeps the function's name; sync functions are refused."""
    throttle = Throttle(clock=clock)

    @throttle
    async def fetch() -> str:
        return "x"

    assert fetch.__name__ == "fetch"
    assert await fetch() == "x"
    with pytest.raises(TypeError):
        throttle(lambda: None)  # type: ignore[arg-type, return-value]


async def test_redis_killed_mid_run_goes_local(redis_server: Any, clock: FakeClock) -> None:
    """Redis dies after the fleet's counts were shared: calls go on, on the local counts."""
    store = RedisStore.from_url(redis_server.url, timeout=0.1, clock=clock)
    try:
        throttle = Throttle(
            name="api", store=store, random=always, accepted_if=not_overloaded, clock=clock
        )
        for _ in range(4):
            await outcome(throttle, ok)
        await throttle.sync()
        assert throttle.counts.shared
        redis_server.kill()
        assert await outcome(throttle, ok) == "ok"
        await throttle.sync()  # fails: the replica decides alone from now on
        assert not throttle.counts.shared
        assert throttle.counts.totals() == (5, 5)
        for _ in range(10):
            assert await outcome(throttle, refused) in ("refused", "throttled")
        assert await outcome(throttle, ok) == "throttled"
    finally:
        await store.aclose()
