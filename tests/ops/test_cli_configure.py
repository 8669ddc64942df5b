"""``resilience configure``: show, change, roll back; a bad key or value is one line, exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from resilience.ops.cli import main

from ..helpers import unique_prefix

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(redis_url: str, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``resilience configure ...`` in this process on a prefix of its own: (code, out,
    err)."""
    prefix = unique_prefix("cli-config")

    def configure(*args: str) -> tuple[int, str, str]:
        code = main(["configure", "--redis", redis_url, "--prefix", prefix, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return configure


def test_set_show_and_roll_back(run: Run) -> None:
    """Values are set (a new version each time), shown with their history, rolled back."""
    assert run("svc") == (0, "svc: version 0\nno change yet\n", "")
    assert run("svc", "open_for=10", "seconds=0.5")[:2] == (0, "svc: version 1\n")
    assert run("svc", "delay=p95")[:2] == (0, "svc: version 2\n")  # text, not JSON
    code, out, _ = run("svc")
    assert code == 0
    assert 'live: open_for=10 seconds=0.5 delay="p95"' in out
    assert out.index("  v2 ") < out.index("  v1 ")
    assert run("svc", "--rollback")[:2] == (0, "svc: version 3 (rolled back)\n")
    assert run("svc", "--rollback", "0")[:2] == (0, "svc: version 4 (rolled back)\n")
    code, out, _ = run("svc", "--json")
    doc = json.loads(out)
    assert (doc["version"], doc["values"]) == (4, {})
    assert [c["rollback_of"] for c in doc["history"][:2]] == [0, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("open_for=-1",), "open_for must be finite and > 0, got -1"),
        (("colour=red",), "unknown setting 'colour'"),
        (("origin=5",), "unknown setting 'origin'"),
        (("name=other",), "unknown setting 'name'"),
        (("open_for",), "expected KEY=VALUE (say open_for=10), got 'open_for'"),
        (("--rollback", "7"), "version 7 of 'svc' is not in its history"),
        (("--rollback", "x"), "--rollback takes a version number, got 'x'"),
        (("open_for=1", "--rollback"), "give KEY=VALUE settings or --rollback, not both"),
    ],
)
def test_a_bad_key_or_value_is_one_line_and_exit_2(
    run: Run, args: tuple[str, ...], message: str
) -> None:
    """Nothing changes; the message is the constructor's (or the parser's), on one line."""
    run("svc", "open_for=3")
    code, out, err = run("svc", *args)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("resilience: ")
    assert message in err
    assert "Traceback" not in err


def test_unreachable_redis_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A Redis that does not answer is one line and exit code 1."""
    assert main(["configure", "--redis", "redis://127.0.0.1:1/0", "svc", "open_for=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("resilience: cannot reach Redis")
    assert err.count("\n") == 1
