"""Failure detectors: how suspicious the silence since the dependency last answered is.

Pure, no I/O: every method takes ``now`` from the caller's clock. A heartbeat says "the
dependency answered"; ``phi`` says how suspicious the silence since the last heartbeat is.
``PhiAccrualDetector`` learns the intervals between heartbeats (Hayashibara et al.);
``TimeoutDetector`` suspects after a fixed silence. ``HealthCheck`` feeds them.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from ..checks import check_int, check_positive, check_seconds

__all__ = ["MAX_DETECTOR_WINDOW", "Detector", "PhiAccrualDetector", "TimeoutDetector", "phi"]

_LN10 = math.log(10.0)
MAX_DETECTOR_WINDOW = 100_000  #: the largest number of intervals a detector remembers


def phi(elapsed: float, mean: float, std: float) -> float:
    """The suspicion level after ``elapsed`` seconds of silence, for heartbeat intervals
    distributed normally with ``mean`` and ``std`` (``std > 0``).

    ``phi = -log10(P)``, where ``P`` is the probability that a heartbeat comes even later than
    ``elapsed``: phi 1 means a 10 % chance that the dependency is merely late, phi 8 a chance
    of one in 10**8. ``P`` uses the logistic approximation of the normal distribution's tail,
    ``1 / (1 + exp(y * (1.5976 + 0.070566 * y**2)))`` with ``y = (elapsed - mean) / std``
    (Bowling et al. 2009; the approximation Akka's detector uses), computed so that no
    intermediate overflows: phi grows without bound, monotonically, as the silence lasts.
    """
    y = (elapsed - mean) / std
    z = y * (1.5976 + 0.070566 * y * y)
    # log10(1 + e**z), written so that e**z is only ever taken of a number <= 0
    if z > 0:
        return (z + math.log1p(math.exp(-z))) / _LN10
    return math.log1p(math.exp(z)) / _LN10


class Detector(Protocol):
    """What ``HealthCheck`` needs of a failure detector; times come from the caller's clock."""

    @property
    def threshold(self) -> float:
        """The phi at and above which the dependency is suspected."""

    def watch(self, now: float) -> None:
        """Start (or restart) watching at ``now``, as if a heartbeat had just arrived."""

    def heartbeat(self, now: float) -> None:
        """The dependency answered at ``now``."""

    def phi(self, now: float) -> float:
        """The suspicion level at ``now`` (0.0 before ``watch`` or a first heartbeat)."""

    def suspect(self, now: float) -> bool:
        """Whether ``phi(now)`` has reached the threshold."""


class PhiAccrualDetector:
    """The phi-accrual failure detector (Hayashibara et al. 2004), as Akka and Cassandra use it.

    It learns the intervals between heartbeats (the last ``window`` of them) and turns the
    silence since the last heartbeat into ``phi``: how unlikely it is that a heartbeat is
    merely late (see ``phi()``). The dependency is suspected once phi reaches ``threshold``
    (8.0: a one in 10**8 chance of a false suspicion, for normally distributed intervals).

    ``min_std`` keeps a very regular history from making any delay look fatal;
    ``acceptable_pause`` is added to the learned mean (a pause that should never raise
    suspicion, say one or two missed heartbeats); ``first_interval`` is the mean assumed until
    a first interval is learned (with a standard deviation of a quarter of it), and the window
    starts with two intervals of ``first_interval`` minus and plus that quarter, which the
    learned intervals push out (as Akka bootstraps its history). Intervals longer
    than ``max_interval`` are not learned: a gap is an outage, not jitter, and learning it
    would make the detector slow to suspect the next one.
    """

    __slots__ = (
        "_acceptable_pause",
        "_first_interval",
        "_intervals",
        "_last",
        "_learn_next",
        "_learn_prior",
        "_max_interval",
        "_min_std",
        "_squares",
        "_sum",
        "_threshold",
        "_until_exact",
    )

    def __init__(
        self,
        *,
        threshold: float = 8.0,
        window: int = 100,
        min_std: float = 0.1,
        acceptable_pause: float = 0.0,
        first_interval: float = 1.0,
        max_interval: float | None = None,
    ) -> None:
        self._threshold = check_positive("threshold", threshold)
        check_int("window", window, maximum=MAX_DETECTOR_WINDOW)
        self._min_std: float = check_seconds("min_std", min_std)
        pause: float = check_seconds("acceptable_pause", acceptable_pause, zero=True)
        self._acceptable_pause = pause
        self._first_interval: float = check_seconds("first_interval", first_interval)
        self._max_interval: float | None = check_seconds("max_interval", max_interval, none=True)
        self._intervals: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._squares = 0.0
        self._until_exact = window  # intervals learned before the sums are recomputed
        self._last: float | None = None
        self._learn_next = False
        self._learn_prior = True

    def __repr__(self) -> str:
        return (
            f"PhiAccrualDetector(threshold={self._threshold:g}, "
            f"window={self._intervals.maxlen}, min_std={self._min_std:g}, "
            f"acceptable_pause={self._acceptable_pause:g}, "
            f"first_interval={self._first_interval:g}, max_interval={self._max_interval!r})"
        )

    @property
    def threshold(self) -> float:
        """The phi at and above which the dependency is suspected."""
        return self._threshold

    @property
    def acceptable_pause(self) -> float:
        """Seconds added to the learned mean before phi is computed."""
        return self._acceptable_pause

    @property
    def samples(self) -> int:
        """How many intervals the window holds now (at most ``window``; the two bootstrap
        intervals included until they are pushed out)."""
        return len(self._intervals)

    @property
    def mean(self) -> float:
        """The learned mean interval (``first_interval`` until one is learned)."""
        n = len(self._intervals)
        return self._sum / n if n else self._first_interval

    @property
    def std(self) -> float:
        """The learned standard deviation of the intervals, at least ``min_std``."""
        n = len(self._intervals)
        if not n:
            return max(self._first_interval / 4, self._min_std)
        mean = self._sum / n
        variance = max(0.0, self._squares / n - mean * mean)
        return max(math.sqrt(variance), self._min_std)

    def watch(self, now: float) -> None:
        """Start watching at ``now``: phi grows from here as if a heartbeat had just arrived,
        but the time until the next heartbeat is not learned as an interval."""
        self._last = now
        self._learn_next = False

    def heartbeat(self, now: float) -> None:
        """A heartbeat at ``now``: its interval since the previous one is learned."""
        last = self._last
        if last is not None and now < last:
            return  # from before the last one: nothing to learn, nothing to reset
        if last is not None and self._learn_next:
            interval = now - last
            if self._max_interval is None or interval <= self._max_interval:
                self._learn(interval)
        self._last = now
        self._learn_next = True

    def _learn(self, interval: float) -> None:
        intervals = self._intervals
        if not intervals and self._learn_prior:
            # as Akka bootstraps: two intervals of first_interval -+ a quarter of it, which the
            # learned ones push out, keep the first few samples from looking exact
            self._learn_prior = False
            spread = self._first_interval / 4
            for prior in (self._first_interval - spread, self._first_interval + spread):
                self._add(prior)
        self._add(interval)

    def _add(self, interval: float) -> None:
        intervals = self._intervals
        if len(intervals) == intervals.maxlen:
            oldest = intervals[0]
            self._sum -= oldest
            self._squares -= oldest * oldest
        intervals.append(interval)
        self._sum += interval
        self._squares += interval * interval
        self._until_exact -= 1
        if not self._until_exact:  # running sums drift: recomputed once per window
            self._until_exact = len(intervals)
            self._sum = math.fsum(intervals)
            self._squares = math.fsum(x * x for x in intervals)

    def phi(self, now: float) -> float:
        """The suspicion level at ``now``: 0.0 before ``watch`` or a first heartbeat."""
        last = self._last
        if last is None:
            return 0.0
        return phi(max(0.0, now - last), self.mean + self._acceptable_pause, self.std)

    def suspect(self, now: float) -> bool:
        """Whether ``phi(now)`` has reached the threshold."""
        return self.phi(now) >= self._threshold

    def reset(self) -> None:
        """Forget every heartbeat and interval."""
        self._intervals.clear()
        self._sum = self._squares = 0.0
        self._until_exact = self._intervals.maxlen or 1
        self._last = None
        self._learn_next = False
        self._learn_prior = True


class TimeoutDetector:
    """The simple detector: suspect the dependency after ``timeout`` seconds without a
    heartbeat. Its ``phi`` is the silence in units of ``timeout``, so its threshold is 1.0."""

    __slots__ = ("_last", "_timeout")

    threshold = 1.0  #: phi reaches 1.0 after ``timeout`` seconds of silence

    def __init__(self, timeout: float) -> None:
        self._timeout: float = check_seconds("timeout", timeout)
        self._last: float | None = None

    def __repr__(self) -> str:
        return f"TimeoutDetector({self._timeout:g})"

    @property
    def timeout(self) -> float:
        """Seconds of silence after which the dependency is suspected."""
        return self._timeout

    def watch(self, now: float) -> None:
        """Start watching at ``now``, as if a heartbeat had just arrived."""
        self._last = now

    def heartbeat(self, now: float) -> None:
        """A heartbeat at ``now``."""
        if self._last is None or now > self._last:
            self._last = now

    def phi(self, now: float) -> float:
        """Seconds since the last heartbeat, divided by ``timeout`` (0.0 before any)."""
        if self._last is None:
            return 0.0
        return max(0.0, now - self._last) / self._timeout

    def suspect(self, now: float) -> bool:
        """Whether ``timeout`` seconds have passed without a heartbeat."""
        return self._last is not None and now - self._last >= self._timeout


# --- the health check -------------------------------------------------------------------------
