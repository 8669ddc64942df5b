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
     +-- NoHealthyEndpoint  (also resilience.NoHealthyEndpointError)
     +-- Throttled          (also resilience.ThrottledError)
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
import math
import random
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NoReturn

from ._deadline import (
    CRITICALITY_HEADER,
    DEADLINE_HEADER,
    _deadline,
    check_deadline_header,
    deadline,
    format_budget,
    get_criticality,
    missing_extra,
    remaining,
)
from ._endpoints import HealthSource, Load, eligible, pick
from ._policies import limits
from .health import http_check

try:
    import httpx
except ImportError as exc:  # pragma: no cover - tested in a fresh interpreter
    raise ImportError(missing_extra("httpx", "httpx")) from exc
from tenacity import RetryCallState

from resilience import (
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    Clock,
    CountWindow,
    HealthCheck,
    Hedge,
    Listener,
    NoHealthyEndpointError,
    Pipeline,
    Policy,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    ResilienceTimeoutError,
    Retry,
    RetryBudget,
    Store,
    SystemClock,
    Throttle,
    ThrottledError,
    TimedOut,
    Timeout,
    TimeWindow,
    select,
)
from resilience.checks import check_bool, check_int, check_name, check_seconds
from resilience.policies.throttle import default_accepted

__all__ = [
    "DEADLINE_HEADER",
    "FAILURE_STATUSES",
    "IDEMPOTENT_METHODS",
    "MAX_RETRY_AFTER",
    "AttemptTimeout",
    "BulkheadFull",
    "CircuitOpen",
    "DeadlineExceeded",
    "HealthSource",
    "HttpPolicy",
    "NoHealthyEndpoint",
    "RateLimited",
    "Rejected",
    "ResilientTransport",
    "Throttled",
    "deadline",
    "http_check",
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
#
# Each adapter error is its core error mixed with an httpx error. The core errors' constructors
# only set attributes (``args`` comes from ``BaseException.__new__``), so the core constructor
# runs as it is and httpx's public ``request`` setter attaches the request.


class _HttpxError(httpx.HTTPError):
    """What the adapter errors add to their core error: the request, as httpx sets it."""

    def _attach(self, request: httpx.Request | None) -> None:
        if request is not None:
            self.request = request

    @classmethod
    def _from(cls, core: Exception, request: httpx.Request) -> Exception:
        """This flavour of the core error ``core``: the same arguments and attributes."""
        error = cls.__new__(cls, *core.args)
        error.__dict__.update(core.__dict__)
        error.request = request
        return error


class CircuitOpen(CircuitOpenError, httpx.TransportError, _HttpxError):
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
        self._attach(request)


class BulkheadFull(BulkheadFullError, httpx.TransportError, _HttpxError):
    """Too many requests to this origin were in flight: the request was not sent."""

    def __init__(
        self, name: str, max_concurrent: int, *, request: httpx.Request | None = None
    ) -> None:
        BulkheadFullError.__init__(self, name, max_concurrent)
        self._attach(request)


class RateLimited(RateLimitedError, httpx.TransportError, _HttpxError):
    """The client-side rate limit for this origin was reached: the request was not sent."""

    def __init__(
        self, name: str, retry_after: float, *, request: httpx.Request | None = None
    ) -> None:
        RateLimitedError.__init__(self, name, retry_after)
        self._attach(request)


class NoHealthyEndpoint(NoHealthyEndpointError, httpx.TransportError, _HttpxError):
    """Every endpoint of the service is ejected: the request was not sent."""

    def __init__(
        self,
        name: str,
        retry_after: float | None,
        endpoints: int,
        *,
        request: httpx.Request | None = None,
    ) -> None:
        NoHealthyEndpointError.__init__(self, name, retry_after, endpoints)
        self._attach(request)


class Throttled(ThrottledError, httpx.TransportError, _HttpxError):
    """Client-side throttling refused the request (the origin has been refusing most
    requests lately): the request was not sent."""

    def __init__(
        self,
        name: str,
        retry_after: float,
        ratio: float,
        *,
        request: httpx.Request | None = None,
    ) -> None:
        ThrottledError.__init__(self, name, retry_after, ratio)
        self._attach(request)


class Rejected(RejectedError, httpx.TransportError, _HttpxError):
    """Another policy rejected the request (one added by a custom pipeline)."""

    def __init__(
        self, name: str, retry_after: float | None, *, request: httpx.Request | None = None
    ) -> None:
        RejectedError.__init__(self, name, retry_after)
        self._attach(request)


class AttemptTimeout(ResilienceTimeoutError, httpx.TimeoutException, _HttpxError):
    """An attempt took longer than the policy's ``timeout`` (and no retry was left)."""

    def __init__(self, name: str, seconds: float, *, request: httpx.Request | None = None) -> None:
        ResilienceTimeoutError.__init__(self, name, seconds)
        self._attach(request)


class DeadlineExceeded(ResilienceTimeoutError, httpx.TimeoutException, _HttpxError):
    """The request's deadline (``x-deadline-ms``, ``deadline()`` or ``total_timeout``) ran out."""

    def __init__(self, name: str, seconds: float, *, request: httpx.Request | None = None) -> None:
        ResilienceTimeoutError.__init__(self, name, seconds)
        self._attach(request)

    def __str__(self) -> str:
        return f"deadline exceeded for {self.name!r}"


# The one table from core errors to their httpx flavour, most specific first (as httpx maps
# httpcore's errors in ``map_httpcore_exceptions``).
_ERRORS: tuple[tuple[type[ResilienceError], type[_HttpxError]], ...] = (
    (CircuitOpenError, CircuitOpen),
    (BulkheadFullError, BulkheadFull),
    (RateLimitedError, RateLimited),
    (NoHealthyEndpointError, NoHealthyEndpoint),
    (ThrottledError, Throttled),
    (RejectedError, Rejected),
    (ResilienceTimeoutError, AttemptTimeout),
)


def _translate(exc: Exception, request: httpx.Request) -> Exception:
    """The httpx flavour of a core error (``exc`` itself if it has none)."""
    if isinstance(exc, httpx.HTTPError):  # an httpx error already (DeadlineExceeded included)
        return exc
    for core, flavour in _ERRORS:
        if isinstance(exc, core):
            return flavour._from(exc, request)
    return exc


# --- the template -------------------------------------------------------------------------

FALLBACK_ON = frozenset({"rejections", "failures", "both"})
"""The values of ``HttpPolicy.fallback_on``."""

TOTAL_TIMEOUT_FACTOR = 1.5
"""The default ``total_timeout`` is this many times ``timeout`` (1.5 s for the default 1 s)."""


class _Auto(float):
    """The default ``total_timeout``: worked out from ``timeout`` when the policy is made."""

    def __repr__(self) -> str:
        return "<timeout x 1.5>"


_AUTO_TOTAL = _Auto(-1.0)

MAX_RETRY_AFTER = 86_400.0
"""``parse_retry_after`` never returns more than this many seconds (one day)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpPolicy:
    """What each origin's pipeline is built from; plain, immutable, validated on creation.

    Retry: ``attempts`` (the first included; 1 turns retry off), backoff ``wait`` (a tenacity
    wait strategy; default: exponential from 0.1 s, capped at 5 s, with jitter), a
    ``Retry-After`` header on a failing response replaces the backoff; ``retry_after_max``
    caps the time one request spends waiting on ``Retry-After`` headers, all retries together
    (a header asking for more than is left ends retrying). Only ``retry_methods`` are retried;
    a request of a non-idempotent method that may be sent more than once (retried, hedged,
    failed over) gets an ``idempotency_header`` before its first attempt (a fresh UUID, the
    same on every attempt) unless it has one already (``None``: add nothing).
    ``retry_budget`` (a ``RetryBudget``) caps retries gRPC-style across every request sharing
    it (fleet-wide with a store).

    ``total_timeout``: the most one request may take, every attempt, backoff and
    ``Retry-After`` wait included (``None``: no overall limit; by default 1.5 times
    ``timeout``, so 1.5 s, and no limit when ``timeout`` is ``None``). It is the request's
    deadline (a caller's sooner deadline wins), so it is also what ``x-deadline-ms`` forwards.
    ``timeout`` limits each attempt, up to the response headers (``None``: no limit).

    Failures: transport errors, attempt timeouts, attempts cut by the request's deadline and
    responses whose status is in ``failure_statuses``. Circuit breaker
    (``circuit_breaker=False`` removes it): ``failure_ratio``, ``minimum_calls``, ``window``,
    ``open_for``, ``open_for_max``, ``half_open_calls``, as for ``CircuitBreaker``. The
    defaults (1 s attempts, half of the calls of the last second failed, 10 calls at least)
    notice an upstream that stops answering about a second into the hang at tens of requests
    per second; see docs/httpx.md for the trade-offs. ``health_path``: each origin is checked
    by a ``HealthCheck`` GETting that path on it every ``health_interval`` seconds (through
    ``store`` when there is one: one replica checks for the fleet), bound to its breaker
    (``CircuitBreaker(health=...)``: the check probes for the open breaker; with endpoints it
    is also the endpoint's health source); made with the origin's pipeline, stopped with the
    transport. Rate limiter when ``rate`` is set (``rate``
    requests per ``per`` seconds, bursts of ``burst``). Bulkhead when ``max_concurrent`` is
    set (``max_waiting``, ``max_wait`` as for ``Bulkhead``). ``throttle=True``: client-side
    adaptive throttling (``Throttle(k=throttle_k, window=throttle_window)``), where a 429 or
    503 answer counts as a refusal. ``hedge_delay`` (seconds, or a learned quantile such as
    ``"p95"``; ``None``: no hedging): an idempotent request (one of ``retry_methods``) that
    has not answered after that long is sent once more (``max_hedges`` times at most), to
    another endpoint when there are several; the first answer wins, within ``hedge_budget``
    (hedges per request, over a sliding minute).

    ``fallback(request, error)``, an async function, answers instead of the transport:
    ``fallback_on="rejections"`` when the request was not sent (open breaker, full bulkhead,
    rate limit), ``"failures"`` when it was sent and failed (an exception, or a failing status
    once attempts ran out: ``error`` is then an ``httpx.HTTPStatusError``), ``"both"``.
    Breakers live in ``store`` (breakers with the same origin and store share state;
    ``RedisStore`` shares them across replicas), and so does the rate limiter. ``clock`` and
    ``listeners`` go to every policy.
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
    minimum_calls: int = 10
    window: CountWindow | TimeWindow = field(default_factory=lambda: TimeWindow(1.0))
    open_for: float = 5.0
    open_for_max: float | None = None  # = open_for: a fixed open time
    half_open_calls: int = 1
    rate: float | None = None
    per: float = 1.0
    burst: int | None = None
    timeout: float | None = 1.0
    total_timeout: float | None = _AUTO_TOTAL
    max_concurrent: int | None = None
    max_waiting: int = 0
    max_wait: float | None = None
    throttle: bool = False
    throttle_k: float = 2.0
    throttle_window: float = 120.0
    hedge_delay: float | str | None = None
    max_hedges: int = 1
    hedge_budget: float = 0.1
    health_path: str | None = None
    health_interval: float = 5.0
    fallback: FallbackHandler | None = None
    fallback_on: str = "both"
    store: Store | None = None
    clock: Clock | None = None
    listeners: tuple[Listener, ...] = ()

    def __post_init__(self) -> None:
        check_int("attempts", self.attempts)
        check_bool("circuit_breaker", self.circuit_breaker)
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
        if isinstance(self.failure_statuses, str) or not isinstance(
            self.failure_statuses, Collection
        ):
            raise TypeError(
                f"failure_statuses must be a collection of int, got {self.failure_statuses!r}"
            )
        for s in self.failure_statuses:
            if isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599:
                raise ValueError(f"failure_statuses must hold HTTP statuses (100-599), got {s!r}")
        object.__setattr__(self, "failure_statuses", frozenset(self.failure_statuses))
        check_seconds("retry_after_max", self.retry_after_max, zero=True)
        attempt = check_seconds("timeout", self.timeout, none=True)
        if self.total_timeout is _AUTO_TOTAL:
            derived = None if attempt is None else attempt * TOTAL_TIMEOUT_FACTOR
            object.__setattr__(self, "total_timeout", derived)
        total = check_seconds("total_timeout", self.total_timeout, none=True)
        if total is not None and attempt is not None and attempt > total:
            raise ValueError(
                f"timeout ({attempt:g}s per attempt) must not exceed total_timeout "
                f"({total:g}s for the whole request): the attempt timeout could never expire"
            )
        if self.idempotency_header is not None and (
            not isinstance(self.idempotency_header, str) or not self.idempotency_header
        ):
            raise TypeError(
                f"idempotency_header must be a header name or None, got {self.idempotency_header!r}"
            )
        if self.fallback is not None and not callable(self.fallback):
            raise TypeError(f"fallback must be an async function or None, got {self.fallback!r}")
        if not isinstance(self.fallback_on, str) or self.fallback_on not in FALLBACK_ON:
            raise ValueError(
                f"fallback_on must be one of {sorted(FALLBACK_ON)}, got {self.fallback_on!r}"
            )
        if self.store is not None and not isinstance(self.store, Store):
            raise TypeError(f"store must be a resilience Store or None, got {self.store!r}")
        if isinstance(self.listeners, (str, bytes)):
            raise TypeError(f"listeners must be a collection of callables, got {self.listeners!r}")
        if not isinstance(self.listeners, tuple):
            object.__setattr__(self, "listeners", tuple(self.listeners))
        check_bool("throttle", self.throttle)
        if self.health_path is not None:
            if not isinstance(self.health_path, str):
                raise TypeError(
                    f"health_path must be a path such as '/healthz', got {self.health_path!r}"
                )
            if not self.health_path.startswith("/"):
                raise ValueError(
                    f"health_path must be a path starting with '/', got {self.health_path!r}"
                )
            if not self.circuit_breaker:
                raise ValueError(
                    "health_path needs circuit_breaker=True: the check is bound to the breaker"
                )
        check_seconds("health_interval", self.health_interval)
        # the policies validate everything else, with their own clear errors (built without
        # the store, so validating never creates anything in a shared store)
        _build_policies(self, "validation", validating=True)
        _build_hedge(self, "validation", validating=True)


# --- per-origin pipelines -----------------------------------------------------------------


class _FailedResponse(Exception):
    """A response with a failing status, raised inside the pipeline so policies see a failure."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


async def _close_discarded(state: RetryCallState) -> None:
    """Retry's ``before_sleep``: close the responses a retry is about to throw away.

    Retry calls it only once it has decided to call again, so this is exactly when every
    response the request got so far is known to be discarded; closing them then frees their
    connections during the wait. The attempt's second argument is the request's ``_Exchange``.
    """
    exchange: _Exchange = state.args[1]
    await exchange.close()


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date), or ``None``.

    Never raises: a date in the past gives 0, anything unparsable (or out of any calendar)
    gives ``None``, and a wait longer than ``MAX_RETRY_AFTER`` is cut to it.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER) if len(value) < 16 else MAX_RETRY_AFTER
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=UTC)
        now = datetime.now(UTC) if now is None else now
        seconds = (when - now).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if not math.isfinite(seconds):  # pragma: no cover - timedelta is always finite
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _is_failure(exc: Exception) -> bool:
    """What the breaker counts: transport errors, failing statuses, attempt timeouts, and an
    attempt cut by the request's deadline (``DeadlineExceeded`` raised by ``attempt``: a
    hang is a failure whichever timer noticed it)."""
    if isinstance(exc, (_FailedResponse, httpx.TransportError)):
        return not isinstance(exc, RejectedError)
    return isinstance(exc, ResilienceTimeoutError)


def _not_failure(exc: Exception) -> bool:
    return not _is_failure(exc)


def _retryable(exc: Exception) -> bool:
    """What Retry tries again: a failure, unless the request's deadline is spent."""
    return _is_failure(exc) and not isinstance(exc, DeadlineExceeded)


def _retry_wait(base: WaitStrategy, cap: float) -> WaitStrategy:
    """The backoff, or the failing response's ``Retry-After`` within what is left of ``cap``.

    A ``Retry-After`` asking for more than is left of ``cap`` (the request's total
    ``Retry-After`` allowance) gives an infinite wait, which ``_stop`` turns into "no retry".
    """

    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, _FailedResponse):
            after = parse_retry_after(error.response.headers.get("retry-after"))
            if after is not None:
                left = cap - state.idle_for
                if after <= left:
                    return after
                return left if left > 0 else math.inf
        return base(state)

    return wait


def _stop(state: RetryCallState) -> bool:
    """Stop retrying when the wait is refused, or would outlast the request's deadline."""
    upcoming = state.upcoming_sleep or 0.0
    if upcoming == math.inf:
        return True
    left = remaining()
    return left is not None and upcoming >= left


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
    policy: HttpPolicy,
    name: str,
    *,
    validating: bool = False,
    health: HealthCheck | None = None,
) -> tuple[Retry | None, list[Policy]]:
    """The Retry (or ``None``) and the policies inside it, outermost first."""
    inner = _build_inner(policy, name, validating=validating, health=health)
    return _build_retry(policy, name), inner


