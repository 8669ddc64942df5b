"""The figures a dashboard computes from two successive status snapshots: rates from the
running totals each policy carries (or ``CallCounts`` reports) and latency percentiles from
the sampled histograms in between."""

from __future__ import annotations

import math
from typing import Any

from resilience import PolicyStatus
from resilience.store.records import LATENCY_BUCKETS

from ..calls import CallCounts

__all__ = ["Intervals", "percentiles"]


#: the percentiles shown, each with its rank in thousandths
_PERCENTILES = (("p50", 500), ("p90", 900), ("p99", 990), ("p99.5", 995))


def _growth(before: tuple[int, ...], now: tuple[int, ...]) -> tuple[int, ...]:
    """How much the running totals ``now`` grew since ``before``.

    Totals that went down were reset (a replica dropped an idle breaker and made it again, or
    was silent long enough for the store to drop its report): they count from zero, so the
    growth is ``now`` itself, never negative.
    """
    if len(before) != len(now):
        return now
    if any(b > a for a, b in zip(now, before, strict=True)):
        return now
    return tuple(a - b for a, b in zip(now, before, strict=True))


def percentiles(counts: list[int]) -> dict[str, Any]:
    """p50, p90, p99 and p99.5 of a latency histogram (counts per ``LATENCY_BUCKETS``
    bucket), each as its bucket's ``[lower, upper]`` edges in seconds (``upper`` ``None`` for
    the open last bucket), and the mean as estimated from the buckets (each sample at its
    bucket's middle; at the lower edge in the open one); ``None`` without samples."""
    samples = sum(counts)
    edges = [(LATENCY_BUCKETS[i - 1] if i else 0.0, LATENCY_BUCKETS[i]) for i in range(len(counts))]
    out: dict[str, Any] = {"samples": samples}
    for name, permille in _PERCENTILES:
        out[name] = None
        rank = max(1, -(-samples * permille // 1000))  # the rank-th smallest sample, 1-based
        seen = 0
        for (lower, upper), count in zip(edges, counts, strict=True):
            seen += count
            if samples and seen >= rank:
                out[name] = [lower, None if math.isinf(upper) else upper]
                break
    middles = (lower if math.isinf(upper) else (lower + upper) / 2 for lower, upper in edges)
    total = sum(count * middle for count, middle in zip(counts, middles, strict=True))
    out["mean"] = round(total / samples, 6) if samples else None
    return out


#: One source's running totals: (calls, failures, slow calls), (calls, failures) when slow
#: calls are not counted, or None when nothing keeps a total of calls; then (refused calls,)
#: or, where its policies report to ``CallCounts``, (refused calls, timeouts, calls
#: bulkheads refused, fallbacks served); then the latency histogram.
_Totals = tuple[tuple[int, ...] | None, tuple[int, ...], tuple[int, ...]]
#: (rates, percentiles) of one breaker's last interval
_Figures = tuple[dict[str, Any] | None, dict[str, Any] | None]


def _totals(policy: PolicyStatus, calls: CallCounts) -> dict[str, _Totals]:
    """A breaker's running totals per source: each replica's report, or else the policy's own
    (an in-process store counts refusals and latency, but keeps no running total of calls:
    those its breaker reported to ``calls``, if any, with their latency, every call timed)."""
    if policy.replicas:
        return {
            r.replica: ((r.calls, r.failures, r.slow_calls), (r.rejected,), r.latency)
            for r in policy.replicas
        }
    reported, events = calls.totals(policy.name), calls.events(policy.name)
    refused = (policy.rejected,) if events is None else (policy.rejected, *events)
    if reported is None:
        return {"": (None, refused, policy.latency)}
    return {"": (reported[0], refused, reported[1])}


class Intervals:
    """What each breaker did between two successive snapshots: calls, failures, slow calls
    and refused calls per second, and the latency percentiles of the calls sampled.

    Stores report running totals (``ReplicaReport``, or the policy's own without replicas):
    each figure is their growth between two snapshots at least ``min_gap`` seconds apart,
    per source, summed. A total that went down is a reset: it counts from zero, never as a
    negative rate. A replica first seen adds its calls (the store counts them from its first
    flush), not its refusals and latency (its breaker's totals, maybe older than the
    interval). A breaker switching between its replica's local view and the fleet's starts
    over (no figures for that interval).
    """

    def __init__(self, min_gap: float, calls: CallCounts) -> None:
        self.min_gap = min_gap
        self.calls = calls
        self._last: dict[tuple[str, str], tuple[float, bool, dict[str, _Totals]]] = {}
        self._figures: dict[tuple[str, str], _Figures] = {}

    def update(self, policy: PolicyStatus, now: float) -> _Figures:
        """``(rates, percentiles)`` for ``policy``; both ``None`` before a second snapshot."""
        key = (policy.kind, policy.name)
        totals = _totals(policy, self.calls)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.min_gap:
            return self._figures.get(key, (None, None))
        self._last[key] = (now, policy.local, totals)
        if last is None or last[1] != policy.local:
            figures: _Figures = (None, None)
        else:
            figures = self._compare(last[2], totals, now - last[0])
        self._figures[key] = figures
        return figures

    @staticmethod
    def _compare(
        before: dict[str, _Totals], after: dict[str, _Totals], gap: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        outcomes: list[int] | None = None
        slow_counted = True
        rejected = 0
        others: tuple[int, ...] | None = None  # timeouts, bulkhead refusals, fallbacks
        latency = [0] * len(LATENCY_BUCKETS)
        for source, (calls, refused, histogram) in after.items():
            old = before.get(source)
            if calls is not None:
                # a report new since the last snapshot counts its calls from the first flush
                grown = calls if old is None or old[0] is None else _growth(old[0], calls)
                slow_counted = slow_counted and len(grown) == 3
                grown = (*grown, 0)[:3]
                outcomes = [a + b for a, b in zip(outcomes or [0, 0, 0], grown, strict=True)]
            if old is None:
                # ... but its refusals and latency since its breaker was made, maybe long
                # before: they are the base the next interval grows from
                continue
            grown = _growth(old[1], refused)
            rejected += grown[0]
            others = grown[1:] if len(grown) == 4 else others
            if len(histogram) == len(latency):
                latency = [a + b for a, b in zip(latency, _growth(old[2], histogram), strict=True)]
        calls_rate, failures_rate, slow_rate = (
            (None, None, None) if outcomes is None else (round(n / gap, 2) for n in outcomes)
        )
        rates = {
            "calls": calls_rate,
            "failures": failures_rate,
            "slow_calls": slow_rate if slow_counted else None,
            "rejected": round(rejected / gap, 2),
        }
        for figure, i in (("timeouts", 0), ("bulkhead_rejected", 1), ("fallbacks", 2)):
            rates[figure] = None if others is None else round(others[i] / gap, 2)
        return rates, percentiles(latency)

    def forget(self, keep: set[tuple[str, str]]) -> None:
        for key in set(self._last) - keep:
            del self._last[key]
            self._figures.pop(key, None)
