"""Collapse: single calls that arrive close together become one batch call.

``users = Collapse(fetch_users, max_size=100, delay=0.005)`` makes ``await users(7)`` wait up
to ``delay`` seconds for other calls (or until ``max_size`` distinct keys are gathered), then
call ``await fetch_users([7, ...])`` once; the batch function returns a mapping from key to
value, and each caller gets the entry of its own key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from functools import partial
from typing import Any, Generic, TypeVar

from ..checks import check_int, check_name, check_seconds
from ..clock import SYSTEM_CLOCK, Clock, TimerHandle
from ..events import BatchCalled, Listener, check_listeners, emit
from .base import require_async

__all__ = ["Collapse"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING: Any = object()


class _Batch:
    """The calls gathered for one batch: each key and the futures of its callers."""

    __slots__ = ("callers", "keys", "started", "timer")

    def __init__(self, started: float) -> None:
        self.started = started
        self.keys: dict[Any, list[asyncio.Future[Any]]] = {}
        self.callers = 0
        self.timer: TimerHandle | None = None


class Collapse(Generic[K, V]):
    """Gathers single calls into one ``batch_fn(keys)`` call; each caller gets its entry.

    ``await collapse(*args, **kwargs)`` adds the call's key (``key(*args, **kwargs)``, or by
    default the call's one positional argument) to the batch being gathered. The batch is
    sent ``delay`` seconds after its first call arrived, or at once when it holds
    ``max_size`` distinct keys; ``batch_fn`` is awaited with the list of its distinct keys
    and returns a mapping from key to value. Callers with the same key in one batch get the
    same value (one object: see ``Coalesce`` about shared results).

    * A key missing from the mapping is a ``KeyError`` for the callers of that key only.
    * A batch that raises raises the same exception in each of its callers.
    * A cancelled caller leaves the batch; a batch all of whose callers left before it was
      sent is not sent. A batch already sent runs to its end.
    """

    kind = "collapse"

    __slots__ = (
        "_batch",
        "_clock",
        "_listeners",
        "_running",
        "batch_fn",
        "delay",
        "key",
        "max_size",
        "name",
    )

    def __init__(
        self,
        batch_fn: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        *,
        max_size: int,
        delay: float,
        key: Callable[..., K] | None = None,
        name: str = "collapse",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        self.name = check_name(name)
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable returning a hashable key, got {key!r}")
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(
                f"clock must provide monotonic(), sleep() and call_later(), got {clock!r}"
            )
        self.batch_fn = batch_fn
        self.max_size = check_int("max_size", max_size)
        self.delay: float = check_seconds("delay", delay, zero=True)
        self.key = key
        require_async(batch_fn, self)
        self._clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self._listeners = check_listeners(listeners)
        self._batch: _Batch | None = None
        self._running: set[asyncio.Future[None]] = set()

    def __repr__(self) -> str:
        return f"Collapse(max_size={self.max_size}, delay={self.delay:g}, name={self.name!r})"

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._running)

    def add_listener(self, listener: Listener) -> None:
        """Add ``listener`` to the callables that receive this collapser's events."""
        self._listeners = (*self._listeners, *check_listeners((listener,)))

    async def __call__(self, *args: Any, **kwargs: Any) -> V:
        """The value ``batch_fn`` returns for this call's key, in a batch with others."""
        if self.key is not None:
            key: Any = self.key(*args, **kwargs)
        elif len(args) == 1 and not kwargs:
            key = args[0]
        else:
            raise TypeError(
                f"{self!r} without key= takes exactly one positional argument, the key; "
                f"got args={args!r}, kwargs={kwargs!r}"
            )
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(self._clock.monotonic())
            batch.timer = self._clock.call_later(self.delay, partial(self._send, batch))
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        waiting = batch.keys.get(key)
        if waiting is None:
            batch.keys[key] = [future]
        else:
            waiting.append(future)
        batch.callers += 1
        if len(batch.keys) >= self.max_size:
            self._send(batch)
        return await future

    def _send(self, batch: _Batch) -> None:
        """Send ``batch`` (its timer fired, or it is full)."""
        if self._batch is batch:
            self._batch = None
        if batch.timer is not None:
            batch.timer.cancel()
        live: dict[Any, list[asyncio.Future[Any]]] = {}
        for key, futures in batch.keys.items():
            waiting = [f for f in futures if not f.done()]
            if waiting:
                live[key] = waiting
        if not live:  # every caller left before the batch was sent
            return
        if self._listeners:
            emit(
                self._listeners,
                BatchCalled(
                    name=self.name,
                    size=len(live),
                    callers=sum(map(len, live.values())),
                    delay=self._clock.monotonic() - batch.started,
                ),
            )
        task = asyncio.ensure_future(self._run(live))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, live: dict[Any, list[asyncio.Future[Any]]]) -> None:
        """Await the batch function and hand each caller its entry (or the batch's error)."""
        try:
            mapping = await self.batch_fn(list(live))
            if not isinstance(mapping, Mapping):
                raise TypeError(f"{self.name}: batch_fn must return a mapping, got {mapping!r}")
        except Exception as exc:
            for futures in live.values():
                _settle(futures, exc)
            return
        except BaseException:  # cancelled (or an exit): the callers are cancelled with it
            for futures in live.values():
                for future in futures:
                    future.cancel()
            raise
        for key, futures in live.items():
            try:  # the mapping is the user's: one that fails to answer fails its callers
                value = mapping.get(key, _MISSING)
            except Exception as exc:
                _settle(futures, exc)
                continue
            if value is _MISSING:
                _settle(futures, KeyError(f"{self.name}: batch_fn returned no entry for {key!r}"))
            else:
                _settle(futures, None, value)


def _settle(futures: list[asyncio.Future[Any]], error: Exception | None, value: Any = None) -> None:
    """Give each caller still waiting ``error``, or else ``value``."""
    for future in futures:
        if future.done():  # the caller left
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
