"""MQTT over WebSockets + TLS: the listener ``pfmon init --websockets-port`` adds, on the
real ``mosquitto`` binary started with the generated configuration, reached by real
aiomqtt and paho clients over ``wss://`` (a free port stands in for 443)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner

from services.cli import app
from services.init import InitResult, websockets_conf
from shared import topics
from shared.embedded import free_port, wait_port
from shared.errors import ConfigError
from tests.test_security_broker import MOSQUITTO, Broker, init

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not Path(MOSQUITTO).exists(), reason="the mosquitto binary is not installed"
    ),
]


def test_the_listener_is_generated_only_when_asked(tmp_path: Path) -> None:
    plain = init(tmp_path / "plain", "centre", role="central")
    assert not (plain.out / "broker" / "conf.d" / "websockets.conf").exists()
    ws = init(tmp_path / "ws", "centre", role="central", websockets_port=443)
    conf = (ws.out / "broker" / "conf.d" / "websockets.conf").read_text()
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "listener 443",
        "protocol websockets",
        "cafile /mosquitto/secrets/ca.crt",
        "certfile /mosquitto/secrets/server.crt",
        "keyfile /mosquitto/secrets/server.key",
    ]
    # a rotation without the option turns the listener off again
    init(tmp_path / "ws", "centre", role="central", force=True)
    assert not (ws.out / "broker" / "conf.d" / "websockets.conf").exists()
    with pytest.raises(ConfigError) as info:
        init(tmp_path / "bad", "centre", role="central", websockets_port=70000)
    assert "--websockets-port: 70000 is not a TCP port (1-65535)" in info.value.problems
    with pytest.raises(ConfigError):
        websockets_conf(port=0, secrets_path="/x")


def test_cli_init_takes_the_websockets_port(tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    args = ["init", "--site", "centre", "--role", "central", "--out", str(out)]
    res = CliRunner().invoke(
        app, [*args, "--env-file", str(tmp_path / ".env"), "--websockets-port", "443"]
    )
    assert res.exit_code == 0, res.output
    assert "listener 443" in (out / "broker" / "conf.d" / "websockets.conf").read_text()


# -- against the real broker ----------------------------------------------------------------


class Centre:
    """A central broker from ``pfmon init --role central --websockets-port`` with one edge
    registered (its bridge user), both listeners on free loopback ports."""

    def __init__(self, tmp: Path, edge_site: str) -> None:
        self.ws_port = free_port()
        secrets = tmp / "central" / "secrets" / "broker"
        self.central: InitResult = init(
            tmp / "central",
            "centre",
            role="central",
            websockets_port=self.ws_port,
            websockets_bind="127.0.0.1",
            broker_path=str(secrets),
        )
        self.edge: InitResult = init(
            tmp / "edge",
            edge_site,
            role="edge",
            central=self.central.out,
            central_host="127.0.0.1",
        )
        self.broker = Broker(tmp / "central-broker", self.central.out)
        self.ca = str(self.central.out / "ca.crt")

    def __enter__(self) -> Centre:
        self.broker.start()
        try:
            wait_port("127.0.0.1", self.ws_port, timeout=10)
        except Exception:
            self.broker.stop()
            raise AssertionError(f"no websockets listener: {self.broker.log()}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.stop()


class WssProbe:
    """A paho client over wss:// that records CONNACK and PUBACK reason codes."""

    def __init__(self, port: int, user: str, password: str, ca: str | None, tls: bool = True):
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            f"wss-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
            transport="websockets",
        )
        self.client.ws_set_options(path="/mqtt")
        if tls:
            self.client.tls_set(ca_certs=ca)  # no client certificate
        self.client.username_pw_set(user, password)
        self.connack: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.done = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish

    def _on_connect(self, client, userdata, flags, rc, props=None) -> None:  # type: ignore[no-untyped-def]
        self.connack = rc
        self.done.set()

    def _on_publish(self, client, userdata, mid, rc, props=None) -> None:  # type: ignore[no-untyped-def]
        self.pubacks[mid] = rc

    def connect(self) -> str:
        """'ok', the CONNACK's reason, or the error that stopped the connection."""
        try:
            self.client.connect("127.0.0.1", self.port)
        except (OSError, ssl.SSLError, paho.WebsocketConnectionError) as exc:
            return f"{type(exc).__name__}: {exc}"
        self.client.loop_start()
        self.done.wait(5)
        if self.connack is None:
            self.client.loop_stop()
            return "no CONNACK"
        if self.connack.is_failure:
            self.client.loop_stop()
            return str(self.connack)
        return "ok"

    def publish(self, topic: str) -> int:
        info = self.client.publish(topic, b"{}", qos=1)
        deadline = time.monotonic() + 5
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pubacks[info.mid].value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_bridge_user_publishes_over_wss_and_the_centre_delivers(
    tmp_path: Path, site_name: str
) -> None:
    with Centre(tmp_path, site_name) as c:
        tls = aiomqtt.TLSParameters(ca_certs=c.ca)
        monitor = aiomqtt.Client(
            "127.0.0.1",
            c.ws_port,
            identifier=f"mon-{site_name}",
            username="monitor",
            password=c.central.passwords["monitor"],
            transport="websockets",
            websocket_path="/mqtt",
            tls_params=tls,
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        bridge = f"bridge-{site_name}"
        edge = aiomqtt.Client(
            "127.0.0.1",
            c.ws_port,
            identifier=f"edge-{site_name}",
            username=bridge,
            password=c.edge.passwords[bridge],
            transport="websockets",
            websocket_path="/mqtt",
            tls_params=tls,
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        topic = topics.metrics(site_name, "m1")
        async with monitor, edge:
            await monitor.subscribe(f"pfm/v1/{site_name}/#", qos=1)
            await edge.publish(topic, b'{"n": 1}', qos=1)
            async with asyncio.timeout(5):
                async for message in monitor.messages:
                    assert str(message.topic) == topic and message.payload == b'{"n": 1}'
                    break


def test_wss_keeps_the_acl_and_refuses_bad_logins(tmp_path: Path, site_name: str) -> None:
    with Centre(tmp_path, site_name) as c:
        bridge = f"bridge-{site_name}"
        good = WssProbe(c.ws_port, bridge, c.edge.passwords[bridge], c.ca)
        assert good.connect() == "ok"
        # the ACL is the broker's, whatever the listener: summaries yes, commands never
        assert good.publish(topics.metrics(site_name, "m1")) in (0, 0x10)  # 0x10: no subscriber
        assert good.publish(topics.command(site_name, "bank1")) == 0x87
        assert good.publish(topics.metrics("other-site", "m1")) == 0x87
        good.close()
        wrong = WssProbe(c.ws_port, bridge, "not-the-password", c.ca)
        assert wrong.connect() in ("Bad user name or password", "Not authorized")
        nobody = WssProbe(c.ws_port, "", "", c.ca)
        assert nobody.connect() != "ok"
        # plain ws:// to the TLS listener never gets a CONNACK
        plain = WssProbe(c.ws_port, bridge, c.edge.passwords[bridge], None, tls=False)
        assert plain.connect() != "ok"
        # a server certificate from another CA is not trusted
        other = init(tmp_path / "other", "elsewhere", role="central")
        stranger = WssProbe(c.ws_port, bridge, c.edge.passwords[bridge], str(other.out / "ca.crt"))
        assert "CERTIFICATE_VERIFY_FAILED" in stranger.connect()


def test_the_tls_listener_still_wants_a_client_certificate(tmp_path: Path, site_name: str) -> None:
    """Adding the websockets listener changes nothing on 8883: no certificate, no entry."""
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub is not installed")
    with Centre(tmp_path, site_name) as c:
        result = subprocess.run(
            [
                "mosquitto_pub",
                *("-h", "127.0.0.1", "-p", str(c.broker.port), "--cafile", c.ca),
                *("-u", "monitor", "-P", c.central.passwords["monitor"]),
                *("-t", "pfm/v1/x", "-m", "{}", "-q", "1"),
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode != 0


def test_the_central_override_publishes_443_to_the_broker() -> None:
    import yaml

    repo = Path(__file__).resolve().parents[1]
    base = yaml.safe_load((repo / "deploy/central/compose.yml").read_text())
    override = yaml.safe_load((repo / "deploy/central/compose.wss.yml").read_text())
    assert set(override["services"]) == {"mosquitto"} <= set(base["services"])
    assert override["services"]["mosquitto"]["ports"] == ["443:443"]
    assert not any("443:" in p for p in base["services"]["mosquitto"]["ports"])
