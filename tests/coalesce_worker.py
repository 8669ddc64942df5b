"""One replica calling through ``Coalesce(store=RedisStore)``, as its own OS process, for
the multi-process tests of tests/store/test_redis_coalesce.py.

Usage: python tests/coalesce_worker.py URL PREFIX SECONDS; calls ``fetch("tea")`` once
through the fleet's Coalesce (the upstream call takes SECONDS); prints ``called`` when its
own upstream call starts and ``result <json>`` at the end. Bounded: exits within 30 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from resilience import Coalesce
from resilience.store.redis import RedisStore

LEASE = 1.0  # a replica that stops renewing for this long is taken over
POLL = 0.02


def say(*words: object) -> None:
    print(*words, flush=True)


async def main(url: str, prefix: str, seconds: float) -> None:
    store = RedisStore.from_url(url, prefix=prefix, timeout=2.0)
    coalesce = Coalesce(store=store, lease=LEASE, poll=POLL, name="prices")

    @coalesce
    async def fetch(item: str) -> dict[str, object]:
        say("called")
        await asyncio.sleep(seconds)
        return {"item": item, "by": os.getpid()}

    try:
        async with asyncio.timeout(30):
            say("result", json.dumps(await fetch("tea")))
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
