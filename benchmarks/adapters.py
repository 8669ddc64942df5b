"""What the adapters cost: ResilientTransport and ResilienceMiddleware against bare httpx/ASGI.

Usage::

    python benchmarks/adapters.py                # about 25 seconds in all
    python benchmarks/adapters.py --seconds 1 --rounds 3

Two measurements, each interleaved (bare, wrapped, wrapped, bare, ...); the overhead is the
median of the per-round ratios, so load from other processes mostly cancels out:

1. Loopback, the number that matters: requests/s from ``httpx.AsyncClient`` (``--concurrency``
   requests in flight) to a uvicorn server in a separate process on 127.0.0.1, through
   ``ResilientTransport`` vs the bare ``AsyncHTTPTransport``, and to an app with
   ``ResilienceMiddleware`` vs the same app without it.
2. In process, the adapters' own cost with no network: microseconds per request handled by
   ``MockTransport`` directly and through ``ResilientTransport``, and per direct ASGI call of
   a minimal app with and without the middleware, and through the middleware with and
   without a request scope per request (opened once a ``Coalesce(scope="request")`` exists).

Only loopback sockets are used; the server process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
from harness import serve_asgi, start_server, stop_server
from resilience.integrations.asgi import ResilienceMiddleware
from resilience.integrations.httpx import BulkheadOptions, HttpPolicy, ResilientTransport

from resilience import request_scope

BODY = b"ok"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
END = {"type": "http.response.body", "body": BODY}

# A realistic middleware configuration: every option that costs something on the way through.
MIDDLEWARE = {"max_concurrent": 10_000, "rate": 1e9, "timeout": 30.0, "exclude": ("/health",)}
POLICY = HttpPolicy(timeout=30.0, bulkhead=BulkheadOptions(max_concurrent=10_000))


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The smallest ASGI app: 200 ``ok`` (lifespan ignored)."""
    if scope["type"] != "http":
        return
    await send(START)
    await send(END)


def wrapped_app() -> Any:
    """``bare_app`` behind ``ResilienceMiddleware``."""
    return ResilienceMiddleware(bare_app, **MIDDLEWARE)


# --- the server process --------------------------------------------------------------------


def serve(port: int) -> None:
    """Run uvicorn with two mounts: ``/bare/...`` and ``/wrapped/...`` (child process)."""
    wrapped = wrapped_app()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/wrapped"):
            await wrapped(scope, receive, send)
        else:
            await bare_app(scope, receive, send)

    serve_asgi(app, port, log_level="warning")


# --- measuring -----------------------------------------------------------------------------


async def rate(client: httpx.AsyncClient, url: str, seconds: float, concurrency: int) -> float:
    """Requests/s completed by ``concurrency`` workers in ``seconds``."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            response = await client.get(url)
            assert response.status_code == 200, response.status_code
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def interleave(
    rounds: int, a: Callable[[], Awaitable[float]], b: Callable[[], Awaitable[float]]
) -> tuple[float, float, float]:
    """Medians of ``a`` and ``b`` and of their paired ratio ``b / a``, over ``rounds`` rounds.

    Rounds alternate the order (ab, ba, ab, ...) after a warm-up, and the ratio is taken per
    round, so load from other processes that drifts over the run cancels out.
    """
    await a()
    await b()
    xs, ys, ratios = [], [], []
    for i in range(rounds):
        if i % 2:
            y = await b()
            x = await a()
        else:
            x = await a()
            y = await b()
        xs.append(x)
        ys.append(y)
        ratios.append(y / x)
    return statistics.median(xs), statistics.median(ys), statistics.median(ratios)


def overhead(ratio: float, *, higher_is_better: bool) -> str:
    """The paired ratio as an overhead in %."""
    percent = (1 - ratio) * 100 if higher_is_better else (ratio - 1) * 100
    return f"{percent:+.1f} %"


async def loopback(url: str, seconds: float, rounds: int, concurrency: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bare_client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(limits=limits))
    inner = httpx.AsyncHTTPTransport(limits=limits)
    resilient = httpx.AsyncClient(transport=ResilientTransport(inner, policy=POLICY))
    bare, wrapped = f"{url}/bare/x", f"{url}/wrapped/x"
    pairs = [  # (label, client, url) of the bare side, then of the resilient one
        (
            ("client  bare transport    ", bare_client, bare),
            ("        ResilientTransport", resilient, bare),
        ),
        (
            ("server  app               ", bare_client, bare),
            ("        app + middleware  ", bare_client, wrapped),
        ),
    ]
    async with bare_client, resilient:
        for (label_a, client_a, url_a), (label_b, client_b, url_b) in pairs:
            b, w, r = await interleave(
                rounds,
                partial(rate, client_a, url_a, seconds, concurrency),
                partial(rate, client_b, url_b, seconds, concurrency),
            )
            print(f"  {label_a} {b:9.0f} req/s")
            print(f"  {label_b} {w:9.0f} req/s   overhead {overhead(r, higher_is_better=True)}")


async def per_call(fn: Callable[[], Awaitable[object]], seconds: float) -> float:
    """Microseconds per ``await fn()``, over about ``seconds``."""
    n = 0
    stop = time.perf_counter() + seconds
    started = time.perf_counter()
    while True:
        for _ in range(200):
            await fn()
        n += 200
        if time.perf_counter() >= stop:
            break
    return (time.perf_counter() - started) / n * 1e6


async def in_process(seconds: float, rounds: int) -> None:
    def ok(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=BODY)

    bare = httpx.MockTransport(ok)
    resilient = ResilientTransport(httpx.MockTransport(ok), policy=POLICY)
    request = httpx.Request("GET", "http://x.test/")
    b, w, _ = await interleave(
        rounds,
        lambda: per_call(lambda: bare.handle_async_request(request), seconds),
        lambda: per_call(lambda: resilient.handle_async_request(request), seconds),
    )
    print(f"  MockTransport.handle_async_request {b:6.1f} us/request")
    print(f"  ... through ResilientTransport     {w:6.1f} us/request   (+{w - b:.1f} us)")

    scope = {"type": "http", "path": "/x", "headers": [(b"host", b"x")], "method": "GET"}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    middleware = wrapped_app()
    b, w, _ = await interleave(
        rounds,
        lambda: per_call(lambda: bare_app(scope, receive, send), seconds),
        lambda: per_call(lambda: middleware(scope, receive, send), seconds),
    )
    print(f"  ASGI app, called directly          {b:6.2f} us/request")
    print(f"  ... + ResilienceMiddleware         {w:6.2f} us/request   (+{w - b:.2f} us)")

    async def scoped(in_use: bool) -> float:
        request_scope.in_use = in_use  # as if a Coalesce(scope="request") existed, or not
        return await per_call(lambda: middleware(scope, receive, send), seconds)

    in_use = request_scope.in_use
    try:
        b, w, _ = await interleave(rounds, lambda: scoped(False), lambda: scoped(True))
    finally:
        request_scope.in_use = in_use
    print(f"  ... + a request scope per request  {w:6.2f} us/request   (+{w - b:.2f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    proc, port = start_server(__file__)
    try:
        print(f"loopback, uvicorn (h11) in a separate process, {args.concurrency} in flight:")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(loopback(url, args.seconds, args.rounds, args.concurrency))
    finally:
        stop_server(proc)
    print("in process, no network:")
    asyncio.run(in_process(min(args.seconds, 0.25), args.rounds))
    print(f"(python {sys.version.split()[0]}, pid {os.getpid()}, median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
