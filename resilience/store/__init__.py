"""Where policies keep the state that several policy objects (or replicas) share.

A store hands out one ``BreakerCore`` per breaker name, so every ``CircuitBreaker`` with that
name and store shares one state machine, and provides expiring leases (a bounded set of
permits whose holders may die), and the small atomic primitives of the fleet-wide policies
(a GCRA bucket, a token budget, a value cache). ``MemoryStore`` keeps all of it in this
process; ``RedisStore`` shares it. A primitive that cannot reach its backend raises
``StoreUnavailableError``; policies then carry on with local state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .memory import MemoryStore

if TYPE_CHECKING:
    from ..circuit_state import BreakerConfig, BreakerCore, CircuitState
    from ..clock import Clock
    from ..status import PolicyStatus

__all__ = ["MemoryStore", "Store"]


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

    async def count_leases(self, key: str) -> int:
        """How many unexpired permits are held under ``key``."""

    async def rate_take(self, key: str, *, interval: float, burst: int) -> float:
        """Take a token from the GCRA bucket ``key``: 0.0 if taken, else seconds to wait."""

    async def budget_add(self, key: str, *, delta: float, maximum: float, ttl: float) -> float:
        """Add ``delta`` to the token count ``key`` (starting full), clamped to [0, maximum]."""

    async def cache_get(self, key: str, item: str) -> bytes | None:
        """The value cached under ``item`` for policy ``key``, or ``None``."""

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        """Cache ``value`` under ``item`` for policy ``key`` for ``ttl`` seconds."""

    async def status(self) -> list[PolicyStatus]:
        """Every policy this store knows, with its state and figures (for status tools)."""

    async def control(self, name: str, state: CircuitState) -> None:
        """Force breaker ``name`` CLOSED, FORCED_OPEN or DISABLED (``KeyError`` if unknown)."""

    async def sync(self) -> None:
        """Push buffered outcomes and pull the latest shared state (no-op when local)."""

    async def aclose(self) -> None:
        """Stop background work and release connections."""
