"""The policy base and Pipeline: decorator plumbing, call, composition and the input checks."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import tenacity

from resilience.events import CallFinished, Event, FallbackUsed, RetryScheduled
from resilience.policies.base import (
    BasePolicy,
    CallerTask,
    Policy,
    _task_lookup,
    check_int,
    check_name,
    check_predicate,
    check_ratio,
    check_seconds,
    exception_filter,
    require_async,
)
from resilience.policies.bulkhead import Bulkhead
from resilience.policies.fallback import Fallback
from resilience.policies.pipeline import Pipeline
from resilience.policies.ratelimit import RateLimiter
from resilience.policies.retry import Retry
from resilience.policies.timeout import Timeout
from resilience.testing import FakeClock

from ..helpers import in_three_loops, ok, settle


def fast_retry(attempts: int = 3, **kwargs: Any) -> Retry:
    return Retry(on=ValueError, attempts=attempts, clock=FakeClock(autojump=True), **kwargs)


class Recorder:
    """A policy of a user's own, on the ``Policy`` protocol alone (``kind``, ``name``,
    ``wrap``): it logs entry and exit."""

    kind = "recorder"

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def wrap(self, fn: Callable[..., Awaitable[Any]], /) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.log.append(f"{self.name} in")
            try:
                return await fn(*args, **kwargs)
            finally:
                self.log.append(f"{self.name} out")

        return wrapped


# --- decorating -----------------------------------------------------------------------------


def sync_function() -> int:
    return 1


async def async_generator() -> AsyncIterator[int]:
    yield 1


@pytest.mark.parametrize("fn", [sync_function, lambda: None, async_generator, 42])
def test_decorating_non_coroutine_function_is_type_error(fn: Any) -> None:
    """Decorating a sync function, lambda, async generator or non-callable fails at once."""
    with pytest.raises(TypeError, match="coroutine functions"):
        fast_retry()(fn)


def test_async_generator_named_in_error() -> None:
    """The error for an async generator function says so."""
    with pytest.raises(TypeError, match="async generator"):
        Fallback(on=ValueError, value=0)(async_generator)  # type: ignore[arg-type]


async def test_decorator_keeps_metadata() -> None:
    """The decorated function keeps __name__, __doc__, __wrapped__ and is a coroutine function."""

    async def fetch(x: int) -> int:
        """Fetch x."""
        return x * 2

    for policy in (fast_retry(), Timeout(5), Bulkhead(1), Fallback(on=ValueError, value=0)):
        decorated = policy(fetch)
        assert decorated.__name__ == "fetch"
        assert decorated.__doc__ == "Fetch x."
        assert decorated.__wrapped__ is fetch  # type: ignore[attr-defined]
        assert inspect.iscoroutinefunction(decorated)
        assert inspect.signature(decorated) == inspect.signature(fetch)
        assert await decorated(21) == 42


async def test_decorator_accepts_async_callable_instance() -> None:
    """An instance with an async __call__ may be decorated."""

    class Service:
        async def __call__(self, x: int) -> int:
            return x + 1

    assert await fast_retry()(Service())(1) == 2


async def test_decorating_a_method() -> None:
    """A decorated method receives self and its arguments."""
    retry = fast_retry()

    class Client:
        def __init__(self) -> None:
            self.failures = 1

        @retry
        async def get(self, key: str, *, default: int = 0) -> tuple[Client, str, int]:
            if self.failures:
                self.failures -= 1
                raise ValueError("flaky")
            return self, key, default

    client = Client()
    assert await client.get("k", default=5) == (client, "k", 5)
    assert client.failures == 0


async def test_call_passes_args_and_kwargs() -> None:
    """``await policy.call(fn, *args, **kwargs)`` calls fn with exactly those arguments."""

    async def fn(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return args, kwargs

    for policy in (fast_retry(), Timeout(5), Bulkhead(1), RateLimiter(5)):
        assert await policy.call(fn, 1, "two", three=3) == ((1, "two"), {"three": 3})


def _every_policy() -> list[BasePolicy]:
    """A policy of each kind and mode whose protected function forwards the arguments."""
    from resilience import AdaptiveLimit, CircuitBreaker

    return [
        fast_retry(),
        fast_retry(retry_if_result=lambda result: False),
        fast_retry(stop=tenacity.stop_after_delay(10)),
        Fallback(on=ValueError, value=0),
        Fallback(on=ValueError, value=0, result_if=lambda result: False),
        Bulkhead(2),
        Bulkhead(limit=AdaptiveLimit()),
        CircuitBreaker("plain"),
        CircuitBreaker("checked", failure_if=lambda result: False),
        Timeout(5),
        Pipeline(fast_retry(), CircuitBreaker("in-pipeline"), Timeout(5), Bulkhead(2)),
        Timeout(5, listeners=[lambda event: None]),  # the CallFinished report around it
    ]


@pytest.mark.parametrize("policy", _every_policy(), ids=repr)
async def test_arguments_reach_the_function_with_and_without_keywords(
    policy: BasePolicy,
) -> None:
    """Every policy, decorating or through ``call``, passes exactly the arguments it is
    given: none, positional ones, keywords, both (a protected function calls ``fn(*args)``
    when there are no keywords)."""

    async def fn(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return args, kwargs

    decorated = policy(fn)
    for args, kwargs in [((), {}), ((1, "two"), {}), ((), {"three": 3}), ((1,), {"two": 2})]:
        assert await decorated(*args, **kwargs) == (args, kwargs)
        assert await policy.call(fn, *args, **kwargs) == (args, kwargs)


async def test_call_cache_survives_many_functions() -> None:
    """``call`` with more distinct functions than its cache holds still runs each correctly."""
    retry = fast_retry()

    def make(i: int) -> Callable[[], Awaitable[int]]:
        async def fn() -> int:
            return i

        return fn

    fns = [make(i) for i in range(300)]
    assert [await retry.call(fn) for fn in fns] == list(range(300))


async def test_add_listener_after_calls() -> None:
    """A listener added after earlier calls receives events from later calls."""
    retry = fast_retry(attempts=2, wait=tenacity.wait_fixed(1))
    failures = [ValueError(1), ValueError(2)]

    async def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    with pytest.raises(ValueError, match=r"^2$"):
        await retry.call(flaky)
    events: list[Event] = []
    retry.add_listener(events.append)
    failures.append(ValueError(3))
    assert await retry.call(flaky) == "ok"
    assert [type(e) for e in events] == [RetryScheduled, CallFinished]


def test_bad_listener_rejected() -> None:
    """Listeners must be callables in an iterable."""
    with pytest.raises(TypeError):
        Timeout(1, listeners=[42])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        Timeout(1, listeners=print)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Timeout(1).add_listener("nope")  # type: ignore[arg-type]


def test_bad_clock_and_name_rejected() -> None:
    """A clock without the Clock methods, or a bad name, is rejected."""
    with pytest.raises(TypeError):
        Timeout(1, clock=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        Timeout(1, name="")
    with pytest.raises(TypeError):
        Timeout(1, name=3)  # type: ignore[arg-type]


async def test_raising_listener_never_breaks_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """A listener that raises is logged by the 'resilience' logger; the call still succeeds."""
    received: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    fallback = Fallback(on=ValueError, value="fb", listeners=[broken, received.append])

    async def fail() -> None:
        raise ValueError("x")

    with caplog.at_level(logging.ERROR, logger="resilience"):
        assert await fallback.call(fail) == "fb"
    assert [type(e) for e in received] == [FallbackUsed, CallFinished]  # later ones still hear
    records = [r for r in caplog.records if r.name == "resilience"]
    assert len(records) == 2  # one per event the broken listener failed on
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


# --- Pipeline -------------------------------------------------------------------------------


async def test_pipeline_order_outermost_first() -> None:
    """Pipeline(a, b, c) runs a(b(c(fn))): entries in order, exits in reverse."""
    log: list[str] = []

    async def fn() -> str:
        log.append("fn")
        return "done"

    pipeline = Pipeline(Recorder("a", log), Recorder("b", log), Recorder("c", log))
    assert await pipeline.call(fn) == "done"
    assert log == ["a in", "b in", "c in", "fn", "c out", "b out", "a out"]


async def test_fallback_outside_retry_waits_for_all_attempts() -> None:
    """Fallback outside Retry answers only after every attempt failed; inside, after one."""
    calls = 0

    async def always_fails() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("down")

    outer_fallback = Pipeline(Fallback(on=ValueError, value="fb"), fast_retry(attempts=3))
    assert await outer_fallback.call(always_fails) == "fb"
    assert calls == 3

    calls = 0
    inner_fallback = Pipeline(fast_retry(attempts=3), Fallback(on=ValueError, value="fb"))
    assert await inner_fallback.call(always_fails) == "fb"
    assert calls == 1


async def test_pipeline_as_decorator() -> None:
    """A Pipeline decorates like any policy and keeps metadata."""
    log: list[str] = []

    @Pipeline(Recorder("x", log), fast_retry())
    async def job(n: int) -> int:
        """Job."""
        return n

    assert job.__name__ == "job"
    assert job.__doc__ == "Job."
    assert await job(3) == 3
    assert log == ["x in", "x out"]


def test_nested_pipelines_are_flattened() -> None:
    """Pipelines inside a Pipeline are flattened into one sequence of policies."""
    log: list[str] = []
    a, b, c, d = (Recorder(n, log) for n in "abcd")
    pipeline = Pipeline(Pipeline(a, b), c, Pipeline(Pipeline(d)))
    assert pipeline.policies == (a, b, c, d)
    assert isinstance(pipeline, Policy)


async def test_nested_pipeline_runs_in_flattened_order() -> None:
    """A nested Pipeline runs its policies in the same order as the flat equivalent."""
    log: list[str] = []
    a, b, c = (Recorder(n, log) for n in "abc")

    async def fn() -> None:
        log.append("fn")

    await Pipeline(a, Pipeline(b, c)).call(fn)
    assert log == ["a in", "b in", "c in", "fn", "c out", "b out", "a out"]


@pytest.mark.parametrize("bad", [42, "retry", Retry, None])
def test_pipeline_rejects_non_policies(bad: Any) -> None:
    """Pipeline refuses anything that is not a policy object (a policy class included)."""
    with pytest.raises(TypeError):
        Pipeline(fast_retry(), bad)


def test_empty_pipeline_rejected() -> None:
    """Pipeline() with no policies is a ValueError."""
    with pytest.raises(ValueError, match="at least one"):
        Pipeline()


async def test_call_finished_events_report_outcome_and_duration() -> None:
    """Policies (and pipelines) with listeners report each call's outcome and duration."""
    from resilience import CircuitBreaker, ResilienceTimeoutError
    from resilience.testing import FakeClock

    clock = FakeClock(autojump=True)
    events: list[object] = []
    pipeline = Pipeline(
        CircuitBreaker("b", clock=clock, listeners=[events.append]),
        Timeout(1, clock=clock),
        name="p",
        clock=clock,
        listeners=[events.append],
    )

    async def slow(seconds: float) -> str:
        await clock.sleep(seconds)
        if seconds > 2:
            raise KeyError("x")
        return "ok"

    assert await pipeline.call(slow, 0.25) == "ok"
    finished = [e for e in events if isinstance(e, CallFinished)]
    assert [(e.policy, e.name, e.outcome) for e in finished] == [
        ("circuit_breaker", "b", "success"),
        ("pipeline", "p", "success"),
    ]
    assert finished[-1].duration == pytest.approx(0.25)
    events.clear()
    clock.autojump = False
    attempt = asyncio.ensure_future(pipeline.call(clock.sleep, 5))
    await asyncio.sleep(0)
    clock.advance(1)
    with pytest.raises(ResilienceTimeoutError):
        await attempt
    outcomes = [e.outcome for e in events if isinstance(e, CallFinished)]
    assert outcomes == ["timeout", "timeout"]  # the breaker saw it, and so did the pipeline


