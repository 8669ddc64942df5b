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
lower classes are shed first: a sheddable request may only take ``shares["sheddable"]`` of
the limit, a default one ``shares["default"]`` (when critical traffic can exist), and only
critical requests may fill the last slots. With a ``store`` the limit is the fleet's, and so
are the classes' shares: a lower class is shed once this replica's requests plus what the
other replicas hold reach its share of the fleet's limit (docs/overload.md says why). The
criticality is forwarded downstream like the deadline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

from resilience import (
    AdaptiveLimit,
    Bulkhead,
    BulkheadFullError,
    Clock,
    FleetShare,
    Listener,
    Pipeline,
    RateLimitedError,
    ResilienceTimeoutError,
    Store,
    StoreUnavailableError,
    shortest_lease,
)
from resilience.checks import (
    check_bool,
    check_fleet_name,
    check_int,
    check_name,
    check_ratio,
    check_seconds,
    store_down,
)

from ._deadline import (
    CRITICAL,
    CRITICALITY_HEADER,
    DEADLINE_HEADER,
    DEFAULT,
    MAX_BUDGET,
    SHEDDABLE,
    _criticality,
    _deadline,
    check_criticality_map,
    check_deadline_header,
    criticality,
    deadline,
    get_criticality,
    parse_budget,
    parse_criticality,
    remaining,
)
from ._policies import limits as build_limits

