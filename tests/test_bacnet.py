"""BACnet/IP meters: the transport, the profile's units, Who-Is discovery and the collector,
against the simulated BACnet device (bacpypes3) over real UDP on loopback and the real
broker. Device and client use different UDP ports (on one host bacpypes3 takes any
127.x.x.x on its own port for itself), and a Who-Is goes to the device's address."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from typing import Any

import orjson
import pytest

from services.collector.bacnet import BacnetLink, BacnetProfile, ObjectSpec, convert, resolve
from services.simulator import Heater, Motor, SimSite
from services.simulator.bacnet import BacnetMeter
from shared.errors import ConfigError, PeerError
from shared.measurements import Measurement as M
from shared.messages import DeadLetter
from shared.metrics import ServiceMetrics
from shared.settings import Settings
from shared.site import BusConfig, parse_site
from shared.site.core import BacnetTarget
from shared.topics import deadletter
from tests.helpers import listening
from tests.test_collector import running, sample, sink_for

pytestmark = pytest.mark.timeout(60)

INSTANCE = 1201


def udp_port() -> int:
    """A UDP port nothing on 127.0.0.1 uses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plant() -> SimSite:
    """One meter (unit 1) on a motor and a heater, no noise: P ~60 kW, Q > 0 (inductive)."""
    site = SimSite(seed=3)
    site.supply.noise = 0.0
    site.add_load(Motor("pump", kw=40.0, pf=0.75, inrush=1.0, wobble=0.0))
    site.add_load(Heater("oven", kw=20.0, wobble=0.0))
    site.add_meter(1, "main", profile="sdm630", bank=False)
    return site


def bus(port: int, timeout: float = 0.5) -> BusConfig:
    return BusConfig(name="bn", kind="bacnet", host="127.0.0.1", port=port, timeout_s=timeout)


PROFILE = resolve("bacnet_power_meter")
OBJECTS = list(PROFILE.objects.values())


async def test_present_values_and_units_are_read_and_scaled_to_si() -> None:
    site = plant()
    dev_port = udp_port()
    units = {
        M.POWER: "kilowatts",
        M.REACTIVE_POWER: "kilovolt-amperes-reactive",
        M.VOLTAGE_L3: "kilovolts",
        M.IMPORT_ENERGY: "kilowatt-hours",
    }
    async with (
        BacnetMeter(site, 1, port=dev_port, device_instance=INSTANCE, units=units) as dev,
        BacnetLink(bus(udp_port())) as link,
    ):
        target = BacnetTarget(address=f"127.0.0.1:{dev_port}", device_instance=INSTANCE)
        reads = await link.read(target, OBJECTS)
    assert dev.reads == 1
    truth = site.state().meters["main"]
    got = {}
    for m, r in zip(PROFILE.objects, reads, strict=True):
        assert r.kind == "", r
        assert r.value is not None
        value, why = convert(m, r.value, r.units)
        assert value is not None, why
        got[m] = value
    # the device reported kW / kvar / kV: the SI values are the plant's
    assert reads[list(PROFILE.objects).index(M.POWER)].value == pytest.approx(
        truth.p_w / 1000, rel=1e-3
    )
    assert got[M.POWER] == pytest.approx(truth.p_w, rel=1e-3)
    assert got[M.REACTIVE_POWER] == pytest.approx(truth.q_var, rel=1e-3)
    assert got[M.REACTIVE_POWER] > 0
    assert got[M.VOLTAGE_L3] == pytest.approx(truth.values[M.VOLTAGE_L3], rel=1e-4)
    assert got[M.VOLTAGE_L1] == pytest.approx(truth.values[M.VOLTAGE_L1], rel=1e-4)
    assert got[M.CURRENT_L2] == pytest.approx(truth.values[M.CURRENT_L2], rel=1e-3)
    assert got[M.POWER_FACTOR] == pytest.approx(truth.pf, abs=1e-3)
    assert got[M.FREQUENCY] == pytest.approx(50.0)


