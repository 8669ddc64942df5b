"""The bulkhead: concurrency limit, FIFO queue, max_wait, slot release."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.errors import BulkheadFullError, StoreUnavailableError
from resilience.events import CallRejected, Event
from resilience.policies.bulkhead import Bulkhead
from resilience.store import MemoryStore
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import (
    advance,
    boom,
    cancelled,
    ok,
    policy_events,
    settle,
    started,
    unique_prefix,
    until,
)
from ..store.support import evalsha_calls


class Gate:
    """An async callable that records concurrency and blocks until its event is set."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.events: dict[int, asyncio.Event] = {}

    def event(self, key: int) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    async def start(self, bulkhead: Bulkhead, key: int) -> asyncio.Task[int]:
        """A call of ``key`` through ``bulkhead``, started and run until it blocks (holding a
        slot, queued, or refused)."""
        return await started(bulkhead.call(self, key))

    async def __call__(self, key: int) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.append(key)
        try:
            await self.event(key).wait()
        finally:
            self.running -= 1
        return key


async def held_and_queued(bulkhead: Bulkhead) -> tuple[Gate, asyncio.Task[int], asyncio.Task[int]]:
    """Call 0 holding ``bulkhead``'s only slot and call 1 queued behind it."""
    gate = Gate()
    return gate, await gate.start(bulkhead, 0), await gate.start(bulkhead, 1)


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
    bulkhead = Bulkhead(1, name="bh", listeners=[policy_events(events)])
    gate = Gate()
    holder = await gate.start(bulkhead, 0)
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
    gate, holder, waiter = await held_and_queued(bulkhead)
    await advance(clock, 1.9)
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
    gate, holder, waiter = await held_and_queued(bulkhead)
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
    holder = await gate.start(bulkhead, 0)
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
    gate, running, waiter = await held_and_queued(bulkhead)
    await cancelled(running)
    await settle()
    assert gate.started == [0, 1]
    gate.event(1).set()
    assert await waiter == 1
    assert bulkhead.in_flight == 0


async def test_cancelled_waiter_leaves_queue() -> None:
    """A waiter cancelled while queued never runs, frees its queue place, and takes no slot."""
    bulkhead = Bulkhead(1, max_waiting=1)
    gate, holder, waiter = await held_and_queued(bulkhead)
    await cancelled(waiter)
    assert bulkhead.waiting == 0
    second = await gate.start(bulkhead, 2)  # the queue place is free again
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
        second = await gate.start(bulkhead, 2)
        assert bulkhead.waiting == 2
    # leaving the block handed the slot to ``first``, which has not run yet
    await cancelled(first)
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
        only = await gate.start(bulkhead, 1)
    await cancelled(only)
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


# --- fleet-wide (distributed=True) ----------------------------------------------------------


async def no_leases(store: RedisStore) -> bool:
    """Whether Redis holds no permit of the pool "db" any more."""
    return await store.count_leases("db") == 0


def renewing() -> bool:
    """Whether a fleet permit's renewal is under way (its round trips to Redis)."""
    return any("_Lease._renew" in repr(t) for t in asyncio.all_tasks())


class DownStore(MemoryStore):
    """A store whose lease primitives cannot reach their backend."""

    async def acquire_lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        raise StoreUnavailableError("down")

    async def release_lease(self, key: str, lease: str) -> bool:
        raise StoreUnavailableError("down")


