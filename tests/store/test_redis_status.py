"""The fleet's status through a RedisStore: every registered name read in a few script calls,
damaged entries shown alone, the registry of names kept and rebuilt; status replies read by
the column names in their header (real redis-servers, and replies built by hand).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from resilience import (
    CircuitBreaker,
    CircuitState,
    StoreDataReset,
)
from resilience.events import Event
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import ok
from .support import command_calls, evalsha_calls


async def test_status_reads_many_names_in_few_round_trips(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """status() of 1,200 names: a script call per registry, one per chunk of names, every
    name listed."""
    store = stores()
    for i in range(1200):
        CircuitBreaker(f"s{i:04}", store=store)
    await store.sync()
    before = await evalsha_calls(raw)
    listed = await store.status()
    assert len(listed) == 1200
    from resilience.store.redis.status import CHUNK

    assert await evalsha_calls(raw) - before == 2 + math.ceil(1200 / CHUNK)
    assert [s.name for s in await store.status(limit=10)] == [f"s{i:04}" for i in range(10)]


async def test_one_damaged_entry_does_not_hide_the_others(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """A budget key holding text: that entry is reported damaged; the rest are shown."""
    store = stores()
    CircuitBreaker("good", store=store)
    await store.sync()
    await raw.set(store.key("bad", "budget"), "n/a")
    await raw.sadd(f"{store.prefix}:names", "bad")
    await raw.sadd(f"{store.prefix}:names:other", "bad")  # as a replica registers a budget
    listed = {(s.name, s.kind): s for s in await store.status()}
    assert ("good", "circuit_breaker") in listed
    damaged = listed[("bad", "damaged")]
    assert damaged.damaged
    assert damaged.to_dict()["damaged"]


async def test_a_registry_member_that_is_not_utf8_is_skipped(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """A member no replica wrote (bytes that are not UTF-8) in the names registry: status()
    and known_names() list the real names, never a UnicodeDecodeError."""
    store = stores()
    CircuitBreaker("good", store=store)
    await store.sync()
    await raw.sadd(f"{store.prefix}:names", b"\xff\xfebad")
    await raw.sadd(f"{store.prefix}:names:other", b"\xff\xfe")
    assert [(s.name, s.kind) for s in await store.status()] == [("good", "circuit_breaker")]
    assert await store.known_names() == ["good"]


async def test_status_looks_for_bulkheads_only_under_names_that_have_them(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """A name registered only as a breaker costs status no lookup of lease, limiter or budget
    keys; one that any replica registered as a fleet-wide bulkhead is shown as one."""
    store = stores()
    for i in range(300):
        CircuitBreaker(f"b{i}", store=store)
    await store.sync()
    before = await command_calls(raw, "exists")
    assert len(await store.status()) == 300
    assert await command_calls(raw, "exists") == before
    other = stores(prefix=store.prefix)  # another replica takes a permit under one name
    await other.acquire_lease("b7", limit=2, ttl=30)
    await other.sync()
    before = await command_calls(raw, "exists")
    listed = {(s.name, s.kind): s for s in await store.status()}
    assert listed[("b7", "bulkhead")].in_flight == 1
    assert listed[("b7", "bulkhead")].limit == 2
    assert ("b7", "circuit_breaker") in listed
    assert 1 <= await command_calls(raw, "exists") - before <= 2  # b7's lookups only


async def test_the_registry_is_rebuilt_after_redis_loses_it(
    stores: Callable[..., RedisStore], raw: aioredis.Redis, clock: FakeClock
) -> None:
    """Names in use are registered again (every 10 s of use), with the registry's TTL."""
    store = stores(clock=clock)
    b = CircuitBreaker("dep", store=store)
    await b.call(ok)
    await store.sync()
    assert "dep" in await store.known_names()
    await raw.delete(f"{store.prefix}:names")  # Redis restarted empty, or the TTL ran out
    clock.advance(11.0)
    await b.call(ok)
    await store.sync()
    assert "dep" in await store.known_names()
    assert await raw.pttl(f"{store.prefix}:names") > 0


