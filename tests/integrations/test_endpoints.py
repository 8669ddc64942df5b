"""Tests for several endpoints of one service: ejection, P2C, failover (integrations/httpx/
_balancing.py and _endpoints.py, the ``endpoints=`` of ResilientTransport), over
MockTransport and uvicorn on loopback."""

from __future__ import annotations

import asyncio
import random
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from resilience.integrations.httpx import (
    BreakerOptions,
    BulkheadOptions,
    FallbackOptions,
    HealthCheckOptions,
    HttpPolicy,
    NoHealthyEndpoint,
    ResilientTransport,
    RetryOptions,
)
from resilience.integrations.httpx._balancing import (
    DECAY,
    FAILURE_COST,
    MIN_COST,
    Load,
    eligible,
    pick,
)

from resilience import (
    CircuitBreaker,
    CountWindow,
    MemoryStore,
    NoHealthyEndpointError,
    RejectedError,
    RetryBudget,
)
from resilience.testing import FakeClock

from ..asgi_support import LiveServer
from ..helpers import settle

ONCE = RetryOptions(attempts=1)
"""One attempt: no retry."""

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"
ENDPOINTS = [A, B, C]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Flag:
    """A health source: anything with a ``healthy`` attribute."""

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy


class Upstreams:
    """A MockTransport handler playing several endpoints, told apart by the request's host."""

    def __init__(self, dead: tuple[str, ...] = (), status: dict[str, int] | None = None) -> None:
        self.dead = {httpx.URL(url).host for url in dead}
        self.status = {httpx.URL(url).host: s for url, s in (status or {}).items()}
        self.hits: Counter[str] = Counter()
        self.tried: Counter[str] = Counter()
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.tried[host] += 1
        if host in self.dead:
            raise httpx.ConnectError("connection refused", request=request)
        self.hits[host] += 1
        self.requests.append(request)
        return httpx.Response(self.status.get(host, 200), text=host)


def make_client(
    handler: Callable[[httpx.Request], Any],
    endpoints: list[str] | None = None,
    *,
    seed: int = 1,
    clock: FakeClock | None = None,
    health: dict[str, Any] | None = None,
    max_ejected: float = 0.5,
    **options: Any,
) -> httpx.AsyncClient:
    policy = HttpPolicy(clock=clock or FakeClock(autojump=True), **options)
    transport = ResilientTransport(
        httpx.MockTransport(handler),
        policy=policy,
        service="orders",
        endpoints=ENDPOINTS if endpoints is None else endpoints,
        health=health,
        max_ejected=max_ejected,
        rng=random.Random(seed),
    )
    return httpx.AsyncClient(transport=transport, base_url="http://orders")


def host(url: str) -> str:
    return httpx.URL(url).host


def same_breaker(name: str, store: MemoryStore, clock: FakeClock) -> CircuitBreaker:
    """A breaker sharing the state of the endpoint breaker ``name`` (the same name, store and
    configuration as ``HttpPolicy()`` gives it)."""
    breaker = HttpPolicy().breaker
    assert breaker is not None
    return CircuitBreaker(
        name, minimum_calls=breaker.minimum_calls, window=breaker.window, store=store, clock=clock
    )


# --- the selection rules, pure -------------------------------------------------------------


def test_pick_prefers_the_lower_score_of_two() -> None:
    """P2C: of two candidates the one with the lower score wins, whatever the draw."""
    rng = random.Random(3)
    assert {pick([0, 1], [5.0, 1.0], rng) for _ in range(50)} == {1}
    assert pick([2], [0.0, 0.0, 9.0], rng) == 2


def test_pick_never_chooses_the_worst_of_three() -> None:
    """With three candidates the highest score never wins a pair, the others share the load."""
    rng = random.Random(4)
    chosen = Counter(pick([0, 1, 2], [1.0, 1.0, 9.0], rng) for _ in range(300))
    assert chosen[2] == 0
    assert chosen[0] > 50
    assert chosen[1] > 50


def test_eligible_without_health_checks_skips_tripped() -> None:
    """Endpoints whose breaker rejects are never eligible, whatever max_ejected says."""
    assert eligible([True, False, True], [False] * 3, [0.0] * 3, 0.0) == [1]
    assert eligible([True] * 3, [False] * 3, [0.0] * 3, 0.0) == []


