"""The plant simulator: physics, capacitor-bank feedback, relays, faults, reproducibility."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
from pymodbus.client import AsyncModbusTcpClient

from services.collector.profiles import PROFILES, Profile
from services.simulator import (
    Heater,
    Motor,
    ServerPSU,
    SimServer,
    SimSite,
    inductive_site,
)
from shared.embedded import free_port
from shared.measurements import Measurement as M


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def read_profile(client: AsyncModbusTcpClient, unit: int, profile: Profile) -> dict[M, float]:
    raw: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
    for block in profile.plan():
        if block.table == "holding":
            rr = await client.read_holding_registers(
                block.address, count=block.count, device_id=unit
            )
        else:
            rr = await client.read_input_registers(block.address, count=block.count, device_id=unit)
        assert not rr.isError(), rr
        for i, word in enumerate(rr.registers):
            raw[block.table][block.address + i] = word
    return profile.decode(raw)


@pytest.fixture
async def served() -> AsyncIterator[tuple[SimSite, AsyncModbusTcpClient]]:
    site = inductive_site(seed=3)
    port = free_port()
    async with SimServer(site, port):
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        await client.connect()
        yield site, client
        client.close()


def test_inductive_site_is_at_pf_078_and_the_bank_corrects_it() -> None:
    site = inductive_site()
    state = site.state()
    assert 0.77 < state.pf < 0.79
    assert state.q_var > 0
    q_before = state.q_var
    assert site.bank is not None
    site.bank.set_steps([0, 1, 2, 3])
    after = site.state()
    # 4 x 25 kvar at about nominal voltage: Q falls by ~100 kvar (V^2 scaling)
    assert after.q_var == pytest.approx(q_before - 100_000, rel=0.03)
    assert after.pf > 0.95
    assert after.bank_kvar == 100.0
    assert site.bank.operations == [1, 1, 1, 1, 0, 0]


async def test_bank_coils_over_modbus_feed_back_into_the_meter(
    served: tuple[SimSite, AsyncModbusTcpClient],
) -> None:
    site, client = served
    sdm = PROFILES["sdm630"]
    before = await read_profile(client, 1, sdm)
    assert before[M.POWER_FACTOR] == pytest.approx(site.state().pf, abs=0.01)
    assert before[M.REACTIVE_POWER] > 100_000
    rr = await client.write_coils(0, [True, True, True, True, True], device_id=10)
    assert not rr.isError()
    coils = await client.read_coils(0, count=6, device_id=10)
    assert coils.bits[:6] == [True] * 5 + [False]
    assert site.bank is not None and site.bank.steps_in == [0, 1, 2, 3, 4]
    after = await read_profile(client, 1, sdm)
    assert after[M.REACTIVE_POWER] == pytest.approx(before[M.REACTIVE_POWER] - 125_000, rel=0.05)
    assert after[M.POWER_FACTOR] > 0.97
    assert after[M.POWER_FACTOR] == pytest.approx(site.state().pf, abs=0.01)
    # holding registers describe the bank: 6 steps of 25.0 kvar
    hr = await client.read_holding_registers(0, count=7, device_id=10)
    assert hr.registers == [6] + [250] * 6


async def test_relay_coil_switches_a_load_and_the_meter_sees_it(
    served: tuple[SimSite, AsyncModbusTcpClient],
) -> None:
    site, client = served
    p0 = site.state().p_w
    await client.write_coil(0, True, device_id=11)
    assert site.loads["heater"].running
    assert site.state().p_w == pytest.approx(p0 + 15_000, rel=1e-6)
    values = await read_profile(client, 1, PROFILES["sdm630"])
    assert values[M.POWER] == pytest.approx(p0 + 15_000, rel=0.03)


async def test_absent_unit_answers_gateway_exception(
    served: tuple[SimSite, AsyncModbusTcpClient],
) -> None:
    _, client = served
    rr = await client.read_input_registers(0, count=2, device_id=77)
    assert rr.isError() and rr.exception_code == 0x0B


def test_load_physics() -> None:
    clock = FakeClock()
    site = SimSite(seed=1, clock=clock)
    site.supply.noise = 0.0
    site.add_load(Motor("m", kw=30.0, pf=0.8, wobble=0.0))
    site.add_load(ServerPSU("psu", kw=10.0, wobble=0.0))
    site.add_load(Heater("h", kw=5.0, wobble=0.0), running=False)
    site.add_meter(1, "motor", profile="sdm630", loads=["m"])
    site.add_meter(2, "psu", profile="sdm630", loads=["psu"])
    motor = site.state().meters["motor"]
    assert motor.pf == pytest.approx(0.8, abs=0.01)
    assert motor.q_var == pytest.approx(30_000 * math.tan(math.acos(0.8)), rel=0.01)
    psu = site.state().meters["psu"]
    assert psu.q_var < 0  # capacitive
    assert psu.values[M.THD_CURRENT_L1] > 20  # harmonic rich
    assert psu.pf < psu.values[M.DISPLACEMENT_PF_L1]  # distortion lowers true PF
    # inrush: starting a motor draws several times its running current
    site.set_load("m", running=False)
    site.set_load("m", running=True)
    starting = site.state().meters["motor"].values[M.CURRENT_L1]
    clock.t += 5.0
    running = site.state().meters["motor"].values[M.CURRENT_L1]
    assert starting > 4 * running


def test_faults_change_what_the_meter_reads() -> None:
    site = inductive_site(seed=2)
    healthy = site.meter_values(1)
    site.inject("reversed_ct", unit=1, phase=2)
    rev = site.meter_values(1)
    assert rev[M.POWER_L2] < 0 < healthy[M.POWER_L2]
    site.clear(1)
    site.inject("blown_fuse", unit=1, phase=3)
    blown = site.meter_values(1)
    assert blown[M.VOLTAGE_L3] < 10 and blown[M.CURRENT_L3] == 0
    site.clear(1)
    site.loads["compressor"].phases = (0.8, 0.1, 0.1)  # unbalanced load
    site.inject("broken_neutral", unit=1)
    bn = site.meter_values(1)
    assert bn[M.VOLTAGE_L1] < 210 and bn[M.VOLTAGE_L3] > 250
    with pytest.raises(ValueError, match="unknown fault"):
        site.inject("gremlins", unit=1)


def test_scheduled_fault_starts_and_ends() -> None:
    clock = FakeClock()
    site = inductive_site(clock=clock)
    site.inject_at(10.0, "exception", unit=1, duration_s=5.0, code=4)
    site.tick()
    assert not site.meters[1].faults
    clock.t += 11
    site.tick()
    assert site.meters[1].faults == {"exception": {"code": 4}}
    clock.t += 6
    site.tick()
    assert not site.meters[1].faults


def test_same_seed_same_readings() -> None:
    def run(seed: int) -> list[float]:
        clock = FakeClock()
        site = inductive_site(seed=seed, clock=clock)
        out = []
        for _ in range(5):
            clock.t += 1
            out.append(site.meter_values(1)[M.VOLTAGE_L1])
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_waveform_matches_the_operating_point() -> None:
    site = inductive_site(seed=1)
    site.supply.noise = 0.0
    wf = site.waveform(1, "s1", seq=1, fs_hz=6400, cycles=10)
    v1 = wf.channels["v1"]
    i1 = wf.channels["i1"]
    assert len(v1) == 1280
    vrms = math.sqrt(sum(x * x for x in v1) / len(v1))
    irms = math.sqrt(sum(x * x for x in i1) / len(i1))
    p = sum(a * b for a, b in zip(v1, i1, strict=True)) / len(v1)
    vals = site.state().meters["main"].values
    assert vrms == pytest.approx(vals[M.VOLTAGE_L1], rel=0.01)
    assert irms == pytest.approx(vals[M.CURRENT_L1], rel=0.03)
    assert p == pytest.approx(vals[M.POWER_L1], rel=0.03)


def test_no_service_imports_the_simulator() -> None:
    """The simulator is a program of its own: the four services never import it (it
    imports the collector's meter profiles, not the other way round)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "services"
    offenders = []
    for service in ("collector", "analytics", "actuator", "archiver"):
        for path in sorted((root / service).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if any(
                    n == "services.simulator" or n.startswith("services.simulator.") for n in names
                ):
                    offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert not offenders, f"services importing the simulator: {offenders}"
    assert not (root / "collector" / "simulator.py").exists()
