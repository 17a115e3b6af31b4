"""The central tier on a clustered broker: three ``nats-server`` nodes (JetStream, routes,
the MQTT gateway) on loopback, two edge Mosquittos bridged into them with the bridge
configuration ``pfmon init`` writes (every node listed), two archivers splitting the
sites by shards. One node is killed mid-stream and comes back: nothing is lost, nothing
stored twice, and the time to recover is printed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from services.archiver.shards import ShardManager, assign, owner, site_shard
from services.init.bridge import bridge_conf
from shared import topics
from shared.bus import Bus
from shared.embedded import LocalMosquitto
from shared.errors import ConfigError
from shared.metrics import ServiceMetrics
from shared.settings import Settings
from shared.site import parse_site
from tests.nats_cluster import NatsCluster, nats_server
from tests.test_archiver_helpers import (
    TEST_NAMES,
    archiver_site,
    at,
    metrics_msg,
    running_archiver,
    schema_dsn,
)

needs_nats = pytest.mark.skipif(nats_server() is None, reason="nats-server is not installed")
needs_mosquitto = pytest.mark.skipif(
    not LocalMosquitto.available(), reason="mosquitto is not installed"
)

SHARDS = 4
RATE_HZ = 40  # per edge
METERS = 5
DOWN_S = 20.0


def test_site_shard_is_stable_and_spread() -> None:
    # fixed values: a change of the hash would move every site's session
    assert [site_shard(s, 16) for s in ("plant-a", "plant-b", "hotel")] == [
        site_shard("plant-a", 16),
        site_shard("plant-b", 16),
        site_shard("hotel", 16),
    ]
    counts = [0] * 16
    for n in range(1600):
        counts[site_shard(f"site{n}", 16)] += 1
    assert min(counts) > 60 and max(counts) < 140, counts
    with pytest.raises(ValueError):
        site_shard("x", 0)


def test_rendezvous_moves_only_what_it_must() -> None:
    members = ["a1", "a2", "a3"]
    before = {k: owner(k, members) for k in range(64)}
    assert set(before.values()) == set(members)
    # a fourth member takes shards only from the others, never moves one between them
    after = {k: owner(k, [*members, "a4"]) for k in range(64)}
    for k in range(64):
        assert after[k] in (before[k], "a4")
    assert 5 < sum(1 for k in range(64) if after[k] == "a4") < 30
    # a member leaving gives away only its own shards
    gone = {k: owner(k, ["a1", "a3"]) for k in range(64)}
    for k in range(64):
        if before[k] != "a2":
            assert gone[k] == before[k]
    assert owner(3, []) is None
    assert assign(["b", "a", "a"], 1) == {0: ["a", "b"]}


def _members_that_split(central: str, sites: list[str]) -> tuple[str, str]:
    """Two member ids between which the used shards are split (each holds one)."""
    used = sorted(assign(sites, SHARDS))
    for n in range(200):
        pair = (f"pfm-test-{central}-arch{n}a", f"pfm-test-{central}-arch{n}b")
        owners = {owner(k, pair) for k in used}
        if owners == set(pair):
            return pair
    raise AssertionError("no member pair splits the shards")


def _edge_conf(site: str, cluster: NatsCluster) -> str:
    """The bridge.conf `pfmon init --role edge --central-host n1,n2,n3` writes, less its
    TLS lines (the test cluster listens in plain TCP)."""
    conf = bridge_conf(
        site=site,
        gateway="gw1",
        central_host=",".join(f"127.0.0.1:{p}" for p in cluster.mqtt_ports),
        central_port=8883,
        password="unused",
        secrets_path="/nonexistent",
    )
    tls = ("bridge_cafile", "bridge_certfile", "bridge_keyfile", "bridge_insecure")
    return "\n".join(line for line in conf.splitlines() if not line.startswith(tls)) + "\n"


@needs_nats
@needs_mosquitto
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_node_killed_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, db_dsn: str, db_schema: str, site_name: str
) -> None:
    central = site_name
    edges = [f"{site_name}e1", f"{site_name}e2"]
    cluster = NatsCluster(tmp_path / "nats")
    mosquittos: list[LocalMosquitto] = []
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(cluster.wait_ready)
        for site in edges:
            mosq = LocalMosquitto(
                tmp_path / site, persistence=True, extra_config=_edge_conf(site, cluster)
            )
            await asyncio.to_thread(mosq.start)
            mosquittos.append(mosq)
        dsn = schema_dsn(db_dsn, db_schema)
        member_a, member_b = _members_that_split(central, [central, *edges])
        site_cfg = archiver_site(
            central,
            sites="all",
            shards=SHARDS,
            heartbeat_s=1.0,
            keep_readings=False,
            batch_size=200,
            flush_interval_s=0.2,
            known=dict.fromkeys((central, *edges), TEST_NAMES),
        )

        def arch_settings(member: str) -> Settings:
            return Settings(
                mqtt_url=cluster.mqtt_url,
                # B finds out that the cluster speaks 3.1.1 only (it refuses v5's CONNECT)
                mqtt_protocol="3.1.1" if member == member_a else "auto",
                db_dsn=dsn,
                data_dir=tmp_path / member,
                metrics_port=0,
                mqtt_client_id=member,
                log_format="text",
            )

        base = datetime.now(UTC).replace(microsecond=0)
        sent: dict[str, int] = dict.fromkeys(edges, 0)
        published_at: dict[tuple[str, int], float] = {}
        stored_at: dict[tuple[str, int], float] = {}
        stop = asyncio.Event()

        async def publish(site: str, mosq: LocalMosquitto) -> None:
            s = Settings(mqtt_url=mosq.url, mqtt_client_id=f"pfm-test-{site}-pub", metrics_port=0)
            async with Bus(s, service="testpub", site=site, persistent=False) as bus:
                await bus.wait_connected(10)
                while not stop.is_set():
                    for _ in range(RATE_HZ // 10):
                        seq = sent[site]
                        meter = f"m{seq % METERS}"
                        msg = metrics_msg(site, meter, at(base, seq / 10), seq, 1.0 + seq, 2.0)
                        await bus.publish(topics.metrics(site, meter), msg)
                        published_at[(site, seq)] = time.monotonic()
                        sent[site] = seq + 1
                    await asyncio.sleep(0.1)

        async def watch(conn: asyncpg.Connection) -> None:
            while True:
                rows = await conn.fetch("SELECT site, seq FROM pfm_metrics")
                now = time.monotonic()
                for row in rows:
                    stored_at.setdefault((row["site"], row["seq"]), now)
                await asyncio.sleep(0.2)

        conn = await asyncpg.connect(dsn)
        async with running_archiver(arch_settings(member_a), site_cfg) as arch_a:
            assert arch_a.shards is not None
            # the first member alone holds every shard that has sites
            used = set(assign([central, *edges], SHARDS))
            await _until(lambda: set(arch_a.shards.running) == used, 30, "A holds every shard")
            async with running_archiver(arch_settings(member_b), site_cfg) as arch_b:
                assert arch_b.shards is not None
                sa, sb = arch_a.shards, arch_b.shards
                await _until(
                    lambda: (
                        sa.alive() == sb.alive() == sorted([member_a, member_b])
                        and set(sa.running) | set(sb.running) == used
                        and not set(sa.running) & set(sb.running)
                    ),
                    30,
                    "the shards split between A and B",
                )
                for k in used:
                    holder = sa if k in sa.running else sb
                    assert holder.member == owner(k, [member_a, member_b])
                # A let go of B's shards: its health gauge still says connected
                assert arch_a.metrics.bus_connected.labels("archiver")._value.get() == 1
                # every shard session subscribed before the traffic starts
                await _until(
                    lambda: (
                        all(b.connected for b in [*sa.buses.values(), *sb.buses.values()])
                        and len(sa.buses) + len(sb.buses) == len(used)
                    ),
                    30,
                    "shard sessions connected",
                )
                for bus in [*sa.buses.values(), *sb.buses.values()]:
                    await bus.wait_subscribed(30)
                watcher = asyncio.create_task(watch(conn), name="test-watch")
                pubs = [
                    asyncio.create_task(publish(s, m), name=f"test-pub-{s}")
                    for s, m in zip(edges, mosquittos, strict=True)
                ]
                await asyncio.sleep(6)
                killed_at = time.monotonic()
                published_before_kill = set(published_at)
                await asyncio.to_thread(cluster.kill, 0)  # every client's first node
                await asyncio.sleep(DOWN_S)
                restarted_at = time.monotonic()
                await asyncio.to_thread(cluster.start, 0)
                await asyncio.sleep(6)
                shard_buses = [*sa.buses.values(), *sb.buses.values()]
                moved = [b.connections for b in shard_buses]
                protocols = {b.protocol for b in [*shard_buses, sa.bus, sb.bus]}
                b_shards = set(sb.running)
                reoffered = arch_b.m.duplicates.labels("pfm_metrics")._value.get()
                left_at = time.monotonic()
            # B stops mid-stream (a restart): A takes its shards, their sessions with them
            await _until(lambda: set(sa.running) == used, 30, "A takes B's shards")
            taken_s = time.monotonic() - left_at
            await asyncio.sleep(4)
            stop.set()
            await asyncio.gather(*pubs)
            total = sum(sent.values())
            expected = {(s, q) for s in edges for q in range(sent[s])}
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not expected <= set(stored_at):
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # anything extra would show up now
            watcher.cancel()
            count = await conn.fetchval(
                "SELECT count(*) FROM pfm_metrics WHERE site = ANY($1)", edges
            )
            distinct = await conn.fetchval(
                "SELECT count(DISTINCT (site, seq)) FROM pfm_metrics WHERE site = ANY($1)",
                edges,
            )
            values_ok = await conn.fetchval(
                "SELECT bool_and(power = 1 + seq) FROM pfm_metrics WHERE site = ANY($1)",
                edges,
            )
            reoffered += arch_a.m.duplicates.labels("pfm_metrics")._value.get()
        await conn.close()
        missing = sorted(expected - set(stored_at))
        assert not missing, f"{len(missing)} of {total} lost, first {missing[:5]}"
        assert count == total == distinct, f"{count} rows, {distinct} distinct, {total} sent"
        assert values_ok
        assert protocols == {"3.1.1"}
        assert b_shards, "B held no shard"
        # every shard session was on node 0 (first in the list) and resumed on another
        assert all(n >= 2 for n in moved), f"connections per shard session: {moved}"
        after = [k for k in published_at if k not in published_before_kill]
        first_after = min(stored_at[k] for k in after)
        # the edges' bridges and the archivers moved on while node 0 was still down
        assert first_after < restarted_at, "nothing was stored until the killed node came back"
        delays = sorted(stored_at[k] - published_at[k] for k in published_at)
        during = [stored_at[k] - published_at[k] for k in after if published_at[k] < restarted_at]
        print(
            f"\nNATS 3-node cluster, node 0 killed for {DOWN_S:.0f} s: {total} messages from "
            f"{len(edges)} edges, 0 lost, 0 duplicates stored ({reoffered:.0f} re-deliveries "
            f"skipped by the natural key); first message published after the kill stored "
            f"{first_after - killed_at:.1f} s after it; publish -> stored p50 "
            f"{delays[len(delays) // 2]:.2f} s, p99 {delays[int(len(delays) * 0.99)]:.2f} s, "
            f"max {delays[-1]:.1f} s; while node 0 was down max {max(during):.1f} s; "
            f"B's shards {sorted(b_shards)} taken by A {taken_s:.1f} s after B stopped"
        )
    finally:
        for mosq in mosquittos:
            await asyncio.to_thread(mosq.stop)
        await asyncio.to_thread(cluster.stop)


async def _until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:.0f} s: {what}")
        await asyncio.sleep(0.1)


def _manager(member: str, heartbeat_s: float = 1.0) -> ShardManager:
    settings = Settings(mqtt_url="mqtt://127.0.0.1:1", metrics_port=0)
    sites = [f"s{i}" for i in range(40)]
    return ShardManager(
        settings,
        site="centre",
        sites=sites,
        shards=8,
        heartbeat_s=heartbeat_s,
        metrics=ServiceMetrics("archiver", "centre"),
        subscribe=lambda bus, sites: None,
        member=member,
    )


def test_membership_ttl_offline_and_failover_time() -> None:
    m = _manager("Arch.One")
    assert m.topic == "pfm/v1/centre/archiver/arch-one/presence"
    assert m.client_id(3) == "pfm-archiver-centre-shard-03"
    now = 10_000.0
    m._since = now - 100  # connected for a long time
    m.seen = {"b": (True, now - 5), "c": (False, now), "d": (True, now - 11)}
    # b heard 5 s ago (TTL 10 heartbeats = 10 s): alive; c said offline; d silent too long
    assert m.alive(now) == ["Arch.One", "b"]
    assert m.wanted(now) == {k for k in m.by_shard if owner(k, ["Arch.One", "b"]) == "Arch.One"}
    # just reconnected after a broker failover: nobody is dropped for our own silence
    m._since = now - 2
    assert m.alive(now) == ["Arch.One", "b", "d"]
    # alone, it wants every shard that has sites
    m.seen = {}
    assert m.wanted(now) == set(m.by_shard)
    assert sum(len(v) for v in m.by_shard.values()) == 40


def test_shards_and_share_group_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="shards and share_group exclude each other"):
        parse_site({"site": "centre", "archiver": {"shards": 4, "share_group": "g"}})
    with pytest.raises(ConfigError, match="heartbeat_s"):
        parse_site({"site": "centre", "archiver": {"shards": 4, "heartbeat_s": 0}})
    assert parse_site({"site": "centre", "archiver": {"shards": 4}}).archiver.shards == 4


@pytest.mark.timeout(60)
async def test_members_split_the_shards_and_keep_their_health_gauge(
    mqtt_url: str, site_name: str
) -> None:
    """On the machine's broker: a second member takes its shards from the first, which
    lets them go (their sessions closed) and still reports itself connected."""
    settings = Settings(mqtt_url=mqtt_url, metrics_port=0)
    sites = [f"s{i}" for i in range(6)]  # fixed: the split is the same every run

    names = _members_that_split(site_name, sites)  # each of the two gets a shard

    def member(name: str) -> ShardManager:
        return ShardManager(
            settings,
            site=site_name,
            sites=sites,
            shards=SHARDS,
            heartbeat_s=0.5,
            metrics=ServiceMetrics("archiver", site_name),
            subscribe=lambda bus, only: None,
            member=name,
        )

    a = member(names[0])
    used = set(a.by_shard)
    async with a:
        await _until(lambda: set(a.running) == used, 20, "A holds every shard")
        b = member(names[1])
        async with b:
            await _until(
                lambda: (
                    set(a.running) | set(b.running) == used
                    and not set(a.running) & set(b.running)
                    and bool(b.running)
                ),
                20,
                "B takes its shards",
            )
            await _until(lambda: len(b.buses) == len(b.running), 20, "B's sessions open")
            assert a.m.moves.labels("released")._value.get() >= 1
            assert a.metrics.bus_connected.labels("archiver")._value.get() == 1
        # B stops cleanly (announces offline): A takes everything back at once
        await _until(lambda: set(a.running) == used, 20, "A takes B's shards back")
