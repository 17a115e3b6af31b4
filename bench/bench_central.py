"""The central tier under N branches' worth of messages: broker ingest and archiver drain.

Run: ``.venv/bin/python bench/bench_central.py [--broker nats|mosquitto] [--branches 10]
[--meters 100] [--seconds 10] [--shards 16] [--archivers 1] [--batches 100]``.

1. The centre's broker: a 3-node NATS JetStream cluster on loopback (``--broker nats``,
   MQTT 3.1.1, sessions and QoS 1 queues replicated on 3 nodes), or one private Mosquitto
   (``--broker mosquitto``), both with archive shards (``archiver.shards``).
2. The archivers start once to make their shard sessions (subscriptions), then stop.
3. ``branches x meters x seconds`` per-second ``metrics`` messages (what an edge's bridge
   forwards at 1 Hz: 18 archived values each) are published into the centre at QoS 1
   while the archivers are away: the broker's ingest rate (messages and bytes per second,
   each one stored and, on NATS, replicated before its PUBACK). With ``--batches N`` each
   branch's second goes out as archive batches of at most N messages instead
   (``pfm/v1/{site}/archive/analytics``, what ``--bridge-metrics batches`` forwards), and
   the archivers run with ``archive_batches``: the broker's CPU is then also given a row.
4. The archivers come back and drain the backlog: the clock runs from their start to the
   last row committed; rows/s, and rows/s per archiver core (this process's CPU time over
   the drain: the archivers run here, the broker and PostgreSQL in their own processes).
5. The table's size per row in PostgreSQL (heap + indexes), for the scale model.

Uses the database named by ``PFM_DB_DSN`` (default: the machine's PostgreSQL), in a
schema dropped at the end. docs/scale.md builds on these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_archiver import make_messages, schema_dsn
from bench.bench_pipeline import cpu_ticks
from services.archiver.service import Archiver
from services.archiver.shards import assign
from shared import topics
from shared.bus import Bus
from shared.embedded import LocalMosquitto
from shared.messages import encode_archive_batch
from shared.service import Shutdown
from shared.settings import Settings, load_settings
from shared.site import SiteConfig, parse_site
from tests.nats_cluster import NatsCluster, deploy_mqtt_options

APP_NAME = "pfm-bench-central"


async def archiver_backends(dsn: str) -> list[int]:
    """The PostgreSQL backends of this bench's archivers."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = $1 AND pid <> pg_backend_pid()",
            APP_NAME,
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


@dataclass
class Broker:
    url: str
    pids: list[int]

    def cpu_s(self) -> float:
        """CPU seconds the broker's processes used so far."""
        return sum(cpu_ticks(pid) for pid in self.pids) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def broker(kind: str, workdir: Path, max_ack_pending: int) -> Iterator[Broker]:
    """The centre's broker."""
    if kind == "nats":
        options = f"max_ack_pending: {max_ack_pending}" if max_ack_pending else None
        with NatsCluster(workdir / "nats", mqtt_options=options) as cluster:
            cluster.wait_ready()
            yield Broker(cluster.mqtt_url, [p.pid for p in cluster.procs if p is not None])
    else:
        with LocalMosquitto(workdir / "mosq", persistence=True) as mosq:
            assert mosq.proc is not None
            yield Broker(mosq.url, [mosq.proc.pid])


@contextlib.asynccontextmanager
async def archivers(
    settings: Settings, site: SiteConfig, n: int, workdir: Path
) -> AsyncIterator[list[Archiver]]:
    """``n`` archiver members in this process, holding every shard between them."""
    running: list[tuple[Archiver, asyncio.Task[None], Shutdown]] = []
    try:
        for i in range(n):
            s = settings.model_copy(
                update={"mqtt_client_id": f"bench-central-a{i}", "data_dir": workdir / f"a{i}"}
            )
            shutdown = Shutdown()
            arch = Archiver(s, site, shutdown)
            task = asyncio.create_task(arch.run(), name=f"bench-archiver-{i}")
            running.append((arch, task, shutdown))
        archs = [a for a, _, _ in running]
        deadline = time.monotonic() + 120
        while True:
            held = [a.shards for a in archs if a.shards is not None]
            if len(held) == n and all(len(h.alive()) == n for h in held):
                buses = [b for h in held for b in h.buses.values()]
                owned = sum(len(h.running) for h in held)
                complete = owned == len(held[0].by_shard) == len(buses)
                if complete and all(b.connected for b in buses):
                    for b in buses:
                        await b.wait_subscribed(60)
                    break
            for _, task, _ in running:
                if task.done():
                    task.result()
            if time.monotonic() > deadline:
                raise SystemExit("the archivers did not take every shard in 120 s")
            await asyncio.sleep(0.1)
        yield archs
    finally:
        for _, _, shutdown in running:
            shutdown.request("bench done")
        await asyncio.gather(*(t for _, t, _ in running), return_exceptions=True)


