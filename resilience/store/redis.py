"""RedisStore: breakers (and leases) shared by every replica, without a round trip per call.

How a shared breaker works (see docs/shared-state.md for the whole consistency model):

* In the CLOSED state a call asks nothing of Redis. Its outcome goes into a local buffer and
  a local window; a background task flushes every breaker's buffer in one pipeline each
  ``sync_interval`` (at once when the local window alone would trip). The flush script merges
  the outcomes into the shared window and answers with the authoritative state and counts;
  the pure rules (``resilience.circuit``) decide, and a trip is a compare-and-set script.
* Every transition is published; each replica's subscriber applies it within milliseconds,
  and each flush reply carries the state too, so a lost message costs at most one interval.
* OPEN rejects locally until ``open_until`` (Redis time converted to the local clock). After
  it, a script hands out at most ``half_open_calls`` expiring probe leases fleet-wide; probe
  outcomes are written at once.
* When Redis fails or is slow, the store turns *degraded*: each breaker carries on with its
  local window and state machine, nothing waits on a reconnect, nothing raises. A background
  task reconnects with backoff, then flushes and resyncs; the fleet's state wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
import uuid
from collections.abc import Awaitable, Iterable
from importlib import resources
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..circuit import (
    CLOSED,
    DISABLED,
    FORCED_OPEN,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    BreakerCore,
    CircuitState,
    half_open_verdict,
    open_duration,
    tripped,
)
from ..clock import SYSTEM_CLOCK, Clock, TimerHandle
from ..errors import StoreUnavailableError
from ..events import (
    Event,
    Listener,
    StoreDataReset,
    StoreDegraded,
    StoreRecovered,
    check_listeners,
    emit,
)
from ..policy import check_int, check_name, check_seconds
from ..status import PolicyStatus
from .redis_breaker import Batch, SharedBreakerCore
from .redis_status import local_status, parse_status, text

__all__ = ["RedisStore"]

logger = logging.getLogger("resilience.redis")

_STORE_ERRORS = (RedisError, OSError, TimeoutError, asyncio.TimeoutError)


def _script(name: str) -> str:
    """A script's source; the breaker scripts start with the shared prelude."""
    source = resources.files(__package__).joinpath(f"{name}.lua").read_text()
    if name in ("lease", "shared"):
        return source
    prelude = resources.files(__package__).joinpath("prelude.lua").read_text()
    return prelude + "\n" + source


def _lean_handshake() -> dict[str, Any]:
    """Client options so a new connection costs one round trip, not four (RESP2, no SETINFO).

    Reconnecting must fit in the store's short timeout while Redis is merely slow.
    """
    options: dict[str, Any] = {"protocol": 2}
    if importlib.util.find_spec("redis.driver_info") is not None:
        options["driver_info"] = None  # newer redis-py: explicit None sends no CLIENT SETINFO
    else:
        options["lib_name"] = options["lib_version"] = None
    return options


