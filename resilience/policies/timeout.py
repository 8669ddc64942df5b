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
from collections import deque
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

from ..clock import Clock, TimerHandle
from ..errors import ExcType, ResilienceTimeoutError, Traceback
from ..events import Listener, TimedOut, emit
from ..store.config import Schema, follow, register_schema
from .base import BasePolicy, CallerTask, Protected, check_seconds

__all__ = ["Timeout"]

_CancelledError = asyncio.CancelledError


class _Deadline:
    """One call's place in a Timeout's queue."""

    __slots__ = ("cancelling", "deadline", "expired", "finished", "task")

    def __init__(self, deadline: float, task: asyncio.Task[Any], cancelling: int) -> None:
        self.deadline = deadline
        self.task = task
        self.cancelling = cancelling  #: the task's cancellation count when the call started
        self.finished = False  #: the call has ended (the entry waits to leave the queue)
        self.expired = False  #: this timeout cancelled the call


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
        self._live = 0
        self._timer: TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
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
        flight to ``seconds`` from now (the deadlines stay in order)."""
        seconds = check_seconds("seconds", values["seconds"])
        queue = self._queue
        if seconds < self.seconds and queue:
            now = self._clock.monotonic()
            cap = now + seconds
            for entry in queue:
                entry.deadline = min(entry.deadline, cap)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._clock.call_later(max(0.0, queue[0].deadline - now), self._fire)
        self.seconds = seconds
        return ""

    # the deadline queue
    def _enter(self) -> _Deadline:
        tasks = self._tasks
        task = tasks.find()
        if task is None:
            raise RuntimeError("Timeout must be used inside an asyncio task")
        if tasks.loop is not self._loop:  # first use, or a new event loop: start afresh
            self._reset(tasks.loop)
        entry = _Deadline(self._clock.monotonic() + self.seconds, task, task.cancelling())
        self._queue.append(entry)
        self._live += 1
        if self._timer is None:
            self._timer = self._clock.call_later(self.seconds, self._fire)
        return entry

    def _reset(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._live = 0
        self._loop = loop

    def _leave(self, entry: _Deadline) -> None:
        entry.finished = True
        self._live -= 1
        queue = self._queue
        if queue and queue[0] is entry:
            queue.popleft()
            while queue and queue[0].finished:
                queue.popleft()
        elif len(queue) > 64 and len(queue) > 4 * self._live:
            # finished entries pile up behind a long-running one: compact
            self._queue = deque(e for e in queue if not e.finished)

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
            queue.popleft()

    def _expired_exit(self, entry: _Deadline, exc: BaseException | None) -> None:
        """Undo our cancellation; raise the timeout error if nobody else cancelled too."""
        if entry.task.uncancel() <= entry.cancelling and isinstance(exc, _CancelledError):
            raise ResilienceTimeoutError(self.name, self.seconds) from exc

    # the policy
    def _wrap(self, fn: Protected) -> Protected:
        enter = self._enter
        leave = self._leave
        expired_exit = self._expired_exit

        async def protected(*args: Any, **kwargs: Any) -> Any:
            entry = enter()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                leave(entry)
                if entry.expired:
                    expired_exit(entry, exc)
                raise
            leave(entry)
            if entry.expired:  # the call swallowed our cancellation and returned anyway
                expired_exit(entry, None)
            return result

        return protected

    async def __aenter__(self) -> None:
        self._held.set((*self._held.get(), self._enter()))

    async def __aexit__(self, kind: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        held = self._held.get()
        entry = held[-1]
        self._held.set(held[:-1])
        self._leave(entry)
        if entry.expired:
            self._expired_exit(entry, exc)


register_schema(Schema("timeout", ("seconds",), lambda values, base: Timeout(**values)))
