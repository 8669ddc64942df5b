"""The rate limiter: GCRA admission, retry_after, refill, defaults, events."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.errors import RateLimitedError, StoreUnavailableError
from resilience.events import CallRejected, Event
from resilience.policies.ratelimit import RateLimiter
from resilience.rules.gcra import gcra
from resilience.store import MemoryStore
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import ok, policy_events, settle, started
from ..store.support import evalsha_calls


def run_now(awaitable: Awaitable[Any]) -> Any:
    """Drive a coroutine that never suspends to its end, without an event loop."""
    coro = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the call suspended")


def admitted(limiter: RateLimiter) -> bool:
    """One protected call: True if admitted, False if rate limited."""
    try:
        run_now(limiter.call(ok))
    except RateLimitedError:
        return False
    return True


async def test_burst_then_reject_with_retry_after(clock: FakeClock) -> None:
    """``burst`` calls pass at once; the next fails with retry_after = time to the next token."""
    limiter = RateLimiter(2, per=1, burst=3, name="rl", clock=clock)  # a token every 0.5s
    for _ in range(3):
        assert await limiter.call(ok) == "ok"
    with pytest.raises(RateLimitedError) as info:
        await limiter.call(ok)
    assert info.value.name == "rl"
    assert info.value.retry_after == pytest.approx(0.5)
    clock.advance(0.2)
    with pytest.raises(RateLimitedError) as info:
        await limiter.call(ok)
    assert info.value.retry_after == pytest.approx(0.3)
    clock.advance(info.value.retry_after - 0.001)
    with pytest.raises(RateLimitedError):
        await limiter.call(ok)
    clock.advance(0.001)
    assert await limiter.call(ok) == "ok"
    with pytest.raises(RateLimitedError) as info:
        await limiter.call(ok)
    assert info.value.retry_after == pytest.approx(0.5)


async def test_rejected_call_does_not_run(clock: FakeClock) -> None:
    """A rate-limited call never runs the protected function."""
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    limiter = RateLimiter(1, burst=1, clock=clock)
    await limiter.call(counted)
    with pytest.raises(RateLimitedError):
        await limiter.call(counted)
    assert calls == 1


def test_tokens_refill_at_rate_per(clock: FakeClock) -> None:
    """After a full bucket is spent, ``per`` seconds restore ``rate`` tokens (up to burst)."""
    limiter = RateLimiter(4, per=2, burst=4, clock=clock)
    assert sum(admitted(limiter) for _ in range(10)) == 4
    clock.advance(1)  # half a period: two tokens
    assert sum(admitted(limiter) for _ in range(10)) == 2
    clock.advance(2)
    assert sum(admitted(limiter) for _ in range(10)) == 4
    clock.advance(100)  # never more than burst, however long the pause
    assert sum(admitted(limiter) for _ in range(10)) == 4


def test_default_burst_is_ceil_rate(clock: FakeClock) -> None:
    """burst defaults to ceil(rate), and that many calls are admitted at once."""
    for rate in (1, 2.5, 10, 0.5):
        limiter = RateLimiter(rate, clock=clock)
        assert limiter.burst == max(1, math.ceil(rate))
        assert sum(admitted(limiter) for _ in range(20)) == limiter.burst


def test_try_acquire_matches_calls(clock: FakeClock) -> None:
    """try_acquire takes tokens like a call and returns the wait when none is left."""
    limiter = RateLimiter(1, per=4, burst=2, clock=clock)
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() == pytest.approx(4)
    assert not admitted(limiter)
    clock.advance(4)
    assert admitted(limiter)


async def test_call_rejected_event(clock: FakeClock) -> None:
    """A rejection delivers CallRejected carrying the RateLimitedError."""
    events: list[Event] = []
    limiter = RateLimiter(1, burst=1, name="rl", clock=clock, listeners=[policy_events(events)])
    await limiter.call(ok)
    assert events == []
    with pytest.raises(RateLimitedError) as info:
        await limiter.call(ok)
    assert events == [CallRejected(name="rl", policy="rate_limiter", error=info.value)]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rate": 0}, ValueError),
        ({"rate": -1}, ValueError),
        ({"rate": math.nan}, ValueError),
        ({"rate": math.inf}, ValueError),
        ({"rate": "1"}, TypeError),
        ({"rate": True}, TypeError),
        ({"rate": 1, "per": 0}, ValueError),
        ({"rate": 1, "per": -2}, ValueError),
        ({"rate": 1, "burst": 0}, ValueError),
        ({"rate": 1, "burst": 1.5}, TypeError),
        ({"rate": 1, "burst": True}, TypeError),
        ({"rate": 1e-310}, ValueError),  # the interval overflows to inf
        ({"rate": 1e308, "per": 1e-300}, ValueError),  # the interval underflows to 0
        ({"rate": 1, "per": 10**400}, ValueError),
    ],
)
def test_bad_input_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Non-positive, non-finite or mistyped rate, per and burst are rejected."""
    with pytest.raises(error):
        RateLimiter(**kwargs)


