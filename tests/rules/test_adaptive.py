"""Tests for resilience.rules.limits: Gradient2 and AIMD limits against a simulated server.

The server is a queueing model driven by a discrete-event simulation on a virtual clock: a
fixed number of workers (its capacity, which a phase may change), a service time (fixed, or
drawn from a seeded distribution), and a FIFO queue in front of them. Requests arrive at a
fixed rate; the limiter admits one while fewer than its limit are in flight and refuses the
rest. No real time passes.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.errors import BulkheadFullError, ResilienceTimeoutError
from resilience.policies.bulkhead import Bulkhead
from resilience.rules.limits import AdaptiveLimit, Limiter
from resilience.store import MemoryStore
from resilience.testing import FakeClock

from ..helpers import settle

SERVICE = 0.05  # seconds per request on a worker


@dataclass
class Second:
    """What one simulated second looked like."""

    limit: int
    served: int
    shed: int
    mean_rtt: float
    rtts: list[float] = field(default_factory=list)


def lognormal(seed: int, sigma: float = 0.5) -> Callable[[], float]:
    """Service times with mean ``SERVICE``, log-normally spread (p99 about 2.7x the mean)."""
    rng = random.Random(seed)
    mu = math.log(SERVICE) - sigma**2 / 2
    return lambda: rng.lognormvariate(mu, sigma)


@dataclass
class Server:
    """``capacity`` workers serving requests in ``service`` seconds each, FIFO queue in front."""

    capacity: int
    service: Callable[[], float] = lambda: SERVICE
    busy: int = 0
    queue: deque[float] = field(default_factory=deque)
    done: list[tuple[float, int, float]] = field(default_factory=list)  # (at, seq, started)
    seq: int = 0

    def start(self, now: float, started: float) -> None:
        self.busy += 1
        self.seq += 1
        heapq.heappush(self.done, (now + self.service(), self.seq, started))

    def arrive(self, now: float) -> None:
        if self.busy < self.capacity:
            self.start(now, now)
        else:
            self.queue.append(now)

    def fill(self, now: float) -> None:
        while self.busy < self.capacity and self.queue:
            self.start(now, self.queue.popleft())


def simulate(
    limiter: Limiter | None,
    phases: list[tuple[float, int]],
    *,
    offered: float = 2.0,
    service: Callable[[], float] | None = None,
) -> list[Second]:
    """Run ``phases`` of ``(seconds, capacity)`` with ``offered`` times the first capacity.

    ``limiter=None``: no limit. ``service``: draws a service time (``SERVICE`` on average);
    fixed by default. Returns one ``Second`` per simulated second.
    """
    server = Server(phases[0][1]) if service is None else Server(phases[0][1], service)
    gap = 1.0 / (offered * phases[0][1] / SERVICE)
    changes = []
    at = 0.0
    for seconds, capacity in phases:
        changes.append((at, capacity))
        at += seconds
    end = at
    arrival = 0.0
    in_flight = 0
    seconds_out: list[Second] = []
    served = shed = 0
    rtt_sum = 0.0
    rtts: list[float] = []
    tick = 1.0
    while True:
        now = min(arrival, server.done[0][0] if server.done else math.inf)
        if now >= end:
            break
        while len(changes) > 1 and changes[1][0] <= now:
            changes.pop(0)
            server.capacity = changes[0][1]
            server.fill(now)
        while now >= tick:
            limit = limiter.limit if limiter is not None else 0
            seconds_out.append(Second(limit, served, shed, rtt_sum / max(1, served), rtts))
            served = shed = 0
            rtt_sum = 0.0
            rtts = []
            tick += 1.0
        if server.done and server.done[0][0] <= arrival:
            finished, _, started = heapq.heappop(server.done)
            server.busy -= 1
            server.fill(finished)
            if limiter is not None:
                limiter.sample(finished, finished - started, in_flight)
            in_flight -= 1
            served += 1
            rtt_sum += finished - started
            rtts.append(finished - started)
        else:
            arrival += gap
            if limiter is None or in_flight < limiter.limit:
                in_flight += 1
                server.arrive(now)
            else:
                shed += 1
    return seconds_out


def settled(seconds: list[Second], start: int, end: int) -> tuple[float, float, float]:
    """Mean limit, served per second and latency over seconds ``[start, end)``."""
    part = seconds[start:end]
    n = len(part)
    return (
        sum(s.limit for s in part) / n,
        sum(s.served for s in part) / n,
        sum(s.mean_rtt for s in part) / n,
    )


def settled_p99(seconds: list[Second], start: int, end: int) -> float:
    """The 99th percentile latency of the calls that finished in seconds ``[start, end)``."""
    rtts = sorted(rtt for second in seconds[start:end] for rtt in second.rtts)
    return rtts[math.ceil(0.99 * len(rtts)) - 1]


def shed_share(seconds: list[Second], start: int, end: int) -> float:
    """The share of the requests refused over seconds ``[start, end)``."""
    part = seconds[start:end]
    return sum(s.shed for s in part) / sum(s.shed + s.served for s in part)


ALGORITHMS = [
    pytest.param(AdaptiveLimit(), id="gradient2"),
    pytest.param(AdaptiveLimit(algorithm="aimd", latency_target=1.5 * SERVICE), id="aimd"),
]


@pytest.mark.parametrize("options", ALGORITHMS)
@pytest.mark.parametrize("offered", [2.0, 4.0])
def test_limit_converges_near_capacity(options: AdaptiveLimit, offered: float) -> None:
    """Overloaded 2x or 4x, the server stays fully used and latency stays under 2x service."""
    capacity = 20
    seconds = simulate(options.limiter(), [(120, capacity)], offered=offered)
    limit, served, rtt = settled(seconds, 60, 120)
    assert capacity <= limit <= 2 * capacity
    assert served >= 0.97 * capacity / SERVICE  # goodput: the whole capacity
    assert rtt <= 2 * SERVICE


@pytest.mark.parametrize("options", ALGORITHMS)
def test_limit_backs_off_when_capacity_drops_and_recovers(options: AdaptiveLimit) -> None:
    """Half the workers gone: the limit follows them down, then back up when they return."""
    seconds = simulate(options.limiter(), [(90, 20), (90, 10), (90, 20)])
    before, _, _ = settled(seconds, 60, 90)
    during, served, rtt = settled(seconds, 150, 180)
    after, _, _ = settled(seconds, 240, 270)
    assert during < 0.75 * before
    assert 10 <= during <= 25
    assert served >= 0.97 * 10 / SERVICE
    assert rtt <= 2.2 * SERVICE
    assert after >= 0.9 * before


def test_gradient2_started_far_above_capacity_under_overload() -> None:
    """Born into 4x overload with a limit 3x too high, Gradient2 still comes down to capacity."""
    seconds = simulate(AdaptiveLimit(initial=60).limiter(), [(120, 20)], offered=4.0)
    limit, served, rtt = settled(seconds, 60, 120)
    assert 20 <= limit <= 40
    assert rtt <= 2 * SERVICE
    assert served >= 0.97 * 20 / SERVICE


def test_gradient2_baseline_does_not_drift_under_sustained_overload() -> None:
    """Ten minutes at 4x: the limit (and the latency it allows) drift up by a few % at most."""
    seconds = simulate(AdaptiveLimit().limiter(), [(600, 20)], offered=4.0)
    early, _, early_rtt = settled(seconds, 60, 90)
    late, _, late_rtt = settled(seconds, 570, 600)
    assert late <= 1.15 * early
    assert late_rtt <= 1.15 * early_rtt
    assert late_rtt <= 2 * SERVICE


@pytest.mark.parametrize("capacity", [4, 8])
@pytest.mark.parametrize("offered", [2.0, 4.0])
def test_gradient2_tail_at_most_twice_the_unloaded_latency(capacity: int, offered: float) -> None:
    """A small server overloaded 2x or 4x: p99 of what is served stays under 2x service.

    The limit settles near ``tolerance * capacity + queue_size``, at a latency of about
    ``tolerance + queue_size / capacity`` times the unloaded one: 2.0 with 8 workers under
    the former defaults (1.5 and 4), 2.5 with 4 workers; 1.45 and 1.7 with 1.2 and 2.
    """
    seconds = simulate(AdaptiveLimit().limiter(), [(120, capacity)], offered=offered)
    _, served, _ = settled(seconds, 60, 120)
    assert settled_p99(seconds, 60, 120) <= 2 * SERVICE
    assert served >= 0.97 * capacity / SERVICE


@pytest.mark.parametrize("offered", [2.0, 4.0])
def test_gradient2_variable_service_times_overloaded(offered: float) -> None:
    """Log-normal service times, overloaded: the server stays busy, p99 under 2x unloaded."""
    unloaded = simulate(None, [(60, 20)], offered=0.5, service=lognormal(seed=2))
    seconds = simulate(
        AdaptiveLimit().limiter(), [(120, 20)], offered=offered, service=lognormal(seed=2)
    )
    _, served, _ = settled(seconds, 60, 120)
    assert served >= 0.97 * 20 / SERVICE
    assert settled_p99(seconds, 60, 120) <= 2 * settled_p99(unloaded, 10, 60)


@pytest.mark.parametrize("offered", [0.5, 0.8])
def test_gradient2_variable_service_times_shed_nothing_below_capacity(offered: float) -> None:
    """Service times spread log-normally, under capacity: nothing is refused once settled.

    The fastest call of the first window is far below the mean; a baseline taken from it
    alone made every later window look like queueing, and the limit fell below the load.
    """
    seconds = simulate(
        AdaptiveLimit().limiter(), [(120, 20)], offered=offered, service=lognormal(seed=1)
    )
    assert shed_share(seconds, 30, 120) <= 0.01
    _, served, _ = settled(seconds, 30, 120)
    assert served >= 0.99 * offered * 20 / SERVICE


def test_gradient2_learns_a_service_that_got_slower_for_good() -> None:
    """Service 3x slower from the first minute on: read first as queueing, then learned.

    The cuts do not bring the latency down (it is not a queue of ours), so the baseline
    takes the new latency and the limit comes back up to keep the server busy.
    """
    calls = 0

    def service() -> float:
        nonlocal calls
        calls += 1
        return SERVICE if calls <= 8 * 20 * 60 else 3 * SERVICE  # 0.5x of 8 workers

    seconds = simulate(AdaptiveLimit().limiter(), [(300, 8)], offered=0.5, service=service)
    limit, served, rtt = settled(seconds, 200, 300)
    assert served >= 0.97 * 8 / (3 * SERVICE)
    assert 8 <= limit <= 16
    assert rtt <= 2 * 3 * SERVICE


def test_idle_service_does_not_grow_the_limit() -> None:
    """Far below the limit nothing is learned: the limit stays where it was."""
    for options in (AdaptiveLimit(), AdaptiveLimit(algorithm="aimd", latency_target=1.0)):
        limiter = options.limiter()
        for i in range(1000):
            limiter.sample(i * 0.1, 0.01, in_flight=2)
        assert limiter.limit == 20


def test_aimd_cuts_once_per_round() -> None:
    """A burst of slow calls admitted before a cut cuts once, not once per call."""
    limiter = AdaptiveLimit(algorithm="aimd", latency_target=0.1, initial=100).limiter()
    for i in range(50):  # all started at t=0, all slow
        limiter.sample(1.0 + i * 0.001, 1.0 + i * 0.001, in_flight=100)
    assert limiter.limit == 90
    limiter.sample(3.0, 1.0, in_flight=90)  # started at 2.0, after the cut: news
    assert limiter.limit == 81


def test_drop_counts_as_overload() -> None:
    """A dropped call (timeout, refused downstream) shrinks the limit, however fast it came."""
    aimd = AdaptiveLimit(algorithm="aimd", latency_target=1.0, initial=50).limiter()
    aimd.sample(1.0, 0.001, in_flight=50, dropped=True)
    assert aimd.limit == 45
    gradient = AdaptiveLimit(initial=50, window=0, min_samples=1).limiter()
    gradient.sample(1.0, 0.01, in_flight=50)
    before = gradient.limit
    for i in range(5):
        gradient.sample(2.0 + i, 0.001, in_flight=50, dropped=True)
    assert gradient.limit < before


@settings(max_examples=300, deadline=None)
@given(
    algorithm=st.sampled_from(["gradient2", "aimd"]),
    bounds=st.tuples(st.integers(1, 50), st.integers(0, 200)),
    samples=st.lists(
        st.tuples(
            st.floats(0, 10, allow_nan=False),
            st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 5)),
            st.integers(0, 10_000),
            st.booleans(),
        ),
        max_size=200,
    ),
)
def test_limit_stays_within_bounds(
    algorithm: str, bounds: tuple[int, int], samples: list[tuple[float, float, int, bool]]
) -> None:
    """Whatever the samples (NaN, negative, huge), the limit stays in [min_limit, max_limit]."""
    low, extra = bounds
    high = low + extra
    extra_options: dict[str, Any] = (
        {"window": 0.0, "min_samples": 1} if algorithm == "gradient2" else {"latency_target": 0.5}
    )
    options = AdaptiveLimit(
        algorithm=algorithm,  # type: ignore[arg-type]
        initial=low,
        min_limit=low,
        max_limit=high,
        **extra_options,
    )
    limiter = options.limiter()
    now = 0.0
    for step, rtt, in_flight, dropped in samples:
        now += step
        limit = limiter.sample(now, rtt, in_flight, dropped)
        assert low <= limit <= high
        assert limit == limiter.limit


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"algorithm": "vegas"}, ValueError, "algorithm"),
        ({"min_limit": 0}, ValueError, "min_limit"),
        ({"min_limit": 10, "max_limit": 5, "initial": 5}, ValueError, "max_limit"),
        ({"initial": 2000}, ValueError, "initial"),
        ({"initial": 2.5}, TypeError, "initial"),
        ({"smoothing": 0}, ValueError, "smoothing"),
        ({"tolerance": 0.9}, ValueError, "tolerance"),
        ({"tolerance": math.inf}, ValueError, "tolerance"),
        ({"window": -1}, ValueError, "window"),
        ({"queue_size": -1}, ValueError, "queue_size"),
        ({"latency_target": 0.1}, ValueError, "latency_target"),
        ({"algorithm": "aimd"}, ValueError, "latency_target"),
        ({"algorithm": "aimd", "latency_target": 0.1, "backoff": 1}, ValueError, "backoff"),
        ({"algorithm": "aimd", "latency_target": 0.1, "tolerance": 2}, ValueError, "tolerance"),
        ({"algorithm": "aimd", "latency_target": math.nan}, ValueError, "latency_target"),
    ],
)
def test_validation(options: dict[str, Any], error: type[Exception], match: str) -> None:
    """Bad options fail at construction, naming the option."""
    with pytest.raises(error, match=match):
        AdaptiveLimit(**options)


def test_options_are_frozen_and_keyword_only() -> None:
    """Options are plain frozen data; positional arguments are refused."""
    options = AdaptiveLimit(initial=5)
    with pytest.raises(AttributeError):
        options.initial = 6  # type: ignore[misc]
    with pytest.raises(TypeError):
        AdaptiveLimit("aimd")  # type: ignore[misc]
    assert (options.tolerance, options.queue_size) == (1.2, 2)
    assert AdaptiveLimit(algorithm="aimd", latency_target=1).backoff == 0.9


# --- the bulkhead ---------------------------------------------------------------------------


async def test_bulkhead_limit_follows_latency(clock: FakeClock) -> None:
    """Slow calls shrink an adaptive bulkhead's limit: fewer calls get a slot."""
    options = AdaptiveLimit(algorithm="aimd", latency_target=0.1, initial=4, min_limit=1)
    bulkhead = Bulkhead(limit=options, clock=clock)
    assert bulkhead.current_limit == 4
    assert bulkhead.limit is options

    async def slow() -> None:
        await clock.sleep(1.0)

    tasks = [asyncio.create_task(bulkhead.call(slow)) for _ in range(4)]
    await settle()
    assert bulkhead.in_flight == 4
    with pytest.raises(BulkheadFullError):
        await bulkhead.call(slow)
    clock.advance(1.0)
    await asyncio.gather(*tasks)
    assert bulkhead.current_limit == 3  # one cut for the round of four slow calls
    tasks = [asyncio.create_task(bulkhead.call(slow)) for _ in range(3)]
    await settle()
    with pytest.raises(BulkheadFullError) as info:
        await bulkhead.call(slow)
    assert info.value.max_concurrent == 3
    clock.advance(1.0)
    await asyncio.gather(*tasks)


