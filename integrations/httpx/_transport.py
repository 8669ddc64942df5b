"""``ResilientTransport``: every request through its origin's pipeline.

As an httpx transport that wraps another (``docs/advanced/transports.md`` in httpx), it is
one method, ``handle_async_request``, in a few named steps: find the request's pipeline
(``Origins``, or the ``Service`` of several endpoints), choose its sender (once, retrying or
hedged), send it within the request's deadline, and translate what comes back once: core
errors to their httpx flavour, a failing last response or an error to the fallback's
answer. Whichever way the request ends, every response it does not return is closed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import httpx

from resilience import ResilienceTimeoutError
from resilience.checks import check_int, check_mapping, check_seconds

from .._deadline import (
    DEADLINE_HEADER,
    DeadlineCell,
    _deadline,
    check_deadline_header,
    deadline,
    get_deadline,
)
from ._balancing import HealthSource
from ._endpoints import Service, make_service
from ._errors import DeadlineExceeded, FailedResponse, translate
from ._exchange import Exchange, Send
from ._pipelines import Origins, Senders, origin_of
from ._policy import HttpPolicy

__all__ = ["ResilientTransport"]

_SYNC_CLIENT = (
    "ResilientTransport is an async transport: use it with httpx.AsyncClient("
    "transport=ResilientTransport(...)), not httpx.Client"
)
_EXTENSION = "resilience"
_EXTENSION_KEYS = frozenset({"retry", "deadline"})


class ResilientTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that runs every request through a resilience pipeline.

    ``transport`` is the transport actually sending (default ``httpx.AsyncHTTPTransport()``).
    ``policy`` is an ``HttpPolicy`` used for every origin, or a function ``(key) -> HttpPolicy``
    called once per key. ``key(request)`` names the pipeline (and its breaker) a request uses:
    by default its origin, such as ``https://api.example.com:443``. ``deadline_header`` is sent
    with the remaining budget whenever a deadline is set (``None``: never send it).

    At most ``max_origins`` pipelines are kept, the least recently used forgotten first; an
    origin whose breaker is open or half-open, or with requests in flight, is never forgotten
    (so the bound may be passed while more origins than that are failing at once).

    Per request, ``extensions={"resilience": {...}}`` accepts ``"retry"`` (``False``: one
    attempt; ``True``: retry even a method outside ``RetryOptions.methods``) and
    ``"deadline"`` (seconds this request may take in all, retries and waits included).

    Several endpoints of one service: ``service="orders", endpoints=["http://10.0.0.1:8000",
    ...]`` sends every request to one of them (its scheme, host, port and ``Host`` header
    replaced by the endpoint's). Each endpoint has its own breaker and limits, named
    ``<service>:<endpoint origin>``; the retry and ``total_timeout`` are the service's. An
    endpoint is ejected while its breaker is open or its ``health[endpoint].healthy`` is
    false, but health sources keep at most ``max_ejected`` of the endpoints out (at least
    one when it is above 0, as Envoy does); of the others two are drawn at random (``rng``)
    and the less loaded one is used (P2C). A request not sent (a connect error, a rejection
    by the endpoint's policies) goes on to another endpoint at once, whatever its method,
    within the deadline and the retry budget. When every endpoint is ejected:
    ``NoHealthyEndpoint``. See ``docs/httpx.md``.

    Whatever the wrapped transport raises leaves as an ``httpx.HTTPError``: its own errors
    as they are, any other (an ``ExceptionGroup`` from a task group, an ``OSError``) as an
    ``httpx.TransportError`` naming it, its cause the original. ``aclose()`` stops the
    health checks and closes the wrapped transport.

    Only for ``httpx.AsyncClient``: ``httpx.Client`` needs a sync transport.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        policy: HttpPolicy | Callable[[str], HttpPolicy] | None = None,
        key: Callable[[httpx.Request], str] = origin_of,
        deadline_header: str | None = DEADLINE_HEADER,
        max_origins: int = 1024,
        service: str | None = None,
        endpoints: Sequence[str] | None = None,
        health: Mapping[str, HealthSource] | None = None,
        max_ejected: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if transport is None:
            transport = httpx.AsyncHTTPTransport()
        elif not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(f"transport must be an httpx.AsyncBaseTransport, got {transport!r}")
        if policy is None:
            policy = HttpPolicy()
        elif not isinstance(policy, HttpPolicy) and not callable(policy):
            raise TypeError(
                f"policy must be an HttpPolicy or a function (key) -> HttpPolicy, got {policy!r}"
            )
        if not callable(key):
            raise TypeError(f"key must be a function (request) -> str, got {key!r}")
        self.transport = transport
        self.policy = policy
        self.key = key
        self.deadline_header = check_deadline_header(deadline_header)
        self.max_origins = check_int("max_origins", max_origins)
        send = transport.handle_async_request
        self._origins = Origins(policy, send, self.deadline_header, transport, self.max_origins)
        self._service: Service | None = None
        if endpoints is not None or service is not None or health is not None:
            self._service = make_service(
                service,
                endpoints,
                health,
                max_ejected,
                rng,
                policy=policy,
                key=key,
                send=send,
                header=self.deadline_header,
                transport=transport,
            )

    def __repr__(self) -> str:
        return f"ResilientTransport({self.transport!r})"

    def pipeline_names(self) -> list[str]:
        """The keys (origins) that have a pipeline now, sorted; with endpoints, theirs."""
        if self._service is not None:
            return sorted(endpoint.name for endpoint in self._service.endpoints)
        return sorted(self._origins)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through its pipeline; see the class docstring."""
        senders, key = self._known(request)
        if senders is None:
            senders = await self._origins.add(key, request)
        overrides = request.extensions.get(_EXTENSION)
        retry, budget = (None, None) if overrides is None else _overrides(overrides)
        send = senders.sender(request, retry)
        exchange = Exchange(senders.name)
        response: httpx.Response | None = None
        try:
            response = await _within_deadline(senders, send, request, exchange, budget)
        except FailedResponse as failed:  # attempts ran out on a failing status
            response = await _last_response(failed.response, senders.policy, request, senders.name)
        except Exception as exc:
            response = await _on_error(exc, senders, request, exchange)
        finally:
            await exchange.end(response)  # every other response the request got is closed
        return response

    def _known(self, request: httpx.Request) -> tuple[Senders | None, str]:
        """The key of ``request`` and its pipeline, ``None`` until the key's first request
        (the service's pipeline starts its health checks with the first request)."""
        service = self._service
        if service is None:
            key = self.key(request)
            return self._origins.get(key), key
        if not service.started:
            service.start()
        return service, service.name

    def handle_request(self, request: httpx.Request) -> NoReturn:
        """Refuse a sync ``httpx.Client``: this transport is async-only."""
        raise TypeError(_SYNC_CLIENT)

    def __enter__(self) -> NoReturn:
        """Refuse ``with httpx.Client(transport=ResilientTransport())``: async-only."""
        raise TypeError(_SYNC_CLIENT)

    def close(self) -> None:
        """Nothing to close synchronously (a sync ``httpx.Client`` cannot use this transport)."""

    async def aclose(self) -> None:
        """Stop the health checks, close the wrapped transport."""
        senders: list[Senders] = list(self._origins.values())
        if self._service is not None:
            senders.append(self._service)
        for pipeline in senders:
            for check in pipeline.checks():
                await check.aclose()
        await self.transport.aclose()


