"""Home Assistant MQTT discovery: the retained configs on the real Mosquitto, checked
field by field against Home Assistant's documented keys, and each state_topic +
value_template rendered with jinja2 (as Home Assistant does) against real messages."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.analytics import service as analytics
from services.analytics.alarms import ALARMS
from services.collector import homeassistant as ha
from services.collector import service as collector
from services.simulator import LoadModel, MeterFleet
from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import free_port
from shared.errors import ConfigError
from shared.messages import (
    ActuatorState,
    Event,
    EventState,
    Metrics,
    Request,
    Severity,
    utcnow,
)
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from tests.helpers import listening

# -- what Home Assistant documents (MQTT sensor / binary sensor / switch, sensor device
#    classes and their units) ---------------------------------------------------------------

_COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "icon", "json_attributes_template", "json_attributes_topic", "name",
    "object_id", "origin", "payload_available", "payload_not_available", "platform", "qos",
    "unique_id", "value_template", "state_topic",
}  # fmt: skip
DOCUMENTED_KEYS = {
    "sensor": _COMMON | {
        "device_class", "expire_after", "force_update", "last_reset_value_template",
        "options", "suggested_display_precision", "state_class", "unit_of_measurement",
    },
    "binary_sensor": _COMMON | {
        "device_class", "expire_after", "force_update", "off_delay", "payload_off",
        "payload_on",
    },
    "switch": _COMMON | {
        "command_template", "command_topic", "device_class", "optimistic", "payload_off",
        "payload_on", "retain", "state_off", "state_on",
    },
}  # fmt: skip
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
AVAILABILITY_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
#: sensor device class -> the units Home Assistant accepts for it
SENSOR_UNITS: dict[str | None, set[str | None]] = {
    "power_factor": {None, "%"},
    "power": {"mW", "W", "kW", "MW", "GW", "TW"},
    "reactive_power": {"mvar", "var", "kvar"},
    "apparent_power": {"mVA", "VA", "kVA"},
    "voltage": {"µV", "mV", "V", "kV", "MV"},
    "current": {"µA", "mA", "A"},
    "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "energy": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal"},
    None: {"%"},  # THD: no device class, a percentage
}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
BINARY_SENSOR_CLASSES = {"problem"}


def check_config(topic: str, config: dict[str, Any]) -> list[str]:
    """Every problem of one discovery config against Home Assistant's documented keys."""
    component = topic.split("/")[1]
    bad = [f"{topic}: {k} is not a documented {component} key"
           for k in set(config) - DOCUMENTED_KEYS[component]]  # fmt: skip
    for key in ("unique_id", "name", "state_topic", "value_template", "device", "availability"):
        if key not in config:
            bad.append(f"{topic}: no {key}")
    dev = config.get("device", {})
    bad += [f"{topic}: device.{k} is not documented" for k in set(dev) - DEVICE_KEYS]
    if not dev.get("identifiers") or not dev.get("manufacturer") or not dev.get("model"):
        bad.append(f"{topic}: device without identifiers, manufacturer and model")
    for a in config.get("availability", []):
        bad += [f"{topic}: availability.{k} is not documented" for k in set(a) - AVAILABILITY_KEYS]
    bad += [f"{topic}: origin.{k}" for k in set(config.get("origin", {})) - ORIGIN_KEYS]
    if component == "sensor":
        dc = config.get("device_class")
        if dc not in SENSOR_UNITS:
            bad.append(f"{topic}: device_class {dc!r} is not a sensor device class")
        elif config.get("unit_of_measurement") not in SENSOR_UNITS[dc]:
            bad.append(f"{topic}: unit {config.get('unit_of_measurement')!r} is not one of {dc}'s")
        if config.get("state_class") not in STATE_CLASSES:
            bad.append(f"{topic}: state_class {config.get('state_class')!r}")
        if dc == "energy" and config.get("state_class") not in ("total", "total_increasing"):
            bad.append(f"{topic}: an energy sensor must be total or total_increasing")
    if component == "binary_sensor" and config.get("device_class") not in BINARY_SENSOR_CLASSES:
        bad.append(f"{topic}: device_class {config.get('device_class')!r}")
    if component == "switch" and not config.get("command_topic"):
        bad.append(f"{topic}: a switch needs a command_topic")
    return bad


# -- rendering the way Home Assistant does ---------------------------------------------------

_ENV = ImmutableSandboxedEnvironment()
_ENV.globals["now"] = lambda: datetime.now(UTC)
_ENV.globals["as_timestamp"] = lambda t: t.timestamp()


