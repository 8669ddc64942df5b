"""The breaker core a ``RedisStore`` hands out: the fleet's state, mirrored in this replica.

It alone decides the fleet's transitions for its breaker. The engine brings it replies and
published messages; it answers with the ``Transition`` it wants (or none). It asks the engine
for I/O through the small ``Engine`` protocol and typed messages, never through the store.

The rules it keeps (see docs/shared-state.md):

* Every outcome feeds the local window and the local rule first, so when a replica's own
  outcomes trip the breaker, that replica rejects from its next call on, exactly as an
  in-process breaker would. The trip is then pushed to the fleet (compare-and-set by
  generation); until the fleet has answered it, the fleet's older state does not override it.
* Healthy, the state is otherwise a cache of the fleet's: outcomes are buffered for the next
  flush, half-open probes are fleet-wide leases.
* Degraded, the same local state machine decides everything. What it learned (a local open)
  is pushed to the fleet when Redis answers again, before the fleet's older state is adopted.
* Quorum (``config.quorum = k``): the shared window opens nothing, and a replica's own trip
  is a vote; the fleet opens once k replicas' votes are live, for the fleet's own open time.
  A replica whose own window tripped stays open on its own meanwhile, and runs its own
  half-open probes. A vote is a lease of at most ``VOTE_LEASE`` seconds, renewed while the
  replica's own open period lasts and withdrawn when its store closes, so the vote of a
  replica that died lapses within ``VOTE_LEASE``.
* Generations: ``gen`` is the fleet's numbering (outcomes, probes and compare-and-sets carry
  it). A replica that decided alone numbered its own moves; when it takes the fleet's state
  numbered lower, it reports its own higher ``generation`` on (``BreakerCore``), and asks the
  fleet to number its state (or its next transition) above it, so they agree again.
* Forks: a forked child is a new replica; what the parent observed (buffered outcomes, probe
  leases, votes, local trips) stays the parent's, and the child's breaker starts from the
  fleet's state as last heard.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from ...clock import Clock, TimerHandle
from ...errors import CircuitOpenError, StoreUnavailableError
from ...rules.breaker import (
    BreakerConfig,
    BreakerCore,
    half_open_verdict,
    new_lease,
    open_duration,
    tripped,
)
from ...rules.windows import CountCounter
from ...states import CLOSED, DISABLED, FORCED_OPEN, HALF_OPEN, OPEN, CircuitState
from .primitives import (
    BreakerKeys,
    FleetState,
    FlushReply,
    Outcomes,
    ProbeReply,
    Release,
    Report,
    ReportReply,
    Transition,
    WindowArgs,
)
from .supervisor import LoopLate

__all__ = ["VOTE_LEASE", "Engine", "Pending", "SharedBreakerCore"]

_NEVER_HEARD = FleetState(CLOSED, 0, 0, 0, 0, 0)  # a breaker the fleet has not answered about

#: Seconds a quorum vote counts unless its replica renews it (it does, at half its life,
#: while its own open period lasts): the vote of a replica that died lapses within this.
VOTE_LEASE = 2.0


class Pending:
    """The outcomes a shared breaker buffered since its last flush, and the generation they
    were counted under. The closed state's hot path adds to it: plain slots, no I/O."""

    __slots__ = ("calls", "failures", "gen", "slow")

    def __init__(self, gen: int = 0) -> None:
        self.gen = gen
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def __repr__(self) -> str:
        counts = f"calls={self.calls}, failures={self.failures}, slow={self.slow}"
        return f"Pending(gen={self.gen}, {counts})"