def test_a_share_below_one_endpoint_still_ejects_one() -> None:
    """As Envoy does, any share above 0 lets at least one endpoint be ejected (0.5 of 1, 0.2
    of 3); 0.0 lets none."""
    assert eligible([False], [True], [0.0], 0.5) == []
    assert eligible([False] * 3, [True, False, False], [0.0] * 3, 0.2) == [1, 2]
    assert eligible([False] * 3, [True, True, False], [2.0, 1.0, 0.0], 0.2) == [1, 2]
    assert eligible([False], [True], [0.0], 0.0) == [0]


def test_eligible_caps_health_ejections_least_bad_first() -> None:
    """Unhealthy endpoints beyond the cap are used again, the lowest scores first."""
    scores = [3.0, 1.0, 2.0, 0.5]
    # 4 endpoints, max_ejected 0.5: two may be out; all four unhealthy: the two best come back
    assert eligible([False] * 4, [True] * 4, scores, 0.5) == [1, 3]
    # one already out by its breaker: only one unhealthy one may stay out
    assert eligible([True, False, False, False], [False, True, True, True], scores, 0.5) == [1, 3]
    # max_ejected 1.0: health checks may empty the pool
    assert eligible([False] * 4, [True] * 4, scores, 1.0) == []


flags = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=12)


@given(
    flags,
    st.lists(st.floats(0.0, 10.0), min_size=12, max_size=12),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32),
)
def test_choice_never_ejected_while_a_healthy_one_exists(
    states: list[tuple[bool, bool]], scores: list[float], max_ejected: float, seed: int
) -> None:
    """A tripped endpoint is never chosen; a healthy one exists -> the choice is eligible."""
    tripped = [t for t, _ in states]
    unhealthy = [u for _, u in states]
    n = len(states)
    candidates = eligible(tripped, unhealthy, scores[:n], max_ejected)
    healthy = [i for i in range(n) if not tripped[i] and not unhealthy[i]]
    assert set(healthy) <= set(candidates)
    assert not any(tripped[i] for i in candidates)
    cap = int(max_ejected * n + 1e-9)
    if max_ejected > 0:
        cap = max(cap, 1)  # at least one, whatever the share
    assert n - len(candidates) <= max(cap, sum(tripped))  # health never passes the cap
    if not any(tripped):  # health alone keeps exactly as many out as the cap allows
        assert n - len(candidates) == min(cap, sum(unhealthy))
    if candidates:
        choice = pick(candidates, scores[:n], random.Random(seed))
        assert choice in candidates
        assert not tripped[choice]
    else:
        assert not healthy


@given(
    st.integers(1, 10),
    st.integers(0, 10),
    st.lists(st.floats(0.0, 10.0), min_size=20, max_size=20),
    st.integers(0, 2**32),
)
def test_with_k_healthy_the_choice_is_among_them(
    k: int, bad: int, scores: list[float], seed: int
) -> None:
    """k healthy endpoints and the rest ejected (max_ejected 1): every choice is a healthy one."""
    n = k + bad
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    healthy = set(order[:k])
    tripped = [i not in healthy and i % 2 == 0 for i in range(n)]
    unhealthy = [i not in healthy and i % 2 == 1 for i in range(n)]
    candidates = eligible(tripped, unhealthy, scores[:n], 1.0)
    assert set(candidates) == healthy
    for _ in range(10):
        assert pick(candidates, scores[:n], rng) in healthy


def test_load_peak_then_decay() -> None:
    """A slow sample counts at once; faster ones and idle time bring the cost back down."""
    load = Load()
    assert load.score(0.0) == MIN_COST
    load.observe(0.2, 1.0)
    assert load.score(1.0) == pytest.approx(0.2)
    load.observe(0.001, 1.001)  # a fast answer right after moves the cost very little
    assert load.cost == pytest.approx(0.2, rel=1e-3)
    assert load.score(1.001 + DECAY) == pytest.approx(0.2 / 2.718281828, rel=1e-2)
    load.in_flight = 3
    assert load.score(1.001) == pytest.approx(4 * load.cost)


