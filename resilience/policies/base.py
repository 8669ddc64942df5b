"""The Policy protocol, the decorator plumbing shared by every policy, and Pipeline."""

from __future__ import annotations

import functools
import inspect
import operator
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

__all__ = ["BasePolicy", "Pipeline", "Policy"]

P = ParamSpec("P")
T = TypeVar("T")

ExceptionFilter = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


Protected = Callable[..., Awaitable[Any]]

_CACHE_SIZE = 256


@runtime_checkable
class Policy(Protocol):
    """Anything that can run an async callable under protection, and decorate one."""

    name: str

    def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[T]:
        """Run ``fn(*args, **kwargs)`` under this policy; await the result."""

    def __call__(self, fn: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]:
        """Decorate an ``async def`` function."""


class BasePolicy:
    """Shared plumbing: decorator, ``call``, name, listeners, clock.

    A policy writes its logic once, in ``_wrap(fn)``, which returns a coroutine function that
    runs ``fn`` under the policy. Decorating returns that function (one coroutine frame per
    policy, nothing more). ``call(fn, ...)`` is the same function wrapped once around
    ``operator.call`` (which calls ``fn`` in C): after the first use, ``policy.call`` is that
    protected function itself, so the call form costs no frame of its own. A policy whose
    logic depends on which ``fn`` it wraps (a Fallback's cache keys) sets ``_needs_fn`` and
    gets one protected function per ``fn`` from a small cache instead.
    """

    kind: str = "policy"
    name: str
    _listeners: tuple[Listener, ...]
    _needs_fn: bool = False

    def __init__(self, name: str, clock: Clock | None, listeners: Iterable[Listener]) -> None:
        self.name = check_name(name)
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(
                f"clock must provide monotonic(), sleep() and call_later(), got {clock!r}"
            )
        self._clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self._listeners = check_listeners(listeners)
        self._wrapped: dict[object, Protected] = {}
        # ``call`` is an instance attribute from the start (the first call replaces it with
        # the protected function): adding it later would give this instance an attribute
        # layout of its own, and every ``self.x`` read in its hot path would get slower (so
        # would touching ``self.__dict__``)
        self._call: Callable[..., Awaitable[Any]] = self._first_call
        self.call = self._call  # type: ignore[method-assign]

    @property
    def clock(self) -> Clock:
        """The clock this policy reads."""
        return self._clock

    def add_listener(self, listener: Listener) -> None:
        """Add ``listener`` to the callables that receive this policy's events."""
        self._listeners = (*self._listeners, *check_listeners((listener,)))
        self._wrapped.clear()
        self._call = self._first_call  # rebuilt on the next call, with the new listener
        self.call = self._call  # type: ignore[method-assign]

    def _wrap(self, fn: Protected) -> Protected:
        """Return a coroutine function running ``fn`` under this policy."""
        raise NotImplementedError

    def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[T]:
        """Run ``fn(*args, **kwargs)`` under this policy: ``await policy.call(fn, ...)``."""
        # reached only through the class (``BasePolicy.call(policy, fn)``): the instance
        # attribute ``call`` shadows this method
        return self._call(fn, *args, **kwargs)

    def _first_call(self, fn: Protected, /, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """The first ``call``: install the protected call form, then run it."""
        if self._needs_fn:  # one protected function per fn, from a small cache
            try:
                protected = self._wrapped[fn]
            except KeyError:
                protected = self._cache(fn)
            return protected(*args, **kwargs)  # no cast(): this runs on every call
        # from now on ``policy.call`` is this protected function: ``call(fn, *args)`` runs
        # ``fn(*args)`` under the policy through operator.call, with no frame of its own
        run = self._call = self._observed(operator.call)
        self.call = run  # type: ignore[method-assign]
        return run(fn, *args, **kwargs)

    def _cache(self, fn: Protected) -> Protected:
        """``_observed(fn)``, kept for the next ``call(fn)`` (a few hundred functions at most)."""
        if len(self._wrapped) >= _CACHE_SIZE:
            self._wrapped.clear()
        protected = self._wrapped[fn] = self._observed(fn)
        return protected

    def __call__(self, fn: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]:
        """Decorate an ``async def`` function; its name, docstring and signature are kept."""
        require_async(fn, self)
        return cast(Callable[P, Awaitable[T]], functools.wraps(fn)(self._observed(fn)))

    def _observed(self, fn: Protected) -> Protected:
        """``_wrap(fn)``, timed and reported as ``CallFinished`` when a listener wants it.

        Decided once, when wrapping: without listeners wanting ``CallFinished`` from this
        policy (see ``events.select``), this costs nothing per call.
        """
        protected = self._wrap(fn)
        kind, name = self.kind, self.name
        if not any(wants(x, CallFinished, kind, name) for x in self._listeners):
            return protected
        monotonic = self._clock.monotonic

        async def observed(*args: Any, **kwargs: Any) -> Any:
            start = monotonic()
            outcome = "cancelled"
            try:
                result = await protected(*args, **kwargs)
                outcome = "success"
                return result
            except Exception as exc:
                outcome = _outcome(exc)
                raise
            finally:
                if self._listeners:
                    emit(self._listeners, call_finished(name, kind, outcome, monotonic() - start))

        return observed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _outcome(exc: Exception) -> str:
    from ..errors import RejectedError, ResilienceTimeoutError

    if isinstance(exc, RejectedError):
        return "rejected"
    if isinstance(exc, ResilienceTimeoutError):
        return "timeout"
    return "failure"


def wrap_with(policy: Policy, fn: Protected) -> Protected:
    """``policy`` around ``fn``: through ``_observed`` when the policy has one, else ``call``."""
    wrap = getattr(policy, "_observed", None)
    if wrap is not None:
        return cast(Protected, wrap(fn))
    call = policy.call

    async def protected(*args: Any, **kwargs: Any) -> Any:
        return await call(fn, *args, **kwargs)

    return protected


class Pipeline(BasePolicy):
    """Policies applied outermost first: ``Pipeline(a, b, c)`` runs ``a(b(c(fn)))``.

    Nested pipelines are flattened. The recommended order is
    ``Fallback, Retry, CircuitBreaker, RateLimiter, Timeout, Bulkhead``. A ``Timeout`` inside a
    ``Retry`` limits each attempt; one outside limits the whole call, so an attempt timeout
    longer than an overall one is rejected as a mistake. ``listeners`` get one
    ``CallFinished`` per call through the whole pipeline.
    """

    kind = "pipeline"

    def __init__(
        self,
        *policies: Policy,
        name: str = "pipeline",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        super().__init__(name, clock, listeners)
        flat: list[Policy] = []
        for p in policies:
            if getattr(p, "_needs_fn", True):  # unknown policies: assume they do
                self._needs_fn = True
            if isinstance(p, Pipeline):
                flat.extend(p.policies)
            elif isinstance(p, Policy) and not isinstance(p, type):
                flat.append(p)
            else:
                raise TypeError(f"Pipeline takes policy objects, got {p!r}")
        if not flat:
            raise ValueError("Pipeline needs at least one policy")
        _check_order(flat)
        self.policies: tuple[Policy, ...] = tuple(flat)

    def _wrap(self, fn: Protected) -> Protected:
        for policy in reversed(self.policies):
            fn = wrap_with(policy, fn)
        return fn

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(map(repr, self.policies))})"


