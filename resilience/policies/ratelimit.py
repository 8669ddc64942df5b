"""RateLimiter: at most ``rate`` calls per ``per`` seconds, with bursts up to ``burst``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..checks import YEARS_10, check_fleet_name, store_down
from ..clock import Clock
from ..errors import RateLimitedError, StoreUnavailableError
from ..events import CallRejected, Listener, emit
from ..forks import reset_in_child
from ..rules.gcra import EPSILON as _EPSILON
from ..rules.gcra import gcra
from ..store.config import Schema, follow, register_schema
from .base import BasePolicy, Protected, check_int, check_positive, check_seconds, check_store

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["RateLimiter"]


def _rate(rate: object, per: float, burst: object) -> tuple[float, int, float]:
    """A limiter's rate, burst (``None``: the rate, rounded up) and interval between calls."""
    checked = check_positive("rate", rate)
    burst = max(1, math.ceil(checked)) if burst is None else check_int("burst", burst)
    interval = per / checked
    if not (math.isfinite(interval) and 0 < interval <= YEARS_10):
        # RateLimiter(1e-310) would make every interval inf (and 1e308 per 1e-300, zero):
        # a limiter that admits everything; a store keeps the interval in milliseconds,
        # ten years at most
        raise ValueError(
            f"rate / per must give a usable interval between calls, got rate={rate!r}, "
            f"per={per!r} ({interval!r} s between calls)"
        )
    return checked, burst, interval


