"""Sliding windows of call outcomes: pure arithmetic, no I/O, O(1) per outcome.

A window *spec* (``CountWindow``, ``TimeWindow``) is frozen configuration; ``spec.new()`` makes
the mutable counter a breaker feeds. Both counters keep running totals, so reading them is
free; the time window rolls its buckets lazily, when it is written or read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..checks import check_int, check_seconds

__all__ = ["MAX_COUNT_WINDOW", "CountWindow", "Counter", "TimeWindow", "WindowSpec"]

MAX_COUNT_WINDOW = 1_000_000
"""The largest ``CountWindow`` size: a counter keeps one byte per call of its window (1 MB per
breaker at this size, in each replica), and a shared breaker's window lives in Redis too."""


class Counter(Protocol):
    """Running totals over a window: ``calls``, ``failures`` and ``slow`` calls."""

    calls: int
    failures: int
    slow: int

    def add(self, failed: bool, slow: bool, now: float) -> None:
        """Record one outcome that happened at ``now``."""

    def roll(self, now: float) -> None:
        """Forget what has left the window by ``now`` (no-op for count windows)."""

    def reset(self) -> None:
        """Forget everything."""

    def renew(self, spec: Any) -> None:
        """Start anew, empty, as ``spec`` (a window of the same kind), in place."""


@dataclass(frozen=True, slots=True)
class CountWindow:
    """The last ``size`` calls (resilience4j's count-based sliding window).

    ``size`` is 1 to ``MAX_COUNT_WINDOW`` (one million) calls.
    """

    size: int = 100

    def __post_init__(self) -> None:
        check_int("CountWindow size", self.size)
        if self.size > MAX_COUNT_WINDOW:
            raise ValueError(
                f"CountWindow size must be <= {MAX_COUNT_WINDOW:,} (one byte per call is kept "
                f"in memory), got {self.size!r}; use a TimeWindow for larger volumes"
            )

    def new(self) -> CountCounter:
        """A fresh, empty counter for this window."""
        return CountCounter(self.size)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """The calls of the last ``seconds``, kept in ``buckets`` equal time slices.

    The window slides a bucket at a time, so it covers between ``seconds * (1 - 1/buckets)``
    and ``seconds`` of history.
    """

    seconds: float = 30.0
    buckets: int = 10

    def __post_init__(self) -> None:
        check_seconds("TimeWindow seconds", self.seconds)
        check_int("TimeWindow buckets", self.buckets)
        if not 1 <= self.buckets <= 3600:
            raise ValueError(f"TimeWindow buckets must be in 1..3600, got {self.buckets!r}")

    def new(self) -> TimeCounter:
        """A fresh, empty counter for this window."""
        return TimeCounter(self.seconds, self.buckets)


WindowSpec = CountWindow | TimeWindow


class CountCounter:
    """Ring buffer of the last ``size`` outcomes (bit 0: failed, bit 1: slow)."""

    __slots__ = ("_pos", "_ring", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._ring = bytearray(size)
        self._pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, failed: bool, slow: bool, now: float = 0.0) -> None:
        """Record one outcome, evicting the oldest once the window is full."""
        pos = self._pos
        ring = self._ring
        if self.calls == self.size:
            old = ring[pos]
            self.failures -= old & 1
            self.slow -= old >> 1
        else:
            self.calls += 1
        ring[pos] = failed | (slow << 1)
        self.failures += failed
        self.slow += slow
        pos += 1
        self._pos = 0 if pos == self.size else pos

    def roll(self, now: float) -> None:
        """Count windows do not age."""

    def reset(self) -> None:
        """Forget every outcome."""
        self._ring = bytearray(self.size)
        self._pos = self.calls = self.failures = self.slow = 0

    def renew(self, spec: CountWindow) -> None:
        """Start anew, empty, as ``spec`` (in place: whoever holds this counter sees it)."""
        self.size = spec.size
        self.reset()


class TimeCounter:
    """Per-bucket totals over the last ``seconds``; buckets are cleared lazily as time moves.

    A breaker adds one outcome at a time (``add``); a throttle or a hedge adds counts in a
    batch (``add_counts``), so a bucket may hold failures and no calls.
    """

    __slots__ = (
        "_b_calls",
        "_b_fail",
        "_b_slow",
        "_head",
        "_n",
        "_width",
        "calls",
        "failures",
        "slow",
    )

    def __init__(self, seconds: float, buckets: int) -> None:
        self._n = buckets
        self._width = seconds / buckets
        self._b_calls = [0] * buckets
        self._b_fail = [0] * buckets
        self._b_slow = [0] * buckets
        self._head = 0  # index (time // width) of the newest bucket
        self.calls = self.failures = self.slow = 0

    def roll(self, now: float) -> None:
        """Drop the buckets that have slid out of the window by ``now``."""
        epoch = int(now // self._width)
        head = self._head
        if epoch <= head:
            return
        self._head = epoch
        if not (self.calls or self.failures or self.slow):
            return
        n = self._n
        if epoch - head >= n:
            self.reset()
            self._head = epoch
            return
        bc, bf, bs = self._b_calls, self._b_fail, self._b_slow
        for e in range(head + 1, epoch + 1):
            i = e % n
            self.calls -= bc[i]
            self.failures -= bf[i]
            self.slow -= bs[i]
            bc[i] = bf[i] = bs[i] = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        """Record one outcome at ``now`` (an outcome older than the newest bucket joins it)."""
        if now // self._width > self._head:
            self.roll(now)
        i = self._head % self._n
        self._b_calls[i] += 1
        self.calls += 1
        if failed:
            self._b_fail[i] += 1
            self.failures += 1
        if slow:
            self._b_slow[i] += 1
            self.slow += 1

    def add_counts(self, now: float, calls: int, failures: int) -> None:
        """Add ``calls`` and ``failures`` at ``now`` in one step (counts of a throttle or a
        hedge: ``resilience.policies.throttle.SharedCounts``); a bucket may then hold
        failures and no calls."""
        if now // self._width > self._head:
            self.roll(now)
        i = self._head % self._n
        self._b_calls[i] += calls
        self._b_fail[i] += failures
        self.calls += calls
        self.failures += failures

    def renew(self, spec: TimeWindow) -> None:
        """Start anew, empty, as ``spec`` (in place: whoever holds this counter sees it)."""
        self._n = spec.buckets
        self._width = spec.seconds / spec.buckets
        self._head = 0
        self.reset()

    def reset(self) -> None:
        """Forget every outcome."""
        n = self._n
        self._b_calls = [0] * n
        self._b_fail = [0] * n
        self._b_slow = [0] * n
        self.calls = self.failures = self.slow = 0
