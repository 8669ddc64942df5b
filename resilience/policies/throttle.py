"""Throttle: client-side adaptive throttling (Google SRE book, "Handling Overload").

Each client keeps two counts over a sliding window: the calls it attempted (``requests``) and
the calls the backend accepted (``accepts``). While the backend accepts nearly everything,
nothing changes; once it refuses more than a ``1/k`` share, the client refuses calls itself,
before sending them, with probability::

    max(0, (requests - k * accepts) / (requests + 1))

so the load reaching a refusing backend falls to about ``k`` times what it can accept.

``SharedCounts``, the two-figure window behind it, is also what ``Hedge`` counts its budget
with: local running totals, and with a store the fleet's totals, exchanged in the background.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random as _random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..checks import check_fleet_name, check_positive, store_down
from ..clock import Clock, TimerHandle
from ..errors import RejectedError, ThrottledError
from ..events import CallRejected, Listener, emit
from ..rules.throttle import rejection_probability
from ..rules.windows import TimeCounter
from ..store.config import Schema, follow, register_schema
from .base import BasePolicy, Protected, check_int, check_predicate, check_seconds, check_store

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = [
    "SharedCounts",
    "Throttle",
    "check_window",
    "default_accepted",
]

logger = logging.getLogger("resilience")

#: A sync armed this long ago (beyond its interval) and not finished is taken as lost (its
#: event loop ended, or the process was forked) and a new one is armed. A sync waits at most
#: for the store's own timeout; two at once would be harmless (each pushes its own deltas).
_LOST_SYNC = 5.0


def default_accepted(exc: Exception) -> bool:
    """Whether a call that raised ``exc`` was accepted by the backend (the default rule).

    Not accepted: a ``RejectedError`` (a refusal: load was shed by a policy or reported as
    such by an adapter), a ``TimeoutError`` (no answer in time, ``ResilienceTimeoutError``
    included) and a ``ConnectionError`` (no connection). Any other exception is the backend
    answering, with an error of the call's own: accepted.
    """
    return not isinstance(exc, (RejectedError, TimeoutError, ConnectionError))


def check_window(
    window: object, buckets: object, sync_interval: object
) -> tuple[float, int, float]:
    """Validate a sliding window's ``window`` (seconds), ``buckets`` and ``sync_interval``."""
    seconds: float = check_seconds("window", window)
    slices = check_int("buckets", buckets, maximum=3600)
    if seconds / slices < 0.001:  # the store's buckets are whole milliseconds
        raise ValueError(
            f"window / buckets must be at least 1 ms, got window={window!r}, buckets={buckets!r}"
        )
    interval: float = check_seconds("sync_interval", sync_interval)
    if interval > seconds:
        raise ValueError(
            f"sync_interval must not exceed window ({seconds:g}s), got {sync_interval!r}"
        )
    return seconds, slices, interval


