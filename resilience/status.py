"""What status tools read: every policy a store knows, with its state and figures.

The records (``PolicyStatus``, ``ReplicaReport``) are defined with the Store protocol in
``resilience.store.protocol`` and re-exported here.
"""

from __future__ import annotations

from .store.protocol import PolicyStatus, ReplicaReport, Store

__all__ = ["PolicyStatus", "ReplicaReport", "status"]


async def status(store: Store) -> list[PolicyStatus]:
    """Every policy ``store`` knows (fleet-wide for a shared store), sorted by name and kind."""
    return sorted(await store.status(), key=lambda s: (s.name, s.kind))
