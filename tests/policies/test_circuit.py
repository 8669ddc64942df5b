"""The circuit breaker: trip rules, half-open probes, generations, cancellation, input checks."""

from __future__ import annotations

import asyncio
import gc
import math
import weakref
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from resilience import CircuitBreaker, CircuitState, CountWindow, MemoryStore, TimeWindow
from resilience.errors import CircuitOpenError
from resilience.events import CallRejected, StateChanged
from resilience.rules.breaker import BreakerConfig, half_open_verdict, open_duration, tripped
from resilience.testing import FakeClock

from ..helpers import boom, cancelled, ok

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


def make(clock: FakeClock, **kw: Any) -> CircuitBreaker:
    options: dict[str, Any] = {"minimum_calls": 4, "window": CountWindow(4), "open_for": 10.0}
    options.update(kw)
    return CircuitBreaker("dep", clock=clock, **options)


async def run(b: CircuitBreaker, outcomes: str) -> None:
    """Feed outcomes: 'f' a ValueError, 's' a success."""
    for o in outcomes:
        if o == "f":
            with pytest.raises(ValueError, match="boom"):
                await b.call(boom)
        else:
            assert await b.call(ok) == "ok"


# --- trip rules --------------------------------------------------------------------------


async def test_trips_at_the_ratio_only_after_minimum_calls(clock: FakeClock) -> None:
    """Below minimum_calls nothing trips; at it, a ratio equal to failure_ratio trips."""
    b = make(clock)
    await run(b, "fff")
    assert b.state is CLOSED
    await run(b, "s")  # 3 of 4 failed
    assert b.state is OPEN


async def test_a_ratio_below_the_threshold_does_not_trip(clock: FakeClock) -> None:
    """One failure in four with failure_ratio=0.5 keeps the breaker closed."""
    b = make(clock)
    await run(b, "fsssfsss")
    assert b.state is CLOSED
    await run(b, "ff")  # the last four: s s f f
    assert b.state is OPEN


async def test_open_rejects_with_the_time_left(clock: FakeClock) -> None:
    """An open breaker fails fast with CircuitOpenError.retry_after = time left."""
    b = make(clock)
    await run(b, "ffff")
    clock.advance(4)
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(CircuitOpenError) as info:
        await b.call(counted)
    assert calls == 0
    assert info.value.retry_after == pytest.approx(6.0)
    assert info.value.name == "dep"
    assert info.value.state == "open"


async def test_fresh_exception_per_rejection(clock: FakeClock) -> None:
    """Each rejection raises a new exception object, so tracebacks never pile up."""
    b = make(clock)
    await run(b, "ffff")
    errors = []
    for _ in range(3):
        try:
            await b.call(ok)
        except CircuitOpenError as e:
            errors.append(e)
    assert len({id(e) for e in errors}) == 3


async def test_half_open_success_closes_and_failure_reopens_longer(clock: FakeClock) -> None:
    """After open_for a probe decides; each failed recovery doubles open time up to the max."""
    b = make(clock, open_for_max=25.0)
    await run(b, "ffff")
    clock.advance(10)
    await run(b, "f")  # probe fails: open for 20
    assert b.state is OPEN
    assert b.metrics().retry_after == pytest.approx(20)
    clock.advance(20)
    await run(b, "f")  # open for min(40, 25)
    assert b.metrics().open_for == pytest.approx(25)
    clock.advance(25)
    await run(b, "s")
    assert b.state is CLOSED
    await run(b, "ffff")
    assert b.metrics().open_for == pytest.approx(10)  # a trip from closed starts over


async def test_state_moves_to_half_open_lazily(clock: FakeClock) -> None:
    """No timer runs: the state reads OPEN until the first call after open_for."""
    b = make(clock)
    await run(b, "ffff")
    clock.advance(100)
    assert b.state is OPEN
    assert clock.pending == 0
    gate = asyncio.Event()

    async def probe() -> None:
        await gate.wait()

    task = asyncio.create_task(b.call(probe))
    await asyncio.sleep(0)
    assert b.state is HALF_OPEN
    with pytest.raises(CircuitOpenError) as info:
        await b.call(ok)
    assert info.value.state == "half_open"
    gate.set()
    await task
    assert b.state is CLOSED


