"""The fleet's shares when Redis goes back in time: restarted empty, or from an old snapshot
(an RDB written for a replica's sync, a failover to a replica behind). The share script counts
its writes under each key, and each replica sends the count it last saw: a store whose count
is below it has lost writes, and settles before any share grows."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from resilience.events import Event, StoreDataReset
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

_prefixes = itertools.count()
ASK = {"limit": 4, "ttl": 30.0, "settle": 2.0}


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_store_back_from_an_old_snapshot_settles(
    redis_url: str, raw: aioredis.Redis
) -> None:
    """Three replicas hold 1 + 1 + 2 of 4; Redis comes back from a snapshot taken when only
    the first two held shares (1 + 2 of the permits since moved). The first to ask after it,
    having renewed since the snapshot, asks to grow and gets nothing more than it had: the
    third replica's share, missing from the snapshot, is still in use (before, it got the
    permits: 5 in use of 4)."""
    clock = FakeClock()
    prefix = f"shares{next(_prefixes)}"
    a, b, c = (RedisStore.from_url(redis_url, prefix=prefix, clock=clock) for _ in range(3))
    try:
        key = a.key("pool", "shares")
        assert (await a.lease_share("pool", "a", want=1, held=1, **ASK))[0] == 1
        assert (await b.lease_share("pool", "b", want=2, held=1, **ASK))[0] == 2
        snapshot = await raw.dump(key)
        assert (await b.lease_share("pool", "b", want=1, held=1, had=2, **ASK))[0] == 1
        assert (await c.lease_share("pool", "c", want=2, held=2, **ASK))[0] == 2
        assert (await a.lease_share("pool", "a", want=1, held=1, had=1, **ASK))[0] == 1
        assert snapshot is not None
        await raw.restore(key, 0, snapshot, replace=True)  # back in time
        granted, _, _ = await a.lease_share("pool", "a", want=2, held=1, had=1, **ASK)
        assert granted == 1
        # while it settles, the others report again (their renewals): each keeps its own
        assert (await b.lease_share("pool", "b", want=1, held=1, had=1, **ASK))[0] == 1
        assert (await c.lease_share("pool", "c", want=2, held=2, had=2, **ASK))[0] == 2
        clock.advance(2.5)  # settled
        granted, in_use, _ = await a.lease_share("pool", "a", want=2, held=1, had=1, **ASK)
        assert (granted, in_use) == (1, 4)
    finally:
        for store in (a, b, c):
            await store.aclose()


async def test_a_store_that_went_back_settles_once(redis_url: str, raw: aioredis.Redis) -> None:
    """After a loss the count goes on from the highest a replica saw, as reported by the
    first to ask: a replica that saw less, asking after the settling, finds the store caught
    up and grows at once (it is not taken for a second loss, with a second settling)."""
    clock = FakeClock()
    prefix = f"shares{next(_prefixes)}"
    a, b = (RedisStore.from_url(redis_url, prefix=prefix, clock=clock) for _ in range(2))
    try:
        for _ in range(10):
            await b.lease_share("pool", "b", want=0, held=0, **ASK)
        for _ in range(20):
            await a.lease_share("pool", "a", want=1, held=1, **ASK)
        await raw.delete(a.key("pool", "shares"))  # restarted empty
        assert (await a.lease_share("pool", "a", want=3, held=1, had=1, **ASK))[0] == 1
        clock.advance(2.5)  # settled
        assert (await b.lease_share("pool", "b", want=2, held=0, **ASK))[0] == 2
    finally:
        for store in (a, b):
            await store.aclose()


async def test_a_key_of_another_type_under_the_shares_is_reset_and_reported(
    redis_url: str, raw: aioredis.Redis
) -> None:
    """A string under the shares key (data the script never writes) is deleted and reported
    as a StoreDataReset, not answered with an error; the shares then settle as after a loss:
    no share grows past what its holder had until the settling time has passed."""
    clock = FakeClock()
    store = RedisStore.from_url(redis_url, prefix=f"shares{next(_prefixes)}", clock=clock)
    events: list[Event] = []
    store.add_listener(events.append)
    try:
        key = store.key("pool", "shares")
        await raw.set(key, "not a hash")
        assert (await store.lease_share("pool", "a", want=2, held=0, **ASK))[0] == 0
        assert events == [StoreDataReset(name="pool", key=key)]
        assert await raw.type(key) == b"hash"
        clock.advance(2.5)  # settled
        assert (await store.lease_share("pool", "a", want=2, held=0, **ASK))[0] == 2
    finally:
        await store.aclose()
