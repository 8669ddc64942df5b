"""The nemesis's checker: what the replicas reported, merged, against what the docs promise.

Pure functions over a ``History`` (no I/O, no event loop), so each rule is tested on made-up
histories in ``tests/test_nemesis.py``. Every time is ``time.monotonic()`` of one machine.
The rules, each as the docs state it:

* **Concurrency** (docs/bulkhead.md, "Shares"; docs/shared-state.md): the calls in flight
  fleet-wide on permits of the fleet's shares never exceed ``limit``; a call admitted while
  its replica could not use the store runs "under the local limit only", so each replica's
  own calls never exceed ``limit`` either, and the fleet may reach N x ``limit`` while its
  stores are down. A call counts as local when its store was degraded at any moment from
  its start to the handler, or when one of its own share calls failed (a loop too late to
  trust a time-out raises without degrading the store).
* **Rate** (docs/rate-limiter.md, "Fleet-wide" and "Tokens taken ahead"): the shared bucket
  is a GCRA on Redis's time, so the calls it admits at Redis times in ``[a, b]`` are at most
  ``rate * (b - a) + burst``; a token taken ahead is spent within ``ahead`` of the script
  that counted it; while its store is down a replica admits by its own bucket, at the full
  rate (at most ``rate * (b - a) + burst`` more per such replica). The checker knows each
  admission's script time only within ``[start - ahead, handler entry]`` (``[start - ahead,
  end]`` for one the bulkhead then refused) and counts, for a window, the admissions whose
  whole interval lies in it. Redis's clock is stepped by the nemesis, so ``b - a`` is the
  window's length plus the largest forward step of that clock inside it.
* **Latency** (docs/shared-state.md, "When Redis fails"): every Redis call is bounded by the
  store's ``timeout`` and no call waits on a reconnect. Through the middleware a request
  meets two policies (the rate limiter's batch, the bulkhead's share), each of which may
  wait on at most two store calls: the one under way when the request came, then one that
  counts it (docs/rate-limiter.md, docs/bulkhead.md), so the time it spends outside the app
  is at most ``4 * timeout``; one that starts while the store is degraded goes local at once
  and may only join a store call already in flight (``1 * timeout``). The breaker adds at
  most one store call (a probe lease) to the upstream's own time. Each bound is widened by
  ``SLACK`` and by the time the replica's event loop was measured late during the request.
  And once a store is degraded "policies go local at once instead of waiting for each
  primitive to time out": a request never starts a store call while its store is degraded.
* **Recovery** (docs/shared-state.md): a degraded store checks Redis with a backoff of at
  most 2 s, each check bounded by ``timeout``; ``RECOVERY_SLACK`` after that every store
  is healthy again.
* **Agreement** (docs/shared-state.md, "What is exact"): transitions reach every replica
  within milliseconds, and a calling replica learns the fleet's state within a
  ``sync_interval``; so once every store is back after a fault, and until the next fault,
  whatever a replica's breaker shows (state, generation), every other replica shows it too,
  or something newer, within ``AGREE_ROUNDS`` intervals (plus its loop's lateness).
* **No call raises** because of the store, and no replica dies.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .nemesis_replica import CALLED_DOWN, RATE_FAILED, SHARE_FAILED

__all__ = [
    "Fault",
    "History",
    "ReplicaLog",
    "Request",
    "Settings",
    "Verdict",
    "Violation",
    "check",
    "episodes",
]

SLACK = 0.05  # s: a request's own continuations wait their turn among the loop's callbacks
RECOVERY_SLACK = 0.25  # s: the round after the check, the loop's turns
AGREE_ROUNDS = 5  # sync intervals within which the breakers agree once every store is back
WINDOWS = (0.25, 1.0, 2.0, 5.0)  # s: window lengths the rate is checked over
WINDOW_STEP = 0.025  # s: window starts, this far apart
RATE_ADMITTED = frozenset({200, 500, 502, 503})  # passed the rate limiter (503: the bulkhead)
SHOWN = 10  # episodes listed per check


class Request(NamedTuple):
    """One request as a replica reported it (``tests/nemesis_replica.py``); -1: not reached."""

    t0: float
    h_in: float
    h_out: float
    t1: float
    status: int
    flags: int
    breaker: float
    store_calls: int = 0  # rate-limit and share calls it made itself
    in_store: float = 0.0  # ... and the seconds they took


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The fleet's configuration, as the checker needs it."""

    replicas: int
    limit: int
    rate: float
    burst: int
    ahead: float
    timeout: float
    sync_interval: float
    backoff_cap: float = 2.0