def _window_ok(times: list[float], burst: int, interval: float) -> bool:
    """True if every stretch between two admitted times holds at most burst + length/interval."""
    for i in range(len(times)):
        for j in range(i, len(times)):
            if j - i + 1 > burst + (times[j] - times[i] + 1e-6) / interval:
                return False
    return True


steps = st.lists(st.integers(min_value=0, max_value=1500), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(
    gaps=steps,
    rate=st.integers(min_value=1, max_value=20),
    per=st.sampled_from([0.5, 1.0, 3.0]),
    burst=st.integers(min_value=1, max_value=10),
)
def test_admissions_never_exceed_burst_plus_rate(
    gaps: list[int], rate: int, per: float, burst: int
) -> None:
    """Over any call times, admissions in any interval stay within burst + rate*length/per."""
    clock = FakeClock()
    limiter = RateLimiter(rate, per=per, burst=burst, clock=clock)
    times = []
    for gap in gaps:
        clock.advance(gap / 1000)
        if admitted(limiter):
            times.append(clock.monotonic())
    assert _window_ok(times, burst, per / rate)


@settings(max_examples=100, deadline=None)
@given(gaps=steps, rate=st.integers(min_value=1, max_value=20), burst=st.integers(1, 10))
def test_gcra_and_calls_agree(gaps: list[int], rate: int, burst: int) -> None:
    """try_acquire (gcra) and protected calls admit exactly the same calls; retry_after agrees."""
    clock = FakeClock()
    by_call = RateLimiter(rate, burst=burst, clock=clock)
    by_gcra = RateLimiter(rate, burst=burst, clock=clock)
    for gap in gaps:
        clock.advance(gap / 1000)
        wait = by_gcra.try_acquire()
        retry_after: float | None = None
        try:
            run_now(by_call.call(ok))
        except RateLimitedError as exc:
            retry_after = exc.retry_after
        if retry_after is None:
            assert wait == 0.0
        else:
            assert wait == pytest.approx(retry_after, abs=1e-6)
            assert wait > 0


@settings(max_examples=100, deadline=None)
@given(
    tat=st.floats(min_value=-10, max_value=10),
    now=st.floats(min_value=-10, max_value=10),
    interval=st.floats(min_value=0.01, max_value=5),
    burst=st.integers(1, 10),
)
def test_gcra_step(tat: float, now: float, interval: float, burst: int) -> None:
    """gcra either admits (tat moves one interval past max(tat, now)) or reports a positive
    wait of at most one interval; a tat further ahead than a full burst (the clock stepped
    back) counts as an empty bucket, not as a wait as long as the step."""
    held = min(tat, now + burst * interval)
    new_tat, wait = gcra(tat, now, interval, burst)
    if wait == 0.0:
        assert new_tat == pytest.approx(max(held, now) + interval)
        assert max(held, now) - now <= (burst - 1) * interval + 1e-6
    else:
        assert new_tat == held
        assert wait == pytest.approx(held - now - (burst - 1) * interval)
        assert wait <= interval + 1e-9
        # after waiting, the same take succeeds
        assert gcra(new_tat, now + wait + 1e-9, interval, burst)[1] == 0.0


def test_rate_limited_error_retry_after_positive(clock: FakeClock) -> None:
    """retry_after is strictly positive and no larger than one interval right after a take."""
    limiter = RateLimiter(3, per=1, burst=1, clock=clock)
    assert admitted(limiter)
    for step in (0.0, 0.1, 0.2):
        clock.advance(step)
        with pytest.raises(RateLimitedError) as info:
            run_now(limiter.call(ok))
        assert 0 < info.value.retry_after <= 1 / 3 + 1e-9


# --- shared through a store -----------------------------------------------------------------


class DownStore(MemoryStore):
    """A store whose GCRA bucket cannot be reached."""

    async def rate_take(self, key: str, *, interval: float, burst: int) -> float:
        raise StoreUnavailableError("down")


def test_store_must_be_a_store() -> None:
    """store= is checked for the rate_take primitive at construction."""
    with pytest.raises(TypeError, match="store"):
        RateLimiter(1, store=object())  # type: ignore[arg-type]


async def test_replicas_share_one_bucket(clock: FakeClock) -> None:
    """Two limiters of one name on one store draw from one bucket."""
    store = MemoryStore(clock=clock)
    events: list[Event] = []
    a = RateLimiter(2, burst=2, store=store, name="api", clock=clock)
    b = RateLimiter(
        2, burst=2, store=store, name="api", clock=clock, listeners=[policy_events(events)]
    )
    assert await a.call(ok) == "ok"
    assert await b.call(ok) == "ok"
    with pytest.raises(RateLimitedError) as info:
        await b.call(ok)
    assert info.value.retry_after == pytest.approx(0.5)
    assert isinstance(events[0], CallRejected)
    with pytest.raises(RateLimitedError):
        await a.call(ok)
    clock.advance(0.5)
    assert await a.call(ok) == "ok"
    with pytest.raises(RateLimitedError):
        await b.call(ok)


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=40),
    rate=st.integers(min_value=1, max_value=10),
    burst=st.integers(min_value=1, max_value=5),
)
def test_shared_replicas_admit_like_one_limiter(gaps: list[int], rate: int, burst: int) -> None:
    """Calls spread over two replicas sharing a store are admitted exactly as by one limiter."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    replicas = [RateLimiter(rate, burst=burst, store=store, name="x", clock=clock) for _ in "ab"]
    single = RateLimiter(rate, burst=burst, clock=clock)
    for i, gap in enumerate(gaps):
        clock.advance(gap / 20)
        assert admitted(replicas[i % 2]) == admitted(single)


async def test_store_down_uses_local_bucket(clock: FakeClock) -> None:
    """When the store cannot answer, the local GCRA admits and rejects instead."""
    limiter = RateLimiter(1, burst=2, store=DownStore(clock=clock), clock=clock)
    assert await limiter.call(ok) == "ok"
    assert await limiter.call(ok) == "ok"
    with pytest.raises(RateLimitedError) as info:
        await limiter.call(ok)
    assert info.value.retry_after == pytest.approx(1.0)


async def test_redis_rate_limit_shared_by_two_replicas(
    redis_pair: tuple[RedisStore, RedisStore], clock: FakeClock
) -> None:
    """Two RedisStores on one Redis share one bucket: the burst is for the fleet."""
    one, two = redis_pair
    a = RateLimiter(2, burst=3, store=one, name="api", clock=clock)
    b = RateLimiter(2, burst=3, store=two, name="api", clock=clock)
    assert [await a.call(ok), await b.call(ok), await a.call(ok)] == ["ok"] * 3
    with pytest.raises(RateLimitedError) as info:
        await b.call(ok)
    assert info.value.retry_after == pytest.approx(0.5, abs=1e-3)
    clock.advance(0.5)
    assert await b.call(ok) == "ok"
    with pytest.raises(RateLimitedError):
        await a.call(ok)


async def test_redis_unreachable_uses_local_bucket(
    unreachable_store: RedisStore, clock: FakeClock
) -> None:
    """A RedisStore that cannot connect never fails a call: the local bucket decides."""
    limiter = RateLimiter(1, burst=2, store=unreachable_store, name="api", clock=clock)
    assert await limiter.call(ok) == "ok"
    assert await limiter.call(ok) == "ok"
    with pytest.raises(RateLimitedError):
        await limiter.call(ok)


# --- tokens taken ahead (ahead=) ---------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1)), min_size=1, max_size=120),
    st.integers(1, 50),
    st.integers(1, 10),
)
def test_tokens_taken_ahead_admit_at_most_rate_times_ahead_more(
    steps: list[tuple[int, int]], rate: int, burst: int
) -> None:
    """Two replicas taking tokens ahead (ahead=0.1 s) from one bucket: in every period the
    fleet admits at most what the bucket allows (rate * period + burst) plus rate * ahead."""
    import asyncio

    async def run() -> None:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        replicas = [
            RateLimiter(rate, burst=burst, store=store, name="x", clock=clock, ahead=0.1)
            for _ in "ab"
        ]
        times: list[float] = []
        for gap_ms, who in steps:
            clock.advance(gap_ms / 1000)
            try:
                await replicas[who].call(ok)
                times.append(clock.monotonic())
            except RateLimitedError:
                pass
        for i, first in enumerate(times):  # every period from one admission to another
            for j in range(i, len(times)):
                period = times[j] - first
                assert j - i + 1 <= rate * period + burst + rate * 0.1 + 1e-6

    asyncio.run(run())


async def test_tokens_taken_ahead_cost_few_redis_commands(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """Busy replicas ask the fleet's bucket about once per batch, not once per call."""
    one = stores()
    replicas = [one, stores(prefix=one.prefix)]
    limiters = [RateLimiter(1_000_000, store=s, name="api", ahead=0.05) for s in replicas]
    before = await evalsha_calls(raw)

    async def worker(limiter: RateLimiter) -> None:
        for _ in range(500):
            await limiter.call(ok)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(lim) for lim in limiters for _ in range(4)))
    after = await evalsha_calls(raw)
    assert after - before <= 0.05 * 4000, after - before


