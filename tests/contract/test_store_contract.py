"""The Store contract: every store must pass these, with the same FakeClock-driven steps.

One module over 600 lines on purpose: it is the whole contract, which a new store is checked
against at once (``conftest.py`` runs each test on every store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    PolicyStatus,
    Store,
)
from resilience.rules.breaker import BreakerConfig
from resilience.testing import FakeClock

from ..helpers import boom, breaker, ok, raises_each, until

Settle = Callable[[], Awaitable[None]]


async def fail(b: CircuitBreaker, times: int) -> None:
    await raises_each(times, ValueError, b.call, boom, match="boom")


async def test_same_name_same_core(store: Store) -> None:
    """Two breakers with one name and one store share one state machine."""
    config = BreakerConfig(minimum_calls=4, window=CountWindow(4))
    assert store.breaker("a", config, store.clock) is store.breaker("a", config, store.clock)
    assert store.breaker("a", config, store.clock) is not store.breaker("b", config, store.clock)


async def test_other_config_is_refused(store: Store) -> None:
    """Reusing a name with another configuration is a clear error, not a silent merge."""
    breaker(store, "x")
    with pytest.raises(ValueError, match="another configuration"):
        breaker(store, "x", failure_ratio=0.9)


async def test_trip_is_seen_by_every_breaker(
    store: Store, replica: Callable[[], Store], settle: Settle
) -> None:
    """A breaker tripped on one replica rejects calls on another."""
    a, b = breaker(store), breaker(replica())
    await fail(a, 4)
    await settle()
    assert b.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        await b.call(ok)
    assert info.value.retry_after == pytest.approx(10.0)


async def test_half_open_admits_exactly_the_probe_count(
    store: Store, replica: Callable[[], Store], clock: FakeClock, settle: Settle
) -> None:
    """Across replicas, half-open lets exactly half_open_calls probes through."""
    a, b = breaker(store, half_open_calls=2), breaker(replica(), half_open_calls=2)
    await fail(a, 4)
    await settle()
    clock.advance(10)
    gate = asyncio.Event()
    started = 0

    async def probe() -> str:
        nonlocal started
        started += 1
        await gate.wait()
        return "ok"

    tasks = [asyncio.create_task(x.call(probe)) for x in (a, b, a, b, a, b)]
    await until(lambda: started + sum(t.done() for t in tasks) == 6)
    done = [t for t in tasks if t.done()]
    assert started == 2
    assert len(done) == 4
    assert all(isinstance(t.exception(), CircuitOpenError) for t in done)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 2
    await settle()
    assert a.state is CircuitState.CLOSED
    assert b.state is CircuitState.CLOSED


async def test_expired_probe_lease_frees_the_slot(
    store: Store, replica: Callable[[], Store], clock: FakeClock, settle: Settle
) -> None:
    """A probe whose holder dies stops blocking half-open once its lease expires."""
    a = breaker(store, probe_lease=3.0)
    await fail(a, 4)
    await settle()
    clock.advance(10)
    core = replica().breaker("dep", a.config, clock)  # the replica that will die
    await settle()
    admitted = core.acquire(clock.monotonic()) or await core.acquire_remote(clock.monotonic())
    gen, lease = admitted
    assert lease
    with pytest.raises(CircuitOpenError):
        await a.call(ok)
    clock.advance(3)
    assert await a.call(ok) == "ok"
    await settle()
    assert a.state is CircuitState.CLOSED
    core.record(gen, lease, True, False)  # the dead holder's late report is discarded
    await settle()
    assert a.state is CircuitState.CLOSED


async def test_outcomes_of_an_older_generation_are_discarded(
    store: Store, clock: FakeClock, settle: Settle
) -> None:
    """A call admitted before a trip cannot count in the state that followed it."""
    a = breaker(store)
    gate = asyncio.Event()

    async def slow_failure() -> None:
        await gate.wait()
        raise ValueError("boom")

    straggler = asyncio.create_task(a.call(slow_failure))
    await asyncio.sleep(0)
    await fail(a, 4)
    await settle()
    clock.advance(10)
    assert await a.call(ok) == "ok"  # the probe closes the breaker
    await settle()
    assert a.state is CircuitState.CLOSED
    gate.set()
    with pytest.raises(ValueError, match="boom"):
        await straggler
    await settle()
    assert a.metrics().failures == 0
    assert a.state is CircuitState.CLOSED


async def test_manual_control_is_shared(
    store: Store, replica: Callable[[], Store], settle: Settle
) -> None:
    """force_open, disable and reset on one replica are seen by the others."""
    a, b = breaker(store), breaker(replica())
    await a.force_open()
    await settle()
    assert b.state is CircuitState.FORCED_OPEN
    with pytest.raises(CircuitOpenError):
        await b.call(ok)
    await b.disable()
    await settle()
    assert a.state is CircuitState.DISABLED
    await fail(a, 10)
    await settle()
    assert a.state is CircuitState.DISABLED
    await a.reset()
    await settle()
    assert b.state is CircuitState.CLOSED


async def test_leases_are_bounded_and_returned(store: Store, replica: Callable[[], Store]) -> None:
    """At most `limit` leases are held at once, fleet-wide; a released lease frees its place."""
    first = await store.acquire_lease("pool", limit=2, ttl=5)
    second = await replica().acquire_lease("pool", limit=2, ttl=5)
    assert first
    assert second
    assert first != second
    assert await store.acquire_lease("pool", limit=2, ttl=5) is None
    assert await store.count_leases("pool") == 2
    assert await store.release_lease("pool", first) is True
    assert await store.release_lease("pool", first) is False
    assert await store.acquire_lease("pool", limit=2, ttl=5) is not None


async def test_leases_expire(store: Store, clock: FakeClock) -> None:
    """A lease whose holder never returns it lapses after its ttl."""
    lease = await store.acquire_lease("pool", limit=1, ttl=5)
    assert lease is not None
    clock.advance(4.9)
    assert await store.acquire_lease("pool", limit=1, ttl=5) is None
    clock.advance(0.1)
    assert await store.count_leases("pool") == 0
    assert await store.release_lease("pool", lease) is False
    assert await store.acquire_lease("pool", limit=1, ttl=5) is not None


async def test_a_renewed_lease_outlives_its_first_ttl(store: Store, clock: FakeClock) -> None:
    """renew_lease extends an unexpired permit; an expired one cannot be renewed."""
    lease = await store.acquire_lease("pool", limit=1, ttl=5)
    assert lease is not None
    clock.advance(4)
    assert await store.renew_lease("pool", lease, ttl=5) is True
    clock.advance(4)  # 8 s after the grant: alive only thanks to the renewal
    assert await store.count_leases("pool") == 1
    assert await store.acquire_lease("pool", limit=1, ttl=5) is None
    clock.advance(1.5)
    assert await store.count_leases("pool") == 0
    assert await store.renew_lease("pool", lease, ttl=5) is False
    assert await store.renew_lease("pool", "never-granted", ttl=5) is False


async def test_names_lists_known_policies(store: Store) -> None:
    """The store can list the policies it holds, for status tools."""
    breaker(store, "payments")
    breaker(store, "search")
    await store.acquire_lease("uploads", limit=1, ttl=1)
    assert {"payments", "search", "uploads"} <= set(store.names())
    assert store.names() == sorted(store.names())


@pytest.mark.parametrize("bad", ["", 3, None])
async def test_bad_keys_are_refused(store: Store, bad: object) -> None:
    """Empty or non-string keys are a clear error."""
    with pytest.raises((TypeError, ValueError)):
        await store.acquire_lease(bad, limit=1, ttl=1)  # type: ignore[arg-type]


async def test_rate_bucket_is_shared(store: Store, replica: Callable[[], Store]) -> None:
    """One GCRA bucket across replicas: a burst of 3, then a wait of one interval."""
    other = replica()
    assert await store.rate_take("api", interval=0.5, burst=3) == 0.0
    assert await other.rate_take("api", interval=0.5, burst=3) == 0.0
    assert await store.rate_take("api", interval=0.5, burst=3) == 0.0
    wait = await other.rate_take("api", interval=0.5, burst=3)
    assert wait == pytest.approx(0.5, abs=1e-3)


async def test_rate_bucket_refills(store: Store, clock: FakeClock) -> None:
    """Tokens come back at one per interval."""
    for _ in range(2):
        assert await store.rate_take("api", interval=1.0, burst=2) == 0.0
    assert await store.rate_take("api", interval=1.0, burst=2) == pytest.approx(1.0, abs=1e-3)
    clock.advance(1.0)
    assert await store.rate_take("api", interval=1.0, burst=2) == 0.0


async def test_a_rate_bucket_survives_its_clock_stepping_back(
    store: Store, clock: FakeClock
) -> None:
    """The store's clock steps back an hour (Redis ``TIME`` after a failover) with the bucket
    spent: the bucket stays empty, a token comes back an interval later, never a whole burst
    at once (the bucket read as garbage and reset) nor an hour of refusals."""
    clock.advance(10_000.0)  # a server clock well past an hour
    for _ in range(3):
        assert await store.rate_take("api", interval=1.0, burst=3) == 0.0
    clock._now -= 3600.0
    wait = await store.rate_take("api", interval=1.0, burst=3)
    assert 0.0 < wait <= 1.0 + 1e-3
    clock.advance(wait)
    assert await store.rate_take("api", interval=1.0, burst=3) == 0.0
    assert await store.rate_take("api", interval=1.0, burst=3) > 0.0


async def test_budget_is_clamped_and_shared(store: Store, replica: Callable[[], Store]) -> None:
    """A token budget starts full, is shared, and stays within [0, maximum]."""
    other = replica()
    assert await store.budget_add("b", delta=0.5, maximum=10, ttl=60) == 10
    assert await other.budget_add("b", delta=-4, maximum=10, ttl=60) == 6
    assert await store.budget_add("b", delta=-100, maximum=10, ttl=60) == 0
    assert await other.budget_add("b", delta=0.25, maximum=10, ttl=60) == pytest.approx(0.25)


async def test_a_shared_window_counts_across_replicas_and_slides(
    store: Store, replica: Callable[[], Store], clock: FakeClock
) -> None:
    """window_add: every replica's deltas in one sliding window; old buckets drop out."""
    other = replica()
    assert await store.window_add("t", [3, 1], window=10) == (3, 1)
    clock.advance(4)
    assert await other.window_add("t", [2, 2], window=10) == (5, 3)
    assert await store.window_add("t", [0, 0], window=10) == (5, 3)  # zeros: a read
    clock.advance(6.5)  # the first bucket (t=0) has left the window, the second has not
    assert await other.window_add("t", [0, 0], window=10) == (2, 2)
    clock.advance(10)
    assert await store.window_add("t", [1, 0], window=10) == (1, 0)
    assert await store.window_add("u", [7], window=1, buckets=2) == (7,)
    with pytest.raises(ValueError, match="deltas"):
        await store.window_add("t", [-1], window=10)
    with pytest.raises(TypeError, match="deltas"):
        await store.window_add("t", [1.5], window=10)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="deltas"):
        await store.window_add("t", [], window=10)
    with pytest.raises(ValueError, match="window"):
        await store.window_add("t", [1], window=0)


