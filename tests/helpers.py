"""What the tests share: letting the event loop run (after moving the fake clock on), waiting
on a condition, cancelling a task, keeping a policy's own events, reading a worker process's
lines, and the calls a policy protects (one that succeeds, one that fails).

Fixtures are in ``conftest.py``; what only the store tests share is in ``store/support.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from resilience import CircuitBreaker, CountWindow, Store
from resilience.events import CallFinished, Event
from resilience.testing import FakeClock

T = TypeVar("T")

_prefixes = itertools.count()

__all__ = [
    "advance",
    "boom",
    "breaker",
    "cancelled",
    "in_three_loops",
    "ok",
    "policy_events",
    "read_line",
    "settle",
    "started",
    "unique_prefix",
    "until",
    "wait_until",
]


async def ok() -> str:
    """A call that succeeds."""
    return "ok"


async def boom() -> None:
    """A call that fails."""
    raise ValueError("boom")


def breaker(store: Store, name: str = "dep", **options: Any) -> CircuitBreaker:
    """A breaker on ``store`` that trips on four failed calls in a window of four and stays
    open ten seconds; ``options`` (the breaker's) override these."""
    config: dict[str, Any] = {"minimum_calls": 4, "window": CountWindow(4), "open_for": 10.0}
    return CircuitBreaker(name, store=store, **(config | options))


def in_three_loops(main: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Run ``main()`` in a new event loop, then in one of another thread (bounded wait), then
    again here: for what must work in any loop, not only the first that used it."""
    asyncio.run(main())
    thread = threading.Thread(target=lambda: asyncio.run(main()))
    thread.start()
    thread.join(timeout=30)
    asyncio.run(main())


def unique_prefix(tag: str = "t") -> str:
    """A key prefix no other test (or test process) uses."""
    return f"{tag}{next(_prefixes)}-{os.getpid()}"


async def settle(rounds: int = 20) -> None:
    """Let the tasks that are ready run until they block: ``rounds`` turns of the event loop
    (for code on the fake clock or in memory, where nothing waits on real time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def started(call: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """``call`` as a task, run until it blocks (``settle``): under way, waiting on something."""
    task = asyncio.create_task(call)
    await settle()
    return task


async def raises_each(
    times: int,
    error: type[BaseException] | tuple[type[BaseException], ...],
    call: Callable[..., Awaitable[object]],
    *args: Any,
    match: str | None = None,
) -> None:
    """``await call(*args)`` ``times`` times, each raising ``error`` (matching ``match``)."""
    for _ in range(times):
        with pytest.raises(error, match=match):
            await call(*args)


async def advance(clock: FakeClock, seconds: float) -> None:
    """Move ``clock`` on by ``seconds`` and let the loop run what came due (``settle``)."""
    clock.advance(seconds)
    await settle()


async def cancelled(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and see it end cancelled (the cancellation propagates)."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    seconds: float = 10.0,
    what: str = "condition",
    *,
    every: float = 0.002,
) -> float:
    """Wait until ``condition()`` holds (awaited when it returns an awaitable), polling every
    ``every`` s of real time; fails naming ``what`` after ``seconds`` (a generous bound, for
    real round trips and processes). The seconds it took."""
    start = time.monotonic()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.monotonic() - start
        assert time.monotonic() - start < seconds, f"{what}: not within {seconds}s"
        await asyncio.sleep(every)


def wait_until(
    condition: Callable[[], object], seconds: float = 10.0, what: str = "condition"
) -> None:
    """``until`` for plain (not async) code: block, polling every 20 ms, until ``condition()``
    holds; fails naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds}s"
        time.sleep(0.02)


def policy_events(events: list[Any]) -> Callable[[Event], None]:
    """A listener keeping a policy's own events (not the per-call CallFinished reports)."""

    def listen(event: Event) -> None:
        if not isinstance(event, CallFinished):
            events.append(event)

    return listen


def read_line(proc: subprocess.Popen[str], timeout: float = 20.0, who: str = "process") -> str:
    """The next line ``proc`` prints on its stdout (a text pipe), stripped; fails the test
    when ``proc`` exits first or says nothing within ``timeout`` seconds."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    buffer = ""
    while time.monotonic() < deadline:
        chunk = proc.stdout.readline()
        buffer += chunk
        if buffer.endswith("\n"):
            return buffer.strip()
        if not chunk and proc.poll() is not None:
            raise AssertionError(f"{who} exited with {proc.returncode}")
        time.sleep(0.002)
    raise AssertionError(f"{who} said nothing in time")
