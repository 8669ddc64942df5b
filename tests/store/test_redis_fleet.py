"""Several OS processes sharing one breaker through one real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from resilience import CircuitBreaker, CircuitOpenError, CircuitState
from resilience.store.redis import RedisStore
from resilience.store.redis.breaker import VOTE_LEASE

from .. import helpers
from ..fleet_worker import boom, breaker
from ..helpers import read_line, wait_until

WORKER = str(Path(__file__).parents[1] / "fleet_worker.py")


class Worker:
    """A replica process; its stdout lines are read with a bounded wait."""

    def __init__(self, mode: str, url: str, prefix: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, mode, url, prefix, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 20.0) -> str:
        """The next line the worker prints (fails the test after `timeout`)."""
        return read_line(self.proc, timeout, "worker")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        """Kill the worker if it still runs; close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def ready(workers: list[Worker], url: str, prefix: str) -> None:
    """Each of ``workers`` said "ready" (its store synced), and its subscriber listens."""
    for w in workers:
        assert w.line() == "ready"

    def subscribers() -> int:
        with redis.Redis.from_url(url) as client:
            ((_, listening),) = client.pubsub_numsub(f"{prefix}:events")  # the store's channel
        return int(listening)

    wait_until(lambda: subscribers() >= len(workers), 10, "every worker's subscriber")


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return helpers.unique_prefix("fleet")


def test_one_replica_trips_the_others_reject_promptly(redis_url: str, prefix: str) -> None:
    """Three watcher processes start rejecting within milliseconds of a fourth tripping."""
    watchers = [Worker("watch", redis_url, prefix) for _ in range(3)]
    tripper = Worker("trip", redis_url, prefix)
    try:
        ready([*watchers, tripper], redis_url, prefix)
        tripper.send("go")
        word, when = tripper.line().split()
        assert word == "tripped"
        delays = []
        for w in watchers:
            word, seen = w.line().split()
            assert word == "rejected"
            delays.append(float(seen) - float(when))
        print(f"propagation delays (s): {sorted(delays)}, median {statistics.median(delays):.4f}")
        assert max(delays) < 2.0  # generous; benchmarks/ measures the real figure
    finally:
        for w in [*watchers, tripper]:
            w.stop()


async def trip_from_here(
    url: str, prefix: str, probes: int = 2
) -> tuple[RedisStore, CircuitBreaker]:
    """Open the fleet's breaker from this process (built as the workers build it)."""
    store = RedisStore.from_url(url, prefix=prefix)
    b = breaker(store, probes)
    for _ in range(10):
        try:
            await b.call(boom)
        except (ValueError, CircuitOpenError):
            pass
    await store.sync()
    assert b.state is CircuitState.OPEN
    return store, b


def test_half_open_burst_from_four_processes_runs_exactly_the_probes(
    redis_url: str, prefix: str
) -> None:
    """20 concurrent calls from 4 processes in half-open: exactly half_open_calls run."""
    workers = [Worker("probe", redis_url, prefix, "5") for _ in range(4)]
    try:
        ready(workers, redis_url, prefix)

        async def arrange() -> int:
            store, _ = await trip_from_here(redis_url, prefix)
            await store.aclose()
            await asyncio.sleep(0.6)  # past open_for
            return 0

        asyncio.run(arrange())
        for w in workers:
            w.send("go")
        results = [json.loads(w.line()) for w in workers]
        assert sum(r["ran"] for r in results) == 2
        assert sum(r["rejected"] for r in results) == 18

        async def count() -> int:
            client = aioredis.Redis.from_url(redis_url)
            try:
                return int(await client.get(f"{prefix}:probes-run") or 0)
            finally:
                await client.aclose()

        assert asyncio.run(count()) == 2
    finally:
        for w in workers:
            w.stop()


def test_a_probe_holder_killed_mid_probe_cannot_wedge_the_breaker(
    redis_url: str, prefix: str
) -> None:
    """SIGKILL the process holding a probe: after the lease, another replica probes and closes."""

    async def scenario() -> None:
        store, b = await trip_from_here(redis_url, prefix, probes=1)
        try:
            await asyncio.sleep(0.6)
            holder = Worker("hold", redis_url, prefix)
            try:
                assert holder.line() == "ready"
                assert holder.line() == "holding"
                await asyncio.sleep(0.05)
            finally:
                os.kill(holder.proc.pid, signal.SIGKILL)
                holder.stop()
            killed = time.monotonic()

            async def ok() -> str:
                return "ok"

            rejected = 0
            while time.monotonic() - killed < 15 and b.state is not CircuitState.CLOSED:
                try:
                    await b.call(ok)
                except CircuitOpenError:
                    rejected += 1
                    await asyncio.sleep(0.01)
            await store.sync()
            assert rejected > 0  # the dead holder's lease blocked probes for a while
            assert b.state is CircuitState.CLOSED
            assert time.monotonic() - killed < 10
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_a_quorum_breaker_opens_the_fleet_only_when_k_replicas_trip(
    redis_url: str, prefix: str
) -> None:
    """Four processes, quorum 2: one sick replica opens only its own breaker; a second one's
    trip opens everyone's."""
    workers = [Worker("quorum", redis_url, prefix, "2") for _ in range(4)]

    def states() -> list[str]:
        for w in workers:
            w.send("state")
        return [w.line() for w in workers]

    try:
        ready(workers, redis_url, prefix)
        workers[0].send("trip")
        assert workers[0].line() == "tripped"
        time.sleep(0.5)  # a fleet-wide open reaches the others in milliseconds: none came
        assert states() == ["open", "closed", "closed", "closed"]
        workers[1].send("trip")
        assert workers[1].line() == "tripped"
        deadline = time.monotonic() + 10
        while (seen := states()) != ["open"] * 4:
            assert time.monotonic() < deadline, seen
            time.sleep(0.02)
    finally:
        for w in workers:
            w.stop()


def test_a_killed_voter_restarted_under_a_new_id_does_not_reach_quorum_alone(
    redis_url: str, prefix: str
) -> None:
    """Quorum 2: a sick replica trips, is killed (no clean shutdown: its vote is not
    withdrawn), restarts under a new replica id and trips again. The dead replica's vote
    has lapsed within the vote lease, so the healthy replicas stay closed."""
    healthy = [Worker("quorum", redis_url, prefix, "2") for _ in range(2)]
    sick = Worker("quorum", redis_url, prefix, "2")
    workers = [*healthy, sick]
    try:
        ready(workers, redis_url, prefix)
        sick.send("trip")
        assert sick.line() == "tripped"
        sick.stop()  # SIGKILL
        time.sleep(VOTE_LEASE + 0.5)
        restarted = Worker("quorum", redis_url, prefix, "2")
        workers.append(restarted)
        assert restarted.line() == "ready"
        restarted.send("trip")
        assert restarted.line() == "tripped"
        time.sleep(0.5)  # a fleet-wide open reaches the others in milliseconds: none came
        for w in healthy:
            w.send("state")
        assert [w.line() for w in healthy] == ["closed", "closed"]
    finally:
        for w in workers:
            w.stop()
