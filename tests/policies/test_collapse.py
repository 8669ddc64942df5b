"""Collapse: single calls gathered into one batch call."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience import BatchCalled, Collapse, Pipeline, Retry, Timeout
from resilience.events import Event
from resilience.testing import FakeClock

from ..helpers import advance, cancelled, policy_events, settle, started
from ..test_bad_input import JUNK


class Batches:
    """A batch function that records the key lists it is called with; it answers
    ``{key: key * 10}`` (leaving out the keys in ``missing``) once ``gate`` is open."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.missing: set[Any] = set()
        self.error: Exception | None = None
        self.finished = 0

    async def __call__(self, keys: list[Any]) -> Mapping[Any, Any]:
        self.calls.append(keys)
        await self.gate.wait()
        self.finished += 1
        if self.error is not None:
            raise self.error
        return {key: key * 10 for key in keys if key not in self.missing}


async def test_calls_within_delay_become_one_batch(clock: FakeClock) -> None:
    """Calls arriving within ``delay`` make one batch call; each caller gets its entry."""
    batches = Batches()
    load = Collapse(batches, max_size=10, delay=0.01, clock=clock)
    tasks = [await started(load(k)) for k in (1, 2, 3)]
    assert batches.calls == []
    await advance(clock, 0.01)
    assert batches.calls == [[1, 2, 3]]
    assert await asyncio.gather(*tasks) == [10, 20, 30]


async def test_full_batch_is_sent_at_once(clock: FakeClock) -> None:
    """A batch holding ``max_size`` distinct keys is sent without waiting for ``delay``;
    later calls start the next batch."""
    batches = Batches()
    load = Collapse(batches, max_size=2, delay=1.0, clock=clock)
    tasks = [await started(load(k)) for k in (1, 1, 2, 3)]
    assert batches.calls == [[1, 2]]
    assert await asyncio.gather(*tasks[:3]) == [10, 10, 20]
    await advance(clock, 1.0)
    assert batches.calls == [[1, 2], [3]]
    assert await tasks[3] == 30


async def test_missing_key_fails_only_its_callers(clock: FakeClock) -> None:
    """A key left out of the mapping is a KeyError for its callers; the others get theirs."""
    batches = Batches()
    batches.missing.add(2)
    load = Collapse(batches, max_size=3, delay=1.0, clock=clock)
    results = await asyncio.gather(load(1), load(2), load(3), return_exceptions=True)
    assert results[0] == 10
    assert results[2] == 30
    assert isinstance(results[1], KeyError)
    assert "2" in str(results[1])


async def test_failed_batch_fails_each_caller(clock: FakeClock) -> None:
    """A batch function that raises raises the same error in every caller of the batch."""
    batches = Batches()
    batches.error = ConnectionError("down")
    load = Collapse(batches, max_size=2, delay=1.0, clock=clock)
    results = await asyncio.gather(load(1), load(2), return_exceptions=True)
    assert results[0] is batches.error
    assert results[1] is batches.error


async def test_non_mapping_reply_fails_each_caller(clock: FakeClock) -> None:
    """A batch function that returns something else than a mapping is a TypeError for all."""

    async def wrong(keys: list[int]) -> Any:
        return list(keys)

    load = Collapse(wrong, max_size=2, delay=1.0, clock=clock)
    results = await asyncio.gather(load(1), load(2), return_exceptions=True)
    assert all(isinstance(r, TypeError) for r in results)


async def test_cancelled_caller_does_not_cancel_the_batch(clock: FakeClock) -> None:
    """Cancelling one caller of a sent batch leaves the batch and the other callers alone."""
    batches = Batches()
    batches.gate.clear()
    load = Collapse(batches, max_size=2, delay=1.0, clock=clock)
    first = await started(load(1))
    second = await started(load(2))
    await cancelled(first)
    batches.gate.set()
    assert await second == 20
    assert batches.finished == 1


async def test_batch_without_callers_is_not_sent(clock: FakeClock) -> None:
    """A key whose callers all left before the batch was sent is not asked for, and a
    batch that lost every caller is not sent at all."""
    batches = Batches()
    load = Collapse(batches, max_size=10, delay=1.0, clock=clock)
    gone = await started(load(1))
    kept = await started(load(2))
    await cancelled(gone)
    await advance(clock, 1.0)
    assert await kept == 20
    assert batches.calls == [[2]]
    alone = await started(load(3))
    await cancelled(alone)
    await advance(clock, 1.0)
    assert batches.calls == [[2]]
    assert load.in_flight == 0


