"""The Policy protocol, the plumbing every policy shares (``BasePolicy``), and the input checks
the policies share."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import operator
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

from ..checks import check_bool as check_bool  # re-exported: policies import checks from here
from ..checks import check_int as check_int
from ..checks import check_name as check_name
from ..checks import check_positive as check_positive
from ..checks import check_ratio as check_ratio
from ..checks import check_seconds as check_seconds
from ..clock import SYSTEM_CLOCK, Clock
from ..events import CallFinished, Listener, call_finished, check_listeners, emit, wants

if TYPE_CHECKING:
    from ..store.protocol import Store

__all__ = ["INVOKE", "BasePolicy", "CallForm", "CallerTask", "Policy", "target"]

P = ParamSpec("P")
T = TypeVar("T")

ExceptionFilter = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


Protected = Callable[..., Awaitable[Any]]


@runtime_checkable
class Policy(Protocol):
    """What ``Pipeline`` composes: a ``kind``, a ``name``, and ``wrap(fn)``.

    ``wrap(fn)`` returns a coroutine function that runs ``fn`` under the policy, taking the
    same arguments. Every policy here implements it (through ``BasePolicy``); a policy of
    your own needs only these three to join a ``Pipeline``.
    """

    kind: str
    name: str

    def wrap(self, fn: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]:
        """A coroutine function running ``fn`` under this policy."""


class CallForm(Protocol):
    """``policy.call``: runs ``fn(*args, **kwargs)`` under the policy."""

    def __call__(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[T]:
        """``await policy.call(fn, *args, **kwargs)``."""


INVOKE: Callable[..., Any] = operator.call
"""What a policy's call form protects: a function that calls its first argument with the rest
(``operator.call``, in C). ``policy.call(fn, *args)`` is the policy's protected function for
``INVOKE``, called with ``(fn, *args)``: one protected function serves every ``fn``, and the
call form costs what the decorated form costs. A policy that looks at the function it
protects (a retry's hooks, a fallback's cache keys) asks ``target()`` for the user's."""


def target(fn: Protected, args: tuple[Any, ...]) -> tuple[Protected, tuple[Any, ...]]:
    """The user's function and its arguments, from the ``fn`` a protected function wraps and
    the arguments it was called with: ``fn`` may be another policy's protected function (a
    ``Pipeline``), which names the function it wraps in ``__wrapped__``, and the innermost may
    be the call form's ``INVOKE``, which is passed the user's function first."""
    while (inner := getattr(fn, "__wrapped__", None)) is not None:
        fn = inner
    if fn is INVOKE:
        return args[0], args[1:]
    return fn, args


