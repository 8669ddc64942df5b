"""What waits for the sync engine's next round, and how a round takes it a chunk at a time.

The engine queues here what a round must carry: the breakers with news (in the order they
came), probe reports and lease releases, permits whose grant or return was lost, and the
names to add to the fleet's registry. A round takes the breakers and names queued when it
starts (``take``) and sends them ``CHUNK`` breakers and ``NAMES_PER_CHUNK`` names a pipeline;
what it could not send goes back (``give_back``). Reports, releases and permits are taken by
each chunk as it is built (``take_ops``, ``take_orphans``), so none waits for a round to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .breaker import SharedBreakerCore
    from .primitives import Release, Report

__all__ = ["CHUNK", "NAMES_PER_CHUNK", "Outbox", "Work"]

CHUNK = 50  #: breakers per pipeline: bounds the loop time of one exchange (~1 ms a step)
NAMES_PER_CHUNK = 500  #: names registered per pipeline (one command per registry)

#: a name to register, and whether it is a fleet-wide bulkhead, rate limiter or budget
Name = tuple[str, bool]


@dataclass(slots=True)
class Work:
    """The breakers and names one round carries: those queued when it started, sent a chunk
    at a time (chunk ``n``: the ``n``-th ``CHUNK`` breakers and ``NAMES_PER_CHUNK`` names)."""

    cores: list[SharedBreakerCore]
    names: list[Name]

    def chunks(self) -> int:
        """How many chunks (pipelines) the round takes."""
        return max(1, -(-len(self.cores) // CHUNK), -(-len(self.names) // NAMES_PER_CHUNK))

    def cores_of(self, n: int) -> list[SharedBreakerCore]:
        """The breakers of chunk ``n``."""
        return self.cores[n * CHUNK : (n + 1) * CHUNK]

    def names_of(self, n: int) -> list[Name]:
        """The names registered with chunk ``n``."""
        return self.names[n * NAMES_PER_CHUNK : (n + 1) * NAMES_PER_CHUNK]


class Outbox:
    """The queues of the next round (see the module docstring).

    A name in use is queued for the registry again every ``register_every`` seconds, so
    the registry's lifetime is renewed while any replica uses the name.
    """

    __slots__ = ("_marked", "_ops", "_orphans", "_registered", "_unregistered", "register_every")

    def __init__(self, register_every: float) -> None:
        self.register_every = register_every
        self._marked: dict[SharedBreakerCore, None] = {}  # in the order they came
        self._ops: list[tuple[SharedBreakerCore, Report | Release]] = []
        self._orphans: list[tuple[str, str]] = []  # (policy name, lease) to give back
        self._registered: dict[Name, float] = {}  # when each was last queued
        self._unregistered: dict[Name, None] = {}  # in the order they came

    def mark(self, core: SharedBreakerCore) -> None:
        """``core`` goes with the next round (once, however often it is marked)."""
        self._marked[core] = None

    def add(self, core: SharedBreakerCore, op: Report | Release) -> None:
        """A probe report or a lease release for the next chunk."""
        self._ops.append((core, op))

    def orphan(self, lease_key: str, lease: str) -> None:
        """A permit under policy ``lease_key`` whose grant or return was lost."""
        self._orphans.append((lease_key, lease))

    def register(self, name: str, now: float, *, other: bool) -> bool:
        """Queue ``name`` unless it was queued less than ``register_every`` ago; whether it
        was (a round must then run)."""
        entry = (name, other)
        last = self._registered.get(entry)
        if last is not None and now - last < self.register_every:
            return False
        self._registered[entry] = now
        self._unregistered[entry] = None
        return True

    def forget(self, name: str) -> None:
        """Breaker ``name`` left this replica's memory: registered again when it comes back."""
        self._registered.pop((name, False), None)

    def requeue(self, names: Iterable[Name]) -> None:
        """Names whose registration got no reply: sent again with the next round."""
        self._unregistered.update(dict.fromkeys(names))

    def has_work(self) -> bool:
        """Whether anything waits for a round."""
        return bool(self._marked or self._ops or self._orphans or self._unregistered)

    def take(self) -> Work | None:
        """The breakers and names queued now, for one round (``None``: nothing waits)."""
        if not self.has_work():
            return None
        work = Work(list(self._marked), list(self._unregistered))
        self._marked, self._unregistered = {}, {}
        return work

    def give_back(self, work: Work, n: int) -> None:
        """The chunks of ``work`` from ``n`` on were not sent: they wait for the next round."""
        for core in work.cores[n * CHUNK :]:
            self._marked[core] = None
        for name in work.names[n * NAMES_PER_CHUNK :]:
            self._unregistered[name] = None

    def take_ops(self) -> list[tuple[SharedBreakerCore, Report | Release]]:
        """The probe reports and lease releases queued now."""
        ops, self._ops = self._ops, []
        return ops

    def take_orphans(self) -> list[tuple[str, str]]:
        """The permits to give back queued now."""
        orphans, self._orphans = self._orphans, []
        return orphans

    def clear(self) -> None:
        """In a forked child: nothing the parent queued is the child's to send."""
        self._marked = {}
        self._ops = []
        self._orphans = []
        self._registered = {}
        self._unregistered = {}
