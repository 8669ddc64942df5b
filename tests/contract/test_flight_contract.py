"""The Store contract of single flights (``flight_join``, ``flight_renew``, ``flight_land``):
every store passes these, with the same FakeClock-driven steps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from resilience import Store
from resilience.store.records import MAX_PUBLISHED
from resilience.testing import FakeClock

from ..helpers import settle, until


async def test_first_joiner_holds_the_lease_others_see_it(replica: Callable[[], Store]) -> None:
    """The first replica to join a free flight holds its lease; another is told who does."""
    one, two = replica(), replica()
    assert await one.flight_join("c", "k", holder="a", awaited="", ttl=10) == ("a", None)
    assert await two.flight_join("c", "k", holder="b", awaited="", ttl=10) == ("a", None)
    assert await two.flight_join("c", "other", holder="b", awaited="", ttl=10) == ("b", None)
    assert await two.flight_join("d", "k", holder="b", awaited="", ttl=10) == ("b", None)


async def test_landed_value_reaches_whoever_awaited_its_holder(
    replica: Callable[[], Store],
) -> None:
    """A landed value is read by a joiner awaiting its holder; the lease is free again, so a
    joiner awaiting no one (a new call) takes it and runs afresh."""
    one, two = replica(), replica()
    await one.flight_join("c", "k", holder="a", awaited="", ttl=10)
    assert await one.flight_land("c", "k", holder="a", value=b"\x00v", ttl=10)
    assert await two.flight_join("c", "k", holder="b", awaited="a", ttl=10) == ("a", b"\x00v")
    assert await two.flight_join("c", "k", holder="b", awaited="", ttl=10) == ("b", None)
    assert await two.flight_join("c", "k", holder="z", awaited="a", ttl=10) == ("a", b"\x00v")
    assert await one.flight_join("c", "k", holder="y", awaited="x", ttl=10) == ("b", None)


async def test_expired_lease_is_taken_over_and_its_holder_fenced(
    replica: Callable[[], Store], clock: FakeClock
) -> None:
    """A holder that stops renewing loses the lease at its expiry: a waiter takes it over,
    and the old holder can neither renew nor publish (nothing written)."""
    one, two = replica(), replica()
    await one.flight_join("c", "k", holder="a", awaited="", ttl=5)
    clock.advance(3)
    assert await one.flight_renew("c", "k", holder="a", ttl=5)
    clock.advance(4)
    assert await two.flight_join("c", "k", holder="b", awaited="a", ttl=5) == ("a", None)
    clock.advance(1.5)
    assert await two.flight_join("c", "k", holder="b", awaited="a", ttl=5) == ("b", None)
    assert not await one.flight_renew("c", "k", holder="a", ttl=5)
    assert not await one.flight_land("c", "k", holder="a", value=b"late", ttl=5)
    assert await two.flight_join("c", "k", holder="x", awaited="a", ttl=5) == ("b", None)


async def test_given_back_lease_publishes_nothing(replica: Callable[[], Store]) -> None:
    """A holder that gives its lease back (no value) frees it for a waiter to take over."""
    one, two = replica(), replica()
    await one.flight_join("c", "k", holder="a", awaited="", ttl=10)
    assert await one.flight_land("c", "k", holder="a", value=None, ttl=10)
    assert not await one.flight_land("c", "k", holder="a", value=None, ttl=10)
    assert await two.flight_join("c", "k", holder="b", awaited="a", ttl=10) == ("b", None)


async def test_published_value_expires(replica: Callable[[], Store], clock: FakeClock) -> None:
    """A landed value is readable for its ttl only."""
    one = replica()
    await one.flight_join("c", "k", holder="a", awaited="", ttl=10)
    await one.flight_land("c", "k", holder="a", value=b"v", ttl=2)
    clock.advance(2.5)
    assert await one.flight_join("c", "k", holder="b", awaited="a", ttl=10) == ("b", None)


async def test_value_too_long_is_refused(replica: Callable[[], Store]) -> None:
    """A value over MAX_PUBLISHED bytes is a ValueError, and the lease stays held."""
    one = replica()
    await one.flight_join("c", "k", holder="a", awaited="", ttl=10)
    with pytest.raises(ValueError, match="at most"):
        await one.flight_land("c", "k", holder="a", value=b"x" * (MAX_PUBLISHED + 1), ttl=10)
    assert await one.flight_renew("c", "k", holder="a", ttl=10)


async def test_wait_ends_after_its_longest(replica: Callable[[], Store], clock: FakeClock) -> None:
    """Waiting for a flight that does not end returns after ``longest`` seconds."""
    one = replica()
    await one.flight_join("c", "k", holder="a", awaited="", ttl=10)
    waiting = asyncio.ensure_future(one.flight_wait("c", "k", longest=2))
    await settle()
    clock.advance(1)
    await settle()
    assert not waiting.done()
    clock.advance(1)
    await until(waiting.done, 10, "the wait's end")
    await waiting
