"""The ``resilience`` command: ``resilience demo`` shows a breaker protecting a flaky service."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence

from . import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    Fallback,
    Pipeline,
    ResilienceTimeoutError,
    Retry,
    StateChanged,
    Timeout,
)
from .events import Event

__all__ = ["main"]


async def demo(
    duration: float, seed: int | None, out: Callable[[str], object] = print
) -> Counter[str]:
    """Call a flaky coroutine through a pipeline for ``duration`` seconds; return the tally.

    The fake upstream is healthy, then fails for a while, then recovers: the breaker opens,
    probes, and closes again, and the terminal shows each state change as it happens.
    """
    rng = random.Random(seed)
    write = out
    loop = asyncio.get_running_loop()
    start = loop.time()
    tally: Counter[str] = Counter()

    def phase() -> str:
        t = (loop.time() - start) / duration
        return "healthy" if t < 0.3 else "failing" if t < 0.6 else "recovering"

    async def upstream(i: int) -> str:
        p = phase()
        fail = {"healthy": 0.05, "failing": 1.0, "recovering": 0.1}[p]
        await asyncio.sleep(rng.uniform(0.001, 0.004))
        if rng.random() < 0.03:
            await asyncio.sleep(0.2)  # a slow call: the timeout cuts it
        if rng.random() < fail:
            tally["upstream errors"] += 1
            raise ConnectionError(f"upstream failed call {i}")
        return f"answer {i}"

    def on_event(event: Event) -> None:
        if isinstance(event, StateChanged):
            at = loop.time() - start
            write(f"[{at:6.2f}s] breaker {event.name!r}: {event.old} -> {event.new}")

    breaker = CircuitBreaker(
        "upstream",
        window=CountWindow(20),
        minimum_calls=10,
        open_for=max(0.2, duration / 10),
        listeners=[on_event],
    )
    policy = Pipeline(
        Fallback(on=(ConnectionError, CircuitOpenError, ResilienceTimeoutError), value="cached"),
        Retry(on=(ConnectionError, ResilienceTimeoutError), attempts=2),
        breaker,
        Timeout(0.1),
        Bulkhead(8),
    )
    write(f"calling a flaky upstream for {duration:g}s through {policy!r}")
    counter = iter(range(1, 1 << 62))

    async def client() -> None:
        while loop.time() - start < duration:
            result = await policy.call(upstream, next(counter))
            tally["calls"] += 1
            tally["fallbacks" if result == "cached" else "answers"] += 1
            await asyncio.sleep(0.005)

    await asyncio.gather(*(client() for _ in range(4)))
    m = breaker.metrics()
    write(
        f"done: {tally['calls']} calls, {tally['answers']} answered, "
        f"{tally['fallbacks']} served from the fallback, "
        f"{tally['upstream errors']} upstream errors absorbed; breaker is {m.state}"
    )
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resilience`` command."""
    parser = argparse.ArgumentParser(prog="resilience", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run a short demo of a breaker protecting a flaky call")
    p_demo.add_argument("--duration", type=float, default=6.0, help="seconds to run (default 6)")
    p_demo.add_argument("--seed", type=int, default=None, help="random seed")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if not 0 < args.duration <= 3600:
            parser.error("--duration must be in (0, 3600] seconds")
        asyncio.run(demo(args.duration, args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
