"""Live configuration: settings changed while policies run, on every replica.

Three parts, all process-wide or store-neutral:

* the settings each policy kind lets change (``Schema``), registered by the policies layer
  (this layer may not import a policy): a schema checks a set of values by building what
  the policy's constructor builds, so a bad value fails with the constructor's own error;
* ``check_change``: a change checked against every kind that holds one of its settings,
  on top of the values in code each replica reported (``base``), before any store writes it;
* the registry of the policies of this process that follow live settings (``watch``), and
  ``apply``: a change a store received, given to each policy of that name between calls.

Precedence, lowest first: the values in code, the defaults declared per name
(``configure_from``, or a ``RESILIENCE_CONFIG`` TOML file read when the first policy is
built), the live changes (``Store.configure``). ``LiveConfig`` is the store side both
stores share: ``configure``, ``rollback``, ``config`` and ``config_history`` over two
primitives each store implements (read a name's settings; write a new version if the
current one is still the one read).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tomllib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ..checks import check_name
from ..events import ConfigChanged, emit

__all__ = [
    "MAX_HISTORY",
    "ConfigChange",
    "ConfigState",
    "ConfigStore",
    "LiveConfig",
    "Schema",
    "apply",
    "check_change",
    "check_keys",
    "configure_from",
    "follow",
    "register_schema",
    "takes",
    "watch",
]

logger = logging.getLogger("resilience")

MAX_HISTORY = 50  #: changes kept per name (older ones are dropped)
_CONFLICTS = 8  # a write that lost the race to another writer is tried again this often

Values = dict[str, Any]


class ConfigChange(NamedTuple):
    """One entry of a name's history: the live values in force from ``version`` on."""

    version: int
    values: Values  #: every live override in force after this change (not only the new ones)
    at: float  #: when, in seconds since the epoch (the store's time)
    origin: str  #: who: ``host:pid`` of the process that made it, or what it said it was
    rollback_of: int | None = None  #: a rollback: the version whose values it restored


class ConfigState(NamedTuple):
    """A name's live settings: the head of its history and what replicas run in code."""

    version: int  #: 0: never changed (or rolled back to the values in code)
    values: Values
    base: dict[str, Values]  #: kind -> the values in code, as a replica reported them
    history: list[ConfigChange]  #: newest first, at most ``MAX_HISTORY``
    #: which history: versions count up within one; a store that lost a name's settings
    #: starts another (``RedisStore``: a random id; ``""``: none, or the store's only one)
    epoch: str = ""


class Schema(NamedTuple):
    """The settings of one policy kind that can change live."""

    kind: str
    keys: tuple[str, ...]
    #: ``check(values, base)``: checks a set of values (any subset of ``keys``) by building
    #: what the constructor builds from them, for a policy whose values in code are ``base``
    #: (empty: unknown); raises the constructor's ``ValueError``/``TypeError``
    check: Callable[[Values, Values], object]


class Target(Protocol):
    """A policy following live settings: its kind, name and two methods."""

    kind: str
    name: str
    _listeners: tuple[Any, ...]

    def _live_base(self) -> Values:
        """The values of its live settings in code."""

    def _live_apply(self, values: Values) -> str:
        """Run with ``values`` (every live setting) from the next call on; returns a note
        for the log and the event (say, that a new window started), or ``""``."""


@runtime_checkable
class ConfigStore(Protocol):
    """A store that keeps live settings (``MemoryStore``, ``RedisStore``): what the command
    line and the dashboard use. Not part of ``Store``: a store of your own need not keep
    them."""

    async def configure(self, name: str, *, origin: str | None = None, **values: Any) -> int:
        """Change the settings of every policy ``name`` on every replica; the new version."""

    async def rollback(
        self, name: str, *, version: int | None = None, origin: str | None = None
    ) -> int:
        """Go back to the settings before the last change (or of ``version``)."""

    async def config(self, name: str) -> ConfigState:
        """The live settings of ``name``: version, values, values in code, history."""

    async def config_history(self, name: str) -> list[ConfigChange]:
        """The changes of ``name``, newest first."""


