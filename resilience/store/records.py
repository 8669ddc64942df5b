"""What status tools read: the records a store returns (``PolicyStatus``, one per policy,
with a ``ReplicaReport`` per replica of a shared breaker).

Records are ``NamedTuple``s: immutable, built fast (a status of 10,000 names builds 20,000
of them), compared field by field. Build them with keywords.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from ..states import CircuitState

__all__ = [
    "HEALTH_PREFIX",
    "HEALTH_RESULT",
    "LATENCY_BUCKETS",
    "MAX_PUBLISHED",
    "REPORTING",
    "PolicyStatus",
    "ReplicaReport",
    "lease_kind",
    "published_health",
    "window_kind",
]

#: Upper edges (seconds) of the latency histogram breakers keep (the last bucket is open):
#: bucket ``i`` counts calls that took less than ``LATENCY_BUCKETS[i]`` and at least the edge
#: before it. Powers of two from 0.5 ms to 4 s.
LATENCY_BUCKETS: tuple[float, ...] = (*(0.0005 * 2**i for i in range(14)), float("inf"))

#: a replica heard from within this many seconds is reporting; one silent for longer has
#: exited, lost its store, or made no call since (a replica flushes only when it has news,
#: every ``sync_interval`` while it does): either way nothing it does shows in the figures
REPORTING = 5.0

#: the prefix of a fleet-wide health check's keys (its runner's lease, its published result):
#: status tools list such a lease as kind ``"health_check"``, not as a bulkhead
HEALTH_PREFIX = "health:"

#: the longest value a lease's holder may publish (``Store.publish``), in bytes: anything
#: longer found where one is published is garbage
MAX_PUBLISHED = 65_536


def lease_kind(name: str) -> str:
    """What a fleet-wide lease under ``name`` is for: a bulkhead, or a health check's runner."""
    return "health_check" if name.startswith(HEALTH_PREFIX) else "bulkhead"


#: where a fleet-wide health check's runner publishes each result (``Store.publish`` item)
HEALTH_RESULT = "result"


def published_health(raw: bytes | str) -> tuple[bool, str | None, int | None] | None:
    """``(healthy, error, seq)`` of a health check's published result (JSON: ``"ok"``,
    ``"error"`` when it failed, and ``"seq"``, which grows with each result its runner
    publishes), or ``None`` for anything a runner never writes."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        return None
    error, seq = data.get("error"), data.get("seq")
    return (
        data["ok"],
        error[:1000] if isinstance(error, str) else None,
        seq if type(seq) is int else None,
    )


#: the kinds whose two-figure window a store keeps under ``"<kind>:<name>"``
#: (``SharedCounts``): a throttle's requests and accepts, a hedge's calls and hedges
WINDOW_KINDS = ("throttle", "hedge")


def window_kind(key: str) -> tuple[str, str]:
    """``(kind, name)`` of the policy whose shared window is kept under ``key``; a key
    without a kind's prefix (written by an older version) is kind ``"window"``."""
    kind, colon, name = key.partition(":")
    return (kind, name) if colon and kind in WINDOW_KINDS else ("window", key)


class ReplicaReport(NamedTuple):
    """One replica's reports on a shared breaker: when it last flushed, and the outcomes it
    has flushed in all (since it started, or since it was silent for ten minutes)."""

    replica: str
    last_seen: float  #: seconds ago
    calls: int
    failures: int
    slow_calls: int
    rejected: int = 0  #: calls this replica's breaker refused (since it started)
    #: sampled call durations, counts per ``LATENCY_BUCKETS`` bucket (since it started)
    latency: tuple[int, ...] = ()


class PolicyStatus(NamedTuple):
    """A policy as its store sees it.

    ``kind`` is ``"circuit_breaker"``, ``"bulkhead"`` (fleet-wide leases),
    ``"health_check"`` (the lease of the replica running a fleet-wide health check:
    ``in_flight`` 1 while one does), ``"rate_limiter"`` (``backlog``), ``"retry_budget"``,
    ``"throttle"`` or ``"hedge"`` (a window shared through the store: ``window``); or
    ``"damaged"`` when what the store holds under that name does not parse (``damaged`` says
    why). Breaker fields are ``None`` / 0 for other kinds.
    """

    name: str
    kind: str
    state: CircuitState | None = None
    generation: int | None = None
    calls: int = 0
    failures: int = 0
    slow_calls: int = 0
    retry_after: float | None = None  #: seconds until an open breaker may probe
    probes: int = 0  #: half-open probe leases held
    in_flight: int | None = None  #: leases held (bulkhead)
    tokens: float | None = None  #: retry budget tokens
    replicas: tuple[ReplicaReport, ...] = ()
    local: bool = False  #: this replica's own view (its shared store could not be reached)
    #: an open breaker: the calls, failures and slow calls that opened it
    opened_by: tuple[int, int, int] | None = None
    #: why this entry could not be read (kind ``"damaged"``), else ``None``
    damaged: str | None = None
    #: breakers: calls refused, and sampled call durations per ``LATENCY_BUCKETS`` bucket,
    #: summed over the replicas (running totals: rates come from two readings)
    rejected: int = 0
    latency: tuple[int, ...] = ()
    limit: int | None = None  #: a fleet-wide bulkhead's limit, as last taken
    #: a fleet-wide bulkhead whose replicas adapt their own limits: their sum, as reported
    adaptive_limit: int | None = None
    #: a throttle's (requests, accepts) or a hedge's (calls, hedges) over its shared window,
    #: as the last replica to exchange counts left it
    window: tuple[int, int] | None = None
    #: a fleet-wide health check: its last published result (``None``: none yet, or gone
    #: with its time to live), and the error it failed with
    healthy: bool | None = None
    health_error: str | None = None
    #: the published result's sequence number (a new one for each result its runner
    #: publishes): a status tool that sees it change knows a result was published since
    health_seq: int | None = None
    #: a shared rate limiter: seconds until its bucket is full again (0: full), which is how
    #: far its arrival time runs ahead of now
    backlog: float | None = None

    def reporting(self, within: float = REPORTING) -> int:
        """How many of ``replicas`` were heard from in the last ``within`` seconds."""
        return sum(r.last_seen <= within for r in self.replicas)

    @property
    def failure_ratio(self) -> float:
        """Failures over calls in the window (0.0 when empty)."""
        return self.failures / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (state as its string value)."""
        data = self._asdict()
        data["state"] = None if self.state is None else self.state.value
        data["replicas"] = [replica._asdict() for replica in self.replicas]
        data["failure_ratio"] = self.failure_ratio
        data["opened_by"] = None if self.opened_by is None else list(self.opened_by)
        data["window"] = None if self.window is None else list(self.window)
        return data