def test_units_of_another_quantity_or_unknown_are_refused_with_what_was_expected() -> None:
    from bacpypes3.basetypes import EngineeringUnits as E

    assert convert(M.VOLTAGE_L1, 0.4, int(E.kilovolts)) == (pytest.approx(400.0), "")
    assert convert(M.CURRENT_L1, 1500.0, int(E.milliamperes))[0] == pytest.approx(1.5)
    value, why = convert(M.VOLTAGE_L1, 230.0, int(E.amperes))
    assert value is None
    assert why == "units amperes (A) do not fit voltage_l1 (V)"
    value, why = convert(M.VOLTAGE_L1, 230.0, int(E.degreesCelsius))
    assert value is None
    assert "degrees-celsius" in why and "expected V" in why
    value, why = convert(M.POWER, 1.0, None)
    assert value is None and "no units property" in why


async def test_an_offline_device_is_a_timeout_and_a_silent_one_too() -> None:
    site = plant()
    dev_port = udp_port()
    target = BacnetTarget(address=f"127.0.0.1:{dev_port}", device_instance=INSTANCE)
    async with BacnetLink(bus(udp_port(), timeout=0.4)) as link:
        started = time.monotonic()
        with pytest.raises(PeerError) as nobody:  # nothing listens there
            await link.read(target, OBJECTS)
        took = time.monotonic() - started
        assert nobody.value.kind == "timeout"
        assert 0.35 <= took < 1.5
        assert f"device {INSTANCE} at 127.0.0.1:{dev_port}: no answer" in str(nobody.value)
        async with BacnetMeter(site, 1, port=dev_port, device_instance=INSTANCE):
            assert len(await link.read(target, OBJECTS)) == len(OBJECTS)
            site.inject("comm_loss", unit=1)
            with pytest.raises(PeerError) as silent:
                await link.read(target, OBJECTS)
            assert silent.value.kind == "timeout"
            site.clear(1)
            assert len(await link.read(target, OBJECTS)) == len(OBJECTS)


async def test_unknown_objects_and_a_wrong_device_instance_are_clear_error_kinds() -> None:
    site = plant()
    dev_port = udp_port()
    async with (
        BacnetMeter(site, 1, port=dev_port, device_instance=INSTANCE),
        BacnetLink(bus(udp_port())) as link,
    ):
        address = f"127.0.0.1:{dev_port}"
        # an object the device does not have: that object's error, the others read
        extra = BacnetProfile(
            "test_extra", "", 3, {M.VOLTAGE_L1: ObjectSpec(1), M.VOLTAGE_L2: ObjectSpec(99)}
        )
        v1, v2 = await link.read(
            BacnetTarget(address=address, device_instance=INSTANCE), list(extra.objects.values())
        )
        assert v1.kind == "" and v1.value == pytest.approx(230.0, abs=5)
        assert v2.kind == "error_unknown_object"
        assert v2.value is None and v2.error == "object: unknown-object"
        # the device at that address is another instance: the whole request fails
        with pytest.raises(PeerError) as wrong:
            await link.read(BacnetTarget(address=address, device_instance=INSTANCE + 1), OBJECTS)
        assert wrong.value.kind == "error_unknown_object"
        assert f"the device there is not device {INSTANCE + 1}" in str(wrong.value)
        assert "bacnet.device_instance" in str(wrong.value)


async def test_an_address_not_of_this_host_is_refused() -> None:
    link = BacnetLink(BusConfig(name="bn", kind="bacnet", host="192.0.2.77", port=udp_port()))
    with pytest.raises(PeerError) as exc:
        await link.read(BacnetTarget(address="192.0.2.1", device_instance=1), OBJECTS)
    assert exc.value.kind == "refused"
    assert "is 192.0.2.77 an address of this host?" in str(exc.value)


