"""Reading ``status.lua`` replies (and a replica's own view) into ``PolicyStatus``.

Each name's entry is parsed on its own: one damaged entry is reported as damaged, and the
others are shown.
"""

from __future__ import annotations

from operator import attrgetter, itemgetter
from typing import Any

from ...rules.breaker import BreakerCore
from ...states import OPEN
from ..records import PolicyStatus, ReplicaReport, lease_kind
from .primitives import BY_VALUE, MAX_INT, BadReply, number, parse_histogram, real, text

__all__ = ["COLUMNS", "SUFFIXES", "local_status", "parse_status"]

#: the keys ``status.lua`` reads for each name, in order
SUFFIXES = (
    "state",
    "win",
    "probes",
    "replicas",
    "leases",
    "gcra",
    "budget",
    "limit",
    "shares",
)
#: the columns this module reads from a ``status.lua`` reply (named in its header)
COLUMNS = ("s", "g", "u", "c", "f", "l", "p", "o", "n", "m", "a", "q", "t")


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


def _replica(report: str, now: int) -> ReplicaReport | None:
    """``<id>|<last seen ms> <calls> <failures> <slow> <seq> <refused> <histogram>`` (the
    last two absent in reports of older replicas; fewer fields: not a report)."""
    rid, _, value = report.rpartition("|")
    parts = value.split(" ")
    if len(parts) < 4:
        return None
    at = int(parts[0])
    if not 0 <= at <= MAX_INT:
        raise ValueError(f"replica report {report!r:.60}")
    return ReplicaReport(
        replica=rid,
        last_seen=max(0.0, (now - at) / 1000),
        calls=int(parts[1]),
        failures=int(parts[2]),
        slow_calls=int(parts[3]),
        rejected=int(parts[5]) if len(parts) > 5 else 0,
        latency=parse_histogram(parts[6]) if len(parts) > 6 else (),
    )


def _replicas(parts: list[str], start: int, now: int) -> tuple[ReplicaReport, ...]:
    """The replicas' reports from ``parts[start:]``, sorted by replica id."""
    if len(parts) == start + 1:  # the usual case
        one = _replica(parts[start], now)
        return () if one is None else (one,)
    reports = (_replica(report, now) for report in parts[start:])
    out = [r for r in reports if r is not None]
    out.sort(key=attrgetter("replica"))
    return tuple(out)


def _summed(replicas: tuple[ReplicaReport, ...]) -> tuple[int, tuple[int, ...]]:
    """Refused calls and the latency histogram, over every replica."""
    if len(replicas) == 1:
        return replicas[0].rejected, replicas[0].latency
    histograms = [r.latency for r in replicas if r.latency]
    latency = tuple(map(sum, zip(*histograms, strict=True))) if histograms else ()
    return sum(r.rejected for r in replicas), latency


class Reply:
    """One ``status.lua`` reply: the server's time, where each column is, and the entries."""

    __slots__ = ("entries", "now", "pick", "width")

    def __init__(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            raise BadReply(f"unexpected status reply {reply!r:.80}")
        self.now = number(reply[0])
        header = text(reply[1]).split("\t")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise BadReply(f"status reply without the columns {missing}")
        self.width = len(header)
        self.pick = itemgetter(*(header.index(c) for c in COLUMNS))
        self.entries: list[Any] = reply[2:]

    def read(self, names: list[str]) -> list[PolicyStatus]:
        """The policies under each name (one per kind), in the names' order; a name whose
        entry does not parse (or is missing) is one entry marked damaged."""
        out: list[PolicyStatus] = []
        entries = self.entries
        for i, name in enumerate(names):
            size = len(out)
            try:
                self._parse(name, entries[i] if i < len(entries) else None, out)
            except (BadReply, KeyError, ValueError, TypeError) as exc:
                del out[size:]
                reason = str(exc) or type(exc).__name__
                out.append(PolicyStatus(name=name, kind="damaged", damaged=reason))
        return out

    def _parse(self, name: str, entry: Any, out: list[PolicyStatus]) -> None:
        if entry is None:
            raise BadReply("no entry for this name")
        parts = text(entry).split("\t")
        if len(parts) < self.width:
            raise BadReply(f"a status entry of {len(parts)} columns, not {self.width}")
        s, gen, until, calls, failures, slow, probes, opened, held, limit, own, tat, tokens = (
            self.pick(parts)
        )
        now = self.now
        if s:
            state = BY_VALUE.get(s)
            if state is None:
                raise BadReply(f"unknown state {s!r:.40}")
            replicas = _replicas(parts, self.width, now) if len(parts) > self.width else ()
            rejected, latency = _summed(replicas) if replicas else (0, ())
            is_open = state is OPEN
            counts = (int(gen), int(calls), int(failures), int(slow), int(probes))
            if min(counts) < 0 or max(counts) > MAX_INT:
                raise ValueError(f"out of range: {counts}")
            out.append(
                PolicyStatus(
                    name=name,
                    kind="circuit_breaker",
                    state=state,
                    generation=counts[0],
                    calls=counts[1],
                    failures=counts[2],
                    slow_calls=counts[3],
                    retry_after=max(0.0, (_int(until) - now) / 1000) if is_open else None,
                    probes=counts[4],
                    opened_by=_opened(opened) if is_open else None,
                    replicas=replicas,
                    rejected=rejected,
                    latency=latency,
                )
            )
        if held:
            out.append(
                PolicyStatus(
                    name=name,
                    kind=lease_kind(name),
                    in_flight=_int(held),
                    limit=_int(limit) if limit else None,
                    adaptive_limit=_int(own) if own else None,
                )
            )
        if tat:
            real(tat, 0)
            out.append(PolicyStatus(name=name, kind="rate_limiter"))
        if tokens:
            out.append(PolicyStatus(name=name, kind="retry_budget", tokens=real(tokens, 0)))


def parse_status(names: list[str], reply: Any) -> list[PolicyStatus]:
    """Every policy under ``names`` from one ``status.lua`` reply (in the names' order); a
    reply that does not parse marks every name damaged."""
    try:
        read = Reply(reply)
    except (BadReply, ValueError, TypeError) as exc:
        return [PolicyStatus(name=n, kind="damaged", damaged=str(exc)) for n in names]
    return read.read(names)
