"""The topic is the authority, and a seq names one message: what the archiver refuses
(site or name that differs from the topic's, names no site file knows), what it stores
once (a reused seq, a re-analysed input), and the collector's seq that this relies on."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from services.archiver.authority import REASONS
from services.collector.service import SEQ_MARGIN, Collector, clock_seq
from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement as M
from shared.messages import DeadLetter, Metrics, Reading
from shared.metrics import ServiceMetrics
from shared.settings import Settings
from shared.site import parse_site
from tests.test_archiver_helpers import (
    at,
    metrics_msg,
    publish_all,
    publisher,
    running_archiver,
    schema_dsn,
    wait_for,
)


def _site_file(site: str, *meters: str, **archiver: Any) -> dict[str, Any]:
    return {
        "site": site,
        "buses": [{"name": "b1", "host": "127.0.0.1", "port": 1502}],
        "meters": [
            {"name": m, "bus": "b1", "unit": i + 1, "profile": "pmtr001"}
            for i, m in enumerate(meters)
        ],
        "archiver": archiver,
    }


def _reading(site: str, meter: str, ts: datetime, seq: int) -> Reading:
    return Reading(
        site=site, meter=meter, ts=ts, seq=seq, profile="pmtr001", values={M.VOLTAGE_L1: 230.0}
    )


@pytest.mark.timeout(60)
async def test_the_topic_is_the_authority_and_a_seq_names_one_message(
    settings: Settings, db_dsn: str, db_schema: str, site_name: str
) -> None:
    s = settings.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
    site = parse_site(
        _site_file(site_name, "meter6", batch_size=50, flush_interval_s=0.1, rollup_interval_s=60)
    )
    now = datetime.now(UTC)
    on_topic = topics.metrics(site_name, "meter6")
    good = [
        (on_topic, metrics_msg(site_name, "meter6", at(now, i), i, 10.0, 20.0)) for i in range(5)
    ]
    other_site = metrics_msg("othersite", "meter6", now, 100, 1.0, 2.0)
    other_meter = metrics_msg(site_name, "meter99", now, 101, 1.0, 2.0)
    unknown = [
        (
            topics.metrics(site_name, f"ghost{i}"),
            metrics_msg(site_name, f"ghost{i}", now, i, 1.0, 2.0),
        )
        for i in range(300)
    ]
    # one reading, then its seq again with a new timestamp: a duplicate, not a new row
    first = _reading(site_name, "meter6", now, 7)
    reused = _reading(site_name, "meter6", at(now, 100), 7)
    # one input analysed, then re-analysed after a redelivery: new analytics seq, same input
    analysed = Metrics(
        site=site_name,
        meter="meter6",
        ts=at(now, 50),
        seq=1000,
        interval_s=0,
        values={M.POWER: 5.0},
        source_seq=7,
    )
    again = analysed.model_copy(update={"seq": 2000})
    # aggregates on their own level: stored; a level that the payload contradicts is refused
    three_s = topics.aggregate(site_name, "meter6", 3.0)
    aggregate = metrics_msg(site_name, "meter6", at(now, 60), 3000, 1.0, 2.0).model_copy(
        update={"aggregate": True, "interval_s": 3.0}
    )
    aggregates = [
        (three_s, aggregate),
        (three_s, aggregate.model_copy(update={"seq": 3001, "interval_s": 600.0})),
        (three_s, metrics_msg(site_name, "meter6", at(now, 61), 3002, 1.0, 2.0)),
    ]

    letters: list[DeadLetter] = []

    async def on_letter(letter: DeadLetter, _: Incoming) -> None:
        letters.append(letter)

    watcher = s.model_copy(update={"mqtt_client_id": f"{s.mqtt_client_id}-dl"})
    conn = await asyncpg.connect(s.db_dsn)
    try:
        async with (
            Bus(watcher, service="watch", site=site_name, persistent=False) as watch,
            running_archiver(s, site) as arch,
            publisher(s, site_name) as bus,
        ):
            watch.subscribe(
                topics.pattern(topics.Kind.DEADLETTER, site_name), DeadLetter, on_letter
            )
            await watch.wait_connected(10)
            await asyncio.sleep(0.3)
            known_before = dict(arch.authority.known)
            await publish_all(bus, good)
            await bus.publish(on_topic, other_site)
            await bus.publish(on_topic, other_meter)
            await publish_all(bus, unknown)
            await publish_all(bus, aggregates)
            reading_topic = topics.reading(site_name, "meter6")
            await publish_all(bus, [(reading_topic, first), (on_topic, analysed)])

            async def stored() -> bool:
                n = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
                r = await conn.fetchval("SELECT count(*) FROM pfm_readings")
                return bool(n == 7 and r == 1)

            await wait_for(stored, timeout=30)
            await publish_all(bus, [(reading_topic, reused), (on_topic, again)])

            async def refused() -> bool:
                dup = arch.m.duplicates.labels("pfm_readings")._value.get()
                dup += arch.m.duplicates.labels("pfm_metrics")._value.get()
                return len(letters) == 304 and dup == 2

            await wait_for(refused, timeout=30)
            assert arch.authority.known == known_before  # nothing learnt from the traffic
        refusals = {r: arch.m.refused.labels(r)._value.get() for r in REASONS}
        assert refusals == {
            "site_mismatch": 1,
            "name_mismatch": 1,
            "unknown_site": 0,
            "unknown_name": 300,
            "bad_topic": 0,
            "interval_mismatch": 2,
        }
        assert arch.metrics.deadletters.labels("archiver", "metrics")._value.get() == 304
        reasons = [dl.reason for dl in letters]
        assert any("'othersite'" in r and repr(site_name) in r for r in reasons)
        assert any("'meter99'" in r and "'meter6'" in r for r in reasons)
        assert sum("is not a meter, device or gateway" in r for r in reasons) == 300
        assert {dl.site for dl in letters} == {site_name}
        rows = await conn.fetch("SELECT site, meter, count(*) FROM pfm_metrics GROUP BY 1, 2")
        assert [tuple(r) for r in rows] == [(site_name, "meter6", 7)]
        assert any("an aggregate of 600.0 s on topic" in r and "of 3s" in r for r in reasons)
        assert any("not an aggregate on topic" in r for r in reasons)
        assert await conn.fetchval("SELECT seq FROM pfm_metrics WHERE source_seq = 7") == 1000
        reading = await conn.fetchrow("SELECT ts, seq FROM pfm_readings")
        assert reading["seq"] == 7 and reading["ts"] == now
    finally:
        await conn.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sites", ["all", ["edge-a", "edge-b", "edge-c"]])
async def test_a_central_archiver_knows_the_sites_of_its_site_folder(
    sites: str | list[str],
    settings: Settings,
    db_dsn: str,
    db_schema: str,
    site_name: str,
    mosquitto: LocalMosquitto,
    tmp_path: Path,
) -> None:
    """``sites: all`` (or a list) with ``site_dir``: the sites of those files, with their
    meters, are stored; a site with no file, or a meter its file does not list, is
    refused; with a list, a site not in it is not even received."""
    folder = tmp_path / "sites"
    folder.mkdir()
    for edge, meter in (("edge-a", "main"), ("edge-b", "feeder1")):
        (folder / f"{edge}.yaml").write_text(yaml.safe_dump(_site_file(edge, meter)))
    base = settings.model_copy(
        update={"db_dsn": schema_dsn(db_dsn, db_schema), "mqtt_url": mosquitto.url}
    )
    site = parse_site(
        _site_file(site_name, sites=sites, site_dir=str(folder), flush_interval_s=0.1)
    )
    now = datetime.now(UTC)
    items = [
        (topics.metrics(edge, meter), metrics_msg(edge, meter, at(now, i), i, 1.0, 2.0))
        for edge, meter in (
            ("edge-a", "main"),
            ("edge-b", "feeder1"),
            ("edge-a", "feeder1"),  # edge-a has no feeder1
            ("edge-c", "main"),  # no site file
            ("edge-d", "main"),  # no site file; not in the list
        )
        for i in range(3)
    ]
    expected = 15 if sites == "all" else 12  # received: a listed centre never gets edge-d
    conn = await asyncpg.connect(base.db_dsn)
    try:
        async with running_archiver(base, site) as arch, publisher(base, site_name) as bus:
            await publish_all(bus, items)

            async def done() -> bool:
                n = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
                refused = sum(arch.m.refused.labels(r)._value.get() for r in REASONS)
                received = arch.metrics.received.labels("archiver", "metrics")._value.get()
                return bool(n == 6 and refused == expected - 6 and received == expected)

            await wait_for(done, timeout=30)
            await asyncio.sleep(0.5)  # anything more would arrive now
        received = arch.metrics.received.labels("archiver", "metrics")._value.get()
        assert received == expected
        assert arch.m.refused.labels("unknown_site")._value.get() == expected - 9
        assert arch.m.refused.labels("unknown_name")._value.get() == 3
        rows = await conn.fetch("SELECT site, meter, count(*) FROM pfm_metrics GROUP BY 1, 2")
        assert sorted(tuple(r) for r in rows) == [("edge-a", "main", 3), ("edge-b", "feeder1", 3)]
    finally:
        await conn.close()


def test_a_bad_site_folder_is_refused_at_start(settings: Settings, tmp_path: Path) -> None:
    from services.archiver.service import Archiver
    from shared.errors import ConfigError
    from shared.service import Shutdown

    folder = tmp_path / "sites"
    folder.mkdir()
    (folder / "edge-a.yaml").write_text("site: edge-a\nmeters: 3\n")
    site = parse_site(_site_file("centre", sites="all", site_dir=str(folder)))
    with pytest.raises(ConfigError, match=r"edge-a\.yaml"):
        Archiver(settings, site, Shutdown())
    site = parse_site(_site_file("centre", sites="all", site_dir=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match=r"archiver\.site_dir"):
        Archiver(settings, site, Shutdown())


def test_the_collector_never_reuses_a_seq(settings: Settings, site_name: str) -> None:
    """A seq names one reading for good: a first start (or a wiped data folder) and a
    restart after a crash start from the clock; a clean restart continues."""
    site = parse_site(_site_file(site_name, "m1", "m2"))

    def start() -> Collector:
        return Collector(settings, site, ServiceMetrics("collector", site_name))

    before = clock_seq()
    col = start()
    assert all(m.seq >= before for m in col.meters)
    for m in col.meters:
        m.seq += 5  # five polls
    used = {m.name: m.seq for m in col.meters}
    col.save_seq(clean=True)
    col.close()
    col = start()  # clean restart: continues, no gap
    assert {m.name: m.seq for m in col.meters} == used
    for m in col.meters:
        m.seq += 3
    col.save_seq()  # saved mid-run, then a crash (no clean save)
    col.close()
    col = start()
    assert all(m.seq >= used[m.name] + 3 + SEQ_MARGIN for m in col.meters)
    col.close()
