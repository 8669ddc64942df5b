"""Several endpoints of one service: tail latency, a dying endpoint and a hanging one.

Usage::

    python benchmarks/endpoints.py             # about 6 minutes; writes benchmarks/ENDPOINTS.md
    python benchmarks/endpoints.py --quick     # about a minute, noisy numbers, prints only

Three uvicorn endpoints, each a process of its own on 127.0.0.1 (loopback only, stopped at
the end, and at exit whatever ends the run; their listening sockets are made by this process
and set TCP_NODELAY, so a response is not held back by Nagle's algorithm).

1. **A slow endpoint.** One endpoint answers ``--slow-share`` (10 %) of its requests after
   ``--slow`` (200 ms), the others at once. Each strategy sends the same number of requests,
   in interleaved rounds; reported: p50 / p99 / max latency as the caller sees it, and the
   share of requests sent to the slow endpoint. Measured twice, as is the same with every
   endpoint fast:

   - in a **closed loop**, ``--concurrency`` (8) requests in flight, each caller sending its
     next request when the last one answered. On two cores this saturates the CPU: the
     latencies are mostly queueing, a hedge has no spare capacity to use, and a slow answer
     holds back the requests its caller would have sent meanwhile, so their queueing delay is
     never measured (coordinated omission);
   - in an **open loop**, a request started every ``1 / --rate`` s (200/s, about a quarter of
     what the closed loop serves), each a task timed from its scheduled start, at most
     ``--max-outstanding`` (64) at once (one due beyond that is not sent, and failed): the
     latencies are service times, and a slow answer delays nothing but itself.

2. **A dying endpoint.** All three answer at once; after ``--before`` (1 s) of closed-loop
   traffic one endpoint's process is killed (SIGKILL: its port refuses connections).
   Reported: requests that failed for the caller, attempts sent to the dead endpoint after
   the kill, and when the last one was sent (the time until no request goes to it), watched
   for ``--watch`` seconds.
3. **A hanging endpoint.** The same, but the process is stopped (SIGSTOP: the kernel still
   accepts connections into the listen backlog, nobody answers), so only timeouts tell: the
   round-robin rows have an httpx client timeout of ``CLIENT_TIMEOUT`` (2 s), the others
   ``HttpPolicy()``'s (1 s per attempt, 1.5 s per request). The requests in flight after the
   watch are waited for (``DRAIN``). Reported as well: the caller's p99 and max latency.

A strategy is a name and a function ``(inner transport, endpoint URLs) -> transport``;
``measure_latency`` and ``measure_fault`` take the transport it returns. A new row (hedged
requests, say) is one more entry in ``STRATEGIES``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from resilience.integrations.httpx import (
    BreakerOptions,
    HedgeOptions,
    HttpPolicy,
    ResilientTransport,
)

from resilience import CountWindow

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
    """One endpoint process; ``kill()`` makes its port refuse connections, ``stop()`` makes it
    hang (SIGSTOP: the kernel still accepts connections into the listen backlog, but nothing
    answers). Every endpoint still running is killed at exit, whatever ends the benchmark."""

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
        LIVE.add(self)
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

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """Kill the process, stopped or not, and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # SIGKILL ends a stopped process too
            self.proc.kill()
        self.proc.wait(10)
        LIVE.discard(self)


LIVE: set[Endpoint] = set()  # started and not yet reaped


@atexit.register
def kill_all() -> None:
    """Kill every endpoint still running (an error or Ctrl-C cut its ``finally`` short)."""
    for endpoint in list(LIVE):
        endpoint.kill()


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
    return RoundRobin(
        ResilientTransport(inner, policy=HttpPolicy(hedge=HedgeOptions(delay="p95"))), endpoints
    )


