"""A shared breaker (``SharedBreakerCore`` and ``transition.lua``): the generations a replica
reports, and a quorum breaker's votes (how long they count, whose they are, what opens).

Real redis-servers; the fake clock drives breaker time (a store built with it passes its time
to the scripts), so votes and open periods are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    StateChanged,
    StoreDataReset,
)
from resilience.clock import Clock
from resilience.errors import StoreUnavailableError
from resilience.events import Event
from resilience.rules.breaker import BreakerConfig
from resilience.store.redis import RedisStore
from resilience.store.redis.breaker import VOTE_LEASE, SharedBreakerCore
from resilience.store.redis.primitives import (
    BreakerKeys,
    FleetState,
    FlushReply,
    Outcomes,
    ProbeReply,
)
from resilience.testing import FakeClock

from ..faultproxy import FaultProxy
from ..fork_support import in_forked_child
from ..redis_server import RedisServer
from .support import boom, ok, prefix, until

OPEN, CLOSED, HALF_OPEN = CircuitState.OPEN, CircuitState.CLOSED, CircuitState.HALF_OPEN


async def trip(b: CircuitBreaker, calls: int = 4) -> None:
    """Fail calls until this replica's own window opens its breaker."""
    for _ in range(calls):
        with contextlib.suppress(ValueError, CircuitOpenError):
            await b.call(boom)
    assert b.state is OPEN


async def warm(*replicas: tuple[RedisStore, CircuitBreaker]) -> None:
    """Each replica's breaker called once and its store synced: all have joined the fleet."""
    for store, b in replicas:
        await b.call(ok)
        await store.sync()


async def cut_off(proxy: FaultProxy, store: RedisStore, b: CircuitBreaker) -> None:
    """``store``'s replica cut off from Redis (connections dropped and refused), then its
    breaker tripped by its own outcomes: it decides alone from here on."""
    await proxy.set_refuse(True)
    proxy.cut()
    await trip(b)
    await until(lambda: store.degraded, 5.0, "degraded")


class Watch:
    """The generations one breaker reports: in its events and in its metrics, in order."""

    def __init__(self) -> None:
        self.events: list[StateChanged] = []
        self.seen: list[int] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self.events.append(event)

    def look(self, b: CircuitBreaker) -> int:
        generation = b.metrics().generation
        self.seen.append(generation)
        return generation

    def check(self) -> None:
        """Events strictly increasing, metrics never going down."""
        numbers = [e.generation for e in self.events]
        assert numbers == sorted(set(numbers)), numbers
        assert self.seen == sorted(self.seen), self.seen


async def fleet_gen(raw: aioredis.Redis, store: RedisStore, name: str = "dep") -> int:
    return int(await raw.hget(store.key(name, "state"), "gen") or -1)


async def votes(raw: aioredis.Redis, store: RedisStore, name: str = "dep") -> list[str]:
    fields = await raw.hkeys(store.key(name, "state"))
    return sorted(f.decode() for f in fields if f.startswith(b"v."))


def quorum_breaker(store: RedisStore, k: int, **options: Any) -> CircuitBreaker:
    options.setdefault("open_for", 30.0)
    return CircuitBreaker(
        "dep",
        store=store,
        window=CountWindow(4),
        minimum_calls=4,
        open_when="quorum",
        quorum=k,
        **options,
    )


async def voted(
    stores: Callable[..., RedisStore], clock: FakeClock
) -> tuple[RedisStore, RedisStore, CircuitBreaker, CircuitBreaker]:
    """Two replicas of a quorum-2 breaker: the first voted (its own window tripped), the
    second is healthy (it called once); both synced."""
    name = prefix()
    voter, healthy = stores(prefix=name, clock=clock), stores(prefix=name, clock=clock)
    bv, bh = quorum_breaker(voter, 2), quorum_breaker(healthy, 2)
    await bh.call(ok)
    await healthy.sync()
    await trip(bv)
    await voter.sync()
    return voter, healthy, bv, bh


# --- generations --------------------------------------------------------------------------


