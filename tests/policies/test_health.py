"""Failure detectors, the background health check, and breakers that recover through it.

Run as a script (``python tests/policies/test_health.py hold URL PREFIX``) it is one replica of a
fleet sharing a health check through Redis, for the test that kills it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from resilience.integrations.health import http_check

from resilience import CircuitBreaker, CircuitState, CountWindow, MemoryStore, Store, TimeWindow
from resilience.errors import CircuitOpenError
from resilience.events import Event, HealthChanged, StateChanged, StoreDataReset
from resilience.policies.health import HealthCheck, HealthResult
from resilience.rules.detectors import PhiAccrualDetector, TimeoutDetector, phi
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import boom, raises_each, read_line, settle, unique_prefix, until

ROOT = Path(__file__).resolve().parents[2]
CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


# --- the phi function and the detectors ------------------------------------------------------


def test_phi_follows_the_normal_tail() -> None:
    """phi is -log10 of the chance of a later heartbeat: log10(2) at the mean, ~8 at 5.2 std."""
    assert phi(1.0, 1.0, 0.1) == pytest.approx(math.log10(2))
    for y in (1, 2, 3):  # the approximation is close to the exact tail where it matters
        exact = -math.log10(0.5 * math.erfc(y / math.sqrt(2)))
        assert phi(y, 0.0, 1.0) == pytest.approx(exact, rel=0.02)
    assert phi(5.2, 0.0, 1.0) < 8.0 < phi(5.25, 0.0, 1.0)
    assert phi(-50.0, 0.0, 1.0) == pytest.approx(0.0, abs=1e-300)
    assert phi(1e200, 0.0, 1.0) == math.inf  # no overflow error, however long the silence


intervals = st.lists(st.floats(0.01, 100.0), min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    history=intervals,
    pause=st.floats(0.0, 10.0),
    min_std=st.floats(0.001, 5.0),
    waits=st.lists(st.floats(0.0, 1000.0), min_size=2, max_size=30),
)
def test_phi_rises_monotonically_while_heartbeats_stop(
    history: list[float], pause: float, min_std: float, waits: list[float]
) -> None:
    """After the last heartbeat, phi never falls as time passes, and ends above threshold."""
    d = PhiAccrualDetector(min_std=min_std, acceptable_pause=pause, window=50)
    now = 0.0
    d.heartbeat(now)
    for gap in history:
        now += gap
        d.heartbeat(now)
    last = now
    levels = [d.phi(last + w) for w in sorted(waits)]
    for before, after in itertools.pairwise(levels):
        assert after >= before * (1 - 1e-12)  # rounding aside, never down
    far = last + d.mean + pause + 20 * d.std
    assert d.suspect(far)
    assert d.phi(far) > d.phi(last)


@settings(max_examples=200, deadline=None)
@given(
    mean=st.floats(0.05, 30.0),
    jitter=st.floats(0.0, 0.5),
    training=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=100),
    arrivals=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=100),
    k=st.floats(0.0, 4.5),
)
def test_jitter_within_the_learned_distribution_is_never_suspected(
    mean: float, jitter: float, training: list[float], arrivals: list[float], k: float
) -> None:
    """Heartbeats that keep arriving within k <= 4.5 learned std of the learned mean (+ pause)
    never make phi reach the threshold: not when they arrive, nor just before."""
    d = PhiAccrualDetector(min_std=mean / 100, window=100)
    now = 0.0
    d.heartbeat(now)
    for u in training:  # learn a distribution: mean +- jitter * mean
        now += mean * (1 + jitter * u)
        d.heartbeat(now)
    for u in arrivals:  # then heartbeats within k learned std of what was learned
        gap = max(0.0, d.mean + d.acceptable_pause + u * k * d.std)
        assert not d.suspect(now + gap), (gap, d.mean, d.std)
        now += gap
        d.heartbeat(now)


def test_regular_heartbeats_are_trusted_and_silence_is_suspected() -> None:
    """1000 heartbeats of N(1 s, 50 ms) (to 4 sigma) raise no suspicion; silence does, soon."""
    rng = random.Random(12)
    d = PhiAccrualDetector(min_std=0.01, window=200)
    now = 0.0
    d.heartbeat(now)
    worst = 0.0
    for _ in range(1000):
        gap = 1.0 + max(-0.2, min(0.2, rng.gauss(0.0, 0.05)))
        worst = max(worst, d.phi(now + gap))
        now += gap
        d.heartbeat(now)
    assert worst < 8.0
    assert d.mean == pytest.approx(1.0, abs=0.01)
    assert d.std == pytest.approx(0.05, rel=0.15)
    assert not d.suspect(now + 1.2)
    assert d.suspect(now + 1.4)  # 8 std late: one in 10**8 under the learned distribution


def test_an_outage_is_not_learned_as_jitter() -> None:
    """A gap longer than max_interval is not learned: the next outage is suspected as soon."""
    d = PhiAccrualDetector(min_std=0.05, max_interval=3.0)
    now = 0.0
    for _ in range(20):
        d.heartbeat(now)
        now += 1.0
    before = (d.mean, d.std)
    now += 60.0  # a minute of silence, then the dependency is back
    d.heartbeat(now)
    assert (d.mean, d.std) == before
    assert d.suspect(now + 1.5)


def test_watch_starts_the_clock_without_learning() -> None:
    """Before anything phi is 0; watch() makes silence count from then, learning nothing."""
    d = PhiAccrualDetector(first_interval=1.0)
    assert d.phi(1e9) == 0.0
    assert not d.suspect(1e9)
    d.watch(100.0)
    assert d.phi(100.0) < 0.1
    assert d.suspect(100.0 + 1.0 + 5.3 * 0.25)  # first_interval, std a quarter of it
    d.heartbeat(100.05)
    assert d.samples == 0  # the time from watch() to the first heartbeat is not an interval
    d.heartbeat(101.05)
    assert d.samples == 3
    assert d.mean == pytest.approx(1.0)
    assert d.std == pytest.approx(math.sqrt(2 / 3) * 0.25)
    d.reset()
    assert d.phi(1e9) == 0.0
    assert d.samples == 0


@settings(max_examples=100, deadline=None)
@given(timeout=st.floats(0.01, 100.0), waits=st.lists(st.floats(0.0, 500.0), min_size=2))
def test_timeout_detector_suspects_after_its_timeout(timeout: float, waits: list[float]) -> None:
    """The simple mode: phi is silence / timeout, rising; suspected exactly from `timeout` on."""
    d = TimeoutDetector(timeout)
    d.heartbeat(10.0)
    levels = [d.phi(10.0 + w) for w in sorted(waits)]
    assert levels == sorted(levels)
    for w in waits:
        assert d.suspect(10.0 + w) == ((10.0 + w) - 10.0 >= timeout)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: PhiAccrualDetector(threshold=0), ValueError, "threshold"),
        (lambda: PhiAccrualDetector(window=0), ValueError, "window"),
        (lambda: PhiAccrualDetector(window=1.5), TypeError, "window"),
        (lambda: PhiAccrualDetector(min_std=-1), ValueError, "min_std"),
        (lambda: PhiAccrualDetector(acceptable_pause=math.nan), ValueError, "acceptable_pause"),
        (lambda: PhiAccrualDetector(first_interval="1"), TypeError, "first_interval"),
        (lambda: PhiAccrualDetector(max_interval=0), ValueError, "max_interval"),
        (lambda: TimeoutDetector(0), ValueError, "timeout"),
    ],
)
def test_detectors_refuse_bad_input(build: Callable[[], object], error: type, match: str) -> None:
    """Each bad parameter is named in a ValueError or TypeError."""
    with pytest.raises(error, match=match):
        build()


# --- the health check, driven by a fake clock -----------------------------------------------


class Dependency:
    """A dependency whose health the test sets; counts the checks run against it."""

    def __init__(self) -> None:
        self.up = True
        self.hang = False
        self.runs = 0

    async def check(self) -> None:
        self.runs += 1
        if self.hang:
            await asyncio.Event().wait()
        if not self.up:
            raise ConnectionError("refused")


async def advance(clock: FakeClock, seconds: float, step: float = 0.25) -> None:
    """Move fake time forward in steps, letting the loop run at each."""
    await settle()
    end = clock.monotonic() + seconds
    while clock.monotonic() < end - 1e-9:
        clock.advance(min(step, end - clock.monotonic()))
        await settle()


@pytest.fixture
async def dep() -> AsyncIterator[Dependency]:
    """A healthy dependency; no task of the test may outlive it."""
    yield Dependency()
    await settle()
    current = asyncio.current_task()
    assert {t for t in asyncio.all_tasks() if t is not current} == set()


async def test_runs_every_interval_and_feeds_the_detector(
    clock: FakeClock, dep: Dependency
) -> None:
    """One run per interval; each success is a heartbeat: healthy, last_ok, phi near zero."""
    hc = HealthCheck(dep.check, name="db", interval=1.0, clock=clock)
    assert hc.healthy
    assert hc.phi == 0.0
    assert hc.last_ok is None
    assert not hc.running
    async with hc:
        await settle()
        assert dep.runs == 1
        assert hc.running
        await advance(clock, 5.0)
        assert dep.runs == 6
        assert hc.healthy
        assert hc.phi < 1.0
        assert hc.last_ok == clock.monotonic()
        assert all(r.ok and r.ran_here for r in hc.results)
        assert hc.detector.samples == 2 + 5  # type: ignore[attr-defined]
    assert not hc.running
    await advance(clock, 5.0)
    assert dep.runs == 6  # stopped means stopped


async def test_failures_turn_it_unhealthy_and_a_success_back(
    clock: FakeClock, dep: Dependency
) -> None:
    """The default detector tolerates two missed checks, suspects after the third; events."""
    events: list[Event] = []
    hc = HealthCheck(dep.check, name="db", interval=1.0, clock=clock, listeners=[events.append])
    async with hc:
        await advance(clock, 10.0)
        ok_until = clock.monotonic()
        dep.up = False
        await advance(clock, 2.0)
        assert hc.healthy  # two failed checks: a pause, not an outage
        await advance(clock, 2.0)
        assert not hc.healthy
        assert hc.phi >= 8.0
        assert hc.last_ok == ok_until
        assert [r.ok for r in hc.results][-4:] == [False] * 4
        assert "ConnectionError" in (hc.results[-1].error or "")
        dep.up = True
        await advance(clock, 1.0)
        assert hc.healthy
    changes = [e for e in events if isinstance(e, HealthChanged)]
    assert [e.healthy for e in changes] == [False, True]
    assert changes[0].phi >= 8.0
    assert changes[0].last_ok == ok_until
    assert changes[0].name == "db"
    assert changes[0].policy == "health_check"


async def test_a_run_is_bounded_by_the_timeout(clock: FakeClock, dep: Dependency) -> None:
    """A check that hangs fails after `timeout` and the loop goes on at its interval."""
    dep.hang = True
    async with HealthCheck(dep.check, name="db", interval=2.0, timeout=0.5, clock=clock) as hc:
        await advance(clock, 0.5)
        assert hc.results[-1].ok is False
        assert hc.results[-1].error == "timed out after 0.5s"
        assert hc.results[-1].duration == pytest.approx(0.5)
        await advance(clock, 4.0)
        assert dep.runs == 3


async def test_a_check_returning_false_fails_and_history_is_bounded(clock: FakeClock) -> None:
    """`return False` is a failure; only the last `history` results are kept."""
    answers = iter([True, None, False, "yes", False] * 10)

    async def check() -> object:
        return next(answers)

    async with HealthCheck(check, name="x", interval=1.0, history=3, clock=clock) as hc:
        await advance(clock, 4.0)
        assert [r.ok for r in hc.results] == [False, True, False]
        assert hc.results[-1].error == "returned False"


async def test_a_check_that_swallows_cancellation_still_stops(clock: FakeClock) -> None:
    """aclose() ends the loop even when the check eats the CancelledError."""
    started = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return  # swallowed

    hc = HealthCheck(stubborn, name="x", interval=1.0, clock=clock)
    hc.start()
    await started.wait()
    await asyncio.wait_for(hc.aclose(), 5.0)
    assert not hc.running


class Halt(BaseException):
    """A BaseException that is neither cancellation nor an interpreter exit."""


@pytest.mark.parametrize(
    "raised",
    [
        asyncio.CancelledError("the check's own"),
        Halt("stop"),
        BaseExceptionGroup("group", [Halt("inner")]),
    ],
    ids=["CancelledError", "BaseException", "BaseExceptionGroup"],
)
async def test_a_check_raising_a_base_exception_is_a_failed_check(
    clock: FakeClock, raised: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """A CancelledError that is not the loop's own, or another BaseException, from the check
    is one failed run: the loop goes on at its interval and judges the dependency."""
    runs = 0
    events: list[Event] = []

    async def check() -> None:
        nonlocal runs
        runs += 1
        raise raised

    hc = HealthCheck(check, name="x", interval=1.0, clock=clock, listeners=[events.append])
    async with hc:
        await advance(clock, 5.0)
        assert hc.running
        assert runs == 6
        assert [r.ok for r in hc.results] == [False] * 6
        assert type(raised).__name__ in (hc.results[-1].error or "")
        assert not hc.healthy
    assert [e.healthy for e in events if isinstance(e, HealthChanged)] == [False]


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_interpreter_exits_from_a_check_propagate_and_are_logged(
    raised: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """KeyboardInterrupt and SystemExit from a check stop the loop and reach the caller of
    the event loop, as asyncio delivers them; the stop is logged."""

    async def check() -> None:
        raise raised

    async def main() -> None:
        hc = HealthCheck(check, name="x", interval=1.0, clock=FakeClock())
        hc.start()
        await asyncio.Event().wait()

    caught: list[BaseException] = []

    def run() -> None:  # on a thread of its own: the interrupt never passes through pytest
        try:
            asyncio.run(main())
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30.0)
    assert [type(e) for e in caught] == [raised]
    assert "health check 'x' stopped" in caplog.text


async def swallow_cancellation(started: asyncio.Event) -> None:
    """Wait for ever; return quietly when cancelled (the cancellation is swallowed)."""
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        return


@pytest.mark.parametrize("where", ["check", "watcher"])
async def test_a_cancellation_from_outside_ends_the_loop_even_if_swallowed(
    clock: FakeClock, where: str
) -> None:
    """The loop's own task cancelled (not through aclose) ends it, even when the check or
    what the loop calls after it swallows the CancelledError."""
    started = asyncio.Event()

    async def check() -> None:
        if where == "check":
            await swallow_cancellation(started)

    async def watcher(result: HealthResult | None, suspected: bool) -> None:
        await swallow_cancellation(started)

    hc = HealthCheck(check, name="x", interval=1.0, clock=clock)
    if where == "watcher":
        hc._watch(watcher)
    hc.start()
    await started.wait()
    task = hc._task
    assert task is not None
    task.cancel()
    await settle()
    assert task.done()
    assert not hc.running
    await hc.aclose()


async def test_a_run_cut_short_by_aclose_is_no_result(clock: FakeClock) -> None:
    """A run that aclose() interrupts measured nothing, even when the check turns the
    cancellation into an error: neither recorded nor published for the fleet."""
    store = MemoryStore(clock=clock)
    started = asyncio.Event()
    runs = 0

    async def check() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise ConnectionError("interrupted") from None

    hc = HealthCheck(check, name="dep", interval=1.0, store=store)
    hc.start()
    await advance(clock, 1.0)
    await started.wait()
    await hc.aclose()
    assert [r.ok for r in hc.results] == [True]
    follower = HealthCheck(Dependency().check, name="dep", interval=1.0, store=store)
    assert await store.acquire_lease("health:dep", limit=1, ttl=60.0)  # someone else leads
    await follower._round()
    assert [r.ok for r in follower.results] == [True]


async def test_a_watcher_raising_a_base_exception_does_not_stop_the_loop(
    clock: FakeClock, dep: Dependency, caplog: pytest.LogCaptureFixture
) -> None:
    """What the loop calls after a run (a bound breaker) cannot end it by raising: logged."""
    heard = 0

    async def watcher(result: HealthResult | None, suspected: bool) -> None:
        nonlocal heard
        heard += 1
        raise Halt("watcher")

    hc = HealthCheck(dep.check, name="x", interval=1.0, clock=clock)
    hc._watch(watcher)
    async with hc:
        await advance(clock, 3.0)
        assert hc.running
        assert (dep.runs, heard) == (4, 4)
    assert "Halt" in caplog.text


async def test_no_timer_outlives_aclose(clock: FakeClock, dep: Dependency) -> None:
    """After aclose() nothing of the check is left on the clock: no sleep, no deadline."""
    hc = HealthCheck(dep.check, name="x", interval=1.0, timeout=0.5, clock=clock)
    async with hc:
        await advance(clock, 2.1)
    assert clock.pending == 0


def test_a_check_running_at_fork_runs_again_in_the_child(clock: FakeClock) -> None:
    """Forked while running: in the child the check holds no task or lease of its parent's,
    runs again from its first use there, and aclose() returns at once."""
    from tests.fork_support import in_forked_child

    store = MemoryStore(clock=clock)
    dep = Dependency()
    hc = HealthCheck(dep.check, name="dep", interval=1.0, store=store)

    async def parent() -> None:
        hc.start()
        await settle()
        assert hc.leading

    async def child() -> str:
        before = dep.runs
        leading = hc.leading
        await settle()
        running = hc.running  # its first use here: the check starts in this loop
        await advance(clock, 4.0)  # the parent's lease expires in the child's store too
        after = dep.runs
        await asyncio.wait_for(hc.aclose(), 5.0)
        return f"{int(leading)} {int(running)} {after - before} {int(hc.leading)}"

    async def closed_at_once() -> str:
        await asyncio.wait_for(hc.aclose(), 5.0)  # never used here: nothing to wait for
        await advance(clock, 3.0)
        return f"{int(hc.running)} {int(hc.leading)}"

    async def later() -> None:
        await hc.aclose()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(parent())
        seen = in_forked_child(child)
        assert in_forked_child(closed_at_once) == "0 0"  # closed: it does not start again
        loop.run_until_complete(later())
    finally:
        loop.close()
    leading, running, runs, still = seen.split()
    assert (leading, running, still) == ("0", "1", "0")
    assert int(runs) >= 2  # led after the parent's lease expired


def test_a_check_stopped_at_fork_stays_stopped_in_the_child(clock: FakeClock) -> None:
    """A check that was not running when the process forked does not start by itself."""
    from tests.fork_support import in_forked_child

    dep = Dependency()
    hc = HealthCheck(dep.check, name="dep", interval=1.0, clock=clock)

    async def child() -> str:
        running = hc.running
        await advance(clock, 3.0)
        return f"{int(running)} {dep.runs}"

    assert in_forked_child(child) == "0 0"


async def test_a_timeout_detector_makes_a_plain_rule(clock: FakeClock, dep: Dependency) -> None:
    """With TimeoutDetector(2.5) the check is unhealthy 2.5 s after its last success."""
    hc = HealthCheck(dep.check, name="db", interval=1.0, clock=clock, detector=TimeoutDetector(2.5))
    async with hc:
        await advance(clock, 3.0)
        dep.up = False
        await advance(clock, 2.25)
        assert hc.healthy
        assert hc.phi == pytest.approx(2.25 / 2.5)
        await advance(clock, 0.25)
        assert not hc.healthy


class _Detector:
    """A detector of its own: the four methods, and whatever ``threshold`` it is given."""

    def __init__(self, **threshold: object) -> None:
        self.__dict__.update(threshold)

    def watch(self, now: float) -> None:
        pass

    def heartbeat(self, now: float) -> None:
        pass

    def phi(self, now: float) -> float:
        return 0.0

    def suspect(self, now: float) -> bool:
        return False


@pytest.mark.parametrize(
    ("detector", "error"),
    [
        (_Detector(), TypeError),
        (_Detector(threshold=None), TypeError),
        (_Detector(threshold="8"), TypeError),
        (_Detector(threshold=True), TypeError),
        (_Detector(threshold=0), ValueError),
        (_Detector(threshold=-1.0), ValueError),
        (_Detector(threshold=math.inf), ValueError),
        (_Detector(threshold=math.nan), ValueError),
    ],
    ids=["missing", "none", "text", "bool", "zero", "negative", "inf", "nan"],
)
def test_a_detector_needs_a_finite_positive_threshold(detector: object, error: type) -> None:
    """A detector of one's own without a finite threshold > 0 is refused at construction,
    the error naming ``threshold``: the dashboard shows it next to phi."""

    async def check() -> None:
        pass

    with pytest.raises(error, match="threshold"):
        HealthCheck(check, name="db", detector=detector)  # type: ignore[arg-type]
    assert HealthCheck(check, name="db", detector=_Detector(threshold=3)).detector.threshold == 3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"check": lambda: None}, TypeError, "async"),
        ({"check": 42}, TypeError, "check"),
        ({"name": ""}, ValueError, "name"),
        ({"name": 3}, TypeError, "name"),
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": 1.0, "timeout": 2.0}, ValueError, "timeout"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"history": 0}, ValueError, "history"),
        ({"store": object()}, TypeError, "store"),
        ({"detector": object()}, TypeError, "detector"),
        ({"clock": object()}, TypeError, "clock"),
        ({"listeners": print}, TypeError, "listeners"),
    ],
)
def test_health_check_refuses_bad_input(kw: dict[str, Any], error: type, match: str) -> None:
    """Each bad parameter is named in a ValueError or TypeError at construction."""

    async def check() -> None:
        pass

    options: dict[str, Any] = {"check": check, "name": "db"}
    options.update(kw)
    with pytest.raises(error, match=match):
        HealthCheck(options.pop("check"), **options)


def test_configuration_is_read_only() -> None:
    """The configuration cannot be changed after construction."""

    async def check() -> None:
        pass

    hc = HealthCheck(check, name="db", interval=2.0)
    assert (hc.interval, hc.timeout, hc.history, hc.store) == (2.0, 1.0, 10, None)
    with pytest.raises(AttributeError):
        hc.interval = 1.0  # type: ignore[misc]


# --- breakers that recover through a health check -------------------------------------------


def changes(into: list[StateChanged]) -> Callable[[Event], None]:
    """A listener keeping the breaker's transitions."""

    def listen(event: Event) -> None:
        if isinstance(event, StateChanged):
            into.append(event)

    return listen


