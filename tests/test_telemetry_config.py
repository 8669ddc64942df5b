"""Telemetry of live settings: a change applied is an event on the current span."""

from __future__ import annotations

from resilience import MemoryStore, Timeout

from .test_telemetry import Otel, otel  # noqa: F401 - the fixture, shared


async def test_a_change_applied_is_a_span_event(otel: Otel) -> None:  # noqa: F811
    """resilience.config_changed carries the policy, its name and the version it runs."""
    store = MemoryStore()
    timeout = Timeout(1.0, name="svc")
    otel.telemetry.instrument(timeout)
    with otel.tracers.get_tracer("test").start_as_current_span("deploy"):
        version = await store.configure("svc", seconds=0.5)
    (span,) = otel.spans.get_finished_spans()
    (event,) = [e for e in span.events if e.name == "resilience.config_changed"]
    assert dict(event.attributes or {}) == {
        "resilience.policy": "timeout",
        "resilience.name": "svc",
        "resilience.config.version": version,
    }
