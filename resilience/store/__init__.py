"""Where policies keep the state that several policy objects (or replicas) share.

A store hands out one ``BreakerCore`` per breaker name, so every ``CircuitBreaker`` with that
name and store shares one state machine, and provides expiring leases (a bounded set of
permits whose holders may die), and the small atomic primitives of the fleet-wide policies
(a GCRA bucket, a token budget, a value cache). ``MemoryStore`` keeps all of it in this
process; ``RedisStore`` shares it. A primitive that cannot reach its backend raises
``StoreUnavailableError``; policies then carry on with local state.
"""

from __future__ import annotations

from .memory import MemoryStore
from .protocol import Store
from .records import PolicyStatus, ReplicaReport

__all__ = ["MemoryStore", "PolicyStatus", "ReplicaReport", "Store"]
