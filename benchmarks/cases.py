"""The benchmark cases: resilience, its peers and stdlib baselines, feature by feature.

Every builder returns the protected callable (or, for rejection cases, a loop that catches
the rejection). Peers are imported inside their builders, so a missing or broken peer turns
into a skipped row with a note instead of a crash. Each success-path callable is checked to
return ``ok()``'s value before it is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from harness import Case, Loop, Protected, ok_loop, reject_loop

__all__ = [
    "CALLER_TASK",
    "CLOCK",
    "CURRENT_TASK",
    "DEADLINE",
    "FORWARDING",
    "FORWARDING_5",
    "GROUPS",
    "REJECT_FRAME",
    "SPECS",
    "TASK_OF",
    "TIMER",
    "Spec",
    "build_cases",
    "ok",
]

BIG = 10**9  # a rate no benchmark reaches
TRIP = 5  # failures used to trip peers' breakers
HOLD = 3600  # seconds a tripped breaker stays open: longer than any run


async def ok() -> int:
    """The protected function."""
    return 1


async def fail() -> int:
    """A failing call, used to trip breakers."""
    raise ValueError("boom")


def protect(fn: Any) -> Protected:
    """A peer's decorated function, typed as what it is: an async callable."""
    return cast(Protected, fn)


class Skip(Exception):
    """The peer cannot do this case."""


Builder = Callable[[], Awaitable[Loop]]


@dataclass(frozen=True)
class Spec:
    """A case to build: feature group, row label, library, builder."""

    group: str
    label: str
    lib: str
    build: Builder
    primary: bool = False


GROUPS: dict[str, str] = {
    "bare": "bare `await ok()`",
    "breaker": "1. circuit breaker, closed",
    "retry": "2. retry, first attempt succeeds",
    "timeout": "3. timeout, call finishes in time",
    "bulkhead": "4a. bulkhead, slot free",
    "fallback": "4b. fallback, call succeeds",
    "ratelimit": "4c. rate limiter, token available",
    "rejection": "5. open breaker: reject, raise and catch",
    "stack": "6. full stack (fallback, retry, breaker, timeout, bulkhead)",
    "hedge": "7. hedge, first attempt answers before the delay",
    "parts": "8. parts: what the rows above are made of",
}


async def checked(fn: Protected) -> Loop:
    """A success-path loop over ``fn``, after checking it really awaits ``ok``."""
    result = await fn()
    if result != 1:
        if asyncio.iscoroutine(result):
            result.close()
        raise Skip(f"call returned {result!r}, not ok()'s 1 (no async support)")
    return ok_loop(fn)


async def rejecting(fn: Protected) -> Loop:
    """A rejection loop over the tripped ``fn``, catching whatever it raises when open."""
    try:
        result = await fn()
    except ValueError as exc:
        raise Skip("still calls through after tripping") from exc
    except Exception as exc:
        return reject_loop(fn, type(exc))
    raise Skip(f"not open: returned {result!r}")


async def trip(fn: Callable[[], Awaitable[Any]], times: int = TRIP) -> None:
    """Fail ``times`` calls through ``fn`` (which calls ``fail``)."""
    for _ in range(times):
        try:
            await fn()
        except Exception:
            pass


# --- bare ------------------------------------------------------------------------------------


async def bare() -> Loop:
    return await checked(ok)


# --- 1. breaker ------------------------------------------------------------------------------


async def ours_breaker() -> Loop:
    from resilience import CircuitBreaker

    return await checked(CircuitBreaker("b")(ok))


async def ours_breaker_call() -> Loop:
    from resilience import CircuitBreaker

    call = CircuitBreaker("b").call

    async def loop(n: int) -> None:
        for _ in range(n):
            await call(ok)

    if await call(ok) != 1:
        raise Skip("call() did not return ok()'s value")
    return loop


async def circuitbreaker_breaker(target: Callable[[], Awaitable[int]] = ok) -> Protected:
    from circuitbreaker import CircuitBreaker

    return protect(CircuitBreaker(failure_threshold=TRIP, recovery_timeout=HOLD)(target))


