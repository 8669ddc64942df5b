"""Tests for resilience.testing: the FakeClock."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from resilience.clock import Clock
from resilience.testing import FakeClock

from .helpers import cancelled, settle, started


def test_is_a_clock() -> None:
    """FakeClock satisfies the Clock protocol and starts at its ``start``."""
    clock = FakeClock(start=5)
    assert isinstance(clock, Clock)
    assert clock.monotonic() == 5.0


def test_advance_moves_time() -> None:
    """advance(s) moves monotonic() forward by exactly s."""
    clock = FakeClock(start=0)
    clock.advance(1.5)
    clock.advance(0)
    clock.advance(2)
    assert clock.monotonic() == 3.5


def test_timers_run_in_time_order_at_their_time() -> None:
    """advance runs due timers in time order, each seeing the clock at its own deadline."""
    clock = FakeClock(start=0)
    ran: list[tuple[str, float]] = []
    for name, delay in [("c", 3), ("a", 1), ("b", 2), ("late", 10)]:
        clock.call_later(delay, lambda n=name: ran.append((n, clock.monotonic())))
    clock.advance(5)
    assert ran == [("a", 1), ("b", 2), ("c", 3)]
    assert clock.monotonic() == 5
    assert clock.pending == 1
    clock.advance(5)
    assert ran[-1] == ("late", 10)
    assert clock.pending == 0


def test_equal_deadlines_run_in_scheduling_order() -> None:
    """Timers due at the same time run in the order they were scheduled."""
    clock = FakeClock()
    ran: list[int] = []
    for i in range(5):
        clock.call_later(1, lambda i=i: ran.append(i))
    clock.advance(1)
    assert ran == [0, 1, 2, 3, 4]


def test_timer_scheduled_by_timer_runs_in_same_advance() -> None:
    """A timer scheduled by a running timer, and due within the advance, also runs."""
    clock = FakeClock(start=0)
    ran: list[float] = []

    def first() -> None:
        ran.append(clock.monotonic())
        clock.call_later(1, lambda: ran.append(clock.monotonic()))

    clock.call_later(1, first)
    clock.advance(3)
    assert ran == [1, 2]


def test_cancelled_timers_do_not_run() -> None:
    """A cancelled timer never runs and is not counted as pending."""
    clock = FakeClock()
    ran: list[str] = []
    keep = clock.call_later(1, lambda: ran.append("keep"))
    drop = clock.call_later(1, lambda: ran.append("drop"))
    drop.cancel()
    assert clock.pending == 1
    clock.advance(2)
    assert ran == ["keep"]
    keep.cancel()  # cancelling after it ran is harmless
    assert clock.pending == 0


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (math.nan, ValueError), ("1", TypeError)]
)
def test_bad_advance_rejected(value: Any, error: type[Exception]) -> None:
    """advance refuses negative, NaN and non-numeric durations, and leaves time unchanged."""
    clock = FakeClock(start=0)
    with pytest.raises(error):
        clock.advance(value)
    assert clock.monotonic() == 0


async def test_sleep_resumes_only_after_enough_advance() -> None:
    """sleep(s) returns only once the clock has been advanced by a total of s."""
    clock = FakeClock()
    task = await started(clock.sleep(3))
    clock.advance(1)
    await settle()
    clock.advance(1.5)
    await settle()
    assert not task.done()
    clock.advance(0.5)
    await settle()
    assert task.done()
    assert clock.slept == [3]


async def test_sleep_zero_and_negative_return_at_once() -> None:
    """sleep(0) and negative sleeps return without any advance, and are recorded."""
    clock = FakeClock()
    await asyncio.wait_for(clock.sleep(0), 1)
    await asyncio.wait_for(clock.sleep(-1), 1)
    assert clock.slept == [0, -1]
    assert clock.pending == 0


async def test_cancelled_sleep_leaves_no_timer() -> None:
    """Cancelling a sleeping task cancels its timer."""
    clock = FakeClock()
    task = await started(clock.sleep(5))
    assert clock.pending == 1
    await cancelled(task)
    assert clock.pending == 0


async def test_sleepers_wake_in_deadline_order() -> None:
    """Several sleepers wake in the order of their deadlines during one advance."""
    clock = FakeClock()
    woke: list[int] = []

    async def sleeper(seconds: int) -> None:
        await clock.sleep(seconds)
        woke.append(seconds)

    tasks = [asyncio.create_task(sleeper(s)) for s in (3, 1, 2)]
    await settle()
    clock.advance(3)
    await asyncio.gather(*tasks)
    assert woke == [1, 2, 3]


async def test_autojump_sleep_advances_time() -> None:
    """With autojump, sleep moves the clock forward itself and runs timers falling due."""
    clock = FakeClock(start=0, autojump=True)
    fired: list[float] = []
    clock.call_later(1.5, lambda: fired.append(clock.monotonic()))
    await asyncio.wait_for(clock.sleep(2), 1)
    await clock.sleep(0.5)
    assert clock.monotonic() == 2.5
    assert fired == [1.5]
    assert clock.slept == [2, 0.5]


def test_repr_shows_time() -> None:
    """repr shows the current fake time."""
    clock = FakeClock(start=12)
    clock.advance(0.5)
    assert repr(clock) == "FakeClock(12.5)"
