"""A Redis that answers with an error is a Redis that is down (real redis-servers).

Each fault below makes Redis reply with an error instead of timing out: a replica (READONLY),
a full Redis under ``noeviction`` (OOM), an ACL user without EVALSHA (NOPERM), a server busy
in a script (BUSY, then SCRIPT KILL), a paused server (CLIENT PAUSE) and DEBUG SLEEP. Each
test shows the same three things: a shared breaker still opens on this replica's own
outcomes, the fleet-wide policies fall back to local state without a ``redis`` exception
reaching the caller, and the store recovers once Redis accepts writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    RateLimiter,
    Retry,
    RetryBudget,
    StoreDegraded,
    StoreRecovered,
    Throttle,
)
from resilience.events import Event
from resilience.store.redis import RedisStore

from ..helpers import boom, ok, unique_prefix, until
from ..redis_server import RedisServer


@dataclass
class Fault:
    """How to make a server answer with an error, and how to undo it."""

    reply: str  # what the StoreDegraded event names
    apply: Callable[[aioredis.Redis, RedisServer], Awaitable[None]]
    undo: Callable[[aioredis.Redis, RedisServer], Awaitable[None]]
    url: Callable[[RedisServer], str] = lambda server: server.url
    extra: dict[str, Any] = field(default_factory=dict)


async def _replica_apply(admin: aioredis.Redis, server: RedisServer) -> None:
    # a replica of a port nobody listens on: it answers READONLY to every write
    await admin.execute_command("REPLICAOF", "127.0.0.1", "1")


async def _replica_undo(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.execute_command("REPLICAOF", "NO", "ONE")


async def _oom_apply(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "1mb")
    blob = b"x" * 64_000
    with contextlib.suppress(aioredis.ResponseError):
        for i in range(64):  # fill it until Redis refuses
            await admin.set(f"filler:{i}", blob)


async def _oom_undo(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.config_set("maxmemory", "0")


async def _noperm_apply(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all")
    await admin.execute_command("ACL", "SETUSER", "app", "-evalsha", "-eval", "-script")


async def _noperm_undo(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.execute_command("ACL", "SETUSER", "app", "+evalsha", "+eval", "+script")


async def _noperm_user(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all")


_busy_task: dict[int, tuple[aioredis.Redis, asyncio.Task[Any]]] = {}


async def _busy_apply(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.config_set("lua-time-limit", "10")
    spinner = aioredis.Redis.from_url(server.url)
    # a script that never ends: after lua-time-limit every other client gets BUSY
    task = asyncio.create_task(spinner.eval("while true do end", 0))
    _busy_task[server.port] = (spinner, task)

    async def busy() -> bool:  # past lua-time-limit, every other client is told BUSY
        try:
            await admin.ping()
        except ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    await until(busy, 5, "the server answering BUSY")


async def _busy_undo(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.script_kill()
    spinner, task = _busy_task.pop(server.port)
    with contextlib.suppress(Exception):
        await task
    await spinner.aclose()


async def _pause_apply(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.execute_command("CLIENT", "PAUSE", "2500", "WRITE")


async def _pause_undo(admin: aioredis.Redis, server: RedisServer) -> None:
    await admin.execute_command("CLIENT", "UNPAUSE")


_sleeper: dict[int, tuple[aioredis.Redis, asyncio.Task[Any]]] = {}


async def _sleep_apply(admin: aioredis.Redis, server: RedisServer) -> None:
    sleeper = aioredis.Redis.from_url(server.url)
    task = asyncio.create_task(sleeper.execute_command("DEBUG", "SLEEP", "1.5"))
    _sleeper[server.port] = (sleeper, task)

    async def asleep() -> bool:  # the server answers nobody once DEBUG SLEEP runs
        probe = aioredis.Redis.from_url(server.url, socket_timeout=0.05)
        try:
            await probe.ping()
        except RedisTimeoutError:
            return True
        finally:
            await probe.aclose()
        return False

    await until(asleep, 5, "the server asleep")


async def _sleep_undo(admin: aioredis.Redis, server: RedisServer) -> None:
    sleeper, task = _sleeper.pop(server.port)
    with contextlib.suppress(Exception):
        await task
    await sleeper.aclose()


FAULTS = {
    "readonly": Fault("READONLY", _replica_apply, _replica_undo),
    "oom": Fault("OOM", _oom_apply, _oom_undo),
    "noperm": Fault(
        "NOPERM",
        _noperm_apply,
        _noperm_undo,
        url=lambda s: f"redis://app:pw@127.0.0.1:{s.port}/0",
        extra={"setup": _noperm_user},
    ),
    "busy": Fault("BUSY", _busy_apply, _busy_undo),
    "client-pause": Fault("TimeoutError", _pause_apply, _pause_undo),
    "debug-sleep": Fault("TimeoutError", _sleep_apply, _sleep_undo),
}


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client on this test's own server (not through the store)."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    with contextlib.suppress(Exception):
        await client.aclose()


@pytest.mark.parametrize("name", list(FAULTS))
async def test_an_error_reply_is_an_outage(
    name: str, redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """The store degrades naming the reply; policies go on locally; recovery follows."""
    fault = FAULTS[name]
    setup = fault.extra.get("setup")
    if setup is not None:
        await setup(admin, redis_server)
    events: list[Event] = []
    store = RedisStore.from_url(
        fault.url(redis_server), prefix=unique_prefix("err"), listeners=[events.append]
    )
    try:
        breaker = CircuitBreaker(
            "dep", store=store, window=CountWindow(10), minimum_calls=10, open_for=30.0
        )
        bulkhead = Bulkhead(2, distributed=True, store=store, name="pool")
        limiter = RateLimiter(1000, per=1, burst=1000, store=store, name="api")
        # the same without a store call per call: a share of the permits, tokens taken ahead
        shared = Bulkhead(2, distributed=True, store=store, name="pool2", shares=True)
        ahead = RateLimiter(1000, per=1, burst=1000, store=store, name="api2", ahead=0.05)
        throttle = Throttle(store=store, name="thr", sync_interval=0.01)
        budget = RetryBudget(name="budget", max_tokens=10, token_ratio=0.5, store=store)
        retry = Retry(on=ValueError, attempts=2, budget=budget, wait=lambda _: 0)
        assert await breaker.call(ok) == "ok"
        assert await bulkhead.call(ok) == "ok"
        await store.sync()
        assert not store.degraded

        await fault.apply(admin, redis_server)
        # the fleet-wide policies: answered locally, never a redis exception
        for _ in range(5):
            assert await bulkhead.call(ok) == "ok"
            assert await limiter.call(ok) == "ok"
            assert await shared.call(ok) == "ok"
            assert await ahead.call(ok) == "ok"
            assert await throttle.call(ok) == "ok"
            with pytest.raises(ValueError, match="boom"):
                await retry.call(boom)
        await until(lambda: store.degraded, 5.0, "degraded")
        degraded = [e for e in events if isinstance(e, StoreDegraded)]
        assert degraded, events
        assert fault.reply in degraded[0].error, degraded[0].error
        # the breaker opens on this replica's outcomes exactly as an in-process one would:
        # after 1 success and 9 failures the window of 10 trips; the next call is rejected
        failures = 0
        for _ in range(9):
            with pytest.raises(ValueError, match="boom"):
                await breaker.call(boom)
            failures += 1
        with pytest.raises(CircuitOpenError):
            await breaker.call(boom)
        assert failures == 9
        assert breaker.state is CircuitState.OPEN

        await fault.undo(admin, redis_server)
        await until(lambda: not store.degraded, 10.0, "recovered")
        assert any(isinstance(e, StoreRecovered) for e in events)
        await store.sync()
        # what this replica learned while degraded reached the fleet: the breaker stays open
        await until(lambda: breaker.state is CircuitState.OPEN, 2.0, "fleet open")
        assert (await admin.hget(store.key("dep", "state"), "state")) == b"open"
    finally:
        await store.aclose()


async def test_a_readonly_reply_drops_connections(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """READONLY: the store drops its pooled connections, so the next one can reach a primary."""
    store = RedisStore.from_url(redis_server.url, prefix=unique_prefix("ro"))
    try:
        breaker = CircuitBreaker("dep", store=store)
        await breaker.call(ok)
        await store.sync()
        mine = str(await admin.client_id())
        before = {c["id"] for c in await admin.client_list()} - {mine}
        assert before
        await _replica_apply(admin, redis_server)
        await breaker.call(ok)
        await until(lambda: store.degraded, 5.0, "degraded")
        await _replica_undo(admin, redis_server)
        await until(lambda: not store.degraded, 10.0, "recovered")
        await breaker.call(ok)
        await store.sync()
        after = {c["id"] for c in await admin.client_list()}
        assert not before & after, "every connection of before the READONLY reply was dropped"
    finally:
        await store.aclose()
