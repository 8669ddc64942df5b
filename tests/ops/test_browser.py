"""The dashboard page in headless Chromium: a breaker opens, recovers, and is forced from the UI.

Needs Debian's ``chromium`` (or ``$RESILIENCE_CHROMIUM``) and the ``playwright`` package; the
test skips without them, except under ``CI`` where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CountWindow,
    MemoryStore,
    status,
)
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..redis_server import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("RESILIENCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token"


def missing(reason: str) -> None:
    """Skip for a missing browser or driver, but fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture
def chromium() -> str:
    """The Chromium executable, after checking that playwright is importable."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing("the playwright package is not installed (pip install playwright)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
def dashboard(redis_url: str) -> Iterator[tuple[str, str]]:
    """`resilience dashboard` on a free port for a fresh prefix: yields (page URL, prefix)."""
    prefix = f"browser-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_")}
    env["RESILIENCE_DASHBOARD_TOKEN"] = TOKEN
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilience", "dashboard", "--redis", redis_url, "--prefix",
         prefix, "--port", str(port), "--refresh", "0.2", "--allow-control"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while True:  # bounded by the deadline
            assert proc.poll() is None, f"the dashboard exited: {proc.communicate()[1]!r}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "status", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the dashboard did not answer in 20 s"
            time.sleep(0.1)
        yield base, prefix
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


@pytest.fixture
async def page(chromium: str) -> AsyncIterator[Any]:
    """A fresh page in headless Chromium, laptop-sized; fails the test on any script error."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        try:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        except Exception as exc:  # a broken browser install
            missing(f"playwright cannot start {chromium}: {exc}")
        errors: list[str] = []
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
        finally:
            await browser.close()
        assert errors == [], errors


class Upstream:
    """A flaky dependency: healthy, then failing, then healthy again."""

    def __init__(self) -> None:
        self.failing = False

    async def __call__(self) -> str:
        await asyncio.sleep(0.002)
        if self.failing:
            raise ConnectionError("upstream down")
        return "ok"


async def drive(
    breaker: CircuitBreaker, upstream: Upstream, until: CircuitState, pause: float = 0.03
) -> None:
    """Call ``upstream`` through ``breaker`` until it reaches ``until`` (bounded: 30 s)."""
    deadline = time.monotonic() + 30
    while breaker.metrics().state is not until:
        assert time.monotonic() < deadline, f"{breaker!r} never became {until}"
        with contextlib.suppress(Exception):
            await breaker.call(upstream)
        await asyncio.sleep(pause)


