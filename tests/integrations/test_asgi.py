"""Tests for resilience.integrations.asgi: ResilienceMiddleware under Starlette and uvicorn."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from resilience.integrations import remaining
from resilience.integrations.asgi import Deadlines, Message, ResilienceMiddleware, Scope, Shedding
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from resilience import RateLimitedError, ResilienceTimeoutError
from resilience.testing import FakeClock

from ..asgi_support import serve
from ..helpers import advance, cancelled, settle, started, until


class App:
    """A Starlette app whose ``/work`` blocks until released, with a health check."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.deadlines: list[float | None] = []

    async def work(self, request: Request) -> PlainTextResponse:
        self.calls += 1
        self.deadlines.append(remaining())
        await self.release.wait()
        return PlainTextResponse("done")

    async def fast(self, request: Request) -> PlainTextResponse:
        self.calls += 1
        self.deadlines.append(remaining())
        return PlainTextResponse("ok")

    def starlette(self, **options: Any) -> Starlette:
        routes = [
            Route("/work", self.work),
            Route("/slow/work", self.work),
            Route("/health", self.fast),
            Route("/healthz", self.work),
            Route("/fast", self.fast),
        ]
        return Starlette(routes=routes, middleware=[Middleware(ResilienceMiddleware, **options)])


async def called(app: App) -> None:
    """Wait (a bounded number of loop turns) until ``app`` has been called."""
    for _ in range(100):
        if app.calls:
            return
        await asyncio.sleep(0)


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.test")


async def test_passes_requests_through() -> None:
    """Without limits the app answers as usual."""
    app = App()
    async with client_for(app.starlette()) as client:
        response = await client.get("/fast")
    assert response.status_code == 200
    assert response.text == "ok"


async def test_burst_is_shed_with_503_while_health_check_passes() -> None:
    """Over ``max_concurrent`` requests get 503 + Retry-After; an excluded /health still works."""
    app = App()
    asgi = app.starlette(max_concurrent=2, retry_after=3, exclude=("/health",))
    async with client_for(asgi) as client:
        busy = [asyncio.create_task(client.get("/work")) for _ in range(2)]
        await settle()
        burst = await asyncio.gather(*(client.get("/work") for _ in range(5)))
        health = await client.get("/health")
        app.release.set()
        done = await asyncio.gather(*busy)
    assert [r.status_code for r in burst] == [503] * 5
    assert {r.headers["retry-after"] for r in burst} == {"3"}
    assert health.status_code == 200
    assert [r.status_code for r in done] == [200, 200]
    assert app.calls == 3


async def test_exclude_matches_whole_segments() -> None:
    """``/health`` excludes ``/health`` and ``/health/...`` but not ``/healthz``."""
    app = App()
    asgi = app.starlette(max_concurrent=1, exclude=("/health",))
    async with client_for(asgi) as client:
        busy = await started(client.get("/work"))
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/healthz")).status_code == 503
        app.release.set()
        await busy


async def test_rate_limit_answers_429_with_retry_after() -> None:
    """Past ``rate`` the middleware answers 429 and says when to come back."""
    clock = FakeClock()
    app = App()
    async with client_for(app.starlette(rate=1, per=10, burst=2, clock=clock)) as client:
        first = await client.get("/fast")
        second = await client.get("/fast")
        third = await client.get("/fast")
        clock.advance(10)
        fourth = await client.get("/fast")
    assert [first.status_code, second.status_code, fourth.status_code] == [200, 200, 200]
    assert third.status_code == 429
    assert third.headers["retry-after"] == "10"
    assert app.calls == 3


async def test_timeout_answers_504_before_the_response_starts() -> None:
    """A request outliving ``timeout`` (fake clock) gets 504."""
    clock = FakeClock()
    app = App()
    async with client_for(app.starlette(timeout=5, clock=clock)) as client:
        task = await started(client.get("/work"))
        clock.advance(5)
        response = await task
    assert response.status_code == 504


