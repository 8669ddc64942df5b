"""GCRA, the generic cell rate algorithm: a rate limit with bursts, in one float of state.

Pure: the caller keeps the state (the theoretical arrival time) and passes ``now``. The
``RateLimiter`` policy, ``MemoryStore`` and the Redis store's script all apply this rule.
"""

from __future__ import annotations

__all__ = ["EPSILON", "gcra"]

EPSILON = 1e-9  #: seconds: waits shorter than this are rounding, not a refusal


def gcra(tat: float, now: float, interval: float, burst: int) -> tuple[float, float]:
    """One take from a GCRA bucket: ``(new_tat, 0.0)`` if allowed, else ``(tat, retry_after)``.

    ``tat`` is the theoretical arrival time; a call is allowed while it is less than
    ``burst - 1`` intervals ahead of ``now``. A ``tat`` more than ``burst`` intervals ahead
    (no take leaves it there) is the clock stepped back: the bucket is held empty until the
    clock catches up, neither refilled nor closed for as long as the step.
    """
    full = now + burst * interval
    if tat > full:
        tat = full
    base = tat if tat > now else now
    wait = base - now - (burst - 1) * interval
    if wait > EPSILON:
        return tat, wait
    return base + interval, 0.0
