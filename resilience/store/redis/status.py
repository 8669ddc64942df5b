"""The fleet's status: ``status.lua`` called for every name, its replies read into
``PolicyStatus`` records.

Names are read a chunk per script call (a Cluster: one name per call, on its own node), a
few calls in flight at once, each reply parsed as soon as it arrives, so Redis reads the
next chunks while this process parses the last. Each name's entry is parsed on its own: one
damaged entry is reported as damaged, and the others are shown.
"""

from __future__ import annotations

import asyncio
from operator import add, attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

from ...states import OPEN
from ..records import (
    HEALTH_RESULT,
    PolicyStatus,
    ReplicaReport,
    lease_kind,
    published_health,
    window_kind,
)
from .primitives import (
    BREAKER_SUFFIXES,
    BY_VALUE,
    MAX_INT,
    BadReply,
    escape,
    key,
    number,
    parse_histogram,
    real,
    text,
)

if TYPE_CHECKING:
    from .engine import SyncEngine

__all__ = ["CHUNK", "COLUMNS", "SUFFIXES", "parse_status", "read_status"]

#: the keys ``status.lua`` reads for each name, in order
SUFFIXES = (
    *BREAKER_SUFFIXES,
    *("leases", "gcra", "budget", "limit", "shares", "counts", f"cache:{HEALTH_RESULT}"),
)
#: the columns this module reads from a ``status.lua`` reply (named in its header)
COLUMNS = ("s", "g", "u", "c", "f", "l", "p", "o", "n", "m", "a", "q", "t", "w", "h")
CHUNK = 250  #: names per status script call (one Redis)
_WORKERS = 3  # status script calls in flight at once (one Redis)
_CLUSTER_WORKERS = 32  # ... on a Cluster (one name a call, spread over the nodes)
_PER_NAME = 0.00005  # seconds status() may take per name on top of the timeout


async def read_status(
    engine: SyncEngine, script: Any, names: list[str], others: set[str], *, cluster: bool
) -> list[PolicyStatus]:
    """Every name's entry, read with ``script`` (``status.lua``) through ``engine``. Only
    the ``others`` (registered as bulkheads, rate limiters or budgets) are looked up as
    such."""
    now = engine.now_arg()
    prefix = engine.prefix
    if cluster:
        chunks = [[n] for n in names]
    else:
        chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
    parsed: list[list[PolicyStatus]] = [[] for _ in chunks]
    todo = iter(range(len(chunks)))

    def call(chunk: list[str]) -> Any:
        if cluster:  # keys declared: the call goes to the name's node
            return script(keys=[key(prefix, chunk[0], s) for s in SUFFIXES], args=[now])
        marks = "".join("1" if n in others else "0" for n in chunk)
        return script(keys=[], args=[now, prefix, "\t".join(map(escape, chunk)), marks])

    async def worker() -> None:
        for index in todo:
            parsed[index] = parse_status(chunks[index], await call(chunks[index]))

    workers = min(len(chunks), _CLUSTER_WORKERS if cluster else _WORKERS)
    await engine.call(
        asyncio.gather(*(worker() for _ in range(workers))), extra=len(names) * _PER_NAME
    )
    return [status for chunk in parsed for status in chunk]


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


def _replica(report: str, now: int, histograms: dict[str, tuple[int, ...]]) -> ReplicaReport | None:
    """``<id>|<last seen ms> <calls> <failures> <slow> <seq> <refused> <histogram>`` (the
    last two absent in reports of older replicas; fewer fields: not a report).
    ``histograms``: the histograms parsed so far, by their text (most are alike)."""
    rid, _, value = report.rpartition("|")
    parts = value.split(" ")
    n = len(parts)
    if n < 4:
        return None
    at = int(parts[0])
    if not 0 <= at <= MAX_INT:
        raise ValueError(f"replica report {report!r:.60}")
    latency: tuple[int, ...] = ()
    if n > 6:
        raw = parts[6]
        latency = histograms.get(raw, _UNPARSED)
        if latency is _UNPARSED:
            latency = histograms[raw] = parse_histogram(raw)
    return ReplicaReport(
        rid,
        (now - at) / 1000 if now > at else 0.0,
        int(parts[1]),
        int(parts[2]),
        int(parts[3]),
        int(parts[5]) if n > 5 else 0,
        latency,
    )