async def test_timeout_after_the_response_started_aborts_instead() -> None:
    """Once the response has started a timeout is re-raised: never a second response."""
    clock = FakeClock()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await clock.sleep(100)

    middleware = ResilienceMiddleware(app, timeout=5, clock=clock)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope: Scope = {"type": "http", "path": "/", "headers": []}
    task = await started(middleware(scope, receive, send))
    clock.advance(5)
    with pytest.raises(ResilienceTimeoutError):
        await task
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_started_response_is_aborted_over_a_real_socket() -> None:
    """Under uvicorn, a timeout mid-stream cuts the connection; the client sees an error."""

    async def stream() -> Any:
        yield b"first chunk"
        await asyncio.sleep(30)
        yield b"never"  # pragma: no cover

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(stream())

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(ResilienceMiddleware, timeout=0.2)],
    )
    with serve(app) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url)


async def test_cancelled_request_gives_its_slot_back() -> None:
    """A request cancelled mid-flight (client gone) frees its bulkhead slot at once."""
    app = App()
    async with client_for(app.starlette(max_concurrent=1)) as client:
        gone = await started(client.get("/work"))
        await cancelled(gone)
        assert (await client.get("/fast")).status_code == 200


async def test_overrides_are_compartments_of_their_own() -> None:
    """``overrides`` give a path its own limits: a full /slow does not shed /work."""
    app = App()
    asgi = app.starlette(max_concurrent=5, overrides={"/slow": {"max_concurrent": 1}})
    async with client_for(asgi) as client:
        busy = await started(client.get("/slow/work"))
        shed = await client.get("/slow/work")
        other = await started(client.get("/work"))
        app.release.set()
        assert (await other).status_code == 200
        assert (await busy).status_code == 200
    assert shed.status_code == 503


async def test_override_can_remove_a_limit() -> None:
    """An override set to ``None`` switches that limit off for its paths."""
    clock = FakeClock()
    app = App()
    asgi = app.starlette(rate=1, burst=1, clock=clock, overrides={"/fast": {"rate": None}})
    async with client_for(asgi) as client:
        statuses = [(await client.get("/fast")).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]


async def test_errors_raised_by_the_app_are_not_translated() -> None:
    """A RateLimitedError raised by the app itself is the app's error, not a 429."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        raise RateLimitedError("downstream", 1.0)

    middleware = ResilienceMiddleware(app, rate=100)
    with pytest.raises(RateLimitedError):
        await middleware({"type": "http", "path": "/", "headers": []}, _receive, _send)


async def test_non_http_scopes_pass_through() -> None:
    """Lifespan and websocket scopes reach the app untouched, whatever the limits."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = ResilienceMiddleware(app, max_concurrent=1, rate=0.001, burst=1)
    for kind in ("lifespan", "websocket", "websocket"):
        await middleware({"type": kind, "path": "/"}, _receive, _send)
    assert seen == ["lifespan", "websocket", "websocket"]


async def _receive() -> Message:  # pragma: no cover - apps here never read
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    pass


# --- the deadline header ------------------------------------------------------------------


async def test_spent_budget_gets_504_without_calling_the_app() -> None:
    """``x-deadline-ms: 0`` (or less) is answered 504 at once; the app never runs."""
    app = App()
    async with client_for(app.starlette()) as client:
        zero = await client.get("/fast", headers={"x-deadline-ms": "0"})
        negative = await client.get("/fast", headers={"x-deadline-ms": "-20"})
    assert zero.status_code == negative.status_code == 504
    assert app.calls == 0


async def test_budget_becomes_the_request_deadline() -> None:
    """The app sees the caller's budget as ``remaining()``, a little less than sent."""
    app = App()
    async with client_for(app.starlette()) as client:
        await client.get("/fast", headers={"x-deadline-ms": "1500"})
        await client.get("/fast")
    first, second = app.deadlines
    assert first is not None
    assert 0 < first <= 1.5
    assert second is None


@pytest.mark.parametrize("value", ["abc", "1e3", "inf", "nan", "", "12ms", "1,5", "1.2.3"])
async def test_malformed_budget_is_ignored(value: str) -> None:
    """A budget that does not parse is treated as absent: no deadline, the app runs."""
    app = App()
    async with client_for(app.starlette()) as client:
        response = await client.get("/fast", headers={"x-deadline-ms": value})
    assert response.status_code == 200
    assert app.deadlines == [None]


