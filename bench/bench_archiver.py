"""Archiver throughput: MQTT in -> rows committed, against a bare COPY of the same rows.

Run: ``.venv/bin/python bench/bench_archiver.py [--messages 50000] [--meters 200]``.

1. Baseline: the same rows written with one bare ``copy_records_to_table`` into
   ``pfm_metrics`` (same table, same indexes) in a private schema.
2. End to end: the messages are queued on a private mosquitto for the archiver's
   persistent session while it is away; the archiver then starts and the clock runs
   from its connection to the last row committed (validation, buffering, staging COPY,
   ``ON CONFLICT`` merge, rollup marks, acknowledgements - all of it).

Prints both rates and their ratio (target >= 50 %). Uses the database named by
``PFM_DB_DSN`` (default: the machine's PostgreSQL), in a schema dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.archiver.ingest import TABLE_COLUMNS, RowBuilder, write_batch
from services.archiver.migrate import migrate
from services.archiver.service import Archiver
from shared import topics
from shared.bus import Bus
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement as M
from shared.messages import Metrics, Reading
from shared.service import Shutdown, tune_gc
from shared.settings import Settings, load_settings
from shared.site import parse_site


def schema_dsn(dsn: str, schema: str) -> str:
    parts = urlsplit(dsn)
    query = (parts.query + "&" if parts.query else "") + urlencode({"search_path": schema})
    return urlunsplit(parts._replace(query=query))


def make_messages(site: str, n: int, meters: int) -> list[Metrics]:
    t0 = datetime.now(UTC) - timedelta(hours=1)
    out = []
    for i in range(n):
        k = i % meters
        p, s = 10_000.0 + k, 12_000.0 + k
        values = {
            M.VOLTAGE_L1: 230.1,
            M.VOLTAGE_L2: 229.8,
            M.VOLTAGE_L3: 231.0,
            M.CURRENT_L1: 17.0,
            M.CURRENT_L2: 18.0,
            M.CURRENT_L3: 16.5,
            M.POWER_L1: p / 3,
            M.POWER_L2: p / 3,
            M.POWER_L3: p / 3,
            M.APPARENT_POWER_L1: s / 3,
            M.APPARENT_POWER_L2: s / 3,
            M.APPARENT_POWER_L3: s / 3,
            M.NONACTIVE_POWER_L1: math.sqrt(s * s - p * p) / 3,
            M.NONACTIVE_POWER_L2: math.sqrt(s * s - p * p) / 3,
            M.NONACTIVE_POWER_L3: math.sqrt(s * s - p * p) / 3,
            M.POWER: p,
            M.APPARENT_POWER: s,
            M.POWER_FACTOR: p / s,
        }
        out.append(
            Metrics(
                site=site,
                meter=f"m{k}",
                ts=t0 + timedelta(seconds=i // meters),
                seq=i // meters,
                interval_s=1.0,
                values=values,
                # as analytics sends them: five moving-average slots of the values
                averages={slot: dict(values) for slot in ("5s", "10s", "20s", "30s", "60s")},
            )
        )
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``; the database
    runs on this machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: (wall seconds, CPU seconds of the PostgreSQL backend)
Timed = tuple[float, float]


async def baseline(dsn: str, rows: list[tuple[object, ...]]) -> Timed:
    conn = await asyncpg.connect(dsn)
    try:
        pid = conn.get_server_pid()
        cpu, started = cpu_seconds(pid), time.perf_counter()
        await conn.copy_records_to_table(
            "pfm_metrics", records=rows, columns=TABLE_COLUMNS["pfm_metrics"]
        )
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics") == len(rows)
        await conn.execute("TRUNCATE pfm_metrics, pfm_rollup_dirty")
        return elapsed, cpu
    finally:
        await conn.close()


async def write_path(dsn: str, rows: list[tuple[object, ...]], batch: int) -> Timed:
    """The archiver's own database path alone: COPY (the staging merge when a key refuses
    it) + rollup marks."""
    conn = await asyncpg.connect(dsn)
    try:
        pid = conn.get_server_pid()
        staged: set[str] = set()
        cpu, started = cpu_seconds(pid), time.perf_counter()
        for i in range(0, len(rows), batch):
            await write_batch(
                conn, {"pfm_metrics": rows[i : i + batch]}, mark_dirty=True, staged=staged
            )
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics") == len(rows)
        await conn.execute("TRUNCATE pfm_metrics, pfm_rollup_dirty")
        return elapsed, cpu
    finally:
        await conn.close()


async def merge_path(
    dsn: str, msgs: list[Metrics], rows: list[tuple[object, ...]], batch: int
) -> Timed:
    """For comparison: every batch through the staging ``ON CONFLICT`` merge with the
    messages' moving averages as jsonb (what the archiver wrote before it copied
    straight into the table and left the averages out)."""
    cols = (*TABLE_COLUMNS["pfm_metrics"], "averages")
    full = [
        (*r, orjson.dumps(m.averages, option=orjson.OPT_NON_STR_KEYS).decode())
        for r, m in zip(rows, msgs, strict=True)
    ]
    collist = ", ".join(cols)
    conn = await asyncpg.connect(dsn)
    try:
        pid = conn.get_server_pid()
        await conn.execute(
            "CREATE TEMP TABLE bench_stage (LIKE pfm_metrics INCLUDING DEFAULTS)"
            " ON COMMIT DELETE ROWS"
        )
        cpu, started = cpu_seconds(pid), time.perf_counter()
        for i in range(0, len(full), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "bench_stage", records=full[i : i + batch], columns=cols
                )
                await conn.execute(
                    f"INSERT INTO pfm_metrics ({collist}) SELECT {collist} FROM bench_stage"
                    " ON CONFLICT DO NOTHING"
                )
                await conn.execute(
                    "INSERT INTO pfm_rollup_dirty (site, meter, ts) SELECT DISTINCT site, meter,"
                    " date_bin('1 minute', ts, TIMESTAMPTZ '2000-01-03 00:00:00+00')"
                    " FROM bench_stage ORDER BY 1, 2, 3 ON CONFLICT DO NOTHING"
                )
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
        assert await conn.fetchval("SELECT count(*) FROM pfm_metrics") == len(rows)
        await conn.execute("TRUNCATE pfm_metrics, pfm_rollup_dirty")
        return elapsed, cpu
    finally:
        await conn.close()


async def end_to_end(
    settings: Settings, site_name: str, msgs: list[Metrics], batch: int
) -> tuple[float, float, float]:
    """Wall seconds, the archiver's CPU seconds (this process) and its PostgreSQL
    backend's CPU seconds, from its connection to the last commit."""
    site = parse_site(
        {
            "site": site_name,
            "archiver": {
                "batch_size": batch,
                "flush_interval_s": 0.2,
                "share_group": None,
                "known": {site_name: sorted({m.meter for m in msgs})},
                "buffer_max_records": max(20_000, batch * 4),
                "rollup_interval_s": 3600,
            },
        }
    )

    async def start() -> tuple[Archiver, asyncio.Task[None], Shutdown]:
        shutdown = Shutdown()
        arch = Archiver(settings, site, shutdown)
        task = asyncio.create_task(arch.run())
        while arch.bus is None or not arch.bus.connected:
            await asyncio.sleep(0.01)
        return arch, task, shutdown

    # 1. a persistent session with its subscriptions, then away
    arch, task, shutdown = await start()
    shutdown.request("session made")
    await task
    # 2. queue every message for it
    pub = settings.model_copy(update={"mqtt_client_id": "bench-pub"})
    async with Bus(pub, service="bench", site=site_name, persistent=False) as bus:
        await bus.wait_connected(10)
        sem = asyncio.Semaphore(200)

        async def one(m: Metrics) -> None:
            async with sem:
                await bus.publish(topics.metrics(site_name, m.meter), m)

        t = time.perf_counter()
        await asyncio.gather(*(one(m) for m in msgs))
        print(f"  (queued {len(msgs)} messages in {time.perf_counter() - t:.2f} s)")
    # 3. the archiver comes back: clock from its connection to the last commit
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        # the benchmark's own messages and rows are not the service's: out of its GC
        gc.freeze()
        started, own_cpu = time.perf_counter(), time.process_time()
        arch, task, shutdown = await start()
        backend, backend_cpu = None, 0.0
        received_at = None
        received = arch.metrics.received.labels("archiver", "metrics")
        while arch.m.rows.labels("pfm_metrics")._value.get() < len(msgs):
            await asyncio.sleep(0.01)
            if backend is None and arch._conn is not None:
                backend = arch._conn.get_server_pid()
                backend_cpu = cpu_seconds(backend)
            if received_at is None and received._value.get() >= len(msgs):
                received_at = time.perf_counter() - started
            if time.perf_counter() - started > 300:
                raise SystemExit("archiver did not commit every row in 300 s")
        elapsed, own_cpu = time.perf_counter() - started, time.process_time() - own_cpu
        if backend is not None:
            backend_cpu = cpu_seconds(backend) - backend_cpu
        print(
            f"  (all received after {received_at or elapsed:.2f} s,"
            f" committed after {elapsed:.2f} s,"
            f" {arch.m.batches._value.get():.0f} batches)"
        )
        shutdown.request("done")
        await task
        n = await conn.fetchval("SELECT count(*) FROM pfm_metrics")
        assert n == len(msgs), f"{n} rows for {len(msgs)} messages"
    finally:
        await conn.close()
    return elapsed, own_cpu, backend_cpu


