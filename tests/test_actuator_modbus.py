"""The actuator drives its coils through the collector's Modbus transport (shared.modbus).

Against the plant simulator (Modbus TCP, and RTU over TCP through a
proxy that corrupts answers): the coil devices the actuator wires up use the very
connection class the collector polls with, one per bus, and a failed coil write or
read is classified exactly as the collector classifies a failed meter read
(``exception_0b``, ``exception_02``, ``crc``), with the same wording. An actuator
with a transport of its own again fails these tests (its own class, its own
messages, no ``crc`` kind).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.actuator.service import Actuator
from services.collector import service as collector
from services.simulator import SimServer, SimSite, inductive_site
from shared.bus import Bus
from shared.embedded import free_port
from shared.errors import PeerError
from shared.metrics import ServiceMetrics
from shared.modbus import ModbusConnection
from shared.settings import Settings
from shared.site import BusConfig, parse_site
from tests.test_collector_rtu import CorruptingProxy

pytestmark = pytest.mark.timeout(30)

BANK, RELAYS, ABSENT = 10, 11, 99  # inductive_site: bank 6 coils, relays 8; no unit 99


def actuator(settings: Settings, name: str, buses: list[dict[str, Any]], **units: int) -> Actuator:
    """An actuator wired as the service wires it (no broker connection is needed here)."""
    devices = [
        {"name": dev, "bus": buses[0]["name"], "unit": unit, "coils": 8, "write_retries": 1}
        for dev, unit in units.items()
    ]
    cfg = parse_site({"site": name, "buses": buses, "meters": [], "devices": devices})
    return Actuator(cfg, Bus(settings, service="actuator", site=name), ServiceMetrics("a", name))


@pytest.fixture
async def plant() -> AsyncIterator[tuple[SimSite, int]]:
    site = inductive_site()
    port = free_port()
    async with SimServer(site, port):
        yield site, port


async def collector_read_error(bus: BusConfig, unit: int, table: str, address: int) -> PeerError:
    """What the collector's transport raises reading 2 registers at ``address`` of ``unit``."""
    conn = collector.ModbusConnection(bus)
    try:
        with pytest.raises(PeerError) as err:
            await conn.read(unit, table, address, 2)
        return err.value
    finally:
        conn.close()


async def test_devices_on_one_bus_share_one_collector_connection(
    settings: Settings, site_name: str
) -> None:
    bus = {"name": "plc", "host": "127.0.0.1", "port": 1502}
    parsed = parse_site(
        {
            "site": site_name,
            "buses": [bus, {**bus, "name": "other", "port": 1503}],
            "meters": [],
            "devices": [
                {"name": "bank", "bus": "plc", "unit": BANK, "coils": 6},
                {"name": "relays", "bus": "plc", "unit": RELAYS, "coils": 8},
                {"name": "far", "bus": "other", "unit": 1, "coils": 8},
            ],
        }
    )
    act = Actuator(
        parsed, Bus(settings, service="actuator", site=site_name), ServiceMetrics("a", site_name)
    )
    links = {name: dev.link for name, dev in act.devices.items()}
    assert all(type(link) is collector.ModbusConnection for link in links.values())
    assert collector.ModbusConnection is ModbusConnection
    assert links["bank"] is links["relays"]  # one connection (one lock) per bus
    assert links["far"] is not links["bank"] and links["far"].config.name == "other"


async def test_exception_answers_are_classified_like_a_collector_read(
    settings: Settings, site_name: str, plant: tuple[SimSite, int]
) -> None:
    sim, port = plant
    bus = {"name": "plc", "host": "127.0.0.1", "port": port, "timeout_s": 0.5}
    # the bank has 6 coils on the simulator (configured with 8: coils 6, 7 are outside its map)
    act = actuator(settings, site_name, [bus], bank=BANK, ghost=ABSENT)
    cfg = BusConfig.model_validate(bus)
    try:
        # a unit nobody answers for: the simulator (a TCP gateway) says 0x0B
        meter_err = await collector_read_error(cfg, ABSENT, "holding", 0)
        assert (meter_err.kind, meter_err.code) == ("exception_0b", 0x0B)
        ghost = act.devices["ghost"]
        with pytest.raises(PeerError) as err:
            await ghost.refresh()
        assert (err.value.kind, err.value.code) == (meter_err.kind, meter_err.code)
        assert "Modbus exception 0x0B (gateway target failed to respond) to coils 0+8" in str(
            err.value
        )
        res = await ghost.set(0, True)
        assert not res.ok and res.actual is None and res.attempts == 2 and not ghost.online
        assert (
            f"unit {ABSENT}: Modbus exception 0x0B (gateway target failed to respond) "
            "to write coil 0=1" in (res.error or "")
        )

        # an address outside the device's map: 0x02, as for a meter read past its map
        meter_err = await collector_read_error(cfg, 1, "input", 0xFFF0)
        assert (meter_err.kind, meter_err.code) == ("exception_02", 0x02)
        bank = act.devices["bank"]
        with pytest.raises(PeerError) as err:
            await bank.read(7)  # coil 7 of a 6-coil bank
        assert (err.value.kind, err.value.code) == (meter_err.kind, meter_err.code)
        res = await bank.set(7, True)
        assert not res.ok and "Modbus exception 0x02 (illegal data address)" in (res.error or "")
        # and a coil inside the map still works on the same connection
        res = await bank.set(2, True)
        assert res.ok and res.attempts == 1
        assert sim.bank is not None and sim.bank.state[2] is True
    finally:
        act.close()


async def test_crc_errors_on_coils_are_classified_like_a_collector_read(
    settings: Settings, site_name: str
) -> None:
    sim = inductive_site(profile="pmtr001", scale=0.25)
    port = free_port()
    async with SimServer(sim, port, framer="rtu"), CorruptingProxy(port) as proxy:
        bus = {
            "name": "gw",
            "kind": "rtu_over_tcp",
            "host": "127.0.0.1",
            "port": proxy.port,
            "timeout_s": 0.5,
        }
        act = actuator(settings, site_name, [bus], relays=RELAYS)
        relays = act.devices["relays"]
        try:
            assert await relays.refresh() == dict.fromkeys(range(8), False)
            proxy.corrupt = True  # every answer now fails its CRC
            meter_err = await collector_read_error(BusConfig.model_validate(bus), 1, "holding", 78)
            assert meter_err.kind == "crc"
            with pytest.raises(PeerError) as err:
                await relays.refresh()
            assert err.value.kind == meter_err.kind
            assert "garbled answer (CRC error) to coils 0+8" in str(err.value)
            res = await relays.set(3, True)
            assert not res.ok and res.actual is None
            assert "garbled answer (CRC error) to write coil 3=1" in (res.error or "")
            proxy.corrupt = False
            # the request itself was intact: the relay did switch, and the device says so
            assert sim.relays is not None and sim.relays.coils[3] is True
            assert (await relays.refresh())[3] is True
        finally:
            act.close()
