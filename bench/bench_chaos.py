"""Chaos run: the pipeline as deployed while its parts are killed, with a per-meter ledger.

The simulator, a private mosquitto (persistence on, the deployed in-flight window), a
private PostgreSQL (so that it can be stopped) and ``pfmon archiver``, ``pfmon
analytics`` and ``pfmon collector`` each in its own process, as ``bench_pipeline.py``
runs them. After a warm-up, faults are injected one after the other, each followed by
``--settle`` seconds of normal running:

* the broker: SIGTERM and restart; SIGKILL and restart (mosquitto writes its store
  every ``autosave_interval``: what it acknowledged since the last save is gone);
* the database: stopped (``pg_ctl stop -m fast``) for ``--db-down`` seconds;
* each service: SIGKILL and restart, SIGTERM and restart.

Then the collector stops cleanly (its per-meter ``seq`` is the count of what was
acquired), the pipeline drains, and the ledger compares, meter by meter, the acquired
seqs with the stored rows: per-reading ``pfm_metrics`` rows (by ``source_seq``) and
``pfm_readings`` rows (by ``seq``): lost, duplicated, unexpected. A collector killed
with SIGKILL resumes its seq from the clock, so the jump in its seqs that spans the kill
is reported apart, not as loss (what it had polled but not yet handed to the broker when
it was killed is not counted either way). For each fault the time until every service was
connected again and rows were being committed is printed.

Usage: ``python bench/bench_chaos.py [--meters 100] [--settle 15] [--only broker-kill,...]``
Exit code 1 when a row was lost or duplicated. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_collector import site_dict, start_simulator, wait_simulator
from bench_pipeline import (
    SERVICES,
    Service,
    deployed_inflight,
    scrape,
    service_env,
    start_service,
    total,
    wait_connected,
)

from services.archiver.migrate import migrate
from shared.embedded import LocalMosquitto, LocalPostgres, free_port
from shared.site import parse_site
from shared.spool import Spool

FAULTS = (
    "broker-term",
    "broker-kill",
    "db-stop",
    "archiver-kill",
    "archiver-term",
    "analytics-kill",
    "analytics-term",
    "collector-term",
    "collector-kill",
)


@dataclass
class Chaos:
    args: argparse.Namespace
    work: Path
    site_name: str = field(default_factory=lambda: f"chaos{uuid.uuid4().hex[:6]}")
    services: dict[str, Service] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    #: wall-clock times of the collector's SIGKILLs (holes across them were never published)
    collector_kills: list[datetime] = field(default_factory=list)
    recoveries: list[tuple[str, float | None]] = field(default_factory=list)


async def committed(svc: Service) -> float:
    try:
        return total(scrape(svc.port), "pfm_archiver_rows_total")
    except OSError:
        return -1.0


async def recovered(run: Chaos, started: float, timeout: float = 120.0) -> float | None:
    """Seconds from ``started`` until every service is connected and rows are committed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.proc.poll() is None and s.connected() for s in run.services.values()):
            before = await committed(run.services["archiver"])
            await asyncio.sleep(1.0)
            if before >= 0 and await committed(run.services["archiver"]) > before:
                return time.monotonic() - started
            continue
        await asyncio.sleep(0.5)
    return None


def restart(run: Chaos, name: str) -> None:
    run.services[name] = start_service(name, run.envs[name], run.work)


