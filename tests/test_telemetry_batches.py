"""Telemetry of request coalescing and collapsing: shared calls, batch sizes and delays."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from resilience import Coalesce, Collapse
from resilience.testing import FakeClock

from . import test_telemetry
from .helpers import advance, started
from .test_telemetry import Otel

otel = test_telemetry.otel  # the fixture, shared


async def test_coalesced_calls_are_counted(otel: Otel) -> None:
    """``resilience.coalesce.joined`` counts the calls that joined an execution under way."""
    gate = asyncio.Event()
    coalesce = Coalesce(name="users")
    otel.telemetry.instrument(coalesce)

    @coalesce
    async def fetch(key: str) -> str:
        await gate.wait()
        return key

    tasks = [await started(fetch("a")) for _ in range(3)]
    gate.set()
    await asyncio.gather(*tasks)
    await asyncio.sleep(0)
    attrs = {"resilience.policy": "coalesce", "resilience.name": "users"}
    assert otel.points("resilience.coalesce.joined") == [(attrs, 2)]


async def test_batches_report_size_callers_and_delay(otel: Otel, clock: FakeClock) -> None:
    """Each batch records its distinct keys, its callers and its gathering delay."""

    async def load(keys: list[int]) -> Mapping[int, int]:
        return {k: k for k in keys}

    collapse = Collapse(load, max_size=10, delay=0.25, clock=clock, name="users")
    otel.telemetry.instrument(collapse)
    tasks = [await started(collapse(k)) for k in (1, 2, 2)]
    await advance(clock, 0.25)
    await asyncio.gather(*tasks)
    attrs = {"resilience.policy": "collapse", "resilience.name": "users"}
    assert otel.points("resilience.batch.size") == [(attrs, (1, 2))]
    assert otel.points("resilience.batch.callers") == [(attrs, (1, 3))]
    assert otel.points("resilience.batch.delay") == [(attrs, (1, 0.25))]