@dataclass
class ReplicaLog:
    """Everything one replica reported."""

    requests: list[Request] = field(default_factory=list)
    open: list[Request] = field(default_factory=list)  # never finished (t1 = -1)
    breaker: list[tuple[float, str, int]] = field(default_factory=list)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    lags: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    exit: str | None = None  # why it ended badly (None: it did not)

    def add(self, report: dict[str, Any]) -> None:
        """Merge one line of the replica's reports."""
        self.requests.extend(Request(*r) for r in report.get("q", ()))
        self.open.extend(Request(*r) for r in report.get("open", ()))
        self.breaker.extend((t, s, g) for t, s, g in report.get("b", ()))
        self.events.extend((t, k, d) for t, k, d in report.get("e", ()))
        self.lags.extend((t, late) for t, late in report.get("l", ()))
        self.errors.extend(report.get("x", ()))


@dataclass
class Fault:
    """One fault as it was made: ``start`` to ``end``; the replicas could work again from
    ``heal`` on (a Sentinel failover heals once the sentinels name the new primary)."""

    kind: str
    params: dict[str, float]
    start: float
    heal: float
    end: float
    note: str = ""


@dataclass
class History:
    """A whole run: the settings, the faults, Redis's clock offsets, and every replica's log."""

    settings: Settings
    seed: int
    started: float
    ended: float  # the load stopped
    faults: list[Fault] = field(default_factory=list)
    offsets: list[tuple[float, float]] = field(default_factory=list)  # (from, offset), sorted
    sick: list[tuple[float, bool]] = field(default_factory=list)
    replicas: list[ReplicaLog] = field(default_factory=list)
    replay: str = ""


@dataclass(frozen=True)
class Violation:
    """A broken promise: which check, when (from ``at`` to ``until``), what was seen."""

    check: str
    at: float
    what: str
    until: float | None = None


@dataclass
class Verdict:
    """The checks' result: violations (none: the run kept every promise) and figures."""

    history: History
    violations: list[Violation]
    stats: dict[str, Any]

    @property
    def ok(self) -> bool:
        """Whether every promise held."""
        return not self.violations

    def report(self) -> str:
        """The seed, how to replay, the faults made, the violations, the figures."""
        h = self.history
        rel = h.started
        lines = [
            f"nemesis: seed {h.seed}, {h.ended - h.started:.1f} s of load, "
            f"{h.settings.replicas} replicas; "
            + ("every promise held" if self.ok else f"{len(self.violations)} violations"),
            f"replay: {h.replay}",
            "faults (seconds from the start of the load):",
        ]
        for i, f in enumerate(h.faults):
            params = ", ".join(f"{k}={v:g}" for k, v in f.params.items())
            heal = f" healed {f.heal - rel:.2f}" if f.heal != f.end else ""
            note = f" ({f.note})" if f.note else ""
            lines.append(
                f"  #{i} {f.start - rel:8.2f}-{f.end - rel:.2f}{heal} {f.kind} {params}{note}"
            )
        by_check: dict[str, list[Violation]] = {}
        for v in self.violations:
            by_check.setdefault(v.check, []).append(v)
        for name, found in by_check.items():
            runs = episodes(found)
            lines.append(f"{name}: {len(found)} violations in {len(runs)} episodes:")
            for run in runs[:SHOWN]:
                first, last = run[0], run[-1]
                span = f"{first.at - rel:.3f}-{last.at - rel:.3f} s" if len(run) > 1 else ""
                lines.append(
                    f"  at {first.at - rel:.3f} s ({_near(h, first.at, first.until)}): "
                    f"{first.what}" + (f" [{len(run)} violations {span}]" if span else "")
                )
        lines.append("figures: " + ", ".join(f"{k} {v}" for k, v in self.stats.items()))
        return "\n".join(lines)


