"""What one flush round of the sync engine does: its commands, a chunk at a time, and what
each reply does (``Rounds``, the base of ``SyncEngine``, which decides when rounds run).

* A round carries the breakers and names queued in the ``Outbox`` when it starts, a chunk
  (one pipeline, ``Supervisor.send``) at a time, the event loop getting its turn between two
  chunks; each chunk also carries the probe reports, releases and permits to give back
  queued by the time it is built.
* A chunk sends, per breaker, its unacknowledged flushes and its buffer (``flush.lua``), then
  the local knowledge to push (``transition.lua``, after their breakers' flushes; not a trip
  being pushed on its own meanwhile, see ``SyncEngine.push``); then probe reports
  (``report.lua``), releases, permits to give back, and registrations.
* Each reply goes to its breaker's core, which answers with the transition it wants; those
  are compare-and-set in a second pipeline. A command whose reply is lost is sent again with
  the next round; NOSCRIPT loads the scripts again (once a round) and resends at once; a
  Cluster node that does not answer makes only its own breakers local; any other failure is
  an outage (the store degrades).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...events import Event, StoreDataReset
from ...rules.breaker import open_duration
from .breaker import VOTE_LEASE, SharedBreakerCore
from .outbox import Outbox, Work
from .primitives import (
    BadReply,
    FleetState,
    Outcomes,
    Report,
    Transition,
    histogram_arg,
    is_noscript,
    key,
    outage,
    parse_flush,
    parse_names,
    parse_report,
    parse_transition,
)
from .supervisor import Command, LoopLate, Supervisor, cancelling

if TYPE_CHECKING:
    from ...clock import Clock

__all__ = ["Rounds"]

logger = logging.getLogger("resilience.redis")

_MAX_LATE_RETRIES = 3  # rounds retried at once when the loop, not Redis, was late

#: what a round does with one reply: the transition a breaker then wants, if any
Done = Callable[[Any, float], "tuple[SharedBreakerCore, Transition] | None"]


def _nothing(*_: Any) -> None:
    """A reply that needs nothing done (or a command never retried)."""


@dataclass(slots=True)
class _Item:
    """One command of a round: what to do with its reply, and how to send it again."""

    command: Command
    done: Done
    retry: Callable[[], Any]
    core: SharedBreakerCore | None = None
    node: str | None = None  #: the Cluster node it goes to (``None``: a single Redis)


class Rounds:
    """One flush round and its replies (see the module docstring); ``SyncEngine`` sets
    these attributes and decides when rounds run."""

    outbox: Outbox
    supervisor: Supervisor
    scripts: dict[str, Any]
    clock: Clock
    prefix: str
    channel: str
    ttl_ms: int
    _replica: Callable[[], str]
    _fake_time: bool
    _emit: Callable[[Event], None]
    _wake: asyncio.Event
    _closed: bool
    _seq: int  # the last flush sequence number (per replica, increasing)
    pushing: set[SharedBreakerCore]  # breakers whose trip is being pushed on its own
    _late_retries: int

    def mark(self, core: SharedBreakerCore, *, used: bool = True) -> None:
        """``core`` joins the next round (``SyncEngine.mark``)."""
        raise NotImplementedError

    @property
    def degraded(self) -> bool:
        """Whether the store is running on local state."""
        return self.supervisor.degraded

    def now_arg(self) -> str:
        """The time scripts use: "" (the server's TIME), or a fake clock's, in ms."""
        return repr(self.clock.monotonic() * 1000) if self._fake_time else ""

    def reset_seen(self, name: str, key: str) -> None:
        """A script found data it does not write under ``key`` (of policy ``name``) and reset
        it: that key's problem alone, reported (the store stays healthy)."""
        logger.warning("unparsable data under %r was reset", key)
        self._emit(StoreDataReset(name=name, key=key))

    def read_names(self, reply: Any, registry: str) -> list[str]:
        """A ``names.lua`` reply: the names it lists; a registry reset is reported."""
        listed = parse_names(reply)
        if listed.reset:
            self.reset_seen(self.prefix, registry)
        return listed.names

    def _adopt(self, core: SharedBreakerCore, fleet: FleetState, received: float) -> None:
        """``core`` takes the fleet's state from a script's reply (garbage it reset: reported)."""
        if fleet.reset:
            self.reset_seen(core.name, core.keys.state)
        core.adopt(fleet, received)

    def _cas(self, core: SharedBreakerCore, t: Transition) -> list[Any]:
        """The arguments of ``transition.lua`` for ``t`` (see its header)."""
        floor, vote_ms = core.sending(t)
        mode = "1" if t.force else "q" if t.vote else "r" if t.renumber else "0"
        return [
            t.expected,
            t.new.value,
            int(open_duration(core.config, t.reopens) * 1000),
            t.reopens,
            self.now_arg(),
            self.ttl_ms,
            self.channel,
            core.name,
            mode,
            *t.opened_by,
            core.config.quorum,
            self._replica(),
            vote_ms,
            floor,
            int(VOTE_LEASE * 1000),
        ]

    def _cas_command(self, core: SharedBreakerCore, t: Transition) -> Command:
        """``transition.lua`` for ``t``, as a command of a pipeline."""
        sha = self.scripts["transition"].sha
        return ("evalsha", (sha, 3, *core.keys.machine, *self._cas(core, t)))

    # --- one round ------------------------------------------------------------------------
    async def round(self, again: bool = True) -> None:
        """One flush round: everything queued now, a chunk at a time (module docstring)."""
        work = self.outbox.take()
        if work is None:
            return
        noscript = False
        n = 0  # the next chunk to build
        try:
            while n < work.chunks():
                if n:
                    await asyncio.sleep(0)  # the event loop's turn between two chunks
                    if self.degraded or self._closed or cancelling():
                        break
                items = self._items(work, n)
                n += 1
                if not items:
                    continue
                try:
                    replies = await self.supervisor.send([item.command for item in items])
                except Exception as exc:  # nothing was acknowledged: all goes again later
                    for item in items:
                        item.retry()
                    self._unsent(exc)
                    break
                self._late_retries = 0
                later, failure, missing = self._settle(items, replies)
                if later:
                    await self._apply(later)
                if failure is not None:
                    self.supervisor.fail(failure)
                    break
                if missing and not noscript:  # loaded once; the next chunks find them
                    noscript = True
                    await self.supervisor.load_scripts(self.scripts.values())
        finally:  # what was not sent (an outage, or cancelled) waits for the next round
            self.outbox.give_back(work, n)
        if noscript and again:
            await self.round(again=False)  # what NOSCRIPT sent back, at once

    def _unsent(self, exc: Exception) -> None:
        """A round that got no reply: the loop was late (retry at once), or an outage."""
        if isinstance(exc, LoopLate):
            self._late_retries += 1
            if self._late_retries <= _MAX_LATE_RETRIES:
                self._wake.set()  # Redis may well have answered: try again at once
            return
        if outage(exc) is None:
            raise exc
        self.supervisor.fail(exc)

    def _settle(
        self, items: list[_Item], replies: list[Any]
    ) -> tuple[list[tuple[SharedBreakerCore, Transition]], BaseException | None, bool]:
        """Each reply to its item: the transitions wanted, the first outage, any NOSCRIPT."""
        received = self.clock.monotonic()
        failure: BaseException | None = None
        noscript = False
        later: list[tuple[SharedBreakerCore, Transition]] = []
        for item, reply in zip(items, replies, strict=True):
            try:
                if isinstance(reply, BaseException):
                    raise reply
                wanted = item.done(reply, received)
            except Exception as exc:  # this command's reply: NOSCRIPT, or an outage
                if is_noscript(exc):
                    noscript = True
                elif item.node is not None and self.supervisor.unreachable(exc):
                    self.supervisor.lose(item.node, outage(exc) or repr(exc))  # that node only
                    if item.core is not None:
                        item.core.away = True
                else:
                    failure = failure or (exc if outage(exc) else BadReply(repr(exc)))
                item.retry()
                continue
            if item.node is not None and item.node in self.supervisor.away:
                self.supervisor.regain(item.node)
            if wanted is not None:
                later.append(wanted)
        return later, failure, noscript

    def _items(self, work: Work, n: int) -> list[_Item]:
        """Chunk ``n``'s commands, each with what to do with its reply and how to retry it.

        Flushes first (every breaker with news, its unacknowledged flushes again), then the
        local trips to push (after their breakers' flushes), the probe reports, releases and
        permits to give back queued now, and registrations.
        """
        outbox = self.outbox
        marked = work.cores_of(n)
        ops = outbox.take_ops()
        orphans = outbox.take_orphans()
        names = work.names_of(n)
        if not (marked or ops or names or orphans):
            return []
        self._seq += 1
        replica, now = self._replica(), self.now_arg()
        flush, report = self.scripts["flush"].sha, self.scripts["report"].sha
        items: list[_Item] = []
        pushes: list[_Item] = []
        args: tuple[Any, ...]
        command: Command
        node_of = self.supervisor.node_of
        for core in marked:
            keys = core.keys
            node = node_of(keys.state)
            if node is not None and self.supervisor.is_away(node):
                core.away = True  # decides locally; tried again once its node is due
                outbox.mark(core)
                continue
            retry = functools.partial(self.mark, core, used=False)
            pushed = core in self.pushing  # its trip is on its way, on its own
            wanted = None if pushed else core.wanted()
            figures = (core.rejected, histogram_arg(core.latency))
            for o in core.take_outcomes(self._seq):
                args = (o.gen, o.calls, o.failures, o.slow, *core.window_args, now, self.ttl_ms)
                command = ("evalsha", (flush, 4, *keys, *args, replica, o.seq, *figures))
                done = functools.partial(self._flushed, core, o, pushed or wanted is not None)
                items.append(_Item(command, done, retry, core, node))
            if wanted is not None:
                moved = functools.partial(self._moved, core)
                pushes.append(_Item(self._cas_command(core, wanted), moved, retry, core, node))
        items += pushes
        for core, op in ops:
            keys = core.keys
            lease_id = f"{replica}:{op.lease}"
            retry = functools.partial(outbox.add, core, op)
            node = node_of(keys.state)
            if isinstance(op, Report):
                args = (op.gen, lease_id, int(op.failed), int(op.slow))
                command = ("evalsha", (report, 2, keys.state, keys.probes, *args))
                reported = functools.partial(self._reported, core, op)
                items.append(_Item(command, reported, retry, core, node))
            else:
                command = ("zrem", (keys.probes, lease_id))
                items.append(_Item(command, _nothing, retry, core, node))
        for lease_key, lost in orphans:  # permits whose grant or return was lost
            permits = key(self.prefix, lease_key, "leases")
            retry = functools.partial(outbox.orphan, lease_key, lost)
            items.append(_Item(("zrem", (permits, lost)), _nothing, retry, None, node_of(permits)))
        if names:
            retry = functools.partial(outbox.requeue, names)
            registry = f"{self.prefix}:names"
            add = self.scripts["names"].sha
            for group, members in (
                (registry, dict.fromkeys(name for name, _ in names)),
                (f"{registry}:other", dict.fromkeys(name for name, other in names if other)),
            ):
                if members:  # added, and the registry's lifetime renewed, in one script
                    command = ("evalsha", (add, 1, group, "add", self.ttl_ms, *members))
                    added = functools.partial(self._added, group)
                    items.append(_Item(command, added, retry, None, node_of(group)))
        return items

    def _added(self, registry: str, reply: Any, _received: float) -> None:
        self.read_names(reply, registry)

    def _flushed(
        self, core: SharedBreakerCore, sent: Outcomes, pushing: bool, reply: Any, received: float
    ) -> tuple[SharedBreakerCore, Transition] | None:
        flushed = parse_flush(reply)
        core.away = False
        if flushed.fleet.reset:
            self.reset_seen(core.name, core.keys.state)
        wanted = core.on_flush(sent, flushed, received, pushing)
        return None if wanted is None else (core, wanted)

    def _moved(self, core: SharedBreakerCore, reply: Any, received: float) -> None:
        self._adopt(core, parse_transition(reply).fleet, received)

    def _reported(
        self, core: SharedBreakerCore, sent: Report, reply: Any, received: float
    ) -> tuple[SharedBreakerCore, Transition] | None:
        wanted = core.on_report(sent, parse_report(reply))
        return None if wanted is None else (core, wanted)

    async def _apply(self, wanted: list[tuple[SharedBreakerCore, Transition]]) -> None:
        """Compare-and-set the transitions the cores asked for, in one pipeline."""
        commands = [self._cas_command(core, t) for core, t in wanted]
        try:
            replies = await self.supervisor.send(commands)
        except Exception as exc:  # the next probe or flush works the verdict out again
            if not isinstance(exc, LoopLate):
                if outage(exc) is None:
                    raise
                self.supervisor.fail(exc)
            for core, _ in wanted:
                self.mark(core)
            return
        received = self.clock.monotonic()
        for (core, _), reply in zip(wanted, replies, strict=True):
            try:
                if isinstance(reply, Exception):
                    raise reply
                moved = parse_transition(reply)
            except Exception as exc:
                if is_noscript(exc):
                    await self.supervisor.load_scripts(self.scripts.values())
                else:
                    self.supervisor.fail(exc if outage(exc) else BadReply(repr(exc)))
                self.mark(core)
                continue
            self._adopt(core, moved.fleet, received)
