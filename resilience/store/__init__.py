"""Where policies keep the state that several policy objects (or replicas) share.

A store hands out one ``BreakerCore`` per breaker name, so every ``CircuitBreaker`` with that
name and store shares one state machine, and provides expiring leases (a bounded set of
permits whose holders may die). ``MemoryStore`` keeps all of it in this process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .memory import MemoryStore

if TYPE_CHECKING:
    from ..circuit import BreakerConfig, BreakerCore
    from ..clock import Clock

__all__ = ["MemoryStore", "Store"]


@runtime_checkable
class Store(Protocol):
    """What policies need from shared state."""

    clock: Clock

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

    async def sync(self) -> None:
        """Push buffered outcomes and pull the latest shared state (no-op when local)."""

    async def aclose(self) -> None:
        """Stop background work and release connections."""