def render(template: str, payload: bytes | str, **variables: Any) -> str:
    text = payload.decode() if isinstance(payload, bytes) else payload
    try:
        value_json = orjson.loads(text)
    except orjson.JSONDecodeError:
        value_json = None
    return _ENV.from_string(template).render(value=text, value_json=value_json, **variables)


# -- helpers ---------------------------------------------------------------------------------


def _site(name: str, port: int, **section: Any) -> SiteConfig:
    return parse_site(
        {
            "site": name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                {"name": "main", "bus": "b1", "unit": 1, "profile": "pmtr001", "interval_s": 0.2},
                {"name": "hvac", "bus": "b1", "unit": 2, "profile": "pmtr001", "interval_s": 0.2},
            ],
            "homeassistant": section,
        }
    )


def _svc(settings: Settings, name: str) -> Settings:
    return settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}"})


async def retained(
    settings: Settings, site: str, prefix: str = "homeassistant"
) -> dict[str, bytes]:
    """What a newcomer (Home Assistant starting) gets on the site's discovery topics."""
    got: dict[str, bytes] = {}
    arrived = asyncio.Event()

    class Any_(ha._Retained):
        pass

    async def seen(_: Any_, incoming: Incoming) -> None:
        if incoming.retain:
            got[incoming.topic] = incoming.payload
            arrived.set()

    s = _svc(settings, f"ha-{len(got)}-{id(got)}")
    async with Bus(s, service="homeassistant", site=site, persistent=False) as bus:
        bus.subscribe(f"{prefix}/+/{ha.node_id(site)}/+/config", Any_, seen)
        await bus.wait_subscribed(10)
        while True:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), 0.7)
            except TimeoutError:
                break
    return got


@contextlib.asynccontextmanager
async def running(settings: Settings, site: SiteConfig) -> AsyncIterator[None]:
    stop = Shutdown()
    task = asyncio.create_task(collector.run(_svc(settings, "col"), site, stop))
    try:
        await stop.wait_ready(15)
        yield
    finally:
        stop.request("test done")
        await asyncio.wait_for(task, 15)


# -- the site file ---------------------------------------------------------------------------


def test_off_by_default_and_bad_sections_are_refused() -> None:
    meter = {"name": "m", "bus": "b", "unit": 1, "profile": "pmtr001"}
    bare = parse_site({"site": "s1", "buses": [{"name": "b", "host": "h"}], "meters": [meter]})
    assert bare.homeassistant is None and ha.configs(bare) == {}
    with pytest.raises(ConfigError) as err:
        parse_site(
            {
                "site": "s1",
                "buses": [{"name": "b", "host": "h"}],
                "meters": [{"name": "m", "bus": "b", "unit": 1, "profile": "pmtr001"}],
                "homeassistant": {"prefix": "ha/#", "meters": ["nope"], "quantities": ["pf", "x"]},
            },
            "site.yaml",
        )
    text = str(err.value)
    assert "homeassistant.prefix" in text and "'ha/#' is not a topic prefix" in text
    assert "homeassistant.quantities" in text
    with pytest.raises(ConfigError, match=r"homeassistant\.meters: no meter named 'nope'"):
        parse_site(
            {
                "site": "s1",
                "buses": [{"name": "b", "host": "h"}],
                "meters": [meter],
                "homeassistant": {"meters": ["nope"]},
            },
            "site.yaml",
        )


def test_configs_follow_the_meters_quantities_and_profile() -> None:
    site = _site("s1", 502, meters=["main"], quantities=["pf", "voltage"], alarms=False)
    got = ha.configs(site)
    names = sorted(t.split("/")[3] for t in got)
    assert names == sorted(
        ["main_power_factor", *(f"main_power_factor_l{k}" for k in (1, 2, 3)),
         *(f"main_voltage_l{k}" for k in (1, 2, 3))]
    )  # fmt: skip
    one = got["homeassistant/sensor/pfm-s1/main_power_factor/config"]
    assert one["device"]["manufacturer"] == "PMTR" and one["device"]["model"] == "PMTR_001"
    # a magnitude-only meter has no reactive power (its sign is unknown): none is advertised
    assert not [t for t in ha.configs(_site("s1", 502)) if "reactive" in t]
    # no switch without allow_control
    assert not [t for t in ha.configs(_site("s1", 502)) if "/switch/" in t]


