"""Coalesce across a fleet (``Coalesce(store=...)``, ``FleetFlight``): replicas in one
process sharing a MemoryStore, on a fake clock."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience import Coalesce, MemoryStore
from resilience.testing import FakeClock

from ..helpers import advance, cancelled, settle, started
from ..test_bad_input import JUNK

LEASE = 3.0
POLL = 0.1


class Upstream:
    """The dependency: counts the calls of each replica; each call waits for ``gate``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate = asyncio.Event()
        self.result: Any = {"price": 9.5}
        self.error: Exception | None = None

    def replica(self, name: str) -> Any:
        async def fetch(item: str) -> Any:
            self.calls[name] += 1
            await self.gate.wait()
            if self.error is not None:
                raise self.error
            return self.result

        fetch.__qualname__ = "fetch"  # every replica runs the same function
        return fetch


async def polled(clock: FakeClock, tasks: list[asyncio.Task[Any]]) -> list[Any]:
    """Move the clock on a poll at a time until every task is done (at most 100 polls);
    their outcomes."""
    for _ in range(100):
        if all(t.done() for t in tasks):
            break
        await advance(clock, POLL)
    return await asyncio.gather(*tasks, return_exceptions=True)


def replicas(
    store: object, upstream: Upstream, clock: FakeClock, count: int = 3, **options: Any
) -> list[Any]:
    """``count`` replicas' ``fetch``, each through its own Coalesce on ``store``."""
    made = []
    for i in range(count):
        policy = Coalesce(
            store=store, lease=LEASE, poll=POLL, clock=clock, name="prices", **options
        )  # type: ignore[arg-type]
        made.append(policy(upstream.replica(f"r{i}")))
    return made


async def test_three_replicas_make_one_upstream_call(clock: FakeClock) -> None:
    """3 replicas x 5 concurrent identical calls reach the upstream once; all get its
    result, the other replicas' callers a decoded copy."""
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    fleet = replicas(store, upstream, clock)
    tasks = [await started(fetch("tea")) for fetch in fleet for _ in range(5)]
    assert sum(upstream.calls.values()) == 1
    upstream.gate.set()
    results = await polled(clock, tasks)
    assert all(r == {"price": 9.5} for r in results)
    assert sum(upstream.calls.values()) == 1


async def test_waiting_replicas_wake_when_the_flight_lands(clock: FakeClock) -> None:
    """The other replicas' callers get the result as the holder publishes it, without
    waiting for their next poll (the clock does not move)."""
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    fleet = replicas(store, upstream, clock)
    tasks = [await started(fetch("tea")) for fetch in fleet]
    upstream.gate.set()
    await settle()
    assert all(t.done() for t in tasks)
    assert [t.result() for t in tasks] == [{"price": 9.5}] * 3


async def test_the_next_call_runs_afresh(clock: FakeClock) -> None:
    """A result published for one flight is not served to a call that starts after it was
    published."""
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    upstream.gate.set()
    one, two = replicas(store, upstream, clock, count=2)
    assert await one("tea") == {"price": 9.5}
    await settle()  # the holder publishes in the background, after its callers have it
    assert await two("tea") == {"price": 9.5}
    assert upstream.calls == Counter(r0=1, r1=1)


async def test_failure_lets_each_waiting_replica_run_its_own(clock: FakeClock) -> None:
    """When the holder's call fails, each waiting replica runs the call itself (once)."""
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    upstream.error = ConnectionError("down")
    fleet = replicas(store, upstream, clock)
    tasks = [await started(fetch("tea")) for fetch in fleet for _ in range(2)]
    upstream.gate.set()
    outcomes = await polled(clock, tasks)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert upstream.calls == Counter(r0=1, r1=1, r2=1)


async def test_result_that_cannot_travel_is_not_shared(clock: FakeClock) -> None:
    """A result the serializer cannot encode, or one over max_bytes, is not published: the
    holder's callers get it, each waiting replica runs its own call."""
    for result, options in (({1, 2}, {}), ("x" * 100, {"max_bytes": 50})):
        store = MemoryStore(clock=clock)
        upstream = Upstream()
        upstream.result = result
        one, two = replicas(store, upstream, clock, count=2, **options)
        first = await started(one("tea"))
        second = await started(two("tea"))
        upstream.gate.set()
        assert await polled(clock, [first, second]) == [result, result]
        assert upstream.calls == Counter(r0=1, r1=1)


