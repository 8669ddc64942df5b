"""The connection supervisor of ``RedisStore``: degrade, reconnect, health, forks.

One owner for the question "can we talk to Redis now?":

* every Redis call goes through ``call`` (a round's commands through ``send``: one pipeline,
  or on a Cluster node by node): bounded by the store's ``timeout``, and any failure (a dead
  or slow server, an error reply, a reply we cannot parse: ``parsed``) turns the store
  degraded, with an event naming the reply, and raises ``StoreUnavailableError``;
* a time-out that happened while this process's event loop was itself late (a busy loop, not
  a slow Redis) does not degrade the store: the caller retries or goes local once. The
  lateness measured (here, by the engine's timers and its subscriber's waits) is kept for
  ``LAG_HORIZON`` seconds: ``loop_lag`` is the worst of that period, so a gauge read every
  few seconds sees the stall that happened between two reads;
* ``reconnect`` brings the store back only when Redis accepts our scripts *and* writes again
  (a replica, a full Redis, an ACL without EVALSHA stay degraded), dropping connections first
  after READONLY so the next one reaches the new primary;
* with Sentinel (a ``Sentinel(...).master_for(...)`` client), ``watch_primary`` asks the
  sentinels where the primary is every ``PRIMARY_CHECK`` second, as the pool asks them:
  after a failover the old primary stays a writable primary until Sentinel reconfigures it
  (seconds), and redis-py asks the sentinels only when it opens a connection, so pooled
  connections (the subscriber's among them) would go on writing to the old one while new
  ones reach the new one. On a change the store degrades and drops every pooled connection:
  it comes back on the new primary (``reconnect``), reading the fleet's state there. While
  no sentinel answers, nothing changes;
* a process forked from one that built the store is a new replica (``forked``);
* with Redis Cluster, an unreachable node makes only its own keys local (``away``): calls on
  its keys fail at once, without waiting, until it is tried again (backoff up to 2 s); the
  store degrades as a whole only when no node answers, or on a cluster-wide error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, TypeVar, cast

from ...clock import Clock
from ...errors import StoreUnavailableError
from ...events import Event, StoreDegraded, StoreRecovered
from .primitives import BadReply, is_readonly, outage

__all__ = [
    "LAG_HORIZON",
    "PRIMARY_CHECK",
    "Backoff",
    "Command",
    "LoopLate",
    "Supervisor",
    "cancelling",
    "new_replica_id",
]

logger = logging.getLogger("resilience.redis")

LAG_HORIZON = 10.0  #: seconds a measured loop lag counts towards ``loop_lag``
MAX_BACKOFF = 2.0  #: seconds: the longest wait between two tries to reach Redis again
PRIMARY_CHECK = 1.0  #: seconds between two questions to a sentinel: where is the primary?
_PER_COMMAND = 0.0002  # seconds a pipeline's time-out grows by per command (a big one is work)
_T = TypeVar("_T")

#: one command of a pipeline: a client method's name and its arguments
Command = tuple[str, tuple[Any, ...]]


class _Away(NamedTuple):
    """A Cluster node that does not answer."""

    retry_at: float  #: not asked again before this (local clock)
    backoff: float  #: seconds: the wait after the next failure is twice this


class _Lag(NamedTuple):
    """A measured lateness of the event loop."""

    at: float  #: when it was measured (local clock)
    lag: float  #: seconds


def new_replica_id() -> str:
    """A replica id: this process's pid and a random part (unique across forks too)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def cancelling() -> bool:
    """Whether the running task is being cancelled (even if a library lost the error): the
    store's background loops end then."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class LoopLate(StoreUnavailableError):
    """A Redis call timed out while the event loop itself was late: not the store's fault."""


class Backoff:
    """Waits that double from ``first`` up to ``MAX_BACKOFF``; ``reset`` starts over.

    One for each way back to Redis (the flusher's reconnects, the subscriber's): a Redis
    that accepts connections but answers nothing (paused, blackholed) must not be asked
    again every few hundred milliseconds.
    """

    __slots__ = ("delay", "first")

    def __init__(self, first: float) -> None:
        self.first = self.delay = min(first, MAX_BACKOFF)

    def next(self) -> float:
        """The wait before the next try (each one twice the last, up to the cap)."""
        delay = self.delay
        self.delay = min(delay * 2, MAX_BACKOFF)
        return delay

    def reset(self) -> None:
        """Redis answered: the next failure waits ``first`` again."""
        self.delay = self.first


