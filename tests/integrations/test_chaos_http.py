"""HTTP chaos: an httpx client with ResilientTransport -> fault proxy -> uvicorn upstream.

Short per-attempt timeouts (0.2 s) and small breaker windows keep each scenario to a second
or two. Each asserts behaviour (timeouts, retries, the breaker opening and closing again, no
call outliving its budget); measured numbers are printed (``pytest -s``) and recorded in
docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from resilience.integrations.httpx import (
    AttemptTimeout,
    BreakerOptions,
    CircuitOpen,
    DeadlineExceeded,
    HttpPolicy,
    ResilientTransport,
    RetryOptions,
)
from tenacity import wait_fixed

from resilience import CountWindow

from ..asgi_support import LiveServer, serve
from ..faultproxy import Connection, FaultProxy
from ..helpers import until

TIMEOUT = 0.2  # per attempt
ATTEMPTS = 3
WAIT = 0.01  # between attempts
OPEN_FOR = 0.5
BUDGET = ATTEMPTS * TIMEOUT + (ATTEMPTS - 1) * WAIT  # the longest a request may take
SLACK = 0.4  # scheduling on a loaded 2-core machine (uvicorn runs in a thread)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Upstream:
    """A pure ASGI app: ``/`` 200, ``/big`` 20 KiB slowly, ``/retry-after?hex=..`` a 503.

    The 503 carries the raw ``Retry-After`` bytes given hex-encoded in the query string.
    """

    def __init__(self) -> None:
        self.hits: Counter[tuple[str, str]] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        method, path = scope["method"], scope["path"]
        self.hits[method, path] += 1
        if path == "/retry-after":
            value = bytes.fromhex(scope["query_string"].decode().removeprefix("hex="))
            await send(
                {"type": "http.response.start", "status": 503, "headers": [(b"retry-after", value)]}
            )
            await send({"type": "http.response.body", "body": b"busy"})
        elif path == "/big":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(20):
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, LiveServer]]:
    """One uvicorn upstream on a free loopback port for the module."""
    app = Upstream()
    with serve(app) as server:
        yield app, server


@pytest.fixture
async def proxy(upstream: tuple[Upstream, LiveServer]) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the upstream; its hit counter starts at zero."""
    app, server = upstream
    app.hits.clear()
    p = await FaultProxy("127.0.0.1", server.port, seed=2).start()
    yield p
    p.clear()
    if p.refuse:
        await p.set_refuse(False)
    await p.stop()


@pytest.fixture
async def client(proxy: FaultProxy) -> AsyncIterator[httpx.AsyncClient]:
    """A client with ResilientTransport (0.2 s attempts, 3 attempts, a small breaker)."""
    async with make_client(proxy) as c:
        yield c