async def test_batch_event_reports_size_callers_and_delay(clock: FakeClock) -> None:
    """Each batch sent reports its distinct keys, its callers and how long it gathered."""
    events: list[Event] = []
    load = Collapse(
        Batches(), max_size=10, delay=0.5, clock=clock, name="users",
        listeners=[policy_events(events)],
    )  # fmt: skip
    tasks = [await started(load(k)) for k in (1, 1, 2)]
    await advance(clock, 0.5)
    await asyncio.gather(*tasks)
    assert events == [BatchCalled(name="users", size=2, callers=3, delay=0.5)]


async def test_key_function(clock: FakeClock) -> None:
    """With ``key`` the batch key comes from any arguments; without it, only one is taken."""
    batches = Batches()
    load = Collapse(batches, max_size=2, delay=1.0, clock=clock, key=lambda *, user: user)
    assert await asyncio.gather(load(user=1), load(user=2)) == [10, 20]
    with pytest.raises(TypeError, match="one positional argument"):
        await Collapse(batches, max_size=2, delay=1.0)(1, 2)


async def test_zero_delay_gathers_one_turn_of_the_loop() -> None:
    """``delay=0`` batches the calls made in the same turn of the event loop."""
    batches = Batches()
    load = Collapse(batches, max_size=100, delay=0)
    assert await asyncio.gather(*(load(k) for k in range(5))) == [0, 10, 20, 30, 40]
    assert batches.calls == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_size": 0, "delay": 0.1}, ValueError, "max_size"),
        ({"max_size": 1.5, "delay": 0.1}, TypeError, "max_size"),
        ({"max_size": 2, "delay": -1}, ValueError, "delay"),
        ({"max_size": 2, "delay": 0.1, "key": 1}, TypeError, "key"),
    ],
)
def test_bad_options(options: dict[str, Any], error: type[Exception], match: str) -> None:
    """Bad options are refused at construction, naming the option."""
    with pytest.raises(error, match=match):
        Collapse(Batches(), **options)


def test_sync_batch_function_is_refused() -> None:
    """A batch function that is not async is a TypeError at construction."""
    with pytest.raises(TypeError, match="coroutine functions"):
        Collapse(dict.fromkeys, max_size=2, delay=0.1)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=12),
    st.integers(1, 4),
)
def test_batching_property(calls: list[tuple[int, bool]], max_size: int) -> None:
    """Whatever the keys, the batch size and the cancellations: every caller left gets its
    own key's entry, no batch exceeds ``max_size`` distinct keys or repeats one, and no
    task is left behind."""

    async def main() -> None:
        clock = FakeClock()
        batches = Batches()
        load = Collapse(batches, max_size=max_size, delay=1.0, clock=clock)
        tasks = [asyncio.create_task(load(key)) for key, _ in calls]
        await settle()
        gone = [cancel and task.cancel() for task, (_, cancel) in zip(tasks, calls, strict=True)]
        await advance(clock, 1.0)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome, (key, _), left in zip(outcomes, calls, gone, strict=True):
            if left:
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert outcome == key * 10
        for keys in batches.calls:
            assert 0 < len(keys) <= max_size
            assert len(set(keys)) == len(keys)
        await settle()
        assert load.in_flight == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["max_size", "delay", "key", "name", "clock"]), JUNK, max_size=3
    )
)
def test_any_options_construct_or_raise_value_or_type_error(options: dict[str, Any]) -> None:
    """Collapse fed junk options builds, or raises ValueError / TypeError at construction."""
    try:
        Collapse(Batches(), **{"max_size": 2, "delay": 0.0, **options})
    except (ValueError, TypeError):
        return


async def test_policies_wrap_a_collapser_and_its_batch_function(clock: FakeClock) -> None:
    """A policy decorates a Collapse (an async callable: per caller) and a pipeline wraps its
    batch function (per batch)."""
    batches = Batches()
    per_batch = Pipeline(Retry(on=ConnectionError, attempts=2)).wrap(batches)
    load = Timeout(5, clock=clock)(Collapse(per_batch, max_size=2, delay=1.0, clock=clock))
    assert await asyncio.gather(load(1), load(2)) == [10, 20]


class _Refusing(Mapping[int, int]):
    """A mapping whose lookups fail."""

    def __getitem__(self, key: int) -> int:
        raise RuntimeError("lookup failed")

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 1


async def test_a_mapping_that_fails_to_answer_fails_its_callers(clock: FakeClock) -> None:
    """A batch whose mapping raises on lookup: every caller gets that error, none waits."""

    async def refusing(keys: list[int]) -> Mapping[int, int]:
        return _Refusing()

    load = Collapse(refusing, max_size=10, delay=0.01, clock=clock)
    tasks = [await started(load(k)) for k in (1, 2)]
    await advance(clock, 0.01)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
