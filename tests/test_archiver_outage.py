"""PostgreSQL stops for 30 s under load: the archiver spills, retries, drains, and every
message ends up stored exactly once. Uses a PRIVATE PostgreSQL (never the machine's)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from shared import topics
from shared.embedded import LocalPostgres
from shared.settings import Settings
from tests.test_archiver_helpers import archiver_site, at, metrics_msg, publisher, running_archiver

OUTAGE_S = 30.0
RATE_HZ = 200


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_database_outage_loses_and_duplicates_nothing(
    settings: Settings, site_name: str
) -> None:
    # a folder of its own, outside pytest's tree (the postgres user must traverse it)
    workdir = Path(tempfile.mkdtemp(prefix="pfm-archiver-outage-"))
    pg = LocalPostgres(workdir / "pg")
    await asyncio.to_thread(pg.start)
    try:
        s = settings.model_copy(update={"db_dsn": pg.dsn})
        site = archiver_site(
            site_name,
            batch_size=200,
            flush_interval_s=0.2,
            retry_max_s=2.0,
            buffer_max_records=1000,
        )
        now = datetime.now(UTC)
        sent = 0
        spill_seen = 0.0
        async with running_archiver(s, site) as arch, publisher(s, site_name) as bus:

            async def publish_for(seconds: float) -> None:
                nonlocal sent
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    for _ in range(RATE_HZ // 10):
                        meter = f"m{sent % 20}"
                        msg = metrics_msg(
                            site_name, meter, at(now, sent / 20), sent, float(sent), 2.0 * sent + 1
                        )
                        await bus.publish(topics.metrics(site_name, meter), msg)
                        sent += 1
                    await asyncio.sleep(0.1)

            await publish_for(3.0)
            await asyncio.to_thread(pg.stop)
            outage = asyncio.create_task(publish_for(OUTAGE_S))
            while not outage.done():
                spill_seen = max(spill_seen, len(arch.spool))
                await asyncio.sleep(0.5)
            await outage
            assert spill_seen > 0, "nothing spilled to disk while the database was down"
            assert arch.m.db_errors.labels("connection")._value.get() > 0
            await asyncio.to_thread(pg.start)
            await publish_for(3.0)

            conn = await asyncpg.connect(pg.dsn)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if await conn.fetchval("SELECT count(*) FROM pfm_metrics") >= sent:
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(1.0)  # anything extra would show up now
                count = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
                distinct = await conn.fetchval("SELECT count(DISTINCT seq) FROM pfm_metrics")
                seq_sum = await conn.fetchval("SELECT sum(seq) FROM pfm_metrics")
                power_ok = await conn.fetchval(
                    "SELECT bool_and(power = seq AND apparent_power = 2 * seq + 1) FROM pfm_metrics"
                )
            finally:
                await conn.close()
            assert len(arch.spool) == 0, "the spill file did not drain"
        assert sent > OUTAGE_S * RATE_HZ * 0.5
        assert count == sent, f"{count} rows for {sent} messages"
        assert distinct == sent
        assert seq_sum == sent * (sent - 1) // 2
        assert power_ok
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(workdir, ignore_errors=True)
