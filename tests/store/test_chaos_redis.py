"""Redis chaos: RedisStore behind a fault proxy, a real redis-server behind the proxy.

Each scenario runs a load loop through a shared breaker (and, in a second loop, a pipeline
with a shared RateLimiter and a distributed Bulkhead) on replica A, which reaches Redis
through the proxy, while a fault is on. It asserts that no call fails or waits because of the
store, that the store turns degraded when it must and recovers once the fault is lifted, and
that state converges afterwards: replica C, which reaches Redis directly, trips the breaker
and A must see it OPEN within a bound. Measured numbers are printed (run with ``-s``) and
recorded in docs/reliability.md. ``--full`` runs longer faults and more cuts. The faults that
once broke the store are regression tests of their own, in ``test_chaos_regressions``.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from resilience import (
    Bulkhead,
    CircuitOpenError,
    CircuitState,
    Pipeline,
    RateLimiter,
    StoreDegraded,
    StoreRecovered,
)
from resilience.events import Event
from resilience.store.redis import RedisStore

from .. import helpers
from ..faultproxy import Connection, FaultProxy
from ..helpers import ok, until
from ..redis_server import RedisServer
from .support import TIMEOUT as STORE_TIMEOUT
from .support import fleet_breaker, report, subscribed

CLOSED_PATH_BOUND = 0.05  # seconds: a call through a closed shared breaker never waits longer
SLACK = 0.25  # scheduling on a loaded 2-core machine


class UpstreamError(Exception):
    """What the test's own upstream raises (1 call in 20): the only failures allowed."""


async def upstream(i: int) -> int:
    """The protected function: yields to the loop once, fails every 20th call."""
    await asyncio.sleep(0)
    if i % 20 == 19:
        raise UpstreamError(i)
    return i


async def boom() -> None:
    """A call that fails."""
    raise UpstreamError("boom")


