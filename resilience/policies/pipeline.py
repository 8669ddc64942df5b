"""Pipeline: policies applied outermost first, on the public ``Policy`` protocol."""

from __future__ import annotations

from collections.abc import Iterable

from ..clock import Clock
from ..events import Listener
from .base import BasePolicy, Policy, Protected
from .timeout import Timeout

__all__ = ["Pipeline"]


class Pipeline(BasePolicy):
    """Policies applied outermost first: ``Pipeline(a, b, c)`` runs ``a(b(c(fn)))``.

    Nested pipelines are flattened. The recommended order is
    ``Fallback, Retry, CircuitBreaker, RateLimiter, Timeout, Bulkhead``. A ``Timeout`` inside a
    ``Retry`` limits each attempt; one outside limits the whole call, so an attempt timeout
    longer than an overall one is rejected as a mistake. ``listeners`` get one
    ``CallFinished`` per call through the whole pipeline.
    """

    kind = "pipeline"

    def __init__(
        self,
        *policies: Policy,
        name: str = "pipeline",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        flat: list[Policy] = []
        for p in policies:
            if isinstance(p, Pipeline):
                flat.extend(p.policies)
            elif isinstance(p, Policy) and not isinstance(p, type):
                flat.append(p)
            else:
                raise TypeError(f"Pipeline takes policy objects, got {p!r}")
        if not flat:
            raise ValueError("Pipeline needs at least one policy")
        _check_order(flat)
        self.policies: tuple[Policy, ...] = tuple(flat)

    def _wrap(self, fn: Protected) -> Protected:
        for policy in reversed(self.policies):
            fn = policy.wrap(fn)
        return fn

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(map(repr, self.policies))})"


def _check_order(policies: list[Policy]) -> None:
    """Reject an attempt timeout (inside a Retry) longer than an overall one (outside it)."""
    kinds = [p.kind for p in policies]
    if "retry" not in kinds:
        return
    first_retry = kinds.index("retry")
    timeouts = [(i, p) for i, p in enumerate(policies) if isinstance(p, Timeout)]
    outer = [p.seconds for i, p in timeouts if i < first_retry]
    if not outer:
        return
    overall = min(outer)
    for i, p in timeouts:
        if i > first_retry and p.seconds > overall:
            raise ValueError(
                f"the attempt timeout {p!r} ({p.seconds:g}s, inside Retry) is longer than "
                f"the overall timeout ({overall:g}s, outside Retry): it can never expire"
            )