def _build_retry(policy: HttpPolicy, name: str) -> Retry | None:
    """The policy's Retry, or ``None`` when ``attempts`` is 1."""
    base = _backoff(policy.wait)
    if policy.attempts == 1:
        return None
    return Retry(
        on=_retryable,
        attempts=policy.attempts,
        wait=_retry_wait(base, policy.retry_after_max),
        stop=_stop,
        budget=policy.retry_budget,
        before_sleep=_close_discarded,
        name=name,
        clock=policy.clock,
        listeners=policy.listeners,
    )


def _build_inner(
    policy: HttpPolicy,
    name: str,
    *,
    validating: bool = False,
    health: HealthCheck | None = None,
) -> list[Policy]:
    """The policies inside the Retry, outermost first: breaker (bound to ``health``), rate
    limiter, timeout, bulkhead."""
    store = None if validating else policy.store
    clock = policy.clock
    listeners = policy.listeners
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
                health=health,
            )
        )
    limited = limits(
        name,
        rate=policy.rate,
        per=policy.per,
        burst=policy.burst,
        timeout=policy.timeout,
        max_concurrent=policy.max_concurrent,
        max_waiting=policy.max_waiting,
        max_wait=policy.max_wait,
        store=store,
        clock=clock,
        listeners=listeners,
    )
    if policy.throttle:  # after the rate limiter, before the attempt's timeout
        at = 1 if policy.rate is not None else 0
        throttle = Throttle(
            k=policy.throttle_k,
            window=policy.throttle_window,
            accepted_if=_accepted,
            store=store,
            name=f"{name}:throttle",
            clock=clock,
            listeners=listeners,
        )
        limited.insert(at, throttle)
    return inner + limited