async def test_huge_budget_is_capped() -> None:
    """A budget beyond ``max_deadline`` is cut down to it."""
    app = App()
    async with client_for(app.starlette(max_deadline=60)) as client:
        await client.get("/fast", headers={"x-deadline-ms": "99999999999999"})
    (left,) = app.deadlines
    assert left is not None
    assert 59 < left <= 60


async def test_deadline_cuts_the_app_off_with_504() -> None:
    """With ``enforce_deadline=True``, a budget spent before the app answers gives 504."""
    app = App()
    async with client_for(app.starlette(enforce_deadline=True)) as client:
        response = await client.get("/work", headers={"x-deadline-ms": "50"})
    assert response.status_code == 504


async def test_custom_deadline_header_and_opt_out() -> None:
    """``deadline_header`` renames the header; ``None`` ignores deadlines altogether."""
    app = App()
    async with client_for(app.starlette(deadline_header="Grpc-Timeout-Ms")) as client:
        await client.get("/fast", headers={"grpc-timeout-ms": "1000", "x-deadline-ms": "0"})
    assert app.deadlines[0] is not None
    app = App()
    async with client_for(app.starlette(deadline_header=None)) as client:
        response = await client.get("/fast", headers={"x-deadline-ms": "0"})
    assert response.status_code == 200


async def test_deadline_options_as_a_group() -> None:
    """``deadlines=Deadlines(...)`` does what its keywords do: the renamed header is read,
    and a budget spent before the app answers gives 504 when enforced."""
    app = App()
    options = Deadlines(deadline_header="Grpc-Timeout-Ms", enforce_deadline=True)
    async with client_for(app.starlette(deadlines=options)) as client:
        response = await client.get("/work", headers={"grpc-timeout-ms": "50"})
        assert response.status_code == 504
        response = await client.get("/fast", headers={"x-deadline-ms": "0"})  # not read
        assert response.status_code == 200


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"deadlines": Deadlines(), "enforce_deadline": True}, ValueError, "not both"),
        ({"deadlines": Deadlines(), "deadline_header": None}, ValueError, "not both"),
        ({"shedding": Shedding(), "trust_criticality": True}, ValueError, "not both"),
        ({"shedding": Shedding(), "shares": {"sheddable": 0.5}}, ValueError, "not both"),
        ({"deadlines": Shedding()}, TypeError, "deadlines must be a Deadlines"),
        ({"shedding": {"criticality": {}}}, TypeError, "shedding must be a Shedding"),
    ],
)
def test_an_option_group_and_its_keywords_are_not_mixed(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """A group next to its own options as keywords (other than their defaults) is a
    ValueError rather than one of them silently ignored; a group of another kind a
    TypeError."""
    with pytest.raises(error, match=match):
        ResilienceMiddleware(_send, **options)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Deadlines(max_deadline=float("inf")), "max_deadline"),
        (lambda: Deadlines(deadline_header=""), "deadline_header"),
        (lambda: Deadlines(enforce_deadline=1), "enforce_deadline"),
    ],
)
def test_bad_deadline_options_fail_when_the_group_is_built(factory: Any, match: str) -> None:
    """Deadlines checks its options itself, naming them (as the keywords would)."""
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": "1"}, TypeError),
        ({"max_concurrent": 0}, ValueError),
        ({"rate": -1}, ValueError),
        ({"exclude": "/health"}, TypeError),
        ({"exclude": ("health",)}, ValueError),
        ({"overrides": {"/x": {"timeot": 1}}}, ValueError),
        ({"overrides": {"/x": 3}}, TypeError),
        ({"max_deadline": float("inf")}, ValueError),
        ({"deadline_header": ""}, TypeError),
        ({"enforce_deadline": "false"}, TypeError),
        ({"enforce_deadline": 1}, TypeError),
        ({"max_waiting": -1}, ValueError),
        ({"max_wait": -5}, ValueError),
        ({"max_waiting": 2}, ValueError),
        ({"max_wait": 1.0}, ValueError),
        ({"max_concurrent": 1, "max_waiting": 1, "max_wait": 10**400}, ValueError),
        ({"overrides": {"/x": {"max_concurrent": None, "max_waiting": 3}}}, ValueError),
        ({"name": ""}, ValueError),
        ({"store": "redis://"}, TypeError),
    ],
)
def test_validation(options: dict[str, Any], error: type[Exception]) -> None:
    """Bad options fail at construction, naming the option."""
    with pytest.raises(error):
        ResilienceMiddleware(_send, **options)


