"""Telemetry: events become OpenTelemetry metrics and span events, attempts become spans."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    Fallback,
    Hedge,
    MemoryStore,
    Pipeline,
    ResilienceTimeoutError,
    Retry,
    Throttle,
    Timeout,
)
from resilience.events import CallFinished, SubscriberReplaced
from resilience.telemetry import _LABELS_KEPT, Telemetry
from resilience.testing import FakeClock

from .helpers import boom, ok, raises_each


class Otel:
    """An SDK meter and tracer writing to memory."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))
        self.telemetry = Telemetry(meter_provider=self.meters, tracer_provider=self.tracers)

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) of every data point of metric `name`."""
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        for p in metric.data.data_points:
                            value = getattr(p, "value", None)
                            if value is None:
                                value = (p.count, p.sum)
                            out.append((dict(p.attributes), value))
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    """SDK providers for one test, shut down afterwards."""
    o = Otel()
    yield o
    o.meters.shutdown()
    o.tracers.shutdown()


async def test_calls_and_durations_by_outcome(otel: Otel, clock: FakeClock) -> None:
    """resilience.calls and resilience.call.duration carry policy, name and outcome."""
    b = CircuitBreaker(
        "pay",
        clock=clock,
        window=CountWindow(2),
        minimum_calls=2,
        failure_ratio=1.0,
        listeners=[otel.telemetry],
    )
    assert await b.call(ok) == "ok"
    await raises_each(2, ValueError, b.call, boom, match="boom")
    with pytest.raises(CircuitOpenError):
        await b.call(ok)
    calls = {p[0]["resilience.outcome"]: p[1] for p in otel.points("resilience.calls")}
    assert calls == {"success": 1, "failure": 2, "rejected": 1}
    attrs = otel.points("resilience.calls")[0][0]
    assert attrs["resilience.policy"] == "circuit_breaker"
    assert attrs["resilience.name"] == "pay"
    count, total = next(
        v
        for a, v in otel.points("resilience.call.duration")
        if a["resilience.outcome"] == "failure"
    )
    assert count == 2
    assert total == 0.0  # the fake clock did not move
    transitions = otel.points("resilience.breaker.transitions")
    assert transitions == [
        (
            {
                "resilience.policy": "circuit_breaker",
                "resilience.name": "pay",
                "resilience.state.from": "closed",
                "resilience.state.to": "open",
            },
            1,
        )
    ]
    assert otel.points("resilience.rejections")[0][1] == 1


async def test_breaker_state_and_bulkhead_gauges(otel: Otel, clock: FakeClock) -> None:
    """Observable gauges report each breaker's state and each bulkhead's slots in use."""
    b = CircuitBreaker("pay", clock=clock)
    bulkhead = Bulkhead(3, name="pool")
    otel.telemetry.instrument(b, bulkhead)
    await b.force_open()
    gate = asyncio.Event()
    task = asyncio.create_task(bulkhead.call(gate.wait))
    await asyncio.sleep(0)
    states = {a["resilience.state"]: v for a, v in otel.points("resilience.breaker.state")}
    assert states == {"closed": 0, "open": 0, "half_open": 0, "forced_open": 1, "disabled": 0}
    assert otel.points("resilience.bulkhead.in_flight") == [({"resilience.name": "pool"}, 1)]
    gate.set()
    await task


async def _refused() -> None:
    raise ConnectionError("refused")  # a call the backend did not accept


async def test_throttle_and_hedge_window_gauges(otel: Otel, clock: FakeClock) -> None:
    """A throttle's window (requests, accepts) and the chance it refuses a call now, and a
    hedge's window (calls, hedges) and its delay, are observable gauges."""
    throttle = Throttle(k=2.0, window=60, clock=clock, random=lambda: 0.99, name="api")
    hedge = Hedge(delay=0.25, name="search", clock=clock)
    otel.telemetry.instrument(throttle)
    otel.telemetry.watch(hedge)
    for _ in range(6):
        await throttle.call(ok)
    await raises_each(4, ConnectionError, throttle.call, _refused)
    hedge.counts.add(10, 1)
    window = {a["resilience.figure"]: v for a, v in otel.points("resilience.throttle.window")}
    assert window == {"requests": 10, "accepts": 6}
    ((labels, chance),) = otel.points("resilience.throttle.rejection_probability")
    assert labels == {"resilience.name": "api"}
    assert chance == pytest.approx(throttle.ratio)
    window = {a["resilience.figure"]: v for a, v in otel.points("resilience.hedge.window")}
    assert window == {"calls": 10, "hedges": 1}
    assert otel.points("resilience.hedge.delay") == [({"resilience.name": "search"}, 0.25)]


