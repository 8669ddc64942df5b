"""Coalesce: concurrent identical calls share one execution (single flight).

When a popular entry expires, many callers ask the dependency for the same thing at once.
Under ``Coalesce`` the first call with a key starts the execution; every call with the same
key that arrives while it runs waits for it, and each gets its outcome: the same result
object, or the same exception. The next call after it ended runs afresh: nothing is cached.

The execution runs in a task of its own, so no caller owns it: a caller that is cancelled
(or times out) leaves it and the other callers alone; when every caller has gone, the
execution is cancelled. With a store, the execution is shared by the fleet (``FleetFlight``).

With ``scope="request"``, calls share only with the calls of their own request (a
``request_scope``, which ``ResilienceMiddleware`` opens for each HTTP request), and a result
is kept for the rest of the request: the next identical call gets it without running (the
request cache). Outside any request scope, such a policy is a plain single flight.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Hashable, Iterable
from contextvars import ContextVar, Token
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..clock import Clock
from ..events import Coalesced, Listener, emit
from ..store.records import MAX_PUBLISHED
from .base import BasePolicy, Protected, target
from .cache import Serializer, default_cache_key
from .flight import FleetFlight, check_fleet_options

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["LEASE", "POLL", "SCOPES", "Coalesce", "default_key", "fleet_item", "request_scope"]

LEASE = 10.0
"""Seconds a fleet's flight stays with a replica that stopped renewing it, by default."""
POLL = 0.5
"""Seconds between a waiting replica's looks for a result when no wake-up came, by default."""

SCOPES = ("flight", "request")
"""What a ``Coalesce`` shares within: executions under way (``"flight"``), or also the
results of the calls of one request (``"request"``)."""

_CancelledError = asyncio.CancelledError
_get_loop = asyncio.get_running_loop


def _task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """``loop.create_task(coro)``: where asyncio has no eager tasks (3.11)."""
    return loop.create_task(coro)


# an execution's task starts at once where asyncio can (3.12+): a call that never waits then
# ends before its caller awaits it, without a turn of the event loop
_create_task: Callable[[asyncio.AbstractEventLoop, Coroutine[Any, Any, None]], asyncio.Future[None]]
_create_task = getattr(asyncio, "eager_task_factory", _task)


_TURN_FIRST = _create_task is _task  # no eager tasks: the first caller lets the task run


@types.coroutine
def _one_turn() -> Generator[None, None, None]:
    """Let the event loop run what is ready, once (``asyncio.sleep(0)`` without its frame)."""
    yield


def default_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """The key of a call by default: its positional arguments and its keyword arguments
    (in any order). Hashing it raises ``TypeError`` when an argument is unhashable."""
    return (args, frozenset(kwargs.items())) if kwargs else args


