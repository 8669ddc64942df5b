"""``CallCounts``: what this process's policies report of their calls, for the dashboard.

A store shared through Redis carries every replica's running totals of calls, failures and
slow calls; an in-process store keeps none (its breakers' hot path stays a few attribute
reads). Policies built with ``listeners=[dashboard.calls]`` report to this listener instead:
each call a breaker ends (``CallFinished``), and the rarer events of the policies around it
(a timeout that expired, a call a bulkhead or a rate limiter refused, a fallback served).
The dashboard turns these running totals, per name, into rates on the breaker's card of that
name (``HttpPolicy`` names every policy of an origin after it, as Hystrix groups a command's
figures), and on the bulkhead's and the rate limiter's cards. The dashboard drops the totals
of the names its store no longer lists (``forget``) at each snapshot: a name's memory lasts
as long as the store keeps it.
"""

from __future__ import annotations

from resilience import CallFinished, CallRejected, Event, FallbackUsed, TimedOut
from resilience.store.records import LATENCY_BUCKETS

__all__ = ["CallCounts"]

_BREAKER = "circuit_breaker"
_FAILED = frozenset({"failure", "timeout"})  # an exception, or no answer in time
#: the rare events counted per name, each as the figure it adds to
_RARE = {TimedOut: "timeouts", FallbackUsed: "fallbacks"}
#: calls refused by these kinds of policy are counted per name, each as the figure it adds to
_REFUSED = {"bulkhead": "bulkhead_rejected", "rate_limiter": "rate_limited"}


class _Totals:
    __slots__ = (
        "bulkhead_rejected",
        "calls",
        "failures",
        "fallbacks",
        "latency",
        "rate_limited",
        "timeouts",
    )

    def __init__(self) -> None:
        self.calls = self.failures = 0
        self.timeouts = self.bulkhead_rejected = self.fallbacks = self.rate_limited = 0
        self.latency = [0] * len(LATENCY_BUCKETS)


class CallCounts:
    """A listener keeping running totals per policy name: the calls breakers ended, those
    that failed (raised, or timed out) and their durations (counts per ``LATENCY_BUCKETS``
    bucket); timeouts that expired, calls bulkheads and rate limiters refused and fallbacks
    served.

    A call a breaker refused is not a call here (the breaker counts it itself) and a
    cancelled call counts as nothing. Of ``CallFinished`` it wants a breaker's only, so no
    other policy times its calls for it.
    """

    __slots__ = ("_totals",)

    def __init__(self) -> None:
        self._totals: dict[str, _Totals] = {}

    def wants(self, event: type[Event], kind: str, name: str) -> bool:
        """A breaker's ``CallFinished``, and the rare events counted."""
        return kind == _BREAKER if event is CallFinished else True

    def _of(self, name: str) -> _Totals:
        totals = self._totals.get(name)
        if totals is None:
            totals = self._totals[name] = _Totals()
        return totals

    def __call__(self, event: Event) -> None:
        """Count one event; ignore those not counted."""
        if isinstance(event, CallFinished):
            if event.policy != _BREAKER or event.outcome not in {"success", *_FAILED}:
                return  # refused, cancelled, or another policy's
            totals = self._of(event.name)
            totals.calls += 1
            totals.failures += event.outcome in _FAILED
            last = len(LATENCY_BUCKETS) - 1
            totals.latency[min(last, int(max(0.0, event.duration) * 2000).bit_length())] += 1
        elif isinstance(event, TimedOut | FallbackUsed | CallRejected):
            figure = _REFUSED.get(event.policy) if isinstance(event, CallRejected) else None
            figure = figure or _RARE.get(type(event))
            if figure is None:
                return  # a breaker's refusal: the breaker counts it itself
            totals = self._of(event.name)
            setattr(totals, figure, getattr(totals, figure) + 1)

    def totals(self, name: str) -> tuple[tuple[int, int], tuple[int, ...]] | None:
        """The calls breaker ``name`` ended, ``(calls, failures)`` (no slow calls: a call's
        report does not say its breaker's threshold), and their latency, since counting
        began; ``None`` when it reported none."""
        totals = self._totals.get(name)
        if totals is None or not totals.calls:
            return None
        return (totals.calls, totals.failures), tuple(totals.latency)

    def events(self, name: str) -> tuple[int, int, int] | None:
        """``(timeouts, bulkhead_rejected, fallbacks)`` reported under ``name`` since counting
        began; ``None`` when nothing was."""
        totals = self._totals.get(name)
        if totals is None:
            return None
        return totals.timeouts, totals.bulkhead_rejected, totals.fallbacks

    def forget(self, keep: set[str]) -> None:
        """Drop the totals of every name not in ``keep`` (the names a store lists now): names
        that come and go (a breaker per origin) hold no memory once the store forgot them."""
        if not keep.issuperset(self._totals):  # a new dict: a dict's table never shrinks
            self._totals = {name: t for name, t in self._totals.items() if name in keep}

    def refused(self, kind: str, name: str) -> int:
        """Calls the policies ``name`` of ``kind`` (``"bulkhead"``, ``"rate_limiter"``)
        refused since counting began, as reported here (0: none reported)."""
        totals = self._totals.get(name)
        figure = _REFUSED.get(kind)
        return 0 if totals is None or figure is None else int(getattr(totals, figure))
