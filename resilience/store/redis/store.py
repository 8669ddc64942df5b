"""``RedisStore``: the store whose state every replica shares through Redis.

The class reads in groups: its construction (``from_url`` builds a client with short
timeouts and no retries), the shared breakers, the primitives of the fleet-wide policies
(leases, quota shares, GCRA buckets, retry budgets, sliding windows, cached and published
values: each one script call, its arguments checked first and its reply parsed into a typed
record), status and manual control, and its life (``sync``, ``aclose``, forks, events). Live
settings (``config.py``) and single flights (``flights.py``) are mixins of their own. What
it does in the background is the sync engine's (``engine``); how a shared breaker works is
in the package docstring and docs/shared-state.md.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import itertools
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from ...checks import check_int, check_name, check_seconds
from ...clock import SYSTEM_CLOCK, Clock
from ...errors import StoreUnavailableError
from ...events import Event, Listener, check_listeners, emit
from ...forks import reset_in_child
from ...rules.breaker import BreakerConfig, BreakerCore
from ...states import CLOSED, DISABLED, FORCED_OPEN, CircuitState
from ..base import (
    StoreBase,
    breaker_status,
    check_config,
    check_published,
    check_share,
    check_window,
)
from ..records import MAX_PUBLISHED, PolicyStatus
from .breaker import SharedBreakerCore
from .config import RedisConfig
from .engine import SyncEngine
from .flights import RedisFlights
from .primitives import (
    MAX_TTL,
    SCRIPTS,
    BreakerKeys,
    Transition,
    escape,
    key,
    number,
    parse_gcra_many,
    parse_share,
    parse_string,
    parse_window,
    real,
    script_source,
    text,
    ttl_ms,
)
from .status import read_status
from .supervisor import Supervisor, new_replica_id

__all__ = ["RedisStore"]

logger = logging.getLogger("resilience.redis")

_Parsed = TypeVar("_Parsed")
_MAX_STRING = 512 * 1024 * 1024  # bytes: the longest string Redis holds


def _lean_handshake() -> dict[str, Any]:
    """Client options so a new connection costs one round trip, not four (RESP2, no SETINFO).

    Reconnecting must fit in the store's short timeout while Redis is merely slow.
    """
    options: dict[str, Any] = {"protocol": 2}
    if importlib.util.find_spec("redis.driver_info") is not None:
        options["driver_info"] = None  # newer redis-py: explicit None sends no CLIENT SETINFO
    else:
        options["lib_name"] = options["lib_version"] = None
    return options


def _is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (its pipelines refuse scripts)."""
    try:
        from redis.asyncio.cluster import RedisCluster
    except ImportError:  # pragma: no cover - every supported redis-py has it
        return False
    return isinstance(client, RedisCluster)


def _check_prefix(prefix: object) -> str:
    prefix = check_name(prefix, "prefix")
    if any(c in prefix for c in "{} \t\r\n"):
        raise ValueError(f"prefix must not contain braces or whitespace, got {prefix!r}")
    return prefix