def _overrides(value: object) -> tuple[bool | None, float | None]:
    """``request.extensions["resilience"]``, validated: ``(retry, deadline)``."""
    value = check_mapping('extensions["resilience"]', value, _EXTENSION_KEYS)
    retry = value.get("retry")
    if retry is not None and not isinstance(retry, bool):
        raise TypeError(f'extensions["resilience"]["retry"] must be a bool, got {retry!r}')
    budget = check_seconds(
        'extensions["resilience"]["deadline"]', value.get("deadline"), none=True, zero=True
    )
    return retry, budget


async def _within_deadline(
    senders: Senders, send: Send, request: httpx.Request, exchange: Exchange, budget: float | None
) -> httpx.Response:
    """``send`` under the request's deadline: the request's own ``budget``, else the sooner
    of a deadline set around the request and the policy's ``total_timeout``."""
    if budget is not None:
        with deadline(budget) as at:
            return await _guarded(send, request, exchange, at)
    total = senders.policy.total_timeout
    outer = get_deadline()
    if total is not None:
        at = asyncio.get_running_loop().time() + total
        if outer is None or outer > at:
            # our total_timeout is the deadline: the pipeline's outer Timeout enforces it (on
            # the policy's clock); the context variable says it to the retry's stop rule, to
            # the attempts and to the upstream
            clock = exchange.clock = senders.clock
            exchange.due = clock.monotonic() + total
            exchange.seconds = total
            token = _deadline.set(DeadlineCell(at))
            try:
                return await send(request, exchange)
            finally:
                _deadline.reset(token)
    if outer is None:
        return await send(request, exchange)
    return await _guarded(send, request, exchange, outer)


async def _last_response(
    response: httpx.Response, policy: HttpPolicy, request: httpx.Request, name: str
) -> httpx.Response:
    """The last response (a failing status), as httpx would return it, unless the fallback
    answers failures: it is then handed an ``httpx.HTTPStatusError`` (the response closed)."""
    fallback = policy.fallback
    if fallback is None or fallback.on == "rejections":
        return response
    failure = httpx.HTTPStatusError(
        f"{response.status_code} from {name}", request=request, response=response
    )
    await response.aclose()
    return await fallback.handler(request, failure)


async def _on_error(
    exc: Exception, senders: Senders, request: httpx.Request, exchange: Exchange
) -> httpx.Response:
    """The fallback's answer to ``exc``, or ``exc`` raised as the transport raises it: a core
    error as its httpx flavour (translated here, once), the expiry of the total timeout as
    ``DeadlineExceeded``, anything else unchanged."""
    if exchange.cut and exchange.cancelled():
        # the deadline cut an attempt as the caller was cancelling the request too: the
        # cancellation goes on (the cut attempt was counted all the same)
        raise asyncio.CancelledError from exc
    if isinstance(exc, ResilienceTimeoutError) and exc.name == senders.total:
        error: Exception = DeadlineExceeded(exchange.name, exc.seconds, request=request)
    else:
        error = translate(exc, request)
    fallback = senders.policy.fallback
    if fallback is not None and fallback.covers(error):
        return await fallback.handler(request, error)
    if error is exc:
        raise exc
    raise error from exc


async def _guarded(
    send: Send, request: httpx.Request, exchange: Exchange, at: float
) -> httpx.Response:
    """``send`` under the deadline ``at``: fail at once if it is spent, else cap it."""
    left = exchange.seconds = at - asyncio.get_running_loop().time()
    if left <= 0:
        raise DeadlineExceeded(exchange.name, max(left, 0.0), request=request)
    try:
        async with asyncio.timeout_at(at) as scope:
            return await send(request, exchange)
    except TimeoutError:
        if scope.expired():
            raise DeadlineExceeded(exchange.name, left, request=request) from None
        raise