class BasePolicy:
    """What every policy here shares: the decorator, ``call``, ``wrap``, name, listeners, clock.

    A policy writes its logic once, in ``_wrap(fn)``, which returns a coroutine function that
    runs ``fn`` under the policy (one coroutine frame, nothing more). From it:

    * ``wrap(fn)`` (the ``Policy`` protocol, what ``Pipeline`` uses) adds the ``CallFinished``
      report when a listener wants it (decided when wrapping: free otherwise);
    * decorating (``@policy``) is ``wrap(fn)`` with ``fn``'s name, docstring and signature;
    * ``policy.call(fn, *args, **kwargs)`` is ``wrap(INVOKE)``, made on first use with the
      listeners of that moment (again after ``add_listener``): however it is captured (a
      bound ``policy.call``, a ``functools.partial``), it costs what the decorated form costs.

    A protected function calls ``fn(*args)`` when it was given no keyword arguments, else
    ``fn(*args, **kwargs)``: a call with ``**kwargs`` copies the dict first, even an empty
    one (about 10 ns a policy).
    """

    kind: str = "policy"
    name: str
    _listeners: tuple[Listener, ...]

    def __init__(self, name: str, clock: Clock | None, listeners: Iterable[Listener]) -> None:
        self.name = check_name(name)
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(
                f"clock must provide monotonic(), sleep() and call_later(), got {clock!r}"
            )
        self._clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self._listeners = check_listeners(listeners)
        # given its place here, with the others, then left to _MadeOnFirstRead until made:
        # every instance of a class gets its attributes in one order, so attribute reads on
        # the hot path stay fast
        self.call = cast(CallForm, None)
        del self.call

    #: ``await policy.call(fn, *args, **kwargs)``: ``fn(*args, **kwargs)`` under this
    #: policy. The protected function behind it is made on first use (``wrap(INVOKE)``)
    #: and kept: a bound ``policy.call`` or a ``functools.partial`` of it costs what the
    #: decorated form costs. (Until first read, ``_MadeOnFirstRead``.)
    call: CallForm

    @property
    def clock(self) -> Clock:
        """The clock this policy reads."""
        return self._clock

    def add_listener(self, listener: Listener) -> None:
        """Add ``listener`` to the callables that receive this policy's events.

        Every event reaches it from now on, except ``CallFinished``, which goes to the
        listeners a protected function was made with (``call`` makes its own again; a
        function decorated earlier keeps its own).
        """
        self._listeners = (*self._listeners, *check_listeners((listener,)))
        with contextlib.suppress(AttributeError):  # made again on the next read
            del self.call

    def _wrap(self, fn: Protected) -> Protected:
        """Return a coroutine function running ``fn`` under this policy (the policy's logic)."""
        raise NotImplementedError

    def wrap(self, fn: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]:
        """A coroutine function running ``fn`` under this policy, reported as ``CallFinished``
        to the listeners that want it (``events.select``); see the class docstring."""
        protected = self._wrap(fn)
        kind, name = self.kind, self.name
        if not any(wants(x, CallFinished, kind, name) for x in self._listeners):
            return _wrapping(protected, fn)
        monotonic = self._clock.monotonic

        async def observed(*args: Any, **kwargs: Any) -> Any:
            start = monotonic()
            outcome = "cancelled"
            try:
                result = await (protected(*args, **kwargs) if kwargs else protected(*args))
                outcome = "success"
                return result
            except Exception as exc:
                outcome = _outcome(exc)
                raise
            finally:
                if self._listeners:
                    emit(self._listeners, call_finished(name, kind, outcome, monotonic() - start))

        return _wrapping(observed, fn)

    def __call__(self, fn: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]:
        """Decorate an ``async def`` function; its name, docstring and signature are kept."""
        require_async(fn, self)
        return functools.wraps(fn)(self.wrap(fn))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _MadeOnFirstRead:
    """``await policy.call(fn, *args, **kwargs)``: ``fn(*args, **kwargs)`` under the policy.

    The protected function behind it (``wrap(INVOKE)``) is made on the first read of
    ``policy.call`` and kept as an attribute of the policy's own, which hides this
    (non-data) descriptor from then on: later reads are one lookup, and a bound
    ``policy.call`` or a ``functools.partial`` of it costs what the decorated form costs.
    """

    __slots__ = ()

    def __get__(self, policy: BasePolicy | None, owner: type | None = None) -> Any:
        if policy is None:
            return self
        call = cast(CallForm, policy.wrap(INVOKE))
        setattr(policy, "call", call)  # noqa: B010 - an attribute this descriptor leaves alone
        return call


BasePolicy.call = _MadeOnFirstRead()  # type: ignore[assignment]