async def test_dashboard_follows_a_breaker(
    page: Any, dashboard: tuple[str, str], redis_url: str
) -> None:
    """The card turns OPEN when the upstream fails, CLOSED after recovery, and obeys buttons."""
    base, prefix = dashboard
    async with RedisStore.from_url(redis_url, prefix=prefix, timeout=1.0) as store:
        upstream = Upstream()
        payments = CircuitBreaker(
            "payments", window=CountWindow(20), minimum_calls=10, open_for=4, store=store
        )
        search = CircuitBreaker("search", window=CountWindow(50), store=store)
        inventory = CircuitBreaker("inventory", store=store)
        await inventory.call(upstream)
        pool = Bulkhead(10, distributed=True, store=store, name="thumbnails")
        for i in range(30):  # a healthy start; search sees a failure now and then
            await payments.call(upstream)
            with contextlib.suppress(ConnectionError):
                await search.call(_sometimes_fails, i)
        release = asyncio.Event()

        async def hold() -> None:
            await pool.call(release.wait)

        held = asyncio.create_task(hold())  # one fleet-wide lease held
        await store.sync()
        await store.control("inventory", CircuitState.FORCED_OPEN)  # an operator's doing

        origin = CircuitBreaker(
            "http://127.0.0.1:18001", store=store
        )  # as ResilientTransport names
        await origin.call(upstream)
        await store.sync()
        busy = asyncio.create_task(_traffic(origin, upstream, store))
        knocking = asyncio.create_task(_knock(inventory))  # refused: it is forced open

        try:
            await page.goto(base)
            # the first snapshot is in the page: its cards show at once, never "connecting…"
            # (unless the store was too slow to answer it: then the stream brings them)
            in_snapshot = await page.evaluate(
                """() => (JSON.parse(document.getElementById("initial").textContent).policies
                          || []).some((p) => p.name === "payments")"""
            )
            if in_snapshot:
                assert await page.locator('[data-breaker="payments"]').count() == 1
            assert "connecting" not in await page.locator("#feed").inner_text()
            card = page.locator('[data-breaker="payments"]')
            await card.and_(page.locator('[data-state="closed"]')).wait_for(timeout=10_000)
            await _figures_change(page, "http://127.0.0.1:18001")
            await _latency_follows_the_calls(page, search)
            await _rate_above_zero(page, "inventory", "rejected-rate")
            await asyncio.sleep(1.0)  # a few updates for the sparklines

            upstream.failing = True
            await drive(payments, upstream, CircuitState.OPEN, pause=0.1)  # the sparkline climbs
            opened = page.locator('[data-breaker="payments"][data-state="open"]')
            await opened.wait_for(timeout=10_000)
            assert "OPEN" in await opened.locator(".badge").inner_text()
            # calls refused by the open breaker show as rejected/s, and stop showing after
            refusing = asyncio.create_task(_knock(payments))
            try:
                await _rate_above_zero(page, "payments", "rejected-rate")
            finally:
                refusing.cancel()
                await asyncio.gather(refusing, return_exceptions=True)
            await _rate_is_zero(page, "payments", "rejected-rate")
            await page.locator(
                '[data-breaker="payments"] .countdown:has-text("open for")'
            ).wait_for(timeout=5_000)
            assert await page.locator('[data-breaker="search"]').get_attribute("data-state") == (
                "closed"
            )
            thumbnails = page.locator('[data-policy="thumbnails"][data-kind="bulkhead"]')
            assert (await thumbnails.locator(".value").inner_text()).strip() == "1"
            assert (await thumbnails.locator(".figure").inner_text()).strip() == "in flight 1 of 10"
            meter = thumbnails.locator('.bar[role="meter"]')
            assert await meter.is_visible()
            assert await meter.get_attribute("aria-valuenow") == "1"
            assert await meter.get_attribute("aria-valuemax") == "10"
            await _sort_and_filter(page)
            await _no_wrap_inside_a_segment(page, "http://127.0.0.1:18001")
            assert await page.locator("#feed").get_attribute("data-feed") == "live"
            await page.locator('[data-breaker="inventory"][data-state="forced_open"]').wait_for()
            (ROOT / "artifacts").mkdir(exist_ok=True)
            await page.screenshot(path=str(ROOT / "artifacts" / "dashboard.png"), full_page=True)
            if os.environ.get("RESILIENCE_UPDATE_DOCS_SCREENSHOT") == "1":  # refresh the docs' copy
                shutil.copyfile(
                    ROOT / "artifacts" / "dashboard.png", ROOT / "docs" / "img" / "dashboard.png"
                )

            upstream.failing = False  # recovery: after open_for, a probe succeeds and closes it
            await drive(payments, upstream, CircuitState.CLOSED)
            closed = page.locator('[data-breaker="payments"][data-state="closed"]')
            await closed.wait_for(timeout=10_000)

            await page.fill("#token", TOKEN)
            await card.locator('button[data-action="forced_open"]').click()
            await page.locator('[data-breaker="payments"][data-state="forced_open"]').wait_for(
                timeout=10_000
            )
            states = {p.name: p.state for p in await status(store) if p.kind == "circuit_breaker"}
            assert states["payments"] is CircuitState.FORCED_OPEN
            await card.locator('button[data-action="closed"]').click()
            await closed.wait_for(timeout=10_000)
            release.set()
            await asyncio.wait_for(asyncio.shield(held), 5)
            # the lease given back shows: no lease held (the store may drop an empty bulkhead)
            await page.wait_for_function(
                """() => {
                    const v = document.querySelector('[data-policy="thumbnails"] .value');
                    return v === null || v.textContent === "0";
                }""",
                timeout=10_000,
            )
        finally:  # a failing check leaves no task or connection behind
            busy.cancel()
            knocking.cancel()
            release.set()
            await asyncio.gather(busy, knocking, held, return_exceptions=True)


async def _traffic(breaker: CircuitBreaker, upstream: Upstream, store: RedisStore) -> None:
    """Healthy calls through ``breaker``, about 60 a second, until cancelled."""
    while True:
        for _ in range(6):
            await breaker.call(_healthy)
        await asyncio.sleep(0.1)


async def _healthy() -> str:
    await asyncio.sleep(0)
    return "ok"