async def test_shares_never_sum_above_the_limit_and_lapse(
    store: Store, replica: Callable[[], Store], clock: FakeClock
) -> None:
    """lease_share: a holder gets at most what the others leave (each counted as the larger
    of its share and its permits in use); a share not renewed lapses after its ttl; want=0
    gives it back. The reply: the share, the permits in use, what the others count for."""
    other = replica()
    assert await store.lease_share("pool", "a", want=3, held=3, limit=5, ttl=5) == (3, 3, 0)
    assert await other.lease_share("pool", "b", want=4, held=1, limit=5, ttl=5) == (2, 4, 3)
    assert await other.lease_share("pool", "b", want=4, held=2, limit=5, ttl=5) == (2, 5, 3)
    assert await store.lease_share("pool", "a", want=1, held=1, limit=5, ttl=5) == (1, 3, 2)
    assert await other.lease_share("pool", "b", want=4, held=2, limit=5, ttl=5) == (4, 3, 1)
    clock.advance(3)
    assert await other.lease_share("pool", "b", want=4, held=2, limit=5, ttl=5) == (4, 3, 1)
    clock.advance(2.5)  # a was not renewed: its share lapsed; b's holds
    assert await store.lease_share("pool", "c", want=5, held=0, limit=5, ttl=5) == (1, 2, 4)
    clock.advance(5)  # b's lapsed too
    assert await store.lease_share("pool", "c", want=5, held=0, limit=5, ttl=5) == (5, 0, 0)
    assert await store.lease_share("pool", "c", want=0, held=0, limit=5, ttl=5) == (0, 0, 0)
    assert await other.lease_share("pool", "d", want=5, held=0, limit=5, ttl=5) == (5, 0, 0)
    with pytest.raises(ValueError, match="want"):
        await store.lease_share("pool", "a", want=-1, held=0, limit=5, ttl=5)


