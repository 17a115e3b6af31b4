"""Plain PostgreSQL: the rollup tables the archiver maintains itself.

Every batch marks the 1-minute buckets it touched in ``pfm_rollup_dirty`` (same
transaction). :func:`refresh` takes those marks (``DELETE ... RETURNING``) and
recomputes the 1-minute buckets from ``pfm_metrics``, then the 15-minute buckets
from the 1-minute ones and the hours from the quarters (averages weighted by
``samples``), all in one transaction under a transaction-level advisory lock, so
two archivers never interleave refreshes. On TimescaleDB the continuous
aggregates do this job (:mod:`.timescale`).
"""

from __future__ import annotations

import asyncpg

from services.archiver.columns import (
    BUCKET_ORIGIN,
    ROLLUPS,
    raw_aggregate,
    rollup_columns,
    rollup_reaggregate,
)

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


async def refresh(conn: asyncpg.Connection) -> int | None:
    """Recompute dirty buckets; returns how many 1-minute buckets, None if another
    archiver is refreshing right now."""
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
        status = await conn.execute(
            "WITH d AS (DELETE FROM pfm_rollup_dirty RETURNING site, meter, ts)"
            " INSERT INTO pfm_dirty_now SELECT site, meter, ts FROM d"
        )
        n = int(status.rsplit(" ", 1)[-1])
        if n:
            for statement in _STATEMENTS:
                await conn.execute(statement)
        return n
