"""The command line: the demo runs, shows state changes and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from resilience.cli import main


def test_demo_runs_and_reports() -> None:
    """`python -m resilience demo` runs a bounded demo, prints transitions and a tally."""
    out = subprocess.run(
        [sys.executable, "-m", "resilience", "demo", "--duration", "1.5", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "closed -> open" in out.stdout
    assert "done:" in out.stdout
    assert "served from the fallback" in out.stdout


def test_bad_duration_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """An impossible --duration exits with a usage error."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--duration", "-1"])
    assert info.value.code == 2
    assert "--duration" in capsys.readouterr().err
