"""``Dashboard``: a live status page for every policy a store knows, as a Starlette app.

Mount it in Starlette or FastAPI, or serve it alone with uvicorn::

    app = Starlette(routes=[Mount("/resilience", app=Dashboard(store))])

Routes, relative to where it is mounted:

* ``GET /``: the page (one static HTML file, no external resources), with the first status
  document inside it, so it shows figures at once.
* ``GET /status``: ``{"policies": [...], "store": {"kind", "degraded"}, "control", "refresh",
  "reporting", "time"}``; ``503`` with the same shape and an ``"error"`` when the store cannot
  answer, or its figures cannot be computed. Each policy carries its ``PolicyStatus`` fields
  plus ``"replicas_reporting"`` (replicas heard from in the last ``"reporting"`` seconds:
  ``REPORTING``) and, for a breaker, figures computed here from the running totals of two
  successive snapshots (``None`` before a second one; ``None`` for other kinds): ``"rates"``,
  per second:
  ``calls``, ``failures``, ``slow_calls`` (``None`` from a store that keeps no running total
  of them, as an in-process one) and ``rejected`` (calls refused), and ``timeouts``,
  ``bulkhead_rejected`` and ``fallbacks`` (``None`` unless this process's policies of that
  name report to ``dashboard.calls``); ``"percentiles"``:
  ``{"samples", "p50", "p90", "p99", "p99.5", "mean"}`` over the calls sampled in between
  (one in 8, or every call of a breaker that times them anyway), each percentile as its
  histogram bucket's ``[lower, upper]`` edges in seconds (``upper`` ``None`` past the last
  edge), the mean in seconds as estimated from the buckets; ``None`` when no call was
  sampled. A bulkhead carries ``"pool"``, a rate limiter ``"bucket"`` and a health check
  ``"result_age"`` and ``"suspicion"`` (see ``resilience.ops.cards``); a bulkhead of this
  process that the store does not list is added as a policy of its own.
* ``GET /events``: Server-Sent Events pushing that document every ``refresh`` seconds until
  the client goes away.
* ``POST /control/{name}`` with ``{"state": "forced_open" | "closed" | "disabled"}``: only
  with ``allow_control=True`` and ``Authorization: Bearer <token>``; ``403`` otherwise.
* ``GET /api/config/{name}``: the live settings of ``name``: ``{"name", "version", "values",
  "base", "history"}`` (``base``: the values in code, by policy kind; ``history``: newest
  first, each ``{"version", "values", "at", "origin", "rollback_of"}``).
* ``POST /api/config/{name}`` with ``{"values": {...}}``: ``{"name", "version"}``, or ``400``
  ``{"error": "<the policy constructor's message>"}`` and nothing changed;
  ``POST /api/config/{name}/rollback`` with an optional ``{"version": n}``: ``{"name",
  "version"}``. Both behind the token, as control is.

A store shared through Redis carries every replica's running totals; an in-process store
keeps none of calls: breakers built with ``listeners=[dashboard.calls]`` report theirs to the
dashboard (``CallCounts``), which gives their cards calls/s, failed/s and latency.

Control is off by default, and turning it on requires a token. Every figure comes from the
store's ``status()``, one call per push (shared by every viewer), and a live-settings read
per rate limiter every ``SETTINGS_AGE`` seconds: no Redis command per protected call. Error messages
never show where the store is (a Redis URL, host or port); the server's log has the details.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from html import escape
from importlib import resources
from typing import Any, cast

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        f"resilience.ops.dashboard needs Starlette: pip install "
        f"'resilience-fleet[dashboard]' ({exc})"
    ) from exc

from resilience import CircuitState, Clock, PolicyStatus, Store, StoreUnavailableError, status
from resilience.store.config import ConfigStore, check_keys, origin
from resilience.store.records import REPORTING

from ..calls import CallCounts
from ..cards import Cards
from ..configure import config_document
from .figures import Intervals

__all__ = ["Dashboard"]

logger = logging.getLogger("resilience.dashboard")

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
_INITIAL_MARK = "__RESILIENCE_INITIAL__"
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_COMMON_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
#: what a token may hold: the same bytes in every header encoding
_VISIBLE_ASCII = frozenset(map(chr, range(0x21, 0x7F)))
_UNAVAILABLE = "store unavailable (the dashboard's log says why)"
_FAILED = "the figures could not be computed (the dashboard's log says why)"


def _store_kind(store: Store) -> str:
    """``"memory"``, ``"redis"``, or the store's class name."""
    name = type(store).__name__
    return {"MemoryStore": "memory", "RedisStore": "redis"}.get(name, name)


