"""The timeout policy: expiry on a fake clock, nesting, cancellation bookkeeping."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.errors import ResilienceTimeoutError
from resilience.events import Event, TimedOut
from resilience.policies.timeout import Timeout
from resilience.testing import FakeClock

from ..helpers import advance, cancelled, in_three_loops, policy_events, settle, started


async def test_expires_after_seconds(clock: FakeClock) -> None:
    """A call outliving ``seconds`` of fake time raises ResilienceTimeoutError (a TimeoutError)."""
    timeout = Timeout(2, name="t", clock=clock)
    task = await started(timeout.call(clock.sleep, 10))
    await advance(clock, 1.9)
    assert not task.done()
    clock.advance(0.1)
    with pytest.raises(ResilienceTimeoutError) as info:
        await task
    assert isinstance(info.value, TimeoutError)
    assert info.value.name == "t"
    assert info.value.seconds == 2
    assert isinstance(info.value.__cause__, asyncio.CancelledError)


async def test_success_before_deadline(clock: FakeClock) -> None:
    """A call finishing before the deadline returns its value and leaves no timer behind."""
    timeout = Timeout(5, clock=clock)

    async def work(x: int, *, y: int) -> int:
        await clock.sleep(3)
        return x + y

    task = await started(timeout.call(work, 1, y=2))
    clock.advance(3)
    assert await task == 3
    await advance(clock, 10)  # the timer may still fire, but must not touch anything
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_timed_out_event(clock: FakeClock) -> None:
    """Expiry delivers a TimedOut event carrying the name and seconds."""
    events: list[Event] = []
    timeout = Timeout(1.5, name="slow", clock=clock, listeners=[policy_events(events)])
    task = await started(timeout.call(clock.sleep, 10))
    assert events == []
    clock.advance(1.5)
    with pytest.raises(ResilienceTimeoutError):
        await task
    assert events == [TimedOut(name="slow", seconds=1.5)]


async def test_inner_shorter_timeout_fires(clock: FakeClock) -> None:
    """Nested: the shorter inner timeout raises its own error and the outer is unaffected."""
    outer = Timeout(10, name="outer", clock=clock)
    inner = Timeout(1, name="inner", clock=clock)

    names: list[str] = []

    async def body() -> str:
        try:
            await inner.call(clock.sleep, 5)
        except ResilienceTimeoutError as exc:
            names.append(exc.name)
            await clock.sleep(2)  # the outer timeout still lets work continue
            return "recovered"
        return "not timed out"

    task = await started(outer.call(body))
    await advance(clock, 1)
    clock.advance(2)
    assert await task == "recovered"
    assert names == ["inner"]


async def test_outer_shorter_timeout_fires(clock: FakeClock) -> None:
    """Nested: the shorter outer timeout raises from the outer; the inner does not convert it."""
    outer = Timeout(1, name="outer", clock=clock)
    inner = Timeout(10, name="inner", clock=clock)
    seen: list[BaseException] = []

    async def body() -> None:
        try:
            await inner.call(clock.sleep, 5)
        except BaseException as exc:
            seen.append(exc)
            raise

    task = await started(outer.call(body))
    clock.advance(1)
    with pytest.raises(ResilienceTimeoutError) as info:
        await task
    assert info.value.name == "outer"
    assert len(seen) == 1
    assert isinstance(seen[0], asyncio.CancelledError)


async def _cancelling_after_external_cancel(make_cm: Any, clock: FakeClock) -> tuple[str, int]:
    """Run ``async with make_cm()`` around a sleep, cancel from outside, report what was seen."""
    seen: list[tuple[str, int]] = []

    async def body() -> None:
        try:
            async with make_cm():
                await clock.sleep(10)
        except BaseException as exc:
            seen.append((type(exc).__name__, asyncio.current_task().cancelling()))  # type: ignore[union-attr]
            raise

    task = await started(body())
    await cancelled(task)
    return seen[0]


async def test_external_cancel_passes_through_like_asyncio_timeout(clock: FakeClock) -> None:
    """An outside task.cancel() surfaces as CancelledError with cancelling() as asyncio.timeout."""
    ours = await _cancelling_after_external_cancel(lambda: Timeout(5, clock=clock), clock)
    reference = await _cancelling_after_external_cancel(lambda: asyncio.timeout(5), clock)
    assert ours == reference == ("CancelledError", 1)


async def test_external_cancel_through_call(clock: FakeClock) -> None:
    """Through ``call``, an outside cancel is CancelledError, and a later expiry does nothing."""
    events: list[Event] = []
    timeout = Timeout(5, clock=clock, listeners=[policy_events(events)])
    task = await started(timeout.call(clock.sleep, 10))
    await cancelled(task)
    assert task.cancelling() == 1
    await advance(clock, 10)
    assert events == []


async def test_cancelling_restored_after_expiry(clock: FakeClock) -> None:
    """After a timeout expires and is caught, the task's cancelling() count is back to 0."""
    timeout = Timeout(1, clock=clock)
    counts: list[int] = []

    async def body() -> str:
        try:
            await timeout.call(clock.sleep, 10)
        except ResilienceTimeoutError:
            counts.append(asyncio.current_task().cancelling())  # type: ignore[union-attr]
        await clock.sleep(1)  # the task is not cancelled any more: it may go on awaiting
        return "went on"

    task = await started(body())
    await advance(clock, 1)
    clock.advance(1)
    assert await task == "went on"
    assert counts == [0]


