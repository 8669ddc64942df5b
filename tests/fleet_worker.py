"""One replica of a fleet, as its own OS process, for the multi-process tests.

Usage: python tests/fleet_worker.py MODE URL PREFIX [ARG]; prints one line per event.
Every mode is bounded in time and exits by itself.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import redis.asyncio as aioredis

from resilience import CircuitBreaker, CircuitOpenError, CircuitState, CountWindow
from resilience.store.redis import RedisStore

LIMIT = 20.0  # seconds any mode may run


def breaker(store: RedisStore, probes: int = 2) -> CircuitBreaker:
    """The fleet's breaker; every replica builds it alike."""
    return CircuitBreaker(
        "fleet",
        store=store,
        window=CountWindow(10),
        minimum_calls=10,
        open_for=0.5,
        half_open_calls=probes,
        probe_lease=1.0,
    )


def say(*words: object) -> None:
    print(*words, flush=True)


async def ok() -> str:
    return "ok"


async def boom() -> None:
    raise ValueError("boom")


async def watch(b: CircuitBreaker) -> None:
    """Call every 20 ms until rejected; print the wall time of the first rejection."""
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        try:
            await b.call(ok)
        except CircuitOpenError:
            say("rejected", repr(time.time()))
            return
        await asyncio.sleep(0.02)
    say("timeout")


async def trip(b: CircuitBreaker) -> None:
    """On a line from stdin, fail until this replica's own outcomes open the breaker."""
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    deadline = time.monotonic() + LIMIT
    while b.state is not CircuitState.OPEN and time.monotonic() < deadline:
        try:
            await b.call(boom)
        except (ValueError, CircuitOpenError):
            pass
        await asyncio.sleep(0.0005)
    say("tripped", repr(time.time()))


async def probe(b: CircuitBreaker, url: str, prefix: str, calls: int) -> None:
    """On a line from stdin, fire `calls` concurrent calls; count the probes that ran."""
    counter = aioredis.Redis.from_url(url)

    async def slow_ok() -> str:
        await counter.incr(f"{prefix}:probes-run")
        await asyncio.sleep(0.3)
        return "ok"

    async def one() -> str:
        try:
            return await b.call(slow_ok)
        except CircuitOpenError:
            return "rejected"

    say("ready")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results = await asyncio.gather(*(one() for _ in range(calls)))
    say(json.dumps({"ran": results.count("ok"), "rejected": results.count("rejected")}))
    await counter.aclose()


async def hold(b: CircuitBreaker) -> None:
    """Take a probe and never finish it (the test kills this process)."""

    async def forever() -> None:
        say("holding")
        await asyncio.sleep(LIMIT)

    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        try:
            await b.call(forever)
            return
        except CircuitOpenError:
            await asyncio.sleep(0.01)


async def quorum(store: RedisStore, k: int) -> None:
    """A quorum breaker; commands on stdin: "trip" (fail until this replica's own window
    opens it: prints "tripped"), "state" (prints the state), EOF ends."""
    b = CircuitBreaker(
        "quorum",
        store=store,
        window=CountWindow(10),
        minimum_calls=10,
        open_for=LIMIT,
        open_when="quorum",
        quorum=k,
    )
    await store.sync()
    say("ready")
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command == "trip":
            while b.state is not CircuitState.OPEN and time.monotonic() < deadline:
                try:
                    await b.call(boom)
                except (ValueError, CircuitOpenError):
                    pass
            say("tripped")
        elif command == "state":
            say(b.state.value)
        else:
            return


async def main(mode: str, url: str, prefix: str, arg: str | None) -> None:
    async with RedisStore.from_url(url, prefix=prefix) as store:
        if mode == "quorum":
            await quorum(store, int(arg or "2"))
            return
        b = breaker(store, 1 if mode == "hold" else 2)
        await store.sync()  # its subscriber attaches soon after: the test waits for it
        if mode != "probe":
            say("ready")
        if mode == "watch":
            await watch(b)
        elif mode == "trip":
            await trip(b)
        elif mode == "probe":
            await probe(b, url, prefix, int(arg or "5"))
        elif mode == "hold":
            await hold(b)
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    )
