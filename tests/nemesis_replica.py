"""One replica of the nemesis soak (``tests/nemesis.py``), as its own OS process.

Usage: ``python tests/nemesis_replica.py CONFIG_FILE`` (JSON). The replica serves requests from its
own load loops through ``ResilienceMiddleware`` (a fleet-wide bulkhead and rate limit on a
``RedisStore`` reached through Sentinel and the nemesis's fault proxies); the app calls an
upstream through a shared ``CircuitBreaker``, which a background job also calls steadily.
Every 100 ms it prints one JSON object on stdout with what happened since the last one:

* ``"q"``: requests, each ``[t0, h_in, h_out, t1, status, flags, breaker_overhead,
  store_calls, in_store]``:
  ``t0``/``t1`` when the request entered/left the middleware, ``h_in``/``h_out`` when it
  entered/left the app handler (-1: rejected before it), the status (200 ok, 500 the
  upstream failed, 502 the breaker refused, 429, 503; -1 the middleware raised), ``flags``
  (1: a rate-limit store call of this request failed, 2: a bulkhead-share store call failed,
  4: the request started a store call while its store was degraded), the time the breaker
  added to the upstream's own (seconds), and the rate-limit and share calls the request
  made itself (not those it waited on with others): how many, how long in all;
* ``"b"``: the shared breaker's ``[t, state, generation]`` whenever it changed;
* ``"e"``: the store's ``[t, "degraded" | "recovered" | "reset", detail]`` events;
* ``"l"``: ``[t, late]``: the event loop woke ``late`` seconds after a 10 ms tick, at ``t``;
* ``"x"``: exceptions the middleware raised (text).

Times are ``time.monotonic()``, one clock for every process of the machine.

Redis's clock is stepped by the nemesis: every script of the store gets as its time (instead
of Redis ``TIME``) this machine's monotonic time plus an offset that the nemesis writes into
a shared 16-byte file (``config["control"]``), so one write steps the time every replica's
scripts see. The store's own timers and the policies' clocks stay this process's monotonic
clock, as they would be when a real Redis's clock is stepped. The same file carries the
upstream's health (``sick``).

The replica stops on a line on stdin (or EOF: the nemesis is gone), or after
``config["limit"]`` seconds, and then prints ``{"done": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import mmap
import os
import random
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from redis.asyncio.retry import Retry as RedisRetry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from resilience.integrations.asgi import ResilienceMiddleware

from resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    Event,
    StoreDataReset,
    StoreDegraded,
    StoreRecovered,
    StoreUnavailableError,
)
from resilience.store.redis import RedisStore
from resilience.store.redis.store import _lean_handshake

CONTROL = struct.Struct("<dd")  # the shared file: Redis's clock offset (s), upstream sick (0/1)
RATE_FAILED, SHARE_FAILED, CALLED_DOWN = 1, 2, 4  # request flags
REPORT_EVERY = 0.1
TICK = 0.01
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/work",
    "raw_path": b"/work",
    "query_string": b"",
    "headers": [],
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 80),
}

now = time.monotonic


class Record:
    """What one request went through (the ``"q"`` rows of the module docstring)."""

    __slots__ = (
        "breaker",
        "flags",
        "h_in",
        "h_out",
        "in_store",
        "status",
        "store_calls",
        "t0",
        "t1",
        "task",
    )

    def __init__(self) -> None:
        self.t0 = now()
        self.h_in = self.h_out = self.t1 = -1.0
        self.status = self.flags = self.store_calls = 0
        self.breaker = self.in_store = 0.0
        self.task = asyncio.current_task()  # the task serving it (not one it started)

    def row(self) -> list[Any]:
        return [
            self.t0,
            self.h_in,
            self.h_out,
            self.t1,
            self.status,
            self.flags,
            self.breaker,
            self.store_calls,
            self.in_store,
        ]


# the request being served (a task started from it, such as a share's renewal, inherits the
# variable but is not the request: see Record.task)
_request: contextvars.ContextVar[Record | None] = contextvars.ContextVar(
    "nemesis_request", default=None
)


class Control:
    """The nemesis's shared file, read-only here: Redis's clock offset, the upstream's health."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), CONTROL.size, access=mmap.ACCESS_READ)

    def read(self) -> tuple[float, bool]:
        offset, sick = CONTROL.unpack_from(self._map, 0)
        return offset, sick != 0.0

    def redis_ms(self) -> str:
        """What a script gets as its time: this machine's clock plus the offset, in ms."""
        return repr((now() + self.read()[0]) * 1000)