async def test_permits_in_use_above_a_share_count_and_no_holder_counts_above_the_limit(
    store: Store, replica: Callable[[], Store]
) -> None:
    """A holder whose share shrank below its permits in use counts for its permits (so a
    grant never lets the permits in use exceed the limit), and never for more than the limit."""
    other = replica()
    assert await store.lease_share("pool", "a", want=1, held=4, limit=5, ttl=5) == (1, 4, 0)
    assert await other.lease_share("pool", "b", want=5, held=0, limit=5, ttl=5) == (1, 4, 4)
    assert await store.lease_share("pool", "a", want=0, held=99, limit=5, ttl=5) == (0, 99, 1)
    assert await other.lease_share("pool", "b", want=5, held=0, limit=5, ttl=5) == (0, 5, 5)


async def test_a_capped_growth_keeps_the_rest_of_the_limit_free(
    store: Store, replica: Callable[[], Store]
) -> None:
    """cap: a share grows only while the holders together stay within the cap; the rest of
    the limit stays free for uncapped asks, and a holder keeps what it already has."""
    other = replica()
    assert await store.lease_share("p", "a", want=10, held=0, limit=10, ttl=5, cap=7) == (
        7,
        0,
        0,
    )
    assert await other.lease_share("p", "b", want=5, held=0, limit=10, ttl=5, cap=7) == (0, 0, 7)
    assert await other.lease_share("p", "b", want=3, held=0, limit=10, ttl=5) == (3, 0, 7)
    assert await store.lease_share("p", "a", want=10, held=0, limit=10, ttl=5, cap=5) == (7, 0, 3)
    with pytest.raises(ValueError, match="cap"):
        await store.lease_share("p", "a", want=1, held=0, limit=10, ttl=5, cap=0)


