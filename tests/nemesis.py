"""The nemesis: a fleet of replicas under load while Redis fails, at random from a seed.

Redis is paused, restarted empty, cut, slowed, failed over and has its clock stepped; the
checker (``tests/nemesis_check.py``) then holds what the replicas saw against the docs'
promises.

The setup: a Sentinel pair (primary, replica, three sentinels; ``tests/cluster_support.py``),
one fault proxy per Redis (``tests/faultproxy.py``, in this process's event loop), and
``replicas`` processes (``tests/nemesis_replica.py``), each running ``ResilienceMiddleware``
(a fleet-wide bulkhead of ``limit`` on shares and a rate limit of ``rate``/s, burst
``burst``) and a shared ``CircuitBreaker`` on a ``RedisStore`` over a Sentinel client that
reaches each Redis through its proxy. A shared 16-byte file carries Redis's clock offset (the
time every replica's scripts see) and whether the upstream behind the breaker is sick.

The faults (``KINDS``), drawn by ``schedule(seed, ...)`` before the run, so a seed always
gives the same sequence: the first ``len(kinds)`` faults are every kind once, in a seeded
order, then again and again; each after a seeded quiet gap. Everything starts on loopback
and is killed by its own pid at the end, also when the run fails.

Run it long from the command line::

    python -m tests.nemesis --seconds 600 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import mmap
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .cluster_support import Node, SentinelSetup, command
from .faultproxy import FaultProxy
from .nemesis_check import Fault, History, ReplicaLog, Settings, Verdict, check
from .nemesis_replica import CONTROL

__all__ = ["KINDS", "Options", "Planned", "check_run", "run", "schedule"]

KINDS = (
    "pause",  # SIGSTOP the primary, SIGCONT after `duration`
    "restart",  # SIGKILL the primary and start it again at once, empty, on the same port
    "slow",  # the primary's proxy delays every chunk by `latency` + up to `jitter`
    "blackhole",  # the primary's proxy swallows everything, both ways
    "cut",  # the primary's proxy resets every connection, `times` times over `duration`
    "refuse",  # nobody listens on the primary's proxy (its connections reset)
    "clock",  # Redis's clock, as every script sees it, jumps by `step` seconds
    "failover",  # SENTINEL FAILOVER: the replica is promoted, the old primary demoted
    "failover-kill",  # SIGKILL the primary, the sentinels promote the replica; restart it
)
MAX_OFFSET = 5.0  # s: Redis's clock stays within this of the machine's (smaller than a lease)
REPLICA_SCRIPT = Path(__file__).with_name("nemesis_replica.py")
now = time.monotonic


@dataclass(frozen=True)
class Planned:
    """A fault of the schedule: its kind, the quiet ``gap`` before it, and its parameters."""

    kind: str
    gap: float
    params: dict[str, float] = field(default_factory=dict)


def _draw(rng: random.Random, kind: str, pace: float, offset: float) -> dict[str, float]:
    """The parameters of one fault of ``kind`` (``offset``: Redis's clock offset so far)."""
    if kind in ("pause", "blackhole", "refuse"):
        return {"duration": round(rng.uniform(0.3, 1.5) * pace, 3)}
    if kind == "slow":
        return {
            "latency": round(rng.uniform(0.02, 0.2), 3),
            "jitter": round(rng.uniform(0.0, 0.1), 3),
            "duration": round(rng.uniform(0.5, 2.0) * pace, 3),
        }
    if kind == "cut":
        return {"times": rng.randint(1, 5), "duration": round(rng.uniform(0.0, 1.0) * pace, 3)}
    if kind == "clock":
        step = rng.uniform(0.5, MAX_OFFSET) * rng.choice((-1, 1))
        if abs(offset + step) > MAX_OFFSET:
            step = -step
        return {"step": round(step, 3)}
    return {}


def schedule(
    seed: int, seconds: float, *, kinds: tuple[str, ...] = KINDS, pace: float = 1.0
) -> list[Planned]:
    """The faults of a run of ``seconds``, from ``seed`` alone (more than fit: the run stops
    at its deadline). Every kind comes once in each round, in a seeded order; ``pace``
    scales the gaps and the durations."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {KINDS}, got {kinds!r}")
    rng = random.Random(seed)
    planned: list[Planned] = []
    offset = 0.0
    budget = 0.0
    deck: list[str] = []
    while budget < 2 * seconds + 10:
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        gap = round(rng.uniform(0.5, 3.0) * pace, 3)
        params = _draw(rng, kind, pace, offset)
        offset += params.get("step", 0.0)
        planned.append(Planned(kind, gap, params))
        budget += gap + params.get("duration", 1.0)
    return planned


@dataclass(frozen=True, kw_only=True)
class Options:
    """A run's knobs; ``seed``, ``seconds``, ``pace`` and ``kinds`` make its schedule."""

    seed: int = 1
    seconds: float = 8.0
    pace: float = 1.0
    kinds: tuple[str, ...] = KINDS
    replicas: int = 4
    clients: int = 5  # load loops per replica
    limit: int = 4  # the fleet-wide bulkhead
    rate: float = 200.0  # the fleet-wide rate limit, per second
    burst: int = 20
    timeout: float = 0.25  # the store's
    sync_interval: float = 0.05
    service: tuple[float, float] = (0.01, 0.04)  # s: the upstream's time
    think: tuple[float, float] = (0.01, 0.05)  # s: a load loop's pause between requests
    settle: float = 3.0  # s of quiet after the last fault (recovery, agreement)
    down_after_ms: int = 2000  # the sentinels' (a pause stays shorter)

    def replay(self) -> str:
        """The command that runs this again."""
        kinds = "" if self.kinds == KINDS else f" --kinds {','.join(self.kinds)}"
        return (
            f"python -m tests.nemesis --seed {self.seed} --seconds {self.seconds:g} "
            f"--pace {self.pace:g} --settle {self.settle:g}{kinds}"
        )


class Control:
    """The shared file the replicas read (``nemesis_replica.Control``): Redis's clock offset
    and the upstream's health; one write reaches every replica at once."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="resilience-nemesis-")
        os.write(fd, bytes(CONTROL.size))
        self._map = mmap.mmap(fd, CONTROL.size)
        os.close(fd)
        self.offset = 0.0
        self.sick = False

    def _write(self) -> None:
        CONTROL.pack_into(self._map, 0, self.offset, float(self.sick))

    def set_offset(self, offset: float) -> None:
        self.offset = offset
        self._write()

    def set_sick(self, sick: bool) -> None:
        self.sick = sick
        self._write()

    def close(self) -> None:
        self._map.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class Topology:
    """The Sentinel pair, a fault proxy per Redis, the shared control file; and the faults."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.setup = SentinelSetup(
            down_after_ms=opts.down_after_ms, failover_timeout_ms=opts.down_after_ms * 2
        )
        self.nodes = [self.setup.primary, self.setup.replica]
        self.proxies: dict[int, FaultProxy] = {}
        self.control = Control()
        self.offsets: list[tuple[float, float]] = []

    async def start(self) -> None:
        await asyncio.to_thread(self.setup.start)
        for node in self.nodes:
            self.proxies[node.port] = await FaultProxy(
                "127.0.0.1", node.port, seed=self.opts.seed
            ).start()

    async def stop(self) -> None:
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                await proxy.stop()
        for node in self.nodes:  # a paused one too: SIGKILL ends a stopped process
            with contextlib.suppress(Exception):
                node.kill()
        await asyncio.to_thread(self.setup.stop)
        self.control.close()

    @property
    def ports(self) -> dict[int, int]:
        """Each Redis's port -> its proxy's port."""
        return {port: proxy.port for port, proxy in self.proxies.items()}

    async def masters(self) -> set[int | None]:
        """The primary's port as each sentinel sees it now."""
        return {
            await asyncio.to_thread(self.setup.master_port, s)
            for s in self.setup.sentinels
            if s.alive
        }

    async def primary(self) -> Node:
        """The node every sentinel names as the primary (the first one's word if they differ)."""
        port = await asyncio.to_thread(self.setup.master_port)
        return next((n for n in self.nodes if n.port == port), self.nodes[0])

    async def until_primary_is_not(self, old: int, limit: float) -> str:
        """Wait until every sentinel names another primary than ``old`` (bounded); "" or
        what went wrong."""
        deadline = now() + limit
        while now() < deadline:
            seen = await self.masters()
            if len(seen) == 1 and None not in seen and old not in seen:
                return ""
            await asyncio.sleep(0.05)
        flags = await asyncio.to_thread(
            command, self.setup.sentinels[0].port, "SENTINEL", "MASTER", self.setup.MASTER
        )
        return (
            f"no new primary within {limit:g} s: the sentinels name {sorted(map(str, seen))} "
            f"(old {old}); sentinel 0 says {flags.split()[:40]}"
        )

    async def restart_empty(self, node: Node) -> None:
        """Start ``node`` again on its port, empty, as a primary (the sentinels demote it if
        another one was promoted meanwhile)."""
        extra = list(node.extra)
        if "--replicaof" in extra:
            at = extra.index("--replicaof")
            del extra[at : at + 3]
        node.extra = tuple(extra)
        await asyncio.to_thread(node.start)

    def step_clock(self, step: float) -> None:
        self.control.set_offset(self.control.offset + step)
        self.offsets.append((now(), self.control.offset))

    async def apply(self, planned: Planned) -> Fault:
        """Make one fault; return it with its times."""
        p = planned.params
        duration = p.get("duration", 0.0)
        node = await self.primary()
        proxy = self.proxies[node.port]
        start = now()
        heal = None
        note = ""
        if planned.kind == "pause":
            os.kill(node.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(duration)
            finally:
                os.kill(node.pid, signal.SIGCONT)
        elif planned.kind == "restart":
            await asyncio.to_thread(node.kill)
            await self.restart_empty(node)
        elif planned.kind == "slow":
            proxy.latency, proxy.jitter = p["latency"], p["jitter"]
            try:
                await asyncio.sleep(duration)
            finally:
                proxy.clear()
            await asyncio.sleep(p["latency"] + p["jitter"])  # the last delayed chunks land
        elif planned.kind == "blackhole":
            proxy.blackhole = True
            try:
                await asyncio.sleep(duration)
            finally:
                proxy.blackhole = False
        elif planned.kind == "cut":
            times = int(p["times"])
            for i in range(times):
                proxy.cut()
                if i + 1 < times:
                    await asyncio.sleep(duration / (times - 1))
        elif planned.kind == "refuse":
            await proxy.set_refuse(True)
            proxy.cut()
            try:
                await asyncio.sleep(duration)
            finally:
                await proxy.set_refuse(False)
        elif planned.kind == "clock":
            self.step_clock(p["step"])
        elif planned.kind == "failover":
            reply = await asyncio.to_thread(
                command, self.setup.sentinels[0].port, "SENTINEL", "FAILOVER", self.setup.MASTER
            )
            if not reply.startswith("+OK"):
                note = f"refused: {reply.strip()}"
            else:
                # the sentinels give up a promotion after their failover timeout
                note = await self.until_primary_is_not(node.port, self.opts.down_after_ms / 500)
        elif planned.kind == "failover-kill":
            await asyncio.to_thread(node.kill)
            note = await self.until_primary_is_not(node.port, 20.0)
            heal = now()
            await self.restart_empty(node)
        else:  # pragma: no cover - schedule() checks the kinds
            raise ValueError(planned.kind)
        end = now()
        return Fault(planned.kind, dict(p), start, heal or end, end, note)


class ReplicaProcess:
    """One replica process: started, read, stopped, killed by its pid if need be."""

    def __init__(self, index: int, config: dict[str, Any], root: Path) -> None:
        self.index = index
        self.config_path = root / f"replica{index}.json"
        self.config_path.write_text(json.dumps(config))
        self.stderr_path = root / f"replica{index}.err"
        self.log = ReplicaLog()
        self.ready = asyncio.Event()
        self.done: dict[str, Any] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None

    def _stderr(self) -> Any:
        return self.stderr_path.open("wb")

    async def start(self) -> None:
        with self._stderr() as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(REPLICA_SCRIPT),
                str(self.config_path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=1 << 24,
            )
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            report = json.loads(line)
            if "ready" in report:
                self.ready.set()
            elif "done" in report:
                self.done = report["done"]
            else:
                self.log.add(report)
        self.ready.set()  # ended: nobody waits for it any more

    def stderr_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.stderr_path.read_text().splitlines()[-lines:])
        return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, limit: float = 10.0) -> None:
        """Ask it to stop (a line on stdin, then EOF); wait for its last reports (bounded)."""
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write(b"stop\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self.proc.wait()
                if self.reader is not None:
                    await self.reader
        if self.done is None:
            self.log.exit = f"it did not end cleanly; its stderr:\n{self.stderr_tail()}"

    def kill(self) -> None:
        """SIGKILL it by its pid if it still runs."""
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)


