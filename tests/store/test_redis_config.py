"""Live settings across replicas on a real Redis: the other replica is its own OS process
(``benchmarks/config_worker.py``), so nothing is shared but Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from resilience import CircuitBreaker, StoreUnavailableError, Timeout
from resilience.store import config as live
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import advance, read_line, until
from ..redis_server import RedisServer

WORKER = str(Path(__file__).parents[2] / "benchmarks" / "config_worker.py")
NAME = "svc"

Replica = Callable[[str], subprocess.Popen[str]]


@pytest.fixture
def replica(redis_url: str) -> Iterator[Replica]:
    """Start other replicas (processes) on a prefix; each is told to quit at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(prefix: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, WORKER, redis_url, prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def said(proc: subprocess.Popen[str], event: str) -> dict[str, Any]:
    """The next line ``proc`` says, which must be ``event``."""
    line = json.loads(read_line(proc, 20.0, "replica"))
    assert line["event"] == event, line
    return dict(line)


def ready_pair(
    stores: Callable[..., RedisStore], replica: Replica
) -> tuple[RedisStore, subprocess.Popen[str]]:
    """A store of this process, and another replica (a process of its own) on its prefix,
    ready."""
    store = stores()
    other = replica(store.prefix)
    said(other, "ready")
    return store, other


def show(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The values ``proc`` runs now (past the changes it reports first)."""
    assert proc.stdin is not None
    proc.stdin.write("show\n")
    proc.stdin.flush()
    while True:  # the changes it reported meanwhile come first
        line = json.loads(read_line(proc, 20.0, "replica"))
        if line["event"] == "values":
            return dict(line)
        assert line["event"] == "changed", line


async def test_a_change_reaches_the_other_replica(
    stores: Callable[..., RedisStore], replica: Replica
) -> None:
    """A change made in one process is applied by the other replica's policies."""
    store = stores()
    other = replica(store.prefix)
    assert said(other, "ready")["open_for"] == 5.0
    sent = time.monotonic_ns()
    version = await store.configure(NAME, open_for=9.0, seconds=0.25, max_concurrent=2)
    changed = said(other, "changed")
    assert changed["version"] == version
    print(f"pushed in {(changed['ns'] - sent) / 1e6:.2f} ms")  # bounded by the 20 s read
    values = show(other)
    assert (values["open_for"], values["seconds"], values["max_concurrent"]) == (9.0, 0.25, 2)


async def test_a_replica_started_later_runs_the_current_values(
    stores: Callable[..., RedisStore], replica: Replica
) -> None:
    """A replica that starts after the change reads it before it says it is ready."""
    store = stores()
    version = await store.configure(NAME, open_for=11.0, seconds=0.5)
    other = replica(store.prefix)
    assert said(other, "changed")["version"] == version  # read as it starts
    ready = said(other, "ready")
    assert (ready["open_for"], ready["seconds"]) == (11.0, 0.5)


async def test_a_bad_value_changes_nothing_on_any_replica(
    stores: Callable[..., RedisStore], replica: Replica
) -> None:
    """A value a replica would refuse is refused before anything is written or pushed."""
    store, other = ready_pair(stores, replica)
    await store.sync()  # the other replica's values in code are in Redis now
    version = await store.configure(NAME, open_for=8.0)
    said(other, "changed")
    with pytest.raises(ValueError, match="open_for must be finite and > 0, got -1"):
        await store.configure(NAME, open_for=-1)
    with pytest.raises(ValueError, match=r"minimum_calls \(60\) is larger than the count window"):
        await store.configure(NAME, minimum_calls=60)  # the other replica's window is 50
    state = await store.config(NAME)
    assert (state.version, len(state.history)) == (version, 1)
    assert show(other)["open_for"] == 8.0


async def test_rollback_reaches_every_replica(
    stores: Callable[..., RedisStore], replica: Replica
) -> None:
    """A rollback is a change like any other: pushed, applied, in the history."""
    store, other = ready_pair(stores, replica)
    await store.configure(NAME, open_for=6.0)
    await store.configure(NAME, open_for=7.0)
    said(other, "changed")
    said(other, "changed")
    version = await store.rollback(NAME)
    assert said(other, "changed")["version"] == version
    assert show(other)["open_for"] == 6.0
    await store.rollback(NAME, version=0)
    said(other, "changed")
    assert show(other)["open_for"] == 5.0


async def test_a_replica_whose_redis_is_gone_keeps_its_values(redis_server: RedisServer) -> None:
    """Redis away: the policies run on with the last values; a change fails, changing nothing."""
    store = RedisStore.from_url(redis_server.url, timeout=0.2)
    try:
        breaker = CircuitBreaker(NAME, store=store, open_for=5.0)
        timeout = Timeout(1.0, name=NAME)
        await store.sync()
        await store.configure(NAME, open_for=12.0, seconds=0.5)
        redis_server.stop()
        with pytest.raises(StoreUnavailableError):
            await store.configure(NAME, open_for=1.0)
        assert (breaker.config.open_for, timeout.seconds) == (12.0, 0.5)
        late = Timeout(1.0, name=NAME)  # built while Redis is away: the values this process has
        assert late.seconds == 0.5
    finally:
        await store.aclose()


async def test_any_sequence_leaves_the_other_replica_on_the_head(
    stores: Callable[..., RedisStore], replica: Replica
) -> None:
    """After any run of changes and rollbacks (seeded), the other replica runs the head."""
    rng = random.Random(7)
    store, other = ready_pair(stores, replica)
    for _ in range(40):
        history = await store.config_history(NAME)
        if history and rng.random() < 0.3:
            versions = [0, *(c.version for c in history)]
            version = await store.rollback(NAME, version=rng.choice(versions))
        else:
            values = {"open_for": rng.choice([1.0, 2.5, 7.0]), "seconds": rng.choice([0.1, 2.0])}
            version = await store.configure(NAME, **rng.choice([values, {"open_for": 3.0}]))
        head = await store.config(NAME)
        assert head.version == version
        want = {"open_for": 5.0, "seconds": 1.0, **head.values}
        deadline = time.monotonic() + 10
        while True:  # a change that touches no value of the breaker is no "changed" line
            values = show(other)
            if (values["open_for"], values["seconds"]) == (want["open_for"], want["seconds"]):
                break
            assert time.monotonic() < deadline, (values, want)


async def test_a_message_that_does_not_parse_is_ignored(
    stores: Callable[..., RedisStore], raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage that looks like a change is logged and ignored; real changes still arrive."""
    store = stores()
    other = stores(prefix=store.prefix)  # another replica's store, listening
    Timeout(1.0, name=NAME)
    await other.sync()
    # (the CLI, run in this process by other tests, quiets this logger to errors)
    caplog.set_level(logging.WARNING, logger="resilience.redis")
    channel = f"{store.prefix}:events"

    async def logged() -> bool:  # sent again until the other replica listens and logs it
        await raw.publish(channel, b'{"config": 1}')
        await raw.publish(channel, b"{not json")
        await asyncio.sleep(0.01)
        return any("unparsable change" in r.getMessage() for r in caplog.records)

    await until(logged, what="the garbage logged")
    version = await store.configure(NAME, seconds=0.5)
    await until(lambda: other._config_runs[NAME][1] == version, what="the change pushed")


async def test_settings_data_that_does_not_parse_costs_only_itself(
    stores: Callable[..., RedisStore], raw: Any
) -> None:
    """Values, values in code and a history entry that no replica wrote: the name's settings
    read without them, reported; the store does not degrade (its breakers stay shared)."""
    store = stores()
    version = await store.configure(NAME, seconds=0.5)
    await raw.hset(store.key(NAME, "config"), "values", b"{not json")
    await raw.hset(store.key(NAME, "config:base"), "timeout", b"\xff\xfe")
    await raw.lpush(store.key(NAME, "config:log"), b"[1, 2]")
    state = await store.config(NAME)
    assert not store.degraded
    assert state.version == version
    assert state.values == {}
    assert [c.version for c in state.history] == [version]


def test_a_handler_that_fails_loses_its_message_not_the_subscription(
    stores: Callable[..., RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    """A message whose handler raises is logged; the listening loop is not torn down."""
    subscriber = stores().engine.subscriber

    def failing(_: Any) -> None:
        raise RuntimeError("handler failed")

    subscriber.on_flight = failing
    subscriber.on_config = failing
    subscriber.on_message(b"flight k")
    subscriber.on_message(b'{"config": "x"}')
    assert len([r for r in caplog.records if "could not be applied" in r.getMessage()]) == 2


async def test_many_names_read_their_settings_in_a_few_pipelines(
    stores: Callable[..., RedisStore], redis_url: str
) -> None:
    """Policies made by the hundred (a fleet of breakers built at start-up) read their live
    settings a chunk of names per round trip, one chunk at a time: the store is not flooded
    with a call per name at once (which exhausted the connection pool and timed out into an
    outage with 10,000 names). Each name still reports its values in code and runs the
    current settings."""
    import redis as sync_redis

    store = stores()
    await store.configure("b7", open_for=7.0)
    sha = store._scripts["config"].sha
    sends: list[int] = []  # the settings' commands in each pipeline
    in_flight = peak = 0
    send = store.supervisor.send

    async def counted(commands: list[Any]) -> list[Any]:
        nonlocal in_flight, peak
        sends.append(sum(argv[0] == sha for _, argv in commands))
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await send(commands)
        finally:
            in_flight -= 1

    call = store.engine.call
    calls = 0

    async def counted_call(awaitable: Any, **options: Any) -> Any:
        nonlocal calls, in_flight, peak
        calls += 1
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await call(awaitable, **options)
        finally:
            in_flight -= 1

    store.supervisor.send = counted  # type: ignore[method-assign]
    store.engine.call = counted_call  # type: ignore[method-assign]
    breakers = [CircuitBreaker(f"b{i}", store=store) for i in range(300)]
    await store.sync()
    assert peak <= 2  # a chunk of settings, and perhaps a round
    assert calls <= 2
    assert [n for n in sends if n] == [50] * 6  # 300 names, 50 a pipeline
    assert breakers[7].config.open_for == 7.0
    client = sync_redis.Redis.from_url(redis_url)
    try:
        kept = client.keys(f"{store.prefix}*b2*config:base*")
    finally:
        client.close()
    assert kept


async def forget_settings(raw: Any, store: RedisStore) -> None:
    """Redis loses the settings of ``NAME`` (a restart without persistence, their TTL)."""
    await raw.delete(*(store.key(NAME, s) for s in ("config", "config:log", "config:base")))


async def operator(url: str, store: RedisStore, *values: str) -> None:
    """Change ``NAME``'s settings from another process (the command line), as an operator."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "resilience", "configure", NAME, *values, "--redis", url),
        *("--prefix", store.prefix),
        stdout=subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_a_change_after_redis_lost_the_settings_reaches_every_replica(
    stores: Callable[..., RedisStore], replica: Replica, raw: Any
) -> None:
    """Versions start again at 1 once Redis lost a name's settings: the next change, though
    its version is one a replica ran before, is run by the replica that made it and by the
    other one (pushed to it)."""
    store = stores()
    mine = CircuitBreaker(NAME, store=store, open_for=5.0)
    other = replica(store.prefix)
    said(other, "ready")
    assert await store.configure(NAME, open_for=8.0) == 1
    said(other, "changed")
    await forget_settings(raw, store)
    assert await store.configure(NAME, open_for=20.0) == 1
    assert mine.config.open_for == 20.0
    deadline = time.monotonic() + 10  # (it says no "changed" line for a version it ran)
    while show(other)["open_for"] != 20.0:
        assert time.monotonic() < deadline, "the change not run by the other replica"


async def test_a_replica_that_missed_the_change_takes_it_when_it_reads_again(
    stores: Callable[..., RedisStore], raw: Any, redis_url: str
) -> None:
    """A replica that ran version 3 and missed the push of the first changes after Redis lost
    the data reads them (lower versions of another history) when it reads its names again,
    and the changes after them (a rollback to values it ran: a newer version)."""
    store = stores()
    mine = CircuitBreaker(NAME, store=store, open_for=5.0)
    await store.sync()
    for open_for in (6.0, 7.0, 8.0):
        await store.configure(NAME, open_for=open_for)
    store.engine.subscriber.on_config = lambda _: None  # the pushes are lost from now on
    await forget_settings(raw, store)
    await operator(redis_url, store, "open_for=20")
    await operator(redis_url, store, "open_for=21")
    store._config_waiting.add(NAME)  # as when its subscription is replaced
    await store._config_settled()
    assert mine.config.open_for == 21.0
    await operator(redis_url, store, "--rollback")  # 20 again, as version 3 of the new history
    store._config_waiting.add(NAME)
    await store._config_settled()
    assert mine.config.open_for == 20.0


def reply_late(store: RedisStore, meanwhile: Callable[[], Awaitable[None]]) -> None:
    """The reply to each change ``store`` makes is handled only once ``meanwhile()`` ran."""
    script = store._script

    async def late(name: str, keys: list[str], args: list[Any]) -> Any:
        reply = await script(name, keys, args)
        if args[0] == "set":
            await meanwhile()
        return reply

    store._script = late  # type: ignore[method-assign]


async def test_a_replica_does_not_go_back_to_its_own_older_change(
    stores: Callable[..., RedisStore], redis_url: str
) -> None:
    """A replica whose reply to its change comes after the push of a newer change (an
    operator's) keeps the newer one."""
    store = stores()
    mine = CircuitBreaker(NAME, store=store, open_for=5.0)
    await store.sync()

    async def newer_change() -> None:  # pushed before the reply to ours is handled
        await operator(redis_url, store, "open_for=20")
        await until(lambda: mine.config.open_for == 20.0, what="the newer change pushed")

    reply_late(store, newer_change)
    assert await store.configure(NAME, open_for=9.0) == 1
    assert mine.config.open_for == 20.0
    assert (await store.config(NAME)).version == 2


async def test_a_replica_keeps_the_settings_of_the_names_it_follows_only(
    stores: Callable[..., RedisStore],
) -> None:
    """Changes of names no policy of this process follows are not kept (read when one is
    built), and the names its policies stopped following are forgotten: memory follows the
    names in use, not the names changed fleet-wide."""
    store = stores()
    mine = CircuitBreaker("mine", store=store)
    await store.sync()
    admin = stores(prefix=store.prefix)  # follows nothing
    for i in range(200):
        await admin.configure(f"other-{i}", open_for=9.0)
    await admin.configure("mine", open_for=7.0)
    await until(lambda: mine.config.open_for == 7.0, what="the change pushed")  # the last one
    assert set(store._config_runs) == {"mine"}
    assert not [name for name in live._live if name.startswith("other-")]
    for i in range(200):  # policies made per key and dropped, each changed meanwhile
        policy = CircuitBreaker(f"gone-{i}", store=store)
        await admin.configure(f"gone-{i}", open_for=9.0)
        await until(lambda p=policy: p.config.open_for == 9.0, what="the change pushed")
    policy = CircuitBreaker("other-7", store=store)  # built later: reads its settings
    await store.sync()
    assert policy.config.open_for == 9.0
    assert len(store._config_runs) < 100
    assert len(live._live) < 100


async def test_a_read_of_the_lost_history_does_not_undo_the_change_pushed_meanwhile(
    stores: Callable[..., RedisStore], raw: Any, redis_url: str
) -> None:
    """A read answered before Redis lost the settings, whose reply comes after the push of
    the next change (another history), does not take the replica back: it reads again."""
    store = stores()
    mine = CircuitBreaker(NAME, store=store, open_for=5.0)
    await store.sync()
    await store.configure(NAME, open_for=8.0)
    send = store.supervisor.send
    late = [True]

    async def late_reply(commands: list[Any]) -> list[Any]:
        replies = await send(commands)
        if late.pop() if late else False:  # the first read: its reply comes after all this
            await forget_settings(raw, store)
            await operator(redis_url, store, "open_for=20")
            await until(lambda: mine.config.open_for == 20.0, what="the change pushed")
        return replies

    store.supervisor.send = late_reply  # type: ignore[method-assign]
    store._config_waiting.add(NAME)  # as when its subscription is replaced
    await store._config_settled()
    assert mine.config.open_for == 20.0


async def test_the_reply_to_a_change_made_before_redis_lost_it_does_not_undo_the_next(
    stores: Callable[..., RedisStore], raw: Any, redis_url: str
) -> None:
    """A replica whose reply to its change comes after Redis lost the settings and the next
    change (another history) was pushed keeps the next one."""
    store = stores()
    mine = CircuitBreaker(NAME, store=store, open_for=5.0)
    await store.sync()
    await store.configure(NAME, open_for=8.0)

    async def lost_then_changed() -> None:  # before the reply to ours is handled
        await forget_settings(raw, store)
        await operator(redis_url, store, "open_for=20")
        await until(lambda: mine.config.open_for == 20.0, what="the change pushed")

    reply_late(store, lost_then_changed)
    assert await store.configure(NAME, open_for=9.0) == 2
    assert mine.config.open_for == 20.0


async def changed_elsewhere(
    stores: Callable[..., RedisStore], redis_url: str
) -> tuple[FakeClock, RedisStore, str, Callable[[list[Any]], Awaitable[list[Any]]]]:
    """A store on a fake clock whose name ``NAME`` an operator changed (open_for 20) before
    any policy of it was built; the settings script's sha, and the store's own ``send``."""
    clock = FakeClock()
    store = stores(clock=clock)
    await operator(redis_url, store, "open_for=20")
    return clock, store, store._scripts["config"].sha, store.supervisor.send


async def test_a_read_of_the_settings_that_failed_is_tried_again(
    stores: Callable[..., RedisStore], redis_url: str
) -> None:
    """A replica whose first read of its names' settings fails (Redis stalled a moment: a
    busy script, the loop late) reads them again after a backoff, and runs the current
    values: it kept its values in code until the next unrelated event, if any."""
    clock, store, sha, send = await changed_elsewhere(stores, redis_url)
    stalls = 1

    async def stalls_once(commands: list[Any]) -> list[Any]:
        nonlocal stalls
        if stalls and any(argv[0] == sha for _, argv in commands):
            stalls -= 1
            raise TimeoutError("Redis did not answer in time")
        return await send(commands)

    store.supervisor.send = stalls_once  # type: ignore[method-assign]
    mine = CircuitBreaker(NAME, store=store, open_for=5.0)
    await store.sync()
    assert stalls == 0
    assert mine.config.open_for == 5.0  # not read yet
    await advance(clock, 2.0)
    await until(lambda: mine.config.open_for == 20.0, 5.0, "the settings read again")


async def test_an_error_reply_for_one_name_costs_only_that_name(
    stores: Callable[..., RedisStore], redis_url: str
) -> None:
    """The settings of many names are read in one pipeline: a name whose command Redis
    answers with an error (out of memory, a script error) is read again later; the other
    names of the pipeline run their settings at once."""
    from redis.exceptions import ResponseError

    clock, store, sha, send = await changed_elsewhere(stores, redis_url)
    refused = 1

    async def one_refused(commands: list[Any]) -> list[Any]:
        nonlocal refused
        replies = await send(commands)
        for i, (_, argv) in enumerate(commands):
            if refused and argv[0] == sha and "other" in argv[2]:
                refused -= 1
                replies[i] = ResponseError("OOM command not allowed")
        return replies

    store.supervisor.send = one_refused  # type: ignore[method-assign]
    other = CircuitBreaker("other", store=store, open_for=5.0)
    mine = CircuitBreaker(NAME, store=store, open_for=5.0)
    await store.sync()
    assert refused == 0
    assert mine.config.open_for == 20.0  # read, though in the pipeline of the refused name
    assert "other" in store._config_waiting
    await advance(clock, 2.0)
    await until(lambda: "other" not in store._config_waiting, 5.0, "the refused name read again")
    assert other.config.open_for == 5.0
