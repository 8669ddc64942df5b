"""Live settings through Redis: ``RedisStore``'s side of ``resilience.store.config``.

A name's settings are three keys under its hash tag (``config.lua``): the head (version and
values), the history (the last ``MAX_HISTORY`` changes) and the values in code each kind of
policy reported. A change is written only if the head is still the version it was checked
against, and published on the store's channel in the same script: every replica's
subscriber hands it to ``config.apply`` within milliseconds, between calls; nothing is read
on a call's path.

A replica reads the settings of each name its policies follow when it starts listening (its
engine starts, or a policy is built inside a running loop) and again whenever its
subscription is replaced (a message may have been lost meanwhile): one reader task, a
pipeline of ``CONFIG_CHUNK`` names at a time.

Each history has an epoch, a random id the script writes in the head with its first change
(and again once Redis lost the head: versions start at 1 again, in another epoch). A replica
takes a change (pushed, read, or its own write's reply, which may come in any order) if it is
of another epoch than the one it runs, or newer within it: never an older one of the same
history, and always the first change after Redis lost the data, whatever its version (a read
whose reply comes after a change was pushed is made again: which of the two is newer is not
known across two connections; the reply to a replica's own change is taken only if no change
came meanwhile, else its push brings it). A read of a name without settings (Redis lost them)
changes nothing: the replica keeps the last values it had until the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ...clock import Clock, TimerHandle
from .. import config
from ..config import MAX_HISTORY, ConfigChange, ConfigState, LiveConfig, Values
from .primitives import BadReply, is_noscript, number, text

if TYPE_CHECKING:
    from .engine import SyncEngine
    from .supervisor import Command, Supervisor

__all__ = ["RedisConfig", "parse_config", "parse_pushed"]

logger = logging.getLogger("resilience.redis")

_T = TypeVar("_T")

CONFIG_CHUNK = 50  #: names whose settings one pipeline reads
_MIN_TTL_MS = 30 * 86_400_000  # settings outlive an idle month, whatever the store's ttl


def _object(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(text(raw))
    except (ValueError, UnicodeDecodeError):
        raise BadReply(f"unparsable settings {raw!r:.200}") from None
    if not isinstance(value, dict):
        raise BadReply(f"unparsable settings {raw!r:.200}")
    return value


def _change(raw: Any) -> ConfigChange:
    entry = _object(raw)
    try:
        rollback = entry["rollback_of"]
        return ConfigChange(
            version=number(entry["version"]),
            values=dict(entry["values"]),
            at=float(entry["at"]),
            origin=str(entry["origin"]),
            rollback_of=None if rollback is None else number(rollback),
        )
    except (KeyError, TypeError, ValueError):
        raise BadReply(f"unparsable change {raw!r:.200}") from None


def parse_config(reply: Any) -> tuple[bool, ConfigState]:
    """A ``config.lua`` read: whether bad data was found (reset by the script, or skipped
    here), and the name's settings. A reply of the wrong shape is an outage (``BadReply``);
    values, values in code or history entries that do not parse (written by someone else)
    cost only themselves: skipped, and reported, never an outage of the whole store."""
    if not isinstance(reply, list) or len(reply) < 5:
        raise BadReply(f"unexpected reply {reply!r:.200}")
    reset, version, values, epoch, count = reply[:5]
    kinds = number(count)
    flat = reply[5 : 5 + 2 * kinds]
    if len(flat) != 2 * kinds:
        raise BadReply(f"unexpected reply {reply!r:.200}")
    damaged = False

    def parsed(parse: Callable[[Any], _T], raw: Any) -> _T | None:
        nonlocal damaged
        try:
            return parse(raw)
        except BadReply:
            damaged = True
            return None

    bases = {}
    for kind, raw in zip(flat[::2], flat[1::2], strict=True):
        base, name = parsed(_object, raw), parsed(text, kind)
        if base is not None and name is not None:
            bases[name] = base
    history = [c for c in (parsed(_change, raw) for raw in reply[5 + 2 * kinds :]) if c]
    live = parsed(_object, values) if values else {}
    state = ConfigState(number(version), live or {}, bases, history, text(epoch))
    return bool(number(reset)) or damaged, state


def _version(reply: Any) -> tuple[int, str]:
    """A ``config.lua`` "set" reply: the new version and its epoch, or -1 (another writer
    came first)."""
    if not isinstance(reply, list) or not reply:
        raise BadReply(f"unexpected reply {reply!r:.200}")
    version = number(reply[0], -1)
    if version < 0:
        return version, ""
    if len(reply) != 2:
        raise BadReply(f"unexpected reply {reply!r:.200}")
    return version, text(reply[1])


def parse_pushed(data: Any) -> tuple[str, str, int, Values, str]:
    """A change published on the channel: name, epoch, version, values, origin."""
    message = _object(data)
    try:
        name, values, epoch = message["config"], message["values"], message.get("epoch", "")
        if not isinstance(name, str) or not isinstance(values, dict) or not isinstance(epoch, str):
            raise TypeError(name)
        return name, epoch, number(message["version"]), values, str(message["origin"])
    except (KeyError, TypeError, ValueError):
        raise BadReply(f"unparsable change {data!r:.200}") from None


class RedisConfig(LiveConfig):
    """``RedisStore``'s live settings (see the module docstring)."""

    # what RedisStore provides
    engine: SyncEngine
    supervisor: Supervisor
    channel: str
    ttl_ms: int
    _config_runs: dict[str, tuple[str, int]]  # name -> the epoch and version this replica runs
    _config_prune_at: int  # _config_runs is pruned when it grows to this
    _config_waiting: set[str]  # names to read once a loop runs
    _config_tasks: set[asyncio.Task[None]]
    _config_loop: asyncio.AbstractEventLoop | None  # where the store's background work runs
    _config_backoff: float
    _config_again: TimerHandle | None  # reading again after a failed read
    clock: Clock
    _scripts: dict[str, Any]

    def key(self, name: str, suffix: str) -> str:
        raise NotImplementedError

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        raise NotImplementedError

    def _config_start(self) -> None:
        """Listen for changes (``__init__`` calls it once the engine exists)."""
        self._config_runs = {}
        self._config_prune_at = 64
        self._config_waiting = set()
        self._config_tasks = set()
        self._config_backoff = 0.0  # seconds before reading again after a failed read
        self._config_again: TimerHandle | None = None
        subscriber = self.engine.subscriber
        subscriber.on_config = self._config_pushed
        replaced = subscriber.on_replaced

        def on_replaced() -> None:  # a message may have been lost meanwhile: read again
            replaced()
            self._config_waiting.update(self._config_runs)
            self._config_read_waiting()

        subscriber.on_replaced = on_replaced
        self._config_loop: asyncio.AbstractEventLoop | None = None
        self.engine.on_start = self._config_started
        config.add_sink(self)

    async def _config_close(self) -> None:
        """Cancel the reads of settings under way (the store is closing)."""
        tasks, self._config_tasks = self._config_tasks, set()
        if self._config_again is not None:
            self._config_again.cancel()
            self._config_again = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _config_forked(self) -> None:
        """In a forked child: no task of the parent's is ours; its names are read again."""
        self._config_tasks = set()
        self._config_loop = None
        self._config_again = None  # the parent's timer
        self._config_backoff = 0.0
        self._config_waiting.update(self._config_runs)

    def _config_keys(self, name: str) -> list[str]:
        return [self.key(name, s) for s in ("config", "config:log", "config:base")]

    def _config_ttl(self) -> int:
        return max(self.ttl_ms, _MIN_TTL_MS)

    async def _config_call(self, name: str, args: list[Any]) -> ConfigState:
        reply = await self._script("config", self._config_keys(name), args)
        reset, state = self.supervisor.parsed(parse_config, reply)
        if reset:
            self.engine.reset_seen(name, self.key(name, "config"))
        return state

    async def _config_read(self, name: str) -> ConfigState:
        state = await self._config_call(name, ["read"])
        return state._replace(base={**state.base, **config.bases(name)})  # ours are sure

    async def _config_write(
        self, name: str, expected: int, values: Values, origin: str, rollback_of: int | None
    ) -> int | None:
        args = [
            "set",
            expected,
            json.dumps(values),
            json.dumps(origin),
            "" if rollback_of is None else rollback_of,
            self.engine.now_arg(),
            self._config_ttl(),
            MAX_HISTORY,
            self.channel,
            json.dumps(name),
            secrets.token_hex(8),  # the epoch, if this change starts a history
        ]
        before = self._config_runs.get(name)
        reply = await self._script("config", self._config_keys(name), args)
        version, epoch = self.supervisor.parsed(_version, reply)
        if version < 0:
            return None
        if self._config_runs.get(name) == before:  # else its push, in order, brings it
            self._config_adopt(name, epoch, version, values, origin)  # not waiting for it
        return version

    # --- what replicas learn -----------------------------------------------------------------
    def _config_watch(self, name: str, kind: str, base: Values) -> None:
        """A policy of this process follows ``name``: its settings are read (and its values
        in code kept for the checks) now if this store runs on this loop, else once it
        starts (its first use; ``await store.sync()`` at start-up)."""
        runs = self._config_runs
        if name not in runs and len(runs) >= self._config_prune_at:
            for gone in [n for n in runs if not config.followed(n)]:
                del runs[gone]  # no policy follows it: bounded by the names in use
                config.forget(gone)  # its values are read again when one does
            self._config_prune_at = max(64, 2 * len(runs))
        if config.live(name) is None:  # none here (or forgotten): take whatever is read
            runs[name] = ("", 0)
        runs.setdefault(name, ("", 0))
        self._config_waiting.add(name)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop is self._config_loop and not self.engine.subscriber.closed():
            self._config_read_waiting()

    def _config_started(self) -> None:
        """The store's background work started (on the running loop)."""
        self._config_loop = asyncio.get_running_loop()
        self._config_read_waiting()

    def _config_read_waiting(self) -> None:
        """Read the settings of every name waiting (on the running loop), in the one reader
        task: names that come meanwhile (a fleet of policies built at once) join its chunks."""
        if not self._config_waiting or self.engine.subscriber.closed() or self._config_tasks:
            return
        task = asyncio.get_running_loop().create_task(self._config_reader())
        self._config_tasks.add(task)
        task.add_done_callback(self._config_tasks.discard)

    async def _config_reader(self) -> None:
        """Read the waiting names ``CONFIG_CHUNK`` at a time, a pipeline each, one after
        another (a call per name at once floods the store: with thousands of names it ran
        out of connections and timed out into an outage)."""
        waiting = self._config_waiting
        unread: list[str] = []
        try:
            while waiting and not self.engine.subscriber.closed():
                names = [waiting.pop() for _ in range(min(CONFIG_CHUNK, len(waiting)))]
                try:
                    unread += await self._config_fetch(names)
                except Exception as exc:  # Redis away: the replica keeps what it runs
                    logger.debug("settings of %d names not read: %r", len(names), exc)
                    unread += names
                    break
        finally:
            waiting.update(unread)
        if not unread:
            self._config_backoff = 0.0
            return
        # read again after a backoff (0.5 s, doubling up to 30 s), and as soon as the
        # subscription is replaced: a stall that replaces nothing (a busy script, the loop
        # late) left them unread until the next unrelated event
        self._config_backoff = min(30.0, max(0.5, 2 * self._config_backoff))
        if self._config_again is None:
            self._config_again = self.clock.call_later(self._config_backoff, self._config_retry)

    def _config_retry(self) -> None:
        """The backoff after a failed read is over: read the waiting names again."""
        self._config_again = None
        self._config_read_waiting()

    async def _config_fetch(self, names: list[str]) -> list[str]:
        """Report the values in code of ``names``' policies and take their settings if newer,
        in one pipeline (the script loaded first if Redis does not know it); the names whose
        reply was an error or did not parse, to be read again (the others are taken). A name
        that took a change meanwhile (a push) is read again: a reply of another history than
        that change's may be the older one (Redis lost the data between the read and the
        push)."""
        sha = self._scripts["config"].sha
        before = {name: self._config_runs.get(name) for name in names}
        ttl = self._config_ttl()
        commands: list[Command] = []
        owners: list[str] = []  # the name of each command
        for name in names:
            reports = [
                ["base", kind, json.dumps(base, default=repr), ttl]
                for kind, base in config.bases(name).items()
            ]
            for args in reports or [["read"]]:
                commands.append(("evalsha", (sha, 3, *self._config_keys(name), *args)))
                owners.append(name)
        replies = await self.supervisor.send(commands)
        if any(isinstance(r, BaseException) and is_noscript(r) for r in replies):
            await self.supervisor.load_scripts([self._scripts["config"]])
            replies = await self.supervisor.send(commands)
        states: dict[str, ConfigState] = {}
        unread: set[str] = set()  # an error reply, or one that did not parse: only them
        for name, reply in zip(owners, replies, strict=True):
            try:
                if isinstance(reply, Exception):
                    raise reply
                reset, states[name] = self.supervisor.parsed(parse_config, reply)  # the last
            except Exception as exc:
                logger.debug("settings of %r not read: %r", name, exc)
                unread.add(name)
                continue
            if reset:
                self.engine.reset_seen(name, self.key(name, "config"))
        for name in unread:
            states.pop(name, None)
        for name, state in states.items():
            if self._config_runs.get(name) != before[name]:
                self._config_waiting.add(name)
            elif state.history:
                origin = state.history[0].origin
                self._config_adopt(name, state.epoch, state.version, state.values, origin)
        return sorted(unread)

    async def _config_settled(self) -> None:
        """Wait for the reads of settings under way (``sync``)."""
        self._config_read_waiting()
        if self._config_tasks:
            await asyncio.gather(*self._config_tasks, return_exceptions=True)

    def _config_pushed(self, data: Any) -> None:
        """A change published on the channel: applied at once (if newer, see ``_config_adopt``)."""
        try:
            name, epoch, version, values, origin = parse_pushed(data)
        except BadReply:
            logger.warning("ignored an unparsable change on %r: %r", self.channel, data)
            return
        self._config_adopt(name, epoch, version, values, origin)
        with contextlib.suppress(RuntimeError):
            self._config_read_waiting()

    def _config_adopt(
        self, name: str, epoch: str, version: int, values: Values, origin: str
    ) -> None:
        """Run version ``version`` of history ``epoch`` if ``config.takes`` it: of another
        history than the one this replica runs (Redis lost the data and a change started
        another), or newer within it; a push, a read and this replica's own write's reply come
        in any order. A name no policy here follows is not kept: it is read when one is
        built."""
        if not config.takes(self._config_runs.get(name), epoch, version):
            return
        self._config_runs[name] = (epoch, version)
        config.apply(name, version, values, origin)
