"""How fast a breaker recovers after an outage, with a fixed or a doubling open time.

Usage::

    python benchmarks/recovery.py

A simulation on a fake clock (no waiting, no network): a dependency fails for an outage of
1 to 300 s (300 outages, uniformly drawn, seed 1) and then heals; calls arrive 20 per second.
For each open-time policy it prints how long after the dependency healed the breaker closed
(the time calls kept being rejected although they would have worked) and how many probe
requests reached the dead dependency per minute of outage. The numbers back the default of
``open_for_max`` (see docs/circuit-breaker.md).
"""

from __future__ import annotations

import random
import statistics

from resilience.errors import CircuitOpenError
from resilience.rules.breaker import CLOSED, BreakerConfig, BreakerCore
from resilience.rules.windows import CountWindow
from resilience.testing import FakeClock

RATE = 20.0  # calls per second


def run(cfg: BreakerConfig, outage: float) -> tuple[float, int]:
    """Seconds from healing to closed, and probes sent while the dependency was down."""
    clock = FakeClock()
    core = BreakerCore("dep", cfg, clock)
    heal = clock.monotonic() + outage
    probes = 0
    while True:
        now = clock.monotonic()
        try:
            gen, lease = core.acquire(now)
        except CircuitOpenError:
            clock.advance(1 / RATE)
            continue
        failed = now < heal
        probes += bool(lease) and failed
        core.record(gen, lease, failed, False, now)
        if not failed and core.state is CLOSED:
            return now - heal, probes
        clock.advance(1 / RATE)


def main() -> None:
    rng = random.Random(1)
    outages = [rng.uniform(1, 300) for _ in range(300)]
    print("| open time | recovery after healing: mean | p95 | max | probes per minute down |")
    print("|---|---|---|---|---|")
    for label, cap in (("fixed 5 s (default)", 5.0), ("doubling 5 s .. 60 s", 60.0)):
        cfg = BreakerConfig(
            minimum_calls=10, window=CountWindow(10), open_for=5.0, open_for_max=cap
        )
        results = [run(cfg, o) for o in outages]
        delays = sorted(d for d, _ in results)
        per_minute = statistics.mean(
            p / (o / 60) for (_, p), o in zip(results, outages, strict=True)
        )
        print(
            f"| {label} | {statistics.mean(delays):.1f} s | "
            f"{delays[int(len(delays) * 0.95)]:.1f} s | {delays[-1]:.1f} s | {per_minute:.1f} |"
        )


if __name__ == "__main__":
    main()
