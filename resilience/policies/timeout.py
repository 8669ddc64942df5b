"""Timeout: cancel the call when it runs longer than ``seconds``.

Semantics are those of ``asyncio.timeout``: the task is cancelled at the deadline and the
resulting ``CancelledError`` becomes ``ResilienceTimeoutError`` (a ``TimeoutError``) only
when this timeout caused it. Nested timeouts, cancellation from outside and the task's
``cancelling()`` / ``uncancel()`` count all behave as with ``asyncio.timeout``.

The difference is cost: instead of one event-loop timer per call, each ``Timeout`` keeps
its deadlines in a FIFO (they arrive in order, since every call adds the same ``seconds`` to a
monotonic clock) and keeps a single timer armed for the oldest live one.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

from ..clock import Clock, TimerHandle
from ..errors import ExcType, ResilienceTimeoutError, Traceback
from ..events import Listener, TimedOut, emit
from ..store.config import Schema, follow, register_schema
from .base import BasePolicy, CallerTask, Protected, check_seconds, task_of

__all__ = ["Timeout"]

_CancelledError = asyncio.CancelledError


class _Deadline:
    """One call's place in a Timeout's queue.

    Made without an ``__init__`` (a Python call that made it cost about 80 ns, twice what
    the object and its fields cost): its fields are set where it is made, ``_enter()`` and
    the protected function's copy of it. The protected function keeps the record of the
    last call it took off the queue itself (task deleted) and fills it again for the next
    one, which saves making one (about 30 ns).
    """

    __slots__ = ("cancelling", "deadline", "expired", "finished", "task")

    deadline: float
    task: asyncio.Task[Any]  #: the task running the call (deleted while the record is spare)
    cancelling: int  #: the task's cancellation count when the call started
    finished: bool  #: the call has ended (the entry waits to leave the queue)
    expired: bool  #: this timeout cancelled the call (the entry has left the queue)


_get_ident = threading.get_ident


class Timeout(BasePolicy):
    """Cancels the protected call after ``seconds``; raises ``ResilienceTimeoutError``.

    Usable as a decorator, with ``await timeout.call(fn, ...)``, or as ``async with timeout:``.
    """

    kind = "timeout"

    def __init__(
        self,
        seconds: float,
        *,
        name: str = "timeout",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self.seconds: float = check_seconds("seconds", seconds)
        self._queue: deque[_Deadline] = deque()
        self._stale = 0  # finished entries still queued, behind a call that runs
        self._spare: _Deadline | None = None  # a record no call holds, to fill again
        self._timer: TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0  # the thread _loop ran in at the last _enter(); 0: none yet
        self._tasks = CallerTask()
        self._held: ContextVar[tuple[_Deadline, ...]] = ContextVar(
            f"resilience.timeout.{name}", default=()
        )
        self._code = {"seconds": self.seconds}
        follow(self)

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g}, name={self.name!r})"

    # live settings
    def _live_base(self) -> dict[str, Any]:
        """Its live settings in code."""
        return dict(self._code)

    def _live_apply(self, values: dict[str, Any]) -> str:
        """Calls started from now on get ``seconds``; a shorter one also bounds the calls in
        flight to ``seconds`` from now (the deadlines stay in order), on the timeout's own
        event loop, wherever the change arrived (a store running in another thread)."""
        seconds = check_seconds("seconds", values["seconds"])
        shorter = seconds < self.seconds
        self.seconds = seconds
        loop = self._loop
        if shorter and loop is not None and not loop.is_closed():
            try:
                here = asyncio.get_running_loop() is loop
            except RuntimeError:
                here = False
            if here:
                self._shorten(seconds)
            else:
                loop.call_soon_threadsafe(self._shorten, seconds)
        return ""

    def _shorten(self, seconds: float) -> None:
        """Bound the calls in flight to ``seconds`` from now, and arm the timer again: one
        armed for the longer seconds would fire too late for them, and for the calls to
        come (a call arms one only when none is)."""
        queue = self._queue
        now = self._clock.monotonic()
        cap = now + seconds
        for entry in queue:
            entry.deadline = min(entry.deadline, cap)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if queue:
            self._timer = self._clock.call_later(max(0.0, queue[0].deadline - now), self._fire)

    # the deadline queue
    def _enter(self) -> _Deadline:
        tasks = self._tasks
        task = tasks.find()
        if task is None:
            raise RuntimeError("Timeout must be used inside an asyncio task")
        if tasks.loop is not self._loop:  # first use, or a new event loop: start afresh
            self._reset(tasks.loop)
        self._thread = tasks.thread
        entry = _Deadline()
        entry.deadline = self._clock.monotonic() + self.seconds
        entry.task = task
        entry.cancelling = task.cancelling()
        entry.finished = entry.expired = False
        self._queue.append(entry)
        if self._timer is None:
            self._timer = self._clock.call_later(self.seconds, self._fire)
        return entry

    def _reset(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._stale = 0
        self._loop = loop
        self._thread = 0

    def _leave(self, entry: _Deadline) -> bool:
        """The call ``entry`` stands for has ended: off the queue; did this timeout cancel it?"""
        entry.finished = True
        if entry.expired:  # already off the queue
            return True
        queue = self._queue
        if queue and queue[0] is entry:
            queue.popleft()
            self._drop_finished()
            return False
        self._stale = stale = self._stale + 1
        if stale > 64 and stale > 3 * (len(queue) - stale):
            # finished entries pile up behind a long-running call: compact (in place: the
            # protected functions hold the queue)
            live = [e for e in queue if not e.finished]
            queue.clear()
            queue.extend(live)
            self._stale = 0
        return False

    def _drop_finished(self) -> None:
        """Take the finished entries at the head of the queue off it."""
        queue = self._queue
        while queue and queue[0].finished:
            queue.popleft()
            self._stale -= 1

    def _fire(self) -> None:
        self._timer = None
        queue = self._queue
        now = self._clock.monotonic()
        while queue:
            entry = queue[0]
            if not entry.finished:
                if entry.deadline > now:
                    self._timer = self._clock.call_later(entry.deadline - now, self._fire)
                    return
                entry.expired = True
                entry.task.cancel()
                if self._listeners:
                    emit(self._listeners, TimedOut(name=self.name, seconds=self.seconds))
            else:
                self._stale -= 1
            queue.popleft()

    def _expired_exit(self, entry: _Deadline, exc: BaseException | None) -> None:
        """Undo our cancellation; raise the timeout error if nobody else cancelled too."""
        if entry.task.uncancel() <= entry.cancelling and isinstance(exc, _CancelledError):
            raise ResilienceTimeoutError(self.name, self.seconds) from exc

    # the policy
    def _wrap(self, fn: Protected) -> Protected:
        # few free variables (each is copied into every call's frame): the paths off the
        # hottest one call the timeout's methods
        queue = self._queue
        monotonic = self._clock.monotonic

        async def protected(*args: Any, **kwargs: Any) -> Any:
            # _enter(), inlined while CallerTask.find()'s first guess holds: the task of this
            # timeout's loop, in the thread that loop ran in at the last _enter()
            task = None
            if self._thread == _get_ident():  # _loop is set: _thread is 0 while it is None
                task = task_of(self._loop)  # type: ignore[arg-type]
            if task is not None:
                entry = self._spare
                if entry is None:
                    entry = _Deadline()
                    entry.finished = entry.expired = False
                else:  # neither finished nor expired: it left the queue at its head, below
                    self._spare = None
                entry.deadline = monotonic() + self.seconds
                entry.task = task
                entry.cancelling = task.cancelling()
                queue.append(entry)
                if self._timer is None:
                    self._timer = self._clock.call_later(self.seconds, self._fire)
            else:
                entry = self._enter()
            try:
                result = await (fn(*args, **kwargs) if kwargs else fn(*args))
            except BaseException as exc:
                if self._leave(entry):
                    self._expired_exit(entry, exc)
                raise
            # _leave(), inlined for the oldest call (which this timeout did not cancel: it
            # would be off the queue); nothing holds its record now, kept for the next call
            if queue and queue[0] is entry:
                queue.popleft()
                del entry.task
                self._spare = entry
                if queue:
                    self._drop_finished()
            elif self._leave(entry):  # the call swallowed our cancellation and returned anyway
                self._expired_exit(entry, None)
            return result

        return protected

    async def __aenter__(self) -> None:
        self._held.set((*self._held.get(), self._enter()))

    async def __aexit__(self, kind: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        held = self._held.get()
        entry = held[-1]
        self._held.set(held[:-1])
        if self._leave(entry):
            self._expired_exit(entry, exc)


register_schema(Schema("timeout", ("seconds",), lambda values, base: Timeout(**values)))