async def test_holder_whose_callers_left_gives_the_flight_to_a_waiter(clock: FakeClock) -> None:
    """When every caller of the holding replica is cancelled, its lease is given back and a
    waiting replica takes over at its next look, without waiting for the lease to lapse."""
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    one, two = replicas(store, upstream, clock, count=2)
    first = await started(one("tea"))
    second = await started(two("tea"))
    await cancelled(first)
    await advance(clock, POLL)
    assert upstream.calls == Counter(r0=1, r1=1)
    upstream.gate.set()
    await settle()
    assert await second == {"price": 9.5}


async def test_stalled_holder_is_taken_over_and_fenced(clock: FakeClock) -> None:
    """A holder that stops renewing (its clock stands still, as if SIGSTOPped) loses the
    flight when its lease lapses: a waiter runs the call; the stalled holder, back, cannot
    publish over it."""
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    frozen = FakeClock()  # the stalled replica's timers never fire: it never renews
    (stalled,) = replicas(store, upstream, frozen, count=1)
    (waiter,) = replicas(store, upstream, clock, count=1)
    first = await started(stalled("tea"))
    second = await started(waiter("tea"))
    for _ in range(int(LEASE / POLL) + 1):
        await advance(clock, POLL)
    assert sum(upstream.calls.values()) == 2
    upstream.gate.set()
    await settle()
    assert await first == {"price": 9.5}
    assert await second == {"price": 9.5}
    late = await started(waiter("tea"))  # a new call: the old flights are over
    await settle()
    assert sum(upstream.calls.values()) == 3
    await late


async def test_store_down_runs_each_replica_alone(clock: FakeClock) -> None:
    """A store that says it is down is not asked: each replica runs the call once, still
    sharing it among its own callers."""
    store = MemoryStore(clock=clock)
    store.degraded = True
    upstream = Upstream()
    fleet = replicas(store, upstream, clock, count=2)
    tasks = [await started(fetch("tea")) for fetch in fleet for _ in range(3)]
    upstream.gate.set()
    await asyncio.gather(*tasks)
    assert upstream.calls == Counter(r0=1, r1=1)


class FailingStore(MemoryStore):
    """A store whose flight primitives fail (an outage that has not been noticed yet)."""

    async def flight_join(self, *args: Any, **kwargs: Any) -> tuple[str, bytes | None]:
        raise ConnectionError("store away")


async def test_store_failure_is_no_failure_of_the_call(clock: FakeClock) -> None:
    """A store that fails is not the call's failure: the replica runs it itself."""
    upstream = Upstream()
    upstream.gate.set()
    (fetch,) = replicas(FailingStore(clock=clock), upstream, clock, count=1)
    assert await fetch("tea") == {"price": 9.5}


async def test_key_must_be_a_str_with_a_store(clock: FakeClock) -> None:
    """With a store, ``key`` must return a non-empty str (it names the flight fleet-wide)."""
    upstream = Upstream()
    (fetch,) = replicas(MemoryStore(clock=clock), upstream, clock, count=1, key=lambda item: 7)
    with pytest.raises(TypeError, match="str"):
        await fetch("tea")


class TextSerializer:
    """A serializer that breaks its contract: ``dumps`` returns a str, not bytes."""

    def dumps(self, value: Any, /) -> Any:
        return repr(value)

    def loads(self, data: bytes, /) -> Any:
        return data


async def test_a_serializer_that_returns_no_bytes_is_no_failure_of_the_call(
    clock: FakeClock,
) -> None:
    """A serializer whose ``dumps`` returns a str: the holder's callers still get the
    result (nothing travels), and the waiting replica runs its own call."""
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    one, two = replicas(store, upstream, clock, count=2, serializer=TextSerializer())
    first = await started(one("tea"))
    second = await started(two("tea"))
    upstream.gate.set()
    assert await polled(clock, [first, second]) == [{"price": 9.5}] * 2
    assert upstream.calls == Counter(r0=1, r1=1)


class Unprintable:
    """An argument whose ``repr`` raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_an_argument_without_a_repr_runs_the_call_unshared(clock: FakeClock) -> None:
    """The default fleet key is the arguments' ``repr``: a call whose argument has none
    runs on its own (as a call with an unhashable argument does), it does not fail."""
    upstream = Upstream()
    upstream.gate.set()
    (fetch,) = replicas(MemoryStore(clock=clock), upstream, clock, count=1)
    assert await fetch(Unprintable()) == {"price": 9.5}
    assert upstream.calls == Counter(r0=1)


class SlowJoin(MemoryStore):
    """A store whose ``flight_join`` reply comes back only when ``reply`` is set: the join
    is applied (the lease may be granted) before the caller sees it."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.reply = asyncio.Event()

    async def flight_join(self, *args: Any, **kwargs: Any) -> tuple[str, bytes | None]:
        joined = await super().flight_join(*args, **kwargs)
        await self.reply.wait()
        return joined


