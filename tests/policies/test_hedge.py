"""The hedge policy: hedged attempts, clean cancellation, budget, learned delay."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.errors import StoreUnavailableError
from resilience.policies.bulkhead import Bulkhead
from resilience.policies.hedge import Hedge, _delay, _delay_value
from resilience.policies.pipeline import Pipeline
from resilience.policies.retry import Retry
from resilience.policies.timeout import Timeout
from resilience.rules.quantile import LearnedDelay
from resilience.store import MemoryStore
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import advance, cancelled, settle, started


def only_me() -> set[asyncio.Task[Any]]:
    """The tasks left besides the test's own."""
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


class Backend:
    """Attempt ``i`` waits until ``release(i)`` (or at once if ``instant(i)``), then returns
    ``i`` or raises what ``errors[i]`` holds; records which attempts started and ended."""

    def __init__(self, instant: Callable[[int], bool] = lambda i: False) -> None:
        self.instant = instant
        self.started: list[int] = []
        self.ended: list[int] = []  # every attempt's finally, cancelled ones included
        self.gates: dict[int, asyncio.Event] = {}
        self.errors: dict[int, Exception] = {}

    def release(self, i: int) -> None:
        self.gates.setdefault(i, asyncio.Event()).set()

    async def __call__(self) -> int:
        i = len(self.started)
        self.started.append(i)
        try:
            if not self.instant(i):
                await self.gates.setdefault(i, asyncio.Event()).wait()
            if i in self.errors:
                raise self.errors[i]
            return i
        finally:
            self.ended.append(i)


def start(hedge: Hedge, fn: Callable[[], Awaitable[int]]) -> asyncio.Task[int]:
    return asyncio.ensure_future(hedge.call(fn))


# --- who wins --------------------------------------------------------------------------------


async def test_fast_first_attempt_no_hedge(clock: FakeClock) -> None:
    """A first attempt answering before the delay is the only one; nothing is left behind."""
    hedge = Hedge(delay=0.05, budget=1.0, clock=clock)
    backend = Backend(instant=lambda i: True)
    assert await hedge.call(backend) == 0
    assert backend.started == [0]
    assert clock.pending == 0  # the hedge timer was cancelled
    assert hedge.counts.totals() == (1, 0)
    assert only_me() == set()


async def test_slow_first_attempt_overtaken_by_hedge(clock: FakeClock) -> None:
    """After the delay a hedge starts; it answers first, wins, and the first is cancelled."""
    hedge = Hedge(delay=0.05, budget=1.0, clock=clock)
    backend = Backend(instant=lambda i: i == 1)
    task = start(hedge, backend)
    await settle()
    assert backend.started == [0]
    await advance(clock, 0.049)
    assert backend.started == [0]
    await advance(clock, 0.001)
    assert task.done()
    assert task.result() == 1
    assert backend.started == [0, 1]
    assert sorted(backend.ended) == [0, 1]  # the loser's finally ran before the call returned
    assert hedge.counts.totals() == (1, 1)
    assert only_me() == set()


async def test_first_success_wins_among_running(clock: FakeClock) -> None:
    """With two hedges running, whichever succeeds first is the result; the rest are
    cancelled and awaited."""
    hedge = Hedge(delay=1.0, max_hedges=2, budget=2.0, clock=clock)
    backend = Backend()
    task = start(hedge, backend)
    await settle()
    await advance(clock, 1.0)
    await advance(clock, 1.0)
    assert backend.started == [0, 1, 2]
    backend.release(1)
    await settle()
    assert await task == 1
    assert sorted(backend.ended) == [0, 1, 2]
    assert only_me() == set()


