"""Choosing one endpoint of a service: ejection, the maximum ejection share, then P2C.

Pure rules, no I/O and no event loop: the transport reads each endpoint's breaker and health
source and hands plain values in, so every rule here is tested with a seeded random source.

* **Ejected**: an endpoint whose breaker is open (before its probe time) or forced open, or
  whose health source says ``healthy == False``.
* **Maximum ejection share** (Envoy's ``max_ejection_percent``): at most
  ``floor(max_ejected * n)`` of ``n`` endpoints are kept out at once, but at least one when
  ``max_ejected > 0`` (as Envoy ejects one host whatever the percentage: otherwise 0.5 of one
  endpoint, or 0.2 of three, would turn ejection off without a word). Endpoints ejected by
  their breaker always stay out (their calls failed, and the breaker rejects them anyway);
  endpoints ejected by their health source alone fill what room is left, the worst first, and
  the least bad of them (lowest load score) are used again. So a health check gone wrong
  cannot empty the pool; only failing calls can.
* **Power of two choices** (Finagle's P2C with a peak EWMA): two distinct candidates drawn at
  random, the one with the lower score ``(in_flight + 1) * cost`` wins, where ``cost`` is a
  peak-sensitive moving average of the endpoint's latency.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "DECAY",
    "FAILURE_COST",
    "MIN_COST",
    "HealthSource",
    "Load",
    "eligible",
    "pick",
]

DECAY = 10.0
"""Seconds over which a latency sample fades (Finagle's ``decayTime``): ``exp(-t / DECAY)``."""

FAILURE_COST = 1.0
"""A failed call (transport error, timeout, failing status) counts as taking at least this long,
so an endpoint that fails fast never looks fast."""

MIN_COST = 1e-4
"""The cost of an endpoint never measured (or measured at ~0): in-flight requests still count."""


class HealthSource(Protocol):
    """Anything with a ``healthy`` attribute (a health check, a flag set by service discovery)."""

    @property
    def healthy(self) -> bool: ...  # pragma: no cover - a protocol


class Load:
    """What P2C compares for one endpoint: requests in flight and a peak EWMA of latency.

    ``observe`` takes a call's duration: a slower call than the current cost replaces it at
    once (the peak), a faster one pulls it down by ``1 - exp(-dt / DECAY)``, ``dt`` being the
    time since the previous sample. Between samples the cost fades towards zero with the same
    time constant, so an endpoint avoided for being slow is tried again after a while.
    ``outlasted`` takes a call cancelled before its answer: the time it had run, a lower
    bound that can only raise the cost (otherwise an endpoint whose slow answers are always
    overtaken by hedges would never look slow).
    """

    __slots__ = ("cost", "in_flight", "stamp")

    def __init__(self) -> None:
        self.in_flight = 0
        self.cost = 0.0
        self.stamp = 0.0

    def _faded(self, now: float) -> tuple[float, float]:
        """The cost at ``now`` and the weight of the past, ``exp(-dt / DECAY)``."""
        weight = math.exp(-max(now - self.stamp, 0.0) / DECAY)
        return self.cost * weight, weight

    def score(self, now: float) -> float:
        """The lower, the better: ``(in_flight + 1) * cost``."""
        cost = self._faded(now)[0] if self.cost else 0.0
        return (self.in_flight + 1) * max(cost, MIN_COST)

    def forget(self) -> None:
        """Drop the latency seen so far (requests in flight still count)."""
        self.cost = 0.0

    def observe(self, seconds: float, now: float, *, failed: bool = False) -> None:
        """A call to this endpoint took ``seconds`` and ended at ``now``."""
        if failed and seconds < FAILURE_COST:
            seconds = FAILURE_COST
        cost, weight = self._faded(now)
        self.cost = seconds if seconds > cost else cost + seconds * (1.0 - weight)
        self.stamp = now

    def outlasted(self, seconds: float, now: float) -> None:
        """A call abandoned at ``now`` after ``seconds`` (a hedge won, or the caller gave
        up): it would have taken at least that long. A lower bound raises the cost when it
        is above it, and tells nothing otherwise."""
        cost, _ = self._faded(now)
        if seconds > cost:
            self.cost = seconds
            self.stamp = now


def eligible(
    tripped: Sequence[bool],
    unhealthy: Sequence[bool],
    scores: Sequence[float],
    max_ejected: float,
) -> list[int]:
    """The indices of the endpoints requests may go to now, in index order.

    ``tripped[i]``: endpoint ``i``'s breaker rejects calls; ``unhealthy[i]``: its health
    source says it is unhealthy; ``scores[i]``: its load score. Tripped endpoints are never
    eligible. Unhealthy ones are, the lowest scores first, as far as needed to keep at most
    ``floor(max_ejected * n)`` endpoints out, and at least one if ``max_ejected > 0`` (when
    the breakers alone keep more out, every untripped endpoint is eligible).
    """
    n = len(tripped)
    cap = math.floor(max_ejected * n + 1e-9)
    if max_ejected > 0 and cap < 1:
        cap = 1
    out = sum(tripped)
    sick = sorted(
        (i for i in range(n) if unhealthy[i] and not tripped[i]), key=lambda i: (scores[i], i)
    )
    back = len(sick) - max(0, cap - out)  # how many of the unhealthy ones are used anyway
    chosen = [i for i in range(n) if not tripped[i] and not unhealthy[i]]
    if back > 0:
        chosen += sick[:back]
        chosen.sort()
    return chosen


def pick(candidates: Sequence[int], scores: Sequence[float], rng: random.Random) -> int:
    """Power of two choices: of two distinct random candidates, the one with the lower score.

    ``candidates`` must not be empty; a tie goes to the first drawn.
    """
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    return b if scores[b] < scores[a] else a