class Sink(Protocol):
    """A shared store: told the names of the policies this process builds."""

    def _config_watch(self, name: str, kind: str, base: Values) -> None:
        """A policy ``name`` of ``kind`` with ``base`` in code follows live settings."""


_schemas: dict[str, Schema] = {}
# name -> the policies following it (weak references in a list: two GC-tracked objects per
# policy, where a WeakSet made seven; a burst of 10,000 breakers is a case)
_targets: dict[str, list[weakref.ref[Any]]] = {}
_live: dict[str, Values] = {}  # name -> the live values last applied
_defaults: dict[str, Values] = {}  # name -> defaults declared without code
_sinks: weakref.WeakSet[Any] = weakref.WeakSet()
_running: weakref.WeakKeyDictionary[Any, Values] = weakref.WeakKeyDictionary()  # what it runs
_state = {"checking": 0, "file_read": 0, "prune_at": 64}


def register_schema(schema: Schema) -> None:
    """Declare the live settings of a policy kind (the policies layer does, at import)."""
    _schemas[schema.kind] = schema


def origin() -> str:
    """This process, as a history entry names it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def _checking() -> Iterator[None]:
    """Objects built to check values are not policies that follow settings."""
    _state["checking"] += 1
    try:
        yield
    finally:
        _state["checking"] -= 1


def _own(kind: str, values: Mapping[str, Any]) -> Values:
    keys = _schemas[kind].keys
    return {k: v for k, v in values.items() if k in keys}


def check_keys(values: Mapping[str, Any]) -> Values:
    """``values`` as a dict if each key is a setting some policy kind lets change, else a
    ``ValueError`` naming the one that is not and the settings that exist."""
    for key in values:
        if not any(key in s.keys for s in _schemas.values()):
            names = ", ".join(sorted({k for s in _schemas.values() for k in s.keys}))
            raise ValueError(f"unknown setting {key!r}: the settings that can change are {names}")
    return dict(values)


def check_change(
    values: Mapping[str, Any], current: Mapping[str, Any], base: Mapping[str, Values]
) -> Values:
    """``values`` on top of ``current`` (the live values) checked for every kind holding one
    of its settings: on top of that kind's values in code (``base``) where a replica
    reported them, else of the constructor's defaults. Raises the constructor's error;
    an unknown setting is a ``ValueError`` naming the settings that exist."""
    changed = check_keys(values)
    merged = {**current, **changed}
    touched = [s for s in _schemas.values() if any(k in s.keys for k in changed)]
    with _checking():
        for schema in touched:
            code = base.get(schema.kind, {})
            schema.check({**code, **_own(schema.kind, merged)}, code)
    return changed


def configure_from(mapping: Mapping[str, Mapping[str, Any]]) -> None:
    """Declare settings per name without code: ``{"payments": {"open_for": 10}}``.

    Each name's values are checked as ``Store.configure`` checks them, all before any is
    kept; they apply to the policies of that name built afterwards, above the values in code
    and below live changes. Calling it again replaces the declarations of the names it gives.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"configure_from takes a mapping of names to settings, got {mapping!r}")
    checked: dict[str, Values] = {}
    for name, values in mapping.items():
        if not isinstance(name, str) or not isinstance(values, Mapping):
            raise TypeError(
                f"configure_from takes names mapped to settings, got {name!r}: {values!r}"
            )
        checked[name] = check_change(values, {}, {})
    _defaults.update(checked)


def _read_file() -> None:
    """The defaults in the TOML file ``RESILIENCE_CONFIG`` names (once per process, once it
    was read whole): one table per name, ``[payments]`` then ``open_for = 10``. A file that
    cannot be read, does not parse or holds a bad value is a ``ValueError`` naming the
    variable and the file, raised again by every policy built, none built without it."""
    if _state["file_read"]:
        return
    path = os.environ.get("RESILIENCE_CONFIG")
    if path:
        try:
            with open(path, "rb") as file:
                configure_from(tomllib.load(file))
        except (OSError, TypeError, ValueError) as exc:
            raise ValueError(f"RESILIENCE_CONFIG={path!r}: {exc}") from exc
    _state["file_read"] = 1


