"""The bus against real brokers: dead letters, outages, reconnects, protocol fallback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from services.actuator import service as actuator
from services.analytics import service as analytics
from services.archiver import service as archiver
from shared import topics
from shared.bus import Backoff, Bus, BusUnavailable, Incoming
from shared.embedded import AmqttBroker, LocalMosquitto, free_port
from shared.measurements import Measurement
from shared.messages import DeadLetter, Metrics, Reading, encode
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import parse_site
from tests.helpers import Inbox, listening

TS = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FAST = Backoff(initial_s=0.1, max_s=0.5)


def reading(site: str, seq: int, meter: str = "m1") -> Reading:
    return Reading(
        site=site,
        meter=meter,
        ts=TS,
        seq=seq,
        profile="pmtr001",
        values={
            Measurement.VOLTAGE_L1: 230.0,
            Measurement.CURRENT_L1: 1.0,
            Measurement.POWER_L1: 200.0,
        },
    )


async def raw_publish(url: str, topic: str, payload: bytes) -> None:
    port = int(url.rsplit(":", 1)[1])
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.publish(topic, payload, qos=1)


async def test_malformed_and_wrong_schema_payloads_are_dead_lettered(
    settings: Settings, site_name: str
) -> None:
    got = Inbox()
    async with (
        listening(
            settings, site_name, topics.pattern(topics.Kind.DEADLETTER, site_name), DeadLetter
        ) as letters,
        Bus(settings, service="svc", site=site_name) as bus,
    ):
        bus.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, got.handler)
        await bus.wait_connected(10)
        topic = topics.reading(site_name, "m1")
        wrong_schema = encode(reading(site_name, 1)).replace(b"pfm.reading/1", b"pfm.reading/9")
        await raw_publish(settings.mqtt_url, topic, b"{not json")
        await raw_publish(settings.mqtt_url, topic, wrong_schema)
        await raw_publish(settings.mqtt_url, topic, encode(reading(site_name, 2)))
        items = await letters.get(2)
        await got.get(1)
        first, second = items[0], items[1]
        assert isinstance(first, DeadLetter) and isinstance(second, DeadLetter)
        assert first.service == "svc" and first.topic == topic
        assert "malformed JSON" in first.reason and first.payload() == b"{not json"
        assert "schema" in second.reason
        # the service carried on: the valid reading after the bad ones was handled
        assert [r.seq for r in got.items] == [2]  # type: ignore[attr-defined]
        assert bus.metrics.deadletters.labels("svc", "reading")._value.get() == 2


async def test_a_failing_handler_is_counted_and_the_bus_carries_on(
    settings: Settings, site_name: str
) -> None:
    seen: list[int] = []

    async def handler(r: Reading, incoming: Incoming) -> None:
        seen.append(r.seq)
        if r.seq == 1:
            raise RuntimeError("boom")

    async with Bus(settings, service="svc", site=site_name) as bus:
        bus.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, handler)
        await bus.wait_connected(10)
        for seq in (1, 2):
            await bus.publish(topics.reading(site_name, "m1"), reading(site_name, seq))
        for _ in range(100):
            if seen == [1, 2]:
                break
            await asyncio.sleep(0.05)
        assert seen == [1, 2]
        assert bus.metrics.handler_errors.labels("svc", "reading")._value.get() == 1


K = topics.Kind
#: every topic kind each service subscribes to
SERVICES = [
    pytest.param(analytics.run, [K.READING, K.WAVEFORM], "analytics", id="analytics"),
    pytest.param(
        archiver.run,
        [K.METRICS, K.EVENT, K.COMMAND, K.STATE, K.STATUS, K.READING],
        "archiver",
        id="archiver",
    ),
    pytest.param(actuator.run, [K.METRICS, K.STATE], "actuator", id="actuator"),
]


def concrete_topic(kind: topics.Kind, site: str) -> str:
    return {
        K.COMMAND: topics.command(site, "dev1"),
        K.STATE: topics.state(site, "dev1"),
        K.STATUS: topics.gateway_status(site, "gw1"),
    }.get(kind) or f"{topics.ROOT}/{site}/m1/{kind.value}"


@pytest.mark.parametrize(("run", "kinds", "service"), SERVICES)
async def test_each_service_dead_letters_every_topic_and_continues(
    settings: Settings, site_name: str, run: object, kinds: list[topics.Kind], service: str
) -> None:
    site = parse_site({"site": site_name})
    shutdown = Shutdown()
    async with listening(
        settings, site_name, topics.deadletter(site_name, service), DeadLetter
    ) as letters:
        task = asyncio.create_task(run(settings, site, shutdown))  # type: ignore[operator]
        await asyncio.sleep(1.5)
        for kind in kinds:
            topic = concrete_topic(kind, site_name)
            await raw_publish(settings.mqtt_url, topic, b"\x00\xff garbage")
            await raw_publish(settings.mqtt_url, topic, b'{"schema": "pfm.other/1"}')
        items = await letters.get(2 * len(kinds), timeout=20)
        assert not task.done(), "the service stopped on bad input"
        shutdown.request()
        await asyncio.wait_for(task, 20)
    letters_by_topic: dict[str, list[str]] = {}
    for d in items:
        assert isinstance(d, DeadLetter) and d.service == service
        letters_by_topic.setdefault(d.topic, []).append(d.reason)
    for kind in kinds:
        reasons = letters_by_topic.get(concrete_topic(kind, site_name), [])
        assert len(reasons) == 2, f"{service} did not dead-letter both bad {kind} payloads"
        assert any("malformed JSON" in r for r in reasons)
        assert any("schema" in r for r in reasons)


async def test_broker_down_at_start_then_up(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    port = free_port()
    s = settings.model_copy(update={"mqtt_url": f"mqtt://127.0.0.1:{port}"})
    got = Inbox()
    async with Bus(s, service="svc", site=site_name, backoff=FAST) as bus:
        bus.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, got.handler)
        await asyncio.sleep(1.0)
        assert not bus.connected
        with pytest.raises(BusUnavailable):
            await bus.publish(topics.reading(site_name, "m1"), reading(site_name, 1))
        with LocalMosquitto(tmp_path / "mosq", port=port):
            await bus.wait_connected(15)
            await bus.publish(topics.reading(site_name, "m1"), reading(site_name, 7))
            items = await got.get(1)
            assert items[0].seq == 7  # type: ignore[attr-defined]
            assert bus.protocol == "5"


async def test_broker_restart_reconnects_resubscribes_and_keeps_the_session(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto
) -> None:
    s = settings.model_copy(update={"mqtt_url": mosquitto.url})
    got = Inbox()
    sub_settings = s.model_copy(update={"mqtt_client_id": f"{s.mqtt_client_id}-sub"})
    async with (
        Bus(sub_settings, service="sub", site=site_name, backoff=FAST) as sub,
        Bus(s, service="pub", site=site_name, backoff=FAST) as pub,
    ):
        sub.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, got.handler)
        await sub.wait_connected(10)
        await pub.wait_connected(10)
        await pub.publish(topics.reading(site_name, "m1"), reading(site_name, 1))
        await got.get(1)
        mosquitto.stop()
        await asyncio.sleep(1.0)
        assert not sub.connected and not pub.connected
        mosquitto.start()
        await sub.wait_connected(20)
        await pub.wait_connected(20)
        await pub.publish(topics.reading(site_name, "m1"), reading(site_name, 2))
        await got.get(2)
        assert sub.connections >= 2
        assert sub.metrics.bus_reconnects.labels("sub")._value.get() >= 1
    # persistent session: messages published while the subscriber is away arrive later
    async with Bus(s, service="pub", site=site_name, backoff=FAST) as pub:
        await pub.wait_connected(10)
        for seq in (3, 4, 5):
            await pub.publish(topics.reading(site_name, "m1"), reading(site_name, seq))
    async with Bus(sub_settings, service="sub", site=site_name, backoff=FAST) as sub:
        sub.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, got.handler)
        await got.get(5)
    assert [r.seq for r in got.items] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]


async def test_falls_back_to_mqtt_311_on_a_v5_less_broker(
    settings: Settings, site_name: str
) -> None:
    async with AmqttBroker() as broker:
        s = settings.model_copy(update={"mqtt_url": broker.url})
        got = Inbox()
        async with Bus(s, service="svc", site=site_name, backoff=FAST) as bus:
            bus.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, got.handler)
            await bus.wait_connected(20)
            assert bus.protocol == "3.1.1"
            await bus.publish(topics.reading(site_name, "m1"), reading(site_name, 3))
            items = await got.get(1)
            assert items[0].seq == 3  # type: ignore[attr-defined]


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
async def test_metric_names_pass_promtool(settings: Settings, site_name: str) -> None:
    async with Bus(settings, service="svc", site=site_name) as bus:
        await bus.wait_connected(10)
        await bus.publish(
            topics.metrics(site_name, "m1"),
            Metrics(site=site_name, meter="m1", ts=TS, seq=1, interval_s=0, values={}),
        )
        text = bus.metrics.exposition()
    res = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert b"pfm_messages_published_total" in text


async def test_wait_subscribed_covers_subscriptions_made_while_connected(
    settings: Settings, site_name: str
) -> None:
    """A test (or a service) can wait on the SUBACKs instead of sleeping and hoping."""
    inbox = Inbox()
    pub_settings = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-p"})
    async with (
        Bus(pub_settings, service="pub", site=site_name, persistent=False) as pub,
        Bus(settings, service="t", site=site_name, persistent=False) as bus,
    ):
        await pub.wait_connected(10)
        await bus.wait_connected(10)
        meters = [f"m{i}" for i in range(50)]
        for m in meters:  # subscribed while connected: each one its own SUBSCRIBE
            bus.subscribe(topics.reading(site_name, m), Reading, inbox.handler)
        await bus.wait_subscribed(10)
        for i, m in enumerate(meters):
            await pub.publish(topics.reading(site_name, m), reading(site_name, i, m))
        await inbox.get(len(meters), timeout=5)
    assert sorted(r.meter for r in inbox.items) == sorted(meters)  # type: ignore[attr-defined]
