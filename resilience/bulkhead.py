"""Bulkhead: at most ``max_concurrent`` calls in flight; a bounded queue may wait for a slot."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from .clock import Clock
from .errors import BulkheadFullError
from .events import CallRejected, Listener, emit
from .policy import BasePolicy, Protected, check_int, check_seconds

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
    """

    kind = "bulkhead"

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_waiting: int = 0,
        max_wait: float | None = None,
        name: str = "bulkhead",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self.max_concurrent = check_int("max_concurrent", max_concurrent)
        self.max_waiting = check_int("max_waiting", max_waiting, minimum=0)
        self.max_wait: float | None = check_seconds("max_wait", max_wait, none=True, zero=True)
        self._active = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()

    def __repr__(self) -> str:
        return f"Bulkhead({self.max_concurrent}, name={self.name!r})"

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Calls queued for a slot now."""
        return sum(1 for w in self._waiters if not w.done())

    def _reject(self) -> BulkheadFullError:
        error = BulkheadFullError(self.name, self.max_concurrent)
        if self._listeners:
            emit(self._listeners, CallRejected(name=self.name, policy=self.kind, error=error))
        return error

    async def _acquire(self) -> None:
        if self._active < self.max_concurrent:
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
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot moves to the waiter: _active unchanged
                return
        self._active -= 1

    def _wrap(self, fn: Protected) -> Protected:
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

    async def __aenter__(self) -> None:
        if self._active < self.max_concurrent and not self._waiters:
            self._active += 1
        else:
            await self._acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()
