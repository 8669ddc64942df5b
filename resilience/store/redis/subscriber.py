"""The subscriber of ``RedisStore``: published transitions, applied within milliseconds.

Each replica listens on ``<prefix>:events``; a message names a breaker and its new state,
which the breaker adopts if this replica holds it (``on_message``). A lost message costs at
most one flush interval: each flush reply carries the authoritative state too.

* The connection is health-checked: a PING when nothing was heard for ``KEEPALIVE`` (1 s,
  or ``sync_interval`` if longer), a PONG expected within the store's timeout. A connection
  that goes quiet is replaced (on a single Redis, that also turns the store degraded: the
  same server answers our commands). That is how an idle replica notices an outage, within
  about a second plus the timeout; a replica whose breakers are in use notices it sooner,
  through its flush rounds (they time out). The PING is not sent more often: a replica's
  pub/sub connection is mostly silent (it hears transitions only), and PINGs after every
  ``sync_interval`` of silence cost an idle worker several milliseconds of CPU a second and
  were the most frequent Redis command of a busy one.
* Replacements back off (from ``sync_interval`` up to 2 s), and the backoff starts over only
  once the new subscription is heard from (its confirmation, a PONG, a message): a Redis
  that accepts connections but answers nothing (paused, blackholed) is not asked again every
  few hundred milliseconds. Once it is heard from, ``on_replaced`` runs: what was published
  meanwhile is read with the next round.
* On a Cluster it connects to a node that answers, in turn, so a replacement does not go back
  to the node that just went quiet.
* The loop ends once its task is being cancelled, even when a library below it loses the
  ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .primitives import BadReply, FleetState, parse_message
from .supervisor import Backoff, Supervisor, cancelling

__all__ = ["KEEPALIVE", "Subscriber"]

logger = logging.getLogger("resilience.redis")

KEEPALIVE = 1.0  #: seconds of silence on the pub/sub connection before it is PINGed


class Subscriber:
    """Listens on a store's channel and hands each transition on (see the module docstring)."""

    __slots__ = (
        "_turn",
        "channel",
        "client",
        "closed",
        "cluster",
        "on_config",
        "on_flight",
        "on_replaced",
        "on_transition",
        "supervisor",
        "sync_interval",
    )

    def __init__(
        self,
        *,
        client: Any,
        supervisor: Supervisor,
        channel: str,
        sync_interval: float,
        cluster: bool,
        closed: Callable[[], bool],
        on_transition: Callable[[str, FleetState], None],
        on_replaced: Callable[[], None],
    ) -> None:
        self.client = client
        self.supervisor = supervisor
        self.channel = channel
        self.sync_interval = sync_interval
        self.cluster = cluster
        self.closed = closed  #: whether the store is closed (the loop then ends)
        self.on_transition = on_transition  #: breaker name, its state as published
        self.on_replaced = on_replaced  #: a replacement subscription was heard from
        self.on_flight: Callable[[str], None] = _ignore  #: a single flight ended (its key)
        self.on_config: Callable[[Any], None] | None = None  #: a settings change (JSON)
        self._turn = 0  # a Cluster: which node the next connection goes to

    async def run(self) -> None:
        """Listen until the store closes, replacing the connection when it goes quiet."""
        backoff = Backoff(self.sync_interval)
        replaced = False

        def heard() -> None:  # the new subscription answered: it is alive
            backoff.reset()
            if replaced:
                self.on_replaced()

        while not self.closed() and not cancelling():
            try:
                async with await self._connect() as pubsub:
                    async with asyncio.timeout(self.supervisor.timeout):
                        await pubsub.subscribe(self.channel)
                    await self._listen(pubsub, heard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("resilience subscriber reconnecting after %r", exc)
            replaced = True
            if self.closed() or cancelling():
                return
            await asyncio.sleep(backoff.next())

    async def _connect(self) -> Any:
        """A pub/sub connection; on a Cluster, to a node that answers (in turn, so a
        replacement does not go back to the node that just went quiet)."""
        if not self.cluster:
            return self.client.pubsub()
        if not self.supervisor.cluster_ready:
            async with asyncio.timeout(self.supervisor.timeout * 4):
                await self.supervisor.init_cluster()
        nodes = self.client.get_primaries()
        live = [n for n in nodes if n.name not in self.supervisor.away] or nodes
        self._turn += 1
        return self.client.pubsub(node=live[self._turn % len(live)])

    async def _listen(self, pubsub: Any, heard: Callable[[], None]) -> None:
        """Apply messages until the connection goes quiet (no PONG in time) or fails;
        ``heard()`` once the first reply arrives (the subscription's confirmation)."""
        loop = asyncio.get_running_loop()
        last = loop.time()  # when the server was last heard (or asked to subscribe)
        alive = False
        pinged: float | None = None
        lagging = False
        interval = max(self.sync_interval, KEEPALIVE)
        timeout = self.supervisor.timeout
        while not self.closed() and not cancelling():
            now = loop.time()
            if pinged is None and now - last >= interval:
                async with asyncio.timeout(timeout):  # it may reconnect: bounded too
                    await pubsub.ping()
                pinged = now
            elif pinged is not None and now - pinged > timeout:
                if lagging:  # our loop was late, not the connection: ask again
                    pinged, lagging = None, False
                    continue
                logger.warning("resilience subscriber on %r went quiet: replaced", self.channel)
                if not self.cluster:  # the same Redis answers our commands: it is away
                    self.supervisor.fail(TimeoutError(f"no PONG on pub/sub within {timeout}s"))
                return
            wait = interval if pinged is None else max(0.001, pinged + timeout - now)
            before = loop.time()
            message = await pubsub.get_message(timeout=wait)
            if message is None:
                late = loop.time() - before - wait
                lagging = late > max(0.05, timeout / 2)
                self.supervisor.note_lag(late)
                continue
            last = loop.time()
            if not alive:
                alive = True
                heard()
            kind = message.get("type")
            if kind == "pong":
                pinged = None
            elif kind == "message":
                self.on_message(message.get("data"))

    def on_message(self, data: Any) -> None:
        """A published transition, handed on; one that does not parse is logged and ignored.
        A single flight's end (``flight <key>``) goes to ``on_flight``, a settings change
        (a JSON object) to ``on_config``. A handler that fails is logged: the message is
        lost, the subscription is not (replacing it would lose the messages meanwhile)."""
        try:
            self._dispatch(data)
        except Exception:
            logger.exception("a message on %r could not be applied: %r", self.channel, data)

    def _dispatch(self, data: Any) -> None:
        if isinstance(data, bytes) and data.startswith(b"flight "):
            self.on_flight(data[7:].decode(errors="replace"))
            return
        if (
            self.on_config is not None
            and isinstance(data, (bytes, str))
            and data[:1] in (b"{", "{")
        ):
            self.on_config(data)
            return
        try:
            name, fleet = parse_message(data)
        except BadReply:
            logger.warning("ignored an unparsable message on %r: %r", self.channel, data)
            return
        self.on_transition(name, fleet)


def _ignore(flight: str) -> None:
    """``on_flight`` until a store sets it."""
