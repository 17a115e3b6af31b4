"""Every TimescaleDB-specific statement of the archive, in one place.

Written against the TimescaleDB 2.x API: ``create_hypertable`` (with
``if_not_exists`` and ``migrate_data``), ``ALTER TABLE ... SET
(timescaledb.compress, ...)`` + ``add_compression_policy``,
``add_retention_policy``, continuous aggregates ``CREATE MATERIALIZED VIEW ...
WITH (timescaledb.continuous) ... WITH NO DATA`` (so they can be created inside
the migration's transaction) and ``add_continuous_aggregate_policy``.

The rollups here have the same names and columns as the plain-PostgreSQL rollup
tables (``migrations/0002_rollups.plain.sql``): one query surface either way.
"""

from __future__ import annotations

import hashlib
import logging

import asyncpg

from services.archiver.columns import ROLLUPS, raw_aggregate, rollup_columns
from shared.site.archiver import RetentionConfig

log = logging.getLogger(__name__)

EXTENSION = "timescaledb"

#: tables that become hypertables, partitioned on ``ts``
HYPERTABLES = ("pfm_readings", "pfm_metrics", "pfm_events", "pfm_commands", "pfm_device_status")

#: compression: segment by the series key, newest first inside a segment
COMPRESSION = {
    "pfm_readings": "site, meter",
    "pfm_metrics": "site, meter",
}

#: how far back each continuous aggregate's refresh policy looks, and how often it runs
CAGG_POLICY = {
    "pfm_metrics_1m": ("2 hours", "1 minute", "1 minute"),
    "pfm_metrics_15m": ("1 day", "15 minutes", "5 minutes"),
    "pfm_metrics_1h": ("3 days", "1 hour", "15 minutes"),
}


#: what to do when the extension is there but the server does not preload it
PRELOAD_ADVICE = (
    "add timescaledb to shared_preload_libraries in postgresql.conf (timescaledb-tune does"
    " it) and restart PostgreSQL"
)


async def preloaded(conn: asyncpg.Connection) -> bool | None:
    """Whether the server preloads TimescaleDB (``shared_preload_libraries``); None when
    this role may not read the setting (it needs ``pg_read_all_settings``)."""
    try:
        text = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    except asyncpg.InsufficientPrivilegeError:
        return None
    names = [part.strip().strip("'\"") for part in str(text or "").split(",")]
    return any(name.rsplit("/", 1)[-1].startswith(EXTENSION) for name in names if name)


async def detect(conn: asyncpg.Connection, mode: str) -> str | None:
    """The TimescaleDB version to use, or None for plain PostgreSQL.

    ``mode``: ``off`` never uses it; ``auto`` uses it when installed in this database
    or installable (``pg_available_extensions``) AND preloaded by the server
    (``shared_preload_libraries``), otherwise plain PostgreSQL with one warning saying
    what to change; ``on`` requires it and raises :class:`ConfigError` saying what is
    missing. ``CREATE EXTENSION`` is never tried on a server that does not preload the
    library: the server would refuse it and close the connection.
    """
    from shared.errors import ConfigError

    if mode == "off":
        return None
    installed = await conn.fetchval(
        "SELECT extversion FROM pg_extension WHERE extname = $1", EXTENSION
    )
    available = installed or await conn.fetchval(
        "SELECT default_version FROM pg_available_extensions WHERE name = $1", EXTENSION
    )
    if available is None:
        if mode == "on":
            raise ConfigError(
                "archiver.timescaledb is 'on' but the timescaledb extension is not "
                "available in this PostgreSQL (install it or set timescaledb: auto)"
            )
        return None
    loaded = await preloaded(conn)
    if loaded is False or (loaded is None and mode == "auto"):
        why = (
            "is not in the server's shared_preload_libraries"
            if loaded is False
            else "may not be preloaded (this role cannot read shared_preload_libraries)"
        )
        if mode == "on":
            raise ConfigError(
                f"archiver.timescaledb is 'on' but timescaledb {available} {why}: "
                f"{PRELOAD_ADVICE}, or set timescaledb: auto"
            )
        log.warning(
            "timescaledb %s is installed but %s; archiving to plain PostgreSQL. To use it, "
            "%s before the archiver first creates its tables (the choice is kept after).",
            available,
            why,
            PRELOAD_ADVICE,
        )
        return None
    if installed:
        return str(installed)
    await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}")
    return str(
        await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = $1", EXTENSION)
    )