async def test_the_registry_outlives_a_short_ttl(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """With ttl=0.6 s a name in use is registered again within a third of it, renewing the
    registry's lifetime: after 2 s of use another replica's status() still lists it."""
    store = stores(ttl=0.6)
    other = stores(prefix=store.prefix)
    b = CircuitBreaker("dep", store=store)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        await b.call(ok)
        await asyncio.sleep(0.02)
    assert await other.known_names() == ["dep"]
    assert [s.name for s in await other.status()] == ["dep"]
    assert 0 < await raw.pttl(f"{store.prefix}:names") <= 600


async def test_a_registry_that_is_not_a_set_is_reset_alone(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """Something else under a registry key: reset and reported when names are added or
    read; the store never turns degraded, and the names in use are listed again."""
    events: list[Event] = []
    store = stores(listeners=[events.append])
    await raw.set(f"{store.prefix}:names", "not a set")
    b = CircuitBreaker("dep", store=store)
    await b.call(ok)
    await store.sync()
    assert await store.known_names() == ["dep"]
    await raw.set(f"{store.prefix}:names:other", "not a set")
    assert [s.name for s in await store.status()] == ["dep"]
    assert not store.degraded
    assert [type(e) for e in events] == [StoreDataReset, StoreDataReset], events


def test_a_status_reply_is_read_by_its_header_not_by_position() -> None:
    """The columns are found by name: a reply whose header lists them in another order (or
    with one more) reads the same; one without a column marks every name damaged."""
    from resilience.store.redis.status import COLUMNS, parse_status

    values = {"s": "open", "g": "3", "u": "5000", "c": "10", "f": "6", "l": "0", "p": "0"}
    values |= {"o": "10,6,0", "n": "2", "m": "4", "a": "6", "q": "", "t": "7.5", "w": "12,3"}
    values["h"] = ""
    report = "r1|900 10 6 0 4 2 0,3"

    def reply(header: list[str]) -> list[Any]:
        entry = "\t".join([*(values.get(c, "x") for c in header), report])
        return [1000, "\t".join(header).encode(), entry.encode()]

    first = parse_status(["throttle:dep"], reply(list(COLUMNS)))
    shuffled = parse_status(["throttle:dep"], reply(["extra", *reversed(COLUMNS)]))
    assert first == shuffled
    breaker, bulkhead, budget, window = first
    assert (breaker.state, breaker.generation, breaker.calls, breaker.failures) == (
        CircuitState.OPEN,
        3,
        10,
        6,
    )
    assert breaker.retry_after == pytest.approx(4.0)
    assert breaker.opened_by == (10, 6, 0)
    (replica,) = breaker.replicas
    assert (replica.replica, replica.last_seen, replica.rejected) == ("r1", 0.1, 2)
    assert replica.latency == (0, 3, *(0,) * 13) == breaker.latency
    assert (bulkhead.kind, bulkhead.in_flight, bulkhead.limit) == ("bulkhead", 2, 4)
    assert bulkhead.adaptive_limit == 6
    assert (budget.kind, budget.tokens) == ("retry_budget", 7.5)
    assert (window.name, window.kind, window.window) == ("dep", "throttle", (12, 3))
    broken = parse_status(["a", "b"], reply([c for c in COLUMNS if c != "g"]))
    assert [(s.name, s.kind) for s in broken] == [("a", "damaged"), ("b", "damaged")]
    assert "g" in (broken[0].damaged or "")


def test_a_short_or_missing_entry_is_damaged_alone() -> None:
    from resilience.store.redis.status import COLUMNS, parse_status

    good = "closed\t0\t0\t1\t0\t0\t0\t0,0,0" + "\t" * (len(COLUMNS) - 8)
    header = "\t".join(COLUMNS)
    listed = parse_status(["a", "b", "c", "d"], [5, header, good, "closed\t0", good])
    assert [(s.name, s.kind) for s in listed] == [
        ("a", "circuit_breaker"),
        ("b", "damaged"),
        ("c", "circuit_breaker"),
        ("d", "damaged"),  # the reply ended early
    ]


@given(st.lists(st.integers(0, 2**52), min_size=15, max_size=15))
def test_a_histogram_reads_back_as_it_was_sent(counts: list[int]) -> None:
    """Trailing zeros are left out of a replica's report; reading it gives every bucket back.
    The old form (all 15 counts) reads the same; none ("") or too many buckets read as ()."""
    from resilience.store.redis.primitives import histogram_arg, parse_histogram

    sent = histogram_arg(counts)
    assert parse_histogram(sent) == tuple(counts)
    assert parse_histogram(",".join(map(str, counts))) == tuple(counts)
    assert len(sent) <= len(",".join(map(str, counts)))
    assert parse_histogram("") == ()
    assert parse_histogram(",".join(map(str, [*counts, 1]))) == ()


@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(["", "0", "1", "0,3", "2,0,1", "5"]), st.integers(0, 9)),
            max_size=3,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_replica_reports_read_and_sum_alike_whatever_repeats(
    names: list[list[tuple[str, int]]],
) -> None:
    """Names with none to three replica reports, their histograms often alike (parsed once
    per reply): each replica reads back as sent, sorted by id, and each breaker's latency
    and refused calls are the replicas' sums."""
    from resilience.store.redis.primitives import parse_histogram
    from resilience.store.redis.status import COLUMNS, parse_status

    breaker_columns = ["closed", "0", "0", "1", "0", "0", "0", "0,0,0"]
    columns = "\t".join(breaker_columns + [""] * (len(COLUMNS) - len(breaker_columns)))
    entries = []
    for reports in names:
        parts = [
            f"r{9 - i}|900 1 0 0 4 {refused}" + (f" {histogram}" if histogram else "")
            for i, (histogram, refused) in enumerate(reports)
        ]
        entries.append("\t".join([columns, *parts]).encode())
    listed = parse_status(
        [f"n{i}" for i in range(len(names))], [1000, "\t".join(COLUMNS).encode(), *entries]
    )
    for breaker, reports in zip(listed, names, strict=True):
        expected = sorted(
            (f"r{9 - i}", parse_histogram(h) if h else (), refused)
            for i, (h, refused) in enumerate(reports)
        )
        assert [(r.replica, r.latency, r.rejected) for r in breaker.replicas] == expected
        histograms = [latency for _, latency, _ in expected if latency]
        assert breaker.latency == (
            tuple(map(sum, zip(*histograms, strict=True))) if histograms else ()
        )
        assert breaker.rejected == sum(refused for *_, refused in expected)
