"""RedisStore on a real 3-primary Redis Cluster: every script runs in its policy's slot, the
policies spread over the nodes, and a node killed and restarted costs no call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitState,
    CountWindow,
    Fallback,
    RateLimiter,
    Retry,
    RetryBudget,
)
from resilience.errors import BulkheadFullError, CircuitOpenError, RateLimitedError
from resilience.events import Event, StoreDegraded, StoreRecovered
from resilience.store.redis import RedisStore

from ..cluster_support import ClusterSetup, Node, trip
from ..helpers import boom, ok, unique_prefix, until
from .support import TIMEOUT, Load, recovered, started

pytestmark = [pytest.mark.redis, pytest.mark.slow]  # servers of its own, started here


@pytest.fixture
def cluster() -> Iterator[ClusterSetup]:
    """Three cluster primaries of this test's own (require-full-coverage no), killed at the end."""
    yield from started(ClusterSetup(size=3, full_coverage=False, node_timeout=1000))


@contextlib.asynccontextmanager
async def cluster_store(
    setup: ClusterSetup, prefix: str, events: list[Event] | None = None
) -> AsyncIterator[RedisStore]:
    """A store over `RedisCluster(host, port)` with short timeouts; closed at the end."""
    client = RedisCluster(
        host="127.0.0.1",
        port=setup.nodes[0].port,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        retry=RedisRetry(NoBackoff(), 0),
        require_full_coverage=False,
    )
    # not initialized here: the store learns the slots itself before its first commands
    store = RedisStore(
        client, prefix=prefix, timeout=TIMEOUT, listeners=[] if events is None else [events.append]
    )
    try:
        async with store:
            yield store
    finally:
        await client.aclose()


def breaker(store: RedisStore, name: str) -> CircuitBreaker:
    """A shared breaker every replica builds alike."""
    return CircuitBreaker(name, store=store, window=CountWindow(20), minimum_calls=10, open_for=60)


Breakers = dict[str, CircuitBreaker]


@contextlib.asynccontextmanager
async def two_replicas(
    setup: ClusterSetup, events: list[Event] | None = None
) -> AsyncIterator[tuple[RedisStore, RedisStore, Breakers, Breakers]]:
    """Replicas A (its events in ``events``) and B of one fleet, and their breakers of
    every name in ``NAMES``; closed at the end."""
    fleet = unique_prefix("cl")
    async with cluster_store(setup, fleet, events) as a, cluster_store(setup, fleet) as b:
        yield a, b, {n: breaker(a, n) for n in NAMES}, {n: breaker(b, n) for n in NAMES}


def node_of(store: RedisStore, name: str) -> int:
    """The port of the cluster node holding policy `name`'s keys."""
    client: RedisCluster = store.client
    ports = {client.get_node_from_key(store.key(name, s)).port for s in ("state", "win", "leases")}
    assert len(ports) == 1, f"{name!r}'s keys are spread over {ports}"
    return int(ports.pop())


def slot_of(store: RedisStore, name: str) -> int:
    """The hash slot of policy `name` (all its keys share it)."""
    client: RedisCluster = store.client
    slots = {client.keyslot(store.key(name, s)) for s in ("state", "win", "probes", "gcra")}
    assert len(slots) == 1
    return int(slots.pop())


NAMES = [f"svc-{i}" for i in range(12)]