def bound_breaker(clock: FakeClock, hc: HealthCheck, **kw: Any) -> CircuitBreaker:
    options: dict[str, Any] = {
        "window": CountWindow(4),
        "minimum_calls": 4,
        "open_for": 5.0,
        "clock": clock,
        "health": hc,
    }
    options.update(kw)
    return CircuitBreaker("dep", **options)


async def trip(b: CircuitBreaker) -> None:
    await raises_each(4, ValueError, b.call, boom, match="boom")
    assert b.state is OPEN


async def test_a_bound_breaker_closes_through_the_check_without_a_user_call(
    clock: FakeClock, dep: Dependency
) -> None:
    """After open_for, the check's next success closes the breaker (via half-open); user
    calls meanwhile are rejected, never spent as probes."""
    events: list[StateChanged] = []
    hc = HealthCheck(dep.check, name="dep", interval=1.0, clock=clock)
    async with hc:
        b = bound_breaker(clock, hc, listeners=[changes(events)])
        await advance(clock, 0.5)
        await trip(b)  # open until 5.5 s from now
        calls = 0

        async def user() -> str:
            nonlocal calls
            calls += 1
            return "ok"

        await advance(clock, 4.75)
        assert b.state is OPEN  # open_for still holds: checks succeeded, nothing moved
        clock.advance(0.5)  # open_for is over, the next check is 0.25 s away
        with pytest.raises(CircuitOpenError) as raised:
            await b.call(user)
        assert raised.value.state == "open"
        assert raised.value.retry_after == 1.0
        assert calls == 0
        assert b.state is OPEN
        await advance(clock, 0.25)
        assert b.state is CLOSED
        assert calls == 0
        assert [(e.old, e.new) for e in events] == [
            (CLOSED, OPEN),
            (OPEN, HALF_OPEN),
            (HALF_OPEN, CLOSED),
        ]
        assert await b.call(user) == "ok"