async def aiobreaker_breaker(target: Callable[[], Awaitable[int]] = ok) -> Protected:
    from aiobreaker import CircuitBreaker

    breaker = CircuitBreaker(fail_max=TRIP, timeout_duration=timedelta(seconds=HOLD))
    return protect(breaker(target))


async def purgatory_breaker(target: Callable[[], Awaitable[int]] = ok) -> Protected:
    from purgatory import AsyncCircuitBreakerFactory, AsyncInMemoryUnitOfWork

    factory = AsyncCircuitBreakerFactory(
        default_threshold=TRIP, default_ttl=HOLD, uow=AsyncInMemoryUnitOfWork()
    )
    await factory.initialize()
    return protect(factory("b")(target))


async def pybreaker_breaker(target: Callable[[], Awaitable[int]] = ok) -> Protected:
    import pybreaker

    if not getattr(pybreaker, "HAS_TORNADO_SUPPORT", False):
        raise Skip("async only through Tornado (not installed); its decorator is sync-only")
    breaker = pybreaker.CircuitBreaker(fail_max=TRIP, reset_timeout=HOLD)
    return protect(breaker(target, __pybreaker_call_async=True))


async def hyx_breaker(target: Callable[[], Awaitable[int]] = ok) -> Protected:
    from hyx.circuitbreaker import consecutive_breaker

    breaker = consecutive_breaker(
        exceptions=Exception, failure_threshold=TRIP, recovery_time_secs=HOLD
    )
    fn: Any = target  # hyx types its decorators for Callable[..., Any]
    return protect(breaker(fn))


async def nopanic_breaker(target: Callable[[], Awaitable[int]] = ok) -> Protected:
    from nopanic import circuit_breaker

    return protect(circuit_breaker(min_calls=TRIP, reset_timeout=HOLD)(target))


async def pyresilience_breaker(target: Callable[[], Awaitable[int]] = ok) -> Protected:
    from pyresilience import CircuitBreakerConfig, resilient

    config = CircuitBreakerConfig(failure_threshold=TRIP, recovery_timeout=HOLD)
    return protect(resilient(circuit_breaker=config)(target))


PeerBreaker = Callable[[Callable[[], Awaitable[int]]], Awaitable[Protected]]

PEER_BREAKERS: dict[str, PeerBreaker] = {
    "circuitbreaker": circuitbreaker_breaker,
    "aiobreaker": aiobreaker_breaker,
    "purgatory": purgatory_breaker,
    "pybreaker": pybreaker_breaker,
    "hyx": hyx_breaker,
    "nopanic": nopanic_breaker,
    "pyresilience": pyresilience_breaker,
}


def closed(make: PeerBreaker) -> Builder:
    async def build() -> Loop:
        return await checked(await make(ok))

    return build


# --- 5. open-state rejection -----------------------------------------------------------------


async def ours_forced_open() -> Loop:
    from resilience import CircuitBreaker

    breaker = CircuitBreaker("o")
    fn = breaker(ok)
    await breaker.force_open()
    return await rejecting(fn)


async def ours_tripped() -> Loop:
    from resilience import CircuitBreaker, CountWindow

    breaker = CircuitBreaker("t", window=CountWindow(TRIP), open_for=HOLD)
    fn = breaker(fail)
    await trip(fn)
    return await rejecting(fn)


def tripped(make: PeerBreaker) -> Builder:
    """A peer's breaker around ``fail``, failed until it opens."""

    async def build() -> Loop:
        fn = await make(fail)
        await trip(fn)
        return await rejecting(fn)

    return build


# --- 2. retry --------------------------------------------------------------------------------


async def ours_retry() -> Loop:
    from resilience import Retry

    return await checked(Retry(on=ValueError, attempts=3)(ok))


async def tenacity_decorator() -> Loop:
    from tenacity import retry, retry_if_exception_type, stop_after_attempt

    deco = retry(stop=stop_after_attempt(3), retry=retry_if_exception_type(ValueError))
    return await checked(deco(ok))


async def tenacity_async_retrying() -> Loop:
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

    stop, on = stop_after_attempt(3), retry_if_exception_type(ValueError)

    async def fn() -> int:
        async for attempt in AsyncRetrying(stop=stop, retry=on):
            with attempt:
                return await ok()
        raise AssertionError("unreachable")

    return await checked(fn)


