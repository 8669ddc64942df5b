"""What the tests share: letting the event loop run, waiting on a condition, keeping a policy's
own events, and the calls a policy protects (one that succeeds, one that fails).

Fixtures are in ``conftest.py``; what only the store tests share is in ``store/support.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

from resilience.events import CallFinished, Event

__all__ = ["boom", "ok", "policy_events", "read_line", "settle", "until", "wait_until"]


async def ok() -> str:
    """A call that succeeds."""
    return "ok"


async def boom() -> None:
    """A call that fails."""
    raise ValueError("boom")


async def settle(rounds: int = 20) -> None:
    """Let the tasks that are ready run until they block: ``rounds`` turns of the event loop
    (for code on the fake clock or in memory, where nothing waits on real time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


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
