"""Benchmark resilience against its peers: ns per awaited call, one process, interleaved rounds.

Usage::

    python benchmarks/run.py                 # full run (about a minute), writes RESULTS.md + PNG
    python benchmarks/run.py --quick         # seconds-long smoke run
    python benchmarks/run.py --rounds 31 --calls 50000 --out /tmp/bench
    python benchmarks/run.py --only timeout,stack,parts   # some groups, printed, not written

See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import GROUPS, SPECS, build_cases
from harness import Settings, measure
from report import Report, console_table, write_chart, write_markdown

HERE = Path(__file__).resolve().parent
QUICK = Settings(rounds=3, calls=2_000, min_calls=50, target_ms=1.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help=f"timed rounds (default {defaults.rounds})")
    parser.add_argument(
        "--calls", type=int, help=f"max calls per sample (default {defaults.calls})"
    )
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    parser.add_argument("--no-chart", action="store_true", help="skip results.png")
    parser.add_argument(
        "--only",
        type=_groups,
        help="comma-separated groups to measure (of: " + ", ".join(GROUPS) + "), with the "
        "bare await; the table is printed, nothing is written",
    )
    return parser.parse_args(argv)


def _groups(value: str) -> set[str]:
    groups = {g.strip() for g in value.split(",") if g.strip()}
    unknown = groups - set(GROUPS)
    if unknown or not groups:
        raise argparse.ArgumentTypeError(
            f"unknown groups {sorted(unknown)}: choose from {', '.join(GROUPS)}"
        )
    return groups | {"bare"}


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings()
    rounds = base.rounds if args.rounds is None else args.rounds
    calls = base.calls if args.calls is None else args.calls
    if rounds < 1 or calls < 1:
        raise SystemExit("--rounds and --calls must be >= 1")
    return Settings(rounds, calls, min(base.min_calls, calls), base.target_ms, base.seed)


def progress(index: int, rounds: int) -> None:
    what = "warm-up" if index == 0 else f"round {index}/{rounds}"
    print(f"\r{what} done", end="", file=sys.stderr, flush=True)


async def run(settings: Settings, only: set[str] | None = None) -> Report:
    start, load = time.monotonic(), os.getloadavg()[0]
    cases = await build_cases([s for s in SPECS if only is None or s.group in only])
    results = await measure(cases, settings, progress)
    print(file=sys.stderr)
    return Report(cases, results, settings, time.monotonic() - start, (load, os.getloadavg()[0]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peers' deprecation warnings are not our results
        report = asyncio.run(run(settings, args.only))
    print(console_table(report))
    if args.only is not None:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(report, args.out / "RESULTS.md")
    if not args.no_chart:
        write_chart(report, args.out / "results.png")
    print(f"\nwrote {args.out / 'RESULTS.md'} in {report.seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
