"""``HttpPolicy``: what each origin's pipeline is built from, one option object per strategy.

As Polly v8 gives each strategy its options in one object, a policy is a few plain values
(the attempt's ``timeout``, the request's ``total_timeout``, what a failure is, where state
is shared) and one frozen, keyword-only options object per strategy: ``retry``, ``breaker``,
``rate_limit``, ``bulkhead``, ``throttle``, ``hedge``, ``health_check``, ``fallback``.
``None`` leaves a strategy out. Every option is checked when its object is made, by making
the policy it describes once (without a store): the policies' own errors name the option.

Each options object also makes its policy for a pipeline (``make_*`` below); the pipeline
decides where each goes (``_pipelines``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import httpx

from resilience import (
    Bulkhead,
    CircuitBreaker,
    Clock,
    CountWindow,
    HealthCheck,
    Hedge,
    Listener,
    RateLimiter,
    RejectedError,
    Retry,
    RetryBudget,
    Store,
    Throttle,
    Timeout,
    TimeWindow,
)
from resilience.checks import check_int, check_seconds
from resilience.events import check_listeners

from .._deadline import check_deadline_header
from ..health import http_check
from ._errors import accepted, is_failure, not_failure, retryable
from ._exchange import close_discarded
from ._retry_after import WaitStrategy, retry_wait, stop

__all__ = [
    "FAILURE_STATUSES",
    "FALLBACK_ON",
    "IDEMPOTENT_METHODS",
    "TOTAL_TIMEOUT_FACTOR",
    "BreakerOptions",
    "BulkheadOptions",
    "FallbackHandler",
    "FallbackOptions",
    "HealthCheckOptions",
    "HedgeOptions",
    "HttpPolicy",
    "RateLimitOptions",
    "RetryOptions",
    "Shared",
    "ThrottleOptions",
]

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods retried by default (RFC 9110, section 9.2.2)."""

FAILURE_STATUSES: frozenset[int] = frozenset({429, *range(500, 600)})
"""Response statuses counted as failures by default: 429 and every 5xx."""

FALLBACK_ON = frozenset({"rejections", "failures", "both"})
"""The values of ``FallbackOptions.on``."""

TOTAL_TIMEOUT_FACTOR = 1.5
"""The default ``total_timeout`` is this many times ``timeout`` (1.5 s for the default 1 s)."""

FallbackHandler = Callable[[httpx.Request, Exception], Awaitable[httpx.Response]]
"""``async def fallback(request, error) -> httpx.Response``."""


class Shared(NamedTuple):
    """What every policy of a pipeline is given (nothing while an option is checked)."""

    store: Store | None = None
    clock: Clock | None = None
    listeners: tuple[Listener, ...] = ()


_CHECKING = Shared()


@functools.cache
def _default_wait() -> WaitStrategy:
    """Retry's own default backoff, for ``RetryOptions(wait=None)``."""
    return Retry(on=Exception).wait


