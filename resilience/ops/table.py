"""The ``status`` table: one line per policy the store knows, drawn with rich on a
terminal when it is installed, else as plain text.

An open breaker's row shows the window that opened it (its live window is empty while
open), with a note under the table; REPLICAS counts those heard from lately, of those known.
A rate limiter's row shows its tokens of its burst when its bucket's figures are known
(``buckets``: by name, as ``resilience.ops.cards`` computes them), else when it is full again.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..states import CircuitState
from ..store.records import PolicyStatus

__all__ = ["OPEN_NOTE", "format_table", "missing_modules", "print_table"]


def missing_modules(names: Sequence[str]) -> list[str]:
    """The modules of ``names`` that cannot be imported here (looked up, not imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # in sys.modules as None: an import of it fails
            found = False
        if not found:
            missing.append(name)
    return missing


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


_HEAD = ("NAME", "KIND", "STATE", "CALLS", "FAILURES", "RATIO", "RETRY-AFTER", "REPLICAS")


#: under the table when a breaker is open: what its figures are
OPEN_NOTE = "open: CALLS, FAILURES and RATIO are the window that opened it"


def _window(p: PolicyStatus) -> tuple[str, str, str]:
    """A breaker's CALLS, FAILURES and RATIO: its window; while open, the window that opened
    it (the live window is empty then); none while held open or disabled."""
    if p.kind != "circuit_breaker" or p.state in (CircuitState.FORCED_OPEN, CircuitState.DISABLED):
        return "-", "-", "-"
    if p.state is CircuitState.OPEN:
        if p.opened_by is None:
            return "-", "-", "-"
        calls, failures, _ = p.opened_by
        return str(calls), str(failures), f"{failures / calls:.0%}"
    return str(p.calls), str(p.failures), f"{p.failure_ratio:.0%}"


#: a rate limiter's bucket figures, by its name
Buckets = Mapping[str, Mapping[str, Any]]


def _rows(policies: Sequence[PolicyStatus], buckets: Buckets) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for p in policies:
        breaker = p.kind == "circuit_breaker"
        state = str(p.state) if p.state is not None else "-"
        if p.kind == "bulkhead":
            held = f"{p.in_flight}" if p.limit is None else f"{p.in_flight} of {p.limit}"
            plural = "" if p.in_flight == 1 and p.limit is None else "s"
            state = f"{held} lease{plural} held"
        elif p.kind == "health_check":
            state = "running" if p.in_flight else "not running"
            if p.healthy is not None:
                state += ", healthy" if p.healthy else f", unhealthy: {p.health_error or '?'}"
        elif p.kind == "retry_budget" and p.tokens is not None:
            state = f"{p.tokens:.1f} tokens"
        elif p.kind == "rate_limiter" and buckets.get(p.name, {}).get("tokens") is not None:
            bucket = buckets[p.name]
            state = f"{bucket['tokens']:.1f} of {bucket['burst']:g} tokens"
        elif p.kind == "rate_limiter" and p.backlog is not None:
            state = f"full again in {p.backlog:.1f}s" if p.backlog > 0 else "bucket full"
        elif p.window is not None:  # a throttle's or a hedge's shared window
            first, second = p.window
            state = {
                "throttle": f"{second} accepted of {first} requests",
                "hedge": f"{second} hedges for {first} calls",
            }.get(p.kind, f"{first}, {second}")
        # replicas heard from lately, of those known: a fleet that exited reads 0/3
        replicas = f"{p.reporting()}/{len(p.replicas)}" if breaker and p.replicas else "-"
        rows.append((p.name, p.kind, state, *_window(p), _seconds(p.retry_after), replicas))
    return rows


def format_table(policies: Sequence[PolicyStatus], buckets: Buckets | None = None) -> str:
    """The ``status`` table as plain text: one line per policy (and a note under it when a
    breaker is open). REPLICAS counts those heard from in the last ``REPORTING`` seconds, of
    those the store knows; ``buckets``: the rate limiters' figures, by name, where known."""
    rows = [_HEAD, *_rows(policies, buckets or {})]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEAD))]
    right = {3, 4, 5, 6, 7}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if any(p.state is CircuitState.OPEN for p in policies):
        lines.append(OPEN_NOTE)
    return "\n".join(lines)


def print_table(
    policies: Sequence[PolicyStatus],
    out: Callable[[str], object],
    buckets: Buckets | None = None,
) -> None:
    """The ``status`` table: drawn with rich on a terminal when it is installed, else plain."""
    if out is not print or not sys.stdout.isatty() or missing_modules(["rich"]):
        out(format_table(policies, buckets))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    plain = format_table(policies, buckets)
    if max(len(line) for line in plain.splitlines()) + 8 > console.width:
        out(plain)  # too narrow for columns: plain lines, names never cut
        return
    table = Table(box=None, header_style="bold")
    for i, column in enumerate(_HEAD):
        table.add_column(column, justify="right" if i >= 3 else "left", no_wrap=True)
    colour = {"open": "red", "forced_open": "red", "half_open": "yellow", "closed": "green"}
    for p, row in zip(policies, _rows(policies, buckets or {}), strict=True):
        style = colour.get(str(p.state.value)) if p.state is not None else None
        table.add_row(*map(Text, row), style=style)  # names and errors as written: no markup
    console.print(table)
    if any(p.state is CircuitState.OPEN for p in policies):
        out(OPEN_NOTE)
