"""Turning measurements into the console table, RESULTS.md and results.png."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cases import (
    CALLER_TASK,
    CLOCK,
    CURRENT_TASK,
    DEADLINE,
    FORWARDING,
    FORWARDING_5,
    GROUPS,
    RAISE_CATCH,
    REJECT_FRAME,
    TASK_OF,
    TIMER,
)
from harness import Case, Measured, Settings, cpu_model

__all__ = ["Report", "console_table", "write_chart", "write_markdown"]

LIBS = (
    "resilience-fleet",
    "circuitbreaker",
    "aiobreaker",
    "purgatory",
    "pybreaker",
    "hyx",
    "nopanic",
    "pyresilience",
    "tenacity",
    "matplotlib",
)

#: group -> target (ns per call), set where a bare await was ~65 ns
TARGETS: dict[str, float] = {
    "breaker": 200,
    "retry": 150,
    "rejection": 600,
    "timeout": 1500,
    "stack": 1000,
    "hedge": 3000,
}
#: earlier figures beside the targets: (label, bare await in ns, group -> ns per call)
BEFORE: tuple[tuple[str, float, dict[str, float]], ...] = (
    (
        "before the hot-path work",
        67.0,
        {
            "breaker": 206,
            "retry": 182,
            "rejection": 697,
            "stack": 1674,
            "hedge": 20_000,
        },
    ),
    (
        "previous RESULTS.md",
        91.0,
        {"breaker": 294, "retry": 243, "rejection": 777, "timeout": 1116, "stack": 2036},
    ),
)
TARGET_BARE_NS = 65.0


@dataclass
class Report:
    """Measured and skipped cases of one run, with what is needed to compare them."""

    cases: Sequence[Case]
    results: Sequence[Measured]
    settings: Settings
    seconds: float
    load: tuple[float, float] = (math.nan, math.nan)  #: 1-minute load average: start, end

    def rows(self, group: str) -> list[tuple[Case, Measured | None]]:
        by_case = {id(m.case): m for m in self.results}
        return [(c, by_case.get(id(c))) for c in self.cases if c.group == group]

    def primary(self, group: str) -> Measured | None:
        return next((m for c, m in self.rows(group) if c.primary and m and m.ok), None)

    def best_peer(self, group: str, *, stdlib: bool = False) -> Measured | None:
        """The fastest third-party library (or, with ``stdlib``, stdlib baseline) in ``group``."""
        wanted = [
            m
            for c, m in self.rows(group)
            if m and m.ok and not c.ours and (c.lib == "stdlib") == stdlib
        ]
        return min(wanted, key=lambda m: m.median, default=None)

    @property
    def bare(self) -> float:
        m = self.primary("bare")
        return m.median if m else float("nan")


def _ns(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value / 1000:,.2f} µs" if value >= 10_000 else f"{value:,.0f} ns"


def _ratio(a: float, b: float | None) -> str:
    if b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _why(case: Case, m: Measured | None) -> str:
    return m.error if m is not None and m.error else case.note


# --- console -----------------------------------------------------------------------------------


def console_table(report: Report) -> str:
    """A plain-text table of every group."""
    lines = []
    for group, title in GROUPS.items():
        lines.append(f"\n{title}")
        ours = report.primary(group)
        for case, m in report.rows(group):
            if m is None or not m.ok:
                lines.append(f"  {case.label:<42} skipped: {_why(case, m)}")
                continue
            ratio = _ratio(m.median, ours.median if ours else None)
            lines.append(
                f"  {case.label:<42} {m.median:>10,.0f} ns  (min {m.best:>8,.0f})"
                f"  xbare {m.median / report.bare:>6.2f}  xours {ratio:>7}"
            )
    return "\n".join(lines)


# --- markdown ----------------------------------------------------------------------------------


def _cpu_count() -> str:
    import os

    return str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _machine(report: Report) -> list[str]:
    s = report.settings
    return [
        "## Machine",
        "",
        f"- CPU: {cpu_model()} ({_cpu_count()} usable cores)",
        f"- Python: {platform.python_implementation()} {platform.python_version()}"
        f" on {platform.system()} {platform.release()}",
        "- Libraries: " + ", ".join(f"{d} {_version(d)}" for d in LIBS),
        f"- Run: {s.rounds} rounds, up to {s.calls:,} calls per sample "
        f"(about {s.target_ms:g} ms per sample), {report.seconds:.0f} s in all",
        f"- Load (1-minute average, as `uptime` shows it): {report.load[0]:.2f} at the start, "
        f"{report.load[1]:.2f} at the end, on {_cpu_count()} cores",
        "",
    ]


METHOD = """## Method