@dataclass
class Stats:
    """Durations and outcomes of one load loop."""

    label: str
    durations: list[float] = field(default_factory=list)
    expected: int = 0
    unexpected: list[str] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the durations, in seconds (0.0 when empty)."""
        if not self.durations:
            return 0.0
        ordered = sorted(self.durations)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def slowest(self) -> float:
        """The longest call, in seconds."""
        return max(self.durations, default=0.0)

    def line(self) -> str:
        """One printable line: count, p50 / p99 / max in milliseconds, failures."""
        return (
            f"{self.label}: n={len(self.durations)} p50={self.quantile(0.5) * 1000:.2f}ms "
            f"p99={self.quantile(0.99) * 1000:.2f}ms max={self.slowest * 1000:.2f}ms "
            f"upstream failures={self.expected} other failures={len(self.unexpected)}"
        )


class Rig:
    """Replica A behind the proxy, replica C direct, both on one private redis-server."""

    def __init__(self, server: RedisServer, proxy: FaultProxy, **options: Any) -> None:
        self.server = server
        self.proxy = proxy
        self.events: list[Event] = []
        prefix = helpers.unique_prefix("chaos")
        options.setdefault("sync_interval", 0.05)
        self.sync_interval: float = options["sync_interval"]
        self.a_store = RedisStore.from_url(
            proxy.url_for("redis"), prefix=prefix, listeners=[self.events.append], **options
        )
        self.c_store = RedisStore.from_url(server.url, prefix=prefix, **options)
        self.a = fleet_breaker(self.a_store)
        self.c = fleet_breaker(self.c_store)
        self.pipeline = Pipeline(
            self.a,
            RateLimiter(10_000, store=self.a_store, name="api"),
            Bulkhead(4, distributed=True, store=self.a_store, name="pool"),
        )

    async def aclose(self) -> None:
        """Close both stores."""
        await self.a_store.aclose()
        await self.c_store.aclose()

    def count(self, kind: type[Event]) -> int:
        """How many events of ``kind`` replica A's store emitted."""
        return sum(isinstance(e, kind) for e in self.events)

    async def warm(self) -> None:
        """Both replicas learn the breaker and the pipeline's keys exist; subscribers attach."""
        await self.a.call(ok)
        await self.pipeline.call(ok)
        await self.c.call(ok)
        await self.a_store.sync()
        await self.c_store.sync()
        await subscribed(self.c_store.client, self.c_store.channel, 2)

    async def load(self, seconds: float, *, pipeline: bool = True) -> tuple[Stats, Stats]:
        """Run the breaker loop (and the pipeline loop, two workers) for ``seconds``."""
        closed = Stats("breaker only")
        piped = Stats("breaker+rate limit+bulkhead")
        end = time.monotonic() + seconds

        async def loop(call: Callable[..., Any], stats: Stats) -> None:
            for i in itertools.count():
                if time.monotonic() >= end:
                    return
                start = time.perf_counter()
                try:
                    await call(upstream, i)
                except UpstreamError:
                    stats.expected += 1
                except Exception as exc:
                    stats.unexpected.append(repr(exc))
                stats.durations.append(time.perf_counter() - start)
                await asyncio.sleep(0.001)

        loops = [loop(self.a.call, closed)]
        if pipeline:
            loops += [loop(self.pipeline.call, piped), loop(self.pipeline.call, piped)]
        await asyncio.gather(*loops)
        return closed, piped

    def degraded_more_than(self, n: int) -> Callable[[], bool]:
        """A condition: A's store has emitted more than ``n`` StoreDegraded events."""
        return lambda: self.count(StoreDegraded) > n

    async def recovered(self, seconds: float = 10.0) -> float:
        """Wait until A's store is healthy and every degradation was followed by a recovery."""
        return await until(
            lambda: (
                not self.a_store.degraded
                and self.count(StoreRecovered) == self.count(StoreDegraded)
            ),
            seconds,
            "recovery",
        )

    async def converge(self, seconds: float = 5.0) -> float:
        """C trips the breaker; seconds from C seeing OPEN until A (calling) rejects as OPEN."""
        for _ in range(200):
            try:
                await self.c.call(boom)
            except (UpstreamError, CircuitOpenError):
                pass
            if self.c.state is CircuitState.OPEN:
                break
            await asyncio.sleep(0.001)
        assert self.c.state is CircuitState.OPEN
        start = time.monotonic()
        while True:
            try:
                await self.a.call(ok)
            except CircuitOpenError:
                return time.monotonic() - start
            assert time.monotonic() - start < seconds, "A never saw the breaker open"
            await asyncio.sleep(0.001)


@pytest.fixture
async def rig_factory(
    redis_server: RedisServer,
) -> AsyncIterator[Callable[..., Any]]:
    """Make rigs (proxy + two replicas) on this test's own server; all closed at the end."""
    made: list[tuple[Rig, FaultProxy]] = []

    async def make(**options: Any) -> Rig:
        proxy = await FaultProxy("127.0.0.1", redis_server.port, seed=1).start()
        rig = Rig(redis_server, proxy, **options)
        made.append((rig, proxy))
        await rig.warm()
        return rig

    yield make
    for rig, proxy in made:
        proxy.clear()
        if proxy.refuse:
            await proxy.set_refuse(False)
        await rig.aclose()
        await proxy.stop()


def assert_unharmed(closed: Stats, piped: Stats, converge: float) -> None:
    """No call failed but for the upstream's own errors; nothing waited on the store (the
    pipeline's shared limiter and bulkhead ask Redis on every call: each of their, up to
    three, store calls is bounded by the store's timeout, never by a reconnect); C's trip
    reached A within a second."""
    assert closed.unexpected == [], closed.unexpected[:5]
    assert closed.expected > 0
    assert closed.slowest < CLOSED_PATH_BOUND, closed.line()
    assert piped.unexpected == [], piped.unexpected[:5]
    assert piped.slowest < 3 * STORE_TIMEOUT + SLACK, piped.line()
    assert converge < 1.0


