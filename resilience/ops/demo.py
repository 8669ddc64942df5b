"""``resilience demo``: a flaky service, client replicas that share breakers, and a dashboard.

Everything runs on loopback for a bounded time, then prints a summary:

* an upstream service (pure ASGI, served by uvicorn) that goes through phases: healthy, a
  burst of failures, a slow period, and recovery; it is protected by ``ResilienceMiddleware``
  (load shedding, a timeout; with ``--redis`` its bulkhead and a rate limiter, ``FLEET_RATE``
  requests a second, are fleet-wide, so every dashboard of the demo's prefix shows them);
* several client replicas calling it through ``ResilientTransport`` with one shared breaker:
  tasks of this process sharing a ``MemoryStore`` by default, or separate processes sharing
  Redis with ``--redis URL``;
* the dashboard, whose URL is printed, showing the shared breaker live.

On a terminal it draws a live table and a progress bar with ``rich``; piped, it prints the
upstream's phases, the breakers' state changes and the summary as plain lines. The summary
lists every transition, taken from the breakers' ``StateChanged`` events (deduplicated by
generation: every replica reports the ones it sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import uvicorn

import resilience
from resilience import (
    CountWindow,
    Event,
    MemoryStore,
    PolicyStatus,
    StateChanged,
    Store,
    StoreUnavailableError,
    status,
)

from ..integrations.asgi import ResilienceMiddleware
from ..integrations.httpx import (
    BreakerOptions,
    CircuitOpen,
    HttpPolicy,
    ResilientTransport,
    RetryOptions,
)
from .screen import Screen, Transitions, transition_line

__all__ = ["PHASES", "DemoError", "run_demo"]


class DemoError(RuntimeError):
    """The demo cannot go on (a replica process died); the message says why."""


Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

#: with ``--redis``, the upstream's fleet-wide rate limit (requests a second) and burst: above
#: what the demo's replicas send, so it refuses nothing and its card shows its bucket
FLEET_RATE, FLEET_BURST = 2000.0, 200

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


async def serve(
    app: Any, port: int, sock: socket.socket | None = None
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """Run ``app`` with uvicorn on 127.0.0.1:``port`` (or on ``sock``, already listening
    there) in this loop; wait until it listens."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(None if sock is None else [sock]))
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
    breaker = BreakerOptions(
        window=CountWindow(20), open_for=open_for, open_for_max=4 * open_for, half_open_calls=2
    )
    return HttpPolicy(retry=RetryOptions(attempts=2), breaker=breaker, timeout=0.15, store=store)


async def replica(
    url: str,
    store: Store,
    duration: float,
    until: float,
    tally: Counter[str],
    concurrency: int = 4,
    listeners: tuple[Callable[[Event], None], ...] = (),
) -> None:
    """One client replica: a few workers calling the upstream through ResilientTransport."""
    policy = client_policy(store, duration)
    if listeners:
        policy = dataclasses.replace(policy, listeners=listeners)
    transport = ResilientTransport(policy=policy)
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


def _try_commands(redis_url: str, prefix: str, breaker: str) -> str:
    """What to run beside the demo, in another terminal, with the demo's own prefix."""
    from resilience.ops.cli import redact

    shown = redact(redis_url)
    masked = " (the password masked: use your own)" if shown != redis_url else ""
    where = f"--redis '{shown}' --prefix {prefix}"
    return (
        f"shared through Redis under prefix {prefix!r}{masked}; try, while it runs:\n"
        f"  resilience status {where}\n"
        f"  resilience open '{breaker}' {where}\n"
        f"  resilience close '{breaker}' {where}\n"
        f"  resilience dashboard {where} --port 8765\n"
    )


