"""Hedging and client-side throttling in ResilientTransport (HttpPolicy's ``hedge`` and
``throttle`` options), over MockTransport and a fake clock."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from resilience.integrations.httpx import (
    HedgeOptions,
    HttpPolicy,
    ResilientTransport,
    RetryOptions,
    Throttled,
    ThrottleOptions,
)

from resilience import ThrottledError
from resilience.testing import FakeClock

from ..asgi_support import serve
from ..helpers import advance, cancelled, settle, started
from .test_httpx import Ledger

ONCE = RetryOptions(attempts=1)
"""One attempt: no retry."""

T = TypeVar("T")

ENDPOINTS = ["http://a:8000", "http://b:8000", "http://c:8000"]


class Slow:
    """Upstreams whose ``slow`` hosts answer only when ``release`` is set."""

    def __init__(self, *slow: str) -> None:
        self.slow = set(slow)
        self.release = asyncio.Event()
        self.hits: Counter[str] = Counter()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.hits[host] += 1
        if host in self.slow:
            await self.release.wait()
        return httpx.Response(200, text=host)


def client(handler: object, clock: FakeClock, **options: object) -> httpx.AsyncClient:
    policy = HttpPolicy(clock=clock, timeout=None, **options)  # type: ignore[arg-type]
    transport = ResilientTransport(httpx.MockTransport(handler), policy=policy)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://a:8000")


def hedged_service(handler: object, clock: FakeClock, seed: int) -> ResilientTransport:
    """The service ``orders`` on ``ENDPOINTS``, hedged after 0.05 s with room for every hedge."""
    policy = HttpPolicy(clock=clock, timeout=None, hedge=HedgeOptions(delay=0.05, budget=1.0))
    return ResilientTransport(
        httpx.MockTransport(handler),  # type: ignore[arg-type]
        policy=policy,
        service="orders",
        endpoints=ENDPOINTS,
        rng=random.Random(seed),
    )


@pytest.mark.parametrize("seed", range(5))
async def test_a_hedge_goes_to_another_endpoint(seed: int) -> None:
    """Whichever endpoint the first attempt went to, the hedge goes to another one."""
    clock = FakeClock()
    gate = asyncio.Event()
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if len(hosts) == 1:
            await gate.wait()  # the first attempt hangs (until cancelled)
        return httpx.Response(200, text=request.url.host)

    transport = hedged_service(handler, clock, seed)
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as c:
        task = await started(c.get("/x"))
        assert len(hosts) == 1  # no hedge before the delay
        clock.advance(0.05)
        response = await task
        assert len(hosts) == 2
        assert hosts[0] != hosts[1]
        assert response.text == hosts[1]


async def test_the_first_answer_wins_and_the_slow_attempt_is_cancelled() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    calls = cancelled = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls, cancelled
        calls += 1
        if calls == 1:  # the first attempt hangs
            try:
                await gate.wait()
            except asyncio.CancelledError:
                cancelled += 1
                raise
        return httpx.Response(200, text=f"attempt {calls}")

    async with client(handler, clock, hedge=HedgeOptions(delay=0.05, budget=1.0)) as c:
        task = await started(c.get("/x"))
        assert calls == 1
        clock.advance(0.05)
        response = await task
        assert response.text == "attempt 2"
        assert calls == 2
        await settle()
        assert cancelled == 1  # the slow attempt was cancelled, not left running
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending


async def test_a_post_is_never_hedged() -> None:
    clock = FakeClock()
    upstreams = Slow("a")
    async with client(upstreams, clock, hedge=HedgeOptions(delay=0.05, budget=1.0)) as c:
        task = await started(c.post("/x", content=b"order"))
        await advance(clock, 1.0)
        assert upstreams.hits["a"] == 1
        upstreams.release.set()
        assert (await task).status_code == 200
        assert upstreams.hits["a"] == 1


async def test_a_throttled_client_stops_sending_to_a_refusing_origin() -> None:
    """Every answer is a 503: after the first few, most requests are refused here, with an
    error that is both a ThrottledError and an httpx.TransportError."""
    sent = 0

    def refusing(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return httpx.Response(503)

    clock = FakeClock()
    errors: list[Throttled] = []
    async with client(refusing, clock, throttle=ThrottleOptions(), retry=ONCE, breaker=None) as c:
        for _ in range(300):
            try:
                await c.get("/x")
            except Throttled as error:
                errors.append(error)
    refused = len(errors)
    assert refused > 0
    assert all(
        isinstance(e, ThrottledError) and isinstance(e, httpx.TransportError) for e in errors
    )
    assert sent + refused == 300
    assert sent < 100


def test_bad_hedge_and_throttle_options_are_refused() -> None:
    with pytest.raises(ValueError, match="delay"):
        HttpPolicy(hedge=HedgeOptions(delay="fast"))
    with pytest.raises(ValueError, match="budget"):
        HttpPolicy(hedge=HedgeOptions(delay=0.1, budget=0))
    with pytest.raises(TypeError, match="throttle"):
        HttpPolicy(throttle="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        HttpPolicy(throttle=ThrottleOptions(k=0.5))


async def test_the_criticality_of_the_request_being_served_goes_downstream() -> None:
    from resilience.integrations import CRITICALITY_HEADER, criticality

    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(CRITICALITY_HEADER))
        return httpx.Response(200)

    async with client(handler, FakeClock()) as c:
        await c.get("/plain")
        with criticality("sheddable"):
            await c.get("/batch")
        with criticality("critical"):
            await c.get("/checkout", headers={CRITICALITY_HEADER: "default"})  # the caller's own
    assert seen == [None, "sheddable", "default"]


async def test_an_attempt_overtaken_by_a_hedge_teaches_p2c_its_endpoint_is_slow() -> None:
    """The attempt a hedge overtook is cancelled before its answer, but it had run longer
    than the winner: its endpoint's cost rises at least to the winner's, so P2C learns it is
    slower (an endpoint whose slow answers were always overtaken would look fast forever)."""
    clock = FakeClock()
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if len(hosts) == 1:
            await asyncio.Event().wait()  # the first attempt hangs until cancelled
        return httpx.Response(200, text=request.url.host)

    transport = hedged_service(handler, clock, 3)
    assert transport._service is not None
    loads = {e.host: e.load for e in transport._service.endpoints}
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as c:
        task = await started(c.get("/x"))
        clock.advance(0.05)
        response = await task
    slow, winner = hosts[0], response.text
    assert slow != winner
    assert loads[winner].cost > 0
    assert loads[slow].cost >= loads[winner].cost
    assert loads[slow].in_flight == 0


def late_loser(
    late: Callable[[], T], then: Callable[[], T]
) -> Callable[[httpx.Request], Awaitable[T]]:
    """An upstream whose first call waits until it is cancelled and answers ``late()`` anyway,
    a turn later (a loser that does not stop at its cancellation); every other call answers
    ``then()``."""
    calls = 0

    async def upstream(request: httpx.Request) -> T:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0)  # it answers anyway, a turn later
                return late()
        return then()

    return upstream


async def test_an_answer_a_loser_gets_after_the_request_was_answered_is_closed() -> None:
    """A losing attempt that still gets its answer after the winner's was returned (it did
    not stop at its cancellation) has that answer closed: no connection is left held."""
    clock = FakeClock()
    closed: list[str] = []

    class Tracked(httpx.AsyncByteStream):
        def __init__(self, label: str) -> None:
            self.label = label

        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b"late"

        async def aclose(self) -> None:
            closed.append(self.label)

    handler = late_loser(
        lambda: httpx.Response(200, stream=Tracked("loser")),
        lambda: httpx.Response(200, text="winner"),
    )
    async with client(handler, clock, hedge=HedgeOptions(delay=0.05, budget=1.0)) as c:
        task = await started(c.get("/x"))
        clock.advance(0.05)
        response = await task
        assert response.text == "winner"
        await settle()
    assert closed == ["loser"]


# --- the answers hedged attempts do not return are closed -----------------------------------


class Gated:
    """A Ledger handler: the n-th call (from 0) answers ``statuses[n]`` once ``gates[n]`` is set
    (a call beyond the list never answers)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = statuses
        self.gates = [asyncio.Event() for _ in statuses]
        self.calls = 0

    async def __call__(self, request: httpx.Request) -> int:
        n = self.calls
        self.calls += 1
        if n >= len(self.statuses):
            await asyncio.Event().wait()
        await self.gates[n].wait()
        return self.statuses[n]


