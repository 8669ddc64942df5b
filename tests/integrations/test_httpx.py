"""Tests for resilience.integrations.httpx: ResilientTransport over MockTransport and uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from resilience.integrations import deadline
from resilience.integrations.httpx import (
    MAX_RETRY_AFTER,
    AttemptTimeout,
    BreakerOptions,
    BulkheadFull,
    BulkheadOptions,
    CircuitOpen,
    DeadlineExceeded,
    FallbackOptions,
    HealthCheckOptions,
    HedgeOptions,
    HttpPolicy,
    RateLimited,
    RateLimitOptions,
    ResilientTransport,
    RetryOptions,
    ThrottleOptions,
    origin_of,
    parse_retry_after,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from resilience import (
    BulkheadFullError,
    CircuitOpenError,
    CircuitState,
    Clock,
    MemoryStore,
    RateLimitedError,
    ResilienceError,
    ResilienceTimeoutError,
    SystemClock,
)
from resilience.testing import FakeClock

from ..asgi_support import serve
from ..helpers import advance, cancelled, raises_each, settle, started

ONCE = RetryOptions(attempts=1)
"""One attempt: no retry."""

OPENS_AT_ONCE = BreakerOptions(minimum_calls=1)
"""A breaker that opens on the first failure."""

Handler = Callable[[httpx.Request], Any]


class Tracked(httpx.AsyncByteStream):
    """A response body that records whether it was closed."""

    def __init__(self, body: bytes = b"body") -> None:
        self.body = body
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """A MockTransport handler answering from a script of statuses (the last one repeats)."""

    def __init__(self, *statuses: int, headers: dict[str, str] | None = None) -> None:
        self.statuses = list(statuses)
        self.headers = headers or {}
        self.requests: list[httpx.Request] = []
        self.bodies: list[Tracked] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        body = Tracked(f"{status}".encode())
        self.bodies.append(body)
        return httpx.Response(status, headers=self.headers, stream=body)

    @property
    def hits(self) -> int:
        return len(self.requests)


def make_client(handler: Handler, clock: Clock | None = None, **options: Any) -> httpx.AsyncClient:
    if clock is None:
        clock = FakeClock(autojump=True)
    policy = HttpPolicy(clock=clock, **options)
    transport = ResilientTransport(httpx.MockTransport(handler), policy=policy)
    return httpx.AsyncClient(transport=transport, base_url="http://upstream.test")


async def stale(request: httpx.Request, error: Exception) -> httpx.Response:
    """A fallback answering from a cache."""
    return httpx.Response(200, text="stale")


async def get_once(handler: Handler, clock: Clock | None = None, **options: Any) -> httpx.Response:
    """``GET /`` through a client of ``make_client(handler, clock, **options)``, closed after."""
    async with make_client(handler, clock, **options) as client:
        return await client.get("/")


# --- retry --------------------------------------------------------------------------------


async def test_success_passes_through() -> None:
    """A 200 is returned as is, after one call upstream."""
    upstream = Upstream(200)
    response = await get_once(upstream)
    assert response.status_code == 200
    assert response.text == "200"
    assert upstream.hits == 1


async def test_retries_failing_status_until_success() -> None:
    """A GET answered 503, 502 is retried; the 200 that follows is returned."""
    upstream = Upstream(503, 502, 200)
    response = await get_once(upstream)
    assert response.status_code == 200
    assert upstream.hits == 3


async def test_exhausted_attempts_return_last_response() -> None:
    """When attempts run out on a failing status, the last response comes back, readable."""
    upstream = Upstream(500)
    response = await get_once(upstream, retry=RetryOptions(attempts=3))
    assert response.status_code == 500
    assert response.text == "500"
    assert upstream.hits == 3


async def test_discarded_responses_are_closed() -> None:
    """Every response thrown away by a retry is closed; the returned one is left to the caller."""
    upstream = Upstream(503, 503, 200)
    transport = ResilientTransport(
        httpx.MockTransport(upstream), policy=HttpPolicy(clock=FakeClock(autojump=True))
    )
    request = httpx.Request("GET", "http://upstream.test/")
    response = await transport.handle_async_request(request)
    assert [b.closed for b in upstream.bodies] == [True, True, False]
    await response.aclose()
    assert upstream.bodies[-1].closed


async def test_retry_budget_caps_retries_across_requests() -> None:
    """A shared RetryBudget refuses retries once failures have drained half its tokens."""
    from resilience import RetryBudget

    budget = RetryBudget(name="client", max_tokens=4, token_ratio=0.1)
    upstream = Upstream(500)
    async with make_client(
        upstream, retry=RetryOptions(attempts=5, budget=budget), breaker=None
    ) as client:
        response = await client.get("/")
        assert response.status_code == 500
        first = upstream.hits
        response = await client.get("/")
        assert response.status_code == 500
    assert first == 2  # tokens 4 -> 3 (above half: retry) -> 2 (at half: stop)
    assert upstream.hits == first + 1  # the next request gets no retry at all


async def test_retry_after_seconds_is_honoured() -> None:
    """A 429 with ``Retry-After: 7`` makes the retry wait 7 s (on the fake clock)."""
    clock = FakeClock(autojump=True)
    upstream = Upstream(429, 200, headers={"Retry-After": "7"})
    response = await get_once(upstream, clock, total_timeout=None)
    assert response.status_code == 200
    assert clock.slept == [7.0]


async def test_retry_after_http_date_is_honoured() -> None:
    """A ``Retry-After`` HTTP-date 30 s ahead makes the retry wait about 30 s."""
    clock = FakeClock(autojump=True)
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    upstream = Upstream(503, 200, headers={"Retry-After": when})
    response = await get_once(upstream, clock, total_timeout=None)
    assert response.status_code == 200
    assert len(clock.slept) == 1
    assert 28.0 <= clock.slept[0] <= 30.0


async def test_retry_after_beyond_its_allowance_ends_retrying() -> None:
    """A ``Retry-After`` longer than ``retry_after_max`` is not waited: the 503 comes back."""
    clock = FakeClock(autojump=True)
    upstream = Upstream(503, 200, headers={"Retry-After": "3600"})
    async with make_client(
        upstream, clock, retry=RetryOptions(retry_after_max=2.5), total_timeout=None
    ) as client:
        response = await client.get("/")
    assert response.status_code == 503
    assert clock.slept == []
    assert upstream.hits == 1


def test_parse_retry_after() -> None:
    """Retry-After parses delay-seconds and HTTP-dates; a past date is 0, junk is None."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now=now) == 10.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    assert parse_retry_after(None) is None


async def test_transport_errors_are_retried() -> None:
    """A connection error is retried like a failing status."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200)

    response = await get_once(handler)
    assert response.status_code == 200
    assert calls == 3


async def test_last_transport_error_is_raised_unchanged() -> None:
    """When every attempt fails with a transport error, that error is raised as httpx made it."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("reset", request=request)

    async with make_client(handler, retry=RetryOptions(attempts=2)) as client:
        with pytest.raises(httpx.ReadError):
            await client.get("/")


