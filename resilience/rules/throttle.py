"""Client-side throttling's rule (Google SRE book, "Handling Overload"): refuse locally with a
probability that grows as the backend accepts fewer of the requests sent. Pure."""

from __future__ import annotations

__all__ = ["rejection_probability"]


def rejection_probability(requests: float, accepts: float, k: float) -> float:
    """The SRE book's client-side rejection probability, in [0, 1).

    ``max(0, (requests - k * accepts) / (requests + 1))``: zero while ``k * accepts`` covers
    the requests, approaching 1 only when the backend accepts nothing.
    """
    excess = requests - k * accepts
    if excess <= 0:
        return 0.0
    return excess / (requests + 1)
