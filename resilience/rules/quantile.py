"""A latency quantile over a sliding sample: the delay a hedge learns. Pure, no clock."""

from __future__ import annotations

import math

from ..checks import check_int, check_seconds

__all__ = ["LearnedDelay"]


class LearnedDelay:
    """A hedge delay learned from latencies: their ``quantile`` over the last ``samples``.

    Until ``min_samples`` latencies have been observed, the delay is ``initial``. The quantile
    (nearest rank) is computed again once a twentieth of the samples kept are new, so an
    observation costs O(1) and a read O(1) most of the time. Memory: ``samples`` floats.
    ``Hedge(delay="p95")`` is ``Hedge(delay=LearnedDelay(0.95))``.
    """

    __slots__ = (
        "_count",
        "_fresh",
        "_pos",
        "_ring",
        "_value",
        "initial",
        "min_samples",
        "quantile",
        "samples",
    )

    def __init__(
        self,
        quantile: float = 0.95,
        *,
        samples: int = 1000,
        min_samples: int = 20,
        initial: float = 0.1,
    ) -> None:
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)):
            raise TypeError(f"quantile must be a number in (0, 1), got {quantile!r}")
        if not 0 < quantile < 1:  # also rejects NaN
            raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
        self.quantile = float(quantile)
        self.samples = check_int("samples", samples, minimum=10, maximum=1_000_000)
        self.min_samples = check_int("min_samples", min_samples, maximum=self.samples)
        self.initial = float(check_seconds("initial", initial, zero=True))
        self._ring: list[float] = []
        self._pos = 0
        self._count = 0  # observations since the quantile was last computed
        self._fresh = 0  # observations needed before it is computed again
        self._value: float = self.initial

    def __repr__(self) -> str:
        return f"LearnedDelay({self.quantile:g}, value={self.value:g})"

    def observe(self, seconds: float) -> None:
        """Add one latency (negative, NaN or infinite values are ignored)."""
        if not (0.0 <= seconds < math.inf):
            return
        ring = self._ring
        if len(ring) < self.samples:
            ring.append(seconds)
        else:
            ring[self._pos] = seconds
            self._pos = (self._pos + 1) % self.samples
        self._count += 1

    @property
    def value(self) -> float:
        """The delay now: the quantile of the latencies kept, or ``initial`` before enough."""
        if self._count and self._count >= self._fresh:
            n = len(self._ring)
            if n >= self.min_samples:
                ordered = sorted(self._ring)
                self._value = ordered[max(0, math.ceil(self.quantile * n) - 1)]
                self._count = 0
                self._fresh = max(1, n // 20)
        return self._value

    def reset(self) -> None:
        """Forget every latency (the delay is ``initial`` again)."""
        self._ring = []
        self._pos = self._count = self._fresh = 0
        self._value = self.initial
