"""``FallbackCache``: the last good result of each call, kept in a store (stale-if-error).

A ``Fallback`` given a cache (``Fallback(cache=FallbackCache(store, name=...))``) keeps each
good result under its call's item and answers a failure with the last one kept. Writes run
in the background (the caller never waits for the store), at most one per item per
``refresh`` seconds; a store that cannot answer is a miss, never an error of the call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from ..checks import check_name, check_seconds, store_down
from .base import Protected, check_store, target

if TYPE_CHECKING:
    from ..clock import Clock
    from ..store.protocol import Store

__all__ = [
    "MISSING",
    "REFRESH",
    "TTL",
    "FallbackCache",
    "JSONSerializer",
    "Serializer",
    "check_cache_options",
    "check_serializer",
    "default_cache_key",
    "encoded",
]

logger = logging.getLogger("resilience")

MISSING: Any = object()
"""What ``FallbackCache.read`` returns when nothing usable is cached (a cached value may be
``None``)."""

_KEY_LIMIT = 200  # longer default cache keys are hashed

TTL = 300.0
"""Seconds a kept result stays servable after it was written, by default."""
REFRESH = 1.0
"""At most one write per item per this many seconds, by default."""


@runtime_checkable
class Serializer(Protocol):
    """Turns cached values into bytes and back (``FallbackCache(serializer=...)``)."""

    def dumps(self, value: Any, /) -> bytes:
        """Encode ``value``; raise (any ``Exception``) if it cannot be encoded."""

    def loads(self, data: bytes, /) -> Any:
        """Decode what ``dumps`` produced."""


class JSONSerializer:
    """The default serializer: compact JSON, UTF-8 (tuples come back as lists)."""

    def dumps(self, value: Any, /) -> bytes:
        """``json.dumps(value)`` as UTF-8 bytes; ``TypeError`` for what JSON cannot encode."""
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

    def loads(self, data: bytes, /) -> Any:
        """``json.loads(data)``."""
        return json.loads(data)

    def __repr__(self) -> str:
        return "JSONSerializer()"


def default_cache_key(fn: Protected, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The default item key of a call: ``fn``'s qualified name and the ``repr`` of its
    arguments (hashed when long)."""
    prefix = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    text = repr(args) if not kwargs else f"{args!r}{sorted(kwargs.items())!r}"
    if len(text) > _KEY_LIMIT:
        text = "#" + hashlib.sha256(text.encode()).hexdigest()
    return prefix + text


def check_cache_options(
    ttl: object,
    refresh: object,
    key: object,
    serializer: object,
    names: tuple[str, str, str, str] = ("ttl", "refresh", "key", "serializer"),
) -> tuple[float, float, Callable[..., str] | None, Serializer]:
    """A cache's ``ttl``, ``refresh``, ``key`` and ``serializer`` (``None``: the default
    ``JSONSerializer()``), checked; errors name them as ``names`` (the options a caller
    wrote: ``Fallback``'s ``cache_ttl``, ...)."""
    ttl_name, refresh_name, key_name, serializer_name = names
    seconds: float = check_seconds(ttl_name, ttl)
    every: float = check_seconds(refresh_name, refresh, zero=True)
    if every >= seconds:
        raise ValueError(
            f"{refresh_name} must be shorter than {ttl_name} ({seconds:g}s), got {refresh!r}"
        )
    if key is not None and not callable(key):
        raise TypeError(f"{key_name} must be a callable returning a str, got {key!r}")
    checked = check_serializer(serializer_name, serializer)
    return seconds, every, cast("Callable[..., str] | None", key), checked


def encoded(
    serializer: Serializer, value: Any, what: str, level: int = logging.WARNING
) -> bytes | None:
    """``serializer.dumps(value)``, or ``None`` (logged at ``level``, ``what`` saying what
    could not be done) when it raises or returns anything but bytes: a value that cannot
    travel never fails the call it came from."""
    try:
        data = serializer.dumps(value)
    except Exception as exc:
        logger.log(level, "%s a %s: %r", what, type(value).__name__, exc)
        return None
    if not isinstance(data, bytes):
        logger.log(
            level, "%s: %r.dumps() returned a %s, not bytes", what, serializer, type(data).__name__
        )
        return None
    return data


