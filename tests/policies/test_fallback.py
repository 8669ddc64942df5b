"""The fallback policy: value and handler forms, filters, result_if, events."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.errors import StoreUnavailableError, UnacceptableResultError
from resilience.events import Event, FallbackUsed
from resilience.policies.fallback import Fallback
from resilience.store import MemoryStore
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import cancelled, policy_events


async def fail(exc: BaseException) -> Any:
    raise exc


async def value(v: Any) -> Any:
    return v


async def test_value_replaces_matching_error() -> None:
    """A matching exception is replaced by the fallback value."""
    fallback = Fallback(on=ValueError, value="stand-in")
    assert await fallback.call(fail, ValueError("x")) == "stand-in"


async def test_success_passes_through() -> None:
    """A successful call returns its own value, not the fallback."""
    fallback = Fallback(on=ValueError, value="stand-in")
    assert await fallback.call(value, 42) == 42


async def test_none_is_a_valid_value() -> None:
    """``value=None`` counts as a value and is returned on failure."""
    fallback = Fallback(on=ValueError, value=None)
    assert await fallback.call(fail, ValueError()) is None


async def test_sync_handler_gets_the_error() -> None:
    """A plain handler is called with the exception and its return value is used."""
    seen: list[Exception] = []

    def handler(exc: Exception) -> str:
        seen.append(exc)
        return f"handled {exc.args[0]}"

    error = KeyError("k")
    fallback = Fallback(on=KeyError, handler=handler)
    assert await fallback.call(fail, error) == "handled k"
    assert seen == [error]


async def test_async_handler_is_awaited() -> None:
    """An async handler is awaited and its result used."""

    async def handler(exc: Exception) -> str:
        await asyncio.sleep(0)
        return type(exc).__name__

    fallback = Fallback(on=(KeyError, ValueError), handler=handler)
    assert await fallback.call(fail, ValueError()) == "ValueError"
    assert await fallback.call(fail, KeyError()) == "KeyError"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"value": 1, "handler": lambda e: 2}],
)
def test_exactly_one_of_value_and_handler(kwargs: dict[str, Any]) -> None:
    """Giving neither or both of value= and handler= is a TypeError."""
    with pytest.raises(TypeError):
        Fallback(on=ValueError, **kwargs)


def test_on_is_required() -> None:
    """Fallback without ``on`` raises TypeError."""
    with pytest.raises(TypeError):
        Fallback(value=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("on", [asyncio.CancelledError, BaseException, (), "ValueError"])
def test_bad_on_rejected(on: Any) -> None:
    """``on`` must name Exception subclasses (at least one) or be a predicate."""
    with pytest.raises((TypeError, ValueError)):
        Fallback(on=on, value=1)


def test_bad_handler_and_result_if_rejected() -> None:
    """A non-callable handler or result_if is a TypeError."""
    with pytest.raises(TypeError):
        Fallback(on=ValueError, handler="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Fallback(on=ValueError, value=1, result_if=3)  # type: ignore[arg-type]


async def test_unmatched_error_propagates() -> None:
    """An exception not matching ``on`` propagates unchanged."""
    fallback = Fallback(on=ValueError, value="stand-in")
    error = KeyError("k")
    with pytest.raises(KeyError) as info:
        await fallback.call(fail, error)
    assert info.value is error


async def test_predicate_on_filters() -> None:
    """A predicate ``on`` falls back only for the exceptions it accepts."""
    fallback = Fallback(on=lambda e: "soft" in str(e), value="soft fallback")
    assert await fallback.call(fail, RuntimeError("soft failure")) == "soft fallback"
    with pytest.raises(RuntimeError, match="hard"):
        await fallback.call(fail, RuntimeError("hard failure"))


async def test_result_if_hands_unacceptable_result_to_handler() -> None:
    """A result rejected by result_if reaches the handler as UnacceptableResultError(.result)."""
    seen: list[Exception] = []

    def handler(exc: Exception) -> str:
        seen.append(exc)
        return "replaced"

    fallback = Fallback(on=ValueError, handler=handler, result_if=lambda r: r < 0)
    assert await fallback.call(value, 5) == 5
    assert seen == []
    assert await fallback.call(value, -3) == "replaced"
    assert len(seen) == 1
    assert isinstance(seen[0], UnacceptableResultError)
    assert seen[0].result == -3


async def test_cancellation_never_falls_back() -> None:
    """CancelledError propagates even with a catch-all ``on``."""
    fallback = Fallback(on=lambda e: True, value="stand-in")
    never = asyncio.Event()
    task = asyncio.create_task(fallback.call(never.wait))
    await asyncio.sleep(0)
    await cancelled(task)


async def test_cancelled_error_raised_by_call_is_not_caught() -> None:
    """A CancelledError raised by the call itself is not replaced."""
    fallback = Fallback(on=Exception, value="stand-in")
    with pytest.raises(asyncio.CancelledError):
        await fallback.call(fail, asyncio.CancelledError())


async def test_fallback_used_event() -> None:
    """Each fallback delivers a FallbackUsed event with the replaced error; success sends none."""
    events: list[Event] = []
    fallback = Fallback(on=ValueError, value=0, name="fb", listeners=[policy_events(events)])
    await fallback.call(value, 1)
    assert events == []
    error = ValueError("x")
    await fallback.call(fail, error)
    assert events == [FallbackUsed(name="fb", error=error)]


# --- stale-if-error: cache= -----------------------------------------------------------------


class SpyStore(MemoryStore):
    """A MemoryStore that records the items written with cache_set."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.writes: list[str] = []

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        self.writes.append(item)
        await super().cache_set(key, item, value, ttl=ttl)