class SharedCounts:
    """Two counts over a sliding window, this process's or, with a store, the fleet's:
    ``calls`` and ``marked`` calls (a throttle's requests and those accepted, a hedge's calls
    and hedges).

    ``add`` and ``totals`` do no I/O. Without a store they use a local window of ``window``
    seconds in ``buckets`` slices (a ``TimeCounter``, the breaker's time window, keeping
    ``marked`` as its failures). With one, what is added is also kept as pending deltas that
    a background sync (armed by the first ``add`` after a sync, run ``sync_interval`` later:
    nothing runs while nothing is added) pushes with one ``store.window_add``, whose reply
    is the fleet's totals. ``totals`` is then the last fleet totals plus the deltas pending
    since. When the store cannot answer (or the last totals are older than a few intervals),
    ``totals`` is the local window; deltas pushed while the store was away are dropped (the
    local window has them), so an outage costs the fleet at most those counts. ``of`` keeps
    a policy's window under ``"<kind>:<name>"``, so status tools tell a throttle's from a
    hedge's (``window_kind``) and the two never share one.
    """

    def __init__(
        self,
        name: str,
        *,
        window: float,
        buckets: int,
        store: Store | None,
        clock: Clock,
        sync_interval: float,
    ) -> None:
        self.name = name
        self.window = window
        self.buckets = buckets
        self.store = store
        self.sync_interval = sync_interval
        self._clock = clock
        self._local = TimeCounter(window, buckets)
        self._pending_calls = self._pending_marked = 0
        self._fleet: tuple[int, int] = (0, 0)
        self._fleet_at = -math.inf  # when the fleet's totals were read (never yet)
        # trusted for a few syncs, and at least one slice (a bucket of the shared window)
        self._fresh_for = max(3 * sync_interval, window / buckets)
        self._armed_at: float | None = None  # a sync is armed or running since then
        self._timer: TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of(
        cls,
        policy: BasePolicy,
        what: str,
        *,
        window: object,
        buckets: object,
        store: object,
        sync_interval: object,
    ) -> SharedCounts:
        """The counts of ``policy`` (``what`` names it in errors: a Throttle, a Hedge), under
        its name and on its clock: ``window``, ``buckets`` and ``sync_interval`` checked,
        ``store`` a store with ``window_add`` (or ``None``), and on a shared store a name of
        the policy's own."""
        seconds, slices, interval = check_window(window, buckets, sync_interval)
        checked = check_store("store", store, "window_add")
        check_fleet_name(what, policy.name, policy.kind, checked)
        return cls(
            f"{policy.kind}:{policy.name}",  # a throttle and a hedge of one name: two windows
            window=seconds,
            buckets=slices,
            store=checked,
            clock=policy.clock,
            sync_interval=interval,
        )

    def add(self, calls: int, marked: int) -> None:
        """Count ``calls`` and ``marked`` now (no I/O; arms a background sync with a store)."""
        now = self._clock.monotonic()
        self._local.add_counts(now, calls, marked)
        if self.store is None:
            return
        self._pending_calls += calls
        self._pending_marked += marked
        armed = self._armed_at
        if armed is None or now - armed > self.sync_interval + _LOST_SYNC:
            self._arm(now)

    def totals(self) -> tuple[int, int]:
        """``(calls, marked)`` over the window: the fleet's when known, else this process's."""
        now = self._clock.monotonic()
        if now - self._fleet_at <= self._fresh_for:
            calls, marked = self._fleet
            return calls + self._pending_calls, marked + self._pending_marked
        local = self._local
        local.roll(now)
        return local.calls, local.failures

    @property
    def shared(self) -> bool:
        """Whether ``totals`` is the fleet's now (recent totals from the store)."""
        return self._clock.monotonic() - self._fleet_at <= self._fresh_for

    def _arm(self, now: float) -> None:
        self._armed_at = now
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # counted outside an event loop: the next add arms it
            self._armed_at = None
            return
        self._timer = self._clock.call_later(self.sync_interval, self._due)

    def _due(self) -> None:
        self._timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a fake clock advanced outside the loop: the next add re-arms
            self._armed_at = None
            return
        self._task = loop.create_task(self._background())

    async def _background(self) -> None:
        try:
            await self.sync()
        finally:
            self._armed_at = None
            self._task = None
            if self._pending_calls or self._pending_marked:  # counted while the sync ran
                self._arm(self._clock.monotonic())

    async def sync(self) -> None:
        """Push the pending deltas and read the fleet's totals now (no-op without a store).

        Never raises because of the store: when it cannot answer, ``totals`` goes local.
        """
        store = self.store
        if store is None:
            return
        deltas = (self._pending_calls, self._pending_marked)
        self._pending_calls = self._pending_marked = 0
        if store_down(store):
            self._fleet_at = -math.inf
            return
        try:
            reply = await store.window_add(
                self.name, deltas, window=self.window, buckets=self.buckets
            )
            calls, marked = (int(v) for v in reply)
            if calls < 0 or marked < 0:
                raise ValueError(f"negative totals {reply!r}")
        except Exception as exc:  # StoreUnavailableError, or a reply that does not parse
            logger.debug("%r could not share its counts: %r", self.name, exc)
            self._fleet_at = -math.inf
            return
        self._fleet = (calls, marked)
        self._fleet_at = self._clock.monotonic()


