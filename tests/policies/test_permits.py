"""The permit sources: any source keeps the fleet's limit and leaks nothing; quota leasing
(``FleetShare`` over ``Store.lease_share``) holds it with no round trip per call, shares
follow demand, a dead holder's share comes back; ``FleetLeases`` is one lease per call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilience import Bulkhead, MemoryStore, StoreUnavailableError
from resilience.policies.permits import FleetLeases, FleetShare, PermitSource
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..fork_support import in_forked_child
from ..helpers import advance, settle, started, unique_prefix, until
from ..redis_server import RedisServer
from ..store.support import evalsha_calls

ops = st.lists(
    st.tuples(st.sampled_from(["take", "give", "tick"]), st.integers(0, 2)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(1, 6))
def test_permits_in_use_never_exceed_the_limit(steps: list[tuple[str, int]], limit: int) -> None:
    """Three holders taking, giving back and renewing in any order: the shares never sum
    above the limit, nor do the permits in use; a holder never uses more than its share."""

    async def run() -> None:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        holders = [pool(store, limit) for _ in range(3)]
        for op, who in steps:
            h = holders[who]
            if op == "take":
                await h.take()
            elif op == "give":
                await h.give()
            else:
                await advance(clock, 1.0)  # a rebalance period: renewals run
            assert sum(x.held for x in holders) <= limit
            assert sum(x.share for x in holders) <= limit
            assert all(x.held <= x.share or x.held == 0 for x in holders)
        for h in holders:
            await h.aclose()

    asyncio.run(run())


class Laggy(MemoryStore):
    """A store that answers a take one loop turn later, so a caller can be cancelled while
    its take is under way."""

    async def acquire_lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        await asyncio.sleep(0)
        return await super().acquire_lease(key, limit=limit, ttl=ttl)

    async def lease_share(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await super().lease_share(*args, **kwargs)


def pool(store: MemoryStore, limit: int) -> FleetShare:
    """A holder of the fleet limit "pool" on ``store`` (on the store's clock), whose share
    lives 3 s unless renewed."""
    return FleetShare(store, "pool", limit=limit, ttl=3)


async def granted(holder: PermitSource, n: int) -> int:
    """How many of ``n`` permits asked of ``holder`` one after another it grants."""
    return sum([bool(await holder.take()) for _ in range(n)])


async def give_back(holder: PermitSource, n: int) -> None:
    """``n`` permits given back to ``holder``."""
    for _ in range(n):
        await holder.give()


def source(kind: str, store: MemoryStore, clock: FakeClock, limit: int) -> PermitSource:
    if kind == "leases":
        return FleetLeases(store, "pool", limit=limit, ttl=3, clock=clock)
    return pool(store, limit)


source_ops = st.lists(
    st.tuples(st.sampled_from(["take", "take now", "cancel", "give", "tick"]), st.integers(0, 1)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["leases", "share"]), source_ops, st.integers(1, 5))
def test_a_source_never_exceeds_its_limit_and_never_leaks(
    kind: str, steps: list[tuple[str, int]], limit: int
) -> None:
    """Two holders of one source kind take permits (with and without I/O), give them back,
    are cancelled while taking and renew, in any order: the permits held never exceed the
    limit, fleet-wide; once every permit is given back none is left taken, and a new holder
    gets the whole limit."""

    async def run() -> None:
        clock = FakeClock()
        store = Laggy(clock=clock)
        holders = [source(kind, store, clock, limit) for _ in range(2)]
        held: list[list[object]] = [[], []]
        for op, who in steps:
            h = holders[who]
            if op == "take":
                permit = await h.take()
                if permit:
                    held[who].append(permit)
            elif op == "take now" and h.take_now():
                held[who].append(True)
            elif op == "cancel":
                taking = asyncio.ensure_future(h.take())
                await asyncio.sleep(0)  # under way, unless a permit was at hand
                taking.cancel()
                await asyncio.gather(taking, return_exceptions=True)
                if not taking.cancelled() and taking.result():  # taken before the cancel
                    held[who].append(taking.result())
            elif op == "give" and held[who]:
                await h.give(held[who].pop())
            elif op == "tick":
                clock.advance(1.0)  # renewals run
            await settle()
            assert sum(len(mine) for mine in held) <= limit
            assert await store.count_leases("pool") <= limit
            assert sum(x.held for x in holders) <= limit
        for h, mine in zip(holders, held, strict=True):
            while mine:
                await h.give(mine.pop())
            await h.aclose()
        await settle()
        assert await store.count_leases("pool") == 0
        assert all(x.held == 0 for x in holders)
        clock.advance(1.0)  # past the quarter second a "full" answer is trusted
        fresh = source(kind, store, clock, limit)
        assert await granted(fresh, limit) == limit
        assert not await fresh.take()
        await fresh.aclose()

    asyncio.run(run())


class_ops = st.lists(
    st.tuples(st.sampled_from(["low", "high", "give low", "give high", "tick"]), st.integers(0, 2)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(class_ops, st.integers(2, 8), st.floats(0.1, 0.95))
def test_a_capped_class_never_holds_more_than_its_cap_fleet_wide(
    steps: list[tuple[str, int]], limit: int, fraction: float
) -> None:
    """Three holders take permits for a low class (capped) and a high one (not), give them
    back and renew in any order: the low class never holds more than its cap fleet-wide,
    and all permits never more than the limit."""
    cap = int(fraction * limit) or 1

    async def run() -> None:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        holders = [pool(store, limit) for _ in range(3)]
        low, high = [0, 0, 0], [0, 0, 0]
        for op, who in steps:
            h = holders[who]
            if op == "low" and await h.take(cap):
                low[who] += 1
            elif op == "high" and await h.take():
                high[who] += 1
            elif op.startswith("give"):
                kept = low if op == "give low" else high
                if kept[who]:
                    kept[who] -= 1
                    await h.give()
            elif op == "tick":
                await advance(clock, 1.0)  # a rebalance period: renewals run
            assert sum(low) <= cap
            assert sum(x.held for x in holders) <= limit
        for h in holders:
            await h.aclose()

    asyncio.run(run())


async def test_a_share_follows_demand_and_goes_back_when_unused() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    a, b = pool(store, 4), pool(store, 4)
    assert await granted(a, 4) == 4
    assert a.share == 4
    assert not await b.take()  # the fleet is full
    await give_back(a, 3)
    await advance(clock, 1.0)  # renewal: a keeps its peak of the last period (4)
    assert a.share == 4
    await advance(clock, 1.0)  # the next one: only what it used since (1)
    assert a.share == 1
    assert await b.take()
    assert await b.take()
    assert await b.take()
    assert not await b.take()
    await a.give()
    for _ in range(2):
        await advance(clock, 1.0)
    assert a.share == 0  # nothing held: the share is given back, the renewals stop
    assert a._timer is None
    await a.aclose()
    await b.aclose()


class Counted(MemoryStore):
    """A store that counts its share calls."""

    asks = 0

    async def lease_share(self, key: str, holder: str, **options: Any) -> tuple[int, int, int]:
        self.asks += 1
        return await super().lease_share(key, holder, **options)


async def test_a_share_that_fits_its_use_is_renewed_every_few_seconds() -> None:
    """A holder using 2 permits of its share of 2 asks the store every ``renew_every``
    (4 s), not every ``rebalance``; one using fewer than it holds keeps them while the fleet
    has permits free, and gives them back at the next period once it had none free."""
    clock = FakeClock()
    store = Counted(clock=clock)
    a = FleetShare(store, "pool", limit=10, ttl=30)
    assert a.renew_every == 4.0
    assert a.settle == 8.0
    assert await granted(a, 2) == 2
    store.asks = 0
    for _ in range(12):
        await advance(clock, 1.0)
    assert store.asks == 3  # one renewal each 4 s (it was 12: one a second)
    assert a.share == 2
    await a.give()  # one permit in use of a share of 2; the fleet has 8 free
    await advance(clock, 1.0)
    await advance(clock, 1.0)
    assert a.share == 2  # kept: no other holder needs it
    b = FleetShare(store, "pool", limit=10, ttl=30)
    assert await granted(b, 8) == 8  # the fleet is full now
    for _ in range(4):  # a's next renewal sees it: the unused permit goes back
        await advance(clock, 1.0)
    assert a.share == 1
    assert await b.take()
    await a.aclose()
    await b.aclose()


async def test_a_dead_holders_share_comes_back_within_one_lease() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    dead = pool(store, 2)
    assert await dead.take()
    assert await dead.take()
    assert dead._timer is not None
    dead._timer.cancel()  # it dies: no renewal, no goodbye
    other = pool(store, 2)
    assert not await other.take()
    clock.advance(3.0)
    assert await other.take()
    assert await other.take()
    await other.aclose()


async def test_a_valid_share_admits_while_the_store_is_away() -> None:
    """Calls go on against a share that is still valid; past it, the caller is told."""

    class Away(MemoryStore):
        away = False

        async def lease_share(self, *args: object, **kwargs: object) -> tuple[int, int]:
            if self.away:
                raise StoreUnavailableError("away")
            return await super().lease_share(*args, **kwargs)  # type: ignore[arg-type]

    clock = FakeClock()
    store = Away(clock=clock)
    share = pool(store, 3)
    assert await share.take()
    assert await share.take()
    await share.give()
    store.away = True
    assert share.take_now()  # from the share granted before: no store call
    await share.give()
    await advance(clock, 3.0)  # the share's lease has run out
    assert not share.take_now()
    with pytest.raises(StoreUnavailableError):
        await share.take()
    store.away = False
    await share.aclose()


def test_bad_arguments_are_refused() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError, match="limit"):
        FleetShare(store, "pool", limit=0)
    with pytest.raises(ValueError, match="ttl"):
        FleetShare(store, "pool", limit=1, ttl=0)
    with pytest.raises(TypeError, match="key"):
        FleetShare(store, 3, limit=1)  # type: ignore[arg-type]


# --- on a real Redis --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [4, 10])
async def test_the_fleet_limit_holds_across_replicas_with_few_round_trips(
    redis_url: str, raw: aioredis.Redis, workers: int
) -> None:
    """Two replicas, ``workers`` workers each, a fleet limit of 8 (demand at the limit, and
    above it): never more than 8 in use at once, and under 0.05 Redis commands per call."""
    prefix = unique_prefix("quota")
    stores = [RedisStore.from_url(redis_url, prefix=prefix) for _ in range(2)]
    shares = [FleetShare(s, "pool", limit=8, ttl=10) for s in stores]
    in_use = peak = taken = refused = 0
    before = await evalsha_calls(raw)

    async def worker(share: FleetShare) -> None:
        nonlocal in_use, peak, taken, refused
        for _ in range(300):
            if not await share.take():
                refused += 1
                await asyncio.sleep(0)
                continue
            taken += 1
            in_use += 1
            peak = max(peak, in_use)
            await asyncio.sleep(0)
            in_use -= 1
            await share.give()

    try:
        await asyncio.gather(*(worker(s) for s in shares for _ in range(workers)))
        calls = await evalsha_calls(raw) - before
    finally:
        for share in shares:
            await share.aclose()
        for s in stores:
            await s.aclose()
    assert peak <= 8
    if workers * 2 <= 8:
        assert refused == 0  # demand within the limit: every call got a permit
    assert calls <= 0.05 * (taken + refused), (calls, taken, refused)


async def test_status_shows_the_permits_in_use_under_shares(redis_url: str) -> None:
    from resilience import status

    prefix = unique_prefix("quota")
    store = RedisStore.from_url(redis_url, prefix=prefix)
    share = FleetShare(store, "uploads", limit=5, ttl=10)
    try:
        assert await share.take()
        assert await share.take()
        await share._ask(2)  # a renewal: reports the permits held
        seen = {(s.name, s.kind): s for s in await status(store)}
        assert seen[("uploads", "bulkhead")].in_flight == 2
        assert seen[("uploads", "bulkhead")].limit == 5
    finally:
        await share.aclose()
        await store.aclose()


async def test_a_forked_child_holds_nothing_of_its_parents_share() -> None:
    """A child forked while its parent holds a share starts with none: what it takes it
    asks the fleet for, and the parent's share is not the child's to spend."""

    clock = FakeClock()
    store = MemoryStore(clock=clock)
    share = FleetShare(store, "pool", limit=2, ttl=30, clock=clock)
    assert await share.take()
    assert await share.take()
    await share.give()  # the parent: one permit in use, a share of 2

    async def child() -> str:
        now, asked = share.take_now(), await share.take()
        return f"{share.share} {share.held} {int(now)} {int(asked)}"

    seen = in_forked_child(child)
    assert seen == "0 0 0 0"  # nothing inherited; the fleet (the parent's share) is full
    await share.aclose()


# --- a store that does not answer ---------------------------------------------------------------


class Hung(MemoryStore):
    """A store whose ``lease_share`` waits until released, then fails (or, ``answer``: answers)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.asked = 0
        self.release = asyncio.Event()
        self.answer = False

    async def lease_share(self, *args: Any, **kwargs: Any) -> Any:
        self.asked += 1
        await self.release.wait()
        if not self.answer:
            raise StoreUnavailableError("timed out")
        return await super().lease_share(*args, **kwargs)


async def test_calls_waiting_on_a_hung_store_fail_with_the_one_ask_under_way() -> None:
    """80 calls needing a permit while the store hangs wait on one ask together; when it
    fails they all fail with it (the store cannot answer), none asks again."""
    clock = FakeClock()
    store = Hung(clock)
    share = pool(store, 100)
    calls = [asyncio.ensure_future(share.take()) for _ in range(80)]
    await settle()
    store.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailableError) for r in results), results
    assert store.asked == 1