async def nopanic_retry() -> Loop:
    from nopanic import retry

    return await checked(retry(attempts=3, on=ValueError)(ok))


async def hyx_retry() -> Loop:
    from hyx.retry import retry

    return await checked(retry(on=ValueError, attempts=3)(ok))


async def pyresilience_retry() -> Loop:
    from pyresilience import RetryConfig, resilient

    config = RetryConfig(max_attempts=3, retry_on=(ValueError,))
    return await checked(resilient(retry=config)(ok))


# --- 3. timeout ------------------------------------------------------------------------------


async def ours_timeout() -> Loop:
    from resilience import Timeout

    return await checked(Timeout(10)(ok))


async def asyncio_timeout() -> Loop:
    async def fn() -> int:
        async with asyncio.timeout(10):
            return await ok()

    return await checked(fn)


async def asyncio_wait_for() -> Loop:
    async def fn() -> int:
        return await asyncio.wait_for(ok(), 10)

    return await checked(fn)


async def hyx_timeout() -> Loop:
    from hyx.timeout import timeout

    return await checked(timeout(10)(ok))


async def nopanic_timeout() -> Loop:
    from nopanic import timeout

    return await checked(timeout(10.0)(ok))


async def pyresilience_timeout() -> Loop:
    from pyresilience import TimeoutConfig, resilient

    return await checked(resilient(timeout=TimeoutConfig(seconds=10))(ok))


# --- 4a. bulkhead ----------------------------------------------------------------------------


async def ours_bulkhead() -> Loop:
    from resilience import Bulkhead

    return await checked(Bulkhead(100)(ok))


async def stdlib_semaphore() -> Loop:
    sem = asyncio.Semaphore(100)

    async def fn() -> int:
        async with sem:
            return await ok()

    return await checked(fn)


async def nopanic_bulkhead() -> Loop:
    from nopanic import bulkhead

    return await checked(bulkhead(100)(ok))


async def hyx_bulkhead() -> Loop:
    from hyx.bulkhead import bulkhead

    return await checked(bulkhead(max_concurrency=100, max_capacity=100)(ok))


async def pyresilience_bulkhead() -> Loop:
    from pyresilience import BulkheadConfig, resilient

    return await checked(resilient(bulkhead=BulkheadConfig(max_concurrent=100))(ok))


# --- 4b. fallback ----------------------------------------------------------------------------


async def ours_fallback() -> Loop:
    from resilience import Fallback

    return await checked(Fallback(on=Exception, value=0)(ok))


async def stdlib_try_except() -> Loop:
    async def fn() -> int:
        try:
            return await ok()
        except Exception:
            return 0

    return await checked(fn)


async def nopanic_fallback() -> Loop:
    from nopanic import fallback

    return await checked(fallback(0, on=Exception)(ok))


async def hyx_handler(*args: Any, **kwargs: Any) -> int:
    """hyx's fallback handler: called with the error (or result) and the call's arguments."""
    return 0


async def hyx_fallback() -> Loop:
    from hyx.fallback import fallback

    return await checked(fallback(hyx_handler, on=Exception)(ok))


async def pyresilience_fallback() -> Loop:
    from pyresilience import FallbackConfig, resilient

    return await checked(resilient(fallback=FallbackConfig(handler=0))(ok))


# --- 4c. rate limiter ------------------------------------------------------------------------


async def ours_ratelimit() -> Loop:
    from resilience import RateLimiter

    return await checked(RateLimiter(BIG)(ok))


async def nopanic_ratelimit() -> Loop:
    from nopanic import rate_limit

    return await checked(rate_limit(BIG)(ok))


async def hyx_ratelimit() -> Loop:
    from hyx.ratelimit import tokenbucket

    return await checked(tokenbucket(max_executions=BIG, per_time_secs=1)(ok))


async def pyresilience_ratelimit() -> Loop:
    from pyresilience import RateLimiterConfig, resilient

    config = RateLimiterConfig(max_calls=BIG, period=1.0)
    return await checked(resilient(rate_limiter=config)(ok))


# --- 6. full stack ---------------------------------------------------------------------------