def _wrapping(protected: Protected, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``protected``, naming the function it runs in ``__wrapped__`` (as ``functools.wraps``
    does; ``target()`` follows it), unless it is ``fn`` itself (a policy that adds nothing)."""
    if protected is not fn:
        protected.__wrapped__ = fn  # type: ignore[attr-defined]
    return cast(Callable[P, Awaitable[T]], protected)


def _outcome(exc: Exception) -> str:
    from ..errors import RejectedError, ResilienceTimeoutError

    if isinstance(exc, RejectedError):
        return "rejected"
    if isinstance(exc, ResilienceTimeoutError):
        return "timeout"
    return "failure"


class CallerTask:
    """Finds the task running the caller: ``asyncio.current_task()``, faster.

    ``asyncio.current_task()`` finds the running loop first, which costs a ``getpid()``
    system call on CPython 3.11 (a few hundred ns, most of what a ``Timeout`` costs). The
    task running on the loop found last, asked of that loop, is the caller's when that
    loop runs in this thread: one loop runs per thread at a time, and a coroutine runs in
    a task of the loop running its thread. Otherwise the full lookup, which ``loop``
    (the loop of the task found last) and ``thread`` then follow.
    """

    __slots__ = ("loop", "thread")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = 0  # threading.get_ident() of the thread ``loop`` ran in

    def find(self) -> asyncio.Task[Any] | None:
        """The task running the caller; ``None`` outside of a task, and ``RuntimeError``
        with no running loop, as ``asyncio.current_task()``."""
        loop = self.loop
        if loop is not None and _get_ident() == self.thread:
            task = task_of(loop)
            if task is not None:
                return task
        task = _current_task()
        if task is not None:
            self.loop, self.thread = task.get_loop(), _get_ident()
        return task


_current_task = asyncio.current_task
_get_ident = threading.get_ident


def _task_lookup(
    current: Callable[..., asyncio.Task[Any] | None],
) -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]:
    """``current(loop)`` (``current`` is ``asyncio.current_task``), without a Python frame
    where it has one: on CPython 3.11 ``asyncio.current_task`` is a Python function of
    ``asyncio.tasks`` returning ``_current_tasks.get(loop)`` from that module's table (the C
    module's, a dict), a frame that costs about 60 ns; from 3.12 on it is in C, used as is."""
    table = getattr(current, "__globals__", {}).get("_current_tasks")
    if getattr(current, "__module__", None) == "asyncio.tasks" and type(table) is dict:
        return table.get
    return current


#: ``asyncio.current_task(loop)``, for a given loop (``_task_lookup``)
task_of = _task_lookup(asyncio.current_task)


def check_store(what: str, store: object, *methods: str) -> Store | None:
    """``None`` or an object with the store primitives ``methods`` (checked by duck typing:
    a policy needs only a few of the ``Store`` protocol's methods)."""
    if store is None:
        return None
    missing = [m for m in methods if not callable(getattr(store, m, None))]
    if missing:
        raise TypeError(
            f"{what} must be a Store (MemoryStore, RedisStore), got {store!r} "
            f"(no {', '.join(missing)})"
        )
    return cast("Store", store)


# --- input checks shared by the policies --------------------------------------------------


def require_async(fn: object, policy: object) -> None:
    """Raise ``TypeError`` unless ``fn`` is an ``async def`` function (or async callable)."""
    if inspect.iscoroutinefunction(fn):
        return
    call = getattr(fn, "__call__", None)  # noqa: B004 - instances with an async __call__
    if call is not None and inspect.iscoroutinefunction(call):
        return
    what = "an async generator function" if inspect.isasyncgenfunction(fn) else "not async"
    raise TypeError(f"{policy!r} protects coroutine functions (async def); {fn!r} is {what}")


def exception_filter(
    what: str, value: object, *, allow_empty: bool = False
) -> Callable[[Exception], bool]:
    """Turn exception types, a tuple of them, or a predicate into a predicate.

    Only ``Exception`` subclasses are accepted: cancellation and other ``BaseException``s are
    never caught by a policy.
    """
    if isinstance(value, type):
        value = (value,)
    if isinstance(value, tuple):
        if not value and not allow_empty:
            raise ValueError(f"{what} must name at least one exception type")
        for t in value:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise TypeError(f"{what} must be exception types or a predicate, got {t!r}")
            if not issubclass(t, Exception):
                raise TypeError(
                    f"{what} may only name Exception subclasses, not {t.__name__} "
                    "(cancellation and exits are never caught)"
                )
        types = value
        if not types:
            return _never
        return lambda exc: isinstance(exc, types)
    if callable(value):
        return cast(Callable[[Exception], bool], value)
    raise TypeError(f"{what} must be exception types or a predicate, got {value!r}")


def _never(exc: Exception) -> bool:
    return False


def check_predicate(what: str, value: object) -> Callable[[Any], bool] | None:
    """``None`` or a callable."""
    if value is None or callable(value):
        return cast(Callable[[Any], bool], value)
    raise TypeError(f"{what} must be a callable or None, got {value!r}")
