"""One request on its way through its pipeline, and the attempt that sends it.

The attempt is the boundary with the wrapped transport: what that raises is translated
there, once, and a failing status becomes an exception the policies see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx

from resilience import Clock, RetryCallState

from .._deadline import CRITICALITY_HEADER, format_budget, get_criticality, get_deadline
from ._errors import DeadlineExceeded, FailedResponse, transport_error

__all__ = ["Exchange", "Send", "close_discarded", "make_attempt", "replayable"]


class Exchange:
    """One request on its way through its pipeline (every attempt gets it, hedges included).

    ``responses``: what the wrapped transport answered it so far. All but the response the
    request returns are closed: before a retry's backoff (``close_discarded``), when the
    request ends (``end``), and at once for one arriving after that (a hedge's loser), so
    whichever way a request ends, no connection stays held.

    The request's deadline, for the attempt to tell a cut by the deadline from a
    cancellation: ``due`` on ``clock`` when it is our own ``total_timeout`` (enforced by the
    pipeline's outer ``Timeout``), else the loop-time deadline in ``_deadline``. ``cut``:
    an attempt was cut by it. ``cancelling``: the task's cancellation count when it began.
    ``busy``: with hedging, the endpoints its attempts went to.
    """

    __slots__ = (
        "busy",
        "cancelling",
        "clock",
        "cut",
        "due",
        "name",
        "over",
        "responses",
        "seconds",
        "task",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.responses: list[httpx.Response] = []
        self.over = False  # the request has ended: a late answer is a loser's
        self.busy: set[int] | None = None
        self.due: float | None = None
        self.clock: Clock | None = None
        self.seconds = 0.0  # the request's budget, for DeadlineExceeded
        self.cut = False
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.cancelling = task.cancelling()

    async def close(self, kept: httpx.Response | None = None) -> None:
        """Close every response kept so far but ``kept``."""
        responses, self.responses = self.responses, []
        for response in responses:
            if response is not kept:
                await response.aclose()

    async def end(self, returned: httpx.Response | None) -> None:
        """The request returns ``returned`` (or nothing): close all the others."""
        self.over = True
        await self.close(returned)

    def past_deadline(self, at: float | None) -> bool:
        """Whether the request's deadline (``at`` on the loop's clock) has passed."""
        if at is not None and asyncio.get_running_loop().time() >= at:
            return True
        return (
            self.due is not None and self.clock is not None and self.clock.monotonic() >= self.due
        )

    def cancelled(self) -> bool:
        """Whether a cancellation other than the deadline's own is pending on the request."""
        return self.task.cancelling() > self.cancelling


Send = Callable[[httpx.Request, Exchange], Awaitable[httpx.Response]]
"""What every stage of a pipeline is: send a request as part of its exchange."""


async def close_discarded(state: RetryCallState) -> None:
    """Retry's ``before_sleep``: close the responses a retry is about to throw away.

    Retry calls it only once it has decided to call again, so this is exactly when every
    response the request got so far is known to be discarded; closing them then frees their
    connections during the wait. The attempt's second argument is the request's ``Exchange``.
    """
    exchange: Exchange = state.args[1]
    await exchange.close()


def make_attempt(
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    statuses: frozenset[int],
    header: str | None,
) -> Send:
    """One try: send; keep the response for the request's ``Exchange`` and turn a failing
    status into an exception the policies see.

    The boundary with the wrapped transport: what it raises that is not an httpx error is
    translated here, once (``transport_error``), so the breaker counts it and
    ``except httpx.HTTPError`` catches it. An attempt cancelled once the request's deadline
    has passed was cut by it: it raises ``DeadlineExceeded``, a failure for the breaker
    below which it ran (a cancellation that is not the deadline's still wins at the
    transport's boundary).
    """

    async def attempt(request: httpx.Request, exchange: Exchange) -> httpx.Response:
        at = get_deadline()
        if header is not None and at is not None:
            request.headers[header] = format_budget(at - asyncio.get_running_loop().time())
        level = get_criticality()  # the request being served: its class goes downstream
        if level is not None and CRITICALITY_HEADER not in request.headers:
            request.headers[CRITICALITY_HEADER] = level
        try:
            response = await send(request)
        except asyncio.CancelledError:
            if not exchange.past_deadline(at):
                raise
            exchange.cut = True
            raise DeadlineExceeded(exchange.name, exchange.seconds, request=request) from None
        except httpx.HTTPError:
            raise
        except Exception as exc:
            error = transport_error(exc, request)
            if error.__traceback__ is None:  # made here: the foreign error is its cause
                raise error from exc
            raise error from error.__cause__  # an httpx error a task group wrapped, as it was
        if exchange.over:  # a hedge's loser, answered after the request ended
            await response.aclose()
        else:
            exchange.responses.append(response)
        if response.status_code in statuses:
            raise FailedResponse(response)
        return response

    return attempt


def replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again: bytes in memory, not a one-shot stream."""
    return isinstance(request.stream, httpx.ByteStream) or hasattr(request, "_content")
