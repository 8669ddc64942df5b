"""What ``Coalesce`` and ``Collapse`` save and what they cost, in one process.

Usage::

    python benchmarks/coalesce.py            # about 20 seconds; writes COALESCE.md
    python benchmarks/coalesce.py --quick    # a smoke run, prints only

Rows:

1. **A herd**: N concurrent identical calls through ``Coalesce`` against a backend that
   takes 5 ms: how many reach the backend (goal: 1 per process); and 3 replicas (three
   ``RedisStore`` clients of one ``redis-server`` of its own, in this process) x N calls
   through ``Coalesce(store=...)``: how many reach it (goal: 1 for the fleet).
2. **Latency added**: to the caller that starts an execution (the leader), a lone call
   through ``Coalesce`` minus the bare call of a backend that yields to the event loop ten
   times (no timer: its noise would hide the difference); to the callers that join it
   (the waiters), the time from the backend's return until all of 100 callers are awake.
   Across the fleet (3 replicas): what a lone call through ``Coalesce(store=...)`` adds (a
   round trip to join the flight), and the time from the backend's return until the last of
   the other two replicas' callers has the result (the leader's publishing round trip, its
   message, and each waiter's round trip to read the result). Median and minimum over
   rounds.
3. **A batching backend** (one round trip of 2 ms per request, whatever it asks for, plus
   5 us per key; 8 connections) offered N single calls at once: calls per second with one
   request per call, and with ``Collapse(max_size=100, delay=0.001)``.
4. **A key never shared**: ns per awaited call through ``Coalesce`` with a new key each time,
   against the bare await of the same function (interleaved rounds; goal: under 1 us above
   the bare call, scaled by this run's bare await against the 65 ns of the reference
   machine, as in benchmarks/README.md).
5. **A request's cache**: ns per awaited call through ``Coalesce(scope="request")`` within
   a ``request_scope()``: with a new key each time (run, then kept), and with the key of a
   call the request made before (answered from its cache), in the same rounds as row 4.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from resilience import Coalesce, Collapse, request_scope  # noqa: E402

REFERENCE_BARE_NS = 65.0  # a bare await on the machine the targets were set on
TARGET_NS = 1000.0  # a never-shared key: at most this much above the bare call there


async def herd(n: int) -> int:
    """Row 1: how many of ``n`` concurrent identical calls reach the backend."""
    calls = 0

    @Coalesce()
    async def fetch(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.005)
        return key

    await asyncio.gather(*(fetch("hot") for _ in range(n)))
    return calls


async def latency(n: int, rounds: int) -> dict[str, list[float]]:
    """Row 2: the seconds a lone call through ``Coalesce`` takes and a bare call takes (the
    leader's cost), and the seconds from the backend's return to the wake-up of the last of
    ``n`` callers sharing it (what waiting costs)."""
    returned = 0.0

    async def backend(key: int) -> int:
        nonlocal returned
        for _ in range(10):  # an I/O-bound call, without the noise of a timer
            await asyncio.sleep(0)
        returned = time.perf_counter()
        return key

    fetch = Coalesce()(backend)
    out: dict[str, list[float]] = {"bare": [], "leader": [], "waiter": []}
    for r in range(rounds):
        start = time.perf_counter()
        await backend(r)
        out["bare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        await fetch(r)
        out["leader"].append(time.perf_counter() - start)
        tasks = [asyncio.ensure_future(fetch(-r)) for _ in range(n)]
        await asyncio.wait(tasks)
        woke = time.perf_counter()  # this task wakes after every caller has
        out["waiter"].append(woke - returned)
    return out


class Database:
    """A backend answering one request per round trip (2 ms, plus 5 us per key asked
    for) over ``connections`` connections."""

    def __init__(self, connections: int) -> None:
        self.pool = asyncio.Semaphore(connections)
        self.requests = 0

    async def get(self, key: int) -> int:
        return (await self.get_many([key]))[key]

    async def get_many(self, keys: list[int]) -> Mapping[int, int]:
        async with self.pool:
            self.requests += 1
            await asyncio.sleep(0.002 + 0.000005 * len(keys))
            return {k: k for k in keys}


async def throughput(n: int, collapse: bool) -> tuple[float, int]:
    """Row 3: calls per second for ``n`` concurrent single calls, and requests sent."""
    db = Database(connections=8)
    get: Callable[[int], Awaitable[int]] = db.get
    if collapse:
        get = Collapse(db.get_many, max_size=100, delay=0.001)
    start = time.perf_counter()
    results = await asyncio.gather(*(get(k) for k in range(n)))
    elapsed = time.perf_counter() - start
    assert results == list(range(n))
    return n / elapsed, db.requests


async def unshared(rounds: int, calls: int) -> dict[str, list[float]]:
    """Rows 4 and 5: ns per awaited call, bare and through Coalesce with a new key each time;
    through ``Coalesce(scope="request")`` in a request, with a new key and with a kept one."""

    async def ok(key: int) -> int:
        return 1

    async def in_a_task(key: int) -> int:
        # what any single flight whose execution no caller owns pays at the least: a task
        return await asyncio.get_running_loop().create_task(ok(key))

    fetch = Coalesce()(ok)
    per_request = Coalesce(scope="request")(ok)
    keys = itertools.count()
    out: dict[str, list[float]] = {
        "bare": [],
        "task": [],
        "coalesce": [],
        "request": [],
        "kept": [],
    }
    cases: list[tuple[str, Callable[[int], Awaitable[int]]]] = [
        ("bare", ok),
        ("task", in_a_task),
        ("coalesce", fetch),
        ("request", per_request),
        ("kept", lambda key: per_request(-1)),
    ]
    for r in range(rounds + 1):
        for name, fn in cases if r % 2 else cases[::-1]:
            await asyncio.sleep(0)
            scope = request_scope().open()
            await per_request(-1)
            gc.disable()
            start = time.perf_counter_ns()
            for _ in range(calls):
                await fn(next(keys))
            elapsed = time.perf_counter_ns() - start
            scope.close()
            gc.enable()
            if r:  # the first round warms up
                out[name].append(elapsed / calls)
        gc.collect()
    return out


async def fleet(url: str, n: int, rounds: int) -> tuple[int, dict[str, list[float]]]:
    """Rows 1 and 2 across a fleet: upstream calls for 3 replicas x ``n`` identical calls,
    and the seconds added to a leader and to the other replicas' waiters."""
    from resilience.store.redis import RedisStore

    stores = [RedisStore.from_url(url, prefix=f"bench{os.getpid()}") for _ in range(3)]
    calls = 0
    returned = 0.0

    async def backend(key: str) -> str:
        nonlocal calls, returned
        calls += 1
        for _ in range(10):
            await asyncio.sleep(0)
        if not key.startswith(("bare", "lone")):
            await asyncio.sleep(0.02)  # the waiting replicas have joined
        returned = time.perf_counter()
        return key

    fetches = [Coalesce(store=s, name="bench")(backend) for s in stores]
    try:
        await asyncio.gather(*(f("herd") for f in fetches for _ in range(n)))
        herd_calls = calls
        out: dict[str, list[float]] = {"bare": [], "leader": [], "waiter": []}
        for r in range(rounds):
            start = time.perf_counter()
            await backend(f"bare{r}")
            out["bare"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await fetches[0](f"lone{r}")
            out["leader"].append(time.perf_counter() - start)
            leader = asyncio.ensure_future(fetches[0](f"shared{r}"))
            await asyncio.sleep(0.005)  # the leader holds the flight
            waiters = [asyncio.ensure_future(f(f"shared{r}")) for f in fetches[1:]]
            await asyncio.wait([leader, *waiters])
            out["waiter"].append(time.perf_counter() - returned)
        return herd_calls, out
    finally:
        for s in stores:
            await s.aclose()


def minus(times: dict[str, list[float]], case: str) -> str:
    """``case`` minus the bare call: the difference of their medians / of their minimums,
    in microseconds."""
    median = statistics.median(times[case]) - statistics.median(times["bare"])
    least = min(times[case]) - min(times["bare"])
    return f"{median * 1e6:,.0f} / {least * 1e6:,.0f}"


def us(values: list[float]) -> str:
    """Median / minimum of seconds, in microseconds."""
    return f"{statistics.median(values) * 1e6:,.0f} / {min(values) * 1e6:,.0f}"


async def main(quick: bool, url: str) -> list[str]:
    n = 100 if quick else 1000
    rounds = 3 if quick else 21
    lines = [
        "# Coalesce and Collapse",
        "",
        f"Python {platform.python_version()}, {platform.machine()}, "
        f"load average {os.getloadavg()[0]:.2f} at the start. One process; "
        "`python benchmarks/coalesce.py` wrote this file.",
        "",
        "## 1. A herd of identical calls",
        "",
        "| concurrent identical calls | calls reaching the backend |",
        "| --- | --- |",
    ]
    for size in (10, n):
        lines.append(f"| {size} | {await herd(size)} |")
    fleet_calls, far = await fleet(url, n, rounds)
    lines.append(f"| 3 replicas x {n}, `Coalesce(store=RedisStore)` | {fleet_calls} |")
    lat = await latency(100, rounds)
    lines += [
        "",
        "## 2. Latency (us, median / min over rounds)",
        "",
        "The backend yields to the event loop 10 times. Added: the difference of the medians",
        "/ of the minimums.",
        "",
        "| who | us |",
        "| --- | --- |",
        f"| bare call (the backend itself) | {us(lat['bare'])} |",
        f"| leader: a call through `Coalesce` minus the bare call | {minus(lat, 'leader')} |",
        f"| waiters: from the backend's return until all of 100 callers are awake | "
        f"{us(lat['waiter'])} |",
        "| fleet leader: a lone call through `Coalesce(store=...)` minus the bare call | "
        f"{minus(far, 'leader')} |",
        "| fleet waiters: from the backend's return until both other replicas have it "
        f"(woken by the leader's message) | {us(far['waiter'])} |",
    ]
    plain, plain_requests = await throughput(n, collapse=False)
    batched, batched_requests = await throughput(n, collapse=True)
    lines += [
        "",
        f"## 3. A batching backend ({n} concurrent single calls, 8 connections, 2 ms a request)",
        "",
        "| | calls/s | requests sent |",
        "| --- | --- | --- |",
        f"| one request per call | {plain:,.0f} | {plain_requests} |",
        f"| `Collapse(max_size=100, delay=0.001)` | {batched:,.0f} | {batched_requests} |",
        f"| ratio | {batched / plain:.1f}x | |",
    ]
    cost = await unshared(rounds, 2000 if quick else 20000)
    bare = statistics.median(cost["bare"])
    ours = statistics.median(cost["coalesce"])
    task = statistics.median(cost["task"])
    target = TARGET_NS * bare / REFERENCE_BARE_NS
    lines += [
        "",
        "## 4. A key never shared (ns per call, median / min over interleaved rounds)",
        "",
        "| case | ns | above bare | target (scaled) |",
        "| --- | --- | --- | --- |",
        f"| bare `await ok(key)` | {bare:.0f} / {min(cost['bare']):.0f} | - | - |",
        f"| `Coalesce()` | {ours:.0f} / {min(cost['coalesce']):.0f} | {ours - bare:.0f} | "
        f"{target:.0f} ({'met' if ours - bare <= target else 'missed'}) |",
        f"| `await loop.create_task(ok(key))`: a task per call, nothing else "
        f"| {task:.0f} / {min(cost['task']):.0f} | {task - bare:.0f} | - |",
        "",
        "Every execution runs in a task of its own, so that a caller that is cancelled cannot "
        "cancel the call the others wait for (the caller's task would own it otherwise, and "
        "with it every `asyncio.timeout` or `Timeout` entered inside the call); the task is "
        "what a never-shared key pays, and the last row is its price alone, on this Python. "
        "On Python 3.11 the task runs on the next turn of the event loop: the first caller "
        "lets it run once before it waits, and a call that never waits has its outcome "
        "then; from 3.12 it starts at once (asyncio's eager tasks), and a call that never "
        "waits ends before its caller awaits it.",
        "",
        "## 5. A request's cache (ns per call, median / min, same rounds as row 4)",
        "",
        "| case | ns | above bare |",
        "| --- | --- | --- |",
    ]
    for case, label in (
        ("request", '`Coalesce(scope="request")` in a request, a new key (runs, then kept)'),
        ("kept", '`Coalesce(scope="request")` in a request, a kept key (from its cache)'),
    ):
        median = statistics.median(cost[case])
        lines.append(f"| {label} | {median:.0f} / {min(cost[case]):.0f} | {median - bare:.0f} |")
    return lines


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from harness import script_parser
    from shared_cases import private_redis

    parser = script_parser(
        __doc__, quick="a smoke run: prints only", out_help="where COALESCE.md goes"
    )
    args = parser.parse_args()
    with private_redis() as (server, _):
        report = asyncio.run(main(args.quick, server.url))
    print("\n".join(report))
    if not args.quick:
        (args.out / "COALESCE.md").write_text("\n".join(report) + "\n")