async def test_generations_stay_monotonic_when_redis_returns_from_a_pause(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """Redis paused while a replica opens, probes and re-opens on its own (generations 1-3):
    when it returns, the fleet opens above them, the replica reports no lower number, and
    replica, peer and fleet agree on every generation from then on."""
    watch = Watch()
    name = prefix()
    a = RedisStore.from_url(redis_server.url, prefix=name, clock=clock, timeout=0.1)
    b = RedisStore.from_url(redis_server.url, prefix=name, clock=clock, timeout=0.1)
    raw = aioredis.Redis.from_url(redis_server.url)
    options: dict[str, Any] = {"window": CountWindow(4), "minimum_calls": 4, "open_for": 10.0}
    ba = CircuitBreaker("dep", store=a, listeners=[watch], **options)
    bb = CircuitBreaker("dep", store=b, **options)
    try:
        await warm((a, ba), (b, bb))
        redis_server.pause()
        try:
            await trip(ba)  # generation 1, pushed to a Redis that does not answer
            await until(lambda: a.degraded, 5.0, "degraded")
            clock.advance(11)
            with pytest.raises(ValueError, match="boom"):
                await ba.call(boom)  # a local probe (2) fails: open again (3)
            assert ba.state is OPEN
            assert watch.look(ba) == 3
        finally:
            redis_server.resume()
        clock.advance(3)  # the reconnect back-off
        await until(lambda: not a.degraded, 10.0, "recovered")
        for s in (a, b, a):
            await s.sync()
        assert ba.state is OPEN
        assert bb.state is OPEN
        assert watch.look(ba) == bb.metrics().generation == await fleet_gen(raw, a)
        clock.advance(11)  # the fleet's open period is over: a fleet probe closes it
        assert await ba.call(ok) == "ok"
        for s in (a, b):
            await s.sync()
        assert ba.state is CLOSED
        assert bb.state is CLOSED
        assert watch.look(ba) == bb.metrics().generation == await fleet_gen(raw, a)
        watch.check()
        assert [e.new for e in watch.events] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]
    finally:
        await a.aclose()
        await b.aclose()
        await raw.aclose()


