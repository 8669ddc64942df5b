"""The states of a circuit breaker: the vocabulary every layer shares (events, rules, stores,
status tools). A base module: it imports nothing."""

from __future__ import annotations

import enum

__all__ = ["CLOSED", "DISABLED", "FORCED_OPEN", "HALF_OPEN", "OPEN", "CircuitState"]


class CircuitState(enum.Enum):
    """The states of a circuit breaker."""

    CLOSED = "closed"  #: calls flow; outcomes are counted
    OPEN = "open"  #: calls are rejected until ``open_until``
    HALF_OPEN = "half_open"  #: a bounded number of probe calls decide: close or re-open
    FORCED_OPEN = "forced_open"  #: rejected until reset by an operator
    DISABLED = "disabled"  #: calls flow, nothing is counted, nothing trips

    def __str__(self) -> str:
        return self.value


CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
FORCED_OPEN = CircuitState.FORCED_OPEN
DISABLED = CircuitState.DISABLED
