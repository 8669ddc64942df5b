"""Tests for resilience.integrations._deadline, and the deadline across two real hops."""

from __future__ import annotations

import asyncio
import math
import sys

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from resilience.integrations import DEADLINE_HEADER, deadline, get_deadline, remaining
from resilience.integrations._deadline import format_budget, parse_budget
from resilience.integrations.asgi import ResilienceMiddleware
from resilience.integrations.httpx import (
    HttpPolicy,
    ResilientTransport,
    RetryOptions,
)
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..asgi_support import serve


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1500", 1.5),
        ("250", 0.25),
        (b" 42 ", 0.042),
        (b"0", 0.0),
        (b"-3", -0.003),
        (b"1.5", 0.0015),
        (b"999999999999999", 300.0),
    ],
)
def test_parse_budget(value: bytes | str, seconds: float) -> None:
    """Milliseconds become seconds; huge budgets are capped at MAX_BUDGET."""
    assert parse_budget(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [b"", b"abc", b"1e3", b"inf", b"NaN", b"12ms", b"+5", b"1_000", "١٢", b"\xff", b"9" * 16],
)
def test_malformed_budget_is_none(value: bytes | str) -> None:
    """Anything but plain (optionally negative) decimal milliseconds is treated as absent."""
    assert parse_budget(value) is None


def test_format_budget_rounds_down_and_never_negative() -> None:
    """Seconds go out as whole milliseconds, rounded down, and 0 once spent."""
    assert format_budget(1.9999) == "1999"
    assert format_budget(0.0004) == "0"
    assert format_budget(-1) == "0"


async def test_deadline_context_sets_and_restores() -> None:
    """``deadline()`` sets the deadline for its block only; outside there is none."""
    assert remaining() is None
    with deadline(2.0) as at:
        assert get_deadline() == at
        left = remaining()
        assert left is not None
        assert 0 < left <= 2.0
    assert get_deadline() is None


async def test_nested_deadlines_only_shrink() -> None:
    """An inner deadline later than the outer one keeps the outer one."""
    with deadline(1.0) as outer:
        with deadline(10.0) as inner:
            assert inner == outer
        with deadline(0.5) as sooner:
            assert sooner < outer


async def test_deadline_validates() -> None:
    """A non-number or NaN budget is refused."""
    with pytest.raises(TypeError), deadline("1"):  # type: ignore[arg-type]
        pass  # pragma: no cover
    with pytest.raises(ValueError, match="NaN"), deadline(float("nan")):
        pass  # pragma: no cover


@pytest.mark.parametrize("seconds", [math.inf, -math.inf, 10**400], ids=["inf", "-inf", "1e400"])
async def test_deadline_refuses_infinite_budgets(seconds: float) -> None:
    """An infinite budget (or an int no float holds) is a ValueError naming the value."""
    with pytest.raises(ValueError, match="seconds must be finite"), deadline(seconds):
        pass  # pragma: no cover
    assert get_deadline() is None


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_format_budget_is_always_a_budget_parse_budget_reads(seconds: float) -> None:
    """Any number of seconds goes out as a header value ``parse_budget`` reads back."""
    value = format_budget(seconds)
    assert parse_budget(value, math.inf) is not None
    if seconds > 0.001:
        assert parse_budget(value, math.inf) == int(min(seconds * 1000.0, 10**15 - 1)) / 1000


@pytest.mark.parametrize("seconds", [1e6, 1e300, sys.float_info.max])
async def test_huge_deadline_is_forwarded_capped(seconds: float) -> None:
    """A request under a huge (finite) deadline is sent, its budget cut to 15 digits."""
    seen: list[str | None] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(DEADLINE_HEADER))
        return httpx.Response(200)

    policy = HttpPolicy(timeout=None, total_timeout=None)
    transport = ResilientTransport(httpx.MockTransport(upstream), policy=policy)
    async with httpx.AsyncClient(transport=transport) as client:
        with deadline(seconds):
            response = await client.get("https://api.test/")
    assert response.status_code == 200
    assert seen[0] is not None
    sent = int(seen[0])
    assert 0.999 * min(seconds * 1000.0, 10**15 - 1) < sent <= 10**15 - 1


async def test_deadline_is_seen_by_child_tasks() -> None:
    """Tasks started inside the block inherit the deadline (contextvars are copied)."""
    with deadline(3.0):
        left = await asyncio.create_task(_remaining())
    assert left is not None
    assert 0 < left <= 3.0


async def _remaining() -> float | None:
    return remaining()


async def test_deadline_shrinks_across_two_hops() -> None:
    """client -> A (middleware + ResilientTransport) -> B: B sees a smaller budget than sent.

    A spent budget is answered 504 by A without calling its endpoint.
    """
    a_calls = 0

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"budget": request.headers.get(DEADLINE_HEADER)})

    service_b = Starlette(routes=[Route("/echo", echo)])
    with serve(service_b) as b:

        async def relay(request: Request) -> JSONResponse:
            nonlocal a_calls
            a_calls += 1
            transport = ResilientTransport(
                policy=HttpPolicy(retry=RetryOptions(attempts=1), timeout=10)
            )
            async with httpx.AsyncClient(transport=transport) as client:
                await asyncio.sleep(0.01)  # some work in A before calling B
                response = await client.get(f"{b.url}/echo")
            return JSONResponse(response.json())

        service_a = Starlette(
            routes=[Route("/relay", relay)], middleware=[Middleware(ResilienceMiddleware)]
        )
        with serve(service_a) as a:
            async with httpx.AsyncClient(timeout=10) as client:
                relayed = await client.get(f"{a.url}/relay", headers={DEADLINE_HEADER: "5000"})
                spent = await client.get(f"{a.url}/relay", headers={DEADLINE_HEADER: "0"})
                none = await client.get(f"{a.url}/relay")
    assert relayed.status_code == 200
    seen = int(relayed.json()["budget"])
    assert 0 < seen < 5000 - 10
    assert spent.status_code == 504
    # without a caller's budget, A's own total_timeout (15 s by default) is what B is told
    assert 14_000 < int(none.json()["budget"]) <= 15_000
    assert a_calls == 2


@given(
    st.one_of(
        st.binary(max_size=40),
        st.text(max_size=40),
        st.from_regex(r"\s*-?[0-9]{1,40}(\.[0-9]{0,10})?\s*", fullmatch=True),
    ),
    st.floats(min_value=0.001, max_value=1e6),
)
def test_parse_budget_fuzz(value: bytes | str, cap: float) -> None:
    """Whatever a caller sends: ``None`` or a finite number of seconds no larger than ``cap``."""
    seconds = parse_budget(value, cap)
    assert seconds is None or (math.isfinite(seconds) and seconds <= cap)


def test_check_deadline_header_names_the_argument() -> None:
    """One check for both adapters' ``deadline_header``: a header name or None."""
    from resilience.integrations._deadline import check_deadline_header

    assert check_deadline_header(None) is None
    assert check_deadline_header("x-budget") == "x-budget"
    for bad in ("", 3, b"x-deadline-ms", True):
        with pytest.raises(TypeError, match="deadline_header"):
            check_deadline_header(bad)
