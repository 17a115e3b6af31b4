"""Archive batches across the edge bridge: ``pfmon init --role edge --bridge-metrics
batches`` forwards analytics' archive batches (``pfm/v1/{site}/archive/analytics``)
instead of the per-meter metrics, and a central archiver with ``archive_batches: true``
stores every metrics message of them once. Two real Mosquittos on the generated
configuration (TLS, passwords, ACLs), a real archiver, real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import yaml

from services.init import acl_text, bridged_topics
from services.init.nats import permissions
from shared import topics
from shared.embedded import free_port
from shared.errors import ConfigError
from shared.messages import encode, encode_archive_batch
from tests.test_archiver_helpers import (
    archiver_site,
    at,
    metrics_msg,
    running_archiver,
    schema_dsn,
    wait_for,
)
from tests.test_security_broker import (
    MOSQUITTO,
    Broker,
    Probe,
    centre_and_edge,
    init,
    service_settings,
)

pytestmark = pytest.mark.skipif(
    not Path(MOSQUITTO).exists(), reason="the mosquitto binary is not installed"
)

METERS = ["m1", "m2", "m3"]


def edge_site_file(tmp: Path, site: str, archive_batches: bool, most: int = 200) -> Path:
    path = tmp / f"{site}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    analytics = {"archive_batches": archive_batches, "archive_batch_max": most}
    path.write_text(yaml.safe_dump({"site": site, "analytics": analytics}))
    return path


def test_batches_choice_forwards_the_archive_topic_only() -> None:
    chosen = bridged_topics("batches")
    assert chosen[0] == "archive/analytics"
    assert not [t for t in chosen if "metrics" in t]
    assert "+/event" in chosen


def test_a_bridge_user_may_publish_its_own_sites_batches_only() -> None:
    """The centre's ACL, and the NATS permissions made from it."""
    acl = acl_text("central", "centre", ["branch1", "branch2"])
    assert "user bridge-branch1\n" in acl
    block = acl.split("user bridge-branch1\n", 1)[1].split("\n\n", 1)[0]
    assert "topic write pfm/v1/branch1/archive/analytics" in block.splitlines()
    assert "branch2" not in block
    publish, subscribe = permissions(acl)["bridge-branch1"]
    assert "pfm.v1.branch1.archive.analytics" in publish
    assert not [p for p in publish if "branch2" in p or p.endswith("archive.*")]
    assert subscribe == []


def test_batches_refused_when_the_edge_analytics_publishes_none(
    tmp_path: Path, site_name: str
) -> None:
    central = init(tmp_path / "central", "centre", role="central")
    with pytest.raises(ConfigError) as err:
        init(
            tmp_path / "edge",
            site_name,
            role="edge",
            central=central.out,
            central_host="127.0.0.1",
            bridge_metrics="batches",
            site_file=edge_site_file(tmp_path, site_name, archive_batches=False),
        )
    assert "--bridge-metrics batches:" in str(err.value)
    assert "analytics.archive_batches false" in str(err.value)
    # any archive_batch_max is fine: analytics caps a batch by bytes under the broker limit
    edge = init(
        tmp_path / "edge",
        site_name,
        role="edge",
        central=central.out,
        central_host="127.0.0.1",
        bridge_metrics="batches",
        site_file=edge_site_file(tmp_path, site_name, archive_batches=True, most=1000),
    )
    bridge = (edge.out / "broker" / "conf.d" / "bridge.conf").read_text()
    assert f"topic pfm/v1/{site_name}/archive/analytics out 1" in bridge


@pytest.mark.timeout(90)
async def test_batches_cross_the_bridge_and_the_centre_stores_each_row_once(
    tmp_path: Path, site_name: str, db_dsn: str, db_schema: str
) -> None:
    central_port = free_port()
    central, edge = centre_and_edge(
        tmp_path,
        site_name,
        central_port,
        bridge_metrics="batches",
        site_file=edge_site_file(tmp_path, site_name, archive_batches=True),
    )
    conf = (edge.out / "broker" / "conf.d" / "bridge.conf").read_text()
    assert f"topic pfm/v1/{site_name}/archive/analytics out 1" in conf
    assert "metrics" not in conf

    centre = Broker(tmp_path / "central-broker", central.out, port=central_port).start()
    edge_broker = Broker(tmp_path / "edge-broker", edge.out).start()
    watcher = Probe(central_port, central.out, "monitor", central.passwords["monitor"])
    analytics = Probe(edge_broker.port, edge.out, "analytics", edge.passwords["analytics"])
    try:
        assert watcher.connect(), watcher.error
        watcher.subscribe(f"pfm/v1/{site_name}/#")
        assert analytics.connect(), analytics.error
        event = topics.event(site_name, "m1")
        deadline = time.monotonic() + 15  # the bridge connects in the background
        while not watcher.received(event) and time.monotonic() < deadline:
            analytics.publish(event, b'{"probe": 1}')
            await asyncio.sleep(0.3)
        assert watcher.received(event), f"bridge never forwarded: {edge_broker.log()}"

        s = service_settings(central, "archiver", central_port, tmp_path)
        s = s.model_copy(update={"db_dsn": schema_dsn(db_dsn, db_schema)})
        site = archiver_site(
            "centre",
            archive_batches=True,
            sites=[site_name],
            known={site_name: METERS},
            flush_interval_s=0.1,
        )
        now = datetime.now(UTC)
        sent: list[tuple[str, int]] = []
        batch_topic = topics.archive(site_name, "analytics")
        async with running_archiver(s, site) as arch:
            assert arch.bus is not None
            await arch.bus.wait_subscribed()
            for n in range(1, 11):  # ten flushes of the edge's analytics
                items = []
                for meter in METERS:
                    seq = n * 10 + METERS.index(meter)
                    m = metrics_msg(site_name, meter, at(now, n), seq, 10.0 * n, 20.0 * n)
                    items.append((topics.metrics(site_name, meter), encode(m)))
                    sent.append((meter, seq))
                payload = encode_archive_batch(site_name, now, n, "analytics", items)
                assert analytics.publish(batch_topic, payload).value == 0  # type: ignore[union-attr]
                # per-meter metrics are still published at the edge, for its own subscribers
                analytics.publish(items[0][0], items[0][1])
            conn = await asyncpg.connect(s.db_dsn)
            try:

                async def stored() -> bool:
                    n = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
                    return bool(n >= len(sent))

                await wait_for(stored, timeout=30)
                await asyncio.sleep(0.5)  # anything extra would show now
                rows = await conn.fetch(
                    "SELECT site, meter, seq, count(*) AS n FROM pfm_metrics GROUP BY 1, 2, 3"
                )
            finally:
                await conn.close()
        assert {(r["meter"], r["seq"]) for r in rows} == set(sent)
        assert [r for r in rows if r["n"] != 1] == []
        assert {r["site"] for r in rows} == {site_name}
        assert len(watcher.received(batch_topic)) == 10, "a batch lost or doubled on the bridge"
        assert watcher.received(topics.metrics(site_name, "m1")) == [], "per-meter metrics crossed"

        # the bridge user publishes its own site's batches only
        intruder = Probe(
            central_port, edge.out, f"bridge-{site_name}", edge.passwords[f"bridge-{site_name}"]
        )
        assert intruder.connect(), intruder.error
        other = topics.archive("other-site", "analytics")
        assert intruder.publish(other).value == 0x87  # type: ignore[union-attr]
        assert intruder.publish(topics.archive(site_name, "console")).value == 0x87  # type: ignore[union-attr]
        intruder.close()
    finally:
        analytics.close()
        watcher.close()
        edge_broker.stop()
        centre.stop()
