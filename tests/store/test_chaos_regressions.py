"""Faults that once broke the Redis store, each a regression test now: a reconnect while Redis
is still slow, a paused Redis resubscribed in a tight loop, a permit or a probe lease lost to a
timeout or a cancelled caller, a flush reply lost (real redis-servers behind a fault proxy;
the scenarios under load are in ``test_chaos_redis``).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitState,
    CountWindow,
)
from resilience.events import Event, SubscriberReplaced
from resilience.store.redis import RedisStore

from .. import helpers
from ..faultproxy import Connection, FaultProxy
from ..helpers import boom, cancelled, ok, until
from ..redis_server import RedisServer
from .support import fleet_breaker, report


async def test_store_reconnects_while_redis_is_still_slow(redis_server: RedisServer) -> None:
    """A degraded store whose Redis answers in 100 ms (timeout 250 ms) reconnects."""
    events: list[Event] = []
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        store = RedisStore.from_url(
            proxy.url_for("redis"), prefix="slowreconnect", listeners=[events.append]
        )
        try:
            b = fleet_breaker(store)
            await b.call(ok)
            await store.sync()
            proxy.blackhole = True
            start = time.monotonic()
            while not store.degraded and time.monotonic() - start < 5:
                await b.call(ok)
                await asyncio.sleep(0.01)
            assert store.degraded
            proxy.blackhole = False
            proxy.latency = 0.05  # a command's round trip: ~100 ms, well inside 250 ms
            proxy.cut()  # every connection is new from here on
            start = time.monotonic()
            while store.degraded and time.monotonic() - start < 2.5:
                await b.call(ok)  # still served locally, at once
                await asyncio.sleep(0.01)
            assert not store.degraded, "never reconnected while Redis stayed slow"
        finally:
            await store.aclose()


async def test_a_paused_redis_is_not_resubscribed_in_a_tight_loop(
    redis_server: RedisServer,
) -> None:
    """Redis paused (SIGSTOP: connections accepted, nothing answered) for 3 s: the subscriber
    tries again with backoff (from ``sync_interval`` up to 2 s), not once per unanswered
    PING; once Redis answers again it subscribes and says so."""
    events: list[Event] = []
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        store = RedisStore.from_url(
            proxy.url_for("redis"),
            prefix=helpers.unique_prefix("paused"),
            sync_interval=0.01,
            timeout=0.05,
            listeners=[events.append],
        )
        subscribers: set[Connection] = set()  # every connection that sent a SUBSCRIBE

        def seen() -> int:
            subscribers.update(c for c in proxy.connections if b"SUBSCRIBE" in c.head)
            return len(subscribers)

        try:
            b = fleet_breaker(store)
            await b.call(ok)
            await store.sync()
            await until(lambda: seen() > 0, 5)
            before = seen()
            redis_server.pause()
            try:
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    seen()
                    await asyncio.sleep(0.005)
            finally:
                redis_server.resume()
            tries = seen() - before
            report("paused redis", f"subscriber connections in a 3 s pause: {tries}")
            # backoff: about 8 (a PING timeout plus 10 ms, 20 ms, ... 1.28 s, 2 s); without
            # it, one every PING timeout + 50 ms: about 27
            assert 2 <= tries <= 12, tries
            replaced = any(isinstance(e, SubscriberReplaced) for e in events)
            assert not replaced, "no subscription was confirmed while Redis was paused"
            await until(lambda: any(isinstance(e, SubscriberReplaced) for e in events), 10)
        finally:
            await store.aclose()


async def test_a_permit_lost_to_a_timeout_is_given_back(redis_server: RedisServer) -> None:
    """The lease script ran but its reply came too late: the permit must not stay taken."""
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        store = RedisStore.from_url(proxy.url_for("redis"), prefix="lostlease")
        try:
            pool = Bulkhead(1, distributed=True, store=store, name="pool")
            assert await pool.call(ok) == "ok"
            proxy.down.latency = 0.4  # Redis grants the permit; the grant arrives too late
            assert await pool.call(ok) == "ok"  # went on under the local limit
            assert store.degraded
            proxy.clear()
            await until(lambda: not store.degraded, 5)

            async def leases(n: int) -> bool:
                return await store.count_leases("pool") == n

            await until(lambda: leases(0), 5, "the late permit given back", every=0.01)
            assert await pool.call(ok) == "ok"  # today: BulkheadFullError for 30 s
        finally:
            await store.aclose()


async def test_a_lost_flush_reply_does_not_count_outcomes_twice(
    redis_server: RedisServer,
) -> None:
    """40 calls (10 failures) whose first flush reply is lost appear once in the fleet's window."""
    from resilience import status

    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        store = RedisStore.from_url(proxy.url_for("redis"), prefix="twice")
        direct = RedisStore.from_url(redis_server.url, prefix="twice")
        try:
            b = CircuitBreaker("dep", store=store, window=CountWindow(1000), minimum_calls=1000)
            await b.call(ok)
            await store.sync()
            proxy.down.latency = 0.4  # the flush runs in Redis; its reply arrives too late
            for _ in range(10):
                with pytest.raises(ValueError, match="boom"):
                    await b.call(boom)
            for _ in range(29):
                await b.call(ok)
            await until(lambda: store.degraded, 5)
            proxy.clear()
            await until(lambda: not store.degraded, 5)
            await store.sync()
            (dep,) = [p for p in await status(direct) if p.name == "dep"]
            assert (dep.calls, dep.failures) == (40, 10)
        finally:
            await store.aclose()
            await direct.aclose()


async def test_a_probe_lease_granted_to_a_cancelled_caller_is_given_back(
    redis_server: RedisServer,
) -> None:
    """The probe script grants a lease while its caller is being cancelled: it comes back."""
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        store = RedisStore.from_url(proxy.url_for("redis"), prefix="cancelledprobe", timeout=2.0)
        direct = aioredis.Redis.from_url(redis_server.url)
        try:
            b = CircuitBreaker(
                "dep", store=store, window=CountWindow(4), minimum_calls=4, open_for=0.05
            )
            for _ in range(4):
                with pytest.raises(ValueError, match="boom"):
                    await b.call(boom)
            await store.sync()
            assert b.state is CircuitState.OPEN
            await asyncio.sleep(0.06)  # past open_for: the next call asks for a probe lease
            proxy.down.latency = 0.3  # the grant is on its way back when the caller gives up
            probes = store.key("dep", "probes")

            async def held(n: int) -> bool:
                return int(await direct.zcard(probes)) == n

            caller = asyncio.create_task(b.call(ok))
            await until(lambda: held(1), 5, "the probe lease granted in Redis", every=0.01)
            await cancelled(caller)
            proxy.clear()
            await until(lambda: held(0), 5, "the probe lease given back", every=0.01)
            assert await b.call(ok) == "ok"  # the slot is free: this probe closes the breaker
            await store.sync()
            assert b.state is CircuitState.CLOSED
        finally:
            await store.aclose()
            await direct.aclose()