class Broken(MemoryStore):
    """A store of another make whose permit primitives fail with errors of their own, not
    ``StoreUnavailableError``."""

    async def lease_share(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        raise ConnectionError("reset by peer")

    async def acquire_lease(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        raise ConnectionError("reset by peer")


@pytest.mark.parametrize("kind", ["leases", "share"])
async def test_any_failure_of_the_store_is_store_unavailable(kind: str) -> None:
    """Whatever error the store raises, every call taking a permit at that moment gets
    ``StoreUnavailableError`` (which a bulkhead answers by running the call under its local
    limit), none a raw error or a false "the fleet is full"."""
    clock = FakeClock()
    holder = source(kind, Broken(clock=clock), clock, 10)
    results = await asyncio.gather(*[holder.take() for _ in range(5)], return_exceptions=True)
    assert all(isinstance(r, StoreUnavailableError) for r in results), results


async def test_a_bulkhead_runs_calls_when_the_store_fails_its_own_way() -> None:
    """A fleet-wide bulkhead over a store that fails with errors of its own runs the calls
    under its local limit: the store's failure is no failure of the call."""
    clock = FakeClock()
    bulkhead = Bulkhead(4, distributed=True, store=Broken(clock=clock), name="pool")

    async def work() -> str:
        await asyncio.sleep(0)
        return "done"

    assert await asyncio.gather(*[bulkhead.call(work) for _ in range(4)]) == ["done"] * 4


async def test_calls_that_came_during_an_ask_share_one_more() -> None:
    """Calls that came while an ask was under way (not counted in it) make one more ask
    together, and each waits for at most those two."""
    clock = FakeClock()
    store = Hung(clock)
    store.answer = True
    share = pool(store, 100)
    first = await started(share.take())
    late = [asyncio.ensure_future(share.take()) for _ in range(5)]
    await settle()
    assert store.asked == 1
    store.release.set()
    assert await first
    assert all(await asyncio.gather(*late))
    assert store.asked == 2
    assert share.held == 6
    await share.aclose()


# --- Redis loses the shares -------------------------------------------------------------------


async def renewed(*shares: FleetShare) -> None:
    """Wait until the renewals the fake clock set off have their answers (Redis round trips)."""
    await until(lambda: all(s._task is None or s._task.done() for s in shares), 10, "the renewals")


async def restarted_empty(server: RedisServer, share: FleetShare) -> None:
    """Kill ``server`` and start it again on the same port, empty (no persistence); then wait
    (real time: the store reconnects) until ``share`` has its first answer: a permit or none."""
    server.kill()
    server.start()

    async def answered() -> bool:
        try:
            await share.take()
        except StoreUnavailableError:
            return False
        return True

    await until(answered, 10, "the store answering again", every=0.05)


async def test_the_limit_holds_when_redis_restarts_empty(redis_server: RedisServer) -> None:
    """Two replicas hold 5 permits each of a fleet limit of 10; Redis is killed and started
    again empty on the same port, so the store no longer knows their shares, which are still
    valid on each replica. More calls on one replica get no permit until the other has had
    time to report again: the permits in use never exceed 10."""
    clock = FakeClock()
    prefix = unique_prefix("quota")
    stores = [RedisStore.from_url(redis_server.url, prefix=prefix, clock=clock) for _ in range(2)]
    a, b = (FleetShare(s, "pool", limit=10, ttl=30, clock=clock) for s in stores)
    try:
        for share in (a, b):
            assert await granted(share, 5) == 5
        await restarted_empty(redis_server, a)
        for _ in range(5):
            await a.take()
        assert a.held + b.held <= 10, (a.held, b.held)
        for _ in range(4):  # renewals: b reports its permits again (within renew_every)
            clock.advance(1.0)
            await renewed(a, b)
        assert a.held + b.held <= 10, (a.held, b.held)
        await give_back(b, 5)
        for _ in range(5):  # b gives its share back; the store settles (8 s after the loss)
            clock.advance(1.0)
            await renewed(a, b)
        assert await granted(a, 5) == 5  # what b gave back is a's to take
        assert a.held + b.held <= 10, (a.held, b.held)
    finally:
        for share in (a, b):
            await share.aclose()
        for s in stores:
            await s.aclose()


async def test_the_limit_holds_when_one_that_held_nothing_asks_first_after_a_restart(
    redis_server: RedisServer,
) -> None:
    """Two replicas hold the whole limit (5 + 5 of 10); a third, which asked a moment ago
    and holds nothing, is the first to ask once Redis is back, empty: it gets no permit until
    the others have had time to report again (it used to get the whole limit: 20 in use)."""
    clock = FakeClock()
    prefix = unique_prefix("quota")
    stores = [RedisStore.from_url(redis_server.url, prefix=prefix, clock=clock) for _ in range(3)]
    a, b, c = (FleetShare(s, "pool", limit=10, ttl=30, clock=clock) for s in stores)
    try:
        for share in (a, b):
            assert await granted(share, 5) == 5
        assert not await c.take()  # the fleet is full: c has an answer, and no permit
        clock.advance(0.5)  # past the moment c was told the fleet was full, before a renewal
        await restarted_empty(redis_server, c)
        for _ in range(9):
            await c.take()
        assert a.held + b.held + c.held <= 10, (a.held, b.held, c.held)
    finally:
        for share in (a, b, c):
            await share.aclose()
        for s in stores:
            await s.aclose()


async def test_a_stray_share_entry_is_deleted_and_reported(redis_url: str) -> None:
    """An entry written by someone else, expiring 115 days ahead with a share of a billion,
    is garbage: deleted and reported (``StoreDataReset``), and the fleet's permits are
    free again once the holders have had time to report (``settle``), not in 115 days."""
    from resilience.events import Event, StoreDataReset

    clock = FakeClock()
    events: list[Event] = []
    prefix = unique_prefix("quota")
    store = RedisStore.from_url(redis_url, prefix=prefix, clock=clock, listeners=[events.append])
    raw = aioredis.Redis.from_url(redis_url)
    far = int(clock.monotonic() * 1000) + 10_000_000_000
    await raw.hset(f"{prefix}:{{pool}}:shares", "stray", f"1000000000 0 {far} 0")
    share = FleetShare(store, "pool", limit=20, ttl=30, clock=clock)
    try:
        assert not await share.take()
        assert [e.key for e in events if isinstance(e, StoreDataReset)] == [
            f"{prefix}:{{pool}}:shares"
        ]
        assert await raw.hget(f"{prefix}:{{pool}}:shares", "stray") is None
        clock.advance(share.settle + 0.5)  # the holders have reported: settled
        assert await granted(share, 20) == 20
    finally:
        await share.aclose()
        await store.aclose()
        await raw.aclose()


async def test_a_store_clock_stepped_back_does_not_keep_a_dead_holders_share(
    redis_url: str,
) -> None:
    """A holder takes the whole limit and dies; the store's clock steps back an hour (Redis
    TIME after a failover). Two minutes later the next replica gets every permit: the dead
    holder's entry, now an hour and a lease ahead, is garbage."""

    class Stepping(FakeClock):
        def step_back(self, seconds: float) -> None:
            self._now -= seconds

    clock = Stepping(start=100_000.0)
    prefix = unique_prefix("quota")
    stores = [RedisStore.from_url(redis_url, prefix=prefix, clock=clock) for _ in range(2)]
    dead, other = (FleetShare(s, "pool", limit=8, ttl=30, clock=clock) for s in stores)
    try:
        assert await granted(dead, 8) == 8
        assert dead._timer is not None
        dead._timer.cancel()  # it dies: no renewal, no goodbye
        clock.step_back(3600.0)
        clock.advance(120.0)
        await other.take()  # finds the garbage: the holders report again first
        clock.advance(other.settle + 0.5)  # the holders have reported: settled
        assert other.held + await granted(other, 8) == 8
    finally:
        await other.aclose()
        for s in stores:
            await s.aclose()


async def test_closing_gives_the_share_back_but_not_the_permits_in_use() -> None:
    """aclose() gives the unused share back at once; permits still in use on the closing
    holder go on counting, so the limit holds while those calls finish."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    closing, other = pool(store, 10), pool(store, 10)
    assert await granted(closing, 10) == 10
    await give_back(closing, 7)
    await closing.aclose()
    assert await granted(other, 10) == 7
    await other.aclose()


class LosesReplies(MemoryStore):
    """A store that applies a share call and then loses its reply (a time-out after Redis
    did the work), while ``losing`` is set."""

    losing = False

    async def lease_share(self, key: str, holder: str, **options: Any) -> tuple[int, int, int]:
        reply = await super().lease_share(key, holder, **options)
        if self.losing:
            raise StoreUnavailableError("the reply was lost")
        return reply


async def test_a_shrink_whose_reply_is_lost_counts_here_at_once() -> None:
    """A renewal that shrinks the share (the permits went unused) and loses its reply, the
    store having applied it: the holder takes no permit from its old share, which the fleet
    may have given to another holder meanwhile (together they would exceed the limit)."""
    clock = FakeClock()
    store = LosesReplies(clock=clock)
    a, b = pool(store, 4), pool(store, 4)
    assert await granted(a, 4) == 4
    await give_back(a, 4)
    await advance(clock, 1.0)  # renewal: a keeps its peak of the last period (4)
    store.losing = True
    await advance(clock, 1.0)  # the next one gives the share back; its reply is lost
    store.losing = False
    assert await granted(b, 4) == 4  # the store gave the permits to b
    assert not a.take_now()  # a does not use the share it gave back
    await a.aclose()
    await b.aclose()
