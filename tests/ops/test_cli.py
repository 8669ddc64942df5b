"""The command line: the demo, and status / control / dashboard against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    PolicyStatus,
    RateLimiter,
    __version__,
    status,
)
from resilience.ops.cli import (
    DEMO_NEEDS,
    DISTRIBUTION,
    URL_ENV,
    CommandError,
    _read_token,
    build_parser,
    main,
    missing_modules,
    redact,
)
from resilience.ops.demo import FLEET_BURST, FLEET_RATE, DemoError, Transitions, _read_replica
from resilience.ops.table import format_table
from resilience.store.records import ReplicaReport
from resilience.store.redis import RedisStore

from ..redis_server import free_port


def run_demo(*extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m resilience demo` for a few seconds (piped: no terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "resilience", "demo", "--duration", "6", "--seed", "7", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=cwd,
    )


def check_demo_output(stdout: str) -> None:
    """The demo printed its dashboard, the breaker opening (and closing), and a summary."""
    assert "dashboard: http://127.0.0.1:" in stdout
    assert "done:" in stdout
    transitions = stdout.split("breaker:")[-1]
    assert "open" in transitions
    assert "rejected at once by the open breaker" in stdout


def summary_generations(stdout: str) -> list[int]:
    """The generations of the transitions the demo's summary lists."""
    summary = stdout.split("\ndone:")[-1]
    return [int(g) for g in re.findall(r"-> \w+ \(generation (\d+)\)", summary)]


def test_demo_runs_and_reports() -> None:
    """The README's demo: upstream, replicas sharing a breaker in memory, dashboard, summary;
    piped, it prints phases and state changes as lines, and the summary lists every
    transition (generations 1, 2, 3, ... without a gap, half-open rounds included)."""
    stdout = run_demo().stdout
    check_demo_output(stdout)
    generations = summary_generations(stdout)
    assert generations == list(range(1, len(generations) + 1)), stdout
    assert "half_open -> " in stdout
    assert "upstream phase: failing" in stdout
    for line in stdout.splitlines():
        if "upstream phase:" in line:  # each says what the breaker's window holds
            says = ("failed (", "each retried", "opened by", "no attempt in", "not used yet")
            assert any(what in line for what in says), line
    assert "\x1b[" not in stdout  # no terminal codes in a pipe


def test_demo_with_redis_runs_replicas_as_processes(redis_url: str, tmp_path: Path) -> None:
    """With --redis the replicas are separate processes sharing the breaker through Redis;
    the demo prints its prefix and the commands that show it, which work beside it, and its
    upstream's rate limiter is fleet-wide: the store lists it with its rate and burst."""
    out = run_demo("--redis", redis_url, "--replicas", "2", cwd=tmp_path)
    check_demo_output(out.stdout)
    assert "Redis redis://" in out.stdout
    prefix = re.search(r"under prefix '(demo-\d+)'", out.stdout)
    assert prefix, out.stdout
    assert f"resilience status --redis '{redis_url}' --prefix {prefix[1]}" in out.stdout
    assert summary_generations(out.stdout)

    async def reported() -> dict[str, Any]:
        async with RedisStore.from_url(redis_url, prefix=prefix[1], timeout=1.0) as store:
            return (await store.config("upstream")).base

    # its policies reported their values in code to the store (a full bucket's key expires
    # a second after its last request: the settings stay)
    base = asyncio.run(reported())
    assert base["rate_limiter"]["rate"] == FLEET_RATE
    assert base["rate_limiter"]["burst"] == FLEET_BURST
    assert base["bulkhead"]["max_concurrent"] == 64


def test_a_replica_that_dies_stops_the_demo_with_its_error() -> None:
    """A replica process that exits with an error raises DemoError carrying its message."""
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('{}'); sys.exit('replica: no route')"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        with pytest.raises(DemoError, match=r"replica #1 exited with code 1:\nreplica: no route"):
            asyncio.run(_read_replica(1, process, err, Counter(), Transitions(time.time())))
        assert process.stdout is not None
        process.stdout.close()


