"""``pfmon init --role central --engine nats``: the NATS centre's node configurations and
users, checked by ``nats-server -t`` and enforced by a real three-node cluster started from
the generated files (TLS routes and MQTT, bcrypt passwords, per-user permissions)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from services.archiver.shards import assign
from services.init import init_site
from services.init.broker import acl_text
from services.init.nats import NODES, SECRETS_PATH, STORE_DIR, permissions, subject
from shared import topics
from shared.bus import Bus
from shared.embedded import LocalMosquitto, free_port, wait_port
from shared.errors import ConfigError
from shared.settings import Settings
from tests.nats_cluster import deploy_mqtt_options, nats_server
from tests.test_archiver_helpers import (
    TEST_NAMES,
    archiver_site,
    at,
    metrics_msg,
    running_archiver,
    schema_dsn,
)

needs_nats = pytest.mark.skipif(nats_server() is None, reason="nats-server is not installed")
CENTRE = "central"
EDGES = ("branch1", "branch2")


@dataclass
class Centre:
    out: Path
    passwords: dict[str, str]  # user -> password (services and bridges)
    certs: dict[str, tuple[Path, Path]]  # user -> (certificate, key)


def make_centre(tmp: Path) -> Centre:
    """A NATS centre and two edges registered at it, as an operator makes them."""
    out = tmp / "secrets"
    result = init_site(
        site=CENTRE, role="central", engine="nats", out=out, env_file=tmp / ".env", chown=False
    )
    passwords = {u: p for u, p in result.passwords.items() if not u.startswith("PFM_")}
    certs = {
        u: (out / "clients" / u / "client.crt", out / "clients" / u / "client.key")
        for u in passwords
    }
    for edge in EDGES:
        bundle = tmp / edge
        edge_result = init_site(
            site=edge,
            role="edge",
            out=bundle / "secrets",
            env_file=bundle / ".env",
            central=out,
            central_host=",".join(NODES),
            chown=False,
        )
        user = f"bridge-{edge}"
        passwords[user] = edge_result.passwords[user]
        assert any("reload every NATS node" in note for note in edge_result.notes)
        broker = bundle / "secrets" / "broker"
        certs[user] = (broker / "bridge.crt", broker / "bridge.key")
    return Centre(out, passwords, certs)


# -- the files -------------------------------------------------------------------------------


def test_subjects_follow_the_mqtt_gateway_mapping() -> None:
    assert subject("pfm/v1/branch1/m1/metrics") == "pfm.v1.branch1.m1.metrics"
    assert subject("pfm/v1/+/deadletter/archiver") == "pfm.v1.*.deadletter.archiver"
    assert subject("pfm/v1/#") == "pfm.v1.>"
    with pytest.raises(ConfigError, match=r"'a\.b'"):
        subject("pfm/v1/a.b/metrics")


def test_permissions_are_the_mosquitto_acl() -> None:
    acl = acl_text("central", CENTRE, ["branch1", "branch2"])
    perms = permissions(acl)
    assert set(perms) == {"archiver", "monitor", "bridge-branch1", "bridge-branch2"}
    publish, subscribe = perms["bridge-branch1"]
    assert publish == [
        "pfm.v1.branch1.*.metrics",
        "pfm.v1.branch1.*.metrics.>",  # the aggregates' level (metrics/3s, metrics/600s)
        "pfm.v1.branch1.archive.analytics",  # analytics' archive batches
        "pfm.v1.branch1.*.event",
        "pfm.v1.branch1.actuator.*.state",
        "pfm.v1.branch1.gateway.*.status",
    ]
    assert subscribe == []  # reads nothing, so not even the delivery subjects
    publish, subscribe = perms["archiver"]
    assert subscribe == ["pfm.v1", "pfm.v1.>", "$MQTT.sub.>"]
    assert "pfm.v1.central.archiver.*.presence" in publish
    assert perms["monitor"] == ([], ["pfm.v1", "pfm.v1.>", "$MQTT.sub.>"])  # $SYS left out


def test_init_writes_every_node_and_registers_edges(tmp_path: Path) -> None:
    centre = make_centre(tmp_path)
    nats = centre.out / "nats"
    for node in NODES:
        conf = (nats / f"{node}.conf").read_text()
        assert f"server_name: {node}" in conf
        assert all(f"nats-route://{n}:6222" in conf for n in NODES)
        assert "include users.conf" in conf
    users = (nats / "users.conf").read_text()
    for user, password in centre.passwords.items():
        assert f'user: "{user}"' in users
        assert password not in users  # hashed
    assert users.count('password: "$2b$11$') == len(centre.passwords)
    assert (centre.out / "env" / "archiver.env").read_text().count("mqtts://nats") == 3
    # a rotation of the centre keeps the edges' bridges
    init_site(
        site=CENTRE,
        role="central",
        engine="nats",
        out=centre.out,
        env_file=tmp_path / ".env",
        force=True,
        chown=False,
    )
    assert 'user: "bridge-branch2"' in (nats / "users.conf").read_text()


def test_init_refuses_bad_engine_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        init_site(
            site="s1",
            role="site",
            engine="nats",
            nats_nodes=["a", "a", "B_1"],
            out=tmp_path / "s",
            env_file=tmp_path / ".env",
            chown=False,
        )
    text = str(err.value) + " ".join(getattr(err.value, "problems", []) or [])
    assert "only the centre runs on NATS" in text
    assert "'B_1' is not a host name" in text
    assert "a listed twice" in text
    with pytest.raises(ConfigError, match=r"2 node\(s\).*needs three or more"):
        init_site(
            site="c",
            role="central",
            engine="nats",
            nats_nodes=["n1", "n2"],
            out=tmp_path / "s",
            env_file=tmp_path / ".env",
            chown=False,
        )
    with pytest.raises(ConfigError) as err:
        init_site(
            site="c",
            role="central",
            engine="rabbit",  # type: ignore[arg-type]
            out=tmp_path / "s",
            env_file=tmp_path / ".env",
            chown=False,
        )
    assert "'rabbit' is not one of mosquitto, nats" in str(err.value) + str(
        getattr(err.value, "problems", "")
    )
    with pytest.raises(ConfigError, match="--nats-node: only with --engine nats"):
        init_site(
            site="c",
            role="central",
            nats_nodes=["n1", "n2", "n3"],
            out=tmp_path / "s",
            env_file=tmp_path / ".env",
            chown=False,
        )
    assert not (tmp_path / "s").exists()  # nothing half-written
    # a NATS centre is not rotated into a Mosquitto one by forgetting --engine
    init_site(
        site="c",
        role="central",
        engine="nats",
        out=tmp_path / "s",
        env_file=tmp_path / ".env",
        chown=False,
    )
    with pytest.raises(ConfigError, match="this centre runs on NATS"):
        init_site(
            site="c",
            role="central",
            out=tmp_path / "s",
            env_file=tmp_path / ".env",
            force=True,
            chown=False,
        )


def for_this_host(
    conf: str, out: Path, store: Path, ports: dict[str, int], routes: dict[str, int]
) -> str:
    """A generated node configuration with this host's paths and free loopback ports."""
    conf = conf.replace(f"{SECRETS_PATH}/", f"{out}/").replace(STORE_DIR, str(store))
    conf = conf.replace("listen: 127.0.0.1:4222", f"listen: 127.0.0.1:{ports['client']}")
    conf = conf.replace("http: 127.0.0.1:8222", f"http: 127.0.0.1:{ports['http']}")
    conf = conf.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{ports['route']}")
    conf = conf.replace("listen: 0.0.0.0:8883", f"listen: 127.0.0.1:{ports['mqtt']}")
    conf = re.sub(
        r"nats-route://(\w+):6222", lambda m: f"nats-route://127.0.0.1:{routes[m.group(1)]}", conf
    )
    assert re.search(r":(4222|8222|6222|8883)\b", conf) is None, conf
    assert f" {SECRETS_PATH}/" not in conf, conf
    return conf


