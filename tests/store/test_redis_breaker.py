"""A shared breaker (``SharedBreakerCore`` and ``transition.lua``): the generations a replica
reports, with Redis paused or cut off, and against a stub engine (hypothesis). A quorum
breaker's votes are in ``test_redis_quorum``.

Real redis-servers; the fake clock drives breaker time (a store built with it passes its time
to the scripts), so votes and open periods are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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
from resilience.store.redis.breaker import SharedBreakerCore
from resilience.store.redis.primitives import (
    BreakerKeys,
    FleetState,
    FlushReply,
    Outcomes,
    ProbeReply,
)
from resilience.testing import FakeClock

from ..faultproxy import FaultProxy
from ..helpers import boom, ok, unique_prefix, until
from ..redis_server import RedisServer
from .support import fleet_gen, quorum_breaker, trip

OPEN, CLOSED, HALF_OPEN = CircuitState.OPEN, CircuitState.CLOSED, CircuitState.HALF_OPEN


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


# --- generations --------------------------------------------------------------------------


async def test_generations_stay_monotonic_when_redis_returns_from_a_pause(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """Redis paused while a replica opens, probes and re-opens on its own (generations 1-3):
    when it returns, the fleet opens above them, the replica reports no lower number, and
    replica, peer and fleet agree on every generation from then on."""
    watch = Watch()
    name = unique_prefix()
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
        name = unique_prefix()
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
        name = unique_prefix()
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

    def push(self, core: SharedBreakerCore) -> None:
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


async def test_every_outcome_is_flushed_once(
    stores: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Successes and failures in any order, with flushes in between (a success in a full
    window of successes takes the wrapper's short path, the others the core's): the flushes
    carry each outcome exactly once."""
    flushed = [0, 0]
    take = SharedBreakerCore.take_outcomes

    def counted(core: SharedBreakerCore, seq: int) -> list[Any]:
        flushed[0] += core.pending.calls
        flushed[1] += core.pending.failures
        return take(core, seq)

    monkeypatch.setattr(SharedBreakerCore, "take_outcomes", counted)
    rng = random.Random(7)
    store = stores()
    # a window of 10 opens only on 10 failures in a row: never here
    b = CircuitBreaker("dep", store=store, window=CountWindow(10), failure_ratio=1.0)
    calls = failures = 0
    for _ in range(60):
        if rng.random() < 0.2:
            await store.sync()
        for _ in range(rng.randint(0, 4)):
            calls += 1
            failures += 1
            with pytest.raises(ValueError, match="boom"):
                await b.call(boom)
        for _ in range(rng.randint(1, 40)):
            calls += 1
            await b.call(ok)
    await store.sync()
    assert b.state is CircuitState.CLOSED
    assert flushed == [calls, failures]
