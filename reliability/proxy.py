"""An asyncio TCP proxy on loopback whose faults are switched at run time.

Put between the consumer and the broker (``--url amqp://127.0.0.1:<proxy port>/``):

* :meth:`TcpProxy.drop` — reset every open connection at once (``SO_LINGER`` 0: RST),
  optionally refusing new ones for a while (the broker "unreachable");
* :meth:`TcpProxy.stall` — stop forwarding in both directions (bytes are held, not
  lost) until :meth:`TcpProxy.resume` or for a number of seconds;
* :meth:`TcpProxy.slow` — add latency before every forwarded chunk.

It runs on the caller's event loop and only ever listens on and connects to loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass

__all__ = ["ProxyStats", "TcpProxy"]

CHUNK = 65536


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    dropped: int = 0
    bytes_forwarded: int = 0


class TcpProxy:
    """Forwards ``host:port`` (``port`` 0: any free one) to ``target_host:target_port``."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.stats = ProxyStats()
        self.latency = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refuse_until = 0.0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._resume_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen; returns the port."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._resume_task is not None:
            self._resume_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def connections(self) -> int:
        return len(self._pairs)

    # ---- faults ---------------------------------------------------------------------------

    def drop(self, *, refuse_for: float = 0.0) -> int:
        """Reset every open connection; refuse new ones for ``refuse_for`` seconds.
        Returns how many connections were cut."""
        self._refuse_until = time.monotonic() + refuse_for
        cut = 0
        for client, upstream in list(self._pairs):
            for writer in (client, upstream):
                _reset(writer)
            self._pairs.discard((client, upstream))
            cut += 1
        self.stats.dropped += cut
        return cut

    def stall(self, seconds: float | None = None) -> None:
        """Hold all traffic (both directions) until :meth:`resume`, or ``seconds``."""
        self._flowing.clear()
        if seconds is not None:
            if self._resume_task is not None:
                self._resume_task.cancel()
            self._resume_task = asyncio.get_running_loop().create_task(self._resume_after(seconds))

    def resume(self) -> None:
        self._flowing.set()

    def slow(self, latency: float) -> None:
        """Delay every forwarded chunk by ``latency`` seconds (0: full speed)."""
        self.latency = latency

    async def _resume_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.resume()

    # ---- forwarding -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            self.stats.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.refused += 1
            _reset(writer)
            return
        self.stats.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, pair)),
            asyncio.create_task(self._pump(up_reader, writer, pair)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while True:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    break
                await self._flowing.wait()
                if self.latency:
                    await asyncio.sleep(self.latency)
                if pair not in self._pairs:
                    break  # dropped meanwhile
                writer.write(chunk)
                await writer.drain()
                self.stats.bytes_forwarded += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            if pair in self._pairs:
                self._pairs.discard(pair)
                for side in pair:
                    with contextlib.suppress(Exception):
                        side.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (no FIN handshake): what a cut network looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
