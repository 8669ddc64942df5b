"""What status tools read: every policy a store knows, with its state and figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .circuit_state import CircuitState

if TYPE_CHECKING:
    from .store import Store

__all__ = ["PolicyStatus", "ReplicaReport", "status"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaReport:
    """One replica's reports on a shared breaker: when it last flushed, and the outcomes it
    has flushed in all (since it started, or since it was silent for ten minutes)."""

    replica: str
    last_seen: float  #: seconds ago
    calls: int
    failures: int
    slow_calls: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyStatus:
    """A policy as its store sees it.

    ``kind`` is ``"circuit_breaker"``, ``"bulkhead"`` (fleet-wide leases),
    ``"rate_limiter"`` or ``"retry_budget"``; or ``"damaged"`` when what the store holds under
    that name does not parse (``damaged`` says why). Breaker fields are ``None`` / 0 for
    other kinds.
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


async def status(store: Store) -> list[PolicyStatus]:
    """Every policy ``store`` knows (fleet-wide for a shared store), sorted by name and kind."""
    return sorted(await store.status(), key=lambda s: (s.name, s.kind))
