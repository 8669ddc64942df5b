"""``FallbackCache``: a fallback's stale-if-error cache as an object of its own."""

from __future__ import annotations

import math
from typing import Any

import pytest

from resilience import Fallback, FallbackCache, MemoryStore
from resilience.policies.cache import MISSING
from resilience.testing import FakeClock


async def fetch(region: str, up: bool) -> dict[str, float]:
    if not up:
        raise ConnectionError("down")
    return {region: 1.0}


async def test_a_fallback_given_a_cache_serves_the_last_good_value(clock: FakeClock) -> None:
    """Fallback(cache=FallbackCache(...)) keeps good results under the cache's key and
    answers a failure with the last one; a miss gets value=."""
    cache = FallbackCache(
        MemoryStore(clock=clock), name="prices", key=lambda region, up: region, ttl=60
    )
    fallback = Fallback(on=ConnectionError, cache=cache, value={})
    assert await fallback.call(fetch, "eu", True) == {"eu": 1.0}
    await fallback.flush()
    assert await fallback.call(fetch, "eu", False) == {"eu": 1.0}
    assert await fallback.call(fetch, "us", False) == {}
    clock.advance(60)  # past the cache's ttl
    assert await fallback.call(fetch, "eu", False) == {}


async def test_the_shorthand_builds_the_same_cache(clock: FakeClock) -> None:
    """Fallback(cache=store, cache_*=...) is a FallbackCache of the fallback's name, with its
    options, on the fallback's clock: items land where the old form put them."""
    store = MemoryStore()
    fallback = Fallback(
        on=ConnectionError,
        cache=store,
        cache_key=lambda region, up: region,
        cache_ttl=60,
        cache_refresh=2,
        name="prices",
        clock=clock,
    )
    cache = fallback.cache
    assert cache is not None
    assert (cache.name, cache.ttl, cache.refresh, cache.clock) == ("prices", 60, 2, clock)
    await fallback.call(fetch, "eu", True)
    await fallback.flush()
    assert await store.cache_get("prices", "eu") == b'{"eu":1.0}'


async def test_a_cached_none_is_a_hit_and_a_miss_is_missing(clock: FakeClock) -> None:
    """read() returns a kept None as None, and MISSING only when nothing is kept."""
    cache = FallbackCache(MemoryStore(clock=clock), name="c", key=lambda x: "k")
    assert await cache.read(fetch, ("x",), {}) is MISSING
    cache.keep(fetch, ("x",), {}, None)
    await cache.flush()
    assert await cache.read(fetch, ("x",), {}) is None


def test_the_fallbacks_clock_is_the_caches() -> None:
    """A fallback without a clock of its own takes its cache's."""
    clock = FakeClock()
    cache = FallbackCache(MemoryStore(clock=clock), name="c")
    assert cache.clock is clock
    assert Fallback(on=ValueError, cache=cache).clock is clock


@pytest.mark.parametrize(
    "options",
    [{"cache_key": str}, {"cache_ttl": 10}, {"cache_refresh": 0}, {"serializer": object()}],
)
def test_shorthand_options_next_to_a_cache_object_are_refused(options: dict[str, Any]) -> None:
    """The shorthand's options configure a store given as cache=: next to a FallbackCache,
    which has its own, they are a ValueError rather than silently ignored."""
    cache = FallbackCache(MemoryStore(), name="c")
    with pytest.raises(ValueError, match="a FallbackCache has its own"):
        Fallback(on=ValueError, cache=cache, **options)


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": math.nan}, ValueError, "ttl"),
        ({"refresh": -1}, ValueError, "refresh"),
        ({"ttl": 5, "refresh": 5}, ValueError, "refresh must be shorter than ttl"),
        ({"key": "id"}, TypeError, "key"),
        ({"serializer": object()}, TypeError, "serializer"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_cache_options_name_themselves(
    options: dict[str, Any], error: type[Exception], names: str
) -> None:
    """Bad input to FallbackCache fails at construction, naming the parameter."""
    config: dict[str, Any] = {"name": "c", **options}
    with pytest.raises(error, match=names):
        FallbackCache(MemoryStore(), **config)


@pytest.mark.parametrize("store", [None, object(), "redis://localhost"])
def test_a_cache_needs_a_store(store: object) -> None:
    """FallbackCache without a store (or with something else) is a TypeError."""
    with pytest.raises(TypeError, match="store"):
        FallbackCache(store, name="c")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "names"),
    [({"cache_ttl": 0}, "cache_ttl"), ({"cache_ttl": 5, "cache_refresh": 5}, "cache_refresh")],
)
def test_the_shorthands_errors_name_its_own_options(options: dict[str, Any], names: str) -> None:
    """An error in the shorthand names the option the caller wrote (cache_ttl, not ttl)."""
    with pytest.raises(ValueError, match=names):
        Fallback(on=ValueError, cache=MemoryStore(), **options)
