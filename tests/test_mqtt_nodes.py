"""Several broker nodes: ``PFM_MQTT_URL`` lists them, the bus moves to the next when one
is lost; an edge's bridge lists every central node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.init.bridge import bridge_conf, central_addresses
from shared.bus import Bus
from shared.embedded import LocalMosquitto
from shared.errors import ConfigError
from shared.messages import DeadLetter
from shared.settings import Settings, load_settings, parse_mqtt_urls
from tests.nats_cluster import NatsCluster, nats_server

needs_mosquitto = pytest.mark.skipif(
    not LocalMosquitto.available(), reason="mosquitto is not installed"
)


def test_several_urls_parse_in_order_with_credentials() -> None:
    s = Settings(mqtt_url="mqtt://n1:1883, mqtt://n2:1884,mqtt://u:p@n3", mqtt_username="arch")
    targets = s.mqtt_targets()
    assert [(t.host, t.port) for t in targets] == [("n1", 1883), ("n2", 1884), ("n3", 1883)]
    assert {t.username for t in targets} == {"arch"}
    assert targets[2].password == "p"
    assert s.mqtt(4).host == "n2"  # wraps around
    assert parse_mqtt_urls("mqtts://only")[0].port == 8883


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://a,,mqtt://b", "entry 2 of 3 is empty"),
        ("mqtt://a,", "entry 2 of 2 is empty"),
        ("mqtt://a,http://b", "entry 2 of 2"),
        ("mqtt://a:1883,mqtt://a", "entry 2 of 2 repeats entry 1 (a:1883)"),
        ("mqtts://a,mqtt://b", "mixes mqtts:// and mqtt://"),
        ("mqtt://a,mqtt://b:99999", "bad port (entry 2 of 2)"),
    ],
)
def test_bad_node_lists_are_refused_naming_the_entry(
    url: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFM_MQTT_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert expected in str(info.value)


def test_central_addresses() -> None:
    assert central_addresses("c1, c2:1884,10.0.0.3", 8883) == [
        ("c1", 8883),
        ("c2", 1884),
        ("10.0.0.3", 8883),
    ]
    for bad, why in [
        ("c1,,c2", "entry 2: '' is not a host"),
        ("c1,c1:8883", "entry 2: c1:8883 is listed twice"),
        ("c1:x", "entry 1: port 'x' is not 1-65535"),
        ("c1:0", "entry 1: port '0'"),
    ]:
        with pytest.raises(ConfigError, match=why):
            central_addresses(bad, 8883)
    conf = bridge_conf(
        site="plant",
        gateway="gw1",
        central_host="c1,c2,c3:9883",
        central_port=8883,
        password="pw",
        secrets_path="/s",
    )
    with pytest.raises(ConfigError, match="reaches one central host"):
        bridge_conf(
            site="plant",
            gateway="gw1",
            central_host="c1,c2",
            central_port=443,
            password="pw",
            secrets_path="/s",
            tunnel="wss-tunnel:8884",
        )
    lines = conf.splitlines()
    assert "address c1:8883 c2:8883 c3:9883" in lines
    assert "round_robin false" in lines
    assert "try_private false" in lines


@needs_mosquitto
@pytest.mark.timeout(60)
async def test_bus_moves_to_the_next_node_when_one_is_lost(tmp_path: Path) -> None:
    a = LocalMosquitto(tmp_path / "a").start()
    b = LocalMosquitto(tmp_path / "b").start()
    try:
        settings = Settings(
            mqtt_url=f"{a.url},{b.url}", metrics_port=0, mqtt_client_id="pfm-test-nodes"
        )
        async with Bus(settings, service="test", site="nodes", persistent=False) as bus:
            await bus.wait_connected(10)
            assert bus.node == f"127.0.0.1:{a.port}"
            a.stop()
            async with asyncio.timeout(10):
                while bus.connections < 2 or not bus.connected:
                    await asyncio.sleep(0.05)
            assert bus.node == f"127.0.0.1:{b.port}"
            assert bus.connections == 2
            await bus.publish("pfm/v1/nodes/x/metrics", b"{}")  # works on the new node
    finally:
        a.stop()
        b.stop()


@pytest.mark.skipif(nats_server() is None, reason="nats-server is not installed")
@pytest.mark.timeout(60)
async def test_a_refused_subscription_is_an_error_not_silence(tmp_path: Path) -> None:
    # NATS refuses a subscription that would take a session past 65,535 QoS 1 messages
    # in flight (SUBACK 0x80): here the second one of 40,000 each
    nats = NatsCluster(tmp_path / "nats", nodes=1, mqtt_options="max_ack_pending: 40000")
    with nats:
        await asyncio.to_thread(nats.wait_ready)
        settings = Settings(
            mqtt_url=nats.mqtt_url,
            mqtt_protocol="3.1.1",
            metrics_port=0,
            mqtt_client_id="pfm-test-refused",
        )

        async def handler(model: object, incoming: object) -> None:
            pass

        bus = Bus(settings, service="test", site="ok", persistent=False)
        bus.subscribe("pfm/v1/a/+/metrics", DeadLetter, handler)
        bus.subscribe("pfm/v1/b/+/metrics", DeadLetter, handler)
        async with bus:
            async with asyncio.timeout(20):
                while bus.last_error is None:
                    await asyncio.sleep(0.05)
            assert not bus.connected
            assert "pfm/v1/b/+/metrics refused by the broker (SUBACK 0x80)" in bus.last_error
            refused = bus.metrics.handler_errors.labels("test", "subscribe")._value.get()
            assert refused >= 1
        # one such subscription alone is granted
        ok = Bus(settings, service="test", site="ok", persistent=False)
        ok.subscribe("pfm/v1/a/+/metrics", DeadLetter, handler)
        async with ok:
            await ok.wait_subscribed(20)


def test_init_lists_every_bad_central_host(tmp_path: Path) -> None:
    from services.init.site import init_site

    with pytest.raises(ConfigError) as err:
        init_site(
            site="plant",
            role="edge",
            central_host="c1,,c2",
            out=tmp_path / "x",
            env_file=tmp_path / "x.env",
        )
    assert "--central-host 'c1,,c2', entry 2: '' is not a host" in str(err.value)
    with pytest.raises(ConfigError) as err:
        init_site(
            site="plant",
            role="edge",
            central_host="c1,c2",
            central_tunnel="wss-tunnel:8884",
            out=tmp_path / "y",
            env_file=tmp_path / "y.env",
        )
    assert "reaches one central host; 'c1,c2' lists several" in str(err.value)
