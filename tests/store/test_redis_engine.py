"""The shared-state engine at scale and in a real process's life (real redis-servers).

Cost follows use (idle breakers cost nothing, forgotten ones come back with the fleet's
state, a burst of new breakers goes a chunk at a time), quiet connections and busy loops,
forks, recovery, shutdown, and half-open across replicas that die or lose replies. Status is
in ``test_redis_status``, the scripts' own rules in ``test_redis_scripts``, quorum opening in
``test_redis_quorum``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    StateChanged,
    StoreDegraded,
)
from resilience.events import Event, SubscriberReplaced
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..faultproxy import FaultProxy
from ..fork_support import in_forked_child
from ..helpers import boom, ok, raises_each, unique_prefix, until
from ..redis_server import RedisServer
from .support import evalsha_calls, synced

# --- cost follows use ------------------------------------------------------------------------


async def test_idle_breakers_cost_no_redis_command(
    stores: Callable[..., RedisStore], raw: aioredis.Redis, clock: FakeClock
) -> None:
    """500 breakers, synced once, then idle: time passes and no script runs; one in use
    costs about one flush per round."""
    store = stores(clock=clock)
    breakers = [CircuitBreaker(f"b{i}", store=store) for i in range(500)]
    for b in breakers:
        await b.call(ok)
    await store.sync()
    before = await evalsha_calls(raw)
    for _ in range(50):
        clock.advance(1.0)
        await asyncio.sleep(0)
    assert await evalsha_calls(raw) == before
    for _ in range(5):
        await breakers[0].call(ok)
        await store.engine.next_round()  # a round (not sync(), which reads every breaker)
    used = await evalsha_calls(raw) - before
    assert 1 <= used <= 10  # one breaker's flushes, not 500 breakers'


async def test_a_forgotten_breaker_comes_back_with_the_fleets_state(
    stores: Callable[..., RedisStore], clock: FakeClock
) -> None:
    """Unused for forget_after, a breaker leaves the replica's memory; its name brings back
    the fleet's state (opened meanwhile by another replica)."""
    name = unique_prefix()
    a = stores(clock=clock, forget_after=5.0, prefix=name)
    b = stores(clock=clock, prefix=name)
    options: dict[str, Any] = {"window": CountWindow(4), "minimum_calls": 4, "open_for": 60.0}
    first = CircuitBreaker("dep", store=a, **options)
    await first.call(ok)
    await a.sync()
    del first
    clock.advance(10.0)
    await a.sync()  # a round: the idle breaker is dropped
    gc.collect()
    assert "dep" not in a.names()
    other = CircuitBreaker("dep", store=b, **options)
    await raises_each(4, ValueError, other.call, boom, match="boom")
    await b.sync()
    assert other.state is CircuitState.OPEN
    again = CircuitBreaker("dep", store=a, **options)
    await a.sync()
    assert again.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await again.call(ok)


async def test_a_burst_of_new_breakers_is_sent_a_chunk_at_a_time(
    stores: Callable[..., RedisStore],
) -> None:
    """1,200 new breakers, each called once: no pipeline carries more than a chunk of
    breakers (a breaker may have two flushes in one: its new outcome and one not yet
    acknowledged), and every breaker reads the fleet's state."""
    from resilience.store.redis.outbox import CHUNK

    store = stores(timeout=1.0)  # what is counted is the chunks, not their time: a slow machine
    supervisor = store.supervisor
    sizes: list[int] = []
    send = supervisor.send

    async def counted(commands: list[Any]) -> list[Any]:
        # the breakers a pipeline carries: the state keys of its 4-key scripts (flush, push)
        sizes.append(len({c[1][2] for c in commands if c[0] == "evalsha" and c[1][1] == 4}))
        return await send(commands)

    supervisor.send = counted  # type: ignore[method-assign]
    breakers = [CircuitBreaker(f"n{i}", store=store) for i in range(1200)]
    for b in breakers:
        await b.call(ok)
    await store.sync()
    assert not store.degraded
    assert len(sizes) >= 1200 // CHUNK
    assert max(sizes) <= CHUNK, repr(sizes)
    assert all(b._core.fleet_gen >= 0 for b in breakers)  # type: ignore[attr-defined]
    assert len(await store.known_names()) == 1200


