"""Benchmark the shared-state engine at scale: many breakers, big windows, big fleets.

Usage::

    python benchmarks/scale.py            # full run (about a minute); writes SCALE.md
    python benchmarks/scale.py --quick    # a smaller smoke run, noisy numbers
    python benchmarks/scale.py --out /tmp/bench

Four measurements, each against a redis-server of its own on loopback (started and stopped
by the run, like ``benchmarks/shared.py``):

1. *Many breakers, few in use*: N registered breakers on one RedisStore (all held in memory),
   100 of them in use by 100 tasks. Event-loop stall (a loop-lag probe: a task that sleeps
   1 ms and records how late it wakes), calls/s against the same run with 100 breakers only,
   and StoreDegraded events.
2. *status() of many names*: wall time of ``store.status()`` for 10,000 registered names,
   idle and used by two replicas.
3. *Flush cost against window size*: Redis time per flush script call (``INFO
   commandstats`` usec_per_call) for ``CountWindow(100)`` and ``CountWindow(10000)``, with
   the window full and one call per flush (the worst case for the old representation).
4. *A burst of new breakers*: 10,000 breakers made and called once each by 20 tasks (as
   requests for new names would), while the loop-lag probe runs, until every one has read
   the fleet's state. Loop lag as measured, and with the time of CPython's full garbage
   collections (``gc.callbacks``) taken out: what the engine itself holds the loop for.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import script_parser, write_report  # noqa: E402
from shared_cases import private_redis, redis_version  # noqa: E402

from resilience import CircuitBreaker, StoreDegraded  # noqa: E402
from resilience.events import Event  # noqa: E402
from resilience.store.redis import RedisStore  # noqa: E402


@dataclass(frozen=True)
class Settings:
    registered: int = 100_000
    in_use: int = 100
    tasks: int = 100
    seconds: float = 3.0
    status_names: int = 10_000
    flushes: int = 3_000
    burst: int = 10_000
    burst_tasks: int = 20
    quick: bool = False


FULL = Settings()
QUICK = Settings(
    registered=20_000, seconds=1.0, status_names=2_000, flushes=500, burst=2_000, quick=True
)


async def ok() -> int:
    return 1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[k]


async def lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 1 ms sleep wakes up, sampled for as long as the load runs."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.001)
        lags.append(loop.time() - before - 0.001)


async def many_breakers(url: str, registered: int, s: Settings) -> dict[str, float]:
    """Calls/s and loop lag with ``registered`` breakers of which ``s.in_use`` are called."""
    events: list[Event] = []
    store = RedisStore.from_url(url, prefix=f"scale{registered}", listeners=[events.append])
    async with store:
        breakers = [CircuitBreaker(f"b{i}", store=store) for i in range(registered)]
        while store.engine.has_work():  # the creation burst: one round, chunks of 50
            await store.engine.next_round()
        used = breakers[: s.in_use]
        calls = 0
        stop = asyncio.Event()
        lags: list[float] = []

        async def worker(i: int) -> None:
            nonlocal calls
            b = used[i % len(used)]
            n = 0
            while not stop.is_set():
                await b.call(ok)
                n += 1
                await asyncio.sleep(0)  # as a call doing I/O would
            calls += n

        gc.collect()
        degraded_before = sum(isinstance(e, StoreDegraded) for e in events)
        probe = asyncio.create_task(lag_probe(stop, lags))
        workers = [asyncio.create_task(worker(i)) for i in range(s.tasks)]
        started = time.perf_counter()
        await asyncio.sleep(s.seconds)
        stop.set()
        await asyncio.gather(*workers, probe)
        took = time.perf_counter() - started
        degraded = sum(isinstance(e, StoreDegraded) for e in events) - degraded_before
        del breakers
    return {
        "calls_per_s": calls / took,
        "lag_p50_ms": pct(lags, 50) * 1000,
        "lag_p99_ms": pct(lags, 99) * 1000,
        "lag_max_ms": max(lags) * 1000 if lags else float("nan"),
        "degraded": degraded,
    }


class FullCollections:
    """The full (generation 2) garbage collections that happen while it is entered, as
    ``(start, end)`` on the loop's clock (``time.monotonic``)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.monotonic()
        else:
            self.spans.append((self._start, time.monotonic()))

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def within(self, start: float, end: float) -> float:
        """Seconds of full collections between ``start`` and ``end``."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.spans)


async def burst(url: str, s: Settings) -> dict[str, float]:
    """``s.burst`` new breakers, each called once by one of ``s.burst_tasks`` tasks (each
    yields after a call, as I/O would): loop lag until every one has read the fleet's state,
    as measured and without CPython's full garbage collections."""
    events: list[Event] = []
    store = RedisStore.from_url(url, prefix="burst", listeners=[events.append])
    async with store:
        loop = asyncio.get_running_loop()
        samples: list[tuple[float, float]] = []  # (woke at, lag)
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.001)
                samples.append((loop.time(), loop.time() - before - 0.001))

        made: list[CircuitBreaker] = []

        async def requests(first: int) -> None:
            for i in range(first, s.burst, s.burst_tasks):
                b = CircuitBreaker(f"new{i}", store=store)
                made.append(b)
                await b.call(ok)
                await asyncio.sleep(0)

        gc.collect()
        with FullCollections() as collections:
            probing = asyncio.create_task(probe())
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            await asyncio.gather(*(requests(t) for t in range(s.burst_tasks)))
            while store.engine.has_work():
                await store.engine.next_round()
            took = time.perf_counter() - started
            await asyncio.sleep(0.1)
            stop.set()
            await probing
        lags = [lag for _, lag in samples]
        engine = [max(0.0, lag - collections.within(at - lag - 0.001, at)) for at, lag in samples]
        read = sum(b._core.fleet_gen >= 0 for b in made)  # type: ignore[attr-defined]
    gc_ms = [(b - a) * 1000 for a, b in collections.spans]
    return {
        "seconds": took,
        "read": read,
        "lag_p50_ms": pct(lags, 50) * 1000,
        "lag_p99_ms": pct(lags, 99) * 1000,
        "lag_max_ms": max(lags) * 1000,
        "engine_p99_ms": pct(engine, 99) * 1000,
        "engine_max_ms": max(engine) * 1000,
        "collections": len(gc_ms),
        "gc_max_ms": max(gc_ms, default=0.0),
        "degraded": sum(isinstance(e, StoreDegraded) for e in events),
    }