def _check_order(policies: list[Policy]) -> None:
    """Reject an attempt timeout (inside a Retry) longer than an overall one (outside it)."""
    kinds = [getattr(p, "kind", "") for p in policies]
    if "retry" not in kinds:
        return
    first_retry = kinds.index("retry")
    outer = [p for p, k in zip(policies[:first_retry], kinds, strict=False) if k == "timeout"]
    inner = [p for p, k in zip(policies, kinds, strict=True) if k == "timeout"][len(outer) :]
    if outer and inner:
        overall = min(_seconds(p) for p in outer)
        for p in inner:
            seconds = _seconds(p)
            if seconds > overall:
                raise ValueError(
                    f"the attempt timeout {p!r} ({seconds:g}s, inside Retry) is longer than "
                    f"the overall timeout ({overall:g}s, outside Retry): it can never expire"
                )


def _seconds(policy: Policy) -> float:
    seconds: float = getattr(policy, "seconds")  # noqa: B009 - not part of Policy
    return seconds


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


def store_down(store: object) -> bool:
    """True while a store says it cannot reach its backend (``RedisStore.degraded``).

    Policies then go local at once instead of waiting for each primitive to time out; the
    store reconnects in the background.
    """
    return getattr(store, "degraded", False) is True  # duck-typed stores may lack it


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


def is_shared(store: object) -> bool:
    """Whether ``store`` is seen by other processes (every store but ``MemoryStore``).

    A store may say so itself with a ``shared`` attribute; without one, anything that is not
    a ``MemoryStore`` is taken as shared.
    """
    from ..store.memory import MemoryStore

    shared = getattr(store, "shared", None)
    if isinstance(shared, bool):
        return shared
    return not isinstance(store, MemoryStore)


def check_fleet_name(what: str, name: str, default: str, store: object) -> None:
    """Refuse a fleet-wide policy that keeps its default ``name`` on a shared store.

    Two services on one Redis that both kept ``name="bulkhead"`` would share one limit: a
    spike in one makes the other shed load. A name that says whose limit it is is required.
    """
    if store is not None and name == default and is_shared(store):
        raise ValueError(
            f"{what} on a shared store needs a name of its own (name={default!r} is the "
            f"default, shared by every service on that store): pass name='<service>:<what>'"
        )


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