def episodes(found: Sequence[Violation], gap: float = 2.0) -> list[list[Violation]]:
    """Violations of one check, sorted, in runs whose members are less than ``gap`` apart."""
    runs: list[list[Violation]] = []
    for v in sorted(found, key=lambda v: v.at):
        if runs and v.at - runs[-1][-1].at < gap:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


def _near(h: History, at: float, until: float | None = None) -> str:
    """Which faults ``[at, until]`` overlaps, or which one it follows."""
    if until is not None:
        inside = [
            f"#{i} {f.kind}" for i, f in enumerate(h.faults) if f.start <= until and f.end >= at
        ]
        if inside:
            return "a window with " + ", ".join(inside)
    last = None
    for i, f in enumerate(h.faults):
        if f.start <= at:
            last = (i, f)
    if last is None:
        return "before any fault"
    i, f = last
    if at <= f.end:
        return f"during #{i} {f.kind}"
    return f"{at - f.end:.2f} s after #{i} {f.kind}"


# --- timelines -------------------------------------------------------------------------------
class Degraded:
    """A replica's degraded periods, from its store's events: ``[from, to)``, sorted."""

    def __init__(self, events: Iterable[tuple[float, str, str]]) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        since = None
        for t, kind, _ in sorted(events):
            if kind == "degraded" and since is None:
                since = t
            elif kind == "recovered" and since is not None:
                self.starts.append(since)
                self.ends.append(t)
                since = None
        if since is not None:
            self.starts.append(since)
            self.ends.append(math.inf)

    def overlaps(self, a: float, b: float) -> bool:
        """Whether the store was degraded at any moment of ``[a, b]``."""
        i = bisect.bisect_right(self.starts, b) - 1
        return i >= 0 and self.ends[i] >= a

    def at(self, t: float) -> bool:
        """Whether the store was degraded at ``t``."""
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and self.ends[i] > t


class Lateness:
    """How late a replica's event loop was: the total lateness its ticker saw in a span."""

    def __init__(self, lags: Iterable[tuple[float, float]], tick: float = 0.01) -> None:
        pairs = sorted(lags)
        self.times = [t for t, _ in pairs]
        self.sums = [0.0]
        for _, late in pairs:
            self.sums.append(self.sums[-1] + late)
        self.tick = tick

    def within(self, a: float, b: float) -> float:
        """Lateness reported by the ticks that ended in ``[a, b + tick]``."""
        i = bisect.bisect_left(self.times, a)
        j = bisect.bisect_right(self.times, b + self.tick)
        return self.sums[j] - self.sums[i]


def _span_end(h: History, r: Request) -> float:
    """When ``r`` left the middleware (a request that never did: when the load stopped)."""
    return r.t1 if r.t1 >= 0 else max(h.ended, r.t0)


# --- the checks ------------------------------------------------------------------------------
def check_errors(h: History) -> list[Violation]:
    """No request raised out of the middleware; no replica died."""
    found = []
    for i, log in enumerate(h.replicas):
        for r in log.requests:
            if r.status < 0:
                found.append(Violation("errors", r.t1, f"replica {i}: a request raised"))
        for text in log.errors[:SHOWN]:
            found.append(Violation("errors", h.ended, f"replica {i} raised {text}"))
        if log.exit is not None:
            found.append(Violation("errors", h.ended, f"replica {i}: {log.exit}"))
    return found