async def fault(
    run: Chaos, name: str, mosq: LocalMosquitto, pg: LocalPostgres
) -> Callable[[], Awaitable[None]]:
    """Inject fault ``name``; returns how to undo it."""
    what, _, how = name.partition("-")
    if what == "broker":
        assert mosq.proc is not None
        if how == "kill":
            mosq.proc.kill()
            mosq.proc.wait()
            mosq.proc = None
        else:
            mosq.stop()

        async def undo_broker() -> None:
            await asyncio.sleep(run.args.broker_down)
            mosq.start()

        return undo_broker
    if what == "db":
        await asyncio.to_thread(pg.stop)

        async def undo_db() -> None:
            await asyncio.sleep(run.args.db_down)
            await asyncio.to_thread(pg.start)

        return undo_db
    svc = run.services[what]
    if how == "kill":
        if what == "collector":
            run.collector_kills.append(datetime.now().astimezone())
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait()
    else:
        svc.stop()

    async def undo_service() -> None:
        await asyncio.sleep(1.0)
        restart(run, what)
        await wait_connected(run.services[what])

    return undo_service


@dataclass
class Ledger:
    acquired: int
    rows: int
    lost: int
    duplicates: int
    unexpected: int
    never_published: int


def ledger(
    last_seq: dict[str, int],
    rows: list[tuple[str, int, datetime]],
    kills: list[datetime],
) -> Ledger:
    """The stored (meter, seq, ts) of each meter against its seq run: the collector
    counts seq up by one per poll from a start it seeds from the clock (no saved seq, or
    after a crash), so what was acquired is every seq from the first stored one to the
    last the collector saved at its clean stop, except across a collector SIGKILL, where
    its seq jumps forward (those seqs were never published: counted as restarts)."""
    by_meter: dict[str, dict[int, datetime]] = {m: {} for m in last_seq}
    unexpected = duplicates = 0
    for meter, seq, ts in rows:
        seen = by_meter.get(meter)
        if seen is None or seq > last_seq[meter]:
            unexpected += 1
        elif seq in seen:
            duplicates += 1
        else:
            seen[seq] = ts
    lost = jumps = acquired = 0
    for meter, last in last_seq.items():
        seen = by_meter[meter]
        if not seen:
            continue
        seqs = sorted(seen)
        acquired += len(seqs) + (last - seqs[-1])  # a tail never stored is lost
        lost += last - seqs[-1]
        for before, after in itertools.pairwise(seqs):
            if after == before + 1:
                continue
            t0, t1 = seen[before], seen[after]
            if any(t0 <= k <= t1 for k in kills):
                jumps += 1  # the collector restarted after a SIGKILL: its seq jumped
            else:
                lost += after - before - 1
                acquired += after - before - 1
    return Ledger(
        acquired=acquired,
        rows=len(rows),
        lost=lost,
        duplicates=duplicates,
        unexpected=unexpected,
        never_published=jumps,
    )


