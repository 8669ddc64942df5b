"""The nemesis (``tests/nemesis.py``): a fleet of replicas under load while Redis is paused,
restarted empty, cut, slowed, failed over and has its clock stepped, checked against the
docs' promises; and the checker's rules, each on made-up histories.

The soak runs short here (a fixed seed, a few seconds); ``--full`` runs it for 300 s, and
``RESILIENCE_NEMESIS_SEED`` / ``RESILIENCE_NEMESIS_SECONDS`` choose the seed and the length.
Longer runs and their findings: docs/reliability.md, "Nemesis".
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from .nemesis import KINDS, Options, check_run, schedule
from .nemesis_check import (
    Fault,
    History,
    ReplicaLog,
    Request,
    Settings,
    check,
    check_concurrency,
    check_errors,
    check_latency,
    check_rate,
    check_recovery,
)
from .nemesis_replica import CALLED_DOWN, SHARE_FAILED

SEED = 88  # the in-suite run's first faults: clock, blackhole, slow, restart, pause, cut, refuse
SECONDS = 7.0
PACE = 0.5  # shorter gaps and faults: more of them in a short run

SETTINGS = Settings(
    replicas=2, limit=2, rate=10.0, burst=2, ahead=0.0, timeout=0.25, sync_interval=0.05
)


def call(t0: float, length: float = 0.01, *, flags: int = 0, status: int = 200) -> Request:
    """A request handled from ``t0`` for ``length`` seconds, 1 ms after it arrived."""
    return Request(t0, t0 + 0.001, t0 + 0.001 + length, t0 + 0.002 + length, status, flags, 0.0)


def history(*logs: ReplicaLog, faults: tuple[Fault, ...] = (), ended: float = 10.0) -> History:
    """A made-up run of ``ended`` seconds."""
    return History(
        settings=SETTINGS,
        seed=0,
        started=0.0,
        ended=ended,
        faults=list(faults),
        offsets=[(0.0, 0.0)],
        replicas=list(logs),
    )


def degraded(start: float, end: float) -> list[tuple[float, str, str]]:
    """A store's events: degraded from ``start`` to ``end``."""
    return [(start, "degraded", "TimeoutError"), (end, "recovered", "")]


# --- the run's schedule ------------------------------------------------------------------------
def test_a_seed_gives_one_schedule() -> None:
    """The same seed gives the same faults, with the same parameters; another seed others."""
    assert schedule(5, 60) == schedule(5, 60)
    assert schedule(5, 60) != schedule(6, 60)


def test_every_kind_comes_in_each_round_of_the_schedule() -> None:
    """The first round of faults is every kind once; so is the second."""
    faults = schedule(9, 120)
    assert sorted(f.kind for f in faults[: len(KINDS)]) == sorted(KINDS)
    assert sorted(f.kind for f in faults[len(KINDS) : 2 * len(KINDS)]) == sorted(KINDS)


def test_redis_clock_stays_within_its_bound() -> None:
    """Clock steps never take Redis's clock further than MAX_OFFSET from the machine's."""
    offset = 0.0
    for fault in schedule(13, 3000, kinds=("clock",)):
        offset += fault.params["step"]
        assert abs(offset) <= 5.0


def test_unknown_kinds_are_refused() -> None:
    """A kind the nemesis cannot make is a ValueError naming the known ones."""
    with pytest.raises(ValueError, match="kinds must be some of"):
        schedule(1, 10, kinds=("flood",))


# --- the checker's rules -----------------------------------------------------------------------
def test_the_fleet_above_its_limit_on_shared_permits_is_a_violation() -> None:
    """Three calls at once on two healthy replicas, limit 2: the fleet is over its limit."""
    a = ReplicaLog(requests=[call(1.0, 1.0), call(1.1, 1.0)])
    b = ReplicaLog(requests=[call(1.5, 0.1)])
    found, figures = check_concurrency(history(a, b))
    assert [v.check for v in found] == ["concurrency"]
    assert "3 calls in flight fleet-wide" in found[0].what
    assert figures["max in flight on shared permits"] == 3


def test_calls_admitted_while_the_store_was_down_count_against_the_local_limit() -> None:
    """A call that began while its store was degraded runs under the local limit only (the
    fleet may reach N x limit); a replica above its own limit is still a violation."""
    a = ReplicaLog(requests=[call(1.0, 1.0), call(1.1, 1.0)])
    b = ReplicaLog(requests=[call(1.5, 0.1), call(1.52, 0.1)], events=degraded(1.4, 1.7))
    assert check_concurrency(history(a, b))[0] == []
    b.requests.append(call(1.55, 0.1))
    found, _ = check_concurrency(history(a, b))
    assert ["replica 1 has 3 calls" in v.what for v in found] == [True]


