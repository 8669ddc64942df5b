"""``ResilientTransport``: retry, circuit breaker, rate limit, timeout and bulkhead for httpx.

::

    client = httpx.AsyncClient(transport=ResilientTransport())

is the whole integration. Each origin (``https://api.example.com:443``) gets its own pipeline,
built from an ``HttpPolicy`` (or from a function of the origin returning one), in the
recommended order ``Retry -> CircuitBreaker -> RateLimiter -> Timeout -> Bulkhead`` (with an
optional fallback outside it all).

Exceptions raised by the transport itself, drawn as httpx draws its own::

    httpx.TransportError
     +-- CircuitOpen        (also resilience.CircuitOpenError)
     +-- BulkheadFull       (also resilience.BulkheadFullError)
     +-- RateLimited        (also resilience.RateLimitedError)
     +-- Rejected           (also resilience.RejectedError: any other rejection)
     +-- httpx.TimeoutException
          +-- AttemptTimeout      (also resilience.ResilienceTimeoutError)
          +-- DeadlineExceeded    (also resilience.ResilienceTimeoutError)

so ``except httpx.HTTPError`` and ``except resilience.ResilienceError`` both work. Core errors
are translated once, in ``handle_async_request``.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import math
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import httpx
from tenacity import RetryCallState

from resilience import (
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    Clock,
    CountWindow,
    Listener,
    Pipeline,
    Policy,
    RateLimitedError,
    RateLimiter,
    RejectedError,
    ResilienceTimeoutError,
    Retry,
    RetryBudget,
    Store,
    SystemClock,
    Timeout,
    TimeWindow,
)

from ._deadline import DEADLINE_HEADER, _deadline, deadline, format_budget, remaining

__all__ = [
    "DEADLINE_HEADER",
    "FAILURE_STATUSES",
    "IDEMPOTENT_METHODS",
    "AttemptTimeout",
    "BulkheadFull",
    "CircuitOpen",
    "DeadlineExceeded",
    "HttpPolicy",
    "RateLimited",
    "Rejected",
    "ResilientTransport",
    "deadline",
    "origin_of",
    "parse_retry_after",
    "remaining",
]

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods retried by default (RFC 9110, section 9.2.2)."""

FAILURE_STATUSES: frozenset[int] = frozenset({429, *range(500, 600)})
"""Response statuses counted as failures by default: 429 and every 5xx."""

WaitStrategy = Callable[[RetryCallState], float]
FallbackHandler = Callable[[httpx.Request, Exception], Awaitable[httpx.Response]]

_SYNC_CLIENT = (
    "ResilientTransport is an async transport: use it with httpx.AsyncClient("
    "transport=ResilientTransport(...)), not httpx.Client"
)
_EXTENSION = "resilience"
_EXTENSION_KEYS = frozenset({"retry", "deadline"})


# --- exceptions: core errors that are also httpx transport errors ---------------------------


class CircuitOpen(CircuitOpenError, httpx.TransportError):
    """The origin's circuit breaker is open: the request was not sent."""

    def __init__(
        self,
        name: str,
        state: str,
        retry_after: float | None,
        *,
        request: httpx.Request | None = None,
    ) -> None:
        CircuitOpenError.__init__(self, name, state, retry_after)
        self._request = request


class BulkheadFull(BulkheadFullError, httpx.TransportError):
    """Too many requests to this origin were in flight: the request was not sent."""

    def __init__(
        self, name: str, max_concurrent: int, *, request: httpx.Request | None = None
    ) -> None:
        Exception.__init__(self, name, max_concurrent)
        self.name = name
        self.max_concurrent = max_concurrent
        self.retry_after = None
        self._request = request


class RateLimited(RateLimitedError, httpx.TransportError):
    """The client-side rate limit for this origin was reached: the request was not sent."""

    def __init__(
        self, name: str, retry_after: float, *, request: httpx.Request | None = None
    ) -> None:
        Exception.__init__(self, name, retry_after)
        self.name = name
        self.retry_after = retry_after
        self._request = request


class Rejected(RejectedError, httpx.TransportError):
    """Another policy rejected the request (one added by a custom pipeline)."""

    def __init__(
        self, name: str, retry_after: float | None, *, request: httpx.Request | None = None
    ) -> None:
        Exception.__init__(self, name, retry_after)
        self.name = name
        self.retry_after = retry_after
        self._request = request


class AttemptTimeout(ResilienceTimeoutError, httpx.TimeoutException):
    """An attempt took longer than the policy's ``timeout`` (and no retry was left)."""

    def __init__(self, name: str, seconds: float, *, request: httpx.Request | None = None) -> None:
        ResilienceTimeoutError.__init__(self, name, seconds)
        self._request = request


