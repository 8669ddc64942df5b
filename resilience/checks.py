"""Input checks shared by every constructor: a clear ``TypeError`` or ``ValueError`` naming
the argument and the value, never a late failure. Pure functions; this module imports nothing
of the package, so any module may use it."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

__all__ = [
    "check_bool",
    "check_finite",
    "check_fleet_name",
    "check_int",
    "check_name",
    "check_positive",
    "check_ratio",
    "check_seconds",
    "is_shared",
    "store_down",
]


def check_name(name: object, what: str = "name") -> str:
    """A policy name: a non-empty string."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {name!r}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    return name


YEARS_10 = 10 * 365 * 86_400.0
"""Ten years in seconds: the longest a duration that a store keeps in milliseconds may be
(an ``open_for``, a ``probe_lease``, the interval between a rate limiter's calls)."""


def check_seconds(
    what: str,
    value: object,
    *,
    none: bool = False,
    zero: bool = False,
    maximum: float = math.inf,
) -> Any:
    """A duration in seconds: a finite number > 0 (or >= 0 with ``zero``; ``None`` allowed),
    at most ``maximum``."""
    if value is None and none:
        return None
    seconds = _number(what, value, "a number of seconds")
    if not _finite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{what} must be finite and {bound}, got {value!r}")
    if seconds > maximum:
        raise ValueError(f"{what} must be at most {maximum:g} s, got {value!r}")
    return float(seconds)


def check_positive(what: str, value: object) -> float:
    """A finite number > 0 (a rate, a count per period)."""
    number = _number(what, value)
    if not (_finite(number) and number > 0):
        raise ValueError(f"{what} must be finite and > 0, got {value!r}")
    return float(number)


def check_finite(what: str, value: object) -> float:
    """A finite number, of any sign (a budget that may be spent already)."""
    number = _number(what, value)
    if not _finite(number):
        raise ValueError(f"{what} must be finite (not NaN nor infinite), got {value!r}")
    return float(number)


def _number(what: str, value: object, kind: str = "a number") -> int | float:
    """``value`` if it is an int or a float (not a bool); else ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be {kind}, got {value!r}")
    return value


def _finite(value: int | float) -> bool:
    """Whether ``value`` is finite (an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


#: The largest int any setting takes unless it names a smaller bound: the largest a float holds
#: exactly, so arithmetic that mixes it with seconds never overflows or rounds it away.
MAX_INT = 2**53


def check_int(what: str, value: object, *, minimum: int = 1, maximum: int = MAX_INT) -> int:
    """An int no smaller than ``minimum`` and no larger than ``maximum`` (:data:`MAX_INT`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{what} must be <= {maximum:,}, got {value!r}")
    return value


def check_mapping(what: str, value: object, known: Collection[str]) -> Mapping[str, Any]:
    """A mapping whose keys are all in ``known``: a ``TypeError`` if ``value`` is not a mapping,
    a ``ValueError`` naming the unknown keys and the known ones."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {value!r}")
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(
            f"{what} has unknown keys {sorted(map(str, unknown))}; known: {sorted(known)}"
        )
    return value


def check_bool(what: str, value: object) -> bool:
    """A real ``bool``: ``"false"``, ``0`` or ``None`` are refused, never judged by truthiness."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


def check_ratio(what: str, value: object) -> float:
    """A ratio in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:  # also rejects NaN
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


def check_counts(what: str, values: object) -> tuple[int, ...]:
    """A non-empty sequence of whole counts >= 0 (say a window's deltas)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a sequence of ints, got {values!r}")
    counts = tuple(values)
    if not counts:
        raise ValueError(f"{what} must not be empty")
    for v in counts:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{what} must hold ints, got {v!r}")
        if v < 0:
            raise ValueError(f"{what} must be >= 0, got {v!r}")
    return counts


# --- stores, by what they say of themselves (duck-typed: no store is imported) -------------


def store_down(store: object) -> bool:
    """True while a store says it cannot reach its backend (``RedisStore.degraded``).

    Policies then go local at once instead of waiting for each primitive to time out; the
    store reconnects in the background.
    """
    return getattr(store, "degraded", False) is True  # duck-typed stores may lack it


def is_shared(store: object) -> bool:
    """Whether ``store`` is seen by other processes: what its ``shared`` attribute says
    (``MemoryStore``: ``False``, ``RedisStore``: ``True``); a store that does not say is taken
    as shared."""
    shared = getattr(store, "shared", True)
    return shared if isinstance(shared, bool) else True


def check_fleet_name(what: str, name: str, default: str, store: object) -> None:
    """Refuse a fleet-wide policy that keeps its default ``name`` on a shared store.

    Two services on one Redis that both kept ``name="bulkhead"`` would share one limit: a
    spike in one makes the other shed load. A name that says whose limit it is is required.
    """
    if store is not None and name == default and is_shared(store):
        raise ValueError(
            f"{what} on a shared store needs a name of its own (name={default!r} is the "
            f"default, shared by every service on that store): pass name='<service>:<what>'"
        )