@pytest.mark.parametrize(
    ("first_to_fail", "last_to_fail", "raised"),
    [(0, 1, ConnectionError), (1, 0, ValueError)],
    ids=["the first attempt fails first", "the hedge fails first"],
)
async def test_all_fail_raises_the_first_failure(
    clock: FakeClock, first_to_fail: int, last_to_fail: int, raised: type[Exception]
) -> None:
    """When every attempt fails, the error of the first to fail is raised (after the last),
    whether the first attempt or the hedge failed first."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    backend = Backend()
    backend.errors = {0: ConnectionError("first"), 1: ValueError("hedge")}
    task = start(hedge, backend)
    await settle()
    await advance(clock, 1.0)
    backend.release(first_to_fail)
    await settle()
    assert not task.done()  # the other attempt may still succeed
    backend.release(last_to_fail)
    await settle()
    with pytest.raises(raised):
        await task
    assert only_me() == set()


async def test_failure_before_delay_is_not_hedged(clock: FakeClock) -> None:
    """A first attempt that fails before the delay ends the call: no hedge, no retry."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    backend = Backend(instant=lambda i: True)
    backend.errors = {0: ValueError("bad")}
    with pytest.raises(ValueError, match="bad"):
        await hedge.call(backend)
    assert backend.started == [0]
    assert clock.pending == 0


async def test_hedge_wins_after_first_failed(clock: FakeClock) -> None:
    """A failed first attempt does not fail the call while a hedge can still succeed."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    backend = Backend()
    backend.errors = {0: ConnectionError("first")}
    task = start(hedge, backend)
    await settle()
    await advance(clock, 1.0)
    backend.release(0)
    await settle()
    backend.release(1)
    assert await task == 1


async def test_caller_cancellation_cancels_every_attempt(clock: FakeClock) -> None:
    """Cancelling the caller cancels and awaits every attempt; the cancellation propagates."""
    hedge = Hedge(delay=1.0, max_hedges=2, budget=2.0, clock=clock)
    backend = Backend()
    task = start(hedge, backend)
    await settle()
    await advance(clock, 1.0)
    assert backend.started == [0, 1]
    await cancelled(task)
    assert sorted(backend.ended) == [0, 1]
    assert clock.pending == 0  # the next hedge's timer too
    assert only_me() == set()
    assert hedge.counts.totals() == (1, 1)


async def test_a_loser_slow_to_clean_up_does_not_hold_back_the_answer(clock: FakeClock) -> None:
    """The first attempt wins while the hedge is still cleaning up after its cancellation:
    the call returns at once; the loser is kept until it has ended (``ending``, ``drain``)."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    first, cleaned = asyncio.Event(), asyncio.Event()
    done: list[str] = []

    async def attempt() -> str:
        if not done:
            done.append("first")
            await first.wait()
            return "first"
        done.append("hedge")
        try:
            await asyncio.Event().wait()
        finally:
            await cleaned.wait()  # slow cleanup (giving back a lease, say)
            done.append("cleaned")
        return "hedge"

    task = await started(hedge.call(attempt))
    await advance(clock, 1.0)
    assert done == ["first", "hedge"]
    first.set()
    await settle()
    assert task.done()
    assert await task == "first"
    assert done == ["first", "hedge"]  # still cleaning up
    assert hedge.ending == 1
    drained = await started(hedge.drain())
    assert not drained.done()
    cleaned.set()
    await drained
    assert done == ["first", "hedge", "cleaned"]
    assert hedge.ending == 0
    assert only_me() == set()