async def test_every_script_runs_and_policies_spread_over_nodes(cluster: ClusterSetup) -> None:
    """Breakers, leases, rate limiter, retry budget, fallback cache and status() all run on a
    cluster (no CROSSSLOT); the policies' keys land on every node, one slot per policy."""
    async with two_replicas(cluster) as (a, b, breakers_a, breakers_b):
        # breakers: one slot each, spread over the nodes; a trip on A reaches B
        for n in NAMES:
            for _ in range(5):
                assert await breakers_a[n].call(ok) == "ok"
        await a.sync()
        await b.sync()
        nodes = {node_of(a, n) for n in NAMES}
        assert nodes == {node.port for node in cluster.nodes}
        assert len({slot_of(a, n) for n in NAMES}) == len(NAMES)
        for n in NAMES[:3]:
            await trip(breakers_a[n])
        for n in NAMES[:3]:
            await until(lambda n=n: breakers_b[n].state is CircuitState.OPEN, 3, f"B sees {n}")
            with pytest.raises(CircuitOpenError):
                await breakers_b[n].call(ok)
        assert all(breakers_b[n].state is CircuitState.CLOSED for n in NAMES[3:])

        # leases: a fleet-wide bulkhead of 2 across both stores
        gate = asyncio.Event()

        async def held() -> str:
            await gate.wait()
            return "done"

        bulk_a = Bulkhead(2, distributed=True, store=a, name="bulk")
        bulk_b = Bulkhead(2, distributed=True, store=b, name="bulk")
        running = [asyncio.create_task(bulk_a.call(held)), asyncio.create_task(bulk_b.call(held))]

        async def leases(n: int) -> bool:
            return await a.count_leases("bulk") == n

        await until(lambda: leases(2), 10, "two permits taken in Redis", every=0.01)
        held_kinds = {(s.name, s.kind, s.in_flight) for s in await b.status()}
        assert ("bulk", "bulkhead", 2) in held_kinds
        with pytest.raises(BulkheadFullError):
            await bulk_b.call(ok)
        gate.set()
        assert await asyncio.gather(*running) == ["done", "done"]
        assert await a.count_leases("bulk") == 0

        # a shared rate limiter: 5 tokens fleet-wide
        lim_a = RateLimiter(1, per=60, burst=5, store=a, name="rl")
        lim_b = RateLimiter(1, per=60, burst=5, store=b, name="rl")
        admitted = 0
        for lim in (lim_a, lim_b, lim_a, lim_b, lim_a, lim_b, lim_a):
            with contextlib.suppress(RateLimitedError):
                await lim.call(ok)
                admitted += 1
        assert admitted == 5

        # a shared retry budget and a fallback cache
        budget = RetryBudget(name="budget", max_tokens=4, token_ratio=0.5, store=a)
        retry = Retry(on=ValueError, attempts=3, budget=budget, wait=lambda _: 0)
        for _ in range(4):
            with contextlib.suppress(ValueError):
                await retry.call(boom)
        fallback = Fallback(on=ValueError, cache=a, name="fb")
        assert await fallback.call(ok) == "ok"

        # status(): every policy, read from its own node
        await a.sync()
        kinds = {(s.name, s.kind) for s in await b.status()}
        assert {(n, "circuit_breaker") for n in NAMES} <= kinds
        assert ("rl", "rate_limiter") in kinds
        assert ("budget", "retry_budget") in kinds
        states = {s.name: s.state for s in await a.status() if s.kind == "circuit_breaker"}
        assert [states[n] for n in NAMES[:3]] == [CircuitState.OPEN] * 3
        assert not a.degraded
        assert not b.degraded


