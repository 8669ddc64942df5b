"""Reading ``status.lua`` replies (and a replica's own view) into ``PolicyStatus``."""

from __future__ import annotations

from typing import Any

from ..circuit import CLOSED, OPEN, BreakerCore, CircuitState
from ..status import PolicyStatus, ReplicaReport

BY_VALUE = {s.value: s for s in CircuitState}  #: a state as Redis holds it -> CircuitState


def text(value: Any) -> str:
    """A Redis reply item (bytes or a number) as a str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def local_status(core: BreakerCore, now: float) -> PolicyStatus:
    """A breaker as this replica sees it (Redis unreachable)."""
    m = core.metrics(now)
    return PolicyStatus(
        name=core.name,
        kind="circuit_breaker",
        state=m.state,
        generation=m.generation,
        calls=m.calls,
        failures=m.failures,
        slow_calls=m.slow_calls,
        retry_after=m.retry_after,
        local=True,
        opened_by=m.opened_by,
    )


def _opened(counts: tuple[int, ...]) -> tuple[int, int, int] | None:
    if len(counts) == 3 and counts[0]:
        return counts[0], counts[1], counts[2]
    return None


def parse_status(name: str, reply: list[Any]) -> list[PolicyStatus]:
    now = int(reply[0])
    out: list[PolicyStatus] = []
    if int(reply[1]):
        fields = list(reply[14:])
        opened = tuple(int(float(x)) for x in text(reply[13]).split())
        replicas = []
        for rid, value in zip(fields[::2], fields[1::2], strict=False):
            parts = text(value).split()
            if len(parts) >= 4:
                at, calls, failures, slow = (float(p) for p in parts[:4])
                replicas.append(
                    ReplicaReport(
                        replica=text(rid),
                        last_seen=max(0.0, (now - at) / 1000),
                        calls=int(calls),
                        failures=int(failures),
                        slow_calls=int(slow),
                    )
                )
        state = BY_VALUE.get(text(reply[2]), CLOSED)
        open_until = int(reply[4])
        out.append(
            PolicyStatus(
                name=name,
                kind="circuit_breaker",
                state=state,
                generation=int(reply[3]),
                calls=int(reply[6]),
                failures=int(reply[7]),
                slow_calls=int(reply[8]),
                retry_after=max(0.0, (open_until - now) / 1000) if state is OPEN else None,
                probes=int(reply[9]),
                opened_by=_opened(opened) if state is OPEN else None,
                replicas=tuple(sorted(replicas, key=lambda r: r.replica)),
            )
        )
    if int(reply[10]) >= 0:
        out.append(PolicyStatus(name=name, kind="bulkhead", in_flight=int(reply[10])))
    if text(reply[11]):
        out.append(PolicyStatus(name=name, kind="rate_limiter"))
    if text(reply[12]):
        out.append(PolicyStatus(name=name, kind="retry_budget", tokens=float(text(reply[12]))))
    return out