def make_client(proxy: FaultProxy, **options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` through ``proxy`` with short timeouts and a small window."""
    settings: dict[str, Any] = {
        "retry": RetryOptions(attempts=ATTEMPTS, wait=wait_fixed(WAIT)),
        "timeout": TIMEOUT,
        "breaker": BreakerOptions(window=CountWindow(6), minimum_calls=6, open_for=OPEN_FOR),
        # every attempt runs its full timeout here (BUDGET); total_timeout has tests of its own
        "total_timeout": None,
    }
    settings.update(options)
    transport = ResilientTransport(httpx.AsyncHTTPTransport(), policy=HttpPolicy(**settings))
    return httpx.AsyncClient(transport=transport, base_url=proxy.url_for("http"))


def report(name: str, *lines: str) -> None:
    """Print measured numbers under a scenario heading (shown with ``pytest -s``)."""
    print(f"\n[chaos-http] {name}")
    for line in lines:
        print(f"  {line}")


async def until_open(client: httpx.AsyncClient, expected: type[Exception]) -> tuple[int, float]:
    """Send GETs until the breaker rejects; ``(requests failed with expected, slowest)``."""
    failed, slowest = 0, 0.0
    for _ in range(20):
        start = time.monotonic()
        try:
            await client.get("/")
        except CircuitOpen:
            return failed, slowest
        except expected:
            failed += 1
        slowest = max(slowest, time.monotonic() - start)
    raise AssertionError("the breaker never opened")


async def until_healthy(client: httpx.AsyncClient) -> float:
    """After a fault is lifted, GET until a 200 (rejected while open); seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < 10:
        try:
            response = await client.get("/")
            if response.status_code == 200:
                return time.monotonic() - start
        except CircuitOpen:
            pass
        await asyncio.sleep(0.02)
    raise AssertionError("the upstream never came back")


async def test_slow_upstream_times_out_opens_and_recovers(
    proxy: FaultProxy, client: httpx.AsyncClient, upstream: tuple[Upstream, LiveServer]
) -> None:
    """Latency beyond the attempt timeout: timeouts, retries, breaker opens; closes after."""
    assert (await client.get("/")).status_code == 200
    proxy.down.latency = 0.5
    start = time.monotonic()
    failed, slowest = await until_open(client, AttemptTimeout)
    opened_after = time.monotonic() - start
    hits = upstream[0].hits["GET", "/"]
    rejected = time.monotonic()
    with pytest.raises(CircuitOpen):
        await client.get("/")
    reject_took = time.monotonic() - rejected
    proxy.clear()
    healthy = await until_healthy(client)
    report(
        "slow upstream (responses delayed 0.5 s, attempt timeout 0.2 s)",
        f"{failed} requests timed out ({hits - 1} attempts reached the upstream) before the "
        f"breaker opened, {opened_after:.2f}s; slowest request {slowest:.3f}s "
        f"(budget {BUDGET:.2f}s)",
        f"rejected while open in {reject_took * 1000:.2f}ms; healthy {healthy:.2f}s after lift",
    )
    assert failed >= 1
    assert hits - 1 >= failed * ATTEMPTS  # each timed-out request was tried every attempt
    assert slowest < BUDGET + SLACK  # (the rejection above is CircuitOpen: never sent)


async def test_blackholed_upstream_never_hangs(
    proxy: FaultProxy, client: httpx.AsyncClient, upstream: tuple[Upstream, LiveServer]
) -> None:
    """Blackholed: attempts time out, the breaker opens, nothing outlives its budget."""
    assert (await client.get("/")).status_code == 200
    proxy.blackhole = True
    start = time.monotonic()
    failed, slowest = await until_open(client, AttemptTimeout)
    opened_after = time.monotonic() - start
    assert upstream[0].hits["GET", "/"] == 1  # nothing got through
    proxy.clear()
    healthy = await until_healthy(client)
    report(
        "blackholed upstream (accepts, never answers)",
        f"{failed} requests timed out before the breaker opened ({opened_after:.2f}s); "
        f"slowest request {slowest:.3f}s (budget {BUDGET:.2f}s)",
        f"healthy {healthy:.2f}s after lift",
    )
    assert failed >= 1
    assert slowest < BUDGET + SLACK


async def test_blackhole_respects_a_deadline(proxy: FaultProxy) -> None:
    """A request with a 0.3 s deadline into a blackhole ends in DeadlineExceeded by then."""
    async with make_client(proxy, timeout=5.0) as client:
        proxy.blackhole = True
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.get("/", extensions={"resilience": {"deadline": 0.3}})
        took = time.monotonic() - start
    report("blackhole with a 0.3 s deadline", f"DeadlineExceeded after {took:.3f}s")
    assert took < 0.3 + SLACK


async def test_a_blackhole_cut_by_deadlines_opens_the_breaker(proxy: FaultProxy) -> None:
    """Requests whose deadline (0.1 s) cuts their attempts (5 s timeout) into a blackhole:
    each cut attempt is a failure, so the breaker opens after the window's few calls."""
    async with make_client(proxy, timeout=5.0) as client:
        assert (await client.get("/")).status_code == 200
        proxy.blackhole = True
        start = time.monotonic()
        cut = 0
        for _ in range(20):
            try:
                await client.get("/", extensions={"resilience": {"deadline": 0.1}})
            except DeadlineExceeded:
                cut += 1
            except CircuitOpen:
                break
        else:
            raise AssertionError("the breaker never opened")
        opened_after = time.monotonic() - start
    report(
        "blackhole, every request cut by its 0.1 s deadline (attempt timeout 5 s)",
        f"breaker open after {cut} cut requests, {opened_after:.2f}s",
    )
    assert cut <= 6  # the window: 6 calls, a ratio of 0.5, so 6 failures at most


def _reply_in_flight(conn: Connection) -> bool:
    """Whether a response is sitting in the proxy on ``conn``."""
    return conn.held_down > 0


async def cut_first_reply(proxy: FaultProxy) -> None:
    """Cut the first connection that has a response in flight (bounded wait)."""
    await until(lambda: proxy.cut(_reply_in_flight) > 0, 10, "a response in flight", every=0.001)


async def test_lost_response_is_retried_for_get_not_post(
    proxy: FaultProxy, client: httpx.AsyncClient, upstream: tuple[Upstream, LiveServer]
) -> None:
    """A connection cut with the response in flight: GET is retried, POST is not."""
    hits = upstream[0].hits
    proxy.down.latency = 0.05  # every response sits in the proxy for 50 ms
    cutter = asyncio.ensure_future(cut_first_reply(proxy))
    response = await client.get("/")
    await cutter
    assert response.status_code == 200
    assert hits["GET", "/"] == 2  # sent, lost, sent again

    cutter = asyncio.ensure_future(cut_first_reply(proxy))
    with pytest.raises(httpx.TransportError) as caught:
        await client.post("/", content=b"order #1")
    await cutter
    assert hits["POST", "/"] == 1  # processed once, never repeated
    report(
        "connection cut with the response in flight",
        f"GET: 200 after a retry (upstream hits {hits['GET', '/']}); "
        f"POST: {type(caught.value).__name__} (upstream hits {hits['POST', '/']})",
    )


async def test_cutting_every_response_opens_the_breaker(
    proxy: FaultProxy, client: httpx.AsyncClient
) -> None:
    """Every response lost: GETs fail after their retries and the breaker opens."""
    proxy.down.latency = 0.02
    stop = asyncio.Event()

    async def cutter() -> None:
        while not stop.is_set():
            proxy.cut(_reply_in_flight)
            await asyncio.sleep(0.001)

    task = asyncio.ensure_future(cutter())
    try:
        failed, slowest = await until_open(client, httpx.TransportError)
    finally:
        stop.set()
        await task
    proxy.clear()
    healthy = await until_healthy(client)
    report(
        "every response cut",
        f"{failed} requests failed before the breaker opened; slowest {slowest:.3f}s; "
        f"healthy {healthy:.2f}s after lift",
    )
    assert failed >= 1


async def test_cut_mid_body_reaches_the_caller(
    proxy: FaultProxy, client: httpx.AsyncClient, upstream: tuple[Upstream, LiveServer]
) -> None:
    """A cut after the headers surfaces from the body read; the transport has returned by then.

    This is the documented boundary: retries and the breaker cover a request up to its
    response headers, so the body's error reaches the caller and the attempt counted as a
    success.
    """
    stop = asyncio.Event()

    async def cutter() -> None:
        while not stop.is_set():
            if proxy.cut(lambda c: c.bytes_down > 4096):
                return
            await asyncio.sleep(0.001)

    task = asyncio.ensure_future(cutter())
    try:
        with pytest.raises(httpx.TransportError):
            await client.get("/big")
    finally:
        stop.set()
        await task
    assert upstream[0].hits["GET", "/big"] == 1


async def test_refused_upstream_opens_the_breaker_quickly(
    proxy: FaultProxy, client: httpx.AsyncClient
) -> None:
    """Nobody listening: connect errors, retried at once, the breaker opens within ms."""
    assert (await client.get("/")).status_code == 200
    await proxy.set_refuse(True)
    proxy.cut()  # the pooled keep-alive connection goes too: Redis-style "down"
    start = time.monotonic()
    failed, slowest = await until_open(client, httpx.ConnectError)
    opened_after = time.monotonic() - start
    await proxy.set_refuse(False)
    healthy = await until_healthy(client)
    report(
        "refused (nobody listens)",
        f"{failed} requests failed with ConnectError; breaker open after "
        f"{opened_after * 1000:.0f}ms; slowest request {slowest * 1000:.1f}ms",
        f"healthy {healthy:.2f}s after lift",
    )
    assert failed >= 1
    assert slowest < TIMEOUT + SLACK  # no timeout involved: refused at once


RETRY_AFTER_VALUES = [
    pytest.param(b"garbage", id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b"-5", id="negative"),
    pytest.param(b"1e309", id="float-overflow"),
    pytest.param(b"9" * 400, id="huge-integer"),
    pytest.param(b"Thu, 01 Jan 1970 00:00:00 GMT", id="date-in-the-past"),
    pytest.param(b"Fri, 31 Dec 9999 23:59:59 GMT", id="date-far-ahead"),
    pytest.param(b"Mon, 99 Foo 2020 99:99:99 GMT", id="date-garbage"),
    pytest.param(b"\xb2", id="latin1-superscript-two"),
]


@pytest.mark.parametrize("value", RETRY_AFTER_VALUES)
async def test_malformed_retry_after_is_survived(proxy: FaultProxy, value: bytes) -> None:
    """A 503 with a hostile Retry-After is returned, never raised, within the request's bound."""
    async with make_client(
        proxy,
        retry=RetryOptions(attempts=ATTEMPTS, wait=wait_fixed(WAIT), retry_after_max=0.05),
        breaker=None,
    ) as client:
        start = time.monotonic()
        response = await client.get("/retry-after", params={"hex": value.hex()})
        took = time.monotonic() - start
    assert response.status_code == 503
    assert (b"retry-after", value) in response.headers.raw
    assert took < ATTEMPTS * 0.05 + SLACK
