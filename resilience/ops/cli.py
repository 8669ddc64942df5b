"""The ``resilience`` command: a demo, and status and control of breakers shared through Redis.

``resilience demo`` shows a breaker protecting a flaky service. ``status``, ``open``,
``close``, ``disable`` and ``dashboard`` work on the breakers every replica shares through
Redis (``--redis URL`` or ``$RESILIENCE_REDIS_URL``). Exit codes: 0 done, 1 an unknown
breaker or an unreachable Redis, 2 a usage error (no Redis URL among them).

Nothing it prints carries a Redis password: every URL goes through :func:`redact`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreUnavailableError
from ..states import CircuitState
from ..store.protocol import Store, status
from ..store.records import REPORTING, PolicyStatus
from ..version import DISTRIBUTION, __version__
from .calls import CallCounts
from .cards import Cards
from .configure import add_configure_parser, run_configure
from .table import missing_modules, print_table

if TYPE_CHECKING:
    from ..store.redis import RedisStore

__all__ = ["main"]

URL_ENV = "RESILIENCE_REDIS_URL"
PREFIX_ENV = "RESILIENCE_PREFIX"
TOKEN_ENV = "RESILIENCE_DASHBOARD_TOKEN"
STORE_TIMEOUT = 1.0  #: seconds the commands wait for Redis
_CONTROL = {
    "open": CircuitState.FORCED_OPEN,
    "close": CircuitState.CLOSED,
    "disable": CircuitState.DISABLED,
}
_NO_URL = (
    "no Redis URL: pass --redis URL or set $RESILIENCE_REDIS_URL.\n"
    "An in-memory store lives inside one process, so there is nothing to show from here."
)


class CommandError(Exception):
    """A failure reported to the operator as one line, with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


_DESCRIPTION = """\
A demo, and status and control of the policies a fleet shares through Redis.

'resilience demo' shows breakers protecting a flaky service. 'status', 'open', 'close',
'disable' and 'dashboard' work on the policies every replica shares through Redis
(--redis URL or $RESILIENCE_REDIS_URL, with --prefix or $RESILIENCE_PREFIX).

exit codes: 0 done, 1 an unknown breaker or an unreachable Redis, 2 a usage error.
"""

# A URL's start: a scheme and "//". What follows, up to the last "@" before the next URL,
# is taken as the user-info without parsing it, so a password no URL parser accepts (a raw
# "[", "/", "#", "@" or space) is masked too. Masking a little more than the password in an
# odd message is the price, and a fair one. A query's password parameter (the usual form for
# unix:// URLs) is masked wherever it stands.
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_QUERY_PASSWORD = re.compile(r"(?i)([?&;]password=)[^&;#\s]*")