def test_attempt_timeout_longer_than_overall_rejected() -> None:
    """An attempt Timeout (inside Retry) longer than the overall one (outside) is a ValueError."""
    with pytest.raises(ValueError, match="attempt timeout"):
        Pipeline(Timeout(1), fast_retry(), Timeout(5))
    with pytest.raises(ValueError, match="attempt timeout"):  # also through a nested pipeline
        Pipeline(Timeout(1), Pipeline(fast_retry(), Bulkhead(1), Timeout(5)))


def test_attempt_timeout_shorter_than_overall_accepted() -> None:
    """The reverse order, and equal limits, are accepted."""
    for inner in (0.5, 5):
        pipeline = Pipeline(Timeout(5), fast_retry(), Timeout(inner))
        assert [type(p) for p in pipeline.policies] == [Timeout, Retry, Timeout]
    Pipeline(Timeout(1), Timeout(10))  # no Retry: no attempt timeout to compare
    Pipeline(fast_retry(), Timeout(10))


async def test_pipeline_attempt_timeout_per_attempt() -> None:
    """Timeout inside Retry limits each attempt: a slow attempt times out and is retried."""
    clock = FakeClock()
    begin = clock.monotonic()
    started: list[float] = []

    async def slow_then_fast() -> str:
        started.append(clock.monotonic())
        if len(started) == 1:
            await clock.sleep(10)
        return "fast"

    retry = Retry(on=TimeoutError, attempts=2, wait=tenacity.wait_fixed(0), clock=clock)
    pipeline = Pipeline(Timeout(5, clock=clock), retry, Timeout(1, clock=clock))
    task = asyncio.create_task(pipeline.call(slow_then_fast))
    await settle(5)
    clock.advance(1)
    assert await task == "fast"
    assert [t - begin for t in started] == [0, 1]


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kwargs", "error"),
    [
        (0, {}, ValueError),
        (-1, {}, ValueError),
        (math.nan, {}, ValueError),
        (math.inf, {}, ValueError),
        ("1", {}, TypeError),
        (True, {}, TypeError),
        (None, {}, TypeError),
        (-0.1, {"zero": True}, ValueError),
    ],
)
def test_check_seconds_rejects(value: Any, kwargs: dict[str, Any], error: type[Exception]) -> None:
    """check_seconds refuses non-numbers, bools, non-finite and non-positive values."""
    with pytest.raises(error):
        check_seconds("s", value, **kwargs)


