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
from types import TracebackType
from typing import Any

from ..clock import Clock, TimerHandle
from ..errors import ResilienceTimeoutError
from ..events import Listener, TimedOut, emit
from .base import BasePolicy, Protected, check_seconds

__all__ = ["Timeout"]

_current_task = asyncio.current_task
_CancelledError = asyncio.CancelledError

# An entry is a list, for speed: [deadline, task or None once finished, cancelling, expired]
_DEADLINE, _TASK, _CANCELLING, _EXPIRED = 0, 1, 2, 3
Entry = list[Any]


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
        self._queue: deque[Entry] = deque()
        self._live = 0
        self._timer: TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: ContextVar[tuple[Entry, ...]] = ContextVar(
            f"resilience.timeout.{name}", default=()
        )

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g}, name={self.name!r})"

    # the deadline queue
    def _enter(self) -> Entry:
        task = _current_task()
        if task is None:
            raise RuntimeError("Timeout must be used inside an asyncio task")
        loop = task.get_loop()
        if loop is not self._loop:  # first use, or a new event loop: start afresh
            self._reset(loop)
        entry = [self._clock.monotonic() + self.seconds, task, task.cancelling(), False]
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

    def _leave(self, entry: Entry) -> None:
        entry[_TASK] = None
        self._live -= 1
        queue = self._queue
        if queue and queue[0] is entry:
            queue.popleft()
            while queue and queue[0][_TASK] is None:
                queue.popleft()
        elif len(queue) > 64 and len(queue) > 4 * self._live:
            # finished entries pile up behind a long-running one: compact
            self._queue = deque(e for e in queue if e[_TASK] is not None)

    def _fire(self) -> None:
        self._timer = None
        queue = self._queue
        now = self._clock.monotonic()
        while queue:
            entry = queue[0]
            task = entry[_TASK]
            if task is not None:
                if entry[_DEADLINE] > now:
                    self._timer = self._clock.call_later(entry[_DEADLINE] - now, self._fire)
                    return
                entry[_EXPIRED] = True
                task.cancel()
                if self._listeners:
                    emit(self._listeners, TimedOut(name=self.name, seconds=self.seconds))
            queue.popleft()

    def _expired_exit(
        self, task: asyncio.Task[Any], cancelling: int, exc: BaseException | None
    ) -> None:
        """Undo our cancellation; raise the timeout error if nobody else cancelled too."""
        if task.uncancel() <= cancelling and isinstance(exc, _CancelledError):
            raise ResilienceTimeoutError(self.name, self.seconds) from exc

    # the policy
    def _wrap(self, fn: Protected) -> Protected:
        enter = self._enter
        leave = self._leave
        expired_exit = self._expired_exit

        async def protected(*args: Any, **kwargs: Any) -> Any:
            entry = enter()
            task = entry[_TASK]
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                leave(entry)
                if entry[_EXPIRED]:
                    expired_exit(task, entry[_CANCELLING], exc)
                raise
            leave(entry)
            if entry[_EXPIRED]:  # the call swallowed our cancellation and returned anyway
                expired_exit(task, entry[_CANCELLING], None)
            return result

        return protected

    async def __aenter__(self) -> None:
        self._held.set((*self._held.get(), self._enter()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held = self._held.get()
        entry = held[-1]
        self._held.set(held[:-1])
        task = entry[_TASK]
        self._leave(entry)
        if entry[_EXPIRED]:
            self._expired_exit(task, entry[_CANCELLING], exc)