def _drop_connections(client: Any) -> None:
    """Forget a client's pooled connections without I/O (after a fork, or after READONLY).

    The sockets are not closed politely: in a forked child they belong to the parent too.
    """
    pools = []
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pools.append(pool)
    for node in getattr(client, "get_nodes", lambda: [])():
        node_pool = getattr(getattr(node, "redis_connection", None), "connection_pool", None)
        if node_pool is not None:
            pools.append(node_pool)
    for p in pools:
        reset = getattr(p, "reset", None)
        if reset is not None:
            with contextlib.suppress(Exception):
                reset()


def _sentinel_pool(client: Any) -> Any:
    """The Sentinel pool of a client built by ``Sentinel.master_for`` (``None``: another)."""
    pool = getattr(client, "connection_pool", None)
    if getattr(pool, "sentinel_manager", None) is None or not getattr(pool, "is_master", False):
        return None
    return pool


def _address(address: Any) -> tuple[str, int] | None:
    """A ``(host, port)`` pair as Sentinel names it (``None``: none)."""
    if not address:
        return None
    host = address[0]
    return (host.decode() if isinstance(host, bytes) else str(host)), int(address[1])


class Supervisor:
    """Whether the store can talk to Redis, and what to do when it cannot (module docstring)."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        timeout: float,
        clock: Clock,
        emit: Callable[[Event], None],
        health: Callable[[], Awaitable[Any]],
        cluster: bool,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.clock = clock
        self.degraded = False
        self.reason = ""
        self.since = 0.0
        self._lags: deque[_Lag] = deque()  # lags decreasing
        self._emit = emit
        self._health = health
        self._cluster = cluster
        self.cluster_ready = False
        self._drop_pending = False
        #: with Sentinel: the client's pool, and the primary its sentinels last named
        self.sentinel_pool = _sentinel_pool(client)
        self.primary: tuple[str, int] | None = None
        self.away: dict[str, _Away] = {}  # nodes that do not answer, by name
        self.on_degraded: Callable[[], None] = lambda: None
        self.on_recovered: Callable[[], None] = lambda: None

    # --- one call -------------------------------------------------------------------------
    async def call(
        self, awaitable: Awaitable[Any], *, extra: float = 0.0, key: str | None = None
    ) -> Any:
        """One Redis call, bounded by ``timeout`` (plus ``extra`` for a big one); failures
        raise ``StoreUnavailableError``. ``key``: the key it works on (a Cluster node that
        cannot be reached fails only the calls on its keys)."""
        node = self.node_of(key) if key is not None else None
        if node is not None and self.is_away(node):
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise StoreUnavailableError(f"cluster node {node} is away")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.timeout + extra):
                if self._cluster and not self.cluster_ready:
                    await self.init_cluster()
                reply = await awaitable
        except Exception as exc:
            if isinstance(exc, TimeoutError) and (lag := self.late(loop, started, extra)):
                raise LoopLate(f"the event loop was {lag:.3f}s late") from exc
            reason = outage(exc)
            if reason is None:
                raise
            if node is not None and self.unreachable(exc):
                self.lose(node, reason)
            else:
                self.fail(exc, reason)
            raise StoreUnavailableError(reason) from exc
        if node is not None and node in self.away:
            self.regain(node)
        return reply

    def parsed(self, parse: Callable[[Any], _T], reply: Any) -> _T:
        """``reply`` as ``parse`` reads it. One that does not parse (``BadReply``) is an
        outage like any other: the store degrades and ``StoreUnavailableError`` is raised."""
        try:
            return parse(reply)
        except BadReply as exc:
            self.fail(exc)
            raise StoreUnavailableError(str(exc)) from exc

    async def send(self, commands: list[Command]) -> list[Any]:
        """Run a round's commands: one pipeline, or (a Cluster) all at once, node by node.

        Replies come back in order, errors as exception objects; a round that cannot reach
        Redis at all raises (``LoopLate`` when the event loop, not Redis, was late). Unlike
        ``call``, it degrades nothing itself: the caller decides what each failure means.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        extra = len(commands) * _PER_COMMAND
        try:
            async with asyncio.timeout(self.timeout + extra):
                if self._cluster:
                    if not self.cluster_ready:
                        await self.init_cluster()
                    # each command bounded on its own: a node that does not answer fails only
                    # its own commands (the caller makes their breakers local)
                    replies = await asyncio.gather(
                        *(
                            asyncio.wait_for(getattr(self.client, cmd)(*argv), self.timeout)
                            for cmd, argv in commands
                        ),
                        return_exceptions=True,
                    )
                    return list(replies)
                async with self.client.pipeline(transaction=False) as pipe:
                    for cmd, argv in commands:
                        getattr(pipe, cmd)(*argv)
                    return cast(list[Any], await pipe.execute(raise_on_error=False))
        except TimeoutError as exc:
            if lag := self.late(loop, started, extra):
                raise LoopLate(f"the event loop was {lag:.3f}s late") from exc
            raise

    async def load_scripts(self, scripts: Iterable[Any]) -> None:
        """A server that does not know our scripts (restarted, failed over, a new node)."""
        for script in scripts:
            with contextlib.suppress(StoreUnavailableError):
                await self.call(self.client.script_load(script.script))

    # --- Cluster nodes, one at a time -----------------------------------------------------
    def node_of(self, key: str) -> str | None:
        """The Cluster node holding ``key`` (``None``: not a Cluster, or slots unknown)."""
        if not (self._cluster and self.cluster_ready):
            return None
        try:
            return str(self.client.get_node_from_key(key).name)
        except Exception:  # slots being learned again: decide as a single Redis would
            return None

    @staticmethod
    def unreachable(exc: BaseException) -> bool:
        """A node that does not answer (as opposed to an error reply from it)."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError))

    def is_away(self, node: str) -> bool:
        """Whether ``node`` is away and not yet due another try."""
        away = self.away.get(node)
        return away is not None and self.clock.monotonic() < away.retry_at

    def lose(self, node: str, reason: str) -> None:
        """A Cluster node stopped answering: its keys go local; tried again with backoff."""
        away = self.away.get(node)
        backoff = min((self.timeout / 2 if away is None else away.backoff) * 2, MAX_BACKOFF)
        if away is None:
            logger.warning("redis store %r: cluster node %s away: %s", self.prefix, node, reason)
        self.away[node] = _Away(self.clock.monotonic() + backoff, backoff)
        nodes = self.client.get_nodes() if self._cluster else []
        if nodes and all(n.name in self.away for n in nodes):
            self.fail(TimeoutError("no cluster node answers"), f"no cluster node answers: {reason}")

    def regain(self, node: str) -> None:
        """A Cluster node answers again."""
        if self.away.pop(node, None) is not None:
            logger.warning("redis store %r: cluster node %s answers again", self.prefix, node)

    def late(self, loop: asyncio.AbstractEventLoop, started: float, extra: float = 0.0) -> float:
        """After a time-out: how late the loop was, if so late that Redis may have answered
        in time (else 0.0)."""
        lag = loop.time() - started - self.timeout - extra
        self.note_lag(lag)
        return lag if lag > max(0.05, self.timeout / 2) else 0.0

    # --- the event loop's lateness --------------------------------------------------------
    def note_lag(self, lag: float) -> None:
        """The event loop was ``lag`` seconds late (a timer fired late, a wait ended late).

        Kept as a queue of the measurements that are still the worst of what came after
        them: O(1) amortised per measurement, a handful of entries."""
        if lag <= 0.0:
            return
        now = self.clock.monotonic()
        lags = self._lags
        while lags and lags[0].at <= now - LAG_HORIZON:
            lags.popleft()
        while lags and lags[-1].lag <= lag:
            lags.pop()
        lags.append(_Lag(now, lag))

    @property
    def loop_lag(self) -> float:
        """The worst loop lag measured in the last ``LAG_HORIZON`` seconds (0.0: none)."""
        lags = self._lags
        horizon = self.clock.monotonic() - LAG_HORIZON
        while lags and lags[0].at <= horizon:
            lags.popleft()
        return lags[0].lag if lags else 0.0

    async def init_cluster(self) -> None:
        """Learn the cluster's slots before the first commands (they would race for it)."""
        await self.client.initialize()
        self.cluster_ready = True

    # --- degrade and recover --------------------------------------------------------------
    def fail(self, exc: BaseException, reason: str | None = None) -> None:
        """The store cannot use Redis now: degrade (once), and report why."""
        if is_readonly(exc):
            self._drop_pending = True  # the next connection must find the new primary
        if self.degraded:
            return
        self.degraded = True
        self.reason = reason or outage(exc) or repr(exc)
        self.since = self.clock.monotonic()
        logger.warning("redis store %r degraded: %s", self.prefix, self.reason)
        self._emit(StoreDegraded(name=self.prefix, error=self.reason))
        self.on_degraded()

    async def reconnect(self) -> bool:
        """Try once to come back: Redis must run our scripts and accept writes."""
        try:
            if self._drop_pending:
                self._drop_pending = False
                with contextlib.suppress(Exception):
                    await self.client.connection_pool.disconnect()
            if self._cluster:
                # start afresh (topology and connections), and ask every node: one that is
                # still away would only turn the store degraded again at the next round
                with contextlib.suppress(Exception):
                    await self.client.aclose()
                self.cluster_ready = False
                async with asyncio.timeout(self.timeout * 4):
                    await self.init_cluster()
                    await self.client.ping(target_nodes=self.client.ALL_NODES)
                    await self._health()
            else:
                async with asyncio.timeout(self.timeout):
                    await self._health()
        except Exception as exc:
            if outage(exc) is None:
                raise
            if is_readonly(exc):
                self._drop_pending = True
            return False
        after = self.clock.monotonic() - self.since
        self.degraded = False
        self.reason = ""
        self.away.clear()
        self.on_recovered()
        self._emit(StoreRecovered(name=self.prefix, after=after))
        logger.warning("redis store %r recovered after %.3fs", self.prefix, after)
        return True

    # --- Sentinel: where the primary is -------------------------------------------------
    async def watch_primary(self) -> None:
        """With Sentinel: ``check_primary`` every ``PRIMARY_CHECK`` s until cancelled."""
        while not cancelling():
            try:
                await self.check_primary()
            except Exception:  # never let the watch die
                logger.exception("redis store %r: asking the sentinels failed", self.prefix)
            await asyncio.sleep(PRIMARY_CHECK)

    async def check_primary(self) -> bool:
        """Ask the sentinels where the primary is; if it moved since they were last asked,
        degrade and drop every pooled connection (commands and the subscriber's), so the
        next ones reach the new primary. Whether it moved."""
        found = await self._ask_sentinels()
        if found is None:  # no sentinel answers: keep the primary we have
            return False
        known, self.primary = self.primary or _address(self.sentinel_pool.master_address), found
        if known is None or known == found:
            return False
        reason = (
            f"sentinel failover: the primary moved from {known[0]}:{known[1]} "
            f"to {found[0]}:{found[1]}"
        )
        self.fail(StoreUnavailableError(reason), reason)  # before the drop: the reason is ours
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await self.sentinel_pool.disconnect()
        return True

    async def _ask_sentinels(self) -> tuple[str, int] | None:
        """The primary's address as the client's pool would find it now (``None``: no
        sentinel answers). Asked the pool's way (``discover_master``: the first sentinel that
        answers, its address mapped as the client maps it), so an address named another way
        (``force_master_ip``, a subclass) is never taken for a failover. Bounded: a sentinel
        that does not answer costs at most ``timeout``."""
        pool = self.sentinel_pool
        manager = pool.sentinel_manager
        try:
            async with asyncio.timeout(self.timeout * (1 + len(manager.sentinels))):
                return _address(await manager.discover_master(pool.service_name))
        except Exception as exc:  # no sentinel answers (or none names a sound primary)
            logger.debug("redis store %r: no sentinel answers: %r", self.prefix, exc)
            return None

    def forked(self) -> None:
        """In a forked child: the parent's connections are not ours (to the sentinels
        either)."""
        _drop_connections(self.client)
        if self.sentinel_pool is not None:
            for sentinel in self.sentinel_pool.sentinel_manager.sentinels:
                _drop_connections(sentinel)
        self.cluster_ready = False
