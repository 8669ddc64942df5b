"""``resilience configure``: show, change and roll back the live settings of a name.

``resilience configure NAME`` shows the values in force, the values in code each kind of
policy reported and the history; ``resilience configure NAME KEY=VALUE ...`` changes values
on every replica; ``resilience configure NAME --rollback [VERSION]`` goes back. A value is
read as JSON (``5``, ``0.5``, ``null``, ``"p95"``), else taken as text (``p95``). The
``resilience`` command (``cli``) runs it against the store and turns a bad key or value
(the policy constructor's ``ValueError``/``TypeError``) into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..store.config import ConfigChange, ConfigState, ConfigStore, check_keys

__all__ = ["add_configure_parser", "format_config", "parse_values", "run_configure"]


def parse_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments as settings (``ValueError`` naming one that is not)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"expected KEY=VALUE (say open_for=10), got {pair!r}")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _values(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items()) or "(the values in code)"


def _change(change: ConfigChange) -> str:
    what = _values(change.values)
    if change.rollback_of is not None:
        what = f"rollback to v{change.rollback_of}: {what}"
    return f"  v{change.version:<4} {_when(change.at)}  {change.origin}  {what}"


def format_config(name: str, state: ConfigState) -> str:
    """``name``'s live settings for a terminal: in force, in code, history."""
    lines = [f"{name}: version {state.version}"]
    if state.values:
        lines.append(f"  live: {_values(state.values)}")
    for kind, base in sorted(state.base.items()):
        lines.append(f"  {kind} in code: {_values(base)}")
    if state.history:
        lines.append("history (newest first):")
        lines += [_change(c) for c in state.history]
    else:
        lines.append("no change yet")
    return "\n".join(lines)


def config_document(name: str, state: ConfigState) -> dict[str, Any]:
    """``name``'s live settings as JSON: the dashboard's ``GET /api/config/{name}`` shape."""
    return {
        "name": name,
        "version": state.version,
        "values": state.values,
        "base": state.base,
        "history": [c._asdict() for c in state.history],
    }


async def run_configure(
    store: ConfigStore, args: argparse.Namespace, out: Callable[[str], object]
) -> int:
    """Show, change or roll back ``args.name``'s settings on ``store``; raises the store's
    ``ValueError``/``TypeError`` for a bad key or value (nothing changed)."""
    name = args.name
    if args.rollback is not None:
        if args.values:
            raise ValueError("give KEY=VALUE settings or --rollback, not both")
        version = None if args.rollback == "last" else _version(args.rollback)
        new = await store.rollback(name, version=version)
        out(f"{name}: version {new} (rolled back)")
        return 0
    if args.values:
        new = await store.configure(name, **check_keys(parse_values(args.values)))
        out(f"{name}: version {new}")
        return 0
    state = await store.config(name)
    out(
        json.dumps(config_document(name, state), indent=2)
        if args.json
        else format_config(name, state)
    )
    return 0


def _version(raw: str) -> int:
    try:
        version = int(raw)
    except ValueError:
        raise ValueError(f"--rollback takes a version number, got {raw!r}") from None
    if version < 0:
        raise ValueError(f"--rollback takes a version number >= 0, got {version}")
    return version


def add_configure_parser(
    sub: Any, add_store_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The ``configure`` subcommand on ``sub`` (the command's subparsers)."""
    p = sub.add_parser(
        "configure",
        help="show, change or roll back a policy's live settings on every replica",
        description="Show (no KEY=VALUE), change (KEY=VALUE ...) or roll back (--rollback "
        "[VERSION]) the live settings of every policy named NAME, on every replica. A value "
        'is read as JSON (5, 0.5, null, "p95"), else as text.',
    )
    p.add_argument("name", help="the policies' name")
    p.add_argument("values", nargs="*", metavar="KEY=VALUE", help="settings to change")
    p.add_argument(
        "--rollback",
        nargs="?",
        const="last",
        metavar="VERSION",
        help="go back to the values before the last change, or to those of VERSION "
        "(0: the values in code)",
    )
    p.add_argument("--json", action="store_true", help="show as JSON")
    add_store_options(p)
