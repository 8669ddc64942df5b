"""Each origin's pipeline, built from its ``HttpPolicy``, and the bounded map of them.

A pipeline is the policy's strategies around the attempt, in the recommended order::

    total timeout -> Retry -> [Hedge ->] CircuitBreaker -> RateLimiter -> Throttle -> Timeout
    -> Bulkhead -> attempt

made into three senders (``Senders``): once, retrying and hedged; the transport picks one per
request. ``Origins`` keeps one pipeline per origin, the least recently used forgotten first.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitState,
    Clock,
    HealthCheck,
    Pipeline,
    Policy,
    Retry,
    SystemClock,
    TimedOut,
    Timeout,
    select,
)

from ._exchange import Send, make_attempt, replayable
from ._hedging import hedged_sender
from ._policy import (
    IDEMPOTENT_METHODS,
    HttpPolicy,
    Shared,
    make_breaker,
    make_bulkhead,
    make_health_check,
    make_hedge,
    make_rate_limiter,
    make_retry,
    make_throttle,
    make_timeout,
)

__all__ = ["Origin", "Origins", "Senders", "find", "inner_policies", "origin_of", "shared"]

P = TypeVar("P", bound=Policy)

EVICTION_SCAN = 16
"""Origins looked at per eviction, oldest first."""

_KEPT = frozenset({CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.FORCED_OPEN})


def origin_of(request: httpx.Request) -> str:
    """The default pipeline key: ``scheme://host:port`` with the port always spelled out."""
    return origin(request.url)


def origin(url: httpx.URL) -> str:
    """``url``'s origin, ``scheme://host:port``, the port always spelled out."""
    port = url.port
    if port is None:
        port = 443 if url.scheme == "https" else 80
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{port}"


def shared(policy: HttpPolicy) -> Shared:
    """What every policy of ``policy``'s pipelines is given."""
    return Shared(policy.store, policy.clock, policy.listeners)


def inner_policies(
    policy: HttpPolicy, name: str, health: HealthCheck | None = None
) -> list[Policy]:
    """The policies inside the Retry, outermost first: breaker (bound to ``health``), rate
    limiter, throttle, the attempt's timeout, bulkhead; those the policy asks for."""
    common = shared(policy)
    made = [
        None if policy.breaker is None else make_breaker(policy.breaker, name, common, health),
        None if policy.rate_limit is None else make_rate_limiter(policy.rate_limit, name, common),
        None if policy.throttle is None else make_throttle(policy.throttle, name, common),
        None if policy.timeout is None else make_timeout(policy.timeout, name, common),
        None if policy.bulkhead is None else make_bulkhead(policy.bulkhead, name, common),
    ]
    return [p for p in made if p is not None]


def find(policies: list[Policy], kind: type[P]) -> P | None:
    """The first of ``policies`` of type ``kind``, or ``None``."""
    return next((p for p in policies if isinstance(p, kind)), None)


class Senders:
    """The protected senders of one pipeline: once, retrying and (with hedging) hedged.

    With a ``total_timeout``, each starts with a ``Timeout`` of that many seconds, outside the
    retry (the overall deadline of DESIGN's composition): one timer per policy, not one per
    request. Its expiry is reported as ``DeadlineExceeded``.
    """

    __slots__ = ("clock", "hedged", "name", "once", "policy", "retrying", "total")

    fails_over = False  # whether one attempt may go to more than one endpoint

    def __init__(
        self, name: str, policy: HttpPolicy, retry: Retry | None, inner: list[Policy], attempt: Send
    ) -> None:
        self.name = name
        self.policy = policy
        self.clock: Clock = SystemClock() if policy.clock is None else policy.clock
        outer: list[Policy] = []
        self.total: str | None = None  # the name of the total timeout
        if policy.total_timeout is not None:
            self.total = f"{name} (total_timeout)"
            timeout = Timeout(
                policy.total_timeout,
                name=self.total,
                clock=self.clock,
                # its expiry only: a CallFinished per request would repeat the retry's
                listeners=[select(listener, events=(TimedOut,)) for listener in policy.listeners],
            )
            outer.append(timeout)
        chain = [*outer, *inner]
        self.once: Send = Pipeline(*chain, name=name)(attempt) if chain else attempt
        self.retrying: Send | None = None
        if retry is not None:
            self.retrying = Pipeline(*outer, retry, *inner, name=name)(attempt)
        self.hedged: Send | None = None  # idempotent requests, when hedging is asked for
        if policy.hedge is not None:
            hedge = make_hedge(policy.hedge, name, shared(policy))
            retrying = [] if retry is None else [retry]
            self.hedged = hedged_sender(name, [*outer, *retrying], hedge, inner, attempt)

    def sender(self, request: httpx.Request, retry: bool | None) -> Send:
        """The sender for ``request`` (``retry``: the per-request override).

        The one place the idempotency key is set: a request of a non-idempotent method that
        the chosen sender may send more than once (retried, hedged, failed over to another
        endpoint) gets it here, before its first attempt, so every attempt carries the same
        key and the server can tell the copies of one request apart from new requests.
        """
        policy = self.policy
        send = self.once
        if retry is not False and replayable(request):
            idempotent = request.method in policy.retry.methods
            if self.hedged is not None and idempotent:
                send = self.hedged
            elif self.retrying is not None and (retry or idempotent):
                send = self.retrying
        header = policy.idempotency_header
        if (
            header is not None
            and (send is not self.once or self.fails_over)
            and request.method not in IDEMPOTENT_METHODS
            and header not in request.headers
        ):
            request.headers[header] = str(uuid.uuid4())
        return send

    def checks(self) -> list[HealthCheck]:
        """The health checks of this pipeline's origins (started, or to start)."""
        return []