async def test_the_first_attempt_runs_in_the_callers_task(clock: FakeClock) -> None:
    """The first attempt runs inline, in the caller's task; only a hedge gets a task."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    seen: list[asyncio.Task[Any] | None] = []

    async def attempt() -> int:
        seen.append(asyncio.current_task())
        if len(seen) == 1:
            await asyncio.Event().wait()
        return len(seen)

    task = await started(hedge.call(attempt))
    await advance(clock, 1.0)
    assert await task == 2
    assert seen[0] is task
    assert seen[1] is not task


async def test_a_winning_hedge_waits_for_the_first_attempts_clean_up(clock: FakeClock) -> None:
    """A hedge that wins interrupts the first attempt (a cancellation, as asyncio.timeout's);
    the call returns once the first attempt's clean-up has run, and is not cancelled."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    cleaned = asyncio.Event()
    done: list[str] = []

    async def attempt() -> str:
        if not done:
            done.append("first")
            try:
                await asyncio.Event().wait()
            finally:
                await cleaned.wait()
                done.append("cleaned")
        return "hedge"

    task = await started(hedge.call(attempt))
    await advance(clock, 1.0)
    assert not task.done()  # the first attempt is cleaning up, in the caller's task
    cleaned.set()
    await settle()
    assert await task == "hedge"
    assert task.cancelling() == 0
    assert done == ["first", "cleaned"]
    assert hedge.ending == 0
    assert only_me() == set()


async def test_a_call_cancelled_as_its_hedge_wins_is_cancelled(clock: FakeClock) -> None:
    """When the caller cancels the call in the same turn as a hedge wins, the cancellation
    propagates: the hedge's own interruption does not swallow it."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    backend = Backend(instant=lambda i: i == 1)
    task = await started(hedge.call(backend))
    clock.advance(1.0)  # the hedge starts and answers at its first step
    for _ in range(20):  # until the hedge has won and interrupts the first attempt
        await asyncio.sleep(0)
        if task.cancelling():
            break
    assert task.cancelling() == 1
    assert not task.done()
    task.cancel()
    await settle()
    assert hedge.counts.totals() == (1, 1)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert only_me() == set()


async def test_a_first_attempt_ignoring_the_interruption_loses(clock: FakeClock) -> None:
    """A first attempt that swallows the interruption and returns anyway: the hedge's answer,
    which came first, is the call's, and the call is not left cancelled."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return "first"
        return "hedge"

    task = await started(hedge.call(attempt))
    await advance(clock, 1.0)
    assert await task == "hedge"
    assert calls == [1, 1]
    assert task.cancelling() == 0
    assert only_me() == set()


async def test_a_cancelled_call_waits_for_a_stubborn_attempt(clock: FakeClock) -> None:
    """Cancelling the call cancels its attempts and waits until the hedges have ended, even
    when one cleans up slowly and the call is cancelled again meanwhile (the first attempt
    runs in the caller's task: the second cancellation reaches its clean-up, as it would
    reach any code the caller awaits)."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    cleaned = asyncio.Event()
    done: list[str] = []

    async def attempt() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            await cleaned.wait()
            done.append("cleaned")
        return "never"

    task = await started(hedge.call(attempt))
    await advance(clock, 1.0)  # a hedge is running too
    task.cancel()
    await settle()
    assert not task.done()
    task.cancel()
    await settle()
    assert not task.done()
    cleaned.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["cleaned"]  # the hedge's
    assert hedge.ending == 0
    assert only_me() == set()


async def test_losers_release_their_bulkhead_slots(clock: FakeClock) -> None:
    """In a pipeline, each attempt takes its own bulkhead slot and every slot is given back."""
    bulkhead = Bulkhead(4, clock=clock)
    hedge = Hedge(delay=1.0, max_hedges=2, budget=2.0, clock=clock)
    pipeline = Pipeline(
        Retry(on=ConnectionError, clock=clock), hedge, Timeout(5.0, clock=clock), bulkhead
    )
    backend = Backend(instant=lambda i: i == 2)
    task = await started(pipeline.call(backend))
    await advance(clock, 1.0)
    assert bulkhead.in_flight == 2
    await advance(clock, 1.0)
    assert await task == 2
    assert bulkhead.in_flight == 0
    assert only_me() == set()


async def test_attempt_timeouts_inside(clock: FakeClock) -> None:
    """A Timeout inside the hedge limits each attempt on its own."""
    hedge = Hedge(delay=1.0, budget=1.0, clock=clock)
    pipeline = Pipeline(hedge, Timeout(1.5, clock=clock))
    backend = Backend()
    task = await started(pipeline.call(backend))
    await advance(clock, 1.0)  # the hedge starts, with a deadline of its own
    await advance(clock, 0.5)  # the first attempt times out; the hedge has 1 s left
    assert not task.done()
    backend.release(1)
    assert await task == 1


# --- the budget ------------------------------------------------------------------------------


async def test_budget_refuses_hedges(clock: FakeClock) -> None:
    """With budget 0.25, the first three slow calls get no hedge, the fourth does."""
    hedge = Hedge(delay=1.0, budget=0.25, clock=clock)
    for n in range(1, 5):
        backend = Backend()
        task = start(hedge, backend)
        await settle()
        await advance(clock, 1.0)
        assert backend.started == ([0, 1] if n == 4 else [0])
        backend.release(0)
        assert await task == 0
    assert hedge.counts.totals() == (4, 1)


TICK = 1 / 64  # times are whole ticks: exact in binary, so window edges are exact too


def run_pattern(pattern: list[tuple[int, bool]], budget: float, window: float) -> None:
    """Slow and fast calls at the given gaps (in ticks); every hedge must fit the budget of
    the window it started in."""
    clock = FakeClock()
    buckets = 8
    hedge = Hedge(delay=TICK, budget=budget, window=window, buckets=buckets, clock=clock)
    calls: list[float] = []
    hedges: list[float] = []

    async def main() -> None:
        for gap, slow in pattern:
            clock.advance(gap * TICK)
            backend = Backend(instant=lambda i, slow=slow: not slow or i > 0)  # type: ignore[misc]
            calls.append(clock.monotonic())
            task = start(hedge, backend)
            await settle()
            if slow:
                await advance(clock, TICK)
                if len(backend.started) > 1:
                    hedges.append(clock.monotonic())
                backend.release(0)
            await task

    asyncio.run(main())
    width = window / buckets
    for t in hedges:
        # the window at t holds every event after t - window + width, and none from t -
        # window or before: the hedges it must see fit the budget of the calls it may count
        started = sum(1 for h in hedges if t - window + width < h <= t)
        counted = sum(1 for c in calls if t - window < c <= t)
        assert started <= budget * counted + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.lists(
        st.tuples(st.integers(min_value=0, max_value=200), st.booleans()),
        min_size=1,
        max_size=60,
    ),
    budget=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]),
    window=st.sampled_from([2.0, 8.0, 64.0]),
)
def test_hedges_never_exceed_the_budget(
    pattern: list[tuple[int, bool]], budget: float, window: float
) -> None:
    """Over any pattern of slow and fast calls, hedges stay within the budget."""
    run_pattern(pattern, budget, window)


DELAY = 16  # ticks; an attempt ends at a tick that is never a multiple of it (no ties)


def race_model(
    durations: list[int], outcomes: list[bool], max_hedges: int
) -> tuple[list[int], int | str]:
    """Which attempts start and what the call gives: attempt ``i`` starts at ``i * DELAY``
    while the call is undecided, up to ``max_hedges`` hedges; the first to succeed gives its
    number; once every started attempt has failed, the first failure's (``"error i"``)."""
    ends: list[tuple[int, int]] = []  # (tick, attempt)
    started: list[int] = []
    failed: list[int] = []
    for tick in range(DELAY * (max_hedges + 1) + max(durations) * DELAY + 64):
        if tick % DELAY == 0 and tick // DELAY <= max_hedges:
            i = tick // DELAY
            started.append(i)
            ends.append((tick + durations[i], i))
        for end, i in sorted(ends):
            if end != tick:
                continue
            if outcomes[i]:
                return started, i
            failed.append(i)
            if len(failed) == len(started):
                return started, f"error {failed[0]}"
    raise AssertionError("the model did not decide")


@settings(max_examples=80, deadline=None)
@given(
    max_hedges=st.integers(min_value=1, max_value=3),
    lengths=st.lists(st.integers(min_value=0, max_value=3), min_size=4, max_size=4),
    outcomes=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_a_hedged_call_matches_the_race_model(
    max_hedges: int, lengths: list[int], outcomes: list[bool]
) -> None:
    """For any durations and outcomes of the attempts, the hedged call starts the attempts
    the model starts and gives what it gives (the first success, or the first failure once
    every started attempt failed), the first attempt running inline; nothing is left."""
    durations = [DELAY * n + 1 + i for i, n in enumerate(lengths)]
    expected_started, expected = race_model(durations, outcomes, max_hedges)
    clock = FakeClock()
    hedge = Hedge(delay=DELAY * TICK, max_hedges=max_hedges, budget=max_hedges, clock=clock)
    began: list[int] = []

    async def attempt() -> int:
        i = len(began)
        began.append(i)
        await clock.sleep(durations[i] * TICK)
        if not outcomes[i]:
            raise ValueError(f"error {i}")
        return i

    async def main() -> int | str:
        task = await started(hedge.call(attempt))
        while not task.done():
            await advance(clock, TICK)
        try:
            got: int | str = task.result()
        except ValueError as exc:
            got = str(exc)
        await hedge.drain()
        assert only_me() == set()
        return got

    assert asyncio.run(main()) == expected
    assert began == expected_started


def test_all_slow_calls_hedge_at_the_budget() -> None:
    """When every call is slow, hedges reach the budget and stop there: 10 % of 200."""
    run_pattern([(1, True)] * 200, 0.1, 64.0)
    clock = FakeClock()
    hedge = Hedge(delay=0.01, budget=0.1, clock=clock)

    async def main() -> int:
        hedged = 0
        for _ in range(200):
            backend = Backend(instant=lambda i: i > 0)
            task = start(hedge, backend)
            await settle()
            await advance(clock, 0.01)
            hedged += len(backend.started) > 1
            backend.release(0)
            await task
        return hedged

    assert asyncio.run(main()) == 20


# --- the learned delay -----------------------------------------------------------------------


def test_learned_delay_converges_to_the_quantile() -> None:
    """Fed latencies from a distribution, the delay converges to their p95 (within 5 %)."""
    rng = random.Random(5)
    learned = LearnedDelay(0.95, samples=1000)
    assert learned.value == 0.1  # the initial value, before min_samples
    for _ in range(19):
        learned.observe(rng.lognormvariate(-3, 0.5))
    assert learned.value == 0.1
    for _ in range(5000):
        learned.observe(rng.lognormvariate(-3, 0.5))
    true_p95 = math.exp(-3 + 0.5 * 1.6448536)
    assert learned.value == pytest.approx(true_p95, rel=0.05)
    # the distribution shifts: the window follows it
    for _ in range(2000):
        learned.observe(rng.lognormvariate(-2, 0.5))
    assert learned.value == pytest.approx(math.exp(-2 + 0.5 * 1.6448536), rel=0.05)


def test_learned_delay_nearest_rank() -> None:
    """The quantile is the nearest rank of the samples kept; bad observations are ignored."""
    learned = LearnedDelay(0.9, samples=10, min_samples=10, initial=0.5)
    for v in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1, math.nan, math.inf):
        learned.observe(v / 100)
    assert learned.value == pytest.approx(0.09)
    learned.observe(0.2)  # replaces the oldest (0.01)
    assert learned.value == pytest.approx(0.10)
    learned.reset()
    assert learned.value == 0.5


async def test_hedge_learns_the_p95_of_its_calls(clock: FakeClock) -> None:
    """delay="p95" converges to the p95 of the first attempts' latencies."""
    hedge = Hedge(delay="p95", budget=1.0, clock=clock)
    learned = hedge.learned
    assert learned is not None
    assert hedge.delay == 0.1
    rng = random.Random(11)
    latencies = [rng.uniform(0.001, 0.01) for _ in range(3000)]

    for latency in latencies:

        async def timed(latency: float = latency) -> float:
            clock.advance(latency)  # the call takes that long; its answer comes first
            return latency

        assert await hedge.call(timed) == latency
    assert hedge.counts.totals()[1] == 0
    kept = sorted(latencies[-learned.samples :])
    assert hedge.delay == pytest.approx(kept[math.ceil(0.95 * len(kept)) - 1], rel=0.02)
    assert hedge.delay == pytest.approx(0.001 + 0.95 * 0.009, rel=0.05)


async def test_overtaken_first_attempt_counts_as_a_lower_bound(clock: FakeClock) -> None:
    """A first attempt overtaken by a hedge is observed at the time it had run."""
    learned = LearnedDelay(0.5, samples=10, min_samples=1, initial=1.0)
    hedge = Hedge(delay=learned, budget=1.0, clock=clock)
    backend = Backend(instant=lambda i: False)
    task = start(hedge, backend)
    await settle()
    await advance(clock, 1.0)
    clock.advance(0.5)
    backend.release(1)
    assert await task == 1
    assert learned.value == pytest.approx(1.5)


# --- shared through a store ------------------------------------------------------------------


class DownStore(MemoryStore):
    """A store whose windows cannot be reached."""

    async def window_add(self, key: str, deltas: Any, *, window: float, buckets: int = 10) -> Any:
        raise StoreUnavailableError("down")


async def slow_call(hedge: Hedge, clock: FakeClock) -> bool:
    """One call whose first attempt is slow: whether it was hedged."""
    backend = Backend(instant=lambda i: i > 0)
    task = start(hedge, backend)
    await settle()
    await advance(clock, hedge.delay)
    backend.release(0)
    await task
    return len(backend.started) > 1


async def fast_call(hedge: Hedge) -> None:
    await hedge.call(Backend(instant=lambda i: True))


async def test_memory_store_budget_is_the_fleets(clock: FakeClock) -> None:
    """Calls through one replica fund hedges in another, once counts are exchanged."""
    store = MemoryStore(clock=clock)
    a = Hedge(delay=0.01, budget=0.1, store=store, name="api", clock=clock)
    b = Hedge(delay=0.01, budget=0.1, store=store, name="api", clock=clock)
    for _ in range(20):
        await fast_call(a)
    assert not await slow_call(b, clock)  # b alone: 1 call, no room for a hedge
    await a.sync()
    await b.sync()
    assert b.counts.totals() == (21, 0)
    assert await slow_call(b, clock)
    assert await slow_call(b, clock)
    assert not await slow_call(b, clock)  # 3 hedges would exceed 10 % of 24 calls
    await b.sync()
    await a.sync()
    assert a.counts.totals() == (24, 2)
    assert not await slow_call(a, clock)


async def test_degraded_store_budget_is_local(clock: FakeClock) -> None:
    """A store that cannot answer: the budget counts this replica's calls, and calls go on."""
    hedge = Hedge(delay=0.01, budget=0.5, store=DownStore(clock=clock), name="api", clock=clock)
    await fast_call(hedge)
    await hedge.sync()
    assert await slow_call(hedge, clock)
    assert hedge.counts.totals() == (2, 1)
    assert not hedge.counts.shared


async def test_redis_budget_is_the_fleets(
    redis_pair: tuple[RedisStore, RedisStore], clock: FakeClock
) -> None:
    """Two RedisStores on one server: one replica's calls fund the other's hedges."""
    one, two = redis_pair
    a = Hedge(delay=0.01, budget=0.1, store=one, name="api", clock=clock)
    b = Hedge(delay=0.01, budget=0.1, store=two, name="api", clock=clock)
    for _ in range(10):
        await fast_call(a)
    await a.sync()
    await b.sync()
    assert b.counts.totals() == (10, 0)
    assert await slow_call(b, clock)
    assert not await slow_call(b, clock)
    await b.sync()
    await a.sync()
    assert a.counts.totals() == (12, 1)


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"delay": -1}, ValueError, "delay"),
        ({"delay": math.nan}, ValueError, "delay"),
        ({"delay": "fast"}, ValueError, "delay"),
        ({"delay": "p100"}, ValueError, "delay"),
        ({"delay": "p0"}, ValueError, "delay"),
        ({"delay": True}, TypeError, "delay"),
        ({"delay": None}, TypeError, "delay"),
        ({"max_hedges": 0}, ValueError, "max_hedges"),
        ({"max_hedges": 11}, ValueError, "max_hedges"),
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": 1.5}, ValueError, "budget"),
        ({"budget": math.nan}, ValueError, "budget"),
        ({"budget": "0.1"}, TypeError, "budget"),
        ({"window": 0}, ValueError, "window"),
        ({"buckets": 0}, ValueError, "buckets"),
        ({"window": 0.001}, ValueError, "window / buckets"),
        ({"sync_interval": 100}, ValueError, "sync_interval"),
        ({"store": object()}, TypeError, "store"),
    ],
)
def test_bad_input_rejected(kwargs: dict[str, Any], error: type[Exception], names: str) -> None:
    """Bad parameters are refused at construction, naming the parameter."""
    with pytest.raises(error, match=names):
        Hedge(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"quantile": 1}, ValueError, "quantile"),
        ({"quantile": 0}, ValueError, "quantile"),
        ({"quantile": "0.9"}, TypeError, "quantile"),
        ({"samples": 5}, ValueError, "samples"),
        ({"min_samples": 2000}, ValueError, "min_samples"),
        ({"initial": -1}, ValueError, "initial"),
    ],
)
def test_learned_delay_bad_input(
    kwargs: dict[str, Any], error: type[Exception], names: str
) -> None:
    """LearnedDelay checks its parameters too."""
    with pytest.raises(error, match=names):
        LearnedDelay(**kwargs)


