"""Tests for the request cache under ResilienceMiddleware: each HTTP request is a request
scope of ``Coalesce(scope="request")``."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
from resilience.integrations.asgi import ResilienceMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from resilience import Coalesce, request_scope

from ..helpers import started


class Shop:
    """A Starlette app whose ``/price`` and ``/health`` look the price up three times (twice
    at once), through a request-scoped ``Coalesce``; it counts the lookups."""

    def __init__(self, **options: object) -> None:
        self.lookups: Counter[str] = Counter()
        self.gate = asyncio.Event()  #: the lookups return once it is set
        self.gate.set()
        self.price = Coalesce(scope="request")(self.lookup)
        routes = [Route("/price", self.handle), Route("/health", self.handle)]
        middleware = [Middleware(ResilienceMiddleware, **options)]
        self.app = Starlette(routes=routes, middleware=middleware)

    async def lookup(self, item: str) -> dict[str, float]:
        self.lookups[item] += 1
        await self.gate.wait()
        return {"price": 9.5}

    async def handle(self, request: Request) -> JSONResponse:
        first, second = await asyncio.gather(self.price("tea"), self.price("tea"))
        third = await self.price("tea")
        return JSONResponse({"same": first is second is third})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t")


async def test_each_request_has_a_cache_of_its_own() -> None:
    """Within one request the identical calls run once and get one object; each request,
    excluded paths included, runs the call again."""
    shop = Shop(max_concurrent=10, exclude=("/health",))
    async with shop.client() as client:
        for path in ("/price", "/price", "/health"):
            response = await client.get(path)
            assert response.json() == {"same": True}
    assert shop.lookups["tea"] == 3


async def test_concurrent_requests_do_not_share() -> None:
    """Two requests under way at once each run their own lookup (one each, not one)."""
    shop = Shop(max_concurrent=10)
    shop.gate.clear()
    async with shop.client() as client:
        requests = [await started(client.get("/price")) for _ in range(2)]
        assert shop.lookups["tea"] == 2
        shop.gate.set()
        for response in await asyncio.gather(*requests):
            assert response.json() == {"same": True}


async def test_the_request_cache_ends_with_the_request() -> None:
    """After the middleware returns, its caller is outside any request scope."""
    shop = Shop(timeout=10)
    async with shop.client() as client:
        await client.get("/price")
    assert await shop.price("tea") is not await shop.price("tea")
    assert shop.lookups["tea"] == 3


async def test_no_scope_is_opened_until_a_request_scoped_coalesce_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cost follows use: while no ``Coalesce(scope="request")`` was made, the middleware
    opens no scope (the calls of a request are then a plain single flight)."""
    shop = Shop()
    monkeypatch.setattr(request_scope, "in_use", False)
    async with shop.client() as client:
        assert (await client.get("/price")).json() == {"same": False}
    assert shop.lookups["tea"] == 2
