"""The request deadline and criticality shared by the ASGI middleware and the httpx transport.

A deadline is an absolute time on the running event loop's clock (``loop.time()``), kept in a
context variable for the current task (and the tasks it starts). The variable holds a
``DeadlineCell``, one per deadline set: lifting it (``cell.at = None``, as the middleware
does once a response is complete) lifts it in every task that copied the context, whichever
task lifts it. On the wire it travels as a
*relative* budget in whole milliseconds (header ``x-deadline-ms`` by default), so the clocks of
caller and callee never need to agree: each hop reads the budget, turns it into its own
deadline, and forwards what is left.

A request's *criticality* (``critical``, ``default`` or ``sheddable``, after Google's
practice) travels the same way: the middleware reads it from ``x-request-criticality`` (or
derives it from the path), keeps it in a context variable for the request, and the transport
forwards it downstream (``get_criticality()``), so a sheddable request stays sheddable at
every hop and a critical one keeps its priority.

This module imports nothing but the standard library, so ``resilience.integrations`` stays
cheap to import.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import final

from resilience import DISTRIBUTION
from resilience.checks import check_finite

__all__ = [
    "CRITICAL",
    "CRITICALITIES",
    "CRITICALITY_HEADER",
    "DEADLINE_HEADER",
    "DEFAULT",
    "MAX_BUDGET",
    "SHEDDABLE",
    "criticality",
    "deadline",
    "format_budget",
    "get_criticality",
    "get_deadline",
    "parse_budget",
    "parse_criticality",
    "remaining",
]

DEADLINE_HEADER = "x-deadline-ms"
"""The header carrying the caller's remaining budget, in milliseconds (an integer)."""

MAX_BUDGET = 300.0
"""Budgets larger than this many seconds are capped to it when read from a header."""


@final
class DeadlineCell:
    """One deadline in force: ``at`` on the event loop's clock, ``None`` once lifted.

    Mutable on purpose: the tasks that copied a context share the cell, so lifting it there
    lifts it for all of them (a context variable set in a child task is not seen by its
    parent)."""

    __slots__ = ("at",)

    def __init__(self, at: float | None) -> None:
        self.at = at


_deadline: ContextVar[DeadlineCell | None] = ContextVar("resilience.deadline", default=None)

CRITICALITY_HEADER = "x-request-criticality"
"""The header carrying a request's criticality: ``critical``, ``default`` or ``sheddable``."""

CRITICAL = "critical"
"""Shed last: the service's reason to exist (checkout, login)."""
DEFAULT = "default"
"""Everything not said otherwise."""
SHEDDABLE = "sheddable"
"""Shed first: prefetches, recommendations, batch work, retries a caller can do without."""
CRITICALITIES = (CRITICAL, DEFAULT, SHEDDABLE)
"""Every criticality, most important first."""

_criticality: ContextVar[str | None] = ContextVar("resilience.criticality", default=None)
_LEVELS = {b"critical": CRITICAL, b"default": DEFAULT, b"sheddable": SHEDDABLE}

# An optional minus sign, up to 15 digits, an optional fraction: nothing else is a budget.
_BUDGET = re.compile(rb"-?[0-9]{1,15}(?:\.[0-9]{1,6})?")
_MAX_SENT = 999_999_999_999_999.0  # the most milliseconds a header says: 15 digits


def get_deadline() -> float | None:
    """The current deadline on the event loop's clock, or ``None`` when there is none."""
    cell = _deadline.get()
    return None if cell is None else cell.at


def remaining() -> float | None:
    """Seconds left before the current deadline (negative once spent), or ``None``."""
    at = get_deadline()
    if at is None:
        return None
    return at - asyncio.get_running_loop().time()


@contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Run the block under a deadline ``seconds`` from now; yields the absolute deadline.

    Deadlines only shrink: inside an earlier deadline the sooner of the two applies. A NaN
    or infinite ``seconds`` is a ``ValueError`` (no deadline is no ``with deadline``). Call
    it from a coroutine (it reads the running loop's clock)::

        with deadline(2.0):
            await client.get("https://api.example.com/")  # sends x-deadline-ms: 2000 or less
    """
    at, _, token = shrink_deadline(check_finite("seconds", seconds))
    try:
        yield at
    finally:
        _deadline.reset(token)


def shrink_deadline(seconds: float) -> tuple[float, DeadlineCell, Token[DeadlineCell | None]]:
    """Set the deadline ``seconds`` from now, or keep the current one if it comes sooner;
    returns the deadline in force, the new cell holding it (to lift it) and the token that
    restores the one before (``_deadline.reset(token)``). ``deadline()`` without its checks,
    for per-request use."""
    at = asyncio.get_running_loop().time() + seconds
    outer = get_deadline()
    if outer is not None and outer < at:
        at = outer
    cell = DeadlineCell(at)
    return at, cell, _deadline.set(cell)


def get_criticality() -> str | None:
    """The current request's criticality to send downstream, or ``None`` to send nothing.

    ``None`` means ``default`` (what any service assumes without the header). An outgoing
    request sends ``CRITICALITY_HEADER: <value>`` when this is not ``None``::

        level = get_criticality()
        if level is not None and CRITICALITY_HEADER not in request.headers:
            request.headers[CRITICALITY_HEADER] = level
    """
    return _criticality.get()


@contextmanager
def criticality(level: str) -> Iterator[str]:
    """Run the block with ``level`` as the criticality of its outgoing requests.

    A background job marks its calls sheddable with ``with criticality("sheddable"):``; the
    previous value is back after the block.
    """
    if level not in CRITICALITIES:
        raise ValueError(f"criticality must be one of {CRITICALITIES}, got {level!r}")
    token = _criticality.set(None if level == DEFAULT else level)
    try:
        yield level
    finally:
        _criticality.reset(token)


def parse_criticality(value: bytes | str) -> str:
    """A header value as a criticality; anything unknown is ``default``.

    Only the exact lowercase tokens ``critical``, ``default`` and ``sheddable`` are
    understood (surrounding spaces ignored): another case, another word, a list or a huge
    value is ``default``, never an error.
    """
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return DEFAULT
    if len(value) > 32:
        return DEFAULT
    return _LEVELS.get(value.strip(b" \t"), DEFAULT)


def check_criticality_map(value: object) -> dict[str, str]:
    """The middleware's ``criticality=``: ``{path prefix: criticality}``."""
    if value is None:
        return {}
    if not isinstance(value, dict) and not hasattr(value, "items"):
        raise TypeError(f"criticality must be a dict of {{path: criticality}}, got {value!r}")
    out: dict[str, str] = {}
    for path, level in value.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"criticality must hold paths starting with '/', got {path!r}")
        if level not in CRITICALITIES:
            raise ValueError(f"criticality[{path!r}] must be one of {CRITICALITIES}, got {level!r}")
        out[path] = CRITICALITIES[CRITICALITIES.index(level)]  # the module's own constant
    return out


def parse_budget(value: bytes | str, cap: float = MAX_BUDGET) -> float | None:
    """A header value in milliseconds as seconds, capped at ``cap``; ``None`` if malformed.

    Only an optional ``-``, digits and an optional fraction are accepted (surrounding spaces
    are ignored); anything else (``1e3``, ``inf``, ``NaN``, ``12ms``, empty) is treated as if
    the header were absent. Zero or negative means the budget is already spent.
    """
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return None
    value = value.strip()
    if not _BUDGET.fullmatch(value):
        return None
    seconds = float(value) / 1000.0
    return cap if seconds > cap else seconds


def format_budget(seconds: float) -> str:
    """Seconds as a header value: whole milliseconds, rounded down, never below zero, and
    never more than the 15 digits ``parse_budget`` reads (a budget of ~31,700 years)."""
    if not seconds > 0:  # NaN too
        return "0"
    return str(int(min(seconds * 1000.0, _MAX_SENT)))


def check_deadline_header(value: object, what: str = "deadline_header") -> str | None:
    """A header name, or ``None`` (the adapters' ``deadline_header=``, ``criticality_header=``)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"{what} must be a header name or None, got {value!r}")
    return value


def missing_extra(module: str, extra: str) -> str:
    """The message of an adapter imported without its optional dependency."""
    return (
        f"resilience.integrations.{module} needs the {extra!r} extra: "
        f"pip install '{DISTRIBUTION}[{extra}]'"
    )
