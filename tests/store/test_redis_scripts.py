"""The scripts' own rules, against a real redis-server: the shared count window keeps the
newest calls (a model, hypothesis), and numbers no script writes (nan, inf, 1e300) are reset
and reported, never a limit for ever.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    StoreDataReset,
)
from resilience.events import Event
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import boom, ok, unique_prefix


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 60),
    chunks=st.lists(
        st.integers(1, 25).flatmap(lambda c: st.tuples(st.just(c), st.integers(0, c))),
        min_size=1,
        max_size=12,
    ),
)
async def test_the_count_window_keeps_the_newest_calls(
    redis_url: str, size: int, chunks: list[tuple[int, int]]
) -> None:
    """Running totals match a model that keeps the newest ``size`` calls of the flushed
    chunks (the oldest chunk cut pro rata), whatever the chunks."""
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(client, prefix=unique_prefix(), clock=FakeClock())
    try:
        engine = store.engine
        flush = store._scripts["flush"]
        keys = [store.key("w", s) for s in ("state", "win", "probes", "replicas")]
        model: list[list[int]] = []
        for seq, (calls, failures) in enumerate(chunks, 1):
            reply = await flush(
                keys=keys,
                args=[0, calls, failures, 0, "c", size, 0, engine.now_arg(), 60_000, "r", seq],
            )
            fields = dict(zip(reply[::2], reply[1::2], strict=True))
            model.append([calls, failures])
            total = sum(c for c, _ in model)
            while total > size:
                c, f = model[0]
                if total - c >= size:
                    model.pop(0)
                    total -= c
                else:
                    room = c - (total - size)
                    model[0] = [room, math.floor(f * room / c + 0.5)]
                    total = size
            assert int(fields[b"calls"]) == sum(c for c, _ in model)
            assert int(fields[b"failures"]) == sum(f for _, f in model)
            assert int(fields[b"calls"]) <= size
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gen", "nan"),
        ("gen", "inf"),
        ("gen", "1e300"),
        ("open_until", "inf"),
        ("open_until", "1e300"),
        ("reopens", "nan"),
        ("tc", "inf"),
        ("tf", "-1"),
    ],
)
async def test_numbers_out_of_range_are_reset_and_reported(
    stores: Callable[..., RedisStore],
    raw: aioredis.Redis,
    clock: FakeClock,
    field: str,
    value: str,
) -> None:
    """nan, inf and 1e300 are not numbers we wrote: reset, reported, and the breaker works."""
    events: list[Event] = []
    store = stores(listeners=[events.append], clock=clock)
    options: dict[str, Any] = {"window": CountWindow(4), "minimum_calls": 4, "open_for": 0.2}
    b = CircuitBreaker("dep", store=store, **options)
    await b.call(ok)
    await store.sync()
    await raw.hset(store.key("dep", "state"), field, value)
    await store.sync()
    assert any(isinstance(e, StoreDataReset) for e in events), field
    for _ in range(4):
        with pytest.raises((ValueError, CircuitOpenError)):
            await b.call(boom)
    await store.sync()
    assert b.state is CircuitState.OPEN
    clock.advance(0.3)  # open_for: the breaker probes again (no deadline at infinity)
    assert await b.call(ok) == "ok"
    await store.sync()
    assert b.state is CircuitState.CLOSED


@pytest.mark.parametrize("value", ["nan", "inf", "1e300"])
async def test_shared_primitives_reset_numbers_out_of_range(
    stores: Callable[..., RedisStore], raw: aioredis.Redis, value: str
) -> None:
    """A rate bucket, a budget or a lease at infinity is reset, never a limit forever."""
    events: list[Event] = []
    store = stores(listeners=[events.append])
    await raw.set(store.key("api", "gcra"), value)
    await raw.set(store.key("bud", "budget"), value)
    assert await store.rate_take("api", interval=1.0, burst=1) == 0.0
    assert await store.budget_add("bud", delta=0, maximum=3, ttl=10) == 3
    if value != "nan":  # a zset score cannot be NaN
        await raw.zadd(store.key("pool", "leases"), {"ghost": float(value)})
        assert await store.acquire_lease("pool", limit=1, ttl=5) is not None
    assert sum(isinstance(e, StoreDataReset) for e in events) == 2
