"""Redis primitives of ``RedisStore``: scripts, keys, replies, and what an error means.

Everything here is about one exchange with Redis: which script, under which keys, what its
reply says (parsed and range-checked in one place, into typed records), and whether an error
means that the store is unavailable. It knows nothing of breakers' rules or of background work.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import quote

from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError

from ...states import CircuitState
from ..records import LATENCY_BUCKETS

__all__ = [
    "BY_VALUE",
    "SCRIPTS",
    "BadReply",
    "FleetState",
    "FlushReply",
    "Outcomes",
    "ProbeReply",
    "Release",
    "Report",
    "ReportReply",
    "Transition",
    "TransitionReply",
    "error_code",
    "is_noscript",
    "is_readonly",
    "key",
    "number",
    "outage",
    "parse_flush",
    "parse_message",
    "parse_probe",
    "parse_report",
    "parse_transition",
    "real",
    "script_source",
    "text",
]

BY_VALUE = {s.value: s for s in CircuitState}  #: a state as Redis holds it -> CircuitState
MAX_INT = 2**52  # the Lua side's bound: doubles count exactly below it
SCRIPTS = (
    "flush",
    "transition",
    "probe",
    "report",
    "lease",
    "string",
    "shared",
    "status",
    "health",
    "window",
    "share",
    "names",
)
_PRELUDED = ("flush", "transition", "probe", "report", "status", "window")


class BadReply(RedisError):
    """A reply that is not what our scripts answer: treated like any other store failure."""


_SCRIPTS = resources.files(__package__).joinpath("scripts")


def script_source(name: str) -> str:
    """A script's source; the breaker scripts and the window start with the shared prelude."""
    source = _SCRIPTS.joinpath(f"{name}.lua").read_text()
    if name not in _PRELUDED:
        return source
    prelude = _SCRIPTS.joinpath("prelude.lua").read_text()
    return prelude + "\n" + source


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]+").fullmatch  # what percent-escaping leaves as it is


def escape(name: str) -> str:
    """``name`` percent-escaped: only letters, digits and ``_.~-`` stay as they are."""
    return name if _PLAIN(name) else quote(name, safe="")


def key(prefix: str, name: str, suffix: str) -> str:
    """The key ``suffix`` of policy ``name``: ``<prefix>:{<escaped name>}:<suffix>``.

    One hash tag per policy (Cluster: all its keys in one slot), names percent-escaped so no
    name can close the tag or reach another prefix.
    """
    return f"{prefix}:{{{escape(name)}}}:{suffix}"


# --- what an error means ---------------------------------------------------------------------


def is_noscript(exc: BaseException) -> bool:
    """NOSCRIPT: the server lost our scripts (restart, failover); the engine loads them again."""
    return isinstance(exc, NoScriptError)


