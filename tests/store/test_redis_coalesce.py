"""Coalesce across replicas on a real Redis: a leader killed (SIGKILL) or stopped (SIGSTOP)
past its lease mid-call is taken over by a waiting replica; waiters wake on the leader's
message."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from resilience import Coalesce
from resilience.store.redis import RedisStore

from ..coalesce_worker import LEASE
from ..helpers import read_line, unique_prefix, until

pytestmark = pytest.mark.redis

WORKER = str(Path(__file__).parents[1] / "coalesce_worker.py")


class Replica:
    """A replica process making one call through the fleet's Coalesce."""

    def __init__(self, url: str, prefix: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, url, prefix, str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 20.0) -> str:
        """The next line it prints (fails the test after ``timeout`` seconds)."""
        return read_line(self.proc, timeout, "replica")

    def result(self) -> dict[str, object]:
        """The result it printed, after any ``called`` line."""
        line = self.line()
        while line == "called":
            line = self.line()
        word, _, data = line.partition(" ")
        assert word == "result", line
        return dict(json.loads(data))

    def stop(self) -> None:
        """Kill it if it still runs (continuing it first if stopped)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def fleet(redis_url: str) -> Iterator[list[Replica]]:
    """The replicas a test starts, stopped at the end."""
    made: list[Replica] = []
    yield made
    for r in made:
        r.stop()


def start(fleet: list[Replica], url: str, prefix: str, seconds: float) -> Replica:
    replica = Replica(url, prefix, seconds)
    fleet.append(replica)
    return replica


def test_waiters_get_the_leaders_result(redis_url: str, fleet: list[Replica]) -> None:
    """Three replicas, one upstream call: the two that wait get the leader's result."""
    prefix = unique_prefix("coalesce")
    leader = start(fleet, redis_url, prefix, 3.0)  # long enough for two interpreters to start
    assert leader.line() == "called"
    waiters = [start(fleet, redis_url, prefix, 3.0) for _ in range(2)]
    result = leader.result()
    assert result["by"] == leader.proc.pid
    assert [w.result() for w in waiters] == [result, result]


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_a_waiter_takes_over_from_a_dead_or_stopped_leader(
    redis_url: str, fleet: list[Replica], fault: signal.Signals
) -> None:
    """The leader is killed, or stopped past its lease, mid-call: a waiter takes the flight
    over once the lease lapses, runs the call itself, and the other waiter gets its result."""
    prefix = unique_prefix("coalesce")
    leader = start(fleet, redis_url, prefix, 3.0)
    assert leader.line() == "called"
    waiters = [start(fleet, redis_url, prefix, 0.5) for _ in range(2)]
    time.sleep(0.5)  # the waiters are waiting (a generous bound for two interpreters)
    os.kill(leader.proc.pid, fault)
    killed = time.monotonic()
    results = [w.result() for w in waiters]
    took = time.monotonic() - killed
    assert results[0] == results[1]
    assert results[0]["by"] in {w.proc.pid for w in waiters}
    assert took >= LEASE * 0.5  # they waited for the lease to lapse, not for a message


async def test_waiting_replica_wakes_on_the_leaders_message(redis_url: str) -> None:
    """A waiting replica learns of the result from the store's channel at once, not at its
    next poll (30 s here)."""
    prefix = unique_prefix("coalesce")
    stores = [RedisStore.from_url(redis_url, prefix=prefix, timeout=2.0) for _ in range(2)]
    gate = asyncio.Event()
    calls = 0

    async def fetch(item: str) -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return item.upper()

    leader, waiter = (Coalesce(store=s, lease=60, poll=30, name="p")(fetch) for s in stores)
    try:
        first = asyncio.ensure_future(leader("tea"))
        await until(lambda: calls == 1, 10, "the leader's call")
        second = asyncio.ensure_future(waiter("tea"))

        def listening() -> int:
            with redis.Redis.from_url(redis_url) as client:
                ((_, count),) = client.pubsub_numsub(f"{prefix}:events")
            return int(count)

        await until(lambda: listening() >= 2, 10, "both stores' subscribers")
        await asyncio.sleep(0.1)  # the waiter is waiting
        gate.set()
        took = await until(second.done, 10, "the waiter's result")
        assert await first == await second == "TEA"
        assert calls == 1
        assert took < 5  # far below its poll: woken by the message
    finally:
        for s in stores:
            await s.aclose()