class SlowStore(MemoryStore):
    """A store whose cache_set finishes only once ``done`` is set."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.done = asyncio.Event()

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        await self.done.wait()
        await super().cache_set(key, item, value, ttl=ttl)


class DownStore(MemoryStore):
    """A store whose cache cannot be reached."""

    async def cache_get(self, key: str, item: str) -> bytes | None:
        raise StoreUnavailableError("down")

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        raise StoreUnavailableError("down")


class Upstream:
    """An async callable answering ``answer(arg)`` while ``up``, else raising ConnectionError."""

    def __init__(self) -> None:
        self.up = True

    async def __call__(self, arg: Any) -> Any:
        if not self.up:
            raise ConnectionError("down")
        return arg


class TextSerializer:
    """Caches str values as UTF-8."""

    def dumps(self, value: Any) -> bytes:
        return str(value).encode()

    def loads(self, data: bytes) -> Any:
        return data.decode()


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"cache": object()}, TypeError),
        ({"cache": MemoryStore(), "cache_ttl": 0}, ValueError),
        ({"cache": MemoryStore(), "cache_ttl": math.nan}, ValueError),
        ({"cache": MemoryStore(), "cache_refresh": -1}, ValueError),
        ({"cache": MemoryStore(), "cache_ttl": 5, "cache_refresh": 5}, ValueError),
        ({"cache": MemoryStore(), "cache_key": "id"}, TypeError),
        ({"cache": MemoryStore(), "serializer": object()}, TypeError),
        ({"cache": MemoryStore(), "value": 1, "handler": str}, TypeError),
        ({"cache_key": repr, "value": 1}, ValueError),
        ({"serializer": TextSerializer(), "value": 1}, ValueError),
    ],
)
def test_cache_options_validated(kw: dict[str, Any], error: type[Exception]) -> None:
    """cache=, cache_key=, cache_ttl=, cache_refresh= and serializer= are checked up front."""
    with pytest.raises(error):
        Fallback(on=ConnectionError, **kw)


async def test_serves_last_good_value_on_failure(clock: FakeClock) -> None:
    """A failure returns the last good result for the same arguments, with FallbackUsed."""
    events: list[Event] = []
    fallback = Fallback(
        on=ConnectionError,
        cache=MemoryStore(clock=clock),
        value="default",
        listeners=[policy_events(events)],
    )
    up = Upstream()
    assert await fallback.call(up, {"price": 3}) == {"price": 3}
    await fallback.flush()
    up.up = False
    assert await fallback.call(up, {"price": 3}) == {"price": 3}
    assert isinstance(events[-1], FallbackUsed)
    assert isinstance(events[-1].error, ConnectionError)
    assert await fallback.call(up, "other args") == "default"


async def test_miss_without_value_reraises(clock: FakeClock) -> None:
    """With a cache and neither value nor handler, a miss re-raises the original error."""
    fallback = Fallback(on=ConnectionError, cache=MemoryStore(clock=clock))
    error = ConnectionError("down")
    with pytest.raises(ConnectionError) as info:
        await fallback.call(fail, error)
    assert info.value is error


async def test_miss_uses_handler(clock: FakeClock) -> None:
    """On a miss the handler answers, as without a cache."""
    fallback = Fallback(on=ConnectionError, cache=MemoryStore(clock=clock), handler=repr)
    assert await fallback.call(fail, ConnectionError("x")) == "ConnectionError('x')"


async def test_writes_are_throttled_per_item(clock: FakeClock) -> None:
    """At most one write per item per cache_refresh seconds, each item on its own."""
    store = SpyStore(clock=clock)
    fallback = Fallback(on=ConnectionError, cache=store, cache_refresh=2.0, cache_key=str)
    up = Upstream()
    for _ in range(5):
        await fallback.call(up, "a")
    await fallback.call(up, "b")
    await fallback.flush()
    assert store.writes == ["a", "b"]
    clock.advance(1.9)
    await fallback.call(up, "a")
    clock.advance(0.1)
    await fallback.call(up, "a")
    await fallback.call(up, "a")
    await fallback.flush()
    assert store.writes == ["a", "b", "a"]


async def test_write_does_not_delay_the_caller(clock: FakeClock) -> None:
    """The result is returned before the cache write finishes; the write completes later."""
    store = SlowStore(clock=clock)
    fallback = Fallback(on=ConnectionError, cache=store)
    assert await fallback.call(value, 7) == 7
    assert await store.cache_get("fallback", fallback_key(value, 7)) is None
    store.done.set()
    await fallback.flush()
    assert await store.cache_get("fallback", fallback_key(value, 7)) == b"7"


def fallback_key(fn: Any, *args: Any) -> str:
    """The default cache key of ``fn(*args)``."""
    from resilience.policies.cache import default_cache_key

    return default_cache_key(fn, args, {})


async def test_unserializable_result_is_not_cached(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A result JSON cannot encode is returned as usual, logged, and not cached."""
    store = SpyStore(clock=clock)
    fallback = Fallback(on=ConnectionError, cache=store, value="default", cache_key=lambda x: "k")
    thing = object()
    assert await fallback.call(value, thing) is thing
    await fallback.flush()
    assert store.writes == []
    assert "cannot cache" in caplog.text
    assert await fallback.call(fail, ConnectionError()) == "default"


