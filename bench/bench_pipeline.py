"""Pipeline benchmark: simulated meters at 1 Hz through collector -> analytics -> archiver.

Targets: 1,000 meters (and 4,000: not met yet, README) at 1 Hz on this machine with
zero loss, no missed poll cycles and p99 latency from acquisition to the committed row
under 2 s; the pipeline's CPU per meter-second is printed. Everything runs as
deployed, each in its own process: ``pfmon simulate`` (many unit ids per port over
several ports, as ``bench_collector.py``), a private mosquitto with persistence, a
private schema in the machine's PostgreSQL, then ``pfmon archiver``, ``pfmon
analytics`` and ``pfmon collector`` configured by ``PFM_*`` variables and one site
file (product defaults unless an option below says otherwise).

* latency: the archiver's own histogram ``pfm_archiver_commit_latency_seconds{kind}``
  (commit time minus the message's ``ts``, which the collector stamps at the poll and
  analytics carries over), scraped at the end of the warm-up and after the drain; the
  difference is the run. Nothing is added to the rows or the services for it;
* loss: the collector's per-meter ``seq`` (1, 2, ... per successful poll, saved in its
  spool file at a clean stop) is the independent count of what was acquired; the bench
  compares it with the per-reading rows of ``pfm_metrics`` (``energy_s IS NOT NULL``,
  i.e. not the 3 s / 10 min aggregates) by ``source_seq`` and with ``pfm_readings`` by
  ``seq``, meter by meter, after the collector stopped and the pipeline drained;
* where the cores go: CPU ticks of every process (and of the archiver's PostgreSQL
  backends, found by ``application_name``) from ``/proc/<pid>/stat``, peak RSS
  (``VmHWM``), beside the whole machine's busy time (other work shares it).

Usage: ``python bench/bench_pipeline.py [--meters 1000] [--seconds 60] [--ports 5]``
Exit code 1 when a target is missed. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_archiver import schema_dsn
from bench_collector import ROOT, quantile, site_dict, start_simulator, wait_simulator

from services.archiver.migrate import migrate
from shared.embedded import LocalMosquitto, free_port
from shared.settings import load_settings
from shared.site import parse_site
from shared.spool import Spool

SERVICES = ("archiver", "analytics", "collector")  # start order: sinks first
APP_NAME = "pfm-bench-pipeline"  # the archiver's PostgreSQL backends carry it
TARGET_P99_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MOSQUITTO_DEFAULT_INFLIGHT = 20  # mosquitto.conf(5): max_inflight_messages

Samples = list[tuple[str, dict[str, str], float]]


# -- Prometheus ---------------------------------------------------------------------


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def latency_buckets(before: Samples, after: Samples, kind: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) of the commit-latency histogram of ``kind`` between two scrapes."""
    name = "pfm_archiver_commit_latency_seconds_bucket"

    def cumulative(samples: Samples) -> dict[float, float]:
        return {
            float(lab["le"]): v for n, lab, v in samples if n == name and lab.get("kind") == kind
        }

    b, a = cumulative(before), cumulative(after)
    return [(le, a[le] - b.get(le, 0.0)) for le in sorted(a)]


@dataclass
class Latency:
    count: int
    p50: float
    p99: float
    #: upper bound of the highest non-empty bucket (a histogram gives no exact maximum)
    max_le: float
    #: lower bound of that bucket
    max_above: float
    within_target: float


def latency(buckets: list[tuple[float, float]]) -> Latency:
    n = buckets[-1][1] if buckets else 0.0
    top = next((i for i in range(len(buckets) - 1, -1, -1) if buckets[i][1] < n), -1)
    # the highest bucket that gained observations is the one after the last below n
    max_le = buckets[top + 1][0] if n else 0.0
    max_above = buckets[top][0] if top >= 0 else 0.0
    at_target = next((c for le, c in buckets if le == TARGET_P99_S), 0.0)
    return Latency(
        count=int(n),
        p50=quantile(buckets, 0.50) if n else float("nan"),
        p99=quantile(buckets, 0.99) if n else float("nan"),
        max_le=max_le,
        max_above=max_above,
        within_target=at_target / n if n else float("nan"),
    )