def test_an_abandoned_call_only_raises_the_cost() -> None:
    """A call cancelled after 0.3 s took at least that long: above the cost it replaces it;
    below, it says nothing (the cost is not pulled down by a call that never answered)."""
    load = Load()
    load.observe(0.01, 1.0)
    load.outlasted(0.3, 1.5)
    assert load.cost == 0.3
    assert load.stamp == 1.5
    load.outlasted(0.001, 1.6)
    assert load.cost == 0.3
    assert load.stamp == 1.5


def test_a_fast_failure_is_not_cheap() -> None:
    """A failure observed in 1 ms costs FAILURE_COST: an endpoint failing fast is avoided."""
    load = Load()
    load.observe(0.001, 1.0, failed=True)
    assert load.cost == FAILURE_COST


# --- the transport: URL mapping, failover, ejection ----------------------------------------


async def test_request_url_maps_onto_the_endpoint() -> None:
    """Scheme, host and port (and Host) become the endpoint's; path and query are kept."""
    upstreams = Upstreams()
    async with make_client(upstreams, [A]) as client:
        response = await client.get("/items", params={"page": "2"})
    assert response.status_code == 200
    sent = upstreams.requests[0]
    assert str(sent.url) == "http://10.0.0.1:8000/items?page=2"
    assert sent.headers["host"] == "10.0.0.1:8000"
    assert response.request.url == sent.url


async def test_requests_spread_over_healthy_endpoints() -> None:
    """With every endpoint alike, each gets a share of the requests."""
    upstreams = Upstreams()
    async with make_client(upstreams) as client:
        for _ in range(60):
            assert (await client.get("/")).status_code == 200
    assert set(upstreams.hits) == {host(A), host(B), host(C)}


async def test_connect_error_fails_over_even_for_post() -> None:
    """A refused connection sends nothing, so even a POST goes on to another endpoint."""
    upstreams = Upstreams(dead=(A,))
    async with make_client(upstreams) as client:
        for _ in range(20):
            assert (await client.post("/orders", json={"n": 1})).status_code == 200
    assert upstreams.tried[host(A)] >= 1  # it was tried, and each time another answered
    assert upstreams.hits[host(A)] == 0
    assert sum(upstreams.hits.values()) == 20


def test_an_endpoint_port_out_of_range_is_named() -> None:
    """A port no socket can use is refused at construction, the error naming the endpoint."""
    with pytest.raises(ValueError, match="99999"):
        ResilientTransport(
            httpx.MockTransport(Upstreams()), service="o", endpoints=[A, "http://h:99999"]
        )


async def test_a_failed_over_post_keeps_one_key_across_endpoints() -> None:
    """The endpoint refusing the connection and the one answering saw the same key."""
    keys: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append((request.url.host, request.headers.get("idempotency-key")))
        if request.url.host != host(C):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200)

    async with make_client(handler, retry=ONCE) as client:
        for _ in range(5):
            assert (await client.post("/orders", json={})).status_code == 200
    assert any(h != host(C) for h, _ in keys)  # some went to a dead endpoint first
    assert all(key for _, key in keys)
    answered = [key for h, key in keys if h == host(C)]
    assert len(set(answered)) == 5
    assert {key for _, key in keys} == set(answered)


async def test_a_failed_endpoints_response_is_closed_when_another_answers() -> None:
    """Every request's first attempt gets a 503, its retry (usually at another endpoint) a
    200: each 503 is closed, the answer returned is the only response left open."""
    from .test_httpx import Ledger

    ledger = Ledger(lambda request: 503 if len(ledger.requests) % 2 else 200)
    transport = ResilientTransport(
        ledger,
        policy=HttpPolicy(clock=FakeClock(autojump=True), breaker=None),
        service="orders",
        endpoints=ENDPOINTS,
        rng=random.Random(1),
    )
    for _ in range(10):
        response = await transport.handle_async_request(httpx.Request("GET", "http://orders/"))
        assert response.status_code == 200
        assert ledger.open == 1
        await response.aclose()
    assert len(ledger.bodies) == 20
    assert ledger.open == 0


