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