async def test_retries_fallbacks_timeouts_and_span_events(otel: Otel) -> None:
    """Retries, fallbacks and timeouts are counted and added as events to the current span."""
    clock = FakeClock(autojump=True)
    telemetry = otel.telemetry
    policy = Pipeline(
        Fallback(on=ResilienceTimeoutError, value="late"),
        Retry(on=ResilienceTimeoutError, attempts=2, wait=lambda s: 1.0, clock=clock),
        Timeout(1, clock=clock),
        name="p",
    )
    telemetry.instrument(policy)

    async def hang() -> None:
        await asyncio.sleep(3600)

    tracer = otel.tracers.get_tracer("test")

    async def expire_soon() -> str:
        task = asyncio.ensure_future(policy.call(hang))
        for _ in range(100):  # move fake time until both attempts have timed out
            if task.done():
                break
            await asyncio.sleep(0)
            clock.advance(1)
        return await task

    with tracer.start_as_current_span("request"):
        assert await expire_soon() == "late"
    assert otel.points("resilience.retries")[0][1] == 1
    assert otel.points("resilience.timeouts")[0][1] == 2
    assert otel.points("resilience.fallbacks")[0][1] == 1
    (span,) = otel.spans.get_finished_spans()
    names = [e.name for e in span.events]
    assert names.count("resilience.timeout") == 2
    assert "resilience.retry" in names
    assert "resilience.fallback" in names


async def test_attempt_spans_and_durations(otel: Otel) -> None:
    """attempt() inside Retry makes one child span and one duration sample per attempt."""
    clock = FakeClock(autojump=True)
    failures = [ValueError("1"), ValueError("2")]

    async def flaky() -> str:
        await clock.sleep(0.5)
        if failures:
            raise failures.pop(0)
        return "ok"

    policy = Pipeline(
        Retry(on=ValueError, attempts=3, wait=lambda s: 0.0, clock=clock),
        otel.telemetry.attempt("upstream", clock=clock),
    )
    tracer = otel.tracers.get_tracer("test")
    with tracer.start_as_current_span("request") as parent:
        assert await policy.call(flaky) == "ok"
    spans = [s for s in otel.spans.get_finished_spans() if s.name == "resilience.upstream"]
    assert len(spans) == 3
    assert all(
        s.parent is not None and s.parent.span_id == parent.get_span_context().span_id
        for s in spans
    )
    assert [s.attributes["resilience.outcome"] for s in spans] == ["failure", "failure", "success"]
    assert [s.status.is_ok for s in spans] == [False, False, True]
    durations = {a["resilience.outcome"]: v for a, v in otel.points("resilience.attempt.duration")}
    assert durations["failure"] == (2, 1.0)
    assert durations["success"] == (1, 0.5)


