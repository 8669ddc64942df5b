"""The sliding windows: running totals equal a naive recount, whatever the sequence."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilience import CountWindow, TimeWindow

outcomes = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=300)


@given(size=st.integers(1, 40), seq=outcomes)
def test_count_window_matches_the_last_n_outcomes(size: int, seq: list[tuple[bool, bool]]) -> None:
    """A count window's totals are those of the last `size` outcomes."""
    w = CountWindow(size).new()
    for i, (failed, slow) in enumerate(seq):
        w.add(failed, slow, 0.0)
        last = seq[max(0, i + 1 - size) : i + 1]
        assert w.calls == len(last)
        assert w.failures == sum(f for f, _ in last)
        assert w.slow == sum(s for _, s in last)


# one outcome (failed, slow), or counts added in a batch (calls, failures)
one = st.tuples(st.just("add"), st.booleans(), st.booleans())
batch = st.tuples(st.just("add_counts"), st.integers(0, 3), st.integers(0, 3))


@given(
    seconds=st.sampled_from([1.0, 2.5, 10.0]),
    buckets=st.integers(1, 12),
    steps=st.lists(st.tuples(st.floats(0, 3, allow_nan=False), one | batch), max_size=120),
)
def test_time_window_matches_a_recount_of_its_buckets(
    seconds: float, buckets: int, steps: list[tuple[float, tuple[str, Any, Any]]]
) -> None:
    """A time window counts exactly what was added in its last `buckets` buckets, one
    outcome at a time or in batches (a bucket may then hold failures and no calls), and
    forgets it when its bucket leaves the window."""
    w = TimeWindow(seconds, buckets).new()
    width = seconds / buckets
    now = 1000.0
    seen: list[tuple[int, int, int, int]] = []  # bucket, calls, failures, slow
    for dt, (how, a, b) in steps:
        now += dt
        if how == "add":
            w.add(a, b, now)
            seen.append((int(now // width), 1, int(a), int(b)))
        else:
            w.add_counts(now, a, b)
            seen.append((int(now // width), a, b, 0))
        head = int(now // width)
        live = [counts for bucket, *counts in seen if bucket > head - buckets]
        assert [w.calls, w.failures, w.slow] == [sum(c[i] for c in live) for i in range(3)]
    w.roll(now + seconds)
    assert (w.calls, w.failures, w.slow) == (0, 0, 0)


def test_time_window_forgets_after_its_span() -> None:
    """Outcomes older than the window drop out when the window is read later."""
    w = TimeWindow(10, 10).new()
    w.add(True, False, 100.0)
    w.add(False, True, 105.0)
    w.roll(109.9)
    assert (w.calls, w.failures, w.slow) == (2, 1, 1)
    w.roll(110.0)
    assert (w.calls, w.failures, w.slow) == (1, 0, 1)
    w.roll(1000.0)
    assert (w.calls, w.failures, w.slow) == (0, 0, 0)


def test_reset_empties_both_windows() -> None:
    """reset() forgets every outcome."""
    for w in (CountWindow(3).new(), TimeWindow(5).new()):
        w.add(True, True, 1.0)
        w.reset()
        assert (w.calls, w.failures, w.slow) == (0, 0, 0)


@pytest.mark.parametrize(
    ("factory", "error"),
    [
        (lambda: CountWindow(0), ValueError),
        (lambda: CountWindow(-1), ValueError),
        (lambda: CountWindow(2.5), TypeError),
        (lambda: CountWindow(True), TypeError),
        (lambda: TimeWindow(0), ValueError),
        (lambda: TimeWindow(float("nan")), ValueError),
        (lambda: TimeWindow(float("inf")), ValueError),
        (lambda: TimeWindow("5"), TypeError),
        (lambda: TimeWindow(5, 0), ValueError),
        (lambda: TimeWindow(5, 1.5), TypeError),
    ],
)
def test_bad_windows_are_refused(factory: object, error: type[Exception]) -> None:
    """Impossible window sizes fail at construction with a clear error."""
    with pytest.raises(error):
        factory()  # type: ignore[operator]


def test_count_window_size_has_an_upper_bound() -> None:
    """A window too large to keep in memory is refused at construction, not by MemoryError."""
    from resilience.rules.windows import MAX_COUNT_WINDOW

    assert CountWindow(MAX_COUNT_WINDOW).size == MAX_COUNT_WINDOW
    for size in (MAX_COUNT_WINDOW + 1, 10**12, 10**400):
        with pytest.raises(ValueError, match="CountWindow size"):
            CountWindow(size)


@pytest.mark.parametrize("seconds", [10**400, -(10**400), float("nan"), 0])
def test_time_window_seconds_out_of_range(seconds: float) -> None:
    """Seconds that are not a finite positive float are a ValueError naming them."""
    with pytest.raises(ValueError, match="TimeWindow seconds"):
        TimeWindow(seconds)