async def test_shares_the_store_lost_grow_only_after_the_holders_reported_again(
    store: Store, replica: Callable[[], Store], clock: FakeClock
) -> None:
    """A holder that had a share the store no longer knows (Redis restarted empty): for
    ``settle`` seconds no share grows past what its holder had, so the holders still using
    theirs report their permits before anyone grows into them."""
    other = replica()
    ask = {"limit": 10, "ttl": 5, "settle": 2}
    assert await store.lease_share("pool", "a", want=6, held=3, had=3, **ask) == (3, 3, 0)
    assert await other.lease_share("pool", "b", want=5, held=0, **ask) == (0, 3, 3)
    assert await other.lease_share("pool", "c", want=4, held=2, had=4, **ask) == (4, 5, 3)
    clock.advance(2.5)  # settled: the others have reported
    assert await other.lease_share("pool", "b", want=5, held=0, **ask) == (3, 5, 7)
    assert await store.lease_share("pool", "a", want=6, held=3, had=3, **ask) == (3, 5, 7)


async def test_entries_from_before_the_clock_stepped_back_are_garbage(
    store: Store, replica: Callable[[], Store], clock: FakeClock
) -> None:
    """An entry expiring further ahead than the ttl asked with (+1 s) is garbage, never
    counted: a store clock stepped back an hour frees the fleet within ``settle``, not an
    hour later."""
    other = replica()
    ask = {"limit": 5, "ttl": 5, "settle": 2}
    assert await store.lease_share("pool", "a", want=5, held=5, had=0, **ask) == (5, 5, 0)
    clock._now -= 3600.0  # the store's clock steps back (Redis TIME after a failover)
    assert await other.lease_share("pool", "b", want=5, held=0, **ask) == (0, 0, 0)
    clock.advance(2.5)
    assert await other.lease_share("pool", "b", want=5, held=0, **ask) == (5, 0, 0)