class Unprintable:
    """An argument whose ``repr`` raises (the default cache key is the arguments' repr)."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_a_call_without_a_cache_key_is_not_cached(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A call whose cache key cannot be made (an argument's repr raises, or ``cache_key``
    does) keeps its own outcome: a success is returned (not cached, logged), a failure
    falls back to the value."""
    for options in ({}, {"cache_key": lambda x: 1 / 0}):
        store = SpyStore(clock=clock)
        fallback = Fallback(on=ConnectionError, cache=store, value="default", **options)
        odd = Unprintable()
        assert await fallback.call(value, odd) is odd
        await fallback.flush()
        assert store.writes == []
        assert await fallback.call(fail, ConnectionError(odd)) == "default"
    assert "cannot cache" in caplog.text


async def test_cache_expires_after_ttl(clock: FakeClock) -> None:
    """A cached value older than cache_ttl is no longer served."""
    fallback = Fallback(on=ConnectionError, cache=MemoryStore(clock=clock), cache_ttl=10, value=0)
    up = Upstream()
    await fallback.call(up, 5)
    await fallback.flush()
    up.up = False
    clock.advance(9.9)
    assert await fallback.call(up, 5) == 5
    clock.advance(0.1)
    assert await fallback.call(up, 5) == 0


async def test_custom_key_and_serializer(clock: FakeClock) -> None:
    """cache_key picks the item and serializer encodes it; both are used as given."""
    store = MemoryStore(clock=clock)
    fallback = Fallback(
        on=ConnectionError,
        cache=store,
        cache_key=lambda user, **kw: f"user:{user}",
        serializer=TextSerializer(),
    )
    up = Upstream()
    await fallback.call(up, 42)
    await fallback.flush()
    assert await store.cache_get("fallback", "user:42") == b"42"
    up.up = False
    assert await fallback.call(up, 42) == "42"