class RateLimiter(BasePolicy):
    """Admits ``rate`` calls per ``per`` seconds, evenly, allowing bursts of ``burst``.

    A generic cell rate algorithm (GCRA): one float of state, O(1) per call. ``burst``
    defaults to ``ceil(rate)``, a full period's worth. Calls over the limit fail at once with
    ``RateLimitedError`` whose ``retry_after`` says when a token frees up.

    With ``store=`` the bucket is shared by every limiter of that name on the store (every
    replica, through ``RedisStore``): each call is one ``store.rate_take``. With ``ahead``
    seconds as well (say 0.05), tokens are taken from the fleet's bucket in batches (as many
    as it allows now, up to what this limiter spent per ``ahead`` lately) and spent here
    within ``ahead`` or dropped:
    a busy replica then asks the store about once per batch, not once per call. A token is
    used at most ``ahead`` after the fleet's bucket counted it, so over any period the fleet
    admits at most ``rate * ahead`` more than without batches. When the store cannot
    answer, the call is admitted or rejected by this object's local bucket instead.
    """

    kind = "rate_limiter"

    def __init__(
        self,
        rate: float,
        *,
        per: float = 1.0,
        burst: int | None = None,
        store: Store | None = None,
        ahead: float = 0.0,
        name: str = "rate_limiter",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self.per = check_seconds("per", per)
        self.rate, self.burst, self.interval = _rate(rate, self.per, burst)
        self._slack = (self.burst - 1) * self.interval + _EPSILON  # the burst, in seconds
        self.ahead = check_seconds("ahead", ahead, zero=True)
        if self.ahead > self.per:
            # tokens held longer than a period would let the fleet admit more than twice its
            # rate (and ahead=1e308 would overflow a batch's size)
            raise ValueError(
                f"ahead must be at most per ({self.per:g} s): tokens taken ahead are spent "
                f"within one period, got {ahead!r}"
            )
        needs = ("rate_take", "rate_take_many") if self.ahead else ("rate_take",)
        self.store = check_store("store", store, *needs)
        check_fleet_name("RateLimiter", self.name, "rate_limiter", self.store)
        self._tat = -math.inf
        self._ahead = 0  # tokens taken ahead from the fleet's bucket, not used yet
        self._ahead_until = -math.inf  # ... usable until then
        self._batch = 1  # tokens asked for last time
        self._taken = 0  # tokens the last batch brought
        self._asked_at = -math.inf
        self._asking: asyncio.Future[None] | None = None
        self._waiting = 0  # calls waiting on the ask under way
        self._handed = 0  # tokens an ask set aside for the calls that waited on it
        self._wait: float = self.interval  # the wait a call refused after two asks is told
        if self.ahead and self.store is not None:
            reset_in_child(self)
        # a burst left out follows the rate (live changes of the rate too): None, not derived
        self._code = {"rate": self.rate, "burst": burst}
        follow(self)

    def _live_base(self) -> dict[str, Any]:
        """Its live settings in code (and ``per``, which ``rate`` counts in)."""
        return {**self._code, "per": self.per}

    def _live_apply(self, values: dict[str, Any]) -> str:
        """Calls from now on are admitted at ``rate`` per ``per`` with bursts of ``burst``; the
        tokens this replica owes are kept, counted at the new rate."""
        rate, burst, interval = _rate(values["rate"], self.per, values["burst"])
        now = self._clock.monotonic()
        if self._tat > now:
            self._tat = now + (self._tat - now) * interval / self.interval
        self.rate, self.burst, self.interval = rate, burst, interval
        self._slack = (burst - 1) * interval + _EPSILON
        return ""

    def _forked(self) -> None:
        """In a forked child: the tokens the parent took ahead are the parent's."""
        self._ahead, self._taken = 0, 0
        self._ahead_until = self._asked_at = -math.inf
        self._asking = None
        self._waiting = self._handed = 0

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

    async def _take_ahead(self, store: Store) -> float:
        """A token taken ahead from the fleet's bucket, else a batch from it (one store call
        for the calls that need one at the same time); the local bucket when it is down.

        A call waits on at most two store calls: the one under way when it came (which may
        not have counted it), then one that counts every call still waiting (its own, or
        another's sent since), whose tokens are set aside for the calls it counted. If those
        left nothing for it, the fleet's bucket is empty for now: it is refused with the last
        answer's wait, never sent to wait a third time.
        """
        waited = 0
        while True:
            now = self._clock.monotonic()
            if self._ahead and now < self._ahead_until:
                self._ahead -= 1
                return 0.0
            asking = self._asking
            if waited == 2:
                return self._wait
            if asking is None:
                break
            self._waiting += 1
            try:
                await asyncio.shield(asking)
            finally:
                self._waiting -= 1
            waited += 1
            if self._handed:  # set aside for the calls that waited on that ask
                self._handed -= 1
                return 0.0
        if store_down(store):
            return self.try_acquire()
        # the next batch: what this limiter spent per ``ahead`` since the last one (growing
        # at most fourfold at a time), so a busy replica asks about once per ``ahead``, and
        # at least one token for each call waiting
        spent = self._taken - self._ahead
        elapsed = max(now - self._asked_at, 1e-6)
        wanted = math.ceil(spent / elapsed * self.ahead) if spent > 0 else 1
        wanted = max(min(wanted, 4 * self._batch), 1 + self._waiting)
        self._batch = max(1, min(self.burst, wanted))
        self._asked_at = now
        counted = self._waiting  # the calls waiting now: this ask's tokens are theirs first
        asking = asyncio.get_running_loop().create_future()
        self._asking = asking
        try:
            took, wait = await store.rate_take_many(
                self.name, interval=self.interval, burst=self.burst, want=self._batch
            )
        except StoreUnavailableError:
            return self.try_acquire()
        finally:
            # each answer sets aside tokens for the calls that waited on it, and drops what
            # was set aside before (for calls cancelled before they woke): a token is spent
            # only right after the fleet's bucket counted it
            self._handed = 0
            self._asking = None
            asking.set_result(None)
        if not took:
            self._ahead = self._taken = 0
            self._wait = max(wait, _EPSILON)
            return self._wait
        self._taken = took
        handed = min(took - 1, counted)  # not for calls that came after them
        self._handed = handed
        self._ahead, self._ahead_until = took - 1 - handed, now + self.ahead
        self._wait = self.interval  # what a call that finds the batch spent is told
        return 0.0

    def _wrap(self, fn: Protected) -> Protected:
        if self.store is not None:
            return self._wrap_shared(fn, self.store)
        monotonic = self._clock.monotonic
        rejected = self._rejected

        async def protected(*args: Any, **kwargs: Any) -> Any:
            now = monotonic()
            tat = self._tat
            if tat < now:
                tat = now
            slack = self._slack  # read per call: live settings change it between calls
            if tat - now > slack:
                raise rejected(tat - now - slack + _EPSILON)
            self._tat = tat + self.interval
            return await fn(*args, **kwargs)

        return protected

    def _wrap_shared(self, fn: Protected, store: Store) -> Protected:
        rejected = self._rejected
        if self.ahead:
            take_ahead = self._take_ahead
            monotonic = self._clock.monotonic

            async def ahead(*args: Any, **kwargs: Any) -> Any:
                if self._ahead and monotonic() < self._ahead_until:  # a token taken ahead
                    self._ahead -= 1
                else:
                    wait = await take_ahead(store)
                    if wait > 0.0:
                        raise rejected(wait)
                return await fn(*args, **kwargs)

            return ahead
        take = self._take_shared

        async def protected(*args: Any, **kwargs: Any) -> Any:
            wait = await take(store)
            if wait > 0.0:
                raise rejected(wait)
            return await fn(*args, **kwargs)

        return protected


register_schema(
    Schema(
        "rate_limiter",
        ("rate", "burst"),
        lambda values, base: RateLimiter(**{"rate": 1.0, **values}),
    )
)