class SlowStore(MemoryStore):
    """A store whose acquire_lease answers only once ``answer`` is set."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.answer = asyncio.Event()
        self.asked = asyncio.Event()

    async def acquire_lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        self.asked.set()
        await self.answer.wait()
        return await super().acquire_lease(key, limit=limit, ttl=ttl)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"distributed": True}, ValueError),
        ({"store": MemoryStore()}, ValueError),
        ({"distributed": True, "store": MemoryStore(), "max_waiting": 1}, ValueError),
        ({"distributed": True, "store": MemoryStore(), "lease": 0}, ValueError),
        ({"distributed": True, "store": MemoryStore(), "lease": math.inf}, ValueError),
        ({"distributed": True, "store": object()}, TypeError),
        ({"distributed": 1, "store": MemoryStore()}, TypeError),
    ],
)
def test_distributed_options_validated(kw: dict[str, Any], error: type[Exception]) -> None:
    """distributed= needs a store, no queue and a positive lease; store= needs distributed."""
    with pytest.raises(error):
        Bulkhead(2, **kw)


async def test_fleet_limit_shared_between_replicas(clock: FakeClock) -> None:
    """Two bulkheads of one name on one store admit max_concurrent calls between them."""
    store = MemoryStore(clock=clock)
    a = Bulkhead(2, distributed=True, store=store, name="db")
    b = Bulkhead(2, distributed=True, store=store, name="db")
    gate = Gate()
    tasks = [asyncio.create_task(a.call(gate, 1)), asyncio.create_task(b.call(gate, 2))]
    await settle()
    assert gate.running == 2
    with pytest.raises(BulkheadFullError):
        await b.call(gate, 3)
    assert b.in_flight == 1  # the rejected call gave its local slot back
    gate.event(1).set()
    await settle()
    assert await store.count_leases("db") == 1
    gate.event(4).set()
    assert await b.call(gate, 4) == 4
    gate.event(2).set()
    assert await asyncio.gather(*tasks) == [1, 2]
    assert await store.count_leases("db") == 0


async def test_permits_returned_however_the_call_ends(clock: FakeClock) -> None:
    """Success, an exception and cancellation all give the fleet-wide permit back."""
    store = MemoryStore(clock=clock)
    bulkhead = Bulkhead(3, distributed=True, store=store, name="db")
    gate = Gate()
    gate.event(0).set()
    assert await bulkhead.call(gate, 0) == 0
    with pytest.raises(ValueError, match="boom"):
        await bulkhead.call(boom)
    running = await gate.start(bulkhead, 1)
    assert await store.count_leases("db") == 1
    await cancelled(running)
    await settle()
    assert await store.count_leases("db") == 0
    assert bulkhead.in_flight == 0


async def test_cancelled_while_taking_permit_returns_it(clock: FakeClock) -> None:
    """A caller cancelled while the store is taking its permit still gets it returned."""
    store = SlowStore(clock=clock)
    bulkhead = Bulkhead(1, distributed=True, store=store, name="db")
    gate = Gate()
    caller = asyncio.create_task(bulkhead.call(gate, 1))
    await store.asked.wait()
    await cancelled(caller)
    assert bulkhead.in_flight == 0
    store.answer.set()
    await settle()
    assert gate.started == []
    assert await store.count_leases("db") == 0


async def test_store_down_falls_back_to_local_limit(clock: FakeClock) -> None:
    """When the store is unavailable calls still run, under the local limit only."""
    bulkhead = Bulkhead(1, distributed=True, store=DownStore(clock=clock), name="db")
    gate = Gate()
    running = await gate.start(bulkhead, 1)
    assert gate.running == 1
    with pytest.raises(BulkheadFullError):
        await bulkhead.call(gate, 2)
    gate.event(1).set()
    assert await running == 1
    assert bulkhead.in_flight == 0


async def test_permit_of_a_dead_holder_expires(clock: FakeClock) -> None:
    """A permit never returned (its replica died) frees up after ``lease`` seconds."""
    store = MemoryStore(clock=clock)
    assert await store.acquire_lease("db", limit=1, ttl=5.0) is not None  # the dead replica
    bulkhead = Bulkhead(1, distributed=True, store=store, name="db", lease=5.0)
    with pytest.raises(BulkheadFullError):
        await bulkhead.call(Gate(), 1)
    clock.advance(5.0)
    gate = Gate()
    gate.event(1).set()
    assert await bulkhead.call(gate, 1) == 1


async def test_distributed_context_manager(clock: FakeClock) -> None:
    """``async with`` takes a fleet-wide permit and returns it on exit."""
    store = MemoryStore(clock=clock)
    bulkhead = Bulkhead(1, distributed=True, store=store, name="db")
    async with bulkhead:
        assert await store.count_leases("db") == 1
        with pytest.raises(BulkheadFullError):
            async with Bulkhead(1, distributed=True, store=store, name="db"):
                pass
    assert await store.count_leases("db") == 0
    assert bulkhead.in_flight == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["ok", "raise", "cancel"]), min_size=1, max_size=8))
def test_no_permit_is_lost(outcomes: list[str]) -> None:
    """Whatever mix of outcomes runs concurrently, every permit and slot is returned."""

    async def main() -> None:
        store = MemoryStore(clock=FakeClock())
        bulkhead = Bulkhead(len(outcomes), distributed=True, store=store, name="db")
        gate = Gate()

        async def one(i: int, outcome: str) -> None:
            await gate(i)
            if outcome == "raise":
                raise ValueError(i)

        tasks = [asyncio.create_task(bulkhead.call(one, i, o)) for i, o in enumerate(outcomes)]
        await settle()
        assert await store.count_leases("db") == len(outcomes)
        for i, outcome in enumerate(outcomes):
            if outcome == "cancel":
                tasks[i].cancel()
            else:
                gate.event(i).set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await settle()
        assert await store.count_leases("db") == 0
        assert bulkhead.in_flight == 0

    asyncio.run(main())


async def test_redis_fleet_limit_across_two_replicas(
    redis_pair: tuple[RedisStore, RedisStore], clock: FakeClock
) -> None:
    """Two RedisStores on one Redis share the limit; every permit is returned at the end."""
    one, two = redis_pair
    a = Bulkhead(2, distributed=True, store=one, name="db")
    b = Bulkhead(2, distributed=True, store=two, name="db")
    gate = Gate()
    first = asyncio.create_task(a.call(gate, 1))
    second = asyncio.create_task(b.call(gate, 2))
    await until(lambda: gate.running == 2, 10, "both calls running")
    with pytest.raises(BulkheadFullError):
        await b.call(gate, 3)
    with pytest.raises(BulkheadFullError):
        await a.call(gate, 4)
    gate.event(1).set()
    assert await first == 1
    with pytest.raises(ValueError, match="boom"):
        await a.call(boom)
    await cancelled(second)
    await until(lambda: no_leases(one), 10, "every permit back", every=0.01)
    assert await two.count_leases("db") == 0


async def test_redis_unreachable_runs_locally(unreachable_store: RedisStore) -> None:
    """A RedisStore that cannot connect never fails a call: the local limit still applies."""
    bulkhead = Bulkhead(1, distributed=True, store=unreachable_store, name="db")
    gate = Gate()
    gate.event(1).set()
    assert await bulkhead.call(gate, 1) == 1
    assert await bulkhead.call(gate, 1) == 1
    with pytest.raises(ValueError, match="boom"):
        await bulkhead.call(boom)
    assert bulkhead.in_flight == 0


async def test_fleet_permit_is_renewed_while_a_long_call_runs(clock: FakeClock) -> None:
    """A call running 5 leases long keeps its permit: other replicas stay out, none leaks."""
    store = MemoryStore(clock=clock)
    one = Bulkhead(1, distributed=True, store=store, name="pool", lease=10, clock=clock)
    two = Bulkhead(1, distributed=True, store=store, name="pool", lease=10, clock=clock)
    release = asyncio.Event()

    async def long_call() -> str:
        await release.wait()
        return "done"

    running = asyncio.create_task(one.call(long_call))
    await settle(10)
    for _ in range(10):  # 50 s: five leases
        clock.advance(5)
        await settle(10)
        assert await store.count_leases("pool") == 1
        with pytest.raises(BulkheadFullError):
            await two.call(long_call)
    release.set()
    assert await running == "done"
    await settle(10)
    assert await store.count_leases("pool") == 0


async def test_renewed_permit_is_returned_when_the_caller_is_cancelled(clock: FakeClock) -> None:
    """Cancelled after renewals, the call still gives back the permit it holds now."""
    store = MemoryStore(clock=clock)
    pool = Bulkhead(2, distributed=True, store=store, name="pool", lease=4, clock=clock)

    async def forever() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(pool.call(forever))
    await settle(10)
    for _ in range(3):
        clock.advance(2)
        await settle(10)
    await cancelled(task)
    await settle(10)
    assert await store.count_leases("pool") == 0
    assert clock.pending == 0  # no renewal timer left behind


async def test_context_manager_permit_is_renewed_too(clock: FakeClock) -> None:
    """``async with bulkhead:`` keeps its fleet-wide permit past the lease as well."""
    store = MemoryStore(clock=clock)
    pool = Bulkhead(1, distributed=True, store=store, name="pool", lease=2, clock=clock)
    async with pool:
        for _ in range(4):
            clock.advance(1)
            await settle(10)
            assert await store.count_leases("pool") == 1
    await settle(10)
    assert await store.count_leases("pool") == 0


async def test_redis_fleet_permit_is_renewed_while_a_long_call_runs(
    redis_pair: tuple[RedisStore, RedisStore], clock: FakeClock
) -> None:
    """Through Redis too: a call outliving its lease keeps its permit, and returns it."""
    one, two = redis_pair
    a = Bulkhead(1, distributed=True, store=one, name="db", lease=10, clock=clock)
    b = Bulkhead(1, distributed=True, store=two, name="db", lease=10, clock=clock)
    gate = Gate()
    running = asyncio.create_task(a.call(gate, 1))
    await until(lambda: gate.running == 1, 10, "the call running")
    for _ in range(6):  # 36 s: more than three leases
        clock.advance(6)
        await until(lambda: not renewing(), 10, "the renewal's two round trips")
        assert await two.count_leases("db") == 1
        with pytest.raises(BulkheadFullError):
            await b.call(gate, 2)
    gate.event(1).set()
    assert await running == 1
    await until(lambda: no_leases(one), 10, "the permit back", every=0.01)


# --- shares (quota leasing) ---------------------------------------------------------------


def test_shares_need_a_fleet_wide_bulkhead() -> None:
    with pytest.raises(ValueError, match="shares=True needs distributed"):
        Bulkhead(2, shares=True)
    with pytest.raises(TypeError, match="shares"):
        Bulkhead(2, distributed=True, store=MemoryStore(), name="db", shares=1)  # type: ignore[arg-type]


def sharing(limit: int, clock: FakeClock) -> tuple[Bulkhead, Bulkhead]:
    """Two replicas' bulkheads "db" holding a fleet limit of ``limit`` in shares (one
    MemoryStore)."""
    store = MemoryStore(clock=clock)
    one, two = (
        Bulkhead(limit, distributed=True, store=store, name="db", shares=True, clock=clock)
        for _ in range(2)
    )
    return one, two


async def test_shared_permits_hold_the_fleet_limit_and_follow_demand(clock: FakeClock) -> None:
    """Two replicas, a fleet limit of 2 held in shares: never more than 2 calls at once; a
    share one replica no longer uses goes to the other after a renewal."""
    one, two = sharing(2, clock)
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "done"

    running = [asyncio.create_task(one.call(held)) for _ in range(2)]
    await settle()
    with pytest.raises(BulkheadFullError):
        await two.call(ok)
    gate.set()
    assert await asyncio.gather(*running) == ["done", "done"]
    with pytest.raises(BulkheadFullError):
        await two.call(ok)  # one's share is still its own until it renews
    for _ in range(2):
        await advance(clock, 1.0)
    assert await two.call(ok) == "ok"
    assert await two.call(ok) == "ok"


async def test_shared_permits_cost_few_store_calls(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """Two replicas, four workers each, a fleet limit of 8: at most 8 in flight, and under
    0.05 Redis script calls per call."""
    one = stores()
    replicas = [one, stores(prefix=one.prefix)]
    bulkheads = [Bulkhead(8, distributed=True, store=s, name="db", shares=True) for s in replicas]
    in_flight = peak = calls = 0

    async def work() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1

    async def worker(b: Bulkhead) -> None:
        nonlocal calls
        for _ in range(300):
            await b.call(work)
            calls += 1

    before = await evalsha_calls(raw)
    await asyncio.gather(*(worker(b) for b in bulkheads for _ in range(4)))
    after = await evalsha_calls(raw)
    assert calls == 2400
    assert peak <= 8
    assert after - before <= 0.05 * calls, after - before


async def test_adaptive_limits_on_shares_are_summed_in_status(clock: FakeClock) -> None:
    from resilience import AdaptiveLimit, status

    store = MemoryStore(clock=clock)
    bulkheads = [
        Bulkhead(
            50,
            limit=AdaptiveLimit(initial=5, max_limit=40),
            distributed=True,
            store=store,
            name="db",
            shares=True,
            clock=clock,
        )
        for _ in range(2)
    ]
    for b in bulkheads:
        assert await b.call(ok) == "ok"
    (pool,) = [p for p in await status(store) if p.kind == "bulkhead"]
    assert pool.adaptive_limit == sum(b.current_limit for b in bulkheads)
    assert pool.limit == 50


async def test_shared_permits_come_from_the_share_only_while_it_is_valid(
    clock: FakeClock,
) -> None:
    """While the share's lease runs, calls take permits from it with no store call; once it
    has run out unrenewed (the store away), a call asks the store again (and, the store
    being down, runs on the local limit)."""

    class Away(MemoryStore):
        away = False
        asked = 0

        async def lease_share(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
            self.asked += 1
            if self.away:
                raise StoreUnavailableError("away")
            return await super().lease_share(*args, **kwargs)

    store = Away(clock=clock)
    bulkhead = Bulkhead(4, distributed=True, store=store, name="db", shares=True, clock=clock)
    assert await bulkhead.call(ok) == "ok"
    store.away = True
    asked = store.asked
    for _ in range(3):
        assert await bulkhead.call(ok) == "ok"
    assert store.asked == asked  # from the share: no store call
    await advance(clock, 31.0)  # past the lease (renewals fail meanwhile)
    asked = store.asked
    assert await bulkhead.call(ok) == "ok"  # the store is down: the local limit admits it
    assert store.asked == asked + 1
    assert bulkhead.permits is not None
    assert bulkhead.permits.held == 0
    store.away = False


async def test_calls_on_a_share_wait_at_most_one_store_timeout_on_a_hung_redis(
    redis_url: str,
) -> None:
    """Redis stops answering (a blackhole) while 80 calls need the share to grow: they wait
    on one store call together and then run on the local limit; none waits on another's
    timeout after its own (all are admitted within about two store timeouts)."""
    from ..faultproxy import FaultProxy

    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = await FaultProxy(host, int(port)).start()
    store = RedisStore.from_url(proxy.url_for("redis"), prefix=unique_prefix())
    bulkhead = Bulkhead(100, distributed=True, store=store, name="db", shares=True)
    release, all_running = asyncio.Event(), asyncio.Event()
    running = 0

    async def hold() -> None:
        nonlocal running
        running += 1
        if running == 80:
            all_running.set()
        await release.wait()

    try:
        await bulkhead.call(ok)  # a share of one, granted
        proxy.blackhole = True
        start = time.perf_counter()
        calls = [asyncio.create_task(bulkhead.call(hold)) for _ in range(80)]
        await asyncio.wait_for(all_running.wait(), 30)
        took = time.perf_counter() - start
        release.set()
        await asyncio.gather(*calls)
    finally:
        proxy.blackhole = False
        await store.aclose()
        await proxy.stop()
    assert running == 80
    assert took < 2 * store.timeout + 1.5, took


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lease": 1e-9}, r"lease must be at least 1 s .*got 1e-09"),
        ({"lease": 0.9, "shares": False}, r"lease must be at least 1 s .*got 0.9"),
        ({"lease": float("nan")}, r"lease must be finite"),
        ({"max_concurrent": 10**30}, r"max_concurrent must be <= 1,000,000,000"),
    ],
)
def test_fleet_inputs_that_cannot_work_are_refused(options: dict[str, Any], match: str) -> None:
    """A lease too short to be renewed, NaN, or a limit no store can count: a ValueError at
    construction naming the parameter and the value."""
    config: dict[str, Any] = {"max_concurrent": 10, "shares": True, **options}
    with pytest.raises(ValueError, match=match):
        Bulkhead(distributed=True, store=MemoryStore(), name="db", **config)


async def test_the_shortest_lease_follows_the_stores_timeout(redis_url: str) -> None:
    """On a store with a 0.5 s timeout a lease must be at least 3 s (6 timeouts)."""
    store = RedisStore.from_url(redis_url, prefix=unique_prefix(), timeout=0.5)
    try:
        with pytest.raises(ValueError, match=r"lease must be at least 3 s .*got 2\.9"):
            Bulkhead(4, distributed=True, store=store, name="db", shares=True, lease=2.9)
        Bulkhead(4, distributed=True, store=store, name="db", shares=True, lease=3.0)
    finally:
        await store.aclose()


async def test_aclose_gives_the_share_back_to_the_fleet_at_once(clock: FakeClock) -> None:
    """A replica that closes its bulkhead gives its share back now: the replica taking its
    traffic gets every permit at once, not when the lease runs out."""
    leaving, staying = sharing(8, clock)
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    calls = [asyncio.create_task(leaving.call(hold)) for _ in range(8)]
    await settle()
    release.set()
    await asyncio.gather(*calls)
    with pytest.raises(BulkheadFullError):
        await staying.call(ok)  # the leaving replica's share still holds the permits
    await leaving.aclose()
    clock.advance(0.3)  # past the quarter second the fleet's "full" answer is trusted
    release.clear()
    calls = [asyncio.create_task(staying.call(hold)) for _ in range(8)]
    await settle()
    assert staying.in_flight == 8
    release.set()
    await asyncio.gather(*calls)
    await staying.aclose()


async def test_huge_but_finite_inputs_work(redis_url: str) -> None:
    """A lease of 1e300 s (kept ten years in Redis), a wait of 1e300 s and a billion
    permits: calls are admitted and limited as usual, nothing overflows."""
    store = RedisStore.from_url(redis_url, prefix=unique_prefix())
    try:
        for shares in (True, False):
            fleet = Bulkhead(
                10**9,
                distributed=True,
                store=store,
                name=f"big{shares}",
                lease=1e300,
                shares=shares,
            )
            assert await fleet.call(ok) == "ok"
            await fleet.aclose()
        local = Bulkhead(1, max_waiting=1, max_wait=1e300)
        assert await local.call(ok) == "ok"
    finally:
        await store.aclose()


# --- a permit source given (permits=) --------------------------------------------------------


class Counted:
    """A permit source of one's own: no permit at hand, every one a token it counts."""

    def __init__(self, store: MemoryStore, limit: int) -> None:
        self.store = store
        self.clock = store.clock
        self.limit = limit
        self.held = self.share = self.peak = self.own_limit = 0
        self.valid_until = -math.inf
        self.out: set[object] = set()
        self.taken = self.given = 0

    def take_now(self) -> bool:
        return False

    async def take(self) -> object:
        await asyncio.sleep(0)
        if len(self.out) >= self.limit:
            return None
        self.taken += 1
        token = object()
        self.out.add(token)
        return token

    async def give(self, permit: object) -> None:
        self.given += 1
        self.out.remove(permit)

    async def aclose(self) -> None:
        pass


