"""Tests for prioritised shedding in ResilienceMiddleware: criticality classes, their shares
of the concurrency limit, the criticality header (and how far it is believed), propagation
through the context, and an adaptive limit behind the middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from resilience.integrations._deadline import parse_criticality
from resilience.integrations.asgi import (
    CRITICALITY_HEADER,
    ResilienceMiddleware,
    Scope,
    Shedding,
    criticality,
    get_criticality,
)

from resilience.events import CallRejected, Event
from resilience.rules.limits import AdaptiveLimit
from resilience.testing import FakeClock

from ..helpers import settle, until


class App:
    """A pure ASGI app: ``/block...`` waits until released, anything else answers at once.

    It records the criticality each request sees (``get_criticality()``).
    """

    def __init__(self, clock: FakeClock | None = None, service: float = 0.0) -> None:
        self.release = asyncio.Event()
        self.running = 0
        self.seen: list[str | None] = []
        self.clock = clock
        self.service = service

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.seen.append(get_criticality())
        if scope["path"].startswith("/block"):
            self.running += 1
            try:
                await self.release.wait()
            finally:
                self.running -= 1
        elif self.clock is not None and self.service:
            await self.clock.sleep(self.service)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.test")


def level(name: str) -> dict[str, str]:
    return {CRITICALITY_HEADER: name}


async def fill(client: httpx.AsyncClient, app: App, n: int, name: str) -> list[Any]:
    """Start ``n`` blocking requests of class ``name``; wait until they all run."""
    before = app.running
    tasks = [asyncio.create_task(client.get("/block", headers=level(name))) for _ in range(n)]
    for _ in range(200):
        if app.running == before + n:
            break
        await asyncio.sleep(0)
    assert app.running == before + n
    return tasks


async def status(client: httpx.AsyncClient, name: str, path: str = "/fast") -> int:
    return (await client.get(path, headers=level(name))).status_code


async def test_sheddable_then_default_then_critical() -> None:
    """As slots fill, sheddable requests go first (75 %), default next (90 %), critical last."""
    app = App()
    events: list[Event] = []
    asgi = ResilienceMiddleware(
        app, max_concurrent=10, trust_criticality=True, listeners=[events.append]
    )
    async with client_for(asgi) as client:
        busy = await fill(client, app, 6, "critical")
        assert await status(client, "sheddable") == 200  # 6 in flight: under 7
        busy += await fill(client, app, 1, "critical")
        assert [await status(client, c) for c in ("sheddable", "default", "critical")] == [
            503,
            200,
            200,
        ]
        busy += await fill(client, app, 2, "critical")  # 9 in flight
        assert [await status(client, c) for c in ("sheddable", "default", "critical")] == [
            503,
            503,
            200,
        ]
        busy += await fill(client, app, 1, "critical")  # 10: full
        assert await status(client, "critical") == 503  # nothing else left to shed
        app.release.set()
        assert {r.status_code for r in await asyncio.gather(*busy)} == {200}
    rejected = [e for e in events if isinstance(e, CallRejected)]
    assert len(rejected) == 4  # every 503 is reported like a bulkhead rejection


async def test_shedding_options_as_a_group() -> None:
    """``shedding=Shedding(...)`` does what its keywords do: with critical paths the
    default class is shed at its share too, sheddable requests first."""
    app = App()
    asgi = ResilienceMiddleware(
        app,
        max_concurrent=10,
        shedding=Shedding(
            criticality={"/block": "critical", "/urgent": "critical"},
            shares={"sheddable": 0.5, "default": 0.8},
        ),
    )
    async with client_for(asgi) as client:
        busy = [asyncio.create_task(client.get("/block")) for _ in range(5)]
        await settle(50)
        assert app.running == 5
        assert [await status(client, c) for c in ("sheddable", "default")] == [503, 200]
        busy += [asyncio.create_task(client.get("/block")) for _ in range(3)]
        await settle(50)
        assert await status(client, "default") == 503
        assert await status(client, "default", "/urgent") == 200  # critical by its path
        app.release.set()
        assert {r.status_code for r in await asyncio.gather(*busy)} == {200}


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"shares": {"urgent": 0.5}}, ValueError, "unknown keys"),
        ({"shares": {"sheddable": 0.95}}, ValueError, "must not exceed"),
        ({"shares": {"default": 1.5}}, ValueError, "shares"),
        ({"shares": [0.5]}, TypeError, "shares must be a dict"),
        ({"criticality": {"/a": "urgent"}}, ValueError, "criticality"),
        ({"criticality_header": ""}, TypeError, "criticality_header"),
        ({"trust_criticality": "yes"}, TypeError, "trust_criticality"),
    ],
)
def test_bad_shedding_options_fail_when_the_group_is_built(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Shedding checks its options itself, naming them (as the keywords would)."""
    with pytest.raises(error, match=match):
        Shedding(**options)


