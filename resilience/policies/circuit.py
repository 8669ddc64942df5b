"""The circuit breaker policy: classification of outcomes, clock, listeners.

The state machine it drives (states, configuration, pure rules, ``BreakerCore``) lives in
``resilience.circuit_state``; its names are re-exported here.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ..clock import Clock
from ..errors import CircuitOpenError, ExcType, Traceback
from ..events import CallRejected, Listener, StateChanged, emit
from ..rules.breaker import (
    CLOSED,
    DISABLED,
    FORCED_OPEN,
    HALF_OPEN,
    OPEN,
    SAMPLE_EVERY,
    BreakerConfig,
    BreakerCore,
    BreakerMetrics,
    CircuitState,
)
from ..rules.windows import CountCounter, CountWindow, TimeWindow, WindowSpec
from ..store.config import Schema, follow, register_schema
from .base import (
    BasePolicy,
    ExceptionFilter,
    Protected,
    check_bool,
    check_name,
    check_predicate,
    check_seconds,
    check_store,
    exception_filter,
)
from .health import HealthCheck, HealthResult

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["CircuitBreaker"]


logger = logging.getLogger("resilience")

_NO_RESULT: Any = object()  # the outcome of an ``async with`` block: no value to judge


def _quorum(open_when: object, quorum: object) -> int:
    """``BreakerConfig.quorum`` from ``open_when`` and ``quorum`` (0: the fleet's rule)."""
    if open_when == "fleet":
        if quorum is not None:
            raise ValueError(f"quorum={quorum!r} needs open_when='quorum'")
        return 0
    if open_when != "quorum":
        raise ValueError(f"open_when must be 'fleet' or 'quorum', got {open_when!r}")
    if quorum is None:
        raise ValueError("open_when='quorum' needs quorum=k (replicas whose trips open it)")
    if isinstance(quorum, bool) or not isinstance(quorum, int):
        raise TypeError(f"quorum must be an int, got {quorum!r}")
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum!r}")
    return quorum


def _breaker_config(
    *,
    failure_ratio: float,
    minimum_calls: int | None,
    window: WindowSpec | None,
    slow_call_duration: float | None,
    slow_call_ratio: float,
    open_for: float,
    open_for_max: float | None,
    half_open_calls: int,
    probe_lease: float,
    quorum: int,
) -> BreakerConfig:
    """The configuration ``CircuitBreaker`` builds from its options (and live settings)."""
    if window is None:
        window = CountWindow(100)
    if minimum_calls is None:
        minimum_calls = _minimum(window)
    if open_for_max is None:
        open_for_max = check_seconds("open_for", open_for)
    return BreakerConfig(
        failure_ratio=failure_ratio,
        minimum_calls=minimum_calls,
        window=window,
        slow_call_duration=slow_call_duration,
        slow_call_ratio=slow_call_ratio,
        open_for=open_for,
        open_for_max=open_for_max,
        half_open_calls=half_open_calls,
        probe_lease=probe_lease,
        quorum=quorum,
    )


#: a breaker's settings that can change live (``window``: its size, in calls or seconds)
LIVE = (
    "failure_ratio",
    "minimum_calls",
    "window",
    "slow_call_duration",
    "slow_call_ratio",
    "open_for",
    "open_for_max",
    "half_open_calls",
    "probe_lease",
)


def _minimum(window: WindowSpec) -> int:
    """The ``minimum_calls`` a breaker derives from its window when none is given."""
    return min(100, window.size) if isinstance(window, CountWindow) else 100