Each case awaits its protected callable (`async def ok(): return 1`) `N` times in a tight
loop; the sample is the loop's time (`time.perf_counter_ns`) divided by `N`, loop overhead
included, so the bare `await ok()` row is the floor. `N` is calibrated per case so a sample
takes about the same time (capped by `--calls`). After one discarded warm-up round, every round
runs every case once, in a shuffled order, so machine noise hits all cases alike; the garbage
collector is off while a sample runs. Tables show the median over rounds and the minimum.
`x bare` divides by the bare await, `x ours` by resilience's decorated form in the same group.
Rejection cases include raising and catching the rejection error. Peers' breakers are tripped
by failing calls; resilience's is shown both forced open and tripped. "Best peer" is the
fastest third-party library in the group (stdlib baselines are shown but not counted).
The machine is shared, so absolute numbers move between runs; ratios within one run are the
figures to compare, and the min column shows the least-disturbed sample.
See `benchmarks/README.md`.
"""


def _group_table(report: Report, group: str) -> list[str]:
    ours = report.primary(group)
    lines = [
        f"### {GROUPS[group]}",
        "",
        "| implementation | median | min | x bare | x ours | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for case, m in report.rows(group):
        label = f"**{case.label}**" if case.ours else case.label
        if m is None or not m.ok:
            lines.append(f"| {label} | - | - | - | - | skipped: {_why(case, m)} |")
            continue
        lines.append(
            f"| {label} | {_ns(m.median)} | {_ns(m.best)} | {_ratio(m.median, report.bare)} "
            f"| {_ratio(m.median, ours.median if ours else None)} | {case.note} |"
        )
    return [*lines, ""]


def _targets(report: Report) -> list[str]:
    scale = report.bare / TARGET_BARE_NS
    before = "".join(f" | {label} ({bare:g} ns bare)" for label, bare, _ in BEFORE)
    lines = [
        "## Targets",
        "",
        f"Targets were set where a bare await took ~{TARGET_BARE_NS:g} ns; here it took "
        f"{report.bare:.0f} ns, so the scaled target multiplies by {scale:.2f}. Earlier "
        "figures are shown beside them as ns per call and as a multiple of the bare await "
        "of their own run.",
        "",
        f"| case | target | scaled target | resilience | x bare | met | met (scaled){before} "
        "| best peer | ours / best peer | stdlib baseline | ours / stdlib |",
        "|---|---:|---:|---:|---:|:-:|:-:" + "|---:" * len(BEFORE) + "|---|---:|---|---:|",
    ]
    for group, target in TARGETS.items():
        ours = report.primary(group)
        peer, base = report.best_peer(group), report.best_peer(group, stdlib=True)
        value = ours.median if ours else float("nan")
        met = "yes" if value <= target else "**no**"
        met_scaled = "yes" if value <= target * scale else "**no**"
        earlier = "".join(
            f" | {_ns(figures[group])} ({figures[group] / bare:.2f}x)"
            if group in figures
            else " | -"
            for _, bare, figures in BEFORE
        )
        lines.append(
            f"| {GROUPS[group]} | {_ns(target)} | {_ns(target * scale)} | {_ns(value)} "
            f"| {_ratio(value, report.bare)} | {met} | {met_scaled}{earlier} "
            f"| {_named(peer)} | {_ratio(value, peer.median if peer else None)} "
            f"| {_named(base)} | {_ratio(value, base.median if base else None)} |"
        )
    return [*lines, ""]


def _part(report: Report, label: str) -> float:
    m = next((m for c, m in report.rows("parts") if c.label == label and m and m.ok), None)
    return m.best if m else float("nan")


def _own(report: Report, group: str) -> float:
    m = report.primary(group)
    return m.best if m else float("nan")


def _spent(report: Report) -> list[str]:
    """Each target row taken apart with the ``parts`` rows measured in the same run."""
    bare, fwd, fwd5 = report.bare, _part(report, FORWARDING), _part(report, FORWARDING_5)
    task, timer = _part(report, CALLER_TASK), _part(report, TIMER)
    task_of, clock, record = _part(report, TASK_OF), _part(report, CLOCK), _part(report, DEADLINE)
    full_lookup = _part(report, CURRENT_TASK)
    one, frame = _part(report, RAISE_CATCH), _part(report, REJECT_FRAME)
    scale = bare / TARGET_BARE_NS
    wrapper = fwd - _own(report, "bare")
    singles = ("fallback", "retry", "breaker", "timeout", "bulkhead")
    own = {g: _own(report, g) - fwd for g in singles}
    largest = max(singles, key=lambda g: own[g])
    parts = {
        "breaker": f"the forwarding wrapper any decorator needs is {_ns(fwd)} ({_ns(wrapper)} "
        f"over the bare await); the breaker's own work (the state and generation reads, the "
        f"window check) is the other {_ns(own['breaker'])}",
        "retry": f"the forwarding wrapper is {_ns(fwd)}; the retry's own work (its try/except, "
        f"the checks for a stop strategy and for results that need a look) is the other "
        f"{_ns(own['retry'])}"
        + (
            ": the target is below what a wrapper forwarding `*args, **kwargs` costs"
            if TARGETS["retry"] * scale < fwd
            else ""
        ),
        "rejection": f"a coroutine that only raises a fresh CircuitOpenError, awaited and "
        f"caught, costs {_ns(frame)} (making, raising and catching one in a single frame: "
        f"{_ns(one)}); the breaker's checks, its count of rejections and the listeners' "
        f"check are the other {_ns(_own(report, 'rejection') - frame)}",
        "timeout": f"the forwarding wrapper is {_ns(fwd)}; finding the task to cancel is "
        f"{_ns(task_of)} (the task of the loop found last, asked of that loop; "
        f"asyncio.current_task() would be {_ns(full_lookup)}), reading the clock "
        f"{_ns(clock)}, filling the deadline's record {_ns(record)}; queueing it and taking it "
        f"off, the task's cancelling() count and the timer's check are the other "
        f"{_ns(own['timeout'] - task_of - clock - record)}",
        "stack": f"five nested forwarding wrappers cost {_ns(fwd5)}; above their wrapper, "
        + ", ".join(f"{g} {_ns(own[g])}" for g in singles)
        + f" (sum {_ns(sum(own.values()))}): the {largest}'s is the largest part",
        "hedge": f"the forwarding wrapper is {_ns(fwd)}; one timer armed and cancelled "
        f"({_ns(timer)}), finding the caller's task (CallerTask.find(): {_ns(task)}), a copy "
        "of the context, the call's state object and the budget's count the rest",
    }
    lines = [
        "## Where the time goes",
        "",
        "Each target row taken apart with the `8. parts` rows of this run, by their minimums "
        "(the least-disturbed samples: differences of medians drift with the machine's load); "
        "the verdicts compare medians, as the table above.",
        "",
    ]
    for group, target in TARGETS.items():
        ours = report.primary(group)
        value = ours.median if ours else float("nan")
        verdict = "meets" if value <= target * scale else "**misses**"
        lines.append(
            f"- {GROUPS[group]}: {_ns(value)} (min {_ns(_own(report, group))}), {verdict} its "
            f"scaled target ({_ns(target * scale)}): {parts[group]}."
        )
    return [*lines, ""]


def _named(m: Measured | None) -> str:
    return f"{m.case.label} ({_ns(m.median)})" if m else "-"


def write_markdown(report: Report, path: Path) -> None:
    """RESULTS.md: machine, method, targets, one table per group."""
    lines = [
        "# resilience benchmark results",
        "",
        "Generated by `python benchmarks/run.py`; ns per awaited call, lower is better.",
        "",
        *_machine(report),
        METHOD,
        *_targets(report),
        *_spent(report),
        "## Results",
        "",
        "![results](results.png)",
        "",
    ]
    for group in GROUPS:
        lines.extend(_group_table(report, group))
    path.write_text("\n".join(lines))


# --- chart -------------------------------------------------------------------------------------


def write_chart(report: Report, path: Path) -> None:
    """results.png: one panel per group in two columns, log-scale bars, targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = [g for g in GROUPS if g != "bare" and any(m and m.ok for _, m in report.rows(g))]
    nrows = math.ceil(len(groups) / 2)
    fig, axes = plt.subplots(nrows, 2, figsize=(15, 3.1 * nrows), sharex=True, squeeze=False)
    top = max(m.median for m in report.results if m.ok)
    flat = axes.flatten()
    for ax, group in zip(flat, groups, strict=False):
        _panel(ax, report, group)
        ax.set_xlim(right=top * 4)
    for ax in flat[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("ns per call, median (log scale)")
        ax.xaxis.set_tick_params(labelbottom=True)
    legend = [
        Patch(color=_color_of("resilience"), label="resilience"),
        Patch(color=_color_of("peer"), label="peer library"),
        Patch(color=_color_of("stdlib"), label="stdlib baseline"),
        Patch(facecolor="none", edgecolor="grey", linestyle=":", label="bare await"),
        Patch(facecolor="none", edgecolor="red", linestyle="--", label="target"),
    ]
    fig.legend(handles=legend, loc="upper center", ncol=5, bbox_to_anchor=(0.5, 0.975))
    fig.suptitle("resilience vs peers: cost per awaited call (lower is better)", y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax: object, report: Report, group: str) -> None:
    rows = [(c, m) for c, m in report.rows(group) if m and m.ok]
    labels = [c.label for c, _ in rows][::-1]
    values = [m.median for _, m in rows][::-1]
    colors = [_color(c) for c, _ in rows][::-1]
    ax.barh(labels, values, color=colors)  # type: ignore[attr-defined]
    for y, v in enumerate(values):
        ax.text(v * 1.04, y, _ns(v), va="center", fontsize=7)  # type: ignore[attr-defined]
    ax.set_xscale("log")  # type: ignore[attr-defined]
    ax.axvline(report.bare, color="grey", linestyle=":", linewidth=1)  # type: ignore[attr-defined]
    if group in TARGETS:
        ax.axvline(TARGETS[group], color="red", linestyle="--", linewidth=1)  # type: ignore[attr-defined]
    ax.set_title(GROUPS[group], fontsize=9, loc="left")  # type: ignore[attr-defined]
    ax.tick_params(axis="y", labelsize=8)  # type: ignore[attr-defined]


def _color(case: Case) -> str:
    return _color_of("resilience" if case.ours else "stdlib" if case.lib == "stdlib" else "peer")


def _color_of(kind: str) -> str:
    return {"resilience": "tab:blue", "stdlib": "tab:gray"}.get(kind, "tab:orange")
