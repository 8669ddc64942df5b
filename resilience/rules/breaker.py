"""The circuit breaker's state machine: states, configuration, pure rules and ``BreakerCore``.

Two layers, from the inside out:

* pure rules (``over_threshold``, ``tripped``, ``half_open_verdict``, ``open_duration``):
  arithmetic on counts and configuration, no state, no I/O;
* ``BreakerCore``: the state machine of one named breaker (state, generation, window, probe
  leases). A store hands out one core per name, so every ``CircuitBreaker`` object with that
  name and store shares it. Its methods are synchronous: in the closed state a call does no I/O.

This module imports no policy and no store: the policy (``resilience.circuit``) and the stores
(``resilience.store``) both build on it.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from ..checks import YEARS_10, check_int, check_ratio, check_seconds
from ..clock import Clock
from ..errors import CircuitOpenError
from ..states import CLOSED, DISABLED, FORCED_OPEN, HALF_OPEN, OPEN, CircuitState
from .windows import Counter, CountWindow, TimeWindow, WindowSpec

__all__ = [
    "CLOSED",
    "DISABLED",
    "FORCED_OPEN",
    "HALF_OPEN",
    "OPEN",
    "BreakerConfig",
    "BreakerCore",
    "BreakerMetrics",
    "CircuitState",
    "half_open_verdict",
    "open_duration",
    "over_threshold",
    "tripped",
]


class Front(Protocol):
    """What a core needs of the policy objects using it (``CircuitBreaker``)."""

    _listeners: tuple[object, ...]  #: the object's listeners; empty: nothing to tell

    def _transitioned(self, core: BreakerCore, old: CircuitState, new: CircuitState) -> None:
        """``core`` moved from ``old`` to ``new``."""


MAX_MINIMUM_CALLS = 1_000_000_000  #: the largest minimum_calls (a bound, not a suggestion)
MAX_QUORUM = 1000  #: replicas that must trip before a quorum breaker opens the fleet, at most
MAX_HALF_OPEN_CALLS = 10_000  #: the largest number of half-open probes


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
    open_for_max: float = 5.0  # = open_for: no growth unless asked for
    half_open_calls: int = 1
    probe_lease: float = 30.0
    #: 0: the fleet opens on the shared window or on any replica's own trip; k: only once k
    #: replicas' own windows have tripped (each replica still protects itself at once)
    quorum: int = 0

    def __post_init__(self) -> None:
        check_ratio("failure_ratio", self.failure_ratio)
        check_ratio("slow_call_ratio", self.slow_call_ratio)
        check_int("minimum_calls", self.minimum_calls, maximum=MAX_MINIMUM_CALLS)
        check_int("half_open_calls", self.half_open_calls, maximum=MAX_HALF_OPEN_CALLS)
        check_int("quorum", self.quorum, minimum=0, maximum=MAX_QUORUM)
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
        # a store keeps these in milliseconds: ten years at most (force_open() is for ever)
        check_seconds("open_for", self.open_for, maximum=YEARS_10)
        check_seconds("open_for_max", self.open_for_max, maximum=YEARS_10)
        check_seconds("probe_lease", self.probe_lease, maximum=YEARS_10)
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
    """How long to stay open after ``reopens`` consecutive failed recoveries.

    The time doubles with each re-open, up to ``open_for_max``; with the default
    ``open_for_max == open_for`` it stays fixed.
    """
    if reopens >= 64:
        return cfg.open_for_max
    return min(cfg.open_for * (1 << reopens), cfg.open_for_max)


# --- the state machine of one named breaker -------------------------------------------------

_lease_ids = itertools.count(1)


def new_lease() -> int:
    """A probe lease id, unique in this process (local and fleet-wide leases alike)."""
    return next(_lease_ids)


_BUCKETS = 15  # len(resilience.store.protocol.LATENCY_BUCKETS)
SAMPLE_EVERY = 8  #: one call in this many is timed for the latency figures


class BreakerCore:
    """State, generation, window and probe leases of one breaker; synchronous, no I/O.

    Every method takes ``now`` from the caller's clock. Outcomes carry the generation they
    were admitted under; an outcome from an older generation is discarded.
    """

    __slots__ = (
        "__weakref__",
        "_probe_done",
        "_probe_failures",
        "_probe_slow",
        "_probes",
        "base",
        "clock",
        "config",
        "fronts",
        "gen",
        "latency",
        "name",
        "open_for",
        "open_until",
        "opened_by",
        "rejected",
        "reopens",
        "shown",
        "state",
        "window",
    )

    def __init__(self, name: str, config: BreakerConfig, clock: Clock) -> None:
        self.name = name
        self.config = config
        self.base = config  # the configuration in code; ``config`` is what runs (live settings)
        self.clock = clock
        self.state = CLOSED
        self.gen = 0
        self.shown = 0  # the highest generation reported (events), see ``generation``
        self.open_until = 0.0
        self.open_for = 0.0
        self.reopens = 0
        self.opened_by: tuple[int, int, int] | None = None
        self.window: Counter = config.window.new()
        #: the breaker objects using this core, weakly (a tuple of references: a WeakSet
        #: cost six GC-tracked objects per breaker, and most cores have one front)
        self.fronts: tuple[weakref.ref[Any], ...] = ()
        self._probes: dict[int, float] = {}  # lease id -> expiry
        self._probe_done = self._probe_failures = self._probe_slow = 0
        self.rejected = 0  # calls refused, since this core was made
        self.latency = [0] * _BUCKETS  # sampled durations per LATENCY_BUCKETS bucket

    #: A shared core in strict mode wants ``await commit()`` after each outcome.
    strict = False

    @property
    def generation(self) -> int:
        """The generation this breaker reports (events, metrics): never below one it reported
        before. It is ``gen``, unless a shared core took the fleet's state numbered below what
        it had decided alone (Redis away, a quorum breaker's own trip): it then goes on from
        its own number until the fleet numbers past it."""
        return max(self.gen, self.shown)

    # figures for status tools
    def rejecting(self) -> None:
        """A call was refused."""
        self.rejected += 1

    def took(self, seconds: float) -> None:
        """A sampled call took ``seconds`` (bucket ``i``: below 0.5 ms x 2**i)."""
        i = int(seconds * 2000).bit_length()
        self.latency[i if i < _BUCKETS else _BUCKETS - 1] += 1

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
            lease = new_lease()
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
        if state is self.state:  # no transition: no new generation, no event; reset forgets
            self.window.reset()
            return
        self._move(state, now)

    def reconfigure(self, config: BreakerConfig) -> bool:
        """Run with ``config`` from the next call on (live settings); ``True`` if its window
        changed size, which starts it anew, empty (a window's kind does not change)."""
        renewed = config.window != self.config.window
        self.config = config
        if renewed:
            self.window.renew(config.window)
        return renewed

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

    def add_front(self, front: Any) -> None:
        """``front`` (a breaker object) uses this core: it hears of every transition for as
        long as it lives (the core keeps only a weak reference)."""
        self.fronts = (*(r for r in self.fronts if r() is not None), weakref.ref(front))

    def _announce(self, old: CircuitState, new: CircuitState) -> None:
        """Tell every breaker object using this core (each tells its listeners); the event is
        numbered above every one before it."""
        self.shown = max(self.gen, self.shown + 1)
        for ref in self.fronts:
            front = ref()
            if front is not None and front._listeners:
                front._transitioned(self, old, new)

    def counts(self, now: float) -> tuple[int, int, int]:
        """What the state counts now: the window's calls, failures and slow calls, or while
        half-open the probes' (as resilience4j reports its test calls)."""
        if self.state is HALF_OPEN:
            return self._probe_done, self._probe_failures, self._probe_slow
        w = self.window
        w.roll(now)
        return w.calls, w.failures, w.slow

    def metrics(self, now: float) -> BreakerMetrics:
        """The state and the window's counts at ``now`` (the probes' while half-open)."""
        calls, failures, slow = self.counts(now)
        return BreakerMetrics(
            name=self.name,
            state=self.state,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_ratio=failures / calls if calls else 0.0,
            slow_call_ratio=slow / calls if calls else 0.0,
            generation=self.generation,
            open_for=self.open_for if self.state is OPEN else None,
            retry_after=max(0.0, self.open_until - now) if self.state is OPEN else None,
            opened_by=self.opened_by if self.state is OPEN else None,
        )
