"""The retry policy: attempts, filters, tenacity strategies, events, cancellation."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st
from tenacity import RetryCallState

from resilience import Pipeline, Timeout
from resilience.errors import StoreUnavailableError
from resilience.events import CallRejected, Event, RetryScheduled
from resilience.policies.retry import Retry, RetryBudget
from resilience.store import MemoryStore
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import advance, cancelled, ok, policy_events, started


class Flaky:
    """An async callable failing with ``errors`` in turn, then returning ``value``."""

    def __init__(self, *errors: BaseException, value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def test_on_is_required() -> None:
    """Retry without ``on`` raises TypeError."""
    with pytest.raises(TypeError):
        Retry()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "on", [asyncio.CancelledError, BaseException, (ValueError, KeyboardInterrupt)]
)
def test_on_rejects_base_exceptions(on: Any) -> None:
    """``on`` naming CancelledError or another non-Exception type is a TypeError."""
    with pytest.raises(TypeError):
        Retry(on=on)


@pytest.mark.parametrize(
    ("attempts", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError)]
)
def test_bad_attempts_rejected(attempts: Any, error: type[Exception]) -> None:
    """``attempts`` must be an int >= 1 (bools and floats are refused)."""
    with pytest.raises(error):
        Retry(on=ValueError, attempts=attempts)


async def test_attempts_counts_first_call() -> None:
    """With attempts=3 a failing call runs exactly three times, the first one included."""
    fn = Flaky(*[ValueError(i) for i in range(10)])
    retry = Retry(on=ValueError, attempts=3, clock=FakeClock(autojump=True))
    with pytest.raises(ValueError, match=r"^2$"):
        await retry.call(fn)
    assert fn.calls == 3


async def test_success_after_failures_returns_value() -> None:
    """A call that fails twice then succeeds returns its value on the third attempt."""
    fn = Flaky(ValueError(1), ValueError(2), value="done")
    retry = Retry(on=ValueError, attempts=3, clock=FakeClock(autojump=True))
    assert await retry.call(fn) == "done"
    assert fn.calls == 3


async def test_last_exception_reraised_unwrapped() -> None:
    """When attempts run out the very last exception object is raised, not a RetryError."""
    last = KeyError("third")
    fn = Flaky(KeyError("first"), KeyError("second"), last)
    retry = Retry(on=KeyError, attempts=3, clock=FakeClock(autojump=True))
    with pytest.raises(KeyError) as info:
        await retry.call(fn)
    assert info.value is last
    assert info.value.args == ("third",)
    # not chained to the earlier attempts' errors ("during handling of ... another occurred")
    assert info.value.__context__ is None


async def test_last_result_returned_when_result_rejected() -> None:
    """When retry_if_result keeps rejecting, the last returned result comes back."""
    results = iter([1, 2, 3, 4])

    async def fn() -> int:
        return next(results)

    retry = Retry(
        on=ValueError, attempts=3, retry_if_result=lambda r: r < 10, clock=FakeClock(autojump=True)
    )
    assert await retry.call(fn) == 3


async def test_result_accepted_after_rejections() -> None:
    """retry_if_result retries until a result is accepted and returns that result."""
    results = iter([None, None, "value", "later"])

    async def fn() -> object:
        return next(results)

    retry = Retry(
        on=ValueError,
        attempts=5,
        retry_if_result=lambda r: r is None,
        clock=FakeClock(autojump=True),
    )
    assert await retry.call(fn) == "value"


async def test_unmatched_exception_propagates_after_one_attempt() -> None:
    """An exception not matching ``on`` propagates at once, without a retry."""
    fn = Flaky(TypeError("nope"), value="never")
    clock = FakeClock(autojump=True)
    retry = Retry(on=ValueError, attempts=5, clock=clock)
    with pytest.raises(TypeError):
        await retry.call(fn)
    assert fn.calls == 1
    assert clock.slept == []


async def test_unmatched_exception_on_later_attempt_propagates() -> None:
    """An unmatched exception on a retry propagates at once and ends retrying."""
    fn = Flaky(ValueError(1), TypeError(2), value="never")
    retry = Retry(on=ValueError, attempts=5, clock=FakeClock(autojump=True))
    with pytest.raises(TypeError):
        await retry.call(fn)
    assert fn.calls == 2


async def test_predicate_on() -> None:
    """A predicate ``on`` retries only the exceptions it accepts."""
    retry = Retry(
        on=lambda e: isinstance(e, ValueError) and e.args == ("retry me",),
        attempts=4,
        clock=FakeClock(autojump=True),
    )
    fn = Flaky(ValueError("retry me"), ValueError("retry me"), value="ok")
    assert await retry.call(fn) == "ok"
    assert fn.calls == 3
    other = Flaky(ValueError("retry me"), ValueError("stop"), value="never")
    with pytest.raises(ValueError, match="stop"):
        await retry.call(other)
    assert other.calls == 2


async def test_tuple_on() -> None:
    """A tuple ``on`` retries any of its types."""
    fn = Flaky(ValueError(), KeyError(), value="ok")
    retry = Retry(on=(ValueError, KeyError), attempts=3, clock=FakeClock(autojump=True))
    assert await retry.call(fn) == "ok"


async def test_wait_fixed_sleeps_on_clock() -> None:
    """tenacity.wait_fixed(2) makes the retry sleep 2s between attempts, on the policy's clock."""
    clock = FakeClock(autojump=True)
    retry = Retry(on=ValueError, attempts=3, wait=tenacity.wait_fixed(2), clock=clock)
    with pytest.raises(ValueError, match=r"^$"):
        await retry.call(Flaky(*[ValueError() for _ in range(5)]))
    assert clock.slept == [2, 2]