def test_ahead_is_checked() -> None:
    with pytest.raises(ValueError, match="ahead"):
        RateLimiter(1, ahead=-1)
    with pytest.raises(TypeError, match="ahead"):
        RateLimiter(1, ahead="0.1")  # type: ignore[arg-type]


async def test_tokens_taken_ahead_are_dropped_after_ahead(clock: FakeClock) -> None:
    """A token left over from a batch is not spent once ``ahead`` has passed: the bucket it
    came from has been refilled for others since."""
    store = MemoryStore(clock=clock)
    a = RateLimiter(10, burst=10, store=store, name="x", clock=clock, ahead=0.1)
    b = RateLimiter(10, burst=10, store=store, name="x", clock=clock, ahead=0.1)
    await a.call(ok)  # a batch of 1
    await a.call(ok)  # it ran out at once: a bigger batch, tokens left over
    assert a._ahead >= 1
    clock.advance(0.5)
    admitted = 0
    with contextlib.suppress(RateLimitedError):  # b empties the bucket
        for _ in range(20):
            await b.call(ok)
            admitted += 1
    assert admitted < 20
    with pytest.raises(RateLimitedError):
        await a.call(ok)  # its left-over token lapsed: the empty bucket decides


@pytest.mark.parametrize("ahead", [1e308, 3601.0, 1e20])
def test_an_ahead_beyond_any_use_is_refused(ahead: float) -> None:
    """``ahead`` so large that a batch's size overflows (1e308) is refused at construction
    with a ValueError naming it, never a bare OverflowError on the second call."""
    with pytest.raises(ValueError, match="ahead"):
        RateLimiter(10, ahead=ahead, store=MemoryStore(), name="x")