def test_check_seconds_accepts() -> None:
    """check_seconds returns a float; zero and None only when allowed."""
    assert check_seconds("s", 2) == 2.0
    assert isinstance(check_seconds("s", 2), float)
    assert check_seconds("s", 0, zero=True) == 0.0
    assert check_seconds("s", None, none=True) is None


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (1.0, TypeError), (False, TypeError), ("2", TypeError)]
)
def test_check_int_rejects(value: Any, error: type[Exception]) -> None:
    """check_int refuses floats, bools, strings and values under the minimum."""
    with pytest.raises(error):
        check_int("n", value)


def test_check_int_minimum() -> None:
    """check_int honours ``minimum``."""
    assert check_int("n", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=">= 5"):
        check_int("n", 4, minimum=5)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (1.5, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
        ("x", TypeError),
    ],
)
def test_check_ratio_rejects(value: Any, error: type[Exception]) -> None:
    """check_ratio accepts only numbers in (0, 1]."""
    with pytest.raises(error):
        check_ratio("r", value)


def test_check_ratio_accepts() -> None:
    """check_ratio returns in-range values as floats."""
    assert check_ratio("r", 1) == 1.0
    assert check_ratio("r", 0.25) == 0.25


def test_exception_filter_forms() -> None:
    """Types, tuples and predicates all become predicates with the expected answers."""
    single = exception_filter("on", ValueError)
    assert single(ValueError())
    assert single(UnicodeError())
    assert not single(KeyError())
    pair = exception_filter("on", (KeyError, TypeError))
    assert pair(KeyError())
    assert pair(TypeError())
    assert not pair(ValueError())
    never = exception_filter("on", (), allow_empty=True)
    assert not never(Exception())
    predicate = exception_filter("on", lambda e: e.args == (1,))
    assert predicate(ValueError(1))
    assert not predicate(ValueError(2))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ((), ValueError),
        (asyncio.CancelledError, TypeError),
        (KeyboardInterrupt, TypeError),
        ((ValueError, SystemExit), TypeError),
        ((ValueError, "x"), TypeError),
        (int, TypeError),
        (3, TypeError),
    ],
)
def test_exception_filter_rejects(value: Any, error: type[Exception]) -> None:
    """Empty tuples, non-Exception types and non-callables are refused."""
    with pytest.raises(error):
        exception_filter("on", value)