def _live_values(config: BreakerConfig) -> dict[str, Any]:
    """``config``'s live settings (``open_for_max`` is ``None`` where it follows ``open_for``)."""
    window = config.window
    return {
        "failure_ratio": config.failure_ratio,
        # a value the constructor derived is None: it follows what it came from, live too
        "minimum_calls": None if config.minimum_calls == _minimum(window) else config.minimum_calls,
        "window": window.size if isinstance(window, CountWindow) else window.seconds,
        "slow_call_duration": config.slow_call_duration,
        "slow_call_ratio": config.slow_call_ratio,
        "open_for": config.open_for,
        "open_for_max": None if config.open_for_max == config.open_for else config.open_for_max,
        "half_open_calls": config.half_open_calls,
        "probe_lease": config.probe_lease,
    }


def _live_config(values: dict[str, Any], base: dict[str, Any], quorum: int = 0) -> BreakerConfig:
    """The configuration live ``values`` give a breaker whose settings in code are ``base``
    (empty: unknown), checked as the constructor checks them. A window keeps its kind (the
    breaker's calls are timed or not from when they are wrapped), so does whether slow calls
    are counted."""
    options = dict(values)
    size = options.pop("window", None)
    counted = base.get("window", size)
    window: WindowSpec | None = None
    if size is not None:
        if isinstance(counted, int) and not isinstance(size, int):
            raise TypeError(
                f"window of a count window must be an int (calls), got {size!r}: a window's "
                "kind cannot change live"
            )
        time_window = not isinstance(counted, int)
        window = TimeWindow(check_seconds("window", size)) if time_window else CountWindow(size)
    if base and (base.get("slow_call_duration") is None) != (
        options.get("slow_call_duration") is None
    ):
        raise ValueError(
            "slow_call_duration cannot be set or removed live (a breaker times its calls or "
            f"not from when they are wrapped): it was {base.get('slow_call_duration')!r}, "
            f"got {options.get('slow_call_duration')!r}"
        )
    return _breaker_config(**{**_defaults(), **options, "window": window, "quorum": quorum})


def _defaults() -> dict[str, Any]:
    """The constructor's defaults of the live settings."""
    parameters = inspect.signature(CircuitBreaker.__init__).parameters
    return {key: parameters[key].default for key in LIVE}


