"""Several endpoints of one service: tail latency with a slow endpoint, and a dying endpoint.

Usage::

    python benchmarks/endpoints.py             # about 30 seconds; writes benchmarks/ENDPOINTS.md
    python benchmarks/endpoints.py --quick     # a few seconds, noisy numbers, prints only

Three uvicorn endpoints, each a process of its own on 127.0.0.1 (loopback only, stopped at
the end; their listening sockets are made by this process and set TCP_NODELAY, so a response
is not held back by Nagle's algorithm). ``--concurrency`` requests are in flight at once.

1. **A slow endpoint.** One endpoint answers ``--slow-share`` (10 %) of its requests after
   ``--slow`` (200 ms), the others at once. Each strategy sends the same number of requests,
   in interleaved rounds; reported: p50 / p99 / max latency as the caller sees it, and the
   share of requests sent to the slow endpoint.
2. **A dying endpoint.** All three answer at once; after a second of traffic one endpoint's
   process is killed (SIGKILL: its port refuses connections). Reported: requests that failed
   for the caller, attempts sent to the dead endpoint after the kill, and when the last one
   was sent (the time until no request goes to it), watched for ``--watch`` seconds.

A strategy is a name and a function ``(inner transport, endpoint URLs) -> transport``;
``measure_latency`` and ``measure_death`` take the transport it returns. A new row (hedged
requests, say) is one more entry in ``STRATEGIES``.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from resilience.integrations.httpx import HttpPolicy, ResilientTransport

Strategy = Callable[[httpx.AsyncBaseTransport, list[str]], httpx.AsyncBaseTransport]


# --- the endpoint processes ----------------------------------------------------------------


def serve(fd: int, slow: float, share: float, seed: int) -> None:
    """Run uvicorn on the inherited listening socket ``fd`` (child process)."""
    import uvicorn

    rng = random.Random(seed)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if slow and rng.random() < share:
            await asyncio.sleep(slow)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", ws="none", http="h11"
    )
    uvicorn.Server(config).run(sockets=[sock])


class Endpoint:
    """One endpoint process; ``kill()`` makes its port refuse connections."""

    def __init__(self, *, slow: float = 0.0, share: float = 0.0, seed: int = 0) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited when accepted
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fd = sock.fileno()
        args = [sys.executable, __file__, "--serve", str(fd), str(slow), str(share), str(seed)]
        self.proc = subprocess.Popen(args, pass_fds=[fd])
        sock.close()  # the child holds the only copy: once it dies, the port refuses
        self._ready()

    def _ready(self) -> None:
        limit = time.monotonic() + 15
        while time.monotonic() < limit:
            try:
                if httpx.get(self.url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.kill()
        raise SystemExit(f"the endpoint on {self.url} did not start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# --- strategies -----------------------------------------------------------------------------


class RoundRobin(httpx.AsyncBaseTransport):
    """No protection: each request to the next endpoint in turn, sent as it is."""

    def __init__(self, transport: httpx.AsyncBaseTransport, endpoints: list[str]) -> None:
        self.transport = transport
        self.urls = [httpx.URL(url) for url in endpoints]
        self.next = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = self.urls[self.next]
        self.next = (self.next + 1) % len(self.urls)
        request.url = request.url.copy_with(scheme=url.scheme, host=url.host, port=url.port)
        request.headers["Host"] = url.netloc.decode()
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()


def round_robin(inner: httpx.AsyncBaseTransport, endpoints: list[str]) -> httpx.AsyncBaseTransport:
    return RoundRobin(inner, endpoints)


def round_robin_protected(
    inner: httpx.AsyncBaseTransport, endpoints: list[str]
) -> httpx.AsyncBaseTransport:
    """Round robin over ``ResilientTransport`` per origin: retries and a breaker per endpoint,
    but no choice of endpoint (what the transport cost before ``endpoints=``)."""
    return RoundRobin(ResilientTransport(inner, policy=HttpPolicy()), endpoints)


def failover_p2c(inner: httpx.AsyncBaseTransport, endpoints: list[str]) -> httpx.AsyncBaseTransport:
    """``ResilientTransport`` with its defaults: a breaker per endpoint, failover, P2C."""
    return ResilientTransport(
        inner,
        policy=HttpPolicy(),
        service="bench",
        endpoints=endpoints,
        rng=random.Random(1),
    )


def hedged_origin(
    inner: httpx.AsyncBaseTransport, endpoints: list[str]
) -> httpx.AsyncBaseTransport:
    """Round robin over ``ResilientTransport`` per origin with hedging: a request with no
    answer after the learned p95 of its origin is sent again (to the same origin)."""
    return RoundRobin(ResilientTransport(inner, policy=HttpPolicy(hedge_delay="p95")), endpoints)


def failover_p2c_hedged(
    inner: httpx.AsyncBaseTransport, endpoints: list[str]
) -> httpx.AsyncBaseTransport:
    """Failover and P2C, and hedging: after the learned p90, a hedge to another endpoint."""
    return ResilientTransport(
        inner,
        policy=HttpPolicy(hedge_delay="p90"),
        service="bench",
        endpoints=endpoints,
        rng=random.Random(1),
    )


class WithHealthChecks(httpx.AsyncBaseTransport):
    """Failover and P2C, each endpoint watched by a ``HealthCheck`` (a GET every
    ``HEALTH_INTERVAL`` s): started with the first request, stopped with the transport."""

    def __init__(self, inner: httpx.AsyncBaseTransport, endpoints: list[str]) -> None:
        from resilience.integrations.httpx import http_check

        from resilience import HealthCheck

        self.client = httpx.AsyncClient(timeout=HEALTH_INTERVAL)
        self.checks = {
            url: HealthCheck(
                http_check(url, client=self.client),
                name=f"bench:{url}",
                interval=HEALTH_INTERVAL,
                timeout=HEALTH_INTERVAL / 2,
            )
            for url in endpoints
        }
        self.transport = ResilientTransport(
            inner,
            policy=HttpPolicy(),
            service="bench",
            endpoints=endpoints,
            health=self.checks,
            rng=random.Random(1),
        )
        self.started = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.started:
            self.started = True
            for check in self.checks.values():
                check.start()
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        for check in self.checks.values():
            await check.aclose()
        await self.client.aclose()
        await self.transport.aclose()


HEALTH_INTERVAL = 0.5


def failover_p2c_health(
    inner: httpx.AsyncBaseTransport, endpoints: list[str]
) -> httpx.AsyncBaseTransport:
    return WithHealthChecks(inner, endpoints)


STRATEGIES: list[tuple[str, Strategy]] = [
    ("round robin, no protection", round_robin),
    ("round robin, `ResilientTransport` per origin", round_robin_protected),
    ("failover + P2C (`endpoints=`)", failover_p2c),
    ("round robin, per origin, hedging (`hedge_delay='p95'`)", hedged_origin),
    ("failover + P2C + hedging (`hedge_delay='p90'`)", failover_p2c_hedged),
]
HEDGED = {
    "round robin, per origin, hedging (`hedge_delay='p95'`)",
    "failover + P2C + hedging (`hedge_delay='p90'`)",
}


class Recorder(httpx.AsyncBaseTransport):
    """The transport that really sends, noting when each attempt went to which port."""

    def __init__(self) -> None:
        self.transport = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[float, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((time.perf_counter(), request.url.port or 80))
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()


# --- measuring -------------------------------------------------------------------------------


async def run_requests(client: httpx.AsyncClient, count: int, concurrency: int) -> list[float]:
    """Latencies (seconds) of ``count`` GETs, ``concurrency`` in flight; a failure is NaN."""
    latencies: list[float] = []
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            start = time.perf_counter()
            try:
                response = await client.get("/")
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start if ok else float("nan"))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def measure_latency(
    transport: httpx.AsyncBaseTransport, count: int, concurrency: int
) -> list[float]:
    """Latencies of ``count`` requests through ``transport`` (a strategy's)."""
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        return await run_requests(client, count, concurrency)


@dataclass
class Death:
    failures: int
    attempts_after: int
    last_after: float | None  # seconds from the kill to the last attempt sent to the dead one
    total: int


async def measure_death(
    transport: httpx.AsyncBaseTransport,
    recorder: Recorder,
    victim: Endpoint,
    concurrency: int,
    before: float,
    watch: float,
) -> Death:
    """Steady traffic; ``victim`` killed after ``before`` s; watched for ``watch`` s after."""
    results: list[bool] = []
    stop = time.perf_counter() + before + watch

    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:

        async def worker() -> None:
            while time.perf_counter() < stop:
                try:
                    results.append((await client.get("/")).status_code == 200)
                except httpx.HTTPError:
                    results.append(False)

        async def killer() -> float:
            await asyncio.sleep(before)
            at = time.perf_counter()
            await asyncio.to_thread(victim.kill)
            return at

        *_, killed = await asyncio.gather(*(worker() for _ in range(concurrency)), killer())
    after = [t - killed for t, port in recorder.sent if port == victim.port and t >= killed]
    return Death(
        failures=results.count(False),
        attempts_after=len(after),
        last_after=max(after) if after else None,
        total=len(results),
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the report ------------------------------------------------------------------------------


async def latency_rows(args: argparse.Namespace, share: float) -> list[str]:
    endpoints = [
        Endpoint(seed=1),
        Endpoint(slow=args.slow, share=share, seed=2),
        Endpoint(seed=3),
    ]
    slow_port = endpoints[1].port
    pooled: dict[str, list[float]] = {name: [] for name, _ in STRATEGIES}
    to_slow: dict[str, list[int]] = {name: [0, 0] for name, _ in STRATEGIES}
    try:
        urls = [e.url for e in endpoints]
        for _ in range(args.rounds):
            for name, strategy in STRATEGIES:  # interleaved: noise hits every row alike
                recorder = Recorder()
                latencies = await measure_latency(
                    strategy(recorder, urls), args.requests, args.concurrency
                )
                pooled[name] += latencies
                to_slow[name][0] += sum(port == slow_port for _, port in recorder.sent)
                to_slow[name][1] += len(recorder.sent)
    finally:
        for e in endpoints:
            e.kill()
    rows = [
        "| strategy | requests | failed | p50 | p99 | max | sent to the slow endpoint | "
        "attempts per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _ in STRATEGIES:
        all_ = pooled[name]
        ok = [x for x in all_ if x == x]
        sent, total = to_slow[name]
        P99[(share, name)] = pct(ok, 0.99)
        LOAD[(share, name)] = total / len(all_)
        rows.append(
            f"| {name} | {len(all_):,} | {len(all_) - len(ok)} | {pct(ok, 0.5) * 1e3:.2f} ms | "
            f"{pct(ok, 0.99) * 1e3:.1f} ms | {max(ok) * 1e3:.1f} ms | {sent / total:.1%} | "
            f"{total / len(all_):.3f} |"
        )
    return rows


P99: dict[tuple[float, str], float] = {}  # (slow share, strategy) -> p99 seconds
LOAD: dict[tuple[float, str], float] = {}  # (slow share, strategy) -> attempts per request


def hedging_goals(share: float) -> list[str]:
    """The hedging goals: p99 within 1.5x of the all-healthy p99 (no protection, every
    endpoint fast), extra load <= 10 %."""
    lines = []
    healthy = P99.get((0.0, "round robin, no protection"))
    for name in sorted(HEDGED):
        slow = P99.get((share, name))
        if healthy is None or slow is None:
            continue
        extra = LOAD[(share, name)] - 1
        lines.append(
            f"- {name}: p99 {slow * 1e3:.1f} ms with one endpoint slow, {slow / healthy:.2f}x "
            f"the all-healthy p99 (goal <= 1.5x: {'met' if slow <= 1.5 * healthy else 'not met'}"
            f"); extra load {extra:.1%} (goal <= 10 %: {'met' if extra <= 0.10 else 'not met'})."
        )
    return lines


async def death_rows(args: argparse.Namespace) -> list[str]:
    rows = [
        "| strategy | requests | failed for the caller | attempts to the dead endpoint "
        "after the kill | last one sent after the kill |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    deaths = [
        *STRATEGIES,
        (f"failover + P2C + health checks (every {HEALTH_INTERVAL} s)", failover_p2c_health),
    ]
    for name, strategy in deaths:
        endpoints = [Endpoint(seed=i) for i in range(3)]
        try:
            recorder = Recorder()
            transport = strategy(recorder, [e.url for e in endpoints])
            death = await measure_death(
                transport, recorder, endpoints[2], args.concurrency, args.before, args.watch
            )
        finally:
            for e in endpoints:
                e.kill()
        last = "none" if death.last_after is None else f"{death.last_after * 1e3:,.1f} ms"
        if death.last_after is not None and death.last_after > args.watch * 0.9:
            last += " (still going at the end)"
        rows.append(
            f"| {name} | {death.total:,} | {death.failures:,} | {death.attempts_after:,} | {last} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="per strategy and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--slow", type=float, default=0.2, help="seconds of a slow answer")
    parser.add_argument("--slow-share", type=float, default=0.1, help="of the slow endpoint's")
    parser.add_argument("--before", type=float, default=1.0, help="seconds before the kill")
    parser.add_argument("--watch", type=float, default=5.0, help="seconds watched after it")
    parser.add_argument("--quick", action="store_true", help="a few seconds, prints only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "ENDPOINTS.md")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        fd, slow, share, seed = args.serve
        serve(int(fd), float(slow), float(share), int(seed))
        return
    if args.quick:
        args.requests, args.rounds, args.before, args.watch = 300, 1, 0.5, 1.5
    latency = asyncio.run(latency_rows(args, args.slow_share))
    baseline = asyncio.run(latency_rows(args, 0.0))
    death = asyncio.run(death_rows(args))
    policy = HttpPolicy()
    window = policy.window
    lines = [
        "# Several endpoints of one service",
        "",
        f"Python {platform.python_version()}, httpx {httpx.__version__}, "
        f"{sys.platform}, 2 cores shared. Three uvicorn endpoints, one process each, on "
        f"loopback; {args.concurrency} requests in flight. Produced by "
        "`python benchmarks/endpoints.py`.",
        "",
        f"## One endpoint answers {args.slow_share:.0%} of its requests after "
        f"{args.slow * 1e3:.0f} ms",
        "",
        f"{args.rounds} interleaved rounds of {args.requests:,} requests per strategy, pooled. "
        "The latency is the caller's, retries and failovers included.",
        "",
        *latency,
        "",
        "The same with all three endpoints fast, for comparison (the second endpoint is the",
        "one that was slow above). The tables are measured one after the other on a shared",
        "machine: compare rows within a table, not across tables.",
        "",
        *baseline,
        "",
        "Hedging (a request with no answer after the quantile its transport learned is sent "
        "once more, at most one request in ten; with `endpoints=`, to another endpoint; per "
        "origin, each origin learns its own, so the slow one's p95 is its slow answers). The "
        "goals: p99 with one endpoint slow within 1.5x of the p99 of the all-fast table's "
        "first row, and no more than 10 % extra requests (attempts per request, less 1; "
        "retries and failovers count too):",
        "",
        *hedging_goals(args.slow_share),
        "",
        "## One endpoint dies",
        "",
        f"Steady traffic to three healthy endpoints; after {args.before:g} s one endpoint's "
        f"process is killed (its port then refuses connections), and the traffic goes on for "
        f"{args.watch:g} s. No health check: only the failed connections tell.",
        "",
        *death,
        "",
        f"For comparison, the breaker alone (`HttpPolicy()` defaults: `{window!r}`, "
        f"`minimum_calls={policy.minimum_calls}`) opens after {policy.minimum_calls} failed "
        "attempts to that endpoint at the earliest.",
        "",
        "Reading the numbers: with every endpoint fast, the three strategies have about the",
        "same median (the transport's own work per request is small next to a loopback round",
        "trip). With one endpoint slow now and then, P2C sends most requests to the two fast",
        "ones (a peak EWMA remembers a slow answer for about its 10 s time constant), so two",
        "server processes carry the load of three and the median rises with their queues; the",
        "tail is what that buys: the slow endpoint's 200 ms answers reach the caller only",
        "while its cost is being learnt, once per transport. When an",
        "endpoint dies, the first refused connection makes it the costliest endpoint and its",
        "requests fail over at once, so callers see no failure and it gets no more traffic",
        "long before its breaker could open.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.out.write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
