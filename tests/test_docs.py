"""Every complete Python example in README.md and docs/*.md runs, as written, in CI.

The conventions (docs/testing.md, "Examples in these docs", tells contributors the same):

* Every fenced ```python block is a complete example and runs, unless the line right before
  its fence is a fragment marker, ``<!-- fragment -->`` or ``<!-- fragment: why -->`` (an
  HTML comment: neither the site nor GitHub shows it). A fragment is genuinely incomplete (it
  uses names an earlier block or the reader's application defines, or awaits at top level):
  it is only parsed, never run.
* An example runs in a fresh interpreter of its own (``python tests/test_docs.py``), from the
  repository root, as ``__main__``, with warnings as errors and a timeout of
  ``TIMEOUT`` seconds; a traceback names the Markdown file and line. If it defines
  ``test_*`` functions (an example of a test), they run after it, as pytest would run them.
* Output: a comment on a ``print(...)`` line, or the comment lines right after it, show what
  it prints: ``# <line printed>`` or ``# <line printed>: <remark>``; each must be a line the
  example printed (whitespace aside). ``<!-- output: loose -->`` right before the fence says
  the comments describe the output loosely (timing, chance, a loop): they are not compared.
* Network: loopback only. What the reader sees stays as it is; before the example runs, its
  Redis URLs (``redis://redis:6379/0``, ``redis://localhost:6379/0``) are replaced by the
  test's redis-server (the ``redis_url`` fixture), which ``REDIS_URL`` and
  ``RESILIENCE_REDIS_URL`` also name for the examples that read them; ``https://api.example.com``
  by a loopback server that answers ``200 {}``. Any other name lookup or connection off this
  machine fails the example.

The examples run concurrently: the first test to need a result starts every selected one.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import ipaddress
import os
import re
import socket
import subprocess
import sys
import tokenize
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import StringIO
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", *sorted(f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")))
TIMEOUT = 60.0  # seconds for one example; the slowest takes about 6
WORKERS = 4  # examples at once: most of their time is spent sleeping

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
FRAGMENT = re.compile(r"^\s*<!-- fragment(?:: [^>]+)? -->\s*$")
LOOSE_OUTPUT = re.compile(r"^\s*<!-- output: loose -->\s*$")
MARKER = re.compile(r"^\s*<!-- (?:fragment|output)\b")
DOCS_REDIS_URL = re.compile(r"redis://(?:redis|localhost|127\.0\.0\.1)(?::\d+)?(?:/\d+)?")
DOCS_HTTP_ORIGIN = "https://api.example.com"


class Example(NamedTuple):
    """One fenced ```python block: where it is, its source, and what its marker says."""

    path: str
    line: int  # of the opening fence, 1-based
    source: str
    fragment: bool
    loose_output: bool

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


class Run(NamedTuple):
    """What one example did in its own interpreter."""

    returncode: int | None  # None: it did not finish within TIMEOUT
    stdout: str
    stderr: str


def is_python(info: str) -> bool:
    """Whether a fence's info string opens a Python block (```python or ```py)."""
    return info.split()[:1] in (["python"], ["py"])


def collect(path: str) -> list[Example]:
    """The ```python blocks of one Markdown file, dedented, with their markers read."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    examples = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{index + 1}: the fence is never closed")
        if is_python(opening["info"]):
            indent = len(opening["indent"])
            before = lines[index - 1] if index else ""
            examples.append(
                Example(
                    path=path,
                    line=index + 1,
                    source="".join(line[indent:] + "\n" for line in lines[index + 1 : end]),
                    fragment=FRAGMENT.match(before) is not None,
                    loose_output=LOOSE_OUTPUT.match(before) is not None,
                )
            )
        index = end + 1
    return examples


EXAMPLES = [example for path in DOCS for example in collect(path)]
COMPLETE = [example for example in EXAMPLES if not example.fragment]
FRAGMENTS = [example for example in EXAMPLES if example.fragment]


def needs_redis(example: Example) -> bool:
    """Whether the example names a Redis URL of the docs or reads one from the environment."""
    return bool(DOCS_REDIS_URL.search(example.source)) or "REDIS_URL" in example.source


def needs_http(example: Example) -> bool:
    """Whether the example names the origin the loopback HTTP server stands in for."""
    return DOCS_HTTP_ORIGIN in example.source


