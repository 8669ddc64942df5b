"""RateLimiter: at most ``rate`` calls per ``per`` seconds, with bursts up to ``burst``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .clock import Clock
from .errors import RateLimitedError, StoreUnavailableError
from .events import CallRejected, Listener, emit
from .policy import (
    BasePolicy,
    Protected,
    check_fleet_name,
    check_int,
    check_positive,
    check_seconds,
    check_store,
    store_down,
)

if TYPE_CHECKING:
    from .store.protocol import Store

__all__ = ["RateLimiter", "gcra"]

_EPSILON = 1e-9


def gcra(tat: float, now: float, interval: float, burst: int) -> tuple[float, float]:
    """One take from a GCRA bucket: ``(new_tat, 0.0)`` if allowed, else ``(tat, retry_after)``.

    ``tat`` is the theoretical arrival time; a call is allowed while it is less than
    ``burst - 1`` intervals ahead of ``now``.
    """
    base = tat if tat > now else now
    wait = base - now - (burst - 1) * interval
    if wait > _EPSILON:
        return tat, wait
    return base + interval, 0.0


class RateLimiter(BasePolicy):
    """Admits ``rate`` calls per ``per`` seconds, evenly, allowing bursts of ``burst``.

    A generic cell rate algorithm (GCRA): one float of state, O(1) per call. ``burst``
    defaults to ``ceil(rate)``, a full period's worth. Calls over the limit fail at once with
    ``RateLimitedError`` whose ``retry_after`` says when a token frees up.

    With ``store=`` the bucket is shared by every limiter of that name on the store (every
    replica, through ``RedisStore``): each call is one ``store.rate_take``. When the store
    cannot answer, the call is admitted or rejected by this object's local bucket instead.
    """

    kind = "rate_limiter"

    def __init__(
        self,
        rate: float,
        *,
        per: float = 1.0,
        burst: int | None = None,
        store: Store | None = None,
        name: str = "rate_limiter",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self.rate = check_positive("rate", rate)
        self.per = check_seconds("per", per)
        self.burst = max(1, math.ceil(self.rate)) if burst is None else check_int("burst", burst)
        interval = self.per / self.rate
        if not (math.isfinite(interval) and interval > 0):
            # RateLimiter(1e-310) would make every interval inf (and 1e308 per 1e-300, zero):
            # a limiter that admits everything
            raise ValueError(
                f"rate / per must give a usable interval between calls, got rate={rate!r}, "
                f"per={per!r} ({interval!r} s between calls)"
            )
        self.interval = interval
        self.store = check_store("store", store, "rate_take")
        check_fleet_name("RateLimiter", self.name, "rate_limiter", self.store)
        self._tat = -math.inf

    def __repr__(self) -> str:
        return (
            f"RateLimiter({self.rate:g}, per={self.per:g}, burst={self.burst}, name={self.name!r})"
        )

    def try_acquire(self) -> float:
        """Take a token: 0.0 if taken, else the seconds until one frees up."""
        self._tat, wait = gcra(self._tat, self._clock.monotonic(), self.interval, self.burst)
        return wait

    def _rejected(self, wait: float) -> RateLimitedError:
        error = RateLimitedError(self.name, wait)
        if self._listeners:
            emit(self._listeners, CallRejected(name=self.name, policy=self.kind, error=error))
        return error

    async def _take_shared(self, store: Store) -> float:
        """One take from the fleet's bucket; the local bucket when the store is down."""
        if not store_down(store):
            try:
                return await store.rate_take(self.name, interval=self.interval, burst=self.burst)
            except StoreUnavailableError:
                pass
        return self.try_acquire()

    def _wrap(self, fn: Protected) -> Protected:
        if self.store is not None:
            return self._wrap_shared(fn, self.store)
        monotonic = self._clock.monotonic
        interval = self.interval
        slack = (self.burst - 1) * interval + _EPSILON
        rejected = self._rejected

        async def protected(*args: Any, **kwargs: Any) -> Any:
            now = monotonic()
            tat = self._tat
            if tat < now:
                tat = now
            if tat - now > slack:
                raise rejected(tat - now - slack + _EPSILON)
            self._tat = tat + interval
            return await fn(*args, **kwargs)

        return protected

    def _wrap_shared(self, fn: Protected, store: Store) -> Protected:
        take = self._take_shared
        rejected = self._rejected

        async def protected(*args: Any, **kwargs: Any) -> Any:
            wait = await take(store)
            if wait > 0.0:
                raise rejected(wait)
            return await fn(*args, **kwargs)

        return protected