class Engine(Protocol):
    """What a shared breaker needs from the engine that syncs it with Redis."""

    sync_interval: float

    @property
    def degraded(self) -> bool:
        """Whether the store runs on local state now."""

    def mark(self, core: SharedBreakerCore) -> None:
        """``core`` has news for the next flush round."""

    def wake(self) -> None:
        """Run a flush round now."""

    def push(self, core: SharedBreakerCore) -> None:
        """``core`` tripped on its own outcomes: push its open to the fleet now."""

    def enqueue(self, core: SharedBreakerCore, op: Report | Release) -> None:
        """Send a probe report or a lease release with the next round (started now)."""

    async def probe(self, core: SharedBreakerCore, lease: int) -> ProbeReply:
        """Ask for a fleet-wide probe lease (raises ``StoreUnavailableError``)."""

    async def transition(self, core: SharedBreakerCore, wanted: Transition) -> None:
        """Apply ``wanted`` in Redis and adopt the reply (raises ``StoreUnavailableError``)."""

    async def commit(self) -> None:
        """Strict mode: return once the outcomes buffered so far are stored."""


class SharedBreakerCore(BreakerCore):
    """A breaker core that mirrors the fleet's state from Redis (see the module docstring)."""

    __slots__ = (
        "_full_until",
        "_raised",
        "_renewal",
        "away",
        "diverged",
        "engine",
        "fleet_gen",
        "fleet_leases",
        "forced",
        "keys",
        "leaving",
        "marked",
        "pending",
        "seen",
        "seen_at",
        "strict",
        "unacked",
        "voted",
        "window_args",
    )

    def __init__(
        self, name: str, config: BreakerConfig, clock: Clock, engine: Engine, keys: BreakerKeys
    ) -> None:
        super().__init__(name, config, clock)
        self.engine = engine
        self.strict = bool(getattr(engine, "strict", False))
        self.keys = keys
        self.window_args = WindowArgs.of(config.window)
        self.pending = Pending()  # buffered since the last flush
        self.unacked: list[Outcomes] = []
        self.marked = False  # in the engine's next round
        self.fleet_gen = -1  # the highest generation adopted from the fleet (-1: none yet)
        self.diverged = False  # moved on local knowledge the fleet has not confirmed
        self.away = False  # its Redis Cluster node cannot be reached: decide locally
        self.forced: CircuitState | None = None  # manual control Redis has not heard yet
        self.fleet_leases: set[int] = set()  # probe leases Redis granted, not yet given back
        self._full_until = float("-inf")
        self.seen: FleetState | None = None  # the fleet's state last taken (forks start from it)
        self.seen_at = 0.0  # ... and when (local clock)
        self.voted = False  # a quorum vote of this replica may be live in Redis
        self.leaving = False  # its store is closing: the vote is withdrawn
        self._renewal: TimerHandle | None = None  # the vote's next renewal
        self._raised: tuple[int, int] | None = None  # (gen, generation) the fleet was told

    def reconfigure(self, config: BreakerConfig) -> bool:
        """As ``BreakerCore.reconfigure``; flushes describe the new window from then on."""
        self.window_args = WindowArgs.of(config.window)
        return super().reconfigure(config)

    # --- what the engine asks -------------------------------------------------------------
    def take_outcomes(self, seq: int) -> list[Outcomes]:
        """The flushes to send: every unacknowledged one, then the buffer as a new one.

        A flush whose reply was lost is sent again with its sequence number, which the script
        recognises: outcomes are counted once, whether or not the first try reached Redis. A
        breaker with nothing buffered sends an empty flush, which reads the fleet's state.
        """
        p = self.pending
        calls, failures, slow = p.calls, p.failures, p.slow
        p.calls = p.failures = p.slow = 0  # emptied in place: its gen stays
        self.marked = False
        gen = p.gen if calls else self.gen
        if self.diverged:  # what the fleet may still accept; never our local generation,
            gen = max(self.fleet_gen, 0)  # which the script would take as the fleet's floor
        batch = Outcomes(gen, calls, failures, slow, seq)
        if calls:
            self.unacked.append(batch)
            del self.unacked[:-64]  # bounded: the oldest are given up
            return list(self.unacked)
        return [*self.unacked, batch]

    def has_news(self) -> bool:
        """Outcomes not yet acknowledged, or local knowledge to push."""
        return bool(self.unacked or self.pending.calls or self.wanted() is not None)

    def wanted(self) -> Transition | None:
        """What the fleet must hear from this replica: a transition learned locally (before
        the fleet's state overrides it), a vote (or its withdrawal), or a renumbering."""
        if self.forced is not None:  # an operator's control made while Redis was away
            return Transition(self.forced, self.gen, force=True)
        if self.leaving:  # its store is closing: its vote goes with it
            return Transition(CLOSED, max(self.fleet_gen, 0), vote=True) if self.voted else None
        if self.diverged and self.state is OPEN and self.fleet_gen >= 0:
            opened_by = self.opened_by or (0, 0, 0)
            if not self.config.quorum:
                return Transition(OPEN, self.fleet_gen, self.reopens, opened_by)
            if self.clock.monotonic() >= self.open_until:
                return None  # its own open period is over: it has nothing to vote for
            # the fleet's first opening, for the fleet's open time: the back-off this
            # replica's own re-opens grew is its own
            return Transition(OPEN, self.fleet_gen, 0, opened_by, vote=True)
        if self._behind():
            return Transition(self.state, self.gen, renumber=True)
        return None

    def _behind(self) -> bool:
        """The fleet numbers its state below the generation this replica reported (it decided
        alone meanwhile), and has not been asked yet to number past it."""
        return (
            not self.diverged
            and self.forced is None
            and self.fleet_gen >= 0
            and self.generation > self.gen
            and self._raised != (self.gen, self.generation)
        )

    def sending(self, t: Transition) -> tuple[int, int]:
        """``t`` goes to Redis now: the floor the fleet's next generation must clear, and how
        long a vote lasts (ms; 0 for anything else). Notes what was sent: a renumbering asked
        for, a vote cast (renewed at half its life while this replica's own open period
        lasts) or withdrawn.

        The floor is the highest generation this replica reported, less one when ``t`` only
        confirms the state the replica is in (a local open pushed, a vote, an operator's
        control applied here): the fleet then numbers that state as the replica did.
        """
        floor = self.generation
        if t.renumber:
            self._raised = (self.gen, floor)
        elif t.new is self.state:
            floor -= 1
        if not t.vote:
            return floor, 0
        if t.new is not OPEN:
            self.voted = False
            return floor, 0
        self.voted = True
        left = self.open_until - self.clock.monotonic()
        life = min(left, VOTE_LEASE)
        if left > life and self._renewal is None:
            self._renewal = self.clock.call_later(life / 2, self._renew)
        return floor, max(1, math.ceil(life * 1000))

    def _renew(self) -> None:
        """Half the vote's life is gone: cast it again if this replica still votes."""
        self._renewal = None
        wanted = self.wanted()
        if wanted is not None and wanted.vote and wanted.new is OPEN:
            self.engine.mark(self)
            self.engine.wake()

    def leave(self) -> None:
        """Its store is closing: this replica's vote is withdrawn with the last round."""
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if self.voted:
            self.leaving = True
            self.engine.mark(self)

    def forked(self) -> None:
        """In a forked child, a new replica: what the parent observed stays the parent's
        (buffered outcomes, its window, probe leases, its vote, its own trips, an operator's
        control not yet sent); the breaker starts from the fleet's state as last heard."""
        self.pending = Pending(self.pending.gen)
        self.unacked = []
        self.marked = False
        self.rejected = 0
        self.latency = [0] * len(self.latency)
        self.fleet_leases = set()
        self.forced = None
        self.voted = self.leaving = False
        self._renewal = None
        self._raised = None
        self.window.reset()
        self._probes.clear()
        if self.diverged:
            self.diverged = False
            self._take(self.seen or _NEVER_HEARD, self.seen_at, announce=False)

    def on_flush(
        self, sent: Outcomes, reply: FlushReply, received: float, pushing: bool
    ) -> Transition | None:
        """A flush was stored: adopt the fleet's state; the transition the counts call for.

        ``pushing``: this round also carries our ``wanted()`` compare-and-set.
        """
        if sent in self.unacked:
            self.unacked.remove(sent)
        fleet = reply.fleet
        if self.forced is not None:  # an operator's control goes to the fleet first
            return None if pushing else self.wanted()
        known = self.fleet_gen
        unheard = fleet.gen == known or (known < 0 and fleet.state is CLOSED)
        if self.diverged and self.state is OPEN and unheard:
            # the fleet has not heard of our local open: it goes first, not the fleet's older
            # state (so a replica that learned while Redis was away is not overruled)
            self.fleet_gen = fleet.gen
            return None if pushing else self.wanted()
        self.adopt(fleet, received)
        if fleet.gen != self.gen or fleet.state is not CLOSED or self.state is not CLOSED:
            return None  # counts of another generation (a reply overtaken by news) decide nothing
        if self.config.quorum:
            return None  # a quorum breaker opens the fleet on its replicas' votes only
        if tripped(reply.calls, reply.failures, reply.slow, self.config):
            return Transition(OPEN, self.gen, 0, (reply.calls, reply.failures, reply.slow))
        return None

    def on_report(self, sent: Report, reply: ReportReply) -> Transition | None:
        """A probe's outcome was counted: the verdict, once the probes settle it."""
        if not reply.current or sent.gen != self.gen:
            return None  # the breaker left that half-open period: nothing to decide
        self._probe_done, self._probe_failures, self._probe_slow = (
            reply.done,
            reply.failed,
            reply.slow,
        )
        verdict = half_open_verdict(reply.done, reply.failed, reply.slow, self.config)
        if verdict is None:
            return None
        reopens = self.reopens + 1 if verdict is OPEN else 0
        return Transition(verdict, self.gen, reopens, (reply.done, reply.failed, reply.slow))

    def adopt(self, fleet: FleetState, received: float) -> None:
        """Take the fleet's state from a script reply or a published message."""
        if fleet.gen < self.fleet_gen:
            return  # older than what we know: a late message
        if self.forced is not None:
            if fleet.state is not self.forced:
                return  # the operator's word goes to the fleet first (see wanted())
            self.forced = None
        if self.diverged and self.wanted() is not None and fleet.gen == self.fleet_gen:
            return  # the fleet has not heard of our local open yet
        if self.diverged and self.fleet_gen < 0 and self.state is OPEN and fleet.state is CLOSED:
            # a local open before any word from the fleet: push it before adopting anything
            self.fleet_gen = fleet.gen
            self.engine.mark(self)
            return
        self.fleet_gen = fleet.gen
        self.seen, self.seen_at = fleet, received
        self._take(fleet, received, announce=True)
        if self._behind():  # the fleet must number past what this replica reported
            self.engine.mark(self)

    def _take(self, fleet: FleetState, received: float, *, announce: bool) -> None:
        """This replica's state becomes the fleet's (an event if it moved and ``announce``)."""
        offset = fleet.server_ms / 1000 - received  # server time minus local time
        new = fleet.state
        open_until = fleet.open_until_ms / 1000 - offset if new is OPEN else 0.0
        old = self.state
        if fleet.gen == self.gen and new is old:
            self.open_until = open_until
            self.diverged = False
            return
        if self.diverged and new is old and new is OPEN:
            # our local open, confirmed (or matched by another replica's): keep it quiet
            self.gen = fleet.gen
            self.open_until = open_until
            self.reopens = fleet.reopens
            self.diverged = False
            self.pending.gen = fleet.gen
            return
        self.diverged = False
        self.state = new
        self.gen = fleet.gen
        self.reopens = fleet.reopens
        self.open_until = open_until
        self.opened_by = None  # the fleet's counts: see status()
        if new is OPEN:
            self.open_for = open_duration(self.config, fleet.reopens)
        self.window.reset()
        self._probes.clear()
        self._probe_done = self._probe_failures = self._probe_slow = 0
        self.pending = Pending(fleet.gen)
        self._full_until = float("-inf")
        if new is not old and announce:
            self._announce(old, new)

    def rejecting(self) -> None:
        """A call was refused: counted, and reported with the next round."""
        self.rejected += 1
        if not self.marked:
            self.engine.mark(self)

    # --- admission ------------------------------------------------------------------------
    def acquire(self, now: float) -> tuple[int, int] | None:
        """Local when the cached state decides; ``None`` when a fleet-wide probe is needed."""
        if self.away or self.diverged or self.engine.degraded:
            return self._decide_here(now)
        state = self.state
        if state is CLOSED or state is DISABLED:
            return self.gen, 0
        if state is FORCED_OPEN:
            raise CircuitOpenError(self.name, "forced_open", None)
        if state is OPEN and now < self.open_until:
            raise CircuitOpenError(self.name, "open", self.open_until - now)
        if state is HALF_OPEN and now < self._full_until:
            raise CircuitOpenError(self.name, "half_open", self._full_until - now)
        return None

    async def acquire_remote(self, now: float) -> tuple[int, int]:
        """Take a probe lease from Redis (or decide locally if it cannot answer)."""
        lease = new_lease()
        # in a task of its own: a caller cancelled meanwhile must not strand a granted lease
        probing = asyncio.ensure_future(self.engine.probe(self, lease))
        try:
            reply = await asyncio.shield(probing)
        except LoopLate:  # Redis may have granted it: give it back, and do not probe alone
            self.engine.enqueue(self, Release(self.gen, lease))
            raise CircuitOpenError(self.name, "half_open", self.engine.sync_interval) from None
        except StoreUnavailableError:  # it may have been granted: give it back later
            self.engine.enqueue(self, Release(self.gen, lease))
            return self._decide_here(now)
        except asyncio.CancelledError:
            probing.add_done_callback(lambda done: self._give_back_late(done, lease))
            raise
        if reply.granted:
            self.fleet_leases.add(lease)
            return reply.fleet.gen, lease
        if self.state is HALF_OPEN and reply.fleet.gen == self.gen:
            await self._settle_stalled(reply)
        state = self.state
        if state is CLOSED or state is DISABLED:
            return self.gen, 0
        if state is OPEN:
            raise CircuitOpenError(self.name, "open", max(0.0, self.open_until - now))
        if state is FORCED_OPEN:
            raise CircuitOpenError(self.name, "forced_open", None)
        hint = min(reply.wait, self.config.open_for)
        self._full_until = now + min(hint, self.engine.sync_interval)
        raise CircuitOpenError(self.name, "half_open", hint)

    def _decide_here(self, now: float) -> tuple[int, int]:
        """Admission by the local state machine alone; a move it makes (OPEN to HALF_OPEN)
        is local knowledge, like a local trip."""
        before = self.gen
        try:
            admitted = BreakerCore.acquire(self, now)
        finally:
            if self.gen != before:
                self._moved_locally()
        assert admitted is not None  # a local core always decides
        return admitted

    async def _settle_stalled(self, reply: ProbeReply) -> None:
        """No lease free, but the probes' counts already settle the verdict: its reporter
        died, or its reply was lost. Push it (compare-and-set: harmless if it arrives twice).
        """
        verdict = half_open_verdict(reply.done, reply.failed, reply.slow, self.config)
        if verdict is None:
            return
        reopens = self.reopens + 1 if verdict is OPEN else 0
        counts = (reply.done, reply.failed, reply.slow)
        try:
            await self.engine.transition(self, Transition(verdict, self.gen, reopens, counts))
        except StoreUnavailableError:
            pass  # the next probe tries again

    def _give_back_late(self, probing: asyncio.Future[ProbeReply], lease: int) -> None:
        """A probe lease that may have been granted to a caller cancelled meanwhile."""
        if probing.cancelled():
            return
        error = probing.exception()
        if (error is None and probing.result().granted) or isinstance(error, StoreUnavailableError):
            self.engine.enqueue(self, Release(self.gen, lease))

    async def commit(self) -> None:
        """Strict mode: return once this replica's outcomes so far are in Redis."""
        await self.engine.commit()

    def release(self, gen: int, lease: int) -> None:
        """Give a probe lease back (cancelled probe): a fleet lease with the next round
        (kept until Redis answers), a local one at once."""
        if lease in self.fleet_leases:
            self.fleet_leases.discard(lease)
            self.engine.enqueue(self, Release(gen, lease))
        else:
            super().release(gen, lease)

    # --- outcomes -------------------------------------------------------------------------
    def record(
        self, gen: int, lease: int, failed: bool, slow: bool, now: float | None = None
    ) -> None:
        """Count an outcome: the local rule first, then the buffer (probes: reported at once)."""
        if lease in self.fleet_leases:  # a fleet probe: Redis judges it, whatever happened here
            self.fleet_leases.discard(lease)
            self.engine.enqueue(self, Report(gen, lease, failed, slow))
            return
        if gen != self.gen:
            return
        if self.state is CLOSED and not lease:
            self._buffer(failed, slow)
        before = self.gen
        super().record(gen, lease, failed, slow, now)
        if self.gen != before:
            self._moved_locally()
        elif self.strict:
            self.engine.wake()

    def success(self, gen: int) -> None:
        """The hot path of a shared breaker: buffer one success, no I/O (degraded or not).

        The breaker's wrapper adds to ``pending.calls`` itself in the common case (a count
        window full of successes, outcomes buffered since the last flush, the same generation,
        not strict): only that, as here."""
        w = self.window
        if gen != self.gen or self.state is not CLOSED or w.__class__ is not CountCounter:
            self.record(gen, 0, False, False)
            return
        p = self.pending
        if not p.calls:  # the first outcome since the last flush: join the next round
            p.gen = gen
            if not self.marked:
                self.engine.mark(self)
        p.calls += 1
        if w.failures or w.slow:  # a success may complete a window that trips
            BreakerCore.record(self, gen, 0, False, False)
            if self.gen != gen:
                self._moved_locally()
        elif w.calls < w.size:
            w.calls += 1
        if self.strict:
            self.engine.wake()

    def _buffer(self, failed: bool, slow: bool) -> None:
        p = self.pending
        if not p.calls:
            p.gen = self.gen
            if not self.marked:
                self.engine.mark(self)
        p.calls += 1
        p.failures += failed
        p.slow += slow

    def _moved_locally(self) -> None:
        """The local state machine moved (a trip, or a degraded replica's own recovery)."""
        self.diverged = True
        self.engine.mark(self)
        if self.state is OPEN:
            self.engine.push(self)  # the trip goes to the fleet now

    # --- manual control -------------------------------------------------------------------
    async def control(self, state: CircuitState, now: float) -> None:
        """Manual control, fleet-wide; applied locally too if Redis cannot be reached."""
        if state not in (CLOSED, FORCED_OPEN, DISABLED):
            raise ValueError(
                f"a breaker can be forced CLOSED, FORCED_OPEN or DISABLED, not {state}"
            )
        for _ in range(3):  # a late event loop is retried; an outage is not
            if self.away or self.engine.degraded:
                break
            try:
                await self.engine.transition(self, Transition(state, self.gen, force=True))
                self.forced = None
                return
            except LoopLate:
                continue
            except StoreUnavailableError:
                break
        # Redis cannot hear it now: applied here at once, and pushed to the fleet (unconditionally,
        # as an operator's word) as soon as Redis answers again
        self.force(state, now)
        self.forced = state
        self.diverged = True
        self.engine.mark(self)
