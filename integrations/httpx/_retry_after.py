"""``Retry-After``: parsed defensively (it comes from the upstream), and the wait it sets.

A failing response's ``Retry-After`` replaces the backoff for that retry, within what is
left of the request's allowance (``RetryOptions.retry_after_max``); a header asking for
more ends retrying, and so does a wait that would outlast the request's deadline.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable
from datetime import UTC, datetime

from resilience import RetryCallState

from .._deadline import remaining
from ._errors import FailedResponse

__all__ = ["MAX_RETRY_AFTER", "WaitStrategy", "parse_retry_after", "retry_wait", "stop"]

MAX_RETRY_AFTER = 86_400.0
"""``parse_retry_after`` never returns more than this many seconds (one day)."""

WaitStrategy = Callable[[RetryCallState], float]
"""A tenacity wait strategy: seconds to wait before the next attempt."""


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


def retry_wait(base: WaitStrategy, cap: float) -> WaitStrategy:
    """The backoff, or the failing response's ``Retry-After`` within what is left of ``cap``.

    A ``Retry-After`` asking for more than is left of ``cap`` (the request's total
    ``Retry-After`` allowance) gives an infinite wait, which ``stop`` turns into "no retry".
    """

    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, FailedResponse):
            after = parse_retry_after(error.response.headers.get("retry-after"))
            if after is not None:
                return after if after <= cap - state.idle_for else math.inf
        return base(state)

    return wait


def stop(state: RetryCallState) -> bool:
    """Stop retrying when the wait is refused, or would outlast the request's deadline."""
    upcoming = state.upcoming_sleep or 0.0
    if upcoming == math.inf:
        return True
    left = remaining()
    return left is not None and upcoming >= left