# --- connections ---------------------------------------------------------------------------


async def test_a_quiet_subscriber_is_replaced(redis_server: RedisServer) -> None:
    """The pub/sub connection dies without a reset (its traffic vanishes): PING finds it,
    it is replaced, an event says so, and transitions arrive again."""
    events: list[Event] = []
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        name = unique_prefix()
        a = RedisStore.from_url(proxy.url_for("redis"), prefix=name, listeners=[events.append])
        b = RedisStore.from_url(redis_server.url, prefix=name)
        try:
            ba, bb = await synced(a, b, window=CountWindow(2), minimum_calls=2)
            await until(lambda: any(b"SUBSCRIBE" in c.head for c in proxy.connections))
            for conn in proxy.connections:
                if b"SUBSCRIBE" in conn.head:
                    conn.muted = True
            await until(lambda: any(isinstance(e, SubscriberReplaced) for e in events), 5.0)
            with pytest.raises(ValueError, match="boom"):
                await bb.call(boom)  # [ok, failed]: bb trips, and publishes it
            await until(lambda: ba.state is CircuitState.OPEN, 2.0, "the trip arrives")
        finally:
            await a.aclose()
            await b.aclose()


async def test_the_subscriber_pings_once_a_second_idle_or_busy(
    stores: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pub/sub connection is PINGed after a second of silence, not after every
    ``sync_interval``: an idle replica, and one whose breaker is in use, send a PING or two
    in 1.5 s, not 30 (a busy replica's rounds notice an outage themselves)."""
    from redis.asyncio.client import PubSub

    pings = 0
    ping = PubSub.ping

    async def counted(self: PubSub, *args: Any, **kwargs: Any) -> Any:
        nonlocal pings
        pings += 1
        return await ping(self, *args, **kwargs)

    monkeypatch.setattr(PubSub, "ping", counted)
    store = stores()
    b = CircuitBreaker("dep", store=store)
    await b.call(ok)
    await store.sync()
    pings = 0
    await asyncio.sleep(1.5)
    idle = pings
    pings = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        await b.call(ok)
        await asyncio.sleep(0.005)
    assert idle <= 2, (idle, pings)
    assert pings <= 2, (idle, pings)
    assert not store.degraded


async def test_a_blackhole_is_noticed_within_a_second_while_breakers_are_used(
    redis_server: RedisServer,
) -> None:
    """Redis stops answering while a breaker is called: the store is degraded within 1 s
    (the flush rounds carry the calls' outcomes and time out), and calls go on."""
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        store = RedisStore.from_url(proxy.url_for("redis"), prefix=unique_prefix())
        try:
            b = CircuitBreaker("dep", store=store)
            await b.call(ok)
            await store.sync()
            proxy.blackhole = True
            start = time.monotonic()
            while not store.degraded and time.monotonic() - start < 5:
                assert await b.call(ok) == "ok"
                await asyncio.sleep(0.005)
            took = time.monotonic() - start
            assert store.degraded
            assert took < 1.0, took
        finally:
            proxy.blackhole = False
            await store.aclose()


async def trips(breaker: CircuitBreaker, failures: int, *, reaching: CircuitBreaker) -> None:
    """``failures`` failing calls trip ``breaker``; the trip reaches the other replica's
    breaker ``reaching`` (within 3 s)."""
    await raises_each(failures, ValueError, breaker.call, boom, match="boom")
    assert breaker.state is CircuitState.OPEN
    await until(lambda: reaching.state is CircuitState.OPEN, 3.0, "the trip reaches B")


async def test_a_local_trip_does_not_wait_for_the_round_under_way(
    stores: Callable[..., RedisStore],
) -> None:
    """A replica's own failures trip its breaker while a flush round is under way (its
    reply held back): the trip reaches the other replica at once, on its own, not after
    that round's reply and another round."""
    a = stores()
    b = stores(prefix=a.prefix)
    ba, bb = await synced(a, b, window=CountWindow(4), minimum_calls=4)
    sending, held = asyncio.Event(), asyncio.Event()
    send = a.supervisor.send

    async def slow(commands: list[Any]) -> list[Any]:
        sending.set()
        await held.wait()  # the round's reply is late
        return await send(commands)

    a.supervisor.send = slow  # type: ignore[method-assign]
    try:
        with pytest.raises(ValueError, match="boom"):
            await ba.call(boom)
        a.wake()
        await asyncio.wait_for(sending.wait(), 3.0)  # a round carries it, and waits
        await trips(ba, 2, reaching=bb)  # [ok, failed, failed, failed]
        assert not held.is_set()
    finally:
        held.set()
    await a.sync()
    assert ba.state is CircuitState.OPEN


async def test_a_local_trip_goes_to_the_fleet_before_its_outcomes(
    stores: Callable[..., RedisStore],
) -> None:
    """With no round under way, a replica's own failures trip its breaker: the trip reaches
    the other replica on its own (one compare-and-set), while the round that flushes the
    outcomes that tripped it is held back; that round then adds nothing the fleet acts on."""
    a = stores()
    b = stores(prefix=a.prefix)
    ba, bb = await synced(a, b, window=CountWindow(4), minimum_calls=4)
    held = asyncio.Event()
    send = a.supervisor.send

    async def slow(commands: list[Any]) -> list[Any]:
        await held.wait()  # every round's reply is late
        return await send(commands)

    a.supervisor.send = slow  # type: ignore[method-assign]
    try:
        await trips(ba, 3, reaching=bb)  # [ok, failed, failed, failed], no round under way
        assert not held.is_set()
    finally:
        held.set()
    await a.sync()
    await b.sync()
    assert ba.state is CircuitState.OPEN
    assert bb.state is CircuitState.OPEN
    assert ba._core.gen == bb._core.gen  # type: ignore[attr-defined]


async def test_a_trip_pushed_on_its_own_is_not_sent_again_by_the_round(
    stores: Callable[..., RedisStore],
) -> None:
    """A round that runs while a trip's push is on its way flushes the outcomes that tripped
    it but sends no compare-and-set of its own: one transition per trip."""
    a = stores()
    ba = CircuitBreaker("dep", store=a, window=CountWindow(4), minimum_calls=4)
    await ba.call(ok)
    await a.sync()
    sent: list[Any] = []
    send = a.supervisor.send

    async def recorded(commands: list[Any]) -> list[Any]:
        sent.extend(commands)
        return await send(commands)

    a.supervisor.send = recorded  # type: ignore[method-assign]
    # [ok, failed, failed, failed]: it trips, no round under way
    await raises_each(3, ValueError, ba.call, boom, match="boom")
    await a.engine.next_round()
    transition = a.engine.scripts["transition"].sha
    flush = a.engine.scripts["flush"].sha
    assert any(c[1][0] == flush for c in sent)  # the outcomes went with the round
    assert not [c for c in sent if c[1][0] == transition]
    assert ba.state is CircuitState.OPEN
    assert ba._core.diverged is False  # type: ignore[attr-defined]


async def test_a_busy_event_loop_is_not_a_slow_redis(stores: Callable[..., RedisStore]) -> None:
    """Calls that hold the loop longer than the store's timeout: rounds time out late, are
    retried, and the store never turns degraded; the lag is reported."""
    events: list[Event] = []
    store = stores(timeout=0.05, listeners=[events.append])
    b = CircuitBreaker("dep", store=store)
    for _ in range(15):
        await b.call(ok)
        store.wake()
        await asyncio.sleep(0)  # the round starts, sends, and waits for its reply ...
        time.sleep(0.12)  # noqa: ASYNC251 - this task holds the loop past the timeout
        await asyncio.sleep(0)
    await store.sync()
    assert not any(isinstance(e, StoreDegraded) for e in events), events
    assert store.loop_lag > 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.5, 2.5, 4.0, 9.9, 10.0, 15.0]), st.floats(-0.1, 1.0)),
        max_size=30,
    )
)
def test_the_loop_lag_is_the_worst_of_the_last_ten_seconds(
    steps: list[tuple[float, float]],
) -> None:
    """``loop_lag`` is the worst lag measured in the last 10 s (0.0 with none): a gauge
    read every few seconds sees a stall that happened between two reads."""
    clock = FakeClock()
    store = RedisStore(aioredis.Redis.from_url("redis://127.0.0.1:1/0"), clock=clock)
    seen: list[tuple[float, float]] = []
    for advance, lag in steps:
        clock.advance(advance)
        store.supervisor.note_lag(lag)
        seen.append((clock.monotonic(), lag))
        recent = [late for when, late in seen if when > clock.monotonic() - 10.0]
        assert store.loop_lag == max([0.0, *recent])