# --- one options object per strategy ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryOptions:
    """How a failed request is tried again.

    ``attempts``: calls per request, the first included (1 turns retrying off). ``wait``: the
    backoff, a tenacity wait strategy (``None``: exponential from 0.1 s, capped at 5 s, with
    jitter); a ``Retry-After`` header on a failing response replaces it, and
    ``retry_after_max`` caps the time one request spends waiting on those headers, all
    retries together (a header asking for more than is left ends retrying). ``budget``: a
    ``RetryBudget`` capping retries gRPC-style across every request sharing it (fleet-wide
    with a store; it also pays for failovers after a connect error). ``methods``: the methods
    retried (and hedged), case-insensitive.
    """

    attempts: int = 3
    wait: WaitStrategy | None = None
    retry_after_max: float = 30.0
    budget: RetryBudget | None = None
    methods: Collection[str] = IDEMPOTENT_METHODS

    def __post_init__(self) -> None:
        check_int("attempts", self.attempts)
        methods = self.methods
        if isinstance(methods, str) or not isinstance(methods, Collection):
            raise TypeError(f"methods must be a collection of str, got {methods!r}")
        for m in methods:
            if not isinstance(m, str) or not m:
                raise TypeError(f"methods must hold method names, got {m!r}")
        object.__setattr__(self, "methods", frozenset(m.upper() for m in methods))
        check_seconds("retry_after_max", self.retry_after_max, zero=True)
        if self.budget is not None and not isinstance(self.budget, RetryBudget):
            raise TypeError(f"budget must be a RetryBudget or None, got {self.budget!r}")
        if self.wait is not None and not callable(self.wait):
            raise TypeError(
                f"wait must be a tenacity wait strategy (a callable), got {self.wait!r}"
            )
        make_retry(self, "validation", _CHECKING)


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerOptions:
    """The origin's circuit breaker, as ``CircuitBreaker`` takes them (see its page).

    The defaults (half of the calls of the last second failed, 10 calls at least) notice an
    upstream that stops answering about a second into the hang at tens of requests per
    second; ``open_for_max`` (``None``: ``open_for``, a fixed open time) lets the open time
    double after each failed probe.
    """

    failure_ratio: float = 0.5
    minimum_calls: int = 10
    window: CountWindow | TimeWindow = field(default_factory=lambda: TimeWindow(1.0))
    open_for: float = 5.0
    open_for_max: float | None = None
    half_open_calls: int = 1

    def __post_init__(self) -> None:
        make_breaker(self, "validation", _CHECKING)


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitOptions:
    """A client-side rate limit per origin: ``rate`` requests per ``per`` seconds, bursts of
    ``burst`` (``None``: ``ceil(rate)``); shared through the policy's store."""

    rate: float
    per: float = 1.0
    burst: int | None = None

    def __post_init__(self) -> None:
        make_rate_limiter(self, "validation", _CHECKING)


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadOptions:
    """At most ``max_concurrent`` requests in flight per origin (in this process); up to
    ``max_waiting`` more wait for a slot, each at most ``max_wait`` seconds (``None``: as
    long as it takes)."""

    max_concurrent: int
    max_waiting: int = 0
    max_wait: float | None = None

    def __post_init__(self) -> None:
        make_bulkhead(self, "validation", _CHECKING)


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleOptions:
    """Client-side adaptive throttling per origin (``Throttle``): when the origin refuses
    most requests (a 429 or 503 answer counts as a refusal), refuse some here. Requests may
    reach ``k`` times the accepted ones before any is refused; ``window``: seconds counted."""

    k: float = 2.0
    window: float = 120.0

    def __post_init__(self) -> None:
        make_throttle(self, "validation", _CHECKING)


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeOptions:
    """Hedging (``Hedge``): an idempotent request (one of ``RetryOptions.methods``) with no
    answer after ``delay`` (seconds, or a learned quantile such as ``"p95"``) is sent once
    more, ``max_hedges`` times at most, to another endpoint when there are several; the
    first answer wins, within ``budget`` hedges per request over a sliding minute."""

    delay: float | str = "p95"
    max_hedges: int = 1
    budget: float = 0.1

    def __post_init__(self) -> None:
        make_hedge(self, "validation", _CHECKING)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckOptions:
    """A ``HealthCheck`` per origin that GETs ``path`` on it every ``interval`` seconds,
    through the wrapped transport, bound to the origin's breaker (so it needs one)."""

    path: str
    interval: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise TypeError(f"path must be a path such as '/healthz', got {self.path!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"path must be a path starting with '/', got {self.path!r}")
        check_seconds("interval", self.interval)


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackOptions:
    """``handler(request, error)``, an async function, answers instead of the transport:
    ``on="rejections"`` when the request was not sent (open breaker, full bulkhead, rate
    limit), ``"failures"`` when it was sent and failed (an exception, or a failing status
    once attempts ran out: ``error`` is then an ``httpx.HTTPStatusError``), ``"both"``."""

    handler: FallbackHandler
    on: str = "both"

    def __post_init__(self) -> None:
        if not callable(self.handler):
            raise TypeError(f"handler must be an async function, got {self.handler!r}")
        if not isinstance(self.on, str) or self.on not in FALLBACK_ON:
            raise ValueError(f"on must be one of {sorted(FALLBACK_ON)}, got {self.on!r}")

    def covers(self, error: Exception) -> bool:
        """Whether ``on`` covers ``error``: a rejection (not sent) or a failure (sent)."""
        if self.on == "both":
            return True
        rejected = isinstance(error, RejectedError)
        return rejected if self.on == "rejections" else not rejected


# --- the policy -----------------------------------------------------------------------------


class _Auto(float):
    """The default ``total_timeout``: worked out from ``timeout`` when the policy is made."""

    def __repr__(self) -> str:
        return "<timeout x 1.5>"


_AUTO_TOTAL = _Auto(-1.0)

# What a policy's fields must be: field, type, whether None (no such strategy) is allowed.
_KINDS: tuple[tuple[str, type, bool], ...] = (
    ("retry", RetryOptions, False),
    ("breaker", BreakerOptions, True),
    ("rate_limit", RateLimitOptions, True),
    ("bulkhead", BulkheadOptions, True),
    ("throttle", ThrottleOptions, True),
    ("hedge", HedgeOptions, True),
    ("health_check", HealthCheckOptions, True),
    ("fallback", FallbackOptions, True),
    ("store", Store, True),
    ("clock", Clock, True),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpPolicy:
    """What each origin's pipeline is built from; plain, immutable, validated on creation.

    ``timeout`` limits each attempt, up to the response headers (``None``: no limit).
    ``total_timeout``: the most one request may take, every attempt, backoff and
    ``Retry-After`` wait included (``None``: no overall limit; by default 1.5 times
    ``timeout``, so 1.5 s, and no limit when ``timeout`` is ``None``). It is the request's
    deadline (a caller's sooner deadline wins), so it is also what ``x-deadline-ms`` forwards.

    Failures: transport errors, attempt timeouts, attempts cut by the request's deadline and
    responses whose status is in ``failure_statuses``. A request of a non-idempotent method
    that may be sent more than once (retried, hedged, failed over) gets an
    ``idempotency_header`` before its first attempt (a fresh UUID, the same on every
    attempt) unless it has one already (``None``: add nothing).

    The strategies, each one options object (``None``: left out): ``retry``
    (``RetryOptions``: 3 attempts), ``breaker`` (``BreakerOptions``: on), ``rate_limit``,
    ``bulkhead``, ``throttle``, ``hedge``, ``health_check`` (needs a breaker), ``fallback``.
    Breakers live in ``store`` (breakers with the same origin and store share state;
    ``RedisStore`` shares them across replicas), and so do the rate limiter, the throttle's
    counts, the hedge budget and the health checks. ``clock`` and ``listeners`` go to every
    policy. See docs/httpx.md for the defaults and their trade-offs.
    """

    retry: RetryOptions = field(default_factory=RetryOptions)
    breaker: BreakerOptions | None = field(default_factory=BreakerOptions)
    timeout: float | None = 1.0
    total_timeout: float | None = _AUTO_TOTAL
    failure_statuses: Collection[int] = FAILURE_STATUSES
    idempotency_header: str | None = "Idempotency-Key"
    rate_limit: RateLimitOptions | None = None
    bulkhead: BulkheadOptions | None = None
    throttle: ThrottleOptions | None = None
    hedge: HedgeOptions | None = None
    health_check: HealthCheckOptions | None = None
    fallback: FallbackOptions | None = None
    store: Store | None = None
    clock: Clock | None = None
    listeners: tuple[Listener, ...] = ()

    def __post_init__(self) -> None:
        for name, kind, optional in _KINDS:
            value = getattr(self, name)
            if not isinstance(value, kind) and not (optional and value is None):
                alternative = " or None" if optional else ""
                raise TypeError(f"{name} must be a {kind.__name__}{alternative}, got {value!r}")
        if self.health_check is not None and self.breaker is None:
            raise ValueError("health_check needs a breaker: the check is bound to the breaker")
        object.__setattr__(self, "failure_statuses", _statuses(self.failure_statuses))
        object.__setattr__(self, "total_timeout", _total(self.timeout, self.total_timeout))
        check_deadline_header(self.idempotency_header, "idempotency_header")
        object.__setattr__(self, "listeners", check_listeners(self.listeners))


def _statuses(statuses: object) -> frozenset[int]:
    """``failure_statuses``: HTTP statuses, as a frozenset."""
    if isinstance(statuses, str) or not isinstance(statuses, Collection):
        raise TypeError(f"failure_statuses must be a collection of int, got {statuses!r}")
    for s in statuses:
        if isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599:
            raise ValueError(f"failure_statuses must hold HTTP statuses (100-599), got {s!r}")
    return frozenset(statuses)


def _total(timeout: float | None, total: float | None) -> float | None:
    """``total_timeout``, worked out from ``timeout`` when not given; never below ``timeout``."""
    attempt = check_seconds("timeout", timeout, none=True)
    if total is _AUTO_TOTAL:
        total = None if attempt is None else attempt * TOTAL_TIMEOUT_FACTOR
    seconds = check_seconds("total_timeout", total, none=True)
    if seconds is not None and attempt is not None and attempt > seconds:
        raise ValueError(
            f"timeout ({attempt:g}s per attempt) must not exceed total_timeout "
            f"({seconds:g}s for the whole request): the attempt timeout could never expire"
        )
    return total


# --- the policies the options make --------------------------------------------------------


def make_retry(options: RetryOptions, name: str, shared: Shared) -> Retry | None:
    """The Retry, or ``None`` when ``attempts`` is 1."""
    if options.attempts == 1:
        return None
    backoff = _default_wait() if options.wait is None else options.wait
    return Retry(
        on=retryable,
        attempts=options.attempts,
        wait=retry_wait(backoff, options.retry_after_max),
        stop=stop,
        budget=options.budget,
        before_sleep=close_discarded,
        name=name,
        clock=shared.clock,
        listeners=shared.listeners,
    )


def make_breaker(
    options: BreakerOptions, name: str, shared: Shared, health: HealthCheck | None = None
) -> CircuitBreaker:
    """The breaker (bound to ``health``), counting what ``is_failure`` says."""
    return CircuitBreaker(
        name,
        **_keywords(options),
        on=is_failure,
        ignore=not_failure,
        health=health,
        **shared._asdict(),
    )


def make_rate_limiter(options: RateLimitOptions, name: str, shared: Shared) -> RateLimiter:
    """The rate limiter, sharing its bucket through the store."""
    return RateLimiter(**_keywords(options), name=name, **shared._asdict())


def make_timeout(seconds: float, name: str, shared: Shared) -> Timeout:
    """The attempt's timeout."""
    return Timeout(seconds, name=name, clock=shared.clock, listeners=shared.listeners)


def make_bulkhead(options: BulkheadOptions, name: str, shared: Shared) -> Bulkhead:
    """The bulkhead: this process's requests only (no store)."""
    return Bulkhead(**_keywords(options), name=name, clock=shared.clock, listeners=shared.listeners)


def make_throttle(options: ThrottleOptions, name: str, shared: Shared) -> Throttle:
    """The throttle, named ``<name>:throttle``; a 429 or 503 answer is a refusal."""
    return Throttle(
        **_keywords(options), accepted_if=accepted, name=f"{name}:throttle", **shared._asdict()
    )


def make_hedge(options: HedgeOptions, name: str, shared: Shared) -> Hedge:
    """The hedge, named ``<name>:hedge``."""
    return Hedge(**_keywords(options), name=f"{name}:hedge", **shared._asdict())


def _keywords(
    options: BreakerOptions | RateLimitOptions | BulkheadOptions | ThrottleOptions | HedgeOptions,
) -> dict[str, Any]:
    """The fields of an options object by name: its policy's keywords, which they are named
    after (the options hold no other field)."""
    return {f.name: getattr(options, f.name) for f in fields(options)}


def make_health_check(
    options: HealthCheckOptions,
    origin: str,
    transport: httpx.AsyncBaseTransport,
    name: str,
    shared: Shared,
) -> HealthCheck:
    """The check of ``origin`` (``path`` on it, through ``transport``), named after its
    pipeline. Not started."""
    return HealthCheck(
        http_check(origin + options.path, transport=transport),
        name=name,
        interval=options.interval,
        **shared._asdict(),
    )