async def test_critical_served_while_sheddable_is_refused() -> None:
    """Under a flood of sheddable work a critical path (by path) still gets its requests in."""
    app = App()
    asgi = ResilienceMiddleware(
        app, max_concurrent=8, criticality={"/checkout": "critical", "/block": "sheddable"}
    )
    async with client_for(asgi) as client:
        flood = [asyncio.create_task(client.get("/block")) for _ in range(20)]
        await settle(50)
        assert app.running == 6  # int(0.75 * 8): the sheddable share
        refused = await asyncio.gather(*flood[6:])
        assert {r.status_code for r in refused} == {503}
        assert all("retry-after" in r.headers for r in refused)
        checkout = await client.get("/checkout/pay", headers=level("sheddable"))
        assert checkout.status_code == 200  # the path says critical: the header cannot lower it
        assert (await client.get("/other")).status_code == 200  # default: 7 of 8 is theirs
        app.release.set()
        await asyncio.gather(*flood[:6])
    assert app.seen[-2:] == ["critical", None]


@pytest.mark.parametrize(
    "value",
    [
        "Critical",
        "CRITICAL",
        "SHEDDABLE",
        "Sheddable",
        "urgent",
        "critical,critical",
        "critical;q=1",
        "c" * 100_000,
        "",
        "sheddable" * 5,
    ],
)
async def test_hostile_header_values_are_default(value: str) -> None:
    """Unknown, mixed-case, listed or huge values are ``default``: not shed early, not raised."""
    app = App()
    asgi = ResilienceMiddleware(app, max_concurrent=10, trust_criticality=True)
    async with client_for(asgi) as client:
        busy = await fill(client, app, 8, "critical")  # past the sheddable share (7 of 10)
        response = await client.get("/fast", headers={CRITICALITY_HEADER: value})
        assert response.status_code == 200  # default: 9 of 10
        app.release.set()
        await asyncio.gather(*busy)
    assert app.seen[-1] is None  # nothing forwarded: the downstream default


def test_parse_criticality_is_strict() -> None:
    """Only the exact lowercase tokens count (spaces around them ignored)."""
    assert parse_criticality(b" sheddable\t") == "sheddable"
    assert parse_criticality("critical") == "critical"
    assert parse_criticality("kritisch\u00e9") == "default"
    assert parse_criticality(b"\xff\xfe") == "default"
    assert parse_criticality(b"critical " * 10) == "default"


async def test_header_cannot_claim_critical_unless_trusted() -> None:
    """By default a caller may lower its priority but not raise it to critical."""
    app = App()
    asgi = ResilienceMiddleware(app, max_concurrent=2)
    async with client_for(asgi) as client:
        await client.get("/fast", headers=level("critical"))
        await client.get("/fast", headers=level("sheddable"))
        await client.get("/fast", headers=level("default"))
        await client.get("/fast")
    assert app.seen == [None, "sheddable", None, None]
    trusted = App()
    asgi = ResilienceMiddleware(trusted, trust_criticality=True)
    async with client_for(asgi) as client:
        await client.get("/fast", headers=level("critical"))
    assert trusted.seen == ["critical"]


