"""The sync engine of ``RedisStore``: when flush rounds run, and what a shared breaker asks.

* What a round does (its commands, a chunk at a time, and what each reply does) is in
  ``rounds``; what waits for it, in the ``Outbox``; published transitions arrive through the
  ``Subscriber``, which the engine starts and stops with its flusher.
* A round carries only the breakers that have news (outcomes, a local trip to push) or whose
  fleet state must be read (new, revived, just recovered), and the names to register. An
  idle store runs no round and costs no loop time.
* Rounds start ``sync_interval`` apart while there is news, at once when a breaker trips on
  its own outcomes, a probe reports, or strict mode waits. A breaker's own trip is pushed at
  once on its own (``push``): not after a round under way, nor behind its flush. While
  the store is degraded, the flusher tries to reconnect with backoff (up to 2 s); calls
  never wait for it.
* A breaker unused for ``forget_after`` is dropped from memory (unless a policy holds it).
* Background loops end once their task is being cancelled, even when a library below them
  loses the ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...events import Event, SubscriberReplaced
from .breaker import SharedBreakerCore
from .outbox import Outbox
from .primitives import (
    FleetState,
    ProbeReply,
    Release,
    Report,
    Transition,
    parse_probe,
    parse_transition,
)
from .rounds import Rounds
from .subscriber import Subscriber
from .supervisor import Backoff, Supervisor, cancelling

if TYPE_CHECKING:
    from weakref import WeakValueDictionary

    from ...clock import Clock, TimerHandle

__all__ = ["SyncEngine"]

logger = logging.getLogger("resilience.redis")

_REGISTER_EVERY = 10.0  # seconds: a name in use is added to the registry again this often
# (at most a third of the store's ttl, so the registry never expires while a name is used)


class SyncEngine(Rounds):
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
        self._seq = 0
        self.outbox = Outbox(register_every=min(_REGISTER_EVERY, ttl_ms / 3000))
        self._recent: OrderedDict[str, tuple[float, SharedBreakerCore]] = OrderedDict()
        self.subscriber = Subscriber(
            client=client,
            supervisor=supervisor,
            channel=self.channel,
            sync_interval=sync_interval,
            cluster=cluster,
            closed=lambda: self._closed,
            on_transition=self._published,
            on_replaced=self._resubscribed,
        )
        self._wake = asyncio.Event()
        self._round_done: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pushes: set[asyncio.Task[None]] = set()  # trips pushed on their own (push)
        self.pushing: set[SharedBreakerCore] = set()  # ... their breakers, until answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._late_retries = 0
        self._timer: TimerHandle | None = None  # the next round's, while news waits
        self._timer_idle = True
        self._timer_due = 0.0
        self._last_start = float("-inf")
        self.on_start: Callable[[], None] | None = None  #: run once background work starts

    # --- the Engine protocol (what a shared core asks) ------------------------------------
    def mark(self, core: SharedBreakerCore, *, used: bool = True) -> None:
        """``core`` joins the next round; ``used``: it stays in memory for ``forget_after``
        from now (a refresh alone does not keep a breaker)."""
        core.marked = True
        self.outbox.mark(core)
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

    def push(self, core: SharedBreakerCore) -> None:
        """``core`` tripped on its own outcomes: its open goes to the fleet now, on its own
        (one compare-and-set, which publishes it), neither after a round under way nor
        behind the flush of the outcomes that tripped it: those follow with the next round,
        which leaves the push to this. Should it fail, the next round pushes it. A quorum
        vote, or a store degraded, goes with a round started now."""
        if self.degraded or core.config.quorum:
            self.wake()
            return
        self.start()
        if self._closed or not self._tasks:  # closed (or no loop to run on): nothing to send
            self.wake()
            return
        if self._loop is not None and core not in self.pushing:
            self.pushing.add(core)
            task = self._loop.create_task(self._push(core))
            self._pushes.add(task)
            task.add_done_callback(self._pushes.discard)

    async def _push(self, core: SharedBreakerCore) -> None:
        try:
            wanted = core.wanted()
            if wanted is not None and not self.degraded:
                await self.transition(core, wanted)
        except Exception as exc:  # the next round pushes it again
            logger.debug("resilience: pushing a trip of %r failed: %r", core.name, exc)
            self.mark(core)
        finally:
            self.pushing.discard(core)

    def enqueue(self, core: SharedBreakerCore, op: Report | Release) -> None:
        """A probe report or a lease release, sent with a round started now."""
        self.outbox.add(core, op)
        self.wake()

    async def probe(self, core: SharedBreakerCore, lease: int) -> ProbeReply:
        """A fleet-wide probe lease for ``core`` (moving OPEN to HALF_OPEN if it is time)."""
        config = core.config
        args = [
            core.gen,
            config.half_open_calls,
            int(config.probe_lease * 1000),
            f"{self._replica()}:{lease}",
            self.now_arg(),
            self.ttl_ms,
            self.channel,
            core.name,
        ]
        awaitable = self.scripts["probe"](keys=core.keys.machine, args=args)
        reply = await self.call(awaitable, key=core.keys.state)
        probed = self.supervisor.parsed(parse_probe, reply)
        self._adopt(core, probed.fleet, self.clock.monotonic())
        return probed

    async def transition(self, core: SharedBreakerCore, wanted: Transition) -> None:
        """Apply ``wanted`` in Redis and let ``core`` adopt the outcome."""
        script = self.scripts["transition"]
        awaitable = script(keys=core.keys.machine, args=self._cas(core, wanted))
        reply = await self.call(awaitable, key=core.keys.state)
        moved = self.supervisor.parsed(parse_transition, reply)
        self._adopt(core, moved.fleet, self.clock.monotonic())

    async def commit(self) -> None:
        """Strict mode: wait until the outcomes buffered so far are stored."""
        if self.degraded:
            return
        await asyncio.shield(self.next_round())

    # --- what the store asks ----------------------------------------------------------------
    async def call(self, awaitable: Any, *, extra: float = 0.0, key: str | None = None) -> Any:
        """One Redis call through the supervisor (bounded; failures degrade the store, or on
        a Cluster the node of ``key``)."""
        self.start()
        return await self.supervisor.call(awaitable, extra=extra, key=key)

    def register(self, name: str, now: float | None = None, *, other: bool = False) -> None:
        """Keep ``name`` in the fleet's registry while it is used: re-added every 10 s (a
        third of the store's ``ttl`` if that is shorter), each time renewing the registry's
        lifetime. ``other``: a fleet-wide bulkhead, rate limiter or budget (not a breaker),
        also listed in ``<prefix>:names:other``, so status reads those keys only for such
        names."""
        if self.outbox.register(name, self.clock.monotonic() if now is None else now, other=other):
            self._soon()

    def orphan(self, lease_key: str, lease: str) -> None:
        """A permit whose grant or return was lost: given back when Redis answers."""
        self.outbox.orphan(lease_key, lease)
        self._soon()

    def has_work(self) -> bool:
        """Whether anything waits for a round."""
        return self.outbox.has_work()

    def read_all(self) -> None:
        """Every breaker in memory reads the fleet's state in the next round."""
        for core in list(self.cores.values()):
            if not core.marked:
                self.mark(core, used=False)

    def next_round(self) -> asyncio.Future[None]:
        """A future resolved when the next round (started after now) has finished."""
        self.start()
        if self._round_done is None:
            self._round_done = asyncio.get_running_loop().create_future()
        self._wake.set()
        return self._round_done

    # --- replies and messages, to the breakers ------------------------------------------------
    def _published(self, name: str, fleet: FleetState) -> None:
        """A transition published on the channel: adopted if this replica holds the breaker."""
        core = self.cores.get(name)
        if core is not None:
            core.adopt(fleet, self.clock.monotonic())

    def _resubscribed(self) -> None:
        """A replacement subscription is live: what was published meanwhile is read now."""
        self._emit(SubscriberReplaced(name=self.prefix))
        self.read_all()
        self.wake()

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
            loop.create_task(self.subscriber.run(), name=f"resilience-sub-{self.prefix}"),
        ]
        if self.supervisor.sentinel_pool is not None:  # a failover must be seen at once
            watch = self.supervisor.watch_primary()
            self._tasks.append(loop.create_task(watch, name=f"resilience-primary-{self.prefix}"))
        if self.on_start is not None:
            self.on_start()

    def _soon(self) -> None:
        """Make sure a round runs within ``sync_interval`` (news is waiting)."""
        self.start()
        if not self._wake.is_set() and self._timer_idle:
            self._wake_later()

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

    async def _flusher(self) -> None:
        backoff = Backoff(self.sync_interval)
        next_try = 0.0  # degraded: no reconnect attempt before this (backoff, up to 2 s)
        while not self._closed and not cancelling():
            if self.degraded:
                delay = max(0.0, next_try - self.clock.monotonic())
                timer = self.clock.call_later(delay, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
            else:
                await self._wake.wait()
            if cancelling():
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
            self.outbox.forget(name)

    # --- lifecycle ------------------------------------------------------------------------
    async def aclose(self, last_round: float) -> None:
        """A last round (if Redis answers within ``last_round`` s), then stop the tasks."""
        if self._closed:
            return
        if self._tasks and not self.degraded:
            for core in list(self.cores.values()):
                core.leave()  # a quorum vote goes with its replica
            if self._pushes:  # a trip on its way is answered (or given up) first
                await asyncio.wait(list(self._pushes), timeout=last_round)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.next_round()), last_round)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        tasks, self._tasks = [*self._tasks, *self._pushes], []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def forked(self) -> None:
        """In a forked child: nothing of the parent's background work or buffers is ours."""
        self._tasks = []
        self._pushes = set()
        self.pushing = set()
        self._loop = None
        self._timer = None
        self._round_done = None
        self._timer_idle = True
        self.outbox.clear()
        for core in list(self.cores.values()):
            core.forked()
        self._late_retries = 0
        self._wake = asyncio.Event()
