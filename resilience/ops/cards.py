"""Figures of the bulkhead, rate limiter and health check cards: what the store's
``status()`` gives, with what this process knows on top. The dashboard shows them on its
cards; ``resilience status`` prints them (``--json``) and a rate limiter's tokens.

A bulkhead's card (``"pool"``): ``active`` (calls holding a permit or a slot), ``queued``
(calls waiting for a slot), ``limit`` and ``rejected`` (calls refused per second). A
fleet-wide one (listed by a shared store) has the fleet's ``active`` and ``limit``; its
``queued`` and ``rejected`` are this process's only (``fleet`` says so), ``None`` when no
bulkhead of that name lives here, or none reports to ``dashboard.calls``. One of this process
only (not in the store) is read from its objects: all four known.

A rate limiter's card (``"bucket"``): its ``rate`` per ``per`` seconds and ``burst``, the
values in code its replicas reported with live values on top (``store.config(name)``, read
every ``SETTINGS_AGE`` seconds), the
``tokens`` available (``burst - backlog / interval``, ``interval = per / rate``, within
``[0, burst]``) and ``refused`` per second (this process's, as for a bulkhead's).

A fleet-wide health check's card (``"result_age"``): the seconds since its runner published
its last result, as this dashboard saw it: the time since its sequence number changed, known
within one update; ``None`` until the dashboard has seen one change (a result it found
already published is of unknown age). Phi is not shared: each replica's detector computes
its own from the results it read. A health check of that name living in this process gives
its ``"suspicion"``: ``{"phi", "threshold", "suspected"}`` as of the snapshot (of the most
suspicious, if several live here); ``None`` for one known only through the store.

Each figure is ``None`` when it is not known: the page says so, never a zero in its place.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from resilience import PolicyStatus, Store
from resilience.policies import health
from resilience.store import config
from resilience.store.config import ConfigStore
from resilience.store.records import HEALTH_PREFIX

from .calls import CallCounts

__all__ = ["SETTINGS_AGE", "Cards"]

#: a rate limiter's settings are read again after this many seconds (a live change of its
#: rate or burst shows on its card within this): a read costs the store about 0.3 ms
SETTINGS_AGE = 5.0

logger = logging.getLogger("resilience.dashboard")


def _here(kind: str) -> dict[str, list[Any]]:
    """This process's policies of ``kind`` alive now, by name."""
    out: dict[str, list[Any]] = {}
    for policy in config.following(kind):
        out.setdefault(policy.name, []).append(policy)
    return out


class _Rates:
    """Per-second growth of running totals between readings at least ``min_gap`` apart (a
    total that went down was reset: it counts from zero)."""

    __slots__ = ("_last", "_rates", "min_gap")

    def __init__(self, min_gap: float) -> None:
        self.min_gap = min_gap
        self._last: dict[str, tuple[float, int]] = {}
        self._rates: dict[str, float | None] = {}

    def rate(self, key: str, total: int | None, now: float) -> float | None:
        """``key``'s rate over the last interval; ``None`` before a second reading, or when
        ``total`` is ``None`` (not known: it starts over)."""
        if total is None:
            self._last.pop(key, None)
            self._rates.pop(key, None)
            return None
        last = self._last.get(key)
        if last is not None and now - last[0] < self.min_gap:
            return self._rates.get(key)
        self._last[key] = (now, total)
        rate = None
        if last is not None:
            grown = total - last[1] if total >= last[1] else total
            rate = round(grown / (now - last[0]), 2)
        self._rates[key] = rate
        return rate

    def forget(self, keep: set[str]) -> None:
        for key in set(self._last) - keep:
            del self._last[key]
            self._rates.pop(key, None)


