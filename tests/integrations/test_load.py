"""Load: several OS processes x many asyncio tasks through one shared breaker, one fleet-wide
bulkhead and one shared rate limiter; the server's own counters prove every limit held."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from resilience.store.redis import RedisStore

from ..load_worker import BURST, LIMIT, PROBES, RATE
from ..redis_server import RedisServer

COUNT_SKEW = 0.25  #: seconds between a grant and its count, at most, on a loaded machine

WORKER = str(Path(__file__).parents[1] / "load_worker.py")


async def read_counters(url: str, prefix: str) -> tuple[int, int, int, int, dict[int, int], int]:
    """The server's counters: max and final concurrency and probes, admissions per second,
    and the bulkhead's unexpired leases."""
    client = aioredis.Redis.from_url(url)
    try:
        k = f"{prefix}:check"
        inflight_max = int(await client.get(f"{k}:inflight-max") or 0)
        inflight = int(await client.get(f"{k}:inflight") or 0)
        probes_max = int(await client.get(f"{k}:probes-max") or 0)
        probes = int(await client.get(f"{k}:probes") or 0)
        per_second = {int(s): int(n) for s, n in (await client.hgetall(f"{k}:rate")).items()}
        async with RedisStore(client, prefix=prefix) as store:
            leases = await store.count_leases("load-bh")
    finally:
        await client.aclose()
    return inflight_max, inflight, probes_max, probes, per_second, leases


@pytest.mark.slow
def test_fleet_limits_hold_under_load(redis_server: RedisServer, full: bool) -> None:
    """Fleet-wide concurrency <= limit, admissions per second <= rate + burst, concurrent
    probes <= half_open_calls, and every lease and slot is given back at the end."""
    processes, tasks, seconds = (8, 100, 30.0) if full else (4, 50, 5.0)
    url, prefix = redis_server.url, "load"
    # Every process runs its load in the same wall-clock window, [start_at, start_at + seconds].
    start_at = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, url, prefix, str(tasks), str(seconds), repr(start_at)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    totals: Counter[str] = Counter()
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            assert proc.returncode == 0, out
            totals.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    inflight_max, inflight, probes_max, probes, per_second, leases = asyncio.run(
        read_counters(url, prefix)
    )
    errors = {key: n for key, n in totals.items() if key.startswith("error:")}
    assert errors == {}
    assert totals["degraded"] == 0
    # everything happened: calls ran, failed, were shed, limited, rejected and probed
    for what in ("ok", "failed", "bulkhead_full", "rate_limited", "circuit_open", "probes"):
        assert totals[what] > 0, (what, totals)
    assert 0 < inflight_max <= LIMIT
    assert 0 < probes_max <= PROBES
    assert inflight == 0
    assert probes == 0
    assert leases == 0
    # An admission is counted (with Redis TIME) one round trip after the limiter granted it,
    # so a one-second bucket may hold grants from a little more than a second: allow that skew.
    assert max(per_second.values()) <= RATE * (1 + COUNT_SKEW) + BURST
    admitted = sum(per_second.values())
    assert admitted <= RATE * (seconds + COUNT_SKEW) + BURST
    print(
        f"{processes}x{tasks} tasks, {seconds:g}s: {dict(totals)}; concurrency max "
        f"{inflight_max}/{LIMIT}, probes at once max {probes_max}/{PROBES}, admitted "
        f"{admitted} ({admitted / seconds:.0f}/s, rate {RATE:g}), busiest second "
        f"{max(per_second.values())} (GCRA bound {RATE + BURST:g} per second)"
    )