async def test_wait_exponential_honoured() -> None:
    """tenacity.wait_exponential gives the doubling delays it promises."""
    clock = FakeClock(autojump=True)
    retry = Retry(
        on=ValueError,
        attempts=4,
        wait=tenacity.wait_exponential(multiplier=1, max=100),
        clock=clock,
    )
    with pytest.raises(ValueError, match=r"^$"):
        await retry.call(Flaky(*[ValueError() for _ in range(5)]))
    assert clock.slept == [1, 2, 4]


async def test_retry_waits_for_fake_time() -> None:
    """The next attempt starts only once the clock has advanced by the wait."""
    clock = FakeClock()
    fn = Flaky(ValueError(), value="ok")
    retry = Retry(on=ValueError, attempts=2, wait=tenacity.wait_fixed(3), clock=clock)
    task = await started(retry.call(fn))
    assert fn.calls == 1
    await advance(clock, 2.5)
    assert fn.calls == 1
    assert not task.done()
    clock.advance(0.5)
    assert await task == "ok"
    assert fn.calls == 2


async def test_stop_after_delay_ends_early() -> None:
    """tenacity.stop_after_delay stops retrying once fake time passes the delay."""
    clock = FakeClock(autojump=True)
    fn = Flaky(*[ValueError(i) for i in range(20)])
    retry = Retry(
        on=ValueError,
        attempts=10,
        wait=tenacity.wait_fixed(2),
        stop=tenacity.stop_after_delay(3),
        clock=clock,
    )
    with pytest.raises(ValueError, match=r"^2$"):
        await retry.call(fn)
    # attempts at t=0, 2 and 4: after the third, 4s >= 3s have passed
    assert fn.calls == 3
    assert clock.slept == [2, 2]


async def test_stop_never_adds_attempts() -> None:
    """A stop strategy that never fires still leaves ``attempts`` as the limit."""
    fn = Flaky(*[ValueError(i) for i in range(20)])
    retry = Retry(
        on=ValueError, attempts=4, stop=tenacity.stop_never, clock=FakeClock(autojump=True)
    )
    with pytest.raises(ValueError, match=r"^3$"):
        await retry.call(fn)
    assert fn.calls == 4


async def test_retry_scheduled_events() -> None:
    """Listeners receive one RetryScheduled per retry, with attempt, delay and error."""
    events: list[Event] = []
    errors = [ValueError(1), ValueError(2), ValueError(3)]
    retry = Retry(
        on=ValueError,
        attempts=3,
        wait=tenacity.wait_fixed(1.5),
        name="r1",
        clock=FakeClock(autojump=True),
        listeners=[policy_events(events)],
    )
    with pytest.raises(ValueError, match=r"^3$"):
        await retry.call(Flaky(*errors))
    assert events == [
        RetryScheduled(name="r1", attempt=1, delay=1.5, error=errors[0]),
        RetryScheduled(name="r1", attempt=2, delay=1.5, error=errors[1]),
    ]