# -- on the real broker ----------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_retained_configs_and_templates_give_the_metrics_values(
    settings: Settings, site_name: str
) -> None:
    port = free_port()
    site = _site(site_name, port)
    load = LoadModel(voltage_v=(231.0, 229.0, 230.5), current_a=(12.0, 8.0, 5.0), noise=0.0)
    ana = Shutdown()
    status_topic = topics.gateway_status(site_name, site.gateway)
    async with (
        MeterFleet(port, {1: load, 2: LoadModel()}),
        listening(settings, site_name, topics.metrics(site_name, "main"), Metrics) as inbox,
        asyncio.TaskGroup() as tg,
    ):
        raw: list[bytes] = []

        async def keep(_: Metrics, incoming: Incoming) -> None:
            raw.append(incoming.payload)

        tg.create_task(analytics.run(_svc(settings, "ana"), site, ana))
        await ana.wait_ready(15)
        async with (
            Bus(_svc(settings, "raw"), service="raw", site=site_name, persistent=False) as bus,
            running(settings, site),
        ):
            bus.subscribe(topics.metrics(site_name, "main"), Metrics, keep)
            await bus.wait_subscribed(10)
            await inbox.get(3, 20)
            await asyncio.wait_for(_until(lambda: len(raw) >= 3), 20)
            wanted = ha.configs(site)
            for _ in range(20):  # the collector publishes them just after it connects
                got = await retained(settings, site_name)
                if len(got) >= len(wanted):
                    break
            status = await retained_status(settings, site_name, status_topic)
        ana.request("test done")
    wanted = ha.configs(site)
    assert set(got) == set(wanted), set(got) ^ set(wanted)
    problems: list[str] = []
    for topic, payload in got.items():
        config = orjson.loads(payload)
        assert config == wanted[topic]
        problems += check_config(topic, config)
    assert not problems, "\n".join(problems)
    # availability: the gateway's retained status renders "online"
    sensor = orjson.loads(
        got[f"homeassistant/sensor/{ha.node_id(site_name)}/main_voltage_l1/config"]
    )
    (avail,) = sensor["availability"]
    assert avail["topic"] == status_topic
    assert render(avail["value_template"], status) == avail["payload_available"]
    offline = orjson.loads(status) | {"status": "offline"}
    assert render(avail["value_template"], orjson.dumps(offline)) == "offline"
    # every sensor of `main` gives the number its metrics message carries
    payload = next(p for p in raw if not orjson.loads(p)["aggregate"])
    message = Metrics.model_validate_json(payload)
    checked = 0
    for topic, config in wanted.items():
        if "/sensor/" not in topic or not topic.split("/")[3].startswith("main_"):
            continue
        assert config["state_topic"] == topics.metrics(site_name, "main")
        key = topic.split("/")[3].removeprefix("main_")
        expected = message.values[key]  # type: ignore[index]
        assert math.isclose(float(render(config["value_template"], payload)), expected), key
        checked += 1
    assert checked >= 20
    # an aggregate (or a message without the value) renders '' - Home Assistant ignores it
    agg = orjson.loads(payload) | {"aggregate": True}
    pf = wanted[f"homeassistant/sensor/{ha.node_id(site_name)}/main_power_factor/config"]
    assert render(pf["value_template"], orjson.dumps(agg)) == ""


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.05)


async def retained_status(settings: Settings, site: str, topic: str) -> bytes:
    got: list[bytes] = []

    async def seen(_: Any, incoming: Incoming) -> None:
        got.append(incoming.payload)

    from shared.messages import GatewayStatus

    async with Bus(_svc(settings, "st"), service="st", site=site, persistent=False) as bus:
        bus.subscribe(topic, GatewayStatus, seen)
        await bus.wait_subscribed(10)
        await asyncio.wait_for(_until(lambda: bool(got)), 10)
    return got[-1]


def test_alarm_binary_sensors_follow_the_event_topic() -> None:
    site = _site("s1", 502, quantities=[])
    got = ha.configs(site)
    sensors = {t.split("/")[3]: c for t, c in got.items() if "/binary_sensor/" in t}
    expected = {"main_alarm_device_offline"}
    for a in ALARMS:
        expected |= (
            {f"main_alarm_{a.code}_l{k}" for k in (1, 2, 3)}
            if a.phased
            else {f"main_alarm_{a.code}"}
        )
    assert expected <= set(sensors)

    def event(code: str, state: EventState, phase: str | None = None) -> bytes:
        return Event(
            site="s1", ts=utcnow(), seq=1, meter="main", code=code, state=state, phase=phase,
            severity=Severity.WARNING,
        ).to_bytes()  # fmt: skip

    low = sensors["main_alarm_low_pf"]
    assert low["state_topic"] == topics.event("s1", "main")
    assert render(low["value_template"], event("low_pf", EventState.RAISED)) == "ON"
    assert render(low["value_template"], event("low_pf", EventState.CLEARED)) == "OFF"
    assert render(low["value_template"], event("penalty_pf", EventState.RAISED)) == ""
    l2 = sensors["main_alarm_thd_limit_l2"]
    assert render(l2["value_template"], event("thd_limit", EventState.RAISED, "L2")) == "ON"
    assert render(l2["value_template"], event("thd_limit", EventState.RAISED, "L1")) == ""
    off = sensors["main_alarm_device_offline"]
    assert render(off["value_template"], event("device_offline", EventState.RAISED)) == "ON"
    assert render(off["value_template"], event("device_online", EventState.CLEARED)) == "OFF"
    assert render(off["value_template"], event("x", EventState.NOTICE)) == ""