async def test_a_replica_back_from_an_outage_is_never_numbered_below_itself(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """A quorum breaker's replica cut off from Redis opens, probes and closes on its own
    (generations 1-3) while the fleet stays closed at 0: back, it keeps reporting 3, and the
    fleet's next transition (two peers' votes) is numbered above it, so all agree again."""
    watch = Watch()
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        name = prefix()
        a = RedisStore.from_url(proxy.url_for("redis"), prefix=name, clock=clock, timeout=0.2)
        peers = [
            RedisStore.from_url(redis_server.url, prefix=name, clock=clock, timeout=0.2)
            for _ in range(2)
        ]
        raw = aioredis.Redis.from_url(redis_server.url)
        ba = quorum_breaker(a, 2, open_for=10.0, listeners=[watch])
        bs = [quorum_breaker(s, 2, open_for=10.0) for s in peers]
        try:
            await warm(*zip([a, *peers], [ba, *bs], strict=True))
            await cut_off(proxy, a, ba)
            clock.advance(11)
            assert await ba.call(ok) == "ok"  # its own probe closes it: generation 3
            assert ba.state is CLOSED
            assert watch.look(ba) == 3
            await proxy.set_refuse(False)
            clock.advance(3)
            await until(lambda: not a.degraded, 10.0, "recovered")
            for s in (a, *peers, a):
                await s.sync()
            assert watch.look(ba) == 3
            assert await fleet_gen(raw, a) == 0  # closed: numbered above 3 at its next move
            for s, br in zip(peers, bs, strict=True):
                await trip(br)
                await s.sync()
            await until(lambda: ba.state is OPEN, 5.0, "the quorum")
            for s in peers:
                await s.sync()
            generations = [watch.look(ba), *(br.metrics().generation for br in bs)]
            assert generations == [await fleet_gen(raw, a)] * 3
            assert generations[0] > 3
            watch.check()
        finally:
            for s in (a, *peers):
                await s.aclose()
            await raw.aclose()


async def test_an_open_fleet_takes_the_number_of_a_replica_back_from_an_outage(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """While a replica is cut off and re-opens on its own (generations 1-3), a peer opens the
    fleet (1). Back, the replica's push loses to the fleet's newer state, which it takes
    without going back: the open fleet is renumbered to its 3 at once, peer included."""
    watch, peer_watch = Watch(), Watch()
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        name = prefix()
        a = RedisStore.from_url(proxy.url_for("redis"), prefix=name, clock=clock, timeout=0.2)
        b = RedisStore.from_url(redis_server.url, prefix=name, clock=clock, timeout=0.2)
        raw = aioredis.Redis.from_url(redis_server.url)
        options: dict[str, Any] = {"window": CountWindow(4), "minimum_calls": 4, "open_for": 10}
        ba = CircuitBreaker("dep", store=a, listeners=[watch], **options)
        bb = CircuitBreaker("dep", store=b, listeners=[peer_watch], **options)
        try:
            await warm((a, ba), (b, bb))
            await cut_off(proxy, a, ba)
            await trip(bb)
            await b.sync()
            assert await fleet_gen(raw, b) == 1
            clock.advance(11)
            with pytest.raises(ValueError, match="boom"):
                await ba.call(boom)  # its own probe (2) fails: open again (3)
            await proxy.set_refuse(False)
            clock.advance(3)
            await until(lambda: not a.degraded, 10.0, "recovered")
            for s in (a, a, b):
                await s.sync()
            assert ba.state is bb.state is OPEN
            assert watch.look(ba) == peer_watch.look(bb) == await fleet_gen(raw, a) == 3
            clock.advance(11)
            assert await ba.call(ok) == "ok"  # a fleet probe closes it
            for s in (a, b):
                await s.sync()
            assert ba.state is bb.state is CLOSED
            assert watch.look(ba) == peer_watch.look(bb) == await fleet_gen(raw, a)
            watch.check()
            peer_watch.check()
        finally:
            await a.aclose()
            await b.aclose()
            await raw.aclose()


@pytest.mark.parametrize("value", ["nan", "-1", "1e300", "abc"])
async def test_a_garbage_floor_is_reset_and_reported(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis, value: str
) -> None:
    """A floor ("fl") that is no generation the store writes is deleted and reported with
    StoreDataReset; the next transition is numbered as if it were absent."""
    events: list[Event] = []
    store = stores(clock=clock, listeners=[events.append])
    b = CircuitBreaker("dep", store=store, window=CountWindow(4), minimum_calls=4)
    await b.call(ok)
    await store.sync()
    key = store.key("dep", "state")
    await raw.hset(key, "fl", value)
    await trip(b)
    await store.sync()
    assert await raw.hget(key, "state") == b"open"
    assert await fleet_gen(raw, store) == 1
    assert await raw.hget(key, "fl") is None
    assert any(isinstance(e, StoreDataReset) for e in events)


class StubEngine:
    """The engine protocol without Redis: the store never answers a probe or a transition
    (the core then decides locally); the test plays the fleet's replies itself."""

    sync_interval = 0.05
    strict = False

    def __init__(self) -> None:
        self.degraded = False

    def mark(self, core: SharedBreakerCore) -> None:
        core.marked = True

    def wake(self) -> None:
        pass

    def enqueue(self, core: SharedBreakerCore, op: object) -> None:
        pass

    async def probe(self, core: SharedBreakerCore, lease: int) -> ProbeReply:
        raise StoreUnavailableError("stub")

    async def transition(self, core: SharedBreakerCore, wanted: object) -> None:
        raise StoreUnavailableError("stub")

    async def commit(self) -> None:
        pass


class OneCoreStore:
    """A store handing out one given core (what a ``CircuitBreaker`` needs of a store)."""

    def __init__(self, core: SharedBreakerCore, clock: Clock) -> None:
        self.core = core
        self.clock = clock

    def breaker(self, name: str, config: BreakerConfig, clock: Clock) -> SharedBreakerCore:
        return self.core

    async def acquire_lease(self, *_: object, **__: object) -> None:
        return None

    async def release_lease(self, *_: object, **__: object) -> bool:
        return False

    async def status(self) -> list[object]:
        return []

    async def sync(self) -> None:
        pass


_STATES = [CLOSED, OPEN, HALF_OPEN, CircuitState.FORCED_OPEN]
_steps = st.one_of(
    st.tuples(st.just("call"), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 6.0, 11.0])),
    st.tuples(st.just("degrade"), st.booleans()),
    st.tuples(st.just("fleet"), st.tuples(st.sampled_from(_STATES), st.integers(-3, 3))),
    st.tuples(st.just("flush"), st.tuples(st.sampled_from(_STATES), st.integers(-3, 3))),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_steps, max_size=40))