class OneTokenPerAsk(MemoryStore):
    """A fleet bucket behind a slow store: each batch it grants holds one token, after one
    second."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.asks = 0

    async def rate_take_many(
        self, key: str, *, interval: float, burst: int, want: int
    ) -> tuple[int, float]:
        self.asks += 1
        await self.clock.sleep(1.0)
        return 1, 0.0


async def test_a_call_waits_on_at_most_two_store_calls() -> None:
    """Calls that find the tokens taken ahead spent wait for the ask under way, then for one
    that counts them, never for a chain of asks one after another: with a slow store and
    batches too small for them all, each call is answered within two asks (admitted, or
    refused with a wait), where one used to wait through every ask queued ahead of it."""
    clock = FakeClock(autojump=True)
    store = OneTokenPerAsk(clock)
    limiter = RateLimiter(100, store=store, name="x", clock=clock, ahead=0.05)
    took: list[float] = []

    async def call() -> None:
        start = clock.monotonic()
        with contextlib.suppress(RateLimitedError):
            await limiter.call(ok)
        took.append(clock.monotonic() - start)

    await asyncio.gather(*(call() for _ in range(10)))
    assert len(took) == 10
    assert max(took) <= 2.0 + 1e-9, took


def test_a_burst_beyond_what_a_float_holds_is_refused() -> None:
    """A burst no float holds exactly is refused at construction, not overflowed in a call."""
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(10, burst=10**400)
    assert RateLimiter(10, burst=2**53).burst == 2**53


class GatedBucket(MemoryStore):
    """A fleet bucket whose batches are answered one at a time, when the test says so
    (``answer()``), from the real bucket, or empty while ``empty`` is set."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.gates: list[asyncio.Event] = []
        self.empty = False

    async def rate_take_many(
        self, key: str, *, interval: float, burst: int, want: int
    ) -> tuple[int, float]:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.empty:
            return 0, interval
        return await super().rate_take_many(key, interval=interval, burst=burst, want=want)

    async def answer(self) -> None:
        """Answer the oldest batch not answered yet; let every call move on."""
        await settle()
        self.gates.pop(0).set()
        await settle()


