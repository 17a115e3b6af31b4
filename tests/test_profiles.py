"""Each built-in profile against a pymodbus server laid out by hand exactly as the
vendor documents the device (not by the simulator, which uses the profiles)."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import AsyncIterator

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from services.collector.profiles import (
    DECODERS,
    MAX_REGISTERS_PER_READ,
    PROFILES,
    Profile,
    Refused,
    encode,
    from_spec,
    u64,
)
from shared.embedded import free_port
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.modbus import ModbusConnection
from shared.site import BusConfig, parse_site
from shared.site.collector import TYPE_WIDTH, ProfileSpec


def f32_words(x: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", x))
    return [hi, lo]


async def serve(unit: int, holding: dict[int, int], inputs: dict[int, int]) -> ModbusTcpServer:
    def block(image: dict[int, int]) -> list[SimData]:
        size = max(image, default=0) + 1
        values = [image.get(i, 0) for i in range(size)]
        return [SimData(0, values=values, datatype=DataType.REGISTERS)]

    bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
    device = SimDevice(id=unit, simdata=(bits, list(bits), block(holding), block(inputs)))
    port = free_port()
    server = ModbusTcpServer([device], address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    server.test_port = port  # type: ignore[attr-defined]
    return server


async def poll(port: int, unit: int, profile: Profile) -> dict[M, float]:
    conn = ModbusConnection(BusConfig(name="t", host="127.0.0.1", port=port))
    raw: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
    try:
        for b in profile.plan():
            regs = await conn.read(unit, b.table, b.address, b.count)
            raw[b.table].update({b.address + i: v for i, v in enumerate(regs)})
    finally:
        conn.close()
    return profile.decode(raw)


@pytest.fixture
async def stop_servers() -> AsyncIterator[list[ModbusTcpServer]]:
    servers: list[ModbusTcpServer] = []
    yield servers
    for s in servers:
        await s.shutdown()  # type: ignore[no-untyped-call]


async def test_pzem004t_low_word_first(stop_servers: list[ModbusTcpServer]) -> None:
    # PZEM-004T v3.0 manual: 0x0000 V (0.1 V); 0x0001/0x0002 current low/high (0.001 A);
    # 0x0003/0x0004 power low/high (0.1 W); 0x0005/0x0006 energy low/high (Wh);
    # 0x0007 frequency (0.1 Hz); 0x0008 PF (0.01); 0x0009 alarm
    current_ma = 85_432  # 85.432 A: needs the high word
    power_dw = 187_654  # 18,765.4 W
    energy_wh = 4_321_987
    inputs = {
        0: 2298,
        1: current_ma & 0xFFFF,
        2: current_ma >> 16,
        3: power_dw & 0xFFFF,
        4: power_dw >> 16,
        5: energy_wh & 0xFFFF,
        6: energy_wh >> 16,
        7: 499,
        8: 96,
        9: 0,
    }
    server = await serve(3, {}, inputs)
    stop_servers.append(server)
    v = await poll(server.test_port, 3, PROFILES["pzem004t"])  # type: ignore[attr-defined]
    assert v[M.VOLTAGE_L1] == pytest.approx(229.8)
    assert v[M.CURRENT_L1] == pytest.approx(85.432)
    assert v[M.POWER_L1] == pytest.approx(18_765.4)
    assert v[M.POWER] == v[M.POWER_L1]
    assert v[M.IMPORT_ENERGY_L1] == pytest.approx(4_321_987.0)
    assert v[M.FREQUENCY] == pytest.approx(49.9)
    assert v[M.POWER_FACTOR_L1] == pytest.approx(0.96)
    assert PROFILES["pzem004t"].plan()[0].table == "input"


async def test_sdm630_floats_and_pf_sign(stop_servers: list[ModbusTcpServer]) -> None:
    # Eastron SDM630 protocol: 30001.. floats, high word first; PF sign: negative inductive
    layout: dict[int, float] = {
        0x00: 231.5,
        0x02: 229.9,
        0x04: 230.7,  # V L1-L3
        0x06: 12.25,
        0x08: 8.5,
        0x0A: 10.0,  # A
        0x0C: 2200.0,
        0x0E: -1500.0,
        0x10: 2000.0,  # W (L2 exporting)
        0x18: 1100.0,
        0x1A: -300.0,
        0x1C: 0.0,  # var
        0x1E: -0.89,
        0x20: 0.98,
        0x22: 1.0,  # PF: L1 inductive, L2 capacitive
        0x34: 2700.0,
        0x3C: 800.0,
        0x3E: -0.95,  # totals
        0x46: 50.02,  # Hz
        0x48: 1234.5,  # import kWh
        0xC8: 400.1,  # V L1-L2
        0xE0: 3.25,  # neutral A
        0xEA: 2.5,  # THD V L1 %
        0xF0: 31.0,  # THD I L1 %
        0x15A: 11.5,  # L1 import kWh
        0x15C: 12.5,
        0x15E: 13.5,
    }
    inputs: dict[int, int] = {}
    for addr, value in layout.items():
        inputs[addr], inputs[addr + 1] = f32_words(value)
    server = await serve(1, {}, inputs)
    stop_servers.append(server)
    v = await poll(server.test_port, 1, PROFILES["sdm630"])  # type: ignore[attr-defined]
    assert v[M.VOLTAGE_L1] == pytest.approx(231.5, rel=1e-6)
    assert v[M.CURRENT_L1] == pytest.approx(12.25)
    assert v[M.POWER_L2] == pytest.approx(-1500.0)
    assert v[M.REACTIVE_POWER_L1] == pytest.approx(1100.0)
    # IEC: PF carries the sign of P, not the meter's lead/lag sign
    assert v[M.POWER_FACTOR_L1] == pytest.approx(0.89, rel=1e-6)
    assert v[M.POWER_FACTOR_L2] == pytest.approx(-0.98, rel=1e-6)
    assert v[M.POWER_FACTOR] == pytest.approx(0.95, rel=1e-6)
    assert v[M.FREQUENCY] == pytest.approx(50.02, rel=1e-6)
    assert v[M.IMPORT_ENERGY] == pytest.approx(1_234_500.0, rel=1e-6)
    assert v[M.IMPORT_ENERGY_L1] == pytest.approx(11_500.0, rel=1e-6)
    assert v[M.VOLTAGE_L1_L2] == pytest.approx(400.1, rel=1e-6)
    assert v[M.NEUTRAL_CURRENT] == pytest.approx(3.25)
    assert v[M.THD_CURRENT_L1] == pytest.approx(31.0)
    assert all(b.count <= MAX_REGISTERS_PER_READ for b in PROFILES["sdm630"].plan())


async def test_pmtr001_holding_u16_and_failed_read_is_zero(
    stop_servers: list[ModbusTcpServer],
) -> None:
    # pmtr001-modbus-map.json: u16 holding 78..97; a failed sensor read is stored as 0
    holding = {78: 4987, 79: 12034, 80: 2305, 81: 0, 82: 2281}  # L2 voltage read failed
    holding.update({83: 1234, 84: 0, 85: 987, 86: 2500, 87: 0, 88: 2100})
    holding.update({89: 123, 90: 0, 91: 77, 92: 500, 93: 0, 94: 501, 95: 88, 96: 0, 97: 93})
    holding.update({110: 87, 112: 1, 114: 92})  # averages (L2/L3 at the firmware's 112/114)
    server = await serve(247, holding, {})
    stop_servers.append(server)
    v = await poll(server.test_port, 247, PROFILES["pmtr001"])  # type: ignore[attr-defined]
    assert v[M.SUPPLY_5V] == pytest.approx(4.987)
    assert v[M.VOLTAGE_L1] == pytest.approx(230.5)
    assert M.VOLTAGE_L2 not in v  # 0 V = failed read, not a dead phase
    assert M.FREQUENCY_L2 not in v
    assert v[M.CURRENT_L1] == pytest.approx(12.34)
    assert v[M.CURRENT_L2] == 0.0  # 0 A is a legitimate reading
    assert v[M.IMPORT_ENERGY_L1] == pytest.approx(12_300.0)  # 12.3 kWh in Wh
    assert v[M.FREQUENCY_L3] == pytest.approx(50.1)
    assert v[M.POWER_FACTOR_L3] == pytest.approx(0.93)
    assert PROFILES["pmtr001"].plan() == [type(PROFILES["pmtr001"].plan()[0])("holding", 78, 20)]


def test_sync_epoch_is_u64_little_word_order() -> None:
    words = encode(1_763_700_000.0, "u64", "little")
    assert words[0] == 1_763_700_000 & 0xFFFF  # least significant word first
    assert u64(words, "little") == 1_763_700_000


def test_coalescing_respects_the_modbus_limit() -> None:
    spec = ProfileSpec.model_validate(
        {
            "max_gap": 10,
            "registers": {
                "voltage_l1": {"address": 0},
                "voltage_l2": {"address": 5},
                "voltage_l3": {"address": 124, "type": "u32"},
                "current_l1": {"address": 300, "table": "input"},
            },
        }
    )
    plan = from_spec("x", spec).plan()
    assert [(b.table, b.address, b.count) for b in plan] == [
        ("holding", 0, 6),
        ("holding", 124, 2),
        ("input", 300, 1),
    ]


def test_user_profile_in_the_site_file_is_validated() -> None:
    bad = {
        "site": "s1",
        "buses": [{"name": "b", "host": "h"}],
        "meters": [
            {"name": "m0", "bus": "b", "unit": 0, "profile": "pmtr001"},
            {"name": "m1", "bus": "b", "unit": 248, "profile": "pmtr001"},
        ],
        "profiles": {
            "acme": {
                "registers": {
                    "voltage_l9": {"address": 1},
                    "power_factor": {"address": 2, "signed_by": "power"},
                    "current_l1": {"address": 65535, "type": "f32"},
                    "power": {"address": 3, "type": "u24"},
                }
            }
        },
    }
    with pytest.raises(ConfigError) as err:
        parse_site(bad)
    text = str(err.value)
    for where in ("meters[0].unit", "meters[1].unit", "voltage_l9", "u24", "65535"):
        assert where in text, (where, text)


async def test_user_profile_reads_a_device(stop_servers: list[ModbusTcpServer]) -> None:
    site = parse_site(
        {
            "site": "s1",
            "profiles": {
                "acme": {
                    "phases": 1,
                    "registers": {
                        "voltage_l1": {
                            "table": "input",
                            "address": 10,
                            "type": "s16",
                            "scale": 0.1,
                        },
                        "power": {
                            "table": "input",
                            "address": 11,
                            "type": "s32",
                            "word_order": "little",
                        },
                    },
                }
            },
        }
    )
    power = -123_456
    raw = power & 0xFFFF_FFFF
    server = await serve(9, {}, {10: 2311, 11: raw & 0xFFFF, 12: raw >> 16})
    stop_servers.append(server)
    v = await poll(server.test_port, 9, from_spec("acme", site.profiles["acme"]))  # type: ignore[attr-defined]
    assert v[M.VOLTAGE_L1] == pytest.approx(231.1)
    assert v[M.POWER] == power


def _reference_decode(
    profile: Profile, raw: dict[str, dict[int, int]]
) -> tuple[dict[M, float], list[tuple[M, float, str, int, list[int]]]]:
    """What a profile's decode must give, worked out field by field with the named
    decoders (the plain reading of the table), signs applied as ``signed_by`` says."""
    out: dict[M, float] = {}
    refused = []
    for m, spec in profile.registers.items():
        regs = [raw[spec.table][spec.address + i] for i in range(TYPE_WIDTH[spec.type])]
        if spec.zero_is_missing and not any(regs):
            continue
        value = DECODERS[spec.type](regs, spec.word_order) * spec.scale
        lo, hi = m.bounds
        if lo <= value <= hi:
            out[m] = value
        else:
            refused.append((m, value, spec.table, spec.address, regs))
    for m, spec in profile.registers.items():
        if spec.signed_by is not None and m in out:
            sign = out.get(spec.signed_by, 1.0)
            out[m] = math.copysign(abs(out[m]), sign) if sign else abs(out[m])
    return out, refused


def test_decode_agrees_with_each_registers_own_decoder() -> None:
    """Random register images (zeros, all ones, NaN floats, huge values) through every
    built-in profile and a user profile with every type and word order: the same values,
    bit for bit, and the same refusals with the same registers, as decoding field by
    field."""
    rng = random.Random(20261203)
    user = from_spec(
        "every_type",
        ProfileSpec.model_validate(
            {
                "registers": {
                    "voltage_l1": {"address": 0, "type": "u16", "scale": 0.1},
                    "current_l1": {"address": 1, "type": "s16", "scale": 0.01},
                    "power_l1": {"address": 2, "type": "s32", "word_order": "little"},
                    "power": {"address": 4, "type": "s32"},
                    "import_energy": {"address": 6, "type": "u64", "scale": 0.1},
                    "export_energy": {"address": 10, "type": "u64", "word_order": "little"},
                    "frequency": {"address": 14, "type": "f32", "zero_is_missing": True},
                    "power_factor": {"address": 16, "type": "f32", "signed_by": "power"},
                    "current_l2": {"address": 18, "type": "u32", "word_order": "little"},
                    "voltage_l2": {"address": 20, "type": "u16", "zero_is_missing": True},
                },
                "max_gap": 0,
            }
        ),
    )
    nan = list(struct.unpack(">HH", struct.pack(">f", math.nan)))
    for profile in [*PROFILES.values(), user]:
        addresses = {
            (spec.table, spec.address + i)
            for spec in profile.registers.values()
            for i in range(TYPE_WIDTH[spec.type])
        }
        for _ in range(300):
            raw: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
            style = rng.choice(["zero", "ones", "small", "any", "nan"])
            for table, address in sorted(addresses):
                word = {
                    "zero": 0,
                    "ones": 0xFFFF,
                    "small": rng.randrange(0, 300),
                    "any": rng.randrange(0, 0x10000),
                    "nan": nan[address % 2],
                }[style]
                raw[table][address] = word if rng.random() < 0.8 else rng.choice([0, 0xFFFF])
            refused: list[Refused] = []
            got = profile.decode(raw, refused)
            want, want_refused = _reference_decode(profile, raw)
            assert list(got) == list(want), profile.name
            for m, value in want.items():
                assert struct.pack(">d", got[m]) == struct.pack(">d", value), (m, got[m], value)
            assert [(r.measurement, r.table, r.address, r.registers) for r in refused] == [
                (m, table, address, regs) for m, _, table, address, regs in want_refused
            ]
            for r, (_, value, _, _, _) in zip(refused, want_refused, strict=True):
                assert r.value == value or (math.isnan(r.value) and math.isnan(value))
                assert r.reason
