"""``Dashboard``: a live status page for a store's breakers, as a pure ASGI app.

Mount it in Starlette or FastAPI, or serve it alone with uvicorn::

    app = Starlette(routes=[Mount("/resilience", app=Dashboard(store))])

Routes, relative to where it is mounted (``scope["root_path"]`` is respected):

* ``GET /``: the page (one static HTML file, no external resources).
* ``GET /status``: ``{"policies": [...], "store": {"kind", "degraded"}, "control", "refresh",
  "time"}``; ``503`` with the same shape and an ``"error"`` when the store cannot answer.
* ``GET /events``: Server-Sent Events pushing that document every ``refresh`` seconds until
  the client goes away.
* ``POST /control/{name}`` with ``{"state": "forced_open" | "closed" | "disabled"}``: only
  with ``allow_control=True`` and ``Authorization: Bearer <token>``; ``403`` otherwise.

Control is off by default, and turning it on requires a token. The app imports no web
framework; lifespan messages are answered, WebSocket connections are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from html import escape
from importlib import resources
from typing import Any

from resilience import CircuitState, Store, StoreUnavailableError, status

__all__ = ["Dashboard"]

logger = logging.getLogger("resilience.dashboard")

# The ASGI types, as Starlette spells them (starlette/types.py), without importing it.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CONTROL_STATES = {
    s.value: s for s in (CircuitState.CLOSED, CircuitState.FORCED_OPEN, CircuitState.DISABLED)
}
_MAX_BODY = 4096  #: bytes accepted in a control request
_STREAM_SECONDS = 300.0  #: an event stream ends after this; EventSource reconnects by itself
_BASE_MARK = "__RESILIENCE_BASE__"
_PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
]
_COMMON_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def _store_kind(store: Store) -> str:
    """``"memory"``, ``"redis"``, or the store's class name."""
    name = type(store).__name__
    return {"MemoryStore": "memory", "RedisStore": "redis"}.get(name, name)