def redact(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every password masked as ``***``.

    The user-info's password and a ``password=`` query parameter are masked in any URL form,
    parseable or not; the rest (scheme, user, host, port, database) stays, for the operator.
    """
    urls = list(_URL_START.finditer(text))
    pieces, done = [], 0
    for i, url in enumerate(urls):
        start = url.end()
        end = urls[i + 1].start() if i + 1 < len(urls) else len(text)
        at = text.rfind("@", start, end)
        if at < 0:
            continue
        user, colon, _ = text[start:at].partition(":")
        if colon:
            pieces += [text[done:start], f"{user}:***"]
            done = at
    pieces.append(text[done:])
    return _QUERY_PASSWORD.sub(r"\1***", "".join(pieces))


def open_store(url: str, prefix: str, timeout: float = STORE_TIMEOUT) -> RedisStore:
    """A ``RedisStore`` for ``url`` with a short timeout (``CommandError`` if unusable)."""
    try:
        from ..store.redis import RedisStore
    except ImportError as exc:  # pragma: no cover - the redis extra is missing
        raise CommandError(
            f"the 'redis' extra is missing (pip install '{DISTRIBUTION}[redis]'): {exc}", 2
        ) from exc
    try:
        return RedisStore.from_url(url, prefix=prefix, timeout=timeout)
    except ValueError as exc:
        raise CommandError(
            f"invalid Redis URL or prefix {redact(url)!r}: {redact(str(exc))}", 2
        ) from exc


async def _with_store(url: str, prefix: str, work: Callable[[RedisStore], Awaitable[int]]) -> int:
    store = open_store(url, prefix)
    try:
        return await work(store)
    except StoreUnavailableError as exc:
        raise CommandError(f"cannot reach Redis at {redact(url)}: {redact(str(exc))}") from exc
    finally:
        await store.aclose()


async def status_document(
    store: Store, policies: Sequence[PolicyStatus], *, kind: str, degraded: bool
) -> dict[str, Any]:
    """The JSON document of ``status --json`` (the dashboard's ``/status`` shape): each
    policy with the replicas heard from in the last ``"reporting"`` seconds and the figures
    the dashboard's cards compute from ``store`` (``resilience.ops.cards``: a bulkhead's
    ``"pool"``, a rate limiter's ``"bucket"``; what only a process holding the policies or
    a second reading knows is ``None``)."""
    cards = Cards(CallCounts(), min_gap=0.0)
    now = time.monotonic()
    await cards.look(store, list(policies), now)
    fleet = kind != "memory"
    entries = [
        {**p.to_dict(), **cards.figures(p, now, fleet), "replicas_reporting": p.reporting()}
        for p in policies
    ]
    return {
        "policies": entries,
        "store": {"kind": kind, "degraded": degraded},
        "reporting": REPORTING,
        "time": time.time(),
    }


async def run_status(url: str, prefix: str, as_json: bool, out: Callable[[str], object]) -> int:
    """Print every policy under ``prefix`` at ``url``."""

    async def work(store: RedisStore) -> int:
        policies = await status(store)
        doc = await status_document(store, policies, kind="redis", degraded=store.degraded)
        if as_json:
            out(json.dumps(doc, indent=2))
        elif not policies:
            out(f"no policies under prefix {prefix!r} at {redact(url)}")
        else:
            buckets = {p["name"]: p["bucket"] for p in doc["policies"] if "bucket" in p}
            print_table(policies, out, buckets)
        return 0

    return await _with_store(url, prefix, work)


async def run_control(
    url: str, prefix: str, name: str, state: CircuitState, out: Callable[[str], object]
) -> int:
    """Force breaker ``name`` into ``state`` fleet-wide."""

    async def work(store: RedisStore) -> int:
        try:
            await store.control(name, state)
        except KeyError as exc:
            raise CommandError(f"no breaker named {name!r} under prefix {prefix!r}") from exc
        out(f"breaker {name!r} is now {state}")
        return 0

    return await _with_store(url, prefix, work)


async def _configure(args: argparse.Namespace, out: Callable[[str], object]) -> int:
    """``resilience configure``: a bad key or value is one line and exit code 2."""

    async def work(store: RedisStore) -> int:
        try:
            return await run_configure(store, args, out)
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc), 2) from None

    return await _with_store(_url(args), args.prefix, work)


async def run_dashboard(args: argparse.Namespace, out: Callable[[str], object]) -> int:
    """Serve the dashboard with uvicorn until interrupted."""
    missing = missing_modules(("uvicorn", "starlette"))
    if missing:
        raise CommandError(
            f"the dashboard needs the 'dashboard' extra, which brings {', '.join(missing)}: "
            f"pip install '{DISTRIBUTION}[dashboard]'",
            2,
        )
    import uvicorn

    # The core never imports integrations statically; the command is their one user.
    dashboard: Any = importlib.import_module("resilience.ops.dashboard")
    from ..store import MemoryStore

    store: Store
    if args.redis:
        store = open_store(args.redis, args.prefix)
        where = f"Redis at {redact(args.redis)}, prefix {args.prefix!r}"
    else:
        store = MemoryStore()
        where = "an empty in-memory store"
        print(
            "resilience: warning: no Redis URL (--redis or $RESILIENCE_REDIS_URL); serving an "
            "empty in-memory store, which no other process can fill",
            file=sys.stderr,
        )
    try:
        try:
            app = dashboard.Dashboard(
                store,
                allow_control=args.allow_control,
                token=args.token or None,
                refresh=args.refresh,
            )
        except ValueError as exc:  # a token no header carries alike: a usage error
            raise CommandError(str(exc), 2) from exc
        config = uvicorn.Config(
            _closing(app, store),
            host=args.host,
            port=args.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        sock = listen(args.host, args.port)
        control = "control allowed (Bearer token)" if args.allow_control else "read-only"
        out(f"dashboard on http://{args.host}:{args.port}/ for {where}; {control}")
        server = uvicorn.Server(config)
        await server.serve(sockets=[sock])
        return 0 if server.started else 1
    finally:
        await store.aclose()


def _closing(app: Any, store: Any) -> Any:
    """``app``, closing ``store`` at lifespan shutdown (uvicorn re-raises SIGTERM after it)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def on_send(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await store.aclose()
            await send(message)

        await app(scope, receive, on_send)

    return wrapped


def _url(args: argparse.Namespace) -> str:
    if not args.redis:
        raise CommandError(_NO_URL, 2)
    return str(args.redis)


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    # The defaults from the environment are read after parsing, never shown in --help: a URL
    # there may carry a password.
    parser.add_argument("--redis", metavar="URL", help=f"Redis URL (default: ${URL_ENV})")
    parser.add_argument(
        "--prefix",
        help=f"key prefix the services use (default: ${PREFIX_ENV}, else 'resilience')",
    )


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value!r}")
    return port


def _within(low: float, high: float, *, above: bool = False) -> Callable[[str], float]:
    """An argument type: seconds in ``[low, high]`` (``(low, high]`` when ``above``)."""

    def seconds(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
        if not ((low < number) if above else (low <= number)) or not number <= high:
            bounds = f"{'(' if above else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be in {bounds} seconds: {value}")
        return number

    return seconds


def _count(low: int, high: int) -> Callable[[str], int]:
    """An argument type: a whole number in ``low..high``."""

    def count(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}: {value}")
        return number

    return count


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (``CommandError`` when it cannot), bound before
    anything says where to connect. Its protocol is stated, so asyncio sets TCP_NODELAY on
    the connections it accepts."""
    sock = None
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


#: the demo's dependencies, by import name: each is in the 'demo' extra
DEMO_NEEDS = ("httpx", "uvicorn", "starlette", "rich")


def _demo(args: argparse.Namespace) -> int:
    missing = missing_modules([*DEMO_NEEDS, *(["redis"] if args.redis else [])])
    if missing:
        print(
            f"resilience: the demo needs the 'demo' extra, which brings {', '.join(missing)}: "
            f"pip install '{DISTRIBUTION}[demo]'",
            file=sys.stderr,
        )
        return 2
    if args.redis:  # a URL that is none is a usage error, before anything starts
        asyncio.run(open_store(args.redis, "resilience").aclose())
    # The core never imports integrations statically; the command is their one user. With its
    # dependencies present, an ImportError here is a real error and shows as one.
    demo: Any = importlib.import_module("resilience.ops.demo")
    try:
        asyncio.run(
            demo.run_demo(
                args.duration,
                replicas=args.replicas,
                redis_url=args.redis,
                seed=args.seed,
                port=args.port,
            )
        )
    except demo.DemoError as exc:
        print(f"resilience: demo stopped: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _read_token(args: argparse.Namespace) -> str | None:
    """The dashboard's token: --token-file, else --token, else $RESILIENCE_DASHBOARD_TOKEN."""
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read --token-file: {exc}", 2) from exc
        if not token:
            raise CommandError(f"--token-file {args.token_file} is empty", 2)
        return token
    return args.token or os.environ.get(TOKEN_ENV) or None


def build_parser() -> argparse.ArgumentParser:
    """The ``resilience`` command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="resilience",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__} ({DISTRIBUTION})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo",
        help="a flaky service, client replicas sharing a breaker, and the dashboard",
        description="A flaky service, client replicas sharing a breaker, and the live "
        "dashboard, on loopback for --duration seconds; then a summary.",
    )
    p_demo.add_argument(
        "--duration",
        type=_within(0, 3600, above=True),
        default=60.0,
        help="seconds to run, up to an hour (default: %(default)g)",
    )
    p_demo.add_argument(
        "--replicas",
        type=_count(1, 16),
        default=3,
        help="client replicas, 1 to 16 (default: %(default)s)",
    )
    p_demo.add_argument(
        "--port", type=_port, default=0, help="the dashboard's port (default: any free one)"
    )
    p_demo.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="share state through Redis: the replicas become processes (default: in-process)",
    )
    p_demo.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p_status = sub.add_parser("status", help="show every shared policy and its state")
    _add_store_options(p_status)
    p_status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    helps = {
        "open": "force a breaker open on every replica (FORCED_OPEN) until it is closed",
        "close": "reset a breaker to CLOSED with an empty window on every replica",
        "disable": "disable a breaker on every replica: calls flow, nothing is counted",
    }
    for command in _CONTROL:
        aliases = ["reset"] if command == "close" else []
        p = sub.add_parser(command, aliases=aliases, help=helps[command])
        p.add_argument(
            "name", help="the breaker's name (ResilientTransport names each after its origin)"
        )
        _add_store_options(p)
    add_configure_parser(sub, _add_store_options)
    p_dash = sub.add_parser(
        "dashboard",
        help="serve the live dashboard (needs the 'dashboard' extra)",
        description="Serve the live dashboard of the policies shared under --prefix.",
    )
    _add_store_options(p_dash)
    p_dash.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    p_dash.add_argument("--port", type=_port, default=8765, help="port (default: %(default)s)")
    p_dash.add_argument(
        "--refresh",
        type=_within(0.05, 3600),
        default=1.0,
        help="seconds between two pushes to the page (default: %(default)g)",
    )
    p_dash.add_argument(
        "--allow-control",
        action="store_true",
        help="show force open / close / disable buttons (needs a token; default: read-only)",
    )
    p_dash.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the Bearer token control requires from this file (preferred)",
    )
    p_dash.add_argument(
        "--token",
        help=f"the token itself; visible to every user in 'ps': prefer --token-file or "
        f"${TOKEN_ENV} (default: ${TOKEN_ENV})",
    )
    for subparser in sub.choices.values():  # its own usage for errors found after parsing
        subparser.set_defaults(subparser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resilience`` command."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`status --json | head`): say nothing more, as `cat` does.
        # Python would print the error again when it flushes stdout at exit: point stdout at
        # /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        args.redis = args.redis or os.environ.get(URL_ENV) or None
        args.prefix = args.prefix or os.environ.get(PREFIX_ENV) or "resilience"
        if args.command == "dashboard":
            args.token = _read_token(args)
            if args.allow_control and not args.token:
                args.subparser.error(f"--allow-control needs --token-file, ${TOKEN_ENV} or --token")
        # One-shot commands report a failing store in one line of their own; the dashboard
        # keeps the store's warnings (degraded, recovered) as log lines.
        logging.basicConfig(format="resilience: %(levelname)s: %(message)s")
        if args.command != "dashboard":
            logging.getLogger("resilience.redis").setLevel(logging.ERROR)
        if args.command == "status":
            return asyncio.run(run_status(_url(args), args.prefix, args.json, print))
        if args.command == "configure":
            return asyncio.run(_configure(args, print))
        if args.command in (*_CONTROL, "reset"):
            state = _CONTROL["close" if args.command == "reset" else args.command]
            return asyncio.run(run_control(_url(args), args.prefix, args.name, state, print))
        return asyncio.run(run_dashboard(args, print))
    except CommandError as exc:
        print(f"resilience: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
