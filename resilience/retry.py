"""Retry: run the call again when it fails, with tenacity's wait and stop strategies."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import tenacity
from tenacity import RetryCallState

from .clock import Clock
from .events import Listener, RetryScheduled, emit
from .policy import (
    BasePolicy,
    ExceptionFilter,
    Protected,
    check_int,
    check_predicate,
    exception_filter,
)

__all__ = ["Retry"]

WaitStrategy = Callable[[RetryCallState], float]
StopStrategy = Callable[[RetryCallState], bool]


def default_wait() -> WaitStrategy:
    """Exponential backoff from 0.1 s, doubling, capped at 5 s, plus up to 0.1 s of jitter."""
    # tenacity >= 9.1 deprecates ``initial`` for ``multiplier``; older ones lack ``multiplier``
    if "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters:
        return tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1)
    return tenacity.wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.1)


class Retry(BasePolicy):
    """Calls again when the call fails with an exception matching ``on``.

    ``attempts`` counts every call, the first included. ``wait`` and ``stop`` take tenacity's
    strategies as they are (``tenacity.wait_fixed(1) + tenacity.wait_random(0, 1)``,
    ``tenacity.stop_after_delay(10)``, ...); ``stop`` ends retrying early, it never adds
    attempts. ``retry_if_result(result)`` retries a returned value too. When attempts run out
    the last exception is re-raised as it was (or the last result is returned).

    The first attempt runs directly: tenacity's ``RetryCallState`` is built only after a
    failure, so the success path costs almost nothing. Sleeps go through ``clock``.
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
        self._tenacity = tenacity.AsyncRetrying(
            sleep=self._clock.sleep, stop=tenacity.stop_after_attempt(attempts), wait=wait
        )

    def _wrap(self, fn: Protected) -> Protected:
        clock = self._clock
        timed = self.stop is not None
        should_retry = self._should_retry
        retry_if_result = self._retry_if_result
        again = self._again
        single = self.attempts == 1

        async def protected(*args: Any, **kwargs: Any) -> Any:
            start = clock.monotonic() if timed else None
            error: Exception | None = None
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if single or not should_retry(exc):
                    raise
                error, result = exc, None
            else:
                if retry_if_result is None or not retry_if_result(result):
                    return result
            # retry outside the except block, so later errors are not chained to this one
            return await again(fn, args, kwargs, start, error, result)

        return protected

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
        state = RetryCallState(self._tenacity, fn, args, kwargs)
        state.start_time = clock.monotonic() if start is None else start
        retry_if_result = self._retry_if_result
        while True:
            if error is not None:
                state.set_exception((type(error), error, error.__traceback__))
            else:
                state.set_result(result)
            state.outcome_timestamp = clock.monotonic()
            if state.attempt_number >= self.attempts:
                break
            delay = max(0.0, float(self.wait(state)))
            state.upcoming_sleep = delay
            if self.stop is not None and self.stop(state):
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
                return result
            error = None
        if error is not None:
            raise error
        return result