class Origin(Senders):
    """The senders of one origin, its health check, and whether it may be forgotten."""

    __slots__ = ("breaker", "bulkhead", "health")

    def __init__(
        self, name: str, policy: HttpPolicy, attempt: Send, health: HealthCheck | None
    ) -> None:
        inner = inner_policies(policy, name, health)
        self.health = health
        self.breaker = find(inner, CircuitBreaker)
        self.bulkhead = find(inner, Bulkhead)
        retry = make_retry(policy.retry, name, shared(policy))
        super().__init__(name, policy, retry, inner, attempt)

    def evictable(self) -> bool:
        """Whether forgetting this pipeline loses nothing: no open breaker, nothing in flight."""
        breaker, bulkhead = self.breaker, self.bulkhead
        if breaker is not None and breaker.state in _KEPT:
            return False
        return bulkhead is None or (bulkhead.in_flight == 0 and bulkhead.waiting == 0)

    def checks(self) -> list[HealthCheck]:
        """This origin's health check, if it has one."""
        return [] if self.health is None else [self.health]


class Origins:
    """One pipeline per key (an origin), made for the key's first request, at most ``limit``.

    Past ``limit`` the least recently used pipeline that loses nothing by it is forgotten (its
    health check stopped); one whose breaker is open or half-open, or with requests in
    flight, is kept, so the bound may be passed while more origins than that are failing.
    """

    __slots__ = ("_header", "_pipelines", "_policy", "_send", "_transport", "limit")

    def __init__(
        self,
        policy: HttpPolicy | Callable[[str], HttpPolicy],
        send: Callable[[httpx.Request], Awaitable[httpx.Response]],
        header: str | None,
        transport: httpx.AsyncBaseTransport,
        limit: int,
    ) -> None:
        self._policy = policy
        self._send = send
        self._header = header
        self._transport = transport
        self.limit = limit
        self._pipelines: OrderedDict[str, Origin] = OrderedDict()

    def __getitem__(self, key: str) -> Origin:
        return self._pipelines[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pipelines)

    def __len__(self) -> int:
        return len(self._pipelines)

    def values(self) -> list[Origin]:
        """The pipelines kept now, the least recently used first."""
        return list(self._pipelines.values())

    def get(self, key: str) -> Origin | None:
        """The pipeline of ``key``, now the most recently used, or ``None``."""
        pipeline = self._pipelines.get(key)
        if pipeline is not None:
            self._pipelines.move_to_end(key)
        return pipeline

    async def add(self, key: str, request: httpx.Request) -> Origin:
        """A pipeline for ``key``, made for its first ``request`` (its health check, when the
        policy asks for one, checks that request's origin and starts now)."""
        pipelines = self._pipelines
        policy = self._policy_of(key)
        if len(pipelines) >= self.limit:
            await self._evict()
        check = None
        if policy.health_check is not None:
            url = origin(request.url)
            check = make_health_check(
                policy.health_check, url, self._transport, key, shared(policy)
            )
        attempt = make_attempt(self._send, frozenset(policy.failure_statuses), self._header)
        pipeline = pipelines[key] = Origin(key, policy, attempt, check)
        if check is not None:
            check.start()
        return pipeline

    def _policy_of(self, key: str) -> HttpPolicy:
        """The policy for ``key``: the one policy, or what the policy function gives."""
        policy = self._policy
        if isinstance(policy, HttpPolicy):
            return policy
        made = policy(key)
        if not isinstance(made, HttpPolicy):
            raise TypeError(f"the policy function returned {made!r}, not an HttpPolicy")
        return made

    async def _evict(self) -> None:
        """Forget the least recently used pipeline that loses nothing by it.

        Looks at a few of the oldest only (constant work per new origin); those kept for an
        open breaker or requests in flight move to the recent end.
        """
        pipelines = self._pipelines
        for _ in range(min(EVICTION_SCAN, len(pipelines))):
            key, oldest = next(iter(pipelines.items()))
            if oldest.evictable():
                del pipelines[key]
                for check in oldest.checks():
                    await check.aclose()
                return
            pipelines.move_to_end(key)
