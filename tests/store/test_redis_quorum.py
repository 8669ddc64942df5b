"""A quorum breaker (``open_when="quorum"``) shared through Redis: its replicas' votes (how
long they count, whose they are, what opens the fleet), across stores closed, replicas dead,
forked and restarted. Votes and open periods are exact: the stores run on the fake clock,
whose time they pass to the scripts (real redis-servers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    StoreDataReset,
)
from resilience.events import Event
from resilience.store.redis import RedisStore
from resilience.store.redis.breaker import VOTE_LEASE
from resilience.testing import FakeClock

from ..fork_support import in_forked_child
from ..helpers import boom, ok, unique_prefix, until
from .support import fleet_gen, quorum_breaker, trip

OPEN, CLOSED, HALF_OPEN = CircuitState.OPEN, CircuitState.CLOSED, CircuitState.HALF_OPEN


async def votes(raw: aioredis.Redis, store: RedisStore, name: str = "dep") -> list[str]:
    fields = await raw.hkeys(store.key(name, "state"))
    return sorted(f.decode() for f in fields if f.startswith(b"v."))


async def voted(
    stores: Callable[..., RedisStore], clock: FakeClock
) -> tuple[RedisStore, RedisStore, CircuitBreaker, CircuitBreaker]:
    """Two replicas of a quorum-2 breaker: the first voted (its own window tripped), the
    second is healthy (it called once); both synced."""
    name = unique_prefix()
    voter, healthy = stores(prefix=name, clock=clock), stores(prefix=name, clock=clock)
    bv, bh = quorum_breaker(voter, 2), quorum_breaker(healthy, 2)
    await bh.call(ok)
    await healthy.sync()
    await trip(bv)
    await voter.sync()
    return voter, healthy, bv, bh


async def test_a_closed_store_withdraws_its_vote(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """A voter's store closed (a clean shutdown) takes its vote away at once: the same host
    restarted under a new replica id votes alone, and the healthy replicas stay closed."""
    sick, healthy, _, bh = await voted(stores, clock)
    assert await votes(raw, sick) == [f"v.{sick.replica}"]
    await sick.aclose()
    assert await votes(raw, sick) == []
    restarted = stores(prefix=sick.prefix, clock=clock)
    assert restarted.replica != sick.replica
    await trip(quorum_breaker(restarted, 2))
    await restarted.sync()
    await healthy.sync()
    assert bh.state is CLOSED
    assert [await bh.call(ok) for _ in range(20)] == ["ok"] * 20


async def test_a_dead_replicas_vote_lapses_within_the_vote_lease(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """A voter that dies without closing its store (a forked child that exits) stops
    renewing its vote: past the vote lease it no longer counts, though its own open period
    (30 s) is far from over, so a new replica's vote alone opens nothing."""
    name = unique_prefix()
    store = stores(prefix=name, clock=clock)
    b = quorum_breaker(store, 2)
    await b.call(ok)
    await store.sync()

    async def die_after_voting() -> str:
        await trip(b)
        await store.sync()
        return store.replica

    dead = in_forked_child(die_after_voting)
    assert await votes(raw, store) == [f"v.{dead}"]
    clock.advance(VOTE_LEASE + 0.01)
    other = stores(prefix=name, clock=clock)
    await trip(quorum_breaker(other, 2))
    await other.sync()
    await store.sync()
    assert b.state is CLOSED
    assert await votes(raw, store) == [f"v.{other.replica}"]


async def test_a_live_voter_renews_its_vote_for_its_whole_open_period(
    stores: Callable[..., RedisStore], clock: FakeClock
) -> None:
    """A voter that stays alive (but makes no call) keeps its vote past the vote lease while
    its own open period lasts: a second vote 10 s later reaches the quorum."""
    first, second, b1, b2 = await voted(stores, clock)
    for _ in range(40):
        clock.advance(0.25)  # renewals are due now and then: each runs a round
        await first.engine.next_round()
    await trip(b2)
    await second.sync()
    await until(lambda: b1.state is OPEN and b2.state is OPEN, 5.0, "the quorum")
    assert b1.metrics().generation == b2.metrics().generation


async def test_a_forked_child_does_not_inherit_its_parents_vote(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """A process whose breaker tripped forks two workers that never call the dependency:
    they start from the fleet's state (closed) and cast no vote; quorum 3 is not reached."""
    name = unique_prefix()
    store = stores(prefix=name, clock=clock)
    b = quorum_breaker(store, 3)
    await b.call(ok)
    await store.sync()
    await trip(b)
    await store.sync()

    async def worker() -> str:
        await store.sync()
        return f"{b.state.value} {store.replica}"

    children = [in_forked_child(worker).split() for _ in range(2)]
    assert [state for state, _ in children] == ["closed", "closed"]
    assert len({replica for _, replica in children} | {store.replica}) == 3
    await store.sync()
    assert await votes(raw, store) == [f"v.{store.replica}"]
    assert b.state is OPEN  # the parent's own trip: its own, still
    state = await raw.hget(store.key("dep", "state"), "state")
    assert state == b"closed"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "abc"])
