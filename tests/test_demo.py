"""``pfmon demo --duration``: with the machine's broker and database, and with neither."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.embedded import free_port


def _demo_cmd(duration: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.cli",
        "demo",
        "--duration",
        str(duration),
        "--meters",
        "2",
    ]


def _demo(env: dict[str, str], duration: int = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _demo_cmd(duration),
        capture_output=True,
        text=True,
        timeout=duration + 90,
        env={**os.environ, **env},
    )


def _correction(stderr: str) -> tuple[float, float, int]:
    """The demo's last line about the incomer: PF before, PF after, bank steps in."""
    m = re.search(r"incomer PF ([0-9.]+) -> ([0-9.]+) with (\d+) of 6 bank steps in", stderr)
    assert m, stderr[-3000:]
    return float(m.group(1)), float(m.group(2)), int(m.group(3))


def _rows(stderr: str) -> int:
    m = re.search(r"demo finished: (\d+) metric rows archived", stderr)
    assert m, stderr[-3000:]
    return int(m.group(1))


def _check_report(stderr: str) -> None:
    """The bill of the run (``pfmon report``), written where the demo says."""
    m = re.search(r"report of the run \(pfmon report\): (\S+report\.md) -\s+billed PF", stderr)
    assert m, stderr[-3000:]
    report = Path(m.group(1))
    try:
        text = report.read_text()
        assert "# Power-factor report - demo" in text and "Billed at: main" in text
        assert "bank main supplied (on main)" in text
        assert report.with_suffix(".pf.svg").read_text().startswith("<svg")
    finally:
        shutil.rmtree(report.parent, ignore_errors=True)


@pytest.mark.timeout(150)
def test_demo_uses_the_machine_broker_and_database(mqtt_url: str, db_dsn: str) -> None:
    res = _demo({"PFM_MQTT_URL": mqtt_url, "PFM_DB_DSN": db_dsn}, duration=12)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(PFM_MQTT_URL)" in res.stderr and "(PFM_DB_DSN)" in res.stderr
    # the operator's console, open for reading on loopback, and a login for actions
    assert re.search(r"^console: http://127\.0\.0\.1:\d+/$", res.stderr, re.M), res.stderr[:3000]
    assert re.search(r"login: +demo / \S+ \(reading is open on loopback", res.stderr)
    # 2 meters at 1 Hz for ~12 s
    assert _rows(res.stderr) >= 10
    before, _after, _steps = _correction(res.stderr)
    assert 0.75 < before < 0.81


@pytest.mark.timeout(200)
def test_demo_starts_its_own_broker_and_database_when_none_answers() -> None:
    dead = free_port()
    res = _demo(
        {
            "PFM_MQTT_URL": f"mqtt://127.0.0.1:{dead}",
            "PFM_DB_DSN": f"postgresql://postgres@127.0.0.1:{dead}/postgres",
        },
        duration=20,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "private mosquitto" in res.stderr or "amqtt" in res.stderr
    assert "private PostgreSQL" in res.stderr
    assert _rows(res.stderr) >= 10
    # the main job: the actuator switched the simulated bank and the incomer's PF rose
    before, after, steps = _correction(res.stderr)
    assert 0.75 < before < 0.81, "the plant starts near PF 0.78"
    assert steps >= 1 and after > before + 0.02
    _check_report(res.stderr)


async def test_the_demo_table_says_why_a_feeder_has_no_signed_q() -> None:
    from datetime import UTC, datetime

    from rich.console import Console

    from services.demo import _View
    from shared.bus import Incoming
    from shared.measurements import Measurement as M
    from shared.messages import LoadKind, Metrics

    view = _View(bank_steps=6)
    ts = datetime.now(UTC)
    incoming = Incoming("t", b"", 1, False, 0, None)
    signed = {M.POWER: 100e3, M.APPARENT_POWER: 125e3, M.REACTIVE_POWER: 75e3}
    unsigned = {M.POWER: 30e3, M.APPARENT_POWER: 50e3, M.POWER_FACTOR: 0.6}
    for name, values, load in (
        ("main", signed, LoadKind.INDUCTIVE),
        ("press", unsigned, LoadKind.UNKNOWN),
    ):
        m = Metrics(site="demo", meter=name, ts=ts, seq=1, interval_s=0, values=values)
        m.load = {"total": load}
        await view.on_metrics(m, incoming)
    out = Console(width=200, record=True)
    out.print(view.table(10))
    text = out.export_text()
    (press,) = [line for line in text.splitlines() if "press" in line]
    assert "±40.0 *" in press and "unknown *" in press  # |Q| = sqrt(50² - 30²) kvar
    (main,) = [line for line in text.splitlines() if " main " in line]
    assert "75.0" in main and "inductive" in main and "*" not in main
    assert "magnitude-only meter" in text and "no lead/lag" in text


@pytest.mark.timeout(200)
def test_two_demos_on_one_broker_do_not_collide(mqtt_url: str, db_dsn: str) -> None:
    """Each run has client ids (and a site) of its own: both run through, both correct."""
    env = {**os.environ, "PFM_MQTT_URL": mqtt_url, "PFM_DB_DSN": db_dsn}
    procs = [
        subprocess.Popen(
            _demo_cmd(14), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=150)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "in use by another process" not in err and "lost:" not in err, err[-3000:]
        assert _rows(err) >= 5
    ids = [re.search(r"mqtt ids: (\S+)", err) for err in errs]
    assert all(ids) and ids[0] != ids[1]  # type: ignore[union-attr]
    assert ids[0].group(1) != ids[1].group(1)  # type: ignore[union-attr]