_UNPARSED: tuple[int, ...] = (-1,)  # a histogram not parsed yet (no histogram reads so)
_BY_REPLICA = attrgetter("replica")


def _replicas(
    parts: list[str], start: int, now: int, histograms: dict[str, tuple[int, ...]]
) -> tuple[ReplicaReport, ...]:
    """The replicas' reports from ``parts[start:]``, sorted by replica id."""
    out = []
    for report in parts[start:]:
        one = _replica(report, now, histograms)
        if one is not None:
            out.append(one)
    if len(out) == 2:  # the usual case: two replicas, in order or not
        one, two = out
        return (one, two) if one.replica <= two.replica else (two, one)
    if len(out) > 2:
        out.sort(key=_BY_REPLICA)
    return tuple(out)


def _summed(replicas: tuple[ReplicaReport, ...]) -> tuple[int, tuple[int, ...]]:
    """Refused calls and the latency histogram, over every replica."""
    if len(replicas) == 1:
        return replicas[0].rejected, replicas[0].latency
    if len(replicas) == 2:  # the usual case of a breaker in use on two replicas
        a, b = replicas
        refused, one, two = a.rejected + b.rejected, a.latency, b.latency
        return refused, tuple(map(add, one, two)) if one and two else one or two
    histograms = [r.latency for r in replicas if r.latency]
    latency = tuple(map(sum, zip(*histograms, strict=True))) if histograms else ()
    return sum(r.rejected for r in replicas), latency


class Reply:
    """One ``status.lua`` reply: the server's time, where each column is, and the entries."""

    __slots__ = ("entries", "histograms", "now", "pick", "width")

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
        self.histograms: dict[str, tuple[int, ...]] = {}  # parsed, by their text

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
        (
            s,
            gen,
            until,
            calls,
            failures,
            slow,
            probes,
            opened,
            held,
            limit,
            own,
            tat,
            tokens,
            w,
            h,
        ) = self.pick(parts)
        now = self.now
        if s:
            state = BY_VALUE.get(s)
            if state is None:
                raise BadReply(f"unknown state {s!r:.40}")
            replicas = (
                _replicas(parts, self.width, now, self.histograms)
                if len(parts) > self.width
                else ()
            )
            rejected, latency = _summed(replicas) if replicas else (0, ())
            is_open = state is OPEN
            counts = (int(gen), int(calls), int(failures), int(slow), int(probes))
            if min(counts) < 0 or max(counts) > MAX_INT:
                raise ValueError(f"out of range: {counts}")
            generation, n_calls, n_failures, n_slow, n_probes = counts
            out.append(
                PolicyStatus(
                    name=name,
                    kind="circuit_breaker",
                    state=state,
                    generation=generation,
                    calls=n_calls,
                    failures=n_failures,
                    slow_calls=n_slow,
                    retry_after=max(0.0, (_int(until) - now) / 1000) if is_open else None,
                    probes=n_probes,
                    opened_by=_opened(opened) if is_open else None,
                    replicas=replicas,
                    rejected=rejected,
                    latency=latency,
                )
            )
        health = published_health(h) if h else None
        if held or health:
            healthy, error, seq = health or (None, None, None)
            out.append(
                PolicyStatus(
                    name=name,
                    kind=lease_kind(name),
                    in_flight=_int(held) if held else 0,
                    limit=_int(limit) if limit else None,
                    adaptive_limit=_int(own) if own else None,
                    healthy=healthy,
                    health_error=error,
                    health_seq=seq,
                )
            )
        if tat:
            backlog = max(0.0, (real(tat, 0) - now) / 1000)
            out.append(PolicyStatus(name=name, kind="rate_limiter", backlog=backlog))
        if tokens:
            out.append(PolicyStatus(name=name, kind="retry_budget", tokens=real(tokens, 0)))
        if w:
            kind, shown = window_kind(name)
            first, second = map(_int, w.split(","))
            out.append(PolicyStatus(name=shown, kind=kind, window=(first, second)))


def parse_status(names: list[str], reply: Any) -> list[PolicyStatus]:
    """Every policy under ``names`` from one ``status.lua`` reply (in the names' order); a
    reply that does not parse marks every name damaged."""
    try:
        read = Reply(reply)
    except (BadReply, ValueError, TypeError) as exc:
        return [PolicyStatus(name=n, kind="damaged", damaged=str(exc)) for n in names]
    return read.read(names)
