"""The policies both adapters put around a request, built in one place.

``ResilientTransport`` (client side) and ``ResilienceMiddleware`` (server side) protect a
request with the same inner policies, in the recommended order
``RateLimiter -> Timeout -> Bulkhead``; only the bulkhead's reach differs (the middleware may
make it fleet-wide). Each adapter validates its own options; the policies validate theirs.
"""

from __future__ import annotations

from resilience import (
    AdaptiveLimit,
    Bulkhead,
    Clock,
    Listener,
    Policy,
    RateLimiter,
    Store,
    Timeout,
)

AHEAD = 0.05
"""Seconds ahead a fleet-wide rate limiter takes tokens for, with ``quota``
(``RateLimiter(ahead=...)``, at most its ``per``): a replica asks the store about once per
batch of tokens, and spends each within 50 ms of the fleet's bucket counting it, so the
fleet admits at most ``rate * 0.05`` more than its rate over any period."""


def limits(
    name: str,
    *,
    rate: float | None,
    per: float,
    burst: int | None,
    timeout: float | None,
    max_concurrent: int | AdaptiveLimit | None,
    max_waiting: int,
    max_wait: float | None,
    store: Store | None,
    clock: Clock | None,
    listeners: tuple[Listener, ...],
    fleet_bulkhead: bool = False,
    lease: float = 30.0,
    quota: bool = False,
) -> list[Policy]:
    """The rate limiter, timeout and bulkhead asked for, outermost first.

    The rate limiter shares its bucket through ``store`` (when given); the bulkhead is
    fleet-wide through ``store`` only with ``fleet_bulkhead`` (its permits leased for
    ``lease`` seconds), else it limits this process. ``quota``: no store call per call (the
    limiter takes tokens ahead, the fleet-wide bulkhead holds a share of the permits).
    ``max_concurrent`` may be an ``AdaptiveLimit``: that bulkhead adapts on this process's
    own latency, so it is never fleet-wide.
    """
    policies: list[Policy] = []
    if rate is not None:
        policies.append(
            RateLimiter(
                rate,
                per=per,
                burst=burst,
                store=store,
                ahead=min(AHEAD, per) if quota and store is not None else 0.0,
                name=name,
                clock=clock,
                listeners=listeners,
            )
        )
    if timeout is not None:
        policies.append(Timeout(timeout, name=name, clock=clock, listeners=listeners))
    if isinstance(max_concurrent, AdaptiveLimit):
        policies.append(
            Bulkhead(
                limit=max_concurrent,
                max_waiting=max_waiting,
                max_wait=max_wait,
                name=name,
                clock=clock,
                listeners=listeners,
            )
        )
    elif max_concurrent is not None:
        fleet = fleet_bulkhead and store is not None
        policies.append(
            Bulkhead(
                max_concurrent,
                max_waiting=max_waiting,
                max_wait=max_wait,
                distributed=fleet,
                store=store if fleet else None,
                lease=lease,
                shares=fleet and quota,
                name=name,
                clock=clock,
                listeners=listeners,
            )
        )
    return policies