def test_bank_steps_are_switches_only_when_control_is_allowed() -> None:
    raw = {
        "site": "s1",
        "buses": [{"name": "b", "host": "h"}],
        "meters": [{"name": "main", "bus": "b", "unit": 1, "profile": "pmtr001"}],
        "devices": [{"name": "bank1", "bus": "b", "unit": 9, "kind": "capbank", "coils": 3}],
        "banks": [{"name": "main", "meter": "main", "device": "bank1", "steps_kvar": [5, 10, 10]}],
        "homeassistant": {"quantities": [], "alarms": False},
    }
    assert ha.configs(parse_site(raw)) == {}
    raw["homeassistant"]["allow_control"] = True  # type: ignore[index]
    got = ha.configs(parse_site(raw))
    assert sorted(t.split("/")[3] for t in got) == [
        "bank_main_manual",
        *(f"bank_main_step_{i}" for i in (1, 2, 3)),
    ]
    problems = [p for t, c in got.items() for p in check_config(t, c)]
    assert not problems, problems
    step2 = got["homeassistant/switch/pfm-s1/bank_main_step_2/config"]
    manual = got["homeassistant/switch/pfm-s1/bank_main_manual/config"]
    for switch in (step2, manual):
        assert switch["command_topic"] == topics.request("s1", "bank1")
        assert switch["state_topic"] == topics.state("s1", "bank1")
    state = ActuatorState(site="s1", ts=utcnow(), seq=1, device="bank1", online=True,
                          steps_in=[2, 3], modes={"main": "manual"}).to_bytes()  # fmt: skip
    assert render(step2["value_template"], state) == "ON"
    assert render(got["homeassistant/switch/pfm-s1/bank_main_step_1/config"]["value_template"],
                  state) == "OFF"  # fmt: skip
    assert render(manual["value_template"], state) == "ON"
    auto = ActuatorState(site="s1", ts=utcnow(), seq=2, device="bank1", online=True,
                         modes={"main": "auto"}).to_bytes()  # fmt: skip
    assert render(manual["value_template"], auto) == "OFF"

    # the commands are pfm.request/1 requests (the actuator's path, never a coil write),
    # valid as the actuator reads them
    def request(switch: dict[str, Any], value: str) -> Request:
        return Request.model_validate_json(render(switch["command_template"], value))

    on = request(step2, "ON")
    assert (on.site, on.device, on.bank, on.action, on.step, on.on) == (
        "s1", "bank1", "main", "step", 2, True,
    )  # fmt: skip
    assert on.user == "homeassistant" and on.seq > 0
    assert request(step2, "OFF").on is False
    assert request(manual, "ON").action == "manual"
    assert request(manual, "OFF").action == "auto"


@pytest.mark.timeout(60)
async def test_a_removed_meter_is_cleared(settings: Settings, site_name: str) -> None:
    port = free_port()
    both = _site(site_name, port, alarms=False)
    only_main = _site(site_name, port, alarms=False, meters=["main"])
    async with Bus(_svc(settings, "pub"), service="collector", site=site_name) as bus:
        await bus.wait_connected(10)
        published, cleared = await ha.publish(_svc(settings, "pub"), both, bus, "collector")
        assert cleared == 0 and published == len(ha.configs(both))
        before = await retained(settings, site_name)
        assert any("/hvac_" in t for t in before) and set(before) == set(ha.configs(both))
        published, cleared = await ha.publish(_svc(settings, "pub"), only_main, bus, "collector")
        assert cleared == len([t for t in before if "/hvac_" in t]) > 0
        after = await retained(settings, site_name)
        assert set(after) == set(ha.configs(only_main)) and not [t for t in after if "/hvac_" in t]
        # switched off: everything goes
        off = _site(site_name, port, enabled=False)
        await ha.publish(_svc(settings, "pub"), off, bus, "collector")
        assert await retained(settings, site_name) == {}


