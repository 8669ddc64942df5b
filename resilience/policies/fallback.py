"""Fallback: answer with a stand-in value when the call fails, or the last good one."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..checks import check_fleet_name
from ..clock import Clock
from ..errors import UnacceptableResultError
from ..events import FallbackUsed, Listener, emit
from .base import (
    BasePolicy,
    ExceptionFilter,
    Protected,
    check_predicate,
    check_store,
    exception_filter,
)
from .cache import (
    MISSING,
    REFRESH,
    TTL,
    FallbackCache,
    JSONSerializer,
    Serializer,
    check_cache_options,
)

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["Fallback", "FallbackCache", "JSONSerializer", "Serializer"]

#: the shorthand's options, as ``check_cache_options`` names them in errors
_FLAT = ("cache_ttl", "cache_refresh", "cache_key", "serializer")


class Fallback(BasePolicy):
    """Returns ``value``, or ``handler(error)``, when the call fails with an error matching ``on``.

    ``on`` is required: exception types or a predicate (cancellation is never caught).
    ``handler`` may be a plain or an async function. ``result_if(result)`` also replaces a
    returned value; the handler then receives an ``UnacceptableResultError`` carrying it.
    Give exactly one of ``value`` and ``handler``. The same ``value`` object is returned
    every time, so prefer immutable values.

    With ``cache=FallbackCache(store, name=...)`` the fallback is stale-if-error: good results
    are kept in the store (shared by every replica through ``RedisStore``), and a failure
    returns the last one kept (see ``FallbackCache``). ``value`` and ``handler`` then answer
    only when nothing is cached; without either, the error is re-raised on a miss.
    ``cache=store`` is a shorthand: a ``FallbackCache`` of this fallback's ``name``, with
    ``cache_key``, ``cache_ttl``, ``cache_refresh`` and ``serializer`` as its ``key``,
    ``ttl``, ``refresh`` and ``serializer``, on this fallback's clock.
    """

    kind = "fallback"

    def __init__(
        self,
        *,
        on: ExceptionFilter,
        value: Any = MISSING,
        handler: Callable[[Exception], Any] | None = None,
        result_if: Callable[[Any], bool] | None = None,
        cache: FallbackCache | Store | None = None,
        cache_key: Callable[..., str] | None = None,
        cache_ttl: float = TTL,
        cache_refresh: float = REFRESH,
        serializer: Serializer | None = None,
        name: str = "fallback",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        store = None
        if isinstance(cache, FallbackCache):
            shorthand = cache_key is not None or serializer is not None
            if shorthand or cache_ttl != TTL or cache_refresh != REFRESH:
                raise ValueError(
                    "cache_key=, cache_ttl=, cache_refresh= and serializer= configure a store "
                    "given as cache=; a FallbackCache has its own (key=, ttl=, refresh=, "
                    "serializer=)"
                )
        else:
            store = check_store("cache", cache, "cache_get", "cache_set")
            if store is None and (cache_key is not None or serializer is not None):
                raise ValueError("cache_key= and serializer= are only used with cache=")
            options = check_cache_options(cache_ttl, cache_refresh, cache_key, serializer, _FLAT)
        if clock is None and cache is not None:
            clock = cache.clock  # the cache's (or its store's) clock
        super().__init__(name, clock, listeners)
        self._matches = exception_filter("on", on)
        if value is not MISSING and handler is not None:
            raise TypeError("Fallback takes exactly one of value= and handler=, not both")
        if cache is None and value is MISSING and handler is None:
            raise TypeError("Fallback takes exactly one of value= and handler= (or a cache=)")
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        self.value = value
        self.handler = handler
        self._result_if = check_predicate("result_if", result_if)
        self.cache: FallbackCache | None = None
        if isinstance(cache, FallbackCache):
            self.cache = cache
        elif store is not None:  # the shorthand: a cache of this fallback's name and clock
            check_fleet_name("Fallback(cache=...)", self.name, "fallback", store)
            ttl, refresh, key, serial = options
            self.cache = FallbackCache(
                store,
                name=self.name,
                ttl=ttl,
                refresh=refresh,
                key=key,
                serializer=serial,
                clock=self._clock,
            )

    async def _substitute(self, error: Exception) -> Any:
        if self._listeners:
            emit(self._listeners, FallbackUsed(name=self.name, error=error))
        if self.handler is None:
            return self.value
        result = self.handler(error)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _replace(
        self, fn: Protected, args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
    ) -> Any:
        """The stand-in for a call that ended with ``error``: the last good value of its item
        (with a cache), else ``value`` or ``handler``, else ``MISSING``."""
        cache = self.cache
        if cache is not None:
            kept = await cache.read(fn, args, kwargs)
            if kept is not MISSING:
                if self._listeners:
                    emit(self._listeners, FallbackUsed(name=self.name, error=error))
                return kept
            if self.value is MISSING and self.handler is None:
                return MISSING
        return await self._substitute(error)

    def _wrap(self, fn: Protected) -> Protected:
        # few free variables (each is copied into every call's frame): the paths off the
        # success path read the fallback's attributes
        plain = self._result_if is None and self.cache is None  # results are returned as is

        async def protected(*args: Any, **kwargs: Any) -> Any:
            try:
                if plain:  # returned from inside the try: the success path is this line
                    return await (fn(*args, **kwargs) if kwargs else fn(*args))
                result = await (fn(*args, **kwargs) if kwargs else fn(*args))
            except Exception as exc:
                if not self._matches(exc):
                    raise
                value = await self._replace(fn, args, kwargs, exc)
                if value is MISSING:
                    raise
                return value
            result_if = self._result_if
            if result_if is not None and result_if(result):
                value = await self._replace(fn, args, kwargs, UnacceptableResultError(result))
                return result if value is MISSING else value
            if self.cache is not None:
                self.cache.keep(fn, args, kwargs, result)
            return result

        return protected

    async def flush(self) -> None:
        """Wait until the cache writes started so far are done (tests, shutdown)."""
        if self.cache is not None:
            await self.cache.flush()
