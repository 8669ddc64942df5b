"""Helpers for the adapter tests: uvicorn on a free loopback port, in a thread of its own."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

STARTUP_TIMEOUT = 10.0


def uvicorn_config(app: Any, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` on a bare loopback server: h11, no lifespan, no
    websockets, no access log, quiet unless ``options`` (uvicorn's) say otherwise."""
    plain: dict[str, Any] = {
        "log_level": "critical",
        "access_log": False,
        "lifespan": "off",
        "ws": "none",
        "http": "h11",
        "loop": "asyncio",
    }
    return uvicorn.Config(app, **(plain | options))


class LiveServer:
    """A uvicorn server running ``app`` on ``127.0.0.1:<free port>`` until ``stop()``."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # no Nagle delay: a small response otherwise waits for the client's delayed ACK
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> LiveServer:
        """Start serving; fail if the server is not up within ``STARTUP_TIMEOUT`` seconds."""
        self.thread.start()
        limit = time.monotonic() + STARTUP_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > limit:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask the server to exit, wait (bounded) for its thread, close the socket."""
        self.server.should_exit = True
        self.thread.join(STARTUP_TIMEOUT)
        self.sock.close()


@contextmanager
def serve(app: Any) -> Iterator[LiveServer]:
    """``with serve(app) as server:`` runs ``app`` on ``server.url`` for the block."""
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()