async def ours_stack() -> Loop:
    from resilience import Bulkhead, CircuitBreaker, Fallback, Pipeline, Retry, Timeout

    pipeline = Pipeline(
        Fallback(on=Exception, value=0),
        Retry(on=ValueError),
        CircuitBreaker("s"),
        Timeout(10),
        Bulkhead(100),
    )
    return await checked(pipeline(ok))


async def stdlib_stack() -> Loop:
    """try/except fallback, a retry loop, asyncio.timeout and a Semaphore (no breaker)."""
    sem = asyncio.Semaphore(100)

    async def fn() -> int:
        try:
            for attempt in range(3):
                try:
                    async with asyncio.timeout(10), sem:
                        return await ok()
                except ValueError:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.1 * 2**attempt)
        except Exception:
            return 0
        raise AssertionError("unreachable")

    return await checked(fn)


async def nopanic_stack() -> Loop:
    from nopanic import bulkhead, circuit_breaker, compose, fallback, retry, timeout

    stack = compose(
        fallback(0, on=Exception),
        retry(attempts=3, on=ValueError),
        circuit_breaker(),
        timeout(10.0),
        bulkhead(100),
    )
    return await checked(stack(ok))


async def hyx_stack() -> Loop:
    from hyx.bulkhead import bulkhead
    from hyx.circuitbreaker import consecutive_breaker
    from hyx.fallback import fallback
    from hyx.retry import retry
    from hyx.timeout import timeout

    fn: Any = ok
    for deco in (
        bulkhead(max_concurrency=100, max_capacity=100),
        timeout(10),
        consecutive_breaker(),
        retry(on=ValueError, attempts=3),
        fallback(hyx_handler, on=Exception),
    ):
        fn = deco(fn)
    return await checked(fn)


async def pyresilience_stack() -> Loop:
    from pyresilience import (
        BulkheadConfig,
        CircuitBreakerConfig,
        FallbackConfig,
        RetryConfig,
        TimeoutConfig,
        resilient,
    )

    deco = resilient(
        fallback=FallbackConfig(handler=0),
        retry=RetryConfig(max_attempts=3, retry_on=(ValueError,)),
        circuit_breaker=CircuitBreakerConfig(),
        timeout=TimeoutConfig(seconds=10),
        bulkhead=BulkheadConfig(max_concurrent=100),
    )
    return await checked(deco(ok))


# --- 7. hedge --------------------------------------------------------------------------------


async def ours_hedge() -> Loop:
    from resilience import Hedge

    return await checked(Hedge(delay=10.0, budget=1.0)(ok))


async def nopanic_hedge() -> Loop:
    from nopanic import hedge

    return await checked(hedge(delay=10.0)(ok))


async def stdlib_hedge() -> Loop:
    """The first attempt as a task, raced against the delay with ``asyncio.wait``."""

    async def fn() -> int:
        first = asyncio.ensure_future(ok())
        done, _ = await asyncio.wait({first}, timeout=10.0)
        if not done:
            raise AssertionError("unreachable: ok() answers at once")
        return first.result()

    return await checked(fn)


# --- 8. parts -------------------------------------------------------------------------------


def forwarding(fn: Protected) -> Protected:
    """The least a decorator can do: an ``async def`` forwarding ``*args, **kwargs`` (as the
    policies do: without ``**`` when there are no keywords, which spares a copy of the dict)."""

    async def forward(*args: Any, **kwargs: Any) -> Any:
        return await (fn(*args, **kwargs) if kwargs else fn(*args))

    return forward


async def part_forwarding() -> Loop:
    return await checked(forwarding(ok))


async def part_forwarding_5() -> Loop:
    fn = ok
    for _ in range(5):
        fn = forwarding(fn)
    return await checked(fn)


async def part_raise_catch() -> Loop:
    """Make, raise and catch a CircuitOpenError in one frame: no policy, no await."""
    from resilience import CircuitOpenError

    async def loop(n: int) -> None:
        for _ in range(n):
            try:
                raise CircuitOpenError("o", "forced_open", None)
            except CircuitOpenError:
                pass

    return loop


