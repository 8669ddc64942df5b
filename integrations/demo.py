"""``resilience demo``: a flaky service, client replicas that share breakers, and a dashboard.

Everything runs on loopback for a bounded time, then prints a summary:

* an upstream service (pure ASGI, served by uvicorn) that goes through phases: healthy, a
  burst of failures, a slow period, and recovery; it is protected by ``ResilienceMiddleware``
  (load shedding, a timeout);
* several client replicas calling it through ``ResilientTransport`` with one shared breaker:
  tasks of this process sharing a ``MemoryStore`` by default, or separate processes sharing
  Redis with ``--redis URL``;
* the dashboard, whose URL is printed, showing the shared breaker live.

The terminal shows a live table and a progress bar (plain lines when it is not a terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from resilience import CircuitState, CountWindow, MemoryStore, PolicyStatus, Store, status

from .asgi import ResilienceMiddleware
from .httpx import CircuitOpen, HttpPolicy, ResilientTransport

__all__ = ["PHASES", "run_demo"]

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

#: (name, share of the run, failure rate, extra latency range in seconds)
PHASES = (
    ("healthy", 0.25, 0.02, (0.002, 0.01)),
    ("failing", 0.25, 0.9, (0.002, 0.01)),
    ("slow", 0.2, 0.05, (0.2, 0.6)),
    ("recovered", 0.3, 0.02, (0.002, 0.01)),
)


@dataclass
class Timeline:
    """Which phase the upstream is in, from the demo's start and duration."""

    start: float
    duration: float

    def phase(self, now: float | None = None) -> tuple[str, float, tuple[float, float]]:
        """The current phase: name, failure rate, latency range."""
        t = ((time.monotonic() if now is None else now) - self.start) / self.duration
        edge = 0.0
        for name, share, failures, latency in PHASES:
            edge += share
            if t < edge:
                return name, failures, latency
        name, _, failures, latency = PHASES[-1]
        return name, failures, latency


