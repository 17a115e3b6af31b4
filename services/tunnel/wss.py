"""A byte pipe from local TCP connections to an MQTT broker's WebSockets + TLS listener.

Mosquitto's bridges speak MQTT over TCP (with or without TLS) only: there is no
websockets transport for a bridge (``man mosquitto.conf``, CONFIGURING BRIDGES). An edge
whose firewall passes only HTTPS therefore points its bridge at this tunnel
(``address wss-tunnel:8884`` in ``bridge.conf``), and the tunnel carries each connection
to the centre's ``wss://HOST:443/mqtt``: every TCP connection becomes one WebSocket
(subprotocol ``mqtt``), the MQTT bytes travel in binary frames both ways, and either side
closing closes the other. It keeps no state and reads nothing: the bridge's persistent
session and its queue stay in the edge broker, which reconnects when the link is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

import aiohttp

log = logging.getLogger(__name__)

__all__ = ["Tunnel", "client_ssl_context"]

#: read size from the local connection (one MQTT packet may span several frames)
_CHUNK = 65536


def client_ssl_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """Verifies the broker against ``ca_file`` (the site CA; the system's when None) and
    its name; presents a client certificate when given (a proxy in front may ask)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


@dataclass
class Tunnel:
    """Listen on ``host``:``port``; carry each connection to ``url`` (``wss://...``)."""

    url: str
    ssl_context: ssl.SSLContext
    host: str = "127.0.0.1"
    port: int = 8884
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self.connections = 0  # open now
        self.total = 0  # carried since start
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Tunnel:
        self._session = aiohttp.ClientSession()
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("wss tunnel: %s:%d -> %s", self.host, self.port, self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self._session is not None:
            await self._session.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        assert self._session is not None
        try:
            ws = await self._session.ws_connect(
                self.url,
                protocols=("mqtt",),
                ssl=self.ssl_context,
                timeout=aiohttp.ClientWSTimeout(ws_close=5),
                autoping=True,
                max_msg_size=0,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("wss tunnel: %s unreachable for %s: %s", self.url, peer, exc)
            writer.close()
            return
        self.connections += 1
        self.total += 1
        log.info("wss tunnel: %s connected through %s", peer, self.url)
        try:
            async with asyncio.TaskGroup() as tg:
                up = tg.create_task(self._up(reader, ws), name="wss-up")
                down = tg.create_task(self._down(ws, writer), name="wss-down")
                up.add_done_callback(lambda _: down.cancel())
                down.add_done_callback(lambda _: up.cancel())
        except* (aiohttp.ClientError, OSError) as group:
            log.warning("wss tunnel: %s: %s", peer, group.exceptions[0])
        finally:
            self.connections -= 1
            await ws.close()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            log.info("wss tunnel: %s closed", peer)

    async def _up(self, reader: asyncio.StreamReader, ws: aiohttp.ClientWebSocketResponse) -> None:
        while chunk := await reader.read(_CHUNK):
            await ws.send_bytes(chunk)

    async def _down(
        self, ws: aiohttp.ClientWebSocketResponse, writer: asyncio.StreamWriter
    ) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()
            elif msg.type is aiohttp.WSMsgType.ERROR:
                raise ws.exception() or aiohttp.ClientError("websocket error")
