"""Retry: run the call again when it fails, with tenacity's wait and stop strategies."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import tenacity
from tenacity import RetryCallState

from ..checks import store_down
from ..clock import Clock
from ..errors import StoreUnavailableError, UnacceptableResultError
from ..events import CallRejected, Listener, RetryScheduled, emit
from ..store.config import Schema, follow, register_schema
from .base import (
    BasePolicy,
    ExceptionFilter,
    Protected,
    check_int,
    check_name,
    check_positive,
    check_predicate,
    check_store,
    exception_filter,
    target,
)

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["Retry", "RetryBudget", "RetryCallState"]

#: how long an untouched budget lives in a shared store before it starts full again
BUDGET_TTL = 3600.0

WaitStrategy = Callable[[RetryCallState], float]
StopStrategy = Callable[[RetryCallState], bool]
BeforeSleep = Callable[[RetryCallState], Awaitable[None] | None]


def default_wait() -> WaitStrategy:
    """Exponential backoff from 0.1 s, doubling, capped at 5 s, plus up to 0.1 s of jitter."""
    # tenacity >= 9.1 deprecates ``initial`` for ``multiplier``; older ones lack ``multiplier``
    if "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters:
        return tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1)
    return tenacity.wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.1)


class RetryBudget:
    """A gRPC-style retry budget: retries stop while too many attempts fail.

    A token bucket that starts full at ``max_tokens``. Each failed attempt takes one token,
    each successful call adds ``token_ratio``; a retry may start only while more than
    ``max_tokens / 2`` tokens are left. So at a steady failure rate retries are allowed for
    at most about ``token_ratio`` retries per success, and a dependency that fails hard gets
    one attempt per call instead of ``attempts``.

    Several ``Retry`` objects may share one budget. With ``store=`` the tokens are shared by
    every budget of that ``name`` on the store (every replica, through ``RedisStore``), so a
    fleet cannot start a retry storm together. The success path asks nothing of the store:
    changes accumulate here and are pushed with one ``store.budget_add`` when a retry has to
    be decided, whose reply is the fleet's count. When the store cannot answer, the decision
    is made on the local count (the pending changes are pushed later).
    """

    def __init__(
        self,
        *,
        name: str,
        max_tokens: float = 10.0,
        token_ratio: float = 0.1,
        store: Store | None = None,
    ) -> None:
        self.name = check_name(name)
        self.max_tokens = check_positive("max_tokens", max_tokens)
        self.token_ratio = check_positive("token_ratio", token_ratio)
        if self.token_ratio > self.max_tokens:
            raise ValueError(
                f"token_ratio must not exceed max_tokens ({self.max_tokens:g}), got {token_ratio!r}"
            )
        self.store = check_store("store", store, "budget_add")
        self.threshold = self.max_tokens / 2
        self._tokens = self.max_tokens
        self._pending = 0.0  # changes not yet pushed to the store

    def __repr__(self) -> str:
        return (
            f"RetryBudget(name={self.name!r}, max_tokens={self.max_tokens:g}, "
            f"token_ratio={self.token_ratio:g}, tokens={self._tokens:g})"
        )

    @property
    def tokens(self) -> float:
        """Tokens left: the fleet's count last seen plus the changes made here since."""
        return self._tokens

    def _change(self, delta: float) -> None:
        tokens = self._tokens + delta
        self._tokens = 0.0 if tokens < 0.0 else min(tokens, self.max_tokens)
        if self.store is not None:
            self._pending += delta

    def record_success(self) -> None:
        """A call succeeded: add ``token_ratio`` tokens (no I/O)."""
        self._change(self.token_ratio)

    def record_failure(self) -> None:
        """An attempt failed and no retry is wanted: take one token (no I/O)."""
        self._change(-1.0)

    async def allow_retry(self) -> bool:
        """An attempt failed and a retry is wanted: take one token; may the retry start?"""
        self._change(-1.0)
        store = self.store
        if store is None or store_down(store):
            return self._tokens > self.threshold
        delta, self._pending = self._pending, 0.0
        try:
            tokens = await store.budget_add(
                self.name, delta=delta, maximum=self.max_tokens, ttl=BUDGET_TTL
            )
        except StoreUnavailableError:
            self._pending += delta  # pushed with the next decision
            return self._tokens > self.threshold
        if not math.isfinite(tokens):
            return self._tokens > self.threshold
        # the fleet's count, plus what happened here while we waited for it
        self._tokens = max(0.0, min(tokens + self._pending, self.max_tokens))
        return tokens > self.threshold