def test_defaults() -> None:
    """The documented defaults."""
    hedge = Hedge()
    assert hedge.learned is not None
    assert hedge.learned.quantile == 0.95
    assert hedge.delay == 0.1
    assert (hedge.max_hedges, hedge.budget, hedge.window, hedge.buckets) == (1, 0.1, 60.0, 10)
    assert repr(Hedge(delay=0.2)) == "Hedge(delay=0.2, max_hedges=1, name='hedge')"
    assert Hedge(delay="p99.9").learned.quantile == pytest.approx(0.999)  # type: ignore[union-attr]


async def test_decorator(clock: FakeClock) -> None:
    """Decorating keeps the function's name; sync functions are refused."""
    hedge = Hedge(delay=1.0, clock=clock)

    @hedge
    async def fetch(x: int) -> int:
        return x * 2

    assert fetch.__name__ == "fetch"
    assert await fetch(21) == 42
    with pytest.raises(TypeError):
        hedge(lambda: None)  # type: ignore[arg-type, return-value]


async def test_system_clock_hedge() -> None:
    """With the real clock and a tiny delay, a hung first attempt is overtaken and cleaned up."""
    hedge = Hedge(delay=0.001, budget=1.0)
    backend = Backend(instant=lambda i: i == 1)
    assert await asyncio.wait_for(hedge.call(backend), timeout=30) == 1
    assert sorted(backend.ended) == [0, 1]
    assert only_me() == set()


