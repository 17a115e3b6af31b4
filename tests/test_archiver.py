"""The archiver: energy derivation, idempotent COPY merge, rollups, the service over MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.archiver import rollups
from services.archiver.ingest import RowBuilder, energy_deltas, group_rows, write_batch
from services.archiver.migrate import migrate
from shared import topics
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement as M
from shared.messages import (
    ActuatorState,
    Command,
    Event,
    EventState,
    GatewayStatus,
    LoadKind,
    Metrics,
    Reading,
)
from shared.settings import Settings
from shared.site.archiver import ArchiverConfig
from tests.test_archiver_helpers import (
    archiver_site,
    at,
    metrics_msg,
    publish_all,
    publisher,
    running_archiver,
    schema_dsn,
    wait_for,
)

T0 = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)


def _m(values: dict[M, float], load: LoadKind | None = None, interval: float = 3600) -> Metrics:
    return Metrics(
        site="s",
        meter="m",
        ts=T0,
        seq=1,
        interval_s=interval,
        values=values,
        load={"total": load} if load else {},
    )


def test_energy_deltas_by_iec_quadrant() -> None:
    # columns: import, export, q1, q2, q3, q4, unsigned, apparent (Wh, varh, VAh over 1 h)
    assert energy_deltas(_m({M.POWER: 1000, M.REACTIVE_POWER: 500}), 3600) == (
        1000,
        0,
        500,
        0,
        0,
        0,
        0,
        math.hypot(1000, 500),
    )
    assert energy_deltas(_m({M.POWER: 1000, M.REACTIVE_POWER: -300}), 1800) == (
        500,
        0,
        0,
        0,
        0,
        150,
        0,
        math.hypot(1000, 300) / 2,
    )
    assert energy_deltas(_m({M.POWER: -800, M.REACTIVE_POWER: 600}), 3600)[:6] == (
        0,
        800,
        0,
        600,
        0,
        0,
    )
    assert energy_deltas(_m({M.POWER: -800, M.REACTIVE_POWER: -600}), 3600)[:6] == (
        0,
        800,
        0,
        0,
        600,
        0,
    )
    # magnitude-only meter: |Q| = sqrt(S^2 - P^2), sign unknown
    d = energy_deltas(_m({M.POWER: 800, M.APPARENT_POWER: 1000}), 3600)
    assert d[2:6] == (0, 0, 0, 0) and math.isclose(d[6], 600) and d[7] == 1000
    # ... unless analytics knows the load is capacitive
    d = energy_deltas(_m({M.POWER: 800, M.APPARENT_POWER: 1000}, LoadKind.CAPACITIVE), 3600)
    assert math.isclose(d[5], 600) and d[6] == 0
    assert energy_deltas(_m({M.APPARENT_POWER: 1000}), 3600) == (None,) * 8


def test_metrics_row_uses_the_poll_interval_when_the_message_has_none() -> None:
    builder = RowBuilder(lambda meter: {"m": 0.5}.get(meter, 1.0))
    table, row = builder.row(_m({M.POWER: 3600, M.APPARENT_POWER: 3600}, interval=0))
    assert table == "pfm_metrics"
    from services.archiver.ingest import TABLE_COLUMNS

    rec = dict(zip(TABLE_COLUMNS["pfm_metrics"], row, strict=True))
    assert rec["energy_s"] == 0.5
    assert rec["delta_import_wh"] == 0.5  # 3600 W for 0.5 s
    assert rec["power"] == 3600 and rec["power_factor"] is None and rec["voltage_l1"] is None


def test_aggregate_rows_carry_no_energy() -> None:
    """Analytics' 3 s / 10 min aggregates summarise inputs already stored one by one."""
    from services.archiver.ingest import TABLE_COLUMNS

    builder = RowBuilder(lambda meter: 1.0)
    agg = _m({M.POWER: 3600, M.APPARENT_POWER: 3600}, interval=3).model_copy(
        update={"aggregate": True}
    )
    _, row = builder.row(agg)
    rec = dict(zip(TABLE_COLUMNS["pfm_metrics"], row, strict=True))
    assert rec["interval_s"] == 3 and rec["power"] == 3600
    assert rec["energy_s"] is None and rec["delta_import_wh"] is None


