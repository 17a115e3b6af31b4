"""``pfmon read``, ``pfmon scan``, ``pfmon timesync`` and ``pfmon simulate`` against
the simulator over real Modbus TCP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.simulator import SimServer, SimSite, fleet_site
from shared.embedded import free_port, wait_port

runner = CliRunner()


@pytest.fixture(scope="module")
def sim() -> Iterator[tuple[SimSite, int]]:
    """A mixed fleet (pmtr001, sdm630, pzem004t ...) served from a background thread."""
    site = fleet_site(6, seed=4, profile="mixed")
    site.inject("comm_loss", unit=5, delay_s=5.0)
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    servers: list[SimServer] = []

    async def start() -> None:
        servers.append(await SimServer(site, port).start())

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    wait_port("127.0.0.1", port)
    yield site, port

    async def stop() -> None:
        await servers[0].stop()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_read_json_matches_the_model(sim: tuple[SimSite, int]) -> None:
    site, port = sim
    result = runner.invoke(
        app,
        [
            "read",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--unit",
            "2",
            "--profile",
            "sdm630",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    values = orjson.loads(result.stdout)
    truth = site.state().meters["meter2"]
    assert values["power"] == pytest.approx(truth.p_w, rel=0.03)
    assert values["reactive_power"] == pytest.approx(truth.q_var, rel=0.05, abs=200)
    assert 225 < values["voltage_l1"] < 235


def test_read_raw_shows_registers_in_hex(sim: tuple[SimSite, int]) -> None:
    _, port = sim
    result = runner.invoke(
        app,
        [
            "read",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--unit",
            "1",
            "--profile",
            "pmtr001",
            "--raw",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "holding 78..97" in result.stdout
    assert "1388" in result.stdout  # 5000 mV rail at 78, as the device holds it
    assert "voltage_l1" in result.stdout


def test_read_with_ratios_shows_the_secondary_and_the_primary_value(
    sim: tuple[SimSite, int],
) -> None:
    site, port = sim
    base = ["read", "--host", "127.0.0.1", "--port", str(port), "--unit", "2"]
    ratios = ["--profile", "sdm630", "--ct-ratio", "400/5", "--pt-ratio", "11000/110"]
    result = runner.invoke(app, [*base, *ratios, "--json"])
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.stdout)
    assert out["ct_ratio"] == 80.0 and out["pt_ratio"] == 100.0
    primary, secondary = out["values"], out["secondary"]
    # one poll, both sides: the secondary is what the meter holds (230 V, the plant's P)
    assert 225 < secondary["voltage_l1"] < 235
    assert secondary["power"] == pytest.approx(site.state().meters["meter2"].p_w, rel=0.03)
    assert primary["voltage_l1"] == pytest.approx(secondary["voltage_l1"] * 100)
    assert primary["current_l1"] == pytest.approx(secondary["current_l1"] * 80)
    assert primary["power"] == pytest.approx(secondary["power"] * 8000)
    assert primary["import_energy"] == pytest.approx(secondary["import_energy"] * 8000)
    for same in ("power_factor", "frequency", "thd_current_l1"):
        assert primary[same] == secondary[same]
    table = runner.invoke(app, [*base, *ratios])
    assert table.exit_code == 0, table.output
    assert "secondary" in table.stdout and "primary" in table.stdout
    assert "CT 80, PT 100" in table.stdout
    bad = runner.invoke(app, [*base, "--profile", "sdm630", "--ct-ratio", "400/0"])
    assert bad.exit_code == 2 and "--ct-ratio '400/0'" in bad.output


def test_read_a_meter_of_the_site_file_with_its_ratios(
    sim: tuple[SimSite, int], tmp_path: Path
) -> None:
    _, port = sim
    site = tmp_path / "site.yaml"
    site.write_text(
        "site: s1\n"
        f"buses: [{{name: b1, host: 127.0.0.1, port: {port}}}]\n"
        "meters:\n"
        "  - {name: incomer, bus: b1, unit: 2, profile: sdm630, ct_ratio: '400/5'}\n"
    )
    result = runner.invoke(app, ["read", "-s", str(site), "--meter", "incomer", "--json"])
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.stdout)
    assert out["ct_ratio"] == 80.0 and out["pt_ratio"] == 1.0
    assert out["values"]["current_l1"] == pytest.approx(out["secondary"]["current_l1"] * 80)
    assert out["values"]["voltage_l1"] == out["secondary"]["voltage_l1"]
    # an option given beside --meter wins over the site file
    result = runner.invoke(
        app, ["read", "-s", str(site), "--meter", "incomer", "--ct-ratio", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "secondary" not in orjson.loads(result.stdout)
    bad = runner.invoke(app, ["read", "-s", str(site), "--meter", "feeder9"])
    assert bad.exit_code == 2 and "no meter of that name" in bad.output
    assert "meters: incomer" in bad.output
    none = runner.invoke(app, ["read", "--host", "127.0.0.1", "--port", str(port)])
    assert none.exit_code == 2 and "--meter NAME with --site-file" in none.output


def test_read_errors_are_clear(sim: tuple[SimSite, int]) -> None:
    _, port = sim
    base = ["read", "--host", "127.0.0.1", "--port", str(port)]
    r = runner.invoke(app, [*base, "--unit", "0", "--profile", "pmtr001"])
    assert r.exit_code == 2 and "1-247" in r.output
    r = runner.invoke(app, [*base, "--unit", "1", "--profile", "nope"])
    assert r.exit_code == 2 and "unknown meter profile 'nope'" in r.output
    r = runner.invoke(app, [*base, "--unit", "5", "--profile", "sdm630", "--timeout", "0.3"])
    assert r.exit_code == 1 and "timeout" in r.output and "input 0+102" in r.output
    dead = free_port()
    r = runner.invoke(
        app,
        ["read", "--host", "127.0.0.1", "--port", str(dead), "--unit", "1", "--profile", "pmtr001"],
    )
    assert r.exit_code == 1 and "cannot connect" in r.output


def test_scan_finds_units_and_profiles(sim: tuple[SimSite, int]) -> None:
    site, port = sim
    result = runner.invoke(
        app, ["scan", "--host", "127.0.0.1", "--port", str(port), "--to", "20", "--json"]
    )
    assert result.exit_code == 0, result.output
    found = {f["unit"]: f["profile"] for f in orjson.loads(result.stdout)}
    expected = {u: m.profile.name for u, m in site.meters.items() if u != 5}  # 5 is silent
    assert found == expected


def test_timesync_pushes_the_clock_with_the_pmtr_handshake(sim: tuple[SimSite, int]) -> None:
    site, port = sim
    unit = next(u for u, m in site.meters.items() if m.profile.name == "pmtr001")
    before = int(time.time())
    result = runner.invoke(
        app, ["timesync", "--host", "127.0.0.1", "--port", str(port), "--unit", str(unit)]
    )
    assert result.exit_code == 0, result.output
    assert "not exposed" in result.stdout
    epoch = site.meters[unit].clock_epoch
    assert epoch is not None
    # the firmware adds 6 s and truncates to 32 bits
    assert before + 6 <= epoch <= int(time.time()) + 6


def test_simulate_command_serves_a_plant() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "simulate",
            "--port",
            str(port),
            "--plant",
            "--duration",
            "20",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_port("127.0.0.1", port, timeout=15)
        r = runner.invoke(
            app,
            [
                "read",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--unit",
                "1",
                "--profile",
                "sdm630",
                "--json",
            ],
        )
        assert r.exit_code == 0, r.output
        assert orjson.loads(r.stdout)["power_factor"] == pytest.approx(0.78, abs=0.02)
    finally:
        proc.terminate()
        proc.wait(10)


def test_collector_refuses_unknown_profiles_before_starting(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "site: s1\n"
        "buses: [{name: b1, host: 127.0.0.1, port: 1502}]\n"
        "meters:\n"
        "  - {name: m1, bus: b1, unit: 1, profile: sdm999}\n"
        "  - {name: m2, bus: b1, unit: 2, profile: pmtr001}\n"
        "  - {name: m3, bus: b1, unit: 3, profile: acme}\n"
    )
    result = runner.invoke(app, ["collector", "--site-file", str(site), "--duration", "2"])
    assert result.exit_code == 2, result.output
    assert "meters[0].profile: unknown meter profile 'sdm999'" in result.output
    assert "meters[2].profile: unknown meter profile 'acme'" in result.output
    assert "metrics on" not in result.output  # nothing half-started


def _raw(port: int, *args: str) -> list[str]:
    return ["read", "--host", "127.0.0.1", "--port", str(port), *args]


def test_read_raw_registers_without_a_profile(sim: tuple[SimSite, int]) -> None:
    site, port = sim
    modicon = runner.invoke(app, _raw(port, "-u", "1", "--address", "40079", "-n", "4", "--json"))
    assert modicon.exit_code == 0, modicon.output
    out = orjson.loads(modicon.stdout)
    assert out["table"] == "holding" and out["address"] == 78
    first = out["registers"][0]
    assert first["address"] == 78 and first["modicon"] == 40079
    assert first["hex"] == "0x1388" and first["u16"] == 5000  # the 5000 mV rail
    assert len(out["registers"]) == 4 and out["registers"][-1]["u32_big"] is None
    zero_based = runner.invoke(
        app, _raw(port, "-u", "1", "--table", "holding", "--address", "78", "-n", "4", "--json")
    )
    assert zero_based.exit_code == 0, zero_based.output
    assert orjson.loads(zero_based.stdout)["registers"][0]["hex"] == "0x1388"
    # sdm630 input 0-1: voltage L1 as f32, high word first
    unit = next(u for u, m in site.meters.items() if m.profile.name == "sdm630")
    sdm = runner.invoke(app, _raw(port, "-u", str(unit), "--address", "30001", "-n", "2", "--json"))
    assert sdm.exit_code == 0, sdm.output
    pair = orjson.loads(sdm.stdout)["registers"][0]
    assert 200 < pair["f32_big"] < 260
    words = [int(r["hex"], 16) for r in orjson.loads(sdm.stdout)["registers"]]
    assert pair["u32_big"] == (words[0] << 16) | words[1]
    assert pair["u32_little"] == (words[1] << 16) | words[0]
    assert pair["s16"] == (words[0] - 0x10000 if words[0] & 0x8000 else words[0])
    shown = runner.invoke(app, _raw(port, "-u", "1", "--address", "40079", "-n", "2"))
    assert shown.exit_code == 0, shown.output
    assert "0x1388" in shown.stdout and "5000" in shown.stdout and "f32_little" in shown.stdout


def test_read_raw_errors_are_said_in_words(sim: tuple[SimSite, int]) -> None:
    _, port = sim
    r = runner.invoke(app, _raw(port, "-u", "1", "--address", "40301", "-n", "2"))
    assert r.exit_code == 1
    assert "0x02" in r.output and "no such register" in r.output and "holding 300+2" in r.output
    r = runner.invoke(app, _raw(port, "-u", "5", "--address", "30001", "--timeout", "0.3"))
    assert r.exit_code == 1 and "no answer (timeout)" in r.output
    r = runner.invoke(app, _raw(port, "-u", "1", "--address", "12345"))
    assert r.exit_code == 2 and "Modicon notation" in r.output
    r = runner.invoke(app, _raw(port, "-u", "1", "--address", "40001", "-n", "200"))
    assert r.exit_code == 2 and "1-125" in r.output
    r = runner.invoke(app, _raw(port, "-u", "1", "--table", "coils", "--address", "0"))
    assert r.exit_code == 2 and "holding or input" in r.output
    r = runner.invoke(app, _raw(port, "--address", "40001"))
    assert r.exit_code == 2 and "--unit" in r.output
