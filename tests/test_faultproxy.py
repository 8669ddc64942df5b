"""The fault proxy itself, against a tiny echo server: each fault does what it says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from .faultproxy import FaultProxy
from .helpers import until


class Echo:
    """A loopback echo server that counts the bytes it received."""

    def __init__(self) -> None:
        self.received = 0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Echo:
        """Listen on a free loopback port."""
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while data := await reader.read(65_536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    """An echo server on a free loopback port."""
    server = await Echo().start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the echo server."""
    p = await FaultProxy("127.0.0.1", echo.port, seed=7).start()
    yield p
    await p.stop()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(proxy: FaultProxy) -> Stream:
    """A client connection to the proxy (bounded wait)."""
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 5)


async def close(stream: Stream) -> None:
    """Close a client connection, ignoring a reset."""
    stream[1].close()
    try:
        await stream[1].wait_closed()
    except OSError:
        pass


async def round_trip(stream: Stream, data: bytes = b"ping") -> float:
    """Send ``data``, read it back, return the seconds it took."""
    reader, writer = stream
    start = time.monotonic()
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(data)), 5)
    assert got == data
    return time.monotonic() - start


async def test_passes_data_through_and_counts_it(proxy: FaultProxy, echo: Echo) -> None:
    """Without faults bytes go both ways unchanged; connections and bytes are counted."""
    stream = await connect(proxy)
    await round_trip(stream, b"hello world")
    assert proxy.url_for("redis") == f"redis://127.0.0.1:{proxy.port}/0"
    assert (proxy.accepted, proxy.active) == (1, 1)
    assert (proxy.bytes_up, proxy.bytes_down, echo.received) == (11, 11, 11)
    await close(stream)
    await until(lambda: proxy.active == 0, 5, "the proxy closing its side")


async def test_latency_is_added_each_way(proxy: FaultProxy) -> None:
    """Latency delays every chunk in its direction; a round trip pays both directions."""
    stream = await connect(proxy)
    proxy.latency = 0.05
    assert await round_trip(stream) >= 0.1
    proxy.up.latency = 0.0
    took = await round_trip(stream)
    assert 0.05 <= took < 0.5
    await close(stream)


async def test_latency_is_a_delay_not_a_queue(proxy: FaultProxy) -> None:
    """Chunks sent together arrive together, in order, one latency later (not one each)."""
    reader, writer = await connect(proxy)
    proxy.down.latency = 0.1
    start = time.monotonic()
    for i in range(10):
        writer.write(b"%d," % i)
        await writer.drain()
        await asyncio.sleep(0.005)
    data = b"".join([b"%d," % i for i in range(10)])
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data
    assert 0.1 <= time.monotonic() - start < 0.6  # ten serial delays would be >= 1 s
    await close((reader, writer))


async def test_jitter_is_seeded_and_bounded(echo: Echo) -> None:
    """Jitter adds a random delay in [0, jitter); the same seed draws the same delays."""
    draws = []
    for _ in range(2):
        p = await FaultProxy("127.0.0.1", echo.port, seed=3).start()
        try:
            p.down.jitter = 0.05
            stream = await connect(p)
            took = [await round_trip(stream) for _ in range(5)]
            assert all(t < 0.5 for t in took)
            draws.append(p._random.random())
            await close(stream)
        finally:
            await p.stop()
    assert draws[0] == draws[1]


async def test_bandwidth_caps_the_rate(proxy: FaultProxy) -> None:
    """20 KB at 100 KB/s each way takes at least ~0.2 s."""
    stream = await connect(proxy)
    proxy.bandwidth = 100_000
    took = await round_trip(stream, b"x" * 20_000)
    assert took >= 0.15
    proxy.bandwidth = None
    assert await round_trip(stream, b"y" * 20_000) < took
    await close(stream)


async def test_cut_resets_open_connections_only(proxy: FaultProxy) -> None:
    """cut() closes every open connection now; new ones work."""
    reader, writer = await connect(proxy)
    await round_trip((reader, writer))
    assert proxy.cut() == 1
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    await close((reader, writer))
    assert proxy.active == 0
    stream = await connect(proxy)
    await round_trip(stream)
    await close(stream)


async def test_blackhole_accepts_and_never_answers(proxy: FaultProxy, echo: Echo) -> None:
    """A blackholed proxy accepts, reads and discards: nothing reaches the target or returns."""
    old = await connect(proxy)
    proxy.blackhole = True
    new = await connect(proxy)
    for reader, writer in (old, new):
        writer.write(b"anyone?")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.2)
    assert echo.received == 0
    assert proxy.bytes_up == 0
    assert proxy.accepted == 2
    proxy.blackhole = False
    await close(old)
    await close(new)
    stream = await connect(proxy)
    await round_trip(stream)
    await close(stream)


async def test_refuse_makes_connects_fail_then_listens_again(proxy: FaultProxy) -> None:
    """refuse: nobody listens on the port (ECONNREFUSED); lifted, the same port works."""
    port = proxy.port
    await proxy.set_refuse(True)
    assert proxy.refuse
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy)
    await proxy.set_refuse(False)
    assert proxy.port == port
    stream = await connect(proxy)
    await round_trip(stream)
    await close(stream)


async def test_kill_if_closes_matching_connections(proxy: FaultProxy) -> None:
    """kill_if closes a connection whose first bytes match, now and for later connections."""
    keep = await connect(proxy)
    await round_trip(keep, b"GET x")
    proxy.kill_if = lambda head: head.startswith(b"SUBSCRIBE")
    for _ in range(2):
        reader, writer = await connect(proxy)
        writer.write(b"SUBSCRIBE chan")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(14), 5)
        await close((reader, writer))
    await round_trip(keep, b"GET y")
    await close(keep)


async def test_a_dead_target_closes_the_client(echo: Echo) -> None:
    """When the target refuses, the proxy closes the client's connection at once."""
    await echo.stop()
    p = await FaultProxy("127.0.0.1", echo.port).start()
    try:
        reader, writer = await connect(p)
        try:
            assert await asyncio.wait_for(reader.read(1), 5) == b""
        except ConnectionResetError:
            pass  # reset or closed: either way at once
        await close((reader, writer))
    finally:
        await p.stop()


async def test_stop_ends_every_task(proxy: FaultProxy) -> None:
    """stop() closes connections and leaves no task of the proxy running."""
    streams = [await connect(proxy) for _ in range(3)]
    proxy.latency = 1.0
    for _, writer in streams:
        writer.write(b"slow")
    await until(lambda: sum(c.held_up for c in proxy.connections) == 12, 5, "the writes held")
    await proxy.stop()
    assert proxy.active == 0
    assert not proxy._tasks
    assert not proxy._handlers
    for stream in streams:
        await close(stream)