async def test_store_makes_the_rate_limit_fleet_wide() -> None:
    """Two middlewares (two replicas) given one store share a rate bucket."""
    from resilience import MemoryStore

    store = MemoryStore()
    replicas = [App().starlette(rate=1, per=60, burst=1, store=store) for _ in range(2)]
    async with client_for(replicas[0]) as first, client_for(replicas[1]) as second:
        assert (await first.get("/fast")).status_code == 200
        assert (await second.get("/fast")).status_code == 429


async def test_store_makes_the_bulkhead_fleet_wide() -> None:
    """Two replicas given one store share one concurrency limit: a replica holds a share of
    it, which goes back to the fleet at its next renewal once unused (a second later)."""
    from resilience import MemoryStore, status

    clock = FakeClock()
    store = MemoryStore(clock=clock)
    apps = [App(), App()]
    replicas = [a.starlette(max_concurrent=1, store=store, clock=clock) for a in apps]
    async with client_for(replicas[0]) as first, client_for(replicas[1]) as second:
        busy = asyncio.create_task(first.get("/work"))
        await called(apps[0])
        shed = await second.get("/work")
        assert shed.status_code == 503
        assert "retry-after" in shed.headers
        apps[0].release.set()
        assert (await busy).status_code == 200
        apps[1].release.set()
        for _ in range(3):  # renewals: the first replica's unused share goes back
            await advance(clock, 1.0)
        assert (await second.get("/work")).status_code == 200
    (pool,) = [p for p in await status(store) if p.kind == "bulkhead"]
    assert pool.in_flight == 0


def test_no_starlette_import() -> None:
    """The middleware module imports no web framework (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, resilience.integrations.asgi;"
        "assert 'starlette' not in sys.modules and 'httpx' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- whose deadline is believed, and until when ---------------------------------------


def _spent() -> bool:
    """Whether the request's deadline has passed (or there is none)."""
    left = remaining()
    return left is None or left < 0


async def _until_spent() -> None:
    """Wait (real time) until the request's deadline has passed."""
    await until(_spent, 5, "the request's deadline", every=0.005)


async def test_caller_deadline_does_not_cut_the_app_by_default() -> None:
    """By default a client's ``x-deadline-ms`` is forwarded but never cancels the request."""

    async def endpoint(request: Request) -> PlainTextResponse:
        await _until_spent()
        return PlainTextResponse("finished")

    asgi = Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(ResilienceMiddleware)])
    async with client_for(asgi) as client:
        response = await client.get("/", headers={"x-deadline-ms": "20"})
    assert response.status_code == 200
    assert response.text == "finished"


async def test_caller_deadline_never_cancels_background_work() -> None:
    """Even enforced, a caller's deadline stops at the response: background tasks finish."""
    from starlette.background import BackgroundTask

    audit: list[float | None] = []

    async def write_audit_log() -> None:
        audit.append(remaining())  # the request's deadline is lifted: None
        await asyncio.sleep(0.05)  # longer than the caller's 20 ms budget
        audit.append(0.0)

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", background=BackgroundTask(write_audit_log))

    middleware = [Middleware(ResilienceMiddleware, enforce_deadline=True)]
    asgi = Starlette(routes=[Route("/", endpoint)], middleware=middleware)
    async with client_for(asgi) as client:
        response = await client.get("/", headers={"x-deadline-ms": "20"})
    assert response.status_code == 200
    assert audit == [None, 0.0]


