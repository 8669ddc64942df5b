"""The breaker core a ``RedisStore`` hands out: the fleet's state, mirrored in this replica.

Healthy, its state is a cache of Redis and its outcomes go to a buffer the store flushes;
degraded, the inherited local state machine decides. See ``resilience.store.redis``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Any

from ..circuit import (
    CLOSED,
    DISABLED,
    FORCED_OPEN,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    BreakerCore,
    CircuitState,
    open_duration,
    tripped,
)
from ..clock import Clock
from ..errors import CircuitOpenError, StoreUnavailableError
from ..windows import CountCounter, CountWindow, TimeWindow
from .redis_status import BY_VALUE

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = ["Batch", "SharedBreakerCore"]

#: one flush of one breaker: generation, calls, failures, slow calls, sequence number
Batch = tuple[int, int, int, int, int]


class SharedBreakerCore(BreakerCore):
    """A breaker core that mirrors the fleet's state from Redis (see the module docstring).

    Healthy: the local state is a cache of Redis; outcomes go to a buffer and a local window.
    Degraded: the inherited local state machine decides, fed by the same window.
    """

    __slots__ = (
        "_full_until",
        "active",
        "diverged",
        "keys",
        "pending",
        "pending_gen",
        "refresh_at",
        "store",
        "strict",
        "unacked",
        "window_args",
    )

    def __init__(self, name: str, config: BreakerConfig, clock: Clock, store: RedisStore) -> None:
        super().__init__(name, config, clock)
        self.store = store
        self.strict = store.strict
        self.keys = [store.key(name, s) for s in ("state", "win", "probes", "replicas")]
        window = config.window
        if isinstance(window, CountWindow):
            self.window_args: list[Any] = ["c", window.size, 0]
        else:
            assert isinstance(window, TimeWindow)
            self.window_args = [
                "t",
                window.buckets,
                max(1, int(window.seconds * 1000 / window.buckets)),
            ]
        self.pending = [0, 0, 0]
        self.pending_gen = 0
        self.unacked: list[Batch] = []
        self.active = False
        self.diverged = False
        self.refresh_at = float("-inf")
        self._full_until = float("-inf")

    # what the flusher needs
    def due(self, now: float) -> bool:
        """Whether this breaker has outcomes to flush or is due a state refresh."""
        if self.active or self.unacked or now >= self.refresh_at:
            self.refresh_at = now + max(1.0, 10 * self.store.sync_interval)
            return True
        return False

    def take_batches(self, seq: int) -> list[Batch]:
        """The flushes to send: every unacknowledged one, then the buffer as a new one.

        A flush whose reply was lost is sent again with its sequence number, which the script
        recognises: outcomes are counted once, whether or not the first try reached Redis.
        """
        calls, failures, slow = self.pending
        self.pending = [0, 0, 0]
        self.active = False
        batch = ((self.pending_gen if calls else self.gen), calls, failures, slow, seq)
        if calls:
            self.unacked.append(batch)
            del self.unacked[:-64]  # bounded: the oldest are given up
            return list(self.unacked)
        return [*self.unacked, batch]

    def acked(self, batch: Batch) -> None:
        """Redis answered this flush: it is counted."""
        if batch in self.unacked:
            self.unacked.remove(batch)

    def recovering(self) -> None:
        """Redis is back: outcomes counted under local transitions are dropped."""
        if self.diverged:
            self.pending = [0, 0, 0]
        self.active = True

    def adopt(
        self,
        state: str,
        gen: int,
        open_until_ms: int,
        reopens: int,
        server_ms: int,
        received: float,
    ) -> None:
        """Take the fleet's state from a script reply or a published message."""
        new = BY_VALUE.get(state)
        if new is None:
            return
        if gen < self.gen and not self.diverged:
            return  # an older message arriving late
        self.diverged = False
        offset = server_ms / 1000 - received  # server time minus local time
        open_until = open_until_ms / 1000 - offset if new is OPEN else 0.0
        old = self.state
        if gen == self.gen and new is old:
            self.open_until = open_until
            return
        self.state = new
        self.gen = gen
        self.reopens = reopens
        self.open_until = open_until
        self.opened_by = None  # the fleet's counts: see status()
        if new is OPEN:
            self.open_for = open_duration(self.config, reopens)
        self.window.reset()
        self._probes.clear()
        self._probe_done = self._probe_failures = self._probe_slow = 0
        self.pending = [0, 0, 0]
        self.pending_gen = gen
        self._full_until = float("-inf")
        if new is not old:
            self._announce(old, new)

    # admission
    def acquire(self, now: float) -> tuple[int, int] | None:
        """Local when the cached state decides; ``None`` when a probe lease is needed."""
        if self.store.degraded:
            return super().acquire(now)
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
        lease = next(_probe_ids)
        # in a task of its own: a caller cancelled meanwhile must not strand a granted lease
        probing = asyncio.ensure_future(self.store._probe(self, lease))
        try:
            granted, wait = await asyncio.shield(probing)
        except StoreUnavailableError:  # it may have been granted: give it back later
            self.store._enqueue("release", self, self.gen, lease, False, False)
            return await super().acquire_remote(now)
        except asyncio.CancelledError:
            probing.add_done_callback(lambda done: self._give_back_late(done, lease))
            raise
        if granted:
            return self.gen, lease
        state = self.state
        if state is CLOSED or state is DISABLED:
            return self.gen, 0
        if state is OPEN:
            raise CircuitOpenError(self.name, "open", max(0.0, self.open_until - now))
        if state is FORCED_OPEN:
            raise CircuitOpenError(self.name, "forced_open", None)
        hint = min(max(wait, 0.0), self.config.open_for)
        self._full_until = now + min(hint, self.store.sync_interval)
        raise CircuitOpenError(self.name, "half_open", hint)

    def _give_back_late(self, probing: asyncio.Future[tuple[bool, float]], lease: int) -> None:
        """A probe lease granted to a caller that was cancelled meanwhile: send it back."""
        if not probing.cancelled() and probing.exception() is None and probing.result()[0]:
            self.store._enqueue("release", self, self.gen, lease, False, False)

    async def commit(self) -> None:
        """Strict mode: return once this replica's outcomes so far are in Redis."""
        await self.store.commit()

    def release(self, gen: int, lease: int) -> None:
        """Give a probe lease back (cancelled probe): sent with the next flush."""
        if self.store.degraded or not lease:
            super().release(gen, lease)
        elif gen == self.gen:
            self.store._enqueue("release", self, gen, lease, False, False)

    def record(
        self, gen: int, lease: int, failed: bool, slow: bool, now: float | None = None
    ) -> None:
        """Buffer an outcome (probes are reported at once); degraded: decide locally too."""
        if gen != self.gen:
            return
        store = self.store
        if store.degraded:
            if self.state is CLOSED and not lease:
                self._buffer(failed, slow)
            before = self.gen
            super().record(gen, lease, failed, slow, now)
            if self.gen != before:
                self.diverged = True
            return
        if lease:
            store._enqueue("report", self, gen, lease, failed, slow)
            return
        if self.state is not CLOSED:
            return
        self._buffer(failed, slow)
        w = self.window
        w.add(failed, slow, 0.0 if now is None else now)
        if (failed or slow) and w.calls >= self.config.minimum_calls:
            if now is not None:
                w.roll(now)
            if tripped(w.calls, w.failures, w.slow, self.config):
                store.wake()  # the local outcomes alone trip: flush now, let the fleet decide
        if self.strict:
            store.wake()

    def success(self, gen: int) -> None:
        """The hot path of a shared breaker: buffer one success, no I/O (degraded or not)."""
        if gen != self.gen or self.state is not CLOSED:
            self.record(gen, 0, False, False)
            return
        p = self.pending
        if not p[0]:  # the first outcome since the last flush: make sure a flusher runs
            self.pending_gen = gen
            self.store._start()
        p[0] += 1
        self.active = True
        w = self.window
        if w.failures or w.slow or w.__class__ is not CountCounter:
            if self.store.degraded:  # the local state machine decides: a success may trip
                BreakerCore.record(self, gen, 0, False, False)
                if self.gen != gen:
                    self.diverged = True
            else:
                w.add(False, False, 0.0)
        elif w.calls < w.size:
            w.calls += 1
        if self.strict:
            self.store.wake()

    def _buffer(self, failed: bool, slow: bool) -> None:
        p = self.pending
        if not p[0]:
            self.pending_gen = self.gen
            self.store._start()
        p[0] += 1
        p[1] += failed
        p[2] += slow
        self.active = True

    async def control(self, state: CircuitState, now: float) -> None:
        """Manual control, fleet-wide; applied locally too if Redis cannot be reached."""
        if state not in (CLOSED, FORCED_OPEN, DISABLED):
            raise ValueError(
                f"a breaker can be forced CLOSED, FORCED_OPEN or DISABLED, not {state}"
            )
        if not self.store.degraded:
            try:
                await self.store._transition(self, state, force=True)
                return
            except StoreUnavailableError:
                pass
        self.force(state, now)
        self.diverged = True


_probe_ids = itertools.count(1)