async def test_a_permit_source_of_ones_own_is_asked_once_per_call(clock: FakeClock) -> None:
    """Bulkhead(permits=<any PermitSource>) takes one permit per call besides its slot and
    gives that very permit back, however the call ends (cancelled included); a full source
    rejects with its own limit, a call on the local limit never reaches it."""
    source = Counted(MemoryStore(clock=clock), limit=2)
    bulkhead = Bulkhead(3, permits=source, name="db", clock=clock)
    gate = Gate()
    running = [asyncio.create_task(bulkhead.call(gate, i)) for i in range(2)]
    await settle()
    assert len(source.out) == 2
    with pytest.raises(BulkheadFullError) as info:
        await bulkhead.call(gate, 9)
    assert info.value.max_concurrent == 2
    assert bulkhead.in_flight == 2  # the refused call gave its slot back
    running[0].cancel()
    gate.event(1).set()
    await asyncio.gather(*running, return_exceptions=True)
    with pytest.raises(ValueError, match="boom"):
        await bulkhead.call(boom)
    async with bulkhead:
        assert len(source.out) == 1
    assert (source.out, source.taken, source.given) == (set(), 4, 4)
    assert bulkhead.in_flight == 0


async def test_a_given_share_sets_the_local_limit_unless_told(clock: FakeClock) -> None:
    """With permits= the local limit is the source's limit by default, or max_concurrent
    (a replica's own cap under the fleet's); an adaptive limit needs no max_concurrent."""
    from resilience import AdaptiveLimit, FleetLeases, FleetShare

    store = MemoryStore(clock=clock)
    share = FleetShare(store, "db", limit=20, clock=clock)
    assert Bulkhead(permits=share, name="db").current_limit == 20
    capped = Bulkhead(5, permits=FleetLeases(store, "db2", limit=20), name="db2", clock=clock)
    assert capped.current_limit == 5
    gate = Gate()
    running = [asyncio.create_task(capped.call(gate, i)) for i in range(5)]
    await settle()
    with pytest.raises(BulkheadFullError) as info:
        await capped.call(gate, 9)
    assert info.value.max_concurrent == 5  # the local limit was full, not the fleet's
    assert await store.count_leases("db2") == 5
    for i in range(5):
        gate.event(i).set()
    await asyncio.gather(*running)
    adaptive = Bulkhead(limit=AdaptiveLimit(initial=4), permits=share, name="db")
    assert (adaptive.current_limit, adaptive.max_concurrent, share.own_limit) == (4, 20, 4)
    assert await adaptive.call(ok) == "ok"
    await share.aclose()


