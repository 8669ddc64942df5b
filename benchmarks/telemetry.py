"""What telemetry costs per call: none attached, the OpenTelemetry API alone, and the SDK.

Run: ``python benchmarks/telemetry.py [--quick]``; writes ``benchmarks/TELEMETRY.md``.
The protected call goes through a closed ``CircuitBreaker`` and a ``Pipeline`` of Retry,
CircuitBreaker and Timeout, each measured without a ``Telemetry`` listener, with one on the
API's no-op providers (no SDK configured), on the global providers with no SDK set, with the
SDK (an in-memory metric reader), and with the SDK but ``call_metrics=False``. Unused
telemetry should cost nothing: the no-SDK rows should match "no telemetry".
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Case, Settings, measure, ok_loop, timed_report
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from resilience import CircuitBreaker, Pipeline, Retry, Timeout
from resilience.telemetry import Telemetry


async def ok() -> int:
    return 1


def build(label: str, telemetry: Telemetry | None) -> list[Case]:
    listeners = [] if telemetry is None else [telemetry]
    breaker = CircuitBreaker(f"b-{label}", listeners=listeners)(ok)
    stack = Pipeline(
        Retry(on=ValueError, listeners=listeners),
        CircuitBreaker(f"s-{label}", listeners=listeners),
        Timeout(10, listeners=listeners),
        listeners=listeners,
    )(ok)
    return [
        Case("breaker", label, "resilience", ok_loop(breaker)),
        Case("retry+breaker+timeout", label, "resilience", ok_loop(stack)),
    ]


async def run(settings: Settings) -> str:
    api_only = Telemetry(
        meter_provider=metrics.NoOpMeterProvider(), tracer_provider=trace.NoOpTracerProvider()
    )
    global_only = Telemetry()  # the global proxies, no SDK set
    sdk_meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    sdk = Telemetry(meter_provider=sdk_meters, tracer_provider=TracerProvider())
    sdk_quiet = Telemetry(
        meter_provider=sdk_meters, tracer_provider=TracerProvider(), call_metrics=False
    )
    cases = [
        Case("bare", "await ok()", "python", ok_loop(ok)),
        *build("no telemetry", None),
        *build("API only (no-op providers)", api_only),
        *build("API only (global, no SDK set)", global_only),
        *build("SDK (in-memory reader)", sdk),
        *build("SDK, call_metrics=False", sdk_quiet),
    ]
    results = await measure(cases, settings)
    lines = [
        "# Telemetry cost per call",
        "",
        f"Python {platform.python_version()}, {settings.rounds} interleaved rounds; "
        "ns per call, median (min).",
        "",
        "Without an SDK (the API's no-op providers, or the global proxies with no SDK set) and "
        "with `call_metrics=False`, a policy does not time its calls: those rows should match "
        "`no telemetry` (differences are noise).",
        "",
        "| case | telemetry | ns/call | added vs none |",
        "| --- | --- | ---: | ---: |",
    ]
    base = {m.case.group: m.median for m in results if m.case.label == "no telemetry"}
    for m in results:
        added = m.median - base[m.case.group] if m.case.group in base else 0.0
        lines.append(
            f"| {m.case.group} | {m.case.label} | {m.median:,.0f} ({m.best:,.0f}) | {added:+,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args, report = timed_report(__doc__, run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "TELEMETRY.md").write_text(report)


if __name__ == "__main__":
    main()