class DeadlineExceeded(ResilienceTimeoutError, httpx.TimeoutException):
    """The caller's deadline (``x-deadline-ms`` or ``deadline()``) ran out."""

    def __init__(self, name: str, seconds: float, *, request: httpx.Request | None = None) -> None:
        ResilienceTimeoutError.__init__(self, name, seconds)
        self._request = request

    def __str__(self) -> str:
        return f"deadline exceeded for {self.name!r}"


def _translate(exc: Exception, request: httpx.Request) -> Exception:
    """The httpx flavour of a core error (``exc`` itself if it has none)."""
    new: Exception
    if isinstance(exc, httpx.HTTPError):  # an httpx error already (DeadlineExceeded included)
        return exc
    if isinstance(exc, CircuitOpenError):
        new = CircuitOpen(exc.name, exc.state, exc.retry_after, request=request)
    elif isinstance(exc, BulkheadFullError):
        new = BulkheadFull(exc.name, exc.max_concurrent, request=request)
    elif isinstance(exc, RateLimitedError):
        new = RateLimited(exc.name, exc.retry_after or 0.0, request=request)
    elif isinstance(exc, RejectedError):
        new = Rejected(exc.name, exc.retry_after, request=request)
    elif isinstance(exc, ResilienceTimeoutError):
        new = AttemptTimeout(exc.name, exc.seconds, request=request)
    else:
        return exc
    return new


# --- the template -------------------------------------------------------------------------


