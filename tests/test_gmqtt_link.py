"""The gmqtt prototype of the bus's wire (bench/gmqtt_link.py) against a real mosquitto:
what it does (receive, manual acknowledgement, confirmed publishes) and the gap that keeps
it out of the product (a publish the broker refuses passes for delivered)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from bench.gmqtt_link import GmqttBus
from shared import topics
from shared.bus import Backoff, Bus, Incoming, PublishRefused
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement
from shared.messages import Reading
from shared.settings import Settings
from tests.test_bus_wire import fake_broker

TS = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PROTOCOLS = ["5", "3.1.1"]


def reading(site: str, seq: int) -> Reading:
    values = {Measurement.VOLTAGE_L1: 230.0, Measurement.CURRENT_L1: 1.0}
    return Reading(site=site, meter="m1", ts=TS, seq=seq, profile="pmtr001", values=values)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_manual_ack_on_gmqtt_redelivers_what_was_not_acked(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, proto: str
) -> None:
    seen: list[int] = []
    arrived = asyncio.Event()

    def handler_acking(keep: Callable[[int], bool]) -> object:
        async def handler(r: Reading, incoming: Incoming) -> None:
            seen.append(r.seq)
            if keep(r.seq):
                incoming.ack()
            arrived.set()

        return handler

    async def until(n: int) -> None:
        while len(seen) < n:
            arrived.clear()
            await arrived.wait()

    s = settings.model_copy(update={"mqtt_url": mosquitto.url, "mqtt_protocol": proto})
    pattern = topics.pattern(topics.Kind.READING, site_name)

    def bus(keep: Callable[[int], bool]) -> GmqttBus:
        b = GmqttBus(s, service="sub", site=site_name, manual_ack=True)
        b.subscribe(pattern, Reading, handler_acking(keep))  # type: ignore[arg-type]
        return b

    async with bus(lambda seq: True) as b:  # the persistent session and its subscription
        await b.wait_connected(10)
    pub_s = s.model_copy(update={"mqtt_client_id": f"{s.mqtt_client_id}-pub"})
    async with Bus(pub_s, service="pub", site=site_name, persistent=False) as pub:
        await pub.wait_connected(10)
        for seq in range(10):
            await pub.publish(topics.reading(site_name, "m1"), reading(site_name, seq))
    async with bus(lambda seq: seq % 2 == 0) as b:
        await asyncio.wait_for(until(10), 20)
    assert seen == list(range(10))
    seen.clear()
    async with bus(lambda seq: True) as b:
        await asyncio.wait_for(until(5), 20)
        # one more, published now, comes after anything redelivered
        async with Bus(pub_s, service="pub", site=site_name, persistent=False) as pub:
            await pub.wait_connected(10)
            await pub.publish(topics.reading(site_name, "m1"), reading(site_name, 99))
        await asyncio.wait_for(until(6), 20)
    assert seen == [1, 3, 5, 7, 9, 99]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_publish_nowait_on_gmqtt_is_confirmed_past_the_brokers_receive_maximum(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, proto: str
) -> None:
    """More publishes than the broker lets be in flight (mosquitto: 20) are all confirmed."""
    n = 500
    got: list[int] = []
    done = asyncio.Event()

    async def handler(r: Reading, incoming: Incoming) -> None:
        got.append(r.seq)
        if len(got) == n:
            done.set()

    s = settings.model_copy(update={"mqtt_url": mosquitto.url, "mqtt_protocol": proto})
    sub_s = s.model_copy(update={"mqtt_client_id": f"{s.mqtt_client_id}-sub"})
    async with Bus(sub_s, service="sub", site=site_name, persistent=False) as sub:
        sub.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, handler)
        await sub.wait_subscribed(10)
        async with GmqttBus(s, service="pub", site=site_name, persistent=False) as pub:
            await pub.wait_connected(10)
            for seq in range(n):
                pub.publish_nowait(topics.reading(site_name, "m1"), reading(site_name, seq))
            await pub.drain(30)
            assert pub.metrics.published.labels("pub", "reading")._value.get() == n
            assert pub.metrics.publish_failures.labels("pub", "reading")._value.get() == 0
        await asyncio.wait_for(done.wait(), 20)
    assert got == list(range(n))


@pytest.mark.timeout(30)
async def test_a_refused_publish_passes_for_delivered_on_gmqtt_not_on_the_bus(
    settings: Settings, site_name: str
) -> None:
    """A v5 broker answers every PUBLISH with PUBACK 0x87 (not authorised): the bus's own
    wire raises PublishRefused; gmqtt drops the reason code, so its publish 'succeeds'."""
    async with fake_broker(lambda number, level: b"", refuse_publishes=True) as broker:
        s = settings.model_copy(
            update={"mqtt_url": f"mqtt://127.0.0.1:{broker.port}", "mqtt_protocol": "5"}
        )
        backoff = Backoff(initial_s=0.05, max_s=0.2)
        topic = topics.reading(site_name, "m1")
        async with Bus(s, service="pub", site=site_name, backoff=backoff) as bus:
            await bus.wait_connected(10)
            with pytest.raises(PublishRefused):
                await bus.publish(topic, reading(site_name, 1), timeout=5)
        async with GmqttBus(s, service="pub", site=site_name, backoff=backoff) as gbus:
            await gbus.wait_connected(10)
            await gbus.publish(topic, reading(site_name, 2), timeout=5)  # no error
            assert gbus.metrics.published.labels("pub", "reading")._value.get() == 1
        assert broker.refused == 2
