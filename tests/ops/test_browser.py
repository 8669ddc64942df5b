"""The dashboard page in headless Chromium: a breaker opens, recovers, and is forced from the UI.

Needs Debian's ``chromium`` (or ``$RESILIENCE_CHROMIUM``) and the ``playwright`` package; the
test skips without them, except under ``CI`` where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitState,
    CountWindow,
    HealthCheck,
    MemoryStore,
    PolicyStatus,
    RateLimiter,
    status,
)
from resilience.errors import (
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    StoreUnavailableError,
)
from resilience.store.records import ReplicaReport
from resilience.store.redis import RedisStore
from resilience.testing import FakeClock

from ..helpers import raises_each
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
            await _rate_above_zero(page, "http://127.0.0.1:18001", "ok-rate")
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
            assert (await thumbnails.locator(".figure").inner_text()).strip() == (
                "active 1 of 10 across the fleet"
            )
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
    assert "1 of 1 replica heard from in the last 5 s" in reporting


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
    bucket; p99.5 too), the mean as estimated from the buckets, the samples, and a full
    bulkhead as "active 4 of 4" with a full bar."""
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
        await raises_each(6, CircuitOpenError, breaker.call, takes, 0)
        clock.advance(6.0 - 5.003)  # 6 s since the first snapshot: 1.0 refusal a second
        _, doc = await app.snapshot()  # the page gets this one: the fake clock stands still
        (timed,) = [p for p in doc["policies"] if p["name"] == "timed"]
        assert timed["percentiles"] == {
            "samples": 2,
            "p50": [0.002, 0.004],
            "p90": [4.096, None],
            "p99": [4.096, None],
            "p99.5": [4.096, None],
            "mean": pytest.approx((0.003 + 4.096) / 2),
        }
        server, task = await serve(app, free_port())
        try:
            await page.goto(f"http://127.0.0.1:{server.config.port}/")
            card = page.locator('[data-breaker="timed"][data-state="forced_open"]')
            await card.wait_for(timeout=10_000)
            assert (await card.locator(".p50").inner_text()).strip() == "< 4 ms"
            assert (await card.locator(".p99").inner_text()).strip() == "≥ 4.1 s"
            assert (await card.locator(".p995").inner_text()).strip() == "≥ 4.1 s"
            assert (await card.locator(".mean").inner_text()).strip() == "≈ 2.0 s"
            assert (await card.locator(".sampled").inner_text()).strip() == "· 2 sampled"
            assert (await card.locator(".rejected-rate").inner_text()).strip() == "1.0"
            assert (await card.locator(".calls-rate").inner_text()).strip() == "\u2013"  # no total
            assert "in-process store" in await card.locator(".reporting").inner_text()
            bulkhead = page.locator('[data-policy="pool"][data-kind="bulkhead"]')
            assert (await bulkhead.locator(".figure").inner_text()).strip() == "active 4 of 4"
            assert "full" in (await bulkhead.locator(".bar").get_attribute("class") or "")
        finally:
            await page.goto("about:blank")  # the event stream ends with the page
            server.should_exit = True
            await asyncio.wait_for(task, 10)
    finally:
        release.set()
        await asyncio.gather(*held, return_exceptions=True)


