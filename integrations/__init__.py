"""Adapters that plug resilience into other libraries; each loads its library on import.

* ``resilience.integrations.httpx``: ``ResilientTransport``, for ``httpx.AsyncClient``.
* ``resilience.integrations.asgi``: ``ResilienceMiddleware``, for Starlette, FastAPI and any
  ASGI app.

This package itself imports neither httpx nor any ASGI framework: only the deadline helpers
both adapters share (standard library only).
"""

from __future__ import annotations

from ._deadline import DEADLINE_HEADER, deadline, get_deadline, remaining

__all__ = ["DEADLINE_HEADER", "deadline", "get_deadline", "remaining"]
