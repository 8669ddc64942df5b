"""The exception hierarchy.

::

    Exception
     +-- ResilienceError                  everything this library raises on its own
          +-- RejectedError               the call was not attempted (load was shed)
          |    +-- CircuitOpenError       a circuit breaker is open       (retry_after)
          |    +-- BulkheadFullError      no concurrency slot was free
          |    +-- RateLimitedError       the rate limit was reached      (retry_after)
          |    +-- ThrottledError         client-side throttling refused  (retry_after)
          |    +-- NoHealthyEndpointError every endpoint is ejected       (retry_after)
          +-- ResilienceTimeoutError      a Timeout expired (also a builtin TimeoutError)
          +-- UnacceptableResultError     a Fallback's ``result_if`` rejected a result
          +-- StoreUnavailableError       a shared store could not answer (policies catch it
                                          and carry on with local state; users never see it)

Every rejection raises a fresh exception object, so tracebacks never accumulate. A
rejection keeps its fields in ``args``, which ``BaseException.__new__`` stores (in C), and
reads them through properties: making one runs no Python code but its constructor's check
that ``args`` holds every field (it fills them in when given by keyword). Storing them as
attributes as well cost more than anything else an open breaker's rejection does. The
constructors call no ``super().__init__``, so an adapter may mix the rejections with a
foreign base class (httpx's ``TransportError``) whose ``__init__`` takes other arguments,
and a copy made with ``cls.__new__(cls, *error.args)`` has every field.
"""

from __future__ import annotations

from types import TracebackType
from typing import TypeAlias, cast

__all__ = [
    "BulkheadFullError",
    "CircuitOpenError",
    "NoHealthyEndpointError",
    "RateLimitedError",
    "RejectedError",
    "ResilienceError",
    "ResilienceTimeoutError",
    "StoreUnavailableError",
    "ThrottledError",
    "UnacceptableResultError",
]


#: ``__aexit__``'s first and last arguments, as the policies and stores that are async context
#: managers take them
ExcType: TypeAlias = type[BaseException] | None
Traceback: TypeAlias = TracebackType | None


class ResilienceError(Exception):
    """Base class of every exception raised by a policy itself."""


class RejectedError(ResilienceError):
    """A policy refused to start the call; the protected function never ran.

    ``name`` is the policy's name; ``retry_after`` is a hint in seconds after which a new call
    may succeed, or ``None`` when unknown.
    """

    def __init__(self, name: str = "", retry_after: float | None = None) -> None:
        if len(self.args) != 2:  # given by keyword, or left out: args holds them all
            self.args = (name, retry_after)

    @property
    def name(self) -> str:
        """The name of the policy that refused the call."""
        return cast(str, self.args[0])

    @property
    def retry_after(self) -> float | None:
        """Seconds after which a new call may succeed, or ``None`` when unknown."""
        return cast("float | None", self.args[1])

    def __str__(self) -> str:
        hint = "" if self.retry_after is None else f"; retry after {self.retry_after:.3f}s"
        return f"{self._what()}{hint}"

    def _what(self) -> str:
        return f"{self.name!r} rejected the call"


class CircuitOpenError(RejectedError):
    """The circuit breaker ``name`` is open (``state``: open, half_open or forced_open)."""

    def __init__(self, name: str, state: str, retry_after: float | None) -> None:
        if len(self.args) != 3:
            self.args = (name, state, retry_after)

    @property
    def state(self) -> str:
        """``open``, ``half_open`` or ``forced_open``."""
        return cast(str, self.args[1])

    @property
    def retry_after(self) -> float | None:
        """Seconds until a probe may go (``None``: held open until reset)."""
        return cast("float | None", self.args[2])

    def _what(self) -> str:
        return f"circuit {self.name!r} is {self.state}"


class BulkheadFullError(RejectedError):
    """The bulkhead ``name`` had no free slot (and no room or time left to wait for one)."""

    def __init__(self, name: str, max_concurrent: int) -> None:
        if len(self.args) != 2:
            self.args = (name, max_concurrent)

    @property
    def max_concurrent(self) -> int:
        """The bulkhead's limit when it refused the call."""
        return cast(int, self.args[1])

    @property
    def retry_after(self) -> None:
        """Always ``None``: a slot frees up when a call ends, which cannot be foreseen."""
        return None

    def _what(self) -> str:
        return f"bulkhead {self.name!r} is full ({self.max_concurrent} calls in flight)"


class RateLimitedError(RejectedError):
    """The rate limiter ``name`` has no token left; one frees up after ``retry_after``."""

    def __init__(self, name: str, retry_after: float) -> None:
        if len(self.args) != 2:
            self.args = (name, retry_after)

    def _what(self) -> str:
        return f"rate limit {self.name!r} reached"


class ThrottledError(RejectedError):
    """The throttle ``name`` refused the call locally: the dependency has been refusing most
    calls lately (``ratio``: the share of calls refused here), so this one was not sent."""

    def __init__(self, name: str, retry_after: float, ratio: float) -> None:
        if len(self.args) != 3:
            self.args = (name, retry_after, ratio)

    @property
    def ratio(self) -> float:
        """The share of calls this throttle refuses now."""
        return cast(float, self.args[2])

    def _what(self) -> str:
        return f"throttle {self.name!r} refused the call (refusing {self.ratio:.0%} of calls)"


class NoHealthyEndpointError(RejectedError):
    """Every endpoint of service ``name`` is ejected (its breaker open or its health check
    failing); the first may be back after ``retry_after``."""

    def __init__(self, name: str, retry_after: float | None, endpoints: int) -> None:
        if len(self.args) != 3:
            self.args = (name, retry_after, endpoints)

    @property
    def endpoints(self) -> int:
        """How many endpoints are ejected."""
        return cast(int, self.args[2])

    def _what(self) -> str:
        return f"no healthy endpoint of {self.name!r} ({self.endpoints} ejected)"


class ResilienceTimeoutError(ResilienceError, TimeoutError):
    """The Timeout ``name`` expired after ``seconds``; the call was cancelled."""

    def __init__(self, name: str, seconds: float) -> None:
        # TimeoutError is an OSError, whose args are only kept by OSError.__init__
        super().__init__(name, seconds)
        self.name = name
        self.seconds = seconds

    def __str__(self) -> str:
        if self.name == "timeout":  # the default name says nothing: leave it out
            return f"timed out after {self.seconds:g}s"
        return f"timed out after {self.seconds:g}s (timeout {self.name!r})"


class UnacceptableResultError(ResilienceError):
    """Handed to a Fallback handler when ``result_if`` rejected a returned ``result``."""

    def __init__(self, result: object) -> None:
        super().__init__(result)
        self.result = result

    def __str__(self) -> str:
        return f"unacceptable result: {self.result!r}"


class StoreUnavailableError(ResilienceError):
    """A store primitive could not reach its backend in time.

    Policies catch it and fall back to local state; it never reaches a protected call.
    """