async def test_swallowed_cancellation_returns_value(clock: FakeClock) -> None:
    """A call swallowing the timeout's cancellation returns its value; cancelling() is restored."""
    timeout = Timeout(1, clock=clock)
    counts: list[int] = []

    async def stubborn() -> str:
        try:
            await clock.sleep(10)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"

    async def body() -> str:
        result = await timeout.call(stubborn)
        counts.append(asyncio.current_task().cancelling())  # type: ignore[union-attr]
        return result

    task = await started(body())
    clock.advance(1)
    assert await task == "swallowed"
    assert counts == [0]


async def test_timeout_and_external_cancel_together(clock: FakeClock) -> None:
    """If the task is also cancelled from outside, CancelledError wins over the timeout."""
    timeout = Timeout(1, clock=clock)
    task = await started(timeout.call(clock.sleep, 10))
    clock.advance(1)  # the timeout cancels the task ...
    task.cancel()  # ... and so does someone else before it runs
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_concurrent_calls_only_slow_ones_time_out(clock: FakeClock) -> None:
    """Concurrent calls started at different times: exactly those slower than the limit fail."""
    timeout = Timeout(5, clock=clock)
    durations = [1, 3, 6, 8, 4.5, 5.5, 2, 9]
    tasks: list[tuple[float, asyncio.Task[None]]] = []
    for i, d in enumerate(durations):
        tasks.append((d, asyncio.create_task(timeout.call(clock.sleep, d))))
        await settle()
        if i % 2:
            await advance(clock, 0.75)  # stagger start times, so deadlines differ
    for _ in range(40):
        await advance(clock, 0.25)
    for d, task in tasks:
        assert task.done()
        if d < 5:
            assert task.exception() is None
        else:
            assert isinstance(task.exception(), ResilienceTimeoutError)


async def test_async_with_form(clock: FakeClock) -> None:
    """``async with timeout:`` raises on expiry and passes a fast body through."""
    timeout = Timeout(2, clock=clock)

    async def slow() -> None:
        async with timeout:
            await clock.sleep(10)

    async def fast() -> str:
        async with timeout:
            await clock.sleep(1)
        return "fast"

    slow_task = asyncio.create_task(slow())
    fast_task = await started(fast())
    clock.advance(1)
    assert await fast_task == "fast"
    assert not slow_task.done()
    clock.advance(1)
    with pytest.raises(ResilienceTimeoutError):
        await slow_task


async def test_async_with_nested_same_timeout(clock: FakeClock) -> None:
    """The same Timeout nested twice: the outer deadline comes first and the outer raises."""
    timeout = Timeout(2, clock=clock)

    async def body() -> str:
        async with timeout:
            await clock.sleep(1)
            try:
                async with timeout:
                    await clock.sleep(10)
            except ResilienceTimeoutError:
                return "inner converted the outer's cancellation"
        return "not cancelled"

    task = await started(body())
    await advance(clock, 1)
    await advance(clock, 1)  # outer deadline reached first, at t=2
    with pytest.raises(ResilienceTimeoutError):
        await task


def test_usable_from_two_event_loops() -> None:
    """One Timeout works across two asyncio.run calls, one after the other."""
    clock = FakeClock()
    timeout = Timeout(3, clock=clock)

    async def fast() -> str:
        return await timeout.call(_value, "fast")

    async def slow() -> type[BaseException] | None:
        task = await started(timeout.call(clock.sleep, 10))
        await advance(clock, 3)
        exc = task.exception()
        return type(exc) if exc is not None else None

    assert asyncio.run(fast()) == "fast"  # leaves a timer armed on the first loop
    assert asyncio.run(slow()) is ResilienceTimeoutError
    assert asyncio.run(slow()) is ResilienceTimeoutError


