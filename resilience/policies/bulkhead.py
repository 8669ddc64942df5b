"""Bulkhead: at most ``max_concurrent`` calls in flight (or an adaptive limit); a bounded
queue may wait for a slot; with a permit source, a fleet-wide limit on top.

A call goes through the same steps whichever way it is protected (decorated, ``call``,
``async with``): a local slot (waiting in the queue if it may), a fleet-wide permit from the
bulkhead's ``PermitSource`` (if it has one), the call, a sample for the adaptive limit (if
any), and the slot and the permit given back. The wrapper runs the steps' no-I/O paths
inline (a free slot, a permit at hand) and calls the steps for the rest.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..checks import check_fleet_name, store_down
from ..clock import Clock
from ..errors import BulkheadFullError, ExcType, RejectedError, StoreUnavailableError, Traceback
from ..events import CallRejected, Listener, emit
from ..rules.limits import AdaptiveLimit, Limiter
from ..store.config import Schema, follow, register_schema
from .base import BasePolicy, Protected, check_bool, check_int, check_seconds, check_store
from .permits import FleetLeases, FleetShare, PermitSource, check_lease, check_permits

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["Bulkhead"]


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Bulkhead(BasePolicy):
    """Limits concurrency: ``max_concurrent`` calls run, ``max_waiting`` more may queue.

    A call that finds every slot taken waits in FIFO order if fewer than ``max_waiting``
    calls are already waiting, for at most ``max_wait`` seconds (``None``: as long as it
    takes); otherwise it fails at once with ``BulkheadFullError``. Slots are released however
    the call ends, cancellation included; a waiter cancelled just as it was handed a slot
    passes the slot on.

    With ``permits=`` (a ``PermitSource``: ``FleetLeases``, ``FleetShare``) each call also
    takes one of the fleet's ``permits.limit`` permits besides its local slot, and always
    gives it back; a full fleet rejects at once (waiting for a fleet-wide permit is not
    supported: ``max_waiting`` must be 0). When the store cannot answer, the call goes on
    under the local limit only. ``max_concurrent`` is then the local limit (by default the
    fleet's). ``distributed=True`` with a ``store`` is the shorthand for
    ``permits=FleetLeases(store, name, limit=max_concurrent, ttl=lease)``, and with
    ``shares=True`` as well for ``permits=FleetShare(...)`` with the same options: a call
    takes and returns a permit with no store call, the store is asked only to grow the share
    (checked once a second against its peak use, renewed every 4 seconds, given back within
    ``lease`` if the replica dies, and at once by ``aclose()``), and a permit freed here
    reaches other replicas at the next renewal. ``lease`` must outlive a renewal that fails
    (``shortest_lease``: at least 1 s and 6 store timeouts), and ``max_concurrent`` is at
    most ``MAX_PERMITS``.

    With ``limit=AdaptiveLimit(...)`` the number of slots follows the latency of the calls
    (see ``resilience.adaptive``): each call that returns, or fails with a timeout or a
    rejection from further down (an overload signal), is one sample; other errors and
    cancellations teach nothing. ``current_limit`` is the limit now. With fleet-wide
    permits the adaptive limit stays local to each replica (no store round trip to adapt)
    under the fleet's cap (``max_concurrent`` with ``distributed=True``).
    """

    kind = "bulkhead"

    def __init__(
        self,
        max_concurrent: int | None = None,
        *,
        limit: AdaptiveLimit | None = None,
        max_waiting: int = 0,
        max_wait: float | None = None,
        permits: PermitSource | None = None,
        distributed: bool = False,
        store: Store | None = None,
        lease: float = 30.0,
        shares: bool = False,
        name: str = "bulkhead",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        if limit is not None and not isinstance(limit, AdaptiveLimit):
            raise TypeError(f"limit must be an AdaptiveLimit or None, got {limit!r}")
        if permits is not None and not isinstance(permits, PermitSource):
            raise TypeError(
                f"permits must be a PermitSource (FleetLeases, FleetShare) or None, got {permits!r}"
            )
        if limit is None and max_concurrent is None and permits is None:
            raise TypeError("Bulkhead needs max_concurrent (a number) or limit=AdaptiveLimit(...)")
        fleet_cap = distributed or permits is not None
        if limit is not None and max_concurrent is not None and not distributed:
            raise ValueError(
                "give max_concurrent or limit=, not both (with distributed=True, "
                "max_concurrent is the fleet-wide cap over the adaptive local limit; with "
                "permits=, the cap is permits.limit)"
            )
        if limit is not None and distributed and max_concurrent is None:
            raise ValueError(
                "distributed=True with an adaptive limit needs max_concurrent: the fleet-wide "
                "cap on permits (each replica adapts its own limit under it)"
            )
        self.limit = limit
        self._limiter: Limiter | None = None if limit is None else limit.limiter()
        if max_concurrent is not None:
            self.max_concurrent = (
                check_permits("max_concurrent", max_concurrent)
                if fleet_cap
                else check_int("max_concurrent", max_concurrent)
            )
        elif permits is not None:  # the fleet's limit, local too (or the adaptive cap)
            self.max_concurrent = permits.limit
        else:  # adaptive, local: the most it will ever allow
            assert limit is not None
            self.max_concurrent = limit.max_limit
        self._limit_now = self.max_concurrent if limit is None else limit.initial
        self.max_waiting = check_int("max_waiting", max_waiting, minimum=0)
        self.max_wait: float | None = check_seconds("max_wait", max_wait, none=True, zero=True)
        self.distributed = check_bool("distributed", distributed)
        self.store = check_store("store", store, "acquire_lease", "release_lease", "renew_lease")
        self.lease: float = check_seconds("lease", lease)
        self.shares = check_bool("shares", shares)
        if permits is not None and (distributed or shares or self.store is not None):
            raise ValueError(
                "give permits= or distributed=True (with store=, lease=, shares=), not both: "
                "those build the permit source"
            )
        if fleet_cap and self.max_waiting:
            raise ValueError(
                f"max_waiting must be 0 with fleet-wide permits, got {max_waiting!r}: "
                "they are not waited for (the call is rejected at once)"
            )
        if distributed:
            permits = self._shorthand(self.store)
        elif self.store is not None:
            raise ValueError("store= is only used with distributed=True")
        elif shares:
            raise ValueError("shares=True needs distributed=True (and a store)")
        #: where each call takes a fleet-wide permit (``None``: the local limit only)
        self.permits: PermitSource | None = permits
        if permits is not None and limit is not None:
            permits.own_limit = self._limit_now  # reported with a share's renewals
        self._active = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._held: dict[asyncio.Task[Any] | None, list[tuple[object, float]]] = {}
        self._code = {"max_concurrent": self.max_concurrent, "max_waiting": self.max_waiting}
        follow(self)

    def _live_base(self) -> dict[str, Any]:
        """Its live settings in code, and whether its limit is adaptive or fleet-wide."""
        return {**self._code, "adaptive": self.limit is not None, "fleet": self.permits is not None}

    def _live_apply(self, values: dict[str, Any]) -> str:
        """Calls from now on are held to ``max_concurrent`` (a fleet-wide bulkhead's permits
        too) and ``max_waiting``; a larger limit lets waiting calls in at once, a smaller one
        takes slots back as calls end."""
        limit, waiting = _live_limits(self._live_base(), values)
        self.max_concurrent, self.max_waiting = limit, waiting
        if self.limit is None:
            self._limit_now = limit
        if self.permits is not None:
            self.permits.limit = limit
        while self._waiters and self._active < self._limit_now:
            fut = self._waiters.popleft()
            if not fut.done():
                self._active += 1
                fut.set_result(True)
        return ""

    def _shorthand(self, store: Store | None) -> PermitSource:
        """The permit source ``distributed=True`` (and ``shares=True``) stand for."""
        if store is None:
            raise ValueError("distributed=True needs a store= to share the permits through")
        check_lease("lease", self.lease, store)
        check_fleet_name("Bulkhead(distributed=True)", self.name, "bulkhead", store)
        if self.shares:
            check_store("store", store, "lease_share")
            return FleetShare(
                store, self.name, limit=self.max_concurrent, ttl=self.lease, clock=self._clock
            )
        return FleetLeases(
            store, self.name, limit=self.max_concurrent, ttl=self.lease, clock=self._clock
        )

    def __repr__(self) -> str:
        if self.limit is not None:
            return f"Bulkhead(limit={self.limit!r}, name={self.name!r})"
        return f"Bulkhead({self.max_concurrent}, name={self.name!r})"

    @property
    def current_limit(self) -> int:
        """Calls allowed in flight now: ``max_concurrent``, or the adaptive limit's value."""
        return self._limit_now

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Calls queued for a slot now."""
        return sum(1 for w in self._waiters if not w.done())

    def rejection(self) -> BulkheadFullError:
        """A ``BulkheadFullError`` for a call refused by an admission rule of the caller's own
        (a middleware shedding low-priority requests early), reported to the listeners like
        the bulkhead's own rejections."""
        return self._reject()

    def _reject(self, limit: int | None = None) -> BulkheadFullError:
        error = BulkheadFullError(self.name, self._limit_now if limit is None else limit)
        if self._listeners:
            emit(self._listeners, CallRejected(name=self.name, policy=self.kind, error=error))
        return error

    # step 1: a local slot --------------------------------------------------------------------
    async def _acquire(self) -> None:
        if self._active < self._limit_now:
            self._active += 1
            return
        waiters = self._waiters
        if self.max_waiting == 0 or self.waiting >= self.max_waiting or self.max_wait == 0:
            raise self._reject()
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        timer = None
        if self.max_wait is not None:
            timer = self._clock.call_later(self.max_wait, lambda: _expire(fut))
        try:
            granted = await fut
        except BaseException:
            # cancelled while waiting: if a slot was handed over meanwhile, pass it on
            if fut.done() and not fut.cancelled() and fut.result():
                self._release()
            else:
                self._discard(fut)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not granted:
            self._discard(fut)
            raise self._reject()

    def _discard(self, fut: asyncio.Future[bool]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def _release(self) -> None:
        waiters = self._waiters
        # a limit that shrank below the calls in flight takes the slot back instead
        while waiters and self._active <= self._limit_now:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot moves to the waiter: _active unchanged
                return
        self._active -= 1

    # step 2: a fleet-wide permit -------------------------------------------------------------
    async def _take_permit(self, permits: PermitSource) -> object:
        """A fleet-wide permit (``True``: one at hand), or ``None`` when the store cannot
        answer (the call runs under the local limit only, holding none).

        Raises ``BulkheadFullError`` when the fleet has none free. If this raises, the call's
        local slot is given back.
        """
        try:
            if permits.take_now():
                return True
            if store_down(permits.store):
                return None
            permit = await permits.take()
        except StoreUnavailableError:
            return None
        except BaseException:
            self._release()
            raise
        if not permit:
            self._release()
            raise self._reject(permits.limit)
        return permit

    # the adaptive limit ---------------------------------------------------------------------
    def _sample(self, start: float, dropped: bool = False) -> None:
        """One finished call (still holding its slot) for the limiter; let waiters in if the
        limit grew."""
        assert self._limiter is not None
        now = self._clock.monotonic()
        limit = self._limiter.sample(now, now - start, self._active, dropped)
        if limit == self._limit_now:
            return
        self._limit_now = limit
        if self.permits is not None:  # reported with a share's renewals (status tools)
            self.permits.own_limit = limit
        waiters = self._waiters
        while waiters and self._active < limit:
            fut = waiters.popleft()
            if not fut.done():
                self._active += 1
                fut.set_result(True)

    def _learn(self, start: float, exc: BaseException | None) -> None:
        """Sample a call that ended with ``exc``: overload signals count, other errors not."""
        if exc is None:
            self._sample(start)
        elif isinstance(exc, (TimeoutError, RejectedError)):
            self._sample(start, dropped=True)

    # the steps, in order ---------------------------------------------------------------------
    def _wrap(self, fn: Protected) -> Protected:
        # few free variables (each is copied into every call's frame): the paths off the
        # hottest one call the bulkhead's methods
        fleet = self.permits
        learn = None if self._limiter is None else self._learn
        monotonic = self._clock.monotonic
        at_hand = monotonic if fleet is None else fleet.clock.monotonic

        async def protected(*args: Any, **kwargs: Any) -> Any:
            # 1. a local slot: _acquire(), inlined while one is free and nobody waits
            if self._active < self._limit_now and not self._waiters:
                self._active += 1
            else:
                await self._acquire()
            # 2. a fleet-wide permit: fleet.take_now(), inlined (a permit at hand counts in
            # held, below share, before valid_until: no I/O), else _take_permit()
            permit: object = None
            if fleet is not None:
                held = fleet.held
                if held < fleet.share and at_hand() < fleet.valid_until:
                    fleet.held = held = held + 1
                    if held > fleet.peak:
                        fleet.peak = held
                    permit = True
                else:
                    permit = await self._take_permit(fleet)
            try:
                # 3. the call (returned from inside the try), with a sample for the
                # adaptive limit if there is one
                if learn is None:
                    return await (fn(*args, **kwargs) if kwargs else fn(*args))
                start = monotonic()
                try:
                    result = await (fn(*args, **kwargs) if kwargs else fn(*args))
                except Exception as exc:
                    learn(start, exc)
                    raise
                learn(start, None)
                return result
            finally:
                # 4. the slot back (_release(), inlined while nobody waits), then the permit
                if self._waiters:
                    self._release()
                else:
                    self._active -= 1
                if fleet is not None and permit is not None:
                    if permit is True:  # fleet.give(True), inlined: back at hand, no I/O
                        if fleet.held > 0:
                            fleet.held -= 1
                    else:
                        await fleet.give(permit)

        return protected

    async def __aenter__(self) -> None:
        if self._active < self._limit_now and not self._waiters:  # as in the wrapper
            self._active += 1
        else:
            await self._acquire()
        permits = self.permits
        permit = None if permits is None else await self._take_permit(permits)
        if permits is not None or self._limiter is not None:
            entry = (permit, self._clock.monotonic())
            self._held.setdefault(asyncio.current_task(), []).append(entry)

    async def __aexit__(self, kind: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        permits = self.permits
        if permits is None and self._limiter is None:
            self._release()
            return
        task = asyncio.current_task()
        held = self._held[task]
        permit, start = held.pop()
        if not held:
            del self._held[task]
        if self._limiter is not None and (exc is None or isinstance(exc, Exception)):
            self._learn(start, exc)
        self._release()
        if permits is not None and permit is not None:
            await permits.give(permit)

    async def aclose(self) -> None:
        """Give back what the permit source keeps beyond the permits in use now: a share of
        the fleet's permits (``shares=True``, ``FleetShare``), so the replicas that go on get
        it at once, not when its lease runs out. Call it when the process stops serving; a
        call made afterwards asks the store for a share again. Nothing to do for other
        bulkheads."""
        if self.permits is not None:
            await self.permits.aclose()


def _live_limits(base: dict[str, Any], values: dict[str, Any]) -> tuple[int, int]:
    """``max_concurrent`` and ``max_waiting`` from live ``values``, checked as the constructor
    checks them for a bulkhead whose values in code are ``base`` (empty: a local one)."""
    limit = values.get("max_concurrent", base.get("max_concurrent", 1))
    waiting = values.get("max_waiting", base.get("max_waiting", 0))
    if base.get("adaptive") and limit != base["max_concurrent"]:
        raise ValueError(
            f"max_concurrent of an adaptive bulkhead cannot change live, got {limit!r}"
        )
    fleet = bool(base.get("fleet"))
    limit = check_permits("max_concurrent", limit) if fleet else check_int("max_concurrent", limit)
    waiting = check_int("max_waiting", waiting, minimum=0)
    if fleet and waiting:
        raise ValueError(
            f"max_waiting must be 0 with fleet-wide permits, got {waiting!r}: "
            "they are not waited for (the call is rejected at once)"
        )
    return limit, waiting


register_schema(
    Schema("bulkhead", ("max_concurrent", "max_waiting"), lambda v, base: _live_limits(base, v))
)
