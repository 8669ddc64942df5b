"""Several endpoints of one service: a breaker per endpoint, P2C, failover.

``Total timeout -> Retry -> failover``, where failover chooses an endpoint (eligibility,
then P2C: the pure rules of ``_balancing``) and sends through that endpoint's own
``CircuitBreaker -> RateLimiter -> Throttle -> Timeout -> Bulkhead``. Within one attempt a
request that was not sent (a rejection by the endpoint's policies, a connect error) goes on
to another endpoint at once, each endpoint at most once; any other outcome ends the
attempt and is the Retry's to judge.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

import httpx

from resilience import (
    CircuitBreaker,
    CircuitState,
    HealthCheck,
    NoHealthyEndpointError,
    Pipeline,
    RejectedError,
)
from resilience.checks import check_name

from .._deadline import remaining
from ..health import http_url
from ._balancing import HealthSource, Load, eligible, pick
from ._exchange import Exchange, Send, make_attempt
from ._pipelines import Senders, find, inner_policies, origin, origin_of, shared
from ._policy import HttpPolicy, make_health_check, make_retry

__all__ = ["Endpoint", "Service", "make_service"]


def make_service(
    name: str | None,
    endpoints: Sequence[str] | None,
    health: Mapping[str, HealthSource] | None,
    max_ejected: float,
    rng: random.Random | None,
    *,
    policy: object,
    key: object,
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    header: str | None,
    transport: httpx.AsyncBaseTransport,
) -> Service:
    """Validate the several-endpoints options of ``ResilientTransport`` (its ``policy`` and
    ``key`` included) and build the service: an endpoint per base URL, each with its own
    policies and health check."""
    if endpoints is None:
        raise ValueError("service and health need endpoints=[base URL, ...]")
    if name is None:
        raise ValueError("endpoints need a service name: service='orders'")
    name = check_name(name, "service")
    if not isinstance(policy, HttpPolicy):
        raise TypeError("with endpoints, policy must be one HttpPolicy (not a function)")
    if key is not origin_of:
        raise ValueError("key has no use with endpoints: every request goes to the service")
    if (
        isinstance(max_ejected, bool)
        or not isinstance(max_ejected, (int, float))
        or not 0.0 <= max_ejected <= 1.0
    ):
        raise ValueError(f"max_ejected must be a share between 0 and 1, got {max_ejected!r}")
    if rng is None:
        rng = random.Random()
    elif not callable(getattr(rng, "sample", None)):
        raise TypeError(f"rng must be a random.Random or None, got {rng!r}")
    urls = _endpoint_urls(endpoints)
    sources = _health_sources(health, urls)
    attempt = make_attempt(send, frozenset(policy.failure_statuses), header)
    members = []
    for key, url in urls.items():
        member = f"{name}:{key}"
        check = None
        if policy.health_check is not None:
            check = make_health_check(policy.health_check, key, transport, member, shared(policy))
        members.append(Endpoint(url, member, policy, attempt, sources.get(key), check))
    return Service(name, policy, members, float(max_ejected), rng)


def _endpoint_urls(endpoints: object) -> dict[str, httpx.URL]:
    """The endpoints' base URLs by origin: each ``http(s)://host[:port]``, none twice."""
    if isinstance(endpoints, str) or not isinstance(endpoints, Sequence):
        raise TypeError(f"endpoints must be a list of base URLs, got {endpoints!r}")
    if not endpoints:
        raise ValueError("endpoints must not be empty")
    urls: dict[str, httpx.URL] = {}
    for value in endpoints:
        url = _endpoint_url(value)
        key = origin(url)
        if key in urls:
            raise ValueError(f"endpoint {value!r} is given twice (as {key})")
        urls[key] = url
    return urls


def _endpoint_url(value: object) -> httpx.URL:
    """An endpoint's base URL: ``http(s)://host[:port]`` and nothing else."""
    if not isinstance(value, str):
        raise TypeError(f"endpoints must hold base URLs (str), got {value!r}")
    url = http_url(value, "an endpoint")
    if url.path not in ("", "/") or url.query or url.fragment or url.userinfo:
        raise ValueError(
            f"an endpoint is scheme://host[:port] only (no path, query, fragment or "
            f"credentials), got {value!r}"
        )
    return url