async def test_in_process_pool_and_bucket_cards(page: Any, clock: FakeClock) -> None:
    """In process, a bulkhead's card shows all four figures (active of its limit, queued,
    rejected/s) and a rate limiter's its tokens of its burst, its rate and refused/s, exact
    on a fake clock; none of them says "this process only". A health check's result seen
    published between two updates has an age, and one living in this process its phi."""
    from resilience.ops.dashboard import Dashboard

    store = MemoryStore(clock=clock)
    app = Dashboard(store, refresh=0.5, clock=clock)
    pool = Bulkhead(2, max_waiting=1, name="workers", listeners=[app.calls])
    quota = RateLimiter(10, burst=5, store=store, name="quota", listeners=[app.calls])
    release = asyncio.Event()
    held = [asyncio.create_task(pool.call(release.wait)) for _ in range(3)]
    lease = await store.acquire_lease("health:db", limit=1, ttl=60)
    assert lease is not None
    here = HealthCheck(_healthy, name="db", store=store, clock=clock)  # not started: phi 0

    async def publish(seq: int) -> None:
        result = {"id": "runner", "seq": seq, "ok": True, "duration": 0.01, "error": None}
        await store.publish("health:db", "result", json.dumps(result).encode(), lease=lease, ttl=60)

    try:
        await asyncio.sleep(0)
        await quota.call(asyncio.sleep, 0)
        await publish(1)
        await app.snapshot()
        await publish(2)  # a new result: the next update sees it change
        clock.advance(1.7)
        for _ in range(5):
            await quota.call(asyncio.sleep, 0)
        for _ in range(4):
            with pytest.raises(RateLimitedError):
                await quota.call(asyncio.sleep, 0)
            with pytest.raises(BulkheadFullError):
                await pool.call(asyncio.sleep, 0)
        clock.advance(0.3)  # 2 s since the first snapshot: 2.0 refusals a second each
        await app.snapshot()  # the page gets this one: the fake clock stands still
        async with serving(app) as base:
            try:
                await page.goto(base)
                workers = page.locator('[data-policy="workers"][data-kind="bulkhead"]')
                await workers.wait_for(timeout=10_000)
                assert (await workers.locator(".figure").inner_text()).strip() == "active 2 of 2"
                assert (await workers.locator(".queued").inner_text()).strip() == "1"
                assert (await workers.locator(".rejected-rate").inner_text()).strip() == "2.0"
                assert "this process only" not in await workers.locator(".extra").inner_text()
                bucket = page.locator('[data-policy="quota"][data-kind="rate_limiter"]')
                assert (await bucket.locator(".figure").inner_text()).strip() == "tokens 3 of 5"
                assert (await bucket.locator(".rate").inner_text()).strip() == "10 per s"
                assert (await bucket.locator(".refused-rate").inner_text()).strip() == "2.0"
                db = page.locator('[data-policy="health:db"][data-kind="health_check"]')
                assert (await db.locator(".published").inner_text()).strip() == "just now"
                assert "age not known" not in await db.locator(".extra").inner_text()
                assert (await db.locator(".phi").inner_text()).strip() == "0.00 of 8"
                said = await db.locator(".extra").inner_text()
                assert "phi: this process" in said
                assert "phi is not shared" not in said
            finally:
                await page.goto("about:blank")  # the event stream ends with the page
    finally:
        release.set()
        await asyncio.gather(*held, return_exceptions=True)
        del here
        gc.collect()  # no health check of this process is left for the next test


class Scene(MemoryStore):
    """A store whose ``status()`` is whatever the test sets: records, or an outage."""

    def __init__(self, records: Iterable[PolicyStatus] = ()) -> None:
        super().__init__()
        self.records: list[PolicyStatus] = list(records)
        self.down = False

    async def status(self) -> list[PolicyStatus]:
        if self.down:
            raise StoreUnavailableError("the scene's store is down")
        return list(self.records)


def _report(replica: str, seen: float, calls: int = 100) -> ReplicaReport:
    return ReplicaReport(
        replica=replica, last_seen=seen, calls=calls, failures=calls // 4, slow_calls=0
    )


FLEET_GONE = tuple(_report(f"host-{i}:{100 + i}", 180.0) for i in range(3))
SCENE = [
    PolicyStatus(
        name="pay", kind="circuit_breaker", state=CircuitState.OPEN, retry_after=20.0,
        opened_by=(20, 15, 1), replicas=(_report("host-0:1", 0.1),),
    ),
    PolicyStatus(name="inv", kind="circuit_breaker", state=CircuitState.FORCED_OPEN),
    PolicyStatus(
        name="old", kind="circuit_breaker", state=CircuitState.CLOSED, calls=8, replicas=FLEET_GONE
    ),
    PolicyStatus(name="api", kind="throttle", window=(10, 7)),
    PolicyStatus(name="api", kind="hedge", window=(40, 2)),
    PolicyStatus(
        name="health:db", kind="health_check", in_flight=1, healthy=False,
        health_error="ConnectionError: no route",
    ),
    PolicyStatus(name="quota", kind="rate_limiter", backlog=2.5),
    PolicyStatus(name="conns", kind="bulkhead", in_flight=3, limit=8),
]  # fmt: skip


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """``app`` served on loopback in this loop: yields its base URL."""
    from resilience.ops.demo import serve

    server, task = await serve(app, free_port())
    try:
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_a_breakers_neighbours_figures_show_when_reported(page: Any) -> None:
    """Timeouts, bulkhead refusals and fallbacks reported under a breaker's name (to
    ``dashboard.calls``) show on its card as rates; a card with none reported shows none."""
    from resilience.events import FallbackUsed, TimedOut
    from resilience.ops.dashboard import Dashboard

    dashboard = Dashboard(Scene(SCENE), refresh=0.2)
    async with serving(dashboard) as base:
        try:
            await page.goto(base)
            inv = page.locator('[data-breaker="inv"]')
            await inv.wait_for(timeout=10_000)
            for _ in range(100):  # bounded: 10 s of reports, until the card shows them
                dashboard.calls(TimedOut(name="inv", seconds=0.1))
                dashboard.calls(FallbackUsed(name="inv", error=ConnectionError("x")))
                if await inv.locator(".others").is_visible():
                    break
                await asyncio.sleep(0.1)
            await page.wait_for_function(
                """() => parseFloat(document.querySelector(
                    '[data-breaker="inv"] .timeouts-rate').textContent) > 0""",
                timeout=10_000,
            )
            assert (
                await inv.locator(".fallbacks-rate").inner_text() != "\u2013"
            )  # a rate, not the dash of none
            assert not await page.locator('[data-breaker="pay"] .others').is_visible()
        finally:
            await page.goto("about:blank")


