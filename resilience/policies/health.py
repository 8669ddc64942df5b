"""Knowing before calling: a background health check.

``HealthCheck`` runs an async check every ``interval`` in a background task, feeds each
success to its failure detector (``resilience.rules.detectors``: pure, no I/O) as a heartbeat,
and reports ``healthy`` / ``phi``. With a shared store one replica at a time runs the check
for the whole fleet (it holds a lease) and publishes each result; the others read it in their
own loop, never on a call's path.

A ``CircuitBreaker(..., health=check)`` lets the check's results stand in for its half-open
probes, and with ``open_on_suspect=True`` opens when the check's phi crosses the threshold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ..checks import check_int, check_name, check_positive, check_seconds, store_down
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ExcType, ResilienceTimeoutError, Traceback
from ..events import HealthChanged, Listener, check_listeners, emit
from ..forks import reset_in_child
from ..rules.detectors import Detector, PhiAccrualDetector
from ..store.records import HEALTH_PREFIX
from .base import check_store, require_async
from .timeout import Timeout

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["HealthCheck", "HealthResult", "living"]

logger = logging.getLogger("resilience")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthResult:
    """One run of a health check, here or (with a shared store) on another replica."""

    ok: bool
    #: this replica's clock: when the check finished here, or when this replica first read
    #: the result another replica published
    at: float
    duration: float  #: seconds the check took
    error: str | None = None  #: why it failed: the exception, or "returned False"
    ran_here: bool = True  #: False: another replica ran it and published the result


#: What a CircuitBreaker bound to a check hears after each round: the round's new result
#: (``None``: none), and whether the dependency became suspected in this round.
Watcher = Callable[[HealthResult | None, bool], Awaitable[None]]


_INTERRUPTS = (KeyboardInterrupt, SystemExit)


def _stops_the_loop(exc: BaseException, task: asyncio.Task[Any] | None) -> bool:
    """Whether ``exc``, raised inside the loop running in ``task``, ends it: the loop's own
    cancellation (``task.cancelling()``), or an interpreter exit (``KeyboardInterrupt``,
    ``SystemExit``, also inside an exception group). Any other ``BaseException``, a
    ``CancelledError`` the task was not asked for included, is a failure of one round."""
    if isinstance(exc, asyncio.CancelledError):
        return task is None or task.cancelling() > 0
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(_INTERRUPTS) is not None
    return isinstance(exc, _INTERRUPTS)


_MAX_SEQ = 2**53  # a published sequence number: JSON's exact integers
_MAX_DURATION = 86_400.0  # seconds: a published run that took longer than a day is garbage
_MAX_ERROR = 1_000  # characters of a failure's text that are published and read


class _Published(NamedTuple):
    """One result as the fleet's runner publishes it."""

    publisher: str  #: the publishing HealthCheck object's id
    seq: int  #: its sequence number: a reader counts each result once
    ok: bool
    duration: float
    error: str | None

    def encode(self) -> bytes:
        """The result as JSON, the form every replica reads."""
        return json.dumps(
            {
                "id": self.publisher,
                "seq": self.seq,
                "ok": self.ok,
                "duration": self.duration,
                "error": self.error,
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _Published:
        """A published result; ``ValueError`` for anything a runner never writes (not JSON,
        a field missing or of another type, a number out of range: NaN, inf, 1e300, < 0)."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object: {data!r:.80}")
        publisher, seq, ok = data.get("id"), data.get("seq"), data.get("ok")
        duration, error = data.get("duration"), data.get("error")
        if not isinstance(publisher, str) or not 0 < len(publisher) <= 128:
            raise ValueError(f"bad id {publisher!r:.80}")
        if type(seq) is not int or not 0 < seq <= _MAX_SEQ:
            raise ValueError(f"bad seq {seq!r:.80}")
        if not isinstance(ok, bool):
            raise ValueError(f"bad ok {ok!r:.80}")
        if (
            not isinstance(duration, int | float)
            or isinstance(duration, bool)
            or not 0.0 <= duration <= _MAX_DURATION  # NaN fails it too
        ):
            raise ValueError(f"bad duration {duration!r:.80}")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"bad error {error!r:.80}")
        return cls(publisher, seq, ok, float(duration), _cut(error))


def _cut(error: str | None) -> str | None:
    """A failure's text, at most ``_MAX_ERROR`` characters."""
    return error if error is None or len(error) <= _MAX_ERROR else error[: _MAX_ERROR - 3] + "..."


#: the health checks of this process, weakly held (an operator's view shows their phi)
_checks: weakref.WeakSet[HealthCheck] = weakref.WeakSet()


def living() -> list[HealthCheck]:
    """The health checks alive in this process."""
    return list(_checks)


def _default_detector(interval: float) -> PhiAccrualDetector:
    """Phi accrual scaled to the check's interval: a pause of two missed checks is never
    suspicious, so the dependency is suspected after about three failed checks in a row."""
    return PhiAccrualDetector(
        threshold=8.0,
        window=100,
        min_std=interval / 10,
        acceptable_pause=2 * interval,
        first_interval=interval,
        max_interval=3 * interval,
    )


class HealthCheck:
    """Runs ``check`` every ``interval`` seconds in the background and tells whether the
    dependency it checks is healthy.

    ``check`` is an ``async`` callable; a run that returns (anything but ``False``) within
    ``timeout`` seconds is a success, and each success is a heartbeat for ``detector``
    (phi accrual scaled to ``interval`` by default). ``healthy`` is ``phi < threshold``.
    Start it with ``async with check:`` (or ``start()``), stop it with ``aclose()``.
    A run that raises anything (a ``CancelledError`` of the check's own and any other
    ``BaseException`` included) is a failed run and the loop goes on; only its own
    cancellation ends it, and ``KeyboardInterrupt`` / ``SystemExit``, which are logged and
    propagate as asyncio delivers them.

    With a shared ``store`` one replica at a time runs the check fleet-wide: it holds a lease
    (renewed every round, taken over by another replica within about ``2 * interval`` when its
    holder dies) and publishes each result, only while it still holds the lease (a runner
    frozen past its lease publishes nothing); the other replicas read it every ``interval``,
    so they all see the dependency's health without one request per replica, and never on a
    call's path. While the store cannot be reached, each replica runs the check itself.
    In a process forked while the check runs, it is a new runner (no task, lease or timer of
    the parent's) that starts again at its first use there.

    Every parameter is validated at construction; the configuration is read-only.
    """

    kind = "health_check"

    __slots__ = (
        "__weakref__",
        "_check",
        "_clock",
        "_detector",
        "_healthy",
        "_history",
        "_id",
        "_interval",
        "_key",
        "_last_ok",
        "_lease",
        "_lease_ttl",
        "_listeners",
        "_name",
        "_results",
        "_resume",
        "_seen",
        "_seq",
        "_store",
        "_task",
        "_timeout",
        "_timer",
        "_watchers",
    )

    def __init__(
        self,
        check: Callable[[], Awaitable[object]],
        *,
        name: str,
        interval: float = 5.0,
        timeout: float | None = None,
        history: int = 10,
        store: Store | None = None,
        detector: Detector | None = None,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        if not callable(check):
            raise TypeError(f"check must be an async callable, got {check!r}")
        require_async(check, "HealthCheck")
        self._name = check_name(name)
        self._interval: float = check_seconds("interval", interval)
        if timeout is None:
            timeout = min(1.0, self._interval)
        self._timeout: float = check_seconds("timeout", timeout)
        if self._timeout > self._interval:
            raise ValueError(
                f"timeout ({timeout!r}) must be <= interval ({interval!r}): a check may not "
                f"run into the next one"
            )
        self._history = check_int("history", history, maximum=100_000)
        leases = ("acquire_lease", "renew_lease", "release_lease")
        self._store = check_store("store", store, *leases, "publish", "read_published")
        if detector is None:
            detector = _default_detector(self._interval)
        for method in ("watch", "heartbeat", "phi", "suspect"):
            if not callable(getattr(detector, method, None)):
                raise TypeError(
                    f"detector must be a PhiAccrualDetector, a TimeoutDetector or provide "
                    f"threshold, watch(), heartbeat(), phi() and suspect(), got {detector!r}"
                )
        # the phi at which it suspects, shown next to phi: a finite number > 0
        threshold = getattr(detector, "threshold", None)
        if threshold is None:
            raise TypeError(
                f"detector must have a threshold (the phi at which it suspects), got {detector!r}"
            )
        check_positive("detector.threshold", threshold)
        self._detector: Detector = detector
        if clock is None:
            clock = SYSTEM_CLOCK if store is None else store.clock
        if not isinstance(clock, Clock):
            raise TypeError(
                f"clock must provide monotonic(), sleep() and call_later(), got {clock!r}"
            )
        self._clock: Clock = clock
        self._listeners = check_listeners(listeners)
        self._timer = Timeout(self._timeout, name=f"{self._name}:check", clock=clock)
        self._check = check
        self._key = f"{HEALTH_PREFIX}{self._name}"  # the lease and the published result
        self._lease_ttl = 2 * self._interval
        self._id = uuid.uuid4().hex  # this object, as the publisher of its results
        self._seq = 0
        self._seen: tuple[str, int] | None = None  # the last published result read
        self._lease: str | None = None
        self._results: deque[HealthResult] = deque(maxlen=self._history)
        self._last_ok: float | None = None
        self._healthy = True
        self._task: asyncio.Task[None] | None = None
        self._resume = False  # forked while running: start again at the first use here
        self._watchers: list[Callable[[], Watcher | None]] = []
        reset_in_child(self)
        _checks.add(self)

    def __repr__(self) -> str:
        state = "running" if self._alive() else "stopped"
        return f"HealthCheck(name={self._name!r}, interval={self._interval:g}, {state})"

    # --- configuration (read-only) --------------------------------------------------------
    @property
    def name(self) -> str:
        """The check's name (with a shared store: the fleet's check of that name)."""
        return self._name

    @property
    def check(self) -> Callable[[], Awaitable[object]]:
        """The async callable that is run."""
        return self._check

    @property
    def interval(self) -> float:
        """Seconds between two runs of the check."""
        return self._interval

    @property
    def timeout(self) -> float:
        """Seconds a run may take before it counts as a failure."""
        return self._timeout

    @property
    def history(self) -> int:
        """How many results ``results`` keeps."""
        return self._history

    @property
    def store(self) -> Store | None:
        """The shared store, or ``None`` (the check runs in this process only)."""
        return self._store

    @property
    def detector(self) -> Detector:
        """The failure detector fed with the check's successes."""
        return self._detector

    @property
    def clock(self) -> Clock:
        """The clock of the loop and the detector."""
        return self._clock

    # --- what the check knows --------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Whether the dependency is trusted now: phi below the detector's threshold."""
        if self._resume:
            self._resume_here()
        return not self._detector.suspect(self._clock.monotonic())

    @property
    def phi(self) -> float:
        """The detector's suspicion level now (0.0 until the check starts)."""
        if self._resume:
            self._resume_here()
        return self._detector.phi(self._clock.monotonic())

    @property
    def last_ok(self) -> float | None:
        """When the last success was seen (this replica's clock), or ``None``."""
        return self._last_ok

    @property
    def results(self) -> tuple[HealthResult, ...]:
        """The last ``history`` results, oldest first."""
        return tuple(self._results)

    @property
    def running(self) -> bool:
        """Whether the background loop runs."""
        if self._resume:
            self._resume_here()
        return self._alive()

    @property
    def leading(self) -> bool:
        """Whether this replica holds the fleet's lease and runs the check for everyone."""
        return self._lease is not None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background loop on the running event loop (no-op if it runs)."""
        if self._alive():
            return
        loop = asyncio.get_running_loop()
        self._resume = False
        now = self._clock.monotonic()
        self._detector.watch(now)
        self._task = loop.create_task(self._run(now), name=f"resilience.health.{self._name}")

    async def aclose(self) -> None:
        """Stop the loop (waiting until it has ended) and give the fleet's lease back."""
        self._resume = False
        task, self._task = self._task, None
        try:
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])
        finally:  # cancelled while the check stops, too: the lease goes back all the same
            self._timer._reset(None)  # disarm its deadline timer: nothing left on the clock
            lease, self._lease = self._lease, None
            if lease is not None and self._store is not None:
                await asyncio.shield(asyncio.ensure_future(self._give_back(lease)))

    async def _give_back(self, lease: str) -> None:
        """Return the fleet's lease (in a task of its own: a cancelled ``aclose`` waits no
        longer, but the lease still goes back)."""
        assert self._store is not None
        try:
            await self._store.release_lease(self._key, lease)
        except Exception as exc:  # it expires by itself
            logger.debug("health check %r could not return its lease: %r", self._name, exc)

    async def __aenter__(self) -> HealthCheck:
        self.start()
        return self

    async def __aexit__(self, kind: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        await self.aclose()

    def _alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _forked(self) -> None:
        """In a forked child: a new runner. The parent's task, lease, deadline and published
        results are the parent's; a check that was running starts again at its first use
        here (``start``, ``running``, ``healthy``, ``phi``), in this process's event loop."""
        task, self._task = self._task, None
        self._resume = task is not None and not task.done()
        self._lease = None
        self._id = uuid.uuid4().hex
        self._seq = 0
        self._seen = None
        self._timer._reset(None)  # the parent's deadline timer is not ours

    def _resume_here(self) -> None:
        """Forked while running: start again, if an event loop runs here."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not from a coroutine: the next use from one starts it
        self.start()

    def _watch(self, watcher: Watcher) -> None:
        """Call ``watcher`` after every round (a bound method is held weakly)."""
        if hasattr(watcher, "__self__"):
            self._watchers.append(weakref.WeakMethod(watcher))
        else:
            self._watchers.append(lambda: watcher)

    # --- the loop --------------------------------------------------------------------------
    async def _run(self, due: float) -> None:
        """Run a round at ``due``, then every ``interval``, until the loop is cancelled.

        A round that fails in any way (the check, the store, a watcher) is logged and the
        next one runs; only the loop's own cancellation, or an interpreter exit, ends it."""
        task = asyncio.current_task()
        clock = self._clock
        try:
            while True:
                try:
                    await self._round()
                except BaseException as exc:
                    if _stops_the_loop(exc, task):
                        raise
                    logger.exception("health check %r: a round failed", self._name)
                if task is not None and task.cancelling():
                    return  # cancelled, and something below swallowed it: stop all the same
                due += self._interval
                now = clock.monotonic()
                if due < now:  # late (a slow round, a busy loop): no burst of catch-up runs
                    due = now
                await clock.sleep(due - now)
        except BaseException as exc:  # logged and re-raised: the loop never ends silently
            if not isinstance(exc, asyncio.CancelledError):
                logger.error("health check %r stopped: %r", self._name, exc)
            raise

    async def _round(self) -> None:
        """One round: run the check (or read the fleet's result), then judge and tell."""
        store = self._store
        if store is None:
            result: HealthResult | None = await self._run_check()
        else:
            result = await self._shared_round(store)
        if result is not None:
            self._record(result)
        await self._judge(result)

    async def _run_check(self) -> HealthResult:
        """Run the check once, bounded by ``timeout``. Whatever it raises is a failed run
        (a ``CancelledError`` that is not this task's own, any other ``BaseException``),
        except the loop's own cancellation and an interpreter exit, which propagate."""
        clock = self._clock
        task = asyncio.current_task()
        start = clock.monotonic()
        error: str | None = None
        try:
            async with self._timer:
                returned = await self._check()
            if returned is False:
                error = "returned False"
        except ResilienceTimeoutError:
            error = f"timed out after {self._timeout:g}s"
        except BaseException as exc:  # the loop's end propagates; all else is a failed run
            if _stops_the_loop(exc, task):
                raise
            error = repr(exc)
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # ours, swallowed by the check: no measurement
        end = clock.monotonic()
        return HealthResult(ok=error is None, at=end, duration=end - start, error=_cut(error))

    async def _shared_round(self, store: Store) -> HealthResult | None:
        """Lead (run and publish) or follow (read what the leader published); run locally
        while the store cannot answer."""
        if store_down(store):
            return await self._run_check()
        try:
            lease = await self._lead(store)
        except Exception as exc:  # StoreUnavailableError, or a store that misbehaves
            logger.debug("health check %r runs locally: %r", self._name, exc)
            return await self._run_check()
        if lease is not None:
            return await self._publish(store, lease, await self._run_check())
        try:
            published = await store.read_published(self._key, "result", _Published.decode)
        except Exception as exc:
            logger.debug("health check %r runs locally: %r", self._name, exc)
            return await self._run_check()
        return self._news(published)

    async def _lead(self, store: Store) -> str | None:
        """Keep (or take) the fleet's lease: the lease, if this replica runs the check."""
        if self._lease is not None:
            if await store.renew_lease(self._key, self._lease, ttl=self._lease_ttl):
                return self._lease
            self._lease = None  # it expired: someone else may hold it now
        self._lease = await store.acquire_lease(self._key, limit=1, ttl=self._lease_ttl)
        return self._lease

    async def _publish(self, store: Store, lease: str, result: HealthResult) -> HealthResult | None:
        """Publish this run's result as the holder of ``lease``. A runner that lost the lease
        during the run (frozen past its expiry, say) publishes nothing and keeps nothing:
        its run measured its own stall, and another replica runs the check now."""
        self._seq += 1
        published = _Published(self._id, self._seq, result.ok, result.duration, result.error)
        try:
            held = await store.publish(
                self._key, "result", published.encode(), lease=lease, ttl=3 * self._interval
            )
        except Exception as exc:  # the followers see no news: their phi rises
            logger.debug("health check %r could not publish: %r", self._name, exc)
            return result
        if held:
            self._seen = (self._id, self._seq)  # as a follower later, not news again
            return result
        self._lease = None
        logger.warning(
            "health check %r lost the fleet's lease during its run (a stall?): "
            "its result is dropped",
            self._name,
        )
        return None

    def _news(self, published: _Published | None) -> HealthResult | None:
        """The leader's result, if it is one this replica has not seen yet."""
        if published is None:
            return None
        seen = (published.publisher, published.seq)
        if seen == self._seen:
            return None
        self._seen = seen
        return HealthResult(
            ok=published.ok,
            at=self._clock.monotonic(),
            duration=published.duration,
            error=published.error,
            ran_here=False,
        )

    def _record(self, result: HealthResult) -> None:
        self._results.append(result)
        if result.ok:
            self._detector.heartbeat(result.at)
            self._last_ok = result.at

    async def _judge(self, result: HealthResult | None) -> None:
        """Compare health with the last round's; emit the change; tell the watchers."""
        now = self._clock.monotonic()
        level = self._detector.phi(now)
        healthy = not self._detector.suspect(now)
        suspected = self._healthy and not healthy
        if healthy is not self._healthy:
            self._healthy = healthy
            if self._listeners:
                emit(
                    self._listeners,
                    HealthChanged(
                        name=self._name, healthy=healthy, phi=level, last_ok=self._last_ok
                    ),
                )
        for ref in list(self._watchers):
            watcher = ref()
            if watcher is None:
                self._watchers.remove(ref)
                continue
            try:
                await watcher(result, suspected)
            except Exception:
                logger.exception("health check %r: a watcher failed", self._name)