async def test_a_token_set_aside_for_a_call_cancelled_meanwhile_is_not_spent_later(
    clock: FakeClock,
) -> None:
    """A batch sets tokens aside for the calls that waited on it; one of them cancelled before
    it woke leaves its token unused. That token is dropped with the next answer: a call
    waiting on an ask the fleet answers "empty" is refused, not admitted on a token the
    fleet's bucket counted long ago."""
    store = GatedBucket(clock)
    limiter = RateLimiter(1000, store=store, name="x", clock=clock, ahead=0.05)
    first = await started(limiter.call(ok))  # asks for a batch
    second = await started(limiter.call(ok))  # waits on it
    third = await started(limiter.call(ok))  # waits on it
    await store.answer()  # one token (nothing was spent yet): the first call's
    assert await first == "ok"
    # the second asked for itself and the third (still counted as waiting): cancel the third
    assert len(store.gates) == 1
    third.cancel()
    await store.answer()
    assert await second == "ok"
    assert third.cancelled()
    store.empty = True
    clock.advance(1.0)
    asker = await started(limiter.call(ok))
    waiter = await started(limiter.call(ok))
    await store.answer()  # the fleet's bucket is empty
    with pytest.raises(RateLimitedError):
        await asker
    assert not waiter.done()  # it asks once more (it was not counted): refused again
    await store.answer()
    with pytest.raises(RateLimitedError):
        await waiter


@pytest.mark.parametrize("rate", [1e-300, 1e-9])
def test_a_rate_slower_than_one_call_in_ten_years_is_refused(rate: float) -> None:
    """A store keeps the interval between calls in milliseconds: an interval over ten years
    is refused at construction (it made the shared bucket's script fail into an outage)."""
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate)
    assert RateLimiter(1, per=86_400).interval == 86_400