@pytest.mark.timeout(150)
async def test_the_demo_shows_itself_in_home_assistant_and_cleans_up(
    settings: Settings, site_name: str
) -> None:
    """`pfmon demo` turns discovery on: its meters' configs come while it runs, and the
    demo takes them away (empty retained payloads) when it ends."""
    import os
    import re
    import sys

    seen: list[tuple[str, bytes]] = []

    async def keep(_: Any, incoming: Incoming) -> None:
        seen.append((incoming.topic, incoming.payload))

    class Raw(ha._Retained):
        pass

    s = _svc(settings, "demo-watch")
    async with Bus(s, service="watch", site=site_name, persistent=False) as bus:
        bus.subscribe("homeassistant/+/+/+/config", Raw, keep)
        await bus.wait_subscribed(10)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "demo", "--duration", "10", "--meters", "2",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PFM_MQTT_URL": settings.mqtt_url, "PFM_DB_DSN": settings.db_dsn},
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        stderr = err.decode()
        assert proc.returncode == 0, stderr[-3000:]
        match = re.search(r"site:\s+(demo-[0-9a-f]+)", stderr)
        assert match, stderr[-3000:]
        node = ha.node_id(match.group(1))
        assert f"homeassistant/+/{node}/" in stderr
        await asyncio.sleep(1)
    mine = [(t, p) for t, p in seen if f"/{node}/" in t]
    configs = {t for t, p in mine if p}
    assert len([t for t in configs if "/sensor/" in t]) >= 20, configs
    assert any("main_power_factor" in t for t in configs)
    assert not [t for t in configs if "/switch/" in t], "the demo allows no control"
    assert await retained(settings, match.group(1)) == {}, "the demo left configs behind"


@pytest.mark.timeout(90)
async def test_a_home_assistant_switch_goes_through_the_actuator(
    settings: Settings, site_name: str
) -> None:
    """What Home Assistant publishes for "Manual control" and a step switch (the rendered
    command templates, on the command topic) is carried out by the real actuator on the
    simulated bank, and the state the switches read shows it."""
    from services.actuator import service as actuator
    from services.demo import demo_plant, demo_site
    from services.simulator import SimServer

    plant = demo_plant(1)
    sim_port = free_port()
    raw = demo_site(sim_port, plant)
    raw["site"] = site_name
    raw["banks"][0]["min_interval"] = "0s"
    raw["homeassistant"] = {"allow_control": True, "quantities": [], "alarms": False}
    site = parse_site(raw, "test site")
    got = ha.configs(site)
    node = ha.node_id(site_name)
    manual = got[f"homeassistant/switch/{node}/bank_main_manual/config"]
    step1 = got[f"homeassistant/switch/{node}/bank_main_step_1/config"]
    states: list[bytes] = []

    async def keep(_: ActuatorState, incoming: Incoming) -> None:
        states.append(incoming.payload)

    def shown(switch: dict[str, Any]) -> str:
        return render(switch["value_template"], states[-1]) if states else ""

    stop = Shutdown()
    async with (
        SimServer(plant, sim_port),
        Bus(_svc(settings, "hass"), service="hass", site=site_name, persistent=False) as hass,
    ):
        hass.subscribe(manual["state_topic"], ActuatorState, keep)
        await hass.wait_subscribed(10)
        task = asyncio.create_task(actuator.run(_svc(settings, "act"), site, stop))
        try:
            await stop.wait_ready(15)
            await asyncio.wait_for(_until(lambda: shown(manual) == "OFF"), 20)
            assert shown(step1) == "OFF"
            await hass.publish(
                manual["command_topic"], render(manual["command_template"], "ON").encode()
            )
            await asyncio.wait_for(_until(lambda: shown(manual) == "ON"), 20)
            # the actuator's interlock holds a step while it discharges (the reconnection
            # delay from start): a person presses again after it, as here
            for _ in range(12):
                command = render(step1["command_template"], "ON").encode()
                await hass.publish(step1["command_topic"], command)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_until(lambda: shown(step1) == "ON"), 2)
                    break
            assert shown(step1) == "ON"
            await hass.publish(
                manual["command_topic"], render(manual["command_template"], "OFF").encode()
            )
            await asyncio.wait_for(_until(lambda: shown(manual) == "OFF"), 20)
        finally:
            stop.request("test done")
            await asyncio.wait_for(task, 20)