@needs_nats
def test_nats_server_accepts_each_generated_node(tmp_path: Path) -> None:
    centre = make_centre(tmp_path)
    for node in NODES:
        conf = (centre.out / "nats" / f"{node}.conf").read_text()
        # only the paths change: nats-server -t loads the certificates and users
        local = conf.replace(f"{SECRETS_PATH}/", f"{centre.out}/")
        local = local.replace(STORE_DIR, str(tmp_path / node))
        path = centre.out / "nats" / f"{node}.local.conf"
        path.write_text(local)
        done = subprocess.run(
            [nats_server() or "nats-server", "-t", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    # a broken file is refused: the check can fail
    path.write_text(local.replace("mqtt {", "mqtt {{", 1))
    bad = subprocess.run(
        [nats_server() or "nats-server", "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0
    # the tests' clusters (tests/nats_cluster.py) run the generated tuning
    assert "max_ack_pending: 4096" in deploy_mqtt_options()


# -- the cluster -----------------------------------------------------------------------------


class Running:
    def __init__(
        self, centre: Centre, mqtt_ports: list[int], procs: list[subprocess.Popen[bytes]]
    ) -> None:
        self.centre = centre
        self.mqtt_ports = mqtt_ports
        self.procs = procs

    def reload(self) -> None:
        """SIGHUP every node (what ``docker compose kill -s SIGHUP`` does)."""
        for proc in self.procs:
            proc.send_signal(signal.SIGHUP)

    def client(
        self,
        user: str,
        node: int,
        *,
        password: str | None = None,
        client_id: str | None = None,
        cert: bool = True,
    ) -> tuple[mqtt.Client, int]:
        """A connected MQTT 3.1.1 client (persistent session) and the CONNACK code."""
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{user}-{time.monotonic_ns()}",
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        crt, key = self.centre.certs[user]
        ca = str(self.centre.out / "ca.crt")
        if cert:
            c.tls_set(ca_certs=ca, certfile=str(crt), keyfile=str(key))
        else:
            c.tls_set(ca_certs=ca)
        c.username_pw_set(user, password if password is not None else self.centre.passwords[user])
        connected = threading.Event()
        code: list[int] = []

        def on_connect(_c, _u, _f, reason, _p) -> None:  # type: ignore[no-untyped-def]
            code.append(reason.value if hasattr(reason, "value") else int(reason))
            connected.set()

        c.on_connect = on_connect
        c.on_disconnect = lambda *_a: connected.set()  # refused before any CONNACK
        c.connect("127.0.0.1", self.mqtt_ports[node], keepalive=30)
        c.loop_start()
        connected.wait(15)
        return c, code[0] if code else -1

    def publish(self, user: str, node: int, topic: str) -> None:
        """Publish one QoS 1 message as ``user`` on a connection of its own."""
        c, code = self.client(user, node)
        assert code == 0, f"{user} could not connect: {code}"
        info = c.publish(topic, b"x", qos=1)
        # a refused publish may end the connection: what arrives is what counts
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(5)
        c.disconnect()
        c.loop_stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    binary = nats_server()
    if binary is None:
        pytest.skip("nats-server is not installed")
    tmp = tmp_path_factory.mktemp("natscentre")
    centre = make_centre(tmp)
    ports = {n: {k: free_port() for k in ("client", "http", "route", "mqtt")} for n in NODES}
    routes = {n: ports[n]["route"] for n in NODES}
    procs = []
    try:
        for node in NODES:
            conf = (centre.out / "nats" / f"{node}.conf").read_text()
            path = centre.out / "nats" / f"{node}.local.conf"
            path.write_text(for_this_host(conf, centre.out, tmp / node, ports[node], routes))
            log = (tmp / f"{node}.log").open("ab")
            procs.append(
                subprocess.Popen([binary, "-c", str(path)], stdout=log, stderr=subprocess.STDOUT)
            )
        for node in NODES:
            wait_port("127.0.0.1", ports[node]["mqtt"], timeout=20)
        running = Running(centre, [ports[n]["mqtt"] for n in NODES], procs)
        deadline = time.monotonic() + 60
        for n in range(len(NODES)):  # JetStream up: a persistent session is accepted
            while True:
                c, code = running.client("archiver", n, client_id=f"ready-{n}")
                c.disconnect()
                c.loop_stop()
                if code == 0:
                    break
                assert time.monotonic() < deadline, f"node {n} not ready: {code}"
                time.sleep(0.5)
        yield running
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


@needs_nats
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cluster_enforces_the_centres_users(cluster: Running) -> None:
    got: list[str] = []
    archiver, code = cluster.client("archiver", 0, client_id="archiver-all")
    assert code == 0
    archiver.on_message = lambda _c, _u, msg: got.append(msg.topic)
    subscribed = threading.Event()
    archiver.on_subscribe = lambda *_a: subscribed.set()
    archiver.subscribe("pfm/v1/#", qos=1)
    assert subscribed.wait(10)

    # bridges publish on other nodes than the archiver's: routes carry it (TLS both ways)
    allowed = "pfm/v1/branch1/m1/metrics"
    cluster.publish("bridge-branch1", 1, allowed)
    batches = "pfm/v1/branch1/archive/analytics"  # its own site's archive batches
    cluster.publish("bridge-branch1", 1, batches)
    refused = [
        ("bridge-branch1", "pfm/v1/branch2/m1/metrics"),  # another site's
        ("bridge-branch1", "pfm/v1/branch2/archive/analytics"),  # another site's batches
        ("bridge-branch1", "pfm/v1/branch1/actuator/bank1/command"),  # a command
        ("bridge-branch1", "pfm/v1/branch1/m1/reading"),  # not a summary
        ("monitor", "pfm/v1/branch1/m2/metrics"),  # read-only
    ]
    for user, topic in refused:
        cluster.publish(user, 2, topic)
    sentinel = "pfm/v1/branch2/gateway/gw1/status"
    cluster.publish("bridge-branch2", 2, sentinel)
    deadline = time.monotonic() + 20
    while not {allowed, batches, sentinel} <= set(got) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    archiver.disconnect()
    archiver.loop_stop()
    assert {allowed, batches, sentinel} <= set(got), got  # the archiver reads every site
    assert not [t for _u, t in refused if t in got], got


@needs_nats
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cluster_refuses_wrong_passwords_and_missing_certificates(cluster: Running) -> None:
    c, code = cluster.client("archiver", 1, password="not-" + cluster.centre.passwords["archiver"])
    c.loop_stop()
    assert code in (134, 135), code  # bad user name or password / not authorised
    # another user's password is wrong too
    c, code = cluster.client(
        "bridge-branch1", 1, password=cluster.centre.passwords["bridge-branch2"]
    )
    c.loop_stop()
    assert code in (134, 135), code
    # TLS: a client certificate is required (with TLS 1.3 the server says so after the
    # client's handshake: the connection ends without a CONNACK)
    try:
        c, code = cluster.client("archiver", 1, cert=False)
        c.loop_stop()
    except OSError:
        code = -1
    assert code == -1, code
    c, code = cluster.client("archiver", 1)
    c.disconnect()
    c.loop_stop()
    assert code == 0


@needs_nats
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cluster_bridge_user_reads_nothing(cluster: Running) -> None:
    c, code = cluster.client("bridge-branch1", 0)
    assert code == 0
    granted: list[int] = []
    done = threading.Event()

    def on_subscribe(_c, _u, _mid, reasons, _p) -> None:  # type: ignore[no-untyped-def]
        granted.extend(r.value for r in reasons)
        done.set()

    c.on_subscribe = on_subscribe
    c.subscribe("pfm/v1/branch1/#", qos=1)
    assert done.wait(10)
    c.disconnect()
    c.loop_stop()
    assert granted == [0x80], granted  # SUBACK failure


@needs_nats
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cluster_keeps_retained_messages_and_wills_within_permissions(cluster: Running) -> None:
    """What the services do besides plain QoS 1: a bridge's retained gateway status and an
    archiver's retained presence with its last will, each read on another node."""
    status = "pfm/v1/branch1/gateway/gw1/status"
    bridge, code = cluster.client("bridge-branch1", 0)
    assert code == 0
    bridge.publish(status, b"online", qos=1, retain=True).wait_for_publish(5)
    bridge.disconnect()
    bridge.loop_stop()

    presence = f"pfm/v1/{CENTRE}/archiver/member-a/presence"
    member = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="member-a",
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    crt, key = cluster.centre.certs["archiver"]
    member.tls_set(ca_certs=str(cluster.centre.out / "ca.crt"), certfile=str(crt), keyfile=str(key))
    member.username_pw_set("archiver", cluster.centre.passwords["archiver"])
    member.will_set(presence, b"offline", qos=1, retain=True)
    member.connect("127.0.0.1", cluster.mqtt_ports[1], keepalive=5)
    member.loop_start()
    member.publish(presence, b"online", qos=1, retain=True).wait_for_publish(10)

    def retained(topic: str, node: int) -> bytes | None:
        got: list[bytes] = []
        c, code = cluster.client("monitor", node)
        assert code == 0
        c.on_message = lambda _c, _u, msg: got.append(msg.payload)
        c.subscribe(topic, qos=1)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        c.disconnect()
        c.loop_stop()
        return got[-1] if got else None

    assert retained(status, 2) == b"online"
    assert retained(presence, 2) == b"online"
    # the member dies without a DISCONNECT: its will (retained) says so
    member.loop_stop()
    member.socket().close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 20
    while retained(presence, 0) != b"offline":
        assert time.monotonic() < deadline, "the last will was not published"
        time.sleep(0.5)


def _pfmon_settings(cluster: Running, user: str, client_id: str, **more: Any) -> Settings:
    """How a pfmon service reaches the generated cluster: every node, TLS, its user."""
    crt, key = cluster.centre.certs[user]
    return Settings(
        mqtt_url=",".join(f"mqtts://127.0.0.1:{p}" for p in cluster.mqtt_ports),
        mqtt_protocol="3.1.1",
        mqtt_username=user,
        mqtt_password=cluster.centre.passwords[user],  # type: ignore[arg-type]
        mqtt_ca_file=cluster.centre.out / "ca.crt",
        mqtt_cert_file=crt,
        mqtt_key_file=key,
        mqtt_client_id=client_id,
        metrics_port=0,
        log_format="text",
        **more,
    )


@needs_nats
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_sharded_archiver_stores_through_the_generated_permissions(
    cluster: Running, tmp_path: Path, db_dsn: str, db_schema: str
) -> None:
    """pfmon's own archiver (shards: presence, shard sessions) logged in as ``archiver``
    stores what ``bridge-branch1`` publishes for its site, and nothing it publishes for
    branch2."""
    sites = [CENTRE, *EDGES]
    site_cfg = archiver_site(
        CENTRE,
        sites="all",
        shards=4,
        heartbeat_s=1.0,
        keep_readings=False,
        batch_size=50,
        flush_interval_s=0.2,
        known=dict.fromkeys(sites, TEST_NAMES),
    )
    dsn = schema_dsn(db_dsn, db_schema)
    settings = _pfmon_settings(
        cluster, "archiver", f"arch-{db_schema}", db_dsn=dsn, data_dir=tmp_path / "arch"
    )
    base = datetime.now(UTC).replace(microsecond=0)
    async with running_archiver(settings, site_cfg) as arch:
        shards = arch.shards
        assert shards is not None
        used = set(assign(sites, 4))
        deadline = time.monotonic() + 30
        while not (set(shards.running) == used and all(b.connected for b in shards.buses.values())):
            assert time.monotonic() < deadline, "the archiver did not take its shards"
            await asyncio.sleep(0.1)
        for bus in shards.buses.values():
            await bus.wait_subscribed(30)
        bridge = _pfmon_settings(cluster, "bridge-branch1", f"bridge-{db_schema}")
        async with Bus(bridge, service="testpub", site="branch1", persistent=False) as bus:
            await bus.wait_connected(15)
            for seq in range(20):
                for site in EDGES:  # branch2's are another site's: refused
                    msg = metrics_msg(site, "m1", at(base, seq), seq, 1.0 + seq, 2.0)
                    await bus.publish(topics.metrics(site, "m1"), msg)
        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + 30
            while True:
                rows = await conn.fetch("SELECT site, seq FROM pfm_metrics")
                if len(rows) >= 20 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            rows = await conn.fetch("SELECT site, seq FROM pfm_metrics ORDER BY seq")
        finally:
            await conn.close()
    assert [(r["site"], r["seq"]) for r in rows] == [("branch1", s) for s in range(20)]


@needs_nats
@pytest.mark.skipif(not LocalMosquitto.available(), reason="mosquitto is not installed")
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_an_edge_registered_later_bridges_in_after_a_reload(
    cluster: Running, tmp_path: Path
) -> None:
    """The operator's steps for a new branch: init the edge at the centre (its bridge user
    goes into users.conf), reload the nodes, start the edge broker with the generated
    bridge.conf (TLS, client certificate, every node listed): its summaries arrive."""
    bundle = tmp_path / "branch3" / "secrets"
    edge_result = init_site(
        site="branch3",
        role="edge",
        out=bundle,
        env_file=tmp_path / "branch3" / ".env",
        central=cluster.centre.out,
        central_host=",".join(f"127.0.0.1:{p}" for p in cluster.mqtt_ports),
        broker_path=str(bundle / "broker"),  # where this edge broker finds its files
        chown=False,
    )
    assert 'user: "bridge-branch3"' in (cluster.centre.out / "nats" / "users.conf").read_text()
    cluster.reload()
    # the nodes know the new user once they have re-read users.conf (before that, a
    # refused bridge would back off for up to restart_timeout's 60 s)
    user = "bridge-branch3"
    cluster.centre.passwords[user] = edge_result.passwords[user]
    cluster.centre.certs[user] = (
        bundle / "broker" / "bridge.crt",
        bundle / "broker" / "bridge.key",
    )
    deadline = time.monotonic() + 30
    for node in range(len(cluster.mqtt_ports)):
        while True:
            c, code = cluster.client(user, node, client_id=f"reloaded-{node}")
            c.disconnect()
            c.loop_stop()
            if code == 0:
                break
            assert time.monotonic() < deadline, f"node {node} did not reload users.conf"
            time.sleep(0.5)
    got: list[str] = []
    reader, code = cluster.client("monitor", 2)
    assert code == 0
    reader.on_message = lambda _c, _u, msg: got.append(msg.topic)
    subscribed = threading.Event()
    reader.on_subscribe = lambda *_a: subscribed.set()
    reader.subscribe("pfm/v1/branch3/#", qos=1)
    assert subscribed.wait(10)
    conf = (bundle / "broker" / "conf.d" / "bridge.conf").read_text()
    topic = "pfm/v1/branch3/m1/metrics"
    with LocalMosquitto(tmp_path / "edge", extra_config=conf) as edge:
        local = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-pub")
        local.connect("127.0.0.1", edge.port)
        local.loop_start()
        deadline = time.monotonic() + 45
        while topic not in got:  # the bridge connects within restart_timeout
            assert time.monotonic() < deadline, "the edge's summaries did not arrive"
            local.publish(topic, b"x", qos=1).wait_for_publish(5)
            time.sleep(1.0)
        local.disconnect()
        local.loop_stop()
    reader.disconnect()
    reader.loop_stop()