async def test_a_failed_check_reopens_and_one_success_is_every_probe(
    clock: FakeClock, dep: Dependency
) -> None:
    """A failed check after open_for is a failed probe (re-open, open time doubled); a
    success then counts as all half_open_calls probes."""
    hc = HealthCheck(dep.check, name="dep", interval=1.0, clock=clock)
    async with hc:
        b = bound_breaker(clock, hc, half_open_calls=3, open_for_max=40.0)
        await trip(b)
        dep.up = False
        await advance(clock, 6.0)
        assert b.state is OPEN
        assert b.metrics().open_for == 10.0
        gen = b.metrics().generation
        dep.up = True
        await advance(clock, 8.0)  # re-opened at 5 s, for 10 s
        assert b.state is OPEN
        assert b.metrics().generation == gen
        await advance(clock, 2.0)
        assert b.state is CLOSED


async def test_a_stopped_check_leaves_recovery_passive(clock: FakeClock, dep: Dependency) -> None:
    """Without a running check, the breaker probes with a user call as usual."""
    hc = HealthCheck(dep.check, name="dep", interval=1.0, clock=clock)
    b = bound_breaker(clock, hc)
    await trip(b)
    clock.advance(5.0)

    async def user() -> str:
        return "ok"

    assert await b.call(user) == "ok"
    assert b.state is CLOSED


