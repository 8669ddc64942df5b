"""Overload: goodput and tail latency of a fixed-capacity server offered more than it can do.

Usage::

    python benchmarks/overload.py            # about two and a half minutes; writes OVERLOAD.md
    python benchmarks/overload.py --quick    # a smoke test, a few seconds per point less
    python benchmarks/overload.py --out /tmp/overload --no-chart

The server (uvicorn in a separate process, loopback only) has ``CAPACITY`` workers (a
semaphore) and each request holds one for ``SERVICE`` seconds: it can answer
``CAPACITY / SERVICE`` requests per second, and anything beyond that queues inside the app.
``ResilienceMiddleware`` sits in front of it with one of several concurrency limits: none, a
fixed bulkhead tuned to the capacity, a fixed one four times too large, and the two adaptive
limits. A client offers 0.5x, 1x, 2x and 4x the capacity, open loop (requests start on a
fixed schedule, whatever happens to earlier ones) and gives up on a request after
``CLIENT_TIMEOUT`` seconds (the server goes on working on it: it cannot tell).

Per point: a fresh server, ``--warmup`` seconds not measured (the adaptive limits start at
their ``initial``), then ``--seconds`` measured. Goodput is the number of 200 responses
that arrived within ``SLO`` seconds, per second, as a share of the capacity; "p99 served"
is the 99th percentile latency of all 200 responses.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import script_parser, serve_asgi, start_server, stop_server

CAPACITY = 8  # workers
SERVICE = 0.1  # seconds per request on a worker
RATE = CAPACITY / SERVICE  # requests per second the server can answer
SLO = 0.3  # seconds: a response later than this is not "good"
CLIENT_TIMEOUT = 1.0  # seconds: the client gives up
LOADS = (0.5, 1.0, 2.0, 4.0)

START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
END = {"type": "http.response.body", "body": b"ok"}


def configs() -> dict[str, Any]:
    """The limits compared: ``max_concurrent=`` of the middleware (``None``: no limit)."""
    from resilience.rules.limits import AdaptiveLimit

    return {
        "no limit": None,
        f"fixed {CAPACITY} (well tuned)": CAPACITY,
        f"fixed {4 * CAPACITY} (badly tuned)": 4 * CAPACITY,
        "adaptive gradient2": AdaptiveLimit(initial=20, window=0.2, max_limit=500),
        "adaptive gradient2, tolerance 1.5, queue 4 (Netflix's defaults)": AdaptiveLimit(
            initial=20, window=0.2, tolerance=1.5, queue_size=4, max_limit=500
        ),
        "adaptive aimd": AdaptiveLimit(
            algorithm="aimd", latency_target=1.5 * SERVICE, initial=20, max_limit=500
        ),
    }


# --- the server process --------------------------------------------------------------------


def serve(name: str, port: int) -> None:
    """Run the fixed-capacity app behind the middleware configured as ``name`` (child)."""
    from resilience.integrations.asgi import ResilienceMiddleware

    workers = asyncio.Semaphore(CAPACITY)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        async with workers:
            await asyncio.sleep(SERVICE)
        await send(START)
        await send(END)

    limit = configs()[name]
    wrapped = app if limit is None else ResilienceMiddleware(app, max_concurrent=limit)
    serve_asgi(wrapped, port, backlog=4096)


# --- the client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One configuration at one offered load."""

    config: str
    load: float
    offered: float  # requests/s actually started in the measured part
    goodput: float  # share of the capacity answered 200 within the SLO
    served_p99: float | None  # seconds; None when nothing was served
    shed: float  # share of the requests answered 503
    lost: float  # share of the requests the client gave up on (or failed)