async def test_share_permits_in_the_context_manager_form(clock: FakeClock) -> None:
    """``async with`` over a share takes a permit at hand and gives it back on exit."""
    store = MemoryStore(clock=clock)
    bulkhead = Bulkhead(2, distributed=True, store=store, name="db", shares=True, clock=clock)
    share = bulkhead.permits
    assert share is not None
    async with bulkhead:
        assert share.held == 1
        async with bulkhead:
            assert share.held == 2
            with pytest.raises(BulkheadFullError):
                async with bulkhead:
                    pass
    assert (share.held, bulkhead.in_flight) == (0, 0)
    await bulkhead.aclose()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"permits": 3}, TypeError, "permits must be a PermitSource"),
        ({"distributed": True}, ValueError, "not both"),
        ({"shares": True}, ValueError, "not both"),
        ({"store": MemoryStore()}, ValueError, "not both"),
        ({"max_waiting": 1}, ValueError, "max_waiting must be 0"),
        ({"limit": "adaptive"}, ValueError, "max_concurrent or limit="),
    ],
)
def test_permits_given_with_options_that_cannot_work(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """permits= is a PermitSource, not next to the shorthand options that build one, nor a
    waiting queue; with an adaptive limit the fleet's cap is the source's limit."""
    from resilience import AdaptiveLimit, FleetShare

    config: dict[str, Any] = {"permits": FleetShare(MemoryStore(), "db", limit=4), **options}
    if config.get("limit") == "adaptive":
        config["limit"] = AdaptiveLimit()
    with pytest.raises(error, match=match):
        Bulkhead(4, name="db", **config)