# --- forks, recovery, shutdown -------------------------------------------------------------


async def test_a_forked_child_is_a_new_replica(redis_url: str, raw: aioredis.Redis) -> None:
    """A store built before a fork: the child has its own replica id and connections, its
    outcomes count in the shared window, and the fleet-wide bulkhead counts it apart."""
    name = unique_prefix()
    store = RedisStore.from_url(redis_url, prefix=name)
    b = CircuitBreaker("dep", store=store, window=CountWindow(1000), minimum_calls=1000)
    try:
        for _ in range(10):
            await b.call(ok)
        await store.sync()
        parent_id = store.replica

        async def child() -> str:  # in a forked child: the inherited store
            for _ in range(20):
                await b.call(ok)
            await store.sync()
            return store.replica

        child_id = in_forked_child(child)
        assert child_id
        assert child_id != parent_id
        for _ in range(10):
            await b.call(ok)
        await store.sync()
        replicas = await raw.hgetall(store.key("dep", "replicas"))
        counted = {k.decode(): int(v.split()[1]) for k, v in replicas.items()}
        assert counted == {parent_id: 20, child_id: 20}
        state = await raw.hgetall(store.key("dep", "state"))
        assert int(state[b"tc"]) == 40
    finally:
        await store.aclose()


async def test_a_store_forked_into_workers_limits_the_fleet(redis_url: str) -> None:
    """Built once, then forked into three workers (a preloading server): a fleet-wide
    bulkhead of 2 admits 2 of the 3 workers' held calls, never 3."""
    name = unique_prefix()
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys, time
        from resilience import Bulkhead, BulkheadFullError
        from resilience.store.redis import RedisStore
        store = RedisStore.from_url({redis_url!r}, prefix={name!r})  # before the fork
        pids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                async def work():
                    pool = Bulkhead(2, distributed=True, store=store, name="pool")
                    async def hold():
                        await asyncio.sleep(1.0)
                    try:
                        await pool.call(hold)
                        return "admitted"
                    except BulkheadFullError:
                        return "full"
                    finally:
                        await store.aclose()
                line = f"{{asyncio.run(work())}} {{store.replica}}\\n"
                os.write(1, line.encode())  # one write: the workers' lines never interleave
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        """
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.split()
    verdicts, replicas = lines[::2], lines[1::2]
    assert sorted(verdicts) == ["admitted", "admitted", "full"], done.stdout
    assert len(set(replicas)) == 3


async def test_redis_coming_back_does_not_close_a_rightly_open_breaker(
    redis_server: RedisServer,
) -> None:
    """Both replicas open on a failing dependency while Redis is away; when it returns, the
    breakers stay open (the local opens reach the fleet first): no replica closes."""
    events: list[Event] = []
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        name = unique_prefix()
        stores = [
            RedisStore.from_url(proxy.url_for("redis"), prefix=name, listeners=[events.append])
            for _ in range(2)
        ]
        try:
            options: dict[str, Any] = {
                "window": CountWindow(4),
                "minimum_calls": 4,
                "open_for": 30.0,
                "listeners": [events.append],
            }
            breakers = [CircuitBreaker("dep", store=s, **options) for s in stores]
            for b, s in zip(breakers, stores, strict=True):
                await b.call(ok)
                await s.sync()
            proxy.blackhole = True
            await until(lambda: all(s.degraded for s in stores), 5.0, "degraded")
            for b in breakers:
                await raises_each(4, (ValueError, CircuitOpenError), b.call, boom)
                assert b.state is CircuitState.OPEN
            proxy.blackhole = False
            proxy.cut()
            await until(lambda: not any(s.degraded for s in stores), 10.0, "recovered")
            for s in stores:
                await s.sync()
            await asyncio.sleep(0.2)
            assert [b.state for b in breakers] == [CircuitState.OPEN] * 2
            closed = [e for e in events if isinstance(e, StateChanged) and e.new is not e.old]
            assert all(e.new is CircuitState.OPEN for e in closed), closed
        finally:
            for s in stores:
                await s.aclose()


async def test_the_flusher_ends_when_cancelled_mid_round(redis_server: RedisServer) -> None:
    """Cancel the background tasks mid-round against a slowed Redis, again and again: every
    time they end (none goes on waiting for work that will never come)."""
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        proxy.latency = 0.02
        for i in range(25):
            store = RedisStore.from_url(proxy.url_for("redis"), prefix=f"cancel{i}", timeout=1.0)
            b = CircuitBreaker("dep", store=store)
            await b.call(ok)
            store.wake()
            await asyncio.sleep(0.005 + (i % 5) * 0.01)  # somewhere in the round
            tasks = list(store.engine._tasks)
            assert tasks
            tasks += store._config_tasks  # reading the live settings, if still under way
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            assert not pending, f"run {i}: {pending}"
            await store.client.aclose()


def test_an_unclosed_store_never_blocks_interpreter_exit(redis_url: str) -> None:
    """Breakers on a store that is entered but never closed, many of them, rounds in flight:
    asyncio.run returns and the process exits."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from resilience import CircuitBreaker
        from resilience.store.redis import RedisStore
        async def main():
            store = RedisStore.from_url({redis_url!r}, prefix="unclosed")
            await store.__aenter__()
            async def ok():
                return 1
            breakers = [CircuitBreaker(f"b{{i}}", store=store) for i in range(300)]
            for b in breakers:
                await b.call(ok)
            store.wake()
            await asyncio.sleep(0)
        asyncio.run(main())
        print("exited")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "exited" in done.stdout