async def chaos(run: Chaos) -> int:
    args = run.args
    per_port = -(-args.meters // args.ports)
    sim, base_port = start_simulator(per_port * args.ports, args.ports)
    pg = LocalPostgres(run.work / "pg")
    await asyncio.to_thread(pg.start)
    try:
        site = site_dict(run.site_name, base_port, args.ports, per_port, 2, 1.0)
        site_file = run.work / "site.yaml"
        site_file.write_text(yaml.safe_dump(site, sort_keys=False))
        cfg = parse_site(site)
        conn = await asyncpg.connect(pg.dsn)
        await migrate(conn, cfg.archiver)
        await conn.close()
        inflight = f"max_inflight_messages {args.broker_inflight}\n"
        mosq = LocalMosquitto(run.work / "mosq", persistence=True, extra_config=inflight).start()
        try:
            wait_simulator(base_port, args.ports)
            for name in SERVICES:
                env = service_env(name, site_file, mosq.url, pg.dsn, run.work / "data", free_port())
                env["PFM_LOG_LEVEL"] = "INFO"
                run.envs[name] = env
                restart(run, name)
                await wait_connected(run.services[name])
            print(
                f"{per_port * args.ports} meters at 1 Hz; private mosquitto (persistence, "
                f"autosave_interval 1 s), private PostgreSQL ({pg.flavour}); work folder "
                f"{run.work}",
                flush=True,
            )
            await asyncio.sleep(args.warmup)
            for name in [f for f in FAULTS if not args.only or f in args.only]:
                started = time.monotonic()
                undo = await fault(run, name, mosq, pg)
                await undo()
                took = await recovered(run, started)
                run.recoveries.append((name, took))
                shown = f"{took:.1f} s" if took is not None else "NOT RECOVERED in 120 s"
                print(f"  {name:16s} back to committing rows after {shown}", flush=True)
                await asyncio.sleep(args.settle)
            return await finish(run, pg, mosq, per_port)
        finally:
            for svc in run.services.values():
                svc.stop()
            mosq.stop()
    finally:
        sim.terminate()
        sim.wait(10)
        await asyncio.to_thread(pg.stop)


async def finish(run: Chaos, pg: LocalPostgres, mosq: LocalMosquitto, per_port: int) -> int:
    args = run.args
    run.services["collector"].stop()
    spool = Spool(run.work / "data" / "collector" / f"collector-{run.site_name}.spool")
    try:
        meters = [f"p{k}u{u}" for k in range(args.ports) for u in range(1, per_port + 1)]
        last_seq = {m: spool.get_meta(f"seq:{m}") or 0 for m in meters}
    finally:
        spool.close()
    conn = await asyncpg.connect(pg.dsn)
    try:
        want = sum(last_seq.values())
        deadline = time.monotonic() + args.drain
        prev, still = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = await conn.fetchval("SELECT count(*) FROM pfm_readings")
            if n != prev:
                prev, still = n, time.monotonic()
            elif time.monotonic() - still > 15:
                break
            if n >= want:
                await asyncio.sleep(5)  # the metrics rows follow the readings
                break
            await asyncio.sleep(1)
        metrics = await conn.fetch(
            "SELECT meter, source_seq, ts FROM pfm_metrics WHERE energy_s IS NOT NULL"
        )
        readings = await conn.fetch("SELECT meter, seq, ts FROM pfm_readings")
    finally:
        await conn.close()
    kills = run.collector_kills
    lm = ledger(last_seq, [(r[0], r[1], r[2]) for r in metrics], kills)
    lr = ledger(last_seq, [(r[0], r[1], r[2]) for r in readings], kills)
    print(f"faults: {', '.join(n for n, _ in run.recoveries)}")
    for label, led in (("per-reading metrics rows", lm), ("raw readings rows", lr)):
        print(
            f"  {label:26s} acquired {led.acquired}, rows {led.rows}: lost {led.lost}, "
            f"duplicates {led.duplicates}, unexpected {led.unexpected}; "
            f"seq jumps at a collector SIGKILL (not loss) {led.never_published}"
        )
    ok = lm.lost == lr.lost == 0 and lm.duplicates == lr.duplicates == 0
    ok = ok and all(t is not None for _, t in run.recoveries)
    print(f"  [{'PASS' if ok else 'FAIL'}] 0 lost, 0 duplicates, every fault recovered")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--meters", type=int, default=100)
    ap.add_argument("--ports", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=10.0, help="normal running after a fault")
    ap.add_argument("--broker-down", type=float, default=5.0)
    ap.add_argument("--db-down", type=float, default=20.0)
    ap.add_argument("--drain", type=float, default=180.0)
    ap.add_argument(
        "--only", type=lambda s: s.split(","), default=None, help=f"faults: {','.join(FAULTS)}"
    )
    ap.add_argument("--broker-inflight", type=int, default=deployed_inflight())
    args = ap.parse_args()
    bad = [f for f in args.only or [] if f not in FAULTS]
    if bad:
        ap.error(f"unknown fault(s) {bad}; known: {', '.join(FAULTS)}")
    run = Chaos(args, Path(tempfile.mkdtemp(prefix="pfm-bench-chaos-")))
    os.environ.setdefault("PFM_LOG_FORMAT", "json")
    return asyncio.run(chaos(run))


if __name__ == "__main__":
    sys.exit(main())
