"""Fleet-wide permits: where a bulkhead's calls take a permit besides their local slot.

A ``PermitSource`` holds permits of a limit that every replica shares through a store. Two
sources, one interface (take a permit at hand, without I/O; take one, with I/O if needed;
give it back; close):

* ``FleetLeases``: one expiring lease per call (``Store.acquire_lease``), kept renewed while
  the call runs and returned when it ends: a store round trip per call, and a permit freed
  anywhere is free at once.
* ``FleetShare``: quota leasing, a fleet-wide limit without a round trip per call.

A ``FleetShare`` holds this process's share of the limit (``Store.lease_share``). A call
takes a permit from the share without any I/O; only when the share is used up does it ask
the store to grow it (one round trip, shared by the calls that need one then), and the store
grants at most what the other holders leave free, each counted as the larger of its share
and its permits in use, so the permits in use fleet-wide never exceed the limit. In the
background, every ``rebalance`` seconds while permits are in use, the share is checked
against the most permits held at once in that period: when fewer were used and the fleet
had no permit free at the last answer (or none was used at all), the share shrinks to that
use at once, so unused permits go back to the fleet where another holder may need them, and
a busy replica keeps what it uses. Otherwise the share is renewed every ``4 x rebalance``
seconds (at most ``ttl / 3``), at the use of the last period: a share that fits its use
costs a store call every few seconds, whatever the traffic. A share is an expiring lease: a
replica that dies gives its share back within ``ttl``; one that closes (``aclose()``) gives
it back at once.

A class of calls allowed less than the limit (``take(cap=...)``: say sheddable requests,
allowed 75 % of it) takes a permit only while this holder's permits plus what the other
holders count for stay under ``cap``, and grows the share only that far, so the rest of the
limit stays free in the store for the classes allowed more, on any replica.

When the store cannot answer, the calls waiting on the ask under way fail with it (each
waits at most one store call); none asks again after it. When the store has lost the
shares (Redis restarted empty, failed over, or its clock jumped), no share grows past what
its holder had for two renewal periods (``settle``), until every live holder has reported
again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..checks import check_int, check_name, check_seconds
from ..errors import StoreUnavailableError
from ..forks import reset_in_child
from .base import check_store

if TYPE_CHECKING:
    from ..clock import Clock, TimerHandle
    from ..store.protocol import Store

__all__ = [
    "MAX_PERMITS",
    "SHORTEST_LEASE",
    "FleetLeases",
    "FleetShare",
    "PermitSource",
    "check_lease",
    "check_permits",
    "shortest_lease",
]

logger = logging.getLogger("resilience.quota")

_SLACK = 0.01  # seconds: a share this close to its end is not reported as still held
_RENEW_EVERY = 4  # rebalance periods: the longest a share in use goes unrenewed (ttl / 3 at most)


def _holder_id(store: Any) -> str:
    """A holder id of its own (a store's replica id, when it has one, for readability)."""
    replica = getattr(store, "replica", "")
    return f"{replica}:{uuid.uuid4().hex[:8]}" if replica else uuid.uuid4().hex[:12]


MAX_PERMITS = 1_000_000_000
"""The largest fleet-wide limit: stores count permits in Lua numbers and Redis integers."""

SHORTEST_LEASE = 1.0
"""No fleet-wide lease (a share, a permit) is shorter than this many seconds."""


def shortest_lease(store: object) -> float:
    """The shortest lease a fleet-wide share or permit may have on ``store``.

    A share is renewed at least every ``min(4 s, lease / 3)`` (a per-call permit every
    ``lease / 2``,
    tried again ``lease / 10`` later if that fails), and a renewal may take one store
    ``timeout``: the lease must outlive a renewal that fails and the one after it, so it is
    at least 6 store timeouts, and never under ``SHORTEST_LEASE``.
    """
    timeout = getattr(store, "timeout", 0.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        timeout = 0.0
    return max(SHORTEST_LEASE, 6 * float(timeout))


def check_lease(what: str, value: object, store: object) -> float:
    """A lease in seconds, long enough to be renewed on ``store`` (``shortest_lease``)."""
    seconds: float = check_seconds(what, value)
    shortest = shortest_lease(store)
    if seconds < shortest:
        timeout = getattr(store, "timeout", None)
        why = f"6 x the store's timeout of {timeout!r} s: " if shortest > SHORTEST_LEASE else ""
        raise ValueError(
            f"{what} must be at least {shortest:g} s ({why}a lease is renewed before it runs "
            f"out, and must outlive a renewal that fails), got {value!r}"
        )
    return seconds


def check_permits(what: str, value: object) -> int:
    """A fleet-wide number of permits: an int in ``[1, MAX_PERMITS]``."""
    return check_int(what, value, maximum=MAX_PERMITS)


@runtime_checkable
class PermitSource(Protocol):
    """Where a bulkhead's fleet-wide permits come from (``Bulkhead(permits=...)``):
    ``FleetLeases``, ``FleetShare``, or a source of your own.

    Each call takes one permit of the fleet's ``limit`` besides its local slot, and gives it
    back when it ends, cancelled or not. A permit *at hand* is taken and given back with no
    I/O: ``take_now()`` counts it in ``held`` while ``held < share``, before
    ``valid_until`` (on ``clock``), and raises ``peak`` to ``held``; it goes back by
    ``held -= 1`` (while ``held > 0``), which ``give(True)`` does. A hot path may do both on
    these attributes itself (the bulkhead does). A source with no permits at hand keeps
    ``share`` at 0, and every permit is taken with ``take()``.
    """

    store: Store
    """The store the permits are shared through (a store that is down is not asked)."""
    limit: int
    """The permits the fleet may hold at once."""
    clock: Clock
    """The clock of ``valid_until``."""
    held: int
    """Permits at hand in use here."""
    share: int
    """Permits at hand: ``held`` may grow up to it."""
    peak: int
    """The most permits at hand held at once, lately."""
    valid_until: float
    """The permits at hand lapse at this ``clock`` time."""
    own_limit: int
    """The holder's own limit now (an adaptive one), which a source may report (a share
    does, with its renewals: status tools sum them)."""

    def take_now(self) -> bool:
        """Take a permit at hand, with no I/O: whether one was taken."""

    async def take(self) -> object:
        """Take a permit, with I/O if none is at hand: ``True`` for one at hand, or an object
        of the source's own (a lease); a false value when the fleet has none free. Raises
        ``StoreUnavailableError`` when the store cannot answer."""

    async def give(self, permit: object) -> None:
        """Give back a permit that ``take`` or ``take_now`` (``True``) gave, even if the
        caller is cancelled meanwhile."""

    async def aclose(self) -> None:
        """Give back what this holder keeps beyond the permits in use (a share), now."""


class _Lease:
    """One fleet-wide permit taken as a lease of its own, kept alive while its call runs.

    Every half ``ttl`` (one timer, no task while nothing is due) the lease is extended by
    another ``ttl`` (one store call), so the fleet-wide count holds however long calls run.
    When the store cannot answer, renewal is tried again after a tenth of the lease; the
    lease stays valid until its expiry meanwhile. A lease found expired (the store was away
    longer than a lease) is replaced by a fresh one if the fleet has room; otherwise the call
    runs on under the local limit only.
    """

    __slots__ = ("done", "lease", "source", "task", "timer")

    def __init__(self, source: FleetLeases, lease: str) -> None:
        self.source = source
        self.lease: str | None = lease
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.timer = source.clock.call_later(source.ttl / 2, self._due)

    def _due(self) -> None:
        if not self.done:
            self.task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        source = self.source
        store, key, ttl = source.store, source.key, source.ttl
        delay = ttl / 2
        try:
            if self.lease is not None and await store.renew_lease(key, self.lease, ttl=ttl):
                pass
            else:  # expired meanwhile: a fresh lease if the fleet has room
                self.lease = await store.acquire_lease(key, limit=source.limit, ttl=ttl)
        except Exception as exc:  # the lease lives on until its expiry: try again soon
            logger.warning("bulkhead %r could not renew a permit: %r", key, exc)
            delay = ttl / 10
        if not self.done:
            self.timer = source.clock.call_later(delay, self._due)

    async def give_back(self) -> None:
        """Stop renewing and return the lease held now (after a renewal under way)."""
        self.done = True
        self.timer.cancel()
        if self.task is not None:
            await self.task  # _renew raises nothing; it may swap the lease meanwhile
        if self.lease is not None:
            await self.source.release(self.lease)


class FleetLeases:
    """Fleet-wide permits, one expiring lease per call: at most ``limit`` of them under
    ``key`` on ``store`` (``Store.acquire_lease``), each living ``ttl`` seconds unless
    renewed (so a replica that dies cannot hold them for ever).

    ``take()`` asks the store for a lease (one round trip; a caller cancelled meanwhile still
    gives back a lease taken for it); while its call runs the lease is renewed every
    ``ttl / 2`` seconds; ``give(lease)`` stops renewing and returns it, in a task of its own
    that cancelling the caller cannot stop. No permit is ever at hand (``share`` is 0).
    ``ttl`` must be long enough to be renewed (``shortest_lease``), ``limit`` at most
    ``MAX_PERMITS``.
    """

    __slots__ = ("_returning", "clock", "key", "limit", "own_limit", "store", "ttl")

    held = 0
    share = 0  # no permit at hand: every one is a lease of its own
    peak = 0
    valid_until = -math.inf

    def __init__(
        self, store: Store, key: str, *, limit: int, ttl: float = 30.0, clock: Clock | None = None
    ) -> None:
        checked = check_store("store", store, "acquire_lease", "release_lease", "renew_lease")
        if checked is None:
            raise TypeError("FleetLeases needs a store (MemoryStore, RedisStore), got None")
        self.store: Store = checked
        self.key = check_name(key, "key")
        self.limit = check_permits("limit", limit)
        self.ttl: float = check_lease("ttl", ttl, checked)
        self.clock: Clock = checked.clock if clock is None else clock
        self.own_limit = 0  # not reported: a lease carries no limit
        self._returning: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"FleetLeases(key={self.key!r}, limit={self.limit}, ttl={self.ttl:g})"

    def take_now(self) -> bool:
        """No permit is ever at hand: ``False``."""
        return False

    async def take(self) -> _Lease | None:
        """A lease of its own, kept renewed until given back; ``None`` when the fleet is
        full. Taking runs in a task of its own, so a caller cancelled meanwhile still gives
        back a lease taken for it."""
        taking = asyncio.ensure_future(
            self.store.acquire_lease(self.key, limit=self.limit, ttl=self.ttl)
        )
        try:
            lease = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(self._return_late)
            raise
        except StoreUnavailableError:
            raise
        except Exception as exc:  # whatever else the store raised: it cannot answer either
            raise unavailable(exc) from exc
        return None if lease is None else _Lease(self, lease)

    def _return_late(self, taking: asyncio.Future[str | None]) -> None:
        """A lease taken for a caller that was cancelled meanwhile: give it back."""
        if not taking.cancelled() and taking.exception() is None:
            lease = taking.result()
            if lease is not None:
                self._returned(self.release(lease))

    async def give(self, permit: object) -> None:
        """Stop renewing ``permit`` and return its lease, in a task of its own: returned even
        if the caller is cancelled meanwhile (the cancellation is raised at once)."""
        if not isinstance(permit, _Lease):
            raise TypeError(f"{self!r} gives back its own leases, not {permit!r}")
        await asyncio.shield(self._returned(permit.give_back()))

    def _returned(self, returning: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``returning`` in a task of its own, kept until it ends."""
        task = asyncio.get_running_loop().create_task(returning)
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)
        return task

    async def release(self, lease: str) -> None:
        """Return ``lease`` to the store now (a failure is logged: the lease expires)."""
        try:
            await self.store.release_lease(self.key, lease)
        except Exception as exc:  # the lease expires by itself
            logger.warning("bulkhead %r could not return a permit: %r", self.key, exc)

    async def aclose(self) -> None:
        """Nothing kept beyond the leases in use: nothing to do."""


def unavailable(error: Exception) -> StoreUnavailableError:
    """A store's failure of another kind than ``StoreUnavailableError``, as a
    ``PermitSource`` raises it."""
    return StoreUnavailableError(f"the store did not answer: {error!r}")


async def _wait(ask: asyncio.Future[Exception | None]) -> None:
    """Wait for an ask under way; its store failure is the waiter's too."""
    error = await asyncio.shield(ask)
    if error is not None:
        raise StoreUnavailableError(f"the store did not answer: {error}")


class FleetShare:
    """This process's share of the fleet-wide limit ``limit`` under ``key`` on ``store``
    (see the module docstring): a ``PermitSource`` whose permits are all at hand.

    ``take_now()`` / ``take()`` a permit (``True``; ``False``: none free), ``give()`` it
    back, ``aclose()`` at the end. ``held``: permits in use here; ``share``: permits the
    fleet granted this holder; ``valid_until``: when the share lapses unless renewed
    (``clock`` time, by default the store's); ``peak``: the most held since the last
    renewal; ``others``: what the other holders counted for at the last answer. A hot path
    may inline ``take_now()`` / ``give()`` on these.

    ``ttl`` must be long enough to be renewed (``shortest_lease``), ``limit`` at most
    ``MAX_PERMITS``; while permits are in use, the share is checked every ``rebalance``
    seconds (at most ``ttl / 3``) and renewed every ``renew_every`` (``4 x rebalance``, at
    most ``ttl / 3``), or at once when it shrinks (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "_answered",
        "_capped_at",
        "_capped_until",
        "_full_until",
        "_growing",
        "_pending",
        "_pending_cap",
        "_sent",
        "_task",
        "_timer",
        "clock",
        "held",
        "holder",
        "key",
        "limit",
        "others",
        "own_limit",
        "peak",
        "rebalance",
        "renew_every",
        "settle",
        "share",
        "store",
        "ttl",
        "valid_until",
    )

    def __init__(
        self,
        store: Store,
        key: str,
        *,
        limit: int,
        ttl: float = 30.0,
        rebalance: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        checked = check_store("store", store, "lease_share")
        if checked is None:
            raise TypeError("FleetShare needs a store (MemoryStore, RedisStore), got None")
        self.store: Store = checked
        self.key = check_name(key, "key")
        self.limit = check_permits("limit", limit)
        self.ttl = check_lease("ttl", ttl, store)
        self.rebalance = min(check_seconds("rebalance", rebalance), self.ttl / 3)
        self.renew_every = min(_RENEW_EVERY * self.rebalance, self.ttl / 3)
        self.settle = 2 * self.renew_every  # every live holder renews within it
        self.clock = store.clock if clock is None else clock
        self.holder = _holder_id(store)
        self.held = 0
        self.share = 0
        self.others = 0
        self.own_limit = 0  #: this holder's own (adaptive) limit now, reported with renewals
        self.peak = 0
        self.valid_until = float("-inf")
        self._answered = float("-inf")  # when the last answer's ask was sent
        self._growing: asyncio.Future[Exception | None] | None = None
        self._pending = 0  # calls that need a permit and no ask has counted yet
        self._pending_cap = 0  # the largest cap among them
        self._sent = 0  # asks sent so far
        self._task: asyncio.Task[None] | None = None
        self._timer: TimerHandle | None = None
        self._full_until = float("-inf")  # the fleet said it was full: ask again after this
        self._capped_until = float("-inf")  # ... full for a cap up to _capped_at
        self._capped_at = 0
        reset_in_child(self)

    def __repr__(self) -> str:
        return (
            f"FleetShare(key={self.key!r}, limit={self.limit}, share={self.share}, "
            f"held={self.held})"
        )

    def _forked(self) -> None:
        """In a forked child: a new holder with nothing held (the parent's share is its own;
        the parent's timer and tasks belong to the parent's event loop)."""
        self.holder = _holder_id(self.store)
        self.held = self.share = self.peak = self.others = 0
        self._pending = self._pending_cap = self._sent = self._capped_at = 0
        self.valid_until = self._full_until = self._capped_until = float("-inf")
        self._answered = float("-inf")
        self._growing = self._task = self._timer = None

    def take_now(self) -> bool:
        """Take a permit from the share, if it is still valid and has room (no I/O)."""
        if self.held < self.share and self.clock.monotonic() < self.valid_until:
            self.held += 1
            if self.held > self.peak:
                self.peak = self.held
            return True
        return False

    def fits(self, cap: int) -> bool:
        """Whether a call of a class allowed ``cap`` permits fleet-wide may take one now:
        this holder's permits plus what the other holders count for stay under ``cap``."""
        return cap >= self.limit or self.held + self.others < cap

    def _refused(self, cap: int) -> bool:
        """The fleet said it had no room (for ``cap``) a moment ago: do not ask again yet."""
        now = self.clock.monotonic()
        if now < self._full_until:
            return True
        return cap < self.limit and cap <= self._capped_at and now < self._capped_until

    async def take(self, cap: int | None = None) -> bool:
        """A permit: from the share, else by growing it (one store round trip, shared by the
        calls that need it at the same time). ``cap``: the most permits the fleet may hold
        for this call's class (see the module docstring). ``False``: no permit free.

        A call that comes while an ask is under way waits for it, and if that one did not
        count it, for at most one more. Raises ``StoreUnavailableError`` when the store
        cannot answer: every call waiting on that ask at once, none asking again."""
        cap = self.limit if cap is None else min(cap, self.limit)
        if self.fits(cap) and self.take_now():
            return True
        if self._refused(cap):
            return False
        self._pending += 1
        self._pending_cap = max(self._pending_cap, cap)
        joined = self._sent
        try:
            ask = self._growing
            if ask is not None:  # sent before this call came: it was not counted in it
                await _wait(ask)
                if self.fits(cap) and self.take_now():
                    return True
                ask = self._growing
                if ask is not None:  # sent since, while this call was waiting: counted it
                    await _wait(ask)
                    return self.fits(cap) and self.take_now()
                if self._refused(cap):
                    return False
            await self._ask(self.held, cap)  # counts every call waiting, this one too
            return self.fits(cap) and self.take_now()
        finally:
            if self._sent == joined:  # no ask counted this call
                self._pending -= 1

    async def give(self, permit: object = True) -> None:
        """Give a permit back (to the share: it goes back to the fleet at the next renewal;
        no I/O)."""
        if self.held > 0:
            self.held -= 1

    async def _ask(self, base: int, cap: int | None = None) -> None:
        """Ask the store for a share of ``base`` plus one per call waiting for a permit (one
        ask at a time; failures are raised, and are the failure of the calls waiting)."""
        limit = self.limit
        want = base + self._pending
        cap = max(limit if cap is None else cap, self._pending_cap)
        self._pending = self._pending_cap = 0
        self._sent += 1
        if want < self.share:
            # a smaller share counts here from now on, whether or not the answer arrives: the
            # store may apply it and lose the reply, and the permits it frees go to others
            self.share = want
        done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._growing = done
        error: Exception | None = None
        sent = self.clock.monotonic()
        try:
            grant, _, others = await self.store.lease_share(
                self.key,
                self.holder,
                want=want,
                held=self.held,
                limit=limit,
                ttl=self.ttl,
                own_limit=self.own_limit,
                cap=cap if cap < limit else None,
                had=self.share if sent < self.valid_until - _SLACK else 0,
                settle=self.settle,
            )
            self.share = grant
            self.others = others
            self._answered = sent
            self.valid_until = sent + self.ttl  # the store's lease lasts at least this long
            if want > self.held and not (self.held < grant and self.fits(cap)):
                # no room for one more: do not ask again at once
                if cap >= limit:
                    self._full_until = sent + self.rebalance / 4
                else:
                    self._capped_until, self._capped_at = sent + self.rebalance / 4, cap
            if grant or self.held:
                self._start()
        except StoreUnavailableError as exc:
            error = exc
            raise
        except Exception as exc:  # whatever else the store raised: it cannot answer either
            error = exc
            raise unavailable(exc) from exc
        finally:
            self._growing = None
            done.set_result(error)

    def _start(self) -> None:
        """Renew the share one ``rebalance`` from now (one timer, no task while waiting)."""
        if self._timer is None:
            self._timer = self.clock.call_later(self.rebalance, self._due)

    def _due(self) -> None:
        """A ``rebalance`` period is over: renew the share if it is time (``_renewing``), at
        the peak use of that period; else look again one period later (no task, no I/O)."""
        self._timer = None
        want = max(self.peak, self.held)
        self.peak = self.held
        if self._growing is not None or not self._renewing(want):
            self._start()  # a grow under way renews it anyway
            return
        self._task = asyncio.get_running_loop().create_task(self._renew(want))

    def _renewing(self, want: int) -> bool:
        """Whether the share is renewed now, at ``want`` (the most used in the last period):
        when it shrinks to nothing, or below what the store granted while the fleet had no
        permit free, when it is ``renew_every`` old, or when the use is above it."""
        share = self.share
        if want < share and (not want or self.others + share >= self.limit):
            return True  # permits to give back, and another holder may need them
        if want > share:
            return True  # permits held above a share that shrank: reported
        # the lease, and the store's settling after a loss, count on a renewal this often
        due: float = self._answered + self.renew_every - self.rebalance / 2
        return self.clock.monotonic() >= due

    async def _renew(self, want: int) -> None:
        """Renew the share at ``want`` (nothing held and nothing used in the last period:
        give it back, and stop renewing)."""
        try:
            await self._ask(want)
        except Exception as exc:  # the share lives on until it expires: try again soon
            if not isinstance(exc, StoreUnavailableError):
                logger.warning("share of %r could not be renewed: %r", self.key, exc)
            self._start()

    async def aclose(self) -> None:
        """Stop renewing and give the share back now (best effort: it expires anyway). The
        permits still in use here go on counting fleet-wide until the lease runs out."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.share or self.held:  # calls still running here go on counting, until ttl
            self.share = 0
            self.valid_until = float("-inf")
            try:
                await self.store.lease_share(
                    self.key, self.holder, want=0, held=self.held, limit=self.limit, ttl=self.ttl
                )
            except Exception:  # expires by itself within ttl
                pass
