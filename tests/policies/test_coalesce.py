"""Coalesce: concurrent identical calls share one execution (single flight)."""

from __future__ import annotations

import asyncio
import contextvars
import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience import Coalesce, Coalesced, MemoryStore, Pipeline, Retry, Timeout, request_scope
from resilience.events import Event

from ..helpers import cancelled, policy_events, settle, started


class Backend:
    """An async function of a key that blocks until its key's gate opens; it counts the
    executions running per key, the most that ever ran at once, and how they ended."""

    def __init__(self) -> None:
        self.gates: dict[Any, asyncio.Event] = {}
        self.running: Counter[Any] = Counter()
        self.peak: Counter[Any] = Counter()
        self.calls: Counter[Any] = Counter()
        self.cancelled: Counter[Any] = Counter()
        self.fail: set[Any] = set()

    def gate(self, key: Any) -> asyncio.Event:
        return self.gates.setdefault(key, asyncio.Event())

    async def __call__(self, key: Any) -> dict[str, Any]:
        self.calls[key] += 1
        self.running[key] += 1
        self.peak[key] = max(self.peak[key], self.running[key])
        try:
            await self.gate(key).wait()
        except asyncio.CancelledError:
            self.cancelled[key] += 1
            await asyncio.sleep(0)  # a cleanup that takes a turn of the loop
            raise
        finally:
            self.running[key] -= 1
        if key in self.fail:
            raise ValueError(f"failed {key}")
        return {"key": key, "call": self.calls[key]}


async def test_concurrent_calls_share_one_execution() -> None:
    """Five concurrent calls with one key run the function once and all get its result."""
    backend = Backend()
    fetch = Coalesce()(backend)
    tasks = [await started(fetch("a")) for _ in range(5)]
    assert backend.calls["a"] == 1
    backend.gate("a").set()
    results = await asyncio.gather(*tasks)
    assert all(r is results[0] for r in results)
    assert results[0] == {"key": "a", "call": 1}


async def test_different_keys_and_functions_do_not_share() -> None:
    """Different arguments, and different functions with the same arguments, run apart."""
    one, two = Backend(), Backend()
    coalesce = Coalesce()
    tasks = [
        await started(coalesce.call(one, "a")),
        await started(coalesce.call(one, "b")),
        await started(coalesce.call(two, "a")),
        await started(coalesce.call(one, "a")),
    ]
    assert (one.calls, two.calls) == (Counter(a=1, b=1), Counter(a=1))
    for backend in (one, two):
        backend.gate("a").set()
        backend.gate("b").set()
    await asyncio.gather(*tasks)
    assert coalesce.in_flight == 0


async def test_error_reaches_every_waiter_and_next_call_runs_afresh() -> None:
    """A failure is raised in every caller; the call after it executes again."""
    backend = Backend()
    backend.fail.add("a")
    fetch = Coalesce()(backend)
    tasks = [await started(fetch("a")) for _ in range(3)]
    backend.gate("a").set()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(outcome, ValueError)
    backend.fail.clear()
    assert await fetch("a") == {"key": "a", "call": 2}


async def test_next_call_after_success_runs_afresh() -> None:
    """Nothing is cached: a call after the shared one ended executes again."""
    backend = Backend()
    backend.gate("a").set()
    fetch = Coalesce()(backend)
    assert await fetch("a") == {"key": "a", "call": 1}
    assert await fetch("a") == {"key": "a", "call": 2}


async def test_a_cancelled_waiter_leaves_the_others_alone() -> None:
    """Cancelling the first caller (and another) neither cancels the execution nor the rest."""
    backend = Backend()
    fetch = Coalesce()(backend)
    tasks = [await started(fetch("a")) for _ in range(3)]
    await cancelled(tasks[0])
    await cancelled(tasks[1])
    assert backend.cancelled["a"] == 0
    backend.gate("a").set()
    assert await tasks[2] == {"key": "a", "call": 1}
    assert backend.calls["a"] == 1


async def test_execution_is_cancelled_when_every_waiter_has_gone() -> None:
    """When its last caller is cancelled, the execution is cancelled too, and the next call
    starts a new one only after the old one has finished cancelling."""
    backend = Backend()
    fetch = Coalesce()(backend)
    tasks = [await started(fetch("a")) for _ in range(2)]
    for task in tasks:
        task.cancel()
    nxt = asyncio.create_task(fetch("a"))
    await settle()
    assert backend.cancelled["a"] == 1
    assert backend.calls["a"] == 2
    assert backend.peak["a"] == 1
    backend.gate("a").set()
    assert await nxt == {"key": "a", "call": 2}


