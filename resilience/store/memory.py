"""MemoryStore: the embedded default; state shared by the policy objects of one process."""

from __future__ import annotations

import itertools
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

from ..checks import check_int, check_name, check_seconds
from ..clock import SYSTEM_CLOCK, Clock
from ..rules.breaker import BreakerConfig, BreakerCore
from ..rules.gcra import gcra
from ..states import CircuitState
from . import config
from .base import (
    StoreBase,
    breaker_status,
    check_config,
    check_published,
    check_share,
    check_window,
)
from .config import MAX_HISTORY, ConfigChange, ConfigState, LiveConfig
from .records import (
    HEALTH_PREFIX,
    HEALTH_RESULT,
    MAX_PUBLISHED,
    PolicyStatus,
    lease_kind,
    published_health,
    window_kind,
)
from .wakes import FlightWakes

__all__ = ["MemoryStore"]

logger = logging.getLogger("resilience")
_Parsed = TypeVar("_Parsed")


class _Share(NamedTuple):
    """A holder's share of a limit (``lease_share``)."""

    share: int
    held: int  #: permits in use under it, as last reported
    expires: float
    own_limit: int  #: the holder's own (adaptive) limit, as last reported (0: none)


_PURGE_ABOVE = 1024  # flights and results kept before the expired ones are dropped


class _Cached(NamedTuple):
    """A cached (or published) value."""

    value: bytes
    expires: float