async def test_default_uses_the_whole_limit_without_critical_traffic() -> None:
    """With no way for a request to be critical, nothing is kept back for it."""
    app = App()
    asgi = ResilienceMiddleware(app, max_concurrent=10)
    async with client_for(asgi) as client:
        busy = await fill(client, app, 9, "default")
        assert await status(client, "sheddable") == 503
        assert await status(client, "default") == 200  # the tenth slot
        busy += await fill(client, app, 1, "default")
        assert await status(client, "default") == 503
        app.release.set()
        await asyncio.gather(*busy)


async def test_custom_shares_and_header_name() -> None:
    """``shares`` moves the thresholds; ``criticality_header`` renames (or drops) the header."""
    app = App()
    asgi = ResilienceMiddleware(
        app, max_concurrent=10, shares={"sheddable": 0.2}, criticality_header="X-Priority"
    )
    async with client_for(asgi) as client:
        busy = await fill(client, app, 2, "default")
        assert (await client.get("/fast", headers={"x-priority": "sheddable"})).status_code == 503
        assert await status(client, "sheddable") == 200  # the old header name is ignored now
        app.release.set()
        await asyncio.gather(*busy)
    app = App()
    asgi = ResilienceMiddleware(app, max_concurrent=10, criticality_header=None)
    async with client_for(asgi) as client:
        await client.get("/fast", headers=level("sheddable"))
    assert app.seen == [None]


async def test_waiting_queue_is_kept_for_critical_requests() -> None:
    """With a queue, lower classes are shed at their share; critical ones wait for a slot."""
    app = App()
    asgi = ResilienceMiddleware(
        app, max_concurrent=4, max_waiting=5, criticality={"/block/vip": "critical"}
    )
    async with client_for(asgi) as client:
        busy = await fill(client, app, 3, "default")  # int(0.9 * 4): the default share
        vip = [asyncio.create_task(client.get("/block/vip")) for _ in range(2)]
        await settle()
        assert app.running == 4  # one critical request runs, the other waits
        assert await status(client, "default") == 503  # no queueing for default
        app.release.set()
        responses = await asyncio.gather(*busy, *vip)
    assert [r.status_code for r in responses] == [200] * 5


async def test_criticality_propagates_in_context_and_is_reset() -> None:
    """The request's class is in the context for its outgoing calls, and only for them."""
    app = App()
    asgi = ResilienceMiddleware(app, criticality={"/fast": "sheddable"})
    async with client_for(asgi) as client:
        await client.get("/fast")
    assert app.seen == ["sheddable"]
    assert get_criticality() is None
    with criticality("sheddable"):
        assert get_criticality() == "sheddable"
        with criticality("default"):
            assert get_criticality() is None
        assert get_criticality() == "sheddable"
    assert get_criticality() is None
    with pytest.raises(ValueError, match="criticality"), criticality("urgent"):
        pass  # pragma: no cover


async def test_adaptive_limit_behind_the_middleware(clock: FakeClock) -> None:
    """``max_concurrent=AdaptiveLimit(...)``: slow responses shrink the limit requests see."""
    app = App(clock, service=1.0)
    options = AdaptiveLimit(algorithm="aimd", latency_target=0.5, initial=4)
    events: list[Event] = []
    asgi = ResilienceMiddleware(app, max_concurrent=options, clock=clock, listeners=[events.append])
    async with client_for(asgi) as client:
        slow = [asyncio.create_task(client.get("/fast")) for _ in range(4)]
        await settle(50)
        assert (await client.get("/fast")).status_code == 503
        clock.advance(1.0)
        assert {r.status_code for r in await asyncio.gather(*slow)} == {200}
        slow = [asyncio.create_task(client.get("/fast")) for _ in range(3)]
        await settle(50)
        shed = await client.get("/fast")  # the limit is 3 now
        clock.advance(1.0)
        await asyncio.gather(*slow)
    assert shed.status_code == 503
    rejected = [e for e in events if isinstance(e, CallRejected)]
    assert [e.error.max_concurrent for e in rejected] == [4, 3]  # type: ignore[attr-defined]


