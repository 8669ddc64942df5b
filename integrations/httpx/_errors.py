"""The transport's errors, and what counts as a failure.

The errors raised by the transport itself, drawn as httpx draws its own::

    httpx.TransportError
     +-- CircuitOpen(name, state, retry_after)             also resilience.CircuitOpenError
     +-- BulkheadFull(name, max_concurrent)                also resilience.BulkheadFullError
     +-- RateLimited(name, retry_after)                    also resilience.RateLimitedError
     +-- NoHealthyEndpoint(name, retry_after, endpoints)   also resilience.NoHealthyEndpointError
     +-- Throttled(name, retry_after, ratio)               also resilience.ThrottledError
     +-- Rejected(name, retry_after)                       also resilience.RejectedError
     +-- httpx.TimeoutException
          +-- AttemptTimeout(name, seconds)                also resilience.ResilienceTimeoutError
          +-- DeadlineExceeded(name, seconds)              also resilience.ResilienceTimeoutError

Each takes its core error's arguments, and ``request=`` as httpx's errors do; so
``except httpx.HTTPError`` and ``except resilience.ResilienceError`` both work.

Foreign errors are translated once, at a boundary, as httpx translates httpcore's: the core
errors of the pipeline's policies where the transport answers (``translate``), and what the
wrapped transport raises that is not an httpx error where the transport calls it
(``transport_error``).
"""

from __future__ import annotations

from typing import Any

import httpx

from resilience import Throttle
from resilience import errors as core

__all__ = [
    "AttemptTimeout",
    "BulkheadFull",
    "CircuitOpen",
    "DeadlineExceeded",
    "FailedResponse",
    "NoHealthyEndpoint",
    "RateLimited",
    "Rejected",
    "Throttled",
    "accepted",
    "is_failure",
    "not_failure",
    "retryable",
    "translate",
    "transport_error",
]


class _HttpxError(httpx.HTTPError):
    """What an adapter error adds to its core error (the next base class): the request.

    The core error's constructor runs as it is (the core errors leave ``args`` to
    ``BaseException.__new__``), then httpx's public ``request`` setter attaches the request.
    """

    def __init__(self, *args: Any, request: httpx.Request | None = None) -> None:
        super().__init__(*args)
        if request is not None:
            self.request = request

    @classmethod
    def _from(cls, original: Exception, request: httpx.Request) -> Exception:
        """This flavour of the core error ``original``: the same arguments and attributes."""
        error = cls.__new__(cls, *original.args)
        error.__dict__.update(original.__dict__)
        error.request = request
        return error


class CircuitOpen(_HttpxError, core.CircuitOpenError, httpx.TransportError):
    """The origin's circuit breaker is open: the request was not sent."""


class BulkheadFull(_HttpxError, core.BulkheadFullError, httpx.TransportError):
    """Too many requests to this origin were in flight: the request was not sent."""


class RateLimited(_HttpxError, core.RateLimitedError, httpx.TransportError):
    """The client-side rate limit for this origin was reached: the request was not sent."""


class NoHealthyEndpoint(_HttpxError, core.NoHealthyEndpointError, httpx.TransportError):
    """Every endpoint of the service is ejected: the request was not sent."""


class Throttled(_HttpxError, core.ThrottledError, httpx.TransportError):
    """Client-side throttling refused the request (the origin has been refusing most
    requests lately): the request was not sent."""


class Rejected(_HttpxError, core.RejectedError, httpx.TransportError):
    """Another policy rejected the request (one added by a custom pipeline)."""


class AttemptTimeout(_HttpxError, core.ResilienceTimeoutError, httpx.TimeoutException):
    """An attempt took longer than the policy's ``timeout`` (and no retry was left)."""


class DeadlineExceeded(_HttpxError, core.ResilienceTimeoutError, httpx.TimeoutException):
    """The request's deadline (``x-deadline-ms``, ``deadline()`` or ``total_timeout``) ran out."""

    def __str__(self) -> str:
        return f"deadline exceeded for {self.name!r}"


# The one table from core errors to their httpx flavour, most specific first (as httpx maps
# httpcore's errors in ``map_httpcore_exceptions``).
_ERRORS: tuple[tuple[type[core.ResilienceError], type[_HttpxError]], ...] = (
    (core.CircuitOpenError, CircuitOpen),
    (core.BulkheadFullError, BulkheadFull),
    (core.RateLimitedError, RateLimited),
    (core.NoHealthyEndpointError, NoHealthyEndpoint),
    (core.ThrottledError, Throttled),
    (core.RejectedError, Rejected),
    (core.ResilienceTimeoutError, AttemptTimeout),
)


def translate(exc: Exception, request: httpx.Request) -> Exception:
    """The httpx flavour of a core error (``exc`` itself if it has none)."""
    if isinstance(exc, httpx.HTTPError):  # an httpx error already (DeadlineExceeded included)
        return exc
    for kind, flavour in _ERRORS:
        if isinstance(exc, kind):
            return flavour._from(exc, request)
    return exc


def transport_error(exc: Exception, request: httpx.Request) -> httpx.HTTPError:
    """What the wrapped transport raised, as an httpx error. A task group's wrapper around
    one error is taken off (an ``httpx.ConnectError`` inside stays a connect error);
    anything else not httpx's becomes an ``httpx.TransportError`` naming it."""
    inner: BaseException = exc
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    if isinstance(inner, httpx.HTTPError):
        return inner
    return httpx.TransportError(f"{type(inner).__name__}: {inner}", request=request)


class FailedResponse(Exception):
    """A response with a failing status, raised inside the pipeline so policies see a failure."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


# --- what the policies count ----------------------------------------------------------------


def is_failure(exc: Exception) -> bool:
    """What the breaker counts: transport errors, failing statuses, attempt timeouts, and an
    attempt cut by the request's deadline (``DeadlineExceeded`` raised by the attempt: a
    hang is a failure whichever timer noticed it)."""
    if isinstance(exc, (FailedResponse, httpx.TransportError)):
        return not isinstance(exc, core.RejectedError)
    return isinstance(exc, core.ResilienceTimeoutError)


def not_failure(exc: Exception) -> bool:
    """What the breaker ignores: anything but a failure."""
    return not is_failure(exc)


def retryable(exc: Exception) -> bool:
    """What Retry tries again: a failure, unless the request's deadline is spent."""
    return is_failure(exc) and not isinstance(exc, DeadlineExceeded)


def accepted(exc: Exception) -> bool:
    """Whether the server accepted a request that ended in ``exc``, for the throttle: a 429
    or 503 answer is a refusal, the rest as the throttle's default rule says."""
    if isinstance(exc, FailedResponse) and exc.response.status_code in (429, 503):
        return False
    return Throttle.default_accepted(exc)