def failover_p2c_hedged(
    inner: httpx.AsyncBaseTransport, endpoints: list[str]
) -> httpx.AsyncBaseTransport:
    """Failover and P2C, and hedging: after the learned p95 (``Hedge``'s default quantile),
    a hedge to another endpoint."""
    return ResilientTransport(
        inner,
        policy=HttpPolicy(hedge=HedgeOptions(delay="p95")),
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
    ("round robin, per origin, hedging (`HedgeOptions(delay='p95')`)", hedged_origin),
    ("failover + P2C + hedging (`HedgeOptions(delay='p95')`)", failover_p2c_hedged),
]
HEDGED = {
    "round robin, per origin, hedging (`HedgeOptions(delay='p95')`)",
    "failover + P2C + hedging (`HedgeOptions(delay='p95')`)",
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


async def run_open(client: httpx.AsyncClient, count: int, rate: float, cap: int) -> list[float]:
    """Latencies (seconds) of ``count`` GETs started on a fixed schedule, ``rate`` a second,
    each a task timed from its scheduled start (a late start is waiting too, so no coordinated
    omission); a failure, or a request not started because ``cap`` were outstanding, is NaN."""
    latencies: list[float] = []
    outstanding: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        try:
            ok = (await client.get("/")).status_code == 200
        except httpx.HTTPError:
            ok = False
        latencies.append(time.perf_counter() - due if ok else float("nan"))

    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if len(outstanding) >= cap:
            latencies.append(float("nan"))
            continue
        task = asyncio.create_task(one(due))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    await asyncio.gather(*outstanding)
    return latencies


async def measure_latency(
    transport: httpx.AsyncBaseTransport, args: argparse.Namespace, open_loop: bool
) -> list[float]:
    """Latencies of requests through ``transport`` (a strategy's): closed loop,
    ``args.requests`` with ``args.concurrency`` in flight, or open loop, ``args.open_requests``
    at ``args.rate`` a second."""
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        if open_loop:
            return await run_open(client, args.open_requests, args.rate, args.max_outstanding)
        return await run_requests(client, args.requests, args.concurrency)


DRAIN = (HttpPolicy().total_timeout or 15.0) + 1.0
"""Seconds the requests in flight at the end of a fault's watch are waited for: the most one
request may take by ``HttpPolicy()`` (its ``total_timeout``), and a second."""


@dataclass
class Fault:
    failures: int
    attempts_after: int
    last_after: float | None  # seconds from the fault to the last attempt sent to the victim
    total: int
    latencies: list[float]  # every request's, a failure's until it failed


async def measure_fault(
    transport: httpx.AsyncBaseTransport,
    recorder: Recorder,
    victim: Endpoint,
    fault: Callable[[], None],
    args: argparse.Namespace,
    *,
    client_timeout: float | None = 5.0,
) -> Fault:
    """Steady traffic, ``args.concurrency`` in flight (an httpx ``client_timeout``); ``fault``
    hits ``victim`` after ``args.before`` s, watched for ``args.watch`` s after. The requests
    in flight then are waited for up to ``DRAIN`` s more (the fault still on), and the ones
    still waiting are counted as failures."""
    results: list[bool] = []
    latencies: list[float] = []
    stop = time.perf_counter() + args.before + args.watch

    async with httpx.AsyncClient(
        transport=transport, base_url="http://service", timeout=client_timeout
    ) as client:

        async def worker() -> None:
            while time.perf_counter() < stop:
                start, ok = time.perf_counter(), False
                try:
                    ok = (await client.get("/")).status_code == 200
                except httpx.HTTPError:
                    pass
                finally:  # cancelled, still waiting at the end of the drain: a failure too
                    results.append(ok)
                    latencies.append(time.perf_counter() - start)

        async def faulter() -> float:
            await asyncio.sleep(args.before)
            at = time.perf_counter()
            await asyncio.to_thread(fault)
            return at

        hit = asyncio.create_task(faulter())
        workers = asyncio.gather(*(worker() for _ in range(args.concurrency)))
        try:
            await asyncio.wait_for(workers, args.before + args.watch + DRAIN)
        except TimeoutError:
            pass
        at = await hit
    after = [t - at for t, port in recorder.sent if port == victim.port and t >= at]
    return Fault(
        failures=results.count(False),
        attempts_after=len(after),
        last_after=max(after) if after else None,
        total=len(results),
        latencies=latencies,
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the report ------------------------------------------------------------------------------


def quiet_heap() -> None:
    """Collect, then freeze what is left (``gc.freeze``): the rounds before, kept for the
    report, are not scanned again. Without it a full collection of this process's heap, which
    grows with every round measured, paused the event loop for about 20 ms a few times a
    run, and in the open loop a pause delays every request due during it."""
    gc.collect()
    gc.freeze()


async def latency_rows(args: argparse.Namespace, share: float, open_loop: bool) -> list[str]:
    endpoints = [
        Endpoint(seed=1),
        Endpoint(slow=args.slow, share=share, seed=2),
        Endpoint(seed=3),
    ]
    slow_port = endpoints[1].port
    pooled: dict[str, list[float]] = {name: [] for name, _ in STRATEGIES}
    to_slow: dict[str, list[int]] = {name: [0, 0] for name, _ in STRATEGIES}
    busy: dict[str, float] = {name: 0.0 for name, _ in STRATEGIES}  # seconds measuring
    try:
        urls = [e.url for e in endpoints]
        async with httpx.AsyncClient(transport=RoundRobin(httpx.AsyncHTTPTransport(), urls)) as c:
            for _ in range(WARM_UP):  # new processes: their first answers are slow
                await c.get("http://service/")
        for _ in range(args.rounds):
            for name, strategy in STRATEGIES:  # interleaved: noise hits every row alike
                recorder = Recorder()
                quiet_heap()
                start = time.perf_counter()
                latencies = await measure_latency(strategy(recorder, urls), args, open_loop)
                busy[name] += time.perf_counter() - start
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
        P99[(open_loop, share, name)] = pct(ok, 0.99)
        LOAD[(open_loop, share, name)] = total / len(all_)
        SERVED[(open_loop, share, name)] = len(all_) / busy[name]
        rows.append(
            f"| {name} | {len(all_):,} | {len(all_) - len(ok)} | {pct(ok, 0.5) * 1e3:.2f} ms | "
            f"{pct(ok, 0.99) * 1e3:.1f} ms | {max(ok) * 1e3:.1f} ms | {sent / total:.1%} | "
            f"{total / len(all_):.3f} |"
        )
    return rows


WARM_UP = 100  # requests to new endpoints before a latency table, not counted

# (open loop, slow share, strategy) -> p99 seconds, attempts per request, requests a second
P99: dict[tuple[bool, float, str], float] = {}
LOAD: dict[tuple[bool, float, str], float] = {}
SERVED: dict[tuple[bool, float, str], float] = {}


def hedging_goals(share: float, open_loop: bool) -> list[str]:
    """The hedging goals: p99 within 1.5x of the all-healthy p99 (no protection, every
    endpoint fast, the same loop), extra load <= 10 %."""
    lines = []
    healthy = P99.get((open_loop, 0.0, "round robin, no protection"))
    for name in sorted(HEDGED):
        slow = P99.get((open_loop, share, name))
        if healthy is None or slow is None:
            continue
        extra = LOAD[(open_loop, share, name)] - 1
        lines.append(
            f"- {name}: p99 {slow * 1e3:.1f} ms with one endpoint slow, {slow / healthy:.2f}x "
            f"the all-healthy p99 (goal <= 1.5x: {'met' if slow <= 1.5 * healthy else 'not met'}"
            f"); extra load {extra:.1%} (goal <= 10 %: {'met' if extra <= 0.10 else 'not met'})."
        )
    return lines


FAULT_STRATEGIES: list[tuple[str, Strategy]] = [
    *STRATEGIES,
    (f"failover + P2C + health checks (every {HEALTH_INTERVAL} s)", failover_p2c_health),
]


async def run_fault(strategy: Strategy, args: argparse.Namespace, *, hang: bool) -> Fault:
    """One strategy against three fresh endpoints, the third killed (or, ``hang``, stopped)
    after ``args.before`` s; the round-robin rows wait at most ``CLIENT_TIMEOUT`` per attempt
    when it hangs (an httpx client timeout), the others as ``HttpPolicy()`` says."""
    endpoints = [Endpoint(seed=i) for i in range(3)]
    try:
        recorder = Recorder()
        transport = strategy(recorder, [e.url for e in endpoints])
        victim = endpoints[2]
        quiet_heap()
        if not hang:
            return await measure_fault(transport, recorder, victim, victim.kill, args)
        timeout = CLIENT_TIMEOUT if isinstance(transport, RoundRobin) else None
        return await measure_fault(
            transport, recorder, victim, victim.stop, args, client_timeout=timeout
        )
    finally:
        for e in endpoints:
            e.kill()


def last_sent(fault: Fault, watch: float) -> str:
    """When the last attempt went to the victim, for the report."""
    if fault.last_after is None:
        return "none"
    last = f"{fault.last_after * 1e3:,.1f} ms"
    if fault.last_after > watch * 0.9:
        last += " (still going at the end)"
    return last


CLIENT_TIMEOUT = 2.0  # the httpx client's in the hang table, for the round-robin rows
HANGS: dict[str, Fault] = {}  # strategy -> its row in the hang table


async def fault_rows(args: argparse.Namespace, *, hang: bool) -> list[str]:
    """A row per strategy with the victim killed or, with ``hang``, stopped (SIGSTOP); the
    hang table also gives the caller's p99 and worst latency."""
    victim, fault = ("hung", "stop") if hang else ("dead", "kill")
    latency = ["p99", "max"] if hang else []
    header = ["strategy", "requests", "failed for the caller", *latency]
    header += [f"attempts to the {victim} endpoint after the {fault}"]
    header += [f"last one sent after the {fault}"]
    rows = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, strategy in FAULT_STRATEGIES:
        seen = await run_fault(strategy, args, hang=hang)
        cells = [name, f"{seen.total:,}", f"{seen.failures:,}"]
        if hang:
            HANGS[name] = seen
            cells += [f"{pct(seen.latencies, 0.99) * 1e3:,.1f} ms"]
            cells += [f"{max(seen.latencies) * 1e3:,.1f} ms"]
        cells += [f"{seen.attempts_after:,}", last_sent(seen, args.watch)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def hang_goals(watch: float) -> list[str]:
    """When an endpoint dies, the time until no request goes to it: <= one health interval
    with a health check, <= the breaker's window without one."""
    lines = []
    breaker = BreakerOptions()  # HttpPolicy()'s breaker
    health = HANGS.get(FAULT_STRATEGIES[-1][0])
    if health is not None:
        last = health.last_after or 0.0
        met = "met" if last <= HEALTH_INTERVAL else "not met"
        lines.append(
            f"- {FAULT_STRATEGIES[-1][0]}: the last attempt to the hung endpoint "
            f"{last * 1e3:,.1f} ms after the stop (goal <= one interval, "
            f"{HEALTH_INTERVAL * 1e3:.0f} ms: {met})."
        )
    p2c = HANGS.get("failover + P2C (`endpoints=`)")
    if p2c is not None:
        window = breaker.window
        size = f"{window.size} calls" if isinstance(window, CountWindow) else repr(window)
        within = isinstance(window, CountWindow) and p2c.attempts_after <= window.size
        opened = "could have" if p2c.attempts_after >= breaker.minimum_calls else "could not have"
        last = f"{(p2c.last_after or 0.0) * 1e3:,.1f} ms after it"
        if (p2c.last_after or 0.0) > watch * 0.9:
            last += ", at the end of the watch"
        lines.append(
            f"- failover + P2C (`endpoints=`), no health check: {p2c.attempts_after:,} attempts "
            f"reached the hung endpoint after the stop, the last {last}; "
            f"its breaker needs `minimum_calls={breaker.minimum_calls}` in a window of {size}, "
            f"so it {opened} opened (goal <= the breaker's window: "
            f"{'met' if within else 'not met'})."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="per strategy and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--rate", type=float, default=200.0, help="open loop: requests/s")
    parser.add_argument(
        "--open-requests", type=int, default=500, help="open loop: per strategy and round"
    )
    parser.add_argument(
        "--max-outstanding", type=int, default=64, help="open loop: more are not started"
    )
    parser.add_argument("--slow", type=float, default=0.2, help="seconds of a slow answer")
    parser.add_argument("--slow-share", type=float, default=0.1, help="of the slow endpoint's")
    parser.add_argument("--before", type=float, default=1.0, help="seconds before the fault")
    parser.add_argument("--watch", type=float, default=5.0, help="seconds watched after it")
    parser.add_argument("--quick", action="store_true", help="about a minute, prints only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "ENDPOINTS.md")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        fd, slow, share, seed = args.serve
        serve(int(fd), float(slow), float(share), int(seed))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that kill_all runs
    if args.quick:
        args.requests, args.open_requests, args.rounds = 300, 150, 1
        args.before, args.watch = 0.5, 1.5
    latency = asyncio.run(latency_rows(args, args.slow_share, open_loop=False))
    baseline = asyncio.run(latency_rows(args, 0.0, open_loop=False))
    open_latency = asyncio.run(latency_rows(args, args.slow_share, open_loop=True))
    open_baseline = asyncio.run(latency_rows(args, 0.0, open_loop=True))
    death = asyncio.run(fault_rows(args, hang=False))
    hang = asyncio.run(fault_rows(args, hang=True))
    policy = HttpPolicy()
    breaker = BreakerOptions()  # HttpPolicy()'s breaker
    window = breaker.window
    served = [SERVED[(False, 0.0, name)] for name, _ in STRATEGIES]
    lines = [
        "# Several endpoints of one service",
        "",
        f"Python {platform.python_version()}, httpx {httpx.__version__}, "
        f"{sys.platform}, 2 cores shared. Three uvicorn endpoints, one process each, on "
        "loopback. Produced by `python benchmarks/endpoints.py`.",
        "",
        f"## One endpoint answers {args.slow_share:.0%} of its requests after "
        f"{args.slow * 1e3:.0f} ms",
        "",
        "Measured twice. In a closed loop a fixed number of callers each send a request as soon",
        "as the last one answered: on two cores shared by the client and three servers it keeps",
        "the CPU busy, so the latencies are mostly queueing for the CPU, and a slow answer also",
        "holds back the requests its caller would have sent meanwhile (coordinated omission:",
        "the queueing delay they would have met is not measured). In an open loop requests start",
        "on a fixed schedule, whatever is outstanding, and each is timed from its scheduled start,",
        "as independent users would see it; at a rate well below what the machine serves, the",
        "latencies are service times. Hedging spends spare capacity to cut the tail: in the",
        "closed loop there is none (a hedge queues behind the requests it should overtake, and",
        "P2C moving load off the slow endpoint lengthens the queues of the others), in the open",
        "loop there is.",
        "",
        f"### Closed loop, {args.concurrency} in flight, saturating",
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
        *hedging_goals(args.slow_share, open_loop=False),
        "",
        f"### Open loop, {args.rate:g} requests/s",
        "",
        f"The closed loop above served {min(served):,.0f} to {max(served):,.0f} requests/s "
        f"per strategy with every endpoint fast; the open loop starts {args.rate:g} a second "
        f"({args.rate / max(served):.0%} to {args.rate / min(served):.0%} of that), each "
        f"request a task, timed from its scheduled start. {args.rounds} interleaved rounds of "
        f"{args.open_requests:,} requests per strategy, pooled; a request due while "
        f"{args.max_outstanding} are outstanding is not started and counts as failed.",
        "",
        *open_latency,
        "",
        "The same with all three endpoints fast:",
        "",
        *open_baseline,
        "",
        "The same goals, against the p99 of the open loop's all-fast first row:",
        "",
        *hedging_goals(args.slow_share, open_loop=True),
        "",
        "## One endpoint dies",
        "",
        f"Steady traffic to three healthy endpoints, {args.concurrency} requests in flight; "
        f"after {args.before:g} s one endpoint's process is killed (its port then refuses "
        f"connections), and the traffic goes on for {args.watch:g} s. No health check but in "
        "the last row: only the failed connections tell.",
        "",
        *death,
        "",
        f"For comparison, the breaker alone (`HttpPolicy()` defaults: `{window!r}`, "
        f"`minimum_calls={breaker.minimum_calls}`) opens after {breaker.minimum_calls} failed "
        "attempts to that endpoint at the earliest.",
        "",
        "## One endpoint hangs",
        "",
        f"The same, but after {args.before:g} s the endpoint's process is stopped (SIGSTOP): "
        "the kernel still accepts connections into its listen backlog, but nothing answers, "
        "neither on new connections nor on the kept-alive ones. Nothing fails fast: a request "
        "sent to it waits for a timeout. The round-robin rows have an httpx client timeout of "
        f"{CLIENT_TIMEOUT:g} s (per attempt; without one httpx waits 5 s, its default); the "
        "`endpoints=` rows have none, so the `HttpPolicy()` defaults decide: "
        f"`timeout={policy.timeout:g}` s per attempt, `total_timeout={policy.total_timeout:g}` "
        f"s per request, `attempts={policy.retry.attempts}`. After the {args.watch:g} s watched, "
        "the requests in flight are waited for (the endpoint still stopped) before the count; "
        "the latencies are every request's, a failed one's until it failed.",
        "",
        *hang,
        "",
        "The goal: when an endpoint dies, the time until no request goes to it is at most one "
        "health interval with a health check, at most the breaker's window without one.",
        "",
        *hang_goals(args.watch),
        "",
        "Reading the numbers: with every endpoint fast, the three strategies have about the",
        "same median (the transport's own work per request is small next to a loopback round",
        "trip). With one endpoint slow now and then, P2C sends most requests to the two fast",
        "ones (a peak EWMA remembers a slow answer for about its 10 s time constant); in the",
        "closed loop two server processes then carry the load of three and the median rises",
        "with their queues, in the open loop they have room to spare and it does not. The",
        "tail is what that buys: the slow endpoint's 200 ms answers reach the caller only",
        "while its cost is being learnt, once per transport. A first attempt that a hedge",
        "overtook counts for P2C as taking at least as long as it ran, so hedging does not",
        "hide the slow endpoint from it. Hedging needs spare capacity: in the closed loop a",
        "hedge waits in the same queues as the request it should overtake. In the open loop",
        "a pause of the client's event loop delays every request due during it (the schedule",
        "does not wait); each round starts with this process's heap collected and frozen",
        "(`gc.freeze`), as a full collection of everything the earlier rounds left paused",
        "it for about 20 ms, a p99 of its own. When an",
        "endpoint dies, the first refused connection makes it the costliest endpoint and its",
        "requests fail over at once, so callers see no failure and it gets no more traffic",
        "long before its breaker could open. When it hangs, nothing fails before a timeout:",
        "requests already sent to it wait for theirs (the max latency: the httpx timeout, or",
        "`HttpPolicy`'s attempt timeout, after which a retry goes to another endpoint), and",
        "without a health check P2C knows it only by its requests in flight (a score of",
        "`(in flight + 1) x cost`, the cost fading while nothing is observed), so it may",
        "still send it a request now and then until the first attempt times out. A hedge",
        "rescues the caller (no request waited for a timeout), but the attempt it leaves on",
        "the hung endpoint is cancelled after about the hedge delay, so that endpoint looks",
        "about as fast as the others and keeps getting first attempts, each overtaken, within",
        "the hedge budget. A health check (the check's own timeout is",
        f"{HEALTH_INTERVAL / 2:g} s) takes it out of the choice within about an interval.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.out.write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