class Cards:
    """The pool and bucket figures of each snapshot (``calls``: the dashboard's listener)."""

    __slots__ = ("_alive", "_rates", "_results", "_settings", "_suspicion", "calls")

    def __init__(self, calls: CallCounts, min_gap: float) -> None:
        self.calls = calls
        self._rates = _Rates(min_gap)
        #: per health check: its result's sequence number, when this dashboard saw it
        #: first, and whether it saw it change (else its age is not known)
        self._results: dict[str, tuple[int | None, float, bool]] = {}
        self._alive: dict[str, dict[str, list[Any]]] = {}
        self._suspicion: dict[str, dict[str, Any]] = {}
        #: per rate limiter: when its settings were read, and what they were
        self._settings: dict[str, tuple[float, dict[str, Any]]] = {}

    async def look(self, store: Store, policies: list[PolicyStatus], now: float) -> None:
        """Once per snapshot: find this process's bulkheads and rate limiters, and read the
        settings of the rate limiters ``policies`` list, each at most every ``SETTINGS_AGE``
        seconds (all at once: their round trips overlap)."""
        self._alive = {kind: _here(kind) for kind in ("bulkhead", "rate_limiter")}
        self._suspicion = _suspicion(policies)
        listed = {p.name for p in policies if p.kind == "rate_limiter"}
        for name in set(self._settings) - listed:
            del self._settings[name]
        names = sorted(
            n for n in listed if now - self._settings.get(n, (-math.inf, {}))[0] >= SETTINGS_AGE
        )
        found = await asyncio.gather(*(_settings(store, name) for name in names))
        self._settings.update(
            (name, (now, values)) for name, values in zip(names, found, strict=True)
        )

    def reread(self, name: str) -> None:
        """Read ``name``'s settings again at the next snapshot (they were just changed)."""
        self._settings.pop(name, None)

    def local_pools(self, policies: list[PolicyStatus]) -> list[PolicyStatus]:
        """A bulkhead entry for each name of this process's bulkheads that ``policies`` (the
        store's) do not list: a local bulkhead takes nothing from a store."""
        listed = {p.name for p in policies if p.kind == "bulkhead"}
        return [
            PolicyStatus(
                name=name,
                kind="bulkhead",
                in_flight=sum(b.in_flight for b in pools),
                limit=sum(b.current_limit for b in pools),
            )
            for name, pools in sorted(self._alive.get("bulkhead", {}).items())
            if name not in listed
        ]

    def _refused(self, kind: str, name: str, here: list[Any], now: float) -> float | None:
        """Calls refused per second by this process's ``here``, if one reports them."""
        reports = any(self.calls in getattr(p, "_listeners", ()) for p in here)
        total = self.calls.refused(kind, name) if reports else None
        return self._rates.rate(f"{kind}:{name}", total, now)

    def pool(self, policy: PolicyStatus, fleet: bool, now: float) -> dict[str, Any]:
        """A bulkhead's figures; ``fleet``: the store lists it and is shared."""
        here = self._alive.get("bulkhead", {}).get(policy.name, [])
        return {
            "active": policy.in_flight,
            "queued": sum(b.waiting for b in here) if here else None,
            "limit": policy.limit,
            "rejected": self._refused("bulkhead", policy.name, here, now),
            "fleet": fleet,
        }

    def bucket(self, policy: PolicyStatus, now: float) -> dict[str, Any]:
        """A rate limiter's figures: its rate and burst as configured, tokens available."""
        settings = self._settings.get(policy.name, (0.0, {}))[1]
        rate, per, burst = (settings.get(k) for k in ("rate", "per", "burst"))
        tokens = None
        if rate and per and burst and policy.backlog is not None:
            tokens = round(min(burst, max(0.0, burst - policy.backlog * rate / per)), 2)
        here = self._alive.get("rate_limiter", {}).get(policy.name, [])
        return {
            "tokens": tokens,
            "rate": rate,
            "per": per,
            "burst": burst,
            "refused": self._refused("rate_limiter", policy.name, here, now),
        }

    def result_age(self, policy: PolicyStatus, now: float) -> float | None:
        """Seconds since a health check's runner published the result ``policy`` carries,
        known once this dashboard saw its sequence number change; else ``None``."""
        if policy.healthy is None or policy.health_seq is None:
            self._results.pop(policy.name, None)
            return None
        seen = self._results.get(policy.name)
        if seen is None or seen[0] != policy.health_seq:
            seen = self._results[policy.name] = (policy.health_seq, now, seen is not None)
        return round(now - seen[1], 1) if seen[2] else None

    def figures(self, policy: PolicyStatus, now: float, fleet: bool) -> dict[str, Any]:
        """What ``policy``'s entry carries on top of its ``PolicyStatus`` fields, by its kind:
        a bulkhead's ``"pool"``, a rate limiter's ``"bucket"``, a health check's
        ``"result_age"`` and ``"suspicion"``; ``fleet``: a shared store lists it."""
        if policy.kind == "bulkhead":
            return {"pool": self.pool(policy, fleet, now)}
        if policy.kind == "rate_limiter":
            return {"bucket": self.bucket(policy, now)}
        if policy.kind == "health_check":
            return {
                "result_age": self.result_age(policy, now),
                "suspicion": self.suspicion(policy),
            }
        return {}

    def suspicion(self, policy: PolicyStatus) -> dict[str, Any] | None:
        """The phi of this process's health check ``policy`` names, and whether it is
        suspected, as of this snapshot; ``None`` if none lives here."""
        return self._suspicion.get(policy.name)

    def forget(self, keep: set[tuple[str, str]]) -> None:
        """Drop the totals of the policies no longer listed."""
        self._rates.forget({f"{kind}:{name}" for kind, name in keep})
        for name in set(self._results) - {name for kind, name in keep if kind == "health_check"}:
            del self._results[name]


