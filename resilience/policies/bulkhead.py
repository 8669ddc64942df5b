"""Bulkhead: at most ``max_concurrent`` calls in flight (or an adaptive limit); a bounded
queue may wait for a slot."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..checks import check_fleet_name, store_down
from ..clock import Clock
from ..errors import BulkheadFullError, RejectedError, StoreUnavailableError
from ..events import CallRejected, Listener, emit
from ..rules.limits import AdaptiveLimit, Limiter
from .base import BasePolicy, Protected, check_bool, check_int, check_seconds, check_store
from .quota import FleetShare, check_lease, check_permits

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["Bulkhead"]

logger = logging.getLogger("resilience")


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class _Renewal:
    """Keeps one fleet-wide permit alive while its call runs.

    Every half ``lease`` (one timer, no task while nothing is due) the permit is extended by
    another ``lease`` (one store call), so the fleet-wide count holds however long calls run.
    When the store cannot answer, renewal is tried again after a tenth of the lease; the
    permit stays valid until its expiry meanwhile. A permit found expired (the store was away
    longer than a lease) is replaced by a fresh one if the fleet has room; otherwise the call
    runs on under the local limit only.
    """

    __slots__ = ("bulkhead", "done", "lease", "store", "task", "timer")

    def __init__(self, bulkhead: Bulkhead, store: Store, lease: str | None) -> None:
        self.bulkhead = bulkhead
        self.store = store
        self.lease = lease
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.timer = bulkhead._clock.call_later(bulkhead.lease / 2, self._due)

    def _due(self) -> None:
        if not self.done:
            self.task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        bulkhead, store = self.bulkhead, self.store
        delay = bulkhead.lease / 2
        try:
            if self.lease is not None and await store.renew_lease(
                bulkhead.name, self.lease, ttl=bulkhead.lease
            ):
                pass
            else:  # expired meanwhile: a fresh permit if the fleet has room
                self.lease = await store.acquire_lease(
                    bulkhead.name, limit=bulkhead.max_concurrent, ttl=bulkhead.lease
                )
        except Exception as exc:  # the permit lives on until its expiry: try again soon
            logger.warning("bulkhead %r could not renew a permit: %r", bulkhead.name, exc)
            delay = bulkhead.lease / 10
        if not self.done:
            self.timer = bulkhead._clock.call_later(delay, self._due)

    async def give_back(self) -> None:
        """Stop renewing and return the permit held now (after a renewal under way)."""
        self.done = True
        self.timer.cancel()
        if self.task is not None:
            await self.task  # _renew raises nothing; it may swap the permit meanwhile
        if self.lease is not None:
            await self.bulkhead._release_permit(self.lease)


class _Shared:
    """The permit of a call running on this replica's share of the fleet's limit."""

    __slots__ = ()


_SHARED = _Shared()
_Permit = _Renewal | _Shared | str


class Bulkhead(BasePolicy):
    """Limits concurrency: ``max_concurrent`` calls run, ``max_waiting`` more may queue.

    A call that finds every slot taken waits in FIFO order if fewer than ``max_waiting``
    calls are already waiting, for at most ``max_wait`` seconds (``None``: as long as it
    takes); otherwise it fails at once with ``BulkheadFullError``. Slots are released however
    the call ends, cancellation included; a waiter cancelled just as it was handed a slot
    passes the slot on.

    With ``distributed=True`` (and a ``store``) the limit holds across every bulkhead of that
    name on the store, so across replicas through ``RedisStore``: besides its local slot each
    call takes one of ``max_concurrent`` fleet-wide permits, an expiring lease of ``lease``
    seconds (so a replica that dies cannot hold permits for ever), and always gives it back.
    A full fleet rejects at once (waiting for a fleet-wide permit is not supported:
    ``max_waiting`` must be 0). When the store cannot answer, the call goes on under the local
    limit only. With ``shares=True`` as well, this bulkhead holds a share of the fleet's
    permits (``resilience.quota.FleetShare``): a call takes and returns a permit with no store
    call, and the store is asked only to grow the share (renewed once a second at its peak
    use, given back within ``lease`` if the replica dies, and at once by ``aclose()``); a
    permit freed here reaches other replicas at the next renewal. With a store, ``lease``
    must outlive a renewal that fails (``resilience.quota.shortest_lease``: at least 1 s and 6
    store timeouts), and ``max_concurrent`` is at most ``resilience.quota.MAX_PERMITS``.

    With ``limit=AdaptiveLimit(...)`` the number of slots follows the latency of the calls
    (see ``resilience.adaptive``): each call that returns, or fails with a timeout or a
    rejection from further down (an overload signal), is one sample; other errors and
    cancellations teach nothing. ``current_limit`` is the limit now. With ``distributed=True``
    the adaptive limit stays local to each replica (no store round trip to adapt) and
    ``max_concurrent`` is the fleet-wide cap on top of it.
    """

    kind = "bulkhead"

    def __init__(
        self,
        max_concurrent: int | None = None,
        *,
        limit: AdaptiveLimit | None = None,
        max_waiting: int = 0,
        max_wait: float | None = None,
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
        if limit is None and max_concurrent is None:
            raise TypeError("Bulkhead needs max_concurrent (a number) or limit=AdaptiveLimit(...)")
        if limit is not None and max_concurrent is not None and not distributed:
            raise ValueError(
                "give max_concurrent or limit=, not both (with distributed=True, "
                "max_concurrent is the fleet-wide cap over the adaptive local limit)"
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
                if distributed
                else check_int("max_concurrent", max_concurrent)
            )
        else:  # adaptive, local: the most it will ever allow
            assert limit is not None
            self.max_concurrent = limit.max_limit
        self._limit_now = self.max_concurrent if limit is None else limit.initial
        self.max_waiting = check_int("max_waiting", max_waiting, minimum=0)
        self.max_wait: float | None = check_seconds("max_wait", max_wait, none=True, zero=True)
        self.distributed = check_bool("distributed", distributed)
        self.store = check_store("store", store, "acquire_lease", "release_lease", "renew_lease")
        self.lease: float = check_seconds("lease", lease)
        if distributed:
            if self.store is None:
                raise ValueError("distributed=True needs a store= to share the permits through")
            check_lease("lease", lease, self.store)
            if self.max_waiting:
                raise ValueError(
                    f"max_waiting must be 0 with distributed=True, got {max_waiting!r}: "
                    "fleet-wide permits are not waited for (the call is rejected at once)"
                )
            check_fleet_name("Bulkhead(distributed=True)", self.name, "bulkhead", self.store)
        elif self.store is not None:
            raise ValueError("store= is only used with distributed=True")
        self.shares = check_bool("shares", shares)
        self._share: FleetShare | None = None
        if shares:
            if not distributed:
                raise ValueError("shares=True needs distributed=True (and a store)")
            assert self.store is not None
            check_store("store", self.store, "lease_share")
            self._share = FleetShare(
                self.store, self.name, limit=self.max_concurrent, ttl=self.lease, clock=self._clock
            )
            self._share.own_limit = self._limit_now if limit is not None else 0
        self._active = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._held: dict[asyncio.Task[Any] | None, list[tuple[_Permit | None, float]]] = {}
        self._returning: set[asyncio.Task[None]] = set()

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
    def fleet_share(self) -> FleetShare | None:
        """This replica's share of the fleet's permits (``shares=True``), else ``None``."""
        return self._share

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
        if self._share is not None:  # reported with the share's renewals (status tools)
            self._share.own_limit = limit
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

    # fleet-wide permits ---------------------------------------------------------------------
    async def _take_permit(self, store: Store) -> str | _Shared | None:
        """A fleet-wide permit: its lease id (or ``_SHARED``: one from this replica's share),
        ``None`` when the store is down (local only).

        Raises ``BulkheadFullError`` when the fleet is full. Taking runs in a task of its own,
        so a caller cancelled meanwhile still gives back a permit taken for it.
        """
        share = self._share
        if share is not None:  # quota leasing: no store call while the share has room
            if share.take_now():
                return _SHARED
            if store_down(store):
                return None
            try:
                if await share.take():
                    return _SHARED
            except StoreUnavailableError:
                return None
            raise self._reject(self.max_concurrent)
        if store_down(store):
            return None
        taking = asyncio.ensure_future(
            store.acquire_lease(self.name, limit=self.max_concurrent, ttl=self.lease)
        )
        try:
            lease = await asyncio.shield(taking)
        except StoreUnavailableError:
            return None
        except asyncio.CancelledError:
            taking.add_done_callback(self._return_late)
            raise
        if lease is None:
            raise self._reject(self.max_concurrent)
        return lease

    def _return_late(self, taking: asyncio.Future[str | None]) -> None:
        """A permit taken for a caller that was cancelled meanwhile: give it back."""
        if not taking.cancelled() and taking.exception() is None:
            lease = taking.result()
            if lease is not None:
                self._give_back(lease)

    def _give_back(self, lease: str | _Renewal) -> asyncio.Task[None]:
        """Return a permit in a task of its own, which cancelling the caller cannot stop."""
        returning = (
            lease.give_back() if isinstance(lease, _Renewal) else self._release_permit(lease)
        )
        task = asyncio.get_running_loop().create_task(returning)
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)
        return task

    async def _release_permit(self, lease: str) -> None:
        assert self.store is not None
        try:
            await self.store.release_lease(self.name, lease)
        except Exception as exc:  # the lease expires by itself
            logger.warning("bulkhead %r could not return a permit: %r", self.name, exc)

    async def _return_permit(self, lease: _Permit) -> None:
        """Give a permit back and wait for it (the permit is returned even if we are cancelled)."""
        if lease is _SHARED:
            assert self._share is not None
            self._share.give()
            return
        assert not isinstance(lease, _Shared)
        await asyncio.shield(self._give_back(lease))

    def _hold(self, store: Store, lease: str | _Shared | None) -> _Permit | None:
        """What a call holds while it runs: a share's permit, or a lease kept renewed."""
        if lease is None or lease is _SHARED:
            return lease
        assert isinstance(lease, str)
        return _Renewal(self, store, lease)

    def _wrap(self, fn: Protected) -> Protected:
        if self._limiter is not None:
            return self._wrap_adaptive(fn, self.store)
        if self.store is not None:
            return self._wrap_distributed(fn, self.store)
        acquire = self._acquire
        release = self._release
        limit = self.max_concurrent

        async def protected(*args: Any, **kwargs: Any) -> Any:
            if self._active < limit and not self._waiters:
                self._active += 1
            else:
                await acquire()
            try:
                return await fn(*args, **kwargs)
            finally:
                release()

        return protected

    def _wrap_distributed(self, fn: Protected, store: Store) -> Protected:
        acquire = self._acquire
        release = self._release
        take = self._take_permit
        give_back = self._return_permit
        limit = self.max_concurrent
        share = self._share
        if share is not None:
            monotonic = share.clock.monotonic

            async def shared(*args: Any, **kwargs: Any) -> Any:
                if self._active < limit and not self._waiters:
                    self._active += 1
                else:
                    await acquire()
                # share.take_now(), inlined: a permit from the share, no I/O
                held = share.held
                if held < share.share and monotonic() < share.valid_until:
                    share.held = held = held + 1
                    if held > share.peak:
                        share.peak = held
                    taken = True
                else:  # the share is used up: ask the store (None: it is down)
                    try:
                        taken = await take(store) is not None
                    except BaseException:
                        release()
                        raise
                try:
                    return await fn(*args, **kwargs)
                finally:
                    release()
                    if taken and share.held > 0:  # share.give(), inlined
                        share.held -= 1

            return shared

        async def protected(*args: Any, **kwargs: Any) -> Any:
            if self._active < limit and not self._waiters:
                self._active += 1
            else:
                await acquire()
            try:
                lease = await take(store)
            except BaseException:
                release()
                raise
            renewal = self._hold(store, lease)
            try:
                return await fn(*args, **kwargs)
            finally:
                release()
                if renewal is not None:
                    await give_back(renewal)

        return protected

    def _wrap_adaptive(self, fn: Protected, store: Store | None) -> Protected:
        acquire = self._acquire
        release = self._release
        take = self._take_permit
        give_back = self._return_permit
        learn = self._learn
        monotonic = self._clock.monotonic

        async def protected(*args: Any, **kwargs: Any) -> Any:
            if self._active < self._limit_now and not self._waiters:
                self._active += 1
            else:
                await acquire()
            renewal = None
            if store is not None:
                try:
                    lease = await take(store)
                except BaseException:
                    release()
                    raise
                renewal = self._hold(store, lease)
            start = monotonic()
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                learn(start, exc)
                raise
            else:
                learn(start, None)
                return result
            finally:
                release()
                if renewal is not None:
                    await give_back(renewal)

        return protected

    async def aclose(self) -> None:
        """Give this replica's share of the fleet's permits back now (``shares=True``), so
        the replicas that go on get it at once, not when its lease runs out. Call it when
        the process stops serving; a call made afterwards asks the store for a share again.
        Nothing to do for other bulkheads."""
        if self._share is not None:
            await self._share.aclose()

    async def __aenter__(self) -> None:
        if self._active < self._limit_now and not self._waiters:
            self._active += 1
        else:
            await self._acquire()
        renewal = None
        if self.store is not None:
            try:
                lease = await self._take_permit(self.store)
            except BaseException:
                self._release()
                raise
            renewal = self._hold(self.store, lease)
        if self.store is not None or self._limiter is not None:
            entry = (renewal, self._clock.monotonic())
            self._held.setdefault(asyncio.current_task(), []).append(entry)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.store is None and self._limiter is None:
            self._release()
            return
        task = asyncio.current_task()
        held = self._held[task]
        lease, start = held.pop()
        if not held:
            del self._held[task]
        if self._limiter is not None and (exc is None or isinstance(exc, Exception)):
            self._learn(start, exc)
        self._release()
        if lease is not None:
            await self._return_permit(lease)