class Retry(BasePolicy):
    """Calls again when the call fails with an exception matching ``on``.

    ``attempts`` counts every call, the first included. ``wait`` and ``stop`` take tenacity's
    strategies as they are (``tenacity.wait_fixed(1) + tenacity.wait_random(0, 1)``,
    ``tenacity.stop_after_delay(10)``, ...); ``stop`` ends retrying early, it never adds
    attempts. ``retry_if_result(result)`` retries a returned value too. When attempts run out
    the last exception is re-raised as it was (or the last result is returned).

    The first attempt runs directly: tenacity's ``RetryCallState`` is built only after a
    failure, so the success path costs almost nothing. Sleeps go through ``clock``.

    ``before_sleep(state)``, a plain or an async function, runs once a retry is decided, just
    before the wait (as tenacity's ``before_sleep``): ``state.outcome`` is what is being
    discarded, ``state.upcoming_sleep`` the wait. An error it raises ends the call.

    ``budget=RetryBudget(...)`` throttles retries (gRPC-style): when the budget refuses a
    retry, the call ends as if its attempts had run out, and a ``CallRejected`` event is
    emitted.
    """

    kind = "retry"

    def __init__(
        self,
        *,
        on: ExceptionFilter,
        attempts: int = 3,
        wait: WaitStrategy | None = None,
        stop: StopStrategy | None = None,
        retry_if_result: Callable[[Any], bool] | None = None,
        budget: RetryBudget | None = None,
        before_sleep: BeforeSleep | None = None,
        name: str = "retry",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        self._should_retry = exception_filter("on", on)
        self.attempts = check_int("attempts", attempts)
        if wait is None:
            wait = default_wait()
        elif not callable(wait):
            raise TypeError(f"wait must be a tenacity wait strategy (a callable), got {wait!r}")
        if stop is not None and not callable(stop):
            raise TypeError(f"stop must be a tenacity stop strategy (a callable), got {stop!r}")
        self.wait: WaitStrategy = wait
        self.stop: StopStrategy | None = stop
        self._retry_if_result = check_predicate("retry_if_result", retry_if_result)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a RetryBudget or None, got {budget!r}")
        self.budget: RetryBudget | None = budget
        if before_sleep is not None and not callable(before_sleep):
            raise TypeError(f"before_sleep must be a callable or None, got {before_sleep!r}")
        self.before_sleep: BeforeSleep | None = before_sleep
        self._tenacity = self._retrying()
        self._code = {"attempts": self.attempts}
        follow(self)

    def _retrying(self) -> tenacity.AsyncRetrying:
        """The tenacity state a failed attempt's decision is built on."""
        return tenacity.AsyncRetrying(
            sleep=self._clock.sleep, stop=tenacity.stop_after_attempt(self.attempts), wait=self.wait
        )

    def _live_base(self) -> dict[str, Any]:
        """Its live settings in code."""
        return dict(self._code)

    def _live_apply(self, values: dict[str, Any]) -> str:
        """Calls from now on make at most ``attempts`` attempts (a retry built with
        ``attempts=1`` wraps no retrying: it stays at one)."""
        self.attempts = check_int("attempts", values["attempts"])
        self._tenacity = self._retrying()
        return ""

    def _wrap(self, fn: Protected) -> Protected:
        # few free variables (each is copied into every call's frame): the paths off the
        # success path read the retry's attributes
        timed = self.stop is not None
        single = self.attempts == 1
        plain = self._retry_if_result is None and self.budget is None  # any result will do

        async def protected(*args: Any, **kwargs: Any) -> Any:
            start = self._clock.monotonic() if timed else None
            try:
                if plain:  # returned from inside the try: the success path is this line
                    return await (fn(*args, **kwargs) if kwargs else fn(*args))
                result = await (fn(*args, **kwargs) if kwargs else fn(*args))
            except Exception as exc:
                if single:  # no retry: the budget counts a failure it would have retried
                    if self.budget is not None and self._should_retry(exc):
                        self.budget.record_failure()
                    raise
                if not self._should_retry(exc):
                    raise
                error: Exception | None = exc
                result = None
            else:
                check = self._retry_if_result
                if check is None or not check(result):
                    if self.budget is not None:
                        self.budget.record_success()
                    return result
                error = None
            # retry outside the except block, so later errors are not chained to this one
            return await self._again(fn, args, kwargs, start, error, result)

        return protected

    def _refused(self, error: Exception | None, result: Any) -> None:
        """The budget refused a retry: report it as a rejected (re)call."""
        if self._listeners:
            reason = error if error is not None else UnacceptableResultError(result)
            emit(self._listeners, CallRejected(name=self.name, policy=self.kind, error=reason))

    async def _again(
        self,
        fn: Protected,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        start: float | None,
        error: Exception | None,
        result: Any,
    ) -> Any:
        clock = self._clock
        state = RetryCallState(self._tenacity, *target(fn, args), kwargs)  # the user's fn
        state.start_time = clock.monotonic() if start is None else start
        retry_if_result = self._retry_if_result
        budget = self.budget
        while True:
            if error is not None:
                state.set_exception((type(error), error, error.__traceback__))
            else:
                state.set_result(result)
            state.outcome_timestamp = clock.monotonic()
            if state.attempt_number >= self.attempts:
                if budget is not None:
                    budget.record_failure()
                break
            delay = max(0.0, float(self.wait(state)))
            state.upcoming_sleep = delay
            if self.stop is not None and self.stop(state):
                if budget is not None:
                    budget.record_failure()
                break
            if budget is not None and not await budget.allow_retry():
                self._refused(error, result)
                break
            if self._listeners:
                emit(
                    self._listeners,
                    RetryScheduled(
                        name=self.name,
                        attempt=state.attempt_number,
                        delay=delay,
                        error=error,
                        result=result,
                    ),
                )
            state.next_action = tenacity.RetryAction(delay)
            if self.before_sleep is not None:
                hook = self.before_sleep(state)
                if hook is not None:
                    await hook
            state.idle_for += delay
            await clock.sleep(delay)
            state.prepare_for_next_attempt()
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if not self._should_retry(exc):
                    raise
                error, result = exc, None
                continue
            if retry_if_result is None or not retry_if_result(result):
                if budget is not None:
                    budget.record_success()
                return result
            error = None
        if error is not None:
            raise error
        return result


def _check_attempts(values: dict[str, Any], base: dict[str, Any]) -> None:
    """Live ``attempts``, checked as the constructor checks it, for a retry whose values in
    code are ``base``: one built with ``attempts=1`` wraps no retry path, so it stays at 1."""
    Retry(on=Exception, attempts=values["attempts"])
    if base.get("attempts") == 1 and values["attempts"] != 1:
        raise ValueError(
            f"attempts of a retry built with attempts=1 cannot change live (it wraps no retry "
            f"path), got {values['attempts']!r}"
        )


register_schema(Schema("retry", ("attempts",), _check_attempts))
