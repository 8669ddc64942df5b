"""What both stores share: ``async with``, the checks of the primitives' arguments (so every
store raises the same error for the same bad input, at the call, before any I/O), and a
breaker's status record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from ..checks import check_counts, check_int, check_name, check_seconds
from ..errors import ExcType, Traceback
from .records import MAX_PUBLISHED, PolicyStatus

if TYPE_CHECKING:
    from ..rules.breaker import BreakerConfig, BreakerCore

__all__ = [
    "StoreBase",
    "breaker_status",
    "check_config",
    "check_published",
    "check_share",
    "check_window",
]


class StoreBase:
    """The base of ``MemoryStore`` and ``RedisStore``: ``async with store:`` closes it."""

    __slots__ = ()

    async def aclose(self) -> None:
        """Stop background work and release connections (nothing, unless overridden)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        await self.aclose()


def check_config(core: BreakerCore, config: BreakerConfig) -> None:
    """A breaker asked for again must be configured as it was (in code: its live settings
    may have changed since)."""
    if config != core.base:
        raise ValueError(
            f"breaker {core.name!r} already exists in this store with another configuration: "
            f"{core.base} != {config}"
        )


def check_share(
    key: str,
    holder: str,
    *,
    want: int,
    held: int,
    limit: int,
    own_limit: int,
    cap: int | None,
    had: int,
) -> int:
    """``Store.lease_share``'s arguments but its durations; the cap (``limit`` if ``None``)."""
    check_name(key, "key")
    check_name(holder, "holder")
    check_int("want", want, minimum=0)
    check_int("held", held, minimum=0)
    check_int("limit", limit)
    check_int("own_limit", own_limit, minimum=0)
    cap = limit if cap is None else check_int("cap", cap)
    check_int("had", had, minimum=0)
    return cap


def check_window(key: str, deltas: Sequence[int], window: float, buckets: int) -> tuple[int, ...]:
    """``Store.window_add``'s arguments; the deltas as a tuple."""
    check_name(key, "key")
    counts = check_counts("deltas", deltas)
    check_seconds("window", window)
    check_int("buckets", buckets)
    return counts


def check_published(key: str, value: bytes) -> None:
    """``Store.publish``'s policy name and value (at most ``MAX_PUBLISHED`` bytes)."""
    check_name(key, "key")
    if len(value) > MAX_PUBLISHED:
        raise ValueError(f"value must be at most {MAX_PUBLISHED} bytes, got {len(value)}")


def breaker_status(
    core: BreakerCore, now: float, *, probes: int = 0, local: bool = False
) -> PolicyStatus:
    """Breaker ``core`` as this process sees it at ``now`` (``local``: as a shared store's
    replica sees it while its backend cannot answer)."""
    m = core.metrics(now)
    return PolicyStatus(
        name=core.name,
        kind="circuit_breaker",
        state=m.state,
        generation=m.generation,
        calls=m.calls,
        failures=m.failures,
        slow_calls=m.slow_calls,
        retry_after=m.retry_after,
        probes=probes,
        local=local,
        opened_by=m.opened_by,
        rejected=core.rejected,
        latency=tuple(core.latency),
    )