async def test_one_unhealthy_endpoint_of_one_is_ejected() -> None:
    """With the default max_ejected, the only endpoint, reported unhealthy, is ejected: the
    request is refused with NoHealthyEndpoint instead of sent to it."""
    upstreams = Upstreams()
    async with make_client(upstreams, [A], health={A: Flag(False)}) as client:
        with pytest.raises(NoHealthyEndpoint):
            await client.get("/")
    assert not upstreams.tried


async def test_error_after_sending_is_not_failed_over_for_post() -> None:
    """A read error on a POST may have reached the server: it is raised, nothing is resent."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        raise httpx.ReadError("reset", request=request)

    async with make_client(handler) as client:
        with pytest.raises(httpx.ReadError):
            await client.post("/orders", json={})
    assert len(calls) == 1


async def test_all_endpoints_refusing_raises_the_connect_error() -> None:
    """Every endpoint refusing: the connect error is raised once each was tried."""
    upstreams = Upstreams(dead=tuple(ENDPOINTS))
    async with make_client(upstreams, retry=ONCE) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")
    assert sorted(upstreams.tried.values()) == [1, 1, 1]


async def test_failover_stays_within_the_retry_budget() -> None:
    """A retry budget that refuses stops the failover after the first connect error."""
    budget = RetryBudget(name="orders", max_tokens=2, token_ratio=0.1)
    upstreams = Upstreams(dead=tuple(ENDPOINTS))
    async with make_client(upstreams, retry=RetryOptions(attempts=1, budget=budget)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/", json={})
    assert sum(upstreams.tried.values()) == 1


async def test_spent_deadline_sends_nothing() -> None:
    """A request whose deadline is spent fails at once, before any endpoint is chosen."""
    from resilience.integrations.httpx import DeadlineExceeded

    upstreams = Upstreams()
    async with make_client(upstreams) as client:
        with pytest.raises(DeadlineExceeded):
            await client.get("/", extensions={"resilience": {"deadline": 0}})
    assert not upstreams.tried


async def test_full_bulkhead_fails_over_to_another_endpoint() -> None:
    """A rejection by an endpoint's own bulkhead sends nothing: the request goes elsewhere."""
    release = asyncio.Event()
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        await release.wait()
        return httpx.Response(200)

    async with make_client(
        handler, bulkhead=BulkheadOptions(max_concurrent=1), retry=ONCE
    ) as client:
        calls = [asyncio.ensure_future(client.get("/")) for _ in range(3)]
        for _ in range(1000):
            if len(seen) == 3:
                break
            await asyncio.sleep(0)
        with pytest.raises(NoHealthyEndpoint) as caught:  # a fourth finds every slot taken
            await client.get("/")
        release.set()
        assert [r.status_code for r in await asyncio.gather(*calls)] == [200, 200, 200]
    assert sorted(seen) == sorted(host(url) for url in ENDPOINTS)
    assert caught.value.retry_after is None


async def test_no_healthy_endpoint_is_a_rejection_for_fallback() -> None:
    """A fallback ``on="rejections"`` answers when every endpoint is ejected."""

    async def cached(request: httpx.Request, error: Exception) -> httpx.Response:
        assert isinstance(error, NoHealthyEndpoint)
        return httpx.Response(200, text="cached")

    upstreams = Upstreams()
    health = {url: Flag(healthy=False) for url in ENDPOINTS}
    async with make_client(
        upstreams,
        health=health,
        max_ejected=1.0,
        fallback=FallbackOptions(handler=cached, on="rejections"),
    ) as client:
        assert (await client.get("/")).text == "cached"
    assert not upstreams.tried


async def test_open_breaker_is_skipped() -> None:
    """An endpoint whose breaker is open gets no request; the others answer every one."""
    store = MemoryStore()
    clock = FakeClock(autojump=True)
    upstreams = Upstreams()
    async with make_client(upstreams, clock=clock, store=store) as client:
        # the same name and store: the endpoint's own breaker
        await same_breaker(f"orders:{A}", store, clock).force_open()
        for _ in range(40):
            assert (await client.get("/")).status_code == 200
    assert upstreams.tried[host(A)] == 0
    assert upstreams.hits[host(B)] + upstreams.hits[host(C)] == 40