def backlog(
    kind: str, sites: list[str], meters: int, seconds: int
) -> list[list[tuple[str, bytes]]]:
    """Per second, every site's ``metrics`` messages as (topic, payload): ``simple`` = 18
    archived values a meter; ``analytics`` = what the analytics service publishes (per
    reading, with its averages, plus the 3 s / 10 min aggregates), from its own engine."""
    per_second: list[list[tuple[str, bytes]]] = [[] for _ in range(seconds)]
    for s in sites:
        if kind == "simple":
            for i, msg in enumerate(make_messages(s, meters * seconds, meters)):
                payload = orjson.dumps(msg.model_dump(mode="json", by_alias=True))
                per_second[i // meters].append((topics.metrics(s, msg.meter), payload))
            continue
        from bench.bench_analytics import readings
        from bench.bench_analytics import site as analytics_site
        from services.analytics.batch import SiteEngine
        from services.analytics.output import encode_metrics
        from shared.messages import Reading

        engine = SiteEngine(analytics_site(meters, s))
        stream = readings(meters * seconds, meters, s)
        for second in range(seconds):
            batch = [
                Reading.model_validate_json(p)
                for p in stream[second * meters : (second + 1) * meters]
            ]
            for out in engine.on_readings(batch):
                for m in out.metrics:
                    per_second[second].append((topics.metrics(s, m.meter), encode_metrics(m)))
    return per_second


def as_batches(messages: list[list[tuple[str, bytes]]], most: int) -> list[list[tuple[str, bytes]]]:
    """Each second's messages as archive batches: per site, at most ``most`` messages a
    batch, on the site's ``archive/analytics`` topic (as an edge's analytics flushes one
    second of its meters)."""
    out: list[list[tuple[str, bytes]]] = []
    seq: dict[str, int] = {}
    for second in messages:
        by_site: dict[str, list[tuple[str, bytes]]] = {}
        for topic, payload in second:
            by_site.setdefault(topics.parse(topic).site, []).append((topic, payload))
        batches = []
        for site, items in by_site.items():
            for start in range(0, len(items), most):
                seq[site] = seq.get(site, 0) + 1
                payload = encode_archive_batch(
                    site, datetime.now(UTC), seq[site], "analytics", items[start : start + most]
                )
                batches.append((topics.archive(site, "analytics"), payload))
        out.append(batches)
    return out


async def publish_backlog(
    settings: Settings, messages: list[list[tuple[str, bytes]]]
) -> tuple[int, int, float]:
    """Every message at QoS 1, second by second: (messages, bytes, seconds)."""
    pub = settings.model_copy(update={"mqtt_client_id": f"bench-central-pub-{os.getpid()}"})
    count = size = 0
    async with Bus(pub, service="bench", site="centre", persistent=False, max_inflight=500) as bus:
        await bus.wait_connected(30)
        started = time.perf_counter()
        for second in messages:
            for topic, payload in second:
                while True:
                    try:
                        bus.publish_nowait(topic, payload)
                        break
                    except Exception:  # reconnecting: wait and try again
                        await asyncio.sleep(0.1)
                count += 1
                size += len(payload)
                if bus.unconfirmed >= 2000:
                    while bus.unconfirmed >= 1000:
                        await asyncio.sleep(0.005)
        await bus.drain(300)
        elapsed = time.perf_counter() - started
    return count, size, elapsed


def analytics_sizes(meters: int = 10, seconds: int = 700) -> None:
    """What an edge forwards per meter: the sizes of the analytics service's own
    ``metrics`` messages (per reading at 1 Hz, 3 s and 10 min aggregates) and the row
    fields each one fills, from its engine on simulated readings."""
    from bench.bench_analytics import readings
    from bench.bench_analytics import site as analytics_site
    from services.analytics.batch import SiteEngine
    from services.analytics.output import encode_metrics
    from services.archiver.ingest import RowBuilder
    from shared.messages import Metrics, Reading

    engine = SiteEngine(analytics_site(meters))
    stream = readings(meters * seconds, meters)
    sizes: dict[str, list[int]] = {}
    fields: dict[str, int] = {}
    rows = RowBuilder(lambda meter: 1.0)
    for i in range(0, len(stream), meters):
        batch = [Reading.model_validate_json(p) for p in stream[i : i + meters]]
        for out in engine.on_readings(batch):
            for m in out.metrics:
                payload = encode_metrics(m)
                kind = f"{m.interval_s:g} s aggregate" if m.aggregate else "per reading"
                sizes.setdefault(kind, []).append(len(payload))
                if kind not in fields:
                    row = rows.row(Metrics.model_validate_json(payload))
                    fields[kind] = sum(1 for v in row[1] if v is not None)
    print(f"analytics metrics messages ({meters} meters, {seconds} s at 1 Hz):")
    for kind, values in sizes.items():
        print(
            f"  {kind}: {len(values)} messages, mean {sum(values) / len(values):,.0f} bytes,"
            f" max {max(values):,}; {fields[kind]} row fields filled"
        )
    bench_row = rows.row(make_messages("s", 1, 1)[0])
    print(f"  (this bench's messages fill {sum(1 for v in bench_row[1] if v is not None)})")


async def bench(args: argparse.Namespace) -> None:
    base = load_settings()
    schema = f"bench_central_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(base.db_dsn)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    # the archivers' PostgreSQL backends carry this name: their CPU is read from /proc
    own_dsn = schema_dsn(base.db_dsn, schema)
    dsn = f"{own_dsn}&application_name={APP_NAME}"
    workdir = Path(tempfile.mkdtemp(prefix="pfm-bench-central-"))
    sites = [f"b{i:04d}" for i in range(args.branches)]
    largest = max(len(v) for v in assign(sites, args.shards).values())
    in_flight = args.max_ack_pending or int(deploy_mqtt_options().split(":")[1].split(",")[0])
    if args.broker == "nats" and largest * 5 * in_flight > 65_535:
        raise SystemExit(
            f"{largest} sites in one of {args.shards} shards x 5 subscriptions x"
            f" max_ack_pending {in_flight} > 65535: NATS would refuse the subscriptions;"
            " use more --shards or a lower --max-ack-pending"
        )
    meter_names = [f"m{k}" for k in range(args.meters)]
    site = parse_site(
        {
            "site": "centre",
            "archiver": {
                "sites": "all",
                "shards": args.shards,
                "heartbeat_s": 1.0,
                "keep_readings": False,
                "batch_size": args.batch,
                "flush_interval_s": 0.5,
                "buffer_max_records": max(20_000, args.batch * 4),
                "rollup_interval_s": 3600,
                "archive_batches": bool(args.batches),
                "known": dict.fromkeys(sites, meter_names),
            },
        }
    )
    try:
        with broker(args.broker, workdir, args.max_ack_pending) as centre:
            settings = Settings(
                mqtt_url=centre.url,
                mqtt_protocol="3.1.1",
                db_dsn=dsn,
                metrics_port=0,
                log_level="WARNING",
                log_format="text",
            )
            nodes = "3 nodes" if args.broker == "nats" else "1 node"
            if args.broker == "nats":
                nodes += f", max_ack_pending {args.max_ack_pending or 'as deployed'}"
            print(
                f"central tier on {args.broker} ({nodes})"
                f": {args.branches} branches x {args.meters} meters x {args.seconds} s at 1 Hz"
                f" ({args.payload} metrics messages"
                + (f", in archive batches of <= {args.batches}" if args.batches else "")
                + "),"
                f" {args.shards} shards, {args.archivers} archiver(s)"
            )
            async with archivers(settings, site, args.archivers, workdir):
                pass  # the shard sessions exist now; the archivers are away
            broker_cpu = centre.cpu_s()
            messages = backlog(args.payload, sites, args.meters, args.seconds)
            n = sum(len(second) for second in messages)  # rows to come
            if args.batches:
                messages = as_batches(messages, args.batches)
            sent, size, pub_s = await publish_backlog(settings, messages)
            broker_cpu, in_cpu = centre.cpu_s(), centre.cpu_s() - broker_cpu
            print(
                f"  broker ingest at QoS 1: {sent} messages, {size / sent:.0f} bytes each, in"
                f" {pub_s:.1f} s = {sent / pub_s:,.0f} msg/s, {size / pub_s / 1e6:.2f} MB/s;"
                f" broker CPU {in_cpu / sent * 1e6:.0f} us a message, {in_cpu / n * 1e6:.1f} us"
                f" a row ({n} rows)"
            )
            conn = await asyncpg.connect(own_dsn)
            try:
                cpu0, started = time.process_time(), time.perf_counter()
                async with archivers(settings, site, args.archivers, workdir) as archs:
                    resumed = time.perf_counter() - started
                    done_then = sum(a.m.rows.labels("pfm_metrics")._value.get() for a in archs)
                    backends = await archiver_backends(own_dsn)
                    db0 = sum(cpu_ticks(pid) for pid in backends)
                    deadline = time.monotonic() + 600
                    while sum(a.m.rows.labels("pfm_metrics")._value.get() for a in archs) < n:
                        if time.monotonic() > deadline:
                            raise SystemExit("the archivers did not commit every row in 600 s")
                        await asyncio.sleep(0.05)
                    elapsed = time.perf_counter() - started
                    cpu = time.process_time() - cpu0
                    out_cpu = centre.cpu_s() - broker_cpu
                    db_cpu = (sum(cpu_ticks(pid) for pid in backends) - db0) / os.sysconf(
                        "SC_CLK_TCK"
                    )
                rows = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
                table_bytes = await conn.fetchval("SELECT pg_total_relation_size('pfm_metrics')")
                heap_bytes = await conn.fetchval("SELECT pg_relation_size('pfm_metrics')")
            finally:
                await conn.close()
            assert rows == n, f"{rows} rows for {n} messages"
            print(
                f"  archiver drain: {rows} rows committed in {elapsed:.1f} s ="
                f" {rows / elapsed:,.0f} rows/s; archiver CPU {cpu:.1f} s ="
                f" {rows / cpu:,.0f} rows/s per archiver core ({cpu / rows * 1e6:.0f} us a row);"
                f" broker CPU {out_cpu / sent * 1e6:.0f} us a message delivered,"
                f" {out_cpu / rows * 1e6:.1f} us a row"
            )
            print(
                f"  of which resuming the {len(site.archiver.known)} sites' subscriptions in"
                f" {args.shards} shard sessions: {resumed:.1f} s ({done_then:.0f} rows committed"
                f" by then); after that {(rows - done_then) / (elapsed - resumed):,.0f} rows/s"
            )
            db_rows = rows - done_then
            print(
                f"  PostgreSQL: {table_bytes / rows:.0f} bytes a row with its indexes"
                f" ({heap_bytes / rows:.0f} heap); its backends' CPU"
                f" {db_cpu / db_rows * 1e6 if db_rows else float('nan'):.0f} us a row"
                f" ({len(backends)} backend(s))"
            )
    finally:
        conn = await asyncpg.connect(base.db_dsn)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("nats", "mosquitto"), default="nats")
    parser.add_argument("--branches", type=int, default=10)
    parser.add_argument("--meters", type=int, default=100, help="meters per branch")
    parser.add_argument("--seconds", type=int, default=10, help="seconds of 1 Hz data")
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--archivers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2000, help="archiver batch_size")
    parser.add_argument(
        "--max-ack-pending",
        type=int,
        default=0,
        help="NATS: mqtt { max_ack_pending } per subscription (default: the deployed"
        " configuration's, as pfmon init --engine nats writes it)",
    )
    parser.add_argument(
        "--payload",
        choices=("simple", "analytics"),
        default="simple",
        help="simple: 18 archived values a meter; analytics: the analytics service's messages",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=0,
        help="publish archive batches of at most this many messages (per branch and"
        " second) instead of per-meter messages; archivers with archive_batches",
    )
    parser.add_argument(
        "--sizes", action="store_true", help="only the sizes of analytics' metrics messages"
    )
    args = parser.parse_args()
    if args.sizes:
        analytics_sizes()
        return
    for name, value in vars(args).items():
        if type(value) is int and value < (0 if name in ("max_ack_pending", "batches") else 1):
            parser.error(f"--{name} must be >= 1, not {value}")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
