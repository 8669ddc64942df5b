"""Tests for resilience.errors: hierarchy, attributes, messages and pickling."""

from __future__ import annotations

import pickle

import pytest

from resilience.errors import (
    BulkheadFullError,
    CircuitOpenError,
    NoHealthyEndpointError,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    ResilienceTimeoutError,
    ThrottledError,
    UnacceptableResultError,
)


@pytest.mark.parametrize("cls", [CircuitOpenError, BulkheadFullError, RateLimitedError])
def test_rejections_are_rejected_errors(cls: type[Exception]) -> None:
    """Every rejection is a RejectedError, a ResilienceError and an Exception."""
    assert issubclass(cls, RejectedError)
    assert issubclass(cls, ResilienceError)
    assert issubclass(cls, Exception)


def test_timeout_error_is_builtin_timeout() -> None:
    """ResilienceTimeoutError is both a ResilienceError and a builtin TimeoutError, not rejected."""
    assert issubclass(ResilienceTimeoutError, TimeoutError)
    assert issubclass(ResilienceTimeoutError, ResilienceError)
    assert not issubclass(ResilienceTimeoutError, RejectedError)
    with pytest.raises(TimeoutError):
        raise ResilienceTimeoutError("t", 1.0)


def test_unacceptable_result_is_resilience_error() -> None:
    """UnacceptableResultError is a ResilienceError carrying the result."""
    error = UnacceptableResultError([1, 2])
    assert isinstance(error, ResilienceError)
    assert not isinstance(error, RejectedError)
    assert error.result == [1, 2]
    assert "[1, 2]" in str(error)


def test_attributes() -> None:
    """Each error exposes the attributes it documents."""
    circuit = CircuitOpenError("db", "open", 2.5)
    assert (circuit.name, circuit.state, circuit.retry_after) == ("db", "open", 2.5)
    bulkhead = BulkheadFullError("pool", 4)
    assert (bulkhead.name, bulkhead.max_concurrent, bulkhead.retry_after) == ("pool", 4, None)
    limited = RateLimitedError("api", 0.25)
    assert (limited.name, limited.retry_after) == ("api", 0.25)
    timeout = ResilienceTimeoutError("slow", 3.0)
    assert (timeout.name, timeout.seconds) == ("slow", 3.0)
    rejected = RejectedError("x")
    assert (rejected.name, rejected.retry_after) == ("x", None)


@pytest.mark.parametrize(
    ("error", "parts"),
    [
        (CircuitOpenError("db-breaker", "half_open", 1.5), ["db-breaker", "half_open", "1.500"]),
        (CircuitOpenError("db-breaker", "forced_open", None), ["db-breaker", "forced_open"]),
        (BulkheadFullError("pool-a", 7), ["pool-a", "7"]),
        (RateLimitedError("api-limit", 0.125), ["api-limit", "0.125"]),
        (ResilienceTimeoutError("slow-call", 2.5), ["slow-call", "2.5"]),
        (RejectedError("generic", 4.0), ["generic", "4.000"]),
    ],
)
def test_messages_mention_name(error: Exception, parts: list[str]) -> None:
    """str() of each error names its policy and the relevant numbers."""
    message = str(error)
    for part in parts:
        assert part in message


def test_no_retry_hint_without_retry_after() -> None:
    """Without retry_after, the message has no retry hint."""
    assert "retry after" not in str(BulkheadFullError("p", 1))
    assert "retry after" in str(RateLimitedError("p", 1.0))


@pytest.mark.parametrize(
    "error",
    [
        RejectedError("r", 1.0),
        CircuitOpenError("db", "open", 2.5),
        BulkheadFullError("pool", 4),
        RateLimitedError("api", 0.25),
        ResilienceTimeoutError("slow", 3.0),
        UnacceptableResultError({"k": 1}),
    ],
)
def test_pickle_round_trip(error: Exception) -> None:
    """Every error survives pickling with its type, args, attributes and message."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)
    assert str(copy) == str(error)


@pytest.mark.parametrize(
    ("error", "fields"),
    [
        (RejectedError("r", 1.0), {"name": "r", "retry_after": 1.0}),
        (
            CircuitOpenError("db", "open", 2.5),
            {"name": "db", "state": "open", "retry_after": 2.5},
        ),
        (
            BulkheadFullError("pool", 4),
            {"name": "pool", "max_concurrent": 4, "retry_after": None},
        ),
        (RateLimitedError("api", 0.25), {"name": "api", "retry_after": 0.25}),
        (
            ThrottledError("t", 0.5, 0.75),
            {"name": "t", "retry_after": 0.5, "ratio": 0.75},
        ),
        (
            NoHealthyEndpointError("svc", None, 3),
            {"name": "svc", "retry_after": None, "endpoints": 3},
        ),
    ],
)
def test_rejection_fields_live_in_args(error: RejectedError, fields: dict[str, object]) -> None:
    """A rejection stores nothing besides ``args`` (made in C), and a copy made from its
    ``args`` alone (``cls.__new__(cls, *args)``, as adapters do) has every field."""
    assert vars(error) == {}
    copy = type(error).__new__(type(error), *error.args)
    assert {k: getattr(copy, k) for k in fields} == fields
    assert str(copy) == str(error)


def test_rejection_fields_given_by_keyword() -> None:
    """Fields given by keyword, or left to their defaults, are kept in ``args`` too."""
    error = CircuitOpenError(name="db", state="forced_open", retry_after=None)
    assert error.args == ("db", "forced_open", None)
    assert (error.name, error.state, error.retry_after) == ("db", "forced_open", None)
    assert RejectedError().args == ("", None)
    assert RejectedError("x").retry_after is None
    assert pickle.loads(pickle.dumps(error)).state == "forced_open"
