"""Redis primitives of ``RedisStore``: scripts, keys, replies, and what an error means.

Everything here is about one exchange with Redis: which script, under which keys, what its
reply says (parsed and range-checked in one place, into typed records), and whether an error
means that the store is unavailable. It knows nothing of breakers' rules or of background work.
A parser raises ``BadReply`` for a reply that is not what the script answers (the supervisor
turns that into an outage: ``Supervisor.parsed``).
"""

from __future__ import annotations

import math
import re
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import quote

from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError

from ...checks import YEARS_10, check_seconds
from ...rules.windows import CountWindow, WindowSpec
from ...states import CircuitState
from ..records import LATENCY_BUCKETS

__all__ = [
    "BREAKER_SUFFIXES",
    "BY_VALUE",
    "MAX_TTL",
    "SCRIPTS",
    "BadReply",
    "BreakerKeys",
    "FleetState",
    "FlushReply",
    "Outcomes",
    "ProbeReply",
    "Release",
    "Report",
    "ReportReply",
    "ShareReply",
    "Transition",
    "TransitionReply",
    "WindowArgs",
    "error_code",
    "is_noscript",
    "is_readonly",
    "key",
    "number",
    "outage",
    "parse_flight",
    "parse_flush",
    "parse_gcra_many",
    "parse_message",
    "parse_names",
    "parse_probe",
    "parse_report",
    "parse_share",
    "parse_string",
    "parse_transition",
    "parse_window",
    "real",
    "script_source",
    "text",
    "ttl_ms",
]

MAX_TTL = YEARS_10  #: seconds: ten years is "for ever" for a key's lifetime


def ttl_ms(ttl: object) -> int:
    """A lifetime in whole milliseconds (at least 1, at most ten years)."""
    return max(1, int(min(check_seconds("ttl", ttl), MAX_TTL) * 1000))


BY_VALUE = {s.value: s for s in CircuitState}  #: a state as Redis holds it -> CircuitState
MAX_INT = 2**52  # the Lua side's bound: doubles count exactly below it
SCRIPTS = (
    "config",
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
    "flight",
)
_PRELUDED = ("flush", "transition", "probe", "report", "status", "window", "share", "names")


class BadReply(RedisError):
    """A reply that is not what our scripts answer: treated like any other store failure."""


_SCRIPTS = resources.files(__package__).joinpath("scripts")


def script_source(name: str) -> str:
    """A script's source; the breaker scripts, the window, status, the quota shares (asked
    once per renewal, not per call) and the name registry start with the shared prelude.
    Each call of a script runs the prelude (a closure per function), so the scripts of the
    fleet-wide primitives, called as often as protected calls are made, carry none."""
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


#: the keys of a shared breaker, in the order its scripts take them (``BreakerKeys``)
BREAKER_SUFFIXES = ("state", "win", "probes", "replicas")


class BreakerKeys(NamedTuple):
    """The keys of one shared breaker (one hash tag), in the order ``flush.lua`` takes them."""

    state: str  #: hash: state, generation, open_until, the count window's totals, votes
    window: str  #: the shared window (a list of chunks, or a hash of time buckets)
    probes: str  #: zset: half-open probe leases -> expiry
    replicas: str  #: hash: each replica's reports (status tools)

    @classmethod
    def of(cls, prefix: str, name: str) -> BreakerKeys:
        """The keys of breaker ``name`` under ``prefix``."""
        state, window, probes, replicas = (key(prefix, name, s) for s in BREAKER_SUFFIXES)
        return cls(state, window, probes, replicas)

    @property
    def machine(self) -> tuple[str, str, str]:
        """The state machine's keys (state, window, probes): ``probe.lua`` and
        ``transition.lua`` take these."""
        return self.state, self.window, self.probes


class WindowArgs(NamedTuple):
    """A breaker's window as ``flush.lua`` takes it (ARGV 5 to 7)."""

    kind: str  #: "c": a count window, "t": a time window
    size: int  #: calls (a count window), or buckets (a time window)
    width: str | int  #: a time window's bucket width in ms (exact: may have a fraction); 0

    @classmethod
    def of(cls, window: WindowSpec) -> WindowArgs:
        """The arguments for ``window``: a shared window covers what an in-process one does."""
        if isinstance(window, CountWindow):
            return cls("c", window.size, 0)
        return cls("t", window.buckets, repr(window.seconds * 1000 / window.buckets))


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
    """A Redis reply item (bytes or a number) as a str; bytes that are not UTF-8 are a
    ``BadReply`` (written by someone else), never a ``UnicodeDecodeError``."""
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise BadReply(f"not UTF-8: {value!r:.80}") from None