async def lifted(rig: Rig, fault: str, held: float, closed: Stats, piped: Stats) -> None:
    """After ``fault`` held ``held`` s under load and was lifted: A's store recovers and sees
    C's trip; report it, and check that no call was harmed."""
    recovery = await rig.recovered()
    converge = await _trip_and_time(rig)
    report(
        fault,
        closed.line(),
        piped.line(),
        f"fault held {held:.2f}s; healthy again {recovery:.3f}s after lift",
        f"A saw C's trip after {converge * 1000:.1f}ms",
    )
    assert_unharmed(closed, piped, converge)


async def test_redis_slow(rig_factory: Callable[..., Any], full: bool) -> None:
    """Redis with p99 ~200 ms: calls stay fast, the store copes (degrading at times), converges."""
    rig: Rig = await rig_factory()
    base, base_piped = await rig.load(0.3)
    base.label, base_piped.label = "baseline " + base.label, "baseline " + base_piped.label
    rig.proxy.latency = 0.05
    rig.proxy.jitter = 0.05  # round trip 100-200 ms
    probe = aioredis.Redis.from_url(rig.proxy.url_for("redis"))
    try:
        start = time.perf_counter()
        await probe.ping()  # a new connection: the client's handshake, then PING
        handshake = time.perf_counter() - start
        rtts = []
        for _ in range(10 if not full else 100):
            start = time.perf_counter()
            await probe.ping()
            rtts.append(time.perf_counter() - start)
    finally:
        await probe.aclose()
    closed, piped = await rig.load(1.0 if not full else 10.0)
    degraded = rig.count(StoreDegraded)
    converge = await _trip_and_time(rig)  # while Redis is still slow for A
    rig.proxy.clear()
    recovery = await rig.recovered()
    report(
        "slow (latency 50 ms + jitter 0-50 ms each way)",
        f"redis PING through proxy: p50={statistics.median(rtts) * 1000:.0f}ms "
        f"max={max(rtts) * 1000:.0f}ms; first PING on a new connection "
        f"{handshake * 1000:.0f}ms",
        base.line(),
        base_piped.line(),
        closed.line(),
        piped.line(),
        f"times degraded during the fault: {degraded}; healthy again {recovery:.3f}s after lift",
        f"A (still slow) saw C's trip after {converge * 1000:.1f}ms",
    )
    assert_unharmed(closed, piped, converge)


async def test_redis_blackholed(rig_factory: Callable[..., Any], full: bool) -> None:
    """Redis accepts and never answers: degraded within the timeout, calls go on, recovers."""
    rig: Rig = await rig_factory()
    rig.proxy.blackhole = True
    started = time.monotonic()
    closed, piped = await rig.load(1.5 if not full else 10.0)
    assert rig.a_store.degraded
    held = time.monotonic() - started
    rig.proxy.blackhole = False
    await lifted(rig, "blackhole (accepts, never answers)", held, closed, piped)
    assert rig.count(StoreDegraded) >= 1


async def test_redis_blackholed_then_down(rig_factory: Callable[..., Any]) -> None:
    """A blackhole turns the store degraded with no calls, within about a second (the
    subscriber's PING after a second of silence) and one timeout."""
    rig: Rig = await rig_factory()
    rig.proxy.blackhole = True
    took = await until(lambda: rig.a_store.degraded, 5.0, "degraded")
    report("blackhole, idle replica", f"degraded {took * 1000:.0f}ms after the blackhole")
    rig.proxy.blackhole = False
    await rig.recovered()
    assert took < 2.0


