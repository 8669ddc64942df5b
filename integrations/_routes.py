"""The middleware's compartments: the options of one (the default one, or an override for
some paths), and the policies built from them once, in the recommended order
``RateLimiter -> Timeout -> Bulkhead``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from resilience import (
    AdaptiveLimit,
    Bulkhead,
    Clock,
    FleetShare,
    Listener,
    Pipeline,
    Store,
    shortest_lease,
)
from resilience.checks import check_int, check_mapping, check_seconds

from ._asgi_types import ASGIApp, Receive, Scope, Send
from ._policies import limits as build_limits
from ._shedding import caps

__all__ = ["LEASE", "LEASE_MARGIN", "ROUTE_OPTIONS", "Limits", "Route", "check_pattern", "matches"]

ROUTE_OPTIONS = frozenset(
    {"max_concurrent", "max_waiting", "max_wait", "rate", "per", "burst", "timeout"}
    | {"retry_after"}
)
"""The options an override may set."""

LEASE = 30.0
"""A fleet-wide permit's lease without a ``timeout`` (renewed every half lease while the
request runs; how long a dead replica's permit stays taken)."""
LEASE_MARGIN = 5.0
"""With a ``timeout``, a permit's lease is ``timeout + LEASE_MARGIN`` seconds: it outlives
the longest request it covers without a renewal. Either way it is at least what the store
can renew (``resilience.shortest_lease``: 6 store timeouts)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The options of one compartment (the default one, or one override)."""

    max_concurrent: int | AdaptiveLimit | None
    max_waiting: int
    max_wait: float | None
    rate: float | None
    per: float
    burst: int | None
    timeout: float | None
    retry_after: float

    def check(self, where: str = "", given: Iterable[str] = ROUTE_OPTIONS) -> None:
        """What the policies cannot see: queue options that do nothing without a bulkhead.

        ``given``: the options set here (an override may switch the bulkhead off and leave
        the queue options it inherits unused).
        """
        check_int(f"{where}max_waiting", self.max_waiting, minimum=0)
        check_seconds(f"{where}max_wait", self.max_wait, none=True, zero=True)
        queue = {"max_waiting", "max_wait"} & set(given)
        waiting = self.max_waiting if "max_waiting" in queue else 0
        wait = self.max_wait if "max_wait" in queue else None
        if self.max_concurrent is None and (waiting or wait is not None):
            raise ValueError(
                f"{where}max_waiting={self.max_waiting!r} and {where}max_wait="
                f"{self.max_wait!r} need max_concurrent (there is no queue without a bulkhead)"
            )

    def override(self, path: str, options: object) -> Limits:
        """These limits with an override's ``options`` for ``path``, checked."""
        check_pattern("overrides", path)
        options = check_mapping(f"overrides[{path!r}]", options, ROUTE_OPTIONS)
        where = f"overrides[{path!r}]."
        check_seconds(f"{where}timeout", options.get("timeout"), none=True)
        if "retry_after" in options:
            check_seconds(f"{where}retry_after", options["retry_after"])
        limits = replace(self, **options)
        limits.check(where, options)
        return limits


Protected = Callable[[Scope, Receive, Send, list[BaseException]], Awaitable[None]]


class Route:
    """One compartment's policies around the app, built once.

    ``bulkhead``: its concurrency limit, if any; ``fleet``: this replica's share of the
    fleet's limit (with a store); ``caps``: the most permits of the fleet each class may
    hold; ``protected``: the app under the policies (``None``: no policy).
    """

    __slots__ = ("bulkhead", "caps", "fleet", "protected", "retry_after", "timeout")

    def __init__(
        self,
        app: ASGIApp,
        limits: Limits,
        name: str,
        store: Store | None,
        clock: Clock | None,
        listeners: tuple[Listener, ...],
        shares: Mapping[str, float],
    ) -> None:
        self.timeout = limits.timeout
        self.retry_after = limits.retry_after
        policies = build_limits(
            name,
            rate=limits.rate,
            per=limits.per,
            burst=limits.burst,
            timeout=limits.timeout,
            max_concurrent=limits.max_concurrent,
            max_waiting=limits.max_waiting,
            max_wait=limits.max_wait,
            store=store,
            clock=clock,
            listeners=listeners,
            # fleet-wide with a store; a waiting queue (or an adaptive limit) stays per process
            fleet_bulkhead=not limits.max_waiting,
            lease=_lease(limits.timeout, store),
            quota=True,  # no store round trip per request (shares, tokens taken ahead)
        )
        self.bulkhead: Bulkhead | None = next(
            (p for p in policies if isinstance(p, Bulkhead)), None
        )
        permits = None if self.bulkhead is None else self.bulkhead.permits
        self.fleet = permits if isinstance(permits, FleetShare) else None
        self.caps: dict[str, int] = {} if self.fleet is None else caps(self.fleet, shares)

        async def run_app(
            scope: Scope, receive: Receive, send: Send, raised: list[BaseException]
        ) -> None:
            try:
                await app(scope, receive, send)
            except BaseException as exc:  # noted (and re-raised) so it is never mistaken
                raised.append(exc)  # for a rejection or timeout of ours
                raise

        self.protected: Protected | None = (
            Pipeline(*policies, name=name)(run_app) if policies else None
        )


def _lease(timeout: float | None, store: Store | None) -> float:
    """A fleet-wide permit's lease: longer than the longest request it covers, if bounded,
    and long enough to be renewed on ``store`` (a store with a long ``timeout``)."""
    lease = LEASE if timeout is None else max(LEASE, timeout + LEASE_MARGIN)
    return lease if store is None else max(lease, shortest_lease(store))


def check_pattern(what: str, pattern: object) -> str:
    """A path pattern of ``exclude`` or ``overrides``: a str starting with ``/``."""
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ValueError(f"{what} must hold paths starting with '/', got {pattern!r}")
    return pattern


def matches(pattern: str, path: str) -> bool:
    """``/health`` matches ``/health`` and ``/health/...``; ``/static/`` matches all below it."""
    if pattern.endswith("/"):
        return path.startswith(pattern)
    return path == pattern or path.startswith(pattern + "/")
