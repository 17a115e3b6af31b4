"""The archiver service: ``metrics`` in, rows in PostgreSQL out (idempotent)."""

from __future__ import annotations

import logging

import asyncpg
import orjson

from shared import topics
from shared.bus import Bus, Incoming
from shared.messages import Metrics
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
SERVICE = "archiver"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS pfm_metrics (
    site text NOT NULL,
    meter text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    interval_s double precision NOT NULL,
    power_w double precision,
    apparent_power_va double precision,
    power_factor double precision,
    data jsonb NOT NULL,
    PRIMARY KEY (site, meter, ts, seq)
);
"""


async def ensure_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(SCHEMA_SQL)


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)
    pool = await asyncpg.create_pool(settings.db_dsn, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn)
        async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics) as bus:

            async def on_metrics(m: Metrics, incoming: Incoming) -> None:
                values = {k.value: v for k, v in m.values.items()}
                await pool.execute(
                    "INSERT INTO pfm_metrics(site, meter, ts, seq, interval_s, power_w,"
                    " apparent_power_va, power_factor, data)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9::jsonb) ON CONFLICT DO NOTHING",
                    m.site,
                    m.meter,
                    m.ts,
                    m.seq,
                    m.interval_s,
                    values.get("power"),
                    values.get("apparent_power"),
                    values.get("power_factor"),
                    orjson.dumps(values).decode(),
                )

            bus.subscribe(topics.pattern(topics.Kind.METRICS, site.site), Metrics, on_metrics)
            await shutdown.wait()
    finally:
        await pool.close()