async def _sicken(control: Control, rng: random.Random, pace: float, log: list[Any]) -> None:
    """The upstream behind the breaker: healthy for a while, sick for a while (seeded)."""
    while True:
        await asyncio.sleep(rng.uniform(1.5, 4.0) * pace)
        control.set_sick(True)
        log.append((now(), True))
        await asyncio.sleep(rng.uniform(0.4, 1.2) * pace)
        control.set_sick(False)
        log.append((now(), False))


async def run(opts: Options) -> History:
    """Start everything, load the fleet, make the faults, stop everything; the history."""
    planned = schedule(opts.seed, opts.seconds, kinds=opts.kinds, pace=opts.pace)
    settings = Settings(
        replicas=opts.replicas,
        limit=opts.limit,
        rate=opts.rate,
        burst=opts.burst,
        ahead=0.05,  # resilience.ratelimit.AHEAD, which the middleware gives its limiter
        timeout=opts.timeout,
        sync_interval=opts.sync_interval,
    )
    root = Path(tempfile.mkdtemp(prefix="resilience-nemesis-"))
    topology = Topology(opts)
    replicas: list[ReplicaProcess] = []
    sick_log: list[tuple[float, bool]] = []
    sicken: asyncio.Task[None] | None = None
    try:
        await topology.start()
        prefix = f"nemesis{opts.seed}"
        for i in range(opts.replicas):
            config = {
                "seed": opts.seed * 100 + i,
                "sentinels": topology.setup.sentinel_addresses,
                "master": topology.setup.MASTER,
                "ports": topology.ports,
                "prefix": prefix,
                "name": "nemesis",
                "limit": opts.limit,
                "rate": opts.rate,
                "burst": opts.burst,
                "timeout": opts.timeout,
                "sync_interval": opts.sync_interval,
                "clients": opts.clients,
                "service": opts.service,
                "think": opts.think,
                "control": topology.control.path,
                "max_seconds": opts.seconds + opts.settle + 120,
            }
            replicas.append(ReplicaProcess(i, config, root))
        for replica in replicas:
            await replica.start()
        async with asyncio.timeout(60):
            await asyncio.gather(*(r.ready.wait() for r in replicas))
        dead = [r for r in replicas if r.reader is not None and r.reader.done()]
        if dead:
            raise RuntimeError(f"replica {dead[0].index} did not start:\n{dead[0].stderr_tail()}")
        started = now()
        topology.offsets.append((started, 0.0))
        history = History(settings=settings, seed=opts.seed, started=started, ended=started)
        history.replay = opts.replay()
        sicken = asyncio.create_task(
            _sicken(topology.control, random.Random(opts.seed + 1), opts.pace, sick_log)
        )
        deadline = started + opts.seconds
        for fault in planned:
            if now() + fault.gap >= deadline:
                break
            await asyncio.sleep(fault.gap)
            history.faults.append(await topology.apply(fault))
            if now() >= deadline:
                break
        sicken.cancel()
        await asyncio.gather(sicken, return_exceptions=True)
        topology.control.set_sick(False)
        await asyncio.sleep(opts.settle)
        history.ended = now()
        await asyncio.gather(*(r.stop() for r in replicas))
        history.offsets = list(topology.offsets)
        history.sick = list(sick_log)
        history.replicas = [r.log for r in replicas]
        return history
    finally:
        if sicken is not None:
            sicken.cancel()
        for replica in replicas:
            replica.kill()
        for replica in replicas:
            if replica.proc is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await replica.proc.wait()
            if replica.reader is not None:
                replica.reader.cancel()
        await topology.stop()
        await asyncio.to_thread(shutil.rmtree, root, True)


async def check_run(opts: Options) -> Verdict:
    """Run, then check."""
    return check(await run(opts))


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.nemesis``: one run, its report; exit 1 if a promise broke."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--pace", type=float, default=1.0, help="scales gaps and durations")
    parser.add_argument("--settle", type=float, default=3.0, help="quiet seconds at the end")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--save", type=Path, help="write the merged history there (JSON)")
    args = parser.parse_args(argv)
    opts = replace(
        Options(),
        seed=args.seed,
        seconds=args.seconds,
        pace=args.pace,
        settle=args.settle,
        kinds=tuple(k for k in args.kinds.split(",") if k),
    )
    history = asyncio.run(run(opts))
    if args.save is not None:
        args.save.write_text(json.dumps(dataclasses.asdict(history)))
    verdict = check(history)
    print(verdict.report())
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