def prepared(example: Example, redis_url: str | None, http_url: str | None) -> str:
    """The example's source with the docs' Redis URLs and HTTP origin pointed at loopback."""
    source = example.source
    if redis_url is not None:
        source = DOCS_REDIS_URL.sub(lambda _: redis_url, source)
    if http_url is not None:
        source = source.replace(DOCS_HTTP_ORIGIN, http_url)
    return source


def run(example: Example, source: str, redis_url: str | None) -> Run:
    """Run one example (already pointed at loopback) in a fresh interpreter of its own."""
    env = dict(os.environ)
    if redis_url is not None:
        env["REDIS_URL"] = env["RESILIENCE_REDIS_URL"] = redis_url
    command = [sys.executable, "-W", "error", __file__, example.path, str(example.line)]
    try:
        done = subprocess.run(
            command,
            input=source,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as expired:
        return Run(None, _text(expired.stdout), _text(expired.stderr))
    return Run(done.returncode, done.stdout, done.stderr)


def _text(output: bytes | str | None) -> str:
    """What a timed-out run had written so far, as text."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


STATEMENT_STARTS = (
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.NL,
    tokenize.COMMENT,
)


def output_claims(source: str, first_line: int) -> list[tuple[int, str]]:
    """The lines ``print`` calls are said to print: (Markdown line, text), in source order.

    A claim is the comment on a ``print(...)`` statement's line(s), else the comment lines
    right after it (joined: a long line may be wrapped over several)."""
    tokens = list(tokenize.generate_tokens(StringIO(source).readline))
    claims = []
    for index, token in enumerate(tokens):
        starts_statement = index == 0 or tokens[index - 1].type in STATEMENT_STARTS
        if not (token.type == tokenize.NAME and token.string == "print" and starts_statement):
            continue
        if tokens[index + 1].string != "(":
            continue
        end = index
        while tokens[end].type != tokenize.NEWLINE:
            end += 1
        trailing = [t.string for t in tokens[index:end] if t.type == tokenize.COMMENT]
        following = []
        after = end + 1
        while tokens[after].type in (tokenize.COMMENT, tokenize.NL, tokenize.DEDENT):
            if tokens[after].type == tokenize.COMMENT:
                following.append(tokens[after].string)
            elif tokens[after].type == tokenize.NL and tokens[after - 1].type != tokenize.COMMENT:
                break  # a blank line ends the comment block
            after += 1
        comments = trailing or following
        if comments:
            text = " ".join(comment.lstrip("#").strip() for comment in comments)
            claims.append((first_line + token.start[0], text))
    return claims


def said(claim: str, printed: str) -> bool:
    """Whether a claim shows a printed line: the line itself, or the line, ': ' and a remark."""
    return claim == printed or claim.startswith(printed + ": ")


def normalized(text: str) -> str:
    """Whitespace runs as single spaces, without leading or trailing spaces."""
    return " ".join(text.split())


# --- the loopback stand-ins ---------------------------------------------------------------


async def _answer_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that answers every HTTP request with ``200 {}``."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


class Runs:
    """The examples' runs, all started at once in a pool, awaited one by one."""

    def __init__(self, examples: list[Example], redis_url: str | None) -> None:
        self.http_server: Any = None
        if any(needs_http(example) for example in examples):
            from .asgi_support import LiveServer  # here: the runner is a script, no package

            self.http_server = LiveServer(_answer_ok).start()
        http_url = None if self.http_server is None else str(self.http_server.url)
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="docs-example")
        self.futures = {
            example: self.pool.submit(
                run, example, prepared(example, redis_url, http_url), redis_url
            )
            for example in examples
        }

    def result(self, example: Example) -> Run:
        """The example's run, once it is over."""
        return self.futures[example].result()

    def close(self) -> None:
        """Wait for the runs still going, then stop the HTTP server."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.http_server is not None:
            self.http_server.stop()


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def runs(request: pytest.FixtureRequest) -> Iterator[Runs]:
    """Every selected example, started at once (the Redis server only if one needs it)."""
    params = [
        item.callspec.params["example"]
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.originalname == "test_complete_example_runs"
    ]
    selected = [example for example in params if isinstance(example, Example)]
    redis = any(needs_redis(example) for example in selected)
    started = Runs(selected, str(request.getfixturevalue("redis_url")) if redis else None)
    yield started
    started.close()


@pytest.mark.parametrize(
    "example",
    [pytest.param(e, marks=pytest.mark.redis) if needs_redis(e) else e for e in COMPLETE],
    ids=str,
)
def test_complete_example_runs(example: Example, runs: Runs) -> None:
    """The example runs as written (URLs swapped for loopback ones) and prints what it says."""
    result = runs.result(example)
    assert result.returncode is not None, f"{example} did not finish in {TIMEOUT}s"
    assert result.returncode == 0, (
        f"{example} failed (the lines are the Markdown's):\n{result.stdout}\n{result.stderr}"
    )
    if example.loose_output:
        return
    printed = [normalized(line) for line in result.stdout.splitlines()]
    for line, claim in output_claims(example.source, example.line):
        shown = normalized(claim)
        assert any(said(shown, out) for out in printed), (
            f"{example.path}:{line} says it prints {claim!r}; it printed:\n{result.stdout}"
        )


@pytest.mark.parametrize("example", FRAGMENTS, ids=str)
def test_fragment_parses(example: Example) -> None:
    """A fragment is not run, but is Python (top-level await allowed)."""
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    compile(example.source, str(example), "exec", flags=flags)


def test_every_python_fence_is_collected() -> None:
    """Each ```python fence of the docs opens a collected block (no fence swallows one)."""
    opened = [
        f"{path}:{number}"
        for path in DOCS
        for number, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if re.match(r"^\s*(`{3,}|~{3,})\s*(python|py)\b", line)
    ]
    assert opened == [str(example) for example in EXAMPLES]


