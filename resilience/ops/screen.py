"""What ``resilience demo`` shows: the breakers' state changes (``Transitions``, from their
``StateChanged`` events, once each), the breaker in words, and the ``Screen``: a live table
and progress bar with ``rich`` on a terminal, plain lines in time order elsewhere.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from resilience import CircuitState, Event, PolicyStatus, StateChanged

__all__ = ["Screen", "Transition", "Transitions", "breaker_line", "transition_line"]


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change of a breaker, as a ``StateChanged`` event reported it."""

    name: str
    generation: int
    old: str
    new: str
    at: float  #: seconds since the demo started


@dataclass
class Transitions:
    """Every transition the replicas report, once each (each replica reports those it sees)."""

    start_wall: float
    seen: dict[tuple[str, int], Transition] = field(default_factory=dict)
    fresh: list[Transition] = field(default_factory=list)

    def add(self, name: str, generation: int, old: str, new: str, wall: float) -> None:
        key = (name, generation)
        if key not in self.seen and old != new:
            t = Transition(name, generation, old, new, max(0.0, wall - self.start_wall))
            self.seen[key] = t
            self.fresh.append(t)

    def listener(self, event: Event) -> None:
        """A ``listeners=`` entry for the replicas' policies."""
        if isinstance(event, StateChanged):
            self.add(event.name, event.generation, event.old.value, event.new.value, time.time())

    def take_fresh(self) -> list[Transition]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def ordered(self) -> list[Transition]:
        return sorted(self.seen.values(), key=lambda t: (t.at, t.name, t.generation))


STATE_LABEL = {
    CircuitState.CLOSED: "closed",
    CircuitState.OPEN: "OPEN",
    CircuitState.HALF_OPEN: "half-open",
    CircuitState.FORCED_OPEN: "FORCED OPEN",
    CircuitState.DISABLED: "disabled",
}
STATE_STYLE = {
    CircuitState.CLOSED: "green",
    CircuitState.OPEN: "bold red",
    CircuitState.HALF_OPEN: "yellow",
    CircuitState.FORCED_OPEN: "bold red",
    CircuitState.DISABLED: "dim",
}


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def breaker_line(policy: PolicyStatus | None) -> str:
    """The shared breaker in words: its state, and its window or what opened it.

    The window counts attempts, and ``HttpPolicy`` retries a failed attempt: so while the
    breaker is closed, upstream errors show here although the requests succeed on a retry.
    """
    if policy is None or policy.state is None:
        return "breaker: not used yet"
    state = STATE_LABEL.get(policy.state, str(policy.state))
    if policy.opened_by:
        calls, failures, _ = policy.opened_by
        return f"breaker: {state}, opened by {_counted(failures, 'failed attempt')} of {calls}"
    if not policy.calls:
        return f"breaker: {state}; no attempt in its window yet"
    return (
        f"breaker: {state}; {policy.failures} of the last {_counted(policy.calls, 'attempt')} "
        f"failed ({policy.failure_ratio:.0%}), each retried"
    )


def transition_line(t: Transition) -> str:
    """One state change, as a plain line."""
    return f"{t.at:6.1f}s  breaker {t.name} {t.old} -> {t.new} (generation {t.generation})"


#: seconds a line waits before it is printed, for a late report (a replica process reports
#: every 0.2 s) of something that happened before it to be printed first
HOLD = 0.5


class Screen:
    """A live table and progress bar (rich) on a terminal; plain lines elsewhere.

    Plain lines: the upstream's phase changes and the breakers' state changes, in the order
    they happened: each is held ``HOLD`` seconds, so a report that arrives late still goes
    before what happened after it. The rest are printed when the screen closes.
    """

    def __init__(self, write: Callable[[str], object], tty: bool, duration: float) -> None:
        self.write = write
        self.tty = tty
        self.phase = ""
        self.held: list[tuple[float, str]] = []  # (when it happened, the line)
        self.live: Live | None = None
        if tty:
            self.console = Console(highlight=False)
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("demo", total=duration)

    def __enter__(self) -> Screen:
        if self.tty:
            self.live = Live(console=self.console, refresh_per_second=8, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._print_held(float("inf"))
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    def line(self, text: str) -> None:
        """A line that stays (above the live table on a terminal)."""
        if self.live is not None:
            self.live.console.print(Text(text))  # a breaker's name as written: no markup
        else:
            self.write(text + "\n")

    def show(
        self,
        elapsed: float,
        phase: str,
        tallies: list[Counter[str]],
        breaker: PolicyStatus | None,
        fresh: list[Transition],
    ) -> None:
        if phase != self.phase:
            self.phase = phase
            line = f"{elapsed:6.1f}s  upstream phase: {phase}; {breaker_line(breaker)}"
            self.held.append((elapsed, line))
        self.held += ((change.at, transition_line(change)) for change in fresh)
        self._print_held(elapsed - HOLD)
        if self.live is None:
            return
        table = Table(title="requests (each makes up to 2 attempts)", expand=False)
        table.add_column("replica")
        for column in ("requests", "ok", "failed", "rejected"):
            table.add_column(column, justify="right")
        for i, t in enumerate(tallies):
            table.add_row(f"#{i}", *(str(t[k]) for k in ("requests", "ok", "failed", "rejected")))
        total = sum(tallies, Counter[str]())
        table.add_row(
            "all", *(str(total[k]) for k in ("requests", "ok", "failed", "rejected")),
            style="bold",
        )  # fmt: skip
        style = STATE_STYLE.get(breaker.state, "") if breaker and breaker.state else ""
        self.progress.update(self.task, completed=elapsed, description=f"phase: {phase:<9}")
        self.live.update(
            Group(table, Text(breaker_line(breaker), style=style) if style else "", self.progress)
        )

    def _print_held(self, until: float) -> None:
        """Print the held lines of what happened up to ``until``, in time order."""
        self.held.sort(key=itemgetter(0))  # stable: a phase line before a change at its time
        due = [text for at, text in self.held if at <= until]
        del self.held[: len(due)]
        for text in due:
            self.line(text)