async def test_all_ejected_raises_no_healthy_endpoint_with_retry_after() -> None:
    """Once every breaker opens, requests fail at once with the soonest probe time."""
    clock = FakeClock(autojump=True)
    upstreams = Upstreams(status={A: 503, B: 503, C: 503})
    async with make_client(
        upstreams,
        clock=clock,
        retry=ONCE,
        breaker=BreakerOptions(minimum_calls=2, window=CountWindow(2), open_for=5.0),
    ) as client:
        for _ in range(20):
            try:
                await client.get("/")
            except NoHealthyEndpoint:
                break
        sent = upstreams.tried.total()
        with pytest.raises(NoHealthyEndpoint) as caught:
            await client.get("/")
        assert upstreams.tried.total() == sent  # nothing more was sent
        error = caught.value
        assert isinstance(error, NoHealthyEndpointError)
        assert isinstance(error, RejectedError)
        assert isinstance(error, httpx.TransportError)
        assert error.name == "orders"
        assert error.endpoints == 3
        assert error.retry_after is not None
        assert 0 < error.retry_after <= 5.0
        assert error.request.url.path == "/"
        clock.advance(5.0)  # the breakers may probe again
        assert (await client.get("/")).status_code == 503
        assert upstreams.tried.total() == sent + 1


async def test_endpoint_back_from_ejection_gets_its_probe() -> None:
    """Once its breaker may probe, an endpoint's old latency is forgotten: it is tried again."""
    clock = FakeClock(autojump=True)
    store = MemoryStore()
    upstreams = Upstreams(status={A: 503})
    options: dict[str, Any] = {"minimum_calls": 2, "window": CountWindow(2), "open_for": 5.0}
    async with make_client(
        upstreams,
        clock=clock,
        store=store,
        retry=ONCE,
        breaker=BreakerOptions(**options),
    ) as client:
        while not upstreams.hits[host(A)]:  # one 503: A now looks slow to P2C
            await client.get("/")
        front = CircuitBreaker(f"orders:{A}", store=store, clock=clock, **options)

        @front
        async def failing() -> None:
            raise RuntimeError("a second failure trips A's breaker")

        with pytest.raises(RuntimeError):
            await failing()
        for _ in range(5):
            assert (await client.get("/")).status_code == 200
        sent = upstreams.tried[host(A)]
        upstreams.status[host(A)] = 200  # A recovers
        clock.advance(5.0)
        for _ in range(30):
            assert (await client.get("/")).status_code == 200
    assert upstreams.tried[host(A)] > sent
    assert front.state.value == "closed"


async def test_unhealthy_endpoint_is_skipped_until_healthy() -> None:
    """A health source saying no keeps its endpoint out; saying yes again brings it back."""
    flag = Flag(healthy=False)
    upstreams = Upstreams()
    async with make_client(upstreams, health={B: flag}) as client:
        for _ in range(30):
            await client.get("/")
        assert upstreams.tried[host(B)] == 0
        flag.healthy = True
        for _ in range(60):
            await client.get("/")
    assert upstreams.hits[host(B)] > 0


async def test_health_source_that_raises_counts_as_unhealthy() -> None:
    """A health source whose ``healthy`` raises keeps its endpoint out, never fails a request."""

    class Broken:
        @property
        def healthy(self) -> bool:
            raise RuntimeError("not started")

    upstreams = Upstreams()
    async with make_client(upstreams, health={C: Broken()}) as client:
        for _ in range(30):
            assert (await client.get("/")).status_code == 200
    assert upstreams.tried[host(C)] == 0


async def test_max_ejected_keeps_some_endpoints_in_use() -> None:
    """Every health check failing: with max_ejected 0.5, two of three endpoints stay in use."""
    upstreams = Upstreams()
    health = {url: Flag(healthy=False) for url in ENDPOINTS}
    async with make_client(upstreams, health=health, max_ejected=0.5) as client:
        for _ in range(40):
            assert (await client.get("/")).status_code == 200
    assert upstreams.hits.total() == 40  # which two rotates with their load scores