def hedged(ledger: Ledger, clock: FakeClock, **options: object) -> httpx.AsyncClient:
    policy = HttpPolicy(
        clock=clock,
        timeout=None,
        hedge=HedgeOptions(delay=0.05, budget=1.0),
        breaker=None,
        **options,
    )
    return httpx.AsyncClient(transport=ResilientTransport(ledger, policy=policy))


async def hedge_started(
    clock: FakeClock, request: Coroutine[Any, Any, httpx.Response]
) -> asyncio.Task[httpx.Response]:
    """``request`` under way, and its hedge too: the hedge delay (0.05 s) has passed."""
    task = await started(request)
    await advance(clock, 0.05)
    return task


async def test_a_losing_attempts_failed_response_is_closed_when_the_hedge_wins() -> None:
    """The first attempt answers 503 while its hedge is still out; the hedge's 200 is returned
    and the 503 is closed (its connection goes back to the pool)."""
    clock = FakeClock()
    upstream = Gated(503, 200)
    ledger = Ledger(upstream)
    async with hedged(ledger, clock, retry=ONCE) as client:
        task = await hedge_started(clock, client.get("http://a:8000/x"))
        upstream.gates[0].set()  # the first attempt fails
        await settle()
        upstream.gates[1].set()  # the hedge wins
        response = await task
        assert response.status_code == 200
        assert ledger.open == 0  # the winner was read and closed by the client; the 503 too
    assert [body.closed for body in ledger.bodies] == [True, True]


