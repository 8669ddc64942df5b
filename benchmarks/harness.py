"""Timing harness: calibrated, interleaved rounds of tight ``await`` loops.

Each case is a loop ``loop(n)`` that awaits its protected callable ``n`` times. A round runs
every case once, in a shuffled order, with the garbage collector off; the reported figure is
the time of the loop divided by ``n``. The median (and min) over rounds is what we report.

Also what every benchmark script shares: its ``--quick``/``--out`` command line
(``script_parser``; ``timed_report`` for a timing script), the machine's CPU model for a
report's header (``cpu_model``), the test support modules loaded by path
(``load_test_module``) and a benchmark's own server in a child process (``start_server``,
``serve_asgi`` in the child, ``stop_server``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HERE",
    "Case",
    "Loop",
    "Measured",
    "Settings",
    "cpu_model",
    "load_test_module",
    "measure",
    "ok_loop",
    "reject_loop",
    "script_parser",
    "serve_asgi",
    "start_server",
    "stop_server",
    "timed_report",
    "write_report",
]

HERE = Path(__file__).resolve().parent

Loop = Callable[[int], Awaitable[None]]
Protected = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Settings:
    """How long to measure: rounds, calls per measurement, and a time budget per sample."""

    rounds: int = 21
    calls: int = 20_000
    min_calls: int = 200
    target_ms: float = 25.0
    seed: int = 1


@dataclass
class Case:
    """One implementation of one feature; ``loop`` is None when it was skipped."""

    group: str
    label: str
    lib: str
    loop: Loop | None
    note: str = ""
    primary: bool = False

    @property
    def ours(self) -> bool:
        return self.lib == "resilience"


@dataclass
class Measured:
    """The samples (ns per call) of one case."""

    case: Case
    calls: int = 0
    samples: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def ok(self) -> bool:
        return bool(self.samples) and not self.error

    def fail(self, exc: BaseException) -> None:
        """Drop the case: it raised while being timed."""
        self.error = f"failed while timed: {type(exc).__name__}: {exc}"[:160]
        self.samples.clear()


def ok_loop(fn: Protected) -> Loop:
    """``n`` awaits of ``fn()`` in a tight loop."""

    async def loop(n: int) -> None:
        for _ in range(n):
            await fn()

    return loop


def reject_loop(fn: Protected, error: type[BaseException]) -> Loop:
    """``n`` awaits of ``fn()``, each raising ``error``, which is caught."""

    async def loop(n: int) -> None:
        for _ in range(n):
            try:
                await fn()
            except error:
                pass

    return loop


async def _sample(loop: Loop, n: int) -> float:
    """ns per call of one run of ``loop(n)``, with the collector off."""
    await asyncio.sleep(0)  # let the event loop purge cancelled timers between samples
    gc.disable()
    try:
        start = time.perf_counter_ns()
        await loop(n)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / n


async def _calibrate(loop: Loop, settings: Settings) -> int:
    """Calls per sample so that one sample takes about ``target_ms``, within the bounds."""
    probe = min(100, settings.calls)
    await _sample(loop, probe)
    per_call = max(await _sample(loop, probe), 1.0)
    wanted = int(settings.target_ms * 1e6 / per_call)
    return max(min(settings.calls, wanted), min(settings.min_calls, settings.calls))


async def _calibrate_into(m: Measured, settings: Settings) -> None:
    assert m.case.loop is not None
    m.calls = await _calibrate(m.case.loop, settings)


async def _sample_into(m: Measured, *, keep: bool) -> None:
    assert m.case.loop is not None
    sample = await _sample(m.case.loop, m.calls)
    if keep:
        m.samples.append(sample)


async def _guarded(m: Measured, step: Awaitable[None]) -> None:
    """Run one step of ``m``; a case that raises is dropped, not the whole run."""
    try:
        await step
    except Exception as exc:
        m.fail(exc)


async def measure(
    cases: Sequence[Case],
    settings: Settings,
    progress: Callable[[int, int], None] | None = None,
) -> list[Measured]:
    """Calibrate, run one discarded warm-up round, then ``settings.rounds`` timed rounds."""
    results = [Measured(c) for c in cases if c.loop is not None]
    for m in results:
        await _guarded(m, _calibrate_into(m, settings))
    rng = random.Random(settings.seed)
    for index in range(settings.rounds + 1):  # round 0 is the warm-up
        order = [m for m in results if not m.error]
        rng.shuffle(order)
        gc.collect()
        for m in order:
            await _guarded(m, _sample_into(m, keep=index > 0))
        if progress is not None:
            progress(index, settings.rounds)
    return results


# --- what the benchmark scripts share ---------------------------------------------------------


def script_parser(
    doc: str | None,
    *,
    quick: str = "a few seconds, for smoke tests",
    out: Path = HERE,
    out_help: str = "output directory",
) -> argparse.ArgumentParser:
    """A script's command line: described by its docstring's first line, with ``--quick``
    (a smoke run, helped as ``quick``) and ``--out`` (where its report goes); the script adds
    its own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=out, help=out_help)
    return parser


def write_report(out: Path, name: str, text: str) -> None:
    """Print a script's report ``text`` and write it to ``out/name`` (``--out``, made if
    missing)."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)


def timed_report(
    doc: str | None, run: Callable[[Settings], Awaitable[str]]
) -> tuple[argparse.Namespace, str]:
    """A timing script's body: parse its command line (``script_parser``), ``run`` it
    (``--quick``: 3 rounds of at most 2,000 calls) and print its report; the command line
    and the report are returned for the script to write where it writes."""
    args = script_parser(doc).parse_args()
    report = asyncio.run(run(Settings(rounds=3, calls=2_000) if args.quick else Settings()))
    print(report)
    return args, report


def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_test_module(name: str) -> Any:
    """The module ``tests/<name>.py``, loaded by path (the tests package is not needed)."""
    path = HERE.parent / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def serve_asgi(app: Any, port: int, **options: Any) -> None:
    """Serve ``app`` on ``127.0.0.1:port`` until the process is killed (a child process's
    body), configured as the tests' servers are (``tests/asgi_support.uvicorn_config``);
    ``options`` are uvicorn's (``log_level``, ``backlog``, ...)."""
    import uvicorn

    config = load_test_module("asgi_support").uvicorn_config
    uvicorn.Server(config(app, host="127.0.0.1", port=port, **options)).run()


def start_server(script: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``script --serve ARGS PORT`` (a benchmark's own server) on a free loopback port;
    return the process and the port once the server accepts connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, script, "--serve", *args, str(port)])
    limit = time.monotonic() + 15
    while time.monotonic() < limit:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the uvicorn server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """End a server that ``start_server`` started: terminated, killed if it lingers."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