async def test_garbage_votes_are_reset_and_reported(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis, value: str
) -> None:
    """Vote fields that hold no time we write count for nothing: deleted, reported with
    StoreDataReset, and one real vote does not reach quorum 2 with them."""
    events: list[Event] = []
    store = stores(clock=clock, listeners=[events.append])
    b = quorum_breaker(store, 2)
    await b.call(ok)
    await store.sync()
    key = store.key("dep", "state")
    gen = await fleet_gen(raw, store)
    await raw.hset(key, mapping={"vg": gen, "v.ghost1": value, "v.ghost2": value})
    await trip(b)
    await store.sync()
    assert await raw.hget(key, "state") == b"closed"
    assert await votes(raw, store) == [f"v.{store.replica}"]
    assert any(isinstance(e, StoreDataReset) for e in events)


async def test_a_quorum_opens_the_fleet_for_the_fleets_own_open_time(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """open_for=0.5: a replica sick for long (its own re-opens grew its open time to 8 s)
    casts the deciding vote; the fleet's first opening still lasts 0.5 s."""
    name = unique_prefix()
    long_sick, newly_sick = stores(prefix=name, clock=clock), stores(prefix=name, clock=clock)
    options: dict[str, Any] = {"open_for": 0.5, "open_for_max": 8.0}
    bl, bn = quorum_breaker(long_sick, 2, **options), quorum_breaker(newly_sick, 2, **options)
    await bn.call(ok)
    await newly_sick.sync()
    await trip(bl)
    for open_for in (0.5, 1.0, 2.0):  # its own probes fail: it re-opens for longer
        clock.advance(open_for)
        with pytest.raises(ValueError, match="boom"):
            await bl.call(boom)
        assert bl.metrics().open_for == open_for * 2
        await long_sick.sync()
    clock.advance(4.0)  # its vote has lapsed with its open period
    await trip(bn)  # a first vote ...
    await newly_sick.sync()
    with pytest.raises(ValueError, match="boom"):
        await bl.call(boom)  # ... and the long-sick replica's next re-open (8 s) decides
    assert bl.metrics().open_for == 8.0
    await long_sick.sync()
    key = long_sick.key("dep", "state")
    assert await raw.hget(key, "state") == b"open"
    open_ms = int(await raw.hget(key, "open_until")) - round(clock.monotonic() * 1000)
    assert open_ms == 500
    await until(lambda: bn.state is OPEN, 5.0, "the fleet opened")
    assert bn.metrics().open_for == 0.5


async def test_quorum_votes_open_the_fleet_at_k_and_expire(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """Three replicas, quorum 2: one replica's trip opens only its own breaker; a vote that
    outlived the replica's open period does not count towards the quorum; a second live
    vote opens everyone's; the votes are cleared once the fleet opens."""
    name = unique_prefix("q")
    replicas = [stores(prefix=name, clock=clock) for _ in range(3)]
    options: dict[str, Any] = {"window": CountWindow(4), "minimum_calls": 4, "open_for": 10}
    bs = [CircuitBreaker("dep", store=s, open_when="quorum", quorum=2, **options) for s in replicas]

    async def sync() -> None:
        for s in replicas:
            await s.sync()

    async def trip(b: CircuitBreaker) -> None:
        for _ in range(4):
            with contextlib.suppress(ValueError, CircuitOpenError):
                await b.call(boom)
        assert b.state is CircuitState.OPEN

    await sync()
    await trip(bs[0])
    await sync()
    await sync()
    assert [b.state for b in bs] == [CircuitState.OPEN, CircuitState.CLOSED, CircuitState.CLOSED]
    clock.advance(11)  # the first vote has lapsed with its open period
    await trip(bs[1])
    await sync()
    await sync()
    assert [b.state for b in bs][1:] == [CircuitState.OPEN, CircuitState.CLOSED]
    await trip(bs[2])  # two live votes: the fleet opens
    await sync()
    await until(lambda: all(b.state is CircuitState.OPEN for b in bs), what="quorum open")
    fields = await raw.hkeys(replicas[0].key("dep", "state"))
    assert not [f for f in fields if f.startswith(b"v.")]


def test_quorum_options_are_checked() -> None:
    with pytest.raises(ValueError, match="quorum=k"):
        CircuitBreaker("x", open_when="quorum")
    with pytest.raises(ValueError, match="open_when"):
        CircuitBreaker("x", open_when="majority", quorum=2)
    with pytest.raises(ValueError, match="needs open_when"):
        CircuitBreaker("x", quorum=2)
    with pytest.raises(ValueError, match="quorum"):
        CircuitBreaker("x", open_when="quorum", quorum=0)
    with pytest.raises(TypeError, match="quorum"):
        CircuitBreaker("x", open_when="quorum", quorum=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quorum"):
        CircuitBreaker("x", open_when="quorum", quorum=10**6)


async def test_a_quorum_breaker_on_a_memory_store_opens_on_its_own_window() -> None:
    """One process is one replica: its own trip opens it, whatever k."""
    b = CircuitBreaker("x", window=CountWindow(4), minimum_calls=4, open_when="quorum", quorum=3)
    for _ in range(4):
        with contextlib.suppress(ValueError):
            await b.call(boom)
    assert b.state is CircuitState.OPEN