def test_check_name_and_predicate() -> None:
    """check_name wants a non-empty str; check_predicate a callable or None."""
    assert check_name("n") == "n"
    with pytest.raises(ValueError, match="empty"):
        check_name("")
    with pytest.raises(TypeError):
        check_name(None)
    assert check_predicate("p", None) is None
    assert check_predicate("p", len) is len
    with pytest.raises(TypeError):
        check_predicate("p", 1)


def test_require_async_accepts_coroutine_functions() -> None:
    """require_async accepts async def functions and async callables, refuses others."""

    async def coro() -> None:
        return None

    class AsyncCallable:
        async def __call__(self) -> None:
            return None

    require_async(coro, "p")
    require_async(AsyncCallable(), "p")
    with pytest.raises(TypeError):
        require_async(sync_function, "p")


def test_base_policy_wrap_is_abstract() -> None:
    """A BasePolicy without _wrap cannot decorate."""

    async def fn() -> None:
        return None

    with pytest.raises(NotImplementedError):
        BasePolicy("p", None, ())(fn)


async def test_call_form_runs_under_the_policy_and_sees_new_listeners() -> None:
    """``policy.call(fn, ...)`` passes arguments, and a listener added later gets its events."""
    from resilience import Bulkhead, CallFinished

    async def add(a: int, *, b: int) -> int:
        return a + b

    bulkhead = Bulkhead(1)
    assert await bulkhead.call(add, 1, b=2) == 3
    got: list[object] = []
    bulkhead.add_listener(got.append)
    assert await bulkhead.call(add, 2, b=2) == 4
    assert [type(e) for e in got] == [CallFinished]
    with pytest.raises(TypeError):
        await bulkhead.call(add, 1)  # the function's own TypeError, raised under the policy
    assert bulkhead.in_flight == 0


