"""An edge behind a firewall that passes only HTTPS: its mosquitto bridge goes through
``pfmon wss-tunnel`` to the centre's MQTT over WebSockets + TLS listener. Real brokers
(both started with what ``pfmon init`` generates), the real CLI, free ports for 443."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.tunnel.wss import Tunnel, client_ssl_context
from shared import topics
from shared.embedded import free_port, wait_port
from tests.test_security_broker import MOSQUITTO, Broker, Probe, init, wait_for

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        not Path(MOSQUITTO).exists(), reason="the mosquitto binary is not installed"
    ),
]
REPO = Path(__file__).resolve().parents[1]


def start_tunnel(url: str, ca: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "wss-tunnel",
            *("--url", url, "--listen", f"127.0.0.1:{port}", "--ca-file", str(ca)),
        ],
        cwd=REPO,
        stdout=out,
        stderr=out,
    )
    wait_port("127.0.0.1", port, timeout=15)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_the_edge_bridge_reaches_the_centre_over_wss_and_queues_while_it_is_down(
    tmp_path: Path, site_name: str
) -> None:
    ws_port, tunnel_port = free_port(), free_port()
    central = init(
        tmp_path / "central",
        "centre",
        role="central",
        websockets_port=ws_port,
        websockets_bind="127.0.0.1",
        broker_path=str(tmp_path / "central" / "secrets" / "broker"),
    )
    edge = init(
        tmp_path / "edge",
        site_name,
        role="edge",
        central=central.out,
        central_host="localhost",
        central_port=ws_port,
        central_tunnel=f"127.0.0.1:{tunnel_port}",
        broker_path=str(tmp_path / "edge" / "secrets" / "broker"),
    )
    bridge_conf = (edge.out / "broker" / "conf.d" / "bridge.conf").read_text()
    assert f"address 127.0.0.1:{tunnel_port}" in bridge_conf
    assert "bridge_cafile" not in bridge_conf  # TLS is the tunnel's, to the centre
    env = (tmp_path / "edge" / ".env").read_text()
    url = f"wss://localhost:{ws_port}/mqtt"
    assert f"PFM_CENTRAL_WSS_URL={url}" in env
    assert "COMPOSE_PROFILES=wss" in env  # deploy/edge/compose.yml starts the tunnel
    assert any("pfmon wss-tunnel" in note for note in edge.notes)

    centre = Broker(tmp_path / "central-broker", central.out).start()
    wait_port("127.0.0.1", ws_port, timeout=10)
    tunnel = start_tunnel(url, central.out / "ca.crt", tunnel_port, tmp_path / "tunnel.log")
    edge_broker = Broker(tmp_path / "edge-broker", edge.out).start()
    try:
        watcher = Probe(
            centre.port, central.out, "monitor", central.passwords["monitor"], clean=False
        )
        assert watcher.connect(), watcher.error
        watcher.subscribe(f"pfm/v1/{site_name}/#")
        analytics = Probe(edge_broker.port, edge.out, "analytics", edge.passwords["analytics"])
        actuator = Probe(edge_broker.port, edge.out, "actuator", edge.passwords["actuator"])
        assert analytics.connect(), analytics.error
        assert actuator.connect(), actuator.error
        metrics = topics.metrics(site_name, "m1")
        deadline = time.monotonic() + 20
        while not watcher.received(metrics) and time.monotonic() < deadline:
            analytics.publish(metrics, b'{"n": 0}')
            time.sleep(0.3)
        assert watcher.received(metrics), (
            f"bridge never forwarded: {edge_broker.log()}\n{(tmp_path / 'tunnel.log').read_text()}"
        )
        # it came through the tunnel, over the centre's websockets listener
        assert f"connected through {url}" in (tmp_path / "tunnel.log").read_text()
        actuator.publish(topics.command(site_name, "bank1"), b'{"cmd": 1}')
        actuator.publish(topics.state(site_name, "bank1"), b'{"state": 1}')
        wait_for(lambda: watcher.received(topics.state(site_name, "bank1")), "the state")
        assert watcher.received(topics.command(site_name, "bank1")) == [], "a command crossed"

        # the link goes down (the tunnel stops): the edge queues, and delivers when it is back
        stop(tunnel)
        queued = [f'{{"n": {i}}}'.encode() for i in range(1, 6)]
        for payload in queued:
            assert analytics.publish(metrics, payload).value == 0  # type: ignore[union-attr]
        time.sleep(0.5)
        assert not any(p in watcher.received(metrics) for p in queued)
        tunnel = start_tunnel(url, central.out / "ca.crt", tunnel_port, tmp_path / "tunnel.log")
        wait_for(
            lambda: all(p in watcher.received(metrics) for p in queued),
            f"the 5 queued metrics after the tunnel came back: {watcher.received(metrics)}",
            timeout=45,
        )
        got = [p for p in watcher.received(metrics) if p in queued]
        assert got == queued, "queued metrics arrived out of order or duplicated"
        for c in (watcher, analytics, actuator):
            c.close()
    finally:
        edge_broker.stop()
        stop(tunnel)
        centre.stop()


async def test_the_tunnel_refuses_a_centre_it_cannot_verify(tmp_path: Path) -> None:
    """A server certificate from another CA: the local connection is closed, nothing sent."""
    ws_port = free_port()
    central = init(
        tmp_path / "central",
        "centre",
        role="central",
        websockets_port=ws_port,
        websockets_bind="127.0.0.1",
        broker_path=str(tmp_path / "central" / "secrets" / "broker"),
    )
    other = init(tmp_path / "other", "elsewhere", role="central")
    centre = Broker(tmp_path / "central-broker", central.out).start()
    try:
        wait_port("127.0.0.1", ws_port, timeout=10)
        ctx = client_ssl_context(str(other.out / "ca.crt"))
        async with Tunnel(f"wss://localhost:{ws_port}/mqtt", ctx, port=0) as tunnel:
            reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
            writer.write(b"\x10\x00")  # the start of a CONNECT
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no CONNACK
            writer.close()
            assert tunnel.total == 0
        # the right CA: a CONNECT gets its CONNACK through the tunnel
        async with Tunnel(
            f"wss://localhost:{ws_port}/mqtt",
            client_ssl_context(str(central.out / "ca.crt")),
            port=0,
        ) as tunnel:
            reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
            # MQTT 3.1.1 CONNECT, client id "t", no credentials: refused (not authorised)
            writer.write(bytes([0x10, 13, 0, 4, *b"MQTT", 4, 2, 0, 30, 0, 1, *b"t"]))
            connack = await asyncio.wait_for(reader.readexactly(4), 10)
            assert connack[0] == 0x20 and connack[3] == 5  # CONNACK: not authorised
            writer.close()
            assert tunnel.total == 1
    finally:
        centre.stop()


def test_cli_refuses_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["wss-tunnel", "--url", "ws://centre/mqtt"])
    assert res.exit_code == 2 and "TLS is not optional" in res.output
    res = runner.invoke(app, ["wss-tunnel", "--url", "wss://centre/mqtt", "--listen", "8884"])
    assert res.exit_code == 2 and "expected HOST:PORT" in res.output
    missing = tmp_path / "nope.crt"
    res = runner.invoke(app, ["wss-tunnel", "--url", "wss://c/mqtt", "--ca-file", str(missing)])
    assert res.exit_code == 2 and "TLS files" in res.output
    res = runner.invoke(
        app,
        ["init", "--site", "centre", "--role", "central", "--out", str(tmp_path / "s"),
         "--env-file", str(tmp_path / ".env"), "--central-tunnel", "wss-tunnel:8884"],
    )  # fmt: skip
    assert res.exit_code == 2 and "only an edge's bridge dials the centre" in res.output
