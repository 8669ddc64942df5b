"""Tests for resilience.bulkhead: concurrency limit, FIFO queue, max_wait, slot release."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from resilience.bulkhead import Bulkhead
from resilience.errors import BulkheadFullError
from resilience.events import CallRejected, Event
from resilience.testing import FakeClock


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class Gate:
    """An async callable that records concurrency and blocks until its event is set."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.events: dict[int, asyncio.Event] = {}

    def event(self, key: int) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    async def __call__(self, key: int) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.append(key)
        try:
            await self.event(key).wait()
        finally:
            self.running -= 1
        return key


async def test_max_concurrent_enforced() -> None:
    """No more than max_concurrent calls run at once; the rest wait and then all complete."""
    bulkhead = Bulkhead(2, max_waiting=10)
    gate = Gate()
    tasks = [asyncio.create_task(bulkhead.call(gate, i)) for i in range(6)]
    await settle()
    assert gate.running == 2
    assert bulkhead.in_flight == 2
    assert bulkhead.waiting == 4
    for i in range(6):
        gate.event(i).set()
        await settle()
        assert gate.running <= 2
    assert await asyncio.gather(*tasks) == list(range(6))
    assert gate.peak == 2
    assert bulkhead.in_flight == 0
    assert bulkhead.waiting == 0


async def test_full_rejects_without_queue() -> None:
    """With max_waiting=0 a call finding every slot taken fails at once with BulkheadFullError."""
    events: list[Event] = []
    bulkhead = Bulkhead(1, name="bh", listeners=[events.append])
    gate = Gate()
    holder = asyncio.create_task(bulkhead.call(gate, 0))
    await settle()
    with pytest.raises(BulkheadFullError) as info:
        await bulkhead.call(gate, 1)
    assert info.value.name == "bh"
    assert info.value.max_concurrent == 1
    assert gate.started == [0]
    assert events == [CallRejected(name="bh", policy="bulkhead", error=info.value)]
    gate.event(0).set()
    await holder
    assert await asyncio.wait_for(bulkhead.call(_value, 7), 1) == 7


async def _value(v: int) -> int:
    return v


async def test_queue_is_fifo_and_bounded() -> None:
    """Waiters get slots in arrival order; one more than max_waiting is rejected."""
    bulkhead = Bulkhead(1, max_waiting=3)
    gate = Gate()
    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(bulkhead.call(gate, i)))
        await settle()
    assert bulkhead.waiting == 3
    with pytest.raises(BulkheadFullError):
        await bulkhead.call(gate, 99)
    for i in (3, 2, 1, 0):  # release in reverse: order of start must still be arrival order
        gate.event(i).set()
    await asyncio.gather(*tasks)
    assert gate.started == [0, 1, 2, 3]


async def test_max_wait_expiry(clock: FakeClock) -> None:
    """A waiter still queued after max_wait of fake time fails with BulkheadFullError."""
    bulkhead = Bulkhead(1, max_waiting=1, max_wait=2, clock=clock)
    gate = Gate()
    holder = asyncio.create_task(bulkhead.call(gate, 0))
    await settle()
    waiter = asyncio.create_task(bulkhead.call(gate, 1))
    await settle()
    clock.advance(1.9)
    await settle()
    assert not waiter.done()
    clock.advance(0.1)
    with pytest.raises(BulkheadFullError):
        await waiter
    assert bulkhead.waiting == 0
    gate.event(0).set()
    await holder
    assert bulkhead.in_flight == 0
    assert gate.started == [0]


async def test_waiter_served_before_max_wait(clock: FakeClock) -> None:
    """A waiter handed a slot before max_wait runs, and its expiry timer is cancelled."""
    bulkhead = Bulkhead(1, max_waiting=1, max_wait=5, clock=clock)
    gate = Gate()
    holder = asyncio.create_task(bulkhead.call(gate, 0))
    await settle()
    waiter = asyncio.create_task(bulkhead.call(gate, 1))
    await settle()
    clock.advance(1)
    gate.event(0).set()
    await holder
    await settle()
    assert gate.started == [0, 1]
    assert clock.pending == 0
    clock.advance(10)
    gate.event(1).set()
    assert await waiter == 1
    assert bulkhead.in_flight == 0


async def test_max_wait_zero_rejects_at_once(clock: FakeClock) -> None:
    """max_wait=0 never queues, even with room in the queue."""
    bulkhead = Bulkhead(1, max_waiting=5, max_wait=0, clock=clock)
    gate = Gate()
    holder = asyncio.create_task(bulkhead.call(gate, 0))
    await settle()
    with pytest.raises(BulkheadFullError):
        await bulkhead.call(gate, 1)
    gate.event(0).set()
    await holder