async def status_time(url: str, n: int, used: bool) -> dict[str, float]:
    """``store.status()`` of ``n`` breakers, 7 times: wall time (median, min, max), this
    process's CPU time and Redis's time (median). ``used``: each breaker has had one call
    from each of two replicas (two replica reports with a histogram); else none (idle)."""
    import redis

    sync = redis.Redis.from_url(url)
    prefix = f"status{n}{'u' if used else 'i'}"
    store = RedisStore.from_url(url, prefix=prefix)
    other = RedisStore.from_url(url, prefix=prefix)
    async with store, other:
        keep = [CircuitBreaker(f"s{i}", store=store) for i in range(n)]
        if used:
            keep += [CircuitBreaker(f"s{i}", store=other) for i in range(n)]
            for b in keep:
                await b.call(ok)
        for s in (store, other):
            while s.engine.has_work():
                await s.engine.next_round()
        walls, cpus, redis_ms = [], [], []
        listed = 0
        for _ in range(7):
            sync.config_resetstat()
            started, cpu = time.perf_counter(), time.process_time()
            listed = len(await store.status())
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
            redis_ms.append(sync.info("commandstats")["cmdstat_evalsha"]["usec"] / 1000)
        del keep
    sync.close()
    return {
        "median": statistics.median(walls),
        "min": min(walls),
        "max": max(walls),
        "cpu": statistics.median(cpus),
        "redis": statistics.median(redis_ms) / 1000,
        "listed": listed,
    }


