"""Take docs/img/dashboard-*.png: the dashboard in each state, in headless Chromium, against
the demo (run: python docs/img/dashboard_states.py; about a minute).

It starts a throwaway ``redis-server`` on loopback, runs ``resilience demo --redis`` against
it, and serves ``resilience dashboard`` on the demo's prefix (that one outlives the demo).
Then, as the demo's upstream goes through its phases, it takes:

* ``dashboard-busy.png``: healthy, the breaker closed and busy, with the cards of the
  upstream's fleet-wide bulkhead (its pool) and rate limiter (its bucket's tokens);
* ``dashboard-open.png``: the upstream failing, the breaker open;
* ``dashboard-forced.png``: forced open with ``resilience open`` (then closed again);
* ``dashboard-stale.png``: the demo's replicas gone, the fleet silent;
* ``dashboard-redis-down.png``: Redis stopped under the dashboard.

Needs the ``demo`` and ``dashboard`` extras, ``redis-server`` on the PATH, playwright and a
Chromium (``$RESILIENCE_CHROMIUM``, else ``/usr/bin/chromium``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHROMIUM = os.environ.get("RESILIENCE_CHROMIUM", "/usr/bin/chromium")
DURATION = 40.0  # the demo's phases: healthy 0-10 s, failing 10-20 s, slow 20-28 s, then well
TOKEN = "screenshots"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(*args: str) -> list[str]:
    """``python -m resilience ARGS`` with this checkout's package."""
    return [sys.executable, "-m", "resilience", *args]


def environment() -> dict[str, str]:
    """This process's environment, with this checkout first on the path and the token set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    env["RESILIENCE_DASHBOARD_TOKEN"] = TOKEN
    return env


async def until(page: Any, selector: str, seconds: float = 30.0) -> None:
    """Wait until ``page`` shows an element that ``selector`` matches."""
    await page.locator(selector).first.wait_for(timeout=seconds * 1000)


async def shoot(page: Any, name: str) -> None:
    await asyncio.sleep(1.5)  # a few updates: the sparklines and rates settle
    await page.screenshot(path=str(HERE / f"dashboard-{name}.png"), full_page=True)
    print(f"docs/img/dashboard-{name}.png")


async def main() -> None:
    from playwright.async_api import async_playwright

    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not on the PATH")
    env = environment()
    redis_port, demo_port, dash_port = free_port(), free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    with tempfile.TemporaryDirectory() as folder:
        redis = subprocess.Popen(  # noqa: ASYNC220 (started once, never waited on here)
            [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(0.5)
        demo = subprocess.Popen(  # noqa: ASYNC220 (started once, never waited on here)
            command("demo", "--redis", url, "--duration", str(DURATION), "--seed", "7",
                    "--port", str(demo_port)),
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        dashboard = None
        try:
            assert demo.stdout is not None
            prefix = name = None
            for line in demo.stdout:  # bounded: the demo prints its prefix first
                found = re.search(r"under prefix '([^']+)'", line)
                prefix = found.group(1) if found else prefix
                found = re.search(r"sharing breaker '([^']+)'", line)
                name = found.group(1) if found else name
                if prefix and name:
                    break
            assert prefix, "the demo did not say its prefix"
            assert name, "the demo did not say its breaker's name"
            start = time.monotonic()
            dashboard = subprocess.Popen(  # noqa: ASYNC220 (started once, not waited on)
                command("dashboard", "--redis", url, "--prefix", prefix, "--port",
                        str(dash_port), "--refresh", "0.5", "--allow-control"),
                env=env,
            )  # fmt: skip
            card = f'[data-breaker="{name}"]'
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=CHROMIUM, args=["--headless", "--no-sandbox"]
                )
                page = await browser.new_page(viewport={"width": 1100, "height": 760})
                for _ in range(100):  # bounded: until the dashboard answers
                    try:
                        await page.goto(f"http://127.0.0.1:{dash_port}/")
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
                await until(page, f'{card}[data-state="closed"]')
                await until(page, '[data-kind="bulkhead"]')  # the upstream's pool
                await until(page, '[data-kind="rate_limiter"]')  # and its bucket
                await asyncio.sleep(max(0.0, 6.0 - (time.monotonic() - start)))
                await shoot(page, "busy")
                await until(page, f'{card}[data-state="open"]')
                await shoot(page, "open")
                await asyncio.sleep(max(0.0, 31.0 - (time.monotonic() - start)))
                where = ("--redis", url, "--prefix", prefix)
                await asyncio.to_thread(
                    subprocess.run, command("open", name, *where), env=env, check=True
                )
                await until(page, f'{card}[data-state="forced_open"]')
                await shoot(page, "forced")
                await asyncio.to_thread(
                    subprocess.run, command("close", name, *where), env=env, check=True
                )
                demo.wait(DURATION + 30)
                await until(page, f"{card}.silent")
                await shoot(page, "stale")
                redis.terminate()
                redis.wait(10)
                await until(page, '#feed[data-feed="down"]')
                await shoot(page, "redis-down")
                await page.goto("about:blank")
                await browser.close()
        finally:
            for process in (demo, dashboard, redis):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(15)


if __name__ == "__main__":
    asyncio.run(main())