async def test_unhashable_arguments_run_unshared() -> None:
    """A call with an unhashable argument runs on its own (the default key cannot hold it)."""
    calls = 0

    async def fetch(items: list[int], *, extra: Any = None) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return sum(items)

    shared = Coalesce()(fetch)
    assert await asyncio.gather(shared([1, 2]), shared([1, 2])) == [3, 3]
    assert await asyncio.gather(shared([1], extra=[]), shared([1], extra=[])) == [1, 1]
    assert calls == 4


async def test_key_function_groups_calls() -> None:
    """Calls that ``key`` maps to one key share, whatever their other arguments."""
    backend = Backend()
    coalesce = Coalesce(key=lambda key, attempt: key)

    async def fetch(key: str, attempt: int) -> dict[str, Any]:
        return await backend(key)

    shared = coalesce(fetch)
    tasks = [await started(shared("a", n)) for n in range(3)]
    backend.gate("a").set()
    await asyncio.gather(*tasks)
    assert backend.calls["a"] == 1


async def test_unhashable_key_from_key_function_is_a_type_error() -> None:
    """A ``key`` that returns something unhashable fails the call with TypeError."""
    backend = Backend()
    shared = Coalesce(key=lambda key: [key])(backend)
    with pytest.raises(TypeError):
        await shared("a")
    assert backend.calls["a"] == 0


async def test_results_are_shared_objects_unless_copied() -> None:
    """Without ``copy`` every caller gets one object; with it each gets its own copy."""
    for hook, same in ((None, True), (copy.deepcopy, False)):
        backend = Backend()
        fetch = Coalesce(copy=hook)(backend)
        tasks = [await started(fetch("a")) for _ in range(2)]
        backend.gate("a").set()
        first, second = await asyncio.gather(*tasks)
        assert first == second
        assert (first is second) is same


async def test_coalesced_event_counts_callers() -> None:
    """A shared execution reports how many callers it served; a lone one reports nothing."""
    events: list[Event] = []
    backend = Backend()
    fetch = Coalesce(name="users", listeners=[policy_events(events)])(backend)
    tasks = [await started(fetch("a")) for _ in range(4)]
    backend.gate("a").set()
    await asyncio.gather(*tasks)
    backend.gate("b").set()
    await fetch("b")
    await settle()
    assert events == [Coalesced(name="users", callers=4)]


async def test_composes_in_a_pipeline() -> None:
    """Inside a Pipeline's call form, calls share by the user's function and arguments."""
    one, two = Backend(), Backend()
    pipeline = Pipeline(Coalesce(), Retry(on=ValueError, attempts=2), Timeout(10))
    tasks = [
        await started(pipeline.call(one, "a")),
        await started(pipeline.call(one, "a")),
        await started(pipeline.call(two, "a")),
    ]
    assert (one.calls["a"], two.calls["a"]) == (1, 1)
    one.gate("a").set()
    two.gate("a").set()
    first, second, third = await asyncio.gather(*tasks)
    assert first is second
    assert third is not first


@pytest.mark.parametrize(("option", "value"), [("key", 3), ("copy", "deep")])
def test_bad_options_are_type_errors(option: str, value: object) -> None:
    """A ``key`` or ``copy`` that is not callable is refused, naming the option."""
    with pytest.raises(TypeError, match=option):
        Coalesce(**{option: value})


async def drive(
    backend: Backend, ops: list[tuple[str, Any]], call: Callable[[Any], asyncio.Task[Any]]
) -> list[tuple[Any, object]]:
    """Play ``ops``: calls (``call(arg)`` starts one), cancellations, returns of a key, turns
    of the loop; then let every key return. The calls not cancelled, with their outcomes
    (those cancelled are checked to have ended cancelled)."""
    calls: list[tuple[Any, asyncio.Task[Any]]] = []
    gone: set[int] = set()
    for op, arg in ops:
        if op == "call":
            calls.append((arg, call(arg)))
        elif op == "cancel" and calls:
            i = arg % len(calls)
            if calls[i][1].cancel():
                gone.add(i)
        elif op == "release":
            backend.gate(arg).set()
            await settle()
            backend.gate(arg).clear()
        else:
            await settle(arg)
    for key in "abc":
        backend.gate(key).set()
    outcomes = await asyncio.gather(*(t for _, t in calls), return_exceptions=True)
    for i in gone:
        assert isinstance(outcomes[i], asyncio.CancelledError)
    done = enumerate(zip(calls, outcomes, strict=True))
    return [(arg, outcome) for i, ((arg, _), outcome) in done if i not in gone]


def assert_outcome_of(key: str, outcome: object, failing: set[str]) -> None:
    """``outcome`` is that of an execution of ``key``: its failure, or its result."""
    if key in failing:
        assert isinstance(outcome, ValueError)
        assert str(outcome) == f"failed {key}"
    else:
        assert isinstance(outcome, dict)
        assert outcome["key"] == key