# -- processes ----------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all its threads), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every core since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Usage:
    """CPU ticks per process at one instant; ``pids`` re-resolved each time."""

    name: str
    pids: Callable[[], list[int]]
    #: what it handles ("polls", "messages", "rows") and how many of those one reading makes
    unit: str = "readings"
    per_reading: float = 1.0
    start: dict[int, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    peak_mb: float = float("nan")
    #: units handled during the measured run
    handled: float = 0.0

    def begin(self) -> None:
        self.start = {pid: cpu_ticks(pid) for pid in self.pids()}

    def end(self) -> None:
        pids = self.pids()
        ticks = sum(cpu_ticks(pid) - self.start.get(pid, 0) for pid in pids)
        self.cpu_s = ticks / CLK_TCK
        if len(pids) == 1:
            self.peak_mb = peak_rss_mb(pids[0])


def deployed_inflight() -> int:
    """The deployed broker's in-flight window: the archiver acknowledges only after its
    commit, so this bounds what it can gather into a batch (the private broker of the
    tests has no limit, which would hide it)."""
    for line in (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "max_inflight_messages":
            return int(words[1])
    return MOSQUITTO_DEFAULT_INFLIGHT


def pid_of(pid: int) -> Callable[[], list[int]]:
    return lambda: [pid]


def service_env(
    name: str, site_file: Path, mqtt_url: str, dsn: str, data: Path, port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFM_")}
    env.update(
        PFM_SITE_FILE=str(site_file),
        PFM_MQTT_URL=mqtt_url,
        PFM_MQTT_CLIENT_ID=f"bench-{name}-{uuid.uuid4().hex[:6]}",
        PFM_DB_DSN=dsn,
        PFM_DATA_DIR=str(data / name),
        PFM_METRICS_HOST="127.0.0.1",
        PFM_METRICS_PORT=str(port),
        PFM_LOG_LEVEL="WARNING",
        PFM_LOG_FORMAT="json",
    )
    return env


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int

    def connected(self) -> bool:
        try:
            return total(scrape(self.port), "pfm_bus_connected", service=self.name) == 1
        except OSError:
            return False

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (a clean drain, as in production), then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_service(name: str, env: dict[str, str], log_dir: Path) -> Service:
    log = (log_dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", name],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return Service(name, proc, int(env["PFM_METRICS_PORT"]))


async def wait_connected(svc: Service, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not svc.connected():
        if svc.proc.poll() is not None:
            raise SystemExit(f"{svc.name} exited with {svc.proc.returncode}: see its log")
        if time.monotonic() > deadline:
            raise SystemExit(f"{svc.name} not connected to the broker after {timeout:g} s")
        await asyncio.sleep(0.2)


async def archiver_backends(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", APP_NAME
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


# -- loss ---------------------------------------------------------------------------


@dataclass
class Loss:
    expected: int
    rows: int
    lost: int
    duplicates: int
    unexpected: int
    meters_short: int


def compare(expected: dict[str, int], stored: list[tuple[str, int]]) -> Loss:
    """``expected[meter]`` = the last seq the collector saved; ``stored`` = (meter, seq) per
    row. The collector seeds a meter's first seq from the clock, so its run is taken to
    start at the lowest seq stored for it (a loss before the first stored row would not
    show; the per-meter count of polls does, in the collector's figures)."""
    seen: dict[str, set[int]] = {m: set() for m in expected}
    rows = unexpected = 0
    for meter, seq in stored:
        rows += 1
        if meter in seen and seq <= expected[meter]:
            seen[meter].add(seq)
        else:
            unexpected += 1
    distinct = sum(len(s) for s in seen.values())
    want = {m: (expected[m] - min(s) + 1 if s else 0) for m, s in seen.items()}
    return Loss(
        expected=sum(want.values()),
        rows=rows,
        lost=sum(want[m] - len(seen[m]) for m in expected),
        duplicates=rows - unexpected - distinct,
        unexpected=unexpected,
        meters_short=sum(1 for m in expected if len(seen[m]) < want[m]),
    )


async def count_per_reading_rows(conn: asyncpg.Connection) -> tuple[int, int]:
    metrics = await conn.fetchval("SELECT count(*) FROM pfm_metrics WHERE energy_s IS NOT NULL")
    readings = await conn.fetchval("SELECT count(*) FROM pfm_readings")
    return int(metrics), int(readings)


async def drain(
    conn: asyncpg.Connection, want: int, keep_readings: bool, timeout: float
) -> tuple[float, bool]:
    """Wait until every acquired reading has its rows (and nothing more moved for 3 s:
    the collector's last second), or nothing moved for 15 s."""
    started = last_move = time.monotonic()
    last = (-1, -1)
    while time.monotonic() - started < timeout:
        now = await count_per_reading_rows(conn)
        if now != last:
            last, last_move = now, time.monotonic()
        done = now[0] >= want and (now[1] >= want or not keep_readings)
        if done and time.monotonic() - last_move > 3:
            return time.monotonic() - started, True
        if time.monotonic() - last_move > 15:
            break
        await asyncio.sleep(0.5)
    return time.monotonic() - started, False


# -- the run ------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    site_name: str = field(default_factory=lambda: f"benchpipe{uuid.uuid4().hex[:6]}")
    services: dict[str, Service] = field(default_factory=dict)


def write_site(run: Run, base_port: int, per_port: int) -> tuple[Path, dict[str, Any]]:
    args = run.args
    site = site_dict(run.site_name, base_port, args.ports, per_port, args.connections, 1.0)
    archiver: dict[str, Any] = {}
    if args.batch_size:
        archiver["batch_size"] = args.batch_size
    if args.flush_interval:
        archiver["flush_interval_s"] = args.flush_interval
    if args.no_readings:
        archiver["keep_readings"] = False
    if args.archive_batches:
        archiver["archive_batches"] = True
        site.setdefault("analytics", {})["archive_batches"] = True
    if archiver:
        site["archiver"] = archiver
    path = run.work / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False))
    return path, site


async def progress(run: Run, seconds: float) -> None:
    """Every 10 s: what each stage did, so a stage falling behind shows as it happens."""
    arch, ana = run.services["archiver"], run.services["analytics"]
    prev: tuple[float, float, float] | None = None
    t_prev = time.monotonic()
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(10.0, left))
        a, n = scrape(arch.port), scrape(ana.port)
        now = (
            total(n, "pfm_messages_received_total", kind="reading"),
            total(n, "pfm_messages_published_total", kind="metrics"),
            total(a, "pfm_archiver_rows_total"),
        )
        t = time.monotonic()
        if prev is not None:
            rates = [(x - y) / (t - t_prev) for x, y in zip(now, prev, strict=True)]
            print(
                f"    analytics in {rates[0]:6.0f} readings/s, out {rates[1]:6.0f} metrics/s;"
                f" archiver {rates[2]:6.0f} rows/s,"
                f" lag {total(a, 'pfm_archiver_lag_seconds'):5.2f} s,"
                f" buffer {total(a, 'pfm_archiver_buffer_records'):6.0f},"
                f" spilled {total(a, 'pfm_archiver_spill_records'):6.0f}",
                flush=True,
            )
        prev, t_prev = now, t


def acquired(run: Run) -> tuple[dict[str, int], int]:
    """Per-meter last seq the collector saved at its clean stop, and records it still spools."""
    spool = Spool(run.work / "data" / "collector" / f"collector-{run.site_name}.spool")
    try:
        if not spool.get_meta("clean_stop"):
            raise SystemExit("the collector did not stop cleanly: its seq count is not final")
        meters = [
            f"p{k}u{u}" for k in range(run.args.ports) for u in range(1, run.args.per_port + 1)
        ]
        return {m: spool.get_meta(f"seq:{m}") or 0 for m in meters}, len(spool)
    finally:
        spool.close()


async def bench(run: Run) -> int:
    args = run.args
    base = load_settings()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    dsn = schema_dsn(base.db_dsn, schema)
    admin = await asyncpg.connect(base.db_dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    sim, base_port = start_simulator(args.meters, args.ports)
    try:
        site_file, site = write_site(run, base_port, args.per_port)
        cfg = parse_site(site)
        conn = await asyncpg.connect(dsn)
        await migrate(conn, cfg.archiver)
        inflight = f"max_inflight_messages {args.broker_inflight}\n"
        with LocalMosquitto(run.work / "mosq", persistence=True, extra_config=inflight) as mosq:
            wait_simulator(base_port, args.ports)
            arch_dsn = f"{dsn}&application_name={APP_NAME}"
            for name in SERVICES:
                env = service_env(
                    name, site_file, mosq.url, arch_dsn, run.work / "data", free_port()
                )
                if name == "archiver" and args.archiver_protocol:
                    env["PFM_MQTT_PROTOCOL"] = args.archiver_protocol
                run.services[name] = start_service(name, env, run.work)
                await wait_connected(run.services[name])
            try:
                return await measure(run, cfg, conn, sim, mosq, dsn)
            finally:
                for svc in run.services.values():
                    svc.stop()
                await conn.close()
    finally:
        sim.terminate()
        sim.wait(10)
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
        # the broker's store and the spools go (up to ~100 MB); site file and logs stay
        for folder in ("mosq", "data"):
            shutil.rmtree(run.work / folder, ignore_errors=True)


async def measure(
    run: Run,
    cfg: Any,
    conn: asyncpg.Connection,
    sim: subprocess.Popen[bytes],
    mosq: LocalMosquitto,
    dsn: str,
) -> int:
    args = run.args
    svc = run.services
    assert mosq.proc is not None
    meters = args.ports * args.per_port
    print(
        f"{meters} simulated PMTR_001 meters at 1 Hz on {args.ports} ports "
        f"({args.per_port} unit ids each, {args.connections} connections per port); "
        f"archiver batch {cfg.archiver.batch_size}, flush {cfg.archiver.flush_interval_s:g} s, "
        f"share group {cfg.archiver.share_group}, keep_readings {cfg.archiver.keep_readings}, "
        f"archiver MQTT {args.archiver_protocol or 'auto (v5)'}; "
        f"machine PostgreSQL (private schema), private mosquitto (persistence on, "
        f"max_inflight_messages {args.broker_inflight}); "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    print(f"  warm-up {args.warmup:g} s ...", flush=True)
    await asyncio.sleep(args.warmup)
    backends = await archiver_backends(dsn)
    usage = {
        "simulator": Usage("simulator", pid_of(sim.pid), "requests"),
        "mosquitto": Usage("mosquitto", pid_of(mosq.proc.pid), "polls"),
        **{name: Usage(name, pid_of(s.proc.pid), UNITS[name]) for name, s in svc.items()},
        "postgres": Usage("postgres (archiver)", lambda: backends, "rows"),
    }
    before = {name: scrape(s.port) for name, s in svc.items()}
    col0, arch0 = before["collector"], before["archiver"]
    for u in usage.values():
        u.begin()
    m0 = machine_ticks()
    t0 = time.monotonic()
    print(f"  measuring {args.seconds:g} s ...", flush=True)
    await progress(run, args.seconds)
    elapsed = time.monotonic() - t0
    backends = await archiver_backends(dsn)
    for u in usage.values():
        u.end()
    m1 = machine_ticks()
    after = {name: scrape(s.port) for name, s in svc.items()}
    col1 = after["collector"]
    polls = total(col1, "pfm_collector_polls_total") - total(col0, "pfm_collector_polls_total")
    missed = total(col1, "pfm_collector_missed_polls_total") - total(
        col0, "pfm_collector_missed_polls_total"
    )
    errors = total(col1, "pfm_collector_poll_errors_total") - total(
        col0, "pfm_collector_poll_errors_total"
    )
    # the collector stops first (as in production: producers first, then the sinks drain)
    col_end = scrape(svc["collector"].port)
    svc["collector"].stop()
    expected, spooled = acquired(run)
    # readings acquired by this collector process (its seqs are seeded from the clock, so
    # their count is the poll counter, not the last seq)
    want = int(total(col_end, "pfm_collector_polls_total"))
    drained_s, complete = await drain(conn, want, cfg.archiver.keep_readings, args.drain)
    arch1 = scrape(svc["archiver"].port)
    svc["analytics"].stop()
    svc["archiver"].stop()
    metrics_rows = await conn.fetch(
        "SELECT meter, source_seq FROM pfm_metrics WHERE energy_s IS NOT NULL"
    )
    reading_rows = await conn.fetch("SELECT meter, seq FROM pfm_readings")
    events = await conn.fetchval("SELECT count(*) FROM pfm_events")
    aggregates = await conn.fetchval("SELECT count(*) FROM pfm_metrics WHERE energy_s IS NULL")
    loss_m = compare(expected, [(r["meter"], r["source_seq"]) for r in metrics_rows])
    loss_r = compare(expected, [(r["meter"], r["seq"]) for r in reading_rows])
    lat = {k: latency(latency_buckets(arch0, arch1, k)) for k in ("metrics", "reading")}
    agg_lat = latency(latency_buckets(arch0, arch1, "aggregate"))
    redelivered = total(arch1, "pfm_archiver_duplicates_total")
    rows_per_reading = (loss_m.rows + loss_r.rows + aggregates + events) / max(1, want)
    handled(usage, before, after, polls, rows_per_reading)

    print(
        f"collector: {polls:.0f} polls in {elapsed:.1f} s ({polls / elapsed:.0f}/s, "
        f"expected {meters}/s), missed cycles {missed:.0f}, errors {errors:.0f}"
    )
    print(
        f"acquired (collector seq, whole run): {want} readings; {spooled} still in its spool"
        f" at exit; drain after the collector stopped: {drained_s:.1f} s"
        f"{'' if complete else ' (INCOMPLETE: rows stopped arriving)'}"
    )
    for label, loss in (("per-reading metrics rows", loss_m), ("raw readings rows", loss_r)):
        if label.startswith("raw") and not cfg.archiver.keep_readings:
            continue
        print(
            f"  {label:26s} {loss.rows:7d} rows: lost {loss.lost} "
            f"({loss.meters_short} meters short), duplicates {loss.duplicates}, "
            f"unexpected {loss.unexpected}"
        )
    print(
        f"  (also {aggregates} aggregate rows, {events} events; "
        f"{redelivered:.0f} re-delivered rows skipped by the natural key)"
    )
    print("latency acquisition (poll ts) -> committed row, archiver histogram over the run:")
    _print_latency("per-reading metrics", lat["metrics"])
    if cfg.archiver.keep_readings:
        _print_latency("raw readings", lat["reading"])
    _print_latency("aggregates (ts = block end)", agg_lat)
    _print_usage(list(usage.values()), elapsed, m0, m1, meters)
    checks = [
        (
            f"p99 acquisition -> committed metrics row < {TARGET_P99_S:g} s",
            lat["metrics"].count > 0 and lat["metrics"].within_target >= 0.99,
        ),
        ("0 lost (per-reading metrics rows)", loss_m.lost == 0 and complete),
        ("0 duplicates", loss_m.duplicates == 0 and loss_r.duplicates == 0),
        ("1 Hz held: no missed poll cycles", missed == 0 and polls >= 0.98 * meters * elapsed),
    ]
    if cfg.archiver.keep_readings:
        checks.insert(2, ("0 lost (raw readings rows)", loss_r.lost == 0))
    for name, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    return 0 if all(ok for _, ok in checks) else 1


#: the unit of work of each service
UNITS = {"collector": "polls", "analytics": "readings", "archiver": "messages"}


def handled(
    usage: dict[str, Usage],
    before: dict[str, Samples],
    after: dict[str, Samples],
    polls: float,
    rows_per_reading: float,
) -> None:
    """What each process handled during the run, to turn its CPU into a cost per unit."""

    def delta(service: str, name: str, **labels: str) -> float:
        return total(after[service], name, **labels) - total(before[service], name, **labels)

    usage["simulator"].handled = polls  # one request per poll (the PMTR_001 block)
    usage["mosquitto"].handled = polls  # every message a reading causes, in and out
    usage["collector"].handled = polls
    usage["analytics"].handled = delta("analytics", "pfm_messages_received_total", kind="reading")
    usage["archiver"].handled = delta("archiver", "pfm_messages_received_total")
    usage["postgres"].handled = delta("archiver", "pfm_archiver_rows_total")
    usage["postgres"].per_reading = rows_per_reading
    # messages, not rows: with archive batches one message carries many rows
    usage["archiver"].per_reading = usage["archiver"].handled / polls if polls else 0.0


def _print_latency(label: str, lat: Latency) -> None:
    if not lat.count:
        print(f"  {label:28s} no rows")
        return
    print(
        f"  {label:28s} {lat.count:7d} rows: p50 {lat.p50:.2f} s, p99 {lat.p99:.2f} s, "
        f"max in ({lat.max_above:g}, {lat.max_le:g}] s; "
        f"{100 * lat.within_target:.2f} % within {TARGET_P99_S:g} s"
    )


def _print_usage(
    usage: list[Usage], elapsed: float, m0: tuple[int, int], m1: tuple[int, int], meters: int
) -> None:
    """CPU per process, its cost per unit of work, and what ``meters`` at 1 Hz would need
    (cost x units per reading x meters): a stage starved of CPU shows a low rate but
    the same cost, so the projection says what the machine must give it."""
    cores = os.cpu_count() or 1
    ours = sum(u.cpu_s for u in usage)
    busy = (m1[0] - m0[0]) / (m1[1] - m0[1]) * cores
    need = 0.0
    print(f"CPU over the measured run (100 % = one core); what {meters} meters at 1 Hz need:")
    for u in usage:
        rss = "" if u.peak_mb != u.peak_mb else f"peak RSS {u.peak_mb:4.0f} MB"
        cost = u.cpu_s / u.handled if u.handled else float("nan")
        demand = cost * u.per_reading * meters
        need += demand if demand == demand else 0.0
        print(
            f"  {u.name:20s} {100 * u.cpu_s / elapsed:4.0f} %  {u.handled / elapsed:6.0f}"
            f" {u.unit}/s  {1e6 * cost:5.0f} µs each ({u.per_reading:.2f} per reading)"
            f" -> {100 * demand:4.0f} %  {rss}"
        )
    print(
        f"  {'all of the above':20s} {100 * ours / elapsed:4.0f} %"
        f"{'':38s} -> {100 * need:4.0f} % needed; whole machine busy {100 * busy:.0f} %"
        f" of {100 * cores} % (other work {100 * max(0.0, busy - ours / elapsed):.0f} %)"
    )
    sim = next((u for u in usage if u.name == "simulator"), None)
    polls = next((u.handled for u in usage if u.name == "collector"), 0.0)
    if sim is not None and polls:
        # a meter-second is one poll at 1 Hz: the pipeline's CPU per meter, simulator aside
        per = (ours - sim.cpu_s) / polls
        print(
            f"  pipeline without the simulator: {1e3 * per:.3f} ms CPU per meter-second"
            f" (target <= 0.30 at 4,000 meters, < 0.45 at 1,000)"
        )
    ana = next((u for u in usage if u.name == "analytics"), None)
    if ana is not None and ana.peak_mb == ana.peak_mb and meters:
        print(f"  analytics memory: peak RSS {1e3 * ana.peak_mb / meters:.0f} kB per meter")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--meters", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0, help="measured run after warm-up")
    ap.add_argument("--ports", type=int, default=5)
    ap.add_argument("--connections", type=int, default=4, help="Modbus connections per port")
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--drain", type=float, default=120.0, help="longest wait for the last rows")
    ap.add_argument("--batch-size", type=int, help="site file archiver.batch_size (default 500)")
    ap.add_argument(
        "--flush-interval", type=float, help="site file archiver.flush_interval_s (default 1)"
    )
    ap.add_argument(
        "--no-readings",
        action="store_true",
        help="site file archiver.keep_readings: false (raw readings not stored)",
    )
    ap.add_argument(
        "--archive-batches",
        action="store_true",
        help="analytics and archiver archive_batches: true (metrics to the archiver in\n"
        "archive batches instead of one message each)",
    )
    ap.add_argument(
        "--archiver-protocol",
        choices=("5", "3.1.1"),
        help="PFM_MQTT_PROTOCOL of the archiver only (docs/archiver.md: 3.1.1 is cheaper)",
    )
    ap.add_argument(
        "--broker-inflight",
        type=int,
        default=deployed_inflight(),
        help="mosquitto max_inflight_messages (unacknowledged messages per client, 0 = no\n"
        "limit; default: deploy/mosquitto/mosquitto.conf's, mosquitto's 20 if it sets none)",
    )
    args = ap.parse_args()
    args.per_port = -(-args.meters // args.ports)
    if args.per_port > 247:
        ap.error(f"{args.per_port} meters per port: use more --ports (max 247 unit ids)")
    args.meters = args.per_port * args.ports
    run = Run(args, Path(tempfile.mkdtemp(prefix="pfm-bench-pipeline-")))
    print(f"work folder (site file, service logs): {run.work}")
    return asyncio.run(bench(run))


if __name__ == "__main__":
    sys.exit(main())