def fleet_item(
    key: Callable[..., Hashable] | None,
    fn: Protected,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> str:
    """A call's item in the fleet's flights: what ``key`` returns (a str), or by default
    ``fn``'s qualified name and the ``repr`` of its arguments (``default_cache_key``)."""
    if key is None:
        return default_cache_key(fn, args, kwargs)
    item = key(*args, **kwargs)
    if not isinstance(item, str) or not item:
        raise TypeError(f"key must return a non-empty str with a store, got {item!r}")
    return item


class request_scope:
    """One request: ``with request_scope():`` or ``async with request_scope():`` around a
    request's work (a job in a worker, a test, a request of a framework without
    ``ResilienceMiddleware``, which opens one for each HTTP request).

    Within it, a ``Coalesce(scope="request")`` shares executions only among the request's
    calls (the tasks it starts too: they copy its context), and keeps each call's result
    in the request's cache until it ends. A scope opened inside another is a new request,
    with a cache of its own, until it ends. ``open()`` and ``close()`` are ``with``'s two
    halves. Hashed by identity: it also keeps the request's executions apart.
    """

    __slots__ = ("_results", "_token")

    in_use: ClassVar[bool] = False
    """Whether a ``Coalesce(scope="request")`` was made in this process: until then a
    request scope has no use, and ``ResilienceMiddleware`` opens none."""

    _token: Token[request_scope | None]

    def __init__(self) -> None:
        self._results: dict[Hashable, Any] = {}  #: the cache: ``(policy, key)``: the result

    def open(self) -> request_scope:
        """Start the request: the calls from here on are its calls."""
        self._token = _request.set(self)
        return self

    def close(self, *exc_info: object) -> None:
        """End the request: the enclosing one (if any) comes back."""
        _request.reset(self._token)

    __enter__ = open
    __exit__ = close

    async def __aenter__(self) -> request_scope:
        return self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


_request: ContextVar[request_scope | None] = ContextVar("resilience_request", default=None)
_MISSING = object()


class _Flight:
    """One execution under way and the callers waiting for it (a future each)."""

    __slots__ = ("abandoned", "callers", "task", "waiting")

    task: asyncio.Future[None]  #: set as soon as the flight is made

    def __init__(self) -> None:
        self.callers: list[asyncio.Future[Any]] = []  #: one future per caller
        self.waiting = 0  #: callers not cancelled
        self.abandoned = False  #: every caller left; cancelled, its cancellation under way


class Coalesce(BasePolicy):
    """Concurrent calls with the same key share one execution; each gets its outcome.

    A call's key is ``key(*args, **kwargs)`` if given, else its arguments
    (``default_key``); calls of different functions never share. A call whose default key
    is unhashable (a list, a dict among its arguments) runs on its own, unshared; a ``key``
    that returns something unhashable is a ``TypeError`` for the call.

    Every caller gets the *same* result object: a caller that mutates it mutates everyone's.
    ``copy`` (``copy.deepcopy``, ``dict``, ...) is applied to the result for each caller,
    who then gets a copy of their own. An exception reaches every caller (the same
    exception object).

    With a ``store`` (``RedisStore``), one replica of the fleet runs the call and the others
    wait for the result it publishes (``FleetFlight``: ``lease``, ``poll``, ``serializer``,
    ``max_bytes``); the key is then a str: what ``key`` returns, or by default the function's
    qualified name and the ``repr`` of its arguments.

    With ``scope="request"``, within a ``request_scope`` the calls share only with the
    calls of their request, and a call's result is kept for the rest of it: the next call
    with the same key (and function, and policy) gets it at once (through ``copy``).
    Failures and cancelled calls are not kept. Outside any request scope it is a plain
    single flight. A request's cache is local: ``store`` is then refused.
    """

    kind = "coalesce"

    def __init__(
        self,
        *,
        key: Callable[..., Hashable] | None = None,
        copy: Callable[[Any], Any] | None = None,
        scope: Literal["flight", "request"] = "flight",
        store: Store | None = None,
        lease: float = LEASE,
        poll: float = POLL,
        serializer: Serializer | None = None,
        max_bytes: int = MAX_PUBLISHED - 1,
        name: str = "coalesce",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        if not isinstance(scope, str):
            raise TypeError(f"scope must be one of {SCOPES}, got {scope!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if scope == "request" and store is not None:
            raise ValueError(
                f"scope='request' takes no store (a request's cache is local), got {store!r}"
            )
        self.fleet: FleetFlight | None = None
        if store is None:  # the fleet's options are checked even when unused
            check_fleet_options(lease, poll, serializer, max_bytes)
        else:
            self.fleet = FleetFlight(
                store,
                name=self.name,
                clock=self._clock,
                lease=lease,
                poll=poll,
                serializer=serializer,
                max_bytes=max_bytes,
            )
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable returning a hashable key, got {key!r}")
        if copy is not None and not callable(copy):
            raise TypeError(f"copy must be a callable or None, got {copy!r}")
        self.key = key
        self.copy = copy
        self.scope = scope
        if scope == "request":
            request_scope.in_use = True
        self._flights: dict[Hashable, _Flight] = {}

    def __repr__(self) -> str:
        return f"Coalesce(name={self.name!r})"

    @property
    def in_flight(self) -> int:
        """Executions under way now."""
        return len(self._flights)

    def _wrap(self, fn: Protected) -> Protected:
        flights = self._flights
        key_of = self.key
        copy = self.copy
        execute = self._execute
        fleet = self.fleet
        per_request = self.scope == "request"

        async def protected(*args: Any, **kwargs: Any) -> Any:
            user_fn, user_args = target(fn, args)
            item = ""
            if fleet is not None:
                try:
                    item = fleet_item(key_of, user_fn, user_args, kwargs)
                except Exception:
                    if key_of is not None:
                        raise
                    # an argument without a repr: this call cannot be named fleet-wide
                    return await fn(*args, **kwargs)
                key: Hashable = (fn, item)
                flight = flights.get(key)
            elif key_of is None:
                try:
                    key = (fn, user_fn, default_key(user_args, kwargs))
                    flight = flights.get(key)
                except TypeError:  # an unhashable argument: this call cannot be shared
                    return await fn(*args, **kwargs)
            else:
                key = (fn, user_fn, key_of(*user_args, **kwargs))
                flight = flights.get(key)
            keep = None
            if per_request and (request := _request.get()) is not None:
                results = request._results
                result = results.get((self, key), _MISSING)
                if result is not _MISSING:  # this request made the same call before
                    return result if copy is None else copy(result)
                keep = partial(results.__setitem__, (self, key))
                key = (request, key)  # shared with the request's own calls only
                flight = flights.get(key)
            while flight is not None and flight.abandoned:  # wait for its cancellation to end
                await asyncio.wait((flight.task,))
                flight = flights.get(key)
            loop = _get_loop()
            future = loop.create_future()
            if flight is None:
                if fleet is None:
                    call = fn(*args, **kwargs)
                else:
                    call = fleet.run(item, partial(fn, *args, **kwargs))
                flight = flights[key] = _Flight()
                flight.callers.append(future)
                flight.waiting += 1
                # an eager task may run the call to its end right here
                flight.task = _create_task(loop, execute(key, flight, call, keep))
            else:
                flight.callers.append(future)
                flight.waiting += 1
            try:
                if _TURN_FIRST and not future.done() and flight.callers[0] is future:
                    # the first caller: the execution's task runs on the next turn of the
                    # loop (3.11), and a call that never waits ends within it; its outcome is
                    # then here one turn sooner than by waking on the future
                    await _one_turn()
                result = future.result() if future.done() else await future
            except _CancelledError:
                # this caller's outcome goes unused: none for it from now on, and one that
                # came meanwhile is marked seen (not reported as never retrieved)
                if not future.cancel() and not future.cancelled():
                    future.exception()
                flight.waiting -= 1
                if not flight.waiting and not flight.task.done():
                    # every caller has gone (cancelled): so has the reason to run it
                    flight.abandoned = True
                    flight.task.cancel()
                raise
            return result if copy is None else copy(result)

        return protected

    async def _execute(
        self,
        key: Hashable,
        flight: _Flight,
        call: Awaitable[Any],
        keep: Callable[[Any], object] | None,
    ) -> None:
        """Await ``call`` and hand its outcome to every caller of ``flight`` still waiting;
        from then on a call with ``key`` runs afresh, unless ``keep`` (a request's cache)
        kept its result."""
        try:
            result = await call
        except BaseException as exc:
            self._landed(key, flight)
            for future in flight.callers:
                if not future.done():
                    if isinstance(exc, _CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if keep is not None:
            keep(result)
        self._landed(key, flight)
        for future in flight.callers:
            if not future.done():
                future.set_result(result)

    def _landed(self, key: Hashable, flight: _Flight) -> None:
        """The execution ``flight`` ended: the next call with ``key`` runs afresh."""
        if self._flights.get(key) is not flight:
            return
        del self._flights[key]
        if len(flight.callers) > 1 and self._listeners:
            emit(self._listeners, Coalesced(name=self.name, callers=len(flight.callers)))