async def test_open_on_suspect_opens_before_users_fail(clock: FakeClock, dep: Dependency) -> None:
    """When phi crosses the threshold the breaker opens: no user call has failed."""
    events: list[StateChanged] = []
    hc = HealthCheck(dep.check, name="dep", interval=1.0, clock=clock)
    async with hc:
        b = bound_breaker(
            clock, hc, window=CountWindow(100), minimum_calls=50, open_on_suspect=True
        )
        b.add_listener(changes(events))

        async def user() -> str:
            return "ok"

        for _ in range(30):
            await b.call(user)
        await advance(clock, 5.0)
        dep.up = False
        await advance(clock, 2.0)
        assert b.state is CLOSED
        assert hc.healthy
        await advance(clock, 2.0)
        assert not hc.healthy
        assert b.state is OPEN
        assert [(e.old, e.new) for e in events] == [(CLOSED, OPEN)]
        with pytest.raises(CircuitOpenError):
            await b.call(user)
        dep.up = True
        await advance(clock, 6.0)
        assert b.state is CLOSED  # and the check closes it again


def suspecting(
    hc: HealthCheck, clock: FakeClock, window: TimeWindow, failure_ratio: float
) -> CircuitBreaker:
    """Breaker "dep" on ``window`` (10 calls at least) that opens on ``hc``'s suspicion."""
    return CircuitBreaker(
        "dep",
        window=window,
        minimum_calls=10,
        failure_ratio=failure_ratio,
        clock=clock,
        health=hc,
        open_on_suspect=True,
    )


