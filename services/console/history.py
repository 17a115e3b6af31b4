"""History from the archive: PF, kW and kvar per meter, and the report of a period."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.archiver.report import build_report, render
from shared.site import SiteConfig

#: span -> (rollup table, bucket seconds)
SPANS = {
    "hour": ("pfm_metrics_1m", timedelta(hours=1)),
    "day": ("pfm_metrics_15m", timedelta(days=1)),
    "week": ("pfm_metrics_1h", timedelta(days=7)),
}


async def series(pool: asyncpg.Pool, site: str, meter: str, span: str) -> dict[str, Any]:
    """``{"t": [...], "pf": [...], "kw": [...], "kvar": [...]}`` of the span's rollup."""
    table, length = SPANS[span]
    rows = await pool.fetch(
        f"""
        SELECT extract(epoch FROM ts) AS t,
               abs(coalesce(power_factor, power / nullif(apparent_power, 0))) AS pf,
               power / 1000.0 AS kw,
               reactive_power / 1000.0 AS kvar
        FROM {table}
        WHERE site = $1 AND meter = $2 AND ts >= now() - $3::interval
        ORDER BY ts
        """,
        site,
        meter,
        length,
    )
    return {
        "meter": meter,
        "span": span,
        "table": table,
        "t": [float(r["t"]) for r in rows],
        "pf": [r["pf"] for r in rows],
        "kw": [r["kw"] for r in rows],
        "kvar": [r["kvar"] for r in rows],
    }


async def report(
    pool: asyncpg.Pool, site: SiteConfig, start: datetime, end: datetime, fmt: str
) -> str:
    """``pfmon report`` of the period, in ``md``, ``html``, ``csv`` or ``json``."""
    async with pool.acquire() as conn:
        rep = await build_report(conn, site, site.site, start, end)
    return render(rep, fmt, site.archiver.report.worst_meters)