def check_serializer(what: str, serializer: object) -> Serializer:
    """A ``serializer=`` option: ``None`` is the default ``JSONSerializer()``."""
    if serializer is None:
        return JSONSerializer()
    if not isinstance(serializer, Serializer):
        raise TypeError(
            f"{what} must have dumps(value) -> bytes and loads(bytes), got {serializer!r}"
        )
    return serializer


class FallbackCache:
    """The last good result of each call, kept in ``store`` under ``name`` for ``ttl``
    seconds (shared by every replica through ``RedisStore``).

    A call's item is ``key(*args, **kwargs)``, or by default the function's qualified name
    and the ``repr`` of its arguments (``default_cache_key``). ``keep`` writes a result in
    the background, at most once per ``refresh`` seconds (of ``clock``, by default the
    store's) per item; results ``serializer`` (``JSONSerializer()`` by default) cannot
    encode are not kept. ``read`` returns the value kept, or ``MISSING``: a store that
    cannot answer, or bytes that do not decode, are a miss (logged). ``flush()`` waits for
    the writes started so far.
    """

    __slots__ = (
        "_writes",
        "_written",
        "clock",
        "key",
        "name",
        "refresh",
        "serializer",
        "store",
        "ttl",
    )

    def __init__(
        self,
        store: Store,
        *,
        name: str,
        ttl: float = TTL,
        refresh: float = REFRESH,
        key: Callable[..., str] | None = None,
        serializer: Serializer | None = None,
        clock: Clock | None = None,
    ) -> None:
        checked = check_store("store", store, "cache_get", "cache_set")
        if checked is None:
            raise TypeError("FallbackCache needs a store (MemoryStore, RedisStore), got None")
        self.store: Store = checked
        self.name = check_name(name)
        self.ttl, self.refresh, self.key, self.serializer = check_cache_options(
            ttl, refresh, key, serializer
        )
        self.clock: Clock = checked.clock if clock is None else clock
        self._written: dict[str, float] = {}  # item -> when it was last written, oldest first
        self._writes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"FallbackCache({self.store!r}, name={self.name!r}, ttl={self.ttl:g})"

    def item(self, fn: Protected, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The item of a call of ``fn``, a protected function's inner function: ``key(*args,
        **kwargs)`` or the default key (of the user's function, not the call form's);
        ``None`` (logged) when it cannot be made: such a call is neither kept nor read."""
        fn, args = target(fn, args)
        try:
            if self.key is not None:
                return self.key(*args, **kwargs)
            return default_cache_key(fn, args, kwargs)
        except Exception as exc:
            logger.warning("fallback %r cannot cache a call of %r: its key %r", self.name, fn, exc)
            return None

    def keep(
        self, fn: Protected, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Write ``result`` as the call's item in the background, unless that item was
        written less than ``refresh`` ago (no I/O here)."""
        item = self.item(fn, args, kwargs)
        if item is None:
            return
        now = self.clock.monotonic()
        written = self._written
        last = written.get(item)
        if last is not None and now - last < self.refresh:
            return
        written.pop(item, None)
        written[item] = now  # so the dict stays ordered by write time
        # forget the items written longer than refresh ago: they throttle nothing
        horizon = now - self.refresh
        while True:
            old = next(iter(written))
            if old == item or written[old] > horizon:
                break
            del written[old]
        data = encoded(self.serializer, result, f"fallback {self.name!r} cannot cache")
        if data is None:
            return
        task = asyncio.get_running_loop().create_task(self._write(item, data))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, item: str, data: bytes) -> None:
        try:
            await self.store.cache_set(self.name, item, data, ttl=self.ttl)
        except Exception as exc:
            logger.warning("fallback %r could not cache %r: %r", self.name, item, exc)

    async def read(self, fn: Protected, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The value kept for the call's item, or ``MISSING``."""
        item = self.item(fn, args, kwargs)
        store = self.store
        if item is None or store_down(store):
            return MISSING
        try:
            data = await store.cache_get(self.name, item)
        except Exception as exc:
            logger.warning("fallback %r could not read the cache: %r", self.name, exc)
            return MISSING
        if data is None:
            return MISSING
        try:
            return self.serializer.loads(data)
        except Exception as exc:
            logger.warning("fallback %r found an unreadable cached %r: %r", self.name, item, exc)
            return MISSING

    async def flush(self) -> None:
        """Wait until the writes started so far are done (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*self._writes)