def _accepted(exc: Exception) -> bool:
    """Whether the server accepted a request that ended in ``exc`` (429 and 503: refused)."""
    if isinstance(exc, _FailedResponse) and exc.response.status_code in (429, 503):
        return False
    return default_accepted(exc)


def _build_hedge(policy: HttpPolicy, name: str, *, validating: bool = False) -> Hedge | None:
    """The policy's Hedge, or ``None`` without ``hedge_delay``."""
    if policy.hedge_delay is None:
        return None
    return Hedge(
        delay=policy.hedge_delay,
        max_hedges=policy.max_hedges,
        budget=policy.hedge_budget,
        store=None if validating else policy.store,
        name=f"{name}:hedge",
        clock=policy.clock,
        listeners=policy.listeners,
    )


class _Exchange:
    """One request on its way through its pipeline (every attempt gets it, hedges included).

    ``responses``: what the wrapped transport answered it so far. All but the response the
    request returns are closed: before a retry's backoff (``_close_discarded``), when the
    request ends (``end``), and at once for one arriving after that (a hedge's loser), so
    whichever way a request ends, no connection stays held.

    The request's deadline, for ``attempt`` to tell a cut by the deadline from a
    cancellation: ``due`` on ``clock`` when it is our own ``total_timeout`` (enforced by the
    pipeline's outer ``Timeout``), else the loop-time deadline in ``_deadline``. ``cut``:
    an attempt was cut by it. ``cancelling``: the task's cancellation count when it began.
    ``busy``: with hedging, the endpoints its attempts went to.
    """

    __slots__ = (
        "busy",
        "cancelling",
        "clock",
        "cut",
        "due",
        "name",
        "over",
        "responses",
        "seconds",
        "task",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.responses: list[httpx.Response] = []
        self.over = False  # the request has ended: a late answer is a loser's
        self.busy: set[int] | None = None
        self.due: float | None = None
        self.clock: Clock | None = None
        self.seconds = 0.0  # the request's budget, for DeadlineExceeded
        self.cut = False
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.cancelling = task.cancelling()

    async def close(self, kept: httpx.Response | None = None) -> None:
        """Close every response kept so far but ``kept``."""
        responses, self.responses = self.responses, []
        for response in responses:
            if response is not kept:
                await response.aclose()

    async def end(self, returned: httpx.Response | None) -> None:
        """The request returns ``returned`` (or nothing): close all the others."""
        self.over = True
        await self.close(returned)

    def past_deadline(self, at: float | None) -> bool:
        """Whether the request's deadline (``at`` on the loop's clock) has passed."""
        if at is not None and asyncio.get_running_loop().time() >= at:
            return True
        return (
            self.due is not None and self.clock is not None and self.clock.monotonic() >= self.due
        )

    def cancelled(self) -> bool:
        """Whether a cancellation other than the deadline's own is pending on the request."""
        return self.task.cancelling() > self.cancelling


Send = Callable[[httpx.Request, _Exchange], Awaitable[httpx.Response]]


def _make_attempt(
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    statuses: frozenset[int],
    header: str | None,
) -> Send:
    """One try: send; keep the response for the request's ``_Exchange`` and turn a failing
    status into an exception the policies see.

    The boundary with the wrapped transport: what it raises that is not an httpx error is
    translated here, once (``_transport_error``), so the breaker counts it and
    ``except httpx.HTTPError`` catches it. An attempt cancelled once the request's deadline
    has passed was cut by it: it raises ``DeadlineExceeded``, a failure for the breaker
    below which it ran (a cancellation that is not the deadline's still wins at the
    transport's boundary: see ``_through``).
    """

    async def attempt(request: httpx.Request, exchange: _Exchange) -> httpx.Response:
        at = _deadline.get()
        if header is not None and at is not None:
            request.headers[header] = format_budget(at - asyncio.get_running_loop().time())
        level = get_criticality()  # the request being served: its class goes downstream
        if level is not None and CRITICALITY_HEADER not in request.headers:
            request.headers[CRITICALITY_HEADER] = level
        try:
            response = await send(request)
        except asyncio.CancelledError:
            if not exchange.past_deadline(at):
                raise
            exchange.cut = True
            raise DeadlineExceeded(exchange.name, exchange.seconds, request=request) from None
        except httpx.HTTPError:
            raise
        except Exception as exc:
            error = _transport_error(exc, request)
            if error.__traceback__ is None:  # made here: the foreign error is its cause
                raise error from exc
            raise error from error.__cause__  # an httpx error a task group wrapped, as it was
        if exchange.over:  # a hedge's loser, answered after the request ended
            await response.aclose()
        else:
            exchange.responses.append(response)
        if response.status_code in statuses:
            raise _FailedResponse(response)
        return response

    return attempt


def _transport_error(exc: Exception, request: httpx.Request) -> httpx.HTTPError:
    """What the wrapped transport raised, as an httpx error. A task group's wrapper around
    one error is taken off (an ``httpx.ConnectError`` inside stays a connect error);
    anything else not httpx's becomes an ``httpx.TransportError`` naming it."""
    inner: BaseException = exc
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    if isinstance(inner, httpx.HTTPError):
        return inner
    return httpx.TransportError(f"{type(inner).__name__}: {inner}", request=request)


_KEPT = frozenset({CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.FORCED_OPEN})


class _Senders:
    """The two protected senders of one pipeline: with retry and without.

    With a ``total_timeout``, both start with a ``Timeout`` of that many seconds, outside the
    retry (the overall deadline of DESIGN's composition): one timer per policy, not one per
    request. Its expiry is reported as ``DeadlineExceeded``.
    """

    __slots__ = ("clock", "hedged", "name", "once", "policy", "retrying", "total")

    fails_over = False  # whether one attempt may go to more than one endpoint

    def __init__(
        self, name: str, policy: HttpPolicy, retry: Retry | None, inner: list[Policy], attempt: Send
    ) -> None:
        self.name = name
        self.policy = policy
        self.clock: Clock = SystemClock() if policy.clock is None else policy.clock
        outer: list[Policy] = []
        self.total: str | None = None
        if policy.total_timeout is not None:
            self.total = f"{name} (total_timeout)"
            total = Timeout(
                policy.total_timeout,
                name=self.total,
                clock=self.clock,
                # its expiry only: a CallFinished per request would repeat the retry's
                listeners=[select(listener, events=(TimedOut,)) for listener in policy.listeners],
            )
            outer.append(total)
        chain = [*outer, *inner]
        self.once: Send = Pipeline(*chain, name=name)(attempt) if chain else attempt
        self.retrying: Send | None = None
        if retry is not None:
            self.retrying = Pipeline(*outer, retry, *inner, name=name)(attempt)
        self.hedged: Send | None = None  # idempotent requests, when hedging is asked for
        hedge = _build_hedge(policy, name)
        if hedge is not None:
            retrying = [] if retry is None else [retry]
            chain = [*outer, *retrying, hedge, *inner]
            self.hedged = _hedged(Pipeline(*chain, name=name)(_own_copy(attempt)))

    def sender(self, request: httpx.Request, retry: bool | None) -> Send:
        """The sender for ``request`` (``retry``: the per-request override).

        The one place the idempotency key is set: a request of a non-idempotent method that
        the chosen sender may send more than once (retried, hedged, failed over to another
        endpoint) gets it here, before its first attempt, so every attempt carries the same
        key and the server can tell the copies of one request apart from new requests.
        """
        policy = self.policy
        send = self.once
        if retry is not False and _replayable(request):
            idempotent = request.method in policy.retry_methods
            if self.hedged is not None and idempotent:
                send = self.hedged
            elif self.retrying is not None and (retry or idempotent):
                send = self.retrying
        header = policy.idempotency_header
        if (
            header is not None
            and (send is not self.once or self.fails_over)
            and request.method not in IDEMPOTENT_METHODS
            and header not in request.headers
        ):
            request.headers[header] = str(uuid.uuid4())
        return send

    def checks(self) -> list[HealthCheck]:
        """The health checks of this pipeline's origins (started, or to start)."""
        return []


def _own_copy(attempt: Send) -> Send:
    """``attempt`` on a copy of the request: hedged attempts run at once, and each points
    its request at an endpoint and sets its own deadline header."""

    async def copied(request: httpx.Request, exchange: _Exchange) -> httpx.Response:
        copy = httpx.Request(
            request.method,
            request.url,
            headers=request.headers.copy(),
            stream=request.stream,
            extensions=dict(request.extensions),
        )
        return await attempt(copy, exchange)

    return copied


def _hedged(send: Send) -> Send:
    """``send`` for a hedged request: its attempts note the endpoints they go to."""

    async def hedged(request: httpx.Request, exchange: _Exchange) -> httpx.Response:
        exchange.busy = set()
        return await send(request, exchange)

    return hedged


class _Origin(_Senders):
    """The senders of one origin, its health check, and whether it may be forgotten."""

    __slots__ = ("breaker", "bulkhead", "health")

    def __init__(
        self, name: str, policy: HttpPolicy, attempt: Send, health: HealthCheck | None
    ) -> None:
        retry, inner = _build_policies(policy, name, health=health)
        self.health = health
        self.breaker: CircuitBreaker | None = None
        self.bulkhead: Bulkhead | None = None
        for p in inner:
            if isinstance(p, CircuitBreaker):
                self.breaker = p
            elif isinstance(p, Bulkhead):
                self.bulkhead = p
        super().__init__(name, policy, retry, inner, attempt)

    def evictable(self) -> bool:
        """Whether forgetting this pipeline loses nothing: no open breaker, nothing in flight."""
        breaker, bulkhead = self.breaker, self.bulkhead
        if breaker is not None and breaker.state in _KEPT:
            return False
        return bulkhead is None or (bulkhead.in_flight == 0 and bulkhead.waiting == 0)

    def checks(self) -> list[HealthCheck]:
        """This origin's health check, if it has one."""
        return [] if self.health is None else [self.health]


def origin_of(request: httpx.Request) -> str:
    """The default pipeline key: ``scheme://host:port`` with the port always spelled out."""
    return _origin(request.url)


def _origin(url: httpx.URL) -> str:
    port = url.port
    if port is None:
        port = 443 if url.scheme == "https" else 80
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{port}"


# --- several endpoints of one service -------------------------------------------------------


def _endpoint_url(value: object) -> httpx.URL:
    """An endpoint's base URL: ``http(s)://host[:port]`` and nothing else."""
    if not isinstance(value, str):
        raise TypeError(f"endpoints must hold base URLs (str), got {value!r}")
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"endpoint {value!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"an endpoint must be an http:// or https:// URL, got {value!r}")
    if url.path not in ("", "/") or url.query or url.fragment or url.userinfo:
        raise ValueError(
            f"an endpoint is scheme://host[:port] only (no path, query, fragment or "
            f"credentials), got {value!r}"
        )
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"an endpoint's port must be in 1..65535, got {value!r}")
    return url