def _streamed_with_background(seen: list[object]) -> Starlette:
    """A Starlette app streaming its response, whose background task notes ``remaining()``
    and the deadline its outgoing call through ``ResilientTransport`` sends."""
    from resilience.integrations.httpx import HttpPolicy, ResilientTransport
    from starlette.background import BackgroundTask

    def downstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-deadline-ms"))
        return httpx.Response(200)

    policy = HttpPolicy(timeout=None, total_timeout=None)
    transport = ResilientTransport(httpx.MockTransport(downstream), policy=policy)

    async def note() -> None:
        seen.append(remaining())
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get("https://downstream.test/")

    async def body() -> Any:
        yield b"hello"

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(body(), background=BackgroundTask(note))

    return Starlette(routes=[Route("/", endpoint)])


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("options", [{}, {"timeout": 60}], ids=["budget", "budget+timeout"])
async def test_streamed_response_lifts_the_deadline_for_background_tasks(
    spec_version: str, options: dict[str, Any]
) -> None:
    """A streamed response's background task runs with no deadline, whichever task sends the
    body (under ASGI spec 2.3 Starlette sends it from a child task)."""
    seen: list[object] = []
    middleware = ResilienceMiddleware(_streamed_with_background(seen), **options)
    never = asyncio.Event()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()  # no disconnect: Starlette cancels this once the body is sent
        raise AssertionError("unreachable")  # pragma: no cover

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "method": "GET",
        "path": "/",
        "headers": [(b"x-deadline-ms", b"100000")],
    }
    await middleware(scope, receive, send)
    assert sent[0]["status"] == 200
    assert seen == [None, None]  # no deadline, none sent downstream
    assert remaining() is None


async def test_task_started_before_the_response_loses_the_deadline_with_it() -> None:
    """A task the app starts before responding has the request's deadline until the
    response is complete, and none after (as a background task)."""
    seen: list[float | None] = []
    done = asyncio.Event()

    async def worker() -> None:
        seen.append(remaining())
        await done.wait()
        seen.append(remaining())

    tasks: list[asyncio.Task[None]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        tasks.append(asyncio.create_task(worker()))
        await asyncio.sleep(0)  # the worker notes its deadline
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope: Scope = {"type": "http", "path": "/", "headers": [(b"x-deadline-ms", b"100000")]}
    await ResilienceMiddleware(app)(scope, _receive, _send)
    done.set()
    await tasks[0]
    assert seen[0] is not None
    assert 0 < seen[0] <= 100
    assert seen[1] is None


async def test_streamed_response_lifts_the_deadline_under_uvicorn() -> None:
    """Under uvicorn, a streamed response's background task makes its outgoing calls with no
    deadline: the caller's budget ended with the response."""
    seen: list[object] = []
    asgi = ResilienceMiddleware(_streamed_with_background(seen))
    with serve(asgi) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(server.url, headers={"x-deadline-ms": "100000"})
        await until(lambda: len(seen) == 2, what="the background task's call")
    assert response.text == "hello"
    assert seen == [None, None]


async def test_caller_deadline_stops_cutting_once_the_response_started() -> None:
    """A streamed response that outlives the enforced budget is not aborted."""

    async def body() -> Any:
        yield b"first "
        await _until_spent()
        await asyncio.sleep(0.01)
        yield b"last"

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(body())

    middleware = [Middleware(ResilienceMiddleware, enforce_deadline=True)]
    asgi = Starlette(routes=[Route("/", endpoint)], middleware=middleware)
    async with client_for(asgi) as client:
        response = await client.get("/", headers={"x-deadline-ms": "30"})
    assert response.status_code == 200
    assert response.text == "first last"


async def test_own_timeout_is_the_deadline_forwarded_downstream(clock: FakeClock) -> None:
    """Without a caller budget, the middleware's ``timeout`` is the request's deadline."""
    app = App()
    async with client_for(app.starlette(timeout=5, clock=clock)) as client:
        await client.get("/fast")
        await client.get("/fast", headers={"x-deadline-ms": "2000"})
        await client.get("/fast", headers={"x-deadline-ms": "9000"})
    own, caller, capped = app.deadlines
    assert own is not None
    assert 4 < own <= 5
    assert caller is not None
    assert 1 < caller <= 2
    assert capped is not None
    assert 4 < capped <= 5


async def test_fleet_lease_outlives_the_route_timeout(clock: FakeClock) -> None:
    """A request running 40 s under ``timeout=60`` keeps its fleet-wide permit (lease > 30 s)."""
    from resilience import MemoryStore

    store = MemoryStore(clock=clock)
    apps = [App(), App()]
    replicas = [a.starlette(max_concurrent=1, timeout=60, store=store, clock=clock) for a in apps]
    async with client_for(replicas[0]) as first, client_for(replicas[1]) as second:
        busy = asyncio.create_task(first.get("/work"))
        await called(apps[0])
        clock.advance(40)
        assert (await second.get("/work")).status_code == 503
        apps[0].release.set()
        assert (await busy).status_code == 200
    assert await store.count_leases("asgi") == 0


async def test_shared_store_needs_a_name_of_this_service(redis_url: str) -> None:
    """On a Redis shared with other services the default name ``asgi`` is refused."""
    from resilience.store.redis import RedisStore

    store = RedisStore.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="name"):
            ResilienceMiddleware(_send, max_concurrent=4, store=store)
        with pytest.raises(ValueError, match="name"):
            ResilienceMiddleware(_send, rate=10, store=store, name="asgi")
        ResilienceMiddleware(_send, max_concurrent=4, store=store, name="orders")
    finally:
        await store.aclose()


