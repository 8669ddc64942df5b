"""The Store protocol, and the small records a store returns to status tools.

This module imports no store and no policy, so policies, stores and status tools can all
refer to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ..circuit_state import CircuitState

if TYPE_CHECKING:
    from ..circuit_state import BreakerConfig, BreakerCore
    from ..clock import Clock

__all__ = ["LATENCY_BUCKETS", "MAX_PUBLISHED", "PolicyStatus", "ReplicaReport", "Store"]

#: Upper edges (seconds) of the latency histogram breakers keep (the last bucket is open):
#: bucket ``i`` counts calls that took less than ``LATENCY_BUCKETS[i]`` and at least the edge
#: before it. Powers of two from 0.5 ms to 4 s.
LATENCY_BUCKETS: tuple[float, ...] = (*(0.0005 * 2**i for i in range(14)), float("inf"))

#: the prefix of a fleet-wide health check's keys (its runner's lease, its published result):
#: status tools list such a lease as kind ``"health_check"``, not as a bulkhead
HEALTH_PREFIX = "health:"

#: the longest value a lease's holder may publish (``Store.publish``), in bytes: anything
#: longer found where one is published is garbage
MAX_PUBLISHED = 65_536


def lease_kind(name: str) -> str:
    """What a fleet-wide lease under ``name`` is for: a bulkhead, or a health check's runner."""
    return "health_check" if name.startswith(HEALTH_PREFIX) else "bulkhead"


_Record = TypeVar("_Record")
_Parsed = TypeVar("_Parsed")