async def test_post_is_not_retried_by_default() -> None:
    """A POST answered 503 is sent once and its 503 returned."""
    upstream = Upstream(503, 200)
    async with make_client(upstream) as client:
        response = await client.post("/", content=b"data")
    assert response.status_code == 503
    assert upstream.hits == 1
    assert "idempotency-key" not in upstream.requests[0].headers


async def test_post_retried_when_opted_in_with_same_idempotency_key() -> None:
    """With POST in ``RetryOptions.methods`` every attempt carries the same Idempotency-Key."""
    upstream = Upstream(503, 503, 200)
    methods = {"GET", "POST"}
    async with make_client(upstream, retry=RetryOptions(methods=methods)) as client:
        response = await client.post("/", content=b"data")
    assert response.status_code == 200
    keys = {r.headers["idempotency-key"] for r in upstream.requests}
    assert upstream.hits == 3
    assert len(keys) == 1
    assert all(r.content == b"data" for r in upstream.requests)


async def test_post_retried_per_request_keeps_callers_key() -> None:
    """``extensions={"resilience": {"retry": True}}`` retries one POST; its own key is kept."""
    upstream = Upstream(500, 200)
    async with make_client(upstream) as client:
        response = await client.post(
            "/",
            json={"a": 1},
            headers={"Idempotency-Key": "mine"},
            extensions={"resilience": {"retry": True}},
        )
    assert response.status_code == 200
    assert [r.headers["idempotency-key"] for r in upstream.requests] == ["mine", "mine"]


async def test_streaming_body_is_not_retried() -> None:
    """A request whose body is a one-shot stream is sent once, even if retry is asked for."""
    upstream = Upstream(503, 200)

    async def body() -> AsyncIterator[bytes]:
        yield b"chunk"

    async with make_client(upstream) as client:
        response = await client.put("/", content=body(), extensions={"resilience": {"retry": True}})
    assert response.status_code == 503
    assert upstream.hits == 1


async def test_per_request_retry_off() -> None:
    """``extensions={"resilience": {"retry": False}}`` makes a GET a single attempt."""
    upstream = Upstream(503, 200)
    async with make_client(upstream) as client:
        response = await client.get("/", extensions={"resilience": {"retry": False}})
    assert response.status_code == 503
    assert upstream.hits == 1


async def test_unknown_extension_keys_are_rejected() -> None:
    """A typo in the per-request options is an error, not a silent no-op."""
    async with make_client(Upstream(200)) as client:
        with pytest.raises(ValueError, match="retries"):
            await client.get("/", extensions={"resilience": {"retries": False}})
        with pytest.raises(TypeError, match="bool"):
            await client.get("/", extensions={"resilience": {"retry": "no"}})


async def test_custom_failure_statuses() -> None:
    """``failure_statuses`` decides which statuses are failures (here 404, not 503)."""
    upstream = Upstream(404, 503)
    response = await get_once(upstream, failure_statuses={404})
    assert response.status_code == 503
    assert upstream.hits == 2


# --- circuit breaker ----------------------------------------------------------------------


async def test_failing_upstream_opens_breaker_and_calls_stop() -> None:
    """After ``minimum_calls`` failures the breaker opens and upstream is no longer called."""
    upstream = Upstream(500)
    async with make_client(upstream, retry=ONCE, breaker=BreakerOptions(minimum_calls=4)) as client:
        for _ in range(4):
            assert (await client.get("/")).status_code == 500
        await raises_each(6, CircuitOpen, client.get, "/")
    assert upstream.hits == 4


async def test_rejections_are_httpx_and_core_errors() -> None:
    """CircuitOpen is an httpx.TransportError and a CircuitOpenError, with ``request`` set."""
    upstream = Upstream(503)
    async with make_client(upstream, retry=ONCE, breaker=OPENS_AT_ONCE) as client:
        await client.get("/")
        try:
            await client.get("/path")
        except httpx.HTTPError as exc:
            error: Exception = exc
        else:  # pragma: no cover
            pytest.fail("the breaker did not open")
    assert isinstance(error, httpx.TransportError)
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error, ResilienceError)
    assert isinstance(error.__cause__, CircuitOpenError)
    assert error.request.url.path == "/path"
    assert error.name == "http://upstream.test:80"
    assert error.retry_after is not None


async def test_one_breaker_per_origin() -> None:
    """A failing origin opens its own breaker only; another origin is still called."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500 if request.url.host == "bad.test" else 200)

    transport = ResilientTransport(
        httpx.MockTransport(handler),
        policy=HttpPolicy(retry=ONCE, breaker=BreakerOptions(minimum_calls=2), clock=FakeClock()),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(2):
            await client.get("https://bad.test/")
        with pytest.raises(CircuitOpen):
            await client.get("https://bad.test/")
        assert (await client.get("https://good.test/")).status_code == 200
    assert transport.pipeline_names() == ["https://bad.test:443", "https://good.test:443"]


def test_origin_key_spells_out_the_port() -> None:
    """The default key is scheme://host:port, with IPv6 hosts in brackets."""
    assert origin_of(httpx.Request("GET", "https://a.test/x?y")) == "https://a.test:443"
    assert origin_of(httpx.Request("GET", "http://a.test:8080/")) == "http://a.test:8080"
    assert origin_of(httpx.Request("GET", "http://[::1]/")) == "http://[::1]:80"


async def test_policy_function_per_origin() -> None:
    """``policy`` may be a function of the key, called once per origin."""
    seen: list[str] = []

    def policy(key: str) -> HttpPolicy:
        seen.append(key)
        return HttpPolicy(
            retry=RetryOptions(attempts=1 if "once" in key else 3), clock=FakeClock(autojump=True)
        )

    upstream = Upstream(503)
    transport = ResilientTransport(httpx.MockTransport(upstream), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://once.test/")
        await client.get("http://once.test/")
        await client.get("http://thrice.test/")
    assert seen == ["http://once.test:80", "http://thrice.test:80"]
    assert upstream.hits == 2 + 3


async def test_shared_store_shares_breakers() -> None:
    """Two transports with one store share each origin's breaker."""
    store = MemoryStore()
    policy = HttpPolicy(retry=ONCE, breaker=BreakerOptions(minimum_calls=2), store=store)
    upstream = Upstream(500)
    first = ResilientTransport(httpx.MockTransport(upstream), policy=policy)
    second = ResilientTransport(httpx.MockTransport(upstream), policy=policy)
    async with httpx.AsyncClient(transport=first) as a, httpx.AsyncClient(transport=second) as b:
        await a.get("http://upstream.test/")
        await a.get("http://upstream.test/")
        with pytest.raises(CircuitOpen):
            await b.get("http://upstream.test/")
    assert upstream.hits == 2


async def test_failing_upstream_over_a_real_socket_opens_breaker() -> None:
    """Against uvicorn on loopback, a flaky service opens the breaker and stops getting hits."""
    hits = 0

    async def flaky(request: Request) -> PlainTextResponse:
        nonlocal hits
        hits += 1
        return PlainTextResponse("down", status_code=503)

    app = Starlette(routes=[Route("/", flaky)])
    policy = HttpPolicy(
        retry=RetryOptions(attempts=2, wait=lambda state: 0.0),
        breaker=BreakerOptions(minimum_calls=4),
    )
    with serve(app) as server:
        async with httpx.AsyncClient(transport=ResilientTransport(policy=policy)) as client:
            statuses = []
            for _ in range(10):
                try:
                    statuses.append((await client.get(server.url)).status_code)
                except CircuitOpen:
                    statuses.append(0)
    assert statuses == [503, 503, 0, 0, 0, 0, 0, 0, 0, 0]
    assert hits == 4


# --- other policies and their errors ------------------------------------------------------


async def test_bulkhead_full_is_httpx_error() -> None:
    """With ``max_concurrent=1`` a second concurrent request gets BulkheadFull."""
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200)

    async with make_client(handler, bulkhead=BulkheadOptions(max_concurrent=1)) as client:
        first = await started(client.get("/"))
        with pytest.raises(httpx.TransportError) as info:
            await client.get("/")
        release.set()
        assert (await first).status_code == 200
    assert isinstance(info.value, BulkheadFull)
    assert isinstance(info.value, BulkheadFullError)