def check_concurrency(h: History) -> tuple[list[Violation], dict[str, Any]]:
    """At every moment: the fleet's calls on shared permits, and each replica's calls, are
    within ``limit`` (module docstring)."""
    limit = h.settings.limit
    moves: list[tuple[float, int, int, bool]] = []  # (time, +1/-1, replica, shared)
    for i, log in enumerate(h.replicas):
        degraded = Degraded(log.events)
        for r in [*log.requests, *log.open]:
            if r.h_in < 0:
                continue
            end = r.h_out if r.h_out >= 0 else max(h.ended, r.h_in)
            local = bool(r.flags & SHARE_FAILED) or degraded.overlaps(r.t0, r.h_in)
            moves.append((r.h_in, 1, i, not local))
            moves.append((end, -1, i, not local))
    moves.sort(key=lambda m: (m[0], m[1]))  # at one instant, calls end before others start
    found: list[Violation] = []
    per = [0] * len(h.replicas)
    shared_per = [0] * len(h.replicas)
    shared = total = top_shared = top_total = 0
    over_fleet = False
    over_replica = [False] * len(h.replicas)
    for t, delta, i, is_shared in moves:
        per[i] += delta
        total += delta
        if is_shared:
            shared += delta
            shared_per[i] += delta
        top_shared = max(top_shared, shared)
        top_total = max(top_total, total)
        if shared > limit and not over_fleet:
            who = ", ".join(f"{j}:{n}" for j, n in enumerate(shared_per) if n)
            found.append(
                Violation(
                    "concurrency",
                    t,
                    f"{shared} calls in flight fleet-wide on shared permits, limit {limit} "
                    f"(replica:calls {who}; {total} in flight in all)",
                )
            )
        over_fleet = shared > limit
        if per[i] > limit and not over_replica[i]:
            found.append(
                Violation(
                    "concurrency", t, f"replica {i} has {per[i]} calls in flight, limit {limit}"
                )
            )
        over_replica[i] = per[i] > limit
    return found, {"max in flight on shared permits": top_shared, "max in flight": top_total}


def _offset_rise(offsets: Sequence[tuple[float, float]], a: float, b: float) -> float:
    """The largest forward move of Redis's clock offset within ``[a, b]``: max of
    ``offset(y) - offset(x)`` over ``a <= x <= y <= b``."""
    if not offsets:
        return 0.0
    i = bisect.bisect_right(offsets, (a, math.inf)) - 1
    lowest = offsets[i][1] if i >= 0 else 0.0
    rise = 0.0
    for t, value in offsets[max(i + 1, 0) :]:
        if t > b:
            break
        rise = max(rise, value - lowest)
        lowest = min(lowest, value)
    return rise


#: faults after which Redis may have forgotten the fleet's bucket (docs/rate-limiter.md: it
#: restarts full, one more burst): a restart empty, a failover to a replica behind the primary
FORGETTING = ("restart", "failover", "failover-kill")


def check_rate(h: History) -> tuple[list[Violation], dict[str, Any]]:
    """Over windows of several lengths: the fleet's admissions within the bucket's bound,
    plus a local bucket's worth for each replica that admitted locally in the window, plus a
    burst for each time Redis forgot the bucket in it."""
    s = h.settings
    starts: list[float] = []
    ends: list[float] = []
    local_times: list[list[float]] = []
    for log in h.replicas:
        degraded = Degraded(log.events)
        mine = []
        for r in log.requests:
            if r.status not in RATE_ADMITTED:
                continue
            entered = r.h_in if r.h_in >= 0 else r.t1
            starts.append(r.t0 - s.ahead)
            ends.append(entered)
            if r.flags & RATE_FAILED or degraded.overlaps(r.t0, entered):
                mine.append(entered)
        local_times.append(sorted(mine))
    starts.sort()
    ends.sort()
    found: list[Violation] = []
    worst = 0.0
    for width in WINDOWS:
        a = h.started
        flagged_until = -math.inf
        while a + width <= h.ended:
            b = a + width
            # admissions whose whole interval lies in [a, b] (a lower bound: intervals that
            # span the whole window are not subtracted)
            count = bisect.bisect_right(ends, b) - bisect.bisect_left(starts, a)
            rise = _offset_rise(h.offsets, a, b)
            locals_ = sum(
                1
                for times in local_times
                if bisect.bisect_left(times, a) < bisect.bisect_right(times, b)
            )
            forgot = sum(1 for f in h.faults if f.kind in FORGETTING and a <= f.start <= b)
            bound = s.rate * (width + rise) + s.burst * (1 + forgot)
            bound += locals_ * (s.rate * width + s.burst)
            worst = max(worst, count / bound)
            if count > bound and a > flagged_until:
                found.append(
                    Violation(
                        "rate",
                        a,
                        f"{count} admitted in {width:g} s, bound {bound:.0f} (rate {s.rate:g} x "
                        f"({width:g} + clock step {rise:g}) + burst {s.burst} x (1 + {forgot} "
                        f"times Redis forgot the bucket), + {locals_} replicas admitting "
                        "locally)",
                        until=b,
                    )
                )
                flagged_until = b  # one report per excursion
            a += WINDOW_STEP
    return found, {"highest admitted / bound": round(worst, 3), "admitted": len(starts)}