async def test_open_breakers_use_up_the_ejection_share() -> None:
    """One breaker open and every check failing: the open one stays out, the other two serve."""
    store = MemoryStore()
    clock = FakeClock(autojump=True)
    upstreams = Upstreams()
    health = {url: Flag(healthy=False) for url in ENDPOINTS}
    async with make_client(upstreams, clock=clock, store=store, health=health) as client:
        await same_breaker(f"orders:{C}", store, clock).force_open()
        for _ in range(40):
            assert (await client.get("/")).status_code == 200
    assert upstreams.tried[host(C)] == 0
    assert upstreams.hits[host(A)] > 0
    assert upstreams.hits[host(B)] > 0


async def test_max_ejected_one_lets_health_checks_empty_the_pool() -> None:
    """With max_ejected 1.0 and every check failing, nothing is sent: NoHealthyEndpoint."""
    upstreams = Upstreams()
    health = {url: Flag(healthy=False) for url in ENDPOINTS}
    async with make_client(upstreams, health=health, max_ejected=1.0) as client:
        with pytest.raises(NoHealthyEndpoint) as caught:
            await client.get("/")
    assert caught.value.retry_after is None  # a health check says nothing about when
    assert not upstreams.tried


async def test_pipeline_names_are_the_endpoints() -> None:
    """Each endpoint has its own breaker, named after the service and the endpoint."""
    transport = ResilientTransport(
        httpx.MockTransport(Upstreams()), service="orders", endpoints=["http://h:1", "https://h"]
    )
    assert transport.pipeline_names() == ["orders:http://h:1", "orders:https://h:443"]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"endpoints": [A]}, ValueError),  # no service name
        ({"service": "orders"}, ValueError),  # no endpoints
        ({"service": "orders", "endpoints": []}, ValueError),
        ({"service": "orders", "endpoints": A}, TypeError),
        ({"service": "orders", "endpoints": [A, A + "/"]}, ValueError),
        ({"service": "orders", "endpoints": ["http://h/api"]}, ValueError),
        ({"service": "orders", "endpoints": ["ftp://h"]}, ValueError),
        ({"service": "orders", "endpoints": [1]}, TypeError),
        ({"service": "", "endpoints": [A]}, ValueError),
        ({"service": "orders", "endpoints": [A], "max_ejected": 1.5}, ValueError),
        ({"service": "orders", "endpoints": [A], "max_ejected": True}, ValueError),
        ({"service": "orders", "endpoints": [A], "health": {B: Flag()}}, ValueError),
        ({"service": "orders", "endpoints": [A], "health": {A: object()}}, TypeError),
        ({"service": "orders", "endpoints": [A], "rng": 4}, TypeError),
        ({"service": "orders", "endpoints": [A], "policy": lambda key: HttpPolicy()}, TypeError),
        ({"service": "orders", "endpoints": [A], "key": lambda r: "x"}, ValueError),
        ({"service": "orders", "endpoints": ["http://h:99999"]}, ValueError),
        ({"service": "orders", "endpoints": ["http://h:0"]}, ValueError),
        ({"service": "orders", "endpoints": ["http://h:-1"]}, ValueError),
        ({"service": "orders", "endpoints": ["http://h:65536"]}, ValueError),
    ],
)
def test_endpoint_options_are_validated(options: dict[str, Any], error: type[Exception]) -> None:
    """Bad endpoint options fail at construction with an error naming them."""
    with pytest.raises(error):
        ResilientTransport(httpx.MockTransport(Upstreams()), **options)


# --- against uvicorn on loopback: killed, slowed, flapping --------------------------------


class Node:
    """A pure ASGI upstream: answers 200, after ``delay`` seconds, or 503 every other request."""

    def __init__(self, delay: float = 0.0, flapping: bool = False) -> None:
        self.delay = delay
        self.flapping = flapping
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        status = 503 if self.flapping and self.hits % 2 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def start(app: Node) -> LiveServer:
    """uvicorn serving ``app`` on loopback, answering without Nagle's delay.

    uvicorn writes a response's head and body separately; with Nagle's algorithm the body
    waits for the client's delayed ACK (40 ms on Linux). Accepted sockets inherit
    TCP_NODELAY from the listening one.
    """
    server = LiveServer(app)
    server.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server.start()


@contextmanager
def serve(app: Node) -> Iterator[LiveServer]:
    server = start(app)
    try:
        yield server
    finally:
        server.stop()