async def test_rate_limited_is_httpx_error() -> None:
    """Over ``rate`` the request fails with RateLimited (a RateLimitedError), not sent."""
    upstream = Upstream(200)
    async with make_client(
        upstream, clock=FakeClock(), rate_limit=RateLimitOptions(rate=2, burst=2)
    ) as client:
        await client.get("/")
        await client.get("/")
        with pytest.raises(RateLimited) as info:
            await client.get("/")
    assert isinstance(info.value, RateLimitedError)
    assert isinstance(info.value, httpx.TransportError)
    assert info.value.retry_after == pytest.approx(0.5)
    assert upstream.hits == 2


async def test_attempt_timeout_is_httpx_timeout() -> None:
    """An attempt outliving ``timeout`` raises AttemptTimeout: an httpx.TimeoutException."""
    clock = FakeClock()

    async def handler(request: httpx.Request) -> httpx.Response:
        await clock.sleep(100)
        return httpx.Response(200)

    async with make_client(handler, clock=clock, retry=ONCE, timeout=5) as client:
        task = await started(client.get("/"))
        clock.advance(5)
        with pytest.raises(httpx.TimeoutException) as info:
            await task
    assert isinstance(info.value, AttemptTimeout)
    assert isinstance(info.value, ResilienceTimeoutError)
    assert isinstance(info.value, TimeoutError)


async def test_fallback_answers_instead_of_raising() -> None:
    """A ``fallback`` turns a rejection into a response of its own."""

    async def answer(request: httpx.Request, error: Exception) -> httpx.Response:
        return httpx.Response(200, text=f"cached ({type(error).__name__})")

    fallback = FallbackOptions(handler=answer, on="rejections")
    upstream = Upstream(500)
    async with make_client(
        upstream, retry=ONCE, breaker=OPENS_AT_ONCE, fallback=fallback
    ) as client:
        assert (await client.get("/")).status_code == 500
        response = await client.get("/")
    assert response.text == "cached (CircuitOpen)"