def check_latency(h: History) -> tuple[list[Violation], dict[str, Any]]:
    """No request waits on the store past its bound (module docstring)."""
    timeout = h.settings.timeout
    found: list[Violation] = []
    worst = 0.0
    for i, log in enumerate(h.replicas):
        degraded = Degraded(log.events)
        late = Lateness(log.lags)
        for r in [*log.requests, *log.open]:
            end = _span_end(h, r)
            in_app = r.h_out - r.h_in if r.h_in >= 0 and r.h_out >= 0 else 0.0
            overhead = end - r.t0 - in_app
            calls = 1 if degraded.at(r.t0) else 4  # two policies, two store calls each
            bound = calls * timeout + SLACK + late.within(r.t0, end)
            worst = max(worst, overhead)
            if overhead > bound:
                state = "degraded" if calls == 1 else "healthy"
                ended = "" if r.t1 >= 0 else ", and never finished"
                found.append(
                    Violation(
                        "latency",
                        r.t0,
                        f"replica {i}: a request spent {overhead:.3f} s in the middleware "
                        f"(bound {bound:.3f} s: {calls} x timeout {timeout:g}, its store "
                        f"{state} when it started; it made {r.store_calls} store calls itself, "
                        f"{r.in_store:.3f} s){ended}",
                    )
                )
            if r.flags & CALLED_DOWN:
                found.append(
                    Violation(
                        "latency",
                        r.t0,
                        f"replica {i}: a request started a store call while its store was "
                        f"degraded (it spent {overhead:.3f} s in the middleware)",
                    )
                )
            if r.h_in >= 0 and r.h_out >= 0:
                b_bound = timeout + SLACK + late.within(r.h_in, r.h_out)
                if r.breaker > b_bound:
                    found.append(
                        Violation(
                            "latency",
                            r.h_in,
                            f"replica {i}: the breaker added {r.breaker:.3f} s to a call "
                            f"(bound {b_bound:.3f} s: one probe within timeout {timeout:g})",
                        )
                    )
    return found, {"slowest time outside the app (s)": round(worst, 3)}


class BreakerView:
    """A replica's breaker (state, generation) over time, from its samples."""

    def __init__(self, samples: Iterable[tuple[float, str, int]]) -> None:
        ordered = sorted(samples)
        self.times = [t for t, _, _ in ordered]
        self.views = [(state, gen) for _, state, gen in ordered]

    def at(self, t: float) -> tuple[str, int] | None:
        """The last (state, generation) reported at or before ``t``."""
        i = bisect.bisect_right(self.times, t) - 1
        return None if i < 0 else self.views[i]

    def between(self, a: float, b: float) -> list[float]:
        """The times of the samples in ``(a, b]``."""
        return self.times[bisect.bisect_right(self.times, a) : bisect.bisect_right(self.times, b)]


def _all_back(degraded: Sequence[Degraded], since: float) -> float:
    """The first moment at or after ``since`` at which no store is degraded."""
    moments = [since, *sorted(e for d in degraded for e in d.ends if e > since)]
    for t in moments:
        if not any(d.at(t) for d in degraded):
            return t
    return math.inf