async def _texts(locator: Any) -> list[str]:
    return [text.strip() for text in await locator.all_text_contents()]


async def test_the_page_never_shows_an_open_breaker_or_a_gone_fleet_as_healthy(
    page: Any,
) -> None:
    """An open breaker shows the window that opened it (never 0% / 0 / 0), a forced one no
    figures; a fleet silent for minutes reads as silent, not reporting; a throttle's and a
    hedge's windows read as what they count, a health check whether it is healthy; the feed
    says "live" only while the store answers and is not degraded, and again once it is; figures
    that cannot be computed read as stale, without blaming the store."""
    from resilience.ops.dashboard import Dashboard

    scene = Scene(SCENE)
    own = Bulkhead(3, name="own-pool")  # this process's, not in the shared store
    board = Dashboard(scene, refresh=0.2)
    async with serving(board) as base:
        try:
            await page.goto(base)
            pay = page.locator('[data-breaker="pay"][data-state="open"]')
            await pay.wait_for(timeout=10_000)
            assert await _texts(pay.locator(".figures dd")) == ["75%", "20", "15", "1"]
            assert "the window that opened it" in await pay.locator(".figcap").inner_text()
            inv = page.locator('[data-breaker="inv"][data-state="forced_open"]')
            assert await _texts(inv.locator(".figures dd")) == ["—"] * 4
            assert "forced open" in await inv.locator(".figcap").inner_text()

            old = page.locator('[data-breaker="old"]')
            assert "silent" in (await old.get_attribute("class") or "").split()
            assert (await old.locator(".reporting").inner_text()).startswith(
                "0 of 3 replicas heard from in the last 5 s"
            )
            assert "No replica heard from for 3 min" in await old.locator(".stale").inner_text()
            assert all("(silent)" in row for row in await _texts(old.locator("tbody tr")))
            throttle = page.locator('[data-policy="api"][data-kind="throttle"] .figure')
            hedge = page.locator('[data-policy="api"][data-kind="hedge"] .figure')
            assert (await throttle.inner_text()).strip() == (
                "accepted 7 of 10 requests (70%) over its window"
            )
            assert (
                await hedge.inner_text()
            ).strip() == "hedges sent 2 for 40 calls (5.0%) over its window"
            db = page.locator('[data-policy="health:db"][data-health="false"] .figure')
            assert (await db.inner_text()).strip() == (
                "unhealthy: ConnectionError: no route · a replica is running it"
            )
            db_card = page.locator('[data-policy="health:db"][data-kind="health_check"]')
            assert (await db_card.locator(".published").inner_text()).strip() == "\u2013"
            said = await db_card.locator(".extra").inner_text()
            assert "age not known yet" in said
            assert "phi is not shared" in said
            quota = page.locator('[data-policy="quota"][data-kind="rate_limiter"] .figure')
            assert (await quota.inner_text()).strip() == "full again in 2.5 s (shared GCRA bucket)"
            # what this process cannot know reads as a dash and says why, never 0
            quota_card = page.locator('[data-policy="quota"][data-kind="rate_limiter"]')
            assert (await quota_card.locator(".refused-rate").inner_text()).strip() == "\u2013"
            conns = page.locator('[data-policy="conns"][data-kind="bulkhead"]')
            assert (await conns.locator(".figure").inner_text()).strip() == (
                "active 3 of 8 across the fleet"
            )
            assert (await conns.locator(".queued").inner_text()).strip() == "\u2013"
            assert (await conns.locator(".rejected-rate").inner_text()).strip() == "\u2013"
            assert "this process only" in await conns.locator(".extra").inner_text()
            assert "no bulkhead of this name" in await conns.locator(".extra").inner_text()
            mine = page.locator(f'[data-policy="{own.name}"][data-kind="bulkhead"]')
            assert (await mine.locator(".figure").inner_text()).strip() == "active 0 of 3"
            assert (await mine.locator(".queued").inner_text()).strip() == "0"
            assert "not shared through the store" in await mine.locator(".extra").inner_text()
            live = page.locator('#feed[data-feed="live"]')
            await live.wait_for(timeout=10_000)

            scene.down = True
            await page.locator('#feed[data-feed="down"]').wait_for(timeout=10_000)
            assert "store down" in await page.locator("#feed").inner_text()
            assert await page.locator("#banner").is_visible()
            scene.down = False
            await live.wait_for(timeout=10_000)
            scene.degraded = True  # a store deciding on local state: not live either
            await page.locator('#feed[data-feed="degraded"]').wait_for(timeout=10_000)
            scene.degraded = False
            await live.wait_for(timeout=10_000)

            def broken(*args: object, **kwargs: object) -> None:
                raise RuntimeError("a figure failed")

            board._policy = broken  # type: ignore[method-assign]  # the store answers
            await page.locator('#feed[data-feed="stale"]').wait_for(timeout=10_000)
            banner = await page.locator("#banner").inner_text()
            assert banner.startswith("The status could not be taken: the figures could not")
            del board._policy
            await live.wait_for(timeout=10_000)
        finally:
            await page.goto("about:blank")  # the event stream ends with the page