async def test_pfmon_scan_bacnet_finds_the_device_with_a_directed_who_is() -> None:
    site = plant()
    dev_port = udp_port()
    async with BacnetMeter(site, 1, port=dev_port, device_instance=INSTANCE, name="ahu-meter"):
        args = ["scan", "--bacnet", "--bind", f"127.0.0.1:{udp_port()}", "--timeout", "1"]
        found = await pfmon(*args, "--host", f"127.0.0.1:{dev_port}", "--json")
        assert found[0] == 0, found[2]
        devices = orjson.loads(found[1])
        assert devices == [
            {
                "device_instance": INSTANCE,
                "address": f"127.0.0.1:{dev_port}",
                "vendor_id": 0,
                "max_apdu": 1024,
                "name": "ahu-meter",
            }
        ]
        # an instance range that leaves it out finds nothing
        none = await pfmon(*args, "--host", f"127.0.0.1:{dev_port}", "--from", "1", "--to", "9")
        assert none[0] == 0, none[2]
        assert "0 BACnet device(s) answering" in none[1]
        bad_range = await pfmon(*args, "--host", f"127.0.0.1:{dev_port}", "--to", "4194304")
        assert bad_range[0] == 2
        assert "--to 4194304: BACnet device instances are 0-4194302" in bad_range[2]
        # a broadcast needs the local address with its prefix: said, not hung
        bad = await pfmon(*args)
        assert bad[0] == 2
        assert "a broadcast Who-Is needs this machine's address with its prefix" in bad[2]


