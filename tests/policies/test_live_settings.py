"""Each policy applies live settings between calls, as its constructor would have them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from resilience import (
    AdaptiveLimit,
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    FleetLeases,
    Hedge,
    MemoryStore,
    RateLimitedError,
    RateLimiter,
    ResilienceTimeoutError,
    Retry,
    Throttle,
    Timeout,
)
from resilience.store import config as live
from resilience.testing import FakeClock

from ..helpers import advance, started

NAME = "svc"


async def test_a_shorter_timeout_bounds_the_calls_in_flight(clock: FakeClock) -> None:
    """Calls in flight end at most the new seconds after the change; later calls get it."""
    timeout = Timeout(10, name=NAME, clock=clock)
    task = await started(timeout.call(clock.sleep, 60))
    await MemoryStore().configure(NAME, seconds=1.0)
    await advance(clock, 1.0)
    with pytest.raises(ResilienceTimeoutError):
        await task
    later = await started(timeout.call(clock.sleep, 60))
    await advance(clock, 1.0)
    with pytest.raises(ResilienceTimeoutError):
        await later


async def test_a_shorter_timeout_bounds_the_next_call_when_none_is_in_flight(
    clock: FakeClock,
) -> None:
    """A shorter timeout applied while no call is in flight bounds the next call: the timer
    an earlier call armed for the old seconds is armed again (it left the next call to
    run until the old deadline, or for ever)."""
    timeout = Timeout(5.0, name=NAME, clock=clock)
    await timeout.call(asyncio.sleep, 0)  # arms the timer for 5 s from now
    await MemoryStore().configure(NAME, seconds=0.1)
    task = await started(timeout.call(clock.sleep, 2))
    await advance(clock, 0.1)
    assert task.done()
    with pytest.raises(ResilienceTimeoutError):
        await task


async def test_a_shorter_timeout_applied_from_another_thread_bounds_the_calls() -> None:
    """A change applied by a store running in another thread (an admin task with a loop of
    its own) reaches the timeout on its own loop: the call in flight and the next one are
    bounded by the new seconds (its timer was armed on the other loop, which then closed,
    and no call of this loop armed one again). Real time: the timer is the loop's."""
    timeout = Timeout(5.0, name=NAME)
    task = await started(timeout.call(asyncio.sleep, 3))
    await asyncio.to_thread(asyncio.run, MemoryStore().configure(NAME, seconds=0.2))
    with pytest.raises(ResilienceTimeoutError):  # after 0.2 s, not 3 s
        await task
    with pytest.raises(ResilienceTimeoutError):
        await timeout.call(asyncio.sleep, 3)


async def test_a_larger_bulkhead_lets_waiting_calls_in_and_a_smaller_one_takes_back() -> None:
    """Growing the limit admits a waiting call at once; shrinking holds new calls back."""
    bulkhead = Bulkhead(1, max_waiting=1, name=NAME)
    release = asyncio.Event()
    first = await started(bulkhead.call(release.wait))
    second = await started(bulkhead.call(release.wait))
    assert (bulkhead.in_flight, bulkhead.waiting) == (1, 1)
    store = MemoryStore()
    await store.configure(NAME, max_concurrent=2)
    assert (bulkhead.in_flight, bulkhead.waiting) == (2, 0)
    await store.configure(NAME, max_concurrent=1, max_waiting=0)
    with pytest.raises(BulkheadFullError):
        await bulkhead.call(asyncio.sleep, 0)
    release.set()
    await asyncio.gather(first, second)
    assert bulkhead.in_flight == 0
    await bulkhead.call(asyncio.sleep, 0)


async def test_what_a_bulkhead_refuses_is_refused_before_anything_changes() -> None:
    """An adaptive limit, and waiting with fleet-wide permits, are refused by the check."""
    store = MemoryStore()
    adaptive = Bulkhead(limit=AdaptiveLimit(initial=4, max_limit=8), name="adaptive")
    with pytest.raises(ValueError, match="adaptive bulkhead cannot change live"):
        await store.configure("adaptive", max_concurrent=3)
    assert adaptive.max_concurrent == 8
    fleet = Bulkhead(permits=FleetLeases(store, "fleet", limit=4), name="fleet")
    with pytest.raises(ValueError, match="max_waiting must be 0 with fleet-wide permits"):
        await store.configure("fleet", max_waiting=2)
    await store.configure("fleet", max_concurrent=6)
    assert fleet.permits is not None
    assert (fleet.max_concurrent, fleet.permits.limit) == (6, 6)


async def test_a_rate_limiters_rate_and_burst_change(clock: FakeClock) -> None:
    """A faster rate and a larger burst admit calls the old ones refused."""
    limiter = RateLimiter(1, burst=1, name=NAME, clock=clock)
    await limiter.call(asyncio.sleep, 0)
    with pytest.raises(RateLimitedError):
        await limiter.call(asyncio.sleep, 0)
    await MemoryStore().configure(NAME, rate=100, burst=5)
    assert (limiter.rate, limiter.burst, limiter.interval) == (100, 5, 0.01)
    for _ in range(4):
        await limiter.call(asyncio.sleep, 0)