async def test_retry_scheduled_event_for_result() -> None:
    """A rejected result is reported in RetryScheduled.result with no error."""
    events: list[Event] = []
    results = iter(["bad", "good"])

    async def fn() -> str:
        return next(results)

    retry = Retry(
        on=ValueError,
        attempts=3,
        retry_if_result=lambda r: r == "bad",
        wait=tenacity.wait_fixed(1),
        clock=FakeClock(autojump=True),
        listeners=[policy_events(events)],
    )
    assert await retry.call(fn) == "good"
    assert events == [RetryScheduled(name="retry", attempt=1, delay=1, error=None, result="bad")]


async def test_cancel_during_attempt_is_not_retried() -> None:
    """Cancelling the task while an attempt runs ends the call with CancelledError, no retry."""
    clock = FakeClock()
    calls = 0
    never = asyncio.Event()

    async def fn() -> None:
        nonlocal calls
        calls += 1
        await never.wait()

    retry = Retry(on=Exception, attempts=5, wait=tenacity.wait_fixed(1), clock=clock)
    task = await started(retry.call(fn))
    await cancelled(task)
    await advance(clock, 100)
    assert calls == 1
    assert clock.slept == []


async def test_cancel_during_backoff_is_not_retried() -> None:
    """Cancelling the task during the backoff sleep ends the call, with no further attempt."""
    clock = FakeClock()
    fn = Flaky(*[ValueError(i) for i in range(5)])
    retry = Retry(on=Exception, attempts=5, wait=tenacity.wait_fixed(5), clock=clock)
    task = await started(retry.call(fn))
    assert clock.slept == [5]
    await cancelled(task)
    await advance(clock, 100)
    assert fn.calls == 1
    assert clock.pending == 0


async def test_single_attempt_never_sleeps() -> None:
    """attempts=1 runs once and re-raises without sleeping."""
    clock = FakeClock(autojump=True)
    fn = Flaky(ValueError(), value="never")
    with pytest.raises(ValueError, match=r"^$"):
        await Retry(on=ValueError, attempts=1, clock=clock).call(fn)
    assert fn.calls == 1
    assert clock.slept == []


