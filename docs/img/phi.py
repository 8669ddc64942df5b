"""Draw docs/img/phi.png: phi over time as heartbeats stop (run: python docs/img/phi.py).

A health check every second succeeds for 30 s (with a little jitter), then the dependency
stops answering. The detector is the one ``HealthCheck(interval=1.0)`` builds by default,
next to a bare ``PhiAccrualDetector`` without an acceptable pause.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # this checkout's resilience, not an installed one
from resilience import PhiAccrualDetector  # noqa: E402

STOP = 30.0  # the last heartbeat arrives around here
END = 40.0
STEP = 0.01


def series(detector: PhiAccrualDetector, seed: int) -> tuple[list[float], list[float], float]:
    """phi every STEP seconds; heartbeats every 1 s +- 30 ms until STOP."""
    rng = random.Random(seed)
    beats = []
    t = 0.0
    while t <= STOP:
        beats.append(t)
        t += 1.0 + rng.uniform(-0.03, 0.03)
    times, levels = [], []
    next_beat = 0
    now = 0.0
    while now <= END:
        while next_beat < len(beats) and beats[next_beat] <= now:
            detector.heartbeat(beats[next_beat])
            next_beat += 1
        times.append(now)
        levels.append(min(detector.phi(now), 20.0))
        now = round(now + STEP, 6)
    return times, levels, beats[-1]


def main() -> None:
    default = PhiAccrualDetector(
        min_std=0.1, acceptable_pause=2.0, first_interval=1.0, max_interval=3.0
    )
    bare = PhiAccrualDetector(min_std=0.1, first_interval=1.0)
    t1, phi1, last = series(default, seed=4)
    t2, phi2, _ = series(bare, seed=4)
    crossed = next(t for t, p in zip(t1, phi1, strict=True) if t > last and p >= 8.0)

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    ax.plot(t2, phi2, color="#bbbbbb", lw=1.2, label="acceptable_pause=0")
    ax.plot(t1, phi1, color="#1f77b4", lw=1.6, label="HealthCheck default (pause = 2 intervals)")
    ax.axhline(8.0, color="#d62728", ls="--", lw=1.2, label="threshold 8.0")
    ax.axvline(last, color="#555555", ls=":", lw=1.0)
    ax.annotate(
        "last heartbeat",
        (last, 12.0),
        xytext=(last - 6.0, 12.0),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "#555555"},
    )
    ax.annotate(
        f"suspected {crossed - last:.1f} s later",
        (crossed, 8.0),
        xytext=(crossed + 0.6, 3.0),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "#d62728"},
    )
    ax.set_xlim(20.0, END)
    ax.set_ylim(0.0, 20.0)
    ax.set_xlabel("seconds (a heartbeat every 1 s, +- 30 ms, until they stop)")
    ax.set_ylabel("phi (capped at 20)")
    ax.set_title("Phi accrual: suspicion grows with the silence")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(HERE / "phi.png")
    print(f"wrote {HERE / 'phi.png'}: last heartbeat {last:.2f} s, suspected at {crossed:.2f} s")


if __name__ == "__main__":
    main()
