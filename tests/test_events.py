"""Choosing events: ``select`` by type and policy, and policies that skip unwanted timing."""

from __future__ import annotations

from typing import Any

import pytest

from resilience import (
    CallFinished,
    CallRejected,
    CircuitBreaker,
    Event,
    Pipeline,
    RateLimitedError,
    RateLimiter,
    Retry,
    StateChanged,
    Timeout,
    select,
)
from resilience.testing import FakeClock

from .helpers import ok


async def test_select_by_event_type_skips_call_timing(clock: FakeClock) -> None:
    """A listener selecting only rejections gets no ``CallFinished``; the calls are not timed."""
    got: list[Event] = []
    limiter = RateLimiter(
        1, burst=1, clock=clock, listeners=[select(got.append, events=(CallRejected,))]
    )
    guarded = limiter(ok)
    await guarded()
    with pytest.raises(RateLimitedError):
        await guarded()
    assert [type(e) for e in got] == [CallRejected]


class NoCalls:
    """A listener declining ``CallFinished`` through ``wants``, yet recording all it gets."""

    def __init__(self) -> None:
        self.got: list[Event] = []

    def wants(self, event: type[Event], kind: str, name: str) -> bool:
        return not issubclass(event, CallFinished)

    def __call__(self, event: Event) -> None:
        self.got.append(event)


async def test_policy_does_not_time_calls_nobody_wants(clock: FakeClock) -> None:
    """With no listener wanting ``CallFinished``, none is built (``call`` and decorated)."""
    listener = NoCalls()
    breaker = CircuitBreaker("b", clock=clock, listeners=[listener])
    await breaker.call(ok)
    await breaker(ok)()
    assert listener.got == []


async def test_select_by_policy_kind_or_name(clock: FakeClock) -> None:
    """``policies`` matches a policy's kind or its name; other policies' events are dropped."""
    by_kind: list[Event] = []
    by_name: list[Event] = []
    listeners = [
        select(by_kind.append, policies=("circuit_breaker",)),
        select(by_name.append, policies=("edge",)),
    ]
    stack = Pipeline(
        Retry(on=ValueError, name="edge", clock=clock, listeners=listeners),
        CircuitBreaker("db", clock=clock, listeners=listeners),
        Timeout(5, clock=clock, listeners=listeners),
    )
    await stack(ok)()
    assert [(type(e), e.policy) for e in by_kind] == [(CallFinished, "circuit_breaker")]
    assert [(type(e), e.name) for e in by_name] == [(CallFinished, "edge")]


async def test_listeners_without_wants_get_everything(clock: FakeClock) -> None:
    """A plain callable still receives every event, ``CallFinished`` included."""
    got: list[Any] = []
    await CircuitBreaker("b", clock=clock, listeners=[got.append]).call(ok)
    assert [type(e) for e in got] == [CallFinished]


def test_select_validates() -> None:
    """Bad arguments are TypeErrors naming them."""
    with pytest.raises(TypeError, match="listener"):
        select(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="events"):
        select(print, events=StateChanged)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="events"):
        select(print, events=(int,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policies"):
        select(print, policies="circuit_breaker")
    with pytest.raises(TypeError, match="policies"):
        select(print, policies=("",))