def test_reported_generations_never_go_back(steps: list[tuple[str, Any]]) -> None:
    """Any mix of local moves (calls, a degraded store) and fleet states adopted (replies,
    messages; numbered below, at or above the replica's): the generations a replica
    reports never go down, and each event's is above the previous one's."""
    clock = FakeClock()
    engine = StubEngine()
    config = BreakerConfig(window=CountWindow(2), minimum_calls=2, open_for=5.0)
    core = SharedBreakerCore("p", config, clock, engine, BreakerKeys("s", "w", "p", "r"))
    watch = Watch()
    options: dict[str, Any] = {"window": CountWindow(2), "minimum_calls": 2, "open_for": 5.0}
    store: Any = OneCoreStore(core, clock)
    b = CircuitBreaker("p", store=store, listeners=[watch], **options)
    loop = asyncio.new_event_loop()
    try:
        for kind, arg in steps:
            if kind == "call":
                fn = ok if arg else boom
                with contextlib.suppress(ValueError, CircuitOpenError):
                    loop.run_until_complete(b.call(fn))
            elif kind == "advance":
                clock.advance(arg)
            elif kind == "degrade":
                engine.degraded = arg
            else:
                state, delta = arg
                now = clock.monotonic()
                fleet = FleetState(
                    state=state,
                    gen=max(0, core.fleet_gen + delta),
                    open_until_ms=int((now + 5) * 1000) if state is OPEN else 0,
                    reopens=0,
                    server_ms=int(now * 1000),
                    reset=0,
                )
                if kind == "fleet":
                    core.adopt(fleet, now)
                else:
                    sent = Outcomes(fleet.gen, 0, 0, 0, 0)
                    core.on_flush(sent, FlushReply(fleet, 0, 0, 0), now, False)
            watch.look(b)
            watch.check()
    finally:
        loop.close()


# --- quorum votes -------------------------------------------------------------------------


