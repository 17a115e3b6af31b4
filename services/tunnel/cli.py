"""``pfmon wss-tunnel``: an edge's MQTT bridge over WebSockets + TLS (port 443)."""

from __future__ import annotations

import asyncio
import signal
from urllib.parse import urlsplit

import typer


def register(app: typer.Typer) -> None:
    @app.command("wss-tunnel")
    def _wss_tunnel(
        url: str = typer.Option(
            ..., "--url", help="The centre's MQTT over WebSockets: wss://HOST:443/mqtt."
        ),
        listen: str = typer.Option(
            "127.0.0.1:8884", "--listen", help="HOST:PORT the edge broker's bridge dials."
        ),
        ca_file: str | None = typer.Option(
            None, "--ca-file", help="CA that signed the centre's certificate (the site CA)."
        ),
        cert_file: str | None = typer.Option(None, "--cert-file", help="Client certificate."),
        key_file: str | None = typer.Option(None, "--key-file", help="Its private key."),
    ) -> None:
        """Carry the edge broker's bridge to the centre over wss:// (for firewalls that
        pass only HTTPS): mosquitto's bridges cannot speak WebSockets themselves."""
        from services.common import fail
        from services.tunnel.wss import Tunnel, client_ssl_context
        from shared.logs import setup_logging

        parts = urlsplit(url)
        if parts.scheme != "wss" or not parts.hostname:
            fail(f"--url {url!r}: expected wss://HOST[:PORT]/PATH (TLS is not optional)")
        host, _, port_text = listen.rpartition(":")
        if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            fail(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8884")
        try:
            ctx = client_ssl_context(ca_file, cert_file, key_file)
        except (OSError, ValueError) as exc:
            fail(f"TLS files: {exc}")
        setup_logging()

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                async with Tunnel(url, ctx, host, int(port_text)):
                    await stop.wait()
            except OSError as exc:
                fail(f"--listen {listen}: {exc.strerror or exc}")

        asyncio.run(main())