async def test_cancelled_probe_frees_its_permit(clock: FakeClock) -> None:
    """Cancelling a probe is no outcome, and the next call may probe at once."""
    b = make(clock)
    await run(b, "ffff")
    clock.advance(10)
    task = asyncio.create_task(b.call(asyncio.sleep, 100))
    await asyncio.sleep(0)
    await cancelled(task)
    assert b.state is HALF_OPEN
    assert await b.call(ok) == "ok"
    assert b.state is CLOSED


async def test_cancellation_is_neither_success_nor_failure(clock: FakeClock) -> None:
    """A cancelled call in the closed state leaves the window untouched."""
    b = make(clock)
    await run(b, "fff")
    task = asyncio.create_task(b.call(asyncio.sleep, 100))
    await asyncio.sleep(0)
    await cancelled(task)
    m = b.metrics()
    assert (m.calls, m.failures) == (3, 3)
    assert b.state is CLOSED


async def test_slow_calls_trip_by_ratio(clock: FakeClock) -> None:
    """Calls slower than slow_call_duration trip the breaker at slow_call_ratio."""
    b = make(clock, slow_call_duration=1.0, slow_call_ratio=0.75)

    async def slow() -> str:
        await clock.sleep(2)
        return "slow"

    for i in range(4):
        task = asyncio.create_task(b.call(slow) if i < 3 else b.call(ok))
        await asyncio.sleep(0)
        clock.advance(2)
        await task
    assert b.metrics().slow_calls == 0  # reset on trip
    assert b.state is OPEN


async def test_ignored_exceptions_count_as_nothing(clock: FakeClock) -> None:
    """An `ignore`d exception propagates but is not counted at all."""
    b = make(clock, ignore=KeyError)

    async def missing() -> None:
        raise KeyError("k")

    for _ in range(10):
        with pytest.raises(KeyError):
            await b.call(missing)
    assert b.metrics().calls == 0


async def test_exceptions_outside_on_count_as_success(clock: FakeClock) -> None:
    """Exceptions not matching `on` are successes, as in resilience4j."""
    b = make(clock, on=ConnectionError)
    await run(b, "ffff")
    m = b.metrics()
    assert (m.calls, m.failures, b.state) == (4, 0, CLOSED)


async def test_predicate_on(clock: FakeClock) -> None:
    """`on` may be a predicate over the exception."""
    b = make(clock, on=lambda e: "boom" in str(e))
    await run(b, "ffff")
    assert b.state is OPEN


async def test_failure_if_counts_results(clock: FakeClock) -> None:
    """failure_if(result) turns a returned value into a failure."""
    b = make(clock, failure_if=lambda r: r == "ok")
    for _ in range(4):
        assert await b.call(ok) == "ok"
    assert b.state is OPEN


async def test_time_window_forgets_old_failures(clock: FakeClock) -> None:
    """With a time window, failures older than the window no longer count."""
    b = make(clock, window=TimeWindow(10, 10), minimum_calls=4)
    await run(b, "fff")
    clock.advance(11)
    await run(b, "fsss")
    assert b.state is CLOSED
    await run(b, "f")  # 2 of 5
    assert b.state is CLOSED
    await run(b, "f")  # 3 of 6
    assert b.state is OPEN


async def test_force_open_disable_reset(clock: FakeClock) -> None:
    """Manual control overrides the counting rules until reset."""
    b = make(clock)
    await b.force_open()
    clock.advance(1e6)
    with pytest.raises(CircuitOpenError) as info:
        await b.call(ok)
    assert info.value.retry_after is None
    await b.disable()
    await run(b, "ffffffff")
    assert b.state is CircuitState.DISABLED
    assert b.metrics().calls == 0
    await b.reset()
    assert b.state is CLOSED
    await run(b, "ffff")
    assert b.state is OPEN


async def test_breakers_without_a_store_are_private(clock: FakeClock) -> None:
    """Without store=, two breakers with one name do not share state."""
    a, b = make(clock), make(clock)
    await run(a, "ffff")
    assert (a.state, b.state) == (OPEN, CLOSED)