async def part_reject_through_frame() -> Loop:
    """A coroutine that raises a fresh CircuitOpenError, awaited and caught: the floor of a
    rejection through one protected function."""
    from resilience import CircuitOpenError

    async def refuse() -> int:
        raise CircuitOpenError("o", "forced_open", None)

    return reject_loop(refuse, CircuitOpenError)


async def part_current_task() -> Loop:
    """``asyncio.current_task()``: what a Timeout and a Hedge would pay to find their task."""
    current = asyncio.current_task

    async def loop(n: int) -> None:
        for _ in range(n):
            current()

    return loop


async def part_caller_task() -> Loop:
    """``CallerTask.find()``: how a Timeout and a Hedge find the task they run in."""
    from resilience.policies.base import CallerTask

    find = CallerTask().find

    async def loop(n: int) -> None:
        for _ in range(n):
            find()

    return loop


async def part_task_of() -> Loop:
    """The caller's task as a Timeout finds it: the task of the loop found last, asked of
    that loop (``task_of``), once the loop is seen to run in this thread."""
    import threading

    from resilience.policies.base import CallerTask, task_of

    tasks = CallerTask()
    tasks.find()
    get_ident = threading.get_ident

    async def loop(n: int) -> None:
        for _ in range(n):
            if tasks.thread == get_ident():
                task_of(tasks.loop)  # type: ignore[arg-type]

    return loop


async def part_clock() -> Loop:
    """``time.monotonic()``: the clock read a Timeout makes per call."""
    import time

    monotonic = time.monotonic

    async def loop(n: int) -> None:
        for _ in range(n):
            monotonic()

    return loop


async def part_deadline() -> Loop:
    """A Timeout's deadline record as the protected function handles it: the spare record
    taken, its fields set, its task deleted and the record kept as the spare again."""
    from resilience.policies.timeout import Timeout, _Deadline

    timeout = Timeout(10)
    timeout._spare = spare = _Deadline()
    spare.finished = spare.expired = False
    task = asyncio.current_task()
    assert task is not None

    async def loop(n: int) -> None:
        for _ in range(n):
            entry = timeout._spare
            assert entry is not None
            timeout._spare = None
            entry.deadline = 1.0
            entry.task = task
            entry.cancelling = 0
            del entry.task
            timeout._spare = entry

    return loop


async def part_timer() -> Loop:
    """``loop.call_later`` and ``cancel()``: the timer a Hedge arms once per call."""
    loop_ = asyncio.get_running_loop()

    def nothing() -> None:
        pass

    async def loop(n: int) -> None:
        for _ in range(n):
            loop_.call_later(10.0, nothing).cancel()

    return loop


# --- the list ------------------------------------------------------------------------------

FORWARDING = "async wrapper forwarding *args, **kwargs"
FORWARDING_5 = "five such wrappers, nested"
RAISE_CATCH = "make, raise, catch CircuitOpenError (one frame)"
REJECT_FRAME = "coroutine raising CircuitOpenError, awaited, caught"
CURRENT_TASK = "asyncio.current_task()"
CALLER_TASK = "CallerTask.find() (policies.base)"
TASK_OF = "the caller's task as a Timeout finds it (task_of)"
CLOCK = "time.monotonic()"
DEADLINE = "a Timeout's deadline record, filled and kept"
TIMER = "loop.call_later() + cancel()"

