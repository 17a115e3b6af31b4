"""The broker ACL from `pfmon init` for alerts and Home Assistant: exactly these topics,
on a real mosquitto with the generated configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.init import acl_text
from shared import topics
from shared.site import parse_site
from tests.test_security_broker import Broker, init, probe, wait_for

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)

NOT_AUTHORIZED = 0x87


def _site_file(tmp: Path, site: str, **homeassistant: object) -> Path:
    raw: dict[str, object] = {
        "site": site,
        "buses": [{"name": "b1", "host": "127.0.0.1"}],
        "meters": [{"name": "m1", "bus": "b1", "unit": 1, "profile": "pmtr001"}],
    }
    if homeassistant:
        raw["homeassistant"] = homeassistant
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _rc(client: object, topic: str) -> int:
    rc = client.publish(topic)  # type: ignore[attr-defined]
    assert rc is not None
    return int(rc.value)


@pytest.mark.parametrize("allow_control", [False, True], ids=["read-only", "control"])
def test_home_assistant_gets_exactly_its_topics(
    tmp_path: Path, site_name: str, allow_control: bool
) -> None:
    site_file = _site_file(tmp_path, site_name, allow_control=allow_control)
    result = init(tmp_path, site_name, site_file=site_file)
    assert "homeassistant" in result.passwords
    broker = Broker(tmp_path / "broker", result.out).start()
    try:
        hass = probe(result, broker, "homeassistant")
        assert hass.connect(), hass.error
        node = f"pfm-{site_name}"
        # what its entities read: granted (0x00-0x02); anything else of the site: refused
        for pattern in (
            topics.metrics(site_name, "m1"),
            topics.event(site_name, "m1"),
            topics.gateway_status(site_name, "gw1"),
            topics.state(site_name, "bank1"),
            "homeassistant/#",
        ):
            assert hass.subscribe(pattern)[0].value < 0x80, pattern
        hass.subscribe(topics.reading(site_name, "m1"))  # granted, but nothing is delivered
        assert _rc(hass, "homeassistant/status") == 0
        assert _rc(hass, topics.command(site_name, "bank1")) == NOT_AUTHORIZED
        assert _rc(hass, topics.metrics(site_name, "m1")) == NOT_AUTHORIZED
        assert _rc(hass, f"homeassistant/sensor/{node}/x/config") == NOT_AUTHORIZED
        request = f"pfm/v1/{site_name}/actuator/bank1/request"
        # allowed: 0x00, or 0x10 "no matching subscribers" (no actuator runs here)
        assert (_rc(hass, request) < 0x80) is allow_control
        # the collector publishes the site's discovery configs, not another site's
        col = probe(result, broker, "collector")
        assert col.connect(), col.error
        assert _rc(col, f"homeassistant/sensor/{node}/m1_power/config") == 0
        assert _rc(col, "homeassistant/sensor/pfm-other/m1_power/config") == NOT_AUTHORIZED
        assert _rc(col, topics.reading(site_name, "m1")) == 0
        assert _rc(col, topics.event(site_name, "m1")) == 0
        wait_for(lambda: hass.received(f"homeassistant/sensor/{node}/m1_power/config"), "config")
        wait_for(lambda: hass.received(topics.event(site_name, "m1")), "the event")
        assert hass.received(topics.reading(site_name, "m1")) == [], "a reading reached HA"
        for c in (hass, col):
            c.close()
    finally:
        broker.stop()


def test_alerts_reads_the_events_and_publishes_nothing(tmp_path: Path, site_name: str) -> None:
    result = init(tmp_path, site_name, site_file=_site_file(tmp_path, site_name))
    assert "homeassistant" not in result.passwords  # no section, no user
    broker = Broker(tmp_path / "broker", result.out).start()
    try:
        alerts = probe(result, broker, "alerts")
        assert alerts.connect(), alerts.error
        assert alerts.subscribe(f"pfm/v1/{site_name}/+/event")[0].value < 0x80
        alerts.subscribe(f"pfm/v1/{site_name}/+/reading")  # granted, nothing delivered
        assert _rc(alerts, topics.event(site_name, "m1")) == NOT_AUTHORIZED
        assert _rc(alerts, topics.deadletter(site_name, "alerts")) < 0x80
        col = probe(result, broker, "collector")
        assert col.connect(), col.error
        assert _rc(col, f"homeassistant/sensor/pfm-{site_name}/x/config") == NOT_AUTHORIZED
        assert _rc(col, topics.reading(site_name, "m1")) == 0
        assert _rc(col, topics.event(site_name, "m1")) == 0
        wait_for(lambda: alerts.received(topics.event(site_name, "m1")), "the event")
        assert alerts.received(topics.reading(site_name, "m1")) == []
        for c in (alerts, col):
            c.close()
    finally:
        broker.stop()


def test_the_acl_names_a_custom_prefix_and_no_user_at_the_centre() -> None:
    site = parse_site({"site": "s1", "homeassistant": {"prefix": "ha/disc", "allow_control": True}})
    text = acl_text("site", "s1", (), site.homeassistant)
    assert "topic readwrite ha/disc/+/pfm-s1/+/config" in text
    assert "topic read ha/disc/#" in text and "homeassistant/" not in text
    central = acl_text("central", "centre", (), site.homeassistant)
    assert "user homeassistant" not in central and "ha/disc" not in central
