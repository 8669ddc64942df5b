"""``ResilientTransport``: retry, circuit breaker, rate limit, timeout and bulkhead for httpx.

::

    client = httpx.AsyncClient(transport=ResilientTransport())

is the whole integration. Each origin (``https://api.example.com:443``) gets its own pipeline,
built from an ``HttpPolicy`` (or from a function of the origin returning one), in the
recommended order ``Retry -> CircuitBreaker -> RateLimiter -> Timeout -> Bulkhead`` (with an
optional fallback outside it all). See docs/httpx.md.

Everything public is named here; the modules behind it are private, one job each:

* ``_errors``: the transport's errors (their tree is drawn there) and what counts as a
  failure;
* ``_policy``: ``HttpPolicy`` and its options, one object per strategy, and the policies they
  make;
* ``_retry_after``: ``Retry-After`` parsing and the wait it sets;
* ``_exchange``: one request on its way, and the attempt (the boundary with the wrapped
  transport);
* ``_pipelines``: an origin's pipeline from its policy, and the bounded map of them;
* ``_hedging``: hedged sending;
* ``_endpoints`` (with the pure rules of ``_balancing``): several endpoints of one service,
  P2C, failover;
* ``_transport``: ``ResilientTransport``.
"""

from __future__ import annotations

from .._deadline import DEADLINE_HEADER, deadline, missing_extra, remaining

try:
    import httpx as _httpx  # noqa: F401 - imported here for the message below
except ImportError as exc:  # pragma: no cover - tested in a fresh interpreter
    raise ImportError(missing_extra("httpx", "httpx")) from exc

from ..health import http_check
from ._balancing import HealthSource
from ._errors import (
    AttemptTimeout,
    BulkheadFull,
    CircuitOpen,
    DeadlineExceeded,
    NoHealthyEndpoint,
    RateLimited,
    Rejected,
    Throttled,
)
from ._pipelines import origin_of
from ._policy import (
    FAILURE_STATUSES,
    FALLBACK_ON,
    IDEMPOTENT_METHODS,
    TOTAL_TIMEOUT_FACTOR,
    BreakerOptions,
    BulkheadOptions,
    FallbackHandler,
    FallbackOptions,
    HealthCheckOptions,
    HedgeOptions,
    HttpPolicy,
    RateLimitOptions,
    RetryOptions,
    ThrottleOptions,
)
from ._retry_after import MAX_RETRY_AFTER, WaitStrategy, parse_retry_after
from ._transport import ResilientTransport

__all__ = [
    "DEADLINE_HEADER",
    "FAILURE_STATUSES",
    "FALLBACK_ON",
    "IDEMPOTENT_METHODS",
    "MAX_RETRY_AFTER",
    "TOTAL_TIMEOUT_FACTOR",
    "AttemptTimeout",
    "BreakerOptions",
    "BulkheadFull",
    "BulkheadOptions",
    "CircuitOpen",
    "DeadlineExceeded",
    "FallbackHandler",
    "FallbackOptions",
    "HealthCheckOptions",
    "HealthSource",
    "HedgeOptions",
    "HttpPolicy",
    "NoHealthyEndpoint",
    "RateLimitOptions",
    "RateLimited",
    "Rejected",
    "ResilientTransport",
    "RetryOptions",
    "ThrottleOptions",
    "Throttled",
    "WaitStrategy",
    "deadline",
    "http_check",
    "origin_of",
    "parse_retry_after",
    "remaining",
]
