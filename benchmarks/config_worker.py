"""One replica following live settings, as its own OS process (the config benchmark's and
the two-replica tests' other replica).

Usage: python benchmarks/config_worker.py URL PREFIX

Builds a breaker, a timeout and a bulkhead named ``svc`` on a ``RedisStore``, reads the live
settings (``store.sync()``) and says ``{"event": "ready", ...}`` with the values it runs.
Then it says ``{"event": "changed", "version": v, "ns": t}`` for each change that changes a
value of one of them (``t``: ``time.monotonic_ns()`` when the first ``ConfigChanged`` of that
version arrived; CLOCK_MONOTONIC is shared by the processes of a machine), and answers one
command a line from stdin: ``show`` (the values it runs now) and ``quit``. It gives up
after ``LIMIT`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from resilience import Bulkhead, CircuitBreaker, ConfigChanged, CountWindow, Event, Timeout
from resilience.store.redis import RedisStore

LIMIT = 300.0  # seconds this process may live
NAME = "svc"


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(url: str, prefix: str) -> None:
    store = RedisStore.from_url(url, prefix=prefix, timeout=0.5)

    reported = 0

    def changed(event: Event) -> None:  # once per version, whichever policy applies it first
        nonlocal reported
        if isinstance(event, ConfigChanged) and event.version != reported:
            reported = event.version
            say(event="changed", version=event.version, ns=time.monotonic_ns())

    breaker = CircuitBreaker(
        NAME,
        store=store,
        window=CountWindow(50),
        minimum_calls=20,
        open_for=5.0,
        listeners=[changed],
    )
    timeout = Timeout(1.0, name=NAME, listeners=[changed])
    bulkhead = Bulkhead(4, name=NAME, listeners=[changed])

    def values() -> dict[str, Any]:
        return {
            "open_for": breaker.config.open_for,
            "seconds": timeout.seconds,
            "max_concurrent": bulkhead.max_concurrent,
            "degraded": store.degraded,
        }

    await store.sync()
    say(event="ready", **values())
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(LIMIT):
            while True:
                line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
                if line == "show":
                    say(event="values", **values())
                elif line in ("quit", ""):
                    return
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