class ConfigStub:
    """The live configuration endpoints as the dashboard serves them, for one policy: what
    the page sends, and the answers it gets (a value over 1 is refused)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {"failure_threshold": 0.5, "open_for": 30.0}
        self.history: list[dict[str, Any]] = [
            {"version": 1, "values": dict(self.values), "at": 1.7e9, "source": "code"}
        ]
        self.received: list[tuple[str, str, Any]] = []

    def document(self) -> dict[str, Any]:
        base = {"failure_threshold": 0.5, "open_for": 30.0}
        return {
            "version": self.history[-1]["version"],
            "values": self.values,
            "base": base,
            "history": self.history,
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        request = Request(scope, receive)
        path = request.url.path.removeprefix("/api/config/")
        body = json.loads(await request.body() or b"null")
        self.received.append((request.method, path, body))
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            answer = JSONResponse({"error": "a valid token is needed"}, 403)
        elif request.method == "GET":
            answer = JSONResponse(self.document())
        elif path.endswith("/rollback"):
            self.history.append({**self.history[-2], "version": len(self.history) + 1})
            self.values = dict(self.history[-1]["values"])
            answer = JSONResponse({"version": len(self.history)})
        elif any(v > 1 for k, v in body["values"].items() if k == "failure_threshold"):
            answer = JSONResponse({"error": "failure_threshold must be in (0, 1], not 2"}, 400)
        else:
            self.values = {**self.values, **body["values"]}
            self.history.append(
                {"version": len(self.history) + 1, "values": dict(self.values), "at": 1.7e9}
            )
            answer = JSONResponse({"version": len(self.history)})
        await answer(scope, receive, send)


async def test_live_values_editor_calls_the_config_endpoints(page: Any) -> None:
    """The page's editor reads a policy's values with the token, sends only the values
    changed, shows the version it gets or the error as sent, and rolls back."""
    from resilience.ops.dashboard import Dashboard

    scene = Scene(SCENE)
    dashboard = Dashboard(scene, refresh=0.2, allow_control=True, token=TOKEN)
    stub = ConfigStub()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/config/"):
            await stub(scope, receive, send)
        else:
            await dashboard(scope, receive, send)

    async with serving(app) as base:
        try:
            await page.goto(base)
            card = page.locator('[data-breaker="pay"]')
            await card.wait_for(timeout=10_000)
            await page.fill("#token", TOKEN)
            await card.locator(".config summary").click()
            threshold = card.locator('.config input[data-key="failure_threshold"]')
            await threshold.wait_for(timeout=10_000)
            assert stub.received == [("GET", "pay", None)]
            assert await threshold.input_value() == "0.5"
            assert "version 1" in await card.locator(".config .version").inner_text()

            await card.locator('.config input[data-key="open_for"]').fill("10")
            await card.locator('button[data-config="apply"]').click()
            note = card.locator(".config-note")
            await card.locator('.config-note:has-text("applied: version 2")').wait_for()
            assert stub.received[1] == ("POST", "pay", {"values": {"open_for": 10}})
            assert await card.locator(".config .history li").count() == 2

            await threshold.fill("2")
            await card.locator('button[data-config="apply"]').click()
            await card.locator(
                '.config-note:has-text("failure_threshold must be in (0, 1], not 2")'
            ).wait_for()
            assert stub.values["open_for"] == 10

            await card.locator('button[data-config="rollback"]').click()
            await card.locator('.config-note:has-text("rolled back: version 3")').wait_for()
            assert ("POST", "pay/rollback", {}) in stub.received
            assert await threshold.input_value() == "0.5"
            assert await card.locator('.config input[data-key="open_for"]').input_value() == "30"
            assert "version 3" in await note.locator("xpath=..").locator(".version").inner_text()
        finally:
            await page.goto("about:blank")
