"""Soak: many calls through every policy, shared through one RedisStore; memory, Redis keys,
tasks and connections stay flat after warm-up."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
import tracemalloc
from typing import Any

import pytest
import redis.asyncio as aioredis

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CountWindow,
    Fallback,
    Pipeline,
    RateLimiter,
    Retry,
    RetryBudget,
    Timeout,
)
from resilience.store.redis import RedisStore

from ..helpers import until
from ..redis_server import RedisServer

WORKERS = 20
MEMORY_SLACK = 256 * 1024  # bytes the traced stretch may add (caches, allocator noise)


async def key_counts(client: aioredis.Redis) -> tuple[int, int]:
    """The keys that must stay flat, and the fallback's cached values apart (one per argument
    that ever succeeded: at most 989). The rate limiter's bucket is in neither: it expires
    about a second after it is full again and comes back with the next call (on a slow
    machine it may be gone when the first count is taken)."""
    keys = [key async for key in client.scan_iter(count=1000)]
    cached = sum(b":cache:" in key for key in keys)
    return sum(not key.endswith(b":gcra") for key in keys) - cached, cached


async def client_count(client: aioredis.Redis) -> int:
    """Connections the server has open now, minus our own observer's."""
    return len(await client.client_list()) - 1


@pytest.mark.slow
async def test_every_policy_soaks_flat(redis_server: RedisServer, full: bool) -> None:
    """N calls through Fallback -> Retry(budget) -> CircuitBreaker -> RateLimiter -> Timeout
    -> Bulkhead(distributed), all on a RedisStore: memory, DBSIZE, tasks and connections flat."""
    total, traced = (1_000_000, 100_000) if full else (20_000, 3_000)
    warmup = total // 10
    observer = aioredis.Redis.from_url(redis_server.url)
    async with RedisStore.from_url(redis_server.url, prefix="soak") as store:
        pipeline = Pipeline(
            Fallback(on=ValueError, cache=store, name="soak-fb"),
            Retry(
                on=ValueError,
                attempts=2,
                wait=lambda _: 0,
                budget=RetryBudget(name="soak-budget", store=store),
            ),
            CircuitBreaker(
                "soak-cb", store=store, window=CountWindow(100), minimum_calls=50, open_for=0.05
            ),
            RateLimiter(1_000_000, store=store, name="soak-rl"),
            Timeout(5.0),
            Bulkhead(WORKERS, distributed=True, store=store, name="soak-bh"),
        )
        counter = itertools.count()

        @pipeline
        async def upstream(i: int) -> int:
            if i % 97 == 0:  # 11 of the 1000 args always fail: retries, budget, no cached value
                raise ValueError("flaky")
            return 1

        outcomes: dict[str, int] = {"ok": 0, "error": 0}

        async def worker(n: int) -> None:
            for _ in range(n):
                try:
                    await upstream(next(counter) % 1000)
                    outcomes["ok"] += 1
                except Exception:  # an open breaker with nothing cached, a full bulkhead...
                    outcomes["error"] += 1

        async def run(n: int) -> None:
            await asyncio.gather(*(worker(n // WORKERS) for _ in range(WORKERS)))

        def strays() -> set[asyncio.Task[Any]]:
            """Tasks still running besides this test and the store's flusher and subscriber
            (a permit being given back, a renewal): a leak if one never ends."""
            return asyncio.all_tasks() - {asyncio.current_task(), *store.engine._tasks}

        started = time.monotonic()
        await run(warmup)
        await store.sync()
        await until(lambda: not strays(), 10, "the calls' own tasks to end")
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        keys_before, _ = await key_counts(observer)
        clients_before = await client_count(observer)
        await run(total - warmup - traced)
        # memory: traced over the last stretch only (tracemalloc slows every call down ~4x)
        await store.sync()
        gc.collect()
        tracemalloc.start()
        try:
            mem_before = tracemalloc.take_snapshot()
            await run(traced)
            await store.sync()
            await until(lambda: not strays(), 10, "the calls' own tasks to end")
            gc.collect()
            mem_after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        elapsed = time.monotonic() - started
        growth = sum(s.size_diff for s in mem_after.compare_to(mem_before, "filename"))
        top = mem_after.compare_to(mem_before, "lineno")[:3]
        tasks_after = len(asyncio.all_tasks())
        keys_after, cached = await key_counts(observer)
        clients_after = await client_count(observer)
        leases = await store.count_leases("soak-bh")
    await observer.aclose()

    assert outcomes["ok"] + outcomes["error"] == total
    assert outcomes["ok"] > total * 0.9
    assert growth < MEMORY_SLACK, [str(s) for s in top]
    assert keys_after <= keys_before
    assert cached <= 1000 - len(range(0, 1000, 97))  # a value per argument that succeeds
    assert tasks_after == tasks_before
    # the pool grows to the peak concurrency (a command per worker, a permit being returned
    # per worker, the flusher, the subscriber) and no further
    assert clients_after <= max(clients_before, 2 * WORKERS + 2)
    assert leases == 0
    print(
        f"{total} calls in {elapsed:.1f}s ({total / elapsed:.0f}/s), {outcomes}; memory "
        f"+{growth / 1024:.1f} KiB over the last {traced} calls; keys {keys_before} -> "
        f"{keys_after}; tasks {tasks_before} -> {tasks_after}; connections "
        f"{clients_before} -> {clients_after}"
    )
