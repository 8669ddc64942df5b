"""``ResilienceMiddleware``: load shedding, rate limiting, timeouts and deadlines for ASGI apps.

Pure ASGI, so it runs under Starlette, FastAPI and any other ASGI framework, and imports none
of them::

    app = ResilienceMiddleware(app, max_concurrent=100, timeout=10, exclude=("/health",))

Around each HTTP request, in the recommended order: ``RateLimiter -> Timeout -> Bulkhead``.
A rejected request gets ``429`` (rate limit) or ``503`` (bulkhead full), both with
``Retry-After``; a request that outlives its timeout gets ``504`` if its response has not
started, and otherwise the exception goes up to the server, which aborts the connection (a
second response can never be sent). WebSocket and lifespan scopes pass straight through.

The caller's budget, ``x-deadline-ms: <milliseconds>``, becomes the request's deadline: a
spent budget is answered ``504`` without calling the app, the app is cut off when the
budget runs out, and ``ResilientTransport`` forwards what is left downstream.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

from resilience import (
    Bulkhead,
    BulkheadFullError,
    Clock,
    Listener,
    Pipeline,
    Policy,
    RateLimitedError,
    RateLimiter,
    ResilienceTimeoutError,
    Store,
    Timeout,
)

from ._deadline import DEADLINE_HEADER, MAX_BUDGET, deadline, parse_budget, remaining

__all__ = [
    "DEADLINE_HEADER",
    "ASGIApp",
    "Message",
    "Receive",
    "ResilienceMiddleware",
    "Scope",
    "Send",
    "deadline",
    "remaining",
]

# The ASGI types, as Starlette spells them (starlette/types.py), without importing it.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ROUTE_OPTIONS = frozenset({"max_concurrent", "max_waiting", "max_wait", "rate", "per", "burst"})
_ROUTE_OPTIONS |= {"timeout", "retry_after"}
_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class _Limits:
    """The options of one compartment (the default one, or one override)."""

    max_concurrent: int | None
    max_waiting: int
    max_wait: float | None
    rate: float | None
    per: float
    burst: int | None
    timeout: float | None
    retry_after: float


Protected = Callable[[Scope, Receive, Send, list[BaseException]], Awaitable[None]]


async def _shed(send: Send, route: _Route, exc: RateLimitedError | BulkheadFullError) -> None:
    """Answer a rejection of ours: 429 for the rate limit, 503 for a full bulkhead."""
    if isinstance(exc, RateLimitedError):
        await _answer(send, 429, _TOO_MANY, exc.retry_after)
    else:
        await _answer(send, 503, _OVERLOADED, route.retry_after)


class _Route:
    """One compartment's policies around the app, built once."""

    __slots__ = ("protected", "retry_after", "timeout")

    def __init__(
        self,
        app: ASGIApp,
        limits: _Limits,
        name: str,
        store: Store | None,
        clock: Clock | None,
        listeners: tuple[Listener, ...],
    ) -> None:
        self.timeout = limits.timeout
        self.retry_after = limits.retry_after
        shared: dict[str, Any] = {"clock": clock, "listeners": listeners}
        policies: list[Policy] = []
        if limits.rate is not None:
            policies.append(
                RateLimiter(
                    limits.rate,
                    per=limits.per,
                    burst=limits.burst,
                    name=name,
                    **shared,
                    **_store_for(RateLimiter, store),
                )
            )
        if limits.timeout is not None:
            policies.append(Timeout(limits.timeout, name=name, **shared))
        if limits.max_concurrent is not None:
            fleet = store is not None and not limits.max_waiting
            policies.append(
                Bulkhead(
                    limits.max_concurrent,
                    max_waiting=limits.max_waiting,
                    max_wait=limits.max_wait,
                    name=name,
                    **shared,
                    # fleet-wide with a store; a waiting queue stays per process
                    distributed=fleet,
                    store=store if fleet else None,
                )
            )

        async def run_app(
            scope: Scope, receive: Receive, send: Send, raised: list[BaseException]
        ) -> None:
            try:
                await app(scope, receive, send)
            except BaseException as exc:  # noted (and re-raised) so it is never mistaken
                raised.append(exc)  # for a rejection or timeout of ours
                raise

        self.protected: Protected | None = (
            Pipeline(*policies, name=name)(run_app) if policies else None
        )