def test_a_call_whose_share_call_failed_is_local() -> None:
    """A share call that failed without degrading the store (a late loop) admits locally."""
    a = ReplicaLog(requests=[call(1.0, 1.0), call(1.1, 1.0)])
    b = ReplicaLog(requests=[call(1.5, 0.1, flags=SHARE_FAILED)])
    assert check_concurrency(history(a, b))[0] == []


def evenly(count: int, start: float = 2.0, seconds: float = 1.0) -> list[Request]:
    """``count`` admitted requests spread evenly over ``seconds`` from ``start``."""
    return [call(start + i * seconds / count, 0.001) for i in range(count)]


def test_more_admissions_than_the_bucket_allows_is_a_violation() -> None:
    """Rate 10/s, burst 2: 12 admissions within a second are allowed, 14 are not."""
    assert check_rate(history(ReplicaLog(requests=evenly(12, seconds=0.99))))[0] == []
    found, _ = check_rate(history(ReplicaLog(requests=evenly(14, seconds=0.99))))
    assert found
    assert found[0].check == "rate"


def test_a_forward_step_of_redis_clock_widens_the_bound_by_its_length() -> None:
    """The bucket runs on Redis's clock: a step of +0.3 s inside the window lets 3 more in."""
    h = history(ReplicaLog(requests=evenly(14, seconds=0.99)))
    h.offsets.append((2.5, 0.3))
    assert check_rate(h)[0] == []
    h.offsets[-1] = (2.5, -0.3)  # a step back admits nothing more
    assert check_rate(h)[0]


def test_a_replica_admitting_locally_adds_one_local_bucket() -> None:
    """While its store is down a replica admits by its own bucket, at the full rate."""
    shared = ReplicaLog(requests=evenly(12, seconds=0.99))
    local = ReplicaLog(requests=evenly(8, seconds=0.99), events=degraded(1.0, 4.0))
    assert check_rate(history(shared, local))[0] == []
    local.events.clear()
    assert check_rate(history(shared, local))[0]


def test_a_restart_inside_the_window_allows_one_more_burst() -> None:
    """Redis restarted empty forgets the fleet's bucket (docs/rate-limiter.md): it starts
    full again, so a window holding the restart may admit one more burst, no more."""
    restart = Fault("restart", {}, 2.5, 2.5, 2.5)
    assert (
        check_rate(history(ReplicaLog(requests=evenly(14, seconds=0.99)), faults=(restart,)))[0]
        == []
    )
    found, _ = check_rate(history(ReplicaLog(requests=evenly(16, seconds=0.99)), faults=(restart,)))
    assert found


def slow(t0: float, outside: float, *, flags: int = 0) -> Request:
    """A request that spent ``outside`` seconds in the middleware, 10 ms in the app."""
    return Request(t0, t0 + outside, t0 + outside + 0.01, t0 + outside + 0.01, 200, flags, 0.0)


def test_waiting_on_the_store_past_its_bound_is_a_violation() -> None:
    """Two policies (rate limiter, bulkhead) may each wait on two store calls, a timeout
    each; more is a violation, and so is more than one for a request that began with its
    store down."""
    ok = ReplicaLog(requests=[slow(1.0, 1.0)])
    assert check_latency(history(ok))[0] == []
    found, _ = check_latency(history(ReplicaLog(requests=[slow(1.0, 1.2)])))
    assert "spent 1.200 s in the middleware" in found[0].what
    down = ReplicaLog(requests=[slow(1.0, 0.45)], events=degraded(0.5, 3.0))
    assert check_latency(history(down))[0]


def test_a_late_event_loop_widens_the_latency_bound() -> None:
    """A request slowed by its own process's event loop (measured by the ticker) is not a
    request that waited on the store."""
    log = ReplicaLog(requests=[slow(1.0, 1.2)], lags=[(1.3, 0.2)])
    assert check_latency(history(log))[0] == []
    assert check_latency(history(ReplicaLog(requests=[slow(1.0, 1.2)])))[0]


def test_a_store_call_started_while_the_store_is_down_is_a_violation() -> None:
    """Once degraded, policies go local at once: a request starting a store call waits on a
    store known to be down."""
    log = ReplicaLog(requests=[slow(1.0, 0.2, flags=CALLED_DOWN)])
    found, _ = check_latency(history(log))
    assert "while its store was degraded" in found[0].what


