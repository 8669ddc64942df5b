"""OpenTelemetry metrics and traces for policies, stores and breakers.

``Telemetry`` is a listener: pass it as ``listeners=[telemetry]`` when building policies (or
call ``telemetry.instrument(...)`` before decorating) and every event becomes a metric, and a
span event on the current span. ``telemetry.attempt()`` is a policy to put inside a ``Retry``:
a span and a duration per attempt. Only ``opentelemetry-api`` is needed (the ``otel`` extra).

Unused telemetry is free: while no SDK is configured (the API's no-op or proxy providers),
a policy wrapping a function with only a ``Telemetry`` listener does not time its calls at
all, and ``attempt()`` adds nothing. Configure the SDK before decorating. Call metrics (the
per-call ``resilience.calls`` and ``resilience.call.duration``) can be limited to some
policies with ``call_metrics=("circuit_breaker", "payments")`` (kinds or names), or turned
off with ``call_metrics=False``; the other metrics count rare events and stay on.

Metric names (all attributes are low-cardinality: policy kind, policy name, outcome, state):

=================================  =========  ===============================================
``resilience.calls``               counter    calls by policy kind, policy name and outcome
``resilience.call.duration``       histogram  seconds, same attributes
``resilience.attempt.duration``    histogram  seconds per attempt (``attempt()``), by outcome
``resilience.breaker.state``       gauge      1 for the current state, 0 for the others
``resilience.breaker.transitions`` counter    by ``resilience.state.from`` / ``.to``
``resilience.retries``             counter    retries scheduled
``resilience.rejections``          counter    calls refused (breaker, bulkhead, rate limit, budget)
``resilience.fallbacks``           counter    fallback values served
``resilience.timeouts``            counter    timeouts that expired
``resilience.bulkhead.in_flight``  gauge      calls holding a slot
``resilience.bulkhead.limit``      gauge      calls allowed in flight now (adaptive or fixed)
``resilience.throttle.window``     gauge      a throttle's window: ``resilience.figure``
                                              ``requests`` and ``accepts``
``resilience.throttle.rejection_probability``
                                   gauge      the chance a throttle refuses a call now
``resilience.hedge.window``        gauge      a hedge's window: ``resilience.figure``
                                              ``calls`` and ``hedges``
``resilience.hedge.delay``         gauge      seconds a hedge waits before its next attempt
``resilience.store.degraded``      gauge      1 while a store runs on local state
``resilience.store.loop_lag``      gauge      seconds the event loop was late (Redis store)
``resilience.store.events``        counter    degraded / recovered / data_reset /
                                              subscriber_replaced
``resilience.coalesce.joined``     counter    calls that shared an execution under way
``resilience.batch.size``          histogram  distinct keys per batch a ``Collapse`` sent
``resilience.batch.callers``       histogram  calls served per batch
``resilience.batch.delay``         histogram  seconds a batch gathered calls before it was sent
=================================  =========  ===============================================
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Status, StatusCode

from .clock import Clock
from .events import (
    BatchCalled,
    CallFinished,
    CallRejected,
    Coalesced,
    ConfigChanged,
    Event,
    FallbackUsed,
    RetryScheduled,
    StateChanged,
    StoreDataReset,
    StoreDegraded,
    StoreRecovered,
    SubscriberReplaced,
    TimedOut,
)
from .policies.base import BasePolicy, Protected, check_name
from .policies.bulkhead import Bulkhead
from .policies.circuit import CircuitBreaker
from .policies.collapse import Collapse
from .policies.hedge import Hedge
from .policies.pipeline import Pipeline
from .policies.throttle import Throttle
from .states import CircuitState
from .version import __version__

__all__ = ["Telemetry"]

_SCOPE = "resilience"
#: the per-call label sets kept ready, at most: past it they are built again (names that come
#: and go, as a breaker per origin, hold no memory forever)
_LABELS_KEPT = 1024

#: what the listener records into: the attribute, a counter or a histogram, name, unit, text
_RECORDED = (
    ("_calls", "counter", "resilience.calls", "{call}", "Calls through a policy, by outcome."),
    ("_duration", "histogram", "resilience.call.duration", "s", "Time spent in a policy's call."),
    ("_attempt", "histogram", "resilience.attempt.duration", "s", "Time of one attempt."),
    ("_transitions", "counter", "resilience.breaker.transitions", "{transition}", "State changes."),
    ("_retries", "counter", "resilience.retries", "{retry}", "Retries scheduled."),
    ("_rejections", "counter", "resilience.rejections", "{call}", "Calls refused before starting."),
    ("_fallbacks", "counter", "resilience.fallbacks", "{call}", "Fallback values served."),
    ("_timeouts", "counter", "resilience.timeouts", "{call}", "Timeouts that expired."),
    ("_store_events", "counter", "resilience.store.events", "{event}", "Store degraded/recovered."),
    ("_joined", "counter", "resilience.coalesce.joined", "{call}", "Calls that shared one."),
    ("_batch_size", "histogram", "resilience.batch.size", "{key}", "Distinct keys per batch."),
    (
        "_batch_callers",
        "histogram",
        "resilience.batch.callers",
        "{call}",
        "Calls served per batch.",
    ),
    ("_batch_delay", "histogram", "resilience.batch.delay", "s", "Time a batch gathered calls."),
)

#: the observable gauges: the method that observes them, name, unit, text
_GAUGES = (
    (
        "_observe_breakers",
        "resilience.breaker.state",
        "1",
        "1 for a breaker's current state, 0 for the others.",
    ),
    (
        "_observe_bulkheads",
        "resilience.bulkhead.in_flight",
        "{call}",
        "Calls holding a bulkhead slot.",
    ),
    (
        "_observe_limits",
        "resilience.bulkhead.limit",
        "{call}",
        "Calls a bulkhead allows in flight now (its adaptive limit, if any).",
    ),
    ("_observe_stores", "resilience.store.degraded", "1", "1 while a store runs on local state."),
    (
        "_observe_loop_lag",
        "resilience.store.loop_lag",
        "s",
        "The worst lateness of the event loop a store measured in the last 10 s.",
    ),
    (
        "_observe_throttles",
        "resilience.throttle.window",
        "{call}",
        "A throttle's requests and accepts over its window.",
    ),
    (
        "_observe_throttle_ratios",
        "resilience.throttle.rejection_probability",
        "1",
        "The probability that a throttle refuses a call now.",
    ),
    (
        "_observe_hedges",
        "resilience.hedge.window",
        "{call}",
        "A hedge's calls and hedges sent over its window.",
    ),
    (
        "_observe_hedge_delays",
        "resilience.hedge.delay",
        "s",
        "Seconds a hedge waits before sending another attempt (learned or fixed).",
    ),
)


class Telemetry:
    """Turns policy events into OpenTelemetry metrics and span events.

    ``meter_provider`` / ``tracer_provider`` default to the global ones. ``span_events``
    adds an event to the current span for retries, rejections, fallbacks, timeouts and state
    changes. ``call_metrics``: ``True`` (every policy), ``False`` (none), or the policy
    kinds and names whose calls are counted and timed.
    """

    # made from _RECORDED
    _calls: metrics.Counter
    _duration: metrics.Histogram
    _attempt: metrics.Histogram
    _transitions: metrics.Counter
    _retries: metrics.Counter
    _rejections: metrics.Counter
    _fallbacks: metrics.Counter
    _timeouts: metrics.Counter
    _store_events: metrics.Counter
    _joined: metrics.Counter
    _batch_size: metrics.Histogram
    _batch_callers: metrics.Histogram
    _batch_delay: metrics.Histogram

    def __init__(
        self,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        span_events: bool = True,
        call_metrics: bool | Collection[str] = True,
    ) -> None:
        if isinstance(call_metrics, bool):
            self.call_metrics: bool | frozenset[str] = call_metrics
        elif isinstance(call_metrics, str) or not isinstance(call_metrics, Collection):
            raise TypeError(
                f"call_metrics must be a bool or a collection of policy kinds/names, "
                f"got {call_metrics!r}"
            )
        else:
            self.call_metrics = frozenset(call_metrics)
            for item in self.call_metrics:
                if not isinstance(item, str) or not item:
                    raise TypeError(f"call_metrics must hold policy kinds or names, got {item!r}")
        self._meter_provider = meter_provider
        self._tracer_provider = tracer_provider

        meter = (meter_provider or metrics.get_meter_provider()).get_meter(_SCOPE, __version__)
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            _SCOPE, __version__
        )
        self.span_events = bool(span_events)
        for attr, make, name, unit, text in _RECORDED:
            create = meter.create_counter if make == "counter" else meter.create_histogram
            setattr(self, attr, create(name, unit=unit, description=text))
        for method, name, unit, text in _GAUGES:
            callbacks = [getattr(self, method)]
            meter.create_observable_gauge(name, callbacks, unit=unit, description=text)
        self._labels: dict[tuple[str, str, str], dict[str, str]] = {}
        self._breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self._bulkheads: weakref.WeakSet[Bulkhead] = weakref.WeakSet()
        self._throttles: weakref.WeakSet[Throttle] = weakref.WeakSet()
        self._hedges: weakref.WeakSet[Hedge] = weakref.WeakSet()
        self._stores: weakref.WeakSet[Any] = weakref.WeakSet()

    # wiring ---------------------------------------------------------------------------------
    def instrument(self, *targets: object) -> None:
        """Listen to policies, pipelines (and their policies) and stores.

        Breakers, bulkheads, throttles, hedges and stores are also watched by the observable
        gauges. Instrument a
        policy before decorating with it: ``CallFinished`` reports are set up at wrap time.
        """
        for target in targets:
            if isinstance(target, Pipeline):
                self.instrument(*target.policies)
            if isinstance(target, BasePolicy):
                if self not in target._listeners:
                    target.add_listener(self)
                if isinstance(target, CircuitBreaker | Bulkhead | Throttle | Hedge):
                    self.watch(target)
            elif isinstance(target, Collapse):
                if self not in target._listeners:
                    target.add_listener(self)
            elif hasattr(target, "add_listener") and hasattr(target, "degraded"):
                target.add_listener(self)
                self._stores.add(target)
            elif not isinstance(target, Pipeline):
                raise TypeError(f"cannot instrument {target!r}: not a policy or a store")

    def watch(self, *targets: CircuitBreaker | Bulkhead | Throttle | Hedge) -> None:
        """Report gauges for breakers, bulkheads, throttles and hedges built with
        ``listeners=[telemetry]``."""
        for target in targets:
            if isinstance(target, CircuitBreaker):
                self._breakers.add(target)
            elif isinstance(target, Bulkhead):
                self._bulkheads.add(target)
            elif isinstance(target, Throttle):
                self._throttles.add(target)
            elif isinstance(target, Hedge):
                self._hedges.add(target)
            else:
                raise TypeError(
                    f"can watch breakers, bulkheads, throttles and hedges, not {target!r}"
                )

    def attempt(
        self, name: str = "attempt", *, span: bool = True, clock: Clock | None = None
    ) -> AttemptTelemetry:
        """A policy timing each attempt (and opening a span per attempt): put it inside Retry."""
        return AttemptTelemetry(self, name, span=span, clock=clock)

    # is anything recorded? ------------------------------------------------------------------
    def recording(self) -> bool:
        """Whether metrics go anywhere: ``False`` on the API's no-op (or unset proxy) provider."""
        provider = self._meter_provider
        if provider is None:
            provider = metrics.get_meter_provider()
        return not _no_op(provider, metrics.NoOpMeterProvider)

    def tracing(self) -> bool:
        """Whether spans go anywhere: ``False`` on the API's no-op (or unset proxy) provider."""
        provider = self._tracer_provider
        if provider is None:
            provider = trace.get_tracer_provider()
        return not _no_op(provider, trace.NoOpTracerProvider)

    def _counts_calls(self, kind: str, name: str) -> bool:
        selected = self.call_metrics
        if isinstance(selected, bool):
            return selected
        return kind in selected or name in selected

    def wants(self, event: type[Event], kind: str, name: str) -> bool:
        """Asked by a policy when it wraps a function: ``CallFinished`` only if recorded."""
        if issubclass(event, CallFinished):
            return self._counts_calls(kind, name) and self.recording()
        return True

    # the listener ---------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        """Record one event."""
        if isinstance(event, CallFinished):  # the per-call event: keep it short
            if self.call_metrics is not True and not self._counts_calls(event.policy, event.name):
                return
            key = (event.policy, event.name, event.outcome)
            labels = self._labels.get(key)
            if labels is None:
                if len(self._labels) >= _LABELS_KEPT:
                    self._labels.clear()  # bounded: the busy names come back at once
                labels = self._labels[key] = {
                    "resilience.policy": key[0],
                    "resilience.name": key[1],
                    "resilience.outcome": key[2],
                }
            self._calls.add(1, labels)
            self._duration.record(event.duration, labels)
            return
        attrs: dict[str, Any] = {"resilience.policy": event.policy, "resilience.name": event.name}
        if isinstance(event, StateChanged):
            attrs["resilience.state.from"] = event.old.value
            attrs["resilience.state.to"] = event.new.value
            self._transitions.add(1, attrs)
            self._span_event("resilience.state_changed", attrs)
        elif isinstance(event, RetryScheduled):
            self._retries.add(1, attrs)
            details = {
                **attrs,
                "resilience.attempt": event.attempt,
                "resilience.delay": event.delay,
            }
            if event.error is not None:
                details["exception.type"] = type(event.error).__qualname__
            self._span_event("resilience.retry", details)
        elif isinstance(event, CallRejected):
            self._rejections.add(1, attrs)
            self._span_event(
                "resilience.rejected", {**attrs, "exception.type": type(event.error).__qualname__}
            )
        elif isinstance(event, FallbackUsed):
            self._fallbacks.add(1, attrs)
            self._span_event(
                "resilience.fallback", {**attrs, "exception.type": type(event.error).__qualname__}
            )
        elif isinstance(event, TimedOut):
            self._timeouts.add(1, attrs)
            self._span_event("resilience.timeout", {**attrs, "resilience.seconds": event.seconds})
        elif isinstance(event, Coalesced):
            self._joined.add(event.callers - 1, attrs)
        elif isinstance(event, BatchCalled):
            self._batch_size.record(event.size, attrs)
            self._batch_callers.record(event.callers, attrs)
            self._batch_delay.record(event.delay, attrs)
        elif isinstance(event, ConfigChanged):
            version = {"resilience.config.version": event.version}
            self._span_event("resilience.config_changed", {**attrs, **version})
        elif isinstance(event, (StoreDegraded, StoreRecovered, StoreDataReset, SubscriberReplaced)):
            kind = {
                StoreDegraded: "degraded",
                StoreRecovered: "recovered",
                SubscriberReplaced: "subscriber_replaced",
            }.get(type(event), "data_reset")
            self._store_events.add(1, {**attrs, "resilience.event": kind})

    def _span_event(self, name: str, attrs: dict[str, Any]) -> None:
        if not self.span_events:
            return
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(name, attrs)

    # gauges ---------------------------------------------------------------------------------
    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        for breaker in list(self._breakers):
            current = breaker.state
            for state in CircuitState:
                yield Observation(
                    1 if state is current else 0,
                    {"resilience.name": breaker.name, "resilience.state": state.value},
                )

    def _observe_bulkheads(self, options: CallbackOptions) -> Iterable[Observation]:
        for bulkhead in list(self._bulkheads):
            yield Observation(bulkhead.in_flight, {"resilience.name": bulkhead.name})

    def _observe_limits(self, options: CallbackOptions) -> Iterable[Observation]:
        for bulkhead in list(self._bulkheads):
            yield Observation(bulkhead.current_limit, {"resilience.name": bulkhead.name})

    def _observe_throttles(self, options: CallbackOptions) -> Iterable[Observation]:
        return _windows(self._throttles, ("requests", "accepts"))

    def _observe_throttle_ratios(self, options: CallbackOptions) -> Iterable[Observation]:
        for throttle in list(self._throttles):
            yield Observation(throttle.ratio, {"resilience.name": throttle.name})

    def _observe_hedges(self, options: CallbackOptions) -> Iterable[Observation]:
        return _windows(self._hedges, ("calls", "hedges"))

    def _observe_hedge_delays(self, options: CallbackOptions) -> Iterable[Observation]:
        for hedge in list(self._hedges):
            yield Observation(hedge.delay, {"resilience.name": hedge.name})

    def _observe_stores(self, options: CallbackOptions) -> Iterable[Observation]:
        for store in list(self._stores):
            name = getattr(store, "prefix", type(store).__name__)
            yield Observation(1 if store.degraded else 0, {"resilience.store": name})

    def _observe_loop_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        for store in list(self._stores):
            lag = getattr(store, "loop_lag", None)
            if isinstance(lag, float):
                name = getattr(store, "prefix", type(store).__name__)
                yield Observation(lag, {"resilience.store": name})