async def test_rejected_result_served_from_cache(clock: FakeClock) -> None:
    """A result rejected by result_if gets the cached value; on a miss, the result itself."""

    async def lookup(key: str, answer: Any) -> Any:
        return answer

    fallback = Fallback(
        on=ConnectionError,
        cache=MemoryStore(clock=clock),
        result_if=lambda r: r is None,
        cache_key=lambda key, answer: key,
    )
    assert await fallback.call(lookup, "k", None) is None  # a miss: the result as it was
    assert await fallback.call(lookup, "k", [1]) == [1]
    await fallback.flush()
    assert await fallback.call(lookup, "k", None) == [1]


async def test_store_down_never_fails_the_call(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache that cannot be reached: successes pass, failures get value= (errors logged)."""
    fallback = Fallback(on=ConnectionError, cache=DownStore(clock=clock), value="default")
    up = Upstream()
    assert await fallback.call(up, 1) == 1
    await fallback.flush()
    up.up = False
    assert await fallback.call(up, 1) == "default"
    assert "could not cache" in caplog.text
    assert "could not read" in caplog.text


async def test_unreadable_cached_value_is_a_miss(clock: FakeClock) -> None:
    """Cached bytes the serializer cannot decode count as a miss."""
    store = MemoryStore(clock=clock)
    fallback = Fallback(on=ConnectionError, cache=store, value="default", cache_key=lambda *a: "k")
    await store.cache_set("fallback", "k", b"\xff not json", ttl=60)
    assert await fallback.call(fail, ConnectionError()) == "default"


async def test_throttle_forgets_old_items(clock: FakeClock) -> None:
    """Items written longer than cache_refresh ago are forgotten: the throttle stays small."""
    fallback = Fallback(on=ConnectionError, cache=MemoryStore(clock=clock), cache_key=str)
    for i in range(100):
        await fallback.call(value, i)
    clock.advance(1.0)
    await fallback.call(value, "last")
    await fallback.flush()
    assert fallback.cache is not None
    assert len(fallback.cache._written) == 1


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=30))
def test_writes_follow_the_refresh_rule(gaps: list[int]) -> None:
    """A success is written exactly when the last write of its item is cache_refresh old."""

    async def main() -> None:
        clock = FakeClock()
        store = SpyStore(clock=clock)
        fallback = Fallback(on=ConnectionError, cache=store, cache_refresh=1.0, cache_key=str)
        expected, last = 0, -math.inf
        for gap in gaps:
            clock.advance(gap / 10)
            if clock.monotonic() - last >= 1.0:
                expected, last = expected + 1, clock.monotonic()
            await fallback.call(value, "x")
        await fallback.flush()
        assert len(store.writes) == expected

    asyncio.run(main())


async def test_redis_cache_shared_by_two_replicas(
    redis_pair: tuple[RedisStore, RedisStore], clock: FakeClock
) -> None:
    """A value cached through one replica's RedisStore is served by another on failure."""
    one, two = redis_pair
    a = Fallback(on=ConnectionError, cache=one, name="prices", cache_key=str)
    b = Fallback(on=ConnectionError, cache=two, name="prices", cache_key=str, value="none")
    assert await a.call(value, {"apple": 1.5}) == {"apple": 1.5}
    await a.flush()
    assert await b.call(fail, ConnectionError()) == "none"  # another item: a miss

    async def down(arg: Any) -> Any:
        raise ConnectionError("down")

    assert await b.call(down, {"apple": 1.5}) == {"apple": 1.5}


async def test_redis_unreachable_cache_never_fails(unreachable_store: RedisStore) -> None:
    """A RedisStore that cannot connect: successes pass, failures get the fallback value."""
    fallback = Fallback(on=ConnectionError, cache=unreachable_store, value="default", name="prices")
    assert await fallback.call(value, 1) == 1
    await fallback.flush()
    assert await fallback.call(fail, ConnectionError()) == "default"