async def test_tokens_are_taken_as_many_as_the_bucket_allows(
    store: Store, replica: Callable[[], Store], clock: FakeClock
) -> None:
    """rate_take_many: up to `want` tokens at once, as the bucket allows; then a wait."""
    other = replica()
    assert await store.rate_take_many("api", interval=0.5, burst=4, want=3) == (3, 0.0)
    assert await other.rate_take_many("api", interval=0.5, burst=4, want=3) == (1, 0.0)
    took, wait = await store.rate_take_many("api", interval=0.5, burst=4, want=3)
    assert took == 0
    assert wait == pytest.approx(0.5, abs=1e-3)
    clock.advance(1.0)
    assert await other.rate_take_many("api", interval=0.5, burst=4, want=5) == (2, 0.0)
    assert await store.rate_take("api", interval=0.5, burst=4) == pytest.approx(0.5, abs=1e-3)


async def test_cache_round_trip_and_expiry(
    store: Store, replica: Callable[[], Store], clock: FakeClock
) -> None:
    """A cached value is seen by other replicas until its ttl (Redis: real ttl, not checked)."""
    await store.cache_set("prices", "sku:{1}\n", b'{"p": 1}', ttl=60)
    assert await replica().cache_get("prices", "sku:{1}\n") == b'{"p": 1}'
    assert await store.cache_get("prices", "other") is None
    assert await store.cache_get("other", "sku:{1}\n") is None


async def test_status_lists_every_policy_with_its_figures(
    store: Store, replica: Callable[[], Store], settle: Settle, clock: FakeClock
) -> None:
    """status() shows breakers (state, counts, time left) and leases, from any replica."""
    from resilience import status

    a = breaker(store, "payments")
    await fail(a, 2)
    await a.call(ok)
    breaker(store, "search")
    await store.acquire_lease("uploads", limit=3, ttl=5)
    await settle()
    other = replica()
    seen = {(s.name, s.kind): s for s in await status(other)}
    pay = seen[("payments", "circuit_breaker")]
    assert (pay.state, pay.calls, pay.failures) == (CircuitState.CLOSED, 3, 2)
    assert pay.failure_ratio == pytest.approx(2 / 3)
    assert seen[("search", "circuit_breaker")].calls == 0
    assert seen[("uploads", "bulkhead")].in_flight == 1
    await fail(a, 1)
    await settle()
    clock.advance(4)
    pay = {(s.name, s.kind): s for s in await status(other)}[("payments", "circuit_breaker")]
    assert pay.state is CircuitState.OPEN
    assert pay.retry_after == pytest.approx(6.0, abs=0.01)
    assert pay.to_dict()["state"] == "open"


async def test_control_by_name(store: Store, replica: Callable[[], Store], settle: Settle) -> None:
    """An operator can force a breaker by name from any replica; unknown names are an error."""
    a = breaker(store, "payments")
    await settle()
    other = replica()
    await other.control("payments", CircuitState.FORCED_OPEN)
    await settle()
    assert a.state is CircuitState.FORCED_OPEN
    await other.control("payments", CircuitState.CLOSED)
    await settle()
    assert a.state is CircuitState.CLOSED
    with pytest.raises(KeyError, match="nope"):
        await other.control("nope", CircuitState.FORCED_OPEN)
    with pytest.raises(ValueError, match="not half_open"):
        await other.control("payments", CircuitState.HALF_OPEN)


async def test_status_says_what_opened_a_breaker(
    store: Store, replica: Callable[[], Store], settle: Settle
) -> None:
    """An open breaker's status carries the counts that opened it; a closed one carries none."""
    from resilience import status

    a = breaker(store, "payments")
    await a.call(ok)
    await fail(a, 3)
    await settle()
    (pay,) = [p for p in await status(replica()) if p.name == "payments"]
    assert pay.state is CircuitState.OPEN
    assert pay.opened_by == (4, 3, 0)
    assert pay.to_dict()["opened_by"] == [4, 3, 0]
    await a.reset()
    await settle()
    (pay,) = [p for p in await status(replica()) if p.name == "payments"]
    assert pay.opened_by is None


# --- a replica's own outcomes, and what a shared window covers -------------------------------

