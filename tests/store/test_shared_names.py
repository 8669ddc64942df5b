"""A fleet-wide policy on a shared store must carry a name of its own, not the default."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from resilience import Bulkhead, Fallback, MemoryStore, RateLimiter
from resilience.checks import is_shared
from resilience.store.redis import RedisStore


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, prefix="names-test")
    try:
        yield store
    finally:
        await store.aclose()


def test_memory_store_is_not_shared_and_redis_store_is(redis_url: str) -> None:
    """Only a store other processes can see counts as shared."""
    assert not is_shared(MemoryStore())
    assert is_shared(RedisStore.from_url(redis_url))


def test_a_store_may_say_it_is_not_shared() -> None:
    """A ``shared`` attribute on the store overrides the guess from its class."""

    class Private(MemoryStore):
        shared = False

    class Public(MemoryStore):
        shared = True

    assert not is_shared(Private())
    assert is_shared(Public())


@pytest.mark.parametrize(
    "build",
    [
        lambda s: Bulkhead(2, distributed=True, store=s),
        lambda s: Bulkhead(2, distributed=True, store=s, name="bulkhead"),
        lambda s: RateLimiter(10, store=s),
        lambda s: RateLimiter(10, store=s, name="rate_limiter"),
        lambda s: Fallback(on=ValueError, cache=s),
        lambda s: Fallback(on=ValueError, value=0, cache=s, name="fallback"),
    ],
)
async def test_default_name_on_a_shared_store_is_refused(shared: RedisStore, build: object) -> None:
    """Two services keeping the default name would share one limit: a ValueError says so."""
    with pytest.raises(ValueError, match="name"):
        build(shared)  # type: ignore[operator]


async def test_own_names_on_a_shared_store_are_accepted(shared: RedisStore) -> None:
    """With names of their own the same policies are built."""
    Bulkhead(2, distributed=True, store=shared, name="orders:db")
    RateLimiter(10, store=shared, name="orders:api")
    Fallback(on=ValueError, cache=shared, name="orders:prices")


def test_default_names_stay_fine_on_a_memory_store() -> None:
    """A ``MemoryStore`` is one process's own: the defaults are harmless there."""
    store = MemoryStore()
    Bulkhead(2, distributed=True, store=store)
    RateLimiter(10, store=store)
    Fallback(on=ValueError, cache=store)
