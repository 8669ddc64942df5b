"""Client-side adaptive throttling against a backend that refuses half of what it is sent.

Usage::

    python benchmarks/throttle.py            # about 40 seconds; writes THROTTLE.md
    python benchmarks/throttle.py --quick    # a smoke run, prints only

A backend with a fixed capacity (``--capacity`` requests per second; beyond it each request
is answered ``503`` at once) is offered twice its capacity, open loop, for ``--seconds``, by
a client going through ``ResilientTransport(HttpPolicy(retry=RetryOptions(attempts=1),
throttle=ThrottleOptions(k=...)))``, so half of what reaches it without throttling is
refused. The backend is an ASGI app called in process (``httpx.ASGITransport``): what is
measured is how many requests reach it and how many it accepts, not the network.

Rows: no throttle; ``k=2`` (the SRE book's usual value: the backend may see up to twice what
it accepts, so at a 50 % refusal rate it cuts nothing); ``k=1.1`` (the backend sees about
what it accepts). Goals: with a throttle that acts (``k=1.1``), the load
reaching the backend cut by >= 40 %, and the accepted requests not dropping (>= 95 % of the
row without a throttle).
"""

from __future__ import annotations

import asyncio
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness import script_parser  # noqa: E402
from resilience.integrations.httpx import (  # noqa: E402
    HttpPolicy,
    ResilientTransport,
    RetryOptions,
    Throttled,
    ThrottleOptions,
)

from resilience import RateLimiter  # noqa: E402


class Backend:
    """An ASGI app that serves ``capacity`` requests per second and refuses the rest (503)."""

    def __init__(self, capacity: float) -> None:
        self.limiter = RateLimiter(capacity, burst=max(1, int(capacity / 20)))
        self.reached = 0
        self.accepted = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.reached += 1
        ok = self.limiter.try_acquire() == 0.0
        self.accepted += ok
        await send({"type": "http.response.start", "status": 200 if ok else 503, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def run(k: float | None, capacity: float, seconds: float) -> dict[str, float]:
    backend = Backend(capacity)
    policy = HttpPolicy(
        retry=RetryOptions(attempts=1),
        breaker=None,
        timeout=None,
        throttle=None if k is None else ThrottleOptions(k=k, window=seconds / 2),
    )
    transport = ResilientTransport(httpx.ASGITransport(app=backend), policy=policy)  # type: ignore[arg-type]
    sent = refused = 0
    async with httpx.AsyncClient(transport=transport, base_url="http://backend") as client:

        async def one() -> None:
            nonlocal refused
            try:
                await client.get("/")
            except Throttled:
                refused += 1

        rate = 2 * capacity
        start = time.perf_counter()
        tasks: set[asyncio.Task[None]] = set()
        while (now := time.perf_counter() - start) < seconds:
            due = int(now * rate)
            while sent < due:
                sent += 1
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return {
        "sent": sent,
        "refused": refused,
        "reached": backend.reached,
        "accepted": backend.accepted,
    }


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(
        __doc__, quick="a smoke run, prints only", out_help="where THROTTLE.md goes"
    )
    parser.add_argument("--capacity", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=12.0, help="per row")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 3.0
    rows = {
        "no throttle": asyncio.run(run(None, args.capacity, args.seconds)),
        "`k=2`": asyncio.run(run(2.0, args.capacity, args.seconds)),
        "`k=1.1`": asyncio.run(run(1.1, args.capacity, args.seconds)),
    }
    base = rows["no throttle"]
    lines = [
        "# Client-side throttling against a refusing backend: benchmark results",
        "",
        "Written by `python benchmarks/throttle.py`.",
        "",
        f"Python {platform.python_version()}. A backend serving {args.capacity:.0f} requests/s "
        f"(503 beyond), offered {2 * args.capacity:.0f} requests/s for {args.seconds:.0f} s "
        "per row through `ResilientTransport(HttpPolicy(retry=RetryOptions(attempts=1), "
        "throttle=ThrottleOptions(k=...)))`, the "
        f"throttle's window {args.seconds / 2:.0f} s.",
        "",
        "| client | sent | refused by the throttle | reached the backend | accepted | load "
        "cut | accepted vs no throttle |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        cut = 1 - r["reached"] / base["reached"]
        lines.append(
            f"| {label} | {r['sent']:,.0f} | {r['refused']:,.0f} | {r['reached']:,.0f} | "
            f"{r['accepted']:,.0f} | {cut:.0%} | {r['accepted'] / base['accepted']:.0%} |"
        )
    acting = rows["`k=1.1`"]
    cut = 1 - acting["reached"] / base["reached"]
    kept = acting["accepted"] / base["accepted"]
    lines += [
        "",
        f"Goals (`k=1.1`): load reaching the backend cut by >= 40 % ({cut:.0%}): "
        f"{'met' if cut >= 0.40 else '**not met**'}; accepted requests not dropping (>= 95 % "
        f"of the row without a throttle: {kept:.0%}): {'met' if kept >= 0.95 else '**not met**'}.",
        "",
        "With `k=2` the backend may be sent twice what it accepts: a backend refusing half of "
        "what it gets is exactly at that line, so the throttle lets everything through. Choose "
        "`k` near 1 to shed the refused load at the client (at the price of refusing a little "
        "more when the backend recovers); see docs/throttle.md.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "THROTTLE.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