_SEQUENCES = {
    "all failures": [False] * 30,
    "mixed": [True, False, False, True, False, True, False, False, False, True] * 3,
    "after a full window of successes": [True] * 10 + [False] * 20,
}


@pytest.mark.parametrize("yielding", [False, True])
@pytest.mark.parametrize("sequence", list(_SEQUENCES))
async def test_the_first_rejection_matches_an_in_process_breaker(
    store: Store, clock: FakeClock, sequence: str, yielding: bool
) -> None:
    """The same calls are first rejected at the same call on every store, whether or not the
    failures yield to the event loop (so no flush runs in between)."""
    outcomes = _SEQUENCES[sequence]

    async def first_rejection(b: CircuitBreaker) -> int | None:
        for i, good in enumerate(outcomes):

            async def call(good: bool = good) -> str:
                if yielding:
                    await asyncio.sleep(0)
                if not good:
                    raise ValueError("boom")
                return "ok"

            try:
                await b.call(call)
            except CircuitOpenError:
                return i
            except ValueError:
                pass
        return None

    options = {"window": CountWindow(10), "minimum_calls": 10, "failure_ratio": 0.5}
    alone = CircuitBreaker("dep", clock=clock, open_for=10.0, **options)  # type: ignore[arg-type]
    expected = await first_rejection(alone)
    assert expected is not None
    shared = breaker(store, **options)
    assert await first_rejection(shared) == expected


async def test_a_shared_time_window_covers_what_an_in_process_one_covers(
    store: Store, replica: Callable[[], Store], clock: FakeClock, settle: Settle
) -> None:
    """TimeWindow(1.5, 1000): failures 1.2 s apart on two replicas are both in the window."""
    from resilience import TimeWindow

    options = {"window": TimeWindow(1.5, 1000), "minimum_calls": 2}
    a = breaker(store, **options)
    b = breaker(replica(), **options)
    clock.advance(100.0004)  # off any bucket boundary
    with pytest.raises(ValueError, match="boom"):
        await a.call(boom)
    await settle()
    clock.advance(1.2)
    with pytest.raises(ValueError, match="boom"):
        await b.call(boom)
    await settle()
    assert a.state is CircuitState.OPEN
    assert b.state is CircuitState.OPEN


async def test_status_counts_rejections_latency_and_bulkhead_limits(
    store: Store, clock: FakeClock, settle: Settle
) -> None:
    """What a dashboard needs: calls refused, sampled durations, a bulkhead's limit."""
    from resilience import status
    from resilience.store.records import LATENCY_BUCKETS

    b = breaker(store, failure_if=lambda result: False)  # a result check: not the bare path
    for _ in range(16):  # one call in 8 is timed
        assert await b.call(ok) == "ok"
    await fail(b, 2)  # [ok, ok, failed, failed]: open
    await raises_each(3, CircuitOpenError, b.call, ok)
    assert await store.acquire_lease("pool", limit=3, ttl=5) is not None
    await settle()
    listed = {(s.name, s.kind): s for s in await status(store)}
    dep = listed[("dep", "circuit_breaker")]
    assert dep.rejected == 3
    assert len(dep.latency) == len(LATENCY_BUCKETS)
    assert sum(dep.latency) == 3  # 18 calls ran: the 1st, 9th and 17th were timed
    assert dep.latency[0] == sum(dep.latency)  # a fake clock: no time passes in a call
    pool = listed[("pool", "bulkhead")]
    assert (pool.in_flight, pool.limit) == (1, 3)


async def test_status_shows_throttle_and_hedge_windows_apart(
    store: Store, replica: Callable[[], Store], clock: FakeClock, settle: Settle
) -> None:
    """A throttle's and a hedge's shared windows show in status() from any replica, each as
    its own kind under its own name, even when the two share that name."""
    from resilience import Hedge, Throttle, status

    throttle = Throttle(store=store, name="api", clock=clock, sync_interval=0.1)
    hedge = Hedge(delay=0.01, store=store, name="api", clock=clock, sync_interval=0.1)
    throttle.counts.add(10, 7)
    hedge.counts.add(40, 2)
    await throttle.sync()
    await hedge.sync()
    await settle()  # the names registered
    listed = {(s.name, s.kind): s for s in await status(replica())}
    assert listed[("api", "throttle")].window == (10, 7)
    assert listed[("api", "hedge")].window == (40, 2)
    assert listed[("api", "hedge")].to_dict()["window"] == [40, 2]


