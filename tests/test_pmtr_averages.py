"""PMTR_001 registers 98-114: the device's own moving averages, a named group read on
demand (``pfmon read --group device_averages``), never polled by default."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.collector.profiles import PROFILES, Block, Refused
from services.simulator import SimSite
from shared.measurements import Measurement as M
from tests.test_collector_cli import sim

pytestmark = pytest.mark.timeout(60)
__all__ = ["sim"]  # the simulator fixture, shared with the collector CLI tests

MAP_FILE = Path(__file__).resolve().parents[2] / "shared/reference/pmtr001-modbus-map.json"
PMTR = PROFILES["pmtr001"]
GROUP = PMTR.groups["device_averages"]


def test_the_poll_stays_one_read_of_78_to_97() -> None:
    assert PMTR.plan() == [Block("holding", 78, 20)]
    assert not {spec.address for spec in PMTR.registers.values()} & set(range(98, 115))


def test_the_group_is_one_read_of_98_to_114_with_the_firmwares_pf_addresses() -> None:
    assert GROUP.plan() == [Block("holding", 98, 17)]
    where = {name: v.spec.address for name, v in GROUP.values.items()}
    assert where["avg_voltage_l1"] == 98 and where["avg_frequency_l3"] == 109
    # the stride-2 bug: PF L2/L3 at 112/114; 111 and 113 are never decoded
    assert [where[f"avg_power_factor_l{ph}"] for ph in (1, 2, 3)] == [110, 112, 114]
    assert not {111, 113} & set(where.values())
    assert len(GROUP.values) == 15


def test_the_group_agrees_with_the_reference_map() -> None:
    if not MAP_FILE.exists():
        pytest.skip(f"{MAP_FILE} is not beside the checkout")
    regs = json.loads(MAP_FILE.read_text())["registers"]
    ref = {}
    for r in regs:
        if r["table"] == "holding" and 98 <= r["address"] <= 114:
            for i in range(r["count"]):
                ref[r["address"] + i] = (r["scale"], r["unit"])
    ours = {v.spec.address: v for v in GROUP.values.values()}
    assert set(ref) == set(ours)
    for address, (scale, unit) in ref.items():
        assert ours[address].spec.scale == pytest.approx(scale), address
        assert ours[address].of.unit == unit, address


def test_decoding_scales_skips_the_gaps_and_refuses_the_implausible() -> None:
    image = dict.fromkeys(range(98, 115), 0)
    image.update({98: 2301, 99: 2295, 100: 2310, 101: 1234, 104: 2840, 107: 500})
    image.update({110: 87, 111: 0xFFFF, 112: 91, 113: 0xFFFF, 114: 95})
    image[109] = 0xFFFF  # 6553.5 Hz: beyond any grid
    refused: list[Refused] = []
    got = GROUP.decode({"holding": image, "input": {}}, refused)
    assert got["avg_voltage_l1"] == pytest.approx(230.1)
    assert got["avg_current_l1"] == pytest.approx(12.34)
    assert got["avg_power_l1"] == 2840.0
    assert got["avg_frequency_l1"] == pytest.approx(50.0)
    assert [got[f"avg_power_factor_l{ph}"] for ph in (1, 2, 3)] == pytest.approx([0.87, 0.91, 0.95])
    # a failed sensor read is stored as 0: voltage and frequency are then missing
    assert "avg_frequency_l2" not in got
    assert got["avg_current_l2"] == 0.0  # no load is a real 0 A
    assert "avg_frequency_l3" not in got
    assert [(r.measurement, r.address) for r in refused] == [(M.FREQUENCY_L3, 109)]


def _read(port: int, *extra: str) -> tuple[int, str]:
    base = ["read", "--host", "127.0.0.1", "--port", str(port), "--unit", "1"]
    res = CliRunner().invoke(app, [*base, "--profile", "pmtr001", *extra])
    return res.exit_code, res.output


def test_read_group_from_the_simulator(sim: tuple[SimSite, int]) -> None:
    _, port = sim
    code, out = _read(port, "--group", "device_averages", "--json")
    assert code == 0, out
    data = orjson.loads(out)
    avg, now = data["device_averages"], data["values"]
    assert set(avg) == set(GROUP.values)
    # the simulator's load is steady: its averages are the instantaneous values
    for ph in (1, 2, 3):
        assert avg[f"avg_voltage_l{ph}"] == pytest.approx(now[f"voltage_l{ph}"], abs=2)
        assert avg[f"avg_power_factor_l{ph}"] == pytest.approx(now[f"power_factor_l{ph}"], abs=0.03)
        assert 45 < avg[f"avg_frequency_l{ph}"] < 65
    code, out = _read(port, "--group", "device_averages", "--raw")
    assert code == 0, out
    assert "holding 98..114" in out and "avg_power_factor_l3" in out and "holding 114 u16" in out
    code, out = _read(port, "--group", "averages")
    assert code == 2
    assert "--group averages: profile pmtr001 has no such group (groups: device_averages)" in out
    res = CliRunner().invoke(
        app, ["read", "--host", "127.0.0.1", "--port", str(port), "--unit", "1",
              "--address", "40099", "--group", "device_averages"],
    )  # fmt: skip
    assert res.exit_code == 2 and "--group goes with a profile's read" in res.output
