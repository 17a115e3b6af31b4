"""Plain PostgreSQL: the rollup tables the archiver maintains itself.

Every batch marks the 1-minute buckets it touched in ``pfm_rollup_dirty`` (same
transaction). :func:`refresh` takes those marks (``DELETE ... RETURNING``) and
recomputes the 1-minute buckets from ``pfm_metrics``, then the 15-minute buckets
from the 1-minute ones and the hours from the quarters (averages weighted by
``samples``), all in one transaction under a transaction-level advisory lock, so
two archivers never interleave refreshes. A bucket the database refuses (an
overflowing value, any data error) is isolated and parked in
``pfm_rollup_quarantine``; the other buckets, and every other meter, go on. On
TimescaleDB the continuous aggregates do this job (:mod:`.timescale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from services.archiver.columns import (
    BUCKET_ORIGIN,
    ROLLUPS,
    raw_aggregate,
    rollup_columns,
    rollup_reaggregate,
)
from services.archiver.ingest import describe_db_error

_ORIGIN = f"TIMESTAMPTZ '{BUCKET_ORIGIN}'"


def _upsert(target: str, select: str) -> str:
    cols = [c.name for c in rollup_columns()]
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in ["samples", *cols])
    return (
        f"INSERT INTO {target} (ts, site, meter, samples, {', '.join(cols)})\n{select}\n"
        f"ON CONFLICT (site, meter, ts) DO UPDATE SET {updates}"
    )


def refresh_statements() -> list[str]:
    names = list(ROLLUPS)
    widths = list(ROLLUPS.values())
    raw = ", ".join(raw_aggregate(c) for c in rollup_columns())
    out = [
        _upsert(
            names[0],
            f"SELECT date_bin(INTERVAL '{widths[0]}', m.ts, {_ORIGIN}) AS b, m.site, m.meter,"
            f" count(*), {raw}\n"
            "FROM pfm_metrics m JOIN pfm_dirty_now d ON m.site = d.site AND m.meter = d.meter"
            f" AND m.ts >= d.ts AND m.ts < d.ts + INTERVAL '{widths[0]}'\n"
            "WHERE m.energy_s IS NOT NULL\n"
            "GROUP BY 1, 2, 3",
        )
    ]
    re = ", ".join(rollup_reaggregate(c) for c in rollup_columns())
    for i in (1, 2):
        width, finer = widths[i], names[i - 1]
        out.append(
            _upsert(
                names[i],
                f"SELECT date_bin(INTERVAL '{width}', r.ts, {_ORIGIN}) AS b, r.site, r.meter,"
                f" sum(samples), {re}\n"
                f"FROM {finer} r JOIN (SELECT DISTINCT site, meter,"
                f" date_bin(INTERVAL '{width}', ts, {_ORIGIN}) AS b FROM pfm_dirty_now) d"
                " ON r.site = d.site AND r.meter = d.meter"
                f" AND r.ts >= d.b AND r.ts < d.b + INTERVAL '{width}'\n"
                "GROUP BY 1, 2, 3",
            )
        )
    return out


_STATEMENTS: list[str] = []


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A 1-minute bucket whose rollup the database refused (kept in pfm_rollup_quarantine)."""

    site: str
    meter: str
    ts: datetime
    reason: str


@dataclass(slots=True)
class RefreshResult:
    #: 1-minute buckets taken from pfm_rollup_dirty (refreshed + quarantined)
    buckets: int = 0
    quarantined: list[Quarantined] = field(default_factory=list)


async def refresh(conn: asyncpg.Connection) -> RefreshResult | None:
    """Recompute the dirty buckets; None if another archiver is refreshing right now.

    All buckets go in one statement per level; if the database refuses that with a data
    error (SQLSTATE class 22: an overflow, say), the buckets are redone one by one, each in
    its own savepoint, and the ones it still refuses are parked in
    ``pfm_rollup_quarantine`` with the server's message: the marks drain and every other
    meter's rollups go on. A quarantined bucket is retried whenever a new row marks it.
    """
    if not _STATEMENTS:
        _STATEMENTS.extend(refresh_statements())
    async with conn.transaction():
        got = await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext('pfm_rollups:' || current_schema()))"
        )
        if not got:
            return None
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS pfm_dirty_now"
            " (site text, meter text, ts timestamptz) ON COMMIT DELETE ROWS"
        )
        marks = await conn.fetch(
            "WITH d AS (DELETE FROM pfm_rollup_dirty RETURNING site, meter, ts)"
            " INSERT INTO pfm_dirty_now SELECT site, meter, ts FROM d"
            " RETURNING site, meter, ts"
        )
        result = RefreshResult(len(marks))
        if not marks:
            return result
        try:
            async with conn.transaction():  # a savepoint
                await _run_statements(conn)
        except asyncpg.DataError:
            await _one_by_one(conn, sorted(tuple(r) for r in marks), result)
        else:
            await conn.execute(
                "DELETE FROM pfm_rollup_quarantine q USING pfm_dirty_now d"
                " WHERE q.site = d.site AND q.meter = d.meter AND q.ts = d.ts"
            )
        return result


async def _run_statements(conn: asyncpg.Connection) -> None:
    for statement in _STATEMENTS:
        await conn.execute(statement)


async def _one_by_one(
    conn: asyncpg.Connection, marks: list[tuple[str, str, datetime]], result: RefreshResult
) -> None:
    for site, meter, ts in marks:
        await conn.execute("DELETE FROM pfm_dirty_now")
        await conn.execute("INSERT INTO pfm_dirty_now VALUES ($1, $2, $3)", site, meter, ts)
        try:
            async with conn.transaction():
                await _run_statements(conn)
        except asyncpg.DataError as exc:
            reason = describe_db_error(exc)
            result.quarantined.append(Quarantined(site, meter, ts, reason))
            await conn.execute(
                "INSERT INTO pfm_rollup_quarantine (site, meter, ts, reason) VALUES ($1,$2,$3,$4)"
                " ON CONFLICT (site, meter, ts) DO UPDATE SET reason = EXCLUDED.reason,"
                " at = now()",
                site,
                meter,
                ts,
                reason,
            )
        else:
            await conn.execute(
                "DELETE FROM pfm_rollup_quarantine WHERE site = $1 AND meter = $2 AND ts = $3",
                site,
                meter,
                ts,
            )
