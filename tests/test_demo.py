"""The demo's parts: its upstream server's sockets, its transitions, its screen."""

from __future__ import annotations

import socket
import time
from collections import Counter

import httpx
from resilience.integrations.demo import Screen, Transitions, free_port, serve

from resilience import CircuitState, StateChanged


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
