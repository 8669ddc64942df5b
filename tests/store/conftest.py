"""Fixtures of the store tests: a plain Redis client, and RedisStores closed at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from resilience.store.redis import RedisStore

from .support import prefix


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at (and vandalising) the keys."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[Callable[..., RedisStore]]:
    """Build RedisStores (``RedisStore.from_url``; ``url=`` another server than the shared
    test server), each under a prefix of its own unless given one; closed at the end."""
    made: list[RedisStore] = []

    def make(**kw: Any) -> RedisStore:
        kw.setdefault("prefix", prefix())
        store = RedisStore.from_url(kw.pop("url", redis_url), **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()
