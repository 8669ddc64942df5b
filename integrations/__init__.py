"""Adapters that plug resilience into other libraries; each loads its library on import.

* ``resilience.integrations.httpx``: ``ResilientTransport``, for ``httpx.AsyncClient``.
* ``resilience.integrations.asgi``: ``ResilienceMiddleware``, for Starlette, FastAPI and any
  ASGI app.

This package itself imports neither httpx nor any ASGI framework: only the deadline and
criticality helpers both adapters share (standard library only), re-exported here.
"""

from __future__ import annotations

from ._deadline import *  # noqa: F403 - the helpers' own __all__
from ._deadline import __all__ as __all__
