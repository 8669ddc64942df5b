"""``CallCounts``: what this process's breakers report of their calls, for the dashboard.

A store shared through Redis carries every replica's running totals of calls, failures and
slow calls; an in-process store keeps none (its breakers' hot path stays a few attribute
reads). A breaker built with ``listeners=[dashboard.calls]`` reports each call it ends
(``CallFinished``) to this listener instead, which keeps the running totals the dashboard
turns into calls/s, failed/s and latency percentiles: every call timed, not one in 8.
"""

from __future__ import annotations

from resilience import CallFinished, Event
from resilience.store.records import LATENCY_BUCKETS

__all__ = ["CallCounts"]

_KIND = "circuit_breaker"
_FAILED = frozenset({"failure", "timeout"})  # an exception, or no answer in time


class _Totals:
    __slots__ = ("calls", "failures", "latency")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.latency = [0] * len(LATENCY_BUCKETS)


class CallCounts:
    """A listener keeping each breaker's running totals of calls ended, calls that failed
    (raised, or timed out) and their durations (counts per ``LATENCY_BUCKETS`` bucket).

    Refused calls are not calls here (the breaker counts them itself) and a cancelled call
    counts as nothing. It wants ``CallFinished`` from circuit breakers only, so no other
    policy times its calls for it.
    """

    __slots__ = ("_totals",)

    def __init__(self) -> None:
        self._totals: dict[str, _Totals] = {}

    def wants(self, event: type[Event], kind: str, name: str) -> bool:
        """Only the calls circuit breakers end."""
        return event is CallFinished and kind == _KIND

    def __call__(self, event: Event) -> None:
        """Count one ``CallFinished`` of a breaker; ignore everything else."""
        if not isinstance(event, CallFinished) or event.policy != _KIND:
            return
        if event.outcome not in _FAILED and event.outcome != "success":
            return  # refused or cancelled
        totals = self._totals.get(event.name)
        if totals is None:
            totals = self._totals[event.name] = _Totals()
        totals.calls += 1
        totals.failures += event.outcome in _FAILED
        last = len(LATENCY_BUCKETS) - 1
        totals.latency[min(last, int(max(0.0, event.duration) * 2000).bit_length())] += 1

    def totals(self, name: str) -> tuple[tuple[int, int], tuple[int, ...]] | None:
        """Breaker ``name``'s ``((calls, failures), latency)`` since counting began (no slow
        calls: a call's report does not say its breaker's threshold), or ``None`` when it
        reported nothing."""
        totals = self._totals.get(name)
        if totals is None:
            return None
        return (totals.calls, totals.failures), tuple(totals.latency)
