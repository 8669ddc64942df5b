"""Hedge: when a call is slow to answer, start another attempt and take the first success.

Hedging trades a little extra load for a shorter tail latency: most calls answer before the
hedge ``delay`` and cost nothing extra; the few that do not get a second chance, in
parallel, instead of waiting for the slow attempt. A budget caps the extra load.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, cast

from ..clock import Clock, TimerHandle
from ..events import Listener
from ..rules.quantile import LearnedDelay
from ..store.config import Schema, follow, register_schema
from .base import BasePolicy, CallerTask, Protected, check_int, check_seconds
from .throttle import SharedCounts

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["Hedge"]

_QUANTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


def _delay(value: object) -> float | LearnedDelay:
    if isinstance(value, LearnedDelay):
        return value
    if isinstance(value, str):
        match = _QUANTILE.fullmatch(value)
        if match is None or not 0 < float(match.group(1)) < 100:
            raise ValueError(
                f"delay must be seconds, a LearnedDelay or a percentile such as 'p95', "
                f"got {value!r}"
            )
        return LearnedDelay(float(match.group(1)) / 100)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"delay must be seconds, a LearnedDelay or a percentile such as 'p95', got {value!r}"
        )
    seconds: float = check_seconds("delay", value, zero=True)
    return seconds


def _budget(budget: object, max_hedges: int) -> float:
    """A hedge's ``budget``: hedges per call, in (0, ``max_hedges``]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number, got {budget!r}")
    if not 0 < budget <= max_hedges:  # also rejects NaN
        raise ValueError(f"budget must be in (0, max_hedges] (hedges per call), got {budget!r}")
    return float(budget)


def _delay_value(delay: float | LearnedDelay) -> float | str:
    """A delay as a live setting: seconds, or the percentile a learned delay tracks, written
    in full (``"p99.99999"``, never rounded or with an exponent: ``_delay`` reads it back)."""
    if isinstance(delay, float):
        return delay
    percent = delay.quantile * 100
    text = repr(percent)
    if "e" in text:  # 1e-05: written out, which the percentile's pattern reads
        text = f"{percent:.20f}".rstrip("0")
    return "p" + text.removesuffix(".0")


