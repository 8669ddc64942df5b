"""RedisStore: breakers (and leases) shared by every replica, without a round trip per call.

How a shared breaker works (docs/shared-state.md has the whole consistency model, and a map
of where each rule lives):

* In the CLOSED state a call asks nothing of Redis. Its outcome feeds the local window and
  rule (a replica's own failures open its breaker at once) and a buffer that the sync engine
  flushes every ``sync_interval``, for the breakers that have news only (pipelines of up to
  50 breakers, the event loop getting its turn between two).
  The flush script merges the outcomes into the shared window and answers with the
  authoritative state and counts; the breaker's core decides, and a trip is a
  compare-and-set script.
* Every transition is published; each replica's subscriber applies it within milliseconds.
* OPEN rejects locally until ``open_until`` (Redis time converted to the local clock). After
  it, a script hands out at most ``half_open_calls`` expiring probe leases fleet-wide.
* When Redis fails, is slow, or answers with an error, the store turns *degraded*: each
  breaker carries on with its local window and state machine, nothing waits on a reconnect,
  nothing raises. The supervisor reconnects with backoff once Redis accepts writes again;
  what a replica learned meanwhile (a local open) is pushed to the fleet first.

The modules, one job each:

* ``store``: ``RedisStore`` (construction, the shared breakers, the primitives of the
  fleet-wide policies, status, control, its life);
* ``breaker``: ``SharedBreakerCore``, the fleet's state mirrored in a replica (it alone
  decides the fleet's transitions for its breaker);
* ``engine``: ``SyncEngine``, when flush rounds run and what a breaker asks of Redis;
  ``rounds``: what a round does (its commands, a chunk at a time, and each reply);
  ``outbox``: what waits for the next round; ``subscriber``: published transitions;
* ``supervisor``: whether Redis can be used now (every call and pipeline bounded; degrade,
  reconnect, health, Cluster nodes, forks);
* ``primitives``: scripts, keys, typed messages and replies (parsed and range-checked once),
  what an error means; ``scripts/*.lua``: the scripts, each with a header (KEYS, ARGV,
  returns);
* ``status``: the fleet's status, read from ``status.lua``.
"""

from __future__ import annotations

from .store import RedisStore

__all__ = ["RedisStore"]