async def test_bulkhead_timeouts_are_drops_and_other_errors_are_ignored(clock: FakeClock) -> None:
    """A timeout inside the bulkhead cuts the limit; an ordinary error teaches nothing."""
    options = AdaptiveLimit(algorithm="aimd", latency_target=10, initial=10)
    bulkhead = Bulkhead(limit=options, clock=clock)

    async def fail(exc: Exception) -> None:
        raise exc

    with pytest.raises(ValueError, match="boom"):
        await bulkhead.call(fail, ValueError("boom"))
    assert bulkhead.current_limit == 10
    with pytest.raises(ResilienceTimeoutError):
        await bulkhead.call(fail, ResilienceTimeoutError("t", 1.0))
    assert bulkhead.current_limit == 9
    assert bulkhead.in_flight == 0


async def test_bulkhead_waiters_get_slots_when_the_limit_grows(clock: FakeClock) -> None:
    """A queued call is let in as soon as the limit grows past the calls in flight."""
    options = AdaptiveLimit(initial=1, window=0, min_samples=1, queue_size=4, smoothing=1.0)
    bulkhead = Bulkhead(limit=options, max_waiting=5, clock=clock)
    release = asyncio.Event()
    started: list[int] = []

    async def work(i: int) -> None:
        started.append(i)
        if i == 0:
            await clock.sleep(0.01)
        else:
            await release.wait()

    tasks = [asyncio.create_task(bulkhead.call(work, i)) for i in range(4)]
    await settle()
    assert started == [0]
    clock.advance(0.01)  # the first call ends at full use: the limit grows to 1 + 4
    await settle(10)
    assert bulkhead.current_limit == 5
    assert sorted(started) == [0, 1, 2, 3]
    release.set()
    await asyncio.gather(*tasks)


