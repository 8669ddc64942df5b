"""Reading ``status.lua`` replies (and a replica's own view) into ``PolicyStatus``.

Each name's entry is parsed on its own: one damaged entry is reported as damaged, and the
others are shown.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Any

from ..circuit_state import OPEN, BreakerCore
from .protocol import LATENCY_BUCKETS, PolicyStatus, ReplicaReport
from .redis_primitives import BY_VALUE, BadReply, number, real, text

__all__ = ["SUFFIXES", "local_status", "parse_entry"]

#: the keys ``status.lua`` reads for each name, in order
SUFFIXES = ("state", "win", "probes", "replicas", "leases", "gcra", "budget", "limit")


def local_status(core: BreakerCore, now: float) -> PolicyStatus:
    """A breaker as this replica sees it (Redis unreachable)."""
    m = core.metrics(now)
    return PolicyStatus(
        rejected=core.rejected,
        latency=tuple(core.latency),
        name=core.name,
        kind="circuit_breaker",
        state=m.state,
        generation=m.generation,
        calls=m.calls,
        failures=m.failures,
        slow_calls=m.slow_calls,
        retry_after=m.retry_after,
        local=True,
        opened_by=m.opened_by,
    )


def _opened(raw: Any) -> tuple[int, int, int] | None:
    parts = text(raw).split()
    if len(parts) != 3:
        return None
    calls, failures, slow = (number(p) for p in parts)
    return (calls, failures, slow) if calls else None


def _replicas(flat: Any, now: int) -> tuple[ReplicaReport, ...]:
    """``{id, "last seen ms calls failures slow seq", ...}`` (garbage raises ValueError)."""
    if not flat:
        return ()
    out = []
    for i in range(0, len(flat) - 1, 2):
        parts = flat[i + 1].split()
        if len(parts) < 4:
            continue
        at = float(parts[0])
        if not math.isfinite(at):
            raise ValueError(f"replica report {flat[i + 1]!r:.60}")
        out.append(
            ReplicaReport(
                replica=text(flat[i]),
                last_seen=max(0.0, (now - at) / 1000),
                calls=int(parts[1]),
                failures=int(parts[2]),
                slow_calls=int(parts[3]),
                rejected=int(parts[5]) if len(parts) > 5 else 0,
                latency=_histogram(parts[6]) if len(parts) > 6 else (),
            )
        )
    out.sort(key=attrgetter("replica"))
    return tuple(out)


def _histogram(raw: bytes | str) -> tuple[int, ...]:
    counts = tuple(int(n) for n in text(raw).split(",") if n)
    return counts if len(counts) == len(LATENCY_BUCKETS) else ()


def _summed(replicas: tuple[ReplicaReport, ...]) -> tuple[int, tuple[int, ...]]:
    """Refused calls and the latency histogram, over every replica."""
    histograms = [r.latency for r in replicas if r.latency]
    latency = tuple(map(sum, zip(*histograms, strict=True))) if histograms else ()
    return sum(r.rejected for r in replicas), latency


def _parse(name: str, now: int, entry: Any) -> list[PolicyStatus]:
    if not isinstance(entry, list) or len(entry) % 2:
        raise BadReply(f"unexpected status entry {entry!r:.100}")
    f = {
        k.decode() if type(k) is bytes else k: v
        for k, v in zip(entry[::2], entry[1::2], strict=True)
    }
    out: list[PolicyStatus] = []
    if number(f["breaker"]):
        state = BY_VALUE.get(text(f["state"]))
        if state is None:
            raise BadReply(f"unknown state {f['state']!r:.40}")
        open_until = number(f["open_until"])
        replicas = _replicas(f["replicas"], now)
        rejected, latency = _summed(replicas)
        out.append(
            PolicyStatus(
                name=name,
                kind="circuit_breaker",
                state=state,
                generation=number(f["gen"]),
                calls=number(f["calls"]),
                failures=number(f["failures"]),
                slow_calls=number(f["slow"]),
                retry_after=max(0.0, (open_until - now) / 1000) if state is OPEN else None,
                probes=number(f["probes"]),
                opened_by=_opened(f["opened_by"]) if state is OPEN else None,
                replicas=replicas,
                rejected=rejected,
                latency=latency,
            )
        )
    if number(f["leases"], -1) >= 0:
        limit = number(f["limit"]) if text(f.get("limit", "")) else None
        out.append(
            PolicyStatus(name=name, kind="bulkhead", in_flight=number(f["leases"]), limit=limit)
        )
    if text(f["gcra"]):
        real(f["gcra"], 0)
        out.append(PolicyStatus(name=name, kind="rate_limiter"))
    if text(f["budget"]):
        out.append(PolicyStatus(name=name, kind="retry_budget", tokens=real(f["budget"], 0)))
    return out


def parse_entry(name: str, server_now: Any, entry: Any) -> list[PolicyStatus]:
    """The policies under ``name`` (one per kind), or one entry marked damaged."""
    try:
        return _parse(name, number(server_now), entry)
    except (BadReply, KeyError, ValueError, TypeError) as exc:
        return [PolicyStatus(name=name, kind="damaged", damaged=str(exc) or type(exc).__name__)]
