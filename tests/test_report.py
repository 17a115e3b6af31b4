"""``pfmon report`` on hand-made rows with known answers, through the CLI, and on data
that went simulator -> collector -> analytics -> archiver."""

from __future__ import annotations

import asyncio
import csv
import io
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from services.analytics import service as analytics
from services.archiver.ingest import RowBuilder, group_rows, write_batch
from services.archiver.migrate import migrate
from services.archiver.report import (
    build_report,
    pf_svg,
    render_csv,
    render_html,
    render_json,
    render_markdown,
)
from services.collector import service as collector
from services.simulator import LoadModel, MeterFleet, expected_pf
from shared.embedded import free_port
from shared.measurements import Measurement as M
from shared.messages import ActuatorState, Command, Metrics
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from shared.site.archiver import ArchiverConfig
from tests.test_archiver_helpers import archiver_site, running_archiver, schema_dsn

T0 = datetime(2026, 3, 2, 8, 0, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _metrics(meter: str, ts: datetime, seq: int, p: float, q: float, **extra: object) -> Metrics:
    s = math.hypot(p, q)
    return Metrics(
        site="plant",
        meter=meter,
        ts=ts,
        seq=seq,
        interval_s=60,
        values={M.POWER: p, M.REACTIVE_POWER: q, M.APPARENT_POWER: s, M.POWER_FACTOR: p / s},
        **extra,  # type: ignore[arg-type]
    )


def known_rows() -> list[Metrics]:
    """One hour, one row per minute (each stands for 60 s of energy):
    meter a: 100 kW, +75 kvar all along (PF 0.8);
    meter b: 50 kW, -10 kvar for 30 min, then +20 kvar; a 5th current harmonic at 8 %."""
    out = []
    spectrum = {"i1": [100.0, 0.0, 1.0, 0.0, 8.0, 0.0, 2.0]}
    for k in range(60):
        ts = T0 + timedelta(minutes=k)
        out.append(_metrics("a", ts, k, 100_000, 75_000, harmonics=spectrum))
        out.append(_metrics("b", ts, k, 50_000, -10_000 if k < 30 else 20_000))
    return out


def plant(**report: object) -> SiteConfig:
    return parse_site(
        {
            "site": "plant",
            "thresholds": {"pf_alert": 0.97, "pf_penalty": 0.90},
            "archiver": {"report": report},
        }
    )


async def _load(conn: asyncpg.Connection, msgs: Sequence[BaseModel]) -> None:
    await migrate(conn, ArchiverConfig())
    rows = RowBuilder(lambda m: 1.0)
    await write_batch(conn, group_rows(rows.row(m) for m in msgs), mark_dirty=True, staged=set())


async def test_report_on_known_rows(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await _load(conn, known_rows())
        # Qc on the worst window is 95 - 150 * tan(acos 0.97); Ssc = 25 Qc puts h at 5
        tan97 = math.tan(math.acos(0.97))
        qc = 95 - 150 * tan97
        site = plant(short_circuit_mva=25 * qc / 1000)
        rep = await build_report(conn, site, "plant", T0, T0 + HOUR)
    finally:
        await conn.close()
    assert math.isclose(rep.kwh, 150, rel_tol=1e-9)
    assert math.isclose(rep.kvarh_ind, 75 + 10, rel_tol=1e-9)
    assert math.isclose(rep.kvarh_cap, 5, rel_tol=1e-9)
    assert math.isclose(rep.pf, 150 / math.hypot(150, 80), rel_tol=1e-9)
    assert [round(w.kw, 6) for w in rep.windows] == [150.0] * 4
    assert [round(w.kvar, 6) for w in rep.windows] == [65.0, 65.0, 95.0, 95.0]
    assert rep.hours_below(0.97) == 1.0 and rep.hours_below(0.90) == 0.5
    assert math.isclose(rep.min_window_pf, 150 / math.hypot(150, 95))
    a, b = sorted(rep.meters, key=lambda m: m.meter)
    assert math.isclose(a.hours_below_alert, 1.0) and math.isclose(a.hours_below_penalty, 1.0)
    assert math.isclose(b.hours_below_alert, 0.5) and b.hours_below_penalty == 0
    assert math.isclose(a.pf, 0.8)
    costs = {p.name.split()[0]: p for p in rep.penalties}
    # tan phi 0.4: 85 - 0.4 * 150 = 25 kvarh at 0.02
    assert math.isclose(costs["reactive"].quantity, 25) and math.isclose(
        costs["reactive"].cost, 0.5
    )
    # billing demand max(150, 0.9 * |150 + j95|) - 150 kW at 10 / kW
    extra = 0.9 * math.hypot(150, 95) - 150
    assert math.isclose(costs["billing"].quantity, extra) and math.isclose(
        costs["billing"].cost, 10 * extra
    )
    # kvar beyond PF 0.9 in the worst window: 95 - 150 tan(acos 0.9), at 3 / kvar
    excess = 95 - 150 * math.tan(math.acos(0.9))
    assert math.isclose(costs["kvar"].quantity, excess) and math.isclose(
        costs["kvar"].cost, 3 * excess
    )
    assert math.isclose(rep.total_cost, 0.5 + 10 * extra + 3 * excess)
    # the fix
    assert math.isclose(rep.qc_worst_kvar, qc)
    # no meters in the site file: a and b are billing points of their own; on the period
    # average a needs 75 - 100 tan phi2, b (5 kvarh for 50 kWh) is above the target
    assert math.isclose(rep.qc_average_kvar, 75 - 100 * tan97)
    assert any("every meter is billed as its own" in w for w in rep.warnings)
    assert math.isclose(rep.resonance_order, 5.0)
    assert rep.harmonics == {5: 8.0}  # 3rd (1 %) and 7th (2 %) are below the 3 % bar
    assert any("harmonic 5" in w for w in rep.warnings), rep.warnings
    md = render_markdown(rep)
    assert "| a | billing | 100.00 | 75.00 | 0.00 | 0.800 |" in md
    # per billing point, on its worst window (a's is 75 - 100 tan, b's 20 - 50 tan)
    assert f"a: capacitor bank **{75 - 100 * tan97:.1f} kvar**" in md
    assert f"b: capacitor bank **{20 - 50 * tan97:.1f} kvar**" in md and "harmonic 5" in md
    page = render_html(rep)
    assert page.count("<svg") == 1 and "<polyline" in page
    # one hour: the chart is per minute; minute 30 onwards b is inductive
    assert rep.chart_step == timedelta(minutes=1) and len(rep.chart) == 60
    assert math.isclose(rep.chart[0][1], 150 / math.hypot(150, 65))
    assert math.isclose(rep.chart[59][1], 150 / math.hypot(150, 95))
    svg = pf_svg(rep)
    assert svg.count(",") >= 60  # every minute plotted
    rows = list(csv.DictReader(io.StringIO(render_csv(rep))))
    assert len(rows) == 4 and math.isclose(float(rows[2]["kvar"]), 95)


async def test_no_resonance_warning_away_from_harmonics(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await _load(conn, known_rows())
        rep = await build_report(conn, plant(short_circuit_mva=5.0), "plant", T0, T0 + HOUR)
        empty = await build_report(conn, plant(), "nowhere", T0, T0 + HOUR)
    finally:
        await conn.close()
    assert rep.resonance_order is not None and 9 < rep.resonance_order < 10
    assert not any("resonance" in w for w in rep.warnings), rep.warnings
    assert empty.meters == [] and "no metrics" in empty.warnings[0]
    assert "Warning" in render_markdown(empty)


# -- the switchboard as wired: a billing point, three feeders, a bank -----------------------

TAN97 = math.tan(math.acos(0.97))
VN = 230.0


def _row(
    meter: str, ts: datetime, seq: int, p_kw: float, q_kvar: float, *, s: float = 60, v: float = VN
) -> Metrics:
    """One row standing for ``s`` seconds at ``p_kw`` / ``q_kvar`` (signed) and voltage ``v``."""
    p, q = p_kw * 1000, q_kvar * 1000
    apparent = math.hypot(p, q)
    values = {M.POWER: p, M.REACTIVE_POWER: q, M.APPARENT_POWER: apparent}
    values |= {M.POWER_FACTOR: p / apparent, M.VOLTAGE_L1: v, M.VOLTAGE_L2: v, M.VOLTAGE_L3: v}
    return Metrics(site="plant", meter=meter, ts=ts, seq=seq, interval_s=s, values=values)


def switchboard_site(**report: object) -> dict[str, object]:
    """main (billing) with feeders f1, f2, f3 and bank b1 (25 + 25 + 50 kvar) on main."""
    return {
        "site": "plant",
        "thresholds": {"pf_alert": 0.97, "pf_penalty": 0.90, "nominal_voltage_v": VN},
        "buses": [{"name": "b", "host": "127.0.0.1"}],
        "meters": [
            {"name": "main", "bus": "b", "unit": 1, "profile": "sdm630", "role": "billing"},
            {"name": "f1", "bus": "b", "unit": 2, "profile": "sdm630", "parent": "main"},
            {"name": "f2", "bus": "b", "unit": 3, "profile": "sdm630", "parent": "main"},
            {"name": "f3", "bus": "b", "unit": 4, "profile": "sdm630", "parent": "main"},
        ],
        "devices": [{"name": "cap1", "bus": "b", "unit": 10, "kind": "capbank", "coils": 3}],
        "banks": [{"name": "b1", "meter": "main", "device": "cap1", "steps_kvar": [25, 25, 50]}],
        "archiver": {"report": report},
    }


def switchboard_rows() -> list[BaseModel]:
    """One hour, a row a minute. Loads: f1 60 kW + 60 kvar, f2 30 kW + 20 kvar, f3 10 kW
    - 5 kvar (capacitive), and 20 kW + 15 kvar nobody meters: main's load is 120 kW +
    90 kvar. The bank has steps 1 and 3 in (75 kvar) since a state 10 minutes before the
    hour; a command puts step 2 in at 08:30 (100 kvar), when the voltage also rises to
    1.05 Vn: 100 x 1.05^2 = 110.25 kvar. A dry-run command (switches nothing) and a
    meter missing from the site file are ignored. Main measures 120 kW and 90 - 75 = 15
    kvar, then 90 - 110.25 = -20.25 kvar."""
    out: list[BaseModel] = [
        ActuatorState(
            site="plant",
            ts=T0 - timedelta(minutes=10),
            seq=1,
            device="cap1",
            online=True,
            coils={0: True, 1: False, 2: True},
            steps_in=[1, 3],
        ),
        Command(
            site="plant",
            ts=T0 + timedelta(minutes=30),
            seq=2,
            device="cap1",
            address=1,
            value=1,
            reason="step 2 in",
            origin="bank:b1",
        ),
        Command(
            site="plant",
            ts=T0 + timedelta(minutes=40),
            seq=3,
            device="cap1",
            address=2,
            value=0,
            reason="would take step 3 out",
            origin="bank:b1",
            dry_run=True,
        ),
        ActuatorState(
            site="plant",
            ts=T0 + timedelta(minutes=45),
            seq=4,
            device="cap1",
            online=True,
            coils={0: True, 1: True, 2: True},
            steps_in=[1, 2, 3],
        ),
    ]
    for k in range(60):
        ts = T0 + timedelta(minutes=k)
        second_half = k >= 30
        out.append(
            _row(
                "main",
                ts,
                k,
                120,
                -20.25 if second_half else 15,
                v=VN * 1.05 if second_half else VN,
            )
        )
        out.append(_row("f1", ts, k, 60, 60))
        out.append(_row("f2", ts, k, 30, 20))
        out.append(_row("f3", ts, k, 10, -5))
        out.append(_row("spare", ts, k, 5, 5))
    return out


async def test_report_bills_the_billing_point_and_explains_it_by_feeder(
    db_dsn: str, db_schema: str
) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await _load(conn, switchboard_rows())
        site = parse_site(switchboard_site())
        rep = await build_report(conn, site, "plant", T0, T0 + HOUR)
    finally:
        await conn.close()
    # billed: main alone, as metered (not main + feeders, not the stray meter)
    assert [m.meter for m in rep.billed] == ["main"]
    assert math.isclose(rep.kwh, 120, rel_tol=1e-9)
    assert math.isclose(rep.kvarh_ind, 15 / 2, rel_tol=1e-9)
    assert math.isclose(rep.kvarh_cap, 20.25 / 2, rel_tol=1e-9)
    assert math.isclose(rep.pf, 120 / math.hypot(120, 7.5 - 10.125), rel_tol=1e-9)
    assert rep.coverage == 1.0
    assert any("spare" in w and "not billed" in w for w in rep.warnings), rep.warnings
    # what the bank supplied: 75 kvar for half an hour, then 110.25 kvar
    (bank,) = rep.billing[0].banks
    assert math.isclose(bank.kvarh, 75 / 2 + 110.25 / 2, rel_tol=1e-9)
    assert math.isclose(bank.hours_known, 1.0)
    meters = {m.meter: m for m in rep.meters}
    main = meters["main"]
    assert math.isclose(main.kvarh_load, 90, rel_tol=1e-9)  # the load before the bank
    assert math.isclose(meters["f3"].kvarh_load, -5, rel_tol=1e-9)
    assert meters["spare"].role == "unconfigured" and meters["spare"].share is None
    # shares of main's uncompensated reactive energy: feeders + unmetered = all of it
    shares = {n: meters[n].share for n in ("f1", "f2", "f3")}
    assert shares == pytest.approx({"f1": 60 / 90, "f2": 20 / 90, "f3": -5 / 90})
    (unmetered,) = rep.unmetered
    assert unmetered.parent == "main"
    assert math.isclose(unmetered.kwh, 20, rel_tol=1e-9)
    assert math.isclose(unmetered.kvarh, 15, rel_tol=1e-9)
    assert unmetered.share is not None
    assert math.isclose(sum(v for v in shares.values() if v is not None), 1 - unmetered.share)
    assert math.isclose(
        sum(meters[n].kvarh_load for n in shares), main.kvarh_load - unmetered.kvarh
    )
    # windows: the billed demand, and the load before compensation
    assert [round(w.kw, 6) for w in rep.windows] == [120.0] * 4
    assert [round(w.kvar, 6) for w in rep.windows] == [15.0, 15.0, -20.25, -20.25]
    assert [round(w.kvar_load, 6) for w in rep.windows] == [90.0] * 4
    # the fix: 90 - 120 tan(acos 0.97) on the load; 100 kvar installed, no extra bank
    assert math.isclose(rep.qc_worst_kvar, 90 - 120 * TAN97, rel_tol=1e-9)
    assert math.isclose(rep.qc_average_kvar, 90 - 120 * TAN97, rel_tol=1e-9)
    assert rep.qc_installed_kvar == 100 and rep.qc_extra_kvar == 0
    # the corrected incomer pays no penalty: 7.5 kvarh < 0.4 x 120 kWh, 15 kvar < 120 tan
    assert rep.total_cost == 0
    md = render_markdown(rep)
    need = 90 - 120 * TAN97
    assert f"main: installed 100 kvar (bank b1), needed ~**{need:.1f} kvar**" in md
    assert "no extra bank" in md
    assert "| bank b1 supplied (on main) | bank |  | -92.62 |" in md
    assert "| main's load before compensation | billing | 120.00 | 90.00 | 0.800 | 100.0 % |" in md
    assert "f1 | feeder of main | 60.00 | 60.00 | 0.707 | 66.7 % |" in md
    assert "unmetered | main - its meters | 20.00 | 15.00 |  | 16.7 % |" in md
    doc = orjson.loads(render_json(rep))
    assert doc["kwh"] == 120 and doc["coverage"] == 1.0 and doc["penalty_total"] == 0
    assert doc["qc_needed_kvar"] == pytest.approx(need, abs=1e-4)
    assert doc["qc_installed_kvar"] == 100
    f1 = next(m for m in doc["meters"] if m["name"] == "f1")
    assert f1 == {
        **f1,
        "role": "feeder",
        "parent": "main",
        "kwh": 60.0,
        "kvarh_ind": 60.0,
        "kvarh_cap": 0.0,
        "pf": pytest.approx(0.7071, abs=1e-4),
    }


async def test_a_site_without_a_bank_is_told_the_size_it_needs(db_dsn: str, db_schema: str) -> None:
    """The same loads, no bank: main measures 120 kW + 90 kvar and needs the same Qc."""
    rows = [
        _row(m.meter, m.ts, m.seq, m.values[M.POWER] / 1000, q)
        for m in switchboard_rows()
        if isinstance(m, Metrics)
        for q in [90.0 if m.meter == "main" else m.values[M.REACTIVE_POWER] / 1000]
    ]
    raw = switchboard_site()
    raw["banks"], raw["devices"] = [], []
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await _load(conn, rows)
        rep = await build_report(conn, parse_site(raw), "plant", T0, T0 + HOUR)
    finally:
        await conn.close()
    need = 90 - 120 * TAN97
    assert math.isclose(rep.qc_worst_kvar, need, rel_tol=1e-9)
    assert rep.qc_installed_kvar == 0 and math.isclose(rep.qc_extra_kvar, need)
    assert f"main: capacitor bank **{need:.1f} kvar**" in render_markdown(rep)
    # 90 kvarh - 0.4 x 120 kWh = 42 kvarh are billed now
    reactive = next(p for p in rep.penalties if p.unit == "kvarh")
    assert math.isclose(reactive.quantity, 42, rel_tol=1e-9)


async def test_a_bank_whose_state_is_known_late_counts_from_then_on(
    db_dsn: str, db_schema: str
) -> None:
    """The bank's first state is archived at 08:20 (steps 1 and 3 in): before it nothing
    is counted and the report says so; a bank with no state at all is a warning."""
    rows: list[BaseModel] = [m for m in switchboard_rows() if isinstance(m, Metrics)]
    rows.append(
        ActuatorState(
            site="plant",
            ts=T0 + timedelta(minutes=20),
            seq=9,
            device="cap1",
            online=True,
            coils={0: True, 1: False, 2: True},
        )
    )
    raw = switchboard_site()
    raw["devices"] = [
        {"name": "cap1", "bus": "b", "unit": 10, "kind": "capbank", "coils": 3},
        {"name": "cap2", "bus": "b", "unit": 11, "kind": "capbank", "coils": 1},
    ]
    raw["banks"] = [
        {"name": "b1", "meter": "main", "device": "cap1", "steps_kvar": [25, 25, 50]},
        {"name": "b2", "meter": "f1", "device": "cap2", "steps_kvar": [10]},
    ]
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await _load(conn, rows)
        rep = await build_report(conn, parse_site(raw), "plant", T0, T0 + HOUR)
    finally:
        await conn.close()
    b1, b2 = rep.billing[0].banks
    # 75 kvar from 08:20 to 08:30, then no command is known: still 75 kvar (x 1.05^2)
    assert math.isclose(b1.kvarh, 75 * 10 / 60 + 75 * 1.05**2 * 30 / 60, rel_tol=1e-9)
    assert math.isclose(b1.hours_known, 40 / 60) and math.isclose(b1.hours, 1.0)
    assert any("'b1': state unknown before 2026-03-02 08:20:00" in n for n in rep.notes)
    assert b2.kvarh == 0 and any("bank 'b2': no state" in w for w in rep.warnings)
    assert rep.qc_installed_kvar == 110  # both banks hang below main


def _recording(seconds: int, step_s: int) -> list[Metrics]:
    """200 kW + 160 kvar from 08:00 for ``seconds``, one row each ``step_s``."""
    return [
        _row("main", T0 + timedelta(seconds=k), k, 200, 160, s=step_s)
        for k in range(0, seconds, step_s)
    ]


async def test_demand_and_qc_per_hour_of_data_do_not_depend_on_coverage(
    db_dsn: str, db_schema: str
) -> None:
    """One minute of 1 s rows and fifteen minutes of 1-minute rows give the same demand
    and Qc; the report says how much of the period and of the window each one covers."""
    site = parse_site(
        {
            "site": "plant",
            "thresholds": {"pf_alert": 0.97, "pf_penalty": 0.90},
            "buses": [{"name": "b", "host": "127.0.0.1"}],
            "meters": [{"name": "main", "bus": "b", "unit": 1, "profile": "sdm630"}],
        }
    )
    reps = []
    for seconds, step in ((60, 1), (900, 60)):
        conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
        try:
            await conn.execute("DROP TABLE IF EXISTS pfm_metrics CASCADE")
            await conn.execute("DROP TABLE IF EXISTS pfm_schema_migrations CASCADE")
            await _load(conn, _recording(seconds, step))
            reps.append(await build_report(conn, site, "plant", T0, T0 + HOUR))
        finally:
            await conn.close()
    minute, quarter = reps
    need = 160 - 200 * TAN97
    for rep in reps:
        (w,) = rep.windows
        assert math.isclose(w.kw, 200, rel_tol=1e-9) and math.isclose(w.kvar, 160, rel_tol=1e-9)
        assert rep.peak is not None and math.isclose(rep.peak.kw, 200, rel_tol=1e-9)
        assert math.isclose(rep.qc_worst_kvar, need, rel_tol=1e-9)
        assert math.isclose(rep.qc_average_kvar, need, rel_tol=1e-9)
        assert math.isclose(rep.pf, 0.78086880944303, rel_tol=1e-9)  # 200 / |200 + j160|
    assert math.isclose(minute.coverage, 1 / 60) and math.isclose(quarter.coverage, 1 / 4)
    assert math.isclose(minute.windows[0].coverage, 1 / 15) and quarter.windows[0].coverage == 1
    md = render_markdown(minute)
    assert "Data covers 1.7 % of the period (0.02 h of 1.00 h)" in md
    assert "200.00 kW / 256.12 kVA (window 08:00, data for 6.7 % of it)" in md
    rows = list(csv.DictReader(io.StringIO(render_csv(minute))))
    assert [float(r["coverage"]) for r in rows] == [pytest.approx(1 / 15, abs=1e-4)]
    assert float(rows[0]["kw"]) == pytest.approx(200)


def test_cli_report(db_dsn: str, tmp_path, monkeypatch) -> None:
    from services.cli import app

    schema = f"r{uuid.uuid4().hex[:10]}"
    dsn = schema_dsn(db_dsn, schema)

    async def setup() -> None:
        conn = await asyncpg.connect(db_dsn)
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.close()
        conn = await asyncpg.connect(dsn)
        await _load(conn, known_rows())
        await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(db_dsn)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()

    asyncio.run(setup())
    try:
        monkeypatch.setenv("PFM_DB_DSN", dsn)
        runner = CliRunner()
        out = tmp_path / "pf.md"
        res = runner.invoke(
            app,
            [
                "report",
                "--site",
                "plant",
                "--from",
                "2026-03-02T08:00",
                "--to",
                "2026-03-02T09:00",
                "--out",
                str(out),
            ],
        )
        assert res.exit_code == 0, res.output
        text = out.read_text()
        assert "Power-factor report - plant" in text and "![billed PF per 1 min](pf.pf.svg)" in text
        assert (tmp_path / "pf.pf.svg").read_text().startswith("<svg")
        res = runner.invoke(
            app,
            [
                "report",
                "--site",
                "plant",
                "--from",
                "2026-03-02",
                "--to",
                "2026-03-03",
                "--format",
                "csv",
            ],
        )
        assert res.exit_code == 0 and res.output.count("\n") == 5
        day = ["report", "--site", "plant", "--from", "2026-03-02", "--to", "2026-03-03"]
        res = runner.invoke(
            app,
            [*day, "--format", "json"],
        )
        assert res.exit_code == 0, res.output
        doc = orjson.loads(res.output)
        assert doc["period"] == {
            "from": "2026-03-02T00:00:00+00:00",
            "to": "2026-03-03T00:00:00+00:00",
            "timezone": "UTC",
        }
        # no site file: a and b are billed each as its own billing point
        assert doc["kwh"] == 150 and doc["billing_points"] == ["a", "b"]
        assert doc["coverage"] == pytest.approx(1 / 24, abs=1e-4)  # an hour of each, per day
        assert [m["name"] for m in doc["meters"]] == ["a", "b"]
        assert {"pf_billing", "peak_demand_kw", "penalty_total", "qc_needed_kvar"} <= set(doc)
        assert doc["qc_installed_kvar"] == 0 and doc["kvarh_cap"] == 5
        bad = runner.invoke(
            app,
            [*day, "--format", "pdf"],
        )
        assert bad.exit_code == 2 and "--format 'pdf': expected md, html, csv, json" in bad.output
        # the topology from a site file: only the billing meter is billed
        topo = tmp_path / "topo.yaml"
        raw = switchboard_site()
        raw["meters"] = [  # a feeds b
            {"name": "a", "bus": "b", "unit": 1, "profile": "sdm630"},
            {"name": "b", "bus": "b", "unit": 2, "profile": "sdm630", "parent": "a"},
        ]
        raw["banks"], raw["devices"] = [], []
        topo.write_text(yaml.safe_dump(raw))
        res = runner.invoke(
            app,
            ["report", "--site-file", str(topo), *day[3:], "--format", "json"],
        )
        assert res.exit_code == 0, res.output
        doc = orjson.loads(res.output)
        assert doc["kwh"] == 100 and doc["billing_points"] == ["a"]
        assert doc["unmetered"] == [{"parent": "a", "kwh": 50.0, "kvarh": 70.0, "share": 0.9333}]
        bad = runner.invoke(
            app, ["report", "--site", "plant", "--from", "yesterday", "--to", "2026-03-03"]
        )
        assert bad.exit_code == 2 and "--from 'yesterday'" in bad.output
        bad = runner.invoke(
            app, ["report", "--site", "plant", "--from", "2026-03-03", "--to", "2026-03-02"]
        )
        assert bad.exit_code == 2 and "period is empty" in bad.output
        broken = tmp_path / "site.yaml"
        broken.write_text("site: plant\narchiver:\n  report:\n    tariff:\n      demand_k: 2\n")
        bad = runner.invoke(
            app,
            ["report", "--site-file", str(broken), "--from", "2026-03-02", "--to", "2026-03-03"],
        )
        assert bad.exit_code == 2 and "archiver.report.tariff.demand_k" in bad.output
        # the site file's tariff is used: no demand component when demand_k is null
        fine = tmp_path / "ok.yaml"
        fine.write_text("site: plant\narchiver:\n  report:\n    tariff:\n      demand_k: null\n")
        res = runner.invoke(
            app,
            ["report", "--site-file", str(fine), "--from", "2026-03-02", "--to", "2026-03-03"],
        )
        assert res.exit_code == 0, res.output
        assert "billing demand" not in res.output and "reactive energy above" in res.output
        # a site in India (UTC+05:30): the data hour 08:00-09:00 UTC is 13:30-14:30 there;
        # a period without an offset is the site's local time, and so is every time shown
        india = tmp_path / "india.yaml"
        india.write_text("site: plant\ntimezone: Asia/Kolkata\n")
        local = ["--from", "2026-03-02T13:30", "--to", "2026-03-02T14:30"]
        res = runner.invoke(app, ["report", "--site-file", str(india), *local])
        assert res.exit_code == 0, res.output
        assert "Period: 2026-03-02 13:30 to 2026-03-02 14:30 Asia/Kolkata" in res.output
        res = runner.invoke(app, ["report", "--site-file", str(india), *local, "--format", "json"])
        doc = orjson.loads(res.output)
        assert doc["kwh"] == 150, doc
        assert doc["period"] == {
            "from": "2026-03-02T13:30:00+05:30",
            "to": "2026-03-02T14:30:00+05:30",
            "timezone": "Asia/Kolkata",
        }
        res = runner.invoke(app, ["report", "--site-file", str(india), *local, "--format", "csv"])
        assert res.output.splitlines()[1].startswith("2026-03-02T13:30:00+05:30,"), res.output
        # an explicit offset is taken as written
        utc = ["--from", "2026-03-02T08:00+00:00", "--to", "2026-03-02T09:00Z"]
        res = runner.invoke(app, ["report", "--site-file", str(india), *utc, "--format", "json"])
        assert orjson.loads(res.output)["kwh"] == 150
    finally:
        asyncio.run(teardown())


async def test_report_on_the_whole_pipeline(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str
) -> None:
    """Simulated meter -> collector -> analytics -> archiver -> report."""
    port = free_port()
    model = LoadModel(
        voltage_v=(230.0, 230.0, 230.0),
        current_a=(10.0, 20.0, 5.0),
        pf=(0.80, 0.90, 0.70),
        noise=0.0,
    )
    s = settings.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
    raw = archiver_site(site_name, batch_size=20, flush_interval_s=0.2).model_dump()
    raw |= {
        "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
        "meters": [
            {"name": "main", "bus": "b1", "unit": 3, "profile": "pmtr001", "interval_s": 0.2}
        ],
    }
    site = parse_site(raw)
    shutdown = Shutdown()

    def named(name: str) -> Settings:
        return s.model_copy(update={"mqtt_client_id": f"{s.mqtt_client_id}-{name}"})

    start = datetime.now(UTC) - timedelta(seconds=1)
    conn = await asyncpg.connect(s.db_dsn)
    try:
        async with running_archiver(named("arch"), site), MeterFleet(port, {3: model}):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(analytics.run(named("ana"), site, shutdown))
                await asyncio.sleep(0.5)
                tg.create_task(collector.run(named("col"), site, shutdown))
                for _ in range(100):
                    await asyncio.sleep(0.1)
                    n = await conn.fetchval(
                        "SELECT count(*) FROM pfm_metrics WHERE energy_s IS NOT NULL"
                    )
                    if n >= 10:
                        break
                shutdown.request("enough data")
            await asyncio.sleep(0.5)
        end = datetime.now(UTC) + timedelta(seconds=1)
        rep = await build_report(conn, site, site_name, start, end)
        # the per-reading rows; analytics' 3 s aggregates (energy_s NULL) carry no energy
        p_sum = await conn.fetchval("SELECT sum(power) FROM pfm_metrics WHERE energy_s IS NOT NULL")
        n = await conn.fetchval("SELECT count(*) FROM pfm_metrics WHERE energy_s IS NOT NULL")
    finally:
        await conn.close()
    assert n >= 10
    # every row stands for one poll interval (0.2 s) of energy
    assert math.isclose(rep.kwh, p_sum * 0.2 / 3600 / 1000, rel_tol=1e-9)
    # magnitude-only meter: reactive energy is unsigned, counted inductive by default
    assert rep.kvarh_cap == 0 and rep.kvarh_ind > 0
    assert math.isclose(rep.pf, expected_pf(model), abs_tol=3e-3)
    assert any("no lead/lag" in note for note in rep.notes)
    (meter,) = rep.meters
    assert meter.meter == "main"
    assert math.isclose(meter.hours_below_alert, n * 0.2 / 3600)
    # site hours count the data in each 15-min window, not whole windows
    assert math.isclose(rep.hours_below(0.97), n * 0.2 / 3600)
    tan2 = math.tan(math.acos(0.97))
    p_kw = max(w.kw for w in rep.windows)  # the worst window is the fullest one
    expected_qc = p_kw * (math.tan(math.acos(expected_pf(model))) - tan2)
    assert math.isclose(rep.qc_worst_kvar, expected_qc, rel_tol=0.02)