def test_a_request_that_never_finished_is_a_violation() -> None:
    """A request still in the middleware when the load stopped waited too long."""
    stuck = Request(1.0, -1.0, -1.0, -1.0, 0, 0, 0.0)
    found, _ = check_latency(history(ReplicaLog(open=[stuck])))
    assert "never finished" in found[0].what


def fault(start: float, heal: float) -> Fault:
    return Fault("pause", {"duration": heal - start}, start, heal, heal)


def test_a_store_still_degraded_after_the_backoff_is_a_violation() -> None:
    """After a fault heals, every store is back within the 2 s backoff and one timeout."""
    back = ReplicaLog(events=degraded(1.0, 3.0))
    late = ReplicaLog(events=degraded(1.0, 4.5))
    found, figures = check_recovery(history(back, late, faults=(fault(1.0, 1.2),)))
    assert [v.what for v in found if v.check == "recovery"] == [
        "replica 1: its store is still degraded 2.50 s after #0 pause healed"
    ]
    assert figures["recoveries checked"] == 1


def test_breakers_that_never_agree_after_a_fault_are_a_violation() -> None:
    """Once every store is back, the breakers show one state and generation within a few
    sync intervals; a replica left behind is a violation."""
    a = ReplicaLog(breaker=[(0.5, "closed", 1), (1.1, "open", 2)])
    b = ReplicaLog(breaker=[(0.5, "closed", 1), (1.15, "open", 2)])
    assert check_recovery(history(a, b, faults=(fault(1.0, 1.0),)))[0] == []
    behind = ReplicaLog(breaker=[(0.5, "closed", 1)])
    found, _ = check_recovery(history(a, behind, faults=(fault(1.0, 1.0),)))
    assert [v.check for v in found] == ["agreement"]


def test_the_same_state_under_another_generation_agrees() -> None:
    """A replica that decided alone numbers its moves above the fleet's until the fleet's
    next transition (docs/shared-state.md, generations): the same state under a lower
    generation agrees; another state under a lower one does not."""
    ahead = ReplicaLog(breaker=[(0.5, "closed", 11)])
    fleet = ReplicaLog(breaker=[(0.5, "closed", 9)])
    assert check_recovery(history(ahead, fleet, faults=(fault(1.0, 1.0),)))[0] == []
    other = ReplicaLog(breaker=[(0.5, "open", 9)])
    found, _ = check_recovery(history(ahead, other, faults=(fault(1.0, 1.0),)))
    assert "agreement" in [v.check for v in found]


def test_a_request_that_raised_and_a_replica_that_died_are_violations() -> None:
    """No call raises because of the store, and every replica ends cleanly."""
    raised = ReplicaLog(requests=[call(1.0, status=-1)], errors=["RuntimeError('x')"])
    dead = ReplicaLog(exit="it did not end cleanly")
    found = check_errors(history(raised, dead))
    assert len(found) == 3


def test_the_report_gives_the_seed_the_replay_and_the_faults() -> None:
    """A failed run can be replayed from its report alone."""
    a = ReplicaLog(requests=[call(1.0, 1.0), call(1.1, 1.0)])
    b = ReplicaLog(requests=[call(1.5, 0.1)])
    h = history(a, b, faults=(fault(0.5, 0.9),))
    h.seed, h.replay = 42, "python -m tests.nemesis --seed 42 --seconds 10"
    report = check(h).report()
    assert "seed 42" in report
    assert "replay: python -m tests.nemesis --seed 42" in report
    assert "#0     0.50-0.90 pause duration=0.4" in report
    assert "concurrency: 1 violations in 1 episodes" in report


# --- the soak ------------------------------------------------------------------------------------
def soak_options(full: bool) -> Options:
    """The in-suite run, or a long one (``--full``, or the environment's seed and length)."""
    seed = int(os.environ.get("RESILIENCE_NEMESIS_SEED", SEED))
    seconds = float(os.environ.get("RESILIENCE_NEMESIS_SECONDS", 300 if full else SECONDS))
    pace = PACE if seconds <= 30 else 1.0
    settle = 2.5 if seconds <= 30 else 3.0
    return dataclasses.replace(Options(), seed=seed, seconds=seconds, pace=pace, settle=settle)


@pytest.mark.slow
@pytest.mark.redis  # a Sentinel setup of its own
async def test_the_fleet_keeps_its_promises_under_the_nemesis(full: bool) -> None:
    """Four replicas under load while the nemesis faults Redis: the fleet's calls in flight
    stay within the bulkhead, its admissions within the rate limit (both as the docs allow
    while a store is down), no call waits on the store past its timeout, every store comes
    back, and the breakers agree after each fault."""
    verdict = await check_run(soak_options(full))
    print(verdict.report())
    assert verdict.ok, verdict.report()