def _health_sources(
    health: Mapping[str, HealthSource] | None, urls: dict[str, httpx.URL]
) -> dict[str, HealthSource]:
    """``health=``, by endpoint origin: each key one of the endpoints, each value a source."""
    if health is None:
        return {}
    if not isinstance(health, Mapping):
        raise TypeError(f"health must be a dict {{endpoint: health source}}, got {health!r}")
    sources: dict[str, HealthSource] = {}
    for value, source in health.items():
        key = origin(_endpoint_url(value))
        if key not in urls:
            raise ValueError(f"health names {value!r}, which is not one of the endpoints")
        if "healthy" not in dir(source):
            raise TypeError(
                f"a health source needs a 'healthy' attribute, got {source!r} for {value!r}"
            )
        sources[key] = source
    return sources


def _not_sent(exc: Exception) -> bool:
    """Whether a transport error proves the request never left: no connection was made."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


class Endpoint:
    """One endpoint of a service: its own breaker and limits, its load, its health source."""

    __slots__ = (
        "breaker",
        "check",
        "ejected",
        "health",
        "host",
        "load",
        "name",
        "netloc",
        "pipeline",
        "port",
        "scheme",
    )

    def __init__(
        self,
        url: httpx.URL,
        name: str,
        policy: HttpPolicy,
        attempt: Send,
        health: HealthSource | None,
        check: HealthCheck | None,
    ) -> None:
        self.scheme = url.scheme
        self.host = url.host
        self.port = url.port
        self.netloc = url.netloc.decode("ascii")
        self.name = name
        self.check = check  # the policy's health check of this endpoint, bound to its breaker
        self.health = check if health is None else health
        self.load = Load()
        self.ejected = False  # by its breaker, when last looked at
        inner = inner_policies(policy, name, check)
        self.breaker = find(inner, CircuitBreaker)
        self.pipeline: Send = Pipeline(*inner, name=name)(attempt) if inner else attempt

    def route(self, request: httpx.Request) -> None:
        """Point ``request`` at this endpoint: its scheme, host and port, and its Host header."""
        request.url = request.url.copy_with(scheme=self.scheme, host=self.host, port=self.port)
        request.headers["Host"] = self.netloc

    async def send(self, request: httpx.Request, exchange: Exchange) -> httpx.Response:
        """``request`` through this endpoint's policies, its load measured: in flight while
        it runs, then its latency (a failure's at least ``FAILURE_COST``), or, cancelled, the
        time it ran as a lower bound. A rejection by its policies (not sent) measures
        nothing."""
        load = self.load
        loop = asyncio.get_running_loop()
        load.in_flight += 1
        start = loop.time()
        try:
            response = await self.pipeline(request, exchange)
        except RejectedError:
            raise
        except Exception:
            end = loop.time()
            load.observe(end - start, end, failed=True)
            raise
        except BaseException:  # cancelled: no outcome, but it took at least this long
            end = loop.time()
            load.outlasted(end - start, end)
            raise
        finally:
            load.in_flight -= 1
        end = loop.time()
        load.observe(end - start, end)
        return response

    def tripped(self) -> tuple[bool, float | None]:
        """Whether the breaker rejects calls now, and for how long (``None``: until reset).

        An endpoint coming back from its breaker's ejection has its load forgotten: the
        latency that ejected it says nothing of it now, and a clean slate lets the probe
        through instead of leaving it to fade for tens of seconds.
        """
        breaker = self.breaker
        if breaker is None:
            return False, None
        out, after = False, None
        state = breaker.state
        if state is CircuitState.FORCED_OPEN:
            out = True
        elif state is CircuitState.OPEN:  # past its open time, the next call is a probe
            after = breaker.metrics().retry_after
            out = bool(after)
            if not out:
                after = None
        if self.ejected and not out:
            self.load.forget()
        self.ejected = out
        return out, after

    def unhealthy(self) -> bool:
        """Whether the health source says no (one that raises says no as well)."""
        if self.health is None:
            return False
        try:
            return not self.health.healthy
        except Exception:
            return True


class Service(Senders):
    """The senders of a service with several endpoints: the service's Retry and total
    timeout around one attempt, which chooses an endpoint and fails over (see above)."""

    __slots__ = ("endpoints", "fails_over", "max_ejected", "rng", "started")

    def __init__(
        self,
        name: str,
        policy: HttpPolicy,
        endpoints: list[Endpoint],
        max_ejected: float,
        rng: random.Random,
    ) -> None:
        self.endpoints = endpoints
        self.max_ejected = max_ejected
        self.rng = rng
        self.fails_over = len(endpoints) > 1
        self.started = False  # the endpoints' health checks run (from the first request on)
        retry = make_retry(policy.retry, name, shared(policy))
        super().__init__(name, policy, retry, [], self._attempt)

    def checks(self) -> list[HealthCheck]:
        """The endpoints' health checks."""
        return [e.check for e in self.endpoints if e.check is not None]

    def start(self) -> None:
        """Start the endpoints' health checks (on the first request: a running loop)."""
        self.started = True
        for check in self.checks():
            check.start()

    async def _attempt(self, request: httpx.Request, exchange: Exchange) -> httpx.Response:
        """One attempt: to the endpoint chosen now, then on to another while not sent."""
        tried: list[int] = []
        waits: list[float] = []  # the rejections' retry_after hints
        unsent: Exception | None = None  # the last connect error of this attempt
        while True:
            index, soonest, out = self._next(tried, exchange.busy)
            if index is None:
                break
            tried.append(index)
            endpoint = self.endpoints[index]
            endpoint.route(request)
            if exchange.busy is not None:
                exchange.busy.add(index)
            try:
                return await endpoint.send(request, exchange)
            except RejectedError as rejected:  # by the endpoint's own policies: not sent
                if rejected.retry_after is not None:
                    waits.append(rejected.retry_after)
            except Exception as exc:
                if not _not_sent(exc) or not await self._may_fail_over():
                    raise
                unsent = exc
        if unsent is not None:
            raise unsent
        if soonest is not None:
            waits.append(soonest)
        raise NoHealthyEndpointError(self.name, min(waits, default=None), out)

    def _next(
        self, tried: list[int], busy: set[int] | None
    ) -> tuple[int | None, float | None, int]:
        """The endpoint to try next (or ``None``), the soonest probe time, how many are out.

        A hedge goes to an endpoint none of the request's other attempts is on, when there
        is one.
        """
        now = asyncio.get_running_loop().time()
        if busy:
            choice = self._choose([*tried, *busy], now)
            if choice[0] is not None:
                return choice
        return self._choose(tried, now)

    def _choose(self, tried: list[int], now: float) -> tuple[int | None, float | None, int]:
        """An endpoint not yet ``tried`` (or ``None``), the soonest probe time, how many are out.

        An endpoint tried already in this attempt counts as ejected.
        """
        tripped: list[bool] = []
        unhealthy: list[bool] = []
        scores: list[float] = []
        soonest: float | None = None
        for i, endpoint in enumerate(self.endpoints):
            out, after = endpoint.tripped()
            if after is not None and (soonest is None or after < soonest):
                soonest = after
            tripped.append(out or i in tried)
            unhealthy.append(endpoint.unhealthy())
            scores.append(endpoint.load.score(now))
        candidates = eligible(tripped, unhealthy, scores, self.max_ejected)
        if not candidates:
            return None, soonest, len(tripped)
        return pick(candidates, scores, self.rng), soonest, 0

    async def _may_fail_over(self) -> bool:
        """After a connect error: whether the deadline and the retry budget allow another try."""
        left = remaining()
        if left is not None and left <= 0:
            return False
        budget = self.policy.retry.budget
        return budget is None or await budget.allow_retry()
