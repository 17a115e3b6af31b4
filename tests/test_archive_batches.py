"""Archive batches: analytics also publishes each batch's metrics in one message on
``pfm/v1/{site}/archive/analytics``; an archiver with ``archive_batches: true`` takes
the metrics from there (per-meter topics stay for every other subscriber). Each
message of a batch is checked and validated alone; the batch is acknowledged after
the commit. Real broker, real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from services.analytics import service as analytics
from services.archiver.service import Archiver
from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import LocalMosquitto
from shared.messages import ArchiveBatch, DeadLetter, Metrics, encode, encode_archive_batch
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import parse_site
from tests.test_analytics_ack import (
    METERS,
    downstream_and_feed,
    feed_readings,
    missing,
    named,
)
from tests.test_archiver_helpers import (
    archiver_site,
    at,
    metrics_msg,
    running_archiver,
    schema_dsn,
    wait_for,
)


@pytest.mark.timeout(60)
async def test_each_message_of_a_batch_is_checked_alone(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str
) -> None:
    s = settings.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
    site = archiver_site(site_name, archive_batches=True, flush_interval_s=0.1)
    now = datetime.now(UTC)
    good = [metrics_msg(site_name, f"m{i}", at(now, i), i, 10.0, 20.0) for i in range(5)]
    items = [(topics.metrics(site_name, m.meter), encode(m)) for m in good]
    bad_json = b'{"site": "%s", "meter": "m5", "values": 3}' % site_name.encode()
    items.insert(2, (topics.metrics(site_name, "m5"), bad_json))
    ghost = metrics_msg(site_name, "ghost", now, 9, 1.0, 2.0)
    items.append((topics.metrics(site_name, "ghost"), encode(ghost)))  # not a known meter
    other = metrics_msg("other-site", "m1", now, 9, 1.0, 2.0)
    items.append((topics.metrics("other-site", "m1"), encode(other)))  # another site's topic
    batch = encode_archive_batch(site_name, now, 1, "analytics", items)
    letters: list[DeadLetter] = []

    async def on_letter(letter: DeadLetter, _: Incoming) -> None:
        letters.append(letter)

    conn = await asyncpg.connect(s.db_dsn)
    try:
        async with (
            Bus(named(s, "dl"), service="watch", site=site_name, persistent=False) as watch,
            running_archiver(s, site) as arch,
            Bus(named(s, "pub"), service="pub", site=site_name, persistent=False) as pub,
        ):
            watch.subscribe(
                topics.pattern(topics.Kind.DEADLETTER, site_name), DeadLetter, on_letter
            )
            await watch.wait_connected(10)
            await pub.wait_connected(10)
            await asyncio.sleep(0.3)
            # a metrics message on its own topic is not this archiver's input any more
            late = metrics_msg(site_name, "m9", now, 99, 1.0, 2.0)
            await pub.publish(topics.metrics(site_name, "m9"), late)
            await pub.publish(topics.archive(site_name, "analytics"), batch)

            async def done() -> bool:
                n = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
                return bool(n == 5 and len(letters) == 3)

            await wait_for(done, timeout=30)
            await asyncio.sleep(0.5)
            rows = await conn.fetch("SELECT meter, seq FROM pfm_metrics ORDER BY meter")
            assert [(r["meter"], r["seq"]) for r in rows] == [(f"m{i}", i) for i in range(5)]
            by_topic = {dl.topic: dl for dl in letters}
            bad = by_topic[topics.metrics(site_name, "m5")]
            assert bad.payload() == bad_json and "values" in bad.reason
            assert "'ghost'" in by_topic[topics.metrics(site_name, "ghost")].reason
            foreign = by_topic[topics.metrics("other-site", "m1")]
            assert "not a metrics topic of site" in foreign.reason
            assert {dl.site for dl in letters} == {site_name}
            assert arch.metrics.deadletters.labels("archiver", "metrics")._value.get() == 3
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_broker_and_archiver_restarts_with_batches_lose_and_duplicate_nothing(
    settings: Settings,
    db_dsn: str,
    db_schema: str,
    site_name: str,
    mosquitto: LocalMosquitto,
) -> None:
    """Analytics publishes archive batches, the archiver stores from them; the broker
    restarts twice and the archiver is killed once mid-stream: every reading's metrics
    row is stored exactly once, and the per-meter topics still carry every message."""
    s = settings.model_copy(
        update={"mqtt_url": mosquitto.url, "db_dsn": schema_dsn(db_dsn, db_schema)}
    )
    ana_site = parse_site(
        {
            "site": site_name,
            "analytics": {
                "batch_window_s": 0.05,
                "archive_batches": True,
                "archive_batch_max": 7,  # several batches per flush
                "meters": {m: {} for m in METERS},
            },
        }
    )
    arch_site = archiver_site(site_name, archive_batches=True, flush_interval_s=0.1, batch_size=50)
    sent: list[tuple[str, int]] = []
    batches: list[ArchiveBatch] = []

    async def on_batch(b: ArchiveBatch, _: Incoming) -> None:
        batches.append(b)

    shutdown = Shutdown()
    conn = await asyncpg.connect(s.db_dsn)
    try:
        async with (
            downstream_and_feed(s, site_name) as (down, feed),
            Bus(named(s, "batches"), service="watch", site=site_name) as watch,
        ):
            watch.subscribe(topics.pattern(topics.Kind.ARCHIVE, site_name), ArchiveBatch, on_batch)
            await watch.wait_connected(10)
            # the first archiver is killed mid-stream (its task cancelled: nothing drained,
            # nothing spilled, what it held unacknowledged)
            # (it commits every 5 s: at the kill it holds what came since the start)
            slow = archiver_site(site_name, archive_batches=True, flush_interval_s=5)
            killed = Archiver(named(s, "arch"), slow, Shutdown())
            kill = asyncio.create_task(killed.run(), name="killed-archiver")
            for _ in range(200):
                if killed.bus is not None and killed.bus.connected:
                    break
                await asyncio.sleep(0.05)
            assert killed.bus is not None
            await killed.bus.wait_subscribed()  # subscribed before anything is published
            task = asyncio.create_task(analytics.run(named(s, "ana"), ana_site, shutdown))
            await shutdown.wait_ready(10)
            feeding = asyncio.create_task(feed_readings(feed, site_name, 150, 0.01, sent))
            try:
                try:
                    await asyncio.sleep(0.6)
                    mosquitto.stop()
                    await asyncio.sleep(0.3)
                    mosquitto.start()
                    await asyncio.sleep(0.5)
                    assert killed.buffer, "the archiver holds no batch to lose"
                finally:
                    kill.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await kill
                # the archiver is down a while; its session keeps the batches
                await asyncio.sleep(0.5)
                async with running_archiver(named(s, "arch"), arch_site):
                    await asyncio.sleep(0.4)
                    mosquitto.stop()
                    await asyncio.sleep(0.3)
                    mosquitto.start()
                    await asyncio.wait_for(feeding, 60)
                    await down.wait_for_all(set(sent), 40)

                    async def stored() -> bool:
                        n = await conn.fetchval(
                            "SELECT count(DISTINCT (meter, source_seq)) FROM pfm_metrics"
                            " WHERE interval_s = 0"
                        )
                        return bool(n == len(sent))

                    await wait_for(stored, timeout=60)
            finally:
                feeding.cancel()
                shutdown.request("test done")
                await asyncio.wait_for(task, 15)
        rows = await conn.fetch(
            "SELECT meter, source_seq, count(*) AS n FROM pfm_metrics WHERE interval_s = 0"
            " GROUP BY 1, 2"
        )
    finally:
        await conn.close()
    assert len(sent) == 150 * len(METERS)
    assert missing(sent, down) == []  # the per-meter topics carry every message too
    assert {(r["meter"], r["source_seq"]) for r in rows} == set(sent)
    assert [r for r in rows if r["n"] != 1] == []  # stored once each
    assert batches and max(len(b.messages) for b in batches) == 7
    inner = [Metrics.model_validate_json(text) for b in batches for _, text in b.messages]
    assert all(m.site == site_name for m in inner)


async def test_a_shard_subscribes_the_batches_of_its_own_sites_only(
    settings: Settings, site_name: str
) -> None:
    """Shards hand ``subscribe(bus, sites)`` the sites they hold: with archive batches
    each site's batch topic replaces its metrics topics (a batch is one site's)."""
    site = archiver_site(site_name, archive_batches=True, sites=["edge-a", "edge-b"])
    arch = Archiver(settings, site, Shutdown())
    filters: list[str] = []

    class Recorder(Bus):
        def subscribe(self, pattern: str, *args: Any, **kwargs: Any) -> None:
            filters.append(pattern)
            super().subscribe(pattern, *args, **kwargs)

    arch.subscribe(
        Recorder(named(settings, "subs"), service="archiver", site=site_name), ["edge-b"]
    )
    assert "pfm/v1/edge-b/archive/+" in filters
    assert not [f for f in filters if "/metrics" in f or "edge-a" in f]
    assert "pfm/v1/edge-b/+/event" in filters


def test_archive_batches_stay_under_the_brokers_message_size_limit() -> None:
    """A flush of 1,000 per-reading metrics messages (~3.5 kB each, ~3.5 MB in all) goes
    out as several batches, each under ``archive_batch_bytes`` once encoded, in order,
    nothing left out; the default is under the deployed Mosquitto's limit, which drops a
    larger message (silently over MQTT 3.1.1)."""
    import re
    from pathlib import Path

    from shared.messages import archive_chunks, encode_archive_batch
    from shared.site.analytics import AnalyticsConfig

    limit = AnalyticsConfig().archive_batch_bytes
    conf = (Path(__file__).parents[1] / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    broker_limit = int(re.search(r"^message_size_limit\s+(\d+)", conf, re.M).group(1))  # type: ignore[union-attr]
    assert limit < broker_limit
    # quotes and backslashes grow when a payload is embedded as a JSON string
    payload = (
        b'{"schema":"pfm.metrics/2","note":"a \\"quoted\\" \\\\ path",' + b'"v":1.5,' * 430 + b"}"
    )
    items = [(f"pfm/v1/s/m{k % 40}/metrics", payload) for k in range(1000)]
    assert sum(len(p) for _, p in items) > 3 * broker_limit
    chunks = archive_chunks(items, 1000, limit)
    assert len(chunks) > 3
    assert [x for c in chunks for x in c] == items
    for seq, chunk in enumerate(chunks):
        size = len(encode_archive_batch("s", datetime.now(UTC), seq, "analytics", chunk))
        assert limit // 2 < size <= limit or chunk is chunks[-1], size
    # the count still caps, and one message over the byte cap travels alone
    assert [len(c) for c in archive_chunks(items[:10], 4, limit)] == [4, 4, 2]
    big = [("t", b"x" * 40_000), ("t", b"y")]
    assert [len(c) for c in archive_chunks(big, 10, 20_000)] == [1, 1]