def _caught_up(mine: BreakerView, theirs: BreakerView, a: float, b: float) -> float | None:
    """How long after ``a`` ``theirs`` first showed a view at least as new as ``mine`` did
    at that moment (a later generation, or the same state at any: a replica that decided
    alone reports a generation above the fleet's until the fleet's next transition, as
    docs/shared-state.md says); ``None`` if not by ``b``."""
    for t in [a, *sorted({*mine.between(a, b), *theirs.between(a, b)})]:
        ours, other = mine.at(t), theirs.at(t)
        if ours is None or (other is not None and (other[1] > ours[1] or other[0] == ours[0])):
            return t - a
    return None


def check_recovery(h: History) -> tuple[list[Violation], dict[str, Any]]:
    """After each fault: every store back within the backoff; then the breakers agree."""
    s = h.settings
    found: list[Violation] = []
    degraded = [Degraded(log.events) for log in h.replicas]
    late = [Lateness(log.lags) for log in h.replicas]
    breakers = [BreakerView(log.breaker) for log in h.replicas]
    recovered = checked = 0
    slowest = 0.0
    for n, fault in enumerate(h.faults):
        after = h.faults[n + 1].start if n + 1 < len(h.faults) else h.ended
        deadline = fault.heal + s.backoff_cap + s.timeout + RECOVERY_SLACK
        laggard = max(lt.within(fault.heal, deadline) for lt in late)
        deadline += laggard
        at = min(deadline, after)
        still = [i for i, d in enumerate(degraded) if d.at(at)]
        if not still or deadline <= after:  # conclusive
            recovered += 1
        if deadline <= after:
            for i in still:
                found.append(
                    Violation(
                        "recovery",
                        deadline,
                        f"replica {i}: its store is still degraded "
                        f"{deadline - fault.heal:.2f} s after #{n} {fault.kind} healed",
                    )
                )
        back = _all_back(degraded, fault.heal)
        if back >= after:
            continue
        for i, j in itertools.permutations(range(len(breakers)), 2):
            mine, theirs = breakers[i], breakers[j]
            for t in [back, *mine.between(back, after)]:
                window = AGREE_ROUNDS * s.sync_interval
                window += max(lt.within(t, t + window) for lt in late)
                if t + window > after or any(d.overlaps(t, t + window) for d in degraded):
                    continue  # a store went down, or the next fault came: nothing to conclude
                checked += 1
                took = _caught_up(mine, theirs, t, t + window)
                if took is None:
                    found.append(
                        Violation(
                            "agreement",
                            t,
                            f"replica {j} did not catch up within {window:.2f} s with replica "
                            f"{i}'s breaker {mine.at(t)}: it showed {theirs.at(t + window)} "
                            f"(#{n} {fault.kind} was over, every store back)",
                        )
                    )
                else:
                    slowest = max(slowest, took)
    return found, {
        "recoveries checked": recovered,
        "breaker views checked": checked,
        "slowest catching up (s)": round(slowest, 3),
    }


def check(h: History) -> Verdict:
    """Every check over ``h``."""
    violations = check_errors(h)
    stats: dict[str, Any] = {
        "requests": sum(len(log.requests) for log in h.replicas),
        "faults": len(h.faults),
    }
    for run in (check_concurrency, check_rate, check_latency, check_recovery):
        found, figures = run(h)
        violations.extend(found)
        stats.update(figures)
    periods = sum(len(Degraded(log.events).starts) for log in h.replicas)
    stats["degraded periods"] = periods
    stats["data resets"] = sum(k == "reset" for log in h.replicas for _, k, _ in log.events)
    statuses: dict[int, int] = {}
    for log in h.replicas:
        for r in log.requests:
            statuses[r.status] = statuses.get(r.status, 0) + 1
    stats["statuses"] = dict(sorted(statuses.items()))
    violations.sort(key=lambda v: (v.check, v.at))
    return Verdict(h, violations, stats)
