"""Shedding by criticality: which requests ``ResilienceMiddleware`` refuses first.

Each request is ``critical``, ``default`` or ``sheddable`` (from its path, or from the
``x-request-criticality`` header). A class may fill only its share of a compartment's
concurrency limit (``SHARES``): a lower class is shed (503) once that many requests are in
flight, so the last slots (and the queue) are kept for the classes above it. With a shared
store the limit is the fleet's, and so are the shares: a lower class is shed once this
replica's requests plus what the other replicas hold reach its share of the fleet's limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from resilience import Bulkhead, FleetShare, StoreUnavailableError
from resilience.checks import check_bool, check_mapping, check_ratio, store_down

from ._deadline import (
    CRITICAL,
    CRITICALITY_HEADER,
    DEFAULT,
    SHEDDABLE,
    check_criticality_map,
    check_deadline_header,
)

__all__ = ["SHARES", "Shedding", "caps", "crowded", "crowded_here"]

SHARES: Mapping[str, float] = {SHEDDABLE: 0.75, DEFAULT: 0.9}
"""The share of the concurrency limit each class may fill; critical requests may fill it all.
The ``default`` share applies only when critical traffic can exist (a ``criticality`` path
marked critical, or ``trust_criticality=True``); otherwise default requests use it all."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Shedding:
    """Which requests ``ResilienceMiddleware`` sheds first when its limit fills up.

    * ``criticality``: ``{path: "critical" | "default" | "sheddable"}`` (the longest match
      wins); paths not listed take the ``criticality_header`` (``None``: ignore it), else
      ``default``. The header may say ``sheddable`` or ``default``; it makes a request
      ``critical`` only with ``trust_criticality=True``. Anything else is ``default``.
    * ``shares``: ``{"sheddable": s, "default": d}``, the share of the concurrency limit a
      class may fill (``SHARES`` for what is not given; ``s <= d``); critical requests may
      fill it all.

    The same options are also ``ResilienceMiddleware``'s own keywords.
    """

    criticality: Mapping[str, str] | None = None
    criticality_header: str | None = CRITICALITY_HEADER
    trust_criticality: bool = False
    shares: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        check_criticality_map(self.criticality)
        check_deadline_header(self.criticality_header, "criticality_header")
        check_bool("trust_criticality", self.trust_criticality)
        _check_shares(self.shares)

    @property
    def paths(self) -> list[tuple[str, str]]:
        """``(path, criticality)`` of ``criticality``, the longest path first."""
        paths = check_criticality_map(self.criticality)
        return sorted(paths.items(), key=lambda item: len(item[0]), reverse=True)

    def class_shares(self) -> dict[str, float]:
        """``{class: share}`` for every class: critical 1; default 1 unless critical
        requests can exist (a path marked critical, or a trusted header) to take the rest."""
        given = {**SHARES, **(self.shares or {})}
        reserve = self.trust_criticality and self.criticality_header is not None
        reserve = reserve or CRITICAL in check_criticality_map(self.criticality).values()
        default = given[DEFAULT] if reserve else 1.0
        return {CRITICAL: 1.0, DEFAULT: default, SHEDDABLE: given[SHEDDABLE]}


def _check_shares(shares: object) -> None:
    """``shares``: a mapping of ``sheddable`` and ``default`` to ratios, sheddable first."""
    if shares is None:
        return
    # critical requests may always fill the whole limit: they have no share
    shares = check_mapping("shares", shares, (SHEDDABLE, DEFAULT))
    for key, value in shares.items():
        check_ratio(f"shares[{key!r}]", value)
    sheddable = shares.get(SHEDDABLE, SHARES[SHEDDABLE])
    default = shares.get(DEFAULT, SHARES[DEFAULT])
    if sheddable > default:
        raise ValueError(
            f"shares['sheddable'] ({sheddable!r}) must not exceed shares['default'] "
            f"({default!r}): sheddable requests are shed first"
        )


def caps(fleet: FleetShare, shares: Mapping[str, float]) -> dict[str, int]:
    """The most permits of the fleet's limit each class may hold (at least one)."""
    return {level: int(share * fleet.limit) or 1 for level, share in shares.items()}


def crowded_here(bulkhead: Bulkhead, share: float) -> bool:
    """Whether a class allowed ``share`` of the limit finds it full on this replica."""
    return bulkhead.in_flight >= (int(share * bulkhead.current_limit) or 1)


async def crowded(bulkhead: Bulkhead, fleet: FleetShare, cap: int, share: float) -> bool:
    """Whether a class allowed ``cap`` permits of the fleet finds them full, after growing
    this replica's share within it (the permit it took is left in the share for the
    bulkhead to take at once). The store down: this replica's own count (``share``)."""
    try:
        if not store_down(fleet.store):
            if not await fleet.take(cap):
                return True
            await fleet.give(True)
            return False
    except StoreUnavailableError:
        pass
    return crowded_here(bulkhead, share)
