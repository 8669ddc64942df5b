"""A user predicate that raises ends the call with its error and leaks no slot, permit or token.

The breaker's own predicates are covered with the breaker; these are the other policies':
Retry's ``on`` and ``retry_if_result``, Fallback's ``on`` and ``result_if``, around bulkheads
(local and fleet-wide) and rate limiters.
"""

from __future__ import annotations

import pytest

from resilience import (
    Bulkhead,
    Fallback,
    MemoryStore,
    Pipeline,
    RateLimiter,
    Retry,
    RetryBudget,
)
from resilience.testing import FakeClock

from ..helpers import ok


class PredicateBroke(Exception):
    """Raised by the predicates below."""


def broken(value: object) -> bool:
    raise PredicateBroke(repr(value))


async def fails() -> None:
    raise ValueError("upstream")


async def test_retry_on_that_raises_frees_the_bulkhead_slots(clock: FakeClock) -> None:
    """Retry(on=<raises>) around a local and a fleet-wide bulkhead: every slot comes back."""
    store = MemoryStore(clock=clock)
    local = Bulkhead(1, clock=clock)
    fleet = Bulkhead(1, distributed=True, store=store, name="pool", clock=clock)
    stack = Pipeline(Retry(on=broken, clock=clock), local, fleet)
    with pytest.raises(PredicateBroke):
        await stack.call(fails)
    assert local.in_flight == 0
    assert await store.count_leases("pool") == 0
    assert await stack.call(ok) == "ok"


async def test_retry_predicates_that_raise_leave_the_budget_alone(clock: FakeClock) -> None:
    """A raising ``on`` or ``retry_if_result`` counts as nothing in the retry budget."""
    budget = RetryBudget(name="b", max_tokens=10, token_ratio=1)
    budget.record_failure()  # 9 tokens: a success would show as 10
    on = Retry(on=broken, budget=budget, clock=clock)
    with pytest.raises(PredicateBroke):
        await on.call(fails)
    result = Retry(on=ValueError, retry_if_result=broken, budget=budget, clock=clock)
    with pytest.raises(PredicateBroke):
        await result.call(ok)
    assert budget.tokens == 9


async def test_retry_predicate_raising_on_a_later_attempt() -> None:
    """The predicate raising on the second failure ends the call; the slot is free."""
    looks: list[Exception] = []

    def second_look_breaks(exc: Exception) -> bool:
        looks.append(exc)
        if len(looks) > 1:
            raise PredicateBroke("second look")
        return True

    clock = FakeClock(autojump=True)
    bulkhead = Bulkhead(1, clock=clock)
    stack = Pipeline(Retry(on=second_look_breaks, clock=clock), bulkhead)
    with pytest.raises(PredicateBroke):
        await stack.call(fails)
    assert len(looks) == 2
    assert bulkhead.in_flight == 0


async def test_fallback_predicates_that_raise_free_slots_and_cache_nothing(
    clock: FakeClock,
) -> None:
    """Fallback(on=/result_if=<raises>): the predicate's error, no slot held, nothing cached."""
    store = MemoryStore(clock=clock)
    bulkhead = Bulkhead(1, clock=clock)
    limiter = RateLimiter(100, clock=clock)
    on = Pipeline(Fallback(on=broken, value="stale", clock=clock), limiter, bulkhead)
    with pytest.raises(PredicateBroke):
        await on.call(fails)
    assert bulkhead.in_flight == 0
    cached = Fallback(on=ValueError, result_if=broken, cache=store, cache_key=str, clock=clock)
    with pytest.raises(PredicateBroke):
        await Pipeline(cached, bulkhead).call(ok)
    await cached.flush()
    assert bulkhead.in_flight == 0
    assert await store.cache_get("fallback", "") is None