async def test_store_events_and_degraded_gauge(otel: Otel) -> None:
    """Store events are counted; the degraded gauge follows the store."""
    from resilience.store.redis import RedisStore

    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.05, prefix="otel")
    otel.telemetry.instrument(store)
    try:
        b = CircuitBreaker("x", store=store)
        assert await b.call(ok) == "ok"
        await store.sync()
        assert store.degraded
        points = otel.points("resilience.store.events")
        assert points[0][0]["resilience.event"] == "degraded"
        assert otel.points("resilience.store.degraded") == [({"resilience.store": "otel"}, 1)]
        lags = otel.points("resilience.store.loop_lag")
        assert [labels for labels, _ in lags] == [{"resilience.store": "otel"}]
        assert lags[0][1] >= 0
        store._emit(SubscriberReplaced(name="otel"))  # as its subscriber does
        kinds = [p[0]["resilience.event"] for p in otel.points("resilience.store.events")]
        assert "subscriber_replaced" in kinds
    finally:
        await store.aclose()


async def test_nothing_runs_without_telemetry(otel: Otel) -> None:
    """Policies without a Telemetry listener produce no metrics at all."""
    b = CircuitBreaker("quiet", store=MemoryStore())
    await b.call(ok)
    assert otel.points("resilience.calls") == []


def test_instrument_refuses_other_things(otel: Otel) -> None:
    """Instrumenting something that is neither a policy nor a store is a TypeError."""
    with pytest.raises(TypeError, match="cannot instrument"):
        otel.telemetry.instrument(object())
    with pytest.raises(TypeError, match="can watch"):
        otel.telemetry.watch(object())  # type: ignore[arg-type]


async def test_no_op_providers_cost_nothing(clock: FakeClock) -> None:
    """With the API's no-op providers a policy does not time its calls for telemetry."""
    from opentelemetry import metrics, trace

    telemetry = Telemetry(
        meter_provider=metrics.NoOpMeterProvider(), tracer_provider=trace.NoOpTracerProvider()
    )
    assert not telemetry.recording()
    assert not telemetry.tracing()
    breaker = CircuitBreaker("b", clock=clock, listeners=[telemetry])
    # the policy's own function, not the timing wrapper around it
    assert "observed" not in breaker.wrap(ok).__qualname__
    attempt = telemetry.attempt()
    assert attempt._wrap(ok) is ok


def test_global_proxy_provider_counts_as_no_op() -> None:
    """Without an SDK set globally, telemetry knows nothing is recorded."""
    telemetry = Telemetry()
    assert not telemetry.recording()
    assert not telemetry.tracing()


async def test_call_metrics_per_policy(otel: Otel, clock: FakeClock) -> None:
    """``call_metrics`` limits ``resilience.calls`` to the chosen kinds or names."""
    telemetry = Telemetry(
        meter_provider=otel.meters, tracer_provider=otel.tracers, call_metrics=("payments",)
    )
    await CircuitBreaker("payments", clock=clock, listeners=[telemetry]).call(ok)
    await CircuitBreaker("search", clock=clock, listeners=[telemetry]).call(ok)
    names = {p[0]["resilience.name"] for p in otel.points("resilience.calls")}
    assert names == {"payments"}
    off = Telemetry(meter_provider=otel.meters, call_metrics=False)
    assert not off.wants(CallFinished, "circuit_breaker", "payments")
    with pytest.raises(TypeError, match="call_metrics"):
        Telemetry(call_metrics="payments")


def test_the_label_cache_stays_bounded(otel: Otel) -> None:
    """Per-call labels are cached for a bounded number of (policy, name, outcome): breakers
    named per origin that come and go hold no memory forever, and calls are still counted."""
    names = [f"https://host{i}.example" for i in range(_LABELS_KEPT + 1)]
    for name in names:
        otel.telemetry(
            CallFinished(name=name, policy="circuit_breaker", outcome="success", duration=0.0)
        )
    assert len(otel.telemetry._labels) <= _LABELS_KEPT
    otel.telemetry(
        CallFinished(name=names[0], policy="circuit_breaker", outcome="success", duration=0.0)
    )
    counted = {a["resilience.name"]: v for a, v in otel.points("resilience.calls")}
    assert counted[names[0]] == 2
