"""The connection supervisor of ``RedisStore``: degrade, reconnect, health, forks.

One owner for the question "can we talk to Redis now?":

* every Redis call goes through ``call``: bounded by the store's ``timeout``, and any failure
  (a dead or slow server, an error reply, a reply we cannot parse) turns the store degraded,
  with an event naming the reply, and raises ``StoreUnavailableError``;
* a time-out that happened while this process's event loop was itself late (a busy loop, not
  a slow Redis) does not degrade the store: the caller retries or goes local once;
* ``reconnect`` brings the store back only when Redis accepts our scripts *and* writes again
  (a replica, a full Redis, an ACL without EVALSHA stay degraded), dropping connections first
  after READONLY so the next one reaches the new primary;
* a process forked from one that built the store is a new replica (``forked``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from ..clock import Clock
from ..errors import StoreUnavailableError
from ..events import Event, StoreDegraded, StoreRecovered
from .redis_primitives import is_readonly, outage

__all__ = ["LoopLate", "Supervisor", "new_replica_id", "on_fork"]

logger = logging.getLogger("resilience.redis")


def new_replica_id() -> str:
    """A replica id: this process's pid and a random part (unique across forks too)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


class LoopLate(StoreUnavailableError):
    """A Redis call timed out while the event loop itself was late: not the store's fault."""


# --- forks: every live store learns it is in a new process -----------------------------------
_forkable: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_forkable):
        with contextlib.suppress(Exception):
            store.forked()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def on_fork(store: Any) -> None:
    """Call ``store.forked()`` in any child process forked after this."""
    _forkable.add(store)


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
        self.loop_lag = 0.0  #: how late the event loop was, last measured (seconds)
        self._emit = emit
        self._health = health
        self._cluster = cluster
        self.cluster_ready = False
        self._drop_pending = False
        self.on_degraded: Callable[[], None] = lambda: None
        self.on_recovered: Callable[[], None] = lambda: None

    # --- one call -------------------------------------------------------------------------
    async def call(self, awaitable: Awaitable[Any], *, extra: float = 0.0) -> Any:
        """One Redis call, bounded by ``timeout`` (plus ``extra`` for a big one); failures
        raise ``StoreUnavailableError``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.timeout + extra):
                if self._cluster and not self.cluster_ready:
                    await self.init_cluster()
                return await awaitable
        except Exception as exc:
            if isinstance(exc, TimeoutError) and self.late(loop, started, extra):
                raise LoopLate(f"the event loop was {self.loop_lag:.3f}s late") from exc
            reason = outage(exc)
            if reason is None:
                raise
            self.fail(exc, reason)
            raise StoreUnavailableError(reason) from exc

    def late(self, loop: asyncio.AbstractEventLoop, started: float, extra: float = 0.0) -> bool:
        """After a time-out: was the loop so late that Redis may have answered in time?"""
        lag = loop.time() - started - self.timeout - extra
        self.loop_lag = max(0.0, lag)
        return lag > max(0.05, self.timeout / 2)

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
        self.on_recovered()
        self._emit(StoreRecovered(name=self.prefix, after=after))
        logger.warning("redis store %r recovered after %.3fs", self.prefix, after)
        return True

    def forked(self) -> None:
        """In a forked child: the parent's connections are not ours."""
        _drop_connections(self.client)
        self.cluster_ready = False