def _store_for(policy: type, store: Store | None) -> dict[str, Any]:
    """``{"store": store}`` if the policy accepts a store (fleet-wide limits), else ``{}``."""
    if store is None:
        return {}
    if "store" in inspect.signature(policy).parameters:
        return {"store": store}
    return {}


def _check_seconds(what: str, value: object, *, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or value <= 0:
        raise ValueError(f"{what} must be finite and > 0, got {value!r}")


def _check_pattern(what: str, pattern: object) -> str:
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ValueError(f"{what} must hold paths starting with '/', got {pattern!r}")
    return pattern


def _matches(pattern: str, path: str) -> bool:
    """``/health`` matches ``/health`` and ``/health/...``; ``/static/`` matches all below it."""
    if pattern.endswith("/"):
        return path.startswith(pattern)
    return path == pattern or path.startswith(pattern + "/")


def _response(status: int, body: bytes, retry_after: float | None) -> tuple[Message, Message]:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


async def _answer(send: Send, status: int, body: bytes, retry_after: float | None) -> None:
    start, end = _response(status, body, retry_after)
    await send(start)
    await send(end)


_TOO_MANY = b"Too Many Requests"
_OVERLOADED = b"Service Unavailable: overloaded, retry later"
_TIMED_OUT = b"Gateway Timeout"
_SPENT = b"Gateway Timeout: the request's deadline has passed"


class ResilienceMiddleware:
    """Sheds load, limits the rate, and bounds the time of HTTP requests to ``app``.

    Options (all keyword-only; ``None`` turns a limit off):

    * ``max_concurrent`` requests run at once; ``max_waiting`` more may queue for up to
      ``max_wait`` seconds; others get ``503`` with ``Retry-After: retry_after``.
    * ``rate`` requests per ``per`` seconds (bursts of ``burst``); others get ``429`` with
      ``Retry-After`` saying when a slot frees up.
    * ``timeout`` seconds per request: ``504`` if the response has not started, else the
      connection is aborted.
    * ``exclude``: paths passed straight to the app, untouched (health checks).
    * ``overrides``: ``{path: {option: value}}``; each is a compartment of its own (its own
      slots and bucket), inheriting the options it does not set; the longest match wins.
      A path ``/a`` covers ``/a`` and ``/a/...``; ``/a/`` covers everything below ``/a/``.
    * ``deadline_header`` (``None``: ignore deadlines): the caller's remaining budget in
      milliseconds, capped at ``max_deadline`` seconds; ``enforce_deadline`` also cuts the
      app off (``504``) when the budget runs out.
    * ``store`` makes the limits fleet-wide: the rate limiter shares one bucket, and the
      bulkhead (unless it has a waiting queue, which stays per process) takes a fleet-wide
      lease per request (one store round trip to take it, one to return it); ``clock`` and
      ``listeners`` go to every policy; ``name`` prefixes the policies' names.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_concurrent: int | None = None,
        max_waiting: int = 0,
        max_wait: float | None = None,
        rate: float | None = None,
        per: float = 1.0,
        burst: int | None = None,
        timeout: float | None = None,
        retry_after: float = 1.0,
        exclude: Iterable[str] = (),
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        deadline_header: str | None = DEADLINE_HEADER,
        max_deadline: float = MAX_BUDGET,
        enforce_deadline: bool = True,
        store: Store | None = None,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        name: str = "asgi",
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, got {app!r}")
        _check_seconds("timeout", timeout, none=True)
        _check_seconds("retry_after", retry_after)
        _check_seconds("max_deadline", max_deadline)
        if deadline_header is not None and (
            not isinstance(deadline_header, str) or not deadline_header
        ):
            raise TypeError(
                f"deadline_header must be a header name or None, got {deadline_header!r}"
            )
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a collection of paths, not one str: {exclude!r}")
        listeners = tuple(listeners)
        self.app = app
        self.exclude: tuple[str, ...] = tuple(_check_pattern("exclude", p) for p in exclude)
        self._header = None if deadline_header is None else deadline_header.lower().encode()
        self.max_deadline = float(max_deadline)
        self.enforce_deadline = bool(enforce_deadline)
        base = _Limits(
            max_concurrent=max_concurrent,
            max_waiting=max_waiting,
            max_wait=max_wait,
            rate=rate,
            per=per,
            burst=burst,
            timeout=timeout,
            retry_after=float(retry_after),
        )
        self._default = _Route(app, base, name, store, clock, listeners)
        self._overrides: list[tuple[str, _Route]] = []
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(f"overrides must be a dict of {{path: options}}, got {overrides!r}")
        for path, options in (overrides or {}).items():
            _check_pattern("overrides", path)
            if not isinstance(options, Mapping):
                raise TypeError(f"overrides[{path!r}] must be a dict of options, got {options!r}")
            unknown = set(options) - _ROUTE_OPTIONS
            if unknown:
                raise ValueError(
                    f"overrides[{path!r}] has unknown options {sorted(unknown)}; "
                    f"known: {sorted(_ROUTE_OPTIONS)}"
                )
            _check_seconds(f"overrides[{path!r}]['timeout']", options.get("timeout"), none=True)
            if "retry_after" in options:
                _check_seconds(f"overrides[{path!r}]['retry_after']", options["retry_after"])
            limits = replace(base, **options)
            route = _Route(app, limits, f"{name}:{path}", store, clock, listeners)
            self._overrides.append((path, route))
        self._overrides.sort(key=lambda item: len(item[0]), reverse=True)
        self._plain = not self.exclude and not self._overrides
        self._routes: dict[str, _Route | None] = {}

    def _route(self, path: str) -> _Route | None:
        """The compartment of ``path``, or ``None`` if it is excluded."""
        routes = self._routes
        try:
            return routes[path]
        except KeyError:
            pass
        route: _Route | None = self._default
        if any(_matches(p, path) for p in self.exclude):
            route = None
        else:
            for pattern, candidate in self._overrides:
                if _matches(pattern, path):
                    route = candidate
                    break
        if len(routes) >= _CACHE_SIZE:
            routes.clear()
        routes[path] = route
        return route

    def _budget(self, scope: Scope) -> float | None:
        header = self._header
        if header is None:
            return None
        for name, value in scope.get("headers", ()):
            if name == header:
                return parse_budget(value, self.max_deadline)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one ASGI request (HTTP only; other scopes go straight through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._default if self._plain else self._route(scope.get("path", "/"))
        if route is None:
            await self.app(scope, receive, send)
            return
        budget = self._budget(scope)
        if budget is None:
            if route.protected is None:
                await self.app(scope, receive, send)
                return
            if route.timeout is None:
                await self._run(route, scope, receive, send)
                return
            await self._run_timed(route, scope, receive, send, None)
            return
        if budget <= 0:
            await _answer(send, 504, _SPENT, None)
            return
        with deadline(budget) as at:
            # the deadline cuts the app off only when it comes before the route's timeout
            cut: float | None = at
            if not self.enforce_deadline or (route.timeout is not None and budget >= route.timeout):
                cut = None
            if cut is None and route.protected is None:
                await self.app(scope, receive, send)
            elif cut is None and route.timeout is None:
                await self._run(route, scope, receive, send)
            else:
                await self._run_timed(route, scope, receive, send, cut)

    async def _run(self, route: _Route, scope: Scope, receive: Receive, send: Send) -> None:
        """Rejections only: nothing of the app can have started when one is raised."""
        raised: list[BaseException] = []
        assert route.protected is not None
        try:
            await route.protected(scope, receive, send, raised)
        except (RateLimitedError, BulkheadFullError) as exc:
            if raised:  # the app's own error, not a rejection of ours
                raise
            await _shed(send, route, exc)

    async def _run_timed(
        self, route: _Route, scope: Scope, receive: Receive, send: Send, at: float | None
    ) -> None:
        """With a timeout or a deadline: track whether the response has started."""
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        raised: list[BaseException] = []
        budget = None if at is None else asyncio.timeout_at(at)
        try:
            if budget is None:
                assert route.protected is not None
                await route.protected(scope, receive, tracking_send, raised)
            else:
                async with budget:
                    if route.protected is None:
                        await self.app(scope, receive, tracking_send)
                    else:
                        await route.protected(scope, receive, tracking_send, raised)
        except (RateLimitedError, BulkheadFullError) as exc:
            if raised:  # the app's own error, not a rejection of ours
                raise
            await _shed(send, route, exc)
        except TimeoutError as exc:
            if budget is not None and budget.expired():
                ours = True  # the caller's deadline ran out
            else:  # our Timeout's own error, not one the app raised
                ours = isinstance(exc, ResilienceTimeoutError) and not (raised and exc is raised[0])
            if not ours or response_started:
                raise  # the server aborts the connection: no second response
            await _answer(send, 504, _TIMED_OUT, None)