def _check_number(what: str, value: object, *, zero: bool = False, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{what} must be finite and {'>= 0' if zero else '> 0'}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpPolicy:
    """What each origin's pipeline is built from; plain, immutable, validated on creation.

    Retry: ``attempts`` (the first included; 1 turns retry off), backoff ``wait`` (a tenacity
    wait strategy; default: exponential from 0.1 s, capped at 5 s, with jitter), a
    ``Retry-After`` header on a failing response replaces the backoff, capped at
    ``retry_after_max`` seconds. Only ``retry_methods`` are retried; a retried request with
    another method gets an ``idempotency_header`` (a fresh UUID, the same on every attempt)
    unless it has one already (``None``: add nothing). ``retry_budget`` (a ``RetryBudget``)
    caps retries gRPC-style across every request sharing it (fleet-wide with a store).

    Failures: transport errors, attempt timeouts and responses whose status is in
    ``failure_statuses``. Circuit breaker (``circuit_breaker=False`` removes it):
    ``failure_ratio``, ``minimum_calls``, ``window``, ``open_for``, ``open_for_max``,
    ``half_open_calls``, as for ``CircuitBreaker``. Rate limiter when ``rate`` is set (``rate``
    requests per ``per`` seconds, bursts of ``burst``). ``timeout`` limits each attempt, up to
    the response headers (``None``: no limit). Bulkhead when ``max_concurrent`` is set
    (``max_waiting``, ``max_wait`` as for ``Bulkhead``).

    ``fallback(request, error)``, an async function, answers instead of raising when the
    request fails with an exception. Breakers live in ``store`` (breakers with the same origin
    and store share state; ``RedisStore`` shares them across replicas), and so does the rate
    limiter where the core ``RateLimiter`` takes a store. ``clock`` and ``listeners`` go to
    every policy.
    """

    attempts: int = 3
    wait: WaitStrategy | None = None
    retry_after_max: float = 30.0
    retry_budget: RetryBudget | None = None
    retry_methods: Collection[str] = IDEMPOTENT_METHODS
    idempotency_header: str | None = "Idempotency-Key"
    failure_statuses: Collection[int] = FAILURE_STATUSES
    circuit_breaker: bool = True
    failure_ratio: float = 0.5
    minimum_calls: int = 20
    window: CountWindow | TimeWindow = field(default_factory=lambda: CountWindow(100))
    open_for: float = 5.0
    open_for_max: float = 60.0
    half_open_calls: int = 1
    rate: float | None = None
    per: float = 1.0
    burst: int | None = None
    timeout: float | None = 10.0
    max_concurrent: int | None = None
    max_waiting: int = 0
    max_wait: float | None = None
    fallback: FallbackHandler | None = None
    store: Store | None = None
    clock: Clock | None = None
    listeners: tuple[Listener, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.retry_methods, str) or not isinstance(self.retry_methods, Collection):
            raise TypeError(
                f"retry_methods must be a collection of str, got {self.retry_methods!r}"
            )
        methods = set()
        for m in self.retry_methods:
            if not isinstance(m, str) or not m:
                raise TypeError(f"retry_methods must hold method names, got {m!r}")
            methods.add(m.upper())
        object.__setattr__(self, "retry_methods", frozenset(methods))
        if not isinstance(self.failure_statuses, Collection):
            raise TypeError(
                f"failure_statuses must be a collection of int, got {self.failure_statuses!r}"
            )
        for s in self.failure_statuses:
            if isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599:
                raise ValueError(f"failure_statuses must hold HTTP statuses (100-599), got {s!r}")
        object.__setattr__(self, "failure_statuses", frozenset(self.failure_statuses))
        _check_number("retry_after_max", self.retry_after_max, zero=True)
        if self.idempotency_header is not None and (
            not isinstance(self.idempotency_header, str) or not self.idempotency_header
        ):
            raise TypeError(
                f"idempotency_header must be a header name or None, got {self.idempotency_header!r}"
            )
        if self.fallback is not None and not callable(self.fallback):
            raise TypeError(f"fallback must be an async function or None, got {self.fallback!r}")
        if self.store is not None and not isinstance(self.store, Store):
            raise TypeError(f"store must be a resilience Store or None, got {self.store!r}")
        if not isinstance(self.listeners, tuple):
            object.__setattr__(self, "listeners", tuple(self.listeners))
        # the policies validate everything else, with their own clear errors (built without
        # the store, so validating never creates anything in a shared store)
        _build_policies(self, "validation", validating=True)


# --- per-origin pipelines -----------------------------------------------------------------


class _FailedResponse(Exception):
    """A response with a failing status, raised inside the pipeline so policies see a failure."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


# the responses of the current request that a retry will discard
_discard: ContextVar[list[httpx.Response] | None] = ContextVar(
    "resilience.httpx.discard", default=None
)


class _ClosingClock:
    """The Retry's clock: before each backoff sleep, close the responses being discarded.

    Retry sleeps only when it has decided to call again, so this is exactly when a failed
    response is known to be thrown away; closing it then frees its connection during the wait.
    """

    __slots__ = ("_clock",)

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def monotonic(self) -> float:
        return self._clock.monotonic()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Any:
        return self._clock.call_later(delay, callback)

    async def sleep(self, seconds: float) -> None:
        pending = _discard.get()
        while pending:
            await pending.pop().aclose()
        await self._clock.sleep(seconds)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date), or ``None``.

    A date in the past gives 0; anything unparsable gives ``None``.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=UTC)
    now = datetime.now(UTC) if now is None else now
    return max(0.0, (when - now).total_seconds())


def _is_failure(exc: Exception) -> bool:
    """What the breaker counts: transport errors, failing statuses, attempt timeouts."""
    if isinstance(exc, (_FailedResponse, httpx.TransportError)):
        return not isinstance(exc, (RejectedError, DeadlineExceeded))
    return isinstance(exc, ResilienceTimeoutError)


def _not_failure(exc: Exception) -> bool:
    return not _is_failure(exc)


def _retry_wait(base: WaitStrategy, cap: float) -> WaitStrategy:
    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, _FailedResponse):
            after = parse_retry_after(error.response.headers.get("retry-after"))
            if after is not None:
                return min(after, cap)
        return base(state)

    return wait


def _within_deadline(state: RetryCallState) -> bool:
    """Stop retrying when the next sleep would outlast the caller's deadline."""
    left = remaining()
    return left is not None and (state.upcoming_sleep or 0.0) >= left


_default_wait: list[WaitStrategy] = []


def _backoff(wait: WaitStrategy | None) -> WaitStrategy:
    """``wait``, or Retry's own default backoff when ``None``."""
    if wait is None:
        if not _default_wait:
            _default_wait.append(Retry(on=Exception).wait)
        return _default_wait[0]
    if not callable(wait):
        raise TypeError(f"wait must be a tenacity wait strategy (a callable), got {wait!r}")
    return wait


def _build_policies(
    policy: HttpPolicy, name: str, *, validating: bool = False
) -> tuple[Retry | None, list[Policy]]:
    """The Retry (or ``None``) and the policies inside it, outermost first."""
    store = None if validating else policy.store
    clock = policy.clock
    listeners = policy.listeners
    retry = None
    base = _backoff(policy.wait)
    if policy.attempts != 1:
        retry = Retry(
            on=_is_retryable,
            attempts=policy.attempts,
            wait=_retry_wait(base, policy.retry_after_max),
            stop=_within_deadline,
            budget=policy.retry_budget,
            name=name,
            clock=_ClosingClock(SystemClock() if clock is None else clock),
            listeners=listeners,
        )
    inner: list[Policy] = []
    if policy.circuit_breaker:
        inner.append(
            CircuitBreaker(
                name,
                failure_ratio=policy.failure_ratio,
                minimum_calls=policy.minimum_calls,
                window=policy.window,
                open_for=policy.open_for,
                open_for_max=policy.open_for_max,
                half_open_calls=policy.half_open_calls,
                on=_is_failure,
                ignore=_not_failure,
                store=store,
                clock=clock,
                listeners=listeners,
            )
        )
    if policy.rate is not None:
        inner.append(
            RateLimiter(
                policy.rate,
                per=policy.per,
                burst=policy.burst,
                name=name,
                clock=clock,
                listeners=listeners,
                **_store_for(RateLimiter, store),
            )
        )
    if policy.timeout is not None:
        inner.append(Timeout(policy.timeout, name=name, clock=clock, listeners=listeners))
    if policy.max_concurrent is not None:
        inner.append(
            Bulkhead(
                policy.max_concurrent,
                max_waiting=policy.max_waiting,
                max_wait=policy.max_wait,
                name=name,
                clock=clock,
                listeners=listeners,
            )
        )
    return retry, inner


def _store_for(policy: type, store: Store | None) -> dict[str, Any]:
    """``{"store": store}`` if the policy class accepts a store, else ``{}``."""
    if store is not None and "store" in inspect.signature(policy).parameters:
        return {"store": store}
    return {}


def _is_retryable(exc: Exception) -> bool:
    """What Retry calls again: failing statuses, transport errors, attempt timeouts."""
    return _is_failure(exc)


Send = Callable[[httpx.Request, list[httpx.Response]], Awaitable[httpx.Response]]


def _make_attempt(
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    statuses: frozenset[int],
    header: str | None,
) -> Send:
    """One try: send, and turn a failing status into an exception the policies see."""

    async def attempt(request: httpx.Request, discard: list[httpx.Response]) -> httpx.Response:
        if header is not None:
            at = _deadline.get()
            if at is not None:
                request.headers[header] = format_budget(at - asyncio.get_running_loop().time())
        response = await send(request)
        if response.status_code in statuses:
            discard.append(response)
            raise _FailedResponse(response)
        return response

    return attempt


class _Origin:
    """The two protected senders of one origin: with retry and without."""

    __slots__ = ("name", "once", "policy", "retrying")

    def __init__(self, name: str, policy: HttpPolicy, attempt: Send) -> None:
        self.name = name
        self.policy = policy
        retry, inner = _build_policies(policy, name)
        once: Send = Pipeline(*inner, name=name)(attempt) if inner else attempt
        self.once = once
        self.retrying: Send | None = None
        if retry is not None:
            self.retrying = Pipeline(retry, *inner, name=name)(attempt)


def origin_of(request: httpx.Request) -> str:
    """The default pipeline key: ``scheme://host:port`` with the port always spelled out."""
    url = request.url
    port = url.port
    if port is None:
        port = 443 if url.scheme == "https" else 80
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{port}"


def _replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again: bytes in memory, not a one-shot stream."""
    return isinstance(request.stream, httpx.ByteStream) or hasattr(request, "_content")


class ResilientTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that runs every request through a resilience pipeline.

    ``transport`` is the transport actually sending (default ``httpx.AsyncHTTPTransport()``).
    ``policy`` is an ``HttpPolicy`` used for every origin, or a function ``(key) -> HttpPolicy``
    called once per key. ``key(request)`` names the pipeline (and its breaker) a request uses:
    by default its origin, such as ``https://api.example.com:443``. ``deadline_header`` is sent
    with the remaining budget whenever a deadline is set (``None``: never send it).

    Per request, ``extensions={"resilience": {...}}`` accepts ``"retry"`` (``False``: one
    attempt; ``True``: retry even a method outside ``retry_methods``) and ``"deadline"``
    (seconds this request may take in all, retries and waits included).

    Only for ``httpx.AsyncClient``: ``httpx.Client`` needs a sync transport.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        policy: HttpPolicy | Callable[[str], HttpPolicy] | None = None,
        key: Callable[[httpx.Request], str] = origin_of,
        deadline_header: str | None = DEADLINE_HEADER,
    ) -> None:
        if transport is None:
            transport = httpx.AsyncHTTPTransport()
        elif not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(f"transport must be an httpx.AsyncBaseTransport, got {transport!r}")
        if policy is None:
            policy = HttpPolicy()
        elif not isinstance(policy, HttpPolicy) and not callable(policy):
            raise TypeError(
                f"policy must be an HttpPolicy or a function (key) -> HttpPolicy, got {policy!r}"
            )
        if not callable(key):
            raise TypeError(f"key must be a function (request) -> str, got {key!r}")
        if deadline_header is not None and (
            not isinstance(deadline_header, str) or not deadline_header
        ):
            raise TypeError(
                f"deadline_header must be a header name or None, got {deadline_header!r}"
            )
        self.transport = transport
        self.policy = policy
        self.key = key
        self.deadline_header = deadline_header
        self._origins: dict[str, _Origin] = {}
        self._send = transport.handle_async_request

    def __repr__(self) -> str:
        return f"ResilientTransport({self.transport!r})"

    def _origin(self, key: str) -> _Origin:
        policy = self.policy
        if not isinstance(policy, HttpPolicy):
            policy = policy(key)
            if not isinstance(policy, HttpPolicy):
                raise TypeError(f"the policy function returned {policy!r}, not an HttpPolicy")
        statuses = frozenset(policy.failure_statuses)
        attempt = _make_attempt(self._send, statuses, self.deadline_header)
        origin = self._origins[key] = _Origin(key, policy, attempt)
        return origin

    def pipeline_names(self) -> list[str]:
        """The keys (origins) that have a pipeline so far, sorted."""
        return sorted(self._origins)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through its origin's pipeline; see the class docstring."""
        key = self.key(request)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origin(key)
        policy = origin.policy
        allow_retry: bool | None = None
        budget: float | None = None
        overrides = request.extensions.get(_EXTENSION)
        if overrides is not None:
            allow_retry, budget = _overrides(overrides)

        send = origin.once
        if origin.retrying is not None and allow_retry is not False and _replayable(request):
            method = request.method
            if allow_retry or method in policy.retry_methods:
                send = origin.retrying
                header = policy.idempotency_header
                if (
                    header is not None
                    and method not in IDEMPOTENT_METHODS
                    and header not in request.headers
                ):
                    request.headers[header] = str(uuid.uuid4())

        discard: list[httpx.Response] = []
        token = _discard.set(discard) if send is origin.retrying else None
        try:
            try:
                if budget is not None:
                    with deadline(budget):
                        return await self._guarded(send, request, discard, key)
                if _deadline.get() is None:
                    return await send(request, discard)
                return await self._guarded(send, request, discard, key)
            finally:
                if token is not None:
                    _discard.reset(token)
        except _FailedResponse as failed:
            response = failed.response
            for other in discard:
                if other is not response:
                    await other.aclose()
            return response
        except Exception as exc:
            for other in discard:
                await other.aclose()
            error = _translate(exc, request)
            if policy.fallback is not None:
                return await policy.fallback(request, error)
            if error is exc:
                raise
            raise error from exc

    async def _guarded(
        self, send: Send, request: httpx.Request, discard: list[httpx.Response], key: str
    ) -> httpx.Response:
        """``send`` under the current deadline: fail at once if it is spent, else cap it."""
        at = _deadline.get()
        assert at is not None
        loop = asyncio.get_running_loop()
        left = at - loop.time()
        if left <= 0:
            raise DeadlineExceeded(key, max(left, 0.0), request=request)
        try:
            async with asyncio.timeout_at(at) as scope:
                return await send(request, discard)
        except TimeoutError:
            if scope.expired():
                raise DeadlineExceeded(key, left, request=request) from None
            raise

    def handle_request(self, request: httpx.Request) -> NoReturn:
        """Refuse a sync ``httpx.Client``: this transport is async-only."""
        raise TypeError(_SYNC_CLIENT)

    def __enter__(self) -> NoReturn:
        """Refuse ``with httpx.Client(transport=ResilientTransport())``: async-only."""
        raise TypeError(_SYNC_CLIENT)

    def close(self) -> None:
        """Nothing to close synchronously (a sync ``httpx.Client`` cannot use this transport)."""

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()


def _overrides(value: object) -> tuple[bool | None, float | None]:
    """Validate ``request.extensions["resilience"]``: ``(retry, deadline)``."""
    if not isinstance(value, Mapping):
        raise TypeError(f'extensions["resilience"] must be a dict, got {value!r}')
    unknown = set(value) - _EXTENSION_KEYS
    if unknown:
        raise ValueError(
            f'unknown keys in extensions["resilience"]: {sorted(map(str, unknown))}; '
            f"known: {sorted(_EXTENSION_KEYS)}"
        )
    retry = value.get("retry")
    if retry is not None and not isinstance(retry, bool):
        raise TypeError(f'extensions["resilience"]["retry"] must be a bool, got {retry!r}')
    budget = value.get("deadline")
    if budget is not None:
        _check_number('extensions["resilience"]["deadline"]', budget, zero=True)
        budget = float(budget)
    return retry, budget