async def test_retry_attempts_change_unless_built_with_one() -> None:
    """More attempts are made after the change; a one-attempt retry refuses the change."""
    clock = FakeClock(autojump=True)
    retry = Retry(on=ValueError, attempts=2, name=NAME, clock=clock)
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    await MemoryStore().configure(NAME, attempts=4)
    with pytest.raises(ValueError, match="boom"):
        await retry.call(fail)
    assert calls == 4
    once = Retry(on=ValueError, attempts=1, name="once")
    with pytest.raises(ValueError, match="built with attempts=1 cannot change live"):
        await MemoryStore().configure("once", attempts=3)
    assert once.attempts == 1


async def test_hedge_and_throttle_settings() -> None:
    """A hedge's delay and budget, a throttle's k: applied, or the constructor's error."""
    hedge = Hedge(delay=0.5, budget=0.1, name=NAME)
    throttle = Throttle(k=2.0, name=NAME)
    store = MemoryStore()
    await store.configure(NAME, delay=0.2, budget=0.5, k=1.5)
    assert (hedge.delay, hedge.budget, throttle.k) == (0.2, 0.5, 1.5)
    await store.configure(NAME, delay="p90")
    assert hedge.learned is not None
    assert hedge.learned.quantile == 0.9
    with pytest.raises(ValueError, match=r"budget must be in \(0, max_hedges\]"):
        await store.configure(NAME, budget=2)
    with pytest.raises(ValueError, match=r"k must be finite and >= 1, got 0\.5"):
        await store.configure(NAME, k=0.5)
    assert (hedge.budget, throttle.k) == (0.5, 1.5)


async def test_a_breaker_keeps_timing_its_calls_or_not() -> None:
    """slow_call_duration cannot be set where it was None (calls are not timed)."""
    breaker = CircuitBreaker(NAME, store=MemoryStore())
    with pytest.raises(ValueError, match="slow_call_duration cannot be set or removed live"):
        await MemoryStore().configure(NAME, slow_call_duration=1.0)
    assert breaker.config.slow_call_duration is None


async def test_a_policy_whose_values_do_not_change_hears_nothing() -> None:
    """A change of a timeout's seconds is no event for the breaker of the same name."""
    events: list[object] = []
    CircuitBreaker(NAME, store=MemoryStore(), listeners=[events.append])
    timeout = Timeout(1.0, name=NAME, listeners=[events.append])
    await MemoryStore().configure(NAME, seconds=0.5)
    assert [getattr(e, "policy", None) for e in events] == ["timeout"]
    assert timeout.seconds == 0.5


async def test_defaults_from_the_file_resilience_config_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TOML file's tables are defaults per name; a bad value in it names the file."""
    path = tmp_path / "resilience.toml"
    path.write_text("[filed]\nseconds = 0.25\n\n[other]\nk = 3\n")
    monkeypatch.setenv("RESILIENCE_CONFIG", str(path))
    assert Timeout(1.0, name="filed").seconds == 0.25
    assert Timeout(1.0, name="elsewhere").seconds == 1.0
    live._forget()
    path.write_text("[filed]\nseconds = -1\n")
    with pytest.raises(ValueError, match=r"RESILIENCE_CONFIG=.*seconds must be finite and > 0"):
        Timeout(1.0, name="filed")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[filed]\nseconds = -1\n", "seconds must be finite and > 0"),
        ("[filed\n", "Expected"),
        (None, "No such file"),
    ],
)
def test_a_bad_file_is_refused_by_every_policy_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, error: str
) -> None:
    """A file with a bad value, one that does not parse or none at all: every construction
    raises the same ValueError naming the variable and the file, not only the first."""
    path = tmp_path / "resilience.toml"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("RESILIENCE_CONFIG", str(path))
    live._forget()
    for _ in range(2):
        with pytest.raises(ValueError, match=f"RESILIENCE_CONFIG='{path}': .*{error}"):
            Timeout(1.0, name="filed")
    live._forget()


def test_names_no_policy_follows_are_forgotten() -> None:
    """Policies made per key and dropped leave the registry bounded."""
    kept = [Timeout(1.0, name=f"kept-{i}") for i in range(10)]
    for i in range(1000):
        Timeout(1.0, name=f"origin-{i}")  # dropped at once
    assert len(live._targets) < 200
    assert all(live.followed(t.name) for t in kept)


async def test_a_window_alone_changes_a_breaker_whose_minimum_was_derived() -> None:
    """A breaker given no minimum_calls takes a smaller window live: its minimum follows."""
    breaker = CircuitBreaker(NAME)  # window 100, minimum derived: 100
    await MemoryStore().configure(NAME, window=20)
    assert breaker.config.minimum_calls == 20


async def test_a_burst_left_out_follows_a_rate_changed_live() -> None:
    """A limiter given no burst takes a new rate live: its burst follows the rate."""
    limiter = RateLimiter(10, name=NAME)
    await MemoryStore().configure(NAME, rate=100)
    assert (limiter.rate, limiter.burst) == (100, 100)