async def test_cancellation_is_no_failure_and_frees_the_slot() -> None:
    """A cancelled request counts as nothing for the breaker and gives its bulkhead slot back."""
    started = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover

    transport = ResilientTransport(
        httpx.MockTransport(handler),
        policy=HttpPolicy(
            retry=ONCE,
            breaker=OPENS_AT_ONCE,
            bulkhead=BulkheadOptions(max_concurrent=1),
            clock=FakeClock(),
        ),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        task = asyncio.create_task(client.get("http://upstream.test/"))
        await started.wait()
        await cancelled(task)
        started.clear()
        again = asyncio.create_task(client.get("http://upstream.test/"))
        await started.wait()  # the slot is free again: the second request got through
        await cancelled(again)
    assert transport.pipeline_names() == ["http://upstream.test:80"]


# --- deadline -----------------------------------------------------------------------------


async def test_deadline_header_carries_the_remaining_budget() -> None:
    """Under ``deadline(2)`` the request carries ``x-deadline-ms`` of at most 2000."""
    upstream = Upstream(200)
    async with make_client(upstream, total_timeout=None) as client:
        with deadline(2.0):
            await client.get("/")
        await client.get("/")
    sent = upstream.requests[0].headers["x-deadline-ms"]
    assert 0 < int(sent) <= 2000
    assert "x-deadline-ms" not in upstream.requests[1].headers


async def test_spent_deadline_fails_fast() -> None:
    """With no budget left, DeadlineExceeded is raised and nothing is sent."""
    upstream = Upstream(200)
    async with make_client(upstream) as client:
        with deadline(0), pytest.raises(DeadlineExceeded) as info:
            await client.get("/")
    assert isinstance(info.value, httpx.TimeoutException)
    assert isinstance(info.value, ResilienceTimeoutError)
    assert upstream.hits == 0


async def test_retry_stops_when_the_wait_outlasts_the_deadline() -> None:
    """A Retry-After beyond the remaining budget ends retrying: the 503 comes back."""
    upstream = Upstream(503, 200, headers={"Retry-After": "20"})
    async with make_client(upstream, retry=RetryOptions(retry_after_max=60)) as client:
        with deadline(10):
            response = await client.get("/")
    assert response.status_code == 503
    assert upstream.hits == 1
    assert response.text == "503"


async def test_deadline_extension_cuts_a_slow_request() -> None:
    """``extensions={"resilience": {"deadline": s}}`` bounds one request in (loop) time."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200)  # pragma: no cover

    async with make_client(handler, timeout=None) as client:
        with pytest.raises(DeadlineExceeded):
            await client.get("/", extensions={"resilience": {"deadline": 0.05}})


# --- the transport itself -----------------------------------------------------------------


def test_sync_client_gets_a_clear_error() -> None:
    """Used by a sync httpx.Client, the transport raises a TypeError naming AsyncClient."""
    transport: Any = ResilientTransport(httpx.MockTransport(Upstream(200)))
    client = httpx.Client(transport=transport)
    with pytest.raises(TypeError, match="AsyncClient"):
        client.get("http://upstream.test/")
    client.close()
    with pytest.raises(TypeError, match="AsyncClient"), httpx.Client(transport=transport):
        pass  # pragma: no cover


async def test_aclose_closes_the_wrapped_transport() -> None:
    """Closing the client closes the transport it wraps."""
    closed: list[bool] = []

    class Inner(httpx.MockTransport):
        async def aclose(self) -> None:
            closed.append(True)

    async with httpx.AsyncClient(transport=ResilientTransport(Inner(Upstream(200)))):
        pass
    assert closed == [True]


def test_default_inner_transport() -> None:
    """Without a transport, ResilientTransport wraps an httpx.AsyncHTTPTransport."""
    assert isinstance(ResilientTransport().transport, httpx.AsyncHTTPTransport)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: RetryOptions(attempts=0), ValueError),
        (lambda: RetryOptions(attempts=1.5), TypeError),
        (lambda: HttpPolicy(timeout=-1), ValueError),
        (lambda: HttpPolicy(failure_statuses={700}), ValueError),
        (lambda: RetryOptions(methods="GET"), TypeError),
        (lambda: RetryOptions(retry_after_max=float("nan")), ValueError),
        (lambda: BreakerOptions(failure_ratio=2), ValueError),
        (lambda: BulkheadOptions(max_concurrent=0), ValueError),
        (lambda: RateLimitOptions(rate=0), ValueError),
        (lambda: RetryOptions(wait=3), TypeError),
        (lambda: HttpPolicy(idempotency_header=""), TypeError),
        (lambda: RetryOptions(attempts=True), TypeError),
        (lambda: HttpPolicy(breaker="no"), TypeError),
        (lambda: HttpPolicy(breaker=0), TypeError),
        (lambda: RetryOptions(retry_after_max=10**400), ValueError),
        (lambda: HttpPolicy(total_timeout=10**400), ValueError),
        (lambda: HttpPolicy(total_timeout=0), ValueError),
        (lambda: HttpPolicy(timeout=20, total_timeout=10), ValueError),
        (lambda: FallbackOptions(handler=stale, on="errors"), ValueError),
        (lambda: HttpPolicy(listeners="print"), TypeError),
    ],
)
def test_policy_validation(make: Callable[[], object], error: type[Exception]) -> None:
    """Bad options fail when the HttpPolicy (or its options object) is made."""
    with pytest.raises(error):
        make()


def test_transport_validation() -> None:
    """Bad constructor arguments are TypeErrors."""
    with pytest.raises(TypeError, match="AsyncBaseTransport"):
        ResilientTransport(httpx.HTTPTransport())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy"):
        ResilientTransport(policy=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_origins"):
        ResilientTransport(httpx.MockTransport(Upstream(200)), max_origins=0)
    with pytest.raises(TypeError, match="max_origins"):
        ResilientTransport(httpx.MockTransport(Upstream(200)), max_origins=True)


def test_policy_validation_touches_no_store() -> None:
    """Validating an HttpPolicy builds no breaker in its store; a non-store is refused."""
    store = MemoryStore()
    HttpPolicy(store=store)
    assert store.names() == []
    with pytest.raises(TypeError, match="store"):
        HttpPolicy(store="redis://localhost")  # type: ignore[arg-type]


def test_policy_normalises_methods() -> None:
    """``RetryOptions.methods`` are upper-cased into a frozenset."""
    assert RetryOptions(methods=["get", "post"]).methods == frozenset({"GET", "POST"})


async def test_no_connection_leaks_against_real_server() -> None:
    """Retried 503s over a one-connection pool never leave the pool stuck (all were closed)."""
    hits = 0

    async def flaky(request: Request) -> PlainTextResponse:
        nonlocal hits
        hits += 1
        status = 503 if hits % 3 else 200
        return PlainTextResponse("x" * 1000, status_code=status)

    app = Starlette(routes=[Route("/", flaky)])
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    policy = HttpPolicy(retry=RetryOptions(attempts=3, wait=lambda state: 0.0), breaker=None)
    timeout = httpx.Timeout(5.0, pool=2.0)
    with serve(app) as server:
        async with httpx.AsyncClient(
            transport=ResilientTransport(inner, policy=policy), timeout=timeout
        ) as client:
            for _ in range(5):
                response = await client.get(server.url)
                assert response.status_code == 200
    assert hits == 15


# --- hostile upstreams, budgets, bounds ----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "01 Jan 2020 00:00:00 +99999999999999999999",
        "Thu, 01 Jan 2020 00:00:00 +9999",
        "Fri, 31 Dec 9999 23:59:59 -9959",
        "Mon, 01 Jan 0001 00:00:00 +2359",
    ],
)
def test_parse_retry_after_never_raises_on_hostile_dates(value: str) -> None:
    """Offsets and years out of any calendar give ``None`` or a bounded wait, never an error."""
    seconds = parse_retry_after(value)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER


def test_parse_retry_after_is_bounded() -> None:
    """A delay of any length is cut to ``MAX_RETRY_AFTER``."""
    assert parse_retry_after("9" * 400) == MAX_RETRY_AFTER
    assert parse_retry_after("86401") == MAX_RETRY_AFTER


@given(
    st.one_of(
        st.text(),
        st.from_regex(
            r"[A-Za-z]{3}, \d{1,2} [A-Za-z]{3} -?\d{1,6} "
            r"\d\d:\d\d:\d\d [+-]?\d{1,25}",
            fullmatch=True,
        ),
    )
)
def test_parse_retry_after_fuzz(value: str) -> None:
    """Whatever an upstream sends: ``None`` or a number in [0, MAX_RETRY_AFTER]."""
    seconds = parse_retry_after(value)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER


async def test_hostile_retry_after_is_a_plain_503() -> None:
    """An overflowing ``Retry-After`` date is ignored: the backoff applies, no crash."""
    upstream = Upstream(
        503, 200, headers={"Retry-After": "01 Jan 2020 00:00:00 +99999999999999999999"}
    )
    response = await get_once(upstream)
    assert response.status_code == 200


async def test_retry_after_waits_are_capped_per_request() -> None:
    """``retry_after_max`` caps all of one request's Retry-After waits together: a header
    asking for more than is left ends retrying, it is never cut to what is left."""
    clock = FakeClock(autojump=True)
    upstream = Upstream(503, 503, 503, 200, headers={"Retry-After": "20"})
    async with make_client(
        upstream, clock, retry=RetryOptions(attempts=4, retry_after_max=30), total_timeout=None
    ) as client:
        response = await client.get("/")
    assert clock.slept == [20.0]  # then 10 s is left, less than asked: the second 503 is returned
    assert response.status_code == 503
    assert upstream.hits == 2


async def test_retry_after_exactly_what_is_left_is_waited() -> None:
    """A ``Retry-After`` asking for exactly what is left of ``retry_after_max`` is waited."""
    clock = FakeClock(autojump=True)
    upstream = Upstream(503, 503, 200, headers={"Retry-After": "5"})
    async with make_client(
        upstream, clock, retry=RetryOptions(attempts=3, retry_after_max=10), total_timeout=None
    ) as client:
        response = await client.get("/")
    assert clock.slept == [5.0, 5.0]
    assert response.status_code == 200


async def test_total_timeout_is_on_by_default_and_forwarded() -> None:
    """By default a request has an overall budget, sent downstream as ``x-deadline-ms``."""
    assert HttpPolicy().total_timeout == 1.5 * HttpPolicy().timeout  # type: ignore[operator]
    assert HttpPolicy(timeout=30).total_timeout == 45.0  # 1.5 x timeout unless given
    assert HttpPolicy(timeout=None).total_timeout is None
    assert HttpPolicy(timeout=30, total_timeout=31).total_timeout == 31.0
    upstream = Upstream(200)
    async with make_client(upstream, timeout=10) as client:
        await client.get("/")
    assert 14_000 < int(upstream.requests[0].headers["x-deadline-ms"]) <= 15_000


async def test_total_timeout_caps_every_attempt_together() -> None:
    """A hanging upstream costs one ``total_timeout``, not ``attempts x timeout``."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200)  # pragma: no cover

    clock = SystemClock()  # real time: the upstream hangs in real time
    async with make_client(
        handler, clock, timeout=0.04, total_timeout=0.05, retry=RetryOptions(wait=lambda s: 0)
    ) as client:
        with pytest.raises(DeadlineExceeded):
            await client.get("/")


async def test_fallback_on_failures_answers_a_last_5xx() -> None:
    """``on="failures"``: the last failing response goes to the fallback."""
    seen: list[Exception] = []

    async def answer(request: httpx.Request, error: Exception) -> httpx.Response:
        seen.append(error)
        return httpx.Response(200, text="stale")

    fallback = FallbackOptions(handler=answer, on="failures")
    upstream = Upstream(503)
    async with make_client(upstream, retry=RetryOptions(attempts=2), fallback=fallback) as client:
        response = await client.get("/")
    assert response.text == "stale"
    (error,) = seen
    assert isinstance(error, httpx.HTTPStatusError)
    assert error.response.status_code == 503
    assert all(body.closed for body in upstream.bodies)


async def test_fallback_on_failures_lets_rejections_through() -> None:
    """``on="failures"``: an open breaker is raised, not answered."""

    async def answer(request: httpx.Request, error: Exception) -> httpx.Response:
        return httpx.Response(200, text="stale")

    fallback = FallbackOptions(handler=answer, on="failures")
    upstream = Upstream(500)
    async with make_client(
        upstream, retry=ONCE, breaker=OPENS_AT_ONCE, fallback=fallback
    ) as client:
        assert (await client.get("/")).text == "stale"
        with pytest.raises(CircuitOpen):
            await client.get("/")


async def test_fallback_on_both_by_default() -> None:
    """By default the fallback answers failures and rejections alike."""
    answered: list[str] = []

    async def answer(request: httpx.Request, error: Exception) -> httpx.Response:
        answered.append(type(error).__name__)
        return httpx.Response(200)

    fallback = FallbackOptions(handler=answer)
    upstream = Upstream(500)
    async with make_client(
        upstream, retry=ONCE, breaker=OPENS_AT_ONCE, fallback=fallback
    ) as client:
        await client.get("/")
        await client.get("/")
    assert answered == ["HTTPStatusError", "CircuitOpen"]


async def test_pipelines_are_bounded_least_recently_used_first() -> None:
    """Past ``max_origins`` the least recently used origin's pipeline is forgotten."""
    transport = ResilientTransport(
        httpx.MockTransport(Upstream(200)), policy=HttpPolicy(clock=FakeClock()), max_origins=3
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for host in ("a", "b", "c", "a", "d", "e"):
            await client.get(f"http://{host}.test/")
    assert transport.pipeline_names() == [
        "http://a.test:80",
        "http://d.test:80",
        "http://e.test:80",
    ]


async def test_an_open_breaker_is_never_evicted() -> None:
    """An origin whose breaker is open keeps its pipeline (and so stays open)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500 if request.url.host == "down.test" else 200)

    policy = HttpPolicy(retry=ONCE, breaker=OPENS_AT_ONCE, clock=FakeClock())
    transport = ResilientTransport(httpx.MockTransport(handler), policy=policy, max_origins=2)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://down.test/")
        for host in "abcdef":
            await client.get(f"http://{host}.test/")
        with pytest.raises(CircuitOpen):
            await client.get("http://down.test/")
    assert "http://down.test:80" in transport.pipeline_names()
    assert len(transport.pipeline_names()) == 2


def test_translated_errors_keep_their_request_and_attributes() -> None:
    """The httpx flavour of a core error carries its arguments, attributes and the request."""
    from resilience.integrations.httpx._errors import translate

    request = httpx.Request("GET", "http://upstream.test/")
    error = translate(BulkheadFullError("pool", 4), request)
    assert isinstance(error, BulkheadFull)
    assert error.request is request
    assert (error.name, error.max_concurrent, error.args) == ("pool", 4, ("pool", 4))
    assert str(error) == str(BulkheadFullError("pool", 4))
    made = RateLimited("api", 0.5)
    assert (made.name, made.retry_after, made.args) == ("api", 0.5, ("api", 0.5))


# --- the package and its options objects ----------------------------------------------------

# Every public name of resilience.integrations.httpx when it was one module.
FORMER_NAMES = frozenset({
    "DEADLINE_HEADER", "FAILURE_STATUSES", "FALLBACK_ON", "IDEMPOTENT_METHODS",
    "MAX_RETRY_AFTER", "TOTAL_TIMEOUT_FACTOR", "AttemptTimeout", "BulkheadFull", "CircuitOpen",
    "DeadlineExceeded", "FallbackHandler", "HealthSource", "HttpPolicy", "NoHealthyEndpoint",
    "RateLimited", "Rejected", "ResilientTransport", "Throttled", "WaitStrategy", "deadline",
    "http_check", "origin_of", "parse_retry_after", "remaining",
})  # fmt: skip

# HttpPolicy's former flat keywords, each now a field of a strategy's options object.
FLAT_KEYWORDS = [
    "attempts",
    "wait",
    "retry_after_max",
    "retry_budget",
    "retry_methods",
    "circuit_breaker",
    "failure_ratio",
    "minimum_calls",
    "window",
    "open_for",
    "open_for_max",
    "half_open_calls",
    "rate",
    "per",
    "burst",
    "max_concurrent",
    "max_waiting",
    "max_wait",
    "throttle_k",
    "throttle_window",
    "hedge_delay",
    "max_hedges",
    "hedge_budget",
    "health_path",
    "health_interval",
    "fallback_on",
]

OPTIONS = (
    RetryOptions,
    BreakerOptions,
    RateLimitOptions,
    BulkheadOptions,
    ThrottleOptions,
    HedgeOptions,
    HealthCheckOptions,
    FallbackOptions,
)


def test_the_package_gives_every_name_the_module_gave() -> None:
    """``resilience.integrations.httpx`` names every public name it had as one module, and
    each class and function it names has a docstring."""
    import inspect

    import resilience.integrations.httpx as adapter

    assert set(FORMER_NAMES) <= set(adapter.__all__)
    for name in adapter.__all__:
        value = getattr(adapter, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name


@pytest.mark.parametrize("keyword", FLAT_KEYWORDS)
def test_a_former_flat_keyword_is_a_type_error_naming_it(keyword: str) -> None:
    """The flat keywords are gone (each lives in its strategy's options object): one given to
    HttpPolicy is a TypeError naming it, never silently ignored."""
    with pytest.raises(TypeError, match=keyword):
        HttpPolicy(**{keyword: 1})


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("retry", None, "RetryOptions"),
        ("breaker", True, "BreakerOptions"),
        ("throttle", True, "ThrottleOptions"),
        ("hedge", 0.1, "HedgeOptions"),
        ("health_check", "/healthz", "HealthCheckOptions"),
        ("fallback", stale, "FallbackOptions"),
        ("rate_limit", 10, "RateLimitOptions"),
        ("bulkhead", 10, "BulkheadOptions"),
    ],
)
def test_a_strategy_takes_its_options_object(field: str, value: object, named: str) -> None:
    """A strategy given anything but its options object (or None, where that leaves it out)
    is a TypeError naming the field and the class it takes."""
    with pytest.raises(TypeError, match=rf"{field} must be a {named}"):
        HttpPolicy(**{field: value})


@pytest.mark.parametrize("options", OPTIONS)
def test_options_are_frozen_and_keyword_only(options: type) -> None:
    """Every options object takes keywords only and cannot be changed once made."""
    import dataclasses

    with pytest.raises(TypeError):
        options(1)
    required = {"rate": 10.0, "max_concurrent": 2, "path": "/healthz", "handler": stale}
    made = options(
        **{f.name: required[f.name] for f in dataclasses.fields(options) if f.name in required}
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.__setattr__(dataclasses.fields(options)[0].name, None)


def test_the_defaults_tables_match_the_options() -> None:
    """Each default the tables of docs/httpx.md give as a Python value is the field's default."""
    import ast
    import dataclasses
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "httpx.md").read_text()
    checked = 0
    for options in (*OPTIONS, HttpPolicy):
        heading = re.search(rf"^###? `[^\n]*\b{options.__name__}\b[^\n]*`$", page, re.M)
        assert heading is not None, options.__name__
        table = page[heading.end() : page.index("\n#", heading.end())]
        for field in dataclasses.fields(options):
            row = re.search(rf"^\| `{field.name}` \| `([^`]*)` \|", table, re.M)
            if field.default is dataclasses.MISSING or row is None:
                continue
            try:
                documented = ast.literal_eval(row.group(1))
            except (ValueError, SyntaxError):  # a name or a formula, not a value
                continue
            assert documented == field.default, (options.__name__, field.name)
            checked += 1
    assert checked >= 20


def test_missing_httpx_names_the_extra() -> None:
    """Without httpx installed the import fails with the ``pip install`` line of the extra."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "try:\n    import resilience.integrations.httpx\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True
    ).stdout
    assert "[httpx]" in out
    assert "pip install" in out


async def test_listeners_can_choose_their_events() -> None:
    """A listener on HttpPolicy gets every policy's events; ``select`` narrows them down."""
    from resilience import CallFinished, RetryScheduled, select

    everything: list[object] = []
    retries: list[object] = []
    listeners = (everything.append, select(retries.append, events=(RetryScheduled,)))
    upstream = Upstream(503, 200)
    async with make_client(
        upstream, listeners=listeners, bulkhead=BulkheadOptions(max_concurrent=10)
    ) as client:
        await client.get("/")
    finished = [e for e in everything if isinstance(e, CallFinished)]
    # retry, breaker (x2 attempts), timeout (x2), bulkhead (x2): not the overall timeout
    assert {e.policy for e in finished} == {"retry", "circuit_breaker", "timeout", "bulkhead"}
    assert not any("total_timeout" in e.name for e in finished)
    assert [type(e) for e in retries] == [RetryScheduled]


async def test_retry_after_beyond_the_default_budget_is_not_waited_for() -> None:
    """With the defaults, a ``Retry-After: 30`` (beyond the budget) ends retrying at once."""
    clock = FakeClock(autojump=True)
    upstream = Upstream(429, 200, headers={"Retry-After": "30"})
    response = await get_once(upstream, clock)
    assert response.status_code == 429
    assert clock.slept == []
    assert upstream.hits == 1


# --- every response the request does not return is closed ----------------------------------


class Ledger(httpx.AsyncBaseTransport):
    """A transport answering with the status ``handler(request)`` gives (it may be async, or
    raise), keeping every response it gave: ``open`` counts those whose body was never closed."""

    def __init__(self, handler: Callable[[httpx.Request], Any]) -> None:
        self.handler = handler
        self.bodies: list[Tracked] = []
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        status = self.handler(request)
        if asyncio.iscoroutine(status):
            status = await status
        body = Tracked(str(status).encode())
        self.bodies.append(body)
        return httpx.Response(status, stream=body, request=request)

    @property
    def open(self) -> int:
        """Responses given whose body nobody closed."""
        return sum(not body.closed for body in self.bodies)


def script(*outcomes: int | Exception) -> Callable[[httpx.Request], int]:
    """A Ledger handler answering ``outcomes`` in turn (exceptions raised; the last repeats)."""
    queue = list(outcomes)

    def answer(request: httpx.Request) -> int:
        outcome = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return answer


@pytest.mark.parametrize(
    ("outcomes", "options", "returned"),
    [
        ((503, 503, 200), {}, 200),  # retried to success
        ((500,), {}, 500),  # attempts ran out: the last one is returned
        ((503, httpx.ReadError("reset")), {}, None),  # ends in an exception
        ((500,), {"fallback": FallbackOptions(handler=stale)}, None),  # the fallback answers
        ((503, 200), {"retry": RetryOptions(methods={"GET", "POST"})}, 200),  # a retried POST
    ],
)
async def test_only_the_returned_response_stays_open(
    outcomes: tuple[int | Exception, ...], options: dict[str, Any], returned: int | None
) -> None:
    """Whichever way a request ends, every response it got is closed but the one returned."""
    ledger = Ledger(script(*outcomes))
    policy = HttpPolicy(clock=FakeClock(autojump=True), breaker=None, **options)
    transport = ResilientTransport(ledger, policy=policy)
    request = httpx.Request("POST" if "retry" in options else "GET", "http://up.test/")
    try:
        response: httpx.Response | None = await transport.handle_async_request(request)
    except httpx.HTTPError:
        response = None
    assert ledger.bodies
    ours = response is not None and any(response.stream is body for body in ledger.bodies)
    assert ours == (returned is not None)
    assert ledger.open == (1 if ours else 0)
    if response is not None and ours:
        assert response.status_code == returned
        await response.aclose()
        assert ledger.open == 0


async def test_a_failed_response_is_closed_when_the_caller_cancels() -> None:
    """A 503 kept for the retry is closed when the caller cancels during the backoff."""
    clock = FakeClock()
    ledger = Ledger(script(503))
    transport = ResilientTransport(ledger, policy=HttpPolicy(clock=clock, breaker=None))
    task = asyncio.create_task(
        transport.handle_async_request(httpx.Request("GET", "http://up.test/"))
    )
    await settle()
    assert len(ledger.bodies) == 1
    await cancelled(task)
    assert ledger.open == 0


# --- Idempotency-Key: set once, before the first attempt of whatever may be sent again ------


@pytest.mark.parametrize(
    ("options", "extension"),
    [
        ({"retry": RetryOptions(methods={"GET", "POST"})}, None),  # POST listed: retried
        ({}, {"retry": True}),  # retried for this request
    ],
)
async def test_every_attempt_of_a_retried_post_carries_one_key(
    options: dict[str, Any], extension: dict[str, Any] | None
) -> None:
    """The first attempt of a POST that may be retried has the key, and every retry the same."""
    ledger = Ledger(script(503, 503, 200))
    transport = ResilientTransport(
        ledger, policy=HttpPolicy(clock=FakeClock(autojump=True), **options)
    )
    extensions = {} if extension is None else {"resilience": extension}
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post("http://up.test/", content=b"x", extensions=extensions)
    assert response.status_code == 200
    keys = [r.headers.get("idempotency-key") for r in ledger.requests]
    assert len(keys) == 3
    assert keys[0]
    assert len(set(keys)) == 1


async def test_a_post_sent_once_gets_no_key() -> None:
    """A POST that cannot be sent twice (not retried, one origin) is left as it is."""
    ledger = Ledger(script(503))
    transport = ResilientTransport(ledger, policy=HttpPolicy(clock=FakeClock(autojump=True)))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.post("http://up.test/", content=b"x")
    assert [r.headers.get("idempotency-key") for r in ledger.requests] == [None]


# --- nothing foreign escapes the transport ----------------------------------------------------


class Raising(httpx.AsyncBaseTransport):
    """A transport that raises ``error`` (a fresh copy per request from ``make``)."""

    def __init__(self, make: Callable[[httpx.Request], Exception]) -> None:
        self.make = make
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        raise self.make(request)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: ExceptionGroup("task group", [OverflowError("port must be 0-65535")]),
        lambda r: ExceptionGroup("two", [OSError("a"), ValueError("b")]),
        lambda r: RuntimeError("a bug below"),
        lambda r: OSError("no route"),
    ],
)
async def test_a_foreign_error_of_the_wrapped_transport_is_an_httpx_error(
    make: Callable[[httpx.Request], Exception],
) -> None:
    """Whatever the wrapped transport raises leaves as an httpx.TransportError (the original as
    its cause) and counts as a failure for the breaker."""
    inner = Raising(make)
    policy = HttpPolicy(clock=FakeClock(), retry=ONCE, breaker=BreakerOptions(minimum_calls=3))
    async with httpx.AsyncClient(transport=ResilientTransport(inner, policy=policy)) as client:
        for _ in range(3):
            with pytest.raises(httpx.TransportError) as info:
                await client.get("http://up.test/")
            assert not isinstance(info.value, ExceptionGroup)
            assert type(info.value.__cause__) is type(make(info.value.request))
            assert info.value.request.url == "http://up.test/"
        with pytest.raises(CircuitOpen):
            await client.get("http://up.test/")
    assert inner.calls == 3