def steps(calls: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any]]:
    """The steps ``drive`` plays: a call (its argument drawn from ``calls``), a cancellation,
    a key's return, turns of the loop."""
    return st.one_of(
        st.tuples(st.just("call"), calls),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("release"), st.sampled_from("abc")),
        st.tuples(st.just("turns"), st.integers(1, 3)),
    )


OPS = steps(st.sampled_from("abc"))


@settings(max_examples=100, deadline=None)
@given(st.lists(OPS, min_size=1, max_size=25), st.sets(st.sampled_from("abc")))
def test_grouping_property(ops: list[tuple[str, Any]], failing: set[str]) -> None:
    """Whatever the order of calls, cancellations, returns and turns of the loop between
    them: each caller that was not cancelled gets the outcome of an execution of its own
    key, a key never runs twice at once, and nothing is left behind (no execution, no
    task)."""

    async def main() -> None:
        backend = Backend()
        backend.fail = set(failing)
        coalesce = Coalesce()
        fetch = coalesce(backend)
        for key, outcome in await drive(backend, ops, lambda key: asyncio.create_task(fetch(key))):
            assert_outcome_of(key, outcome, failing)
        assert max(backend.peak.values(), default=0) <= 1
        assert not any(backend.running.values())
        await settle()
        assert coalesce.in_flight == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


async def test_call_that_cannot_start_leaves_nothing_behind() -> None:
    """A call whose function refuses its arguments raises, and the key stays free."""
    backend = Backend()
    coalesce = Coalesce()
    fetch = coalesce(backend)
    with pytest.raises(TypeError):
        await fetch("a", "b")  # type: ignore[call-arg]
    assert coalesce.in_flight == 0
    backend.gate("a").set()
    assert await fetch("a") == {"key": "a", "call": 1}


# --- scope="request": the request's cache ----------------------------------------------------


async def test_request_scope_returns_the_first_result_within_one_request() -> None:
    """In one request, the second identical call gets the first one's result object, without
    running; in another request, it runs again."""
    backend = Backend()
    backend.gate("a").set()
    backend.gate("b").set()
    fetch = Coalesce(scope="request")(backend)
    async with request_scope():
        first = await fetch("a")
        assert await fetch("a") is first
        assert (await fetch("b"))["key"] == "b"
    with request_scope():
        assert await fetch("a") == {"key": "a", "call": 2}
    assert backend.calls == Counter(a=2, b=1)


async def test_request_scope_outside_any_scope_is_a_plain_single_flight() -> None:
    """Outside a request scope, concurrent calls share one execution and nothing is kept."""
    backend = Backend()
    fetch = Coalesce(scope="request")(backend)
    tasks = [await started(fetch("a")) for _ in range(3)]
    assert backend.calls["a"] == 1
    backend.gate("a").set()
    assert len({id(r) for r in await asyncio.gather(*tasks)}) == 1
    assert await fetch("a") == {"key": "a", "call": 2}


async def test_request_scope_errors_are_not_cached() -> None:
    """A failed call is not kept: the next identical call in the request runs again."""
    backend = Backend()
    backend.gate("a").set()
    backend.fail.add("a")
    fetch = Coalesce(scope="request")(backend)
    with request_scope():
        with pytest.raises(ValueError, match="failed a"):
            await fetch("a")
        backend.fail.clear()
        assert await fetch("a") == {"key": "a", "call": 2}
        assert await fetch("a") == {"key": "a", "call": 2}


async def test_request_scope_concurrent_calls_share_one_execution_per_request() -> None:
    """Concurrent identical calls of one request (its tasks) share one execution; another
    request's calls do not join it, and each request keeps its own result."""
    backend = Backend()
    fetch = Coalesce(scope="request")(backend)

    async def request(n: int) -> list[dict[str, Any]]:
        with request_scope():
            return list(await asyncio.gather(*(fetch("a") for _ in range(n))))

    tasks = [await started(request(3)), await started(request(2))]
    assert backend.calls["a"] == 2
    backend.gate("a").set()
    one, two = await asyncio.gather(*tasks)
    assert all(r is one[0] for r in one)
    assert all(r is two[0] for r in two)
    assert one[0] is not two[0]


async def test_request_scope_applies_the_copy_hook_to_cached_results() -> None:
    """With ``copy``, a call answered from the request's cache gets a copy of its own."""
    backend = Backend()
    backend.gate("a").set()
    fetch = Coalesce(scope="request", copy=copy.deepcopy)(backend)
    with request_scope():
        first = await fetch("a")
        first["key"] = "changed"
        second = await fetch("a")
    assert second == {"key": "a", "call": 1}
    assert backend.calls["a"] == 1