class CircuitBreaker(BasePolicy):
    """Stops calling a dependency that keeps failing, and probes it before trusting it again.

    Outcomes are counted in a sliding ``window`` (``CountWindow(100)`` by default, or
    ``TimeWindow(seconds)``). Once the window holds at least ``minimum_calls`` and the share of
    failures reaches ``failure_ratio`` (or the share of calls slower than
    ``slow_call_duration`` reaches ``slow_call_ratio``) the breaker opens: calls fail at once
    with ``CircuitOpenError`` for ``open_for`` seconds. The first call after that moves it to
    half-open, where ``half_open_calls`` probes decide whether it closes or opens again. The open
    time is fixed unless ``open_for_max`` is larger than ``open_for``: then each consecutive
    re-open doubles it, up to ``open_for_max``. A probe that never reports frees its permit
    after ``probe_lease`` seconds.

    Exceptions matching ``on`` (types or a predicate; default ``Exception``) are failures,
    exceptions matching ``ignore`` count as nothing, any other exception counts as a success
    (as in resilience4j); ``failure_if(result)`` makes a returned value a failure. Cancellation
    is never an outcome. A classifier (``on``, ``ignore``, ``failure_if``) that raises ends the
    call with its own error, and the call counts as a failure (so a probe is never leaked).

    Breakers with the same ``name`` and ``store`` share one state; without a store each
    breaker is on its own. Defaults follow resilience4j for counting and Polly for timing.
    With a ``RedisStore``, ``open_when="quorum"`` and ``quorum=k`` open the fleet's breaker
    only once ``k`` replicas' own windows have tripped (each replica still rejects on its
    own trip at once); the default, ``"fleet"``, opens it on the shared window or on any
    replica's own trip.

    Bound to a running ``HealthCheck`` (``health=``), the breaker spends no user request on
    probes: once ``open_for`` has passed, the check's next result counts as the outcome of
    all ``half_open_calls`` probes (a success closes the breaker, a failure re-opens it), and
    calls are rejected until then. With ``open_on_suspect=True`` it also opens as soon as the
    check's detector suspects the dependency, before calls fail.
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
        open_when: str = "fleet",
        quorum: int | None = None,
        on: ExceptionFilter = Exception,
        ignore: ExceptionFilter = (),
        failure_if: Callable[[Any], bool] | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        health: HealthCheck | None = None,
        open_on_suspect: bool = False,
    ) -> None:
        check_name(name)
        if health is not None and not isinstance(health, HealthCheck):
            raise TypeError(f"health must be a HealthCheck, got {health!r}")
        check_bool("open_on_suspect", open_on_suspect)
        if open_on_suspect and health is None:
            raise ValueError("open_on_suspect=True needs a health check: pass health=...")
        given = locals()  # the settings are the arguments LIVE names, as live settings are
        settings = {key: given[key] for key in LIVE}
        config = _breaker_config(**settings, quorum=_quorum(open_when, quorum))
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
        self._timed = self._slow_after is not None or isinstance(config.window, TimeWindow)
        if store is None:
            from ..store.memory import MemoryStore

            store = MemoryStore(clock=self._clock)
        self.store = store
        self._core: BreakerCore = store.breaker(name, config, self._clock)
        self._plain = not self._timed and self._failure_if is None  # a success is a success
        self._local = type(self._core) is BreakerCore  # no store to tell
        # a shared breaker, count window, no result check, not strict: a success in a full
        # window of successes only adds to the buffer (SharedBreakerCore.success otherwise)
        self._buffered = (
            self._plain
            and not self._local
            and type(self._core.window) is CountCounter
            and not self._core.strict
        )
        self._core.add_front(self)
        self._held: ContextVar[tuple[tuple[int, int, float], ...]] = ContextVar(
            f"resilience.breaker.{name}", default=()
        )
        self.health = health
        self.open_on_suspect = open_on_suspect
        if health is not None:
            health._watch(self._on_health)
        follow(self)

    def _live_base(self) -> dict[str, Any]:
        """Its live settings in code."""
        return _live_values(self._core.base)

    def _live_apply(self, values: dict[str, Any]) -> str:
        """Every breaker of this core runs ``values`` from its next call on."""
        core = self._core
        config = _live_config(values, _live_values(core.base), core.base.quorum)
        renewed = config != core.config and core.reconfigure(config)
        for ref in core.fronts:
            front = ref()
            if front is None:
                continue
            front.config = config
            front._slow_after = config.slow_call_duration
        return "its window started anew, empty" if renewed else ""

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

    def _transitioned(self, core: BreakerCore, old: CircuitState, new: CircuitState) -> None:
        """The core moved: tell this breaker's listeners."""
        event = StateChanged(
            name=core.name,
            old=old,
            new=new,
            generation=core.generation,
            open_for=core.open_for if new is OPEN else None,
        )
        emit(self._listeners, event)

    def _rejected(self, error: CircuitOpenError) -> CircuitOpenError:
        """``error``, counted for status tools and reported to the listeners.

        The caller raises what this returns, ``raise self._rejected(CircuitOpenError(...))``,
        so the error is never a variable of the frame it is raised from: one would keep
        that frame, its traceback and itself in a reference cycle that only the garbage
        collector frees, which cost about 150 ns per rejection.
        """
        self._core.rejecting()  # a shared core joins it to a round
        if self._listeners:
            self._emit_rejected(error)
        return error

    def _emit_rejected(self, error: CircuitOpenError) -> None:
        emit(self._listeners, CallRejected(name=self.name, policy=self.kind, error=error))

    async def _admit(self) -> tuple[int, int, float]:
        core = self._core
        now = self._clock.monotonic()
        health = self.health
        probing = core.state is OPEN or core.state is HALF_OPEN
        if probing and health is not None and health.running:
            # the health check probes for us: no user call becomes a probe
            if core.state is OPEN and now < core.open_until:
                raise self._rejected(CircuitOpenError(core.name, "open", core.open_until - now))
            raise self._rejected(CircuitOpenError(core.name, str(core.state), health.interval))
        try:
            admitted = core.acquire(now)
            if admitted is None:
                admitted = await core.acquire_remote(now)
        except CircuitOpenError as error:
            self._rejected(error)
            raise
        return admitted[0], admitted[1], now

    # --- a bound health check ------------------------------------------------------------
    async def _on_health(self, result: HealthResult | None, suspected: bool) -> None:
        """After each round of the bound check: open on a new suspicion (``open_on_suspect``);
        while open or half-open, let the round's result stand in for the probes."""
        core = self._core
        if suspected and self.open_on_suspect and core.state is CLOSED:
            self._open_on_suspicion()
        elif result is not None and (core.state is OPEN or core.state is HALF_OPEN):
            await self._probe_with(result.ok)

    async def _probe_with(self, ok: bool) -> None:
        """Take the probe leases the usual way (``acquire``: OPEN becomes HALF_OPEN once
        ``open_for`` has passed, fleet-wide through the store) and report the check's result
        as the outcome of each, up to ``half_open_calls``. Before ``open_for`` has passed, or
        when other probes hold the slots, nothing happens: the next result tries again."""
        core = self._core
        for _ in range(core.config.half_open_calls):
            now = self._clock.monotonic()
            try:
                admitted = core.acquire(now)
                if admitted is None:
                    admitted = await core.acquire_remote(now)
            except CircuitOpenError:
                return
            gen, lease = admitted
            if not lease:
                return  # closed meanwhile (by other probes)
            core.record(gen, lease, not ok, False, now)
            if core.strict:
                await core.commit()
            if core.state is not HALF_OPEN:
                return  # the verdict is in

    def _open_on_suspicion(self) -> None:
        """Open now: the suspicion is recorded as failed outcomes, as many as the window needs
        to trip (so a shared breaker's trip goes to the fleet the way any local trip does)."""
        core = self._core
        gen = core.gen
        now = self._clock.monotonic()
        cfg = core.config
        if isinstance(cfg.window, TimeWindow):
            calls, failures, _ = core.counts(now)
            ratio = cfg.failure_ratio
            if ratio < 1.0:  # failures f such that (failures + f) / (calls + f) >= ratio
                needed = max(0, math.ceil((ratio * calls - failures) / (1.0 - ratio)))
            else:  # only a window of nothing but failures reaches 1.0
                needed = 0 if calls == failures else -1
            if needed < 0 or needed > 1_000_000:
                logger.warning(
                    "breaker %r cannot open on suspicion: its window holds %d successes",
                    self.name,
                    calls - failures,
                )
                return
            limit = max(needed, cfg.minimum_calls - calls, 0) + 1
        else:  # a count window full of failures always trips (minimum_calls <= its size)
            limit = cfg.window.size
        for _ in range(limit):
            if core.state is not CLOSED or core.gen != gen:
                return
            core.record(gen, 0, True, False, now)

    def _settle(
        self, gen: int, lease: int, start: float, exc: Exception | None, result: Any
    ) -> None:
        """Classify an outcome and hand it to the core.

        A classifier that raises makes the outcome a failure, then its error is raised: the
        core always hears of the call, so no probe lease is left behind.
        """
        error: Exception | None = None
        try:
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
        except Exception as raised:  # a user's predicate failed
            failed, error = True, raised
        if self._timed:
            now: float | None = self._clock.monotonic()
            slow = self._slow_after is not None and now - start >= self._slow_after  # type: ignore[operator]
        else:
            now, slow = None, False
        self._core.record(gen, lease, failed, slow, now)
        if error is not None:
            raise error

    def _wrap(self, fn: Protected) -> Protected:
        # few free variables: each is a cell, a GC-tracked object kept as long as the
        # function; the paths off the hottest one read the breaker's attributes instead
        core = self._core
        monotonic = self._clock.monotonic
        fast = self._plain and self._local  # an in-process breaker, count window, no result check
        buffered = self._buffered  # a shared one, its successes buffered (see __init__)
        window: CountCounter = core.window  # type: ignore[assignment]
        skip = 0  # calls before the next one is timed (latency is sampled)

        async def protected(*args: Any, **kwargs: Any) -> Any:
            nonlocal skip
            if core.state is CLOSED:
                gen = core.gen
                if fast:  # the hot path: a few attribute reads and one try/except
                    try:
                        result = await (fn(*args, **kwargs) if kwargs else fn(*args))
                    except Exception as exc:
                        self._settle(gen, 0, 0.0, exc, None)
                        raise
                    # a full window of successes stays as it is: only read it; until it is
                    # full, or while it holds failures, the core counts the success. It holds
                    # no slow calls: every breaker of a core has its configuration (the store
                    # refuses another), this one times no call, and slow_call_duration cannot
                    # be set live
                    if window.failures or window.calls < window.size:
                        core.record(gen, 0, False, False)
                    return result
                if buffered:  # a shared breaker's hot path (one call in SAMPLE_EVERY timed)
                    if skip:
                        skip -= 1
                        start = 0.0
                    else:
                        skip = SAMPLE_EVERY - 1
                        start = monotonic()
                    try:
                        result = await (fn(*args, **kwargs) if kwargs else fn(*args))
                    except Exception as exc:
                        if start:
                            core.took(monotonic() - start)
                        self._settle(gen, 0, start, exc, None)
                        raise
                    if start:
                        core.took(monotonic() - start)
                    # the common case of SharedBreakerCore.success, inline: a full window of
                    # successes, outcomes buffered since the last flush, the same generation
                    # (no slow calls in the window, as on the in-process path above: no
                    # breaker of this configuration times its calls)
                    p = core.pending  # type: ignore[attr-defined]
                    if (
                        p.calls
                        and gen == core.gen
                        and not (window.failures or window.calls < window.size)
                    ):
                        p.calls += 1
                    else:
                        core.success(gen)
                    return result
                lease = 0
                if self._timed:
                    start = monotonic()
                elif skip:  # latency is sampled: one call in SAMPLE_EVERY is timed
                    skip -= 1
                    start = 0.0
                else:
                    skip = SAMPLE_EVERY - 1
                    start = monotonic()
            elif core.state is OPEN and (now := monotonic()) < core.open_until:
                raise self._rejected(CircuitOpenError(core.name, "open", core.open_until - now))
            elif core.state is FORCED_OPEN:
                raise self._rejected(CircuitOpenError(core.name, "forced_open", None))
            else:
                gen, lease, start = await self._admit()
            try:
                result = await (fn(*args, **kwargs) if kwargs else fn(*args))
            except Exception as exc:
                if start:
                    core.took(monotonic() - start)
                self._settle(gen, lease, start, exc, None)
                if core.strict:
                    await core.commit()
                raise
            except BaseException:  # cancellation is no outcome, but the probe permit goes back
                if lease:
                    core.release(gen, lease)
                raise
            if start:
                core.took(monotonic() - start)
            if lease or not self._plain:
                self._settle(gen, lease, start, None, result)
                if core.strict:
                    await core.commit()
            elif not self._local:
                core.success(gen)
                if core.strict:
                    await core.commit()
            # else: a local breaker admitted while DISABLED: nothing to count
            return result

        return protected

    async def __aenter__(self) -> None:
        gen, lease, start = await self._admit()
        self._held.set((*self._held.get(), (gen, lease, start)))

    async def __aexit__(self, kind: ExcType, exc: BaseException | None, tb: Traceback) -> None:
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


register_schema(
    Schema(
        "circuit_breaker",
        LIVE,
        lambda values, base: _live_config(values, base),
    )
)
