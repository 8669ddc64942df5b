"""The sync engine of ``RedisStore``: flush rounds, the subscriber, and applying replies.

* A *round* carries only the breakers that have news (outcomes, a local trip to push) or
  whose fleet state must be read (new, revived, just recovered), and the names to register:
  those queued when it starts, plus the probe reports and releases queued by the time each
  chunk is sent. It is sent in chunks of at most ``_CHUNK`` breakers, one pipeline each (a
  Cluster: node by node, all at once), the event loop getting its turn between two chunks,
  so the loop time a round holds at once is bounded by a chunk's work whatever the burst
  (10,000 new breakers, a recovery). Replies go to each breaker's core, which answers with
  the transition it wants; those are compare-and-set in a second pipeline. An idle store
  runs no round and costs no loop time.
* Rounds start ``sync_interval`` apart while there is news, at once when a breaker trips on
  its own outcomes, a probe reports, or strict mode waits.
* The subscriber applies published transitions within milliseconds. Its connection is
  health-checked (PING when nothing was heard for ``sync_interval``, a PONG within the store's
  timeout) and replaced when it goes quiet. Replacements back off (from ``sync_interval`` up
  to 2 s), and the backoff starts over only once the new subscription is heard from (its
  confirmation, a PONG, a message): a Redis that accepts connections but answers nothing
  (paused, blackholed) is not asked again every few hundred milliseconds.
* Background loops end once their task is being cancelled, even when a library below them
  loses the ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ...errors import StoreUnavailableError
from ...events import Event, StoreDataReset, SubscriberReplaced
from ...rules.breaker import open_duration
from .breaker import VOTE_LEASE, SharedBreakerCore
from .primitives import (
    BadReply,
    Outcomes,
    ProbeReply,
    Release,
    Report,
    Transition,
    histogram_arg,
    is_noscript,
    key,
    number,
    outage,
    parse_flush,
    parse_message,
    parse_probe,
    parse_report,
    parse_transition,
    text,
)
from .supervisor import Backoff, LoopLate, Supervisor

if TYPE_CHECKING:
    from weakref import WeakValueDictionary

    from ...clock import Clock, TimerHandle

__all__ = ["SyncEngine"]

_T = TypeVar("_T")

logger = logging.getLogger("resilience.redis")

_REGISTER_EVERY = 10.0  # seconds: a name in use is added to the registry again this often
# (at most a third of the store's ttl, so the registry never expires while a name is used)
_MAX_LATE_RETRIES = 3  # rounds retried at once when the loop, not Redis, was late
_CHUNK = 50  # breakers per pipeline: bounds the loop time of one exchange (~1 ms a step)
_NAMES_PER_CHUNK = 500  # names registered per pipeline (one command per registry)
_PER_COMMAND = 0.0002  # seconds a pipeline's time-out grows by per command (a big one is work)


def _nothing(*_: Any) -> None:
    """A reply that needs nothing done (or a command never retried)."""


@dataclass(slots=True)
class _Item:
    """One command of a round: what to do with its reply, and how to send it again."""

    command: tuple[str, tuple[Any, ...]]
    done: Callable[[Any, float], tuple[SharedBreakerCore, Transition] | None]
    retry: Callable[[], Any]
    core: SharedBreakerCore | None = None
    node: str | None = None  #: the Cluster node it goes to (``None``: a single Redis)


@dataclass(slots=True)
class _Work:
    """The breakers and names one round carries: those queued when it started, sent a chunk
    at a time (chunk ``n``: the ``n``-th ``_CHUNK`` breakers and ``_NAMES_PER_CHUNK``
    names). Probe reports, releases and permits to give back are not waiting for the round
    to end: each chunk carries those queued when it is built."""

    cores: list[SharedBreakerCore]
    names: list[tuple[str, bool]]

    def chunks(self) -> int:
        """How many chunks (pipelines) the round takes."""
        return max(1, -(-len(self.cores) // _CHUNK), -(-len(self.names) // _NAMES_PER_CHUNK))

    def cores_of(self, n: int) -> list[SharedBreakerCore]:
        """The breakers of chunk ``n``."""
        return self.cores[n * _CHUNK : (n + 1) * _CHUNK]

    def names_of(self, n: int) -> list[tuple[str, bool]]:
        """The names registered with chunk ``n``."""
        return self.names[n * _NAMES_PER_CHUNK : (n + 1) * _NAMES_PER_CHUNK]


def _cancelling() -> bool:
    """Whether the running task is being cancelled (even if a library lost the error)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class SyncEngine:
    """Keeps a store's shared breakers in sync with Redis (see the module docstring)."""

    def __init__(
        self,
        *,
        client: Any,
        scripts: dict[str, Any],
        supervisor: Supervisor,
        prefix: str,
        replica: Callable[[], str],
        sync_interval: float,
        strict: bool,
        ttl_ms: int,
        forget_after: float,
        clock: Clock,
        fake_time: bool,
        cores: WeakValueDictionary[str, SharedBreakerCore],
        emit: Callable[[Event], None],
        cluster: bool,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.supervisor = supervisor
        self.prefix = prefix
        self.channel = f"{prefix}:events"
        self._replica = replica
        self.sync_interval = sync_interval
        self.strict = strict
        self.ttl_ms = ttl_ms
        self.forget_after = forget_after
        self.clock = clock
        self._fake_time = fake_time
        self.cores = cores  # every live core, by name (a miss costs one dict lookup)
        self._emit = emit
        self._cluster = cluster
        self._seq = 0
        self._marked: dict[SharedBreakerCore, None] = {}  # cores in the next round, in order
        self._recent: OrderedDict[str, tuple[float, SharedBreakerCore]] = OrderedDict()
        self._ops: list[tuple[SharedBreakerCore, Report | Release]] = []
        self._orphans: list[tuple[str, str]] = []  # (key, lease) to give back
        self._registered: dict[tuple[str, bool], float] = {}
        self._unregistered: dict[tuple[str, bool], None] = {}  # in the order they came
        self._register_every = min(_REGISTER_EVERY, ttl_ms / 3000)
        self._wake = asyncio.Event()
        self._round_done: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._late_retries = 0
        self._timer: TimerHandle | None = None  # the next round's, while news waits
        self._timer_idle = True
        self._timer_due = 0.0
        self._last_start = float("-inf")
        self._sub_turn = 0  # a Cluster: which node the next subscriber connects to

    # --- the Engine protocol (what a shared core asks) ------------------------------------
    @property
    def degraded(self) -> bool:
        """Whether the store is running on local state."""
        return self.supervisor.degraded

    def mark(self, core: SharedBreakerCore, *, used: bool = True) -> None:
        """``core`` joins the next round; ``used``: it stays in memory for ``forget_after``
        from now (a refresh alone does not keep a breaker)."""
        core.marked = True
        self._marked[core] = None
        if used:
            name = core.name
            now = self.clock.monotonic()
            recent = self._recent
            if name in recent:
                recent.move_to_end(name)
            recent[name] = (now, core)
            self.register(name, now)
        self._soon()

    def wake(self) -> None:
        """Run a round now."""
        self.start()
        self._wake.set()

    def enqueue(self, core: SharedBreakerCore, op: Report | Release) -> None:
        """A probe report or a lease release, sent with a round started now."""
        self._ops.append((core, op))
        self.wake()

    async def probe(self, core: SharedBreakerCore, lease: int) -> ProbeReply:
        """A fleet-wide probe lease for ``core`` (moving OPEN to HALF_OPEN if it is time)."""
        config = core.config
        reply = self._parsed(
            parse_probe,
            await self.call(
                key=core.keys[0],
                awaitable=self.scripts["probe"](
                    keys=core.keys,
                    args=[
                        core.gen,
                        config.half_open_calls,
                        int(config.probe_lease * 1000),
                        f"{self._replica()}:{lease}",
                        self.now_arg(),
                        self.ttl_ms,
                        self.channel,
                        core.name,
                    ],
                ),
            ),
        )
        self._reset_seen(core, reply.fleet.reset)
        core.adopt(reply.fleet, self.clock.monotonic())
        return reply

    async def transition(self, core: SharedBreakerCore, wanted: Transition) -> None:
        """Apply ``wanted`` in Redis and let ``core`` adopt the outcome."""
        script = self.scripts["transition"]
        awaitable = script(keys=core.keys, args=self._cas(core, wanted))
        reply = self._parsed(parse_transition, await self.call(awaitable, key=core.keys[0]))
        self._reset_seen(core, reply.fleet.reset)
        core.adopt(reply.fleet, self.clock.monotonic())

    def _parsed(self, parse: Callable[[Any], _T], reply: Any) -> _T:
        """A reply parsed; one that does not parse is a store failure, never a crash."""
        try:
            return parse(reply)
        except BadReply as exc:
            self.supervisor.fail(exc)
            raise StoreUnavailableError(str(exc)) from exc

    async def commit(self) -> None:
        """Strict mode: wait until the outcomes buffered so far are stored."""
        if self.degraded:
            return
        await asyncio.shield(self.next_round())

    # --- helpers --------------------------------------------------------------------------
    async def call(self, awaitable: Any, *, extra: float = 0.0, key: str | None = None) -> Any:
        """One Redis call through the supervisor (bounded; failures degrade the store, or on
        a Cluster the node of ``key``)."""
        self.start()
        return await self.supervisor.call(awaitable, extra=extra, key=key)

    def now_arg(self) -> str:
        """The time scripts use: "" (the server's TIME), or a fake clock's, in ms."""
        return repr(self.clock.monotonic() * 1000) if self._fake_time else ""

    def register(self, name: str, now: float | None = None, *, other: bool = False) -> None:
        """Keep ``name`` in the fleet's registry while it is used: re-added every 10 s (a
        third of the store's ``ttl`` if that is shorter), each time renewing the registry's
        lifetime. ``other``: a fleet-wide bulkhead, rate limiter or budget (not a breaker),
        also listed in ``<prefix>:names:other``, so status reads those keys only for such
        names."""
        if now is None:
            now = self.clock.monotonic()
        entry = (name, other)
        last = self._registered.get(entry)
        if last is None or now - last >= self._register_every:
            self._registered[entry] = now
            self._unregistered[entry] = None
            self._soon()

    def _soon(self) -> None:
        """Make sure a round runs within ``sync_interval`` (news is waiting)."""
        self.start()
        if not self._wake.is_set() and self._timer_idle:
            self._wake_later()

    def has_work(self) -> bool:
        """Whether anything waits for a round."""
        return bool(self._marked or self._ops or self._orphans or self._unregistered)

    def orphan(self, lease_key: str, lease: str) -> None:
        """A permit whose grant or return was lost: given back when Redis answers."""
        self._orphans.append((lease_key, lease))
        self._soon()

    def _reset_seen(self, core: SharedBreakerCore, reset: int) -> None:
        if reset:
            logger.warning("breaker %r: unparsable data in Redis was reset", core.name)
            self._emit(StoreDataReset(name=core.name, key=core.keys[0]))

    def read_names(self, reply: Any, registry: str) -> list[str]:
        """A ``names.lua`` reply: the names it lists; a registry reset is reported."""
        if not isinstance(reply, list) or not reply:
            raise BadReply(f"unexpected names reply {reply!r:.80}")
        if number(reply[0]):
            logger.warning("the registry %r held data that is not ours: reset", registry)
            self._emit(StoreDataReset(name=self.prefix, key=registry))
        return [text(name) for name in reply[1:]]

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

    # --- background work ------------------------------------------------------------------
    def start(self) -> None:
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
        self._timer_idle = True
        self._tasks = [
            loop.create_task(self._flusher(), name=f"resilience-flush-{self.prefix}"),
            loop.create_task(self._subscriber(), name=f"resilience-sub-{self.prefix}"),
        ]

    def _wake_later(self) -> None:
        """A round ``sync_interval`` after the last one started (news is waiting)."""
        if self._loop is None:
            return
        self._timer_idle = False
        delay = max(0.0, self._last_start + self.sync_interval - self.clock.monotonic())
        self._timer = self.clock.call_later(delay, self._timer_fired)
        self._timer_due = self.clock.monotonic() + delay

    def _timer_fired(self) -> None:
        self._timer_idle = True
        self.supervisor.note_lag(self.clock.monotonic() - self._timer_due)
        self._wake.set()

    def next_round(self) -> asyncio.Future[None]:
        """A future resolved when the next round (started after now) has finished."""
        self.start()
        if self._round_done is None:
            self._round_done = asyncio.get_running_loop().create_future()
        self._wake.set()
        return self._round_done

    def read_all(self) -> None:
        """Every breaker in memory reads the fleet's state in the next round."""
        for core in list(self.cores.values()):
            if not core.marked:
                self.mark(core, used=False)

    async def _flusher(self) -> None:
        backoff = Backoff(self.sync_interval)
        next_try = 0.0  # degraded: no reconnect attempt before this (backoff, up to 2 s)
        while not self._closed and not _cancelling():
            if self.degraded:
                delay = max(0.0, next_try - self.clock.monotonic())
                timer = self.clock.call_later(delay, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
            else:
                await self._wake.wait()
            if _cancelling():
                return
            self._wake.clear()
            self._last_start = now = self.clock.monotonic()
            done, self._round_done = self._round_done, None
            try:
                if self.degraded:
                    if now < next_try:
                        continue  # woken by news: it waits for Redis, calls do not
                    if await self.supervisor.reconnect():
                        backoff.reset()
                        self.read_all()
                    else:
                        next_try = self.clock.monotonic() + backoff.next()
                        continue
                await self.round()
                self._forget_idle()
            except Exception:  # never let the flusher die
                logger.exception("resilience flush round failed")
            finally:  # waiters (sync, strict commits) go on even if the round failed
                if done is not None and not done.done():
                    done.set_result(None)
            if self.has_work():
                self._soon()

    def _forget_idle(self) -> None:
        """Drop the strong reference to breakers unused for ``forget_after`` (O(dropped))."""
        recent = self._recent
        horizon = self.clock.monotonic() - self.forget_after
        while recent:
            name, (used, core) = next(iter(recent.items()))
            if used > horizon or core.marked or core.has_news():
                break
            del recent[name]
            self._registered.pop((name, False), None)

    async def round(self, again: bool = True) -> None:
        """One flush round: everything queued now, a chunk at a time (module docstring)."""
        work = self._take_work()
        if work is None:
            return
        noscript = False
        n = 0  # the next chunk to build
        try:
            while n < work.chunks():
                if n:
                    await asyncio.sleep(0)  # the event loop's turn between two chunks
                    if self.degraded or self._closed or _cancelling():
                        break
                items = self._items(work, n)
                n += 1
                if not items:
                    continue
                try:
                    replies = await self._send([item.command for item in items])
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
                    await self._load_scripts()
        finally:  # what was not sent (an outage, or cancelled) waits for the next round
            self._give_back(work, n)
        if noscript and again:
            await self.round(again=False)  # what NOSCRIPT sent back, at once

    def _take_work(self) -> _Work | None:
        """Everything queued now, for one round (``None``: nothing is)."""
        if not self.has_work():
            return None
        work = _Work(list(self._marked), list(self._unregistered))
        self._marked, self._unregistered = {}, {}
        return work

    def _give_back(self, work: _Work, n: int) -> None:
        """The chunks from ``n`` on were not sent: they wait for the next round."""
        for core in work.cores[n * _CHUNK :]:
            self._marked[core] = None
        for name in work.names[n * _NAMES_PER_CHUNK :]:
            self._unregistered[name] = None

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

    def _items(self, work: _Work, n: int) -> list[_Item]:
        """Chunk ``n``'s commands, each with what to do with its reply and how to retry it.

        Flushes first (every breaker with news, its unacknowledged flushes again), then the
        local trips to push (after their breakers' flushes), the probe reports, releases and
        permits to give back queued now, and registrations.
        """
        marked = work.cores_of(n)
        ops, self._ops = self._ops, []
        orphans, self._orphans = self._orphans, []
        names = work.names_of(n)
        if not (marked or ops or names or orphans):
            return []
        self._seq += 1
        replica, now = self._replica(), self.now_arg()
        flush, report = self.scripts["flush"].sha, self.scripts["report"].sha
        items: list[_Item] = []
        pushes: list[_Item] = []
        node_of = self.supervisor.node_of
        for core in marked:
            node = node_of(core.keys[0])
            if node is not None and self.supervisor.is_away(node):
                core.away = True  # decides locally; tried again once its node is due
                self._marked[core] = None
                continue
            retry = functools.partial(self.mark, core, used=False)
            wanted = core.wanted()
            figures = (core.rejected, histogram_arg(core.latency))
            for o in core.take_outcomes(self._seq):
                args = (o.gen, o.calls, o.failures, o.slow, *core.window_args, now, self.ttl_ms)
                command = ("evalsha", (flush, 4, *core.keys, *args, replica, o.seq, *figures))
                done = functools.partial(self._flushed, core, o, wanted is not None)
                items.append(_Item(command, done, retry, core, node))
            if wanted is not None:
                command = (
                    "evalsha",
                    (self._cas_sha(), 3, *core.keys[:3], *self._cas(core, wanted)),
                )
                moved = functools.partial(self._moved, core)
                pushes.append(_Item(command, moved, retry, core, node))
        items += pushes
        for core, op in ops:
            lease_id = f"{replica}:{op.lease}"
            retry = functools.partial(self._ops.append, (core, op))
            node = node_of(core.keys[0])
            if isinstance(op, Report):
                args = (op.gen, lease_id, int(op.failed), int(op.slow))
                command = ("evalsha", (report, 2, core.keys[0], core.keys[2], *args))
                reported = functools.partial(self._reported, core, op)
                items.append(_Item(command, reported, retry, core, node))
            else:
                command = ("zrem", (core.keys[2], lease_id))
                items.append(_Item(command, _nothing, retry, core, node))
        for lease_key, lost in orphans:  # permits whose grant or return was lost
            permits = key(self.prefix, lease_key, "leases")
            retry = functools.partial(self._orphans.append, (lease_key, lost))
            items.append(_Item(("zrem", (permits, lost)), _nothing, retry, None, node_of(permits)))
        if names:
            retry = functools.partial(self._unregistered.update, dict.fromkeys(names))
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
        self._reset_seen(core, flushed.fleet.reset)
        wanted = core.on_flush(sent, flushed, received, pushing)
        return None if wanted is None else (core, wanted)

    def _moved(self, core: SharedBreakerCore, reply: Any, received: float) -> None:
        moved = parse_transition(reply)
        self._reset_seen(core, moved.fleet.reset)
        core.adopt(moved.fleet, received)

    def _reported(
        self, core: SharedBreakerCore, sent: Report, reply: Any, received: float
    ) -> tuple[SharedBreakerCore, Transition] | None:
        wanted = core.on_report(sent, parse_report(reply))
        return None if wanted is None else (core, wanted)

    def _cas_sha(self) -> str:
        return str(self.scripts["transition"].sha)

    async def _apply(self, wanted: list[tuple[SharedBreakerCore, Transition]]) -> None:
        """Compare-and-set the transitions the cores asked for, in one pipeline."""
        sha = self.scripts["transition"].sha
        commands = [
            ("evalsha", (sha, 3, *core.keys[:3], *self._cas(core, t))) for core, t in wanted
        ]
        try:
            replies = await self._send(commands)
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
                    await self._load_scripts()
                else:
                    self.supervisor.fail(exc if outage(exc) else BadReply(repr(exc)))
                self.mark(core)
                continue
            self._reset_seen(core, moved.fleet.reset)
            core.adopt(moved.fleet, received)

    async def _load_scripts(self) -> None:
        """A server that does not know our scripts (restarted, failed over, a new node)."""
        for script in self.scripts.values():
            with contextlib.suppress(StoreUnavailableError):
                await self.call(self.client.script_load(script.script))

    async def _send(self, commands: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run commands: one pipeline, or (a Cluster) all at once, node by node.

        Replies come back in order, errors as exception objects; a round that cannot reach
        Redis at all raises (``LoopLate`` when the event loop, not Redis, was late).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        supervisor = self.supervisor
        extra = len(commands) * _PER_COMMAND
        try:
            async with asyncio.timeout(supervisor.timeout + extra):
                if self._cluster:
                    if not supervisor.cluster_ready:
                        await supervisor.init_cluster()
                    # each command bounded on its own: a node that does not answer fails only
                    # its own commands (the caller makes their breakers local)
                    replies = await asyncio.gather(
                        *(
                            asyncio.wait_for(getattr(self.client, cmd)(*argv), supervisor.timeout)
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
            if lag := supervisor.late(loop, started, extra):
                raise LoopLate(f"the event loop was {lag:.3f}s late") from exc
            raise

    # --- the subscriber -------------------------------------------------------------------
    async def _subscriber(self) -> None:
        backoff = Backoff(self.sync_interval)
        replaced = False

        def heard() -> None:  # the new subscription answered: it is alive
            backoff.reset()
            if replaced:
                self._emit(SubscriberReplaced(name=self.prefix))
                # what was published meanwhile: read it with the next round
                self.read_all()
                self.wake()

        while not self._closed and not _cancelling():
            try:
                async with await self._pubsub() as pubsub:
                    async with asyncio.timeout(self.supervisor.timeout):
                        await pubsub.subscribe(self.channel)
                    await self._listen(pubsub, heard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("resilience subscriber reconnecting after %r", exc)
            replaced = True
            if self._closed or _cancelling():
                return
            await asyncio.sleep(backoff.next())

    async def _pubsub(self) -> Any:
        """A pub/sub connection; on a Cluster, to a node that answers (in turn, so a
        replacement does not go back to the node that just went quiet)."""
        if not self._cluster:
            return self.client.pubsub()
        if not self.supervisor.cluster_ready:
            async with asyncio.timeout(self.supervisor.timeout * 4):
                await self.supervisor.init_cluster()
        nodes = self.client.get_primaries()
        live = [n for n in nodes if n.name not in self.supervisor.away] or nodes
        self._sub_turn += 1
        return self.client.pubsub(node=live[self._sub_turn % len(live)])

    async def _listen(self, pubsub: Any, heard: Callable[[], None]) -> None:
        """Apply messages until the connection goes quiet (no PONG in time) or fails;
        ``heard()`` once the first reply arrives (the subscription's confirmation)."""
        loop = asyncio.get_running_loop()
        last = loop.time()  # when the server was last heard (or asked to subscribe)
        alive = False
        pinged: float | None = None
        lagging = False
        interval = self.sync_interval
        timeout = self.supervisor.timeout
        while not self._closed and not _cancelling():
            now = loop.time()
            if pinged is None and now - last >= interval:
                await pubsub.ping()
                pinged = now
            elif pinged is not None and now - pinged > timeout:
                if lagging:  # our loop was late, not the connection: ask again
                    pinged, lagging = None, False
                    continue
                logger.warning("resilience subscriber on %r went quiet: replaced", self.channel)
                if not self._cluster:  # the same Redis answers our commands: it is away
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
        """A published transition: adopted by the breaker if this replica holds it."""
        try:
            name, fleet = parse_message(data)
        except BadReply:
            logger.warning("ignored an unparsable message on %r: %r", self.channel, data)
            return
        core = self.cores.get(name)
        if core is not None:
            core.adopt(fleet, self.clock.monotonic())

    # --- lifecycle ------------------------------------------------------------------------
    async def aclose(self, last_round: float) -> None:
        """A last round (if Redis answers within ``last_round`` s), then stop the tasks."""
        if self._closed:
            return
        if self._tasks and not self.degraded:
            for core in list(self.cores.values()):
                core.leave()  # a quorum vote goes with its replica
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.next_round()), last_round)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def forked(self) -> None:
        """In a forked child: nothing of the parent's background work or buffers is ours."""
        self._tasks = []
        self._loop = None
        self._timer = None
        self._round_done = None
        self._timer_idle = True
        self._ops = []
        self._orphans = []
        self._marked = {}
        self._registered = {}
        self._unregistered = {}
        for core in list(self.cores.values()):
            core.forked()
        self._late_retries = 0
        self._wake = asyncio.Event()