async def test_request_scope_keeps_policies_and_functions_apart() -> None:
    """Two request-scoped policies, or two functions, never answer each other's calls."""
    one, two = Backend(), Backend()
    for backend in (one, two):
        backend.gate("a").set()
    first, second = Coalesce(scope="request"), Coalesce(scope="request")
    with request_scope():
        await first.call(one, "a")
        await second.call(one, "a")
        await first.call(two, "a")
        await first.call(one, "a")
    assert (one.calls["a"], two.calls["a"]) == (2, 1)


async def test_request_scope_cancelled_call_is_not_cached() -> None:
    """A call whose every caller was cancelled leaves nothing: the next one runs again."""
    backend = Backend()
    fetch = Coalesce(scope="request")(backend)
    with request_scope():
        await cancelled(await started(fetch("a")))
        await settle()
        backend.gate("a").set()
        assert await fetch("a") == {"key": "a", "call": 2}
    assert backend.cancelled["a"] == 1


async def test_nested_request_scope_starts_a_cache_of_its_own() -> None:
    """A scope opened inside another is a new request; the outer cache comes back after."""
    backend = Backend()
    backend.gate("a").set()
    fetch = Coalesce(scope="request")(backend)
    async with request_scope():
        outer = await fetch("a")
        async with request_scope():
            assert await fetch("a") is not outer
        assert await fetch("a") is outer


def test_request_scope_with_a_store_is_refused() -> None:
    """A request's cache is local: ``store=`` with ``scope="request"`` is a ValueError."""
    with pytest.raises(ValueError, match="scope"):
        Coalesce(scope="request", store=MemoryStore())


@pytest.mark.parametrize(
    ("value", "error"), [("fleet", ValueError), ("", ValueError), (None, TypeError), (1, TypeError)]
)
def test_bad_scope_is_refused(value: object, error: type[Exception]) -> None:
    """A scope other than "flight" or "request" is refused, naming the parameter and value."""
    with pytest.raises(error, match=f"scope.*{value!r}"):
        Coalesce(scope=value)  # type: ignore[arg-type]


REQUEST_OPS = steps(st.tuples(st.sampled_from([None, 0, 1]), st.sampled_from("ab")))


@settings(max_examples=100, deadline=None)
@given(st.lists(REQUEST_OPS, min_size=1, max_size=25), st.sets(st.sampled_from("ab")))
def test_request_scope_property(ops: list[tuple[str, Any]], failing: set[str]) -> None:
    """Whatever the order of calls from two requests and from outside any, cancellations,
    returns and turns of the loop: each caller not cancelled gets its own key's outcome, the
    calls of one request that succeed all get one result object, two requests never get the
    same one, and nothing is left behind."""

    async def main() -> None:
        backend = Backend()
        backend.fail = set(failing)
        coalesce = Coalesce(scope="request")
        fetch = coalesce(backend)
        requests = [contextvars.copy_context() for _ in range(2)]
        for context in requests:
            context.run(request_scope().open)

        def call(arg: tuple[int | None, str]) -> asyncio.Task[Any]:
            request, key = arg
            context = None if request is None else requests[request]
            return asyncio.create_task(fetch(key), context=context)

        kept: dict[tuple[int, str], int] = {}
        for (request, key), outcome in await drive(backend, ops, call):
            assert_outcome_of(key, outcome, failing)
            if request is not None and key not in failing:
                assert kept.setdefault((request, key), id(outcome)) == id(outcome)
        for key in "ab":
            assert kept.get((0, key), 0) != kept.get((1, key), 1)
        assert not any(backend.running.values())
        await settle()
        assert coalesce.in_flight == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


async def test_a_caller_cancelled_before_its_first_wait_leaves_no_outcome_behind() -> None:
    """The first caller cancelled at once (before it waits on the shared call) while another
    waits: the shared call's error reaches the other caller, and none is left on an
    abandoned future for asyncio to report as "never retrieved"."""
    import gc

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        gate = asyncio.Event()

        async def work(x: int) -> None:
            await gate.wait()
            raise ValueError("boom")

        fetch = Coalesce()(work)
        first = asyncio.ensure_future(fetch(1))
        second = asyncio.ensure_future(fetch(1))
        await asyncio.sleep(0)
        first.cancel()
        await settle()
        gate.set()
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        assert first.cancelled()
        assert isinstance(outcomes[1], ValueError)
        del outcomes, first, second, fetch
        await settle()
        gc.collect()
        assert [c.get("message") for c in reported] == []
    finally:
        loop.set_exception_handler(None)