def _windows(
    policies: Iterable[Throttle | Hedge], figures: tuple[str, str]
) -> Iterable[Observation]:
    """Each policy's two window totals, as ``figures`` name them."""
    for policy in list(policies):
        for figure, value in zip(figures, policy.counts.totals(), strict=True):
            yield Observation(value, {"resilience.name": policy.name, "resilience.figure": figure})


def _no_op(provider: object, no_op: type) -> bool:
    """The API's no-op provider, or its global proxy while no SDK has been set."""
    # the proxy's class is private to opentelemetry-api: recognised by its name only
    return isinstance(provider, no_op) or type(provider).__name__ in _PROXIES


_PROXIES = frozenset({"_ProxyMeterProvider", "ProxyTracerProvider"})


class AttemptTelemetry(BasePolicy):
    """Times every call through it (and opens a span for it); made by ``Telemetry.attempt``.

    Inside a ``Retry`` each attempt is one call: ``resilience.attempt.duration`` gets one
    sample per attempt, and each attempt is a child span of the caller's span.
    """

    kind = "attempt"

    def __init__(
        self, telemetry: Telemetry, name: str, *, span: bool = True, clock: Clock | None = None
    ) -> None:
        super().__init__(check_name(name), clock, ())
        self.telemetry = telemetry
        self.span = span

    def _wrap(self, fn: Protected) -> Protected:
        with_span = self.span and self.telemetry.tracing()
        if not with_span and not self.telemetry.recording():
            return fn  # nothing would be recorded: free
        histogram = self.telemetry._attempt
        tracer = self.telemetry.tracer
        monotonic = self._clock.monotonic
        name = self.name

        async def protected(*args: Any, **kwargs: Any) -> Any:
            attrs = {"resilience.name": name, "resilience.outcome": "success"}
            start = monotonic()
            span = tracer.start_span(f"resilience.{name}") if with_span else None
            try:
                if span is None:
                    return await fn(*args, **kwargs)
                with trace.use_span(span, end_on_exit=False, record_exception=False):
                    return await fn(*args, **kwargs)
            except Exception as exc:
                attrs["resilience.outcome"] = "failure"
                if span is not None:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
                raise
            except BaseException:
                attrs["resilience.outcome"] = "cancelled"
                raise
            finally:
                histogram.record(monotonic() - start, attrs)
                if span is not None:
                    span.set_attributes(attrs)
                    span.end()

        return protected