def test_bad_wait_and_stop_rejected() -> None:
    """Non-callable wait or stop strategies are rejected with TypeError."""
    with pytest.raises(TypeError):
        Retry(on=ValueError, wait=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Retry(on=ValueError, stop=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Retry(on=ValueError, retry_if_result=True)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    attempts=st.integers(min_value=1, max_value=8),
    failures=st.integers(min_value=0, max_value=12),
)
def test_attempts_never_exceeded(attempts: int, failures: int) -> None:
    """Over any number of failures, the call runs at most ``attempts`` times."""
    fn = Flaky(*[ValueError(i) for i in range(failures)], value="ok")
    retry = Retry(on=ValueError, attempts=attempts, clock=FakeClock(autojump=True))

    async def main() -> object:
        try:
            return await retry.call(fn)
        except ValueError as exc:
            return exc

    outcome = asyncio.run(main())
    assert fn.calls == min(attempts, failures + 1)
    if failures < attempts:
        assert outcome == "ok"
    else:
        assert isinstance(outcome, ValueError)
        assert outcome.args == (attempts - 1,)


async def test_default_wait_is_exponential_from_a_tenth() -> None:
    """The default wait starts near 0.1s, doubles, and is capped near 5s (plus small jitter)."""
    clock = FakeClock(autojump=True)
    retry = Retry(on=ValueError, attempts=9, clock=clock)
    with pytest.raises(ValueError, match=r"^8$"):
        await retry.call(Flaky(*[ValueError(i) for i in range(9)]))
    assert len(clock.slept) == 8
    for n, delay in enumerate(clock.slept):
        base = min(0.1 * 2**n, 5.0)
        assert base <= delay <= min(base + 0.1, 5.0) + 1e-9


# --- retry budget ---------------------------------------------------------------------------


class SpyStore(MemoryStore):
    """A MemoryStore that records every budget_add (delta) it is asked for."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.deltas: list[float] = []

    async def budget_add(self, key: str, *, delta: float, maximum: float, ttl: float) -> float:
        self.deltas.append(delta)
        return await super().budget_add(key, delta=delta, maximum=maximum, ttl=ttl)


class DownStore(MemoryStore):
    """A store whose budgets cannot be reached."""

    async def budget_add(self, key: str, *, delta: float, maximum: float, ttl: float) -> float:
        raise StoreUnavailableError("down")


def failing() -> Flaky:
    return Flaky(*[ValueError(i) for i in range(1000)])


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({}, TypeError),
        ({"name": ""}, ValueError),
        ({"name": 3}, TypeError),
        ({"name": "b", "max_tokens": 0}, ValueError),
        ({"name": "b", "max_tokens": math.nan}, ValueError),
        ({"name": "b", "token_ratio": -0.1}, ValueError),
        ({"name": "b", "token_ratio": True}, TypeError),
        ({"name": "b", "max_tokens": 1, "token_ratio": 2}, ValueError),
        ({"name": "b", "store": object()}, TypeError),
    ],
)
def test_budget_options_validated(kw: dict[str, Any], error: type[Exception]) -> None:
    """RetryBudget checks name, max_tokens, token_ratio and store at construction."""
    with pytest.raises(error):
        RetryBudget(**kw)


def test_retry_budget_must_be_a_budget() -> None:
    """Retry(budget=...) takes a RetryBudget or None."""
    with pytest.raises(TypeError, match="budget"):
        Retry(on=ValueError, budget=10)  # type: ignore[arg-type]


async def test_budget_drains_and_refuses_retries() -> None:
    """Failures drain the budget; at half of max_tokens retries stop, the last error raised."""
    events: list[Event] = []
    budget = RetryBudget(name="b", max_tokens=4, token_ratio=0.5)
    retry = Retry(
        on=ValueError,
        attempts=3,
        budget=budget,
        clock=FakeClock(autojump=True),
        listeners=[policy_events(events)],
    )
    fn = failing()
    with pytest.raises(ValueError, match=r"^1$"):
        await retry.call(fn)
    assert fn.calls == 2  # 4 -> 3 (retry), 3 -> 2 (refused: not above 2)
    assert budget.tokens == 2
    rejected = [e for e in events if isinstance(e, CallRejected)]
    assert len(rejected) == 1
    assert rejected[0].policy == "retry"
    assert str(rejected[0].error) == "1"
    with pytest.raises(ValueError, match=r"^2$"):
        await retry.call(fn)
    assert fn.calls == 3  # no retry at all now
    assert budget.tokens == 1


async def test_budget_recovers_with_successes() -> None:
    """Successful calls refill the budget by token_ratio until retries are allowed again."""
    budget = RetryBudget(name="b", max_tokens=4, token_ratio=0.5)
    retry = Retry(on=ValueError, attempts=2, budget=budget, clock=FakeClock(autojump=True))
    for _ in range(2):
        with pytest.raises(ValueError, match=r"^\d+$"):
            await retry.call(failing())  # 4 -> 3 (retry) -> 2, then 2 -> 1 (refused)
    assert budget.tokens == 1
    for _ in range(5):
        assert await retry.call(ok) == "ok"
    assert budget.tokens == 3.5
    fn = Flaky(ValueError("x"))
    assert await retry.call(fn) == "ok"  # 3.5 -> 2.5, above half: retried
    assert fn.calls == 2
    assert budget.tokens == 3


async def test_budget_shared_by_retry_objects() -> None:
    """Two Retry objects with one budget: failures through one refuse retries in the other."""
    budget = RetryBudget(name="b", max_tokens=2)
    clock = FakeClock(autojump=True)
    first = Retry(on=ValueError, attempts=3, budget=budget, clock=clock)
    second = Retry(on=ValueError, attempts=3, budget=budget, clock=clock)
    with pytest.raises(ValueError, match=r"^\d+$"):
        await first.call(failing())
    fn = failing()
    with pytest.raises(ValueError, match=r"^\d+$"):
        await second.call(fn)
    assert fn.calls == 1


async def test_budget_counts_rejected_results() -> None:
    """A result rejected by retry_if_result costs a token; a refused retry returns it."""
    budget = RetryBudget(name="b", max_tokens=2)
    retry = Retry(
        on=ValueError,
        attempts=5,
        retry_if_result=lambda r: r == "pending",
        budget=budget,
        clock=FakeClock(autojump=True),
    )

    async def pending() -> str:
        return "pending"

    assert await retry.call(pending) == "pending"
    assert budget.tokens == 1


async def test_budget_replicas_share_tokens_through_store(clock: FakeClock) -> None:
    """Budgets of one name on one store (two replicas) drain and refill one shared count."""
    store = MemoryStore(clock=clock)
    sleeper = FakeClock(autojump=True)
    a = Retry(on=ValueError, budget=RetryBudget(name="b", max_tokens=4, store=store), clock=sleeper)
    budget_b = RetryBudget(name="b", max_tokens=4, store=store)
    b = Retry(on=ValueError, budget=budget_b, clock=sleeper)
    with pytest.raises(ValueError, match=r"^\d+$"):
        await a.call(failing())  # the fleet: 4 -> 3 (retry) -> 2 (refused)
    fn = failing()
    with pytest.raises(ValueError, match=r"^\d+$"):
        await b.call(fn)
    assert fn.calls == 1  # replica b sees the fleet's count
    assert budget_b.tokens == 1


async def test_budget_success_path_does_no_store_call(clock: FakeClock) -> None:
    """Successes accumulate locally; the next retry decision pushes them in one call."""
    store = SpyStore(clock=clock)
    budget = RetryBudget(name="b", max_tokens=10, token_ratio=0.25, store=store)
    retry = Retry(on=ValueError, attempts=2, budget=budget, clock=FakeClock(autojump=True))
    for _ in range(4):
        assert await retry.call(ok) == "ok"
    assert store.deltas == []
    fn = Flaky(ValueError("x"))
    assert await retry.call(fn) == "ok"
    assert store.deltas == [pytest.approx(1.0 - 1.0)]  # 4 successes of 0.25, one failure
    assert fn.calls == 2


async def test_budget_store_down_decides_locally(clock: FakeClock) -> None:
    """When the store cannot answer, the local count decides and the call never fails for it."""
    budget = RetryBudget(name="b", max_tokens=4, store=DownStore(clock=clock))
    retry = Retry(on=ValueError, attempts=3, budget=budget, clock=FakeClock(autojump=True))
    fn = Flaky(ValueError("x"))
    assert await retry.call(fn) == "ok"
    fn = failing()
    with pytest.raises(ValueError, match=r"^\d+$"):
        await retry.call(fn)
    assert fn.calls == 2  # local count: 3.1 -> 2.1 (retry) -> 1.1 (refused)
    assert budget.tokens == pytest.approx(1.1)


async def test_redis_budget_shared_by_two_replicas(
    redis_pair: tuple[RedisStore, RedisStore], clock: FakeClock
) -> None:
    """Two RedisStores on one Redis share one budget; pending successes are pushed later."""
    one, two = redis_pair
    sleeper = FakeClock(autojump=True)
    budget_a = RetryBudget(name="api", max_tokens=4, token_ratio=0.5, store=one)
    budget_b = RetryBudget(name="api", max_tokens=4, token_ratio=0.5, store=two)
    a = Retry(on=ValueError, attempts=3, budget=budget_a, clock=sleeper)
    b = Retry(on=ValueError, attempts=3, budget=budget_b, clock=sleeper)
    with pytest.raises(ValueError, match=r"^\d+$"):
        await a.call(failing())  # fleet: 4 -> 3 -> 2
    fn = failing()
    with pytest.raises(ValueError, match=r"^\d+$"):
        await b.call(fn)
    assert fn.calls == 1  # fleet: 2 -> 1, refused
    for _ in range(6):
        assert await a.call(ok) == "ok"  # +3, pending on replica a
    fn = Flaky(ValueError("x"))
    assert await a.call(fn) == "ok"  # pushes +3 - 1: fleet 3 > 2, retried
    assert fn.calls == 2
    assert budget_a.tokens == pytest.approx(3.5)


@settings(max_examples=60, deadline=None)
@given(
    outcomes=st.lists(st.booleans(), max_size=60),
    max_tokens=st.integers(min_value=1, max_value=20),
    ratio=st.sampled_from([0.1, 0.25, 0.5, 1.0]),
)
def test_budget_tokens_stay_in_range(outcomes: list[bool], max_tokens: int, ratio: float) -> None:
    """Any mix of successes and failures keeps tokens in [0, max]; a retry needs > max / 2."""
    budget = RetryBudget(name="b", max_tokens=max_tokens, token_ratio=ratio)

    async def main() -> None:
        for success in outcomes:
            if success:
                budget.record_success()
            else:
                before = budget.tokens
                allowed = await budget.allow_retry()
                assert allowed == (max(0.0, before - 1) > max_tokens / 2)
            assert 0.0 <= budget.tokens <= max_tokens

    asyncio.run(main())


async def test_before_sleep_runs_between_the_decision_and_the_wait() -> None:
    """``before_sleep`` (sync or async) sees each discarded outcome before its wait starts."""
    clock = FakeClock(autojump=True)
    seen: list[tuple[str, float | None, int]] = []

    async def hook(state: tenacity.RetryCallState) -> None:
        assert state.outcome is not None
        seen.append((repr(state.outcome.exception()), state.upcoming_sleep, len(clock.slept)))

    calls = iter([ValueError("a"), ValueError("b")])

    async def flaky() -> str:
        error = next(calls, None)
        if error is not None:
            raise error
        return "ok"

    retry = Retry(
        on=ValueError, attempts=3, wait=tenacity.wait_fixed(2), before_sleep=hook, clock=clock
    )
    assert await retry.call(flaky) == "ok"
    assert seen == [("ValueError('a')", 2.0, 0), ("ValueError('b')", 2.0, 1)]
    sync_seen: list[int] = []
    retry = Retry(
        on=ValueError,
        attempts=2,
        wait=tenacity.wait_fixed(1),
        before_sleep=lambda state: sync_seen.append(state.attempt_number),
        clock=clock,
    )
    with pytest.raises(ValueError, match="always"):
        await retry.call(_raise_value_error)
    assert sync_seen == [1]


async def _raise_value_error() -> None:
    raise ValueError("always")


async def test_a_raising_before_sleep_ends_the_call() -> None:
    """An error in ``before_sleep`` ends the call with that error; no further attempt."""
    clock = FakeClock(autojump=True)
    attempts: list[int] = []

    def hook(state: tenacity.RetryCallState) -> None:
        raise RuntimeError("hook")

    async def failing() -> None:
        attempts.append(1)
        raise ValueError("x")

    retry = Retry(on=ValueError, attempts=3, before_sleep=hook, clock=clock)
    with pytest.raises(RuntimeError, match="hook"):
        await retry.call(failing)
    assert attempts == [1]
    with pytest.raises(TypeError, match="before_sleep"):
        Retry(on=ValueError, before_sleep=3)  # type: ignore[arg-type]


async def test_hooks_see_the_users_function_in_every_form(clock: FakeClock) -> None:
    """``RetryCallState.fn`` is the protected function itself, whether the retry decorates it,
    runs it through ``call`` or runs inside a ``Pipeline``'s ``call`` (as tenacity's
    ``before_sleep_log`` prints it)."""
    seen: list[object] = []
    failed: set[int] = set()

    async def flaky(x: int) -> int:
        if x not in failed:  # each call fails once
            failed.add(x)
            raise ValueError("once")
        return x

    def before_sleep(state: RetryCallState) -> None:
        seen.append((state.fn, state.args))

    retry = Retry(on=ValueError, attempts=2, wait=tenacity.wait_none(), before_sleep=before_sleep)
    assert await retry(flaky)(1) == 1
    assert await retry.call(flaky, 2) == 2
    assert await Pipeline(retry, Timeout(5, clock=clock)).call(flaky, 3) == 3
    assert seen == [(flaky, (1,)), (flaky, (2,)), (flaky, (3,))]