def _direct_init(cls: type[_Record]) -> type[_Record]:
    """Give a frozen slots dataclass an ``__init__`` that fills each slot through its
    descriptor: the same signature and defaults, twice as fast as the generated one (which
    calls ``object.__setattr__`` per field). A status of 10,000 names builds 20,000 records."""
    names: dict[str, Any] = {}
    params, body = [], []
    for i, f in enumerate(fields(cls)):  # type: ignore[arg-type]
        if f.default is MISSING:
            params.append(f.name)
        else:
            names[f"_d{i}"] = f.default
            params.append(f"{f.name}=_d{i}")
        names[f"_s{i}"] = cls.__dict__[f.name].__set__
        body.append(f"    _s{i}(self, {f.name})")
    exec(f"def __init__(self, *, {', '.join(params)}):\n" + "\n".join(body), names)
    init = names["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    setattr(cls, "__init__", init)  # noqa: B010 (mypy: no assigning to a method)
    return cls


@_direct_init
@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaReport:
    """One replica's reports on a shared breaker: when it last flushed, and the outcomes it
    has flushed in all (since it started, or since it was silent for ten minutes)."""

    replica: str
    last_seen: float  #: seconds ago
    calls: int
    failures: int
    slow_calls: int
    rejected: int = 0  #: calls this replica's breaker refused (since it started)
    #: sampled call durations, counts per ``LATENCY_BUCKETS`` bucket (since it started)
    latency: tuple[int, ...] = ()


@_direct_init
@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyStatus:
    """A policy as its store sees it.

    ``kind`` is ``"circuit_breaker"``, ``"bulkhead"`` (fleet-wide leases),
    ``"health_check"`` (the lease of the replica running a fleet-wide health check:
    ``in_flight`` 1 while one does), ``"rate_limiter"`` or ``"retry_budget"``; or
    ``"damaged"`` when what the store holds under that name does not parse (``damaged`` says
    why). Breaker fields are ``None`` / 0 for other kinds.
    """

    name: str
    kind: str
    state: CircuitState | None = None
    generation: int | None = None
    calls: int = 0
    failures: int = 0
    slow_calls: int = 0
    retry_after: float | None = None  #: seconds until an open breaker may probe
    probes: int = 0  #: half-open probe leases held
    in_flight: int | None = None  #: leases held (bulkhead)
    tokens: float | None = None  #: retry budget tokens
    replicas: tuple[ReplicaReport, ...] = ()
    local: bool = False  #: this replica's own view (its shared store could not be reached)
    #: an open breaker: the calls, failures and slow calls that opened it
    opened_by: tuple[int, int, int] | None = None
    #: why this entry could not be read (kind ``"damaged"``), else ``None``
    damaged: str | None = None
    #: breakers: calls refused, and sampled call durations per ``LATENCY_BUCKETS`` bucket,
    #: summed over the replicas (running totals: rates come from two readings)
    rejected: int = 0
    latency: tuple[int, ...] = ()
    limit: int | None = None  #: a fleet-wide bulkhead's limit, as last taken
    #: a fleet-wide bulkhead whose replicas adapt their own limits: their sum, as reported
    adaptive_limit: int | None = None

    @property
    def failure_ratio(self) -> float:
        """Failures over calls in the window (0.0 when empty)."""
        return self.failures / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (state as its string value)."""
        data = asdict(self)
        data["state"] = None if self.state is None else self.state.value
        data["failure_ratio"] = self.failure_ratio
        data["opened_by"] = None if self.opened_by is None else list(self.opened_by)
        return data


@runtime_checkable
class Store(Protocol):
    """What policies need from shared state."""

    clock: Clock

    @property
    def degraded(self) -> bool:
        """True while the store cannot reach its backend; policies then go local at once."""

    def breaker(self, name: str, config: BreakerConfig, clock: Clock) -> BreakerCore:
        """The core of breaker ``name``: created on first use, the same object afterwards.

        Raises ``ValueError`` if ``name`` exists with a different configuration.
        """

    def names(self) -> list[str]:
        """The names of the policies this store knows, sorted."""

    async def acquire_lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        """Take one of ``limit`` permits under ``key`` for ``ttl`` seconds, or ``None``."""

    async def release_lease(self, key: str, lease: str) -> bool:
        """Give a permit back; ``False`` if it had expired (or was never taken)."""

    async def renew_lease(self, key: str, lease: str, *, ttl: float) -> bool:
        """Extend an unexpired permit to ``ttl`` seconds from now; ``False`` if it had
        expired (the caller then holds nothing)."""

    async def count_leases(self, key: str) -> int:
        """How many unexpired permits are held under ``key``."""

    async def rate_take(self, key: str, *, interval: float, burst: int) -> float:
        """Take a token from the GCRA bucket ``key``: 0.0 if taken, else seconds to wait."""

    async def rate_take_many(
        self, key: str, *, interval: float, burst: int, want: int
    ) -> tuple[int, float]:
        """Take up to ``want`` tokens at once from the GCRA bucket ``key``: how many were
        taken (as many as the bucket allows now), and, when none was, seconds to wait."""

    async def budget_add(self, key: str, *, delta: float, maximum: float, ttl: float) -> float:
        """Add ``delta`` to the token count ``key`` (starting full), clamped to [0, maximum]."""

    async def lease_share(
        self,
        key: str,
        holder: str,
        *,
        want: int,
        held: int,
        limit: int,
        ttl: float,
        own_limit: int = 0,
        cap: int | None = None,
        had: int = 0,
        settle: float = 0.0,
    ) -> tuple[int, int, int]:
        """Quota leasing: ``holder``'s share of the fleet-wide ``limit`` under ``key``.

        Asks for a share of ``want`` permits (0 gives it back), reporting ``held`` permits in
        use under it, and its own (adaptive) limit now (0: none; status tools sum them).
        Each other live holder counts as the larger of its share and its permits in use (at
        most ``limit``); the share granted never exceeds what they leave free, so the
        permits in use never exceed ``limit``. ``cap``: a share grows only while the
        holders together stay within ``cap`` (a class of calls allowed less than the limit);
        what the holder has it keeps. ``had``: the share the holder believes it still holds;
        when the store no longer knows it (data lost: a restart, a failover, the clock
        jumped) or finds garbage (deleted: an entry expiring further ahead than ``ttl``, the
        clock stepped back), no share grows past what its holder had for ``settle``
        seconds, so every live holder reports its permits again first. The share lasts
        ``ttl`` seconds unless asked again. Returns the share granted, the permits in use
        fleet-wide as last reported, and what the other holders count for.
        """

    async def window_add(
        self, key: str, deltas: Sequence[int], *, window: float, buckets: int = 10
    ) -> tuple[int, ...]:
        """Add ``deltas`` (one count per figure: say requests and accepts) to the current
        bucket of the sliding window ``key`` (``window`` seconds in ``buckets`` buckets) and
        return the window's totals, one per figure. Policies call it from a background task
        to share counts fleet-wide, never on a call's path. Pass zeros to only read."""

    async def cache_get(self, key: str, item: str) -> bytes | None:
        """The value cached under ``item`` for policy ``key``, or ``None``."""

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        """Cache ``value`` under ``item`` for policy ``key`` for ``ttl`` seconds."""

    async def publish(self, key: str, item: str, value: bytes, *, lease: str, ttl: float) -> bool:
        """Publish ``value`` (at most ``MAX_PUBLISHED`` bytes) under ``item`` of policy
        ``key`` for ``ttl`` seconds, as the holder of ``lease`` (taken under ``key``): only if
        that lease is still held, checked and written atomically. ``False``: it is not held
        (expired, or another holder took over), and nothing was written."""

    async def read_published(
        self, key: str, item: str, parse: Callable[[bytes], _Parsed]
    ) -> _Parsed | None:
        """What was published under ``item`` of ``key``, as ``parse`` makes it; ``None`` if
        nothing was (or it expired). A value no holder writes (another type, too long, or
        one that ``parse`` rejects by raising) is deleted and reported, never an outage."""

    async def status(self) -> list[PolicyStatus]:
        """Every policy this store knows, with its state and figures (for status tools)."""

    async def control(self, name: str, state: CircuitState) -> None:
        """Force breaker ``name`` CLOSED, FORCED_OPEN or DISABLED (``KeyError`` if unknown)."""

    async def sync(self) -> None:
        """Push buffered outcomes and pull the latest shared state (no-op when local)."""

    async def aclose(self) -> None:
        """Stop background work and release connections."""
