"""Hedged sending: the attempts of one request run at once, each on its own copy.

The ``Hedge`` policy (``HedgeOptions``) starts another attempt when the first has not
answered in time; the first answer wins and the others are cancelled. Over httpx each
attempt needs a request of its own (it points it at an endpoint and sets its own deadline
header), and with several endpoints the exchange notes where its attempts went, so a hedge
goes to another endpoint (``_endpoints``).
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from resilience import Hedge, Pipeline, Policy

from ._exchange import Exchange, Send

__all__ = ["hedged", "hedged_sender", "own_copy"]


def own_copy(attempt: Send) -> Send:
    """``attempt`` on a copy of the request: hedged attempts run at once, and each points
    its request at an endpoint and sets its own deadline header."""

    async def copied(request: httpx.Request, exchange: Exchange) -> httpx.Response:
        copy = httpx.Request(
            request.method,
            request.url,
            headers=request.headers.copy(),
            stream=request.stream,
            extensions=dict(request.extensions),
        )
        return await attempt(copy, exchange)

    return copied


def hedged(send: Send) -> Send:
    """``send`` for a hedged request: its attempts note the endpoints they go to."""

    async def noting(request: httpx.Request, exchange: Exchange) -> httpx.Response:
        exchange.busy = set()
        return await send(request, exchange)

    return noting


def hedged_sender(
    name: str, outer: Sequence[Policy], hedge: Hedge, inner: Sequence[Policy], attempt: Send
) -> Send:
    """The sender of hedged requests: ``outer`` (the total timeout, the Retry), then the
    Hedge, then the ``inner`` policies, every attempt on its own copy of the request."""
    pipeline = Pipeline(*outer, hedge, *inner, name=name)
    return hedged(pipeline(own_copy(attempt)))