async def test_bulkhead_takes_slots_back_when_the_limit_shrinks(clock: FakeClock) -> None:
    """Past a cut, a finished call's slot is not passed to a waiter until in flight <= limit."""
    options = AdaptiveLimit(algorithm="aimd", latency_target=0.5, initial=2)
    bulkhead = Bulkhead(limit=options, max_waiting=5, clock=clock)
    done = {i: asyncio.Event() for i in range(4)}

    async def work(i: int) -> None:
        await done[i].wait()

    tasks = [asyncio.create_task(bulkhead.call(work, i)) for i in range(4)]
    await settle()
    assert (bulkhead.in_flight, bulkhead.waiting) == (2, 2)
    clock.advance(1.0)  # both running calls are now slow
    done[0].set()
    await settle()
    assert bulkhead.current_limit == 1  # cut once: 2 * 0.9
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 2)  # the slot was taken back
    done[1].set()
    await settle()
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 1)  # one out, one waiter in
    for i in (2, 3):
        done[i].set()
    await asyncio.gather(*tasks)
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


async def test_bulkhead_context_manager_samples_too(clock: FakeClock) -> None:
    """``async with bulkhead`` feeds the limiter like a decorated call."""
    options = AdaptiveLimit(algorithm="aimd", latency_target=0.5, initial=2)
    bulkhead = Bulkhead(limit=options, clock=clock)
    async with bulkhead:
        clock.advance(1.0)
    assert bulkhead.current_limit == 1