async def test_status_shows_how_far_a_rate_limiter_runs_ahead(
    store: Store, replica: Callable[[], Store], clock: FakeClock, settle: Settle
) -> None:
    """A shared rate limiter shows the seconds until its bucket is full again: five takes of
    a 1-per-second bucket put it 5 s behind, and it is full once they have passed."""
    from resilience import status

    for _ in range(5):
        assert await store.rate_take("api", interval=1.0, burst=10) == 0
    await settle()

    def backlog(listed: list[PolicyStatus]) -> float | None:
        return {(s.name, s.kind): s for s in listed}[("api", "rate_limiter")].backlog

    assert backlog(await status(replica())) == pytest.approx(5.0, abs=0.01)
    clock.advance(2.0)
    assert backlog(await status(replica())) == pytest.approx(3.0, abs=0.01)
    clock.advance(10.0)
    assert backlog(await status(replica())) == 0.0


async def test_status_shows_a_fleet_health_checks_last_result(
    store: Store, replica: Callable[[], Store], clock: FakeClock, settle: Settle
) -> None:
    """A fleet-wide health check's last published result shows in status() from any replica:
    healthy, or unhealthy with the error it failed with, and its sequence number, which
    changes with each result published."""
    from resilience import HealthCheck, status

    failing = False

    async def check() -> None:
        if failing:
            raise ConnectionError("no route to db")

    hc = HealthCheck(check, name="db", interval=1.0, store=store, clock=clock)
    await hc._round()
    await settle()
    listed = {(s.name, s.kind): s for s in await status(replica())}
    db = listed[("health:db", "health_check")]
    assert (db.healthy, db.health_error) == (True, None)
    first = db.health_seq
    assert first is not None
    failing = True
    clock.advance(1.0)
    await hc._round()
    await settle()
    listed = {(s.name, s.kind): s for s in await status(replica())}
    db = listed[("health:db", "health_check")]
    assert db.healthy is False
    assert "no route to db" in (db.health_error or "")
    assert db.health_seq is not None
    assert db.health_seq != first
    await hc.aclose()


async def test_a_raising_failure_if_leaks_no_probe(
    store: Store, clock: FakeClock, settle: Settle
) -> None:
    """A predicate that raises while a probe is judged: the probe counts as a failure and its
    lease is given up, so the next probe runs after open_for, not after probe_lease."""

    class Broken(Exception):
        pass

    armed = False

    def judge(result: object) -> bool:
        if armed:
            raise Broken("the predicate failed")
        return False

    b = breaker(store, failure_if=judge, probe_lease=300.0)
    await fail(b, 4)
    await settle()
    clock.advance(10)
    armed = True
    with pytest.raises(Broken, match="predicate"):
        await b.call(ok)
    await settle()
    assert b.state is CircuitState.OPEN
    armed = False
    clock.advance(10)
    assert await b.call(ok) == "ok"
    await settle()
    assert b.state is CircuitState.CLOSED


_names = iter(range(10**9))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    outcomes=st.lists(st.booleans(), min_size=1, max_size=40),
    window=st.integers(2, 12),
    ratio=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
)
async def test_every_sequence_is_first_rejected_where_in_process_is(
    store: Store, clock: FakeClock, outcomes: list[bool], window: int, ratio: float
) -> None:
    """Any sequence of successes and failures, any window and ratio: a shared breaker first
    refuses the same call an in-process breaker does (no flush in between)."""
    options = {"window": CountWindow(window), "minimum_calls": window, "failure_ratio": ratio}

    async def first_rejection(b: CircuitBreaker) -> int | None:
        for i, good in enumerate(outcomes):
            try:
                await (b.call(ok) if good else b.call(boom))
            except CircuitOpenError:
                return i
            except ValueError:
                pass
        return None

    alone = CircuitBreaker("alone", clock=clock, open_for=10.0, **options)  # type: ignore[arg-type]
    shared = breaker(store, f"seq{next(_names)}", **options)
    assert await first_rejection(shared) == await first_rejection(alone)
