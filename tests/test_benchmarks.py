"""The benchmark runs end to end in its quick mode and writes its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_a_report(tmp_path: Path) -> None:
    """`benchmarks/run.py --quick` measures every case and writes RESULTS.md elsewhere."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--no-chart",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = (tmp_path / "RESULTS.md").read_text()
    for case in ("breaker", "retry", "timeout", "stack"):
        assert case in report.lower()


def test_only_measures_the_groups_named_and_writes_nothing(tmp_path: Path) -> None:
    """`run.py --only timeout` measures the timeout group and the bare await, prints them and
    writes no report; an unknown group is refused."""
    script = str(ROOT / "benchmarks" / "run.py")
    done = subprocess.run(
        [sys.executable, script, "--quick", "--only", "timeout", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "resilience Timeout" in done.stdout
    assert "await ok()" in done.stdout
    assert "resilience Retry" not in done.stdout
    assert not list(tmp_path.iterdir())
    refused = subprocess.run(
        [sys.executable, script, "--only", "timout"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "timout" in refused.stderr