def natural_key_statements() -> list[str]:
    """Migration step ``0003_natural_keys.timescale``: a per-input metrics message is
    stored once per input. A unique index on a hypertable must contain its time column,
    so the key is (site, meter, source, source_seq, ts): a re-analysed input carries its
    input's ``ts`` and is caught; a reading or metrics ``seq`` reused with ANOTHER ``ts``
    is not (the plain-PostgreSQL schema refuses that too, see
    ``migrations/0003_natural_keys.plain.sql``)."""
    per_input = "a.energy_s IS NOT NULL AND b.energy_s IS NOT NULL"
    return [
        "DELETE FROM pfm_metrics a USING pfm_metrics b"
        " WHERE a.site = b.site AND a.meter = b.meter AND a.source = b.source"
        f" AND a.source_seq = b.source_seq AND a.ts = b.ts AND {per_input} AND a.seq > b.seq",
        "CREATE UNIQUE INDEX IF NOT EXISTS pfm_metrics_input"
        " ON pfm_metrics (site, meter, source, source_seq, ts)"
        " WHERE energy_s IS NOT NULL AND source_seq IS NOT NULL",
    ]


#: migration steps of the TimescaleDB flavour (in place of the ``*.plain.sql`` files)
def steps(chunk_interval_hours: float = 24) -> dict[str, list[str]]:
    return {
        "0002_rollups.timescale": schema_statements(chunk_interval_hours),
        "0003_natural_keys.timescale": natural_key_statements(),
    }


def _interval(days: float) -> str:
    return f"INTERVAL '{days * 86400:.0f} seconds'"


def schema_statements(chunk_interval_hours: float = 24) -> list[str]:
    """Hypertables, compression settings and continuous aggregates (migration step)."""
    chunk = f"INTERVAL '{chunk_interval_hours * 3600:.0f} seconds'"
    out = [
        f"SELECT create_hypertable('{t}', 'ts', chunk_time_interval => {chunk},"
        " if_not_exists => TRUE, migrate_data => TRUE)"
        for t in HYPERTABLES
    ]
    for table, segment in COMPRESSION.items():
        out.append(
            f"ALTER TABLE {table} SET (timescaledb.compress,"
            f" timescaledb.compress_segmentby = '{segment}',"
            " timescaledb.compress_orderby = 'ts DESC')"
        )
    out += cagg_statements()
    return out


def cagg_statements() -> list[str]:
    cols = ",\n    ".join(raw_aggregate(c) for c in rollup_columns())
    out = []
    for name, width in ROLLUPS.items():
        out.append(
            # no IF NOT EXISTS: the migration runs once (recorded), in one transaction
            f"CREATE MATERIALIZED VIEW {name}\n"
            "WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS\n"
            f"SELECT time_bucket(INTERVAL '{width}', ts) AS ts, site, meter,\n"
            f"    count(*) AS samples,\n    {cols}\n"
            "FROM pfm_metrics\n"
            "WHERE energy_s IS NOT NULL\n"
            f"GROUP BY time_bucket(INTERVAL '{width}', ts), site, meter\n"
            "WITH NO DATA"
        )
    return out


def policy_statements(retention: RetentionConfig) -> list[str]:
    """Compression, retention and refresh policies (re-applied when the config changes)."""
    out: list[str] = []
    for table in COMPRESSION:
        out.append(f"SELECT remove_compression_policy('{table}', if_exists => TRUE)")
        out.append(
            f"SELECT add_compression_policy('{table}',"
            f" compress_after => {_interval(retention.compress_after_days)})"
        )
    keep: dict[str, float | None] = {
        "pfm_readings": retention.readings_days,
        "pfm_metrics": retention.metrics_days,
        "pfm_events": retention.events_days,
        "pfm_commands": retention.events_days,
        "pfm_device_status": retention.events_days,
    }
    keep.update(dict.fromkeys(ROLLUPS, retention.rollups_days))
    for table, days in keep.items():
        out.append(f"SELECT remove_retention_policy('{table}', if_exists => TRUE)")
        if days is not None:
            out.append(f"SELECT add_retention_policy('{table}', drop_after => {_interval(days)})")
    for name, (start, end, every) in CAGG_POLICY.items():
        # positional: the flag is ``if_not_exists`` before TimescaleDB 2.8, ``if_exists`` after
        out.append(f"SELECT remove_continuous_aggregate_policy('{name}', TRUE)")
        out.append(
            f"SELECT add_continuous_aggregate_policy('{name}',"
            f" start_offset => INTERVAL '{start}', end_offset => INTERVAL '{end}',"
            f" schedule_interval => INTERVAL '{every}')"
        )
    return out


def policy_checksum(retention: RetentionConfig) -> str:
    text = "\n".join(policy_statements(retention))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
