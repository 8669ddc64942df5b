"""Real Redis topologies for tests: a Sentinel setup (primary, replica, 3 sentinels) and a
3-primary Cluster, every process on a free loopback port and killed by its own pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from resilience import CircuitBreaker, CircuitOpenError, CircuitState

from .helpers import boom, wait_until
from .redis_server import free_port, redis_binary


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too.

    Both are picked below the kernel's ephemeral range (32768 and up), so no client
    connection can take them while a killed node waits to be restarted on them.
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 22768)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of cluster ports")


def redis_cli_binary() -> str | None:
    """`REDIS_CLI`, else the `redis-cli` beside the redis-server we use, else one on PATH."""
    explicit = os.environ.get("REDIS_CLI")
    if explicit:
        return explicit
    server = redis_binary()
    if server is not None:
        sibling = Path(server).with_name("redis-cli")
        if sibling.exists():
            return str(sibling)
    return shutil.which("redis-cli")


def command(port: int, *argv: str, timeout: float = 1.0) -> str:
    """Send one inline command to 127.0.0.1:`port`; the raw reply as text ('' if refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(" ".join(argv).encode() + b"\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                data += chunk
                if not chunk or _complete(data):
                    break
            return data.decode(errors="replace")
    except OSError:
        return ""


def _complete(data: bytes) -> bool:
    """Whether a RESP reply (simple, error, integer, or one bulk string) is complete."""
    if not data.endswith(b"\r\n"):
        return False
    if data[:1] != b"$":
        return data[:1] != b"*" or data.count(b"\r\n") >= 1 + 2 * int(data[1:].split(b"\r\n")[0])
    size = int(data[1:].split(b"\r\n", 1)[0])
    return size < 0 or len(data.split(b"\r\n", 1)[1]) >= size + 2


def info_field(port: int, section: str, field: str) -> str | None:
    """One field of `INFO section` (None if the server does not answer)."""
    reply = command(port, "INFO", section)
    for line in reply.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


class Node:
    """One redis-server process (a plain server, a replica, a sentinel or a cluster node)."""

    def __init__(self, binary: str, port: int, directory: Path, *extra: str) -> None:
        self.binary = binary
        self.port = port
        self.dir = directory
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        """Start (or restart on the same port and directory) and wait until it answers PING."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.extra[:1] == ("--sentinel",):  # a sentinel: its config file, then --sentinel
            argv = [self.binary, str(self.dir / "sentinel.conf"), *self.extra]
        else:
            argv = [self.binary, *self.extra]
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--protected-mode", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: command(self.port, "PING").startswith("+PONG"), 10, f"port {self.port}")
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process by its pid and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


_PERSIST_NOTHING = ("--save", "", "--appendonly", "no")


class SentinelSetup:
    """A primary, one replica and three sentinels monitoring them as `mymaster` (quorum 2)."""

    MASTER = "mymaster"

    def __init__(self, down_after_ms: int = 500, failover_timeout_ms: int = 2000) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("no redis-server")
        self.root = Path(tempfile.mkdtemp(prefix="resilience-sentinel-"))
        self.primary = Node(binary, free_port(), self.root / "primary", *_PERSIST_NOTHING)
        primary_port = self.primary.port
        self.replica = Node(
            binary,
            free_port(),
            self.root / "replica",
            *_PERSIST_NOTHING,
            "--replicaof",
            "127.0.0.1",
            str(primary_port),
        )
        self.sentinels: list[Node] = []
        for i in range(3):
            directory = self.root / f"sentinel{i}"
            directory.mkdir(parents=True)
            (directory / "sentinel.conf").write_text(
                f"sentinel monitor {self.MASTER} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} {down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
            )
            self.sentinels.append(Node(binary, free_port(), directory, "--sentinel"))

    @property
    def nodes(self) -> list[Node]:
        """Every process of the setup."""
        return [self.primary, self.replica, *self.sentinels]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """What `redis.asyncio.sentinel.Sentinel` is built from."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def master_port(self, sentinel: Node | None = None) -> int | None:
        """The primary's port as one sentinel sees it now."""
        node = sentinel or next(s for s in self.sentinels if s.alive)
        reply = command(node.port, "SENTINEL", "get-master-addr-by-name", self.MASTER)
        parts = [p for p in reply.split("\r\n") if p and p[0] not in "*$"]
        return int(parts[1]) if len(parts) == 2 else None

    def start(self) -> SentinelSetup:
        """Start everything; return once the replica is in sync and every sentinel sees both."""
        self.primary.start()
        self.replica.start()
        wait_until(
            lambda: info_field(self.replica.port, "replication", "master_link_status") == "up",
            10,
            "the replica to sync",
        )
        for sentinel in self.sentinels:
            sentinel.start()

        def known() -> bool:
            for s in self.sentinels:
                reply = command(s.port, "SENTINEL", "master", self.MASTER)
                if "num-other-sentinels\r\n$1\r\n2" not in reply:
                    return False
                if "num-slaves\r\n$1\r\n1" not in reply:
                    return False
            return True

        wait_until(known, 15, "the sentinels to discover each other and the replica")
        return self

    def stop(self) -> None:
        """Kill every process by pid; remove the directories."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class ClusterSetup:
    """Three cluster primaries (no replicas) on loopback, slots split by `redis-cli`."""

    def __init__(self, size: int = 3, full_coverage: bool = False, node_timeout: int = 1000):
        binary, cli = redis_binary(), redis_cli_binary()
        if binary is None or cli is None:
            raise RuntimeError("no redis-server / redis-cli")
        self.cli = cli
        self.root = Path(tempfile.mkdtemp(prefix="resilience-cluster-"))
        self.nodes: list[Node] = []
        for i in range(size):
            directory = self.root / f"node{i}"
            self.nodes.append(
                Node(
                    binary,
                    cluster_port(),
                    directory,
                    *_PERSIST_NOTHING,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(directory / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(node_timeout),
                    "--cluster-require-full-coverage",
                    "yes" if full_coverage else "no",
                )
            )

    def start(self) -> ClusterSetup:
        """Start the nodes, create the cluster, wait until every node says `cluster_state:ok`."""
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 20) -> None:
        """Until every live node reports `cluster_state:ok` and knows all of them."""

        def ok() -> bool:
            for node in self.nodes:
                if node.alive:
                    if info_field_cluster(node.port, "cluster_state") != "ok":
                        return False
                    if info_field_cluster(node.port, "cluster_known_nodes") != str(len(self.nodes)):
                        return False
            return True

        wait_until(ok, timeout, "cluster_state:ok")

    def stop(self) -> None:
        """Kill every node by pid; remove the directories."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def info_field_cluster(port: int, field: str) -> str | None:
    """One field of `CLUSTER INFO`."""
    for line in command(port, "CLUSTER", "INFO").splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


async def trip(b: CircuitBreaker, limit: float = 10.0) -> None:
    """Fail through `b` until it is open (bounded)."""
    deadline = time.monotonic() + limit
    while b.state is not CircuitState.OPEN:
        assert time.monotonic() < deadline, f"{b.name} did not open"
        with contextlib.suppress(ValueError, CircuitOpenError):
            await b.call(boom)
        await asyncio.sleep(0.001)
