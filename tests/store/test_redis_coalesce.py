"""Coalesce across processes on a real Redis: a leader killed (SIGKILL) or stopped
(SIGSTOP) past its lease mid-call is taken over by a waiting replica."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..coalesce_worker import LEASE
from ..helpers import read_line, unique_prefix

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