async def test_the_call_form_is_made_once_however_it_is_captured() -> None:
    """``functools.partial(policy.call, fn)`` and a bound ``policy.call``, taken before the first
    call, run one protected function made once, not one made per call."""
    made = 0

    class Counting(Bulkhead):
        def _wrap(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            nonlocal made
            made += 1
            return super()._wrap(fn)

    async def ok(x: int) -> int:
        return x

    policy = Counting(2)
    captured = functools.partial(policy.call, ok)
    bound = policy.call
    assert [await captured(1), await bound(ok, 2), await policy.call(ok, 3)] == [1, 2, 3]
    assert made == 1


# --- the caller's task -----------------------------------------------------------------------


def test_caller_task_is_the_current_task_on_every_loop_and_thread() -> None:
    """``CallerTask.find()`` is ``asyncio.current_task()`` in every task: on a first loop, a
    loop in another thread, a later loop in this thread; ``None`` in a loop's callback, and
    ``RuntimeError`` with no running loop."""
    tasks = CallerTask()
    seen: list[bool] = []

    async def child() -> None:
        await asyncio.sleep(0)
        seen.append(tasks.find() is asyncio.current_task())

    async def probe() -> None:
        seen.append(tasks.find() is asyncio.current_task())
        await asyncio.gather(child(), child())
        in_callback: list[object] = []
        asyncio.get_running_loop().call_soon(lambda: in_callback.append(tasks.find()))
        await settle()
        seen.append(in_callback == [None])

    in_three_loops(probe)
    assert seen == [True] * 12
    with pytest.raises(RuntimeError):
        tasks.find()


def test_the_task_of_a_loop_is_asyncio_current_task() -> None:
    """The lookup ``CallerTask`` and ``Timeout`` use answers as ``asyncio.current_task(loop)``
    (the running task, ``None`` for a loop running none), without the Python frame of a
    Python ``current_task`` (CPython 3.11); any other ``current_task`` is used as it is."""
    lookup = _task_lookup(asyncio.current_task)
    if isinstance(asyncio.current_task, types.FunctionType):
        assert lookup is not asyncio.current_task  # the frame is skipped
    idle = asyncio.new_event_loop()

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        assert lookup(loop) is asyncio.current_task(loop) is not None
        assert lookup(idle) is asyncio.current_task(idle) is None

    try:
        asyncio.run(probe())
    finally:
        idle.close()

    def elsewhere(loop: Any = None) -> None:
        return None

    assert _task_lookup(elsewhere) is elsewhere
    assert _task_lookup(len) is len


async def test_a_listener_added_before_the_call_form_is_made() -> None:
    """``add_listener`` on a policy whose call form was never made, then ``call``: the call
    form is made with the listener; ``call`` stays one object until the next listener."""
    bulkhead = Bulkhead(1)
    got: list[object] = []
    bulkhead.add_listener(got.append)
    call = bulkhead.call
    assert bulkhead.call is call
    assert await call(ok) == "ok"
    assert [type(e) for e in got] == [CallFinished]
    bulkhead.add_listener(got.append)
    assert bulkhead.call is not call
