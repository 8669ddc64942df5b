"""Fallback: answer with a stand-in value when the call fails, or the last good one."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..checks import check_fleet_name, store_down
from ..clock import Clock
from ..errors import UnacceptableResultError
from ..events import FallbackUsed, Listener, emit
from .base import (
    BasePolicy,
    ExceptionFilter,
    Protected,
    check_predicate,
    check_seconds,
    check_store,
    exception_filter,
    target,
)

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["Fallback", "JSONSerializer", "Serializer"]

logger = logging.getLogger("resilience")

_MISSING: Any = object()
_KEY_LIMIT = 200  # longer default cache keys are hashed


@runtime_checkable
class Serializer(Protocol):
    """Turns cached values into bytes and back (``Fallback(cache=..., serializer=...)``)."""

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


class Fallback(BasePolicy):
    """Returns ``value``, or ``handler(error)``, when the call fails with an error matching ``on``.

    ``on`` is required: exception types or a predicate (cancellation is never caught).
    ``handler`` may be a plain or an async function. ``result_if(result)`` also replaces a
    returned value; the handler then receives an ``UnacceptableResultError`` carrying it.
    Give exactly one of ``value`` and ``handler``. The same ``value`` object is returned
    every time, so prefer immutable values.

    With ``cache=`` (a store) the fallback is stale-if-error: good results are kept in the
    store for ``cache_ttl`` seconds under ``cache_key(*args, **kwargs)`` (shared by every
    replica through ``RedisStore``), and a failure returns the last one kept. ``value`` and
    ``handler`` then answer only when nothing is cached; without either, the error is
    re-raised on a miss. A result is written at most once per ``cache_refresh`` seconds per
    key, in the background (the caller never waits for the store); results ``serializer``
    cannot encode are not cached.
    """

    kind = "fallback"

    def __init__(
        self,
        *,
        on: ExceptionFilter,
        value: Any = _MISSING,
        handler: Callable[[Exception], Any] | None = None,
        result_if: Callable[[Any], bool] | None = None,
        cache: Store | None = None,
        cache_key: Callable[..., str] | None = None,
        cache_ttl: float = 300.0,
        cache_refresh: float = 1.0,
        serializer: Serializer | None = None,
        name: str = "fallback",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        store = check_store("cache", cache, "cache_get", "cache_set")
        if clock is None and store is not None:
            clock = store.clock
        super().__init__(name, clock, listeners)
        self._matches = exception_filter("on", on)
        if value is not _MISSING and handler is not None:
            raise TypeError("Fallback takes exactly one of value= and handler=, not both")
        if store is None and value is _MISSING and handler is None:
            raise TypeError("Fallback takes exactly one of value= and handler= (or a cache=)")
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        self.value = value
        self.handler = handler
        self._result_if = check_predicate("result_if", result_if)
        self.cache = store
        check_fleet_name("Fallback(cache=...)", self.name, "fallback", store)
        if store is None and (cache_key is not None or serializer is not None):
            raise ValueError("cache_key= and serializer= are only used with cache=")
        if cache_key is not None and not callable(cache_key):
            raise TypeError(f"cache_key must be a callable returning a str, got {cache_key!r}")
        self.cache_key = cache_key
        self.cache_ttl: float = check_seconds("cache_ttl", cache_ttl)
        self.cache_refresh: float = check_seconds("cache_refresh", cache_refresh, zero=True)
        if self.cache_refresh >= self.cache_ttl:
            raise ValueError(
                f"cache_refresh must be shorter than cache_ttl ({self.cache_ttl:g}s), "
                f"got {cache_refresh!r}"
            )
        if serializer is None:
            serializer = JSONSerializer()
        elif not isinstance(serializer, Serializer):
            raise TypeError(
                f"serializer must have dumps(value) -> bytes and loads(bytes), got {serializer!r}"
            )
        self.serializer: Serializer = serializer
        self._written: dict[str, float] = {}  # item -> when it was last written, oldest first
        self._writes: set[asyncio.Task[None]] = set()

    async def _substitute(self, error: Exception) -> Any:
        if self._listeners:
            emit(self._listeners, FallbackUsed(name=self.name, error=error))
        if self.handler is None:
            return self.value
        result = self.handler(error)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _wrap(self, fn: Protected) -> Protected:
        if self.cache is not None:
            return self._wrap_cached(fn, self.cache)
        matches = self._matches
        result_if = self._result_if
        substitute = self._substitute

        async def protected(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if not matches(exc):
                    raise
                return await substitute(exc)
            if result_if is not None and result_if(result):
                return await substitute(UnacceptableResultError(result))
            return result

        return protected

    # stale-if-error -------------------------------------------------------------------------
    def _wrap_cached(self, fn: Protected, store: Store) -> Protected:
        matches = self._matches
        result_if = self._result_if
        keep = self._keep
        stale = self._stale
        item = self._item

        async def protected(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if not matches(exc):
                    raise
                value = await stale(store, item(fn, args, kwargs), exc)
                if value is _MISSING:
                    raise
                return value
            if result_if is not None and result_if(result):
                rejected = UnacceptableResultError(result)
                value = await stale(store, item(fn, args, kwargs), rejected)
                return result if value is _MISSING else value
            keep(store, item(fn, args, kwargs), result)
            return result

        return protected

    def _item(self, fn: Protected, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The cache item of a call: ``cache_key(*args, **kwargs)``, or the default key (the
        user's function, not the call form's ``INVOKE``)."""
        fn, args = target(fn, args)
        if self.cache_key is not None:
            return self.cache_key(*args, **kwargs)
        return default_cache_key(fn, args, kwargs)

    def _keep(self, store: Store, item: str, result: Any) -> None:
        """Write ``result`` in the background unless ``item`` was written under refresh ago."""
        now = self._clock.monotonic()
        written = self._written
        last = written.get(item)
        if last is not None and now - last < self.cache_refresh:
            return
        written.pop(item, None)
        written[item] = now  # so the dict stays ordered by write time
        # forget the items written longer than cache_refresh ago: they throttle nothing
        horizon = now - self.cache_refresh
        while True:
            old = next(iter(written))
            if old == item or written[old] > horizon:
                break
            del written[old]
        try:
            data = self.serializer.dumps(result)
        except Exception as exc:
            logger.warning(
                "fallback %r cannot cache a %s result: %r", self.name, type(result).__name__, exc
            )
            return
        task = asyncio.get_running_loop().create_task(self._write(store, item, data))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, store: Store, item: str, data: bytes) -> None:
        try:
            await store.cache_set(self.name, item, data, ttl=self.cache_ttl)
        except Exception as exc:
            logger.warning("fallback %r could not cache %r: %r", self.name, item, exc)

    async def _stale(self, store: Store, item: str, error: Exception) -> Any:
        """The last good value of ``item``, else ``value``/``handler``, else ``_MISSING``."""
        data = None
        if not store_down(store):
            try:
                data = await store.cache_get(self.name, item)
            except Exception as exc:
                logger.warning("fallback %r could not read the cache: %r", self.name, exc)
        if data is not None:
            try:
                value = self.serializer.loads(data)
            except Exception as exc:
                logger.warning(
                    "fallback %r found an unreadable cached %r: %r", self.name, item, exc
                )
            else:
                if self._listeners:
                    emit(self._listeners, FallbackUsed(name=self.name, error=error))
                return value
        if self.value is _MISSING and self.handler is None:
            return _MISSING
        return await self._substitute(error)

    async def flush(self) -> None:
        """Wait until the cache writes started so far are done (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*self._writes)