async def run_demo(
    duration: float = 60.0,
    *,
    replicas: int = 3,
    redis_url: str | None = None,
    seed: int | None = None,
    write: Callable[[str], object] | None = None,
    tty: bool | None = None,
    port: int = 0,
) -> dict[str, Any]:
    """Run the demo for ``duration`` seconds; return the summary it prints at the end.

    The dashboard listens on ``port`` (0: any free one; ``CommandError`` when it cannot).
    Raises ``DemoError`` when a replica process dies (``--redis``), with its error.
    """
    from resilience.ops.cli import listen, redact

    dash_socket = listen("127.0.0.1", port)
    dash_port = int(dash_socket.getsockname()[1])

    from .dashboard import Dashboard

    out: Callable[[str], object] = write or sys.stdout.write
    is_tty = sys.stdout.isatty() if tty is None else tty
    start = time.monotonic()
    timeline = Timeline(start, duration)
    transitions = Transitions(time.time())
    store: Store
    prefix = f"demo-{os.getpid()}"
    if redis_url is None:
        store = MemoryStore()
    else:
        from resilience.store.redis import RedisStore

        store = RedisStore.from_url(redis_url, prefix=prefix, timeout=1.0)
        try:
            await status(store)
        except StoreUnavailableError as exc:
            await store.aclose()
            dash_socket.close()
            raise DemoError(f"cannot reach Redis at {redact(redis_url)}: {exc}") from exc
    upstream_port = free_port()
    board = Dashboard(store, refresh=0.5)
    fleet: dict[str, Any] = {}
    if redis_url is not None:
        fleet = {"store": store, "name": "upstream", "rate": FLEET_RATE, "burst": FLEET_BURST}
    guarded = ResilienceMiddleware(  # its bulkhead's refusals reach the dashboard's card
        upstream_app(timeline, seed),
        max_concurrent=64,
        timeout=2.0,
        retry_after=1.0,
        listeners=[board.calls],
        **fleet,
    )
    upstream, upstream_task = await serve(guarded, upstream_port)
    dashboard, dashboard_task = await serve(board, dash_port, dash_socket)
    url = f"http://127.0.0.1:{upstream_port}"
    where = f"Redis {redact(redis_url)}" if redis_url else "an in-process MemoryStore"
    out(
        f"resilience demo: {replicas} client replicas -> flaky upstream at {url} for "
        f"{duration:g}s, sharing breaker {url!r} through {where}\n"
        f"dashboard: http://127.0.0.1:{dash_port}/\n"
        + (_try_commands(redis_url, prefix, url) if redis_url else "")
        + "\n"
    )
    until = start + duration
    tallies = [Counter[str]() for _ in range(replicas)]
    workers: list[asyncio.Task[None]] = []
    processes: list[subprocess.Popen[str]] = []
    errors: list[IO[str]] = []
    files = contextlib.ExitStack()  # the replicas' stderr, read back if one dies
    try:
        if redis_url is None:
            # in one process the breaker's calls are told to the dashboard: an in-process
            # store keeps no running total of them
            listeners = (transitions.listener, board.calls)
            workers = [
                asyncio.create_task(
                    replica(url, store, duration, until, tallies[i], listeners=listeners)
                )
                for i in range(replicas)
            ]
        else:
            for _ in range(replicas):
                err = files.enter_context(
                    tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115
                )
                errors.append(err)
                processes.append(
                    _spawn_replica(url, redis_url, prefix, duration, until - time.monotonic(), err)
                )
            workers = [
                asyncio.create_task(_read_replica(i, p, errors[i], tallies[i], transitions))
                for i, p in enumerate(processes)
            ]
        with Screen(out, is_tty, duration) as screen:
            breaker: PolicyStatus | None = None  # the last status of the breaker seen
            while time.monotonic() < until:
                for task in workers:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                try:
                    policies = await status(store)
                except StoreUnavailableError:  # the replicas go on, on local state
                    policies = []
                breakers = [p for p in policies if p.kind == "circuit_breaker"]
                breaker = breakers[0] if breakers else breaker
                screen.show(
                    time.monotonic() - start,
                    timeline.phase()[0],
                    tallies,
                    breaker,
                    transitions.take_fresh(),
                )
                await asyncio.sleep(0.25)
            await asyncio.wait_for(asyncio.gather(*workers), 10)
            screen.show(duration, timeline.phase()[0], tallies, breaker, transitions.take_fresh())
    finally:
        for task in workers:
            task.cancel()
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
            if process.stdout is not None:
                process.stdout.close()
        files.close()
        upstream.should_exit = dashboard.should_exit = True
        await asyncio.gather(upstream_task, dashboard_task, return_exceptions=True)
        await guarded.aclose()  # the fleet-wide share goes back at once
        await store.aclose()
    total = sum(tallies, Counter[str]())
    changes = transitions.ordered()
    summary = {
        "duration": duration,
        "replicas": replicas,
        "requests": total["requests"],
        "ok": total["ok"],
        "failed": total["failed"],
        "rejected": total["rejected"],
        "transitions": [
            {"name": t.name, "generation": t.generation, "old": t.old, "new": t.new, "at": t.at}
            for t in changes
        ],
    }
    lines = [
        "",
        f"done: {total['requests']} requests, {total['ok']} answered, {total['failed']} "
        f"failed, {total['rejected']} rejected at once by the open breaker (never sent)",
        f"breaker: {len(changes)} state changes" if changes else "breaker: closed throughout",
        *(transition_line(t) for t in changes),
    ]
    out("\n".join(lines) + "\n")
    return summary