async def test_a_join_cancelled_after_its_grant_gives_the_lease_back(clock: FakeClock) -> None:
    """A replica whose callers leave while its join's reply is on the way (the store gave
    it the lease) gives the lease back: the next replica runs the call at once instead of
    waiting for the lease to lapse."""
    store = SlowJoin(clock=clock)
    upstream = Upstream()
    upstream.gate.set()
    one, two = replicas(store, upstream, clock, count=2)
    first = await started(one("tea"))
    await cancelled(first)
    store.reply.set()
    second = await started(two("tea"))
    await settle()
    assert second.done()
    assert await second == {"price": 9.5}
    assert upstream.calls == Counter(r1=1)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"store": object()}, TypeError, "store"),
        ({"lease": 0}, ValueError, "lease"),
        ({"poll": 5.0, "lease": 5.0}, ValueError, "poll"),
        ({"serializer": "json"}, TypeError, "serializer"),
        ({"max_bytes": 1 << 20}, ValueError, "max_bytes"),
    ],
)
def test_bad_fleet_options(options: dict[str, Any], error: type[Exception], match: str) -> None:
    """Bad fleet options are refused at construction, naming the option, with a store or
    without one (where they would be unused)."""
    with pytest.raises(error, match=match):
        Coalesce(**{"store": MemoryStore(), **options})
    if "store" not in options:
        with pytest.raises(error, match=match):
            Coalesce(**options)


FLEET_OPS = st.one_of(
    st.tuples(st.just("call"), st.integers(0, 2), st.sampled_from("ab")),
    st.tuples(st.just("cancel"), st.integers(0, 30), st.just("")),
    st.tuples(st.just("release"), st.integers(0, 0), st.just("")),
    st.tuples(st.just("poll"), st.integers(1, 3), st.just("")),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(FLEET_OPS, min_size=1, max_size=20))
def test_fleet_property(ops: list[tuple[str, int, str]]) -> None:
    """Whatever the order of calls on three replicas, cancellations, returns and polls:
    every caller not cancelled gets the result of its own key, and at the end no flight is
    held in the store and no task is left."""

    async def main() -> None:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        gate = asyncio.Event()

        async def fetch(item: str) -> str:
            await gate.wait()
            return item.upper()

        fleet = [
            Coalesce(store=store, key=str, lease=LEASE, poll=POLL, clock=clock, name="p")(fetch)
            for _ in range(3)
        ]
        calls: list[tuple[str, asyncio.Task[Any]]] = []
        gone: set[int] = set()
        for op, n, item in ops:
            if op == "call":
                calls.append((item, asyncio.create_task(fleet[n](item))))
            elif op == "cancel" and calls:
                if calls[n % len(calls)][1].cancel():
                    gone.add(n % len(calls))
            elif op == "release":
                gate.set()
                await settle()
                gate.clear()
            else:
                for _ in range(n):
                    await advance(clock, POLL)
            await settle(3)
        gate.set()
        outcomes = await polled(clock, [t for _, t in calls])
        for i, ((item, _), outcome) in enumerate(zip(calls, outcomes, strict=True)):
            if i in gone:
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert outcome == item.upper()
        await settle()
        for item in "ab":  # free: whoever asks next holds it
            assert await store.flight_join("p", item, holder="x", awaited="", ttl=1) == ("x", None)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


COALESCE_OPTIONS = ["key", "copy", "lease", "poll", "serializer", "max_bytes", "name", "clock"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(COALESCE_OPTIONS), JUNK, max_size=4), st.booleans())
def test_any_options_construct_or_raise_value_or_type_error(
    options: dict[str, Any], shared: bool
) -> None:
    """Coalesce fed junk options builds a policy that runs a call, or raises ValueError /
    TypeError at construction."""
    if shared:
        options["store"] = MemoryStore()
    try:
        policy = Coalesce(**options)
    except (ValueError, TypeError):
        return

    async def one() -> int:
        return 1

    async def main() -> None:
        assert await policy.call(one) == 1

    asyncio.run(main())
