"""The Store protocol: what policies need from shared state.

This module imports no store and no policy, so policies, stores and status tools can all
refer to it. The records a store returns to status tools are in ``records``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from ..states import CircuitState
from .records import PolicyStatus

if TYPE_CHECKING:
    from ..clock import Clock
    from ..rules.breaker import BreakerConfig, BreakerCore

__all__ = ["Store", "status"]

_Parsed = TypeVar("_Parsed")


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
        seconds, so every live holder reports its permits again first. A shared store also
        settles when it has gone back in time (restarted empty or from an old snapshot), as
        it can tell from what this replica saw of the key. The share lasts
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


async def status(store: Store) -> list[PolicyStatus]:
    """Every policy ``store`` knows (fleet-wide for a shared store), sorted by name and kind."""
    return sorted(await store.status(), key=lambda s: (s.name, s.kind))