class Dashboard:
    """A live status page (and JSON / SSE feeds) for every policy ``store`` knows.

    ``allow_control=True`` lets operators force breakers open, closed or disabled from the
    page; it requires ``token``, which clients send as ``Authorization: Bearer <token>``.
    ``refresh`` is the seconds between two pushes on the event stream.
    """

    def __init__(
        self,
        store: Store,
        *,
        allow_control: bool = False,
        token: str | None = None,
        refresh: float = 1.0,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a resilience Store, not {store!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError(f"token must be a non-empty string, not {token!r}")
        if allow_control and token is None:
            raise ValueError("allow_control=True requires a token (sent as a Bearer token)")
        if isinstance(refresh, bool) or not isinstance(refresh, int | float):
            raise TypeError(f"refresh must be a number of seconds, not {refresh!r}")
        if not math.isfinite(refresh) or not 0.05 <= refresh <= 3600:
            raise ValueError(f"refresh must be in [0.05, 3600] seconds, not {refresh!r}")
        self.store = store
        self.allow_control = bool(allow_control)
        self.refresh = float(refresh)
        self._token = None if token is None else token.encode()
        self._page = resources.files(__name__).joinpath("index.html").read_text(encoding="utf-8")

    def __repr__(self) -> str:
        return (
            f"Dashboard({self.store!r}, allow_control={self.allow_control}, "
            f"refresh={self.refresh:g})"
        )

    # ASGI ---------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = str(scope.get("root_path", "")).rstrip("/")
        path = str(scope["path"])
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root) :]
        path = path or "/"
        method = str(scope["method"]).upper()
        if path.startswith("/control/"):
            if method != "POST":
                await _json(send, 405, {"error": "use POST"}, allow=b"POST")
                return
            await self._control(scope, receive, send, path[len("/control/") :])
            return
        handler = {"/": self._index, "/status": self._status, "/events": self._events}.get(path)
        if handler is None:
            await _json(send, 404, {"error": f"no such page: {path}"})
        elif method not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "use GET"}, allow=b"GET, HEAD")
        else:
            await handler(scope, receive, send)

    # pages --------------------------------------------------------------------------------
    async def _index(self, scope: Scope, receive: Receive, send: Send) -> None:
        base = str(scope.get("root_path", "")).rstrip("/") + "/"
        body = self._page.replace(_BASE_MARK, escape(base, quote=True), 1).encode()
        headers = [(b"content-type", b"text/html; charset=utf-8"), *_PAGE_HEADERS]
        await _respond(send, 200, body, headers, head=scope["method"] == "HEAD")

    async def snapshot(self) -> tuple[int, dict[str, Any]]:
        """The status document and its HTTP status: 200, or 503 when the store failed."""
        store = {"kind": _store_kind(self.store), "degraded": False}
        doc: dict[str, Any] = {"policies": [], "store": store, "control": self.allow_control}
        doc["refresh"] = self.refresh
        code = 200
        try:
            doc["policies"] = [p.to_dict() for p in await status(self.store)]
        except Exception as exc:  # a status page reports a failing store; it never crashes
            if not isinstance(exc, StoreUnavailableError):
                logger.exception("store %r failed to report its status", self.store)
            doc["error"] = f"store unavailable: {exc}" if str(exc) else "store unavailable"
            store["degraded"] = True
            code = 503
        store["degraded"] = store["degraded"] or bool(getattr(self.store, "degraded", False))
        doc["time"] = time.time()
        return code, doc

    async def _status(self, scope: Scope, receive: Receive, send: Send) -> None:
        code, doc = await self.snapshot()
        await _json(send, code, doc, head=scope["method"] == "HEAD")

    async def _events(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"x-accel-buffering", b"no"),
                        *_COMMON_HEADERS,
                    ],
                }
            )
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            retry = int(max(1.0, self.refresh) * 2000)
            await _chunk(send, f"retry: {retry}\n\n".encode())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _STREAM_SECONDS
            while not gone.is_set() and loop.time() < deadline:
                _, doc = await self.snapshot()
                if gone.is_set():
                    break
                await _chunk(send, b"data: " + _dumps(doc) + b"\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), self.refresh)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b""})
        except OSError:  # the client went away while we were writing
            return
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _control(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        if not self.allow_control:
            await _json(send, 403, {"error": "control is disabled on this dashboard"})
            return
        if not self._authorized(scope):
            await _json(send, 403, {"error": "a valid 'Authorization: Bearer <token>' is needed"})
            return
        body = await _read_body(receive)
        state = None
        if body is not None:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                data = json.loads(body)
                if isinstance(data, dict) and isinstance(data.get("state"), str):
                    state = _CONTROL_STATES.get(data["state"])
        if state is None:
            choices = ", ".join(sorted(_CONTROL_STATES))
            await _json(send, 400, {"error": f'send {{"state": one of {choices}}} as JSON'})
            return
        if not name:
            await _json(send, 404, {"error": "no breaker named ''"})
            return
        try:
            await self.store.control(name, state)
        except KeyError:
            await _json(send, 404, {"error": f"no breaker named {name!r}"})
        except ValueError as exc:
            await _json(send, 400, {"error": str(exc)})
        except Exception as exc:  # a failing store is a 503 for the operator, never a crash
            if not isinstance(exc, StoreUnavailableError):
                logger.exception("store %r failed to control %r", self.store, name)
            await _json(send, 503, {"error": f"store unavailable: {exc}"})
        else:
            logger.warning("dashboard: breaker %r forced %s", name, state.value)
            await _json(send, 200, {"name": name, "state": state.value})

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return False
        for key, value in scope.get("headers", ()):
            if bytes(key).lower() == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(given.strip(), self._token)
        return False


# helpers ----------------------------------------------------------------------------------
def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


async def _chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _respond(
    send: Send,
    code: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    head: bool = False,
) -> None:
    headers = [*headers, *_COMMON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _json(
    send: Send, code: int, doc: Any, *, allow: bytes | None = None, head: bool = False
) -> None:
    headers = [(b"content-type", b"application/json")]
    if allow is not None:
        headers.append((b"allow", allow))
    await _respond(send, code, _dumps(doc), headers, head=head)


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or ``None`` if it is larger than ``_MAX_BODY`` or the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Answer startup and shutdown: the dashboard has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
