"""Live settings, the same on every store: configure, rollback, history, checks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience import (
    Bulkhead,
    CircuitBreaker,
    ConfigChanged,
    CountWindow,
    MemoryStore,
    Store,
    Timeout,
)
from resilience.store import config as live
from resilience.store.config import MAX_HISTORY

from ..helpers import raises_each

NAME = "svc"


def breaker(store: Store, **kw: object) -> CircuitBreaker:
    options: dict[str, object] = {"open_for": 5.0, "window": CountWindow(50), "minimum_calls": 20}
    options.update(kw)
    return CircuitBreaker(NAME, store=store, **options)  # type: ignore[arg-type]


async def test_configure_reaches_every_policy_of_the_name(store: Store) -> None:
    """A change is a new version that the policies of that name run, and config() shows."""
    events: list[object] = []
    b = breaker(store, listeners=[events.append])
    t = Timeout(1.0, name=NAME)
    first = await store.configure(NAME, open_for=9.0, seconds=0.25)
    second = await store.configure(NAME, failure_ratio=0.25)
    assert second == first + 1
    assert (b.config.open_for, b.config.failure_ratio, t.seconds) == (9.0, 0.25, 0.25)
    state = await store.config(NAME)
    assert state.version == second
    assert state.values == {"open_for": 9.0, "seconds": 0.25, "failure_ratio": 0.25}
    assert state.base["circuit_breaker"]["open_for"] == 5.0
    assert state.base["timeout"] == {"seconds": 1.0}
    assert [c.version for c in state.history] == [second, first]
    assert ":" in state.history[0].origin
    assert state.history[0].rollback_of is None
    changed = [e for e in events if isinstance(e, ConfigChanged)]
    assert [e.version for e in changed] == [first, second]
    assert changed[-1].values["failure_ratio"] == 0.25


async def test_a_bad_value_is_the_constructors_error_and_changes_nothing(store: Store) -> None:
    """A value the constructor refuses is refused with its words; nothing moves."""
    b = breaker(store)
    version = await store.configure(NAME, open_for=7.0)
    for bad, build in [
        ({"open_for": -1}, lambda: breaker(MemoryStore(), open_for=-1)),
        ({"failure_ratio": 2}, lambda: breaker(MemoryStore(), failure_ratio=2)),
        ({"seconds": "x"}, lambda: Timeout("x")),  # type: ignore[arg-type]
        ({"max_concurrent": 0}, lambda: Bulkhead(0)),
    ]:
        with pytest.raises((ValueError, TypeError)) as expected:
            build()
        with pytest.raises(type(expected.value)) as got:
            await store.configure(NAME, **bad)
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        await store.configure(NAME, colour="red")
    with pytest.raises(ValueError, match="larger than the count window"):
        await store.configure(NAME, minimum_calls=60)  # checked against the window in code
    state = await store.config(NAME)
    assert state.version == version
    assert state.values == {"open_for": 7.0}
    assert len(state.history) == 1
    assert b.config.open_for == 7.0
    assert b.config.minimum_calls == 20


async def test_a_change_is_checked_for_every_kind_it_touches(store: Store) -> None:
    """Settings of a kind no replica reported are checked against its constructor's defaults
    even beside settings of a kind reported: a bad one is refused and nothing is written."""
    b = breaker(store)
    for bad in ({"max_concurrent": -5}, {"rate": float("nan")}):
        with pytest.raises(ValueError, match=r"max_concurrent|rate"):
            await store.configure(NAME, open_for=9.0, **bad)
    state = await store.config(NAME)
    assert (state.version, state.values) == (0, {})
    assert await store.configure(NAME, open_for=9.0, max_waiting=2) == 1
    assert b.config.open_for == 9.0


async def test_a_window_changes_size_not_kind_and_starts_anew(store: Store) -> None:
    """A new window size empties the window (and says so); a count window stays one."""
    events: list[object] = []
    b = breaker(store, listeners=[events.append])

    async def fail() -> None:
        raise ValueError("boom")

    await raises_each(3, ValueError, b.call, fail, match="boom")
    assert b.metrics().failures == 3
    await store.configure(NAME, window=30)
    assert b.config.window == CountWindow(30)
    assert b.metrics().calls == 0
    assert [e.note for e in events if isinstance(e, ConfigChanged)] == [
        "its window started anew, empty"
    ]
    with pytest.raises(TypeError, match="kind cannot change live"):
        await store.configure(NAME, window=12.5)


async def test_rollback(store: Store) -> None:
    """rollback() restores the values before the last change, of a version, or of the code."""
    b = breaker(store)
    v1 = await store.configure(NAME, open_for=6.0)
    v2 = await store.configure(NAME, open_for=7.0)
    v3 = await store.rollback(NAME)
    assert v3 == v2 + 1
    assert b.config.open_for == 6.0
    head = (await store.config_history(NAME))[0]
    assert (head.version, head.values, head.rollback_of) == (v3, {"open_for": 6.0}, v1)
    await store.rollback(NAME, version=v2)
    assert b.config.open_for == 7.0
    await store.rollback(NAME, version=0)
    assert b.config.open_for == 5.0
    assert (await store.config(NAME)).values == {}
    with pytest.raises(ValueError, match="version 99 of 'svc' is not in its history"):
        await store.rollback(NAME, version=99)
    with pytest.raises(ValueError, match="no change to roll back"):
        await store.rollback("other")


async def test_history_is_bounded(store: Store) -> None:
    """Only the last MAX_HISTORY changes are kept, newest first."""
    for i in range(MAX_HISTORY + 5):
        await store.configure(NAME, seconds=1.0 + i)
    history = await store.config_history(NAME)
    assert len(history) == MAX_HISTORY
    assert history[0].version == MAX_HISTORY + 5
    assert history[-1].version == 6


async def test_a_policy_built_later_runs_the_current_values(
    store: Store, replica: Callable[[], Store]
) -> None:
    """A breaker (and a timeout) built after a change start with the values in force."""
    breaker(store)
    await store.configure(NAME, open_for=8.0, seconds=0.5)
    other = replica()
    late = breaker(other)
    await other.sync()
    assert late.config.open_for == 8.0
    assert Timeout(1.0, name=NAME).seconds == 0.5


async def test_declared_defaults_sit_between_code_and_live_changes(store: Store) -> None:
    """configure_from's values apply to policies built after; a live change goes over them."""
    live.configure_from({NAME: {"open_for": 3.0, "half_open_calls": 2}})
    with pytest.raises(ValueError, match="open_for must be finite"):
        live.configure_from({NAME: {"open_for": 0}})
    b = breaker(store)
    assert (b.config.open_for, b.config.half_open_calls) == (3.0, 2)
    await store.configure(NAME, open_for=4.0)
    assert (b.config.open_for, b.config.half_open_calls) == (4.0, 2)
    await store.rollback(NAME)
    assert b.config.open_for == 3.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.floats(0.5, 60.0), st.integers(1, 5)),
            st.tuples(st.just("back"), st.integers(0, 12), st.just(0)),
        ),
        max_size=12,
    )
)
def test_any_sequence_leaves_every_policy_on_the_head(ops: list[tuple[str, float, int]]) -> None:
    """Whatever configure/rollback sequence ran, every policy runs code values + the head."""
    live._forget()

    async def run() -> None:
        store = MemoryStore()
        policies = [breaker(store), breaker(MemoryStore())]
        for op, value, calls in ops:
            if op == "set":
                await store.configure(NAME, open_for=value, half_open_calls=calls)
            else:
                history = await store.config_history(NAME)
                versions = [0, *(c.version for c in history)]
                try:
                    await store.rollback(NAME, version=versions[int(value) % len(versions)])
                except ValueError:
                    assert not history
        state = await store.config(NAME)
        for b in [*policies, breaker(MemoryStore())]:
            want = {"open_for": 5.0, "half_open_calls": 1, **state.values}
            assert (b.config.open_for, b.config.half_open_calls) == (
                want["open_for"],
                want["half_open_calls"],
            )

    asyncio.run(run())
    live._forget()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=4).flatmap(
        lambda sizes: st.tuples(
            st.just(sizes),
            st.lists(st.randoms(use_true_random=False), min_size=len(sizes), max_size=len(sizes)),
        )
    )
)
def test_a_replica_runs_the_head_of_the_last_history_and_never_goes_back_in_one(
    case: tuple[list[int], list[random.Random]],
) -> None:
    """Histories one after another (Redis lost the data between them), each history's
    versions heard in any order, some twice: the replica ends on the last history's head,
    and within a history it only ever moves to a newer version."""
    sizes, shuffles = case
    runs: tuple[str, int] = ("", 0)
    for epoch, (size, rng) in enumerate(zip(sizes, shuffles, strict=True)):
        heard = [v for v in range(1, size + 1) for _ in range(rng.randint(1, 2))]
        rng.shuffle(heard)
        for version in heard:
            if live.takes(runs, f"e{epoch}", version):
                assert runs[0] != f"e{epoch}" or version > runs[1]
                runs = (f"e{epoch}", version)
    assert runs == (f"e{len(sizes) - 1}", sizes[-1])
    assert not live.takes(None, "e0", 1)  # a name no policy follows is not kept


async def test_concurrent_changes_are_each_checked_and_kept(store: Store) -> None:
    """Changes made at once get versions of their own; none is lost or written unchecked."""
    changes = [
        {"open_for": 6.0},
        {"seconds": 0.5},
        {"max_concurrent": 3},
        {"failure_ratio": 0.3},
        {"k": 3.0},
    ]
    versions = await asyncio.gather(*(store.configure(NAME, **c) for c in changes))
    assert sorted(versions) == [1, 2, 3, 4, 5]
    state = await store.config(NAME)
    assert state.values == {k: v for c in changes for k, v in c.items()}
    assert [c.version for c in state.history] == [5, 4, 3, 2, 1]