async def live(settings: Settings, site_name: str, meters: int, seconds: int) -> None:
    """``meters`` meters at 1 Hz (a metrics and a reading message each per second), stamped
    at publication (= acquisition; the collector and analytics hops are not included):
    rows lost, and commit latency percentiles."""
    site = parse_site(
        {"site": site_name, "archiver": {"known": {site_name: [f"m{k}" for k in range(meters)]}}}
    )
    shutdown = Shutdown()
    arch = Archiver(settings, site, shutdown)
    arch.latencies = []
    task = asyncio.create_task(arch.run())
    while arch.bus is None or not arch.bus.connected:
        await asyncio.sleep(0.01)
    pub = settings.model_copy(update={"mqtt_client_id": "bench-live-pub"})
    sent = 0
    late = 0
    async with Bus(pub, service="bench", site=site_name, persistent=False) as bus:
        await bus.wait_connected(10)
        sem = asyncio.Semaphore(500)

        async def one(topic: str, model: Metrics | Reading) -> None:
            async with sem:
                await bus.publish(topic, model)

        t0 = time.monotonic()
        for second in range(seconds):
            now = datetime.now(UTC)
            batch = []
            for k in range(meters):
                m = make_messages(site_name, 1, 1)[0]
                m.meter, m.ts, m.seq = f"m{k}", now, second
                r = Reading(
                    site=site_name,
                    meter=f"m{k}",
                    ts=now,
                    seq=second,
                    profile="bench",
                    values={M.VOLTAGE_L1: 230.0, M.CURRENT_L1: 10.0, M.POWER_L1: 2000.0},
                )
                batch.append(one(topics.metrics(site_name, f"m{k}"), m))
                batch.append(one(topics.reading(site_name, f"m{k}"), r))
            await asyncio.gather(*batch)
            sent += 2 * meters
            ahead = t0 + second + 1 - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
            else:
                late += 1
    deadline = time.monotonic() + 60
    rows = arch.m.rows
    while time.monotonic() < deadline:
        done = rows.labels("pfm_metrics")._value.get() + rows.labels("pfm_readings")._value.get()
        if done >= sent:
            break
        await asyncio.sleep(0.1)
    shutdown.request("done")
    await task
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM pfm_metrics") + await conn.fetchval(
            "SELECT count(*) FROM pfm_readings"
        )
    finally:
        await conn.close()
    lat = sorted(arch.latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    print(
        f"live: {meters} meters at 1 Hz (metrics + reading) for {seconds} s = {sent} messages"
        f" ({late} seconds the publisher fell behind)"
    )
    print(f"  stored {stored} rows, lost {sent - stored}")
    print(
        f"  publish -> commit latency: p50 {pct(0.50):.3f} s, p99 {pct(0.99):.3f} s,"
        f" max {lat[-1] if lat else float('nan'):.3f} s (batch {site.archiver.batch_size},"
        f" flush {site.archiver.flush_interval_s:g} s)"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--meters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--live-meters", type=int, default=0, help="run the 1 Hz live test instead")
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    tune_gc()  # the archiver runs in this process: collect garbage as `pfmon archiver` does
    base = load_settings()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    site_name = f"bench{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix="pfm-bench-archiver-"))
    admin = await asyncpg.connect(base.db_dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        dsn = schema_dsn(base.db_dsn, schema)
        conn = await asyncpg.connect(dsn)
        await migrate(conn, parse_site({"site": site_name}).archiver)
        await conn.close()
        if args.live_meters:
            with LocalMosquitto(work / "mosq", persistence=True) as mosq:
                settings = base.model_copy(
                    update={
                        "mqtt_url": mosq.url,
                        "db_dsn": dsn,
                        "data_dir": work / "data",
                        "metrics_port": 0,
                        "mqtt_client_id": f"bench-live-{site_name}",
                        "log_level": "WARNING",
                    }
                )
                await live(settings, site_name, args.live_meters, args.seconds)
            return
        msgs = make_messages(site_name, args.messages, args.meters)
        rows = [RowBuilder(lambda m: 1.0).metrics(m) for m in msgs]
        with LocalMosquitto(work / "mosq", persistence=True) as mosq:
            settings = base.model_copy(
                update={
                    "mqtt_url": mosq.url,
                    "db_dsn": dsn,
                    "data_dir": work / "data",
                    "metrics_port": 0,
                    "mqtt_client_id": f"bench-arch-{site_name}",
                    "log_level": "WARNING",
                }
            )
            copy_s, copy_cpu = await baseline(dsn, rows)
            merge_s, merge_cpu = await merge_path(dsn, msgs, rows, args.batch)
            path_s, path_cpu = await write_path(dsn, rows, args.batch)
            e2e_s, arch_cpu, db_cpu = await end_to_end(settings, site_name, msgs, args.batch)
        n = len(msgs)

        def us(cpu: float) -> str:
            return f"PostgreSQL {cpu / n * 1e6:5.1f} us CPU a row"

        print(f"archiver benchmark: {n} metrics messages, {args.meters} meters, batch {args.batch}")
        print(
            f"  baseline bare copy_records_to_table: {copy_s:.2f} s = {n / copy_s:,.0f} rows/s"
            f"  {us(copy_cpu)}"
        )
        print(
            f"  staging merge, averages as jsonb:    {merge_s:.2f} s = {n / merge_s:,.0f} rows/s"
            f" ({copy_s / merge_s:.0%})  {us(merge_cpu)}"
        )
        print(
            f"  archiver DB path (COPY + marks):     {path_s:.2f} s = {n / path_s:,.0f} rows/s"
            f" ({copy_s / path_s:.0%})  {us(path_cpu)}"
        )
        print(
            f"  end to end (MQTT in -> committed):   {e2e_s:.2f} s = {n / e2e_s:,.0f} rows/s"
            f" (MQTT {settings.mqtt_protocol})"
        )
        print(f"  ratio: {copy_s / e2e_s:.0%} of the bare COPY (target >= 50 %)")
        cores = arch_cpu + db_cpu
        print(
            f"  CPU end to end: archiver {arch_cpu / n * 1e6:.1f} us a row, its PostgreSQL"
            f" {db_cpu / n * 1e6:.1f} us: {n / cores:,.0f} rows per core-second"
            f" (bare COPY: {n / copy_cpu if copy_cpu else math.inf:,.0f} rows per PostgreSQL"
            " core-second)"
        )
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