async def test_a_closed_store_withdraws_its_vote(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """A voter's store closed (a clean shutdown) takes its vote away at once: the same host
    restarted under a new replica id votes alone, and the healthy replicas stay closed."""
    sick, healthy, _, bh = await voted(stores, clock)
    assert await votes(raw, sick) == [f"v.{sick.replica}"]
    await sick.aclose()
    assert await votes(raw, sick) == []
    restarted = stores(prefix=sick.prefix, clock=clock)
    assert restarted.replica != sick.replica
    await trip(quorum_breaker(restarted, 2))
    await restarted.sync()
    await healthy.sync()
    assert bh.state is CLOSED
    assert [await bh.call(ok) for _ in range(20)] == ["ok"] * 20


async def test_a_dead_replicas_vote_lapses_within_the_vote_lease(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """A voter that dies without closing its store (a forked child that exits) stops
    renewing its vote: past the vote lease it no longer counts, though its own open period
    (30 s) is far from over, so a new replica's vote alone opens nothing."""
    name = prefix()
    store = stores(prefix=name, clock=clock)
    b = quorum_breaker(store, 2)
    await b.call(ok)
    await store.sync()

    async def die_after_voting() -> str:
        await trip(b)
        await store.sync()
        return store.replica

    dead = in_forked_child(die_after_voting)
    assert await votes(raw, store) == [f"v.{dead}"]
    clock.advance(VOTE_LEASE + 0.01)
    other = stores(prefix=name, clock=clock)
    await trip(quorum_breaker(other, 2))
    await other.sync()
    await store.sync()
    assert b.state is CLOSED
    assert await votes(raw, store) == [f"v.{other.replica}"]


async def test_a_live_voter_renews_its_vote_for_its_whole_open_period(
    stores: Callable[..., RedisStore], clock: FakeClock
) -> None:
    """A voter that stays alive (but makes no call) keeps its vote past the vote lease while
    its own open period lasts: a second vote 10 s later reaches the quorum."""
    first, second, b1, b2 = await voted(stores, clock)
    for _ in range(40):
        clock.advance(0.25)  # renewals are due now and then: each runs a round
        await first.engine.next_round()
    await trip(b2)
    await second.sync()
    await until(lambda: b1.state is OPEN and b2.state is OPEN, 5.0, "the quorum")
    assert b1.metrics().generation == b2.metrics().generation


async def test_a_forked_child_does_not_inherit_its_parents_vote(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """A process whose breaker tripped forks two workers that never call the dependency:
    they start from the fleet's state (closed) and cast no vote; quorum 3 is not reached."""
    name = prefix()
    store = stores(prefix=name, clock=clock)
    b = quorum_breaker(store, 3)
    await b.call(ok)
    await store.sync()
    await trip(b)
    await store.sync()

    async def worker() -> str:
        await store.sync()
        return f"{b.state.value} {store.replica}"

    children = [in_forked_child(worker).split() for _ in range(2)]
    assert [state for state, _ in children] == ["closed", "closed"]
    assert len({replica for _, replica in children} | {store.replica}) == 3
    await store.sync()
    assert await votes(raw, store) == [f"v.{store.replica}"]
    assert b.state is OPEN  # the parent's own trip: its own, still
    state = await raw.hget(store.key("dep", "state"), "state")
    assert state == b"closed"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "abc"])
async def test_garbage_votes_are_reset_and_reported(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis, value: str
) -> None:
    """Vote fields that hold no time we write count for nothing: deleted, reported with
    StoreDataReset, and one real vote does not reach quorum 2 with them."""
    events: list[Event] = []
    store = stores(clock=clock, listeners=[events.append])
    b = quorum_breaker(store, 2)
    await b.call(ok)
    await store.sync()
    key = store.key("dep", "state")
    gen = await fleet_gen(raw, store)
    await raw.hset(key, mapping={"vg": gen, "v.ghost1": value, "v.ghost2": value})
    await trip(b)
    await store.sync()
    assert await raw.hget(key, "state") == b"closed"
    assert await votes(raw, store) == [f"v.{store.replica}"]
    assert any(isinstance(e, StoreDataReset) for e in events)


async def test_a_quorum_opens_the_fleet_for_the_fleets_own_open_time(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """open_for=0.5: a replica sick for long (its own re-opens grew its open time to 8 s)
    casts the deciding vote; the fleet's first opening still lasts 0.5 s."""
    name = prefix()
    long_sick, newly_sick = stores(prefix=name, clock=clock), stores(prefix=name, clock=clock)
    options: dict[str, Any] = {"open_for": 0.5, "open_for_max": 8.0}
    bl, bn = quorum_breaker(long_sick, 2, **options), quorum_breaker(newly_sick, 2, **options)
    await bn.call(ok)
    await newly_sick.sync()
    await trip(bl)
    for open_for in (0.5, 1.0, 2.0):  # its own probes fail: it re-opens for longer
        clock.advance(open_for)
        with pytest.raises(ValueError, match="boom"):
            await bl.call(boom)
        assert bl.metrics().open_for == open_for * 2
        await long_sick.sync()
    clock.advance(4.0)  # its vote has lapsed with its open period
    await trip(bn)  # a first vote ...
    await newly_sick.sync()
    with pytest.raises(ValueError, match="boom"):
        await bl.call(boom)  # ... and the long-sick replica's next re-open (8 s) decides
    assert bl.metrics().open_for == 8.0
    await long_sick.sync()
    key = long_sick.key("dep", "state")
    assert await raw.hget(key, "state") == b"open"
    open_ms = int(await raw.hget(key, "open_until")) - round(clock.monotonic() * 1000)
    assert open_ms == 500
    await until(lambda: bn.state is OPEN, 5.0, "the fleet opened")
    assert bn.metrics().open_for == 0.5