def _spawn_replica(
    url: str, redis_url: str, prefix: str, duration: float, seconds: float, err: IO[str]
) -> subprocess.Popen[str]:
    """A replica process running the very code this process runs, from any folder.

    ``-P`` keeps the current folder off the child's ``sys.path``, and ``PYTHONPATH`` starts
    with the folder this ``resilience`` package was imported from: a checkout, an editable
    install or site-packages alike, the child imports the same modules as its parent.
    """
    env = dict(os.environ)
    root = str(Path(resilience.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [
            sys.executable, "-P", "-m", "resilience.ops.demo", "replica",
            url, redis_url, prefix, repr(duration), repr(max(0.1, seconds)),
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )  # fmt: skip


async def _read_replica(
    index: int,
    process: subprocess.Popen[str],
    err: IO[str],
    tally: Counter[str],
    transitions: Transitions,
) -> None:
    """Copy a replica process's reports (JSON lines) into ``tally`` and ``transitions``.

    Raises ``DemoError`` with the replica's last error lines if it exits with a failure.
    """
    assert process.stdout is not None
    stdout = process.stdout
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, stdout.readline)
        if not line:
            break
        with contextlib.suppress(ValueError, TypeError, KeyError):
            report = json.loads(line)
            for change in report.get("transitions", ()):
                transitions.add(*change)
            tally.clear()
            tally.update(report["tally"])
    code = await loop.run_in_executor(None, process.wait)
    if code != 0:
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.strip()]
        why = "\n".join(lines[-5:]) or "no error output"
        raise DemoError(f"replica #{index} exited with code {code}:\n{why}")


async def _replica_process(
    url: str, redis_url: str, prefix: str, duration: float, seconds: float
) -> None:
    """``--redis`` mode: one replica in its own process, reporting every 0.2 s.

    Each report is a JSON line: its tally, and the state changes its breaker saw since the
    last report (name, generation, old, new, wall-clock time).
    """
    from resilience.store.redis import RedisStore

    tally: Counter[str] = Counter()
    changes: list[tuple[str, int, str, str, float]] = []

    def listener(event: Event) -> None:
        if isinstance(event, StateChanged):
            changes.append(
                (event.name, event.generation, event.old.value, event.new.value, time.time())
            )

    def report() -> None:
        print(json.dumps({"tally": dict(tally), "transitions": changes}), flush=True)
        changes.clear()

    async with RedisStore.from_url(redis_url, prefix=prefix, timeout=1.0) as store:
        until = time.monotonic() + seconds
        task = asyncio.create_task(
            replica(url, store, duration, until, tally, listeners=(listener,))
        )
        while not task.done():
            report()
            await asyncio.sleep(0.2)
        await task
        report()


if __name__ == "__main__":  # pragma: no cover - run by run_demo in --redis mode
    if len(sys.argv) == 7 and sys.argv[1] == "replica":
        url, redis_url, prefix, duration, seconds = sys.argv[2:]
        asyncio.run(_replica_process(url, redis_url, prefix, float(duration), float(seconds)))
    else:
        sys.exit("usage: python -m resilience.ops.demo replica URL REDIS PREFIX S S")
