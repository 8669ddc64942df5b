"""Packaging: the wheel carries resilience.integrations (mapped from integrations/) and py.typed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import resilience

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_and_imports_integrations(tmp_path: Path) -> None:
    """A wheel built from the tree imports resilience.integrations from itself."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("resilience_fleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resilience/integrations/__init__.py" in names
    assert "resilience/py.typed" in names
    assert not any(n.startswith(("tests/", "integrations/", "benchmarks/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import resilience, resilience.integrations as i; "
        "assert i.__file__.startswith(sys.argv[1]), i.__file__; "
        "assert resilience.__file__.startswith(sys.argv[1]); print(resilience.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == resilience.__version__


def test_public_surface_is_explicit() -> None:
    """Everything in __all__ exists and has a docstring."""
    for name in resilience.__all__:
        obj = getattr(resilience, name)
        if name != "__version__":
            assert obj.__doc__, name


def test_redis_store_is_loaded_lazily() -> None:
    """Importing resilience does not import redis."""
    code = "import sys, resilience; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command is the one .ci/run runs."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    marker = "pip install -e '.[test]' && python -m pytest"
    assert marker in readme
    assert marker in ci
