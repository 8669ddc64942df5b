"""A standard output that says it is a terminal, for what draws with rich only there."""

from __future__ import annotations

import io
import re
import sys

import pytest


class Terminal(io.StringIO):
    """Standard output that says it is a terminal, 200 columns wide."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        monkeypatch.setattr(sys, "stdout", self)
        monkeypatch.setenv("COLUMNS", "200")

    def isatty(self) -> bool:
        return True

    def plain(self) -> str:
        """What was written, without terminal control sequences."""
        return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", self.getvalue())
