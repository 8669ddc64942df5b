"""Quota leasing: a fleet-wide limit without a round trip per call.

A ``FleetShare`` holds this process's share of a limit that every replica shares through a
store (``Store.lease_share``). A call takes a permit from the share without any I/O; only
when the share is used up does it ask the store to grow it (one round trip), and the store
grants at most what the other holders' live shares leave free, so the permits in use
fleet-wide never exceed the limit. In the background, every ``rebalance`` seconds while
permits are in use, the share is renewed at the most permits held at once since the last
renewal, so unused permits go back to the fleet and a busy replica keeps what it uses. A
share is an expiring lease: a replica that dies gives its share back within ``ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
import weakref
from typing import TYPE_CHECKING, Any

from .checks import check_int, check_name, check_seconds
from .errors import StoreUnavailableError

if TYPE_CHECKING:
    from .clock import Clock, TimerHandle
    from .store.protocol import Store

__all__ = ["FleetShare", "forget_in_child"]

logger = logging.getLogger("resilience.quota")

_inherited: weakref.WeakSet[Any] = weakref.WeakSet()


def forget_in_child(holder: Any) -> None:
    """Call ``holder._forked()`` in any child process forked after this: what a parent took
    from the fleet (a share, tokens taken ahead) is the parent's, never also the child's."""
    _inherited.add(holder)


def _after_fork_in_child() -> None:
    for holder in list(_inherited):
        holder._forked()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _holder_id(store: Any) -> str:
    """A holder id of its own (a store's replica id, when it has one, for readability)."""
    replica = getattr(store, "replica", "")
    return f"{replica}:{uuid.uuid4().hex[:8]}" if replica else uuid.uuid4().hex[:12]


class FleetShare:
    """This process's share of the fleet-wide limit ``limit`` under ``key`` (see the module
    docstring). ``take_now()`` / ``take()`` a permit, ``give()`` it back, ``aclose()`` at the
    end. ``held``: permits in use here; ``share``: permits the fleet granted this holder;
    ``valid_until``: when the share lapses unless renewed (``clock`` time); ``peak``: the most
    held since the last renewal. A hot path may inline ``take_now()`` / ``give()`` on these."""

    __slots__ = (
        "__weakref__",
        "_full_until",
        "_growing",
        "_task",
        "_timer",
        "_waiting",
        "clock",
        "held",
        "holder",
        "key",
        "limit",
        "own_limit",
        "peak",
        "rebalance",
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
        self.store = store
        self.key = check_name(key, "key")
        self.limit = check_int("limit", limit)
        self.ttl = check_seconds("ttl", ttl)
        self.rebalance = min(check_seconds("rebalance", rebalance), self.ttl / 3)
        self.clock = store.clock if clock is None else clock
        self.holder = _holder_id(store)
        self.held = 0
        self.share = 0
        self.own_limit = 0  #: this holder's own (adaptive) limit now, reported with renewals
        self.peak = 0
        self.valid_until = float("-inf")
        self._growing: asyncio.Future[None] | None = None
        self._waiting = 0  # calls waiting for a grow under way
        self._task: asyncio.Task[None] | None = None
        self._timer: TimerHandle | None = None
        self._full_until = float("-inf")  # the fleet said it was full: ask again after this
        forget_in_child(self)

    def _forked(self) -> None:
        """In a forked child: a new holder with nothing held (the parent's share is its own;
        the parent's timer and tasks belong to the parent's event loop)."""
        self.holder = _holder_id(self.store)
        self.held = self.share = self.peak = self._waiting = 0
        self.valid_until = self._full_until = float("-inf")
        self._growing = self._task = self._timer = None

    def take_now(self) -> bool:
        """A permit from the share, if it is still valid and has room (no I/O)."""
        if self.held < self.share and self.clock.monotonic() < self.valid_until:
            self.held += 1
            if self.held > self.peak:
                self.peak = self.held
            return True
        return False

    async def take(self) -> bool:
        """A permit: from the share, else by growing it (one store round trip, shared by the
        calls that need it at the same time). ``False``: the fleet has no permit free.
        Raises ``StoreUnavailableError`` when the store cannot answer."""
        if self.take_now():
            return True
        if self.clock.monotonic() < self._full_until:
            return False
        while self._growing is not None:  # another call is asking: ask for us too after it
            self._waiting += 1
            try:
                await asyncio.shield(self._growing)
            finally:
                self._waiting -= 1
            if self.take_now():
                return True
        await self._ask(self.held + 1 + self._waiting)
        return self.take_now()

    def give(self) -> None:
        """Give a permit back (to the share: it goes back to the fleet at the next renewal)."""
        if self.held > 0:
            self.held -= 1

    async def _ask(self, want: int) -> None:
        """Ask the store for a share of ``want`` (once at a time; failures are raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._growing = done
        sent = self.clock.monotonic()
        try:
            grant, _ = await self.store.lease_share(
                self.key,
                self.holder,
                want=want,
                held=self.held,
                limit=self.limit,
                ttl=self.ttl,
                own_limit=self.own_limit,
            )
            grew = grant > self.share
            self.share = grant
            self.valid_until = sent + self.ttl  # the store's lease lasts at least this long
            if want > self.held and not grew and self.held >= grant:
                self._full_until = sent + self.rebalance / 4  # full: do not ask again at once
            if grant or self.held:
                self._start()
        finally:
            self._growing = None
            done.set_result(None)

    def _start(self) -> None:
        """Renew the share one ``rebalance`` from now (one timer, no task while waiting)."""
        if self._timer is None:
            self._timer = self.clock.call_later(self.rebalance, self._due)

    def _due(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Renew the share at the peak use since the last renewal (nothing held and nothing
        used since: give it back, and stop renewing)."""
        want = max(self.peak, self.held)
        self.peak = self.held
        if self._growing is not None:  # a grow under way renews it anyway
            self._start()
            return
        try:
            await self._ask(want)
        except Exception as exc:  # the share lives on until it expires: try again soon
            if not isinstance(exc, StoreUnavailableError):
                logger.warning("share of %r could not be renewed: %r", self.key, exc)
            self._start()

    async def aclose(self) -> None:
        """Stop renewing and give the share back (best effort: it expires anyway)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.share:
            self.share = 0
            try:
                await self.store.lease_share(
                    self.key, self.holder, want=0, held=0, limit=self.limit, ttl=self.ttl
                )
            except Exception:  # expires by itself within ttl
                pass
