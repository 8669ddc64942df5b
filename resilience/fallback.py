"""Fallback: answer with a stand-in value when the call fails."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from .errors import UnacceptableResultError
from .events import FallbackUsed, Listener, emit
from .policy import BasePolicy, ExceptionFilter, Protected, check_predicate, exception_filter

__all__ = ["Fallback"]

_MISSING: Any = object()


class Fallback(BasePolicy):
    """Returns ``value``, or ``handler(error)``, when the call fails with an error matching ``on``.

    ``on`` is required: exception types or a predicate (cancellation is never caught).
    ``handler`` may be a plain or an async function. ``result_if(result)`` also replaces a
    returned value; the handler then receives an ``UnacceptableResultError`` carrying it.
    Give exactly one of ``value`` and ``handler``. The same ``value`` object is returned
    every time, so prefer immutable values.
    """

    kind = "fallback"

    def __init__(
        self,
        *,
        on: ExceptionFilter,
        value: Any = _MISSING,
        handler: Callable[[Exception], Any] | None = None,
        result_if: Callable[[Any], bool] | None = None,
        name: str = "fallback",
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, None, listeners)
        self._matches = exception_filter("on", on)
        if (value is _MISSING) == (handler is None):
            raise TypeError("Fallback takes exactly one of value= and handler=")
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        self.value = value
        self.handler = handler
        self._result_if = check_predicate("result_if", result_if)

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