@given(st.floats(min_value=1e-12, max_value=1 - 1e-12, exclude_min=True, exclude_max=True))
def test_a_learned_delay_reads_back_as_it_reports_itself(quantile: float) -> None:
    """The percentile a hedge reports as its delay in code (a live setting) is one its own
    check accepts and reads back as the same quantile: "p99.99999" was reported as "p100"
    and "p0.00001" as "p1e-05", which then refused every change of the hedge's settings."""
    reported = _delay_value(LearnedDelay(quantile))
    assert isinstance(reported, str)
    back = _delay(reported)
    assert isinstance(back, LearnedDelay)
    assert math.isclose(back.quantile, quantile, rel_tol=1e-9)


@pytest.mark.parametrize("delay", [10.0, 90.0])
async def test_a_budget_of_max_hedges_never_refuses_even_past_its_window(delay: float) -> None:
    """With ``budget`` = ``max_hedges`` no hedge is ever refused (as documented), also when the
    delay is longer than the budget's window: the call that pays for its hedge had slid out
    of the window, and a delay of 90 s over a 60 s window started no hedge."""
    clock = FakeClock()
    hedge = Hedge(delay=delay, max_hedges=1, budget=1.0, window=60, buckets=10, clock=clock)
    attempts = 0

    @hedge
    async def slow() -> str:
        nonlocal attempts
        attempts += 1
        await clock.sleep(delay * 3)
        return "ok"

    task = await started(slow())
    for _ in range(int(delay) + 1):
        await advance(clock, 1.0)
    assert attempts == 2
    for _ in range(int(delay * 3)):
        await advance(clock, 1.0)
    assert await task == "ok"
