"""The circuit breaker: its states, its pure rules, the shared core, and the policy.

Three layers, from the inside out:

* pure rules (``over_threshold``, ``tripped``, ``half_open_verdict``, ``open_duration``):
  arithmetic on counts and configuration, no state, no I/O;
* ``BreakerCore``: the state machine of one named breaker (state, generation, window, probe
  leases). A store hands out one core per name, so every ``CircuitBreaker`` object with that
  name and store shares it. Its methods are synchronous: in the closed state a call does no I/O;
* ``CircuitBreaker``: the policy users hold (classification of outcomes, clock, listeners).
"""

from __future__ import annotations

import enum
import itertools
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .clock import Clock
from .errors import CircuitOpenError
from .events import CallRejected, Listener, StateChanged, emit
from .policy import (
    BasePolicy,
    ExceptionFilter,
    Protected,
    check_int,
    check_name,
    check_predicate,
    check_ratio,
    check_seconds,
    check_store,
    exception_filter,
)
from .windows import CountCounter, Counter, CountWindow, TimeWindow, WindowSpec

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "BreakerConfig",
    "BreakerCore",
    "BreakerMetrics",
    "CircuitBreaker",
    "CircuitState",
    "half_open_verdict",
    "open_duration",
    "over_threshold",
    "tripped",
]


class CircuitState(enum.Enum):
    """The states of a circuit breaker."""

    CLOSED = "closed"  #: calls flow; outcomes are counted
    OPEN = "open"  #: calls are rejected until ``open_until``
    HALF_OPEN = "half_open"  #: a bounded number of probe calls decide: close or re-open
    FORCED_OPEN = "forced_open"  #: rejected until reset by an operator
    DISABLED = "disabled"  #: calls flow, nothing is counted, nothing trips

    def __str__(self) -> str:
        return self.value


CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
FORCED_OPEN = CircuitState.FORCED_OPEN
DISABLED = CircuitState.DISABLED


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """What a breaker's rules need; shared by every replica using the same name.

    Built and validated by ``CircuitBreaker``; see its docstring for the meaning of each field.
    """

    failure_ratio: float = 0.5
    minimum_calls: int = 100
    window: WindowSpec = CountWindow(100)  # noqa: RUF009 - frozen, so sharing is safe
    slow_call_duration: float | None = None
    slow_call_ratio: float = 1.0
    open_for: float = 5.0
    open_for_max: float = 60.0
    half_open_calls: int = 1
    probe_lease: float = 30.0

    def __post_init__(self) -> None:
        check_ratio("failure_ratio", self.failure_ratio)
        check_ratio("slow_call_ratio", self.slow_call_ratio)
        check_int("minimum_calls", self.minimum_calls)
        check_int("half_open_calls", self.half_open_calls)
        if not isinstance(self.window, (CountWindow, TimeWindow)):
            raise TypeError(
                f"window must be CountWindow(size) or TimeWindow(seconds), got {self.window!r}"
            )
        if isinstance(self.window, CountWindow) and self.minimum_calls > self.window.size:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) is larger than the count window "
                f"({self.window.size}): the breaker could never trip"
            )
        check_seconds("slow_call_duration", self.slow_call_duration, none=True)
        check_seconds("open_for", self.open_for)
        check_seconds("open_for_max", self.open_for_max)
        check_seconds("probe_lease", self.probe_lease)
        if self.open_for_max < self.open_for:
            raise ValueError(
                f"open_for_max ({self.open_for_max!r}) must be >= open_for ({self.open_for!r})"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerMetrics:
    """A snapshot of a breaker: its state and the counts in its window."""

    name: str
    state: CircuitState
    calls: int
    failures: int
    slow_calls: int
    failure_ratio: float
    slow_call_ratio: float
    generation: int
    open_for: float | None
    retry_after: float | None
    #: the window (or the probes) that opened the breaker: calls, failures, slow calls
    opened_by: tuple[int, int, int] | None = None


# --- pure rules ---------------------------------------------------------------------------


def over_threshold(calls: int, failures: int, slow: int, cfg: BreakerConfig) -> bool:
    """True when failures (or slow calls) reach their ratio of ``calls`` (``calls > 0``)."""
    if failures / calls >= cfg.failure_ratio:
        return True
    return cfg.slow_call_duration is not None and slow / calls >= cfg.slow_call_ratio


def tripped(calls: int, failures: int, slow: int, cfg: BreakerConfig) -> bool:
    """Whether a closed breaker with these window counts must open."""
    return calls >= cfg.minimum_calls and over_threshold(calls, failures, slow, cfg)


def half_open_verdict(
    done: int, failures: int, slow: int, cfg: BreakerConfig
) -> CircuitState | None:
    """OPEN or CLOSED once the probes reported so far settle it, else ``None``.

    The ratios apply to ``half_open_calls`` probes; the verdict comes as soon as the missing
    probes can no longer change it.
    """
    n = cfg.half_open_calls
    if over_threshold(n, failures, slow, cfg):
        return OPEN
    pending = n - done
    if not over_threshold(n, failures + pending, slow + pending, cfg):
        return CLOSED
    return None


def open_duration(cfg: BreakerConfig, reopens: int) -> float:
    """How long to stay open after ``reopens`` consecutive failed recoveries (doubling)."""
    if reopens >= 64:
        return cfg.open_for_max
    return min(cfg.open_for * (1 << reopens), cfg.open_for_max)


# --- the state machine of one named breaker -------------------------------------------------

_lease_ids = itertools.count(1)
_NO_RESULT: Any = object()  # the outcome of an ``async with`` block: no value to judge


class BreakerCore:
    """State, generation, window and probe leases of one breaker; synchronous, no I/O.

    Every method takes ``now`` from the caller's clock. Outcomes carry the generation they
    were admitted under; an outcome from an older generation is discarded.
    """

    __slots__ = (
        "_probe_done",
        "_probe_failures",
        "_probe_slow",
        "_probes",
        "clock",
        "config",
        "fronts",
        "gen",
        "name",
        "open_for",
        "open_until",
        "opened_by",
        "reopens",
        "state",
        "window",
    )

    def __init__(self, name: str, config: BreakerConfig, clock: Clock) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.state = CLOSED
        self.gen = 0
        self.open_until = 0.0
        self.open_for = 0.0
        self.reopens = 0
        self.opened_by: tuple[int, int, int] | None = None
        self.window: Counter = config.window.new()
        self.fronts: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self._probes: dict[int, float] = {}  # lease id -> expiry
        self._probe_done = self._probe_failures = self._probe_slow = 0

    #: A shared core in strict mode wants ``await commit()`` after each outcome.
    strict = False

    # admission
    def acquire(self, now: float) -> tuple[int, int] | None:
        """Admit a call: ``(generation, lease)``, lease 0 unless the call is a probe.

        Raises ``CircuitOpenError`` when the call must not run. A shared core returns ``None``
        when only its store can decide (a fleet-wide probe): then ``await acquire_remote``.
        """
        state = self.state
        if state is CLOSED or state is DISABLED:
            return self.gen, 0
        if state is OPEN:
            if now < self.open_until:
                raise CircuitOpenError(self.name, "open", self.open_until - now)
            self._move(HALF_OPEN, now)
        elif state is FORCED_OPEN:
            raise CircuitOpenError(self.name, "forced_open", None)
        probes = self._probes
        if probes:
            for lease, expiry in list(probes.items()):
                if expiry <= now:  # its holder never reported: free the slot
                    del probes[lease]
        if len(probes) + self._probe_done < self.config.half_open_calls:
            lease = next(_lease_ids)
            probes[lease] = now + self.config.probe_lease
            return self.gen, lease
        wait = min(probes.values()) - now if probes else self.config.open_for
        raise CircuitOpenError(self.name, "half_open", max(0.0, min(wait, self.config.open_for)))

    async def acquire_remote(self, now: float) -> tuple[int, int]:
        """Admission that needs the store; a local core decides on its own."""
        admitted = BreakerCore.acquire(self, now)
        assert admitted is not None
        return admitted

    async def commit(self) -> None:
        """Wait until the outcomes recorded so far are stored (strict mode); no-op here."""

    def success(self, gen: int) -> None:
        """A plain success (no lease, not timed): ``record`` without the arguments."""
        self.record(gen, 0, False, False)

    def release(self, gen: int, lease: int) -> None:
        """Give back a probe permit without an outcome (the call was cancelled)."""
        if lease and gen == self.gen:
            self._probes.pop(lease, None)

    # outcomes
    def record(
        self, gen: int, lease: int, failed: bool, slow: bool, now: float | None = None
    ) -> None:
        """Count one outcome admitted under ``gen``; may trip, close or re-open the breaker.

        ``now`` may be left out when the window counts calls (not time): the clock is then
        read only if the outcome changes the state.
        """
        if gen != self.gen:
            return  # admitted under an earlier state: discarded
        state = self.state
        if state is CLOSED:
            w = self.window
            w.add(failed, slow, 0.0 if now is None else now)
            if (w.failures or w.slow) and w.calls >= self.config.minimum_calls:
                if now is None:
                    now = self.clock.monotonic()
                w.roll(now)
                if tripped(w.calls, w.failures, w.slow, self.config):
                    self._move(OPEN, now)
        elif state is HALF_OPEN:
            if self._probes.pop(lease, None) is None:
                return  # not a probe, or its lease expired and the slot went to another
            self._probe_done += 1
            self._probe_failures += failed
            self._probe_slow += slow
            verdict = half_open_verdict(
                self._probe_done, self._probe_failures, self._probe_slow, self.config
            )
            if verdict is not None:
                self._move(verdict, self.clock.monotonic() if now is None else now)

    # manual control
    def force(self, state: CircuitState, now: float) -> None:
        """Move to ``state`` (FORCED_OPEN, DISABLED, or CLOSED to reset) at once."""
        if state not in (CLOSED, FORCED_OPEN, DISABLED):
            raise ValueError(
                f"a breaker can be forced CLOSED, FORCED_OPEN or DISABLED, not {state}"
            )
        self.reopens = 0
        self._move(state, now)

    async def control(self, state: CircuitState, now: float) -> None:
        """``force``, as a coroutine: a shared store makes it fleet-wide."""
        self.force(state, now)

    def _move(self, new: CircuitState, now: float) -> None:
        old = self.state
        self.gen += 1
        self.state = new
        if new is OPEN:
            if old is HALF_OPEN:
                self.reopens += 1
                done, failed, slow = self._probe_done, self._probe_failures, self._probe_slow
                self.opened_by = (done, failed, slow)
            else:
                self.reopens = 0
                w = self.window
                self.opened_by = (w.calls, w.failures, w.slow)
            self.open_for = open_duration(self.config, self.reopens)
            self.open_until = now + self.open_for
        elif new is CLOSED:
            self.reopens = 0
        if new is not OPEN:
            self.open_until = 0.0
        self.window.reset()
        self._probes.clear()
        self._probe_done = self._probe_failures = self._probe_slow = 0
        self._announce(old, new)

    def _announce(self, old: CircuitState, new: CircuitState) -> None:
        """Tell the listeners of every breaker object using this core."""
        if any(front._listeners for front in self.fronts):
            event = StateChanged(
                name=self.name,
                old=old,
                new=new,
                generation=self.gen,
                open_for=self.open_for if new is OPEN else None,
            )
            for front in list(self.fronts):
                if front._listeners:
                    emit(front._listeners, event)

    def metrics(self, now: float) -> BreakerMetrics:
        """The state and the window's counts at ``now``."""
        w = self.window
        w.roll(now)
        calls = w.calls
        return BreakerMetrics(
            name=self.name,
            state=self.state,
            calls=calls,
            failures=w.failures,
            slow_calls=w.slow,
            failure_ratio=w.failures / calls if calls else 0.0,
            slow_call_ratio=w.slow / calls if calls else 0.0,
            generation=self.gen,
            open_for=self.open_for if self.state is OPEN else None,
            retry_after=max(0.0, self.open_until - now) if self.state is OPEN else None,
            opened_by=self.opened_by if self.state is OPEN else None,
        )


# --- the policy ----------------------------------------------------------------------------


class CircuitBreaker(BasePolicy):
    """Stops calling a dependency that keeps failing, and probes it before trusting it again.

    Outcomes are counted in a sliding ``window`` (``CountWindow(100)`` by default, or
    ``TimeWindow(seconds)``). Once the window holds at least ``minimum_calls`` and the share of
    failures reaches ``failure_ratio`` (or the share of calls slower than
    ``slow_call_duration`` reaches ``slow_call_ratio``) the breaker opens: calls fail at once
    with ``CircuitOpenError`` for ``open_for`` seconds. The first call after that moves it to
    half-open, where ``half_open_calls`` probes decide whether it closes or opens again; each
    consecutive re-open doubles the open time, up to ``open_for_max``. A probe that never
    reports frees its permit after ``probe_lease`` seconds.

    Exceptions matching ``on`` (types or a predicate; default ``Exception``) are failures,
    exceptions matching ``ignore`` count as nothing, any other exception counts as a success
    (as in resilience4j); ``failure_if(result)`` makes a returned value a failure. Cancellation
    is never an outcome.

    Breakers with the same ``name`` and ``store`` share one state; without a store each
    breaker is on its own. Defaults follow resilience4j for counting and Polly for timing.
    """

    kind = "circuit_breaker"

    def __init__(
        self,
        name: str,
        *,
        failure_ratio: float = 0.5,
        minimum_calls: int | None = None,
        window: WindowSpec | None = None,
        slow_call_duration: float | None = None,
        slow_call_ratio: float = 1.0,
        open_for: float = 5.0,
        open_for_max: float | None = None,
        half_open_calls: int = 1,
        probe_lease: float = 30.0,
        on: ExceptionFilter = Exception,
        ignore: ExceptionFilter = (),
        failure_if: Callable[[Any], bool] | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        check_name(name)
        if window is None:
            window = CountWindow(100)
        if minimum_calls is None:
            minimum_calls = min(100, window.size) if isinstance(window, CountWindow) else 100
        if open_for_max is None:
            of = check_seconds("open_for", open_for)
            open_for_max = max(of, 60.0)
        config = BreakerConfig(
            failure_ratio=failure_ratio,
            minimum_calls=minimum_calls,
            window=window,
            slow_call_duration=slow_call_duration,
            slow_call_ratio=slow_call_ratio,
            open_for=open_for,
            open_for_max=open_for_max,
            half_open_calls=half_open_calls,
            probe_lease=probe_lease,
        )
        store = check_store(
            "store", store, "breaker", "acquire_lease", "release_lease", "status", "sync"
        )
        if clock is None and store is not None:
            clock = store.clock
        super().__init__(name, clock, listeners)
        self.config = config
        self._is_failure = exception_filter("on", on)
        self._is_ignored = exception_filter("ignore", ignore, allow_empty=True)
        self._failure_if = check_predicate("failure_if", failure_if)
        self._slow_after = config.slow_call_duration
        self._timed = self._slow_after is not None or isinstance(window, TimeWindow)
        if store is None:
            from .store.memory import MemoryStore

            store = MemoryStore(clock=self._clock)
        self.store = store
        self._core: BreakerCore = store.breaker(name, config, self._clock)
        self._core.fronts.add(self)
        self._held: ContextVar[tuple[tuple[int, int, float], ...]] = ContextVar(
            f"resilience.breaker.{name}", default=()
        )

    @property
    def state(self) -> CircuitState:
        """The current state (OPEN stays OPEN until a call arrives after ``open_for``)."""
        return self._core.state

    def metrics(self) -> BreakerMetrics:
        """State and window counts now."""
        return self._core.metrics(self._clock.monotonic())

    async def force_open(self) -> None:
        """Reject every call until ``reset()`` (fleet-wide with a shared store)."""
        await self._core.control(FORCED_OPEN, self._clock.monotonic())

    async def disable(self) -> None:
        """Let every call through and count nothing until ``reset()``."""
        await self._core.control(DISABLED, self._clock.monotonic())

    async def reset(self) -> None:
        """Close the breaker and forget its window."""
        await self._core.control(CLOSED, self._clock.monotonic())

    def _reject(self, error: CircuitOpenError) -> None:
        if self._listeners:
            emit(self._listeners, CallRejected(name=self.name, policy=self.kind, error=error))

    async def _admit(self) -> tuple[int, int, float]:
        core = self._core
        now = self._clock.monotonic()
        try:
            admitted = core.acquire(now)
            if admitted is None:
                admitted = await core.acquire_remote(now)
        except CircuitOpenError as error:
            self._reject(error)
            raise
        return admitted[0], admitted[1], now

    def _settle(
        self, gen: int, lease: int, start: float, exc: Exception | None, result: Any
    ) -> None:
        """Classify an outcome and hand it to the core."""
        if exc is not None:
            if self._is_ignored(exc):
                self._core.release(gen, lease)
                return
            failed = self._is_failure(exc)
        else:
            failed = (
                self._failure_if is not None
                and result is not _NO_RESULT
                and bool(self._failure_if(result))
            )
        if self._timed:
            now: float | None = self._clock.monotonic()
            slow = self._slow_after is not None and now - start >= self._slow_after  # type: ignore[operator]
        else:
            now, slow = None, False
        self._core.record(gen, lease, failed, slow, now)

    def _wrap(self, fn: Protected) -> Protected:
        core = self._core
        admit = self._admit
        settle = self._settle
        timed = self._timed
        plain = not timed and self._failure_if is None
        local = type(core) is BreakerCore
        monotonic = self._clock.monotonic

        fast = plain and local  # an in-process breaker, count window, no result check
        window: CountCounter = core.window  # type: ignore[assignment]

        async def protected(*args: Any, **kwargs: Any) -> Any:
            if core.state is CLOSED:
                gen = core.gen
                if fast:  # the hot path: a few attribute reads and one try/except
                    try:
                        result = await fn(*args, **kwargs)
                    except Exception as exc:
                        settle(gen, 0, 0.0, exc, None)
                        raise
                    if window.failures or window.slow:
                        if gen == core.gen:
                            core.record(gen, 0, False, False)
                    elif window.calls < window.size and gen == core.gen:
                        window.calls += 1  # an all-success window: only the count moves
                    return result
                lease = 0
                start = monotonic() if timed else 0.0
            elif core.state is OPEN and (now := monotonic()) < core.open_until:
                error = CircuitOpenError(core.name, "open", core.open_until - now)
                if self._listeners:
                    self._reject(error)
                raise error
            elif core.state is FORCED_OPEN:
                error = CircuitOpenError(core.name, "forced_open", None)
                if self._listeners:
                    self._reject(error)
                raise error
            else:
                gen, lease, start = await admit()
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                settle(gen, lease, start, exc, None)
                if core.strict:
                    await core.commit()
                raise
            except BaseException:  # cancellation is no outcome, but the probe permit goes back
                if lease:
                    core.release(gen, lease)
                raise
            if lease or not plain:
                settle(gen, lease, start, None, result)
                if core.strict:
                    await core.commit()
            elif not local:
                core.success(gen)
                if core.strict:
                    await core.commit()
            # else: a local breaker admitted while DISABLED: nothing to count
            return result

        return protected

    async def __aenter__(self) -> None:
        gen, lease, start = await self._admit()
        self._held.set((*self._held.get(), (gen, lease, start)))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held = self._held.get()
        gen, lease, start = held[-1]
        self._held.set(held[:-1])
        if exc is None:
            self._settle(gen, lease, start, None, _NO_RESULT)
        elif isinstance(exc, Exception):
            self._settle(gen, lease, start, exc, None)
        else:
            self._core.release(gen, lease)
            return
        if self._core.strict:
            await self._core.commit()