def test_commit_latency_is_labelled_by_kind_with_aggregates_apart() -> None:
    """Aggregates are stamped at their block's end: their latency must not mix with
    the per-input metrics whose ``ts`` is the acquisition time."""
    from services.archiver.service import latency_kind

    assert latency_kind(_m({M.POWER: 1.0})) == "metrics"
    assert latency_kind(_m({M.POWER: 1.0}).model_copy(update={"aggregate": True})) == "aggregate"
    reading = Reading(site="s", meter="m", ts=T0, seq=1, profile="p", values={M.POWER: 1.0})
    assert latency_kind(reading) == "reading"
    status = GatewayStatus(site="s", gateway="g", ts=T0, seq=1, status="online")
    assert latency_kind(status) == "status"


async def _refreshed(conn: asyncpg.Connection) -> int:
    result = await rollups.refresh(conn)
    assert result is not None and not result.quarantined
    return result.buckets


async def test_rollups_ignore_aggregate_rows(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await migrate(conn, ArchiverConfig())
        builder = RowBuilder(lambda meter: 1.0)
        per_input = [metrics_msg("s", "m", at(T0, t), t, 100.0, 125.0) for t in range(60)]
        aggregate = _m({M.POWER: 9999.0, M.APPARENT_POWER: 9999.0}, interval=3)
        aggregate = aggregate.model_copy(
            update={"ts": at(T0, 30), "seq": 10_000, "aggregate": True}
        )
        rows = [builder.row(m) for m in [*per_input, aggregate]]
        await write_batch(conn, group_rows(rows), mark_dirty=True, staged=set())
        await rollups.refresh(conn)
        r = await conn.fetchrow("SELECT * FROM pfm_metrics_1m WHERE ts = $1", T0)
        assert r["samples"] == 60 and r["power"] == 100.0 and r["power_max"] == 100.0
        assert math.isclose(r["delta_import_wh"], 60 * 100.0 / 3600)
    finally:
        await conn.close()


async def test_an_overflowing_bucket_is_quarantined_and_the_rest_roll_up(
    db_dsn: str, db_schema: str
) -> None:
    """Two valid rows whose sum overflows a float8 (power_l1 = 1e308), put straight into
    pfm_metrics: that bucket is parked with the server's message; the other meters'
    1-minute rows appear and the dirty marks drain, now and at the next refresh."""
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await migrate(conn, ArchiverConfig())
        builder = RowBuilder(lambda meter: 1.0)
        good = [
            metrics_msg("s", meter, at(T0, t), t, 100.0, 125.0)
            for meter in ("a", "z")
            for t in range(60)
        ]
        await write_batch(
            conn, group_rows(builder.row(m) for m in good), mark_dirty=True, staged=set()
        )
        for seq in (1, 2):
            await conn.execute(
                "INSERT INTO pfm_metrics (site, meter, ts, seq, interval_s, energy_s, power_l1)"
                " VALUES ('s', 'bad', $1, $2, 1, 1, 1e308)",
                at(T0, seq),
                seq,
            )
        await conn.execute("INSERT INTO pfm_rollup_dirty VALUES ('s', 'bad', $1)", T0)
        result = await rollups.refresh(conn)
        assert result is not None and result.buckets == 3
        assert [(q.meter, q.ts) for q in result.quarantined] == [("bad", T0)]
        assert "out of range" in result.quarantined[0].reason
        assert "SQLSTATE 22003" in result.quarantined[0].reason
        rows = await conn.fetch("SELECT meter, samples FROM pfm_metrics_1m ORDER BY meter")
        assert [tuple(r) for r in rows] == [("a", 60), ("z", 60)]
        assert await conn.fetchval("SELECT count(*) FROM pfm_rollup_dirty") == 0
        parked = await conn.fetchrow("SELECT meter, ts, reason FROM pfm_rollup_quarantine")
        assert parked["meter"] == "bad" and "overflow" in parked["reason"]
        # the next minute: the good meters go on; the bad bucket, marked again, stays parked
        more = [metrics_msg("s", m, at(T0, 60 + t), 60 + t, 1.0, 2.0) for m in "az" for t in (0, 1)]
        await write_batch(
            conn, group_rows(builder.row(m) for m in more), mark_dirty=True, staged=set()
        )
        await conn.execute("INSERT INTO pfm_rollup_dirty VALUES ('s', 'bad', $1)", T0)
        result = await rollups.refresh(conn)
        assert result is not None and result.buckets == 3 and len(result.quarantined) == 1
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics_1m") == 4
        assert await conn.fetchval("SELECT sum(samples) FROM pfm_metrics_15m") == 124
        assert await conn.fetchval("SELECT count(*) FROM pfm_rollup_dirty") == 0
        # once the bad rows are fixed, the bucket rolls up and leaves the quarantine
        await conn.execute("UPDATE pfm_metrics SET power_l1 = 1 WHERE meter = 'bad'")
        await conn.execute("INSERT INTO pfm_rollup_dirty VALUES ('s', 'bad', $1)", T0)
        assert await _refreshed(conn) == 1
        assert await conn.fetchval("SELECT count(*) FROM pfm_rollup_quarantine") == 0
        assert await conn.fetchval("SELECT samples FROM pfm_metrics_1m WHERE meter = 'bad'") == 2
    finally:
        await conn.close()


@pytest.mark.timeout(60)
async def test_the_service_keeps_rolling_up_past_an_overflowing_bucket(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str
) -> None:
    """The issue as seen from outside: one reading with power_l1 = 1e308 used to stop
    every meter's 1-minute rollups for good; now the other meters' minutes keep coming,
    the dirty marks drain, and the bad bucket is logged, counted and parked."""
    s = settings.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
    site = archiver_site(site_name, batch_size=20, flush_interval_s=0.1, rollup_interval_s=0.2)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    conn = await asyncpg.connect(s.db_dsn)
    try:
        async with running_archiver(s, site) as arch, publisher(s, site_name) as bus:
            for seq in (1, 2):  # straight into the table: the entry bound is not the point
                await conn.execute(
                    "INSERT INTO pfm_metrics (site, meter, ts, seq, interval_s, energy_s,"
                    " power_l1) VALUES ($1, 'm9', $2, $3, 1, 1, 1e308)",
                    site_name,
                    at(minute, seq),
                    seq,
                )
            await conn.execute(
                "INSERT INTO pfm_rollup_dirty VALUES ($1, 'm9', $2)", site_name, minute
            )
            items = [
                (
                    topics.metrics(site_name, m),
                    metrics_msg(site_name, m, at(minute, i), i, 1.0, 2.0),
                )
                for m in ("m1", "m2")
                for i in range(10)
            ]
            await publish_all(bus, items)

            async def rolled_up() -> bool:
                n = await conn.fetchval(
                    "SELECT coalesce(sum(samples), 0) FROM pfm_metrics_1m WHERE meter <> 'm9'"
                )
                dirty = await conn.fetchval("SELECT count(*) FROM pfm_rollup_dirty")
                return bool(n == 20 and dirty == 0 and arch.m.rollup_quarantined._value.get())

            await wait_for(rolled_up, timeout=30)
            assert arch.m.db_errors.labels("rollup")._value.get() == 0
        parked = await conn.fetch("SELECT meter, ts FROM pfm_rollup_quarantine")
        assert [tuple(r) for r in parked] == [("m9", minute)]
    finally:
        await conn.close()


async def test_merge_is_idempotent(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await migrate(conn, ArchiverConfig())
        builder = RowBuilder(lambda meter: 1.0)
        msgs = [metrics_msg("s", "m", at(T0, i), i, 1000 + i, 1250 + i) for i in range(10)]
        rows = [builder.row(m) for m in msgs]
        staged: set[str] = set()
        first = await write_batch(conn, group_rows(rows), mark_dirty=True, staged=staged)
        assert first.inserted == {"pfm_metrics": 10}
        assert first.merged == set()  # all new: copied straight into the table
        # the same rows again, plus duplicates inside one batch: nothing new
        again = await write_batch(conn, group_rows(rows + rows[:3]), mark_dirty=True, staged=staged)
        assert again.inserted == {"pfm_metrics": 0} and again.offered == {"pfm_metrics": 13}
        assert again.merged == {"pfm_metrics"}
        got = await conn.fetch("SELECT seq, power, apparent_power FROM pfm_metrics ORDER BY seq")
        assert [(r["seq"], r["power"], r["apparent_power"]) for r in got] == [
            (i, 1000 + i, 1250 + i) for i in range(10)
        ]
        assert await conn.fetchval("SELECT count(*) FROM pfm_rollup_dirty") == 1
    finally:
        await conn.close()


async def test_new_rows_and_merged_rows_mark_the_same_buckets(db_dsn: str, db_schema: str) -> None:
    """A batch of new rows (straight COPY) and one with a re-delivered row (staging
    merge) mark exactly the 1-minute buckets, per meter, that the database's date_bin
    gives their rows."""
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await migrate(conn, ArchiverConfig())
        builder = RowBuilder(lambda meter: 1.0)
        start = at(T0, -0.5)  # 11:59:59.5: the batch straddles minutes
        new = [
            builder.row(metrics_msg("s", f"m{i % 2}", at(start, 17 * i), i, 1000, 1250))
            for i in range(10)
        ]
        first = await write_batch(conn, group_rows(new), mark_dirty=True, staged=set())
        assert first.merged == set() and first.inserted == {"pfm_metrics": 10}
        wanted = await conn.fetch(
            "SELECT DISTINCT site, meter, date_bin('1 minute', ts,"
            " TIMESTAMPTZ '2000-01-03 00:00:00+00') AS ts FROM pfm_metrics ORDER BY 1, 2, 3"
        )
        marked = await conn.fetch("SELECT site, meter, ts FROM pfm_rollup_dirty ORDER BY 1, 2, 3")
        assert len(wanted) == 7 and [tuple(r) for r in marked] == [tuple(r) for r in wanted]
        await conn.execute("DELETE FROM pfm_rollup_dirty")
        later = builder.row(metrics_msg("s", "m0", at(start, 200), 10, 1000, 1250))
        second = await write_batch(conn, group_rows([new[0], later]), mark_dirty=True, staged=set())
        assert second.merged == {"pfm_metrics"} and second.inserted == {"pfm_metrics": 1}
        marked = await conn.fetch("SELECT site, meter, ts FROM pfm_rollup_dirty ORDER BY 1, 2, 3")
        assert [tuple(r) for r in marked] == [
            ("s", "m0", T0 - timedelta(minutes=1)),
            ("s", "m0", T0 + timedelta(minutes=3)),
        ]
    finally:
        await conn.close()


async def test_moving_averages_are_not_archived(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await migrate(conn, ArchiverConfig())
        msg = metrics_msg("s", "m", T0, 1, 1000, 1250)
        msg.averages = {"60s": {M.POWER: 990.0}}
        msg.load = {"total": LoadKind.INDUCTIVE}
        row = RowBuilder(lambda meter: 1.0).row(msg)
        await write_batch(conn, group_rows([row]), mark_dirty=True, staged=set())
        got = await conn.fetchrow("SELECT power, averages, load FROM pfm_metrics")
        assert got["power"] == 1000 and got["averages"] is None
        assert got["load"] is not None and "inductive" in got["load"]
    finally:
        await conn.close()


async def test_rollups_match_the_raw_rows(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await migrate(conn, ArchiverConfig())
        builder = RowBuilder(lambda meter: 1.0)
        # 3 minutes at 1 Hz, P = t (seconds since T0), S = 2 t + 1
        msgs = [metrics_msg("s", "m", at(T0, t), t, float(t), 2.0 * t + 1) for t in range(180)]
        staged: set[str] = set()
        await write_batch(
            conn, group_rows(builder.row(m) for m in msgs), mark_dirty=True, staged=staged
        )
        assert await _refreshed(conn) == 3
        one = await conn.fetch("SELECT * FROM pfm_metrics_1m ORDER BY ts")
        assert [r["ts"] for r in one] == [at(T0, 0), at(T0, 60), at(T0, 120)]
        for k, r in enumerate(one):
            assert r["samples"] == 60
            assert math.isclose(r["power"], 60 * k + 29.5)
            assert r["power_min"] == 60 * k and r["power_max"] == 60 * k + 59
            # energy: sum of P * 1 s / 3600
            assert math.isclose(r["delta_import_wh"], sum(range(60 * k, 60 * k + 60)) / 3600)
        q = await conn.fetchrow("SELECT * FROM pfm_metrics_15m")
        assert q["ts"] == T0 and q["samples"] == 180
        assert math.isclose(q["power"], 89.5) and q["power_max"] == 179
        assert math.isclose(q["apparent_power"], 2 * 89.5 + 1)
        h = await conn.fetchrow("SELECT * FROM pfm_metrics_1h")
        assert h["ts"] == T0 and h["samples"] == 180 and math.isclose(h["power"], 89.5)
        # a late row for the first minute updates every level
        late = metrics_msg("s", "m", at(T0, 30.5), 999, 10_000.0, 20_000.0)
        await write_batch(conn, group_rows([builder.row(late)]), mark_dirty=True, staged=staged)
        assert await _refreshed(conn) == 1
        assert await _refreshed(conn) == 0
        first = await conn.fetchrow("SELECT * FROM pfm_metrics_1m WHERE ts = $1", T0)
        assert first["samples"] == 61
        assert math.isclose(first["power"], (sum(range(60)) + 10_000) / 61)
        h = await conn.fetchrow("SELECT * FROM pfm_metrics_1h")
        assert h["samples"] == 181
        assert math.isclose(h["power"], (sum(range(180)) + 10_000) / 181)
        assert h["power_max"] == 10_000
    finally:
        await conn.close()


async def test_service_stores_every_kind_once(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str
) -> None:
    settings = settings.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
    site = archiver_site(site_name, batch_size=20, flush_interval_s=0.2, rollup_interval_s=0.5)
    now = datetime.now(UTC)
    items: list = []
    for i in range(60):
        meter = f"m{i % 3}"
        m = metrics_msg(site_name, meter, at(now, i // 3), i // 3, 1000.0 + i, 1250.0)
        items.append((topics.metrics(site_name, meter), m))
    for i in range(5):
        ev = Event(
            site=site_name,
            meter="m0",
            ts=at(now, i),
            seq=i,
            code="low_pf",
            state=EventState.RAISED if i % 2 == 0 else EventState.CLEARED,
            evidence={"pf": 0.8, "threshold": 0.9},
        )
        items.append((topics.event(site_name, "m0"), ev))
    for i in range(3):
        cmd = Command(
            site=site_name,
            device="bank1",
            ts=at(now, i),
            seq=i,
            address=i,
            value=1,
            reason="pf 0.82 below 0.95",
            origin="bank:main",
            trigger={"pf": 0.82},
        )
        items.append((topics.command(site_name, "bank1"), cmd))
    st = ActuatorState(
        site=site_name, device="bank1", ts=now, seq=1, online=True, coils={0: True}, steps_in=[0]
    )
    items.append((topics.state(site_name, "bank1"), st))
    gw = GatewayStatus(site=site_name, gateway="gw1", ts=now, seq=1, status="online")
    items.append((topics.gateway_status(site_name, "gw1"), gw))
    rd = Reading(
        site=site_name, meter="m0", ts=now, seq=7, profile="pmtr001", values={M.VOLTAGE_L1: 231.5}
    )
    items.append((topics.reading(site_name, "m0"), rd))

    conn = await asyncpg.connect(settings.db_dsn)
    try:
        async with running_archiver(settings, site) as arch, publisher(settings, site_name) as bus:
            await publish_all(bus, items)
            # a payload that is not a Metrics: dead-lettered, nothing else disturbed
            await bus.publish(topics.metrics(site_name, "m0"), b'{"not": "metrics"}')
            # a value PostgreSQL refuses (jsonb holds no NUL; a seq beyond bigint no longer
            # passes the schema): that row only is dropped
            bad = metrics_msg(site_name, "m9", now, 9, 1.0, 1.0)
            bad.load = {"\x00": LoadKind.UNKNOWN}
            await bus.publish(topics.metrics(site_name, "m9"), bad)
            await publish_all(bus, items)  # everything delivered twice

            async def all_there() -> bool:
                n = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
                rejected = arch.m.db_errors.labels("rejected")._value.get()
                return bool(
                    n == 60
                    and rejected >= 1
                    and arch.m.duplicates.labels("pfm_metrics")._value.get() >= 60
                )

            await wait_for(all_there)
            # rollups follow
            await wait_for(
                lambda: _fetchval(conn, "SELECT coalesce(sum(samples), 0) FROM pfm_metrics_1m"),
            )
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics") == 60
        assert await conn.fetchval("SELECT count(DISTINCT (meter, ts, seq)) FROM pfm_metrics") == 60
        assert await conn.fetchval("SELECT count(*) FROM pfm_events") == 5
        ev = await conn.fetchrow("SELECT * FROM pfm_events WHERE seq = 1")
        assert ev["state"] == "cleared" and '"threshold": 0.9' in ev["evidence"]
        assert await conn.fetchval("SELECT count(*) FROM pfm_commands") == 3
        cmd = await conn.fetchrow("SELECT * FROM pfm_commands WHERE seq = 2")
        assert cmd["reason"] == "pf 0.82 below 0.95" and cmd["origin"] == "bank:main"
        status = await conn.fetch("SELECT kind, device, online FROM pfm_device_status ORDER BY 1")
        assert [tuple(r) for r in status] == [("actuator", "bank1", True), ("gateway", "gw1", True)]
        reading = await conn.fetchrow("SELECT * FROM pfm_readings")
        assert reading["seq"] == 7 and '"voltage_l1": 231.5' in reading["data"]
        total = await conn.fetchval("SELECT sum(power) FROM pfm_metrics")
        assert total == sum(1000.0 + i for i in range(60))
        assert await conn.fetchval("SELECT sum(samples) FROM pfm_metrics_1m") == 60
        assert arch.m.rows.labels("pfm_metrics")._value.get() == 60
        assert arch.m.rows.labels("pfm_events")._value.get() == 5
        assert arch.m.batches._value.get() >= 4
        assert arch.metrics.deadletters.labels("archiver", "metrics")._value.get() == 1
        assert 0 <= arch._lag() < 120
        latency = arch.m.commit_latency_by_kind
        # every delivery is observed once it is committed (duplicates too), by kind
        assert _count(latency["event"]) == 10
        assert _count(latency["command"]) == 6 and _count(latency["reading"]) == 2
        assert _count(latency["metrics"]) >= 120 and _count(latency["aggregate"]) == 0
        text = arch.metrics.exposition().decode()
        for name in (
            "pfm_archiver_rows_total",
            "pfm_archiver_batches_total",
            "pfm_archiver_lag_seconds",
            "pfm_archiver_buffer_records",
            "pfm_archiver_spill_records",
            "pfm_archiver_flush_seconds_bucket",
            "pfm_archiver_db_errors_total",
            'pfm_archiver_commit_latency_seconds_bucket{kind="metrics",le="2.0"}',
        ):
            assert name in text, name
        promtool = shutil.which("promtool")
        if promtool:
            res = await asyncio.to_thread(
                subprocess.run,
                [promtool, "check", "metrics"],
                input=text,
                capture_output=True,
                text=True,
            )
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        await conn.close()


def _count(child: Any) -> float:
    """Observations of one histogram child (the sum of its non-cumulative buckets)."""
    return float(sum(bucket.get() for bucket in child._buckets))


async def _fetchval(conn: asyncpg.Connection, sql: str) -> bool:
    return bool(await conn.fetchval(sql) == 60)


@pytest.mark.timeout(90)
async def test_two_archivers_share_the_load(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str
) -> None:
    """MQTT v5 shared subscription: each message goes to one archiver, stored once."""
    base = settings.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
    site = archiver_site(site_name, batch_size=50, flush_interval_s=0.2, share_group="archiver")
    a = base.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-a"})
    b = base.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-b"})
    now = datetime.now(UTC)
    n = 2000
    items = [
        (
            topics.metrics(site_name, f"m{i % 10}"),
            metrics_msg(site_name, f"m{i % 10}", at(now, i // 10), i, float(i), 2.0 * i + 1),
        )
        for i in range(n)
    ]
    conn = await asyncpg.connect(base.db_dsn)
    try:
        async with (
            running_archiver(a, site) as arch_a,
            running_archiver(b, site) as arch_b,
            publisher(base, site_name) as bus,
        ):
            assert arch_a.bus is not None and arch_a.bus.protocol == "5"
            await publish_all(bus, items)

            async def done() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM pfm_metrics") >= n)

            await wait_for(done, timeout=60)
            await asyncio.sleep(0.5)
        rows_a = arch_a.m.rows.labels("pfm_metrics")._value.get()
        rows_b = arch_b.m.rows.labels("pfm_metrics")._value.get()
        received_a = arch_a.metrics.received.labels("archiver", "metrics")._value.get()
        received_b = arch_b.metrics.received.labels("archiver", "metrics")._value.get()
        assert received_a + received_b == n, "a message went to both archivers (or none)"
        assert received_a > 0 and received_b > 0, "the load was not shared"
        assert rows_a + rows_b == n
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics") == n
        assert await conn.fetchval("SELECT sum(seq) FROM pfm_metrics") == n * (n - 1) // 2
    finally:
        await conn.close()


async def test_database_down_at_start_spills_and_survives_a_restart(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str
) -> None:
    """No database at start: messages spill to disk (acknowledged); a restart with the
    database back drains the spill file - nothing lost, nothing twice."""
    from shared.embedded import free_port

    dead = settings.model_copy(
        update={"db_dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/none"}
    )
    site = archiver_site(site_name, batch_size=10, flush_interval_s=0.1, retry_max_s=0.5)
    now = datetime.now(UTC)
    items = [
        (topics.metrics(site_name, "m"), metrics_msg(site_name, "m", at(now, i), i, i, 2 * i + 1))
        for i in range(40)
    ]
    async with running_archiver(dead, site) as arch, publisher(settings, site_name) as bus:
        await publish_all(bus, items)

        async def spilled() -> bool:
            return len(arch.spool) == 40

        await wait_for(spilled, timeout=20)
        assert arch.m.db_errors.labels("connection")._value.get() >= 1
    good = settings.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
    conn = await asyncpg.connect(good.db_dsn)
    try:
        async with running_archiver(good, site) as arch:

            async def drained() -> bool:
                return len(arch.spool) == 0 and arch.m.rows.labels("pfm_metrics")._value.get() == 40

            await wait_for(drained, timeout=20)
        # acknowledged when spilled, so the broker has nothing to re-deliver: they came
        # from the spill file, kept across the restart
        assert arch.metrics.received.labels("archiver", "metrics")._value.get() == 0
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics") == 40
        assert await conn.fetchval("SELECT sum(seq) FROM pfm_metrics") == sum(range(40))
    finally:
        await conn.close()


def test_bad_archiver_section_lists_every_problem() -> None:
    from shared.errors import ConfigError
    from shared.site import parse_site

    bad = {
        "site": "s",
        "archiver": {
            "batch_size": 0,
            "timescaledb": "maybe",
            "retention": {"readings_days": -1},
            "report": {"tariff": {"demand_k": 1.5}, "bogus": 1},
        },
    }
    try:
        parse_site(bad, "site.yaml")
    except ConfigError as exc:
        text = str(exc) + " " + " ".join(getattr(exc, "problems", []))
    else:
        raise AssertionError("accepted a bad archiver section")
    for where in (
        "archiver.batch_size",
        "archiver.timescaledb",
        "archiver.retention.readings_days",
        "archiver.report.tariff.demand_k",
        "archiver.report.bogus",
    ):
        assert where in text, (where, text)
    try:
        parse_site({"site": "s", "archiver": {"batch_size": 1000, "buffer_max_records": 10}})
    except ConfigError as exc:
        assert "buffer_max_records (10) must be at least batch_size (1000)" in (
            str(exc) + " ".join(getattr(exc, "problems", []))
        )
    else:
        raise AssertionError("accepted a buffer smaller than a batch")


async def test_a_central_archiver_stores_every_site(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str, mosquitto: LocalMosquitto
) -> None:
    """``archiver.sites: all`` (the centre): metrics of every site on the broker are stored.
    A private broker, so that other tests' sites stay out of it."""
    base = settings.model_copy(
        update={"db_dsn": schema_dsn(db_dsn, db_schema), "mqtt_url": mosquitto.url}
    )
    site = archiver_site(
        site_name,
        sites="all",
        batch_size=10,
        flush_interval_s=0.1,
        known={"edge-a": ["main"], "edge-b": ["main"]},
    )
    now = datetime.now(UTC)
    edges = ["edge-a", "edge-b"]
    items = [
        (topics.metrics(edge, "main"), metrics_msg(edge, "main", at(now, i), i, 100.0, 125.0))
        for edge in edges
        for i in range(5)
    ]
    conn = await asyncpg.connect(base.db_dsn)
    try:
        async with running_archiver(base, site), publisher(base, site_name) as bus:
            await publish_all(bus, items)

            async def done() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM pfm_metrics") >= 10)

            await wait_for(done, timeout=30)
        rows = await conn.fetch("SELECT site, count(*) AS n FROM pfm_metrics GROUP BY site")
        assert {r["site"]: r["n"] for r in rows} == {"edge-a": 5, "edge-b": 5}
    finally:
        await conn.close()


async def _restart_broker_and_archiver(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, share_group: str | None
) -> tuple[int, int]:
    """Archiver up; broker stops; archiver stops; broker starts; N messages published;
    archiver starts again. Returns (published, stored)."""
    site = archiver_site(site_name, batch_size=50, flush_interval_s=0.1, share_group=share_group)
    now = datetime.now(UTC)
    n = 200
    items = [
        (
            topics.metrics(site_name, f"m{i % 4}"),
            metrics_msg(site_name, f"m{i % 4}", at(now, i), i, 1.0, 2.0),
        )
        for i in range(n)
    ]
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        async with running_archiver(settings, site) as arch:
            assert arch.bus is not None and arch.bus.protocol == "5"
            await asyncio.to_thread(mosquitto.stop)
        await asyncio.to_thread(mosquitto.start)
        async with publisher(settings, site_name) as bus:
            await publish_all(bus, items)
        await asyncio.sleep(1.0)  # the archiver comes back later
        async with running_archiver(settings, site) as arch:

            async def done() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM pfm_metrics") >= n)

            with contextlib.suppress(AssertionError):
                await wait_for(done, timeout=10)
        return n, int(await conn.fetchval("SELECT count(*) FROM pfm_metrics"))
    finally:
        await conn.close()


@pytest.mark.timeout(90)
async def test_a_single_archiver_loses_nothing_across_a_broker_restart(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str, mosquitto: LocalMosquitto
) -> None:
    """The default (no share group): a plain persistent subscription, which the broker
    restores from its persistence file, so messages published after a broker restart,
    while the archiver is still away, are delivered when it comes back."""
    base = settings.model_copy(
        update={"db_dsn": schema_dsn(db_dsn, db_schema), "mqtt_url": mosquitto.url}
    )
    assert ArchiverConfig().share_group is None
    sent, stored = await _restart_broker_and_archiver(base, site_name, mosquitto, None)
    assert stored == sent


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_share_group_on_this_broker(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str, mosquitto: LocalMosquitto
) -> None:
    """What holds with ``share_group`` on the broker of this machine (Mosquitto 2.0.11):
    while the broker runs, messages published when every archiver of the group is away
    are kept for them; across a broker restart they are NOT (the broker does not restore
    ``$share`` subscriptions from its persistence file) - hence no share group by default."""
    base = settings.model_copy(
        update={"db_dsn": schema_dsn(db_dsn, db_schema), "mqtt_url": mosquitto.url}
    )
    site = archiver_site(site_name, batch_size=50, flush_interval_s=0.1, share_group="archiver")
    a = base.model_copy(update={"mqtt_client_id": f"{base.mqtt_client_id}-a"})
    b = base.model_copy(update={"mqtt_client_id": f"{base.mqtt_client_id}-b"})
    now = datetime.now(UTC)
    items = [
        (topics.metrics(site_name, "m1"), metrics_msg(site_name, "m1", at(now, i), i, 1.0, 2.0))
        for i in range(100)
    ]
    conn = await asyncpg.connect(base.db_dsn)
    try:
        async with running_archiver(a, site), running_archiver(b, site):
            pass  # both sessions and their $share subscriptions exist; both go away
        async with publisher(base, site_name) as bus:
            await publish_all(bus, items)
        async with running_archiver(a, site), running_archiver(b, site):

            async def done() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM pfm_metrics") >= 100)

            await wait_for(done, timeout=20)
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics") == 100
        await conn.execute("TRUNCATE pfm_metrics")
    finally:
        await conn.close()
    sent, stored = await _restart_broker_and_archiver(a, site_name, mosquitto, "archiver")
    if mosquitto_version() == "2.0.11":
        assert stored == 0 and sent > 0, "this broker now restores $share subscriptions"


def mosquitto_version() -> str | None:
    exe = shutil.which("mosquitto")
    if exe is None:
        return None
    out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10).stdout
    first = out.splitlines()[0] if out else ""
    return first.rsplit(" ", 1)[-1] if first.startswith("mosquitto version") else None