class RedisStore(RedisConfig, RedisFlights, StoreBase):
    """Shares breaker state (and leases) through Redis; see the package docstring.

    ``RedisStore.from_url("redis://...")`` builds its own client with short timeouts and no
    retries; ``RedisStore(client)`` takes any ``redis.asyncio`` client (Cluster and Sentinel
    included) as it is. Keys are ``<prefix>:{<name>}:...``: one hash tag per policy, TTLs on
    all of them (``ttl``). ``sync_interval`` bounds how stale a replica's view of the fleet's
    counts can be; ``strict=True`` writes every outcome before its call returns (concurrent
    outcomes are coalesced). ``timeout`` bounds every Redis call. A breaker unused for
    ``forget_after`` seconds is dropped from this replica's memory (unless a policy object
    still holds it); using its name again reads the fleet's state. ``clock`` replaces Redis
    ``TIME`` (tests). The store starts its background work on first use; use
    ``async with store:`` or ``await store.aclose()`` to end it. A process forked after the
    store was built uses it as a new replica (new id, new connections). Over a
    ``Sentinel.master_for`` client the store asks the sentinels where the primary is once a
    second, and moves to a new one at once.
    """

    shared = True  #: seen by every replica using the same Redis and prefix

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "resilience",
        sync_interval: float = 0.05,
        strict: bool = False,
        timeout: float = 0.25,
        ttl: float = 86_400.0,
        forget_after: float = 600.0,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        self.client = client
        self.prefix = _check_prefix(prefix)
        self.sync_interval = check_seconds("sync_interval", sync_interval)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {strict!r}")
        self.strict = strict
        self.timeout = check_seconds("timeout", timeout)
        ttl = check_seconds("ttl", ttl)
        if ttl > MAX_TTL:
            raise ValueError(f"ttl must be at most {MAX_TTL:,.0f} seconds, got {ttl!r}")
        self.ttl_ms = int(ttl * 1000)
        self.forget_after = check_seconds("forget_after", forget_after)
        self.clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self._listeners = check_listeners(listeners)
        self.replica = new_replica_id()
        self.channel = f"{self.prefix}:events"
        self._owns_client = False
        self._lease_ids = itertools.count(1)
        self._lease_keys: set[str] = set()
        #: shares keys -> (the script's write count last seen, until when it is known)
        self._share_writes: dict[str, tuple[int, float]] = {}
        self._cores: weakref.WeakValueDictionary[str, SharedBreakerCore] = (
            weakref.WeakValueDictionary()
        )
        self._scripts = {n: client.register_script(script_source(n)) for n in SCRIPTS}
        cluster = _is_cluster(client)
        self._cluster = cluster
        self.supervisor = Supervisor(
            client,
            prefix=self.prefix,
            timeout=self.timeout,
            clock=self.clock,
            emit=self._emit,
            health=self._health,
            cluster=cluster,
        )
        self.engine = SyncEngine(
            client=client,
            scripts=self._scripts,
            supervisor=self.supervisor,
            prefix=self.prefix,
            replica=lambda: self.replica,
            sync_interval=self.sync_interval,
            strict=self.strict,
            ttl_ms=self.ttl_ms,
            forget_after=self.forget_after,
            clock=self.clock,
            fake_time=clock is not None,
            cores=self._cores,
            emit=self._emit,
            cluster=cluster,
        )
        self.supervisor.on_degraded = self.engine.wake
        self._flights_start()
        self._config_start()
        reset_in_child(self, store=True)

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 64, **options: Any) -> RedisStore:
        """A store with its own client for ``url``: a short connect timeout, no retries.

        Its pool holds at most ``max_connections``; a call finding them all busy waits for
        one (within the store's ``timeout``) instead of failing, so a burst of fleet-wide
        bulkhead or rate-limit calls queues rather than turning the store degraded. Reads
        and writes have no socket timeout: the store bounds each of its calls by ``timeout``
        itself, and a socket timeout made redis-py run every write as a task of its own
        (``asyncio.wait_for``), a few event-loop turns per command.
        """
        _check_prefix(options.get("prefix", "resilience"))
        timeout = check_seconds("timeout", options.get("timeout", 0.25))
        check_int("max_connections", max_connections, minimum=2)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=RedisRetry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            **_lean_handshake(),
        )
        client = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        store = cls(client, **options)
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        state = "degraded" if self.degraded else "ok"
        return f"RedisStore(prefix={self.prefix!r}, breakers={len(self._cores)}, {state})"

    @property
    def degraded(self) -> bool:
        """True while the store cannot use Redis; policies then run on local state."""
        return self.supervisor.degraded

    @property
    def loop_lag(self) -> float:
        """How late this process's event loop was: the worst measured in the last 10 s
        (seconds; measured by the store's own timers and waits, at no cost per call)."""
        return self.supervisor.loop_lag

    # --- keys ---------------------------------------------------------------------------------
    def key(self, name: str, suffix: str) -> str:
        """The key ``suffix`` of policy ``name``: ``<prefix>:{<escaped name>}:<suffix>``."""
        return key(self.prefix, name, suffix)

    def _cache_key(self, key: str, item: str) -> str:
        return self.key(key, "cache:" + escape(item))

    # --- shared breakers ------------------------------------------------------------------------
    def breaker(self, name: str, config: BreakerConfig, clock: Clock) -> BreakerCore:
        """The shared core of breaker ``name`` in this process (created on first use)."""
        check_name(name)
        core = self._cores.get(name)
        if core is None:
            keys = BreakerKeys.of(self.prefix, name)
            core = SharedBreakerCore(name, config, clock, self.engine, keys)
            self._cores[name] = core
            self.engine.mark(core)  # learn the fleet's state with the next round
            self.engine.wake()
        else:
            check_config(core, config)
        return core

    def names(self) -> list[str]:
        """Policy names used through this store object (``known_names()`` asks the fleet)."""
        return sorted({*self._cores.keys(), *self._lease_keys})

    async def known_names(self) -> list[str]:
        """Every policy name any replica registered under this prefix."""
        return sorted(await self._registry(f"{self.prefix}:names"))

    # --- one script call, for the primitives below ------------------------------------------
    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Script ``name``'s reply on ``keys`` (a Cluster: the node of the first), raw."""
        script = self._scripts[name](keys=keys, args=args)
        return await self.engine.call(script, key=keys[0])

    def _register(self, name: str) -> None:
        """Policy ``name`` (not a breaker) is in use: kept in the fleet's registry."""
        self._lease_keys.add(name)
        self.engine.register(name, other=True)

    async def _registry(self, registry: str) -> list[str]:
        """The names in ``registry`` (one that is not a set is reset and reported)."""
        reply = await self._script("names", [registry], ["read"])
        return self.supervisor.parsed(
            functools.partial(self.engine.read_names, registry=registry), reply
        )

    # --- leases: fleet-wide permits ---------------------------------------------------------------
    async def acquire_lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        """Take one of ``limit`` fleet-wide permits under ``key`` for ``ttl`` seconds."""
        check_name(key, "key")
        check_int("limit", limit)
        lifetime = ttl_ms(ttl)
        lease = f"{self.replica}:{next(self._lease_ids)}"
        keys = [self.key(key, "leases"), self.key(key, "limit")]
        try:
            got = await self._script(
                "lease", keys, ["take", self.engine.now_arg(), lease, limit, lifetime]
            )
        except StoreUnavailableError:
            self.engine.orphan(key, lease)  # it may have been granted: give it back later
            raise
        self._register(key)
        return lease if self.supervisor.parsed(number, got) else None

    async def release_lease(self, key: str, lease: str) -> bool:
        """Give a permit back; ``False`` if it had expired."""
        check_name(key, "key")
        try:
            got = await self._lease(key, "give", lease)
        except StoreUnavailableError:
            self.engine.orphan(key, lease)  # returned as soon as Redis answers
            raise
        return bool(self.supervisor.parsed(number, got))

    async def renew_lease(self, key: str, lease: str, *, ttl: float) -> bool:
        """Extend an unexpired permit to ``ttl`` seconds from now; ``False`` if it expired."""
        check_name(key, "key")
        got = await self._lease(key, "renew", lease, ttl_ms(ttl))
        return bool(self.supervisor.parsed(number, got))

    async def count_leases(self, key: str) -> int:
        """Unexpired permits under ``key``."""
        check_name(key, "key")
        return self.supervisor.parsed(number, await self._lease(key, "count", ""))

    async def _lease(self, key: str, op: str, lease: str, ttl_ms: int = 0) -> Any:
        """``lease.lua`` ``op`` on the permits under ``key`` (no limit: not a take)."""
        args = [op, self.engine.now_arg(), lease, 0, ttl_ms]
        return await self._script("lease", [self.key(key, "leases")], args)

    async def lease_share(
        self,
        key: str,
        holder: str,
        *,
        want: int,
        held: int,
        limit: int,
        ttl: float,
        own_limit: int = 0,
        cap: int | None = None,
        had: int = 0,
        settle: float = 0.0,
    ) -> tuple[int, int, int]:
        """``holder``'s share of the fleet-wide ``limit`` under ``key`` (server time): at
        most what the other holders leave free (``Store.lease_share``; the rule is in
        ``share.lua``). The script counts its writes under the key; this replica sends the
        count it last saw (within a ttl), so a store that went back in time (restarted empty
        or from an old snapshot) settles, whoever asks first. Garbage found under the key is
        deleted and reported
        (``StoreDataReset``)."""
        cap = check_share(
            key,
            holder,
            want=want,
            held=held,
            limit=limit,
            own_limit=own_limit,
            cap=cap,
            had=had,
        )
        settle_ms = int(min(check_seconds("settle", settle, zero=True), MAX_TTL) * 1000)
        self._register(key)
        shares = self.key(key, "shares")
        args = [self.engine.now_arg(), holder, want, held, limit, ttl_ms(ttl), own_limit]
        sent = self.clock.monotonic()
        seen, until = self._share_writes.get(key, (0, sent))
        args += [cap, had, settle_ms, seen if sent < until else 0]
        reply = await self._script("share", [shares, self.key(key, "limit")], args)
        share = self.supervisor.parsed(functools.partial(parse_share, limit=limit), reply)
        # the key outlives its last write by a ttl: a count seen since is the store's memory
        self._share_writes[key] = (share.writes, sent + ttl)
        if share.reset:
            self.engine.reset_seen(key, shares)
        return share.granted, share.in_use, share.others

    # --- counters: GCRA buckets, retry budgets, sliding windows ---------------------------------
    async def rate_take(self, key: str, *, interval: float, burst: int) -> float:
        """Take a token from the fleet's GCRA bucket ``key``: 0.0, or seconds to wait."""
        args = [self.engine.now_arg(), repr(interval * 1000), int(burst)]
        wait_ms = self.supervisor.parsed(real, await self._shared(key, "gcra", *args))
        return wait_ms / 1000

    async def rate_take_many(
        self, key: str, *, interval: float, burst: int, want: int
    ) -> tuple[int, float]:
        """Take up to ``want`` tokens at once from the fleet's GCRA bucket ``key``: how many
        were taken, and (none taken) the seconds until one frees up."""
        check_int("want", want)
        args = [self.engine.now_arg(), repr(interval * 1000), int(burst), want]
        reply = await self._shared(key, "gcra", *args)
        return self.supervisor.parsed(functools.partial(parse_gcra_many, want=want), reply)

    async def budget_add(self, key: str, *, delta: float, maximum: float, ttl: float) -> float:
        """Add ``delta`` to the fleet's token count ``key`` (starting full), clamped."""
        lifetime = ttl_ms(ttl)
        args = [self.engine.now_arg(), repr(float(delta)), repr(float(maximum)), lifetime]
        return self.supervisor.parsed(real, await self._shared(key, "budget", *args))

    async def _shared(self, key: str, op: str, *args: Any) -> str:
        """``shared.lua`` ``op`` on policy ``key``'s key of that name: its reply, without the
        mark of a reset (reported)."""
        check_name(key, "key")
        self._register(key)
        target = self.key(key, op)
        reply = text(await self._script("shared", [target], [op, *args]))
        if reply.startswith("!"):
            self.engine.reset_seen(key, target)
            reply = reply[1:]
        return reply

    async def window_add(
        self, key: str, deltas: Sequence[int], *, window: float, buckets: int = 10
    ) -> tuple[int, ...]:
        """Add ``deltas`` to the current bucket of the fleet's sliding window ``key`` (server
        time) and return the window's totals, one per figure."""
        counts = check_window(key, deltas, window, buckets)
        width_ms = window * 1000 / buckets
        if width_ms < 1:
            raise ValueError(f"window / buckets must be >= 1 ms, got {width_ms!r} ms")
        self._register(key)
        counter = self.key(key, "counts")
        args = [self.engine.now_arg(), repr(width_ms), buckets, ttl_ms(2 * window), *counts]
        reply = await self._script("window", [counter], args)
        counted = self.supervisor.parsed(
            functools.partial(parse_window, figures=len(counts)), reply
        )
        if counted.reset:
            self.engine.reset_seen(key, counter)
        return counted.totals

    # --- values: cached, and published by a lease's holder -------------------------------------
    async def cache_get(self, key: str, item: str) -> bytes | None:
        """The value cached under ``item`` for policy ``key``, or ``None``."""
        check_name(key, "key")
        got = await self._read_string(key, self._cache_key(key, item), _MAX_STRING)
        return None if got is None else bytes(got)

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        """Cache ``value`` under ``item`` for policy ``key`` for ``ttl`` seconds."""
        check_name(key, "key")
        self._register(key)
        lifetime = ttl_ms(ttl)
        cache_key = self._cache_key(key, item)
        await self.engine.call(self.client.set(cache_key, value, px=lifetime), key=cache_key)

    async def publish(self, key: str, item: str, value: bytes, *, lease: str, ttl: float) -> bool:
        """Publish ``value`` under ``item`` of policy ``key`` for ``ttl`` seconds as the holder
        of ``lease`` (taken under ``key``): written only if that lease is held and unexpired,
        checked in the same script (Redis time). ``False``: it is not, nothing was written."""
        check_published(key, value)
        self._register(key)
        keys = [self.key(key, "leases"), self._cache_key(key, item)]
        args = ["publish", self.engine.now_arg(), lease, value, ttl_ms(ttl)]
        return bool(self.supervisor.parsed(number, await self._script("lease", keys, args)))

    async def read_published(
        self, key: str, item: str, parse: Callable[[bytes], _Parsed]
    ) -> _Parsed | None:
        """What the holder of a lease under ``key`` published under ``item``, as ``parse``
        makes it (``None``: nothing). What no holder writes (another type of key, a value too
        long, or one ``parse`` rejects by raising) is deleted and reported
        (``StoreDataReset``), never an outage."""
        check_name(key, "key")
        target = self._cache_key(key, item)
        raw = await self._read_string(key, target, MAX_PUBLISHED)
        if raw is None:
            return None
        try:
            return parse(raw)
        except Exception as exc:  # written by someone else: removed unless rewritten since
            logger.debug("published value under %r does not parse: %r", target, exc)
        await self._script("string", [target], ["drop", raw])
        self.engine.reset_seen(key, target)
        return None

    async def _read_string(self, name: str, key: str, longest: int) -> bytes | None:
        """The string under ``key`` (policy ``name``), or ``None``; another type of key, or a
        string longer than ``longest`` bytes, is deleted by the script and reported."""
        reply = await self._script("string", [key], ["get", longest])
        stored = self.supervisor.parsed(parse_string, reply)
        if stored.reset:
            self.engine.reset_seen(name, key)
        return stored.value

    # --- status and manual control --------------------------------------------------------------
    async def status(self, *, limit: int | None = None) -> list[PolicyStatus]:
        """Every policy any replica registered under this prefix, read from Redis.

        Names are read a chunk per script call (a Cluster: one name per call), a few calls in
        flight at once. ``limit`` reads only the first ``limit`` names, sorted. An entry
        whose data does not parse is listed as damaged; the rest are shown. While Redis
        cannot answer, this replica's own breakers are listed as it sees them
        (``local=True``); with none, ``StoreUnavailableError`` is raised.
        """
        if limit is not None:
            check_int("limit", limit)
        try:
            registered, others = await asyncio.gather(
                self._registry(f"{self.prefix}:names"),
                self._registry(f"{self.prefix}:names:other"),
            )
            names = sorted({*registered, *self._cores.keys(), *self._lease_keys})
            if limit is not None:
                names = names[:limit]
            script = self._scripts["status"]
            others_here = {*others, *self._lease_keys}
            return await read_status(self.engine, script, names, others_here, cluster=self._cluster)
        except StoreUnavailableError:
            cores = list(self._cores.values())
            if not cores:
                raise
            now = self.clock.monotonic()
            return [breaker_status(core, now, local=True) for core in cores]

    async def control(self, name: str, state: CircuitState) -> None:
        """Force breaker ``name`` (known to the fleet) into ``state``, fleet-wide."""
        if state not in (CLOSED, FORCED_OPEN, DISABLED):
            raise ValueError(
                f"a breaker can be forced CLOSED, FORCED_OPEN or DISABLED, not {state}"
            )
        core = self._cores.get(name)
        if core is not None:
            await core.control(state, self.clock.monotonic())
            return
        keys = BreakerKeys.of(self.prefix, name)
        exists = await self.engine.call(self.client.exists(keys.state))
        if not int(exists):
            raise KeyError(f"no breaker named {name!r} under prefix {self.prefix!r}")
        probe = SharedBreakerCore(name, BreakerConfig(), self.clock, self.engine, keys)
        await self.engine.transition(probe, Transition(state, 0, force=True))

    # --- life -------------------------------------------------------------------------------
    async def sync(self) -> None:
        """Flush every buffered outcome and refresh every breaker's state now (and read the
        live settings of the names this process's policies follow, if not read yet)."""
        await self._config_settled()
        self.engine.read_all()
        for _ in range(3):  # a round carries all that waits; what its replies ask, the next
            await self.engine.next_round()
            if self.degraded or not self.engine.has_work():
                break

    async def commit(self) -> None:
        """Strict mode: wait until the outcomes buffered so far are stored."""
        await self.engine.commit()

    def wake(self) -> None:
        """Ask for a flush round now."""
        self.engine.wake()

    async def _health(self) -> Any:
        """Whether Redis runs our scripts and accepts writes (the supervisor's check)."""
        return await self._scripts["health"](keys=[f"{self.prefix}:health"], args=[self.replica])

    def _forked(self) -> None:
        """In a forked child: a new replica (new id, new connections, no inherited tasks)."""
        self.replica = new_replica_id()
        self._share_writes = {}
        self.supervisor.forked()
        self.engine.forked()
        self._config_forked()

    async def aclose(self) -> None:
        """Stop the background tasks (after a last flush) and close an owned client."""
        await self._config_close()
        await self.engine.aclose(self.timeout * 2)
        if self._owns_client:
            self._owns_client = False
            try:
                await self.client.aclose()
            except Exception as exc:  # closing a dead connection: nothing left to do
                logger.debug("closing the redis client: %r", exc)

    async def __aenter__(self) -> RedisStore:
        self.engine.start()
        return self

    # --- events -------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Receive ``StoreDegraded``, ``StoreRecovered``, ``StoreDataReset`` and
        ``SubscriberReplaced`` events."""
        self._listeners = (*self._listeners, *check_listeners((listener,)))

    def _emit(self, event: Event) -> None:
        if self._listeners:
            emit(self._listeners, event)