def test_markers_sit_right_before_python_fences() -> None:
    """A marker on any other line (left behind by an edit) is an error, not ignored."""
    misplaced = []
    for path in DOCS:
        lines = (ROOT / path).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not MARKER.match(line):
                continue
            fence = FENCE.match(lines[number]) if number < len(lines) else None
            known = FRAGMENT.match(line) or LOOSE_OUTPUT.match(line)
            if not (known and fence and is_python(fence["info"])):
                misplaced.append(f"{path}:{number}: {line.strip()}")
    assert misplaced == []


def test_output_claims_are_read_from_print_comments() -> None:
    """Claims: a print's own comment, else the comment lines right after it; nothing else."""
    source = (
        "x = 1  # not a claim\n"
        "print(x)  # 1: the remark\n"
        "for i in range(2):\n"
        "    print(\n"
        "        i\n"
        "    )  # 0\n"
        "print('a long line')\n"
        "# a long\n"
        "#   line\n"
        "\n"
        "# a comment about what follows\n"
        "print('no claim')\n"
        "\n"
        "# nor this\n"
    )
    assert output_claims(source, 10) == [(12, "1: the remark"), (14, "0"), (17, "a long line")]
    assert said("1: the remark", "1")
    assert not said("1: the remark", "1:")
    assert not said("10", "1")


# --- the runner: ``python tests/test_docs.py PATH LINE < source`` --------------------------


def _loopback(host: object) -> bool:
    """Whether a host (a name, an address, or None for a local bind) is this machine."""
    if host is None or host in ("", b"", "localhost", b"localhost"):
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return False


def _keep_to_loopback(refused: list[str]) -> None:
    """Make name lookups and connections off this machine fail, and note each one."""
    lookup = socket.getaddrinfo
    connect = socket.socket.connect
    connect_ex = socket.socket.connect_ex

    def refuse(host: object) -> OSError:
        refused.append(repr(host))
        return ConnectionRefusedError(f"{host!r} is not loopback: a docs example stays local")

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _loopback(host):
            raise refuse(host)
        return lookup(host, *args, **kwargs)

    def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: socket.socket, address: Any) -> Any:
            inet = self.family in (socket.AF_INET, socket.AF_INET6)
            if inet and not _loopback(address[0]):
                raise refuse(address[0])
            return method(self, address)

        return call

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = guarded(connect)  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded(connect_ex)  # type: ignore[method-assign]


def _run_example(path: str, line: int, source: str) -> int:
    """Run ``source`` as ``__main__`` with Markdown line numbers, then its test functions."""
    sys.path[0] = os.getcwd()  # as a script saved in the repository root
    refused: list[str] = []
    _keep_to_loopback(refused)
    code = compile("\n" * line + source, path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    exec(code, main.__dict__)
    for name, value in list(vars(main).items()):
        if (
            name.startswith("test_")
            and inspect.isfunction(value)
            and value.__module__ == "__main__"
        ):
            outcome = value()
            if inspect.iscoroutine(outcome):
                asyncio.run(outcome)
    if refused:
        print(f"{path}:{line} tried to leave this machine: {', '.join(refused)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_run_example(sys.argv[1], int(sys.argv[2]), sys.stdin.read()))