class MemoryStore(LiveConfig, StoreBase):
    """Keeps breaker cores and leases in this process; nothing to connect, nothing to fail.

    Breakers that share a ``MemoryStore`` and a name share one state. ``clock`` times the
    leases (default: the system clock). A breaker no policy object holds any more is kept
    for ``forget_after`` seconds after its name was last asked for, then forgotten, so a
    store behind a client that talks to many hosts does not grow for ever.
    """

    shared = False  #: seen by this process only (policies need no fleet-wide name for it)

    def __init__(self, *, clock: Clock | None = None, forget_after: float = 600.0) -> None:
        self.clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self.degraded = False  # nothing to lose touch with
        self.forget_after = check_seconds("forget_after", forget_after)
        self._breakers: weakref.WeakValueDictionary[str, BreakerCore] = (
            weakref.WeakValueDictionary()
        )
        self._recent: OrderedDict[str, tuple[float, BreakerCore]] = OrderedDict()
        self._leases: dict[str, dict[str, float]] = {}
        self._limits: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._tats: dict[str, float] = {}
        self._budgets: dict[str, float] = {}
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._flights: dict[tuple[str, str], tuple[str, float]] = {}  # -> holder, expiry
        self._landed: dict[tuple[str, str], tuple[str, _Cached]] = {}  # -> holder, value
        self._wakes = FlightWakes()
        self._windows: dict[str, dict[int, list[int]]] = {}  # key -> bucket -> counts
        self._shares: dict[str, dict[str, _Share]] = {}
        self._settle: dict[str, float] = {}  # key -> until when the shares' reports settle
        self._config: dict[str, list[ConfigChange]] = {}  # name -> its changes, newest first

    def breaker(self, name: str, config: BreakerConfig, clock: Clock) -> BreakerCore:
        """The shared core of breaker ``name`` (created on first use)."""
        check_name(name)
        core = self._breakers.get(name)
        if core is None:
            core = self._breakers[name] = BreakerCore(name, config, clock)
        else:
            check_config(core, config)
        now = self.clock.monotonic()
        recent = self._recent
        recent.pop(name, None)
        recent[name] = (now, core)  # held for forget_after from now
        horizon = now - self.forget_after
        while recent:  # O(forgotten): the oldest first
            first, (used, _) = next(iter(recent.items()))
            if used > horizon:
                break
            del recent[first]
        return core

    def names(self) -> list[str]:
        """Names of the breakers and lease keys this store holds."""
        keys = {k for k, _ in self._cache}
        return sorted({*self._breakers, *self._leases, *self._tats, *self._budgets, *keys})

    def _live(self, key: str) -> dict[str, float]:
        leases = self._leases.setdefault(key, {})
        now = self.clock.monotonic()
        for lease, expiry in list(leases.items()):
            if expiry <= now:
                del leases[lease]
        return leases

    async def acquire_lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        """Take a permit under ``key`` if fewer than ``limit`` are held."""
        check_name(key, "key")
        check_int("limit", limit)
        check_seconds("ttl", ttl)
        leases = self._live(key)
        self._limits[key] = limit
        if len(leases) >= limit:
            return None
        lease = str(next(self._ids))
        leases[lease] = self.clock.monotonic() + ttl
        return lease

    async def release_lease(self, key: str, lease: str) -> bool:
        """Give a permit back; ``False`` if it had already expired."""
        return self._live(key).pop(lease, None) is not None

    async def renew_lease(self, key: str, lease: str, *, ttl: float) -> bool:
        """Extend an unexpired permit to ``ttl`` seconds from now; ``False`` if it expired."""
        check_seconds("ttl", ttl)
        leases = self._live(key)
        if lease not in leases:
            return False
        leases[lease] = self.clock.monotonic() + ttl
        return True

    async def count_leases(self, key: str) -> int:
        """Permits held under ``key`` now."""
        return len(self._live(key))

    async def rate_take(self, key: str, *, interval: float, burst: int) -> float:
        """Take a token from the GCRA bucket ``key``: 0.0 if taken, else seconds to wait."""
        tat, wait = gcra(self._tats.get(key, -math.inf), self.clock.monotonic(), interval, burst)
        self._tats[key] = tat
        return wait

    async def rate_take_many(
        self, key: str, *, interval: float, burst: int, want: int
    ) -> tuple[int, float]:
        """Take up to ``want`` tokens at once from the GCRA bucket ``key``: how many were
        taken, and (none taken) the seconds until one frees up."""
        check_int("want", want)
        now = self.clock.monotonic()
        took, wait = 0, 0.0
        while took < want:
            tat, wait = gcra(self._tats.get(key, -math.inf), now, interval, burst)
            if wait > 0.0:
                break
            self._tats[key] = tat
            took += 1
        return took, 0.0 if took else wait

    async def budget_add(self, key: str, *, delta: float, maximum: float, ttl: float) -> float:
        """Add ``delta`` to the token count ``key`` (starting full), clamped to [0, maximum]."""
        tokens = min(maximum, max(0.0, self._budgets.get(key, maximum) + delta))
        self._budgets[key] = tokens
        return tokens

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
        """``holder``'s share of ``limit`` under ``key``: at most what the others leave free
        (each counted as the larger of its share and its permits in use, at most ``limit``);
        see ``Store.lease_share`` for ``cap``, ``had`` and ``settle``."""
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
        check_seconds("ttl", ttl)
        had = min(had, limit)
        settle = check_seconds("settle", settle, zero=True)
        now = self.clock.monotonic()
        horizon = now + ttl + 1.0  # an entry further ahead is garbage (the clock stepped back)
        shares = self._shares.setdefault(key, {})
        lost = False
        for who, entry in list(shares.items()):
            if entry.expires <= now or entry.expires > horizon:
                lost = lost or entry.expires > horizon
                del shares[who]
        settling = self._settle.get(key, -math.inf)
        if settling > horizon:
            lost = True
        settling = now < settling <= horizon
        mine = shares.get(holder)
        if (lost or (had and mine is None)) and not settling and settle:
            self._settle[key] = now + settle
            settling = True
        others = in_use = 0
        for who, entry in shares.items():
            if who != holder:
                others += min(max(entry.share, entry.held), limit)
                in_use += min(entry.held, limit)
        keep = max(had, 0 if mine is None else min(mine.share, limit))
        grant = min(want, limit - others)
        if cap < limit:
            grant = min(grant, max(keep, cap - others))
        if settling:
            grant = min(grant, keep)
        grant = max(0, grant)
        if grant == 0 and held == 0:
            shares.pop(holder, None)
        else:
            shares[holder] = _Share(grant, held, now + ttl, own_limit)
        self._limits[key] = limit
        return grant, in_use + held, others

    async def window_add(
        self, key: str, deltas: Sequence[int], *, window: float, buckets: int = 10
    ) -> tuple[int, ...]:
        """Add ``deltas`` to the current bucket of the sliding window ``key`` and return the
        window's totals, one per figure."""
        counts = check_window(key, deltas, window, buckets)
        epoch = math.floor(self.clock.monotonic() * buckets / window)
        kept = self._windows.setdefault(key, {})
        for old in [b for b in kept if b <= epoch - buckets]:
            del kept[old]
        bucket = kept.setdefault(epoch, [0] * len(counts))
        if len(bucket) < len(counts):
            bucket.extend([0] * (len(counts) - len(bucket)))
        for i, d in enumerate(counts):
            bucket[i] += d
        return tuple(sum(b[i] for b in kept.values() if i < len(b)) for i in range(len(counts)))

    async def cache_get(self, key: str, item: str) -> bytes | None:
        """The value cached under ``item`` for ``key`` (``None`` if absent or expired)."""
        entry = self._cache.get((key, item))
        if entry is None:
            return None
        if entry.expires <= self.clock.monotonic():
            del self._cache[(key, item)]
            return None
        return entry.value

    async def cache_set(self, key: str, item: str, value: bytes, *, ttl: float) -> None:
        """Cache ``value`` under ``item`` for ``key`` for ``ttl`` seconds."""
        check_seconds("ttl", ttl)
        self._cache[(key, item)] = _Cached(bytes(value), self.clock.monotonic() + ttl)

    async def publish(self, key: str, item: str, value: bytes, *, lease: str, ttl: float) -> bool:
        """Publish ``value`` under ``item`` of ``key`` for ``ttl`` seconds, only while
        ``lease`` (taken under ``key``) is held; ``False``: it is not, nothing was written."""
        check_published(key, value)
        check_seconds("ttl", ttl)
        if lease not in self._live(key):
            return False
        self._cache[(key, item)] = _Cached(bytes(value), self.clock.monotonic() + ttl)
        return True

    async def flight_join(
        self, key: str, item: str, *, holder: str, awaited: str, ttl: float
    ) -> tuple[str, bytes | None]:
        """What ``awaited`` published for flight ``item`` of ``key``, if it did; else the
        holder of the flight's lease (``holder``'s for ``ttl`` seconds if it was free)."""
        current = self._holder(key, item, holder, ttl)
        landed = self._landed.get((key, item))
        now = self.clock.monotonic()
        if awaited and landed is not None and landed[0] == awaited and landed[1].expires > now:
            return awaited, landed[1].value
        if current is not None:
            return current, None
        self._flights[(key, item)] = (holder, now + ttl)
        return holder, None

    async def flight_renew(self, key: str, item: str, *, holder: str, ttl: float) -> bool:
        """Extend ``holder``'s lease on flight ``item`` by ``ttl`` from now; ``False`` if it
        no longer held it."""
        if self._holder(key, item, holder, ttl) != holder:
            return False
        self._flights[(key, item)] = (holder, self.clock.monotonic() + ttl)
        return True

    async def flight_land(
        self, key: str, item: str, *, holder: str, value: bytes | None, ttl: float
    ) -> bool:
        """As ``holder``, publish ``value`` (``None``: nothing) for flight ``item`` for
        ``ttl`` seconds and free its lease; ``False`` if it no longer held it."""
        if value is not None:
            check_published(key, value)
        if self._holder(key, item, holder, ttl) != holder:
            return False
        del self._flights[(key, item)]
        if value is not None:
            expires = self.clock.monotonic() + ttl
            self._landed[(key, item)] = (holder, _Cached(bytes(value), expires))
        self._wakes.wake(f"{key}\n{item}")
        return True

    async def flight_wait(self, key: str, item: str, *, longest: float) -> None:
        """Return when flight ``item`` of ``key`` lands or is given back, or after
        ``longest`` seconds."""
        check_seconds("longest", longest)
        await self._wakes.wait(f"{key}\n{item}", self.clock, longest)

    def _holder(self, key: str, item: str, holder: str, ttl: float) -> str | None:
        """The holder of flight ``item``'s lease now (``None``: free); expired flights and
        results are dropped here, so memory follows the flights in use."""
        check_name(key, "key")
        check_name(holder, "holder")
        check_seconds("ttl", ttl)
        now = self.clock.monotonic()
        if len(self._flights) + len(self._landed) > _PURGE_ABOVE:
            self._flights = {k: v for k, v in self._flights.items() if v[1] > now}
            self._landed = {k: v for k, v in self._landed.items() if v[1].expires > now}
        lease = self._flights.get((key, item))
        if lease is None or lease[1] > now:
            return None if lease is None else lease[0]
        del self._flights[(key, item)]
        return None

    async def read_published(
        self, key: str, item: str, parse: Callable[[bytes], _Parsed]
    ) -> _Parsed | None:
        """What was published under ``item`` of ``key``, as ``parse`` makes it (``None``:
        nothing); a value too long or that ``parse`` rejects is deleted (and logged)."""
        raw = await self.cache_get(key, item)
        if raw is None:
            return None
        try:
            if len(raw) <= MAX_PUBLISHED:
                return parse(raw)
        except Exception as exc:  # written by someone else (cache_set): removed
            logger.debug("published value under %r does not parse: %r", key, exc)
        logger.warning("unparsable data published under %r, %r was reset", key, item)
        del self._cache[(key, item)]
        return None

    async def status(self) -> list[PolicyStatus]:
        """Breakers, lease keys, rate buckets and budgets held here."""
        now = self.clock.monotonic()
        cores = list(self._breakers.values())
        out = [breaker_status(core, now, probes=len(core._probes)) for core in cores]
        results = {  # fleet-wide health checks' published results, while they live
            key: published_health(entry.value)
            for (key, item), entry in self._cache.items()
            if item == HEALTH_RESULT and key.startswith(HEALTH_PREFIX) and entry.expires > now
        }
        for key in sorted({*self._leases, *self._shares, *results}):
            live = [e for e in self._shares.get(key, {}).values() if e.expires > now]
            own = sum(e.own_limit for e in live)
            healthy, error, seq = results.get(key) or (None, None, None)
            out.append(
                PolicyStatus(
                    name=key,
                    kind=lease_kind(key),
                    in_flight=len(self._live(key)) + sum(e.held for e in live),
                    limit=self._limits.get(key),
                    adaptive_limit=own or None,
                    healthy=healthy,
                    health_error=error,
                    health_seq=seq,
                )
            )
        out.extend(
            PolicyStatus(name=key, kind="rate_limiter", backlog=max(0.0, tat - now))
            for key, tat in self._tats.items()
        )
        out.extend(
            PolicyStatus(name=key, kind="retry_budget", tokens=tokens)
            for key, tokens in self._budgets.items()
        )
        for key, kept in self._windows.items():  # as the last window_add left them
            totals = [sum(counts[i] for counts in kept.values() if len(counts) > i) for i in (0, 1)]
            kind, name = window_kind(key)
            out.append(PolicyStatus(name=name, kind=kind, window=(totals[0], totals[1])))
        return out

    async def _config_read(self, name: str) -> ConfigState:
        """Live settings of ``name``: the history this store keeps, the values in code of
        this process's policies."""
        history = self._config.get(name, [])
        head = history[0] if history else None
        version, values = (head.version, head.values) if head else (0, {})
        return ConfigState(version, dict(values), config.bases(name), list(history))

    async def _config_write(
        self,
        name: str,
        expected: int,
        values: config.Values,
        origin: str,
        rollback_of: int | None,
    ) -> int | None:
        """The next version of ``name``'s settings, applied to this process's policies."""
        history = self._config.setdefault(name, [])
        if (history[0].version if history else 0) != expected:
            return None
        change = ConfigChange(expected + 1, dict(values), time.time(), origin, rollback_of)
        history.insert(0, change)
        del history[MAX_HISTORY:]
        config.apply(name, change.version, change.values, origin)
        return change.version

    async def control(self, name: str, state: CircuitState) -> None:
        """Force breaker ``name`` into ``state`` (CLOSED resets it)."""
        core = self._breakers.get(name)
        if core is None:
            raise KeyError(f"no breaker named {name!r} in this store")
        await core.control(state, core.clock.monotonic())

    async def sync(self) -> None:
        """Nothing to synchronise: the state is already here."""

    def __repr__(self) -> str:
        return f"MemoryStore(breakers={len(self._breakers)})"