class Throttle(BasePolicy):
    """Refuses calls locally while the backend has been refusing them (adaptive throttling).

    Over a sliding window of ``window`` seconds (``buckets`` slices) it counts ``requests``,
    every call attempted through it, those it refused itself included, and ``accepts``, the
    calls the backend accepted. A call is refused here with probability
    ``max(0, (requests - k * accepts) / (requests + 1))``, raising ``ThrottledError``
    (``retry_after``: one slice; ``ratio``: that probability).

    A call is counted when it ends: accepted if it returned (and ``accepted_if_result``, when
    given, accepts the result), or raised an exception that ``accepted_if`` accepts (by
    default, anything but a ``RejectedError``, ``TimeoutError`` or ``ConnectionError``: see
    ``default_accepted``). A cancelled call counts as nothing. ``random`` (a function
    returning floats in [0, 1)) draws the refusals; pass a seeded one for reproducible tests.

    With ``store=`` the counts are the fleet's: every throttle of this ``name`` on the store
    adds to one shared window, in the background every ``sync_interval`` seconds, so a call
    makes no round trip (see ``SharedCounts``). When the store cannot answer, this replica's
    own counts decide.
    """

    kind = "throttle"

    def __init__(
        self,
        *,
        k: float = 2.0,
        window: float = 120.0,
        buckets: int = 12,
        accepted_if: Callable[[Exception], bool] = default_accepted,
        accepted_if_result: Callable[[Any], bool] | None = None,
        random: Callable[[], float] | None = None,
        store: Store | None = None,
        sync_interval: float = 1.0,
        name: str = "throttle",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self.k = _check_k(k)
        if not callable(accepted_if):
            raise TypeError(f"accepted_if must be a callable, got {accepted_if!r}")
        self.accepted_if = accepted_if
        self.accepted_if_result = check_predicate("accepted_if_result", accepted_if_result)
        if random is None:
            random = _random.random
        elif not callable(random):
            raise TypeError(f"random must be a callable returning [0, 1), got {random!r}")
        self._random = random
        #: (requests, accepts) over the window
        self.counts = counts = SharedCounts.of(
            self,
            "Throttle",
            window=window,
            buckets=buckets,
            store=store,
            sync_interval=sync_interval,
        )
        self.window, self.buckets = counts.window, counts.buckets
        self.sync_interval, self.store = counts.sync_interval, counts.store
        self.retry_after = self.window / self.buckets
        self._code = {"k": self.k}
        follow(self)

    def _live_base(self) -> dict[str, Any]:
        """Its live settings in code."""
        return dict(self._code)

    def _live_apply(self, values: dict[str, Any]) -> str:
        """Decisions from now on use ``k``."""
        self.k = _check_k(values["k"])
        return ""

    def __repr__(self) -> str:
        return f"Throttle(k={self.k:g}, window={self.window:g}, name={self.name!r})"

    @property
    def ratio(self) -> float:
        """The probability that a call would be refused now."""
        requests, accepts = self.counts.totals()
        return rejection_probability(requests, accepts, self.k)

    async def sync(self) -> None:
        """Exchange counts with the store now (tests, shutdown); no-op without a store."""
        await self.counts.sync()

    def _refuse(self, ratio: float) -> ThrottledError:
        self.counts.add(1, 0)  # a request refused here is still a request
        error = ThrottledError(self.name, self.retry_after, ratio)
        if self._listeners:
            emit(self._listeners, CallRejected(name=self.name, policy=self.kind, error=error))
        return error

    def _wrap(self, fn: Protected) -> Protected:
        counts = self.counts
        totals, add = counts.totals, counts.add
        draw = self._random
        refuse = self._refuse
        accepted_if = self.accepted_if
        accepted_if_result = self.accepted_if_result

        async def protected(*args: Any, **kwargs: Any) -> Any:
            requests, accepts = totals()
            excess = requests - self.k * accepts  # rejection_probability, inlined (k: live)
            if excess > 0:
                ratio = excess / (requests + 1)
                if draw() < ratio:
                    raise refuse(ratio)
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                add(1, 1 if accepted_if(exc) else 0)
                raise
            # a cancelled call (a BaseException) is counted as nothing
            if accepted_if_result is None or accepted_if_result(result):
                add(1, 1)
            else:
                add(1, 0)
            return result

        return protected

    #: the rule ``accepted_if`` takes by default: adapters that add refusals of their own (an
    #: HTTP 429) fall back on it for the rest (after __init__, whose default it is)
    default_accepted = staticmethod(default_accepted)


def _check_k(k: object) -> float:
    """A throttle's ``k``: a finite number >= 1."""
    checked = check_positive("k", k)  # a finite number, an int beyond any float included
    if checked < 1:  # k < 1 refuses calls of a backend that accepts every one of them
        raise ValueError(f"k must be finite and >= 1, got {k!r}")
    return checked


register_schema(Schema("throttle", ("k",), lambda values, base: _check_k(values["k"])))