class Client:
    """A minimal HTTP/1.1 client on raw asyncio streams, with a keep-alive pool.

    Much cheaper per request than a full client, so that at 4x the client is not the
    bottleneck on a small machine. A request that takes longer than ``CLIENT_TIMEOUT`` in
    all is given up and its connection closed.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> int | None:
        """The status of one ``GET /``, or ``None`` if given up or failed."""
        connection = None
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                if self.idle:
                    connection = self.idle.pop()
                else:
                    connection = await asyncio.open_connection("127.0.0.1", self.port)
                reader, writer = connection
                writer.write(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
        except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError):
            if connection is not None:
                connection[1].close()
            return None
        self.idle.append(connection)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def offer(port: int, rps: float, warmup: float, seconds: float) -> list[tuple[float, Any]]:
    """Start requests at ``rps`` for ``warmup + seconds``; (latency, status) of the measured."""
    loop = asyncio.get_running_loop()
    measured: list[tuple[float, Any]] = []
    client = Client(port)

    async def one(keep: bool) -> None:
        began = loop.time()
        status = await client.get()
        if keep:
            measured.append((loop.time() - began, status))

    start = loop.time() + 0.05
    total = int(rps * (warmup + seconds))
    tasks = []
    for i in range(total):
        at = start + i / rps
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i >= rps * warmup)))
    await asyncio.gather(*tasks)
    client.close()
    return measured


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def measure(name: str, load: float, warmup: float, seconds: float) -> Point:
    proc, port = start_server(__file__, name)
    try:
        results = asyncio.run(offer(port, load * RATE, warmup, seconds))
    finally:
        stop_server(proc)
    n = len(results)
    served = [latency for latency, status in results if status == 200]
    good = sum(1 for latency in served if latency <= SLO)
    return Point(
        config=name,
        load=load,
        offered=n / seconds,
        goodput=good / seconds / RATE,
        served_p99=percentile(served, 0.99) if served else None,
        shed=sum(1 for _, status in results if status == 503) / n,
        lost=sum(1 for _, status in results if status not in (200, 503)) / n,
    )


# --- the report ----------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def report(points: list[Point], out: Path, args: argparse.Namespace, chart: bool) -> None:
    names = list(dict.fromkeys(p.config for p in points))
    table = {(p.config, p.load): p for p in points}
    unloaded = table[(names[0], LOADS[0])].served_p99 or SERVICE
    lines = [
        "# Overload: goodput and p99 under 0.5x to 4x the capacity",
        "",
        "Written by `benchmarks/overload.py` (its docstring has the method; "
        "[docs/overload.md](../docs/overload.md) reads the results).",
        "",
        f"- Server: uvicorn, {CAPACITY} workers, {SERVICE * 1000:.0f} ms of service time: "
        f"{RATE:.0f} requests/s; `ResilienceMiddleware(max_concurrent=...)` in front.",
        f"- Client: open loop on loopback, gives up after {CLIENT_TIMEOUT:g} s.",
        f"- Goodput: 200 responses within the {SLO * 1000:.0f} ms SLO, as a share of the capacity.",
        f"- Each point: a fresh server, {args.warmup:g} s of warm-up, {args.seconds:g} s measured.",
        "- Adaptive limits: 0.2 s windows (the default is 1 s) so that a few seconds suffice.",
        "",
        f"Unloaded p99 (no limit, 0.5x): {ms(unloaded)} ms.",
        "",
        "![goodput and p99 served by offered load](overload.png)",
        "",
    ]
    sections: list[tuple[str, Callable[[Point], str]]] = [
        ("Goodput (share of capacity)", lambda p: f"{p.goodput:.0%}"),
        ("p99 of what is served (ms)", lambda p: ms(p.served_p99)),
        (
            "Shed (503) / given up by the client, share of requests",
            lambda p: f"{p.shed:.0%} / {p.lost:.0%}",
        ),
    ]
    for title, cell in sections:  # a table each: a row per limit, a column per load
        lines += [
            f"## {title}",
            "",
            "| limit | " + " | ".join(f"{load:g}x" for load in LOADS) + " |",
            "| --- | " + " | ".join("---:" for _ in LOADS) + " |",
        ]
        for name in names:
            lines.append(
                f"| {name} | " + " | ".join(cell(table[(name, load)]) for load in LOADS) + " |"
            )
        lines.append("")
    lines += ["## Goals", ""]
    for name in names:
        if not name.startswith("adaptive"):
            continue
        bad = next(n for n in names if "badly" in n)
        overload = [table[(name, load)] for load in LOADS if load >= 2]
        goodput = min(p.goodput for p in overload)
        p99 = max((p.served_p99 or 0.0) for p in [table[(name, load)] for load in LOADS])
        never_worse = all(
            table[(name, load)].goodput >= table[(bad, load)].goodput - 0.02 for load in LOADS
        )
        lines.append(
            f"- {name}: goodput at 2x and 4x >= 90 % of capacity: "
            f"{'yes' if goodput >= 0.9 else 'no'} ({goodput:.0%}); p99 served <= 2x unloaded "
            f"p99 ({ms(2 * unloaded)} ms): {'yes' if p99 <= 2 * unloaded else 'no'} "
            f"({ms(p99)} ms); goodput never worse than the badly tuned bulkhead: "
            f"{'yes' if never_worse else 'no'}."
        )
    lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "OVERLOAD.md").write_text("\n".join(lines))
    if chart:
        plot(points, names, out / "overload.png")


def plot(points: list[Point], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {(p.config, p.load): p for p in points}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":", "-.", "-", "--"]
    markers = ["x", "s", "^", "o", "D", "v"]
    for i, name in enumerate(names):
        style = {"linestyle": styles[i % 6], "marker": markers[i % 6], "label": name}
        left.plot(LOADS, [table[(name, x)].goodput * 100 for x in LOADS], **style)
        p99 = [(table[(name, x)].served_p99 or math.nan) * 1000 for x in LOADS]
        right.plot(LOADS, p99, **style)
    left.set_title(f"goodput (200 within {SLO * 1000:.0f} ms), % of capacity")
    for axis in (left, right):
        axis.set_xlabel("offered load, x capacity")
        axis.set_xticks(LOADS)
        axis.grid(alpha=0.3)
    right.set_ylim(bottom=0)
    right.set_title("p99 latency of what is served, ms (no limit: nothing at 2x, 4x)")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = script_parser(__doc__, quick="1 s warm-up, 2 s measured")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--only", action="append", help="run only these configs (repeatable)")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if args.quick:
        args.seconds, args.warmup = 2.0, 1.0
    names = [n for n in configs() if not args.only or n in args.only]
    points = []
    for name in names:
        for load in LOADS:
            point = measure(name, load, args.warmup, args.seconds)
            points.append(point)
            print(
                f"{name:34} {load:>4g}x  offered {point.offered:6.0f}/s  goodput "
                f"{point.goodput:5.0%}  p99 {ms(point.served_p99):>5} ms  shed "
                f"{point.shed:4.0%}  lost {point.lost:4.0%}",
                flush=True,
            )
    report(points, args.out, args, chart=not args.no_chart)


if __name__ == "__main__":
    main()