def _mine() -> Record | None:
    """The record of the request this task serves (None: not a request's own task)."""
    record = _request.get()
    if record is not None and record.task is asyncio.current_task():
        return record
    return None


@contextlib.asynccontextmanager
async def _store_call(store: RedisStore, failed: int) -> AsyncIterator[None]:
    """Note a request's own store call: how long it took, whether it began while the store
    was degraded, and (``failed``) that it failed."""
    record = _mine()
    if record is None:
        yield
        return
    if store.degraded:
        record.flags |= CALLED_DOWN
    started = now()
    try:
        yield
    except StoreUnavailableError:
        record.flags |= failed
        raise
    finally:
        record.store_calls += 1
        record.in_store += now() - started


class WatchedStore(RedisStore):
    """A ``RedisStore`` that notes, on the request that makes them, its rate-limit and share
    calls: how many and how long; one that failed (the request may have been admitted by
    this replica's local limits); one begun while the store was degraded (it waits on a
    store known to be down)."""

    async def rate_take_many(self, key: str, **options: Any) -> tuple[int, float]:
        async with _store_call(self, RATE_FAILED):
            return await super().rate_take_many(key, **options)

    async def lease_share(self, key: str, holder: str, **options: Any) -> tuple[int, int, int]:
        async with _store_call(self, SHARE_FAILED):
            return await super().lease_share(key, holder, **options)


