"""A small TCP fault-injection proxy for tests: asyncio, loopback only, faults set at run time.

::

    proxy = FaultProxy("127.0.0.1", redis_port)
    await proxy.start()                       # listens on 127.0.0.1:<free port>
    store = RedisStore.from_url(proxy.url_for("redis"))
    proxy.latency = 0.05                      # both directions; or proxy.down.latency = ...
    proxy.blackhole = True                    # accept, read, discard, never answer
    proxy.cut()                               # close every open connection now
    proxy.refuse = True                       # nobody listens: connects get ECONNREFUSED
    await proxy.stop()

Each direction has its own :class:`Faults` (``proxy.up``: client -> target, ``proxy.down``:
target -> client): ``latency`` (seconds added to every chunk, a propagation delay: chunks keep
their order and do not queue behind each other's delay), ``jitter`` (a random extra in
``[0, jitter)`` drawn from a seeded generator), ``bandwidth`` (bytes per second) and
``blackhole`` (read and discard). ``kill_if(head)`` closes, at once, any connection whose
first bytes from the client make it true (say, a Redis ``SUBSCRIBE``), including those opened
later. Everything runs as tasks of the running loop, all cancelled by ``stop()``; every
connection's buffer is bounded (``max_chunks`` chunks of at most ``chunk_size`` bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Connection", "FaultProxy", "Faults"]

T = TypeVar("T")

_HEAD = 4096  # bytes of the client's first data kept for kill_if / inspection


@dataclass
class Faults:
    """The faults of one direction; plain attributes, read for every chunk."""

    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None
    blackhole: bool = False

    def clear(self) -> None:
        """No fault in this direction."""
        self.latency = self.jitter = 0.0
        self.bandwidth = None
        self.blackhole = False


class _BothWays(Generic[T]):
    """A fault set on both directions at once (``proxy.up`` and ``proxy.down``); read as
    ``read(up's, down's)``."""

    def __init__(self, read: Callable[[T, T], T]) -> None:
        self.read = read
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, proxy: FaultProxy, owner: type | None = None) -> T:
        return self.read(getattr(proxy.up, self.name), getattr(proxy.down, self.name))

    def __set__(self, proxy: FaultProxy, value: T) -> None:
        setattr(proxy.up, self.name, value)
        setattr(proxy.down, self.name, value)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s socket at once with a reset (SO_LINGER 0), dropping unsent data."""
    if writer is None:
        return
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Connection:
    """One proxied client connection and its two pumps."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.head = b""  # the client's first bytes (up to 4 KiB)
        self.bytes_up = 0
        self.bytes_down = 0
        self.held_up = 0  # bytes read from the client, not yet delivered to the target
        self.held_down = 0  # bytes read from the target (a reply in flight), not yet delivered
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.muted = False  # its traffic vanishes both ways (a connection dead without a reset)

    def close(self, *, reset: bool = True) -> None:
        """Reset both sockets now (``reset=False``: a graceful close); the pumps end."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.target):
            if writer is None:
                continue
            if reset:
                _abort(writer)
            else:
                writer.close()
        self.proxy._connections.discard(self)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``, injecting faults.

    ``seed`` seeds the jitter. Counters: ``accepted`` (connections accepted), ``bytes_up``
    (client -> target) and ``bytes_down`` (target -> client), ``active`` (open connections).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        seed: int = 0,
        chunk_size: int = 65_536,
        max_chunks: int = 64,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.up = Faults()
        self.down = Faults()
        self.kill_if: Callable[[bytes], bool] | None = None
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self.connect_timeout = connect_timeout
        self.port = 0
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._random = random.Random(seed)
        self._refuse = False
        self._server: asyncio.Server | None = None
        self._holder: socket.socket | None = None  # keeps the port while refusing
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"FaultProxy(127.0.0.1:{self.port} -> {self.target_host}:{self.target_port}, "
            f"up={self.up}, down={self.down}, refuse={self._refuse})"
        )

    # life cycle ------------------------------------------------------------------------------
    async def start(self) -> FaultProxy:
        """Listen on a free loopback port (``self.port``)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await self._listen(sock)
        return self

    async def _listen(self, sock: socket.socket) -> None:
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._accept, sock=sock)

    async def stop(self) -> None:
        """Stop listening, reset every connection, cancel (and await) every task."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._holder is not None:
            self._holder.close()
            self._holder = None
        self.cut()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        handlers = list(self._handlers)
        if handlers:  # each ends once its connection is closed (bounded: connect_timeout)
            await asyncio.wait(handlers, timeout=self.connect_timeout + 1)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def url_for(self, scheme: str, path: str = "") -> str:
        """``<scheme>://127.0.0.1:<port><path>``; ``redis`` gets ``/0`` by default."""
        if scheme == "redis" and not path:
            path = "/0"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    # faults ----------------------------------------------------------------------------------
    latency = _BothWays[float](max)  # seconds added to every chunk
    jitter = _BothWays[float](max)  # random extra delay per chunk in [0, jitter)
    bandwidth = _BothWays[float | None](lambda up, down: down)  # bytes/s (None: unlimited)
    blackhole = _BothWays[bool](lambda up, down: up and down)  # read and discard, never answer

    @property
    def refuse(self) -> bool:
        """While true nobody listens on the port: new connects fail with ECONNREFUSED."""
        return self._refuse

    async def set_refuse(self, on: bool) -> None:
        """Stop listening (the port stays reserved) or listen again on the same port."""
        if on == self._refuse:
            return
        self._refuse = on
        if on:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", self.port))  # bound, not listening: connects are refused
            self._holder = holder
        else:
            assert self._holder is not None
            holder, self._holder = self._holder, None
            await self._listen(holder)

    def clear(self) -> None:
        """Lift every per-direction fault and ``kill_if`` (``refuse`` has ``set_refuse``)."""
        self.up.clear()
        self.down.clear()
        self.kill_if = None

    def cut(self, which: Callable[[Connection], bool] | None = None) -> int:
        """Reset every open connection (or those ``which`` picks) now; how many were cut."""
        victims = [c for c in self._connections if which is None or which(c)]
        for conn in victims:
            conn.close()
        return len(victims)

    @property
    def active(self) -> int:
        """Connections open now."""
        return len(self._connections)

    @property
    def connections(self) -> list[Connection]:
        """The open connections (a copy)."""
        return list(self._connections)

    # plumbing --------------------------------------------------------------------------------
    def _spawn(
        self, coro: Coroutine[Any, Any, None], conn: Connection | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if conn is not None:
            conn.tasks.append(task)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A client connected: connect to the target and pump both ways (or swallow)."""
        self.accepted += 1
        conn = Connection(self, writer)
        self._connections.add(conn)
        handler = asyncio.current_task()
        if handler is not None:  # awaited by stop(), never cancelled (asyncio would log it)
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        reset = True
        try:
            if self.blackhole:
                await self._swallow(reader, conn)
                return
            try:
                async with asyncio.timeout(self.connect_timeout):
                    t_reader, t_writer = await asyncio.open_connection(
                        self.target_host, self.target_port
                    )
            except (OSError, TimeoutError):
                return
            conn.target = t_writer
            if conn.closed:  # cut while connecting
                _abort(t_writer)
                return
            up = self._spawn(self._pump(reader, t_writer, self.up, conn, True), conn)
            down = self._spawn(self._pump(t_reader, writer, self.down, conn, False), conn)
            results = await asyncio.gather(up, down, return_exceptions=True)
            reset = any(isinstance(r, BaseException) for r in results)
        finally:
            conn.close(reset=reset)

    async def _swallow(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        """A blackholed connection: read and discard until the client goes away."""
        while not conn.closed:
            try:
                data = await reader.read(self.chunk_size)
            except OSError:
                return
            if not data:
                return
            self._note_up(conn, data)

    def _note_up(self, conn: Connection, data: bytes) -> None:
        """Keep the client's first bytes; apply ``kill_if``."""
        if len(conn.head) < _HEAD:
            conn.head += data[: _HEAD - len(conn.head)]
        kill = self.kill_if
        if kill is not None and kill(conn.head):
            conn.close()

    @staticmethod
    def _hold(conn: Connection, upstream: bool, n: int) -> None:
        if upstream:
            conn.held_up += n
        else:
            conn.held_down += n

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faults: Faults,
        conn: Connection,
        upstream: bool,
    ) -> None:
        """Read chunks, stamp each with its delivery time, and let a writer task deliver them."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self.max_chunks)
        deliver = self._spawn(self._deliver(queue, writer, faults, conn, upstream), conn)
        loop = asyncio.get_running_loop()
        last = 0.0
        try:
            while not conn.closed:
                try:
                    data = await reader.read(self.chunk_size)
                except OSError:
                    conn.close()
                    break
                if not data:
                    break
                if upstream:
                    self._note_up(conn, data)
                    if conn.closed:
                        break
                if faults.blackhole or conn.muted:
                    continue
                delay = faults.latency
                if faults.jitter:
                    delay += self._random.random() * faults.jitter
                last = max(last, loop.time() + delay)  # order is kept
                self._hold(conn, upstream, len(data))
                await queue.put((last, data))
            await queue.put(None)
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        faults: Faults,
        conn: Connection,
        upstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                at, data = item
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._hold(conn, upstream, -len(data))
                if faults.blackhole or conn.closed:
                    continue
                sent = 0
                while sent < len(data):  # bandwidth: in slices, each followed by its time
                    rate = faults.bandwidth
                    piece = data[sent:] if not rate else data[sent : sent + max(1, int(rate / 50))]
                    writer.write(piece)
                    await writer.drain()
                    sent += len(piece)
                    if upstream:
                        conn.bytes_up += len(piece)
                        self.bytes_up += len(piece)
                    else:
                        conn.bytes_down += len(piece)
                        self.bytes_down += len(piece)
                    if rate:
                        await asyncio.sleep(len(piece) / rate)
        except OSError:
            conn.close()