def _json(doc: Any, code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(doc, code, headers={**_COMMON_HEADERS, **(headers or {})})


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


class Dashboard:
    """A live status page (and JSON / SSE feeds) for every policy ``store`` knows.

    ``allow_control=True`` lets operators force breakers open, closed or disabled from the
    page; it requires ``token``, which clients send as ``Authorization: Bearer <token>``.
    ``refresh`` is the seconds between two pushes on the event stream, in [0.05, 3600].
    ``clock`` times the snapshots, and so the rates (the store's clock by default).
    ``calls`` is a listener for this process's policies (``listeners=[dashboard.calls]``):
    what they report fills in the figures an in-process store keeps no total of.
    """

    def __init__(
        self,
        store: Store,
        *,
        allow_control: bool = False,
        token: str | None = None,
        refresh: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a resilience Store, not {store!r}")
        if not isinstance(allow_control, bool):
            raise TypeError(f"allow_control must be True or False, not {allow_control!r}")
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token must be a string or None, not {type(token).__name__}")
        if token is not None and not _VISIBLE_ASCII.issuperset(token.strip() or " "):
            # a header carries bytes: a browser sends ISO-8859-1 only, curl the terminal's
            # UTF-8; visible ASCII is the same in every one (the token itself is not shown)
            raise ValueError(
                "token must be a non-empty string of visible ASCII characters (letters, digits, "
                "punctuation: no spaces, no accented or other non-ASCII letters)"
            )
        if allow_control and token is None:
            raise ValueError("allow_control=True requires a token (sent as a Bearer token)")
        if isinstance(refresh, bool) or not isinstance(refresh, int | float):
            raise TypeError(f"refresh must be a number of seconds, not {refresh!r}")
        # compared before any conversion: a huge int (10**400) is out of range, not an error
        if not 0.05 <= refresh <= 3600 or (isinstance(refresh, float) and math.isnan(refresh)):
            raise ValueError(f"refresh must be in [0.05, 3600] seconds, not {refresh!r}")
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(
                f"clock must provide monotonic(), sleep() and call_later(), not {clock!r}"
            )
        self.store = store
        self.clock: Clock = store.clock if clock is None else clock
        self.allow_control = allow_control
        self.refresh = float(refresh)
        self._token = None if token is None else token.strip().encode("ascii")
        self._page = resources.files(__name__).joinpath("index.html").read_text(encoding="utf-8")
        #: a listener for this process's breakers (``listeners=[dashboard.calls]``): their
        #: calls/s, failed/s and latency where the store keeps no running totals of them
        self.calls = CallCounts()
        self._intervals = Intervals(min_gap=min(0.5, self.refresh / 2), calls=self.calls)
        self._cards = Cards(self.calls, min_gap=min(0.5, self.refresh / 2))
        self._latest: tuple[float, int, dict[str, Any]] | None = None
        self._changes = 0  #: changes made through this dashboard (see ``_changed``)
        self._lock = asyncio.Lock()
        self.app = Starlette(
            routes=[
                Route("/", self._index, methods=["GET"]),
                Route("/status", self._status, methods=["GET"]),
                Route("/events", self._events, methods=["GET"]),
                Route("/control/{name:path}", self._control, methods=["POST"]),
                *self._config_routes(),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    def __repr__(self) -> str:
        return (
            f"Dashboard({self.store!r}, allow_control={self.allow_control}, "
            f"refresh={self.refresh:g})"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (WebSockets are refused: the page uses SSE)."""
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)

    # the status document --------------------------------------------------------------------
    async def snapshot(self) -> tuple[int, dict[str, Any]]:
        """The status document and its HTTP status: 200, or 503 when the store failed (or the
        figures could not be computed).

        Viewers share snapshots: one taken less than half a ``refresh`` ago is reused.
        """
        async with self._lock:
            now = self.clock.monotonic()
            if self._latest is not None and now - self._latest[0] < self.refresh / 2:
                return self._latest[1], self._latest[2]
            changes = self._changes
            code, doc = await self._take(now)
            if changes == self._changes:  # else it may not show a change made meanwhile
                self._latest = (now, code, doc)
            return code, doc

    def _changed(self) -> None:
        """A change was made here: the next snapshot is taken afresh, and one on its way
        (which may have read the store before the change) is not reused."""
        self._changes += 1
        self._latest = None

    async def _take(self, now: float) -> tuple[int, dict[str, Any]]:
        store = {"kind": _store_kind(self.store), "degraded": False}
        doc: dict[str, Any] = {"policies": [], "store": store, "control": self.allow_control}
        doc["refresh"] = self.refresh
        doc["reporting"] = REPORTING
        code = 200
        policies: list[PolicyStatus] | None = None
        try:
            policies = await status(self.store)
            shared = _store_kind(self.store) != "memory"
            await self._cards.look(self.store, policies, now)
            listed = [self._policy(p, now, fleet=shared) for p in policies]
            local = self._cards.local_pools(policies)
            doc["policies"] = [*listed, *[self._policy(p, now) for p in local]]
        except Exception as exc:  # a status page reports a failing store; it never crashes
            if isinstance(exc, StoreUnavailableError):
                logger.warning("dashboard: the store cannot answer: %s", _redact(str(exc)))
            elif policies is None:
                logger.error("dashboard: the store failed to report: %s", _redact(repr(exc)))
            else:
                logger.exception("dashboard: the figures could not be computed")
            doc["error"] = _UNAVAILABLE if policies is None else _FAILED
            store["degraded"] = policies is None
            code = 503
        else:
            policies = [*policies, *local]
            self._intervals.forget({(p.kind, p.name) for p in policies})
            self._cards.forget({(p.kind, p.name) for p in policies})
            self.calls.forget({p.name for p in policies})
        store["degraded"] = store["degraded"] or bool(getattr(self.store, "degraded", False))
        doc["time"] = time.time()
        return code, doc

    def _policy(self, policy: PolicyStatus, now: float, fleet: bool = False) -> dict[str, Any]:
        """``policy``'s document; ``fleet``: a shared store lists it."""
        data = policy.to_dict()
        if policy.kind == "circuit_breaker":
            data["rates"], data["percentiles"] = self._intervals.update(policy, now)
        else:
            data["rates"] = data["percentiles"] = None
        data.update(self._cards.figures(policy, now, fleet))
        data["replicas_reporting"] = policy.reporting()
        return data

    # routes ---------------------------------------------------------------------------------
    async def _index(self, request: Request) -> Response:
        base = str(request.scope.get("root_path", "")).rstrip("/") + "/"
        _, doc = await self.snapshot()
        # The first document goes into the page as JSON data (never run as script): "<" is
        # escaped so no name can close the element.
        initial = _dumps(doc).replace("<", "\\u003c")
        body = self._page.replace(_BASE_MARK, escape(base, quote=True), 1)
        body = body.replace(_INITIAL_MARK, initial, 1)
        headers = {**_COMMON_HEADERS, "content-security-policy": _CSP, "x-frame-options": "DENY"}
        return HTMLResponse(body, headers=headers)

    async def _status(self, request: Request) -> Response:
        code, doc = await self.snapshot()
        return _json(doc, code)

    async def _events(self, request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            yield f"retry: {int(max(1.0, self.refresh) * 2000)}\n\n"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _STREAM_SECONDS
            while loop.time() < deadline:
                _, doc = await self.snapshot()
                yield f"data: {_dumps(doc)}\n\n"
                await asyncio.sleep(self.refresh)

        headers = {**_COMMON_HEADERS, "x-accel-buffering": "no"}
        # StreamingResponse stops the stream when the client disconnects.
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def _control(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not self.allow_control:
            return _json({"error": "control is disabled on this dashboard"}, 403)
        if not self._authorized(request):
            return _json({"error": "a valid 'Authorization: Bearer <token>' is needed"}, 403)
        state = None
        body = await _read_body(request)
        if body is not None:
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                data = None
            if isinstance(data, dict) and isinstance(data.get("state"), str):
                state = _CONTROL_STATES.get(data["state"])
        if state is None:
            choices = ", ".join(sorted(_CONTROL_STATES))
            return _json({"error": f'send {{"state": one of {choices}}} as JSON'}, 400)
        if not name:
            return _json({"error": "no breaker named ''"}, 404)
        try:
            await self.store.control(name, state)
        except KeyError:
            return _json({"error": f"no breaker named {name!r}"}, 404)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        except Exception as exc:  # a failing store is a 503 for the operator, never a crash
            logger.warning("dashboard: control of %r failed: %s", name, _redact(repr(exc)))
            return _json({"error": _UNAVAILABLE}, 503)
        self._changed()  # the next snapshot shows the change
        logger.warning("dashboard: breaker %r forced %s", name, state.value)
        return _json({"name": name, "state": state.value})

    # live settings ---------------------------------------------------------------------------
    def _config_routes(self) -> list[Route]:
        return [
            Route("/api/config/{name:path}/rollback", self._config_rollback, methods=["POST"]),
            Route("/api/config/{name:path}", self._config_get, methods=["GET"]),
            Route("/api/config/{name:path}", self._config_set, methods=["POST"]),
        ]

    async def _config_get(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def read() -> dict[str, Any]:
            return config_document(name, await _settings(self.store).config(name))

        return await self._config_call(name, read)

    async def _config_set(self, request: Request) -> Response:
        return await self._config_post(request, self._configure)

    async def _config_rollback(self, request: Request) -> Response:
        return await self._config_post(request, self._rollback)

    async def _config_post(
        self, request: Request, act: Callable[[str, Any], Awaitable[int]]
    ) -> Response:
        """A change behind the token: ``act(name, body)`` gives the new version."""
        name = request.path_params["name"]
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = await _json_body(request)

        async def change() -> dict[str, Any]:
            version = await act(name, body)
            self._cards.reread(name)
            self._changed()  # the next snapshot shows the change
            return {"name": name, "version": version}

        return await self._config_call(name, change)

    async def _configure(self, name: str, body: Any) -> int:
        values = body.get("values") if isinstance(body, dict) else None
        if not isinstance(values, dict) or not values:
            raise ValueError('send {"values": {"setting": value, ...}} as JSON')
        return await _settings(self.store).configure(name, origin=_origin(), **check_keys(values))

    async def _rollback(self, name: str, body: Any) -> int:
        version = body.get("version") if isinstance(body, dict) else None
        return await _settings(self.store).rollback(name, version=version, origin=_origin())

    def _refused(self, request: Request) -> Response | None:
        if not self.allow_control:
            return _json({"error": "control is disabled on this dashboard"}, 403)
        if not self._authorized(request):
            return _json({"error": "a valid 'Authorization: Bearer <token>' is needed"}, 403)
        return None

    async def _config_call(self, name: str, work: Callable[[], Awaitable[Any]]) -> Response:
        """``work``'s document; a bad name, key or value is a 400 with its message."""
        if not isinstance(self.store, ConfigStore):
            return _json({"error": "this store keeps no live settings"}, 404)
        try:
            return _json(await work())
        except (TypeError, ValueError) as exc:
            return _json({"error": str(exc)}, 400)
        except Exception as exc:  # a failing store is a 503 for the operator, never a crash
            logger.warning("dashboard: settings of %r failed: %s", name, _redact(repr(exc)))
            return _json({"error": _UNAVAILABLE}, 503)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"no such page: {request.url.path}"
        elif exc.status_code == 405:
            message = f"use {(exc.headers or {}).get('Allow', 'another method')}"
        else:
            message = str(exc.detail)
        return _json({"error": message}, exc.status_code, dict(exc.headers or {}))

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return False
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # the header as its bytes (Starlette decodes them as ISO-8859-1): any non-ASCII byte
        # differs from the token, which is ASCII
        return hmac.compare_digest(given.strip().encode("latin-1"), self._token)


async def _read_body(request: Request) -> bytes | None:
    """The request body, or ``None`` if it is larger than ``_MAX_BODY``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _settings(store: Store) -> ConfigStore:
    """``store``, which ``_config_call`` found keeps live settings."""
    return cast("ConfigStore", store)


def _origin() -> str:
    """Who changed settings through the dashboard, as the history says it."""
    return f"dashboard on {origin()}"


async def _json_body(request: Request) -> Any:
    """The request's JSON body; ``None`` if absent, too large or not JSON."""
    body = await _read_body(request)
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _redact(text: str) -> str:
    """``text`` without passwords (the command line's rule, one copy of it)."""
    from resilience.ops.cli import redact

    return redact(text)
