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
from .redis_primitives import BY_VALUE, MAX_INT, BadReply, number, real, text

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


def _int(raw: str) -> int:
    """A count or a time in ms as the scripts write it (text, nan, 1e300: ValueError)."""
    n = int(raw)
    if not 0 <= n <= MAX_INT:
        raise ValueError(f"out of range: {raw!r:.40}")
    return n


def _opened(raw: str) -> tuple[int, int, int] | None:
    parts = raw.split(",")
    if len(parts) != 3:
        return None
    calls, failures, slow = map(_int, parts)
    return (calls, failures, slow) if calls else None


def _replicas(reports: list[str], now: int) -> tuple[ReplicaReport, ...]:
    """``<id>|<last seen ms> <calls> <failures> <slow> <seq> <refused> <histogram>``."""
    out = []
    for report in reports:
        rid, _, value = report.rpartition("|")
        parts = value.split()
        if len(parts) < 4:
            continue
        at = float(parts[0])
        if not math.isfinite(at):
            raise ValueError(f"replica report {report!r:.60}")
        out.append(
            ReplicaReport(
                replica=rid,
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


def _histogram(raw: str) -> tuple[int, ...]:
    counts = tuple(map(int, raw.split(","))) if raw else ()
    return counts if len(counts) == len(LATENCY_BUCKETS) else ()


def _summed(replicas: tuple[ReplicaReport, ...]) -> tuple[int, tuple[int, ...]]:
    """Refused calls and the latency histogram, over every replica."""
    if len(replicas) == 1:
        return replicas[0].rejected, replicas[0].latency
    histograms = [r.latency for r in replicas if r.latency]
    latency = tuple(map(sum, zip(*histograms, strict=True))) if histograms else ()
    return sum(r.rejected for r in replicas), latency


def _parse(name: str, now: int, entry: Any) -> list[PolicyStatus]:
    fields: dict[str, str] = {}
    reports: list[str] = []
    raw = text(entry)
    for item in raw.split("\t") if raw else ():
        key, sep, value = item.partition("=")
        if not sep:
            raise BadReply(f"unexpected status field {item!r:.60}")
        if key == "R":
            reports.append(value)
        else:
            fields[key] = value
    out: list[PolicyStatus] = []
    if fields.get("b") == "1":
        state = BY_VALUE.get(fields["s"])
        if state is None:
            raise BadReply(f"unknown state {fields['s']!r:.40}")
        open_until = _int(fields["u"])
        replicas = _replicas(reports, now)
        rejected, latency = _summed(replicas)
        out.append(
            PolicyStatus(
                name=name,
                kind="circuit_breaker",
                state=state,
                generation=_int(fields["g"]),
                calls=_int(fields["c"]),
                failures=_int(fields["f"]),
                slow_calls=_int(fields["l"]),
                retry_after=max(0.0, (open_until - now) / 1000) if state is OPEN else None,
                probes=_int(fields["p"]),
                opened_by=_opened(fields["o"]) if state is OPEN else None,
                replicas=replicas,
                rejected=rejected,
                latency=latency,
            )
        )
    if "n" in fields:
        limit = _int(fields["m"]) if "m" in fields else None
        out.append(
            PolicyStatus(name=name, kind="bulkhead", in_flight=_int(fields["n"]), limit=limit)
        )
    if "q" in fields:
        real(fields["q"], 0)
        out.append(PolicyStatus(name=name, kind="rate_limiter"))
    if "t" in fields:
        out.append(PolicyStatus(name=name, kind="retry_budget", tokens=real(fields["t"], 0)))
    return out


def parse_entry(name: str, server_now: Any, entry: Any) -> list[PolicyStatus]:
    """The policies under ``name`` (one per kind), or one entry marked damaged."""
    try:
        return _parse(name, number(server_now), entry)
    except (BadReply, KeyError, ValueError, TypeError) as exc:
        return [PolicyStatus(name=name, kind="damaged", damaged=str(exc) or type(exc).__name__)]