def watch(target: Target) -> Values | None:
    """``target`` follows live settings; the values it must run with now (defaults declared
    for its name and the live values this process knows, on top of its values in code), or
    ``None`` if there are none. Shared stores of this process learn its name."""
    if _state["checking"]:
        return None
    _read_file()
    name, kind = target.name, target.kind
    if name not in _targets and len(_targets) >= _state["prune_at"]:
        _prune()
    _targets.setdefault(name, []).append(weakref.ref(target))
    base = target._live_base()
    for sink in _sinks_of(target):
        sink._config_watch(name, kind, base)
    overrides = {**_own(kind, _defaults.get(name, {})), **_own(kind, _live.get(name, {}))}
    return {**base, **overrides} if overrides else None


def follow(target: Target) -> None:
    """``target`` (a policy, at the end of its constructor) follows live settings, and runs
    at once with those declared or changed for its name."""
    values = watch(target)
    if values is not None:
        try:
            target._live_apply(values)
        except (TypeError, ValueError) as exc:
            logger.error("%s %r refused settings: %s", target.kind, target.name, exc)
            return
        _running[target] = values


def add_sink(sink: Sink) -> None:
    """A shared store: told of the policies following settings, built before or after, that
    use it or no shared store at all."""
    _sinks.add(sink)
    for name in list(_targets):
        for target in _following(name):
            if sink in _sinks_of(target):
                sink._config_watch(name, target.kind, target._live_base())


def _sinks_of(target: Target) -> list[Any]:
    """The shared stores ``target`` reads its settings from: its own, if it uses one (a
    breaker's, a fleet-wide bulkhead's or limiter's, ...), else every one of this process."""
    store = getattr(target, "store", None)
    if store is None:  # a retry's budget holds its store
        store = getattr(getattr(target, "budget", None), "store", None)
    if store is not None and store in _sinks:
        return [store]
    return list(_sinks)


def _following(name: str) -> list[Any]:
    """The policies alive that follow ``name`` (the references to those gone are dropped)."""
    refs = _targets.get(name)
    if not refs:
        return []
    alive = [t for t in (ref() for ref in refs) if t is not None]
    if len(alive) < len(refs):
        refs[:] = [ref for ref in refs if ref() is not None]
    return alive


def _prune() -> None:
    """Forget the names no policy follows any more (amortised: when their number doubled),
    so a process that makes policies per key (per origin, per host) stays bounded."""
    for name in list(_targets):
        if not _following(name):
            del _targets[name]
    _state["prune_at"] = max(64, 2 * len(_targets))


def followed(name: str) -> bool:
    """Whether a policy of this process follows ``name``."""
    return bool(_following(name))


def following(kind: str) -> list[Any]:
    """The policies of ``kind`` alive in this process that follow live settings (all do)."""
    return [t for name in list(_targets) for t in _following(name) if t.kind == kind]


def bases(name: str) -> dict[str, Values]:
    """The values in code of the policies ``name`` of this process, by kind."""
    return {t.kind: t._live_base() for t in _following(name)}


def apply(name: str, version: int, values: Values, origin: str = "") -> None:
    """Live ``values`` (version ``version``) for every policy ``name`` of this process:
    each runs, from its next call on, its values in code with the declared defaults and
    ``values`` on top. A policy whose values do not change is left alone; one that refuses
    them keeps what it had (logged)."""
    _live[name] = dict(values)
    for target in _following(name):
        kind = target.kind
        run = {
            **target._live_base(),
            **_own(kind, _defaults.get(name, {})),
            **_own(kind, values),
        }
        if run == _running.get(target, target._live_base()):
            continue
        try:
            note = target._live_apply(run)
        except (TypeError, ValueError) as exc:
            logger.error("%s %r refused settings version %d: %s", kind, name, version, exc)
            continue
        _running[target] = run
        logger.info(
            "%s %r runs settings version %d from %s: %s%s",
            kind,
            name,
            version,
            origin or "?",
            run,
            f" ({note})" if note else "",
        )
        if target._listeners:
            event = ConfigChanged(
                name=name, policy=kind, version=version, values=run, origin=origin, note=note
            )
            emit(target._listeners, event)