def test_usable_from_a_loop_in_another_thread() -> None:
    """One Timeout used on a loop in this thread, then on a loop in another thread: each
    deadline cancels the task running the call, in the thread it runs in."""
    clock = FakeClock()
    timeout = Timeout(3, clock=clock)
    ran: list[object] = []

    async def slow() -> None:
        task = await started(timeout.call(clock.sleep, 10))
        await advance(clock, 3)
        ran.append(type(task.exception()))

    in_three_loops(slow)
    assert ran == [ResilienceTimeoutError] * 3


async def _value(v: str) -> str:
    return v


def test_outside_a_task_is_an_error() -> None:
    """Entering a Timeout outside of an asyncio task raises RuntimeError."""
    timeout = Timeout(1, clock=FakeClock())
    coro = timeout.call(_value, "x")
    with pytest.raises(RuntimeError):
        coro.send(None)  # type: ignore[attr-defined]
    coro.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_seconds_rejected(seconds: Any, error: type[Exception]) -> None:
    """``seconds`` must be a finite number > 0."""
    with pytest.raises(error):
        Timeout(seconds)


async def test_many_finished_calls_behind_a_slow_one(clock: FakeClock) -> None:
    """Hundreds of calls finishing behind a slow one leave the slow one's deadline intact."""
    timeout = Timeout(5, clock=clock)
    slow = await started(timeout.call(clock.sleep, 100))
    for _ in range(300):
        clock.advance(0.01)
        assert await timeout.call(_value, "quick") == "quick"
    late = await started(timeout.call(clock.sleep, 100))
    clock.advance(5 - 3.0 + 0.001)  # 3s passed in the loop above: the slow deadline is reached
    with pytest.raises(ResilienceTimeoutError):
        await slow
    assert not late.done()
    clock.advance(3)
    with pytest.raises(ResilienceTimeoutError):
        await late


_CALL = st.tuples(
    st.integers(min_value=0, max_value=6),  # ticks to wait before starting it
    st.sampled_from([1, 2, 3, 4, 6, 7, 9]),  # its duration in ticks (the limit is 5)
    st.sampled_from(["call", "async with", "cancelled"]),  # how: cancelled is from outside
)


@settings(max_examples=80, deadline=None)
@given(calls=st.lists(_CALL, min_size=1, max_size=12))
def test_concurrent_calls_end_as_their_durations_say(calls: list[tuple[int, int, str]]) -> None:
    """Calls started at any ticks, finishing in any order, in both forms: exactly the slower
    ones time out, a cancelled one is cancelled, every task's cancelling() count ends as it
    began, and nothing is left queued."""
    clock = FakeClock()
    timeout = Timeout(5, clock=clock)

    async def one(duration: int, form: str) -> tuple[str, int]:
        try:
            if form == "async with":
                async with timeout:
                    await clock.sleep(duration)
            else:
                await timeout.call(clock.sleep, duration)
        except ResilienceTimeoutError:
            return "timed out", asyncio.current_task().cancelling()  # type: ignore[union-attr]
        return "done", asyncio.current_task().cancelling()  # type: ignore[union-attr]

    async def main() -> None:
        tasks: list[tuple[int, str, asyncio.Task[tuple[str, int]]]] = []
        for wait, duration, form in calls:
            for _ in range(wait):
                await advance(clock, 1)
            tasks.append((duration, form, await started(one(duration, form))))
            if form == "cancelled":
                tasks[-1][2].cancel()
        for _ in range(12):
            await advance(clock, 1)
        for duration, form, task in tasks:
            assert task.done()
            if form == "cancelled":
                assert task.cancelled()
            else:
                assert task.result() == ("timed out" if duration > 5 else "done", 0)
        assert not timeout._queue

    asyncio.run(main())


async def test_finished_calls_behind_a_slow_one_do_not_pile_up(clock: FakeClock) -> None:
    """Thousands of calls finishing behind a slow one (and some beside it) leave a bounded
    queue: the finished entries are dropped while the slow one still runs."""
    timeout = Timeout(5, clock=clock)
    slow = await started(timeout.call(clock.sleep, 100))
    beside = [await started(timeout.call(clock.sleep, 1)) for _ in range(10)]
    for _ in range(2000):
        assert await timeout.call(_value, "quick") == "quick"
        assert len(timeout._queue) <= 1 + 10 + 4 * 65
    clock.advance(1)
    await asyncio.gather(*beside)
    for _ in range(2000):
        assert await timeout.call(_value, "quick") == "quick"
    assert len(timeout._queue) <= 1 + 4 * 65
    assert not slow.done()
    await cancelled(slow)
