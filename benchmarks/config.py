"""How fast a live settings change reaches another replica (a process of its own).

Usage: python benchmarks/config.py [--changes N] [--out DIR]

Starts its own redis-server on a free loopback port (``tests/redis_server.py``), one replica
process (``config_worker.py``: a breaker, a timeout and a bulkhead named ``svc``) and, here,
a store that changes the settings of ``svc`` ``--changes`` times, one at a time: each change
is timed from just before ``store.configure`` to the moment the other replica's breaker
reported ``ConfigChanged`` (``time.monotonic_ns`` on both sides: CLOCK_MONOTONIC is shared by
the processes of a machine). Also timed: ``configure`` itself (checked, written and
published: the caller's wait) and a ``rollback``. Writes CONFIG.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

from resilience.store.redis import RedisStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import write_report  # noqa: E402
from shared_cases import private_redis, redis_version  # noqa: E402

WORKER = str(HERE / "config_worker.py")
WAIT = 10.0  # seconds any answer of the replica may take


def _line(proc: subprocess.Popen[str], event: str) -> dict[str, object]:
    """The next ``event`` the replica says, within ``WAIT`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + WAIT
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise RuntimeError(f"the replica did not say {event!r} within {WAIT} s")
        raw = proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"the replica exited before saying {event!r}")
        line = json.loads(raw)
        if line["event"] == event:
            return dict(line)


def _row(what: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (
        f"| {what} | {len(ordered)} | {statistics.median(ordered):.2f} | {p99:.2f} | "
        f"{ordered[0]:.2f} | {ordered[-1]:.2f} |"
    )


async def measure(url: str, prefix: str, proc: subprocess.Popen[str], changes: int) -> list[str]:
    """The table's rows: ``changes`` changes, then a tenth as many rollbacks."""
    store = RedisStore.from_url(url, prefix=prefix, timeout=1.0)
    pushed: list[float] = []
    calls: list[float] = []
    rollbacks: list[float] = []
    try:
        _line(proc, "ready")
        for i in range(changes):
            sent = time.monotonic_ns()
            # every change changes a value (one that changes none is applied by no policy)
            await store.configure("svc", open_for=6.0 + i % 7, seconds=0.5 + i % 3)
            done = time.monotonic_ns()
            seen = _line(proc, "changed")
            pushed.append((int(str(seen["ns"])) - sent) / 1e6)
            calls.append((done - sent) / 1e6)
            await asyncio.sleep(0.005)  # one change at a time, as an operator makes them
        for _ in range(max(1, changes // 10)):
            sent = time.monotonic_ns()
            await store.rollback("svc")
            _line(proc, "changed")
            rollbacks.append((time.monotonic_ns() - sent) / 1e6)
    finally:
        await store.aclose()
        assert proc.stdin is not None
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    return [
        _row("a change, applied by the other replica", pushed),
        _row("configure() returns (checked, written, published)", calls),
        _row("a rollback, applied by the other replica", rollbacks),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--changes", type=int, default=200, help="changes (default: 200)")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args()
    prefix = f"bench-config-{os.getpid()}"
    with private_redis() as (server, binary):
        proc = subprocess.Popen(
            [sys.executable, WORKER, server.url, prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        rows = asyncio.run(measure(server.url, prefix, proc, args.changes))
    load = os.getloadavg()
    text = "\n".join(
        [
            "# Live settings: how fast a change reaches another replica",
            "",
            f"`python benchmarks/config.py --changes {args.changes}`: one replica process, "
            f"Redis {redis_version(binary)} on loopback, Python {sys.version.split()[0]}; "
            f"load average {load[0]:.2f} while it ran (2 cores). Milliseconds.",
            "",
            "| what | samples | p50 | p99 | min | max |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "A change is one script call (checked against the values in code replicas "
            "reported, written if the version is still the one checked, published on the "
            "store's channel); each replica's subscriber applies it between calls. Nothing is "
            "read on a call's path.",
            "",
        ]
    )
    write_report(args.out, "CONFIG.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