__all__ = [
    "CRITICALITY_HEADER",
    "DEADLINE_HEADER",
    "SHARES",
    "ASGIApp",
    "Message",
    "Receive",
    "ResilienceMiddleware",
    "Scope",
    "Send",
    "criticality",
    "deadline",
    "get_criticality",
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
DEFAULT_NAME = "asgi"

SHARES: Mapping[str, float] = {SHEDDABLE: 0.75, DEFAULT: 0.9}
"""The share of the concurrency limit each class may fill; critical requests may fill it all.
The ``default`` share applies only when critical traffic can exist (a ``criticality`` path
marked critical, or ``trust_criticality=True``); otherwise default requests use it all."""

LEASE = 30.0
"""A fleet-wide permit's lease without a ``timeout`` (renewed every half lease while the
request runs; how long a dead replica's permit stays taken)."""
LEASE_MARGIN = 5.0
"""With a ``timeout``, a permit's lease is ``timeout + LEASE_MARGIN`` seconds: it outlives
the longest request it covers without a renewal. Either way it is at least what the store
can renew (``resilience.quota.shortest_lease``: 6 store timeouts)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Limits:
    """The options of one compartment (the default one, or one override)."""

    max_concurrent: int | AdaptiveLimit | None
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

    __slots__ = ("bulkhead", "caps", "fleet", "protected", "retry_after", "timeout")

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
        fixed = limits.max_concurrent
        adaptive = None
        if isinstance(fixed, AdaptiveLimit):  # built here: the shared builder takes numbers
            adaptive, fixed = fixed, None
        policies = build_limits(
            name,
            rate=limits.rate,
            per=limits.per,
            burst=limits.burst,
            timeout=limits.timeout,
            max_concurrent=fixed,
            max_waiting=limits.max_waiting,
            max_wait=limits.max_wait,
            store=store,
            clock=clock,
            listeners=listeners,
            # fleet-wide with a store; a waiting queue stays per process
            fleet_bulkhead=not limits.max_waiting,
            lease=_lease(limits.timeout, store),
            quota=True,  # no store round trip per request (shares, tokens taken ahead)
        )
        if adaptive is not None:  # adapts on this replica's own latency: never fleet-wide
            policies.append(
                Bulkhead(
                    limit=adaptive,
                    max_waiting=limits.max_waiting,
                    max_wait=limits.max_wait,
                    name=name,
                    clock=clock,
                    listeners=listeners,
                )
            )
        self.bulkhead: Bulkhead | None = next(
            (p for p in policies if isinstance(p, Bulkhead)), None
        )
        #: this replica's share of the fleet's limit (with a store), and the most permits
        #: the fleet may hold for each class (``ResilienceMiddleware`` fills it in)
        permits = None if self.bulkhead is None else self.bulkhead.permits
        self.fleet = permits if isinstance(permits, FleetShare) else None
        self.caps: dict[str, int] = {}

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


def _lease(timeout: float | None, store: Store | None) -> float:
    """A fleet-wide permit's lease: longer than the longest request it covers, if bounded,
    and long enough to be renewed on ``store`` (a store with a long ``timeout``)."""
    lease = LEASE if timeout is None else max(LEASE, timeout + LEASE_MARGIN)
    return lease if store is None else max(lease, shortest_lease(store))


def _check_limits(where: str, limits: _Limits, given: Iterable[str] = _ROUTE_OPTIONS) -> None:
    """What the policies cannot see: queue options that do nothing without a bulkhead.

    ``given``: the options set here (an override may switch the bulkhead off and leave the
    queue options it inherits unused).
    """
    check_int(f"{where}max_waiting", limits.max_waiting, minimum=0)
    check_seconds(f"{where}max_wait", limits.max_wait, none=True, zero=True)
    queue = {"max_waiting", "max_wait"} & set(given)
    waiting = limits.max_waiting if "max_waiting" in queue else 0
    wait = limits.max_wait if "max_wait" in queue else None
    if limits.max_concurrent is None and (waiting or wait is not None):
        raise ValueError(
            f"{where}max_waiting={limits.max_waiting!r} and {where}max_wait="
            f"{limits.max_wait!r} need max_concurrent (there is no queue without a bulkhead)"
        )


def _check_shares(shares: Mapping[str, float] | None, reserve: bool) -> dict[str, float]:
    """``{class: share}`` for every class: critical 1, default 1 unless ``reserve``."""
    given = dict(SHARES if shares is None else shares)
    if shares is not None and not isinstance(shares, Mapping):
        raise TypeError(f"shares must be a dict of {{criticality: share}}, got {shares!r}")
    unknown = set(given) - {SHEDDABLE, DEFAULT}
    if unknown:
        raise ValueError(
            f"shares has unknown keys {sorted(unknown)}: only 'sheddable' and 'default' "
            "(critical requests may always fill the whole limit)"
        )
    for key, value in given.items():
        check_ratio(f"shares[{key!r}]", value)
    sheddable = given.get(SHEDDABLE, SHARES[SHEDDABLE])
    default = given.get(DEFAULT, SHARES[DEFAULT])
    if sheddable > default:
        raise ValueError(
            f"shares['sheddable'] ({sheddable!r}) must not exceed shares['default'] "
            f"({default!r}): sheddable requests are shed first"
        )
    return {CRITICAL: 1.0, DEFAULT: default if reserve else 1.0, SHEDDABLE: sheddable}


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
    * ``deadline_header`` (``None``: ignore deadlines): the caller's remaining budget in
      milliseconds, capped at ``max_deadline`` seconds. It shortens the request's deadline
      (what is forwarded downstream); with ``enforce_deadline=True`` it also cuts the app
      off (``504``) if the budget runs out before the response starts, never after.
    * ``store`` makes the limits fleet-wide: the rate limiter shares one bucket (tokens taken
      ahead in batches), and the bulkhead (unless it has a waiting queue, which stays per
      process) holds a share of the fleet's permits (no store call per request); ``clock`` and
      ``listeners`` go to every policy; ``name`` prefixes the policies' names, and must be
      given (a name of this service) when ``store`` is shared with other processes. An
      adaptive limit stays per process (each replica adapts on its own latency).
    * ``criticality``: ``{path: "critical" | "default" | "sheddable"}`` (the longest match
      wins); paths not listed take the ``criticality_header`` (``None``: ignore it), else
      ``default``. The header may say ``sheddable`` or ``default``; it makes a request
      ``critical`` only with ``trust_criticality=True``. Anything else is ``default``.
    * ``shares``: the share of the concurrency limit a class may fill (``SHARES``): a lower
      class is shed (503) once that many requests are in flight, so the last slots (and
      the queue) are kept for the classes above it. With a ``store``, of the fleet's limit:
      this replica's requests plus what the other replicas hold.

    ``aclose()`` (run on ``lifespan.shutdown``) gives a fleet share back.
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
        check_seconds("max_deadline", max_deadline)
        check_deadline_header(deadline_header)
        check_deadline_header(criticality_header, "criticality_header")
        self.enforce_deadline = check_bool("enforce_deadline", enforce_deadline)
        self.trust_criticality = check_bool("trust_criticality", trust_criticality)
        paths = check_criticality_map(criticality)
        self._criticality_paths = sorted(paths.items(), key=lambda i: len(i[0]), reverse=True)
        self._criticality_header = (
            None if criticality_header is None else criticality_header.lower().encode()
        )
        # shed default requests early only if critical ones can exist to take the rest
        reserve = trust_criticality and criticality_header is not None
        reserve = reserve or CRITICAL in paths.values()
        self.shares = _check_shares(shares, reserve)
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a collection of paths, not one str: {exclude!r}")
        if store is not None and not isinstance(store, Store):
            raise TypeError(f"store must be a resilience Store or None, got {store!r}")
        check_name(name)
        check_fleet_name("ResilienceMiddleware(store=...)", name, DEFAULT_NAME, store)
        listeners = tuple(listeners)
        self.app = app
        self.exclude: tuple[str, ...] = tuple(_check_pattern("exclude", p) for p in exclude)
        self._header = None if deadline_header is None else deadline_header.lower().encode()
        self.max_deadline = float(max_deadline)
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
        _check_limits("", base)
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
            where = f"overrides[{path!r}]."
            check_seconds(f"{where}timeout", options.get("timeout"), none=True)
            if "retry_after" in options:
                check_seconds(f"{where}retry_after", options["retry_after"])
            limits = replace(base, **options)
            _check_limits(where, limits, options)
            route = _Route(app, limits, f"{name}:{path}", store, clock, listeners)
            self._overrides.append((path, route))
        self._overrides.sort(key=lambda item: len(item[0]), reverse=True)
        for route in (self._default, *(r for _, r in self._overrides)):
            if route.fleet is not None:  # a class may fill its share of the fleet's limit
                limit = route.fleet.limit
                route.caps = {k: int(v * limit) or 1 for k, v in self.shares.items()}
        self._plain = not self.exclude and not self._overrides and not paths
        self._routes: dict[str, tuple[_Route, str | None] | None] = {}

    def _route(self, path: str) -> tuple[_Route, str | None] | None:
        """The compartment of ``path`` and the criticality its path gives it (if any), or
        ``None`` if it is excluded."""
        routes = self._routes
        try:
            return routes[path]
        except KeyError:
            pass
        found: tuple[_Route, str | None] | None = None
        if not any(_matches(p, path) for p in self.exclude):
            route = self._default
            for pattern, candidate in self._overrides:
                if _matches(pattern, path):
                    route = candidate
                    break
            level = next((v for p, v in self._criticality_paths if _matches(p, path)), None)
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
        if bulkhead is not None and level is not CRITICAL and self.shares[level] < 1.0:
            # a lower class may fill only its share of the limit (at least one slot)
            fleet = route.fleet
            if fleet is None:
                crowded = bulkhead.in_flight >= (
                    int(self.shares[level] * bulkhead.current_limit) or 1
                )
            elif fleet.held < fleet.share and fleet.clock.monotonic() < fleet.valid_until:
                # the fleet's limit: this replica's requests plus what the others hold
                crowded = fleet.held + fleet.others >= route.caps[level]
            else:  # the share is used up: grow it, within the class's share (one round trip)
                crowded = await self._crowded(bulkhead, fleet, route.caps[level], level)
            if crowded:
                bulkhead.rejection()  # reported to the listeners like the bulkhead's own
                await _answer(send, 503, _OVERLOADED, route.retry_after)
                return
        if level is DEFAULT:
            if budget is None and route.timeout is None:  # the common case, inlined
                if route.protected is None:
                    await self.app(scope, receive, send)
                else:
                    await self._run(route, scope, receive, send)
            else:
                await self._serve(route, scope, receive, send, budget)
            return
        token = _criticality.set(level)  # forwarded downstream by ResilientTransport
        try:
            await self._serve(route, scope, receive, send, budget)
        finally:
            _criticality.reset(token)

    async def _crowded(self, bulkhead: Bulkhead, fleet: FleetShare, cap: int, level: str) -> bool:
        """Whether a ``level`` request finds its class's share of the fleet's limit full,
        after growing this replica's share within it (the permit it took is left in the
        share for the bulkhead to take at once). The store down: this replica's own count."""
        try:
            if not store_down(fleet.store):
                if not await fleet.take(cap):
                    return True
                await fleet.give()
                return False
        except StoreUnavailableError:
            pass
        return bulkhead.in_flight >= (int(self.shares[level] * bulkhead.current_limit) or 1)

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
        self, route: _Route, scope: Scope, receive: Receive, send: Send, budget: float | None
    ) -> None:
        """The request under its deadline, through the route's policies."""
        timeout = route.timeout
        if budget is None:
            if timeout is None:
                if route.protected is None:
                    await self.app(scope, receive, send)
                else:
                    await self._run(route, scope, receive, send)
                return
            seconds = timeout
        elif budget <= 0:
            await _answer(send, 504, _SPENT, None)
            return
        else:
            seconds = budget if timeout is None else min(budget, timeout)
        # the request's deadline, forwarded downstream: the sooner of the caller's budget
        # and our own timeout
        # (set directly, not with ``deadline()``: this runs on every request)
        at = asyncio.get_running_loop().time() + seconds
        outer = _deadline.get()
        if outer is not None and outer < at:
            at = outer
        token = _deadline.set(at)
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
            await self._run_timed(route, scope, receive, send, cut)
        finally:
            _deadline.reset(token)

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
        """Under a deadline: track whether the response has started, and when it has ended.

        Once the response has started the caller's deadline no longer cuts the app off; once
        its last body message is sent the request's deadline is lifted for what the app still
        runs (background tasks), so its outgoing calls are not cut either.
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
                _deadline.set(None)  # the response is complete: what follows has no deadline
            await send(message)

        raised: list[BaseException] = []
        try:
            if budget is None:
                if route.protected is None:
                    await self.app(scope, receive, tracking_send)
                else:
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
