"""Memory of ``ResilientTransport`` against many distinct origins: flat after ``max_origins``.

Run: ``python benchmarks/origins.py [--quick]``; writes ``benchmarks/ORIGINS.md``.
Requests go to ``http://host-<i>.test/`` for 100,000 distinct hosts through an
``httpx.MockTransport`` (in process, no sockets), once with the default bound
(``max_origins=1024``) and once unbounded (for comparison, up to fewer origins). Memory is
what ``tracemalloc`` sees allocated and still alive after a full garbage collection.

A ``Timeout`` keeps its loop timer armed for ``timeout`` seconds after its last call, and that
timer holds the policy (so its whole pipeline) until then: an evicted pipeline is freed only
``timeout`` seconds after its last request. The policy here uses ``timeout=1``, and each
checkpoint waits that long before measuring, so what is measured is what stays.
"""

from __future__ import annotations

import asyncio
import gc
import platform
import tracemalloc

import httpx
from harness import script_parser
from resilience.integrations.httpx import HttpPolicy, ResilientTransport

TIMEOUT = 1.0


def answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


async def grow(max_origins: int, total: int, checkpoints: list[int]) -> list[tuple[int, int, int]]:
    """(origins seen, pipelines kept, bytes alive) at each checkpoint."""
    transport = ResilientTransport(
        httpx.MockTransport(answer), policy=HttpPolicy(timeout=TIMEOUT), max_origins=max_origins
    )
    rows = []
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(1, total + 1):
        request = httpx.Request("GET", f"http://host-{i}.test/")
        response = await transport.handle_async_request(request)
        await response.aclose()
        if i in checkpoints:
            await asyncio.sleep(TIMEOUT * 1.2)  # the evicted pipelines' timers fire
            gc.collect()
            alive = tracemalloc.get_traced_memory()[0] - base
            rows.append((i, len(transport.pipeline_names()), alive))
    tracemalloc.stop()
    return rows


async def run(total: int, unbounded_total: int) -> str:
    points = [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000]
    bounded = await grow(1024, total, [p for p in points if p <= total])
    unbounded = await grow(10**9, unbounded_total, [p for p in points if p <= unbounded_total])
    lines = [
        "# Memory per distinct origin",
        "",
        f"Python {platform.python_version()}, httpx {httpx.__version__}. Requests to distinct "
        "hosts through `ResilientTransport(httpx.MockTransport(...))` with "
        f"`HttpPolicy(timeout={TIMEOUT:g})`; memory alive after `gc.collect()`, measured by "
        "`tracemalloc`, once the evicted pipelines' `Timeout` timers have fired (a `Timeout` "
        "keeps its timer, and so its pipeline, for `timeout` seconds after its last call).",
        "",
        "| origins seen | max_origins | pipelines kept | memory alive | per origin seen |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows in (("1024 (default)", bounded), ("unbounded", unbounded)):
        for seen, kept, alive in rows:
            lines.append(
                f"| {seen:,} | {label} | {kept:,} | {alive / 2**20:,.1f} MiB | "
                f"{alive / seen / 1024:,.2f} KiB |"
            )
    flat = bounded[-1][2] / max(bounded[1][2], 1)
    lines += [
        "",
        f"With the bound, memory after {bounded[-1][0]:,} origins is {flat:.2f}x what it was "
        f"after {bounded[1][0]:,}: flat once the bound is reached. Unbounded, it grows "
        "linearly with the origins seen.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = script_parser(__doc__).parse_args()
    total, unbounded = (5_000, 2_000) if args.quick else (100_000, 20_000)
    report = asyncio.run(run(total, unbounded))
    print(report)
    if not args.quick:
        (args.out / "ORIGINS.md").write_text(report)


if __name__ == "__main__":
    main()