async def test_open_on_suspect_with_a_time_window(clock: FakeClock, dep: Dependency) -> None:
    """A time window with successes in it trips too (failure_ratio < 1)."""
    hc = HealthCheck(dep.check, name="dep", interval=1.0, clock=clock)
    async with hc:
        b = suspecting(hc, clock, TimeWindow(30.0), failure_ratio=0.8)

        async def user() -> str:
            return "ok"

        for _ in range(40):
            await b.call(user)
        dep.up = False
        await advance(clock, 5.0)
        assert b.state is OPEN


@pytest.mark.parametrize(
    ("ratio", "successes", "failures", "opens"),
    [(0.5, 0, 2, True), (0.5, 30, 0, True), (1.0, 0, 0, True), (1.0, 5, 1, False)],
)
async def test_open_on_suspect_on_a_time_window_edges(
    clock: FakeClock,
    dep: Dependency,
    caplog: pytest.LogCaptureFixture,
    ratio: float,
    successes: int,
    failures: int,
    opens: bool,
) -> None:
    """Short of minimum_calls, or already over the ratio, the window trips; a window that
    can never reach a ratio of 1.0 stays closed, with a warning."""
    hc = HealthCheck(dep.check, name="dep", interval=1.0, clock=clock)
    async with hc:
        b = suspecting(hc, clock, TimeWindow(60.0), failure_ratio=ratio)

        async def user() -> str:
            return "ok"

        for _ in range(successes):
            await b.call(user)
        await raises_each(failures, ValueError, b.call, boom, match="boom")
        assert b.state is CLOSED
        dep.up = False
        await advance(clock, 5.0)
        assert not hc.healthy
        assert (b.state is OPEN) is opens
        assert ("cannot open on suspicion" in caplog.text) is not opens


def test_breaker_refuses_bad_health_arguments(clock: FakeClock) -> None:
    """health must be a HealthCheck; open_on_suspect a bool, and only with a health check."""
    with pytest.raises(TypeError, match="health"):
        CircuitBreaker("x", health=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="open_on_suspect"):
        CircuitBreaker("x", open_on_suspect=True)
    with pytest.raises(TypeError, match="open_on_suspect"):
        CircuitBreaker("x", open_on_suspect=1)  # type: ignore[arg-type]


# --- one replica runs the check for the fleet -----------------------------------------------


async def test_one_replica_runs_the_check_the_others_read_it(clock: FakeClock) -> None:
    """Two checks on one store: one leads and runs, the other only reads its results."""
    store = MemoryStore(clock=clock)
    a, b = Dependency(), Dependency()
    ha = HealthCheck(a.check, name="dep", interval=1.0, store=store)
    hb = HealthCheck(b.check, name="dep", interval=1.0, store=store)
    async with ha, hb:
        await advance(clock, 10.0)
        assert ha.leading
        assert not hb.leading
        assert a.runs == 11
        assert b.runs == 0
        assert hb.results
        assert all(not r.ran_here for r in hb.results)
        assert hb.healthy
        assert hb.last_ok is not None
        a.up = False
        await advance(clock, 5.0)
        assert not ha.healthy
        assert not hb.healthy
        assert hb.results[-1].ok is False
        assert "refused" in (hb.results[-1].error or "")
        await ha.aclose()  # gives the lease back: b takes over at its next round
        await advance(clock, 1.0)
        assert hb.leading
        assert b.runs == 1