async def test_fleet_bulkhead_adapts_locally_under_a_fleet_cap(clock: FakeClock) -> None:
    """With a store, ``max_concurrent`` is the fleet's cap; each replica adapts on its own."""
    store = MemoryStore(clock=clock)
    options = AdaptiveLimit(algorithm="aimd", latency_target=0.5, initial=3)
    replicas = [
        Bulkhead(3, limit=options, distributed=True, store=store, name="db", clock=clock)
        for _ in range(2)
    ]

    async def slow() -> None:
        await clock.sleep(1.0)

    first = [asyncio.create_task(replicas[0].call(slow)) for _ in range(2)]
    await settle(20)
    second = asyncio.create_task(replicas[1].call(slow))
    await settle(20)
    with pytest.raises(BulkheadFullError):  # the fleet's three permits are taken
        await replicas[1].call(slow)
    clock.advance(1.0)
    await asyncio.gather(*first, second)
    assert replicas[0].current_limit == 2  # its own slow calls cut its own limit
    assert replicas[1].current_limit == 2
    assert await store.count_leases("db") == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "max_concurrent"),
        ({"max_concurrent": 3, "limit": AdaptiveLimit()}, "distributed"),
        ({"limit": 5}, "AdaptiveLimit"),
        ({"limit": AdaptiveLimit(), "distributed": True, "store": MemoryStore()}, "cap"),
    ],
)
def test_bulkhead_validation(kwargs: dict[str, Any], match: str) -> None:
    """A bulkhead needs a fixed size or an adaptive limit; a fleet also needs its cap."""
    with pytest.raises((ValueError, TypeError), match=match):
        Bulkhead(**kwargs)


