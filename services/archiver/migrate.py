"""Versioned SQL migrations, applied at start under an advisory lock.

``migrations/NNNN_name.sql`` apply everywhere, ``NNNN_name.plain.sql`` only on plain
PostgreSQL; on TimescaleDB the steps ``NNNN_name.timescale`` come from
:func:`services.archiver.timescale.steps` instead. Each applied step is recorded in
``pfm_schema_migrations`` (name, checksum, flavour): a second start changes nothing,
and two archivers starting together serialise on ``pg_advisory_lock`` (keyed by the
schema) so the second finds everything done.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from importlib import resources

import asyncpg

from services.archiver import timescale
from services.archiver.columns import ENERGY_COLUMNS, ROLLUPS, measurement_columns, rollup_columns
from shared.site.archiver import ArchiverConfig

log = logging.getLogger(__name__)

PLAIN = "postgresql"
TIMESCALE = "timescaledb"

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS pfm_schema_migrations (
    name text PRIMARY KEY,
    checksum text NOT NULL,
    flavour text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
POLICIES = "timescale-policies"


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: tuple[str, ...]  # one or more statements, run in one transaction

    @property
    def checksum(self) -> str:
        return hashlib.sha256("\n;\n".join(self.sql).encode()).hexdigest()[:16]


@dataclass
class MigrationResult:
    flavour: str
    timescale_version: str | None = None
    applied: list[str] = field(default_factory=list)
    added_columns: list[str] = field(default_factory=list)


def file_migrations() -> list[tuple[str, str]]:
    """(file name, SQL) of every migration file, in order."""
    folder = resources.files("services.archiver") / "migrations"
    out = [(f.name, f.read_text(encoding="utf-8")) for f in folder.iterdir()]
    return sorted(x for x in out if x[0].endswith(".sql"))


def plan(flavour: str, config: ArchiverConfig) -> list[Migration]:
    """The migrations of one flavour, in order."""
    steps: list[Migration] = []
    for fname, sql in file_migrations():
        stem = fname[: -len(".sql")]
        if stem.endswith(".plain"):
            if flavour != PLAIN:
                continue
        elif "." in stem:
            continue  # another flavour's file
        steps.append(Migration(stem, (sql,)))
    if flavour == TIMESCALE:
        for name, statements in timescale.steps(config.retention.chunk_interval_hours).items():
            steps.append(Migration(name, tuple(statements)))
    return sorted(steps, key=lambda m: m.name)


def lock_key_sql() -> str:
    return "hashtext('pfm_migrations:' || current_schema())"


async def migrate(conn: asyncpg.Connection, config: ArchiverConfig) -> MigrationResult:
    """Bring the schema up to date; safe to call from several processes at once."""
    await conn.execute(f"SELECT pg_advisory_lock({lock_key_sql()})")
    try:
        await conn.execute(MIGRATIONS_TABLE)
        done = {
            r["name"]: r
            for r in await conn.fetch("SELECT name, checksum, flavour FROM pfm_schema_migrations")
        }
        if "0001_base" in done:
            flavour = str(done["0001_base"]["flavour"])
            version = None
            if flavour == TIMESCALE:
                version = await timescale.detect(conn, "on")
        else:
            version = await timescale.detect(conn, config.timescaledb)
            flavour = TIMESCALE if version else PLAIN
        result = MigrationResult(flavour, version)
        for step in plan(flavour, config):
            prior = done.get(step.name)
            if prior is not None:
                if prior["checksum"] != step.checksum:
                    log.warning(
                        "migration %s changed after it was applied (recorded %s, now %s); "
                        "not re-applied - add a new migration instead",
                        step.name,
                        prior["checksum"],
                        step.checksum,
                    )
                continue
            async with conn.transaction():
                for statement in step.sql:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO pfm_schema_migrations(name, checksum, flavour) VALUES ($1,$2,$3)",
                    step.name,
                    step.checksum,
                    flavour,
                )
            result.applied.append(step.name)
            log.info("applied migration %s (%s)", step.name, flavour)
        result.added_columns = await _ensure_measurement_columns(conn, flavour)
        if flavour == TIMESCALE:
            await _ensure_policies(conn, config, done.get(POLICIES))
        return result
    finally:
        await conn.execute(f"SELECT pg_advisory_unlock({lock_key_sql()})")


async def _columns(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    return {r["column_name"] for r in rows}


async def _ensure_measurement_columns(conn: asyncpg.Connection, flavour: str) -> list[str]:
    """Measurements added to the vocabulary after a migration get their columns here."""
    wanted: dict[str, list[str]] = {"pfm_metrics": measurement_columns() + list(ENERGY_COLUMNS)}
    if flavour == PLAIN:
        for name in ROLLUPS:
            wanted[name] = [c.name for c in rollup_columns()]
    added: list[str] = []
    for table, cols in wanted.items():
        have = await _columns(conn, table)
        for col in cols:
            if col not in have:
                await conn.execute(
                    f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {col} double precision"
                )
                added.append(f"{table}.{col}")
    if added:
        log.info("added columns for new measurements: %s", ", ".join(added))
    return added


async def _ensure_policies(
    conn: asyncpg.Connection, config: ArchiverConfig, prior: asyncpg.Record | None
) -> None:
    checksum = timescale.policy_checksum(config.retention)
    if prior is not None and prior["checksum"] == checksum:
        return
    async with conn.transaction():
        for statement in timescale.policy_statements(config.retention):
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO pfm_schema_migrations(name, checksum, flavour) VALUES ($1,$2,$3)"
            " ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
            POLICIES,
            checksum,
            TIMESCALE,
        )
    log.info("TimescaleDB policies applied (%s)", checksum)