def _not_sent(exc: Exception) -> bool:
    """Whether a transport error proves the request never left: no connection was made."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


class _Endpoint:
    """One endpoint of a service: its own breaker and limits, its load, its health source."""

    __slots__ = (
        "breaker",
        "check",
        "ejected",
        "health",
        "host",
        "load",
        "name",
        "netloc",
        "port",
        "scheme",
        "send",
    )

    def __init__(
        self,
        url: httpx.URL,
        name: str,
        policy: HttpPolicy,
        attempt: Send,
        health: HealthSource | None,
        check: HealthCheck | None,
    ) -> None:
        self.scheme = url.scheme
        self.host = url.host
        self.port = url.port
        self.netloc = url.netloc.decode("ascii")
        self.name = name
        self.check = check  # the policy's health check of this endpoint, bound to its breaker
        self.health = check if health is None else health
        self.load = Load()
        self.ejected = False  # by its breaker, when last looked at
        inner = _build_inner(policy, name, health=check)
        self.breaker: CircuitBreaker | None = None
        for p in inner:
            if isinstance(p, CircuitBreaker):
                self.breaker = p
        self.send: Send = Pipeline(*inner, name=name)(attempt) if inner else attempt

    def route(self, request: httpx.Request) -> None:
        """Point ``request`` at this endpoint: its scheme, host and port, and its Host header."""
        request.url = request.url.copy_with(scheme=self.scheme, host=self.host, port=self.port)
        request.headers["Host"] = self.netloc

    def tripped(self) -> tuple[bool, float | None]:
        """Whether the breaker rejects calls now, and for how long (``None``: until reset).

        An endpoint coming back from its breaker's ejection has its load forgotten: the
        latency that ejected it says nothing of it now, and a clean slate lets the probe
        through instead of leaving it to fade for tens of seconds.
        """
        breaker = self.breaker
        if breaker is None:
            return False, None
        out, after = False, None
        state = breaker.state
        if state is CircuitState.FORCED_OPEN:
            out = True
        elif state is CircuitState.OPEN:  # past its open time, the next call is a probe
            after = breaker.metrics().retry_after
            out = bool(after)
            if not out:
                after = None
        if self.ejected and not out:
            self.load.forget()
        self.ejected = out
        return out, after

    def unhealthy(self) -> bool:
        """Whether the health source says no (one that raises says no as well)."""
        if self.health is None:
            return False
        try:
            return not self.health.healthy
        except Exception:
            return True


class _Service(_Senders):
    """The senders of a service with several endpoints.

    ``Total timeout -> Retry -> failover``, where failover chooses an endpoint (eligibility,
    then P2C) and sends through that endpoint's own ``CircuitBreaker -> RateLimiter ->
    Timeout -> Bulkhead``. Within one attempt a request that was not sent (a rejection by the
    endpoint's policies, a connect error) goes on to another endpoint at once, each endpoint
    at most once; any other outcome ends the attempt and is the Retry's to judge.
    """

    __slots__ = ("endpoints", "fails_over", "max_ejected", "rng", "started")

    def __init__(
        self,
        name: str,
        policy: HttpPolicy,
        endpoints: list[_Endpoint],
        max_ejected: float,
        rng: random.Random,
    ) -> None:
        self.endpoints = endpoints
        self.max_ejected = max_ejected
        self.rng = rng
        self.fails_over = len(endpoints) > 1
        self.started = False  # the endpoints' health checks run (from the first request on)
        super().__init__(name, policy, _build_retry(policy, name), [], self._attempt)

    def checks(self) -> list[HealthCheck]:
        """The endpoints' health checks."""
        return [e.check for e in self.endpoints if e.check is not None]

    def start(self) -> None:
        """Start the endpoints' health checks (on the first request: a running loop)."""
        self.started = True
        for check in self.checks():
            check.start()

    def _choose(self, tried: list[int], now: float) -> tuple[int | None, float | None, int]:
        """An endpoint not yet ``tried`` (or ``None``), the soonest probe time, how many are out.

        An endpoint tried already in this attempt counts as ejected.
        """
        tripped: list[bool] = []
        unhealthy: list[bool] = []
        scores: list[float] = []
        soonest: float | None = None
        for i, endpoint in enumerate(self.endpoints):
            out, after = endpoint.tripped()
            if after is not None and (soonest is None or after < soonest):
                soonest = after
            tripped.append(out or i in tried)
            unhealthy.append(endpoint.unhealthy())
            scores.append(endpoint.load.score(now))
        candidates = eligible(tripped, unhealthy, scores, self.max_ejected)
        if not candidates:
            return None, soonest, len(tripped)
        return pick(candidates, scores, self.rng), soonest, 0

    async def _attempt(self, request: httpx.Request, exchange: _Exchange) -> httpx.Response:
        loop = asyncio.get_running_loop()
        tried: list[int] = []
        unsent: Exception | None = None  # the last connect error of this attempt
        waits: list[float] = []  # the rejections' retry_after hints
        busy = exchange.busy  # hedged: the endpoints the request's other attempts are on
        while True:
            index, soonest, out = None, None, 0
            if busy:  # a hedge goes to another endpoint when there is one
                index, soonest, out = self._choose([*tried, *busy], loop.time())
            if index is None:
                index, soonest, out = self._choose(tried, loop.time())
            if index is None:
                if unsent is not None:
                    raise unsent
                if soonest is not None:
                    waits.append(soonest)
                raise NoHealthyEndpointError(self.name, min(waits, default=None), out)
            endpoint = self.endpoints[index]
            tried.append(index)
            endpoint.route(request)
            load = endpoint.load
            load.in_flight += 1
            start = loop.time()
            if busy is not None:
                busy.add(index)
            try:
                response = await endpoint.send(request, exchange)
            except RejectedError as rejected:  # by the endpoint's own policies: not sent
                load.in_flight -= 1
                if rejected.retry_after is not None:
                    waits.append(rejected.retry_after)
                continue
            except Exception as exc:
                load.in_flight -= 1
                end = loop.time()
                load.observe(end - start, end, failed=True)
                if not _not_sent(exc) or not await self._may_fail_over():
                    raise
                unsent = exc
                continue
            except BaseException:  # cancelled: no outcome, but it took at least this long
                load.in_flight -= 1
                end = loop.time()
                load.outlasted(end - start, end)
                raise
            load.in_flight -= 1
            end = loop.time()
            load.observe(end - start, end)
            return response

    async def _may_fail_over(self) -> bool:
        """After a connect error: whether the deadline and the retry budget allow another try."""
        left = remaining()
        if left is not None and left <= 0:
            return False
        budget = self.policy.retry_budget
        return budget is None or await budget.allow_retry()


def _replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again: bytes in memory, not a one-shot stream."""
    return isinstance(request.stream, httpx.ByteStream) or hasattr(request, "_content")


_EVICTION_SCAN = 16  # origins looked at per eviction, oldest first


class ResilientTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that runs every request through a resilience pipeline.

    ``transport`` is the transport actually sending (default ``httpx.AsyncHTTPTransport()``).
    ``policy`` is an ``HttpPolicy`` used for every origin, or a function ``(key) -> HttpPolicy``
    called once per key. ``key(request)`` names the pipeline (and its breaker) a request uses:
    by default its origin, such as ``https://api.example.com:443``. ``deadline_header`` is sent
    with the remaining budget whenever a deadline is set (``None``: never send it).

    At most ``max_origins`` pipelines are kept, the least recently used forgotten first; an
    origin whose breaker is open or half-open, or with requests in flight, is never forgotten
    (so the bound may be passed while more origins than that are failing at once).

    Per request, ``extensions={"resilience": {...}}`` accepts ``"retry"`` (``False``: one
    attempt; ``True``: retry even a method outside ``retry_methods``) and ``"deadline"``
    (seconds this request may take in all, retries and waits included).

    Several endpoints of one service: ``service="orders", endpoints=["http://10.0.0.1:8000",
    ...]`` sends every request to one of them (its scheme, host, port and ``Host`` header
    replaced by the endpoint's). Each endpoint has its own breaker and limits, named
    ``<service>:<endpoint origin>``; the retry and ``total_timeout`` are the service's. An
    endpoint is ejected while its breaker is open or its ``health[endpoint].healthy`` is
    false, but health sources keep at most ``max_ejected`` of the endpoints out (at least
    one when it is above 0, as Envoy does); of the others two are drawn at random (``rng``)
    and the less loaded one is used (P2C). A
    request not sent (a connect error, a rejection by the endpoint's policies) goes on to
    another endpoint at once, whatever its method, within the deadline and the retry budget.
    When every endpoint is ejected: ``NoHealthyEndpoint``. See ``docs/httpx.md``.

    Whatever the wrapped transport raises leaves as an ``httpx.HTTPError``: its own errors
    as they are, any other (an ``ExceptionGroup`` from a task group, an ``OSError``) as an
    ``httpx.TransportError`` naming it, its cause the original. ``aclose()`` stops the
    health checks and closes the wrapped transport.

    Only for ``httpx.AsyncClient``: ``httpx.Client`` needs a sync transport.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        policy: HttpPolicy | Callable[[str], HttpPolicy] | None = None,
        key: Callable[[httpx.Request], str] = origin_of,
        deadline_header: str | None = DEADLINE_HEADER,
        max_origins: int = 1024,
        service: str | None = None,
        endpoints: Sequence[str] | None = None,
        health: Mapping[str, HealthSource] | None = None,
        max_ejected: float = 0.5,
        rng: random.Random | None = None,
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
        self.transport = transport
        self.policy = policy
        self.key = key
        self.deadline_header = check_deadline_header(deadline_header)
        self.max_origins = check_int("max_origins", max_origins)
        self._origins: OrderedDict[str, _Origin] = OrderedDict()
        self._send = transport.handle_async_request
        self._service: _Service | None = None
        if endpoints is not None or service is not None or health is not None:
            self._service = self._endpoints(service, endpoints, health, max_ejected, rng)

    def _endpoints(
        self,
        service: str | None,
        endpoints: Sequence[str] | None,
        health: Mapping[str, HealthSource] | None,
        max_ejected: float,
        rng: random.Random | None,
    ) -> _Service:
        """Validate the several-endpoints options and build the service's senders."""
        if endpoints is None:
            raise ValueError("service and health need endpoints=[base URL, ...]")
        if service is None:
            raise ValueError("endpoints need a service name: service='orders'")
        service = check_name(service, "service")
        if isinstance(endpoints, str) or not isinstance(endpoints, Sequence):
            raise TypeError(f"endpoints must be a list of base URLs, got {endpoints!r}")
        if not endpoints:
            raise ValueError("endpoints must not be empty")
        policy = self.policy
        if not isinstance(policy, HttpPolicy):
            raise TypeError("with endpoints, policy must be one HttpPolicy (not a function)")
        if self.key is not origin_of:
            raise ValueError("key has no use with endpoints: every request goes to the service")
        if (
            isinstance(max_ejected, bool)
            or not isinstance(max_ejected, (int, float))
            or not 0.0 <= max_ejected <= 1.0
        ):
            raise ValueError(f"max_ejected must be a share between 0 and 1, got {max_ejected!r}")
        if rng is None:
            rng = random.Random()
        elif not callable(getattr(rng, "sample", None)):
            raise TypeError(f"rng must be a random.Random or None, got {rng!r}")
        urls: dict[str, httpx.URL] = {}
        for value in endpoints:
            url = _endpoint_url(value)
            origin = _origin(url)
            if origin in urls:
                raise ValueError(f"endpoint {value!r} is given twice (as {origin})")
            urls[origin] = url
        checks: dict[str, HealthSource] = {}
        if health is not None:
            if not isinstance(health, Mapping):
                raise TypeError(
                    f"health must be a dict {{endpoint: health source}}, got {health!r}"
                )
            for value, check in health.items():
                origin = _origin(_endpoint_url(value))
                if origin not in urls:
                    raise ValueError(f"health names {value!r}, which is not one of the endpoints")
                if "healthy" not in dir(check):
                    raise TypeError(
                        f"a health source needs a 'healthy' attribute, got {check!r} for {value!r}"
                    )
                checks[origin] = check
        statuses = frozenset(policy.failure_statuses)
        attempt = _make_attempt(self._send, statuses, self.deadline_header)
        members = []
        for origin, url in urls.items():
            name = f"{service}:{origin}"
            own = self._health_check(policy, name, origin)
            members.append(_Endpoint(url, name, policy, attempt, checks.get(origin), own))
        return _Service(service, policy, members, float(max_ejected), rng)

    def _health_check(self, policy: HttpPolicy, name: str, origin: str) -> HealthCheck | None:
        """The policy's health check of ``origin`` (``health_path`` on it, through the wrapped
        transport), named after its pipeline, or ``None``. Not started."""
        if policy.health_path is None:
            return None
        return HealthCheck(
            http_check(origin + policy.health_path, transport=self.transport),
            name=name,
            interval=policy.health_interval,
            store=policy.store,
            clock=policy.clock,
            listeners=policy.listeners,
        )

    def __repr__(self) -> str:
        return f"ResilientTransport({self.transport!r})"

    async def _origin(self, key: str, request: httpx.Request) -> _Origin:
        """The pipeline of ``key``, made for its first ``request`` (its health check, when
        the policy asks for one, checks that request's origin and starts now)."""
        policy = self.policy
        if not isinstance(policy, HttpPolicy):
            policy = policy(key)
            if not isinstance(policy, HttpPolicy):
                raise TypeError(f"the policy function returned {policy!r}, not an HttpPolicy")
        statuses = frozenset(policy.failure_statuses)
        attempt = _make_attempt(self._send, statuses, self.deadline_header)
        if len(self._origins) >= self.max_origins:
            await self._evict()
        check = self._health_check(policy, key, _origin(request.url))
        origin = self._origins[key] = _Origin(key, policy, attempt, check)
        if check is not None:
            check.start()
        return origin

    async def _evict(self) -> None:
        """Forget the least recently used pipeline that loses nothing by it (its health
        check stopped).

        Looks at a few of the oldest only (constant work per new origin); those kept for an
        open breaker or requests in flight move to the recent end.
        """
        origins = self._origins
        for _ in range(min(_EVICTION_SCAN, len(origins))):
            key, oldest = next(iter(origins.items()))
            if oldest.evictable():
                del origins[key]
                for check in oldest.checks():
                    await check.aclose()
                return
            origins.move_to_end(key)

    def pipeline_names(self) -> list[str]:
        """The keys (origins) that have a pipeline now, sorted; with endpoints, theirs."""
        if self._service is not None:
            return sorted(endpoint.name for endpoint in self._service.endpoints)
        return sorted(self._origins)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through its origin's pipeline; see the class docstring."""
        service = self._service
        origin: _Senders | None
        if service is not None:
            origin, key = service, service.name
            if not service.started:
                service.start()
        else:
            key = self.key(request)
            origins = self._origins
            origin = origins.get(key)
            if origin is None:
                origin = await self._origin(key, request)
            else:
                origins.move_to_end(key)
        allow_retry: bool | None = None
        budget: float | None = None
        overrides = request.extensions.get(_EXTENSION)
        if overrides is not None:
            allow_retry, budget = _overrides(overrides)
        send = origin.sender(request, allow_retry)
        exchange = _Exchange(key)
        response: httpx.Response | None = None
        try:
            response = await self._through(origin, send, request, exchange, budget)
            return response
        finally:
            await exchange.end(response)

    async def _through(
        self,
        origin: _Senders,
        send: Send,
        request: httpx.Request,
        exchange: _Exchange,
        budget: float | None,
    ) -> httpx.Response:
        """``send`` under the request's deadline; errors translated, fallback applied."""
        policy = origin.policy
        key = exchange.name
        total = policy.total_timeout
        try:
            if budget is not None:
                with deadline(budget):
                    return await self._guarded(send, request, exchange)
            outer = _deadline.get()
            if total is None:
                if outer is None:
                    return await send(request, exchange)
                return await self._guarded(send, request, exchange)
            at = asyncio.get_running_loop().time() + total
            if outer is not None and outer <= at:  # the caller's deadline comes first
                return await self._guarded(send, request, exchange)
            # our total_timeout is the deadline: the pipeline's outer Timeout enforces it (on
            # the policy's clock); the context variable says it to the retry's stop rule, to
            # the attempts and to the upstream
            clock = exchange.clock = origin.clock
            exchange.due = clock.monotonic() + total
            exchange.seconds = total
            token = _deadline.set(at)
            try:
                return await send(request, exchange)
            finally:
                _deadline.reset(token)
        except _FailedResponse as failed:
            response = failed.response
            if policy.fallback is not None and policy.fallback_on != "rejections":
                failure = httpx.HTTPStatusError(
                    f"{response.status_code} from {key}", request=request, response=response
                )
                await response.aclose()
                return await policy.fallback(request, failure)
            return response
        except Exception as exc:
            if exchange.cut and exchange.cancelled():
                # the deadline cut an attempt as the caller was cancelling the request too:
                # the cancellation goes on (the cut attempt was counted all the same)
                raise asyncio.CancelledError from exc
            if isinstance(exc, ResilienceTimeoutError) and exc.name == origin.total:
                error: Exception = DeadlineExceeded(key, exc.seconds, request=request)
            else:
                error = _translate(exc, request)
            if policy.fallback is not None and _falls_back(policy.fallback_on, error):
                return await policy.fallback(request, error)
            if error is exc:
                raise
            raise error from exc

    async def _guarded(
        self, send: Send, request: httpx.Request, exchange: _Exchange
    ) -> httpx.Response:
        """``send`` under the current deadline: fail at once if it is spent, else cap it."""
        at = _deadline.get()
        assert at is not None
        loop = asyncio.get_running_loop()
        left = exchange.seconds = at - loop.time()
        if left <= 0:
            raise DeadlineExceeded(exchange.name, max(left, 0.0), request=request)
        try:
            async with asyncio.timeout_at(at) as scope:
                return await send(request, exchange)
        except TimeoutError:
            if scope.expired():
                raise DeadlineExceeded(exchange.name, left, request=request) from None
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
        """Stop the health checks, close the wrapped transport."""
        senders: list[_Senders] = list(self._origins.values())
        if self._service is not None:
            senders.append(self._service)
        for origin in senders:
            for check in origin.checks():
                await check.aclose()
        await self.transport.aclose()


def _falls_back(on: str, error: Exception) -> bool:
    """Whether ``fallback_on`` covers ``error``: a rejection (not sent) or a failure (sent)."""
    if on == "both":
        return True
    rejected = isinstance(error, RejectedError)
    return rejected if on == "rejections" else not rejected


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
    budget = check_seconds(
        'extensions["resilience"]["deadline"]', value.get("deadline"), none=True, zero=True
    )
    return retry, budget
