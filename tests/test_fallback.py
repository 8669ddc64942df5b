"""Tests for resilience.fallback: value and handler forms, filters, result_if, events."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resilience.errors import UnacceptableResultError
from resilience.events import Event, FallbackUsed
from resilience.fallback import Fallback


async def fail(exc: BaseException) -> Any:
    raise exc


async def value(v: Any) -> Any:
    return v


async def test_value_replaces_matching_error() -> None:
    """A matching exception is replaced by the fallback value."""
    fallback = Fallback(on=ValueError, value="stand-in")
    assert await fallback.call(fail, ValueError("x")) == "stand-in"


async def test_success_passes_through() -> None:
    """A successful call returns its own value, not the fallback."""
    fallback = Fallback(on=ValueError, value="stand-in")
    assert await fallback.call(value, 42) == 42


async def test_none_is_a_valid_value() -> None:
    """``value=None`` counts as a value and is returned on failure."""
    fallback = Fallback(on=ValueError, value=None)
    assert await fallback.call(fail, ValueError()) is None


async def test_sync_handler_gets_the_error() -> None:
    """A plain handler is called with the exception and its return value is used."""
    seen: list[Exception] = []

    def handler(exc: Exception) -> str:
        seen.append(exc)
        return f"handled {exc.args[0]}"

    error = KeyError("k")
    fallback = Fallback(on=KeyError, handler=handler)
    assert await fallback.call(fail, error) == "handled k"
    assert seen == [error]


async def test_async_handler_is_awaited() -> None:
    """An async handler is awaited and its result used."""

    async def handler(exc: Exception) -> str:
        await asyncio.sleep(0)
        return type(exc).__name__

    fallback = Fallback(on=(KeyError, ValueError), handler=handler)
    assert await fallback.call(fail, ValueError()) == "ValueError"
    assert await fallback.call(fail, KeyError()) == "KeyError"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"value": 1, "handler": lambda e: 2}],
)
def test_exactly_one_of_value_and_handler(kwargs: dict[str, Any]) -> None:
    """Giving neither or both of value= and handler= is a TypeError."""
    with pytest.raises(TypeError):
        Fallback(on=ValueError, **kwargs)


def test_on_is_required() -> None:
    """Fallback without ``on`` raises TypeError."""
    with pytest.raises(TypeError):
        Fallback(value=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("on", [asyncio.CancelledError, BaseException, (), "ValueError"])
def test_bad_on_rejected(on: Any) -> None:
    """``on`` must name Exception subclasses (at least one) or be a predicate."""
    with pytest.raises((TypeError, ValueError)):
        Fallback(on=on, value=1)


def test_bad_handler_and_result_if_rejected() -> None:
    """A non-callable handler or result_if is a TypeError."""
    with pytest.raises(TypeError):
        Fallback(on=ValueError, handler="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Fallback(on=ValueError, value=1, result_if=3)  # type: ignore[arg-type]


async def test_unmatched_error_propagates() -> None:
    """An exception not matching ``on`` propagates unchanged."""
    fallback = Fallback(on=ValueError, value="stand-in")
    error = KeyError("k")
    with pytest.raises(KeyError) as info:
        await fallback.call(fail, error)
    assert info.value is error


async def test_predicate_on_filters() -> None:
    """A predicate ``on`` falls back only for the exceptions it accepts."""
    fallback = Fallback(on=lambda e: "soft" in str(e), value="soft fallback")
    assert await fallback.call(fail, RuntimeError("soft failure")) == "soft fallback"
    with pytest.raises(RuntimeError, match="hard"):
        await fallback.call(fail, RuntimeError("hard failure"))


async def test_result_if_hands_unacceptable_result_to_handler() -> None:
    """A result rejected by result_if reaches the handler as UnacceptableResultError(.result)."""
    seen: list[Exception] = []

    def handler(exc: Exception) -> str:
        seen.append(exc)
        return "replaced"

    fallback = Fallback(on=ValueError, handler=handler, result_if=lambda r: r < 0)
    assert await fallback.call(value, 5) == 5
    assert seen == []
    assert await fallback.call(value, -3) == "replaced"
    assert len(seen) == 1
    assert isinstance(seen[0], UnacceptableResultError)
    assert seen[0].result == -3


async def test_cancellation_never_falls_back() -> None:
    """CancelledError propagates even with a catch-all ``on``."""
    fallback = Fallback(on=lambda e: True, value="stand-in")
    never = asyncio.Event()
    task = asyncio.create_task(fallback.call(never.wait))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_error_raised_by_call_is_not_caught() -> None:
    """A CancelledError raised by the call itself is not replaced."""
    fallback = Fallback(on=Exception, value="stand-in")
    with pytest.raises(asyncio.CancelledError):
        await fallback.call(fail, asyncio.CancelledError())


async def test_fallback_used_event() -> None:
    """Each fallback delivers a FallbackUsed event with the replaced error; success sends none."""
    events: list[Event] = []
    fallback = Fallback(on=ValueError, value=0, name="fb", listeners=[events.append])
    await fallback.call(value, 1)
    assert events == []
    error = ValueError("x")
    await fallback.call(fail, error)
    assert events == [FallbackUsed(name="fb", error=error)]