# --- shutting down: the fleet's permits go back ---------------------------------------------


class Lifespan:
    """A pure ASGI app that speaks the lifespan protocol; ``/block`` waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.running = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[1]  # startup / shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        self.running += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def run_lifespan(app: Any) -> list[str]:
    """Start ``app``'s lifespan and shut it down, as a server does; the messages it sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    for kind in ("startup", "shutdown"):
        inbox.put_nowait({"type": f"lifespan.{kind}"})
    sent: list[str] = []

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
    return sent


async def test_lifespan_shutdown_gives_the_fleet_share_back(clock: FakeClock) -> None:
    """A replica that shuts down cleanly gives its share of the fleet's limit back on
    ``lifespan.shutdown``: the replica taking its traffic serves all of it at once, not
    only once the leaving replica's lease (30 s) has run out."""
    from resilience import MemoryStore

    store = MemoryStore(clock=clock)
    app = Lifespan()
    leaving, staying = (
        ResilienceMiddleware(app, max_concurrent=8, store=store, clock=clock, name="svc")
        for _ in range(2)
    )

    async def burst(replica: ResilienceMiddleware) -> list[int]:
        async with client_for(replica) as client:
            calls = [asyncio.create_task(client.get("/block")) for _ in range(8)]
            await settle(100)
            app.release.set()
            answers = [r.status_code for r in await asyncio.gather(*calls)]
            app.release.clear()
            return answers

    assert await burst(leaving) == [200] * 8
    assert await burst(staying) == [503] * 8  # the leaving replica's share holds the limit
    assert await run_lifespan(leaving) == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    clock.advance(0.3)  # past the quarter second a "full" answer is trusted
    assert await burst(staying) == [200] * 8
    await staying.aclose()


async def test_the_fleet_lease_is_long_enough_for_a_slow_store(redis_url: str) -> None:
    """A store with a 10 s timeout: the middleware's fleet lease is at least 6 timeouts (60 s),
    not the 30 s default a renewal could not keep alive, and no error is raised."""
    from resilience.store.redis import RedisStore

    store = RedisStore.from_url(redis_url, prefix="slow-store", timeout=10.0)
    try:
        asgi = ResilienceMiddleware(Lifespan(), max_concurrent=4, store=store, name="svc")
        assert asgi._default.bulkhead is not None
        assert asgi._default.bulkhead.lease == 60.0
    finally:
        await store.aclose()