async def test_connections_cut_mid_flush(rig_factory: Callable[..., Any], full: bool) -> None:
    """Cut A's command connections while a reply is in flight, again and again: no call harmed."""
    rig: Rig = await rig_factory()
    rig.proxy.down.latency = 0.02  # every reply sits in the proxy for 20 ms: a cut loses it
    rounds = 8 if not full else 100
    hits = 0  # cuts that caught a reply (a flush's, a lease's...) in flight

    def in_flight(c: Connection) -> bool:
        """A command connection (not the subscriber's) with a reply inside the proxy."""
        return b"SUBSCRIBE" not in c.head.upper() and c.held_down > 0

    async def cutter() -> None:
        nonlocal hits
        for _ in range(rounds):
            await until(lambda: not rig.a_store.degraded, 10.0, "healthy before a cut")
            await until(lambda: any(map(in_flight, rig.proxy.connections)), 5.0, "a flush")
            before = rig.count(StoreDegraded)
            hits += rig.proxy.cut(in_flight) > 0
            rig.proxy.cut(lambda c: b"SUBSCRIBE" not in c.head.upper())
            await until(rig.degraded_more_than(before), 5.0, "degraded by a cut")

    stop = asyncio.Event()

    async def load() -> list[tuple[Stats, Stats]]:
        out = []
        while not stop.is_set():
            out.append(await rig.load(0.1))
        return out

    loading = asyncio.ensure_future(load())
    try:
        await cutter()
    finally:
        stop.set()
        parts = await loading
    closed, piped = Stats("breaker only"), Stats("breaker+rate limit+bulkhead")
    for c, p in parts:
        for total, part in ((closed, c), (piped, p)):
            total.durations += part.durations
            total.expected += part.expected
            total.unexpected += part.unexpected
    rig.proxy.clear()
    recovery = await rig.recovered()
    converge = await _trip_and_time(rig)
    report(
        f"connections cut mid-flush ({hits} cuts with a reply in flight, replies delayed 20 ms)",
        closed.line(),
        piped.line(),
        f"degraded {rig.count(StoreDegraded)} times; healthy again {recovery:.3f}s after the "
        "last cut",
        f"A saw C's trip after {converge * 1000:.1f}ms",
    )
    assert hits == rounds
    assert rig.count(StoreDegraded) == rounds  # every lost reply was noticed
    assert_unharmed(closed, piped, converge)


async def test_open_state_arrives_without_pubsub(rig_factory: Callable[..., Any]) -> None:
    """With A's subscriber connection cut (and kept out), a trip on C reaches A by flush reply."""
    rig: Rig = await rig_factory(sync_interval=0.2)
    with_pubsub = await _trip_and_time(rig)
    await rig.c.reset()
    await rig.c_store.sync()
    await until(lambda: rig.a.state is CircuitState.CLOSED, 5.0, "closed again")
    subscribers = rig.proxy.cut(lambda c: b"SUBSCRIBE" in c.head.upper())
    assert subscribers == 1
    rig.proxy.kill_if = lambda head: b"SUBSCRIBE" in head.upper()  # no reconnect either
    await asyncio.sleep(0.1)
    without = await _trip_and_time(rig)
    report(
        "pub/sub connection dropped (sync_interval 0.2 s)",
        f"A saw C's trip after {with_pubsub * 1000:.1f}ms with pub/sub, "
        f"{without * 1000:.1f}ms without (flush reply)",
    )
    assert not rig.a_store.degraded  # the commands were never disturbed
    assert without < rig.sync_interval + 1.0
    assert with_pubsub < 1.0


async def _trip_and_time(rig: Rig) -> float:
    """Keep A calling (a calling replica flushes every interval) while C trips the breaker."""
    stop = asyncio.Event()
    made = 0

    async def calls() -> None:
        nonlocal made
        while not stop.is_set():
            try:
                await rig.a.call(ok)
            except CircuitOpenError:
                return
            made += 1
            await asyncio.sleep(0.002)

    caller = asyncio.ensure_future(calls())
    try:
        await until(lambda: made > 0, 5, "A calling")
        took = await rig.converge()
    finally:
        stop.set()
        await caller
    return took


async def test_redis_refusing_connections(rig_factory: Callable[..., Any], full: bool) -> None:
    """Redis down at the TCP level (refused, connections reset): degraded at once, recovers."""
    rig: Rig = await rig_factory()
    await rig.proxy.set_refuse(True)
    rig.proxy.cut()
    started = time.monotonic()
    closed, piped = await rig.load(1.5 if not full else 10.0)
    held = time.monotonic() - started
    assert rig.a_store.degraded
    await rig.proxy.set_refuse(False)
    await lifted(rig, "refused (nobody listens; open connections reset)", held, closed, piped)