def takes(runs: tuple[str, int] | None, epoch: str, version: int) -> bool:
    """Whether a replica that runs version ``runs[1]`` of history ``runs[0]`` (``None``: no
    policy of it follows the name) takes version ``version`` of history ``epoch``: one of
    another history, whatever its version (the store lost the settings and a change started
    another, from 1 again), or a newer one of the same; never an older one of it."""
    return runs is not None and (epoch != runs[0] or version > runs[1])


def live(name: str) -> Values | None:
    """The live values this process last applied for ``name``, if it keeps any."""
    return _live.get(name)


def forget(name: str) -> None:
    """A shared store stopped following ``name`` (no policy of it is left): its live values
    are not kept; the store reads them again when a policy of that name is built."""
    _live.pop(name, None)


def _forget() -> None:
    """Forget every declaration, live value and policy following them (tests: the policies
    of a test that ended are not followers of the next one's names)."""
    _live.clear()
    _defaults.clear()
    _targets.clear()
    _running.clear()
    _state["prune_at"] = 64
    _state["file_read"] = 0


class LiveConfig:
    """``configure``, ``rollback``, ``config`` and ``config_history`` for a store, over its
    two primitives ``_config_read`` and ``_config_write``."""

    __slots__ = ()

    async def _config_read(self, name: str) -> ConfigState:
        raise NotImplementedError

    async def _config_write(
        self, name: str, expected: int, values: Values, origin: str, rollback_of: int | None
    ) -> int | None:
        """Write ``values`` as the next version if ``expected`` is still the current one
        (the new version, else ``None``), keep it in the history and tell every replica."""
        raise NotImplementedError

    async def config(self, name: str) -> ConfigState:
        """The live settings of ``name``: version, values, values in code, history."""
        return await self._config_read(check_name(name))

    async def config_history(self, name: str) -> list[ConfigChange]:
        """The changes of ``name``, newest first (at most ``MAX_HISTORY``)."""
        return (await self.config(name)).history

    async def configure(self, name: str, *, origin: str | None = None, **values: Any) -> int:
        """Change settings of every policy ``name`` on every replica; the new version.

        The values are checked as the policies' constructors check them, on top of the live
        values and of the values in code replicas reported: a bad one raises the
        constructor's error and changes nothing anywhere. ``origin`` names who made the
        change in the history (default: ``host:pid``)."""
        if not values:
            raise ValueError("configure needs at least one setting: configure(name, key=value)")
        return await self._change(name, values, origin, None)

    async def rollback(
        self, name: str, *, version: int | None = None, origin: str | None = None
    ) -> int:
        """Go back to the values before the last change (or those of ``version``; 0: the
        values in code) as a new version, which it returns."""
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 0
        ):
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        return await self._change(name, None, origin, version)

    async def _change(
        self, name: str, values: Values | None, who: str | None, back_to: int | None
    ) -> int:
        check_name(name)
        for _ in range(_CONFLICTS):
            state = await self._config_read(name)
            rollback_of = None
            if values is None:
                rollback_of, new = _rollback_target(name, state, back_to)
                check_change(new, {}, state.base)
            else:
                new = {**state.values, **check_change(values, state.values, state.base)}
            version = await self._config_write(
                name, state.version, new, who or origin(), rollback_of
            )
            if version is not None:
                return version
        raise RuntimeError(f"settings of {name!r} kept changing under this change: try again")


def _rollback_target(name: str, state: ConfigState, version: int | None) -> tuple[int, Values]:
    """The version a rollback goes back to, and its values."""
    history = state.history
    if version is None:
        if not history:
            raise ValueError(f"{name!r} has no change to roll back")
        if len(history) == 1:
            return 0, {}
        return history[1].version, history[1].values
    if version == 0:
        return 0, {}
    for change in history:
        if change.version == version:
            return version, change.values
    raise ValueError(f"version {version} of {name!r} is not in its history")