def _is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (its pipelines refuse scripts)."""
    try:
        from redis.asyncio.cluster import RedisCluster
    except ImportError:  # pragma: no cover - every supported redis-py has it
        return False
    return isinstance(client, RedisCluster)


def _check_prefix(prefix: object) -> str:
    prefix = check_name(prefix, "prefix")
    if any(c in prefix for c in "{} \t\r\n"):
        raise ValueError(f"prefix must not contain braces or whitespace, got {prefix!r}")
    return prefix


class RedisStore:
    """Shares breaker state (and leases) through Redis; see the module docstring.

    ``RedisStore.from_url("redis://...")`` builds its own client with short timeouts and no
    retries; ``RedisStore(client)`` takes any ``redis.asyncio`` client (Cluster and Sentinel
    included) as it is. Keys are ``<prefix>:{<name>}:...``: one hash tag per policy, TTLs on
    all of them. ``sync_interval`` bounds how stale a replica's view of the fleet's counts can
    be; ``strict=True`` writes every outcome before its call returns (concurrent outcomes are
    coalesced into one script call). ``timeout`` bounds every Redis call. ``clock`` replaces
    Redis ``TIME`` (tests). Use ``async with store:`` or ``await store.aclose()``.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "resilience",
        sync_interval: float = 0.05,
        strict: bool = False,
        timeout: float = 0.25,
        ttl: float = 86_400.0,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        self.client = client
        self.prefix = _check_prefix(prefix)
        self.sync_interval = check_seconds("sync_interval", sync_interval)
        self.strict = bool(strict)
        self.timeout = check_seconds("timeout", timeout)
        self.ttl_ms = int(check_seconds("ttl", ttl) * 1000)
        self.clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self._fake_time = clock is not None
        self._listeners = check_listeners(listeners)
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.channel = f"{prefix}:events"
        self.degraded = False
        self._degraded_since = 0.0
        self._cores: dict[str, SharedBreakerCore] = {}
        self._unregistered: set[str] = set()
        self._lease_keys: set[str] = set()
        self._orphans: list[tuple[str, str]] = []  # (key, lease) to give back when Redis answers
        self._seq = itertools.count(1)
        self._ops: list[tuple[str, SharedBreakerCore, int, int, bool, bool]] = []
        self._wake = asyncio.Event()
        self._round_done: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timer: TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._owns_client = False
        self._lease_ids = itertools.count(1)
        self._cluster = _is_cluster(client)
        self._cluster_ready = False
        scripts = ("flush", "transition", "probe", "report", "lease", "shared", "status")
        self._scripts = {n: client.register_script(_script(n)) for n in scripts}

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 64, **options: Any) -> RedisStore:
        """A store with its own client for ``url``: short socket timeouts, no retries.

        Its pool holds at most ``max_connections``; a call finding them all busy waits for
        one (within the store's ``timeout``) instead of failing, so a burst of fleet-wide
        bulkhead or rate-limit calls queues rather than turning the store degraded.
        """
        _check_prefix(options.get("prefix", "resilience"))
        timeout = check_seconds("timeout", options.get("timeout", 0.25))
        check_int("max_connections", max_connections, minimum=2)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=RedisRetry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            **_lean_handshake(),
        )
        client = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        store = cls(client, **options)
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        state = "degraded" if self.degraded else "ok"
        return f"RedisStore(prefix={self.prefix!r}, breakers={len(self._cores)}, {state})"

    # keys ---------------------------------------------------------------------------------
    def key(self, name: str, suffix: str) -> str:
        """The key ``suffix`` of policy ``name``: ``<prefix>:{<escaped name>}:<suffix>``."""
        return f"{self.prefix}:{{{quote(name, safe='')}}}:{suffix}"

    # the Store protocol ---------------------------------------------------------------------
    def breaker(self, name: str, config: BreakerConfig, clock: Clock) -> BreakerCore:
        """The shared core of breaker ``name`` in this process (created on first use)."""
        check_name(name)
        core = self._cores.get(name)
        if core is None:
            core = self._cores[name] = SharedBreakerCore(name, config, clock, self)
            self._unregistered.add(name)
            self.wake()  # learn the fleet's state at once
        elif core.config != config:
            raise ValueError(
                f"breaker {name!r} already exists in this store with another configuration: "
                f"{core.config} != {config}"
            )
        return core

    def names(self) -> list[str]:
        """Policy names used through this store object (``known_names()`` asks the fleet)."""
        return sorted({*self._cores, *self._lease_keys})

    async def known_names(self) -> list[str]:
        """Every policy name any replica registered under this prefix."""
        members = await self._call(self.client.smembers(f"{self.prefix}:names"))
        return sorted(text(m) for m in members)

    def _now_arg(self) -> str:
        return repr(self.clock.monotonic() * 1000) if self._fake_time else ""

    async def acquire_lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        """Take one of ``limit`` fleet-wide permits under ``key`` for ``ttl`` seconds."""
        check_name(key, "key")
        check_int("limit", limit)
        ttl_ms = max(1, int(check_seconds("ttl", ttl) * 1000))
        lease = f"{self.replica}:{next(self._lease_ids)}"
        try:
            got = await self._call(
                self._scripts["lease"](
                    keys=[self.key(key, "leases")],
                    args=["take", self._now_arg(), lease, limit, ttl_ms],
                )
            )
        except StoreUnavailableError:
            self._orphans.append((key, lease))  # it may have been granted: give it back later
            raise
        self._register(key)
        return lease if int(got) else None

    async def release_lease(self, key: str, lease: str) -> bool:
        """Give a permit back; ``False`` if it had expired."""
        check_name(key, "key")
        try:
            got = await self._call(
                self._scripts["lease"](
                    keys=[self.key(key, "leases")], args=["give", self._now_arg(), lease, 0, 0]
                )
            )
        except StoreUnavailableError:
            self._orphans.append((key, lease))  # returned as soon as Redis answers
            raise
        return bool(int(got))

    async def count_leases(self, key: str) -> int:
        """Unexpired permits under ``key``."""
        check_name(key, "key")
        got = await self._call(
            self._scripts["lease"](
                keys=[self.key(key, "leases")], args=["count", self._now_arg(), "", 0, 0]
            )
        )
        return int(got)

    def _register(self, key: str) -> None:
        if key not in self._lease_keys:
            self._lease_keys.add(key)
            self._unregistered.add(key)

    async def _shared(self, key: str, suffix: str, *args: Any) -> float:
        check_name(key, "key")
        self._register(key)
        reply = text(
            await self._call(self._scripts["shared"](keys=[self.key(key, suffix)], args=list(args)))
        )
        if reply.startswith("!"):
            logger.warning("unparsable data under %r was reset", self.key(key, suffix))
            self._emit(StoreDataReset(name=key, key=self.key(key, suffix)))
            reply = reply[1:]
        return float(reply)

    async def rate_take(self, key: str, *, interval: float, burst: int) -> float:
        """Take a token from the fleet's GCRA bucket ``key``: 0.0, or seconds to wait."""
        wait_ms = await self._shared(
            key, "gcra", "gcra", self._now_arg(), repr(interval * 1000), int(burst)
        )
        return wait_ms / 1000

    async def budget_add(self, key: str, *, delta: float, maximum: float, ttl: float) -> float:
        """Add ``delta`` to the fleet's token count ``key`` (starting full), clamped."""
        ttl_ms = max(1, int(check_seconds("ttl", ttl) * 1000))
        return await self._shared(
            key,
            "budget",
            "budget",
            self._now_arg(),
            repr(float(delta)),
            repr(float(maximum)),
            ttl_ms,
        )

    async def cache_get(self, key: str, item: str) -> bytes | None:
        """The value cached under ``item`` for policy ``key``, or ``None``."""
        check_name(key, "key")
        got = await self._call(self.client.get(self.key(key, "cache:" + quote(item, safe=""))))
        return None if got is None else bytes(got)

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        """Cache ``value`` under ``item`` for policy ``key`` for ``ttl`` seconds."""
        check_name(key, "key")
        self._register(key)
        ttl_ms = max(1, int(check_seconds("ttl", ttl) * 1000))
        await self._call(
            self.client.set(self.key(key, "cache:" + quote(item, safe="")), value, px=ttl_ms)
        )

    async def status(self) -> list[PolicyStatus]:
        """Every policy any replica registered under this prefix, read from Redis.

        While Redis cannot answer, this replica's own breakers are listed as it sees them
        (``local=True``); with none, ``StoreUnavailableError`` is raised.
        """
        try:
            names = set(await self.known_names()) | set(self._cores) | self._lease_keys
            out: list[PolicyStatus] = []
            for name in sorted(names):
                suffixes = ("state", "win", "probes", "replicas", "leases", "gcra", "budget")
                reply = await self._call(
                    self._scripts["status"](
                        keys=[self.key(name, s) for s in suffixes], args=[self._now_arg()]
                    )
                )
                out.extend(parse_status(name, reply))
            return out
        except StoreUnavailableError:
            if not self._cores:
                raise
            now = self.clock.monotonic()
            return [local_status(core, now) for core in self._cores.values()]

    async def control(self, name: str, state: CircuitState) -> None:
        """Force breaker ``name`` (known to the fleet) into ``state``, fleet-wide."""
        if state not in (CLOSED, FORCED_OPEN, DISABLED):
            raise ValueError(
                f"a breaker can be forced CLOSED, FORCED_OPEN or DISABLED, not {state}"
            )
        core = self._cores.get(name)
        if core is None:
            exists = await self._call(self.client.exists(self.key(name, "state")))
            if not int(exists):
                raise KeyError(f"no breaker named {name!r} under prefix {self.prefix!r}")
            core = SharedBreakerCore(name, BreakerConfig(), self.clock, self)
            suffixes = ("state", "win", "probes", "replicas", "leases", "gcra", "budget")
            reply = await self._call(
                self._scripts["status"](
                    keys=[self.key(name, s) for s in suffixes], args=[self._now_arg()]
                )
            )
            core.gen = int(reply[3])
            await self._transition(core, state, force=True)
            return
        await core.control(state, self.clock.monotonic())

    async def sync(self) -> None:
        """Flush every buffered outcome and refresh every breaker's state now."""
        self._start()
        for core in self._cores.values():
            core.refresh_at = float("-inf")
        await self._wait_round()

    async def aclose(self) -> None:
        """Stop the background tasks (after a last flush) and close an owned client."""
        if self._closed:
            return
        if self._tasks and not self.degraded:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._wait_round(), self.timeout * 2)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._timer is not None:
            self._timer.cancel()
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def __aenter__(self) -> RedisStore:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # events ---------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Receive ``StoreDegraded``, ``StoreRecovered`` and ``StoreDataReset`` events."""
        self._listeners = (*self._listeners, *check_listeners((listener,)))

    def _emit(self, event: Event) -> None:
        if self._listeners:
            emit(self._listeners, event)

    # failure handling -----------------------------------------------------------------------
    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        """One Redis call, bounded by ``timeout``; failures raise ``StoreUnavailableError``."""
        self._start()
        try:
            async with asyncio.timeout(self.timeout):
                if self._cluster and not self._cluster_ready:
                    await self._init_cluster()
                return await awaitable
        except _STORE_ERRORS as exc:
            if isinstance(exc, ResponseError) and "NOSCRIPT" not in str(exc):
                raise
            self._degrade(exc)
            raise StoreUnavailableError(str(exc)) from exc

    async def _init_cluster(self) -> None:
        """Learn the cluster's slots before the first commands (they would race for it)."""
        await self.client.initialize()
        self._cluster_ready = True

    def _degrade(self, exc: BaseException) -> None:
        if self.degraded:
            return
        self.degraded = True
        self._degraded_since = self.clock.monotonic()
        logger.warning("redis store %r degraded: %r", self.prefix, exc)
        self._emit(StoreDegraded(name=self.prefix, error=repr(exc)))
        self._wake.set()

    # background work ------------------------------------------------------------------------
    def _start(self) -> None:
        """Start the flusher and the subscriber on the running loop (once per loop)."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is loop and self._tasks:
            return
        self._loop = loop
        self._wake = asyncio.Event()
        self._round_done = None
        self._tasks = [
            loop.create_task(self._flusher(), name=f"resilience-flush-{self.prefix}"),
            loop.create_task(self._subscriber(), name=f"resilience-sub-{self.prefix}"),
        ]

    def wake(self) -> None:
        """Ask for a flush now (an outcome would trip, a probe reported, strict mode)."""
        self._start()
        self._wake.set()

    def _wait_round(self) -> asyncio.Future[None]:
        """A future resolved when the next flush round (started after now) has finished."""
        self._start()
        if self._round_done is None:
            loop = asyncio.get_running_loop()
            self._round_done = loop.create_future()
        self._wake.set()
        return self._round_done

    async def commit(self) -> None:
        """Strict mode: wait until the outcomes buffered so far are stored."""
        if self.degraded:
            return
        await asyncio.shield(self._wait_round())

    async def _flusher(self) -> None:
        backoff = self.sync_interval
        started = self.clock.monotonic()
        while not self._closed:
            # rounds start every sync_interval, however long the last one took
            wait = (
                backoff if self.degraded else started + self.sync_interval - self.clock.monotonic()
            )
            timer = self.clock.call_later(max(0.0, wait), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()
            started = self.clock.monotonic()
            done, self._round_done = self._round_done, None
            try:
                if self.degraded:
                    if await self._reconnect():
                        backoff = self.sync_interval
                    else:
                        backoff = min(backoff * 2, 2.0)
                        continue
                await self._round()
            except Exception:  # never let the flusher die
                logger.exception("resilience flush round failed")
            finally:  # waiters (sync, strict commits) go on even if the round failed
                if done is not None and not done.done():
                    done.set_result(None)

    async def _reconnect(self) -> bool:
        try:
            if self._cluster:
                # start afresh (topology and connections), and ask every node: one that is
                # still away would only turn the store degraded again at the next round
                with contextlib.suppress(Exception):
                    await self.client.aclose()
                self._cluster_ready = False
                async with asyncio.timeout(self.timeout * 4):
                    await self._init_cluster()
                    await self.client.ping(target_nodes=self.client.ALL_NODES)
            else:
                async with asyncio.timeout(self.timeout):
                    await self.client.ping()
        except _STORE_ERRORS:
            return False
        after = self.clock.monotonic() - self._degraded_since
        self.degraded = False
        for core in self._cores.values():
            core.recovering()
        self._emit(StoreRecovered(name=self.prefix, after=after))
        logger.warning("redis store %r recovered after %.3fs", self.prefix, after)
        return True

    async def _round(self, again: bool = True) -> None:
        """One flush: every breaker with news (or due a refresh), in one pipeline."""
        now = self.clock.monotonic()
        cores = [c for c in self._cores.values() if c.due(now)]
        ops, self._ops = self._ops, []
        names, self._unregistered = self._unregistered, set()
        if not cores and not ops and not names and not self._orphans:
            return
        batches = [(core, b) for core in cores for b in core.take_batches(next(self._seq))]
        orphans, self._orphans = self._orphans, []
        try:
            replies = await self._send(batches, ops, names, orphans)
        except _STORE_ERRORS as exc:  # the batches stay unacknowledged: sent again later
            self._orphans[:0] = orphans
            self._ops[:0] = ops  # reports and releases: sent again once Redis answers
            self._unregistered |= names
            self._degrade(exc)
            return
        reload = any(isinstance(r, NoScriptError) for r in replies)
        if reload:
            # a server that does not know our scripts (restarted, failed over, a new node)
            for script in self._scripts.values():
                with contextlib.suppress(StoreUnavailableError):
                    await self._call(self.client.script_load(script.script))
            for (core, _), reply in zip(batches, replies, strict=False):
                if isinstance(reply, NoScriptError):
                    core.active = True
            for item, reply in zip(ops, replies[len(batches) :], strict=False):
                if isinstance(reply, NoScriptError):
                    self._ops.append(item)
        received = self.clock.monotonic()
        for (core, batch), reply in zip(batches, replies, strict=False):
            if isinstance(reply, Exception):
                if not isinstance(reply, NoScriptError):
                    logger.warning("flush of breaker %r failed: %r", core.name, reply)
                continue
            core.acked(batch)
            state, gen, open_until, reopens, calls, failures, slow, server_now, reset = reply
            self._reset_seen(core, int(reset))
            core.adopt(
                text(state), int(gen), int(open_until), int(reopens), int(server_now), received
            )
            if core.state is CLOSED and tripped(int(calls), int(failures), int(slow), core.config):
                with contextlib.suppress(StoreUnavailableError):
                    opened = (int(calls), int(failures), int(slow))
                    await self._transition(core, OPEN, opened_by=opened)
        for (op, core, gen, _, _, _), reply in zip(ops, replies[len(batches) :], strict=False):
            if op != "report" or isinstance(reply, Exception) or not int(reply[0]):
                continue
            verdict = half_open_verdict(int(reply[1]), int(reply[2]), int(reply[3]), core.config)
            if verdict is not None and core.gen == gen:
                with contextlib.suppress(StoreUnavailableError):
                    opened = (int(reply[1]), int(reply[2]), int(reply[3]))
                    await self._transition(core, verdict, opened_by=opened)
        if reload and again:
            await self._round(again=False)

    async def _send(
        self,
        batches: list[tuple[SharedBreakerCore, Batch]],
        ops: list[tuple[str, SharedBreakerCore, int, int, bool, bool]],
        names: set[str],
        orphans: list[tuple[str, str]],
    ) -> list[Any]:
        """Run one round's commands: one pipeline, or (a cluster) all at once, node by node."""
        # EVALSHA straight away: redis-py's Script objects would add a SCRIPT EXISTS round
        # trip to every pipeline; a NOSCRIPT reply is handled by the caller.
        flush, report = self._scripts["flush"].sha, self._scripts["report"].sha
        commands: list[tuple[str, tuple[Any, ...]]] = []
        for core, (gen, calls, failures, slow, seq) in batches:
            args = [gen, calls, failures, slow, *core.window_args, self._now_arg(), self.ttl_ms]
            commands.append(("evalsha", (flush, 4, *core.keys, *args, self.replica, seq)))
        for op, core, gen, lease, failed, slow in ops:
            lease_id = f"{self.replica}:{lease}"
            if op == "report":
                keys = (core.keys[0], core.keys[2])
                commands.append(
                    ("evalsha", (report, 2, *keys, gen, lease_id, int(failed), int(slow)))
                )
            else:
                commands.append(("zrem", (core.keys[2], lease_id)))
        for key, lost in orphans:  # permits whose grant or return was lost in a timeout
            commands.append(("zrem", (self.key(key, "leases"), lost)))
        if names:
            commands.append(("sadd", (f"{self.prefix}:names", *sorted(names))))
            commands.append(("pexpire", (f"{self.prefix}:names", self.ttl_ms)))
        async with asyncio.timeout(self.timeout):
            if self._cluster:
                if not self._cluster_ready:
                    await self._init_cluster()
                replies = await asyncio.gather(
                    *(getattr(self.client, cmd)(*argv) for cmd, argv in commands),
                    return_exceptions=True,
                )
                for reply in replies:  # a node that cannot be reached fails the round
                    if isinstance(reply, _STORE_ERRORS) and not isinstance(reply, ResponseError):
                        raise reply
                return list(replies)
            async with self.client.pipeline(transaction=False) as pipe:
                for cmd, argv in commands:
                    getattr(pipe, cmd)(*argv)
                return cast(list[Any], await pipe.execute(raise_on_error=False))

    def _reset_seen(self, core: SharedBreakerCore, reset: int) -> None:
        if reset:
            logger.warning("breaker %r: unparsable data in Redis was reset", core.name)
            self._emit(StoreDataReset(name=core.name, key=core.keys[0]))

    async def _transition(
        self,
        core: SharedBreakerCore,
        new: CircuitState,
        *,
        force: bool = False,
        opened_by: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        """Compare-and-set ``core`` into ``new`` (unconditionally when ``force``).

        ``opened_by``: the counts that open it, kept for status tools.
        """
        reopens = core.reopens + 1 if (new is OPEN and core.state is HALF_OPEN) else 0
        open_ms = int(open_duration(core.config, reopens) * 1000)
        reply = await self._call(
            self._scripts["transition"](
                keys=core.keys,
                args=[
                    core.gen,
                    new.value,
                    open_ms,
                    reopens,
                    self._now_arg(),
                    self.ttl_ms,
                    self.channel,
                    core.name,
                    "1" if force else "0",
                    *opened_by,
                ],
            )
        )
        _, state, gen, open_until, reopens_now, server_now, reset = reply
        self._reset_seen(core, int(reset))
        core.adopt(
            text(state),
            int(gen),
            int(open_until),
            int(reopens_now),
            int(server_now),
            self.clock.monotonic(),
        )

    async def _probe(self, core: SharedBreakerCore, lease: int) -> tuple[bool, float]:
        reply = await self._call(
            self._scripts["probe"](
                keys=core.keys,
                args=[
                    core.gen,
                    core.config.half_open_calls,
                    int(core.config.probe_lease * 1000),
                    f"{self.replica}:{lease}",
                    self._now_arg(),
                    self.ttl_ms,
                    self.channel,
                    core.name,
                ],
            )
        )
        granted, state, gen, open_until, reopens, server_now, reset, wait = reply
        self._reset_seen(core, int(reset))
        core.adopt(
            text(state),
            int(gen),
            int(open_until),
            int(reopens),
            int(server_now),
            self.clock.monotonic(),
        )
        return bool(int(granted)), int(wait) / 1000

    def _enqueue(
        self, op: str, core: SharedBreakerCore, gen: int, lease: int, failed: bool, slow: bool
    ) -> None:
        self._ops.append((op, core, gen, lease, failed, slow))
        self.wake()

    async def _subscriber(self) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    backoff = 0.05
                    while not self._closed:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None:
                            self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("resilience subscriber reconnecting after %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _on_message(self, data: Any) -> None:
        try:
            gen, state, open_until, reopens, server_now, name = text(data).split(" ", 5)
            core = self._cores.get(name)
            if core is not None:
                core.adopt(
                    state,
                    int(gen),
                    int(float(open_until)),
                    int(float(reopens)),
                    int(float(server_now)),
                    self.clock.monotonic(),
                )
        except (ValueError, KeyError):
            logger.warning("ignored an unparsable message on %r: %r", self.channel, data)