async def test_current_limit_is_a_telemetry_gauge(clock: FakeClock) -> None:
    """``resilience.bulkhead.limit`` reports each watched bulkhead's limit as it adapts."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from resilience.telemetry import Telemetry

    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    options = AdaptiveLimit(algorithm="aimd", latency_target=0.5, initial=10)
    adaptive = Bulkhead(limit=options, name="adaptive", clock=clock)
    fixed = Bulkhead(7, name="fixed")
    telemetry.instrument(adaptive, fixed)

    def gauge() -> dict[str, int]:
        data = reader.get_metrics_data()
        assert data is not None
        return {
            point.attributes["resilience.name"]: point.value  # type: ignore[index,misc]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "resilience.bulkhead.limit"
            for point in metric.data.data_points  # type: ignore[union-attr]
        }

    assert gauge() == {"adaptive": 10, "fixed": 7}
    async with adaptive:
        clock.advance(1.0)  # slower than the target: one cut
    assert gauge() == {"adaptive": 9, "fixed": 7}


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["start", "finish", "advance"]),
            st.sampled_from(["ok", "timeout", "error", "cancel"]),
        ),
        max_size=60,
    )
)
def test_adaptive_bulkhead_never_loses_a_slot(ops: list[tuple[str, str]]) -> None:
    """Whatever calls do (return, time out, fail, get cancelled), every slot comes back."""
    asyncio.run(_slots_scenario(ops))


async def _slots_scenario(ops: list[tuple[str, str]]) -> None:
    clock = FakeClock()
    options = AdaptiveLimit(algorithm="aimd", latency_target=0.5, initial=3, max_limit=6)
    bulkhead = Bulkhead(limit=options, max_waiting=3, clock=clock)
    calls: list[tuple[asyncio.Event, str, asyncio.Task[None]]] = []

    async def work(release: asyncio.Event, kind: str) -> None:
        assert bulkhead.in_flight <= options.max_limit
        await release.wait()
        if kind == "timeout":
            raise ResilienceTimeoutError("t", 1.0)
        if kind == "error":
            raise ValueError("x")

    for op, kind in ops:
        if op == "start":
            release = asyncio.Event()
            calls.append((release, kind, asyncio.create_task(bulkhead.call(work, release, kind))))
        elif op == "finish" and calls:
            release, kind, task = calls.pop(0)
            if kind == "cancel":
                task.cancel()
            else:
                release.set()
        else:
            clock.advance(0.3)
        await settle()
        assert bulkhead.in_flight <= options.max_limit
        assert 1 <= bulkhead.current_limit <= options.max_limit
    for release, _, _ in calls:
        release.set()
    await asyncio.gather(*(task for _, _, task in calls), return_exceptions=True)
    assert (bulkhead.in_flight, bulkhead.waiting) == (0, 0)


@pytest.mark.parametrize(("seed", "offered"), [(1, 2.0), (3, 4.0)])
def test_gradient2_does_not_rest_below_capacity_with_variable_service_times(
    seed: int, offered: float
) -> None:
    """8 workers, log-normal service times, overloaded, a baseline seeded too low: the limit
    can come to rest just short of a quarter below where the check started; the calls in
    flight, capped at the limit's integer part, are cut by more, and the check still finds
    it (compared with the limit, these seeds kept it near 6 and served 72 to 86 %)."""
    capacity = 8
    seconds = simulate(
        AdaptiveLimit().limiter(), [(240, capacity)], offered=offered, service=lognormal(seed)
    )
    _, served, _ = settled(seconds, 120, 240)
    assert served >= 0.95 * capacity / SERVICE
    assert settled_p99(seconds, 120, 240) <= 2 * settled_p99(
        simulate(None, [(60, capacity)], offered=0.5, service=lognormal(seed)), 10, 60
    )


async def test_gradient2_on_a_fake_clock_does_not_read_instant_calls_as_overload(
    clock: FakeClock,
) -> None:
    """Calls that take no time at all (a FakeClock that is not advanced during them) say
    nothing bad: a Gradient2 bulkhead keeps its limit and refuses none of its in-flight calls."""
    bulkhead = Bulkhead(limit=AdaptiveLimit(initial=20, min_samples=5), clock=clock)
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()

    refused = 0
    for _ in range(10):  # ten windows of 20 instant calls held together
        tasks = [asyncio.create_task(bulkhead.call(held)) for _ in range(20)]
        await settle()
        release.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            refused += isinstance(result, BulkheadFullError)
        release.clear()
        clock.advance(1.0)
    assert refused == 0
    assert bulkhead.current_limit >= 20


def test_gradient2_limiter_keeps_its_limit_on_zero_latencies() -> None:
    """The pure rule: windows whose calls all took 0 s never cut the limit."""
    limiter = AdaptiveLimit(initial=20, window=0, min_samples=1).limiter()
    for i in range(50):
        limiter.sample(float(i), 0.0, 20)
    assert limiter.limit >= 20


@pytest.mark.parametrize(
    "option", ["max_limit", "long_window", "queue_size", "min_limit", "initial", "min_samples"]
)
def test_integers_too_large_for_a_float_are_refused_by_name(option: str) -> None:
    """An integer option beyond what a float holds (10**400) is a ValueError naming the
    option, at construction, never a bare OverflowError from the first bulkhead."""
    with pytest.raises(ValueError, match=option):
        Bulkhead(limit=AdaptiveLimit(**{option: 10**400}))


def test_a_refusal_before_the_first_baseline_does_not_seed_it() -> None:
    """A fast refusal (dropped) in the first window is no call: the first baseline is the
    fastest real call, and a steady service keeps its limit. It seeded the baseline at the
    refusal's 1 ms, and the limit went 20 -> 13 against a steady 50 ms service."""

    def run(refusal: bool) -> tuple[list[int], float | None]:
        limiter = AdaptiveLimit(initial=20, min_samples=10, window=1.0).limiter()
        now, history = 0.0, []
        for w in range(12):
            for i in range(20):
                now += 0.05
                dropped = refusal and w == 0 and i == 0
                limiter.sample(now, 0.001 if dropped else 0.050, min(20, limiter.limit), dropped)
            history.append(limiter.limit)
        return history, limiter.long_rtt

    steady, steady_long = run(False)
    refused, refused_long = run(True)
    assert refused == steady
    assert refused_long == steady_long
