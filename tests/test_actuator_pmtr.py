"""Uploading relay actions to a PMTR_001: raw units, refusals with reasons, Modbus upload."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from services.actuator.pmtr import UploadError, decode_formula, encode, upload
from services.actuator.rules import check_site, uploads
from shared.embedded import free_port
from shared.modbus import ModbusConnection
from shared.site import parse_site
from shared.site.actuator import RelayAction
from shared.site.core import BusConfig

pytestmark = pytest.mark.timeout(30)

#: the reference map beside the checkout (``../shared/reference``), when present
MAP_FILE = Path(__file__).resolve().parents[2] / "shared/reference/pmtr001-modbus-map.json"


def act(**changes: Any) -> RelayAction:
    data = {
        "name": "overvoltage",
        "meter": "pm",
        "when": "(L1U > 253) || (L2U > 253) || (L3U > 253)",
        "average": "10s",
        "recovery": "300s",
        "level": "high",
        "outputs": ["pm:pin:4", "pm:pin:5"],
    }
    data.update(changes)
    return RelayAction.model_validate(data)


def test_register_image_follows_the_map() -> None:
    if MAP_FILE.exists():
        regs = {
            (r["table"], r["address"]): r for r in json.loads(MAP_FILE.read_text())["registers"]
        }
        assert regs[("holding", 151)]["name"] == "slot_and_window"
        assert regs[("holding", 157)]["count"] == 32
        assert regs[("coil", 2)]["name"] == "high_on_true"
    up = encode(act(), 2)
    assert up.formula == "L1U>2530||L2U>2530||L3U>2530"  # 0.1 V raw units
    assert len(up.registers) == 188 - 151 + 1
    assert up.registers[0] == (10 << 8) | 2  # window 10 s high byte, slot 2 low byte
    assert up.registers[1] == (4 << 8) | 5  # first pin in the high byte
    assert up.registers[2:5] == [0xFFFF] * 3  # unused pins
    assert up.registers[5] == 300
    assert decode_formula(up.registers) == up.formula
    assert up.registers[6] >> 8 == ord("L")  # first char in the high byte
    assert up.coils == {2: True, 3: False, 4: True}


@pytest.mark.parametrize(
    ("when", "raw"),
    [
        ("L1I > 15.5", "L1I>1550"),
        ("L2P >= 4000", "L2P>=4000"),
        ("L3e > 12.3", "L3e>123"),
        ("L1f < 49.5 or L1f > 50.5", "L1f<495||L1f>505"),
        ("not (L1pf < 0.9) and L1I > 1", "!(L1pf<90)&&L1I>100"),
        ("(L1U > 253 || L2U > 253) && L1I > 1", "(L1U>2530||L2U>2530)&&L1I>100"),
        ("250 < L1U", "2500<L1U"),
        ("L1U > L2U", "L1U>L2U"),
        ("L1U > 250 + 3", "L1U>2530"),
    ],
)
def test_si_thresholds_become_raw_units(when: str, raw: str) -> None:
    assert encode(act(when=when), 0).formula == raw


@pytest.mark.parametrize(
    ("changes", "slot", "reason"),
    [
        ({"when": "Q > 1000"}, 0, "no token Q"),
        ({"when": "L1thdi > 10"}, 0, "no token L1thdi"),
        ({"when": "L1U > 253.05"}, 0, "finer than the firmware's 0.1 V resolution"),
        ({"when": "L1P / L1S < 0.9"}, 0, "not arithmetic on measurements"),
        ({"when": "L1U > L1I"}, 0, "different raw units"),
        ({"average": "60s"}, 0, "windows are 1-20 s"),
        ({}, 5, "slots 0-4"),
        ({"recovery": "1.5s"}, 0, "whole seconds"),
        ({"outputs": [f"pm:pin:{i}" for i in range(9)]}, 0, "at most 8"),
        (
            {"when": " || ".join(f"L{i % 3 + 1}U > 25{i}" for i in range(8))},
            0,
            "the firmware takes 63",
        ),
    ],
)
def test_what_the_firmware_cannot_express_is_refused(
    changes: dict[str, Any], slot: int, reason: str
) -> None:
    with pytest.raises(UploadError) as info:
        encode(act(**changes), slot)
    assert reason in str(info.value)
    assert "relay action 'overvoltage'" in str(info.value)


SITE: dict[str, Any] = {
    "site": "plant",
    "buses": [{"name": "b1", "host": "127.0.0.1", "port": 5020}],
    "meters": [
        {"name": "pm", "bus": "b1", "unit": 3, "profile": "pmtr001"},
        {"name": "main", "bus": "b1", "unit": 1, "profile": "sdm630"},
    ],
    "devices": [{"name": "pm", "bus": "b1", "unit": 3, "kind": "pmtr001"}],
    "relay_actions": [
        {
            "name": "overvoltage",
            "meter": "pm",
            "when": "(L1U > 253) || (L2U > 253) || (L3U > 253)",
            "average": "10s",
            "recovery": "300s",
            "outputs": ["pm:pin:4"],
        }
    ],
}


def test_site_checks_cover_uploads() -> None:
    data = copy.deepcopy(SITE)
    base = data["relay_actions"][0]
    data["relay_actions"] = [
        base,
        {**base, "name": "q", "when": "Q > 5", "outputs": ["pm:pin:5"]},
        {**base, "name": "other", "meter": "main", "outputs": ["pm:pin:6"]},
    ]
    probs = check_site(parse_site(data))
    text = "\n".join(probs)
    assert "relay_actions[1]: cannot upload to PMTR_001 'pm'" in text and "no token Q" in text
    assert "relay_actions[2].meter: 'main' is not the PMTR_001 'pm'" in text
    assert len(probs) == 2
    data["relay_actions"] = [
        {**base, "name": f"a{i}", "outputs": [f"pm:pin:{i}"]} for i in range(6)
    ]
    probs = check_site(parse_site(data))
    assert probs == [
        "relay_actions[5]: cannot upload to PMTR_001 'pm': relay action 'a5': slot 5: the "
        "firmware has slots 0-4 (at most 5 actions per meter)"
    ]


class FakePmtr:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, Any]] = []
        self.corrupt = False

    def device(self) -> SimDevice:
        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if values is not None and fc in (5, 15):
                self.log.append(("coil", address, [bool(v) for v in values]))
            if values is not None and fc in (6, 16):
                self.log.append(("regs", address, list(values)))
            if fc == 3 and self.corrupt and start <= 157 < start + len(regs):
                regs[157 - start] = 0x5858  # "XX"
            return None

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=200, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(id=3, simdata=(bits, list(bits), regs, list(regs)), action=action)


async def test_upload_over_modbus_and_verify() -> None:
    fake = FakePmtr()
    port = free_port()
    srv = ModbusTcpServer([fake.device()], address=("127.0.0.1", port))
    await srv.serve_forever(background=True)
    try:
        data = copy.deepcopy(SITE)
        data["buses"][0]["port"] = port
        site = parse_site(data)
        (item,) = uploads(site)["pm"]
        link = ModbusConnection(BusConfig(name="b1", host="127.0.0.1", port=port, timeout_s=0.5))
        await upload(link, 3, item)
        kinds = [(k, a) for k, a, _ in fake.log]
        assert kinds == [("regs", 151), ("coil", 2), ("coil", 3), ("coil", 4), ("coil", 1)]
        assert fake.log[0][2] == item.registers
        assert fake.log[-1][2] == [True]  # apply last
        fake.corrupt = True
        fake.log.clear()
        with pytest.raises(Exception, match="read back as 'XX"):
            await upload(link, 3, item)
        assert ("coil", 1) not in [(k, a) for k, a, _ in fake.log]  # never applied
        link.close()
    finally:
        await srv.shutdown()  # type: ignore[no-untyped-call]
