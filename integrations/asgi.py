"""``ResilienceMiddleware``: load shedding, rate limiting, timeouts and deadlines for ASGI apps.

Pure ASGI, so it runs under Starlette, FastAPI and any other ASGI framework, and imports none
of them::

    app = ResilienceMiddleware(app, max_concurrent=100, timeout=10, exclude=("/health",))

Around each HTTP request, in the recommended order: ``RateLimiter -> Timeout -> Bulkhead``.
A rejected request gets ``429`` (rate limit) or ``503`` (bulkhead full), both with
``Retry-After``; a request that outlives its timeout gets ``504`` if its response has not
started, and otherwise the exception goes up to the server, which aborts the connection (a
second response can never be sent). WebSocket scopes pass straight through; so does the
lifespan, but on ``lifespan.shutdown`` the middleware first gives its share of a fleet-wide
limit back (``aclose()``), so the replicas that go on get it at once.

Each request's deadline is the sooner of the caller's budget (``x-deadline-ms``) and the
route's ``timeout``; ``ResilientTransport`` forwards what is left downstream. A spent budget
is answered ``504`` without calling the app. The caller's budget cuts the app off only with
``enforce_deadline=True``, and never once the response has started: a client cannot cancel
work the service has committed to (background tasks run after the response, with no
deadline).

``max_concurrent`` may be an ``AdaptiveLimit``: the limit then follows the app's latency.
Each request has a criticality (``critical``, ``default``, ``sheddable``), from its path
(``criticality={"/checkout": "critical"}``) or from ``x-request-criticality``. Under load the
lower classes are shed first (``Shedding``, in ``_shedding.py``); the criticality is
forwarded downstream like the deadline. The compartments (the default one and the
``overrides``) and their policies are built in ``_routes.py``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from resilience import (
    AdaptiveLimit,
    BulkheadFullError,
    Clock,
    Listener,
    RateLimitedError,
    ResilienceTimeoutError,
    Store,
    request_scope,
)
from resilience.checks import check_bool, check_fleet_name, check_name, check_seconds

from ._asgi_types import ASGIApp, Message, Receive, Scope, Send
from ._deadline import (
    CRITICAL,
    CRITICALITY_HEADER,
    DEADLINE_HEADER,
    DEFAULT,
    MAX_BUDGET,
    DeadlineCell,
    _criticality,
    _deadline,
    check_deadline_header,
    criticality,
    deadline,
    get_criticality,
    parse_budget,
    parse_criticality,
    remaining,
    shrink_deadline,
)
from ._routes import Limits, Route, check_pattern, matches
from ._shedding import SHARES, Shedding, crowded

__all__ = [
    "CRITICALITY_HEADER",
    "DEADLINE_HEADER",
    "SHARES",
    "ASGIApp",
    "Deadlines",
    "Message",
    "Receive",
    "ResilienceMiddleware",
    "Scope",
    "Send",
    "Shedding",
    "criticality",
    "deadline",
    "get_criticality",
    "remaining",
]

_CACHE_SIZE = 1024
DEFAULT_NAME = "asgi"


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadlines:
    """How ``ResilienceMiddleware`` reads the caller's deadline.

    * ``deadline_header`` (``None``: ignore deadlines): the caller's remaining budget in
      milliseconds, capped at ``max_deadline`` seconds. It shortens the request's deadline
      (what is forwarded downstream);
    * ``enforce_deadline=True``: it also cuts the app off (``504``) if the budget runs out
      before the response starts, never after.

    The same options are also ``ResilienceMiddleware``'s own keywords.
    """

    deadline_header: str | None = DEADLINE_HEADER
    max_deadline: float = MAX_BUDGET
    enforce_deadline: bool = False

    def __post_init__(self) -> None:
        check_deadline_header(self.deadline_header)
        check_seconds("max_deadline", self.max_deadline)
        check_bool("enforce_deadline", self.enforce_deadline)


_Group = TypeVar("_Group", Deadlines, Shedding)


def _group(what: str, given: object, flat: _Group) -> _Group:
    """The option group ``given`` (``what=``), else the one the flat keywords make; both
    at once is an error (flat options that differ from their defaults)."""
    if given is None:
        return flat
    kind = type(flat)
    if not isinstance(given, kind):
        raise TypeError(f"{what} must be a {kind.__name__} or None, got {given!r}")
    if flat != kind():
        raise ValueError(
            f"give {what}={kind.__name__}(...) or its options as keywords, not both: "
            f"{flat!r} next to {given!r}"
        )
    return given


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


async def _shed(send: Send, route: Route, exc: RateLimitedError | BulkheadFullError) -> None:
    """Answer a rejection of ours: 429 for the rate limit, 503 for a full bulkhead."""
    if isinstance(exc, RateLimitedError):
        await _answer(send, 429, _TOO_MANY, exc.retry_after)
    else:
        await _answer(send, 503, _OVERLOADED, route.retry_after)


_TOO_MANY = b"Too Many Requests"
_OVERLOADED = b"Service Unavailable: overloaded, retry later"
_TIMED_OUT = b"Gateway Timeout"
_SPENT = b"Gateway Timeout: the request's deadline has passed"


class ResilienceMiddleware:
    """Sheds load, limits the rate, and bounds the time of HTTP requests to ``app``.

    Options (all keyword-only; ``None`` turns a limit off):

    * ``max_concurrent`` requests run at once (a number, or an ``AdaptiveLimit`` that follows
      the app's latency); ``max_waiting`` more may queue for up to ``max_wait`` seconds;
      others get ``503`` with ``Retry-After: retry_after``.
    * ``rate`` requests per ``per`` seconds (bursts of ``burst``); others get ``429`` with
      ``Retry-After`` saying when a slot frees up.
    * ``timeout`` seconds per request: ``504`` if the response has not started, else the
      connection is aborted. It is also the request's deadline, forwarded downstream.
    * ``exclude``: paths passed straight to the app, untouched (health checks).
    * ``overrides``: ``{path: {option: value}}``; each is a compartment of its own (its own
      slots and bucket), inheriting the options it does not set; the longest match wins.
      A path ``/a`` covers ``/a`` and ``/a/...``; ``/a/`` covers everything below ``/a/``.
    * ``deadlines=Deadlines(...)``: how the caller's deadline is read (``deadline_header``,
      ``max_deadline``, ``enforce_deadline``; also accepted as keywords here).
    * ``shedding=Shedding(...)``: which requests are shed first (``criticality``,
      ``criticality_header``, ``trust_criticality``, ``shares``; also accepted as keywords
      here). With a ``store``, a class's share is of the fleet's limit: this replica's
      requests plus what the other replicas hold.
    * ``store`` makes the limits fleet-wide: the rate limiter shares one bucket (tokens taken
      ahead in batches), and the bulkhead (unless it has a waiting queue, which stays per
      process) holds a share of the fleet's permits (no store call per request); ``clock`` and
      ``listeners`` go to every policy; ``name`` prefixes the policies' names, and must be
      given (a name of this service) when ``store`` is shared with other processes. An
      adaptive limit stays per process (each replica adapts on its own latency).

    ``aclose()`` (run on ``lifespan.shutdown``) gives a fleet share back.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_concurrent: int | AdaptiveLimit | None = None,
        max_waiting: int = 0,
        max_wait: float | None = None,
        rate: float | None = None,
        per: float = 1.0,
        burst: int | None = None,
        timeout: float | None = None,
        retry_after: float = 1.0,
        exclude: Iterable[str] = (),
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        deadlines: Deadlines | None = None,
        shedding: Shedding | None = None,
        deadline_header: str | None = DEADLINE_HEADER,
        max_deadline: float = MAX_BUDGET,
        enforce_deadline: bool = False,
        criticality: Mapping[str, str] | None = None,
        criticality_header: str | None = CRITICALITY_HEADER,
        trust_criticality: bool = False,
        shares: Mapping[str, float] | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        name: str = DEFAULT_NAME,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, got {app!r}")
        check_seconds("timeout", timeout, none=True)
        check_seconds("retry_after", retry_after)
        self.deadlines = _group(
            "deadlines",
            deadlines,
            Deadlines(
                deadline_header=deadline_header,
                max_deadline=max_deadline,
                enforce_deadline=enforce_deadline,
            ),
        )
        self.shedding = _group(
            "shedding",
            shedding,
            Shedding(
                criticality=criticality,
                criticality_header=criticality_header,
                trust_criticality=trust_criticality,
                shares=shares,
            ),
        )
        header = self.deadlines.deadline_header
        self._header = None if header is None else header.lower().encode()
        self.max_deadline = float(self.deadlines.max_deadline)
        self.enforce_deadline = self.deadlines.enforce_deadline
        header = self.shedding.criticality_header
        self._criticality_header = None if header is None else header.lower().encode()
        self._criticality_paths = self.shedding.paths
        self.trust_criticality = self.shedding.trust_criticality
        self.shares = self.shedding.class_shares()
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a collection of paths, not one str: {exclude!r}")
        if store is not None and not isinstance(store, Store):
            raise TypeError(f"store must be a resilience Store or None, got {store!r}")
        check_name(name)
        check_fleet_name("ResilienceMiddleware(store=...)", name, DEFAULT_NAME, store)
        listeners = tuple(listeners)
        self.app = app
        self.exclude: tuple[str, ...] = tuple(check_pattern("exclude", p) for p in exclude)
        base = Limits(
            max_concurrent=max_concurrent,
            max_waiting=max_waiting,
            max_wait=max_wait,
            rate=rate,
            per=per,
            burst=burst,
            timeout=timeout,
            retry_after=float(retry_after),
        )
        base.check()
        self._default = Route(app, base, name, store, clock, listeners, self.shares)
        self._overrides: list[tuple[str, Route]] = []
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(f"overrides must be a dict of {{path: options}}, got {overrides!r}")
        for path, options in (overrides or {}).items():
            limits = base.override(path, options)
            route = Route(app, limits, f"{name}:{path}", store, clock, listeners, self.shares)
            self._overrides.append((path, route))
        self._overrides.sort(key=lambda item: len(item[0]), reverse=True)
        self._plain = not self.exclude and not self._overrides and not self._criticality_paths
        self._routes: dict[str, tuple[Route, str | None] | None] = {}

    def _route(self, path: str) -> tuple[Route, str | None] | None:
        """The compartment of ``path`` and the criticality its path gives it (if any), or
        ``None`` if it is excluded."""
        routes = self._routes
        try:
            return routes[path]
        except KeyError:
            pass
        found: tuple[Route, str | None] | None = None
        if not any(matches(p, path) for p in self.exclude):
            route = self._default
            for pattern, candidate in self._overrides:
                if matches(pattern, path):
                    route = candidate
                    break
            level = next((v for p, v in self._criticality_paths if matches(p, path)), None)
            found = (route, level)
        if len(routes) >= _CACHE_SIZE:
            routes.clear()
        routes[path] = found
        return found

    def _headers(self, scope: Scope) -> tuple[float | None, str]:
        """The caller's budget and criticality, in one pass over the headers."""
        deadline_name = self._header
        criticality_name = self._criticality_header
        if deadline_name is None and criticality_name is None:
            return None, DEFAULT
        budget: float | None = None
        level: str | None = None
        for name, value in scope.get("headers", ()):
            if name == deadline_name:
                budget = parse_budget(value, self.max_deadline)
                deadline_name = None  # the first one counts
            elif name == criticality_name:
                level = parse_criticality(value)
                if level is CRITICAL and not self.trust_criticality:
                    level = DEFAULT  # a caller may lower its priority, not raise it
                criticality_name = None
        return budget, DEFAULT if level is None else level

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one ASGI request (HTTP only; other scopes go straight through)."""
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._lifespan(receive)
            await self.app(scope, receive, send)
            return
        # each request is a request scope, once a Coalesce(scope="request") exists
        opened = request_scope().open() if request_scope.in_use else None
        try:
            if self._plain:
                route, level = self._default, None
            else:
                found = self._route(scope.get("path", "/"))
                if found is None:
                    await self.app(scope, receive, send)
                    return
                route, level = found
            budget, claimed = self._headers(scope)
            if level is None:
                level = claimed
            bulkhead = route.bulkhead
            if (
                bulkhead is not None
                and level is not CRITICAL
                and (share := self.shares[level]) < 1.0
            ):
                # a lower class may fill only its share of the limit (at least one slot)
                fleet = route.fleet
                if fleet is None:  # crowded_here(), inlined: this replica's requests
                    full = bulkhead.in_flight >= (int(share * bulkhead.current_limit) or 1)
                elif fleet.held < fleet.share and fleet.clock.monotonic() < fleet.valid_until:
                    # the fleet's limit: this replica's requests plus what the others hold
                    full = fleet.held + fleet.others >= route.caps[level]
                else:  # the share is used up: grow it, within the class's share (one round trip)
                    full = await crowded(bulkhead, fleet, route.caps[level], share)
                if full:
                    bulkhead.rejection()  # reported to the listeners like the bulkhead's own
                    await _answer(send, 503, _OVERLOADED, route.retry_after)
                    return
            if level is DEFAULT:
                if budget is None and route.timeout is None:  # the common case, inlined
                    if route.protected is None:
                        await self.app(scope, receive, send)
                    else:
                        await self._run(route, scope, receive, send, [])
                else:
                    await self._serve(route, scope, receive, send, budget)
                return
            token = _criticality.set(level)  # forwarded downstream by ResilientTransport
            try:
                await self._serve(route, scope, receive, send, budget)
            finally:
                _criticality.reset(token)
        finally:
            if opened is not None:
                opened.close()

    def _lifespan(self, receive: Receive) -> Receive:
        """``receive`` for the lifespan scope: on ``lifespan.shutdown`` (the server has stopped
        serving) the fleet's permits are given back before the app hears of it."""

        async def receive_and_close() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                await self.aclose()
            return message

        return receive_and_close

    async def aclose(self) -> None:
        """Give this replica's share of the fleet-wide limit back now (with a ``store``), so
        the replicas that go on get it at once rather than when its lease runs out. Runs on
        ``lifespan.shutdown``; call it yourself under a server without lifespan events. A
        request served afterwards asks the store for a share again."""
        for route in (self._default, *(r for _, r in self._overrides)):
            if route.bulkhead is not None:
                await route.bulkhead.aclose()

    async def _serve(
        self, route: Route, scope: Scope, receive: Receive, send: Send, budget: float | None
    ) -> None:
        """The request under its deadline, through the route's policies."""
        timeout = route.timeout
        if budget is None:
            if timeout is None:
                await self._run(route, scope, receive, send, [])
                return
            seconds = timeout
        elif budget <= 0:
            await _answer(send, 504, _SPENT, None)
            return
        else:
            seconds = budget if timeout is None else min(budget, timeout)
        # the request's deadline, forwarded downstream: the sooner of the caller's budget
        # and our own timeout
        at, cell, token = shrink_deadline(seconds)
        try:
            # the caller's budget cuts the app off only when enforced, and only if it comes
            # before our own timeout (which the Timeout policy enforces)
            cut = None
            if (
                self.enforce_deadline
                and budget is not None
                and (timeout is None or budget < timeout)
            ):
                cut = at
            await self._run_timed(route, scope, receive, send, cell, cut)
        finally:
            _deadline.reset(token)

    async def _run(
        self,
        route: Route,
        scope: Scope,
        receive: Receive,
        send: Send,
        raised: list[BaseException],
    ) -> None:
        """The app through the route's policies; a rejection of ours is answered (429, 503):
        nothing of the app can have started when one is raised. ``raised``: what the app
        itself raised, noted for the caller."""
        if route.protected is None:
            await self.app(scope, receive, send)
            return
        try:
            await route.protected(scope, receive, send, raised)
        except (RateLimitedError, BulkheadFullError) as exc:
            if raised:  # the app's own error, not a rejection of ours
                raise
            await _shed(send, route, exc)

    async def _run_timed(
        self,
        route: Route,
        scope: Scope,
        receive: Receive,
        send: Send,
        cell: DeadlineCell,
        at: float | None,
    ) -> None:
        """Under the request's deadline ``cell``, cutting the app off at ``at`` (if given):
        track whether the response has started, and when it has ended.

        Once the response has started the caller's deadline no longer cuts the app off; once
        its last body message is sent the request's deadline is lifted for what the app still
        runs (background tasks), so its outgoing calls are not cut either. It is lifted in the
        cell every task of the request shares, since the body may be sent from a child task
        (Starlette's streaming response under ASGI spec < 2.4).
        """
        response_started = False
        budget = None if at is None else asyncio.timeout_at(at)

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            kind = message["type"]
            if kind == "http.response.start":
                response_started = True
                if budget is not None:
                    budget.reschedule(None)  # committed: the caller's deadline no longer cuts
            elif kind == "http.response.body" and not message.get("more_body", False):
                cell.at = None  # the response is complete: what follows has no deadline
            await send(message)

        raised: list[BaseException] = []
        try:
            if budget is None:
                await self._run(route, scope, receive, tracking_send, raised)
            else:
                async with budget:
                    await self._run(route, scope, receive, tracking_send, raised)
        except TimeoutError as exc:
            if budget is not None and budget.expired():
                ours = True  # the caller's deadline ran out
            else:  # our Timeout's own error, not one the app raised
                ours = isinstance(exc, ResilienceTimeoutError) and not (raised and exc is raised[0])
            if not ours or response_started:
                raise  # the server aborts the connection: no second response
            await _answer(send, 504, _TIMED_OUT, None)