def _fields(reply: Any) -> dict[str, Any]:
    """A flat ``[name, value, name, value, ...]`` reply as a dict."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise BadReply(f"unexpected reply {reply!r:.200}")
    return {text(k): v for k, v in zip(reply[::2], reply[1::2], strict=True)}


def parse_flight(reply: Any) -> tuple[str, bytes | None]:
    """``flight.lua``'s reply to a join: a holder, and what it published (``None``: not
    yet); anything else is a ``BadReply``."""
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], bytes):
        value = reply[1]
        if value is None or isinstance(value, bytes):
            return reply[0].decode(), value
    raise BadReply(f"unexpected flight reply {reply!r:.200}")


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


# --- the replies of the fleet-wide primitives ------------------------------------------------


class Listed(NamedTuple):
    """A ``names.lua`` reply: the names a registry lists."""

    reset: bool  #: the key held something else: deleted (reported as ``StoreDataReset``)
    names: list[str]


class ShareReply(NamedTuple):
    """A ``share.lua`` reply: a holder's share of a fleet-wide limit."""

    granted: int
    in_use: int  #: permits in use fleet-wide, as last reported
    others: int  #: what the other holders count for
    reset: bool  #: garbage was deleted (reported as ``StoreDataReset``)
    writes: int  #: the script's writes under the key so far (it tells a store gone back)


class Counted(NamedTuple):
    """A ``window.lua`` reply: the window's totals, one per figure."""

    reset: bool  #: data that is not ours was deleted (reported as ``StoreDataReset``)
    totals: tuple[int, ...]


class Stored(NamedTuple):
    """A ``string.lua`` "get" reply: the value under a key."""

    reset: bool  #: another type of key, or a value too long: deleted (``StoreDataReset``)
    value: bytes | None  #: ``None``: there is none


def parse_names(reply: Any) -> Listed:
    """A ``names.lua`` reply."""
    if not isinstance(reply, list) or not reply:
        raise BadReply(f"unexpected names reply {reply!r:.80}")
    names = []
    for item in reply[1:]:
        try:
            names.append(text(item))
        except BadReply:  # no name this library wrote (they are escaped: ASCII): skipped
            continue
    return Listed(bool(number(reply[0])), names)


def parse_share(reply: Any, limit: int) -> ShareReply:
    """A ``share.lua`` reply for a share of at most ``limit``."""
    if not isinstance(reply, list) or len(reply) != 6:
        raise BadReply(f"unexpected share reply {reply!r:.80}")
    granted, in_use, others = number(reply[0], 0, limit), number(reply[1]), number(reply[3])
    return ShareReply(granted, in_use, others, reply[4] == 1, number(reply[5]))


def parse_window(reply: Any, figures: int) -> Counted:
    """A ``window.lua`` reply for a window of ``figures`` figures."""
    if not isinstance(reply, list) or len(reply) != figures + 1:
        raise BadReply(f"unexpected window reply {reply!r:.80}")
    reset, *totals = (number(v) for v in reply)
    return Counted(bool(reset), tuple(totals))


def parse_string(reply: Any) -> Stored:
    """A ``string.lua`` "get" reply."""
    if not isinstance(reply, list) or len(reply) != 2:
        raise BadReply(f"unexpected reply {reply!r:.80}")
    reset, raw = number(reply[0], 0, 1), reply[1]
    if raw is not None and not isinstance(raw, bytes):
        raise BadReply(f"unexpected value {raw!r:.80}")
    return Stored(bool(reset), raw)


def parse_gcra_many(raw: str, want: int) -> tuple[int, float]:
    """A ``shared.lua`` "gcra" reply for ``want`` tokens (its "!" taken off): the tokens
    taken, and (none taken) the seconds until one frees up."""
    took, _, wait = raw.partition(" ")
    try:
        taken = number(int(took), 0, want)
    except ValueError:
        raise BadReply(f"not a count: {took!r:.80}") from None
    return taken, real(wait, 0) / 1000
