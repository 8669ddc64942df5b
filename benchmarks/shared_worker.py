"""The observing replica of the propagation benchmark: a separate OS process (process B).

Usage: python benchmarks/shared_worker.py URL PREFIX SYNC_INTERVAL

Reads one command a line from stdin and answers on stdout:

* ``watch``: wait until the breaker is CLOSED, say ``polling``, then check ``breaker.state``
  every ``POLL`` seconds, and as soon as a ``StateChanged`` listener saw it open (waiting in
  between, so the subscriber runs and no core is burnt; asyncio rounds an idle loop's sleep
  up to 1 ms, which a call arriving in a real process does not wait), until it is not
  CLOSED; confirm with a real call that it rejects; say
  ``rejected <adopted_ns> <rejected_ns> <ok>``: when a ``StateChanged`` listener saw the
  breaker open (from then on every call is rejected) and when the poller's call was rejected
  (``time.monotonic_ns``; CLOCK_MONOTONIC is shared by all processes of the machine).
* ``fail N``: wait until CLOSED, fail ``N`` calls, flush them (``store.sync()``), then go on
  as ``watch`` does.
* ``quit``: close the store and exit.

Every wait is bounded; the whole process gives up after ``LIMIT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from resilience import CircuitBreaker, CircuitOpenError, CircuitState, CountWindow
from resilience.events import StateChanged
from resilience.store.redis import RedisStore

LIMIT = 300.0  # seconds this process may live
WAIT = 5.0  # seconds any single wait may take
POLL = 0.0002  # seconds between two checks of the state (asyncio rounds sleeps up to 1 ms)


def make_breaker(store: RedisStore) -> CircuitBreaker:
    """The fleet's breaker; the driver builds the same one (a trip needs 10 calls, half failed)."""
    return CircuitBreaker(
        "propagation",
        store=store,
        window=CountWindow(10),
        minimum_calls=10,
        failure_ratio=0.5,
        open_for=60.0,
    )


def say(*words: object) -> None:
    print(*words, flush=True)


async def ok() -> int:
    return 1


async def fail() -> int:
    raise ValueError("boom")


async def until_closed(b: CircuitBreaker) -> bool:
    """Poll (bounded) until ``b`` is CLOSED; the driver's reset arrives by pub/sub."""
    deadline = time.monotonic() + WAIT
    while b.state is not CircuitState.CLOSED and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.0005)
    return b.state is CircuitState.CLOSED


async def poll(b: CircuitBreaker, opened: list[int], changed: asyncio.Event) -> None:
    """Check ``b.state`` every ``POLL`` seconds, or once ``changed`` is set, until it leaves
    CLOSED, then call once."""
    opened.clear()
    changed.clear()
    say("polling")
    deadline = time.monotonic() + WAIT
    closed = CircuitState.CLOSED
    while b.state is closed:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL):
                await changed.wait()
        if time.monotonic() > deadline:
            say("timeout")
            return
    try:
        await b.call(ok)
        rejected = False
    except CircuitOpenError:
        rejected = True
    seen = time.monotonic_ns()
    say("rejected", opened[0] if opened else seen, seen, int(rejected))


async def main(url: str, prefix: str, sync_interval: float) -> None:
    loop = asyncio.get_running_loop()
    end = time.monotonic() + LIMIT
    async with RedisStore.from_url(url, prefix=prefix, sync_interval=sync_interval) as store:
        b = make_breaker(store)
        opened: list[int] = []
        changed = asyncio.Event()

        def on_event(event: object) -> None:
            if isinstance(event, StateChanged) and event.new is CircuitState.OPEN:
                opened.append(time.monotonic_ns())
                changed.set()

        b.add_listener(on_event)
        await store.sync()
        await asyncio.sleep(0.05)  # let the subscriber attach
        say("ready")
        while time.monotonic() < end:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                return
            if not await until_closed(b):
                say("stuck", b.state)
                continue
            if line[0] == "fail":
                for _ in range(int(line[1])):
                    try:
                        await b.call(fail)
                    except (ValueError, CircuitOpenError):
                        pass
                await store.sync()
            await poll(b, opened, changed)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