async def test_shared_store_shares_state(clock: FakeClock) -> None:
    """With one store, breakers with one name share one state."""
    store = MemoryStore(clock=clock)
    a, b = make(clock, store=store), make(clock, store=store)
    await run(a, "ff")
    await run(b, "ff")
    assert a.state is OPEN
    assert b.state is OPEN


async def test_events_are_delivered(clock: FakeClock) -> None:
    """Listeners receive state changes and rejections with their details."""
    events: list[object] = []
    b = make(clock, listeners=[events.append])
    await run(b, "ffff")
    with pytest.raises(CircuitOpenError):
        await b.call(ok)
    changed = [e for e in events if isinstance(e, StateChanged)]
    rejected = [e for e in events if isinstance(e, CallRejected)]
    assert [(e.old, e.new) for e in changed] == [(CLOSED, OPEN)]
    assert changed[0].open_for == 10.0
    assert changed[0].generation == 1
    assert len(rejected) == 1
    assert rejected[0].policy == "circuit_breaker"


async def test_context_manager_form(clock: FakeClock) -> None:
    """`async with breaker:` counts the block's outcome and rejects when open."""
    b = make(clock)
    for _ in range(4):
        with pytest.raises(ValueError, match="x"):
            async with b:
                raise ValueError("x")
    assert b.state is OPEN
    with pytest.raises(CircuitOpenError):
        async with b:
            pytest.fail("an open breaker must not run the block")


async def test_decorator_keeps_the_function(clock: FakeClock) -> None:
    """The decorator keeps name and docstring and passes arguments through."""
    b = make(clock)

    @b
    async def add(x: int, *, y: int) -> int:
        """Add."""
        return x + y

    assert (add.__name__, add.__doc__) == ("add", "Add.")
    assert await add(1, y=2) == 3
    assert b.metrics().calls == 1


def test_decorating_a_sync_function_is_a_type_error(clock: FakeClock) -> None:
    """Sync functions are refused when decorated, not when called."""
    with pytest.raises(TypeError, match="coroutine"):

        @make(clock)
        def sync() -> None:  # pragma: no cover
            pass


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"failure_ratio": 0}, ValueError),
        ({"failure_ratio": 1.5}, ValueError),
        ({"failure_ratio": math.nan}, ValueError),
        ({"failure_ratio": "0.5"}, TypeError),
        ({"slow_call_ratio": -0.1}, ValueError),
        ({"minimum_calls": 0}, ValueError),
        ({"minimum_calls": 5}, ValueError),  # larger than CountWindow(4)
        ({"half_open_calls": 0}, ValueError),
        ({"open_for": -1}, ValueError),
        ({"open_for": math.inf}, ValueError),
        ({"open_for": 1e308}, ValueError),  # a store keeps it in ms: at most ten years
        ({"open_for": 2**63}, ValueError),
        ({"open_for": 10, "open_for_max": 1e12}, ValueError),
        ({"probe_lease": 1e308}, ValueError),
        ({"open_for": 10, "open_for_max": 5}, ValueError),
        ({"slow_call_duration": 0}, ValueError),
        ({"probe_lease": math.nan}, ValueError),
        ({"window": 10}, TypeError),
        ({"on": BaseException}, TypeError),
        ({"on": asyncio.CancelledError}, TypeError),
        ({"on": "ValueError"}, TypeError),
        ({"failure_if": 3}, TypeError),
        ({"listeners": [3]}, TypeError),
        ({"clock": object()}, TypeError),
    ],
)
def test_bad_input_is_refused(clock: FakeClock, kw: dict[str, Any], error: type) -> None:
    """Impossible configurations fail at construction, naming the parameter."""
    options = {"minimum_calls": 4, "window": CountWindow(4), "clock": clock}
    options.update(kw)
    with pytest.raises(error) as info:
        CircuitBreaker("dep", **options)
    name = next(iter(kw))
    if name not in ("window", "listeners", "clock", "minimum_calls") or error is ValueError:
        assert name.split("_")[0] in str(info.value)


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_names_are_refused(name: object) -> None:
    """A breaker needs a non-empty string name."""
    with pytest.raises((TypeError, ValueError)):
        CircuitBreaker(name)  # type: ignore[arg-type]