async def test_a_follower_takes_over_when_the_lease_expires(clock: FakeClock) -> None:
    """A leader that stops renewing (hung, or dead) loses the lease after 2 intervals."""
    store = MemoryStore(clock=clock)
    a, b = Dependency(), Dependency()
    ha = HealthCheck(a.check, name="dep", interval=1.0, store=store)
    hb = HealthCheck(b.check, name="dep", interval=1.0, store=store)
    ha.start()
    await settle()
    async with hb:
        await advance(clock, 3.0)
        assert ha.leading
        task = ha._task
        assert task is not None
        task.cancel()  # dies without giving the lease back
        await asyncio.wait([task])
        await advance(clock, 3.5)
        assert hb.leading
        assert b.runs >= 1
        assert hb.healthy


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def stores(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[Callable[[], Store]]:
    """Make the stores of replicas sharing one state (one MemoryStore, or RedisStores on one
    server and prefix), all on the test's fake clock; closed at the end."""
    made: list[Store] = []
    shared = MemoryStore(clock=clock)
    prefix = unique_prefix("health")

    def make() -> Store:
        if request.param == "memory":
            return shared
        url = request.getfixturevalue("redis_url")
        store = RedisStore.from_url(url, prefix=prefix, clock=clock, timeout=2.0)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


async def test_only_the_lease_holder_can_publish(
    stores: Callable[[], Store], clock: FakeClock
) -> None:
    """publish() writes only while the given lease is held, checked in the same atomic step:
    not once it has expired, nor after another runner took it."""
    one, two = stores(), stores()
    lease = await one.acquire_lease("health:dep", limit=1, ttl=2.0)
    assert lease is not None
    assert await one.publish("health:dep", "result", b"1", lease=lease, ttl=6.0)
    assert await two.read_published("health:dep", "result", bytes) == b"1"
    clock.advance(2.5)  # the lease expired: nobody took it yet
    assert not await one.publish("health:dep", "result", b"2", lease=lease, ttl=6.0)
    other = await two.acquire_lease("health:dep", limit=1, ttl=2.0)
    assert other is not None
    assert await two.publish("health:dep", "result", b"3", lease=other, ttl=6.0)
    assert not await one.publish("health:dep", "result", b"4", lease=lease, ttl=6.0)
    assert not await one.publish("health:dep", "result", b"5", lease="never-taken", ttl=6.0)
    assert await one.read_published("health:dep", "result", bytes) == b"3"


async def test_a_leader_frozen_mid_check_does_not_publish(
    stores: Callable[[], Store], clock: FakeClock
) -> None:
    """A leader stopped (SIGSTOP, a stalled loop) during its check for longer than its lease
    comes back with a "timed out" that measured its own freeze: the runner that took over
    has published since, and the stale result reaches no one, not even its own watchers."""
    frozen = False
    a, b, c = Dependency(), Dependency(), Dependency()

    async def freezing() -> None:
        await a.check()
        if not frozen:
            return
        clock.advance(3.0)  # ha's process stops for 3 s: its lease expires, its timeout is due
        takeover = asyncio.ensure_future(hb._round())  # meanwhile b takes over and publishes
        try:
            await asyncio.shield(takeover)
        finally:
            await takeover

    ha = HealthCheck(freezing, name="dep", interval=1.0, timeout=0.5, store=stores())
    hb = HealthCheck(b.check, name="dep", interval=1.0, timeout=0.5, store=stores())
    hc = HealthCheck(c.check, name="dep", interval=1.0, timeout=0.5, store=stores())
    heard: list[HealthResult | None] = []

    async def watcher(result: HealthResult | None, suspected: bool) -> None:
        heard.append(result)

    ha._watch(watcher)
    await ha._round()
    assert ha.leading
    await hc._round()
    assert [r.ok for r in hc.results] == [True]
    frozen = True
    await ha._round()  # its check times out (cancelled by its own deadline, after the freeze)
    assert hb.leading
    assert not ha.leading
    assert [r.ok for r in hb.results] == [True]
    assert len(heard) == 2
    assert heard[-1] is None  # no news: the stale result is not its watchers' either
    assert [r.ok for r in ha.results] == [True]
    await hc._round()
    assert [r.ok for r in hc.results] == [True, True]  # b's result, never a's stale one
    assert not hc.results[-1].ran_here


async def test_a_runner_that_steps_down_does_not_read_its_own_result_as_news(
    clock: FakeClock,
) -> None:
    """A leader that became a follower finds its own last result published: not news, so
    not one more heartbeat."""
    store = MemoryStore(clock=clock)
    hc = HealthCheck(Dependency().check, name="dep", interval=1.0, store=store)
    await hc._round()
    assert hc.leading
    lease = hc._lease
    assert lease is not None
    assert await store.release_lease("health:dep", lease)
    assert await store.acquire_lease("health:dep", limit=1, ttl=60.0)  # someone else leads
    await hc._round()
    assert not hc.leading
    assert [r.ran_here for r in hc.results] == [True]


GARBAGE = {
    "not json": b"{not json",
    "not an object": b"[1, 2]",
    "missing fields": b'{"id": "x", "seq": 1}',
    "ok not a bool": b'{"id": "x", "seq": 1, "ok": "yes", "duration": 0.1, "error": null}',
    "NaN duration": b'{"id": "x", "seq": 1, "ok": true, "duration": NaN, "error": null}',
    "huge duration": b'{"id": "x", "seq": 1, "ok": true, "duration": 1e300, "error": null}',
    "negative duration": b'{"id": "x", "seq": 1, "ok": true, "duration": -1, "error": null}',
    "infinite seq": b'{"id": "x", "seq": 1e999, "ok": true, "duration": 0.1, "error": null}',
    "huge seq": b'{"id": "x", "seq": 1'
    + b"0" * 40
    + b', "ok": true, "duration": 0.1, "error": null}',
    "bool seq": b'{"id": "x", "seq": true, "ok": true, "duration": 0.1, "error": null}',
}
GOOD = b'{"id": "x", "seq": 7, "ok": true, "duration": 0.01, "error": null}'


@pytest.mark.parametrize("junk", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_under_the_result_key_is_reset_and_reported(
    stores: Callable[[], Store], clock: FakeClock, junk: bytes
) -> None:
    """A follower that reads something no runner publishes removes it and carries on: no
    result, no crash, and (RedisStore) a StoreDataReset event, never a degraded store."""
    store = stores()
    events: list[Event] = []
    if isinstance(store, RedisStore):
        store.add_listener(events.append)
    assert await store.acquire_lease("health:dep", limit=1, ttl=3600.0)  # someone else leads
    dep = Dependency()
    hc = HealthCheck(dep.check, name="dep", interval=1.0, store=store)
    await store.cache_set("health:dep", "result", junk, ttl=60.0)
    await hc._round()
    assert hc.results == ()
    assert dep.runs == 0
    assert not store.degraded
    assert await store.cache_get("health:dep", "result") is None  # reset
    if isinstance(store, RedisStore):
        assert [type(e) for e in events] == [StoreDataReset]
    await store.cache_set("health:dep", "result", GOOD, ttl=60.0)
    await hc._round()
    assert [(r.ok, r.ran_here) for r in hc.results] == [(True, False)]


@pytest.mark.parametrize("kind", ["hash", "list", "too long"])
async def test_a_wrong_type_under_the_result_key_is_no_outage(
    redis_url: str, clock: FakeClock, kind: str
) -> None:
    """A hash, a list or a huge string under the result key is reset and reported by the
    script that reads it: the store never turns degraded, the next result is read."""
    prefix = unique_prefix("health")
    store = RedisStore.from_url(redis_url, prefix=prefix, clock=clock, timeout=2.0)
    raw = aioredis.Redis.from_url(redis_url)
    events: list[Event] = []
    store.add_listener(events.append)
    key = store.key("health:dep", "cache:result")
    try:
        assert await store.acquire_lease("health:dep", limit=1, ttl=3600.0)
        hc = HealthCheck(Dependency().check, name="dep", interval=1.0, store=store)
        if kind == "hash":
            await raw.hset(key, "ok", "1")
        elif kind == "list":
            await raw.rpush(key, GOOD)
        else:
            await raw.set(key, b" " * 70_000 + GOOD)
        for _ in range(3):
            await hc._round()
        assert not store.degraded
        assert [type(e) for e in events] == [StoreDataReset]
        assert not await raw.exists(key)
        assert hc.results == ()
        await raw.set(key, GOOD)
        await hc._round()
        assert [(r.ok, r.ran_here) for r in hc.results] == [(True, False)]
    finally:
        await raw.aclose()
        await store.aclose()


async def test_a_degraded_store_means_every_replica_checks_itself() -> None:
    """With Redis unreachable the check runs locally and never raises."""
    from tests.redis_server import free_port

    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    dep = Dependency()
    try:
        async with HealthCheck(dep.check, name="dep", interval=0.05, store=store) as hc:
            await until(lambda: dep.runs >= 5, 10.0)
            assert not hc.leading
            assert hc.healthy
            assert all(r.ran_here for r in hc.results)
    finally:
        await store.aclose()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return unique_prefix("health")


@pytest.fixture
async def replicas(redis_url: str, prefix: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two replicas' RedisStores under this test's prefix on the shared test server, on the
    system clock (their checks run by themselves); closed at the end."""
    pair = (
        RedisStore.from_url(redis_url, prefix=prefix),
        RedisStore.from_url(redis_url, prefix=prefix),
    )
    yield pair
    for store in pair:
        await store.aclose()


async def test_replicas_on_redis_share_one_check(replicas: tuple[RedisStore, RedisStore]) -> None:
    """Two stores on one redis-server: one runs the check, the other sees its results."""
    s1, s2 = replicas
    a, b = Dependency(), Dependency()
    async with (
        HealthCheck(a.check, name="dep", interval=0.2, store=s1) as h1,
        HealthCheck(b.check, name="dep", interval=0.2, store=s2) as h2,
    ):
        await until(lambda: len(h1.results) >= 6 and len(h2.results) >= 6, 10.0)
        leader, follower = (h1, h2) if h1.leading else (h2, h1)
        assert leader.leading
        assert not follower.leading
        assert min(a.runs, b.runs) == 0
        assert max(a.runs, b.runs) >= 6
        seen = [r for r in follower.results if not r.ran_here]
        assert len(seen) >= 5
        assert all(r.ok for r in seen)
        assert follower.healthy
        assert follower.last_ok is not None


async def test_a_shared_breaker_closes_through_the_fleet_check(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    """A breaker shared through Redis closes on every replica via the check, no user call."""
    s1, s2 = replicas
    a, b = Dependency(), Dependency()
    options: dict[str, Any] = {"window": CountWindow(4), "minimum_calls": 4, "open_for": 0.5}
    async with (
        HealthCheck(a.check, name="dep", interval=0.1, store=s1) as h1,
        HealthCheck(b.check, name="dep", interval=0.1, store=s2) as h2,
    ):
        seen: list[StateChanged] = []
        b1 = CircuitBreaker("dep", store=s1, health=h1, **options)
        b2 = CircuitBreaker("dep", store=s2, health=h2, listeners=[changes(seen)], **options)
        await s1.sync()  # both know the fleet's state before one trips (a replica that
        await s2.sync()  # trips before its first reply is a store matter, not tested here)
        await trip(b1)
        opened = time.monotonic()
        await until(lambda: b1.state is CLOSED, 5.0)
        assert time.monotonic() - opened >= 0.45  # open_for was respected
        await until(lambda: b2.state is CLOSED, 5.0)
        assert seen[0].new is OPEN  # the other replica was open too, and closed with it
        assert seen[-1].new is CLOSED


async def test_a_suspicion_on_one_replica_opens_the_fleet_breaker(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    """open_on_suspect on the replica that sees the check fail opens the breaker fleet-wide."""
    s1, s2 = replicas
    dep = Dependency()
    options: dict[str, Any] = {"window": CountWindow(20), "minimum_calls": 10}
    async with HealthCheck(dep.check, name="dep", interval=0.2, timeout=0.1) as hc:
        b1 = CircuitBreaker("dep", store=s1, health=hc, open_on_suspect=True, **options)
        b2 = CircuitBreaker("dep", store=s2, **options)
        await s1.sync()
        await s2.sync()

        async def user() -> str:
            return "ok"

        for _ in range(15):
            await b2.call(user)
        await until(lambda: len(hc.results) >= 2, 5, "two healthy checks")
        await s1.sync()
        await s2.sync()
        assert (b1.state, b2.state) == (CLOSED, CLOSED)
        dep.up = False
        await until(lambda: b2.state is OPEN, 5.0)  # no user call failed anywhere
        assert not hc.healthy
        assert b1.state is OPEN


def _replica(mode: str, url: str, prefix: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.policies.test_health", mode, url, prefix],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


async def test_the_lease_moves_when_its_holder_process_is_killed(
    redis_url: str, prefix: str
) -> None:
    """SIGKILL the replica running the fleet's check: this one takes over and runs it."""
    holder = _replica("hold", redis_url, prefix)
    store = RedisStore.from_url(redis_url, prefix=prefix)
    dep = Dependency()
    try:
        assert read_line(holder) == "leading"
        async with HealthCheck(dep.check, name="fleet", interval=0.1, store=store) as hc:
            await until(lambda: sum(not r.ran_here for r in hc.results) >= 5, 10.0)
            assert not hc.leading
            assert dep.runs == 0
            assert sum(not r.ran_here for r in hc.results) >= 5
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
            killed = time.monotonic()
            await until(lambda: hc.leading, 10.0)
            assert time.monotonic() - killed < 5.0
            await until(lambda: dep.runs >= 2, 10.0)
            assert dep.runs >= 2
            assert hc.results[-1].ran_here
            assert hc.healthy  # the takeover is no outage
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
        await store.aclose()


# --- http_check -------------------------------------------------------------------------------


async def test_http_check_passes_on_2xx_and_raises_otherwise() -> None:
    """A 2xx passes; another status raises httpx.HTTPStatusError; `expect` widens it."""
    status = 200

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        check = http_check("http://dep/healthz", client=client)
        await check()
        status = 503
        with pytest.raises(httpx.HTTPStatusError, match="503"):
            await check()
        await http_check("http://dep/healthz", client=client, expect={503})()


async def test_http_check_drives_a_health_check_against_a_real_server() -> None:
    """Against a real local server: healthy while it answers, failing once it is gone."""
    from tests.redis_server import free_port

    port = free_port()
    server = await asyncio.start_server(_http_ok, "127.0.0.1", port)
    check = http_check(f"http://127.0.0.1:{port}/healthz")
    try:
        async with HealthCheck(check, name="web", interval=0.2, timeout=0.2) as hc:
            await until(lambda: len(hc.results) >= 2, 10.0)
            assert hc.results[0].ok
            assert hc.healthy
            server.close()
            await server.wait_closed()
            await until(lambda: not hc.results[-1].ok, 10.0)
            assert "ConnectError" in (hc.results[-1].error or "")
    finally:
        server.close()
        await server.wait_closed()


async def _http_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client gave up (its timeout): nothing to answer
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"url": 3}, TypeError, "url"),
        ({"url": "ftp://x"}, ValueError, "url"),
        ({"client": object()}, TypeError, "client"),
        ({"expect": 200}, TypeError, "expect"),
    ],
)
def test_http_check_refuses_bad_input(kw: dict[str, Any], error: type, match: str) -> None:
    """Bad arguments are named at once."""
    options: dict[str, Any] = {"url": "http://dep/healthz"}
    options.update(kw)
    with pytest.raises(error, match=match):
        http_check(options.pop("url"), **options)