async def pfmon(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def bacnet_site(name: str, client_port: int, dev_port: int, **meter: Any) -> Any:
    return parse_site(
        {
            "site": name,
            "buses": [
                {
                    "name": "bn",
                    "kind": "bacnet",
                    "host": "127.0.0.1",
                    "port": client_port,
                    "timeout_s": 0.3,
                }
            ],
            "meters": [
                {
                    "name": "ahu",
                    "bus": "bn",
                    "profile": "bacnet_power_meter",
                    "bacnet": {"address": f"127.0.0.1:{dev_port}", "device_instance": INSTANCE},
                    "interval_s": 0.2,
                    "offline_after": 2,
                    **meter,
                }
            ],
        }
    )


async def test_collector_publishes_bacnet_readings_and_reports_offline_by_kind(
    settings: Settings, site_name: str
) -> None:
    sim = plant()
    dev_port = udp_port()
    site = bacnet_site(site_name, udp_port(), dev_port, ct_ratio="2/1")
    metrics = ServiceMetrics("collector", site_name)
    dev = BacnetMeter(sim, 1, port=dev_port, device_instance=INSTANCE, units={M.POWER: "kilowatts"})
    await dev.start()
    try:
        async with sink_for(settings, site_name) as sink, running(settings, site, metrics=metrics):
            for _ in range(100):
                await asyncio.sleep(0.1)
                if len(sink.readings["ahu"]) >= 3:
                    break
            assert len(sink.readings["ahu"]) >= 3
            dev.stop()  # the device goes away: timeouts, then offline
            for _ in range(100):
                await asyncio.sleep(0.1)
                if "device_offline" in sink.codes("ahu"):
                    break
            polls_before = sample(metrics, "pfm_collector_polls_total", meter="ahu")
            await dev.start()  # and comes back
            for _ in range(100):
                await asyncio.sleep(0.1)
                if "device_online" in sink.codes("ahu"):
                    break
            await asyncio.sleep(0.5)
    finally:
        dev.stop()
    truth = sim.state().meters["main"]
    reading = sink.readings["ahu"][0]
    assert reading.profile == "bacnet_power_meter"
    assert set(reading.values) == {m.value for m in PROFILE.objects}
    # primary values: the site file's CT ratio 2 doubles currents and powers, not V or PF
    assert reading.values["power"] == pytest.approx(2 * truth.p_w, rel=1e-3)
    assert reading.values["reactive_power"] == pytest.approx(2 * truth.q_var, rel=1e-3)
    assert reading.values["current_l1"] == pytest.approx(2 * truth.values[M.CURRENT_L1], rel=1e-3)
    assert reading.values["voltage_l1"] == pytest.approx(truth.values[M.VOLTAGE_L1], rel=1e-4)
    assert reading.values["power_factor"] == pytest.approx(truth.pf, abs=1e-3)
    seqs = [r.seq for r in sink.readings["ahu"]]
    assert seqs == sorted(set(seqs))
    offline = next(e for e in sink.events if e.code == "device_offline")
    assert offline.evidence["kind"] == "timeout"
    assert f"device {INSTANCE} at 127.0.0.1:{dev_port} on bn" in offline.message
    assert "device_online" in sink.codes("ahu")
    assert sample(metrics, "pfm_collector_poll_errors_total", meter="ahu", kind="timeout") >= 2
    assert sample(metrics, "pfm_collector_polls_total", meter="ahu") > polls_before


async def test_collector_publishes_the_rest_when_an_object_is_missing_or_in_wrong_units(
    settings: Settings, site_name: str
) -> None:
    sim = plant()
    dev_port = udp_port()
    site = bacnet_site(site_name, udp_port(), dev_port)
    metrics = ServiceMetrics("collector", site_name)
    async with (
        BacnetMeter(
            sim,
            1,
            port=dev_port,
            device_instance=INSTANCE,
            omit=[M.FREQUENCY],
            units={M.VOLTAGE_L2: "degrees-celsius", M.APPARENT_POWER: "kilowatts"},
        ),
        listening(settings, site_name, deadletter(site_name, "collector"), DeadLetter) as dead,
        sink_for(settings, site_name) as sink,
        running(settings, site, metrics=metrics),
    ):
        for _ in range(100):
            await asyncio.sleep(0.1)
            if len(sink.readings["ahu"]) >= 2 and len(dead.items) >= 3:
                break
    reading = sink.readings["ahu"][-1]
    left_out = {"frequency", "voltage_l2", "apparent_power"}
    assert set(reading.values) == {m.value for m in PROFILE.objects} - left_out
    assert not sink.codes("ahu")  # the meter stays online
    letters = [d for d in dead.items if isinstance(d, DeadLetter)]
    reasons = {orjson.loads(d.payload())["measurement"]: d.reason for d in letters}
    evidence = orjson.loads(letters[0].payload())
    assert evidence["table"] == "analog-input" and evidence["registers"] == []
    assert set(reasons) == left_out
    assert (
        "object analog-input,11: object: unknown-object [error_unknown_object]"
        in (reasons["frequency"])
    )
    assert (
        "object analog-input,2: units degrees-celsius are not a unit pfmon knows"
        in (reasons["voltage_l2"])
    )
    assert "units kilowatts (W) do not fit apparent_power (VA)" in reasons["apparent_power"]
    errors = "pfm_collector_poll_errors_total"
    assert sample(metrics, errors, meter="ahu", kind="error_unknown_object") >= 2
    assert sample(metrics, errors, meter="ahu", kind="units") >= 4


async def test_collector_with_the_wrong_device_instance_goes_offline_with_that_kind(
    settings: Settings, site_name: str
) -> None:
    sim = plant()
    dev_port = udp_port()
    site = bacnet_site(site_name, udp_port(), dev_port)
    metrics = ServiceMetrics("collector", site_name)
    async with (
        BacnetMeter(sim, 1, port=dev_port, device_instance=INSTANCE + 5),
        sink_for(settings, site_name) as sink,
        running(settings, site, metrics=metrics),
    ):
        for _ in range(60):
            await asyncio.sleep(0.1)
            if "device_offline" in sink.codes("ahu"):
                break
    offline = next(e for e in sink.events if e.code == "device_offline")
    assert offline.evidence["kind"] == "error_unknown_object"
    assert f"is not device {INSTANCE}" in offline.message
    assert not sink.readings["ahu"]


def test_site_file_checks_bacnet_meters_and_buses() -> None:
    def problems(buses: list[dict[str, Any]], meters: list[dict[str, Any]]) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            parse_site({"site": "s", "buses": buses, "meters": meters})
        return exc.value.problems

    modbus = {"name": "b1", "host": "127.0.0.1"}
    bn = {"name": "bn", "kind": "bacnet", "host": "10.0.0.5/24"}
    target = {"address": "10.0.0.9", "device_instance": 7}
    m = {"name": "m", "profile": "bacnet_power_meter"}
    assert problems([modbus, bn], [{**m, "bus": "b1", "unit": 1, "bacnet": target}]) == [
        "meters[0].bacnet: bus 'b1' is a Modbus bus (kind tcp), a BACnet meter needs a bus "
        "of kind bacnet"
    ]
    assert problems([bn], [{**m, "bus": "bn"}]) == [
        "meters[0].bacnet: meter 'm' is on BACnet bus 'bn' and needs 'bacnet: {address: ..., "
        "device_instance: ...}'"
    ]
    assert problems([bn], [{**m, "bus": "bn", "unit": 3, "bacnet": target}]) == [
        "meters[0].unit: a BACnet meter has no Modbus unit id (its device is "
        "bacnet.device_instance)"
    ]
    assert problems([modbus], [{"name": "x", "bus": "b1", "profile": "sdm630"}]) == [
        "meters[0].unit: a Modbus meter needs its unit id (1-247)"
    ]
    bad_target = {"address": "10.0.0.300", "device_instance": 4194303}
    assert problems([bn], [{**m, "bus": "bn", "bacnet": bad_target}]) == [
        "meters[0].bacnet.address: not an IPv4 address (a.b.c.d, a.b.c.d/24 or "
        "a.b.c.d:47808) (got '10.0.0.300')",
        "meters[0].bacnet.device_instance: Input should be less than or equal to 4194302 "
        "(got 4194303)",
    ]
    twice = [
        {**m, "bus": "bn", "bacnet": target},
        {**m, "name": "n", "bus": "bn", "bacnet": {**target, "address": "10.0.0.9:47808"}},
    ]
    assert problems([bn], twice) == [
        "meters[1].bacnet: device 7 at 10.0.0.9:47808 is already used by 'm'"
    ]
    assert problems([{"name": "bn", "kind": "bacnet"}], []) == [
        "buses[0]: bus 'bn': kind bacnet needs 'host', this gateway's own "
        "address on the BACnet/IP network (e.g. 192.168.1.10/24)"
    ]
    ok = parse_site({"site": "s", "buses": [bn], "meters": [{**m, "bus": "bn", "bacnet": target}]})
    assert ok.buses[0].port == 47808
    assert ok.meters[0].unit is None


def test_collector_refuses_an_unknown_bacnet_profile(settings: Settings) -> None:
    from services.collector.service import Collector

    site = bacnet_site("s", udp_port(), udp_port(), profile="sdm630")
    with pytest.raises(ConfigError) as exc:
        Collector(settings, site, ServiceMetrics("collector", "s"))
    assert exc.value.problems == [
        "meters[0].profile: unknown BACnet profile 'sdm630'; known: bacnet_power_meter"
    ]


def test_pfmon_read_says_a_bacnet_meter_is_not_for_it(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        "site: s\n"
        "buses: [{name: bn, kind: bacnet, host: 127.0.0.1, port: 47900}]\n"
        "meters:\n"
        "  - {name: ahu, bus: bn, profile: bacnet_power_meter,\n"
        "     bacnet: {address: '127.0.0.1:47809', device_instance: 1201}}\n"
    )
    result = CliRunner().invoke(app, ["read", "--site-file", str(site_file), "--meter", "ahu"])
    assert result.exit_code == 2
    assert "--meter ahu: a BACnet meter; pfmon read speaks Modbus" in result.output


def test_home_assistant_discovery_knows_a_bacnet_meters_profile() -> None:
    from services.collector import homeassistant as ha
    from shared.site import HomeAssistantConfig

    site = bacnet_site("s", 47900, 47809)
    site = site.model_copy(
        update={"homeassistant": HomeAssistantConfig.model_validate({"alarms": False})}
    )
    got = ha.configs(site)
    names = {t.split("/")[3] for t in got}
    assert {"ahu_power_factor", "ahu_voltage_l1", "ahu_reactive_power"} <= names
    one = got["homeassistant/sensor/pfm-s/ahu_voltage_l1/config"]
    assert one["device"]["model"] == "BACnet/IP power meter"
    assert one["device"]["sw_version"] == "bacnet_power_meter"


def test_a_modbus_only_collector_does_not_load_bacpypes3() -> None:
    import subprocess

    code = (
        "import sys, services.collector.service, services.collector.scan, services.cli; "
        "print('bacpypes3' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


async def test_pfmon_simulate_serves_the_plant_meter_as_a_bacnet_device() -> None:
    from shared.embedded import free_port

    dev_port = udp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "simulate",
        "--plant",
        "--port",
        str(free_port()),
        "--bacnet-port",
        str(dev_port),
        "--duration",
        "30",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = b""
        while b"bacnet" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert line, "simulate ended before serving BACnet"
        assert f"bacnet 127.0.0.1:{dev_port}: device 1001 (meter unit 1)".encode() in line
        async with BacnetLink(bus(udp_port(), timeout=1.0)) as link:
            target = BacnetTarget(address=f"127.0.0.1:{dev_port}", device_instance=1001)
            reads = await link.read(target, OBJECTS)
        pf = reads[list(PROFILE.objects).index(M.POWER_FACTOR)]
        assert pf.value == pytest.approx(0.78, abs=0.02)  # the plant's incomer, bank out
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


USER_PROFILE = {
    "description": "Acme BMS meter",
    "phases": 3,
    "objects": {
        "voltage_l1": {"instance": 101},
        "current_l1": {"instance": 104},
        "power": {"type": "analog-value", "instance": 7},
        "power_factor": {"instance": 110, "signed_by": "power"},
    },
}


async def test_a_user_defined_bacnet_profile_of_the_site_file_is_polled(
    settings: Settings, site_name: str
) -> None:
    from services.collector.bacnet import from_spec
    from shared.site import BacnetProfileSpec

    sim = plant()
    dev_port = udp_port()
    site = bacnet_site(site_name, udp_port(), dev_port, profile="acme_bms")
    site = site.model_copy(
        update={"bacnet_profiles": {"acme_bms": BacnetProfileSpec.model_validate(USER_PROFILE)}}
    )
    served = from_spec("acme_bms", site.bacnet_profiles["acme_bms"])
    assert served.objects[M.POWER].ref == "analog-value,7"
    async with (
        BacnetMeter(sim, 1, port=dev_port, device_instance=INSTANCE, profile=served),
        sink_for(settings, site_name) as sink,
        running(settings, site),
    ):
        for _ in range(100):
            await asyncio.sleep(0.1)
            if sink.readings["ahu"]:
                break
    truth = sim.state().meters["main"]
    reading = sink.readings["ahu"][0]
    assert reading.profile == "acme_bms"
    assert set(reading.values) == {"voltage_l1", "current_l1", "power", "power_factor"}
    assert reading.values["power"] == pytest.approx(truth.p_w, rel=1e-3)
    assert reading.values["voltage_l1"] == pytest.approx(truth.values[M.VOLTAGE_L1], rel=1e-4)


def test_bacnet_profiles_of_the_site_file_are_checked() -> None:
    bad = {
        "objects": {
            "voltage_l1": {"instance": 1},
            "voltage_l2": {"instance": 1},
            "power_factor": {"type": "binary-input", "instance": 5000000, "signed_by": "power"},
            "volts": {"instance": 2},
        }
    }
    with pytest.raises(ConfigError) as exc:
        parse_site({"site": "s", "bacnet_profiles": {"acme": bad}})
    problems = exc.value.problems
    assert any(
        p.startswith("bacnet_profiles.acme.objects.power_factor.type: Input should be "
                     "'analog-input' or 'analog-value'")
        for p in problems
    ), problems  # fmt: skip
    assert any(
        p.startswith("bacnet_profiles.acme.objects.power_factor.instance: Input should be "
                     "less than or equal to 4194302")
        for p in problems
    ), problems  # fmt: skip
    assert any(p.startswith("bacnet_profiles.acme.objects.volts.[key]") for p in problems)
    ok = {"objects": {"voltage_l1": {"instance": 1}, "voltage_l2": {"instance": 1}}}
    with pytest.raises(ConfigError) as twice:
        parse_site({"site": "s", "bacnet_profiles": {"acme": ok}})
    assert twice.value.problems == [
        "bacnet_profiles.acme: voltage_l2: object analog-input,1 is already voltage_l1"
    ]
    sign = {"objects": {"power_factor": {"instance": 1, "signed_by": "power"}}}
    with pytest.raises(ConfigError) as unsigned:
        parse_site({"site": "s", "bacnet_profiles": {"acme": sign}})
    assert unsigned.value.problems == [
        "bacnet_profiles.acme: power_factor.signed_by: power is not in this profile"
    ]