async def flush_cost(url: str, size: int, flushes: int) -> float:
    """Redis microseconds per flush script call, the window full, one call per flush."""
    import redis

    sync = redis.Redis.from_url(url)
    store = RedisStore.from_url(url, prefix=f"flush{size}")
    async with store:
        script = store._scripts["flush"]  # the script itself is measured
        keys = [store.key("w", s) for s in ("state", "win", "probes", "replicas")]

        async def flush(seq: int, calls: int) -> None:
            await script(keys=keys, args=[0, calls, 0, 0, "c", size, 0, "", 600_000, "r", seq])

        for seq in range(1, size + 1):  # fill the window one call a chunk (the worst case)
            await flush(seq, 1)
        sync.config_resetstat()
        for seq in range(size + 1, size + 1 + flushes):
            await flush(seq, 1)
        stats = sync.info("commandstats")["cmdstat_evalsha"]
    sync.close()
    return float(stats["usec_per_call"])


async def run(url: str, s: Settings) -> list[str]:
    lines = [
        "# The shared-state engine at scale: benchmark results",
        "",
        "Written by `python benchmarks/scale.py" + (" --quick" if s.quick else "") + "`.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"Python {platform.python_version()}, redis-server on loopback.",
        "",
        "## 1. Many breakers, 100 in use",
        "",
        f"{s.tasks} tasks call {s.in_use} breakers for {s.seconds:.0f} s (each task yields "
        "after every call, as I/O would); the other breakers are registered and held in "
        "memory, idle. Loop lag: how late a task sleeping 1 ms wakes. Goals: lag p99 <= 5 ms, "
        "calls/s within 10 % of the 100-breaker run, no StoreDegraded.",
        "",
        "| registered breakers | calls/s | vs 100 | loop lag p50 | p99 | max | degraded |",
        "|---|---|---|---|---|---|---|",
    ]
    # the burst runs first, in a process that has not yet held the 100,000 breakers of
    # section 1 (collecting them leaves a heap whose collections cost more)
    b = await burst(url, s)
    base = await many_breakers(url, s.in_use, s)
    big = await many_breakers(url, s.registered, s)
    for n, r in ((f"{s.in_use:,}", base), (f"{s.registered:,}", big)):
        lines.append(
            f"| {n} | {r['calls_per_s']:,.0f} | {r['calls_per_s'] / base['calls_per_s']:.2f}x "
            f"| {r['lag_p50_ms']:.2f} ms | {r['lag_p99_ms']:.2f} ms | {r['lag_max_ms']:.1f} ms "
            f"| {r['degraded']:.0f} |"
        )
    goal = (
        big["lag_p99_ms"] <= 5
        and big["calls_per_s"] >= 0.9 * base["calls_per_s"]
        and big["degraded"] == 0
    )
    lines += [
        "",
        f"Goals {'met' if goal else '**not met**'}. On a 2-core machine the lag percentiles "
        "vary from run to run by a few milliseconds at either size (100 busy tasks and "
        "redis-server share the cores); compare the two rows of one run.",
        "",
    ]

    idle = await status_time(url, s.status_names, used=False)
    busy = await status_time(url, s.status_names, used=True)
    lines += [
        "## 2. status() of many names",
        "",
        f"`await store.status()` of {s.status_names:,} breakers, 7 runs each. Idle: "
        "registered, no call yet (one replica report each, no latency); used: one call from "
        "each of two replicas (two replica reports with a latency histogram each). CPU: this "
        "process; Redis: the status script's time (`INFO commandstats`); the two overlap.",
        "",
        "| breakers | wall median | min | max | Python CPU | Redis | before (wall median) |",
        "|---|---|---|---|---|---|---|",
    ]
    before = {"idle": "95 ms", "used by 2 replicas": "140-160 ms"}
    for label, r in (("idle", idle), ("used by 2 replicas", busy)):
        lines.append(
            f"| {r['listed']:,} {label} | {r['median'] * 1000:.0f} ms | {r['min'] * 1000:.0f} ms "
            f"| {r['max'] * 1000:.0f} ms | {r['cpu'] * 1000:.0f} ms | {r['redis'] * 1000:.0f} ms "
            f"| {before[label]} |"
        )
    listed_all = idle["listed"] == busy["listed"] == s.status_names  # a partial list is no win
    goal = max(idle["median"], busy["median"]) <= 0.1 and listed_all
    lines += [
        "",
        f"Goal: <= 100 ms for 10,000 names, idle or used by two replicas: "
        f"{'met' if goal else '**not met**'}"
        f"{'' if listed_all else ' (status() did not list every name)'}. "
        "Before, a name used by two replicas cost twice "
        "an idle one in this process: each replica's latency histogram was parsed on its own "
        "and summed through a generic zip; they are now parsed once per reply by their text "
        "(most are alike) and two are added bucket by bucket. "
        "The max is a full garbage collection of this process (100,000 objects and more "
        "held by 10,000 breakers) that the status call's allocations set off, about one "
        "call in three.",
        "",
    ]

    small = await flush_cost(url, 100, s.flushes)
    large = await flush_cost(url, 10_000, s.flushes)
    ratio = large / small
    lines += [
        "## 3. Redis time per flush against the window's size",
        "",
        f"`INFO commandstats` usec_per_call of the flush script, {s.flushes:,} flushes of one "
        "call each into a full window. Goal: CountWindow(10000) within 2x CountWindow(100).",
        "",
        "| window | Redis us per flush |",
        "|---|---|",
        f"| CountWindow(100) | {small:.1f} |",
        f"| CountWindow(10000) | {large:.1f} |",
        "",
        f"Ratio {ratio:.2f}x: {'met' if ratio <= 2 else '**not met**'}.",
        "",
    ]

    goal = b["engine_p99_ms"] <= 5 and b["engine_max_ms"] <= 20 and b["degraded"] == 0
    lines += [
        "## 4. A burst of new breakers",
        "",
        f"{s.burst:,} new breakers, each made and called once by one of {s.burst_tasks} tasks "
        "(each yields after a call, as I/O would), until every one has read the fleet's "
        "state; run first, before the other sections fill the heap. Loop lag: as in "
        "section 1, as measured, and with the time of CPython's full garbage collections "
        "taken out (what the engine itself holds the loop for: a round is sent in chunks of "
        "50 breakers, the loop getting its turn between two). Goals, without the "
        "collections: lag p99 <= 5 ms, max <= 20 ms; no StoreDegraded.",
        "",
        "| breakers read | seconds | lag p50 | p99 | max | without full collections: p99 "
        "| max | full collections | longest | degraded |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {b['read']:,.0f} | {b['seconds']:.2f} | {b['lag_p50_ms']:.2f} ms "
        f"| {b['lag_p99_ms']:.2f} ms | {b['lag_max_ms']:.1f} ms "
        f"| {b['engine_p99_ms']:.2f} ms | {b['engine_max_ms']:.1f} ms "
        f"| {b['collections']:.0f} | {b['gc_max_ms']:.0f} ms | {b['degraded']:.0f} |",
        "",
        f"Goals {'met' if goal else '**not met**'}. The longer stalls are CPython's full "
        "collections: each scans every tracked object of the process, and a breaker holds "
        "about 34 (its wrapped function's closure, the core's lists, the weak references to "
        "its fronts), "
        "so the collections the burst sets off grow with it, up to "
        f"{b['gc_max_ms']:.0f} ms at {s.burst:,} breakers here. An application that builds "
        "its breakers at start-up and calls `gc.freeze()` afterwards keeps them out of every "
        "later collection.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = script_parser(__doc__, quick="a smaller smoke run").parse_args(argv)
    s = QUICK if args.quick else FULL
    with private_redis() as (server, binary):
        lines = asyncio.run(run(server.url, s))
    lines.insert(5, f"redis-server {redis_version(binary)}.")
    lines.insert(6, "")
    text = "\n".join(lines) + "\n"
    write_report(args.out, "SCALE.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