def test_default_minimum_calls_follows_a_small_count_window() -> None:
    """With a count window smaller than 100, minimum_calls defaults to the window size."""
    assert CircuitBreaker("d", window=CountWindow(10)).config.minimum_calls == 10
    assert CircuitBreaker("d").config.minimum_calls == 100


# --- pure rules --------------------------------------------------------------------------


def test_pure_rules() -> None:
    """The pure rules on counts: trip, verdict and the open-time schedule."""
    cfg = BreakerConfig(minimum_calls=4, window=CountWindow(10), half_open_calls=3)
    assert not tripped(3, 3, 0, cfg)
    assert tripped(4, 2, 0, cfg)
    assert not tripped(5, 2, 0, cfg)
    assert half_open_verdict(1, 0, 0, cfg) is None
    assert half_open_verdict(2, 0, 0, cfg) is CLOSED  # 1 missing probe cannot reach 0.5
    assert half_open_verdict(2, 2, 0, cfg) is OPEN
    cfg = BreakerConfig(open_for=5, open_for_max=60)
    assert [open_duration(cfg, n) for n in range(6)] == [5, 10, 20, 40, 60, 60]
    assert open_duration(cfg, 10_000) == 60


# --- a stateful comparison with a naive reference model ----------------------------------


class Model:
    """The documented behaviour, written as plainly as possible."""

    def __init__(self, size: int, minimum: int, ratio: float, probes: int) -> None:
        self.size, self.minimum, self.ratio, self.probes = size, minimum, ratio, probes
        self.state = CLOSED
        self.outcomes: list[bool] = []
        self.open_until = 0.0
        self.reopens = 0
        self.done = self.failed = 0

    def open(self, now: float, again: bool) -> None:
        self.reopens = self.reopens + 1 if again else 0
        self.state = OPEN
        self.open_until = now + min(10.0 * 2**self.reopens, 80.0)
        self.outcomes = []

    def call(self, failed: bool, now: float) -> bool:
        """Returns whether the call ran."""
        if self.state is CircuitState.FORCED_OPEN:
            return False
        if self.state is OPEN:
            if now < self.open_until:
                return False
            self.state, self.done, self.failed = HALF_OPEN, 0, 0
        if self.state is HALF_OPEN:
            self.done += 1
            self.failed += failed
            if self.failed / self.probes >= self.ratio:
                self.open(now, again=True)
            elif (self.failed + self.probes - self.done) / self.probes < self.ratio:
                self.state, self.reopens, self.outcomes = CLOSED, 0, []
            return True
        if self.state is CLOSED:
            self.outcomes = [*self.outcomes, failed][-self.size :]
            n = len(self.outcomes)
            if n >= self.minimum and sum(self.outcomes) / n >= self.ratio:
                self.open(now, again=False)
        return True


