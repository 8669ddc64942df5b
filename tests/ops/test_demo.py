"""The demo's parts: its upstream server's sockets, its transitions, its screen."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections import Counter

import httpx
import pytest

from resilience import CircuitState, PolicyStatus, StateChanged
from resilience.ops.demo import free_port, run_demo, serve
from resilience.ops.screen import Screen, Transition, Transitions, breaker_line

from .terminal import Terminal


async def _ok(scope: dict[str, object], receive: object, send: object) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


async def test_upstream_connections_have_tcp_nodelay() -> None:
    """uvicorn (on asyncio's loop) accepts the demo's connections with TCP_NODELAY set, so a
    keep-alive response never waits on Nagle's algorithm."""
    server, task = await serve(_ok, free_port())
    try:
        port = server.config.port
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
            connections = list(server.server_state.connections)
            assert connections
            for protocol in connections:
                sock = protocol.transport.get_extra_info("socket")  # type: ignore[attr-defined]
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.should_exit = True
        await task


def test_transitions_are_listed_once_each() -> None:
    """Every replica reports the transitions it sees: each generation is listed once, in order."""
    now = time.time()
    transitions = Transitions(start_wall=now)
    opened = StateChanged(
        name="http://127.0.0.1:1", old=CircuitState.CLOSED, new=CircuitState.OPEN, generation=1
    )
    transitions.listener(opened)
    transitions.listener(opened)  # a second replica saw the same transition
    transitions.add("http://127.0.0.1:1", 2, "open", "half_open", now + 1.5)
    transitions.add("http://127.0.0.1:1", 2, "open", "half_open", now + 1.6)
    assert [(t.generation, t.new) for t in transitions.ordered()] == [
        (1, "open"),
        (2, "half_open"),
    ]
    assert len(transitions.take_fresh()) == 2
    assert transitions.take_fresh() == []


def test_piped_screen_prints_phases_and_changes_as_lines() -> None:
    """Without a terminal the screen writes plain lines: phase changes and state changes."""
    lines: list[str] = []
    screen = Screen(lines.append, tty=False, duration=10)
    transitions = Transitions(start_wall=0.0)
    transitions.add("b", 1, "closed", "open", 2.0)
    with screen:
        screen.show(0.0, "healthy", [Counter()], None, [])
        screen.show(0.5, "healthy", [Counter()], None, [])
        screen.show(2.0, "failing", [Counter()], None, transitions.take_fresh())
    assert lines == [
        "   0.0s  upstream phase: healthy; breaker: not used yet\n",
        "   2.0s  upstream phase: failing; breaker: not used yet\n",
        "   2.0s  breaker b closed -> open (generation 1)\n",
    ]


async def _accepted_nodelay(listener: socket.socket) -> int:
    """TCP_NODELAY on a connection asyncio accepted on ``listener`` (as uvicorn serves)."""
    accepted: asyncio.Future[asyncio.BaseTransport] = asyncio.get_running_loop().create_future()

    class Record(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)

    server = await asyncio.get_running_loop().create_server(Record, sock=listener)
    try:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        transport = await asyncio.wait_for(accepted, 5)
        sock = transport.get_extra_info("socket")
        value = int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()
        transport.close()
        await writer.wait_closed()
        return value
    finally:
        server.close()
        await server.wait_closed()


async def test_a_socket_bound_without_its_protocol_loses_tcp_nodelay() -> None:
    """Why `uvicorn --workers` answers keep-alive requests ~40 ms late (docs/deployment.md):
    it binds its socket with proto 0, and asyncio sets TCP_NODELAY only on sockets that say
    they are TCP; the same socket with its protocol stated gets it."""
    bare = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn's bind_socket
    bare.bind(("127.0.0.1", 0))
    bare.listen()
    assert await _accepted_nodelay(bare) == 0
    stated = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stated.bind(("127.0.0.1", 0))
    stated.listen()
    stated = socket.socket(stated.family, stated.type, socket.IPPROTO_TCP, stated.detach())
    assert await _accepted_nodelay(stated) != 0


def test_breaker_line_says_upstream_errors_were_retried() -> None:
    """A closed breaker's window counts attempts: the line says its errors were retried, an
    open one says what opened it, and counts agree with their nouns."""
    closed = PolicyStatus(
        name="b", kind="circuit_breaker", state=CircuitState.CLOSED, calls=20, failures=2
    )
    assert breaker_line(closed) == (
        "breaker: closed; 2 of the last 20 attempts failed (10%), each retried"
    )
    empty = PolicyStatus(name="b", kind="circuit_breaker", state=CircuitState.CLOSED)
    assert breaker_line(empty) == "breaker: closed; no attempt in its window yet"
    opened = PolicyStatus(
        name="b", kind="circuit_breaker", state=CircuitState.OPEN, opened_by=(12, 9, 0)
    )
    assert breaker_line(opened) == "breaker: OPEN, opened by 9 failed attempts of 12"
    one = PolicyStatus(
        name="b", kind="circuit_breaker", state=CircuitState.OPEN, opened_by=(1, 1, 0)
    )
    assert breaker_line(one) == "breaker: OPEN, opened by 1 failed attempt of 1"
    assert breaker_line(None) == "breaker: not used yet"


def test_a_late_report_still_prints_before_what_happened_after_it() -> None:
    """A state change reported after a later phase change was seen (a replica process
    reports every 0.2 s) is printed before it: lines wait HOLD seconds before printing."""
    lines: list[str] = []
    screen = Screen(lines.append, tty=False, duration=10)
    transitions = Transitions(start_wall=0.0)
    with screen:
        screen.show(0.0, "healthy", [Counter()], None, [])
        screen.show(4.0, "failing", [Counter()], None, [])
        transitions.add("b", 1, "closed", "open", 3.9)  # reported at 4.2, happened at 3.9
        screen.show(4.2, "failing", [Counter()], None, transitions.take_fresh())
        assert len(lines) == 1  # the phase change at 4.0 waits; the change at 3.9 too
        screen.show(5.0, "failing", [Counter()], None, [])
        assert len(lines) == 3  # both past HOLD: printed in order
    assert [line.split()[0] for line in lines] == ["0.0s", "3.9s", "4.0s"]


def test_piped_screen_prints_lines_in_time_order() -> None:
    """State changes that arrive late (a replica reports every 0.2 s) print in the order they
    happened, before a phase change seen after them."""
    lines: list[str] = []
    screen = Screen(lines.append, tty=False, duration=10)
    transitions = Transitions(start_wall=0.0)
    transitions.add("b", 2, "open", "half_open", 3.5)
    transitions.add("b", 1, "closed", "open", 2.5)
    with screen:
        screen.show(0.0, "healthy", [Counter()], None, [])
        screen.show(4.0, "failing", [Counter()], None, transitions.take_fresh())
    assert lines[1:] == [
        "   2.5s  breaker b closed -> open (generation 1)\n",
        "   3.5s  breaker b open -> half_open (generation 2)\n",
        "   4.0s  upstream phase: failing; breaker: not used yet\n",
    ]


async def test_the_in_process_demo_dashboard_shows_calls_and_latency() -> None:
    """Without Redis the demo's dashboard still shows the breaker's calls/s, failed/s and
    latency: its replicas tell the dashboard about every call; and the upstream's bulkhead
    with all four figures: active, queued, limit and rejected/s (none of them unknown)."""
    gc.collect()  # middlewares other tests left behind would add to the "asgi" bulkhead's card
    port = free_port()
    seen: list[dict[str, object]] = []
    pools: list[dict[str, object]] = []

    async def watch() -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(200):  # bounded: 20 s
                await asyncio.sleep(0.1)
                try:
                    doc = (await client.get(f"http://127.0.0.1:{port}/status")).json()
                except httpx.HTTPError:
                    continue
                pools.extend(
                    p["pool"]
                    for p in doc["policies"]
                    if p["kind"] == "bulkhead" and p["name"] == "asgi"
                )
                breakers = [p for p in doc["policies"] if p["kind"] == "circuit_breaker"]
                rates = breakers[0]["rates"] if breakers else None
                if rates and rates["calls"] and breakers[0]["percentiles"]["samples"]:
                    seen.append(breakers[0])
                if seen and pools and pools[-1]["rejected"] is not None:
                    return

    watching = asyncio.create_task(watch())
    await run_demo(4, replicas=2, seed=3, port=port, write=lambda _: None, tty=False)
    watching.cancel()
    await asyncio.gather(watching, return_exceptions=True)
    assert seen, "the in-process demo's dashboard never showed calls/s with latency"
    assert pools, "the in-process demo's dashboard never showed the upstream's bulkhead"
    last = pools[-1]
    assert last["limit"] == 64
    assert last["fleet"] is False
    assert None not in (last["active"], last["queued"], last["rejected"])


async def test_the_last_line_says_the_breakers_last_state() -> None:
    """The line of the upstream's last phase, printed as the demo ends, tells the breaker's
    last state seen, not "not used yet" after a run that used it."""
    lines: list[str] = []
    summary = await run_demo(
        0.5, replicas=1, seed=1, port=free_port(), write=lines.append, tty=False
    )
    assert summary["requests"]
    phases = [line for line in "".join(lines).splitlines() if "upstream phase:" in line]
    assert len(phases) >= 2
    assert "not used yet" not in phases[-1]


def test_live_screen_prints_names_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, a breaker's name in a state change line shows as written: no markup,
    no emoji code turned into an emoji."""
    terminal = Terminal(monkeypatch)
    name = "http://[::1]:80/[bold]:smile:[/x]"
    change = Transition(name=name, generation=1, old="closed", new="open", at=0.0)
    with Screen(lambda _: None, tty=True, duration=1.0) as screen:
        screen.show(1.0, "failing", [Counter[str]()], None, [change])
    assert f"breaker {name} closed -> open" in terminal.plain()