def live_client(servers: list[LiveServer], **options: Any) -> httpx.AsyncClient:
    settings: dict[str, Any] = {
        "timeout": 5.0,
        "retry": RetryOptions(wait=lambda state: 0.01),
        "breaker": BreakerOptions(minimum_calls=6, window=CountWindow(10), open_for=30.0),
    }
    settings.update(options)
    transport = ResilientTransport(
        policy=HttpPolicy(**settings),
        service="orders",
        endpoints=[server.url for server in servers],
        rng=random.Random(7),
    )
    return httpx.AsyncClient(transport=transport, base_url="http://orders")


async def test_killed_endpoint_fails_no_idempotent_request() -> None:
    """Three uvicorn endpoints, one killed part-way: every GET of a bounded loop succeeds."""
    nodes = [Node(), Node(), Node()]
    with serve(nodes[0]) as one, serve(nodes[1]) as two:
        three = start(nodes[2])
        try:
            async with live_client([one, two, three]) as client:
                failed = 0
                for i in range(90):
                    if i == 30:
                        three.stop()
                        killed_at = nodes[2].hits
                    response = await client.get("/")
                    failed += response.status_code != 200
        finally:
            three.stop()
    assert failed == 0
    assert killed_at > 0  # it did take traffic before
    assert nodes[0].hits + nodes[1].hits >= 60


async def test_slowed_endpoint_is_avoided_by_p2c() -> None:
    """One endpoint answering in 200 ms, two at once: most requests go to the fast two (the
    gap is wide, so a loaded machine's own latency does not blur it)."""
    nodes = [Node(), Node(delay=0.2), Node()]
    with serve(nodes[0]) as one, serve(nodes[1]) as two, serve(nodes[2]) as three:
        async with live_client([one, two, three]) as client:

            async def worker() -> None:
                for _ in range(15):
                    assert (await client.get("/")).status_code == 200

            await asyncio.gather(*(worker() for _ in range(4)))
    total = sum(node.hits for node in nodes)
    assert total == 60
    assert nodes[1].hits < total / 6  # a fair share would be a third


async def test_flapping_endpoint_fails_no_idempotent_request() -> None:
    """One endpoint failing every other request: retries and P2C answer every GET."""
    nodes = [Node(), Node(flapping=True), Node()]
    with serve(nodes[0]) as one, serve(nodes[1]) as two, serve(nodes[2]) as three:
        async with live_client([one, two, three]) as client:
            statuses: Counter[int] = Counter()
            for _ in range(60):
                statuses[(await client.get("/")).status_code] += 1
    assert statuses == {200: 60}
    assert nodes[1].hits < 30  # its failures make it costly: it gets less than its share


async def test_each_endpoint_gets_a_health_check_that_ejects_it() -> None:
    """``health_check``: from the first request on, each endpoint is checked on its own
    address, bound to its breaker; one whose checks fail is ejected (its check is its health
    source); closing the transport stops them all."""
    clock = FakeClock()
    checked: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            checked[request.url.host] += 1
            return httpx.Response(503 if request.url.host == host(B) else 200)
        return httpx.Response(200, text=request.url.host)

    transport = ResilientTransport(
        httpx.MockTransport(handler),
        policy=HttpPolicy(
            clock=clock, health_check=HealthCheckOptions(path="/healthz", interval=1.0)
        ),
        service="orders",
        endpoints=ENDPOINTS,
        rng=random.Random(5),
    )
    assert transport._service is not None
    endpoints = transport._service.endpoints
    checks = [e.check for e in endpoints]
    assert all(c is not None and not c.running for c in checks)
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
        await client.get("/")
        assert all(c is not None and c.running for c in checks)
        assert all(e.breaker is not None and e.breaker.health is e.check for e in endpoints)
        for _ in range(12):  # B's checks fail, second after second: it is suspected
            await settle()
            clock.advance(1.0)
        await settle()
        assert set(checked) == {host(A), host(B), host(C)}
        answered = Counter([(await client.get("/")).text for _ in range(30)])
    assert answered[host(B)] == 0
    assert answered[host(A)] + answered[host(C)] == 30
    assert all(c is not None and not c.running for c in checks)