def _suspicion(policies: list[PolicyStatus]) -> dict[str, dict[str, Any]]:
    """By the name ``policies`` list it under: the phi of this process's health check, its
    detector's threshold and whether it is suspected now (the most suspicious, if several
    have that name); each ``None`` when it cannot be computed. No reference to a check is
    kept: they come and go with their owners."""
    listed = {p.name for p in policies if p.kind == "health_check"}
    found: dict[str, tuple[float, dict[str, Any]]] = {}
    for check in health.living():
        key = f"{HEALTH_PREFIX}{check.name}"
        level = _real(_read(check, "phi"))
        rank = -math.inf if level is None or math.isnan(level) else level  # inf: suspected
        if key not in listed or (key in found and rank <= found[key][0]):
            continue
        healthy = _read(check, "healthy")
        figures = {
            "phi": None if level is None else _finite(round(level, 2)),
            "threshold": _finite(_read(check.detector, "threshold")),
            "suspected": None if healthy is None else not healthy,
        }
        found[key] = (rank, figures)
    return {key: figures for key, (_, figures) in found.items()}


def _read(owner: object, figure: str) -> Any:
    """``owner``'s attribute ``figure``, or ``None`` when it cannot be computed (the card
    says "not known"): a detector of one's own may fail, or lose its threshold."""
    try:
        return getattr(owner, figure)
    except Exception as exc:
        logger.debug("dashboard: %s could not be computed: %r", figure, exc)
        return None


def _real(value: object) -> float | None:
    """``value`` if it is a real number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _finite(value: object) -> float | None:
    """``value`` if it is a finite real number, else ``None``."""
    real = _real(value)
    return real if real is not None and math.isfinite(real) else None


async def _settings(store: Store, name: str) -> dict[str, Any]:
    """The rate limiter ``name``'s ``rate``, ``per`` and ``burst`` in code (as its replicas
    reported them) with live values on top; ``{}`` when the store keeps no settings or
    cannot say."""
    if not isinstance(store, ConfigStore):
        return {}
    try:
        state = await store.config(name)
    except Exception as exc:  # the card shows no tokens; the page stays up
        logger.debug("dashboard: settings of %r unreadable: %r", name, exc)
        return {}
    base = state.base.get("rate_limiter")
    if not base:
        return {}
    values = {**base, **{k: v for k, v in state.values.items() if k in ("rate", "burst")}}
    good = all(
        isinstance(values.get(k), int | float) and not isinstance(values.get(k), bool)
        for k in ("rate", "per", "burst")
    )
    return values if good else {}