async def test_a_group_holding_one_httpx_error_raises_that_error() -> None:
    """A task group's wrapper around one httpx error is taken off: the httpx error is raised."""

    def make(request: httpx.Request) -> Exception:
        return ExceptionGroup("task group", [httpx.ConnectError("refused", request=request)])

    policy = HttpPolicy(clock=FakeClock(autojump=True), retry=ONCE)
    transport = ResilientTransport(Raising(make), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://up.test/")


# --- a hang is noticed: attempts cut by the deadline are failures ---------------------------


def hanging(request: httpx.Request) -> Any:
    """A handler that never answers (until cancelled)."""
    return asyncio.Event().wait()


async def test_an_attempt_cut_by_total_timeout_is_a_breaker_failure() -> None:
    """``total_timeout`` cutting an attempt in flight raises DeadlineExceeded and counts as a
    failure for the breaker (on the fake clock)."""
    clock = FakeClock()
    policy = HttpPolicy(
        clock=clock,
        timeout=None,
        total_timeout=0.5,
        retry=ONCE,
        breaker=OPENS_AT_ONCE,
    )
    transport = ResilientTransport(httpx.MockTransport(hanging), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        task = await started(client.get("http://up.test/"))
        clock.advance(0.5)
        with pytest.raises(DeadlineExceeded):
            await task
    breaker = transport._origins["http://up.test:80"].breaker
    assert breaker is not None
    assert breaker.state is CircuitState.OPEN
    assert breaker.metrics().opened_by == (1, 1, 0)  # one call, one failure


async def test_an_attempt_cut_by_the_callers_deadline_is_a_breaker_failure() -> None:
    """A caller's deadline (loop time) cutting an attempt counts as a failure too."""
    policy = HttpPolicy(clock=FakeClock(), retry=ONCE, breaker=OPENS_AT_ONCE, timeout=None)
    transport = ResilientTransport(httpx.MockTransport(hanging), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        with deadline(0.02), pytest.raises(DeadlineExceeded):
            await client.get("http://up.test/")
        with deadline(0.02), pytest.raises(CircuitOpen):
            await client.get("http://up.test/")


async def test_a_cancellation_at_the_deadline_still_propagates() -> None:
    """A caller's own cancel scope expiring with the deadline gets its cancellation (it raises
    its TimeoutError, not DeadlineExceeded), while the cut attempt still counts as a failure."""
    from resilience.integrations import get_deadline

    policy = HttpPolicy(clock=FakeClock(), retry=ONCE, breaker=OPENS_AT_ONCE, timeout=None)
    transport = ResilientTransport(httpx.MockTransport(hanging), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        with deadline(0.02):
            at = get_deadline()
            assert at is not None
            with pytest.raises(TimeoutError) as info:
                async with asyncio.timeout_at(at):
                    await client.get("http://up.test/")
        assert type(info.value) is TimeoutError  # the caller's scope's own error
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        with deadline(0.02), pytest.raises(CircuitOpen):
            await client.get("http://up.test/")


async def test_a_plain_cancellation_counts_as_nothing() -> None:
    """Cancelled by its caller before any deadline, an attempt is no outcome for the breaker."""
    policy = HttpPolicy(clock=FakeClock(), retry=ONCE, breaker=OPENS_AT_ONCE)
    transport = ResilientTransport(httpx.MockTransport(hanging), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        task = await started(client.get("http://up.test/"))
        await cancelled(task)
    metrics = transport._origins["http://up.test:80"].breaker.metrics()  # type: ignore[union-attr]
    assert metrics.calls == 0


RATE = 30  # requests per second, in the hang tests below


async def run_at_rate(
    client: httpx.AsyncClient, clock: FakeClock, seconds: float, until: Callable[[], bool]
) -> float:
    """Send ``RATE`` GETs per second of fake time for ``seconds`` or until ``until()``; the
    fake time spent. Requests still running at the end are cancelled."""
    tasks: list[asyncio.Task[httpx.Response]] = []
    spent = 0.0
    try:
        for _ in range(round(seconds * RATE)):
            tasks.append(asyncio.create_task(client.get("http://up.test/")))
            await settle(20)
            clock.advance(1 / RATE)
            spent += 1 / RATE
            await settle(20)
            if until():
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return spent


async def test_a_hang_opens_the_breaker_within_about_a_second_with_the_defaults() -> None:
    """At 30 requests/s, an upstream that stops answering is noticed by the default policy:
    its breaker opens about a second into the hang (fake time)."""
    clock = FakeClock()
    hung = False

    async def upstream(request: httpx.Request) -> httpx.Response:
        if hung:
            await asyncio.Event().wait()
        return httpx.Response(200)

    transport = ResilientTransport(httpx.MockTransport(upstream), policy=HttpPolicy(clock=clock))
    async with httpx.AsyncClient(transport=transport) as client:
        await run_at_rate(client, clock, 3.0, lambda: False)  # healthy: fills the window
        breaker = transport._origins["http://up.test:80"].breaker
        assert breaker is not None
        hung = True
        took = await run_at_rate(client, clock, 5.0, lambda: breaker.state is CircuitState.OPEN)
    print(f"\nhang noticed after {took:.2f}s of fake time at {RATE} requests/s")
    assert breaker.state is CircuitState.OPEN
    assert took <= 1.5


async def test_occasional_slow_calls_do_not_open_the_breaker_with_the_defaults() -> None:
    """At 30 requests/s, one call in 15 outliving the attempt timeout (then retried) leaves
    the default policy's breaker closed over 10 s of fake time."""
    clock = FakeClock()
    calls = 0

    async def upstream(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls % 15 == 0:
            await clock.sleep(3.0)  # beyond the attempt timeout
        return httpx.Response(200)

    transport = ResilientTransport(httpx.MockTransport(upstream), policy=HttpPolicy(clock=clock))
    opened: list[object] = []
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://up.test/")
        breaker = transport._origins["http://up.test:80"].breaker
        assert breaker is not None
        await run_at_rate(client, clock, 10.0, lambda: breaker.state is not CircuitState.CLOSED)
        opened.append(breaker.state)
    assert calls > 250
    assert opened == [CircuitState.CLOSED]


# --- a health check per origin, bound to its breaker ----------------------------------------


class Service:
    """A MockTransport handler: ``/healthz`` answers 200 while ``up`` (else 503), any other
    path 200 while ``up`` (else 500); ``hits`` counts the other paths."""

    def __init__(self) -> None:
        self.up = True
        self.hits = 0
        self.checks: list[httpx.URL] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            self.checks.append(request.url)
            return httpx.Response(200 if self.up else 503)
        self.hits += 1
        return httpx.Response(200 if self.up else 500)


async def test_each_origin_gets_a_health_check_bound_to_its_breaker() -> None:
    """``health_check``: the first request to an origin starts a check of that origin's path,
    bound to its breaker; closing the transport stops it."""
    clock = FakeClock()
    service = Service()
    policy = HttpPolicy(clock=clock, health_check=HealthCheckOptions(path="/healthz", interval=2.0))
    transport = ResilientTransport(httpx.MockTransport(service), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        await settle()
        assert service.checks == []  # nothing before an origin is used
        await client.get("https://api.test/items")
        await client.get("http://other.test:8080/")
        breaker = transport._origins["https://api.test:443"].breaker
        assert breaker is not None
        assert breaker.health is not None
        check = breaker.health
        assert check.running
        assert check.interval == 2.0
        await settle()
        await advance(clock, 2.0)
        assert sorted(map(str, service.checks)) == [
            "http://other.test:8080/healthz",
            "http://other.test:8080/healthz",
            "https://api.test/healthz",
            "https://api.test/healthz",
        ]
    assert not check.running


async def test_the_check_probes_for_the_breaker_no_request_does() -> None:
    """Once the breaker is open, the bound check's result (not a user request) closes it."""
    clock = FakeClock()
    service = Service()
    policy = HttpPolicy(
        clock=clock,
        retry=ONCE,
        breaker=BreakerOptions(minimum_calls=2, open_for=1.0),
        health_check=HealthCheckOptions(path="/healthz", interval=0.5),
    )
    transport = ResilientTransport(httpx.MockTransport(service), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        service.up = False
        for _ in range(2):
            assert (await client.get("http://api.test/")).status_code == 500
        breaker = transport._origins["http://api.test:80"].breaker
        assert breaker is not None
        assert breaker.state is CircuitState.OPEN
        sent = service.hits
        await advance(clock, 1.5)  # past open_for: a request is still refused, the check probes
        with pytest.raises(CircuitOpen):
            await client.get("http://api.test/")
        service.up = True
        for _ in range(3):
            await advance(clock, 0.5)
        assert breaker.state is CircuitState.CLOSED
        assert service.hits == sent
        assert (await client.get("http://api.test/")).status_code == 200


async def test_the_check_is_fleet_wide_through_the_store() -> None:
    """With a store, the origin's check shares it (one replica checks for all)."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    policy = HttpPolicy(clock=clock, store=store, health_check=HealthCheckOptions(path="/healthz"))
    transport = ResilientTransport(httpx.MockTransport(Service()), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://api.test/")
        breaker = transport._origins["http://api.test:80"].breaker
        assert breaker is not None
        assert breaker.health is not None
        assert breaker.health.store is store


async def test_a_forgotten_origin_stops_its_check() -> None:
    """An origin's pipeline forgotten past ``max_origins`` takes its check with it."""
    clock = FakeClock()
    policy = HttpPolicy(clock=clock, health_check=HealthCheckOptions(path="/healthz"))
    transport = ResilientTransport(httpx.MockTransport(Service()), policy=policy, max_origins=1)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://a.test/")
        first = transport._origins["http://a.test:80"].breaker
        assert first is not None
        assert first.health is not None
        await client.get("http://b.test/")
        assert transport.pipeline_names() == ["http://b.test:80"]
        assert not first.health.running


@pytest.mark.parametrize(
    ("make", "error", "named"),
    [
        (lambda: HealthCheckOptions(path="healthz"), ValueError, "path"),
        (lambda: HealthCheckOptions(path=""), ValueError, "path"),
        (lambda: HealthCheckOptions(path=3), TypeError, "path"),
        (lambda: HealthCheckOptions(path="/h", interval=0), ValueError, "interval"),
        (
            lambda: HttpPolicy(health_check=HealthCheckOptions(path="/h"), breaker=None),
            ValueError,
            "breaker",
        ),
    ],
)
def test_health_options_are_validated(
    make: Callable[[], object], error: type[Exception], named: str
) -> None:
    """Bad health options fail when the options (or the policy) are made, naming the option."""
    with pytest.raises(error, match=named):
        make()


def test_http_check_options_are_validated() -> None:
    """``http_check`` refuses a client and a transport together, and a port no socket takes."""
    from resilience.integrations.health import http_check

    async def unused(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)  # pragma: no cover

    with pytest.raises(ValueError, match="not both"):
        http_check(
            "http://a.test/healthz",
            client=httpx.AsyncClient(),
            transport=httpx.MockTransport(unused),
        )
    with pytest.raises(ValueError, match="99999"):
        http_check("http://a.test:99999/healthz")
    with pytest.raises(TypeError, match="transport"):
        http_check("http://a.test/healthz", transport=object())  # type: ignore[arg-type]