async def test_node_killed_and_restarted_no_call_fails_and_state_converges(
    cluster: ClusterSetup,
) -> None:
    """Kill one primary under load and restart it (empty): no call fails, only the breakers
    on the dead node go local (the store never degrades as a whole, and the others stay
    shared), breakers on the surviving nodes keep their state, and the fleet converges on
    the restarted node's breakers again."""
    events: list[Event] = []
    async with two_replicas(cluster, events) as (a, b, breakers_a, breakers_b):
        for n in NAMES:
            await breakers_a[n].call(ok)
        await a.sync()
        victim: Node = cluster.nodes[1]
        on_victim = [n for n in NAMES if node_of(a, n) == victim.port]
        elsewhere = [n for n in NAMES if node_of(a, n) != victim.port]
        assert on_victim
        assert elsewhere
        # one breaker open on a surviving node, one on the victim, before the kill
        await trip(breakers_a[elsewhere[0]])
        await trip(breakers_a[on_victim[0]])
        await until(
            lambda: breakers_b[elsewhere[0]].state is CircuitState.OPEN, 3, "B sees the trip"
        )

        load = Load()
        for bs in (breakers_a, breakers_b):
            load.start(list(bs.values()), pause=0.002)
        try:
            await until(lambda: load.calls > 0, 5, "the load under way")
            victim.kill()
            killed = time.monotonic()
            await until(lambda: bool(a.supervisor.away), 5, "the store to notice the dead node")
            degraded_after = time.monotonic() - killed
            # while the node is down: a breaker on a surviving node trips on A, and B, sharing
            # it through the surviving node, rejects too
            await trip(breakers_a[elsewhere[1]])
            await until(
                lambda: breakers_b[elsewhere[1]].state is CircuitState.OPEN, 3, "B, node down"
            )
            down_calls = load.calls
            await asyncio.sleep(1.5)
            still_degraded = a.degraded
            assert not still_degraded
            victim.start()
            restarted = time.monotonic()
            cluster.wait_ok()
            await recovered(a, b)
            back_after = time.monotonic() - restarted
            await asyncio.sleep(0.3)
        finally:
            await load.stop()

        assert load.failures == []
        assert load.calls > down_calls > 0
        assert not any(isinstance(e, (StoreDegraded, StoreRecovered)) for e in events)

        states = {s.name: s for s in await a.status() if s.kind == "circuit_breaker"}
        # the surviving node kept its breaker open at the same generation
        assert states[elsewhere[0]].state is CircuitState.OPEN
        # the restarted node lost its data: its breakers were recreated at the fleet's generation
        victim_state = states[on_victim[0]]
        # converge: trip a breaker on the restarted node, B learns it
        target = on_victim[-1] if len(on_victim) > 1 else on_victim[0]
        if breakers_a[target].state is not CircuitState.OPEN:
            await trip(breakers_a[target])
        took = await until(
            lambda: breakers_b[target].state is CircuitState.OPEN, 3, "B sees the new trip"
        )
        # the trip made on A while degraded (local) is now the fleet's state or was dropped
        local_trip = states[elsewhere[1]]
        print(
            f"node away {degraded_after:.2f}s after the kill, store degraded after 1.5 s: "
            f"{still_degraded}; recovered {back_after:.2f}s after restart; "
            f"{load.calls} calls, 0 failed; "
            f"victim breaker {on_victim[0]}: {victim_state.state.value} gen "
            f"{victim_state.generation}; local trip while degraded -> "
            f"{local_trip.state.value} on the fleet; B saw a new trip after {took * 1000:.0f} ms"
        )


async def test_a_paused_node_makes_only_its_own_breakers_local(cluster: ClusterSetup) -> None:
    """3 primaries, one paused (SIGSTOP): breakers on the other two stay shared (a trip on A
    reaches B), the store never degrades, no call fails or waits on the paused node, and its
    own breakers decide locally until it answers again."""
    events: list[Event] = []
    async with two_replicas(cluster, events) as (a, b, breakers_a, breakers_b):
        for n in NAMES:
            await breakers_a[n].call(ok)
            await breakers_b[n].call(ok)
        await a.sync()
        await b.sync()
        victim: Node = cluster.nodes[2]
        on_victim = [n for n in NAMES if node_of(a, n) == victim.port]
        elsewhere = [n for n in NAMES if node_of(a, n) != victim.port]
        assert on_victim
        assert len(elsewhere) >= 2
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            for n in NAMES:  # news for every breaker: the paused node's flushes time out
                await breakers_a[n].call(ok)
            await until(lambda: bool(a.supervisor.away), 5, "the paused node noticed")
            slowest = 0.0
            for n in on_victim:  # decides locally, at once
                start = time.monotonic()
                await trip(breakers_a[n])
                slowest = max(slowest, time.monotonic() - start)
            for n in elsewhere[:2]:  # shared as ever
                await trip(breakers_a[n])
                await until(lambda n=n: breakers_b[n].state is CircuitState.OPEN, 3, f"B: {n}")
            assert not a.degraded
            assert not b.degraded
            assert slowest < TIMEOUT * 4
            assert all(breakers_b[n].state is CircuitState.CLOSED for n in on_victim)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        cluster.wait_ok()

        async def back() -> bool:
            with contextlib.suppress(Exception):
                await a.sync()
            return not a.supervisor.away

        await until(back, 10, "the node back", every=0.05)
        # what A learned while the node was away reaches the fleet: B sees the local opens
        for n in on_victim:
            await until(lambda n=n: breakers_b[n].state is CircuitState.OPEN, 5, f"B: {n}")
        assert not any(isinstance(e, StoreDegraded) for e in events)
