"""One replica of the load test, as its own OS process.

Usage: python tests/load_worker.py URL PREFIX TASKS SECONDS START_AT. Runs TASKS asyncio
tasks through RateLimiter -> Bulkhead(distributed) -> CircuitBreaker -> upstream, all shared
through Redis, from wall time START_AT to START_AT + SECONDS (the same window in every process:
one that starts late stops on time, so the fleet's load never spans more than SECONDS); the
upstream fails in every odd half
second (the same schedule in every process). Every admitted call is counted in Redis by the
server itself; prints one JSON line of local counts at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter

import redis.asyncio as aioredis

from resilience import Bulkhead, CircuitBreaker, CircuitState, CountWindow, RateLimiter
from resilience.errors import BulkheadFullError, CircuitOpenError, RateLimitedError
from resilience.store.redis import RedisStore

RATE, BURST, LIMIT, PROBES, FLIP = 300.0, 30, 5, 2, 0.5

# KEYS: 1 counter, 2 its maximum; ARGV: 1 delta. The counter after the change.
TRACK = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], v) end
return v
"""
# KEYS: 1 per-second hash of admissions (by the server's clock)
ADMIT = """
local t = redis.call('TIME')
return redis.call('HINCRBY', KEYS[1], t[1], 1)
"""


def policies(store: RedisStore) -> tuple[RateLimiter, Bulkhead, CircuitBreaker]:
    """The fleet's three shared policies; every process builds them alike."""
    return (
        RateLimiter(RATE, burst=BURST, store=store, name="load-rl"),
        Bulkhead(LIMIT, distributed=True, store=store, name="load-bh", lease=30),
        CircuitBreaker(
            "load-cb",
            store=store,
            window=CountWindow(20),
            minimum_calls=10,
            failure_ratio=0.5,
            open_for=0.2,
            open_for_max=0.4,
            half_open_calls=PROBES,
            probe_lease=10,
        ),
    )


async def main(url: str, prefix: str, tasks: int, seconds: float, start_at: float) -> None:
    counter = aioredis.Redis.from_url(url)
    track = counter.register_script(TRACK)
    admit = counter.register_script(ADMIT)
    k = f"{prefix}:check"
    counts: Counter[str] = Counter()
    async with RedisStore.from_url(url, prefix=prefix, timeout=1.0) as store:
        limiter, bulkhead, breaker = policies(store)

        async def upstream() -> str:
            probe = breaker.state is CircuitState.HALF_OPEN  # only probes run in HALF_OPEN
            if probe:
                await track(keys=[f"{k}:probes", f"{k}:probes-max"], args=[1])
            try:
                await asyncio.sleep(random.uniform(0.01, 0.03))
                if int(time.time() / FLIP) % 2:
                    raise ValueError("upstream failing")
                return "ok"
            finally:
                if probe:
                    counts["probes"] += 1
                    await track(keys=[f"{k}:probes", f"{k}:probes-max"], args=[-1])

        async def in_bulkhead() -> str:
            await track(keys=[f"{k}:inflight", f"{k}:inflight-max"], args=[1])
            try:
                return await breaker.call(upstream)
            finally:
                await track(keys=[f"{k}:inflight", f"{k}:inflight-max"], args=[-1])

        async def after_limit() -> str:
            await admit(keys=[f"{k}:rate"])
            return await bulkhead.call(in_bulkhead)

        await store.sync()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        # The window ends at a wall time shared by the fleet, not SECONDS after this process
        # began: a process that reached START_AT late (a slow start on a busy machine) would
        # otherwise stretch the fleet's window and the test would count admissions the rate
        # limiter rightly granted over more than SECONDS.
        end = time.monotonic() + (start_at + seconds - time.time())

        async def task() -> None:
            while time.monotonic() < end:
                try:
                    await limiter.call(after_limit)
                    counts["ok"] += 1
                except RateLimitedError:
                    counts["rate_limited"] += 1
                except BulkheadFullError:
                    counts["bulkhead_full"] += 1
                except CircuitOpenError:
                    counts["circuit_open"] += 1
                except ValueError:
                    counts["failed"] += 1
                except Exception as exc:  # the test fails on any of these
                    counts["error:" + type(exc).__name__] += 1
                await asyncio.sleep(random.uniform(0.005, 0.02))

        await asyncio.gather(*(task() for _ in range(tasks)))
        counts["degraded"] = int(store.degraded)
    await counter.aclose()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    url, prefix, tasks, seconds, start_at = sys.argv[1:6]
    asyncio.run(main(url, prefix, int(tasks), float(seconds), float(start_at)))