async def _knock(breaker: CircuitBreaker) -> None:
    """Call ``breaker`` about 25 times a second until cancelled; refusals are expected."""
    while True:
        with contextlib.suppress(Exception):
            await breaker.call(_healthy)
        await asyncio.sleep(0.04)


async def _slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "ok"


def _shown_ms(text: str) -> float | None:
    """A latency figure as the page shows it ("< 64 ms", "< 1.0 s", "≥ 4.1 s"), in ms."""
    match = re.fullmatch(r"[<≥] ([0-9.]+) (ms|s)", text.strip())
    if match is None:
        return None
    return float(match[1]) * (1 if match[2] == "ms" else 1000)


async def _text_becomes(page: Any, selector: str, done: Callable[[str], bool]) -> str:
    """Poll the text of ``selector`` until ``done(text)`` holds (bounded: 15 s); the text."""
    element = page.locator(selector)
    seen: list[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # bounded
        text = (await element.inner_text()).strip()
        if done(text):
            return str(text)
        if not seen or seen[-1] != text:
            seen.append(text)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{selector}: never as expected; seen {seen}")


async def _rate_above_zero(page: Any, name: str, figure: str) -> None:
    """The card of ``name`` shows its ``figure`` (a per-second rate) above zero."""
    selector = f'[data-breaker="{name}"] .{figure}'
    await _text_becomes(page, selector, lambda t: t[:1].isdigit() and float(t) > 0)


async def _rate_is_zero(page: Any, name: str, figure: str) -> None:
    """The card of ``name`` shows its ``figure`` at zero."""
    selector = f'[data-breaker="{name}"] .{figure}'
    await _text_becomes(page, selector, lambda t: t[:1].isdigit() and float(t) == 0)


async def _latency_follows_the_calls(page: Any, breaker: CircuitBreaker) -> None:
    """With no call, the card shows no latency ("—"); under calls that each sleep 70 ms, p50
    and p99 show a bucket at or above 128 ms (a bound no slow machine can break); once the
    calls stop, "—" again."""
    card = f'[data-breaker="{breaker.name}"]'
    await _text_becomes(page, f"{card} .p50", lambda t: t == "—")
    assert (await page.locator(f"{card} .sampled").inner_text()).strip() == "· no call sampled"

    async def calls() -> None:
        while True:
            await breaker.call(_slow, 0.07)

    workers = [asyncio.create_task(calls()) for _ in range(4)]  # about 57 calls a second
    try:
        for figure in ("p50", "p99"):
            shown = await _text_becomes(
                page, f"{card} .{figure}", lambda t: (_shown_ms(t) or 0) >= 128
            )
            assert shown.startswith(("<", "≥")), shown
        sampled = (await page.locator(f"{card} .sampled").inner_text()).strip()
        assert re.fullmatch(r"· (\d+ sampled|no call sampled)", sampled), sampled
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    await _text_becomes(page, f"{card} .p99", lambda t: t == "—")


async def _figures_change(page: Any, name: str) -> None:
    """The card of ``name`` shows a calls/s figure above zero, and the figure changes."""
    rate = page.locator(f'[data-breaker="{name}"] .calls-rate')
    deadline = time.monotonic() + 15
    seen: set[str] = set()
    while time.monotonic() < deadline:  # bounded
        text = (await rate.inner_text()).strip()
        if text and text[0].isdigit():
            seen.add(text)
        if len(seen) >= 2 and any(float(t) > 0 for t in seen):
            break
        await asyncio.sleep(0.2)
    assert len(seen) >= 2, seen
    assert any(float(t) > 0 for t in seen), seen
    reporting = await page.locator(f'[data-breaker="{name}"] .reporting').inner_text()
    assert "1 of 1 replica reporting" in reporting


async def _sort_and_filter(page: Any) -> None:
    """Sorting by state puts the open breaker first, by rejected/s the one refusing calls;
    filtering by state hides the others."""
    await page.select_option("#sort", "state")
    first = page.locator("#breakers > .card").first
    assert await first.get_attribute("data-state") == "open"
    await page.select_option("#filter", "open")
    visible = page.locator("#breakers > .card:not([hidden])")
    assert await visible.count() == 1
    assert await visible.first.get_attribute("data-breaker") == "payments"
    assert "1 of 4 breakers shown" in await page.locator("#shown").inner_text()
    await page.select_option("#filter", "all")
    await page.select_option("#sort", "rejected")  # inventory: forced open, and knocked on
    await page.wait_for_function(
        "() => document.querySelector('#breakers > .card').dataset.breaker === 'inventory'",
        timeout=10_000,
    )
    await page.select_option("#sort", "name")
    assert await page.locator("#breakers > .card:not([hidden])").count() == 4


async def _no_wrap_inside_a_segment(page: Any, name: str) -> None:
    """A long origin name may break between its parts, never inside one (not mid-port), at
    a wide and at a narrow width."""
    for width in (1400, 380):
        await page.set_viewport_size({"width": width, "height": 900})
        heading = page.locator(f'[data-breaker="{name}"] h2')
        assert (await heading.inner_text()).replace("\n", "") == name
        lines = await heading.evaluate(
            "h => [...h.querySelectorAll('.seg')].map(s => s.getClientRects().length)"
        )
        assert lines, width
        assert all(n == 1 for n in lines), (width, lines)
        port = await heading.evaluate(
            "h => [...h.querySelectorAll('.seg')].find(s => s.textContent.includes(':18001'))"
            ".textContent"
        )
        assert port.endswith(":18001")
    await page.set_viewport_size({"width": 1280, "height": 720})


async def _sometimes_fails(i: int) -> int:
    if i % 7 == 3:
        raise ConnectionError("flaky")
    return i


async def test_in_process_figures_as_the_page_shows_them(page: Any, clock: FakeClock) -> None:
    """An in-process store's breaker and bulkhead, figures exact on a fake clock: the page
    shows rejected/s (and no calls/s), p50 and p99 as "< 4 ms" and "≥ 4.1 s" (past the last
    bucket), the samples, and a full bulkhead as "in flight 4 of 4" with a full bar."""
    from resilience.ops.dashboard import Dashboard
    from resilience.ops.demo import serve

    store = MemoryStore(clock=clock)
    breaker = CircuitBreaker("timed", failure_if=lambda result: False, store=store)
    pool = Bulkhead(4, distributed=True, store=store, name="pool")

    async def takes(seconds: float) -> str:
        clock.advance(seconds)
        return "ok"

    release = asyncio.Event()
    held = [asyncio.create_task(pool.call(release.wait)) for _ in range(4)]
    app = Dashboard(store, refresh=0.5)
    try:
        for _ in range(1000):  # bounded: until the four leases are taken
            if await store.count_leases("pool") == 4:
                break
            await asyncio.sleep(0)
        await breaker.call(takes, 0)  # the 1st call is timed, then the 9th and the 17th
        await app.snapshot()
        for n in range(2, 18):
            await breaker.call(takes, {9: 0.003, 17: 5.0}.get(n, 0))
        await store.control("timed", CircuitState.FORCED_OPEN)
        for _ in range(6):
            with pytest.raises(CircuitOpenError):
                await breaker.call(takes, 0)
        clock.advance(6.0 - 5.003)  # 6 s since the first snapshot: 1.0 refusal a second
        _, doc = await app.snapshot()  # the page gets this one: the fake clock stands still
        (timed,) = [p for p in doc["policies"] if p["name"] == "timed"]
        assert timed["percentiles"] == {"samples": 2, "p50": [0.002, 0.004], "p99": [4.096, None]}
        server, task = await serve(app, free_port())
        try:
            await page.goto(f"http://127.0.0.1:{server.config.port}/")
            card = page.locator('[data-breaker="timed"][data-state="forced_open"]')
            await card.wait_for(timeout=10_000)
            assert (await card.locator(".p50").inner_text()).strip() == "< 4 ms"
            assert (await card.locator(".p99").inner_text()).strip() == "≥ 4.1 s"
            assert (await card.locator(".sampled").inner_text()).strip() == "· 2 sampled"
            assert (await card.locator(".rejected-rate").inner_text()).strip() == "1.0"
            assert (await card.locator(".calls-rate").inner_text()).strip() == "\u2013"  # no total
            assert "in-process store" in await card.locator(".reporting").inner_text()
            bulkhead = page.locator('[data-policy="pool"][data-kind="bulkhead"]')
            assert (await bulkhead.locator(".figure").inner_text()).strip() == "in flight 4 of 4"
            assert "full" in (await bulkhead.locator(".bar").get_attribute("class") or "")
        finally:
            await page.goto("about:blank")  # the event stream ends with the page
            server.should_exit = True
            await asyncio.wait_for(task, 10)
    finally:
        release.set()
        await asyncio.gather(*held, return_exceptions=True)