def test_results_are_plain_records() -> None:
    """A HealthResult is frozen data."""
    r = HealthResult(ok=True, at=1.0, duration=0.01)
    assert r.error is None
    assert r.ran_here
    with pytest.raises(AttributeError):
        r.ok = False  # type: ignore[misc]


# --- a replica process, for the kill test -----------------------------------------------------


async def _hold(url: str, prefix: str) -> None:
    """Run the fleet's check (a healthy dependency); say "leading" once holding the lease."""
    store = RedisStore.from_url(url, prefix=prefix)

    async def check() -> None:
        pass

    async with HealthCheck(check, name="fleet", interval=0.1, store=store) as hc:
        await until(lambda: hc.leading, 20.0)
        print("leading", flush=True)
        await asyncio.sleep(20.0)  # until killed
    await store.aclose()


if __name__ == "__main__":
    mode, url, prefix = sys.argv[1:4]
    assert mode == "hold", mode
    asyncio.run(_hold(url, prefix))


async def test_status_lists_a_fleet_health_check_as_one() -> None:
    """The runner's lease is shown as a health check, not as a bulkhead of one."""
    from resilience import MemoryStore, status

    store = MemoryStore()
    await store.acquire_lease("health:payments", limit=1, ttl=30)
    await store.acquire_lease("uploads", limit=3, ttl=30)
    kinds = {p.name: p.kind for p in await status(store)}
    assert kinds == {"health:payments": "health_check", "uploads": "bulkhead"}


async def test_an_aclose_cancelled_while_the_check_stops_still_gives_the_lease_back(
    clock: FakeClock,
) -> None:
    """aclose() cancelled while it waits for a slow-to-stop check still returns the fleet's
    lease: another replica leads at once, not after the lease's time to live."""
    store = MemoryStore(clock=clock)
    started, stopping, finish = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopping.set()
            await finish.wait()  # cleans up for a while
            raise

    hc = HealthCheck(slow_to_stop, name="dep", interval=1.0, store=store)
    hc.start()
    await started.wait()
    assert hc.leading
    closing = asyncio.create_task(hc.aclose())
    await stopping.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await settle()
    assert await store.acquire_lease("health:dep", limit=1, ttl=60.0)  # free for another
    finish.set()
    await settle()