def upstream_app(timeline: Timeline, seed: int | None) -> Callable[..., Any]:
    """The flaky service: answers ``GET /price`` with JSON, or fails, per the timeline."""
    rng = random.Random(seed)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        _, failure_rate, (low, high) = timeline.phase()
        await asyncio.sleep(rng.uniform(low, high))
        failed = rng.random() < failure_rate
        body = b'{"error": "upstream failure"}' if failed else b'{"price": 42}'
        await send(
            {
                "type": "http.response.start",
                "status": 503 if failed else 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(app: Any, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """Run ``app`` with uvicorn on 127.0.0.1:``port`` in this loop; wait until it listens."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        raise RuntimeError(f"could not serve on 127.0.0.1:{port}")
    return server, task


def client_policy(store: Store, duration: float) -> HttpPolicy:
    """What every replica's transport is built from: the same breaker settings everywhere.

    The open time scales with the run, so a short demo still shows a recovery.
    """
    open_for = round(max(0.3, min(2.0, duration / 40)), 2)
    return HttpPolicy(
        attempts=2,
        timeout=0.15,
        failure_ratio=0.5,
        minimum_calls=10,
        window=CountWindow(20),
        open_for=open_for,
        open_for_max=4 * open_for,
        half_open_calls=2,
        store=store,
    )


async def replica(
    url: str,
    store: Store,
    duration: float,
    until: float,
    tally: Counter[str],
    concurrency: int = 4,
) -> None:
    """One client replica: a few workers calling the upstream through ResilientTransport."""
    transport = ResilientTransport(policy=client_policy(store, duration))
    async with httpx.AsyncClient(transport=transport, base_url=url) as client:

        async def worker() -> None:
            while time.monotonic() < until:
                try:
                    response = await client.get("/price")
                    tally["ok" if response.status_code == 200 else "failed"] += 1
                except CircuitOpen:
                    tally["rejected"] += 1
                except httpx.HTTPError:
                    tally["failed"] += 1
                tally["requests"] += 1
                await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


class Screen:
    """A live table and a progress bar on a terminal; one line a second elsewhere."""

    def __init__(self, write: Callable[[str], object], tty: bool) -> None:
        self.write = write
        self.tty = tty
        self.lines = 0
        self.last_plain = 0.0

    def show(self, rows: list[str]) -> None:
        if self.tty:
            out = ""
            if self.lines:
                out += f"\x1b[{self.lines}F"  # back to the top of the table
            out += "".join(f"\x1b[2K{row}\n" for row in rows)
            self.write(out)
            self.lines = len(rows)
        elif time.monotonic() - self.last_plain >= 1.0:
            self.last_plain = time.monotonic()
            self.write(rows[-1] + "\n")


STATE_MARK = {
    CircuitState.CLOSED: "closed     ",
    CircuitState.OPEN: "OPEN       ",
    CircuitState.HALF_OPEN: "half-open  ",
    CircuitState.FORCED_OPEN: "FORCED OPEN",
    CircuitState.DISABLED: "disabled   ",
}


def _ratio(policy: PolicyStatus) -> str:
    """The window's failure ratio, or, for an open breaker, the one that opened it."""
    if policy.opened_by:
        calls, failures, _ = policy.opened_by
        return f"  opened by {failures} failed of {calls} calls"
    return f"  failure ratio {policy.failure_ratio:4.0%}"


def bar(fraction: float, width: int = 30) -> str:
    """``[#####.....]``"""
    done = int(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * done + "." * (width - done) + "]"


async def run_demo(
    duration: float = 60.0,
    *,
    replicas: int = 3,
    redis_url: str | None = None,
    seed: int | None = None,
    write: Callable[[str], object] | None = None,
    tty: bool | None = None,
) -> dict[str, Any]:
    """Run the demo for ``duration`` seconds; return the summary it prints at the end."""
    from .dashboard import Dashboard

    out: Callable[[str], object] = write or sys.stdout.write
    screen = Screen(out, sys.stdout.isatty() if tty is None else tty)
    start = time.monotonic()
    timeline = Timeline(start, duration)
    store: Store
    if redis_url is None:
        store = MemoryStore()
    else:
        from resilience.store.redis import RedisStore

        store = RedisStore.from_url(redis_url, prefix=f"demo-{os.getpid()}", timeout=1.0)
    upstream_port, dash_port = free_port(), free_port()
    guarded = ResilienceMiddleware(
        upstream_app(timeline, seed), max_concurrent=64, timeout=2.0, retry_after=1.0
    )
    upstream, upstream_task = await serve(guarded, upstream_port)
    dashboard, dashboard_task = await serve(Dashboard(store, refresh=0.5), dash_port)
    url = f"http://127.0.0.1:{upstream_port}"
    out(
        f"resilience demo: {replicas} client replicas -> flaky upstream at {url} for "
        f"{duration:g}s ({'Redis ' + redis_url if redis_url else 'in-process MemoryStore'})\n"
        f"dashboard: http://127.0.0.1:{dash_port}/\n\n"
    )
    until = start + duration
    tallies = [Counter[str]() for _ in range(replicas)]
    workers: list[asyncio.Task[None]] = []
    processes: list[subprocess.Popen[str]] = []
    if redis_url is None:
        workers = [
            asyncio.create_task(replica(url, store, duration, until, tallies[i]))
            for i in range(replicas)
        ]
    else:
        processes = [
            _spawn_replica(url, redis_url, store, duration, until - time.monotonic())
            for _ in range(replicas)
        ]
        workers = [
            asyncio.create_task(_read_replica(p, tallies[i])) for i, p in enumerate(processes)
        ]
    transitions: list[str] = []
    last_state: CircuitState | None = None
    try:
        while time.monotonic() < until:
            policies = [p for p in await status(store) if p.kind == "circuit_breaker"]
            state = policies[0].state if policies else CircuitState.CLOSED
            if state is not last_state and state is not None:
                transitions.append(f"{time.monotonic() - start:5.1f}s {state.value}")
                last_state = state
            phase = timeline.phase()[0]
            rows = [
                f"{'replica':<10}{'requests':>10}{'ok':>8}{'failed':>8}{'rejected':>10}",
                *(
                    f"{'#' + str(i):<10}{t['requests']:>10}{t['ok']:>8}{t['failed']:>8}"
                    f"{t['rejected']:>10}"
                    for i, t in enumerate(tallies)
                ),
                f"upstream phase: {phase:<10} breaker: "
                f"{STATE_MARK.get(state, str(state)) if state else '-'}"
                + (_ratio(policies[0]) if policies else ""),
                f"{bar((time.monotonic() - start) / duration)} "
                f"{time.monotonic() - start:5.1f}/{duration:g}s",
            ]
            screen.show(rows)
            await asyncio.sleep(0.25)
        await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 10)
    finally:
        for task in workers:
            task.cancel()
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
            if process.stdout is not None:
                process.stdout.close()
        upstream.should_exit = dashboard.should_exit = True
        await asyncio.gather(upstream_task, dashboard_task, return_exceptions=True)
        await store.aclose()
    total = sum(tallies, Counter[str]())
    summary = {
        "duration": duration,
        "replicas": replicas,
        "requests": total["requests"],
        "ok": total["ok"],
        "failed": total["failed"],
        "rejected": total["rejected"],
        "transitions": transitions,
    }
    out(
        f"\ndone: {total['requests']} requests, {total['ok']} answered, {total['failed']} "
        f"failed, {total['rejected']} rejected at once by the open breaker (never sent)\n"
        f"breaker: {' -> '.join(transitions) or 'closed throughout'}\n"
    )
    return summary


def _spawn_replica(
    url: str, redis_url: str, store: Store, duration: float, seconds: float
) -> subprocess.Popen[str]:
    prefix = getattr(store, "prefix", "resilience")
    return subprocess.Popen(
        [
            sys.executable, "-m", "resilience.integrations.demo", "replica",
            url, redis_url, prefix, repr(duration), repr(max(0.1, seconds)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


async def _read_replica(process: subprocess.Popen[str], tally: Counter[str]) -> None:
    """Copy a replica process's running tallies (JSON lines) into ``tally``."""
    assert process.stdout is not None
    stdout = process.stdout
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, stdout.readline)
        if not line:
            return
        with contextlib.suppress(ValueError):
            tally.clear()
            tally.update(json.loads(line))


async def _replica_process(
    url: str, redis_url: str, prefix: str, duration: float, seconds: float
) -> None:
    """``--redis`` mode: one replica in its own process, reporting its tally every 0.2 s."""
    from resilience.store.redis import RedisStore

    tally: Counter[str] = Counter()
    async with RedisStore.from_url(redis_url, prefix=prefix, timeout=1.0) as store:
        until = time.monotonic() + seconds
        task = asyncio.create_task(replica(url, store, duration, until, tally))
        while not task.done():
            print(json.dumps(dict(tally)), flush=True)
            await asyncio.sleep(0.2)
        await task
        print(json.dumps(dict(tally)), flush=True)


if __name__ == "__main__":  # pragma: no cover - run by run_demo in --redis mode
    if len(sys.argv) == 7 and sys.argv[1] == "replica":
        url, redis_url, prefix, duration, seconds = sys.argv[2:]
        asyncio.run(_replica_process(url, redis_url, prefix, float(duration), float(seconds)))
    else:
        sys.exit("usage: python -m resilience.integrations.demo replica URL REDIS PREFIX S S")