class BreakerMachine(RuleBasedStateMachine):
    """Random call sequences and clock moves: breaker and model always agree, and the
    generations reported count the transitions (events 1, 2, 3, ...; metrics the last)."""

    @initialize(
        size=st.integers(1, 8),
        data=st.data(),
        ratio=st.sampled_from([0.25, 0.5, 0.6, 1.0]),
        probes=st.integers(1, 3),
    )
    def setup(self, size: int, data: st.DataObject, ratio: float, probes: int) -> None:
        minimum = data.draw(st.integers(1, size))
        self.clock = FakeClock()
        self.loop = asyncio.new_event_loop()
        self.events: list[object] = []
        self.breaker = CircuitBreaker(
            "m",
            window=CountWindow(size),
            minimum_calls=minimum,
            failure_ratio=ratio,
            half_open_calls=probes,
            open_for=10.0,
            open_for_max=80.0,
            clock=self.clock,
            listeners=[self.events.append],
        )
        self.model = Model(size, minimum, ratio, probes)

    def teardown(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.close()

    @rule(failed=st.booleans())
    def call(self, failed: bool) -> None:
        ran = False

        async def fn() -> None:
            nonlocal ran
            ran = True
            if failed:
                raise ValueError

        async def attempt() -> None:
            try:
                await self.breaker.call(fn)
            except (ValueError, CircuitOpenError):
                pass

        expected = self.model.call(failed, self.clock.monotonic())
        self.loop.run_until_complete(attempt())
        assert ran == expected

    @rule(seconds=st.sampled_from([0.5, 5.0, 10.0, 20.0, 80.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def force_open(self) -> None:
        self.loop.run_until_complete(self.breaker.force_open())
        self.model.state, self.model.reopens = CircuitState.FORCED_OPEN, 0

    @rule()
    def reset(self) -> None:
        self.loop.run_until_complete(self.breaker.reset())
        self.model.state, self.model.reopens, self.model.outcomes = CLOSED, 0, []

    @invariant()
    def agree(self) -> None:
        if not hasattr(self, "model"):
            return
        assert self.breaker.state is self.model.state
        generations = [e.generation for e in self.events if isinstance(e, StateChanged)]
        assert generations == list(range(1, len(generations) + 1))
        assert self.breaker.metrics().generation == len(generations)
        if self.model.state is CLOSED:
            m = self.breaker.metrics()
            assert m.calls == len(self.model.outcomes)
            assert m.failures == sum(self.model.outcomes)


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_matches_model = BreakerMachine.TestCase


async def test_disabled_counts_nothing(clock: FakeClock) -> None:
    """A disabled breaker lets calls through without counting them, successes included."""
    b = make(clock)
    await run(b, "ff")
    await b.disable()
    await run(b, "ssffss")
    m = b.metrics()
    assert (m.state, m.calls, m.failures) == (CircuitState.DISABLED, 0, 0)


async def test_async_with_success_skips_failure_if(clock: FakeClock) -> None:
    """A block has no result to judge: failure_if is not consulted for it."""
    seen: list[object] = []
    b = make(clock, failure_if=lambda r: seen.append(r) or True)
    async with b:
        pass
    assert seen == []
    assert (b.metrics().calls, b.metrics().failures) == (1, 0)


async def test_listeners_follow_their_breaker_object(clock: FakeClock) -> None:
    """Each breaker object's listeners hear the shared state change once; dropped ones go."""
    store = MemoryStore(clock=clock)
    heard_a: list[object] = []
    a = make(clock, store=store, listeners=[heard_a.append])
    for _ in range(20):
        make(clock, store=store, listeners=[heard_a.append])  # dropped at once
    import gc

    gc.collect()
    await run(a, "ffff")
    assert len([e for e in heard_a if isinstance(e, StateChanged)]) == 1


# --- what a demanding user would check ----------------------------------------------------


async def test_the_open_time_is_fixed_by_default(clock: FakeClock) -> None:
    """open_for_max defaults to open_for: a failed probe opens for open_for again."""
    b = make(clock)
    await run(b, "ffff")
    clock.advance(10)
    await run(b, "f")  # the probe fails
    assert b.metrics().open_for == pytest.approx(10)
    assert b.config.open_for_max == b.config.open_for


@pytest.mark.parametrize("where", ["failure_if", "on", "ignore"])
async def test_a_raising_classifier_leaks_no_probe(clock: FakeClock, where: str) -> None:
    """A classifier that raises while a probe is settled: the call ends with its error, counts
    as a failure (the breaker re-opens), and the next probe may run after open_for, not after
    probe_lease."""

    class Broken(Exception):
        pass

    armed = False

    def broken(_: object) -> bool:
        if armed:
            raise Broken("the predicate failed")
        return where == "on"

    b = make(clock, probe_lease=300.0, **{where: broken})
    await run(b, "ffff")  # (ignore=broken -> False, on=broken -> True, failure_if: not asked)
    assert b.state is OPEN
    clock.advance(10)
    armed = True
    call = ok if where == "failure_if" else boom
    with pytest.raises(Broken) as caught:
        await b.call(call)
    if where != "failure_if":
        assert isinstance(caught.value.__context__, ValueError)
    assert b.state is OPEN  # counted as a failure: the probe re-opened the breaker
    armed = False
    clock.advance(10)  # open_for, far less than probe_lease
    assert await b.call(ok) == "ok"
    assert b.state is CLOSED


async def test_no_event_for_a_move_to_the_same_state(clock: FakeClock) -> None:
    """force_open, disable and reset on a breaker already there emit no StateChanged."""
    events: list[object] = []
    b = make(clock, listeners=[events.append])
    await b.reset()
    await b.force_open()
    await b.force_open()
    await b.disable()
    await b.disable()
    await b.reset()
    await b.reset()
    moves = [(e.old, e.new) for e in events if isinstance(e, StateChanged)]
    assert moves == [
        (CLOSED, CircuitState.FORCED_OPEN),
        (CircuitState.FORCED_OPEN, CircuitState.DISABLED),
        (CircuitState.DISABLED, CLOSED),
    ]


async def test_a_reset_of_a_closed_breaker_forgets_its_window(clock: FakeClock) -> None:
    """reset() while closed: no transition, but the window is empty afterwards."""
    b = make(clock)
    await run(b, "sfs")
    assert b.metrics().calls == 3
    await b.reset()
    assert b.metrics().calls == 0
    assert b.metrics().generation == 0


async def test_half_open_metrics_show_the_probes(clock: FakeClock) -> None:
    """While half-open, metrics() reports the probes' outcomes (as resilience4j does)."""
    b = make(clock, half_open_calls=3)
    await run(b, "ffff")
    clock.advance(10)
    await run(b, "sf")  # two of three probes reported: no verdict yet
    assert b.state is HALF_OPEN
    m = b.metrics()
    assert (m.calls, m.failures) == (2, 1)
    assert m.failure_ratio == pytest.approx(0.5)


async def test_a_memory_store_forgets_breakers_nobody_holds(clock: FakeClock) -> None:
    """Unheld breakers leave a MemoryStore forget_after seconds after their name was last
    asked for; a breaker still held is never forgotten, whatever its age."""
    import gc

    store = MemoryStore(clock=clock, forget_after=5.0)
    held = CircuitBreaker("held", store=store, clock=clock, window=CountWindow(4))
    await run(held, "ffff")
    assert held.state is OPEN
    dropped = CircuitBreaker("dropped", store=store, clock=clock)
    del dropped
    gc.collect()
    assert "dropped" in store.names()  # kept for a while: a per-call breaker keeps its state
    clock.advance(6)
    CircuitBreaker("another", store=store, clock=clock)  # a later use sweeps
    gc.collect()
    assert "dropped" not in store.names()
    assert "held" in store.names()
    assert held.state is OPEN


# --- what a breaker holds --------------------------------------------------------------------


async def test_a_breaker_holds_few_gc_tracked_objects() -> None:
    """Breakers made, decorated around a function and called once each add fewer than 36
    GC-tracked objects apiece (every one is scanned by each full collection)."""

    async def one() -> int:
        return 1

    kept = []
    await CircuitBreaker("warm")(one)()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(500):
        breaker = CircuitBreaker(f"b{i}")
        protected = breaker(one)
        await protected()
        kept.append(protected)
    gc.collect()
    assert (len(gc.get_objects()) - before) / len(kept) < 36


async def test_a_dropped_breaker_is_forgotten_by_its_core(clock: FakeClock) -> None:
    """Breakers sharing a core each hear of its transitions; one that is dropped is not kept
    alive by the core, and the others still hear."""
    store = MemoryStore(clock=clock)
    heard: list[object] = []
    first = CircuitBreaker("shared", store=store, clock=clock, listeners=[heard.append])
    second = CircuitBreaker("shared", store=store, clock=clock)
    second.add_listener(lambda event: heard.append("second"))
    gone = weakref.ref(second)
    await second.force_open()
    assert len(heard) == 2
    del second
    gc.collect()
    assert gone() is None
    await first.reset()
    assert len(heard) == 3
    assert isinstance(heard[-1], StateChanged)


@pytest.mark.parametrize("trip", ["force_open", "tripped"])
async def test_a_rejection_is_freed_once_caught(clock: FakeClock, trip: str) -> None:
    """The CircuitOpenError an open breaker raises is in no reference cycle (with the frame
    it was raised from): it is freed as soon as the caller drops it, with no collection."""
    b = make(clock)
    if trip == "force_open":
        await b.force_open()
    else:
        await run(b, "ffff")
    assert b.state is not CLOSED
    gc.disable()
    try:
        try:
            await b.call(ok)
        except CircuitOpenError as exc:
            freed = weakref.ref(exc)
        assert freed() is None
    finally:
        gc.enable()
