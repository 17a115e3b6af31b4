"""``pfmon report`` on hand-made rows with known answers, through the CLI, and on data
that went simulator -> collector -> analytics -> archiver."""

from __future__ import annotations

import asyncio
import csv
import io
import math
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from typer.testing import CliRunner

from services.analytics import service as analytics
from services.archiver.ingest import RowBuilder, group_rows, write_batch
from services.archiver.migrate import migrate
from services.archiver.report import build_report, pf_svg, render_csv, render_html, render_markdown
from services.collector import service as collector
from services.simulator import LoadModel, MeterFleet, expected_pf
from shared.embedded import free_port
from shared.measurements import Measurement as M
from shared.messages import Metrics
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


async def _load(conn: asyncpg.Connection, msgs: list[Metrics]) -> None:
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
    assert math.isclose(rep.qc_average_kvar, 80 - 150 * tan97)
    assert math.isclose(rep.resonance_order, 5.0)
    assert rep.harmonics == {5: 8.0}  # 3rd (1 %) and 7th (2 %) are below the 3 % bar
    assert any("harmonic 5" in w for w in rep.warnings), rep.warnings
    md = render_markdown(rep)
    assert "| a | 100.00 | 75.00 | 0.00 | 0.800 |" in md
    assert f"**{qc:.1f} kvar**" in md and "harmonic 5" in md
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
    assert not rep.warnings
    assert empty.meters == [] and "no metrics" in empty.warnings[0]
    assert "Warning" in render_markdown(empty)


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
        assert "Power-factor report - plant" in text and "![site PF per 1 min](pf.pf.svg)" in text
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