class MappedSentinel(Sentinel):
    """A Sentinel client that reaches each Redis through the nemesis's proxy for it."""

    def __init__(self, ports: dict[int, int], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ports = ports

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        _, port = await super().discover_master(service_name)
        return "127.0.0.1", self.ports.get(int(port), int(port))


class UpstreamFailed(Exception):
    """The upstream behind the breaker failed (the nemesis made it sick)."""


class Replica:
    """The replica's policies, load loops and reports (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], control: Control, store: WatchedStore) -> None:
        self.cfg = cfg
        self.control = control
        self.store = store
        self.rng = random.Random(cfg["seed"])
        self.requests: list[list[Any]] = []
        self.samples: list[list[Any]] = []
        self.events: list[list[Any]] = []
        self.lags: list[list[float]] = []
        self.errors: list[str] = []
        self.open: dict[int, Record] = {}
        self.counts: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self.middleware = ResilienceMiddleware(
            self.app,
            max_concurrent=cfg["limit"],
            rate=cfg["rate"],
            burst=cfg["burst"],
            store=store,
            name=cfg["name"],
        )
        self.breaker = CircuitBreaker(
            f"{cfg['name']}-upstream",
            store=store,
            window=CountWindow(20),
            minimum_calls=10,
            failure_ratio=0.5,
            open_for=0.5,
            half_open_calls=2,
            probe_lease=2.0,
        )

    def on_event(self, event: Event) -> None:
        if isinstance(event, StoreDegraded):
            self.events.append([now(), "degraded", event.error[:120]])
        elif isinstance(event, StoreRecovered):
            self.events.append([now(), "recovered", ""])
        elif isinstance(event, StoreDataReset):
            self.events.append([now(), "reset", event.key])

    async def upstream(self, spent: list[float]) -> str:
        """The dependency: a seeded service time; fails while the nemesis says it is sick."""
        started = now()
        low, high = self.cfg["service"]
        await asyncio.sleep(self.rng.uniform(low, high))
        spent[0] = now() - started
        if self.control.read()[1]:
            raise UpstreamFailed("sick")
        return "ok"

    async def through_breaker(self) -> tuple[int, float]:
        """Call the upstream through the breaker: the status, and the breaker's own time."""
        spent = [0.0]
        started = now()
        try:
            await self.breaker.call(self.upstream, spent)
            status = 200
        except UpstreamFailed:
            status = 500
        except CircuitOpenError:
            status = 502
        return status, now() - started - spent[0]

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI app: its time in the handler is what the fleet's concurrency counts."""
        record = _request.get()
        assert record is not None
        record.h_in = now()
        try:
            status, record.breaker = await self.through_breaker()
        finally:
            record.h_out = now()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def one_request(self) -> None:
        record = Record()
        self.open[id(record)] = record
        token = _request.set(record)
        sent: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent.append(message["status"])

        try:
            await self.middleware(dict(SCOPE), receive, send)
            status = sent[0] if sent else -2
        except Exception as exc:  # a broken promise: reported, the check fails on it
            status = -1
            self.errors.append(repr(exc)[:300])
        finally:
            _request.reset(token)
        record.t1 = now()
        record.status = status
        del self.open[id(record)]
        self.requests.append(record.row())
        key = str(status)
        self.counts[key] = self.counts.get(key, 0) + 1

    async def client(self, seed: int) -> None:
        """One load loop: a request, a seeded pause, and again, until told to stop."""
        rng = random.Random(seed)
        low, high = self.cfg["think"]
        while not self.stopping.is_set():
            await self.one_request()
            await asyncio.sleep(rng.uniform(low, high))

    async def background(self) -> None:
        """A job calling the upstream through the breaker every 20 ms (no middleware), so
        every replica keeps learning the breaker's state by its own calls."""
        while not self.stopping.is_set():
            await self.through_breaker()
            await asyncio.sleep(0.02)

    async def ticker(self) -> None:
        """Every 10 ms: how late the loop woke, and the breaker's state when it changed."""
        last: tuple[str, int] | None = None
        before = now()
        while True:
            await asyncio.sleep(TICK)
            at = now()
            late = at - before - TICK
            before = at
            if late > 0.002:
                self.lags.append([at, late])
            metrics = self.breaker.metrics()
            state = (metrics.state.value, metrics.generation)
            if state != last:
                self.samples.append([at, *state])
                last = state

    def report(self, **extra: Any) -> None:
        out: dict[str, Any] = dict(extra)
        for field, items in (
            ("q", self.requests),
            ("b", self.samples),
            ("e", self.events),
            ("l", self.lags),
            ("x", self.errors),
        ):
            if items:
                out[field] = list(items)
                items.clear()
        if out:
            print(json.dumps(out), flush=True)

    async def reporter(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.report()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(sys.stdin.fileno(), self.stopping.set)  # a line, or EOF: stop
        loop.call_later(self.cfg["max_seconds"], self.stopping.set)
        side = [
            asyncio.create_task(self.ticker()),
            asyncio.create_task(self.reporter()),
        ]
        seed = self.cfg["seed"]
        clients = range(self.cfg["clients"])
        load = [asyncio.create_task(self.client(seed * 1000 + i)) for i in clients]
        load.append(asyncio.create_task(self.background()))
        await self.stopping.wait()
        loop.remove_reader(sys.stdin.fileno())
        # let the requests in flight end (a request stuck longer is reported as open)
        _, stuck = await asyncio.wait(load, timeout=3.0)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        self.report(open=[r.row() for r in self.open.values()])


async def self_test(store: RedisStore, control: Control, name: str) -> None:
    """Check that the store's scripts take their time from the nemesis's clock: a share's
    expiry, as stored in Redis, is that clock's time plus the lease (not Redis ``TIME``)."""
    holder = f"selftest-{os.getpid()}"
    key = f"{name}-selftest-{os.getpid()}"
    await store.lease_share(key, holder, want=1, held=0, limit=1, ttl=5.0)
    raw = await store.client.hget(store.key(key, "shares"), holder)
    expiry_ms = float(raw.split()[2])
    expected = float(control.redis_ms()) + 5000
    if abs(expiry_ms - expected) > 2000:
        raise SystemExit(
            f"the store's scripts do not take their time from the nemesis's clock: a share "
            f"expires at {expiry_ms:.0f} ms, expected about {expected:.0f} ms"
        )
    await store.lease_share(key, holder, want=0, held=0, limit=1, ttl=5.0)


async def main(cfg: dict[str, Any]) -> None:
    control = Control(cfg["control"])
    timeout = cfg["timeout"]
    ports = {int(k): v for k, v in cfg["ports"].items()}
    sentinel = MappedSentinel(
        ports,
        [tuple(a) for a in cfg["sentinels"]],
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    client = sentinel.master_for(
        cfg["master"],
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=RedisRetry(NoBackoff(), 0),
        health_check_interval=0,
        **_lean_handshake(),
    )
    store = WatchedStore(
        client, prefix=cfg["prefix"], timeout=timeout, sync_interval=cfg["sync_interval"]
    )
    # Redis's clock, as every script sees it: the nemesis steps it (module docstring)
    store.engine.now_arg = control.redis_ms  # type: ignore[method-assign]
    try:
        async with store:
            await self_test(store, control, cfg["name"])
            replica = Replica(cfg, control, store)
            store.add_listener(replica.on_event)
            await store.sync()
            print(json.dumps({"ready": os.getpid()}), flush=True)
            await replica.run()
            done = {"counts": replica.counts, "degraded": store.degraded}
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
        for s in sentinel.sentinels:
            with contextlib.suppress(Exception):
                await s.aclose()
    print(json.dumps({"done": done}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