async def test_slot_released_on_success_and_exception() -> None:
    """A slot is given back whether the call returns or raises."""
    bulkhead = Bulkhead(1)

    async def boom() -> None:
        assert bulkhead.in_flight == 1
        raise ValueError("boom")

    assert await bulkhead.call(_value, 1) == 1
    assert bulkhead.in_flight == 0
    with pytest.raises(ValueError, match="boom"):
        await bulkhead.call(boom)
    assert bulkhead.in_flight == 0
    assert await bulkhead.call(_value, 2) == 2


async def test_slot_released_when_running_call_cancelled() -> None:
    """Cancelling a running call frees its slot for the next waiter."""
    bulkhead = Bulkhead(1, max_waiting=1)
    gate = Gate()
    running = asyncio.create_task(bulkhead.call(gate, 0))
    await settle()
    waiter = asyncio.create_task(bulkhead.call(gate, 1))
    await settle()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await settle()
    assert gate.started == [0, 1]
    gate.event(1).set()
    assert await waiter == 1
    assert bulkhead.in_flight == 0


async def test_cancelled_waiter_leaves_queue() -> None:
    """A waiter cancelled while queued never runs, frees its queue place, and takes no slot."""
    bulkhead = Bulkhead(1, max_waiting=1)
    gate = Gate()
    holder = asyncio.create_task(bulkhead.call(gate, 0))
    await settle()
    waiter = asyncio.create_task(bulkhead.call(gate, 1))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.waiting == 0
    second = asyncio.create_task(bulkhead.call(gate, 2))  # the queue place is free again
    await settle()
    assert bulkhead.waiting == 1
    gate.event(0).set()
    gate.event(2).set()
    assert await holder == 0
    assert await second == 2
    assert gate.started == [0, 2]
    assert bulkhead.in_flight == 0


async def test_waiter_cancelled_after_handover_passes_slot_on() -> None:
    """A waiter cancelled just after being handed a slot passes it to the next waiter."""
    bulkhead = Bulkhead(1, max_waiting=2)
    gate = Gate()
    async with bulkhead:
        first = asyncio.create_task(bulkhead.call(gate, 1))
        second = asyncio.create_task(bulkhead.call(gate, 2))
        await settle()
        assert bulkhead.waiting == 2
    # leaving the block handed the slot to ``first``, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await settle()
    assert gate.started == [2]
    assert bulkhead.in_flight == 1
    gate.event(2).set()
    assert await second == 2
    assert bulkhead.in_flight == 0
    assert bulkhead.waiting == 0


async def test_last_waiter_cancelled_after_handover_frees_slot() -> None:
    """With no one left to pass to, a cancelled handed-over waiter returns the slot."""
    bulkhead = Bulkhead(1, max_waiting=1)
    gate = Gate()
    async with bulkhead:
        only = asyncio.create_task(bulkhead.call(gate, 1))
        await settle()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    assert gate.started == []
    assert bulkhead.in_flight == 0
    assert await bulkhead.call(_value, 3) == 3


async def test_async_with_form() -> None:
    """``async with bulkhead:`` takes a slot for the block and gives it back after."""
    bulkhead = Bulkhead(1)
    async with bulkhead:
        assert bulkhead.in_flight == 1
        with pytest.raises(BulkheadFullError):
            async with bulkhead:
                pass
    assert bulkhead.in_flight == 0
    with pytest.raises(KeyError):
        async with bulkhead:
            raise KeyError("x")
    assert bulkhead.in_flight == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_concurrent": 0}, ValueError),
        ({"max_concurrent": -1}, ValueError),
        ({"max_concurrent": 1.5}, TypeError),
        ({"max_concurrent": True}, TypeError),
        ({"max_concurrent": 1, "max_waiting": -1}, ValueError),
        ({"max_concurrent": 1, "max_waiting": 2.0}, TypeError),
        ({"max_concurrent": 1, "max_wait": -1}, ValueError),
        ({"max_concurrent": 1, "max_wait": math.nan}, ValueError),
        ({"max_concurrent": 1, "max_wait": "1"}, TypeError),
        ({"max_concurrent": 1, "name": ""}, ValueError),
    ],
)
def test_bad_arguments_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Invalid limits, waits and names are rejected at construction."""
    with pytest.raises(error):
        Bulkhead(**kwargs)