async def test_adaptive_limit_stays_local_with_a_store(clock: FakeClock) -> None:
    """With a store, an adaptive limit takes no fleet-wide permits (it adapts per replica)."""
    from resilience import MemoryStore

    store = MemoryStore(clock=clock)
    app = App()
    asgi = ResilienceMiddleware(app, max_concurrent=AdaptiveLimit(initial=2), store=store)
    async with client_for(asgi) as client:
        busy = await fill(client, app, 2, "default")
        assert await store.count_leases("asgi") == 0
        assert await status(client, "default") == 503
        app.release.set()
        await asyncio.gather(*busy)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"criticality": {"/x": "urgent"}}, ValueError),
        ({"criticality": {"x": "critical"}}, ValueError),
        ({"criticality": ["/x"]}, TypeError),
        ({"criticality_header": ""}, TypeError),
        ({"trust_criticality": "yes"}, TypeError),
        ({"shares": {"critical": 0.5}}, ValueError),
        ({"shares": {"sheddable": 0}}, ValueError),
        ({"shares": {"default": 1.5}}, ValueError),
        ({"shares": {"sheddable": 0.95}}, ValueError),
        ({"shares": [0.5]}, TypeError),
        ({"max_concurrent": AdaptiveLimit(), "max_waiting": -1}, ValueError),
    ],
)
def test_validation(options: dict[str, Any], error: type[Exception]) -> None:
    """Bad options fail at construction, naming the option."""
    with pytest.raises(error):
        ResilienceMiddleware(_app, **options)


async def _app(scope: Scope, receive: Any, send: Any) -> None:  # pragma: no cover
    pass


# --- two replicas on one Redis ------------------------------------------------------------------


async def test_two_replicas_keep_the_critical_reserve_fleet_wide(redis_url: str) -> None:
    """Two replicas share a fleet limit of 20 on one Redis: a sheddable flood on both fills
    at most 75 % of the fleet's permits, and every critical request that follows is served,
    on either replica."""
    from resilience.store.redis import RedisStore

    prefix = f"shed{id(object())}"
    stores = [RedisStore.from_url(redis_url, prefix=prefix) for _ in range(2)]
    app = App()
    replicas = [
        ResilienceMiddleware(
            app, max_concurrent=20, trust_criticality=True, store=s, name="gateway"
        )
        for s in stores
    ]
    clients = [client_for(m) for m in replicas]
    try:
        flood = [
            asyncio.create_task(c.get("/block", headers=level("sheddable")))
            for _ in range(20)
            for c in clients
        ]
        await until(
            lambda: app.running + sum(t.done() for t in flood) == len(flood),
            10,
            "every flood request running or refused",
        )
        sheddable = app.running
        critical = [
            asyncio.create_task(c.get("/block", headers=level("critical")))
            for c in (*clients, *clients, clients[0])
        ]
        await until(
            lambda: app.running + sum(t.done() for t in critical) == sheddable + 5,
            10,
            "every critical request running or refused",
        )
        refused = [t.result().status_code for t in critical if t.done()]
        app.release.set()
        served = [r.status_code for r in await asyncio.gather(*critical)]
        await asyncio.gather(*flood)
    finally:
        for c in clients:
            await c.aclose()
        for s in stores:
            await s.aclose()
    assert sheddable <= 15, sheddable  # int(0.75 * 20), fleet-wide
    assert sheddable >= 10, sheddable  # the flood was served up to its share, not starved
    assert refused == [], refused
    assert served == [200] * 5