async def test_a_failed_answer_arriving_after_the_winner_is_closed() -> None:
    """A loser that answers 503 after the request was answered has that answer closed."""
    clock = FakeClock()
    ledger = Ledger(late_loser(lambda: 503, lambda: 200))
    async with hedged(ledger, clock) as client:
        task = await started(client.get("http://a:8000/x"))
        clock.advance(0.05)
        assert (await task).status_code == 200
        await settle()
    assert len(ledger.bodies) == 2
    assert ledger.open == 0


async def test_a_failed_answer_is_closed_when_a_hedged_request_is_cancelled() -> None:
    """The caller cancels while the first attempt's 503 is in and the hedge is still out:
    the 503 is closed, the hedge cancelled."""
    clock = FakeClock()
    upstream = Gated(503)  # the hedge (second call) never answers
    ledger = Ledger(upstream)
    async with hedged(ledger, clock, retry=ONCE) as client:
        task = await hedge_started(clock, client.get("http://a:8000/x"))
        upstream.gates[0].set()
        await settle()
        assert upstream.calls == 2
        assert len(ledger.bodies) == 1
        await cancelled(task)
    assert ledger.open == 0


async def test_every_attempt_of_a_hedged_post_carries_one_key() -> None:
    """A POST hedged (POST is in ``RetryOptions.methods``) goes out twice with one
    Idempotency-Key."""
    clock = FakeClock()
    upstream = Gated(200, 200)
    ledger = Ledger(upstream)
    async with hedged(ledger, clock, retry=RetryOptions(methods={"GET", "POST"})) as client:
        task = await hedge_started(clock, client.post("http://a:8000/orders", content=b"order"))
        upstream.gates[1].set()
        assert (await task).status_code == 200
    keys = [r.headers.get("idempotency-key") for r in ledger.requests]
    assert len(keys) == 2
    assert keys[0]
    assert keys[0] == keys[1]
    assert all(r.content == b"order" for r in ledger.requests)


class Racing:
    """A pure ASGI app: on ``/race`` odd requests answer 503 after 0.1 s and even ones 200
    after 0.3 s (so a hedge wins over a failed first attempt); on ``/meet`` each request
    waits until ``expected`` requests are in at once, then all answer 200."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.races = 0
        self.waiting = 0
        self.met: asyncio.Event | None = None

    async def __call__(self, scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        status = 200
        if scope["path"] == "/race":
            self.races += 1
            if self.races % 2:
                await asyncio.sleep(0.1)
                status = 503
            else:
                await asyncio.sleep(0.3)
        else:
            if self.met is None:
                self.met = asyncio.Event()
            self.waiting += 1
            if self.waiting >= self.expected:
                self.met.set()
            await self.met.wait()
        await send({"type": "http.response.start", "status": status, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"x" * 100})  # type: ignore[operator]


async def test_hedged_failures_give_their_connections_back_over_a_real_socket() -> None:
    """Three hedged requests whose first attempt answered 503 leave a 4-connection pool whole:
    4 requests then fit in it at once (each waits on the server for the other 3)."""
    app = Racing(expected=4)
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=4))
    policy = HttpPolicy(retry=ONCE, timeout=None, hedge=HedgeOptions(delay=0.05, budget=1.0))
    with serve(app) as server:
        transport = ResilientTransport(inner, policy=policy)
        async with httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(10.0, pool=3.0)
        ) as client:
            for _ in range(3):
                response = await client.get(f"{server.url}/race")
                assert response.status_code == 200
            meet = [client.get(f"{server.url}/meet") for _ in range(4)]
            statuses = [r.status_code for r in await asyncio.gather(*meet)]
    assert statuses == [200] * 4
    assert app.races == 6