class Hedge(BasePolicy):
    """Starts another attempt when the first has not answered after ``delay``.

    A call starts one attempt; if no attempt has succeeded ``delay`` seconds later, another
    one is started, and so on every ``delay`` seconds up to ``max_hedges`` extra attempts.
    The first attempt runs in the caller's task (a call answered before the delay starts
    no task); each hedge runs in a task of its own. The first attempt to succeed gives the
    call its result: a hedge that wins while the first attempt runs interrupts it as
    ``asyncio.timeout`` does (a cancellation of the caller's task, undone once the first
    attempt has ended); losing hedges are cancelled and end on their own, within a few loop
    turns (their ``finally`` blocks run, releasing what they hold; ``ending`` counts them,
    ``drain()`` waits for them), and the answer is not held back for their clean-up. A
    cancelled call cancels every attempt and waits until they have ended before the
    cancellation propagates.
    An attempt that fails does not start another (retrying is ``Retry``'s job): the call
    waits for the attempts still running, and when every attempt started has failed it
    raises the error of the first one to fail.

    ``delay`` is seconds, or learned: ``"p95"`` (any percentile ``"pNN"``) or a
    ``LearnedDelay`` is that quantile of the first attempts' latencies, so about 5 % of calls
    are hedged. The latency of a first attempt overtaken by a hedge is counted as the time it
    had run (a lower bound), so a learned delay does not creep down as hedges win.

    ``budget`` caps the extra load: over a sliding window of ``window`` seconds (``buckets``
    slices), a hedge may start only while ``hedges + 1 <= budget * calls``; one refused
    ends hedging for that call. ``budget`` is a share of the calls (at most ``max_hedges``:
    ``budget=max_hedges`` never refuses). With ``store=`` the calls and hedges counted are
    the fleet's, exchanged in the background every ``sync_interval`` seconds (no round trip
    on a call's path; see ``SharedCounts``); when the store cannot answer, this replica's
    own counts.
    """

    kind = "hedge"

    def __init__(
        self,
        *,
        delay: float | str | LearnedDelay = "p95",
        max_hedges: int = 1,
        budget: float = 0.1,
        window: float = 60.0,
        buckets: int = 10,
        store: Store | None = None,
        sync_interval: float = 1.0,
        name: str = "hedge",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self._delay = _delay(delay)
        self.max_hedges = check_int("max_hedges", max_hedges, maximum=10)
        self.budget = _budget(budget, self.max_hedges)
        #: (calls, hedges) over the window
        self.counts = counts = SharedCounts.of(
            self, "Hedge", window=window, buckets=buckets, store=store, sync_interval=sync_interval
        )
        self.window, self.buckets = counts.window, counts.buckets
        self.sync_interval, self.store = counts.sync_interval, counts.store
        self._ending: set[asyncio.Task[Any]] = set()  # losers cancelled, not yet ended
        self._tasks = CallerTask()
        self._code = {"delay": _delay_value(self._delay), "budget": self.budget}
        follow(self)

    def _live_base(self) -> dict[str, Any]:
        """Its live settings in code (and ``max_hedges``, which bounds the budget)."""
        return {**self._code, "max_hedges": self.max_hedges}

    def _live_apply(self, values: dict[str, Any]) -> str:
        """Calls from now on wait ``delay`` (a new learned delay learns afresh) and keep to
        ``budget``."""
        budget = _budget(values["budget"], self.max_hedges)
        note = ""
        if values["delay"] != _delay_value(self._delay):
            self._delay = _delay(values["delay"])
            note = "a learned delay starts learning afresh" if self.learned else ""
        self.budget = budget
        return note

    def __repr__(self) -> str:
        delay = self._delay
        shown = f"{delay:g}" if isinstance(delay, float) else repr(delay)
        return f"Hedge(delay={shown}, max_hedges={self.max_hedges}, name={self.name!r})"

    @property
    def delay(self) -> float:
        """The hedge delay now, in seconds (learned or fixed)."""
        delay = self._delay
        return delay if isinstance(delay, float) else delay.value

    @property
    def learned(self) -> LearnedDelay | None:
        """The ``LearnedDelay`` behind ``delay``, or ``None`` for a fixed one."""
        delay = self._delay
        return None if isinstance(delay, float) else delay

    async def sync(self) -> None:
        """Exchange counts with the store now (tests, shutdown); no-op without a store."""
        await self.counts.sync()

    def _may_hedge(self) -> bool:
        """Take a hedge from the budget if it has room: ``hedges + 1 <= budget * calls``;
        always with a budget of ``max_hedges`` (a call hedged after a delay longer than the
        window has slid out of the counts that would pay for it)."""
        if self.budget < self.max_hedges:
            calls, hedges = self.counts.totals()
            if hedges + 1 > self.budget * calls + 1e-9:
                return False
        self.counts.add(0, 1)
        return True

    def _wrap(self, fn: Protected) -> Protected:
        tasks = self._tasks

        async def protected(*args: Any, **kwargs: Any) -> Any:
            self.counts.add(1, 0)
            task = tasks.find()
            if task is None:
                raise RuntimeError("Hedge must be used inside an asyncio task")
            race = _Race(self, fn, args, kwargs, task)
            learned = self._delay if isinstance(self._delay, LearnedDelay) else None
            start = self._clock.monotonic() if learned is not None else 0.0
            won = False
            try:
                try:  # the first attempt runs here, in the caller's task
                    result = await fn(*args, **kwargs)
                except asyncio.CancelledError:
                    race.inline = False
                    if not race.interrupted():
                        raise
                    result = race.winner.result()  # type: ignore[union-attr]
                except Exception:
                    race.inline = False
                    if race.winner is None and race.attempts:  # a hedge may still succeed
                        await race.outlast()
                        if race.winner is not None:
                            won = True
                            return race.winner.result()
                        if race.error is not None:  # a hedge failed before the first attempt
                            raise race.first_error() from None
                        raise
                    if not race.interrupted():
                        raise
                    result = race.winner.result()  # type: ignore[union-attr]
                else:
                    race.inline = False
                    if race.interrupted():  # it swallowed the interruption: the hedge came first
                        result = race.winner.result()  # type: ignore[union-attr]
                if learned is not None:  # the first attempt's latency, or a lower bound of it
                    learned.observe(self._clock.monotonic() - start)
                won = True
                return result
            finally:
                race.left = 0  # no more hedges (a launch already due does nothing)
                if race.timer is not None:
                    race.timer.cancel()
                if race.attempts:
                    if won:  # the losers end on their own: the answer is not held back for them
                        self._abandon(race.attempts)
                    else:
                        await _cancel(race.attempts)

        return protected

    @property
    def ending(self) -> int:
        """Losing attempts cancelled but not yet ended (they end within a few loop turns)."""
        return len(self._ending)

    async def drain(self) -> None:
        """Wait until every losing attempt cancelled so far has ended (shutdown, tests)."""
        while self._ending:
            await asyncio.wait(list(self._ending))

    def _abandon(self, attempts: list[asyncio.Task[Any]]) -> None:
        """Cancel the attempts still running, without waiting; each is kept (a strong
        reference) until it has ended, and what it raised is dropped."""
        for attempt in attempts:
            if attempt.done():
                if not attempt.cancelled():
                    attempt.exception()
            else:
                attempt.cancel()
                self._ending.add(attempt)
                attempt.add_done_callback(self._ended)

    def _ended(self, attempt: asyncio.Task[Any]) -> None:
        self._ending.discard(attempt)
        if not attempt.cancelled():
            attempt.exception()


async def _cancel(attempts: list[asyncio.Task[Any]]) -> None:
    """Cancel the attempts still running and wait until every one has ended, even if the
    caller is cancelled meanwhile (then the cancellation is raised once they have)."""
    for attempt in attempts:
        attempt.cancel()
    interrupted = False
    while True:
        running = [a for a in attempts if not a.done()]
        if not running:
            break
        try:
            await asyncio.wait(running)
        except asyncio.CancelledError:
            interrupted = True
    for attempt in attempts:  # what a loser raised while being cancelled is dropped
        if not attempt.cancelled():
            attempt.exception()
    if interrupted:
        raise asyncio.CancelledError


class _Race:
    """One hedged call: the timer that starts hedges, and the hedges, each a task of its own
    (the first attempt runs in the caller's task). A hedge that succeeds while the first
    attempt runs interrupts it by cancelling the caller's task, as ``asyncio.timeout``
    does; ``interrupted()`` undoes that cancellation."""

    __slots__ = (
        "args",
        "attempts",
        "cancelling",
        "context",
        "delay",
        "error",
        "fn",
        "hedge",
        "inline",
        "kwargs",
        "left",
        "task",
        "timer",
        "wake",
        "winner",
    )

    def __init__(
        self,
        hedge: Hedge,
        fn: Protected,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task: asyncio.Task[Any],
    ) -> None:
        self.hedge = hedge
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.task = task
        self.cancelling = task.cancelling()
        self.context = contextvars.copy_context()  # the caller's, before the first attempt
        self.attempts: list[asyncio.Task[Any]] = []
        self.left = hedge.max_hedges
        self.inline = True  # the first attempt is running
        self.winner: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None  # of a hedge that failed first
        self.wake: asyncio.Event | None = None
        self.delay = delay = hedge.delay
        self.timer: TimerHandle | None = hedge._clock.call_later(delay, self.fire)

    def fire(self) -> None:
        """The delay passed: decide on the next turn of the loop, so an answer that comes in
        the same turn as the timer (on a fake clock, moved by the attempt) still wins."""
        self.timer = None
        self.task.get_loop().call_soon(self.launch, context=self.context)

    def launch(self) -> None:
        """Still no answer: start a hedge if the budget has room."""
        hedge = self.hedge
        if not self.left or self.winner is not None or not hedge._may_hedge():
            self.left = 0
            return
        self.left -= 1
        call = cast("Coroutine[Any, Any, Any]", self.fn(*self.args, **self.kwargs))
        attempt = self.task.get_loop().create_task(call, context=self.context)
        attempt.add_done_callback(self.finished)
        self.attempts.append(attempt)
        if self.left:
            self.timer = hedge._clock.call_later(self.delay, self.fire)

    def finished(self, attempt: asyncio.Task[Any]) -> None:
        """A hedge ended: the first to succeed wins (interrupting the first attempt if it is
        still running); otherwise wake ``outlast``."""
        error = asyncio.CancelledError() if attempt.cancelled() else attempt.exception()
        if self.winner is None and error is None:
            self.winner = attempt
            if self.inline:
                self.task.cancel()
                return
        elif self.inline and self.error is None:  # it failed before the first attempt ended
            self.error = error
        if self.wake is not None:
            self.wake.set()

    def interrupted(self) -> bool:
        """Whether a winning hedge interrupted the first attempt, and nobody else cancelled
        the call meanwhile (then the cancellation goes on)."""
        return self.winner is not None and self.task.uncancel() <= self.cancelling

    async def outlast(self) -> None:
        """The first attempt failed while hedges run: wait until one of them succeeds (the
        ``winner``) or every one has ended."""
        self.wake = wake = asyncio.Event()
        while self.winner is None and not all(a.done() for a in self.attempts):
            await wake.wait()
            wake.clear()

    def first_error(self) -> BaseException:
        """The error of a hedge that failed while the first attempt ran, taken from here (so
        that nothing but the traceback it is raised with holds it)."""
        error, self.error = self.error, None
        assert error is not None
        return error


register_schema(Schema("hedge", ("delay", "budget"), lambda values, base: Hedge(**values)))
