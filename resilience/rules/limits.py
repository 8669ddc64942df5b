"""Adaptive concurrency limits: a bulkhead whose size follows the latency it measures.

``AdaptiveLimit`` is plain, frozen data: the options of one algorithm. Each bulkhead built
with it gets a limiter of its own (``AdaptiveLimit.limiter()``), a small object that is fed
one sample per finished call and answers the current limit. Limiters are pure: they do no
I/O, read no clock (the caller passes ``now``) and are tested without an event loop.

Two algorithms, after Netflix's concurrency-limits:

* ``"gradient2"`` (the default) compares the latency of the last window of calls with a
  long-term average. While they agree the limit grows by a small queue allowance; when the
  recent latency exceeds ``tolerance`` times the long-term one, the limit shrinks in
  proportion (at most by half per window), smoothed. No latency target to configure.
* ``"aimd"``: additive increase, multiplicative decrease against a fixed
  ``latency_target``. Every call under the target adds ``1 / limit`` (one slot per round
  of calls); a call over the target, a timeout or a rejection from downstream multiplies
  the limit by ``backoff``, at most once per round (calls admitted before the last cut do
  not cut again).

Both stay within ``[min_limit, max_limit]`` and do not grow while the caller uses less than
half of the limit (an idle service proves nothing about its capacity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

from ..checks import check_int, check_positive, check_ratio, check_seconds

__all__ = ["AdaptiveLimit", "Limiter"]

Algorithm = Literal["gradient2", "aimd"]

_GRADIENT2_ONLY = ("window", "min_samples", "smoothing", "tolerance", "long_window", "queue_size")
_AIMD_ONLY = ("latency_target", "backoff")
#: the largest limit (and window count, sample count, queue) an option may name: far beyond
#: any real concurrency, and exact as a float (the limiters compute in floats)
MAX_COUNT = 1_000_000_000
_DEFAULTS: dict[str, float | int] = {
    "window": 1.0,
    "min_samples": 10,
    "smoothing": 0.2,
    "tolerance": 1.2,
    "long_window": 600,
    "queue_size": 2,
    "backoff": 0.9,
}


class Limiter(Protocol):
    """The state of one adaptive limit: fed samples, it answers the current limit."""

    @property
    def limit(self) -> int:
        """Calls allowed in flight now (an int within ``[min_limit, max_limit]``)."""

    def sample(self, now: float, rtt: float, in_flight: int, dropped: bool = False) -> int:
        """Record one finished call and return the (possibly new) limit.

        ``now``: the time it finished; ``rtt``: how long it took (seconds, same clock);
        ``in_flight``: calls holding a slot when it finished, itself included; ``dropped``:
        it timed out or was refused downstream (a sign of overload, whatever its latency).
        """


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveLimit:
    """How a bulkhead's limit adapts: ``Bulkhead(limit=AdaptiveLimit(...))``.

    Common options: ``algorithm`` (``"gradient2"`` or ``"aimd"``), ``initial`` (the limit
    before any sample), ``min_limit`` and ``max_limit`` (the bounds it never leaves).

    Gradient2 options: ``window`` (seconds of calls per update, at least ``min_samples``
    calls), ``smoothing`` (weight of a new estimate, in (0, 1]), ``tolerance`` (how much
    slower than the long-term latency the last window may be before the limit shrinks,
    >= 1), ``long_window`` (windows averaged into the long-term latency), ``queue_size``
    (slots added per window while latency holds: the growth rate, and the queue the limit
    allows above the measured capacity). Overloaded, the limit settles near
    ``tolerance * capacity + queue_size`` calls, at a latency near
    ``tolerance + queue_size / capacity`` times the unloaded one: the defaults (1.2 and 2,
    tighter than Netflix's 1.5 and 4) keep it under 2x from 4 concurrent calls of capacity.

    AIMD options: ``latency_target`` (seconds; required), ``backoff`` (the factor applied on
    overload, in (0, 1)).

    Options of the other algorithm are refused (``ValueError``), not ignored.
    """

    algorithm: Algorithm = "gradient2"
    initial: int = 20
    min_limit: int = 1
    max_limit: int = 1000
    window: float | None = None
    min_samples: int | None = None
    smoothing: float | None = None
    tolerance: float | None = None
    long_window: int | None = None
    queue_size: int | None = None
    latency_target: float | None = None
    backoff: float | None = None

    def __post_init__(self) -> None:
        algorithm = self.algorithm
        if algorithm not in ("gradient2", "aimd"):
            raise ValueError(f"algorithm must be 'gradient2' or 'aimd', got {algorithm!r}")
        check_int("min_limit", self.min_limit, maximum=MAX_COUNT)
        check_int("max_limit", self.max_limit, minimum=self.min_limit, maximum=MAX_COUNT)
        check_int("initial", self.initial, minimum=self.min_limit, maximum=self.max_limit)
        own, other = (
            (_GRADIENT2_ONLY, _AIMD_ONLY)
            if algorithm == "gradient2"
            else (_AIMD_ONLY, _GRADIENT2_ONLY)
        )
        for name in other:
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is an option of the other algorithm, not {algorithm!r}")
        for name in own:  # unset options take their documented defaults
            if getattr(self, name) is None and name in _DEFAULTS:
                object.__setattr__(self, name, _DEFAULTS[name])
        if algorithm == "gradient2":
            check_seconds("window", self.window, zero=True)
            check_int("min_samples", self.min_samples, maximum=MAX_COUNT)
            check_ratio("smoothing", self.smoothing)
            if check_positive("tolerance", self.tolerance) < 1:
                raise ValueError(f"tolerance must be >= 1, got {self.tolerance!r}")
            check_int("long_window", self.long_window, maximum=MAX_COUNT)
            check_int("queue_size", self.queue_size, minimum=0, maximum=MAX_COUNT)
        else:
            if self.latency_target is None:
                raise ValueError("algorithm='aimd' needs a latency_target (seconds)")
            check_seconds("latency_target", self.latency_target)
            if check_ratio("backoff", self.backoff) == 1:
                raise ValueError("backoff must be in (0, 1), got 1")

    def limiter(self) -> Limiter:
        """A new limiter in its initial state (one per bulkhead; limiters are not shared)."""
        if self.algorithm == "aimd":
            return AIMDLimiter(self)
        return Gradient2Limiter(self)


def _usable(rtt: float) -> bool:
    """A latency worth learning from: finite and not negative (a clock that jumped is not)."""
    return rtt >= 0 and math.isfinite(rtt)


class Gradient2Limiter:
    """Gradient2: the limit follows the ratio of long-term to recent latency.

    Per window (``window`` seconds and ``min_samples`` calls): the window's mean latency is
    the short-term RTT; the long-term RTT is its exponential average over ``long_window``
    windows, seeded with the fastest call of the first window (a new limiter starts before
    any queue of its own has formed). ``gradient = tolerance * long / short``, kept in
    [0.5, 1]; the new estimate is ``limit * gradient + queue_size``, smoothed into the old one.

    Unlike Netflix's Gradient2, the long-term RTT is not a plain average: it falls at once to
    a faster window (the load has gone, or the service got faster), follows a slower window
    within ``tolerance`` at the average's pace, and follows a window beyond ``tolerance``
    (mostly queueing that the limit itself allowed) ten times slower. A plain average
    drifts up under sustained overload, and the limit and the latency it allows with it.
    Queueing of our own is checked, not assumed: once the calls in flight have been cut by a
    quarter (or the limit is as low as cuts take it) while the latency stayed where it stood
    (less than 10 % lower, 25 % higher), the excess is not a queue the limit allowed, and
    the baseline takes the window's latency at once: the first window's fastest call was a
    lucky one (with variable service times it is far below the mean), or the service got
    slower.
    A dropped call counts as at least twice the tolerated latency, however fast the
    refusal came; before the first baseline it is not counted at all (the first window's
    fastest call seeds the baseline, and a refusal is no call).
    """

    __slots__ = (
        "_alpha",
        "_anchor",
        "_count",
        "_estimate",
        "_floor",
        "_long",
        "_low",
        "_max",
        "_min",
        "_min_samples",
        "_peak",
        "_queue",
        "_smoothing",
        "_started",
        "_tolerance",
        "_total",
        "_window",
    )

    def __init__(self, options: AdaptiveLimit) -> None:
        assert options.window is not None
        assert options.min_samples is not None
        assert options.smoothing is not None
        assert options.tolerance is not None
        assert options.long_window is not None
        assert options.queue_size is not None
        self._min = float(options.min_limit)
        self._max = float(options.max_limit)
        self._window = options.window
        self._min_samples = options.min_samples
        self._smoothing = options.smoothing
        self._tolerance = options.tolerance
        self._queue = float(options.queue_size)
        self._alpha = 2.0 / (options.long_window + 1)
        # as low as cuts take the limit: the gradient is at least 0.5, so limit >= 2 * queue
        self._floor = 1.1 * max(self._min, 2 * self._queue)
        self._estimate = float(options.initial)
        self._long: float | None = None
        self._anchor: tuple[float, float, int] | None = None
        self._started: float | None = None
        self._count = 0
        self._total = 0.0
        self._low = math.inf
        self._peak = 0

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._estimate)

    @property
    def long_rtt(self) -> float | None:
        """The long-term latency the recent one is compared with (``None`` before a window)."""
        return self._long

    def sample(self, now: float, rtt: float, in_flight: int, dropped: bool = False) -> int:
        """Add one call to the current window; update the limit when the window is full."""
        if not _usable(rtt):
            return int(self._estimate)
        if dropped:
            if self._long is None:  # no baseline yet to judge it by: a refusal's latency
                return int(self._estimate)  # would seed the baseline (far too low)
            rtt = max(rtt, 2 * self._tolerance * self._long)
        if self._started is None:
            self._started = now
        self._count += 1
        self._total += rtt
        if rtt < self._low:
            self._low = rtt
        if in_flight > self._peak:
            self._peak = in_flight
        if self._count < self._min_samples or now - self._started < self._window:
            return int(self._estimate)
        short = self._total / self._count
        low, peak = self._low, self._peak
        self._started = None
        self._count = 0
        self._total = 0.0
        self._low = math.inf
        self._peak = 0
        return self._update(short, low, peak)

    def _update(self, short: float, low: float, peak: int) -> int:
        long = self._long
        if long is None:  # the first calls found no queue of ours yet: the fastest is the norm
            long = low
        elif short <= long:  # at once: the load has gone, or it got faster
            long = short
            self._anchor = None
        elif short <= self._tolerance * long:  # within tolerance: the baseline follows
            long += (short - long) * self._alpha
            self._anchor = None
        elif (anchor := self._anchor) is not None and (
            (peak <= anchor[2] * 3 / 4 or self._estimate <= self._floor)
            and 0.9 * anchor[1] <= short <= 1.25 * anchor[1]
        ):
            # the calls in flight cut by a quarter (or the limit as low as it goes) and the
            # latency did not follow: no queue of ours, the baseline was too low (a lucky
            # first window, or the service got slower). In flight, not the limit: the limit
            # can come to rest just short of a quarter below, and the calls in flight are
            # what a queue would follow
            long = short
            self._anchor = None
        else:  # beyond it, mostly queueing of our own: that must not become the norm
            long += (short - long) * self._alpha / 10
            if (
                anchor is None
                or self._estimate >= anchor[0]  # not cut since
                or short < 0.9 * anchor[1]  # the latency followed the cuts
                or short > 1.25 * anchor[1]  # or got worse: start over from here
            ):
                self._anchor = (self._estimate, short, peak)
        self._long = long
        # a zero latency (a fake clock, a cached answer) says nothing bad: with both at zero
        # the gradient is 1, not 0
        short, long = max(short, 1e-9), max(long, 1e-9)
        estimate = self._estimate
        if peak < estimate / 2:  # not limited by us: the window proves nothing
            return int(estimate)
        gradient = max(0.5, min(1.0, self._tolerance * long / short))
        target = estimate * gradient + self._queue
        estimate += (target - estimate) * self._smoothing
        self._estimate = min(self._max, max(self._min, estimate))
        return int(self._estimate)


class AIMDLimiter:
    """AIMD: ``+1/limit`` per call under ``latency_target``, ``* backoff`` on overload.

    A cut happens at most once per round: a call admitted before the last cut reports the
    overload the cut already answered, so it does not cut again (as TCP halves its window
    once per round trip, not once per lost packet).
    """

    __slots__ = ("_backoff", "_cut_at", "_estimate", "_max", "_min", "_target")

    def __init__(self, options: AdaptiveLimit) -> None:
        assert options.latency_target is not None
        assert options.backoff is not None
        self._min = float(options.min_limit)
        self._max = float(options.max_limit)
        self._target = options.latency_target
        self._backoff = options.backoff
        self._estimate = float(options.initial)
        self._cut_at = -math.inf

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._estimate)

    def sample(self, now: float, rtt: float, in_flight: int, dropped: bool = False) -> int:
        """Grow a little on a fast call, cut on a slow or dropped one."""
        if not _usable(rtt):
            return int(self._estimate)
        estimate = self._estimate
        if dropped or rtt > self._target:
            if now - rtt >= self._cut_at:  # admitted after the last cut: news
                self._cut_at = now
                estimate = max(self._min, estimate * self._backoff)
        elif in_flight * 2 >= estimate:  # else not limited by us: nothing learned
            estimate = min(self._max, estimate + 1.0 / estimate)
        self._estimate = estimate
        return int(estimate)
