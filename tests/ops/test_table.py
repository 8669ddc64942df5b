"""The ``status`` table: drawn with rich on a terminal, names and errors shown as they are."""

from __future__ import annotations

import re

import pytest

from resilience import CircuitState, PolicyStatus
from resilience.ops.table import print_table

from .terminal import Terminal

#: names rich would read as markup (or an emoji code), were they handed to it as such
NAMES = [
    "https://[abcd::12]:443",
    "[bold]orders",
    "[link=http://evil]ok",
    "pay:smile:",
    "payments[/v2]",
]


def test_names_and_errors_are_drawn_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, every policy name and health error shows exactly as written: none is
    read as rich markup (a tag dropped, a style or link applied, an emoji, a markup error)."""
    terminal = Terminal(monkeypatch)
    policies = [
        PolicyStatus(name=name, kind="circuit_breaker", state=CircuitState.CLOSED) for name in NAMES
    ]
    policies.append(
        PolicyStatus(name="health:db", kind="health_check", healthy=False, health_error="[/x] no")
    )
    print_table(policies, print)
    drawn = terminal.getvalue()
    assert "\x1b[" in drawn  # drawn by rich, in colour
    assert "\x1b]8;" not in drawn  # no hyperlink
    plain = terminal.plain()
    for name in NAMES:
        assert re.search(rf"^ *{re.escape(name)} ", plain, re.MULTILINE), name
    assert "unhealthy: [/x] no" in plain