def test_demo_exits_1_when_redis_is_unreachable() -> None:
    """`demo --redis` with an unreachable Redis exits 1 with one line, password masked."""
    out = subprocess.run(
        [sys.executable, "-m", "resilience", "demo", "--duration", "1",
         "--redis", "redis://:pw-9876@127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "resilience: demo stopped: cannot reach Redis at redis://:***@127.0.0.1:1/0" in (
        out.stderr
    )
    assert "pw-9876" not in out.stderr + out.stdout


def test_bad_duration_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """An impossible --duration exits with a usage error."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--duration", "-1"])
    assert info.value.code == 2
    assert "--duration" in capsys.readouterr().err


# status and control against a real Redis ---------------------------------------------------
ENV_VARS = ("RESILIENCE_REDIS_URL", "RESILIENCE_PREFIX", "RESILIENCE_DASHBOARD_TOKEN")
DOWN = "redis://127.0.0.1:1/0"


def resilience(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m resilience ARGS` with a clean environment plus ``env``; bounded."""
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run(
        [sys.executable, "-m", "resilience", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


async def _fail() -> None:
    raise ConnectionError("upstream down")


@pytest.fixture
async def tripped(redis_url: str) -> tuple[str, str]:
    """A unique prefix holding breaker 'payments' (tripped open) and 'search' (healthy)."""
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(redis_url, prefix=prefix, timeout=1.0)
    try:
        payments = CircuitBreaker(
            "payments", window=CountWindow(4), minimum_calls=2, open_for=60, store=store
        )
        search = CircuitBreaker("search", store=store)
        await search.call(asyncio.sleep, 0)
        for _ in range(20):  # bounded: the breaker opens after two failures
            if payments.metrics().state is CircuitState.OPEN:
                break
            with contextlib.suppress(ConnectionError, CircuitOpenError):
                await payments.call(_fail)
            await store.sync()
        assert payments.metrics().state is CircuitState.OPEN
    finally:
        await store.aclose()
    return redis_url, prefix


async def breaker_state(url: str, prefix: str, name: str) -> CircuitState | None:
    """The state a fresh RedisStore reads for breaker ``name``."""
    async with RedisStore.from_url(url, prefix=prefix, timeout=1.0) as store:
        for p in await status(store):
            if p.name == name and p.kind == "circuit_breaker":
                return p.state
    return None


def test_status_table(tripped: tuple[str, str]) -> None:
    """`status` prints a table with the tripped breaker open and its retry-after."""
    url, prefix = tripped
    out = resilience("status", "--redis", url, "--prefix", prefix)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "KIND", "STATE", "CALLS", "FAILURES", "RATIO", "RETRY-AFTER", "REPLICAS",
    ]  # fmt: skip
    payments = next(line.split() for line in lines if line.startswith("payments"))
    assert payments[1:3] == ["circuit_breaker", "open"]
    assert payments[6].endswith("s")
    assert any(line.startswith("search") and " closed " in line for line in lines)


def test_status_json_from_the_environment(tripped: tuple[str, str]) -> None:
    """`status --json` reads the URL and prefix from the environment and prints JSON."""
    url, prefix = tripped
    out = resilience(
        "status", "--json", env={"RESILIENCE_REDIS_URL": url, "RESILIENCE_PREFIX": prefix}
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["store"] == {"kind": "redis", "degraded": False}
    states = {p["name"]: p["state"] for p in doc["policies"] if p["kind"] == "circuit_breaker"}
    assert states == {"payments": "open", "search": "closed"}
    assert doc["reporting"] == 5.0  # as the dashboard's document: replicas heard from lately
    assert {p["name"]: p["replicas_reporting"] for p in doc["policies"]} == {
        "payments": 1,
        "search": 1,
    }


async def test_status_carries_pool_and_bucket_figures(redis_url: str) -> None:
    """`status --json` gives a fleet-wide bulkhead its pool figures and a rate limiter its
    bucket's (tokens of the burst its replica reported), as the dashboard computes them, and
    the table shows the rate limiter's tokens."""
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(redis_url, prefix=prefix, timeout=1.0)
    try:
        pool = Bulkhead(4, distributed=True, store=store, name="pool")
        quota = RateLimiter(1, per=60.0, burst=10, store=store, name="quota")
        release = asyncio.Event()
        held = asyncio.create_task(pool.call(release.wait))
        for _ in range(3):
            await quota.call(asyncio.sleep, 0)
        await store.sync()
        try:
            out = await asyncio.to_thread(
                resilience, "status", "--json", "--redis", redis_url, "--prefix", prefix
            )
            table = await asyncio.to_thread(
                resilience, "status", "--redis", redis_url, "--prefix", prefix
            )
        finally:
            release.set()
            await held
    finally:
        await store.aclose()
    assert out.returncode == 0, out.stderr
    policies = {p["kind"]: p for p in json.loads(out.stdout)["policies"]}
    figures = policies["bulkhead"]["pool"]
    assert (figures["active"], figures["limit"], figures["fleet"]) == (1, 4, True)
    assert figures["queued"] is None  # no bulkhead of that name in the command's process
    bucket = policies["rate_limiter"]["bucket"]
    assert (bucket["rate"], bucket["per"], bucket["burst"]) == (1, 60.0, 10)
    assert 7.0 <= bucket["tokens"] < 7.5  # three taken, a little of one back since
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("quota")]
    assert re.search(r"7\.\d of 10 tokens", row), row


def test_status_table_shows_a_rate_limiters_tokens_when_known() -> None:
    """A rate limiter's row shows its tokens of its burst when its bucket's figures are
    known, else when its bucket is full again."""
    policies = [
        PolicyStatus(name="quota", kind="rate_limiter", backlog=150.0),
        PolicyStatus(name="other", kind="rate_limiter", backlog=1.25),
    ]
    buckets = {"quota": {"tokens": 7.5, "rate": 1, "per": 60.0, "burst": 10, "refused": None}}
    lines = format_table(policies, buckets).splitlines()
    assert "7.5 of 10 tokens" in lines[1]
    assert "full again in 1.2s" in lines[2]


def test_status_of_an_empty_prefix(redis_url: str) -> None:
    """`status` on a prefix nobody uses says there is nothing, and exits 0."""
    out = resilience("status", "--redis", redis_url, "--prefix", f"empty-{uuid.uuid4().hex}")
    assert out.returncode == 0
    assert "no policies under prefix" in out.stdout


@pytest.mark.parametrize(
    ("command", "state"),
    [
        ("open", CircuitState.FORCED_OPEN),
        ("close", CircuitState.CLOSED),
        ("reset", CircuitState.CLOSED),
        ("disable", CircuitState.DISABLED),
    ],
)
async def test_control_commands(
    tripped: tuple[str, str], command: str, state: CircuitState
) -> None:
    """`open`, `close` and `disable` change the state every RedisStore sees."""
    url, prefix = tripped
    out = await asyncio.to_thread(
        resilience, command, "payments", "--redis", url, "--prefix", prefix
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"breaker 'payments' is now {state}"
    assert await breaker_state(url, prefix, "payments") is state


def test_unknown_breaker_exits_1(tripped: tuple[str, str]) -> None:
    """Controlling a breaker nobody registered exits 1 with one clear line."""
    url, prefix = tripped
    out = resilience("open", "ghost", "--redis", url, "--prefix", prefix)
    assert out.returncode == 1
    assert f"no breaker named 'ghost' under prefix '{prefix}'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [("status",), ("close", "payments")])
def test_unreachable_redis_exits_1(args: tuple[str, ...]) -> None:
    """An unreachable Redis exits 1 with `cannot reach Redis at URL`, no traceback."""
    out = resilience(*args, "--redis", DOWN)
    assert out.returncode == 1
    assert out.stderr.startswith(f"resilience: cannot reach Redis at {DOWN}: ")
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1


def test_password_is_not_printed() -> None:
    """The Redis password never appears in an error message."""
    out = resilience("status", "--redis", "redis://:hunter2@127.0.0.1:1/0")
    assert out.returncode == 1
    assert "hunter2" not in out.stderr
    assert "redis://:***@127.0.0.1:1/0" in out.stderr


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("open", "payments")])
def test_no_redis_url_exits_2(args: tuple[str, ...]) -> None:
    """Without a Redis URL there is nothing to show: exit 2 with the reason."""
    out = resilience(*args)
    assert out.returncode == 2
    assert "no Redis URL" in out.stderr
    assert "in-memory store lives inside one process" in out.stderr


def test_allow_control_needs_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    """`dashboard --allow-control` without a token is a usage error."""
    with pytest.raises(SystemExit) as info:
        main(["dashboard", "--allow-control"])
    assert info.value.code == 2
    assert "--token" in capsys.readouterr().err


def test_a_token_of_non_ascii_characters_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dashboard --token` with a character outside visible ASCII fails in one line (exit 2):
    no header encoding carries it alike, so no client could be authorised."""
    assert main(["dashboard", "--allow-control", "--token", "päss", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "token must be" in err
    assert "Traceback" not in err
    assert "päss" not in err  # the token is not shown


def test_dashboard_serves_status(tripped: tuple[str, str]) -> None:
    """`dashboard` serves /status on a free port until terminated."""
    url, prefix = tripped
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilience", "dashboard", "--redis", url, "--prefix", prefix,
         "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean,
    )  # fmt: skip
    try:
        doc = wait_for_status(f"http://127.0.0.1:{port}/status", proc)
        states = {p["name"]: p["state"] for p in doc["policies"] if p["kind"] == "circuit_breaker"}
        assert states["payments"] == "open"
        assert doc["control"] is False
        assert httpx.post(f"http://127.0.0.1:{port}/control/payments", json={}).status_code == 403
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Traceback" not in err
    assert f"dashboard on http://127.0.0.1:{port}/" in out


def wait_for_status(url: str, proc: subprocess.Popen[str], seconds: float = 20) -> Any:
    """Poll ``url`` until it answers 200 (bounded), failing early if ``proc`` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the dashboard exited with {proc.returncode}: {proc.communicate()}")
        try:
            r = httpx.get(url, timeout=1)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if r.status_code == 200:
            return r.json()
        time.sleep(0.1)
    pytest.fail(f"no answer from {url} in {seconds}s")


# --- first contact: help, version, pipes, missing extras, secrets ----------------------------
def test_help_is_plain_text() -> None:
    """The top-level --help has no reST markup, and --version names the distribution."""
    out = resilience("--help")
    assert out.returncode == 0
    assert "``" not in out.stdout
    assert "exit codes" in out.stdout
    version = resilience("--version")
    assert version.stdout.strip() == f"resilience {__version__} ({DISTRIBUTION})"


def test_dashboard_help_shows_defaults_and_no_secret() -> None:
    """`dashboard --help` shows each default, prefers a token file, and never shows the
    token or Redis URL taken from the environment."""
    out = resilience(
        "dashboard",
        "--help",
        env={"RESILIENCE_DASHBOARD_TOKEN": "t0ken-in-env", URL_ENV: "redis://:pw1234@h:1/0"},
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for default in ("(default: 127.0.0.1)", "(default: 8765)", "(default: 1)"):
        assert default in text
    assert "--token-file" in text
    assert "ps" in text
    assert "t0ken-in-env" not in out.stdout
    assert "pw1234" not in out.stdout


def test_status_json_into_a_closed_pipe(tripped: tuple[str, str]) -> None:
    """`status --json` into a pipe its reader has closed ends quietly, with no
    BrokenPipeError traceback (`true` exits long before Python has started)."""
    url, prefix = tripped
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    command = (
        f"{shlex.quote(sys.executable)} -m resilience status --json --redis {url} "
        f"--prefix {prefix} | true"
    )
    out = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, env=clean
    )
    assert "Traceback" not in out.stderr
    assert "BrokenPipe" not in out.stderr


def test_missing_extra_hint_only_when_missing(tmp_path: Path) -> None:
    """The 'demo' extra hint names the missing module and the distribution; with every
    dependency present the demo starts instead."""
    code = (
        "import sys; sys.modules['rich'] = None; from resilience.ops.cli import main; "
        "sys.exit(main(['demo', '--duration', '1']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 2
    assert f"pip install '{DISTRIBUTION}[demo]'" in out.stderr
    assert "rich" in out.stderr
    assert missing_modules(DEMO_NEEDS) == []  # here the extra is installed: no hint
    assert missing_modules(["no_such_module_here"]) == ["no_such_module_here"]


def test_token_file(tmp_path: Path) -> None:
    """--token-file supplies the control token; an empty or missing file is a usage error."""
    token = tmp_path / "token"
    token.write_text("  s3cret-from-file\n")
    args = build_parser().parse_args(["dashboard", "--token-file", str(token)])
    assert _read_token(args) == "s3cret-from-file"
    token.write_text("\n")
    with pytest.raises(CommandError, match="empty"):
        _read_token(args)
    args = build_parser().parse_args(["dashboard", "--token-file", str(tmp_path / "nope")])
    with pytest.raises(CommandError, match="cannot read"):
        _read_token(args)


SECRET = "Zx9"  # starts every generated password, so none can appear in a URL by chance
PASSWORDS = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20
).map(lambda s: SECRET + s)


@given(password=PASSWORDS, user=st.sampled_from(["", "app"]))
@settings(max_examples=300, deadline=None)
def test_redact_masks_a_password_in_every_url_form(password: str, user: str) -> None:
    """redact() masks the password in the user-info, raw or quoted, and in the query, in
    URLs urlsplit cannot parse too, alone or inside a message."""
    quoted = quote(password, safe="")
    raw_query = password.replace("&", "").replace("#", "").replace(";", "").split()[0]
    urls = [
        f"redis://{user}:{password}@127.0.0.1:6379/0",
        f"rediss://{user}:{quoted}@[::1]:6380/2",
        f"unix:///run/redis.sock?db=0&password={quoted}",
        f"unix:///run/redis.sock?password={raw_query}&db=1",
        f"redis://127.0.0.1/0?PassWord={quoted}",
    ]
    for url in urls:
        secret = raw_query if "password=" + raw_query in url else password
        for text in (url, f"cannot reach Redis at {url}: Connection refused"):
            shown = redact(text)
            assert secret not in shown, (text, shown)
            assert quoted not in shown, (text, shown)
            assert "***" in shown


def test_redact_keeps_what_the_operator_needs() -> None:
    """redact() keeps scheme, user, host, port and database, and leaves plain URLs alone."""
    assert redact("redis://app:pw@cache:6379/3") == "redis://app:***@cache:6379/3"
    assert redact("redis://:p[w@cache:6379") == "redis://:***@cache:6379"
    assert redact("unix:///s.sock?password=pw&db=2") == "unix:///s.sock?password=***&db=2"
    assert redact("redis://cache:6379/0") == "redis://cache:6379/0"
    assert redact("no URL here") == "no URL here"


def test_unparsable_url_password_is_not_printed() -> None:
    """A URL urlsplit rejects (a raw '[' in the password) is masked in the error message."""
    out = resilience("status", "--redis", "redis://:s3[cr3t@127.0.0.1:1/0")
    assert out.returncode in (1, 2)
    assert "s3[cr3t" not in out.stderr
    assert "cr3t" not in out.stderr


# usage errors and messages ------------------------------------------------------------------
@pytest.mark.parametrize("url", ["notaurl", "http://127.0.0.1:6379/0"])
def test_demo_with_an_invalid_redis_url_says_so_in_one_line(url: str) -> None:
    """`demo --redis` with something that is no Redis URL is one line and exit 2, as `status`."""
    out = resilience("demo", "--duration", "1", "--redis", url)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("resilience: invalid Redis URL"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["demo", "--duration", "0"], "usage: resilience demo"),
        (["demo", "--replicas", "0"], "usage: resilience demo"),
        (["demo", "--port", "70000"], "usage: resilience demo"),
        (["dashboard", "--allow-control"], "usage: resilience dashboard"),
        (["dashboard", "--refresh", "0"], "usage: resilience dashboard"),
    ],
)
def test_range_errors_show_the_subcommands_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value out of range is a usage error of its subcommand, with that subcommand's usage."""
    clean = {k: os.environ.pop(k) for k in ENV_VARS if k in os.environ}
    try:
        with pytest.raises(SystemExit) as info:
            main(argv)
    finally:
        os.environ.update(clean)
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(usage)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["dashboard", "--port", "abc"], "argument --port: not a TCP port: 'abc'"),
        (["demo", "--port", "abc"], "argument --port: not a TCP port: 'abc'"),
        (["dashboard", "--refresh", "soon"], "argument --refresh: not a number of seconds"),
        (["demo", "--duration", "long"], "argument --duration: not a number of seconds"),
        (["demo", "--replicas", "many"], "argument --replicas: not a whole number: 'many'"),
    ],
)
def test_a_value_that_does_not_parse_names_its_option(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value of the wrong type names the option and says what it must be, never a function."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert says in err, err
    assert "invalid" not in err


def test_dashboard_on_a_port_in_use_says_so_before_any_url() -> None:
    """`dashboard` on a port already taken exits 1 with one line, and never prints its URL."""
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        out = resilience("dashboard", "--port", str(port))
    finally:
        taken.close()
    assert out.returncode == 1, out.stderr
    assert "dashboard on" not in out.stdout
    last = out.stderr.strip().splitlines()[-1]  # after the in-memory store's warning
    assert last == f"resilience: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in out.stderr


def test_demo_serves_its_dashboard_on_the_given_port() -> None:
    """`demo --port` puts the dashboard on that port."""
    port = free_port()
    out = run_demo("--duration", "1", "--port", str(port))
    assert f"dashboard: http://127.0.0.1:{port}/" in out.stdout


def test_status_table_never_shows_an_open_breaker_or_a_gone_fleet_as_healthy() -> None:
    """An open breaker's row shows the window that opened it (its live window is empty), a
    forced one no figures, and REPLICAS counts only replicas heard from lately, of those known."""

    def report(i: int, seen: float) -> ReplicaReport:
        return ReplicaReport(replica=f"r{i}", last_seen=seen, calls=5, failures=5, slow_calls=0)

    gone = tuple(report(i, 180.0) for i in range(3))
    policies = [
        PolicyStatus(
            name="pay", kind="circuit_breaker", state=CircuitState.OPEN, retry_after=3.0,
            opened_by=(20, 15, 0), replicas=(report(0, 0.2), *gone[1:]),
        ),
        PolicyStatus(name="inv", kind="circuit_breaker", state=CircuitState.FORCED_OPEN),
        PolicyStatus(
            name="old", kind="circuit_breaker", state=CircuitState.CLOSED, calls=8, replicas=gone
        ),
    ]  # fmt: skip
    lines = format_table(policies).splitlines()
    assert lines[1].split() == ["pay", "circuit_breaker", "open", "20", "15", "75%", "3.0s", "1/3"]
    assert lines[2].split() == ["inv", "circuit_breaker", "forced_open", "-", "-", "-", "-", "-"]
    assert lines[3].split()[-1] == "0/3"
    assert lines[-1] == "open: CALLS, FAILURES and RATIO are the window that opened it"


def test_status_table_shows_throttle_and_hedge_windows_and_health() -> None:
    """A throttle's and a hedge's shared windows read as what they count, a fleet-wide
    health check says whether its last result was healthy, and why not, and a rate limiter
    when its bucket is full again."""
    policies = [
        PolicyStatus(name="api", kind="throttle", window=(10, 7)),
        PolicyStatus(name="api", kind="hedge", window=(40, 2)),
        PolicyStatus(
            name="health:db", kind="health_check", in_flight=1, healthy=False,
            health_error="ConnectionError: no route",
        ),
        PolicyStatus(name="health:mq", kind="health_check", in_flight=0, healthy=True),
        PolicyStatus(name="api", kind="rate_limiter", backlog=1.25),
        PolicyStatus(name="idle", kind="rate_limiter", backlog=0.0),
    ]  # fmt: skip
    lines = format_table(policies).splitlines()
    assert "7 accepted of 10 requests" in lines[1]
    assert "2 hedges for 40 calls" in lines[2]
    assert "running, unhealthy: ConnectionError: no route" in lines[3]
    assert "not running, healthy" in lines[4]
    assert "full again in 1.2s" in lines[5]
    assert "bucket full" in lines[6]


def test_status_table_shows_a_bulkheads_leases_of_its_limit() -> None:
    """A fleet-wide bulkhead's row shows its leases held of its limit when the store knows
    the limit, and the leases alone when it does not."""
    policies = [
        PolicyStatus(name="pool", kind="bulkhead", in_flight=1, limit=10),
        PolicyStatus(name="old", kind="bulkhead", in_flight=2),
    ]
    lines = format_table(policies).splitlines()
    assert "1 of 10 leases held" in lines[1]
    assert "2 leases held" in lines[2]
