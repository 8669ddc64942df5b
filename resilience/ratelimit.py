"""RateLimiter: at most ``rate`` calls per ``per`` seconds, with bursts up to ``burst``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .clock import Clock
from .errors import RateLimitedError
from .events import CallRejected, Listener, emit
from .policy import BasePolicy, Protected, check_int, check_positive, check_seconds

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
    """

    kind = "rate_limiter"

    def __init__(
        self,
        rate: float,
        *,
        per: float = 1.0,
        burst: int | None = None,
        name: str = "rate_limiter",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self.rate = check_positive("rate", rate)
        self.per = check_seconds("per", per)
        self.burst = max(1, math.ceil(self.rate)) if burst is None else check_int("burst", burst)
        self.interval = self.per / self.rate
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

    def _wrap(self, fn: Protected) -> Protected:
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
