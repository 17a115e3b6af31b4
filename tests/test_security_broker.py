"""The broker a site really runs: the repo's mosquitto.conf + what ``pfmon init`` generates.

Every test starts the real ``mosquitto`` binary on a free loopback port with private
folders (never the machine's broker on 1883) and talks to it over TLS with X.509
client certificates: a service gets in with its own credentials, anonymous and
certificate-less clients are refused, the ACL drops every publish a user is not
entitled to (only the actuator commands; a collector cannot publish metrics), and an
edge broker bridges ``metrics``/``event``/``state`` to a central one, queueing them
while the centre is down.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from services.init import (
    BRIDGED_TOPICS,
    InitResult,
    bridged_topics,
    init_site,
    mosquitto_hash,
    read_passwd,
    render_broker_conf,
)
from shared import topics
from shared.bus import Bus, Incoming, PublishRefused
from shared.embedded import free_port, wait_port
from shared.errors import ConfigError
from shared.messages import Reading, utcnow
from shared.settings import Settings, credentials, load_settings

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

pytestmark = pytest.mark.skipif(
    not Path(MOSQUITTO).exists(), reason="the mosquitto binary is not installed"
)


# -- a real broker on the generated configuration -----------------------------------------


class Broker:
    """mosquitto -c <rendered deploy/mosquitto/mosquitto.conf> on 127.0.0.1:port."""

    def __init__(
        self, workdir: Path, secrets: Path, port: int | None = None, extra: str = ""
    ) -> None:
        self.workdir = workdir
        self.secrets = secrets
        self.extra = extra  # appended to the rendered configuration (e.g. more logging)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            render_broker_conf(
                CONF.read_text(),
                secrets_dir=self.secrets / "broker",
                data_dir=self.workdir / "data",
                port=self.port,
                bind="127.0.0.1",
                run_as_root=os.geteuid() == 0,
            )
            + self.extra
        )
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        try:
            wait_port("127.0.0.1", self.port, timeout=10)
        except Exception:
            self.stop()
            raise AssertionError(f"mosquitto did not start: {self.log()}") from None
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Probe:
    """A paho client that records what happened: CONNACK, PUBACK reason codes, messages."""

    port: int
    secrets: Path | None
    user: str | None
    password: str | None
    protocol: int = paho.MQTTv5
    cert_user: str | None = None  # whose client certificate to present (default: user)
    client_id: str = field(default_factory=lambda: f"probe-{uuid.uuid4().hex[:8]}")
    clean: bool = True
    tls: bool = True
    connack: ReasonCode | None = None
    error: str | None = None
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    subacks: list[list[ReasonCode]] = field(default_factory=list)

    def __post_init__(self) -> None:
        kwargs = {"clean_session": self.clean} if self.protocol != paho.MQTTv5 else {}
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, self.client_id, protocol=self.protocol, **kwargs
        )
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        if self.tls and self.secrets is not None:
            cert_user = self.user if self.cert_user is None else self.cert_user
            certfile = keyfile = None
            if cert_user:
                folder = self.secrets / "clients" / cert_user
                if not folder.exists():  # a bridge user: its certificate is the broker's
                    folder = self.secrets / "broker"
                    certfile, keyfile = folder / "bridge.crt", folder / "bridge.key"
                else:
                    certfile, keyfile = folder / "client.crt", folder / "client.key"
            self.client.tls_set(
                ca_certs=str(self.secrets / "ca.crt"),
                certfile=str(certfile) if certfile else None,
                keyfile=str(keyfile) if keyfile else None,
            )
        if self.user is not None:
            self.client.username_pw_set(self.user, self.password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, rc, props=None) -> None:  # type: ignore[no-untyped-def]
        self.connack = rc
        if not rc.is_failure:
            self._connected.set()
        else:
            self._closed.set()

    def _on_disconnect(self, client, userdata, flags, rc, props=None) -> None:  # type: ignore[no-untyped-def]
        self._closed.set()

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def _on_publish(self, client, userdata, mid, rc, props=None) -> None:  # type: ignore[no-untyped-def]
        self.pubacks[mid] = rc

    def _on_subscribe(self, client, userdata, mid, rcs, props=None) -> None:  # type: ignore[no-untyped-def]
        self.subacks.append(list(rcs))

    def connect(self, timeout: float = 5.0) -> bool:
        """True when the broker accepted us (CONNACK success) within ``timeout``."""
        try:
            props = None
            clean_start: bool | int = paho.MQTT_CLEAN_START_FIRST_ONLY
            if self.protocol == paho.MQTTv5:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0 if self.clean else 3600
                clean_start = self.clean
                self.client.connect(
                    "127.0.0.1", self.port, clean_start=clean_start, properties=props
                )
            else:
                self.client.connect("127.0.0.1", self.port)
        except (OSError, ssl.SSLError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected.is_set():
                return True
            if self._closed.is_set():
                break
            time.sleep(0.02)
        self.client.loop_stop()
        return False

    def subscribe(self, pattern: str) -> list[ReasonCode]:
        n = len(self.subacks)
        self.client.subscribe(pattern, qos=1)
        wait_for(lambda: len(self.subacks) > n, f"SUBACK for {pattern}")
        return self.subacks[n]

    def publish(self, topic: str, payload: bytes = b"{}", qos: int = 1) -> ReasonCode | None:
        """Publish and return the PUBACK reason code (v5) or None (3.1.1 / QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0:
            return None
        wait_for(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(cond, what: str, timeout: float = 8.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def init(tmp: Path, site: str, **kwargs: object) -> InitResult:
    out = tmp / "secrets"
    return init_site(
        site=site,
        out=out,
        env_file=tmp / ".env",
        client_path=str(out / "clients" / "{user}"),
        chown=False,
        **kwargs,  # type: ignore[arg-type]
    )


def centre_and_edge(
    tmp: Path, site: str, central_port: int, **edge: object
) -> tuple[InitResult, InitResult]:
    """A centre's files, and an edge's whose bridge dials it on ``central_port``."""
    central = init(tmp / "central", "centre", role="central")
    return central, init(
        tmp / "edge",
        site,
        role="edge",
        central=central.out,
        central_host="127.0.0.1",
        central_port=central_port,
        broker_path=str(tmp / "edge" / "secrets" / "broker"),
        **edge,
    )


def service_settings(result: InitResult, user: str, port: int, tmp: Path) -> Settings:
    """The service's generated env file, as the service would load it."""
    env: dict[str, str] = {}
    for line in (result.out / "env" / f"{user}.env").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.removeprefix("PFM_").lower()] = value
    env["mqtt_url"] = f"mqtts://127.0.0.1:{port}"
    return Settings(
        **env,  # type: ignore[arg-type]
        mqtt_client_id=f"pfm-{user}-{uuid.uuid4().hex[:6]}",
        data_dir=tmp / user,
        metrics_port=0,
    )


@pytest.fixture
def site_broker(tmp_path: Path, site_name: str) -> Iterator[tuple[InitResult, Broker]]:
    result = init(tmp_path, site_name)
    broker = Broker(tmp_path / "broker", result.out).start()
    yield result, broker
    broker.stop()


def probe(result: InitResult, broker: Broker, user: str | None, **kw: object) -> Probe:
    password = result.passwords.get(user) if user else None
    return Probe(broker.port, result.out, user, password, **kw)  # type: ignore[arg-type]


# -- pfmon init's files ------------------------------------------------------------------


def test_password_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "pw"
    path.touch()
    subprocess.run([tool, "-b", str(path), "alice", "s3cret-pass"], check=True)
    theirs = read_passwd(path)["alice"]
    salt = base64.b64decode(theirs.split("$")[3])
    assert mosquitto_hash("s3cret-pass", salt=salt) == theirs
    assert mosquitto_hash("other", salt=salt) != theirs


def test_init_files_are_private_and_unique(tmp_path: Path, site_name: str) -> None:
    a = init(tmp_path / "a", site_name)
    b = init(tmp_path / "b", site_name)
    # every secret is fresh: two sites never share a password
    assert set(a.passwords.values()).isdisjoint(b.passwords.values())
    for path in [
        a.out / "ca.key",
        a.out / "broker" / "server.key",
        a.out / "broker" / "passwd",
        a.out / "clients" / "collector" / "client.key",
        a.out / "env" / "collector.env",
        a.env_file,
    ]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    env = a.env_file.read_text()
    for user in ("collector", "analytics", "actuator", "archiver", "monitor"):
        assert f"PFM_{user.upper()}_MQTT_PASSWORD={a.passwords[user]}" in env
        # the password file holds a hash, never the password
        assert a.passwords[user] not in (a.out / "broker" / "passwd").read_text()


def test_init_refuses_to_overwrite_and_lists_problems(tmp_path: Path, site_name: str) -> None:
    from shared.errors import ConfigError

    init(tmp_path, site_name)
    with pytest.raises(ConfigError) as err:
        init(tmp_path, site_name)
    assert "--force" in str(err.value)
    with pytest.raises(ConfigError) as err:
        init_site(site="Bad Site", role="edge", out=tmp_path / "x", env_file=tmp_path / "x.env")
    text = str(err.value)
    assert "--site" in text and "--central" in text and "--central-host" in text


def test_edge_refused_when_the_centre_certificate_does_not_name_it(
    tmp_path: Path, site_name: str
) -> None:
    from shared.errors import ConfigError

    central = init(tmp_path / "central", "centre", role="central", hostnames=["hub.example"])
    with pytest.raises(ConfigError) as err:
        init(
            tmp_path / "edge",
            site_name,
            role="edge",
            central=central.out,
            central_host="other.example",
        )
    assert "does not name 'other.example'" in str(err.value) and "hub.example" in str(err.value)
    ok = init(
        tmp_path / "edge2", site_name, role="edge", central=central.out, central_host="hub.example"
    )
    assert ok.passwords[f"bridge-{site_name}"]


def test_cli_init_exit_codes(tmp_path: Path, site_name: str) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    runner = CliRunner()
    args = ["init", "--site", site_name, "--out", str(tmp_path / "s")]
    args += ["--env-file", str(tmp_path / ".env")]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "s" / "broker" / "acl").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "--force" in again.output


# -- authentication ----------------------------------------------------------------------


def test_credentials_directory_gives_values_and_file_paths(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("s3cret pass\n")
    (creds / "db_dsn").write_text("postgresql://pfmon:pw@db/pfmon")
    (creds / "mqtt_key_file").write_text("-----BEGIN PRIVATE KEY-----\n")
    (creds / "unrelated").write_text("ignored")
    assert credentials(creds) == {
        "mqtt_password": "s3cret pass",
        "db_dsn": "postgresql://pfmon:pw@db/pfmon",
        "mqtt_key_file": creds / "mqtt_key_file",
    }
    assert credentials(tmp_path / "empty-and-missing") == {}
    (creds / "mqtt_password").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        credentials(creds)
    assert str(creds / "mqtt_password") in str(info.value)


async def test_service_connects_with_systemd_credentials_only(
    site_broker: tuple[InitResult, Broker],
    tmp_path: Path,
    site_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The systemd unit passes the password, key and certificates as credentials
    (``LoadCredential=NAME:clients/<user>/FILE``) and drops them from the environment."""
    result, broker = site_broker
    folder = result.out / "clients" / "collector"
    creds = tmp_path / "credentials"  # what systemd makes of the unit's LoadCredential=
    creds.mkdir()
    for name, file in (
        ("mqtt_password", "password"),
        ("mqtt_key_file", "client.key"),
        ("mqtt_cert_file", "client.crt"),
        ("mqtt_ca_file", "ca.crt"),
    ):
        (creds / name).write_bytes((folder / file).read_bytes())
    for var in list(os.environ):
        if var.upper().startswith("PFM_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PFM_MQTT_URL", f"mqtts://127.0.0.1:{broker.port}")
    monkeypatch.setenv("PFM_MQTT_USERNAME", "collector")
    monkeypatch.setenv("PFM_MQTT_CLIENT_ID", f"pfm-collector-{site_name}")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(data_dir=tmp_path / "data", metrics_port=0)
    assert settings.mqtt().password == result.passwords["collector"]
    assert settings.mqtt_key_file == creds / "mqtt_key_file"
    async with Bus(settings, service="collector", site=site_name) as bus:
        await bus.wait_connected(10)
        await bus.publish(
            topics.reading(site_name, "m1"),
            Reading(site=site_name, meter="m1", seq=1, ts=utcnow(), profile="p", values={}),
        )
    # a wrong password in the environment wins over the credential (explicit beats
    # implicit), and the broker refuses it: the credential was what let it in
    monkeypatch.setenv("PFM_MQTT_PASSWORD", "not-the-password")
    wrong = load_settings(data_dir=tmp_path / "data", metrics_port=0)
    assert wrong.mqtt().password == "not-the-password"


async def test_service_connects_with_its_credentials(
    site_broker: tuple[InitResult, Broker], tmp_path: Path, site_name: str
) -> None:
    result, broker = site_broker
    watcher = probe(result, broker, "monitor")
    assert watcher.connect(), watcher.error
    watcher.subscribe(f"pfm/v1/{site_name}/#")
    settings = service_settings(result, "collector", broker.port, tmp_path)
    assert settings.mqtt().tls and settings.mqtt_cert_file is not None
    reading = Reading(
        site=site_name,
        meter="m1",
        seq=1,
        ts=utcnow(),
        profile="pmtr001",
        values={"power_factor": 0.91},
    )
    async with Bus(settings, service="collector", site=site_name) as bus:
        await bus.wait_connected(10)
        await bus.publish(topics.reading(site_name, "m1"), reading)
    wait_for(lambda: watcher.received(topics.reading(site_name, "m1")), "the reading")
    got = orjson.loads(watcher.received(topics.reading(site_name, "m1"))[0])
    assert got["meter"] == "m1" and got["values"]["power_factor"] == 0.91
    watcher.close()


async def test_bus_service_receives_under_acl(
    site_broker: tuple[InitResult, Broker], tmp_path: Path, site_name: str
) -> None:
    """analytics (v5 auto) subscribes to readings the collector publishes, both via Bus."""
    result, broker = site_broker
    got: list[Reading] = []

    async def on_reading(m: Reading, incoming: Incoming) -> None:
        got.append(m)

    analytics = Bus(
        service_settings(result, "analytics", broker.port, tmp_path),
        service="analytics",
        site=site_name,
    )
    analytics.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, on_reading)
    collector = Bus(
        service_settings(result, "collector", broker.port, tmp_path),
        service="collector",
        site=site_name,
    )
    async with analytics, collector:
        await analytics.wait_connected(10)
        await collector.wait_connected(10)
        for seq in range(1, 4):
            await collector.publish(
                topics.reading(site_name, "m1"),
                Reading(site=site_name, meter="m1", seq=seq, ts=utcnow(), profile="p", values={}),
            )
        for _ in range(200):
            if len(got) == 3:
                break
            await __import__("asyncio").sleep(0.02)
    assert [m.seq for m in got] == [1, 2, 3]
    assert analytics.protocol == "5"


def test_anonymous_and_bad_credentials_are_refused(
    site_broker: tuple[InitResult, Broker], site_name: str
) -> None:
    result, broker = site_broker
    cases = {
        # a valid client certificate but no user: mosquitto refuses (not authorised)
        "anonymous with a certificate": probe(result, broker, None, cert_user="collector"),
        "wrong password": Probe(broker.port, result.out, "collector", "not-the-password"),
        "unknown user": Probe(broker.port, result.out, "intruder", "x", cert_user="collector"),
        # right user and password but no client certificate: the TLS handshake fails
        "no client certificate": Probe(
            broker.port, result.out, "collector", result.passwords["collector"], cert_user=""
        ),
        "plain MQTT, no TLS": Probe(
            broker.port, result.out, "collector", result.passwords["collector"], tls=False
        ),
        "MQTT 3.1.1 anonymous": probe(
            result, broker, None, cert_user="collector", protocol=paho.MQTTv311
        ),
    }
    for what, client in cases.items():
        assert not client.connect(timeout=4), f"{what}: the broker accepted it"
        if client.connack is not None:
            assert client.connack.is_failure, f"{what}: {client.connack}"
    assert cases["wrong password"].connack is not None
    assert cases["wrong password"].connack.getName() in (
        "Not authorized",
        "Bad user name or password",
    )
    ok = probe(result, broker, "collector")
    assert ok.connect(), f"the collector itself must get in: {ok.error} {broker.log()}"
    ok.close()


# -- authorisation (ACL) -------------------------------------------------------------------


def test_collector_cannot_publish_commands_or_metrics(tmp_path: Path, site_name: str) -> None:
    result = init(tmp_path, site_name)
    broker = Broker(tmp_path / "broker", result.out, extra="log_type all\n").start()
    watcher = probe(result, broker, "monitor")
    assert watcher.connect()
    watcher.subscribe(f"pfm/v1/{site_name}/#")
    command = topics.command(site_name, "bank1")
    metrics = topics.metrics(site_name, "m1")
    reading = topics.reading(site_name, "m1")

    v5 = probe(result, broker, "collector")
    assert v5.connect()
    rc_command = v5.publish(command, b'{"evil": 1}')
    rc_metrics = v5.publish(metrics, b'{"fake": 1}')
    # MQTT v5: mosquitto answers the QoS 1 publish with "Not authorized" (0x87)
    assert rc_command is not None and rc_command.value == 0x87, rc_command
    assert rc_metrics is not None and rc_metrics.value == 0x87, rc_metrics
    assert v5.publish(reading, b'{"marker": 1}').value == 0  # type: ignore[union-attr]

    v311 = probe(result, broker, "collector", protocol=paho.MQTTv311)
    assert v311.connect()
    v311.publish(command, b'{"evil": 2}')  # acknowledged, silently dropped (3.1.1)
    v311.publish(reading, b'{"marker": 2}')

    wait_for(lambda: len(watcher.received(reading)) == 2, "both markers")
    time.sleep(0.2)
    assert watcher.received(command) == [], "a collector's command reached a subscriber"
    assert watcher.received(metrics) == [], "a collector's metrics reached a subscriber"
    for c in (watcher, v5, v311):
        c.close()
    broker.stop()
    # the broker's log names each denial (what the service test below looks for)
    denied = [line for line in broker.log().splitlines() if "Denied PUBLISH" in line]
    assert len(denied) == 3, denied
    assert all(command in d or metrics in d for d in denied), denied


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
async def test_publish_nowait_refused_by_the_acl_is_reported_not_lost_silently(
    tmp_path: Path, site_name: str, fast: bool
) -> None:
    """MQTT v5: mosquitto answers a denied QoS 1 publish with reason 0x87; the bus
    hands exactly that message to ``on_publish_failed``, counts it, and the
    publishes around it are confirmed and delivered."""
    result = init(tmp_path, site_name)
    broker = Broker(tmp_path / "broker", result.out).start()
    watcher = probe(result, broker, "monitor")
    assert watcher.connect()
    watcher.subscribe(f"pfm/v1/{site_name}/#")
    settings = service_settings(result, "collector", broker.port, tmp_path)
    settings = settings.model_copy(update={"mqtt_protocol": "5", "mqtt_fast": fast})
    failed: list[tuple[str, bytes, str]] = []
    reading, denied = topics.reading(site_name, "m1"), topics.command(site_name, "bank1")
    try:
        async with Bus(settings, service="collector", site=site_name) as bus:
            bus.on_publish_failed(lambda t, p, why: failed.append((t, p, why)))
            await bus.wait_connected(10)
            bus.publish_nowait(reading, b'{"n": 1}')
            bus.publish_nowait(denied, b'{"evil": 1}')
            bus.publish_nowait(reading, b'{"n": 2}')
            await bus.drain(10)
            assert bus.unconfirmed == 0
            # an awaited publish says so too (aiomqtt's own would return as if delivered)
            with pytest.raises(PublishRefused, match="0x87") as info:
                await bus.publish(denied, b'{"evil": 2}')
            assert info.value.kind == "refused"
            await bus.publish(reading, b'{"n": 3}')
            refused = bus.metrics.publish_failures.labels("collector", "command")._value.get()
        assert [(t, p) for t, p, _ in failed] == [(denied, b'{"evil": 1}')]
        assert "0x87" in failed[0][2], failed
        assert refused == 2
        wait_for(lambda: len(watcher.received(reading)) == 3, "the three readings")
        assert watcher.received(denied) == []
    finally:
        watcher.close()
        broker.stop()


def test_only_the_actuator_publishes_commands(
    site_broker: tuple[InitResult, Broker], site_name: str
) -> None:
    result, broker = site_broker
    watcher = probe(result, broker, "monitor")
    assert watcher.connect()
    watcher.subscribe(f"pfm/v1/{site_name}/#")
    command = topics.command(site_name, "bank1")
    codes = {}
    for user in ("collector", "analytics", "archiver", "monitor", "actuator"):
        client = probe(result, broker, user)
        assert client.connect(), f"{user}: {client.error}"
        codes[user] = client.publish(command, f'{{"from": "{user}"}}'.encode())
        client.close()
    assert codes["actuator"] is not None and codes["actuator"].value == 0
    for user in ("collector", "analytics", "archiver", "monitor"):
        assert codes[user] is not None and codes[user].value == 0x87, (user, codes[user])
    wait_for(lambda: watcher.received(command), "the actuator's command")
    time.sleep(0.2)
    assert [orjson.loads(p)["from"] for p in watcher.received(command)] == ["actuator"]
    # analytics publishes metrics, not readings of other sites
    analytics = probe(result, broker, "analytics")
    assert analytics.connect()
    assert analytics.publish(topics.metrics(site_name, "m1")).value == 0  # type: ignore[union-attr]
    assert analytics.publish(topics.aggregate(site_name, "m1", 600)).value == 0  # type: ignore[union-attr]
    other_site = topics.metrics("someone-else", "m1")
    assert analytics.publish(other_site).value == 0x87  # type: ignore[union-attr]
    other_aggregate = topics.aggregate("someone-else", "m1", 3)
    assert analytics.publish(other_aggregate).value == 0x87  # type: ignore[union-attr]
    analytics.close()
    watcher.close()


# -- edge -> centre bridge -------------------------------------------------------------------


def test_edge_bridge_forwards_summaries_and_queues_while_centre_is_down(
    tmp_path: Path, site_name: str
) -> None:
    central_port = free_port()
    central, edge = centre_and_edge(tmp_path, site_name, central_port)
    # the edge bundle never carries the CA key; the centre now knows the bridge user
    assert not (edge.out / "ca.key").exists()
    assert f"bridge-{site_name}" in read_passwd(central.out / "broker" / "passwd")
    bridge_conf = (edge.out / "broker" / "conf.d" / "bridge.conf").read_text()
    for t in BRIDGED_TOPICS:
        assert f"topic pfm/v1/{site_name}/{t} out 1" in bridge_conf
    assert "command" not in bridge_conf

    centre = Broker(tmp_path / "central-broker", central.out, port=central_port).start()
    edge_broker = Broker(tmp_path / "edge-broker", edge.out).start()
    try:
        watcher = Probe(
            central_port,
            central.out,
            "monitor",
            central.passwords["monitor"],
            client_id=f"watch-{site_name}",
            clean=False,
        )
        assert watcher.connect(), watcher.error
        watcher.subscribe(f"pfm/v1/{site_name}/#")

        analytics = Probe(edge_broker.port, edge.out, "analytics", edge.passwords["analytics"])
        actuator = Probe(edge_broker.port, edge.out, "actuator", edge.passwords["actuator"])
        collector = Probe(edge_broker.port, edge.out, "collector", edge.passwords["collector"])
        for c in (analytics, actuator, collector):
            assert c.connect(), c.error
        metrics = topics.metrics(site_name, "m1")
        # the bridge connects in the background: wait until a metrics message gets through
        deadline = time.monotonic() + 15
        while not watcher.received(metrics) and time.monotonic() < deadline:
            analytics.publish(metrics, b'{"n": 0}')
            time.sleep(0.3)
        assert watcher.received(metrics), f"bridge never forwarded: {edge_broker.log()}"

        actuator.publish(topics.command(site_name, "bank1"), b'{"cmd": 1}')
        actuator.publish(topics.state(site_name, "bank1"), b'{"state": 1}')
        collector.publish(topics.reading(site_name, "m1"), b'{"reading": 1}')
        analytics.publish(topics.event(site_name, "m1"), b'{"event": 1}')
        analytics.publish(topics.aggregate(site_name, "m1", 3), b'{"aggregate": 1}')
        wait_for(lambda: watcher.received(topics.event(site_name, "m1")), "the event")
        wait_for(lambda: watcher.received(topics.aggregate(site_name, "m1", 3)), "an aggregate")
        wait_for(lambda: watcher.received(topics.state(site_name, "bank1")), "the state")
        time.sleep(0.3)
        assert watcher.received(topics.command(site_name, "bank1")) == [], "a command crossed"
        assert watcher.received(topics.reading(site_name, "m1")) == [], "raw readings crossed"

        # the bridge user itself can never command anything at the centre
        intruder = Probe(
            central_port,
            edge.out,
            f"bridge-{site_name}",
            edge.passwords[f"bridge-{site_name}"],
        )
        assert intruder.connect(), intruder.error
        assert intruder.publish(topics.command(site_name, "bank1")).value == 0x87  # type: ignore[union-attr]
        assert intruder.publish(topics.metrics("other-site", "m1")).value == 0x87  # type: ignore[union-attr]
        intruder.close()

        # WAN down: the centre stops; the edge keeps accepting and queues for the bridge
        watcher.close()
        centre.stop()
        queued = [f'{{"n": {i}}}'.encode() for i in range(1, 6)]
        for payload in queued:
            assert analytics.publish(metrics, payload).value == 0  # type: ignore[union-attr]
        centre.start()
        watcher = Probe(
            central_port,
            central.out,
            "monitor",
            central.passwords["monitor"],
            client_id=f"watch-{site_name}",
            clean=False,
        )
        assert watcher.connect(), watcher.error
        wait_for(
            lambda: all(p in watcher.received(metrics) for p in queued),
            f"the 5 queued metrics after reconnection: {watcher.received(metrics)}",
            timeout=30,
        )
        got = [p for p in watcher.received(metrics) if p in queued]
        assert got == queued, "queued metrics arrived out of order or duplicated"
        for c in (watcher, analytics, actuator, collector):
            c.close()
    finally:
        edge_broker.stop()
        centre.stop()


def test_an_edge_can_forward_only_its_aggregates(tmp_path: Path, site_name: str) -> None:
    """``--bridge-metrics 600s``: the 10 min aggregates cross, per-input metrics and
    the 3 s aggregates stay at the edge; events still cross."""
    central_port = free_port()
    central, edge = centre_and_edge(tmp_path, site_name, central_port, bridge_metrics="600s")
    conf = (edge.out / "broker" / "conf.d" / "bridge.conf").read_text()
    assert f"topic pfm/v1/{site_name}/+/metrics/600s out 1" in conf
    assert "metrics/#" not in conf
    centre = Broker(tmp_path / "central-broker", central.out, port=central_port).start()
    edge_broker = Broker(tmp_path / "edge-broker", edge.out).start()
    try:
        watcher = Probe(central_port, central.out, "monitor", central.passwords["monitor"])
        assert watcher.connect(), watcher.error
        watcher.subscribe(f"pfm/v1/{site_name}/#")
        analytics = Probe(edge_broker.port, edge.out, "analytics", edge.passwords["analytics"])
        assert analytics.connect(), analytics.error
        ten_min = topics.aggregate(site_name, "m1", 600)
        deadline = time.monotonic() + 15
        while not watcher.received(ten_min) and time.monotonic() < deadline:
            analytics.publish(ten_min, b'{"n": 0}')
            time.sleep(0.3)
        assert watcher.received(ten_min), f"bridge never forwarded: {edge_broker.log()}"
        analytics.publish(topics.metrics(site_name, "m1"), b'{"per": "input"}')
        analytics.publish(topics.aggregate(site_name, "m1", 3), b'{"three": "s"}')
        analytics.publish(topics.event(site_name, "m1"), b'{"event": 1}')
        analytics.publish(ten_min, b'{"n": "last"}')
        wait_for(lambda: b'{"n": "last"}' in watcher.received(ten_min), "the last aggregate")
        wait_for(lambda: watcher.received(topics.event(site_name, "m1")), "the event")
        assert watcher.received(topics.metrics(site_name, "m1")) == []
        assert watcher.received(topics.aggregate(site_name, "m1", 3)) == []
        analytics.close()
        watcher.close()
    finally:
        edge_broker.stop()
        centre.stop()


def test_bridge_metrics_choice_is_checked(tmp_path: Path, site_name: str) -> None:
    assert bridged_topics("aggregates")[0] == "+/metrics/+"
    assert bridged_topics()[0] == "+/metrics/#"
    with pytest.raises(ConfigError) as err:
        init(
            tmp_path / "edge",
            site_name,
            role="edge",
            central=tmp_path / "nowhere",
            central_host="127.0.0.1",
            bridge_metrics="10min",
        )
    expected = "--bridge-metrics '10min': expected all, aggregates, batches or one aggregate"
    assert expected in str(err.value)
    with pytest.raises(ConfigError, match="only an edge's bridge forwards metrics"):
        init(tmp_path / "site", site_name, bridge_metrics="aggregates")


def test_compose_broker_healthcheck_logs_in_as_monitor(
    site_broker: tuple[InitResult, Broker],
) -> None:
    """The mosquitto health check of docker-compose.yml, run as written (paths mapped)."""
    import yaml

    tool = shutil.which("mosquitto_sub")
    if tool is None:
        pytest.skip("mosquitto_sub is not installed")
    result, broker = site_broker
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    test = compose["services"]["mosquitto"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = (
        test[1]
        .replace("$$", "$")
        .replace("/mosquitto/monitor", str(result.out / "clients" / "monitor"))
        .replace("-p 8883", f"-p {broker.port}")
    )
    env = {**os.environ, "PFM_MONITOR_MQTT_PASSWORD": result.passwords["monitor"]}
    ok = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=20)
    assert ok.returncode == 0, ok.stderr.decode() + broker.log()
    assert ok.stdout.strip(), "no uptime received"
    env["PFM_MONITOR_MQTT_PASSWORD"] = "wrong"
    bad = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=20)
    assert bad.returncode != 0, "the health check passed with a wrong password"


def test_central_archivers_share_every_sites_metrics(tmp_path: Path) -> None:
    """At the centre the archiver user reads every site through $share/archiver/..."""
    central = init(tmp_path / "central", "centre", role="central")
    edges = {}
    for site in ("branch1", "branch2"):
        edges[site] = init(
            tmp_path / site, site, role="edge", central=central.out, central_host="127.0.0.1"
        )
    broker = Broker(tmp_path / "broker", central.out).start()
    try:
        archivers = [
            Probe(broker.port, central.out, "archiver", central.passwords["archiver"])
            for _ in range(2)
        ]
        for a in archivers:
            assert a.connect(), a.error
            codes = a.subscribe("$share/archiver/pfm/v1/+/+/metrics")
            assert codes[0].value == 1, codes  # granted QoS 1
        sent = []
        for site, edge in edges.items():
            bridge = Probe(
                broker.port, edge.out, f"bridge-{site}", edge.passwords[f"bridge-{site}"]
            )
            assert bridge.connect(), bridge.error
            for i in range(10):
                payload = f'{{"site": "{site}", "n": {i}}}'.encode()
                assert bridge.publish(topics.metrics(site, "m1"), payload).value == 0  # type: ignore[union-attr]
                sent.append(payload)
            bridge.close()

        def got() -> list[bytes]:
            return [p for a in archivers for _, p in a.messages]

        wait_for(lambda: len(got()) >= len(sent), f"{len(sent)} metrics at the archivers")
        time.sleep(0.2)
        assert sorted(got()) == sorted(sent), "lost or duplicated across the shared group"
        assert all(a.messages for a in archivers), "one archiver got nothing: not shared"
        for a in archivers:
            a.close()
    finally:
        broker.stop()


async def test_site_services_run_under_the_acl(
    tmp_path: Path, site_name: str, db_dsn: str, db_schema: str
) -> None:
    """The real collector, analytics, actuator and archiver, configured from `pfmon init`'s
    env files, run against the TLS/ACL broker: readings and metrics flow into PostgreSQL,
    and the broker denies none of their publishes (its log would say "Denied PUBLISH")."""
    import asyncio

    import asyncpg

    from services.actuator import service as actuator
    from services.analytics import service as analytics
    from services.archiver import service as archiver
    from services.collector import service as collector
    from services.simulator import LoadModel, MeterFleet
    from shared.service import Shutdown
    from shared.site import parse_site

    result = init(tmp_path, site_name)
    # every log line, so that any denial shows
    broker = Broker(tmp_path / "broker", result.out, extra="log_type all\n").start()
    watcher = probe(result, broker, "monitor")
    assert watcher.connect(), watcher.error
    watcher.subscribe(f"pfm/v1/{site_name}/#")
    sim_port = free_port()
    try:
        async with MeterFleet(sim_port, {1: LoadModel()}):
            site = parse_site(
                {
                    "site": site_name,
                    "gateway": "gw1",
                    "buses": [
                        {"name": "sim", "kind": "tcp", "host": "127.0.0.1", "port": sim_port}
                    ],
                    "meters": [
                        {
                            "name": "m1",
                            "bus": "sim",
                            "unit": 1,
                            "profile": "pmtr001",
                            "interval_s": 0.5,
                        }
                    ],
                }
            )
            shutdown = Shutdown()
            dsn = f"{db_dsn}{'&' if '?' in db_dsn else '?'}search_path={db_schema}"
            tasks = []
            for name, module in (
                ("archiver", archiver),
                ("collector", collector),
                ("analytics", analytics),
                ("actuator", actuator),
            ):
                settings = service_settings(result, name, broker.port, tmp_path)
                settings = settings.model_copy(update={"db_dsn": dsn})
                tasks.append(
                    asyncio.create_task(module.run(settings, site, shutdown), name=f"svc-{name}")
                )
            metrics_topic = topics.metrics(site_name, "m1")
            reading_topic = topics.reading(site_name, "m1")
            deadline = time.monotonic() + 30

            async def rows() -> int:
                conn = await asyncpg.connect(dsn)
                try:
                    return int(
                        await conn.fetchval(
                            "SELECT count(*) FROM pfm_metrics WHERE site = $1", site_name
                        )
                        or 0
                    )
                except asyncpg.UndefinedTableError:
                    return 0
                finally:
                    await conn.close()

            stored = 0
            while time.monotonic() < deadline and not (
                watcher.received(metrics_topic)
                and len(watcher.received(reading_topic)) >= 3
                and (stored := await rows()) > 0
            ):
                for t in tasks:
                    if t.done():
                        t.result()  # a service that died says why
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            shutdown.request("test over")
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        watcher.close()
        broker.stop()
    assert watcher.received(reading_topic), "no reading got through the broker"
    assert watcher.received(metrics_topic), "no metrics got through the broker"
    assert stored > 0, "no metrics row reached PostgreSQL through the archiver"
    denied = [line for line in broker.log().splitlines() if "Denied" in line]
    assert not denied, "the ACL denied a real service:\n" + "\n".join(denied[:20])


def test_rotating_the_centre_keeps_its_bridges(tmp_path: Path, site_name: str) -> None:
    central = init(tmp_path / "central", "centre", role="central")
    init(tmp_path / "edge", site_name, role="edge", central=central.out, central_host="127.0.0.1")
    before = read_passwd(central.out / "broker" / "passwd")
    rotated = init(tmp_path / "central", "centre", role="central", force=True)
    after = read_passwd(rotated.out / "broker" / "passwd")
    bridge = f"bridge-{site_name}"
    assert after[bridge] == before[bridge], "the edge's bridge user was lost"
    assert after["archiver"] != before["archiver"], "the centre's own users were not rotated"
    acl = (rotated.out / "broker" / "acl").read_text()
    assert f"user {bridge}\ntopic write pfm/v1/{site_name}/+/metrics/#\n" in acl
    assert acl.splitlines()[0] == "# pfmon broker ACL, role central, site centre"