def test_no_import_cycles_in_the_package() -> None:
    """Modules import in one direction (type-only imports included): no cycles."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "resilience"
    modules = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text())
        module_level = [*tree.body]
        for node in tree.body:  # type-only imports count too: they are what a reader follows
            if isinstance(node, ast.If):
                module_level.extend(node.body)
        for node in module_level:  # (imports inside functions are deliberate and lazy)
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}
    # the public import surface re-exports everything; nothing inside imports it
    graph = {k: v - {"resilience"} for k, v in graph.items() if k != "resilience"}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if seen.get(dep) == 1:
                cycle = stack[stack.index(dep) :]
                raise AssertionError(f"import cycle: {' -> '.join([*cycle, dep])}")
            if dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


async def test_manual_control_made_while_redis_is_away_reaches_the_fleet(
    redis_server: RedisServer,
) -> None:
    """force_open() on a replica that cannot reach Redis applies there at once, and reaches
    every replica once Redis answers again (the fleet's older state does not undo it)."""
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        name = unique_prefix()
        a = RedisStore.from_url(proxy.url_for("redis"), prefix=name)
        b = RedisStore.from_url(redis_server.url, prefix=name)
        try:
            ba = CircuitBreaker("dep", store=a)
            bb = CircuitBreaker("dep", store=b)
            await ba.call(ok)
            await bb.call(ok)
            await a.sync()
            await b.sync()
            proxy.blackhole = True
            await until(lambda: a.degraded, 5.0, "degraded")
            await ba.force_open()
            assert ba.state is CircuitState.FORCED_OPEN
            assert bb.state is CircuitState.CLOSED
            proxy.blackhole = False
            proxy.cut()
            await until(lambda: not a.degraded, 10.0, "recovered")
            await a.sync()
            await until(lambda: bb.state is CircuitState.FORCED_OPEN, 3.0, "the fleet forced")
            assert ba.state is CircuitState.FORCED_OPEN
        finally:
            await a.aclose()
            await b.aclose()


async def test_counts_of_an_older_generation_trip_nothing(
    stores: Callable[..., RedisStore],
) -> None:
    """A flush reply overtaken by news (here: a reset that came first) carries the counts of
    the generation before it: they must not open the breaker at the new generation."""
    from resilience.store.redis.primitives import FleetState, FlushReply, Outcomes

    store = stores()
    b = CircuitBreaker("dep", store=store, window=CountWindow(4), minimum_calls=4)
    await raises_each(4, (ValueError, CircuitOpenError), b.call, boom)
    await store.sync()
    assert b.state is CircuitState.OPEN
    await b.reset()
    core = b._core
    assert core.state is CircuitState.CLOSED
    before = core.gen
    stale = FlushReply(FleetState(CircuitState.CLOSED, before - 2, 0, 0, 0, 0), 4, 4, 0)
    sent = Outcomes(before - 2, 0, 0, 0, 1)
    assert core.on_flush(sent, stale, 0.0, False) is None  # before the fix: OPEN at `before`
    assert core.state is CircuitState.CLOSED
    assert core.gen == before


# --- half-open across replicas that die or lose replies ------------------------------------


def _probe_options() -> dict[str, Any]:
    return {"window": CountWindow(2), "minimum_calls": 2, "open_for": 10.0, "probe_lease": 300.0}


async def test_a_verdict_whose_reporter_died_is_settled_by_the_next_caller(
    stores: Callable[..., RedisStore], clock: FakeClock
) -> None:
    """The last probe's outcome reached Redis but its replica died before pushing the
    verdict: the next replica asking for a lease works the verdict out and closes the breaker
    (before: HALF_OPEN for good, every call rejected, on every replica)."""
    name = unique_prefix()
    dead = stores(clock=clock, prefix=name)
    bd = CircuitBreaker("dep", store=dead, **_probe_options())
    await raises_each(2, (ValueError, CircuitOpenError), bd.call, boom)
    await dead.sync()
    assert bd.state is CircuitState.OPEN
    clock.advance(10)
    core = bd._core
    granted = await dead.engine.probe(core, 4242)  # the dying replica's probe lease ...
    assert granted.granted
    report = dead._scripts["report"]  # ... and its report, counted; then it is gone
    await report(
        keys=[core.keys[0], core.keys[2]], args=[granted.fleet.gen, f"{dead.replica}:4242", 0, 0]
    )
    live = stores(clock=clock, prefix=name)
    bl = CircuitBreaker("dep", store=live, **_probe_options())
    await live.sync()
    assert bl.state is CircuitState.HALF_OPEN
    assert await bl.call(ok) == "ok"
    assert bl.state is CircuitState.CLOSED


async def test_a_fleet_probe_lease_is_reported_even_if_the_store_degraded_meanwhile(
    stores: Callable[..., RedisStore], clock: FakeClock, raw: aioredis.Redis
) -> None:
    """A probe granted by Redis whose store turns degraded during the call: its outcome still
    goes to Redis once it answers, so the lease is not left behind for probe_lease."""
    store = stores(clock=clock)
    b = CircuitBreaker("dep", store=store, **_probe_options())
    await raises_each(2, (ValueError, CircuitOpenError), b.call, boom)
    await store.sync()
    clock.advance(10)

    async def probe_during_a_blip() -> str:
        store.supervisor.fail(TimeoutError("a blip"))  # as a timed-out round would
        return "ok"

    assert await b.call(probe_during_a_blip) == "ok"
    assert store.degraded
    clock.advance(1)  # the reconnect's backoff
    await until(lambda: not store.degraded, 10, "reconnected")
    await store.sync()
    await store.sync()
    assert await raw.zcard(store.key("dep", "probes")) == 0
    assert (await raw.hget(store.key("dep", "state"), "state")) == b"closed"


async def test_a_new_replica_does_not_undo_an_operators_force_open(
    stores: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    """A replica whose own failures trip before it has read the fleet's state once adopts a
    forced state instead of pushing its open over it."""
    name = unique_prefix()
    operator = stores(prefix=name)
    forced = CircuitBreaker("dep", store=operator, **_probe_options())
    await operator.sync()
    await forced.force_open()
    newcomer = stores(prefix=name)
    b = CircuitBreaker("dep", store=newcomer, **_probe_options())
    # before its first round: it trips on its own
    await raises_each(2, (ValueError, CircuitOpenError), b.call, boom)
    await newcomer.sync()
    await newcomer.sync()
    assert (await raw.hget(newcomer.key("dep", "state"), "state")) == b"forced_open"
    assert b.state is CircuitState.FORCED_OPEN


async def test_a_trip_before_the_first_fleet_reply_is_not_overridden(
    stores: Callable[..., RedisStore],
) -> None:
    """A replica whose own outcomes trip its breaker before it ever heard from the fleet keeps
    it open, and the fleet opens with it (no OPEN -> CLOSED without a probe)."""
    events: list[Event] = []
    store = stores()
    b = CircuitBreaker(
        "early", store=store, window=CountWindow(4), minimum_calls=4, listeners=[events.append]
    )
    for _ in range(4):
        with contextlib.suppress(ValueError, CircuitOpenError):
            await b.call(boom)
    assert b.state is CircuitState.OPEN
    for _ in range(3):
        await store.sync()
    assert b.state is CircuitState.OPEN
    moves = [(e.old, e.new) for e in events if isinstance(e, StateChanged)]
    assert (CircuitState.OPEN, CircuitState.CLOSED) not in moves
    other = stores(prefix=store.prefix)
    again = CircuitBreaker("early", store=other, window=CountWindow(4), minimum_calls=4)
    await other.sync()
    assert again.state is CircuitState.OPEN


def test_a_trip_after_the_store_closed_sends_nothing(redis_url: str) -> None:
    """A shared breaker that trips after its store was closed (a call finishing during
    shutdown, or a later event loop) raises its call's own error and sends nothing: no push
    on the store's old (closed) loop, no new connection."""
    store = RedisStore.from_url(redis_url, prefix=unique_prefix("closed"))
    breaker = CircuitBreaker("dep", store=store, window=CountWindow(4), minimum_calls=4)

    async def first() -> None:
        await breaker.call(ok)
        await store.sync()
        await store.aclose()

    async def second() -> list[BaseException]:
        outcomes: list[BaseException] = []
        for _ in range(3):  # [ok, failed, failed, failed]: it trips
            try:
                await breaker.call(boom)
            except Exception as exc:
                outcomes.append(exc)
        await asyncio.sleep(0.05)  # a push, if any, would run now
        return outcomes

    asyncio.run(first())
    outcomes = asyncio.run(second())
    assert [type(e) for e in outcomes] == [ValueError] * 3
    assert breaker.state is CircuitState.OPEN  # locally