SPECS: list[Spec] = [
    Spec("bare", "await ok()", "stdlib", bare, primary=True),
    Spec("breaker", "resilience CircuitBreaker (decorated)", "resilience", ours_breaker, True),
    Spec("breaker", "resilience CircuitBreaker.call(ok)", "resilience", ours_breaker_call),
    *(Spec("breaker", lib, lib, closed(make)) for lib, make in PEER_BREAKERS.items()),
    Spec("retry", "resilience Retry", "resilience", ours_retry, primary=True),
    Spec("retry", "tenacity @retry", "tenacity", tenacity_decorator),
    Spec("retry", "tenacity AsyncRetrying (per call)", "tenacity", tenacity_async_retrying),
    Spec("retry", "nopanic", "nopanic", nopanic_retry),
    Spec("retry", "hyx", "hyx", hyx_retry),
    Spec("retry", "pyresilience", "pyresilience", pyresilience_retry),
    Spec("timeout", "resilience Timeout", "resilience", ours_timeout, primary=True),
    Spec("timeout", "asyncio.timeout", "stdlib", asyncio_timeout),
    Spec("timeout", "asyncio.wait_for", "stdlib", asyncio_wait_for),
    Spec("timeout", "hyx", "hyx", hyx_timeout),
    Spec("timeout", "nopanic", "nopanic", nopanic_timeout),
    Spec("timeout", "pyresilience", "pyresilience", pyresilience_timeout),
    Spec("bulkhead", "resilience Bulkhead", "resilience", ours_bulkhead, primary=True),
    Spec("bulkhead", "asyncio.Semaphore", "stdlib", stdlib_semaphore),
    Spec("bulkhead", "nopanic", "nopanic", nopanic_bulkhead),
    Spec("bulkhead", "hyx", "hyx", hyx_bulkhead),
    Spec("bulkhead", "pyresilience", "pyresilience", pyresilience_bulkhead),
    Spec("fallback", "resilience Fallback", "resilience", ours_fallback, primary=True),
    Spec("fallback", "try/except", "stdlib", stdlib_try_except),
    Spec("fallback", "nopanic", "nopanic", nopanic_fallback),
    Spec("fallback", "hyx", "hyx", hyx_fallback),
    Spec("fallback", "pyresilience", "pyresilience", pyresilience_fallback),
    Spec("ratelimit", "resilience RateLimiter", "resilience", ours_ratelimit, primary=True),
    Spec("ratelimit", "nopanic", "nopanic", nopanic_ratelimit),
    Spec("ratelimit", "hyx", "hyx", hyx_ratelimit),
    Spec("ratelimit", "pyresilience", "pyresilience", pyresilience_ratelimit),
    Spec("rejection", "resilience force_open()", "resilience", ours_forced_open, primary=True),
    Spec("rejection", "resilience tripped (OPEN)", "resilience", ours_tripped),
    *(Spec("rejection", lib, lib, tripped(make)) for lib, make in PEER_BREAKERS.items()),
    Spec("stack", "resilience Pipeline", "resilience", ours_stack, primary=True),
    Spec("stack", "hand-written stdlib (no breaker)", "stdlib", stdlib_stack),
    Spec("stack", "nopanic compose", "nopanic", nopanic_stack),
    Spec("stack", "hyx (stacked decorators)", "hyx", hyx_stack),
    Spec("stack", "pyresilience @resilient", "pyresilience", pyresilience_stack),
    Spec("hedge", "resilience Hedge", "resilience", ours_hedge, primary=True),
    Spec("hedge", "asyncio task + asyncio.wait", "stdlib", stdlib_hedge),
    Spec("hedge", "nopanic", "nopanic", nopanic_hedge),
    Spec("parts", FORWARDING, "stdlib", part_forwarding),
    Spec("parts", FORWARDING_5, "stdlib", part_forwarding_5),
    Spec("parts", RAISE_CATCH, "stdlib", part_raise_catch),
    Spec("parts", REJECT_FRAME, "stdlib", part_reject_through_frame),
    Spec("parts", CURRENT_TASK, "stdlib", part_current_task),
    Spec("parts", CALLER_TASK, "resilience", part_caller_task),
    Spec("parts", TASK_OF, "resilience", part_task_of),
    Spec("parts", CLOCK, "stdlib", part_clock),
    Spec("parts", DEADLINE, "resilience", part_deadline),
    Spec("parts", TIMER, "stdlib", part_timer),
]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return f"not installed ({exc.name or exc})"
    if isinstance(exc, Skip):
        return str(exc)
    return f"errors: {type(exc).__name__}: {exc}"[:160]


async def build_cases(specs: list[Spec] = SPECS) -> list[Case]:
    """Build every spec; a failing build becomes a skipped case carrying the reason."""
    cases = []
    for spec in specs:
        try:
            loop: Loop | None = await spec.build()
            note = ""
        except Exception as exc:
            loop, note = None, _reason(exc)
        cases.append(Case(spec.group, spec.label, spec.lib, loop, note, spec.primary))
    return cases
