"""Migrations: plain PostgreSQL path in full, TimescaleDB detection and statement shape."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import asyncpg
import pytest

from services.archiver import timescale
from services.archiver.columns import ROLLUPS, rollup_columns
from services.archiver.migrate import MIGRATIONS_TABLE, PLAIN, TIMESCALE, migrate, plan
from shared.errors import ConfigError
from shared.measurements import Measurement
from shared.site.archiver import ArchiverConfig, RetentionConfig
from tests.test_archiver_helpers import schema_dsn

TABLES = {"pfm_readings", "pfm_metrics", "pfm_events", "pfm_commands", "pfm_device_status"}


async def _snapshot(conn: asyncpg.Connection) -> list[tuple[str, ...]]:
    cols = await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() ORDER BY 1, 2"
    )
    idx = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1"
    )
    return [tuple(r) for r in cols] + [tuple(r) for r in idx]


async def _extension_available(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
    )


async def test_plain_schema_is_created_once(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        if await _extension_available(conn):
            pytest.skip("this PostgreSQL has timescaledb: the plain path is not the default")
        first = await migrate(conn, ArchiverConfig())
        assert first.flavour == PLAIN
        assert first.applied == ["0001_base", "0002_rollups.plain", "0003_natural_keys.plain"]
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        }
        assert TABLES | set(ROLLUPS) | {"pfm_schema_migrations", "pfm_rollup_quarantine"} <= tables
        metric_cols = {
            r["column_name"]: r["data_type"]
            for r in await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'pfm_metrics'"
            )
        }
        for m in Measurement:
            assert metric_cols.get(m.value) == "double precision", m
        for name in ROLLUPS:
            roll = {
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = $1",
                    name,
                )
            }
            assert {"ts", "site", "meter", "samples"} | {c.name for c in rollup_columns()} <= roll
        brin = await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema()"
            " AND indexdef LIKE '%USING brin%'"
        )
        assert brin >= 5
        before = await _snapshot(conn)
        second = await migrate(conn, ArchiverConfig())
        assert second.applied == [] and second.added_columns == []
        assert await _snapshot(conn) == before
        assert await conn.fetchval("SELECT count(*) FROM pfm_schema_migrations") == 3
    finally:
        await conn.close()


async def test_concurrent_starts_do_not_race(db_dsn: str, db_schema: str) -> None:
    dsn = schema_dsn(db_dsn, db_schema)
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c, ArchiverConfig()) for c in conns))
        applied = [name for r in results for name in r.applied]
        assert sorted(applied) == sorted(set(applied)), "a migration ran twice"
        assert len(applied) == 3
        rows = await conns[0].fetch("SELECT name FROM pfm_schema_migrations ORDER BY name")
        assert [r["name"] for r in rows] == [
            "0001_base",
            "0002_rollups.plain",
            "0003_natural_keys.plain",
        ]
    finally:
        for c in conns:
            await c.close()


async def test_walking_skeleton_table_is_upgraded(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        await conn.execute(
            "CREATE TABLE pfm_metrics (site text NOT NULL, meter text NOT NULL,"
            " ts timestamptz NOT NULL, seq bigint NOT NULL, interval_s double precision NOT NULL,"
            " power_w double precision, data jsonb NOT NULL, PRIMARY KEY (site, meter, ts, seq))"
        )
        await migrate(conn, ArchiverConfig())
        await conn.execute(
            "INSERT INTO pfm_metrics (site, meter, ts, seq, interval_s, power_factor)"
            " VALUES ('s', 'm', now(), 1, 1, 0.9)"
        )
        assert await conn.fetchval("SELECT power_factor FROM pfm_metrics") == 0.9
    finally:
        await conn.close()


async def test_an_archive_with_reused_seqs_is_upgraded(db_dsn: str, db_schema: str) -> None:
    """Rows written before the natural keys that break them: the first of each is kept,
    the others go, and their rollup buckets are marked for a refresh."""
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        if await _extension_available(conn):
            pytest.skip("this PostgreSQL has timescaledb: the plain path is not the default")
        await conn.execute(MIGRATIONS_TABLE)
        for step in plan(PLAIN, ArchiverConfig())[:2]:
            await conn.execute(step.sql[0])
            await conn.execute(
                "INSERT INTO pfm_schema_migrations(name, checksum, flavour) VALUES ($1,$2,$3)",
                step.name,
                step.checksum,
                PLAIN,
            )
        insert = (
            "INSERT INTO pfm_metrics (site, meter, ts, seq, interval_s, source_seq, energy_s,"
            " power) VALUES ('s', 'm', TIMESTAMPTZ '2026-03-02 12:00:00+00' + $1 * INTERVAL"
            " '1 second', $2, 0, $3, 1, $4)"
        )
        await conn.execute(insert, 0, 1, 10, 100.0)
        await conn.execute(insert, 90, 1, 11, 999.0)  # seq 1 again, another minute
        await conn.execute(insert, 1, 2, 12, 100.0)
        await conn.execute(insert, 2, 3, 12, 555.0)  # input 12 re-analysed (new seq)
        await conn.execute(
            "INSERT INTO pfm_readings (site, meter, ts, seq, profile, data)"
            " VALUES ('s', 'm', now(), 5, 'p', '{}'), ('s', 'm', now() + INTERVAL '1 h', 5,"
            " 'p', '{}')"
        )
        result = await migrate(conn, ArchiverConfig())
        assert result.applied == ["0003_natural_keys.plain"]
        rows = await conn.fetch("SELECT seq, power FROM pfm_metrics ORDER BY seq")
        assert [tuple(r) for r in rows] == [(1, 100.0), (2, 100.0)]
        assert await conn.fetchval("SELECT count(*) FROM pfm_readings") == 1
        dirty = await conn.fetch("SELECT ts FROM pfm_rollup_dirty ORDER BY ts")
        assert [r["ts"].minute for r in dirty] == [0, 1]
    finally:
        await conn.close()


async def test_detection_chooses_plain_postgresql_here(db_dsn: str, db_schema: str) -> None:
    conn = await asyncpg.connect(schema_dsn(db_dsn, db_schema))
    try:
        if await _extension_available(conn):
            pytest.skip("timescaledb is installable on this PostgreSQL")
        assert await timescale.detect(conn, "auto") is None
        assert await timescale.detect(conn, "off") is None
        with pytest.raises(ConfigError, match="timescaledb"):
            await timescale.detect(conn, "on")
        with pytest.raises(ConfigError):
            await migrate(conn, ArchiverConfig(timescaledb="on"))
        # nothing half-applied
        assert await conn.fetchval("SELECT count(*) FROM pfm_schema_migrations") == 0
    finally:
        await conn.close()


class _TimescaleInstalledNotPreloaded(asyncpg.Connection):
    """A real connection to this (TimescaleDB-less) PostgreSQL whose catalogue says what a
    site's says after installing the package without running timescaledb-tune: the
    extension is available, and (``preload`` set) the server preloads it or not. Every
    other query, and every statement, goes to the real server; statements are recorded."""

    preload: str | None = None  # None: the real setting (empty here)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: list[str] = []

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if "pg_available_extensions" in query:
            return "2.14.2"
        if "shared_preload_libraries" in query and self.preload is not None:
            return self.preload
        return await super().fetchval(query, *args, **kwargs)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        self.statements.append(query)
        return await super().execute(query, *args, **kwargs)


class _TimescalePreloaded(_TimescaleInstalledNotPreloaded):
    preload = "pg_stat_statements, 'timescaledb'"


async def test_timescaledb_available_but_not_preloaded(
    db_dsn: str, db_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """auto: plain PostgreSQL with one warning naming the setting, no CREATE EXTENSION
    (the server would refuse it and close the connection); on: a ConfigError saying so."""
    conn = await asyncpg.connect(
        schema_dsn(db_dsn, db_schema), connection_class=_TimescaleInstalledNotPreloaded
    )
    try:
        assert isinstance(conn, _TimescaleInstalledNotPreloaded)
        if await timescale.preloaded(conn):
            pytest.skip("this PostgreSQL preloads timescaledb")
        with pytest.raises(ConfigError, match="shared_preload_libraries") as err:
            await timescale.detect(conn, "on")
        assert "timescaledb-tune" in str(err.value) and "2.14.2" in str(err.value)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="services.archiver.timescale"):
            result = await migrate(conn, ArchiverConfig(timescaledb="auto"))
        assert result.flavour == PLAIN and result.timescale_version is None
        assert "0003_natural_keys.plain" in result.applied
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "shared_preload_libraries" in warnings[0] and "timescaledb-tune" in warnings[0]
        assert not [q for q in conn.statements if "CREATE EXTENSION" in q]
        # the archive works on that connection: it was never closed by a refused statement
        assert not conn.is_closed()
        assert await conn.fetchval("SELECT count(*) FROM pfm_schema_migrations") == 3
    finally:
        await conn.close()


async def test_timescaledb_preloaded_is_created(db_dsn: str, db_schema: str) -> None:
    """With the library preloaded, auto goes on to CREATE EXTENSION (which this server,
    having no TimescaleDB files, refuses with its own message)."""
    conn = await asyncpg.connect(
        schema_dsn(db_dsn, db_schema), connection_class=_TimescalePreloaded
    )
    try:
        assert await timescale.preloaded(conn) is True
        with pytest.raises(asyncpg.PostgresError, match="timescaledb"):
            await timescale.detect(conn, "auto")
        assert [q for q in conn.statements if "CREATE EXTENSION" in q]
    finally:
        await conn.close()


def test_plans_differ_only_in_rollups() -> None:
    plain = [m.name for m in plan(PLAIN, ArchiverConfig())]
    ts = [m.name for m in plan(TIMESCALE, ArchiverConfig())]
    assert plain == ["0001_base", "0002_rollups.plain", "0003_natural_keys.plain"]
    assert ts == ["0001_base", "0002_rollups.timescale", "0003_natural_keys.timescale"]
    sql = "\n".join(plan(PLAIN, ArchiverConfig())[1].sql)
    assert "timescaledb" not in sql.replace("timescaledb extension", "")
    assert "create_hypertable" not in sql and "time_bucket" not in sql


def test_timescale_schema_statements_shape() -> None:
    stmts = timescale.schema_statements(chunk_interval_hours=6)
    hyper = [s for s in stmts if s.startswith("SELECT create_hypertable(")]
    assert {re.search(r"create_hypertable\('(\w+)', 'ts'", s).group(1) for s in hyper} == set(
        timescale.HYPERTABLES
    )
    for s in hyper:
        assert "chunk_time_interval => INTERVAL '21600 seconds'" in s
        assert "if_not_exists => TRUE" in s and "migrate_data => TRUE" in s
    compress = [s for s in stmts if "timescaledb.compress" in s]
    assert len(compress) == 2
    assert all("compress_segmentby = 'site, meter'" in s for s in compress)
    caggs = [s for s in stmts if s.startswith("CREATE MATERIALIZED VIEW")]
    assert [re.search(r"VIEW (\w+)\n", s).group(1) for s in caggs] == list(ROLLUPS)
    for s, width in zip(caggs, ROLLUPS.values(), strict=True):
        assert "WITH (timescaledb.continuous" in s
        assert s.rstrip().endswith("WITH NO DATA")  # can run inside the migration transaction
        assert f"time_bucket(INTERVAL '{width}', ts) AS ts" in s
        assert f"GROUP BY time_bucket(INTERVAL '{width}', ts), site, meter" in s
        assert "FROM pfm_metrics" in s
        for m in Measurement:
            assert re.search(rf"\({m.value}\) AS {m.value}\b", s), m
        assert "sum(delta_q1_varh) AS delta_q1_varh" in s
        assert "min(power_factor) AS power_factor_min" in s
    # hypertables before anything that needs them
    assert stmts.index(hyper[-1]) < stmts.index(compress[0]) < stmts.index(caggs[0])


def test_timescale_policy_statements_follow_the_config() -> None:
    ret = RetentionConfig(readings_days=3, metrics_days=365, compress_after_days=2)
    stmts = timescale.policy_statements(ret)
    joined = "\n".join(stmts)
    assert (
        "SELECT add_retention_policy('pfm_readings', drop_after => INTERVAL '259200 seconds')"
        in stmts
    )
    assert (
        "SELECT add_retention_policy('pfm_metrics', drop_after => INTERVAL '31536000 seconds')"
        in stmts
    )
    # events kept forever by default: the old policy is removed, none added
    assert "remove_retention_policy('pfm_events', if_exists => TRUE)" in joined
    assert "add_retention_policy('pfm_events'" not in joined
    assert joined.count("add_compression_policy(") == 2
    assert "compress_after => INTERVAL '172800 seconds'" in joined
    for name in ROLLUPS:
        assert f"add_continuous_aggregate_policy('{name}', start_offset => INTERVAL" in joined
    assert timescale.policy_checksum(ret) != timescale.policy_checksum(RetentionConfig())
    assert timescale.policy_checksum(ret) == timescale.policy_checksum(
        RetentionConfig(readings_days=3, metrics_days=365, compress_after_days=2)
    )