_CODE = re.compile(r"(?:^|\s-)([A-Z][A-Z_]{2,})\s")


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of an error reply (``READONLY``, ``OOM``, ``NOPERM``, ...).

    An error raised inside one of our scripts arrives wrapped ("Error running script ...
    -READONLY You can't write..."); redis-py maps bare replies to classes and strips the code.
    """
    if isinstance(exc, ReadOnlyError):
        return "READONLY"
    by_class = {
        "OutOfMemoryError": "OOM",
        "NoPermissionError": "NOPERM",
        "BusyLoadingError": "LOADING",
        "AuthenticationError": "NOAUTH",
        "ClusterDownError": "CLUSTERDOWN",
        "TryAgainError": "TRYAGAIN",
        "MasterDownError": "MASTERDOWN",
        "MovedError": "MOVED",
        "AskError": "ASK",
    }.get(type(exc).__name__)
    if by_class is not None:
        return by_class
    if isinstance(exc, ResponseError):
        message = str(exc)
        wrapped = message.rfind(": -")
        match = _CODE.search(message[wrapped + 1 :] if wrapped >= 0 else message + " ")
        return match.group(1) if match else "ERR"
    return None


def is_readonly(exc: BaseException) -> bool:
    """READONLY: we are talking to a replica; connections must be dropped to find the primary."""
    return error_code(exc) == "READONLY"


def outage(exc: BaseException) -> str | None:
    """Why ``exc`` means the store is unavailable, naming the reply; ``None`` if it does not.

    Every Redis error except NOSCRIPT is an outage: a dead or slow server, and equally any
    error reply (LOADING, BUSY, MASTERDOWN, READONLY, OOM, NOPERM, NOAUTH, WRONGPASS,
    CLUSTERDOWN, TRYAGAIN, MOVED/ASK, unknown ones), and a reply we cannot parse.
    """
    if isinstance(exc, NoScriptError):
        return None
    if isinstance(exc, (RedisError, OSError, TimeoutError, EOFError)):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if ": -" in detail:  # an error inside a script: keep the reply itself
            detail = detail[detail.rfind(": -") + 3 :]
        name = error_code(exc) or type(exc).__name__
        if detail.startswith(name):
            return detail[:300]
        return f"{name}: {detail}"[:300] if detail else name
    return None


# --- typed messages between a shared breaker and the engine ----------------------------------


class Outcomes(NamedTuple):
    """One flush of one breaker's buffered outcomes, counted under ``gen``."""

    gen: int
    calls: int
    failures: int
    slow: int
    seq: int  #: per-replica sequence number: a flush sent twice is counted once


class Report(NamedTuple):
    """A half-open probe's outcome, reported at once."""

    gen: int
    lease: int
    failed: bool
    slow: bool


class Release(NamedTuple):
    """A probe lease given back without an outcome (cancelled, or granted too late)."""

    gen: int
    lease: int


class Transition(NamedTuple):
    """A transition a shared breaker wants the fleet to make (compare-and-set by ``expected``
    generation, or unconditionally when ``force``). ``vote``: a quorum breaker's replica
    whose own window tripped asks for OPEN; the fleet opens once ``quorum`` replicas have (a
    vote for CLOSED withdraws it). ``renumber``: no move, the fleet's state numbered above
    the generation this replica reported (see ``SharedBreakerCore.wanted``)."""

    new: CircuitState
    expected: int
    reopens: int = 0
    opened_by: tuple[int, int, int] = (0, 0, 0)
    force: bool = False
    vote: bool = False
    renumber: bool = False


# --- replies, parsed and checked once ---------------------------------------------------------


class FleetState(NamedTuple):
    """A breaker's state as the fleet holds it, with the server's clock at that moment."""

    state: CircuitState
    gen: int
    open_until_ms: int
    reopens: int
    server_ms: int
    reset: int  #: non-zero: garbage was found and reset (reported as ``StoreDataReset``)


class FlushReply(NamedTuple):
    """The fleet's state after a flush, and the shared window's counts."""

    fleet: FleetState
    calls: int
    failures: int
    slow: int


class TransitionReply(NamedTuple):
    """Whether a compare-and-set applied, and the fleet's state after it."""

    fleet: FleetState
    changed: bool
    votes: int = 0  #: a quorum vote: the live votes after it (the fleet opened at quorum)


class ProbeReply(NamedTuple):
    """Whether a probe lease was granted; otherwise how long until one frees. While
    half-open, the probes' counts so far (``done`` probes reported)."""

    fleet: FleetState
    granted: bool
    wait: float  #: seconds
    done: int = 0
    failed: int = 0
    slow: int = 0


class ReportReply(NamedTuple):
    """Whether a probe's outcome counted, and the probes' counts so far (``current``: the
    breaker is still half-open at the report's generation, so the counts are its)."""

    counted: bool
    done: int
    failed: int
    slow: int
    current: bool = False


_BUCKETS = len(LATENCY_BUCKETS)
_NO_CALLS = (0,) * _BUCKETS


def histogram_arg(counts: list[int]) -> str:
    """A latency histogram as a replica reports it: its counts up to the last one that is
    not 0 ("0" for none), joined by commas. Most breakers of a large fleet are idle: their
    reports stay short and cost little to read."""
    n = len(counts)
    while n > 1 and not counts[n - 1]:
        n -= 1
    return ",".join(map(str, counts[:n]))


def parse_histogram(raw: str) -> tuple[int, ...]:
    """``histogram_arg``'s text as one count per ``LATENCY_BUCKETS`` bucket; ``()`` when
    there is none ("") or it has more buckets than that."""
    if raw == "0":
        return _NO_CALLS
    if not raw:
        return ()
    counts = tuple(map(int, raw.split(",")))
    if len(counts) < _BUCKETS:
        return counts + _NO_CALLS[len(counts) :]
    return counts if len(counts) == _BUCKETS else ()


def text(value: Any) -> str:
    """A Redis reply item (bytes or a number) as a str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(reply: Any) -> dict[str, Any]:
    """A flat ``[name, value, name, value, ...]`` reply as a dict."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise BadReply(f"unexpected reply {reply!r:.200}")
    return {text(k): v for k, v in zip(reply[::2], reply[1::2], strict=True)}


def number(value: Any, lo: float = 0, hi: float = MAX_INT) -> int:
    """An integer reply item within ``[lo, hi]``; anything else is a ``BadReply``."""
    if type(value) is int and lo <= value <= hi:  # the usual case: an integer reply
        return value
    return int(real(value, lo, hi))


def real(value: Any, lo: float = -float(MAX_INT), hi: float = float(MAX_INT)) -> float:
    """A decimal reply item within ``[lo, hi]``; nan, inf or text is a ``BadReply``."""
    try:
        n = float(text(value))
    except (TypeError, ValueError, UnicodeDecodeError):
        raise BadReply(f"not a number: {value!r:.80}") from None
    if not math.isfinite(n) or not lo <= n <= hi:
        raise BadReply(f"out of range: {value!r:.80}")
    return n


def _fleet(f: dict[str, Any]) -> FleetState:
    try:
        state = BY_VALUE[text(f["state"])]
        return FleetState(
            state=state,
            gen=number(f["gen"]),
            open_until_ms=number(f["open_until"]),
            reopens=number(f["reopens"]),
            server_ms=number(f["now"]),
            reset=number(f["reset"]),
        )
    except KeyError as exc:
        raise BadReply(f"missing or unknown field {exc}") from None


def parse_flush(reply: Any) -> FlushReply:
    """A ``flush.lua`` reply."""
    f = _fields(reply)
    try:
        return FlushReply(_fleet(f), number(f["calls"]), number(f["failures"]), number(f["slow"]))
    except KeyError as exc:
        raise BadReply(f"missing field {exc}") from None


def parse_transition(reply: Any) -> TransitionReply:
    """A ``transition.lua`` reply."""
    f = _fields(reply)
    votes = number(f.get("votes", 0), 0, 1_000_000)
    return TransitionReply(_fleet(f), bool(number(f.get("changed", 0))), votes)


def parse_probe(reply: Any) -> ProbeReply:
    """A ``probe.lua`` reply."""
    f = _fields(reply)
    wait = number(f.get("wait", 0), -MAX_INT)
    return ProbeReply(
        _fleet(f),
        bool(number(f.get("granted", 0))),
        max(0, wait) / 1000,
        number(f.get("done", 0)),
        number(f.get("failed", 0)),
        number(f.get("slow", 0)),
    )


def parse_report(reply: Any) -> ReportReply:
    """A ``report.lua`` reply."""
    f = _fields(reply)
    try:
        return ReportReply(
            bool(number(f["counted"])),
            number(f["done"]),
            number(f["failed"]),
            number(f["slow"]),
            bool(number(f.get("current", f["counted"]))),
        )
    except KeyError as exc:
        raise BadReply(f"missing field {exc}") from None


def parse_message(data: Any) -> tuple[str, FleetState]:
    """A transition published on the channel: ``gen state open_until reopens now name``."""
    try:
        gen, state, open_until, reopens, server_now, name = text(data).split(" ", 5)
        fleet = FleetState(
            state=BY_VALUE[state],
            gen=number(gen),
            open_until_ms=number(open_until),
            reopens=number(reopens),
            server_ms=number(server_now),
            reset=0,
        )
    except (ValueError, KeyError, UnicodeDecodeError):
        raise BadReply(f"unparsable message {data!r:.200}") from None
    return name, fleet
