"""Two processes with one MQTT client id: one stops with exit 2 naming the id, one works.

Without the check they kick each other off the broker for ever (each reconnect takes
the session over from the other).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import topics
from shared.bus import Backoff, Bus, ClientIdInUse
from shared.messages import Reading
from shared.settings import Settings
from tests.helpers import Inbox

pytestmark = pytest.mark.timeout(60)


class _Holder:
    """Enters a bus in a task of its own, as a service's main does, and waits."""

    def __init__(self, settings: Settings, site: str, name: str) -> None:
        self.bus = Bus(settings, service="svc", site=site, backoff=Backoff(0.5, 30.0))
        self.inbox = Inbox()
        self.bus.subscribe(topics.pattern(topics.Kind.READING, site), Reading, self.inbox.handler)
        self.task = asyncio.create_task(self._hold(), name=name)

    async def _hold(self) -> None:
        async with self.bus:
            await asyncio.Event().wait()


@pytest.mark.parametrize(
    ("protocol", "fast"), [("5", True), ("5", False), ("3.1.1", True), ("3.1.1", False)]
)
async def test_one_of_two_buses_with_one_client_id_stops_the_other_works(
    settings: Settings, site_name: str, protocol: str, fast: bool
) -> None:
    from tests.test_bus import reading

    cfg = settings.model_copy(
        update={"mqtt_protocol": protocol, "mqtt_fast": fast, "mqtt_client_id": f"pfm-{site_name}"}
    )
    first = _Holder(cfg, site_name, "first")
    await first.bus.wait_connected(10)
    second = _Holder(cfg, site_name, "second")
    started = time.monotonic()
    done, _ = await asyncio.wait(
        {first.task, second.task}, timeout=20, return_when=asyncio.FIRST_COMPLETED
    )
    took = time.monotonic() - started
    assert len(done) == 1, "neither bus stopped: they keep kicking each other"
    loser = done.pop()
    winner = second if loser is first.task else first
    with pytest.raises(ClientIdInUse) as info:
        loser.result()
    assert f"'pfm-{site_name}'" in str(info.value) and "another process" in str(info.value)
    assert took < 10, took
    # the other one stays connected and keeps working
    await winner.bus.wait_connected(10)
    connections = winner.bus.connections
    await winner.bus.publish(topics.reading(site_name, "m1"), reading(site_name, 1))
    await winner.inbox.get(1, timeout=10)
    await asyncio.sleep(1.5)  # nobody takes the session over again
    assert winner.bus.connected and winner.bus.connections == connections
    winner.task.cancel()
    await asyncio.gather(winner.task, return_exceptions=True)


@pytest.mark.slow
def test_two_collector_processes_with_one_id_one_exits_2(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    """Two real collector processes of one site on one host (distinct data dirs)."""
    site = tmp_path / "site.yaml"
    site.write_text(
        f"site: {site_name}\n"
        "buses: [{name: b1, host: 127.0.0.1, port: 1, timeout_s: 0.2}]\n"
        "meters: [{name: m1, bus: b1, unit: 1, profile: pmtr001}]\n"
    )
    procs = []
    for n in (1, 2):
        env = {
            **os.environ,
            "PFM_MQTT_URL": settings.mqtt_url,
            "PFM_MQTT_CLIENT_ID": f"pfm-{site_name}",
            "PFM_DATA_DIR": str(tmp_path / f"data{n}"),
            "PFM_METRICS_PORT": "0",
            "PFM_LOG_FORMAT": "text",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "services.cli", "collector", "--site-file", str(site)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        time.sleep(3 if n == 1 else 0)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        exited = [p for p in procs if p.poll() is not None]
        assert len(exited) == 1, "no collector stopped"
        loser = exited[0]
        _, err = loser.communicate(timeout=10)
        assert loser.returncode == 2, err
        assert f"'pfm-{site_name}'" in err and "in use by another process" in err, err
        assert "Traceback" not in err
        time.sleep(2)
        assert all(p.poll() is None for p in procs if p is not loser)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.communicate(timeout=20)


def test_a_v5_session_taken_over_is_recognised_through_the_cause() -> None:
    """MQTT v5 brokers that send DISCONNECT 0x8E (Mosquitto >= 2.0.12 and others): the
    reason reaches the bus as the cause of aiomqtt's disconnection error."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from shared.bus import _taken_over

    def disconnected(code: int) -> aiomqtt.MqttError:
        try:
            try:
                raise aiomqtt.MqttCodeError(ReasonCode(PacketTypes.DISCONNECT, identifier=code))
            except aiomqtt.MqttError as cause:
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause
        except aiomqtt.MqttError as exc:
            return exc

    assert _taken_over(disconnected(0x8E))
    assert not _taken_over(disconnected(0x80))
    assert not _taken_over(aiomqtt.MqttError("timed out"))
