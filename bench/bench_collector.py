"""Collector benchmark: 1,000 simulated three-phase meters polled at 1 Hz.

The simulator runs beside the collector in its own process (``pfmon simulate``:
many unit ids per port, several ports); the collector publishes to a private
mosquitto. Three measurements in the same run, against the same servers:

1. baseline - a bare pymodbus client loop (same connections, same requests, no
   decoding or publishing) as fast as it goes: requests/s;
2. collector at saturation - the same 1,000 meters with a 50 ms interval, so the
   collector polls as fast as it can: requests/s (>= 70 % of the baseline);
3. collector at 1 Hz for ``--seconds``: missed poll cycles (0), p99 poll jitter
   (< 200 ms), polls/s, errors, peak memory (VmHWM < 150 MB).

Usage: ``python bench/bench_collector.py [--meters 1000] [--ports 5] [--seconds 30]``
Exit code 1 when a target is missed. Not part of the test suite.

``--register-cost`` measures instead what the PMTR_001's own moving averages (registers
98-114, the profile's ``device_averages`` group) would cost if they were polled: the bare
loop reading 78-97 (the poll), 78-114 in one read, and 78-97 plus 98-114 in two reads,
with the time the frames take on an RS-485 line at 9600 baud, 8N1.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.collector.profiles import PROFILES, Block  # noqa: E402
from shared.embedded import LocalMosquitto, free_port, wait_port  # noqa: E402


def site_dict(
    name: str, base_port: int, ports: int, per_port: int, connections: int, interval: float
) -> dict[str, Any]:
    buses = [
        {
            "name": f"sim{k}",
            "host": "127.0.0.1",
            "port": base_port + k,
            "connections": connections,
            "timeout_s": 1.0,
        }
        for k in range(ports)
    ]
    meters = [
        {
            "name": f"p{k}u{u}",
            "bus": f"sim{k}",
            "unit": u,
            "profile": "pmtr001",
            "interval_s": interval,
            "time_sync": False,
        }
        for k in range(ports)
        for u in range(1, per_port + 1)
    ]
    return {"site": name, "gateway": "bench", "buses": buses, "meters": meters}


async def baseline(
    base_port: int,
    ports: int,
    per_port: int,
    connections: int,
    seconds: float,
    blocks: list[Block] | None = None,
) -> float:
    """Bare pymodbus loop: every connection reads the PMTR_001 block(s) of its units in
    turn; polls (all ``blocks`` of one unit) per second."""
    from pymodbus.client import AsyncModbusTcpClient

    plan = blocks or PROFILES["pmtr001"].plan()
    count = 0
    stop = time.monotonic() + seconds

    async def loop(port: int, units: list[int]) -> None:
        nonlocal count
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
        await client.connect()
        i = 0
        while time.monotonic() < stop:
            ok = True
            for block in plan:
                rr = await client.read_holding_registers(
                    block.address, count=block.count, device_id=units[i % len(units)]
                )
                ok = ok and not rr.isError()
            if ok:
                count += 1
            i += 1
        client.close()

    tasks = []
    for k in range(ports):
        units = list(range(1, per_port + 1))
        for c in range(connections):
            tasks.append(loop(base_port + k, units[c::connections]))
    t0 = time.monotonic()
    await asyncio.gather(*tasks)
    return count / (time.monotonic() - t0)


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Quantile from cumulative histogram buckets (le, count), linear within a bucket."""
    total = buckets[-1][1]
    if total == 0:
        return 0.0
    target = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= target:
            if le == float("inf"):
                return prev_le
            frac = (target - prev_c) / (c - prev_c) if c > prev_c else 1.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_c = le, c
    return prev_le


def _collector_child(
    out: Any, site: dict[str, Any], mqtt_url: str, data: str, seconds: float, warmup: float
) -> None:
    """Runs in its own process: the collector for ``seconds``; sends back its figures."""
    import logging

    from services.collector import service as collector
    from shared.metrics import ServiceMetrics
    from shared.service import Shutdown
    from shared.settings import Settings
    from shared.site import parse_site

    logging.basicConfig(level=logging.ERROR)
    cfg = parse_site(site)
    settings = Settings(
        mqtt_url=mqtt_url,
        data_dir=Path(data),
        metrics_port=0,
        mqtt_client_id=f"bench-{os.getpid()}",
        log_format="text",
    )
    metrics = ServiceMetrics("collector", cfg.site)
    reg = metrics.registry

    def total(name: str) -> float:
        return sum(s.value for m in reg.collect() for s in m.samples if s.name == name)

    def buckets(name: str) -> list[tuple[float, float]]:
        return [
            (float(s.labels["le"]), s.value)
            for m in reg.collect()
            for s in m.samples
            if s.name == f"{name}_bucket"
        ]

    result: dict[str, Any] = {}

    async def main() -> None:
        shutdown = Shutdown()
        task = asyncio.create_task(collector.run(settings, cfg, shutdown, metrics=metrics))
        await asyncio.sleep(warmup)
        p0, m0, e0 = (
            total("pfm_collector_polls_total"),
            total("pfm_collector_missed_polls_total"),
            total("pfm_collector_poll_errors_total"),
        )
        j0 = buckets("pfm_collector_poll_jitter_seconds")
        cpu0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        j1 = buckets("pfm_collector_poll_jitter_seconds")
        jitter = [(le, c1 - c0) for (le, c1), (_, c0) in zip(j1, j0, strict=True)]
        result.update(
            polls=total("pfm_collector_polls_total") - p0,
            missed=total("pfm_collector_missed_polls_total") - m0,
            errors=total("pfm_collector_poll_errors_total") - e0,
            elapsed=elapsed,
            cpu_s=cpu,
            jitter_p50=quantile(jitter, 0.50),
            jitter_p99=quantile(jitter, 0.99),
            jitter_max_bucket=max((le for le, c in jitter if c > 0), default=0.0)
            if jitter and jitter[-1][1]
            else 0.0,
            spool=total("pfm_collector_spool_records"),
        )
        shutdown.request("bench done")
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                result[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    out.send(result)


def run_collector(
    site: dict[str, Any], mqtt_url: str, data: str, seconds: float, warmup: float
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_collector_child, args=(child, site, mqtt_url, data, seconds, warmup))
    proc.start()
    result: dict[str, Any] = parent.recv()
    proc.join(30)
    return result


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_simulator(meters: int, ports: int) -> tuple[subprocess.Popen[bytes], int]:
    """``pfmon simulate`` in its own process: ``meters`` PMTR_001 meters spread over
    ``ports`` consecutive free ports; returns the process and the first port."""
    base_port = free_port()
    while any(not port_free(base_port + k) for k in range(ports)):
        base_port = free_port()
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "simulate",
            "--port",
            str(base_port),
            "--meters",
            str(meters),
            "--ports",
            str(ports),
            "--profile",
            "pmtr001",
        ],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    return sim, base_port


def wait_simulator(base_port: int, ports: int) -> None:
    for k in range(ports):
        wait_port("127.0.0.1", base_port + k, timeout=60)


def rtu_ms(blocks: list[Block], baud: int = 9600) -> float:
    """Wire time of one poll on RS-485 (8N1: 10 bits a byte): per read an 8-byte request,
    a 5 + 2n byte answer and the 3.5-character silence after each frame."""
    char_ms = 10_000 / baud
    return sum((8 + 5 + 2 * b.count + 2 * 3.5) * char_ms for b in blocks)


def register_cost(args: argparse.Namespace) -> int:
    per_port = -(-args.meters // args.ports)
    sim, base_port = start_simulator(per_port * args.ports, args.ports)
    poll = PROFILES["pmtr001"].plan()
    group = PROFILES["pmtr001"].groups["device_averages"].plan()
    one = [Block("holding", poll[0].address, group[0].address + group[0].count - poll[0].address)]
    ways = [
        ("78-97 (the poll)", poll),
        ("78-114 in one read", one),
        ("78-97 + 98-114", poll + group),
    ]
    try:
        wait_simulator(base_port, args.ports)
        print(
            f"{per_port * args.ports} simulated PMTR_001 on {args.ports} ports, Modbus TCP; "
            f"{args.rounds} rounds of the three ways in turn, median",
            flush=True,
        )
        rates: dict[str, list[float]] = {label: [] for label, _ in ways}
        for _ in range(args.rounds):
            for label, blocks in ways:
                rate = asyncio.run(
                    baseline(
                        base_port,
                        args.ports,
                        per_port,
                        args.connections,
                        args.burst_seconds,
                        blocks,
                    )
                )
                rates[label].append(rate)
        first = statistics.median(rates[ways[0][0]])
        for label, blocks in ways:
            rate = statistics.median(rates[label])
            spread = f"{min(rates[label]):.0f}-{max(rates[label]):.0f}"
            print(
                f"  {label:20s} {rate:8.0f} polls/s over TCP ({100 * rate / first:3.0f} %, "
                f"runs {spread}); RS-485 9600 baud: {rtu_ms(blocks):5.1f} ms a poll on the wire",
                flush=True,
            )
    finally:
        sim.terminate()
        sim.wait(10)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--meters", type=int, default=1000)
    ap.add_argument("--ports", type=int, default=5)
    ap.add_argument("--connections", type=int, default=4, help="per port (bus)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the 1 Hz run")
    ap.add_argument("--burst-seconds", type=float, default=8.0, help="baseline/saturation runs")
    ap.add_argument(
        "--register-cost",
        action="store_true",
        help="measure polling the PMTR_001's registers 98-114 too (bare loop only)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="--register-cost: rounds (median)")
    args = ap.parse_args()
    if args.register_cost:
        return register_cost(args)
    per_port = -(-args.meters // args.ports)
    if per_port > 247:
        ap.error(f"{per_port} meters per port: use more --ports (max 247 unit ids)")
    meters = per_port * args.ports
    work = Path(tempfile.mkdtemp(prefix="pfm-bench-collector-"))
    sim, base_port = start_simulator(meters, args.ports)
    figures: dict[str, Any] = {}
    try:
        with LocalMosquitto(work / "mosq") as mosq:
            wait_simulator(base_port, args.ports)
            print(
                f"{meters} simulated PMTR_001 meters on {args.ports} ports "
                f"({per_port} unit ids each), {args.connections} connections per port; "
                f"simulator pid {sim.pid}, private mosquitto {mosq.url}",
                flush=True,
            )
            base = asyncio.run(
                baseline(base_port, args.ports, per_port, args.connections, args.burst_seconds)
            )
            print(f"baseline  bare pymodbus loop:        {base:8.0f} requests/s", flush=True)
            sat_site = site_dict(
                "benchsat", base_port, args.ports, per_port, args.connections, 0.05
            )
            sat = run_collector(sat_site, mosq.url, str(work / "sat"), args.burst_seconds, 2.0)
            sat_rate = (sat["polls"] + sat["errors"]) / sat["elapsed"]
            print(
                f"collector at saturation (50 ms):     {sat_rate:8.0f} requests/s "
                f"({100 * sat_rate / base:.0f} % of baseline)",
                flush=True,
            )
            hz_site = site_dict("bench1hz", base_port, args.ports, per_port, args.connections, 1.0)
            hz = run_collector(hz_site, mosq.url, str(work / "hz"), args.seconds, 3.0)
            expected = meters * hz["elapsed"]
            print(
                f"collector at 1 Hz for {hz['elapsed']:.0f} s: {hz['polls']:.0f} polls "
                f"({hz['polls'] / hz['elapsed']:.0f}/s, expected ~{expected:.0f}), "
                f"missed cycles {hz['missed']:.0f}, errors {hz['errors']:.0f}",
                flush=True,
            )
            print(
                f"  poll jitter p50 {1000 * hz['jitter_p50']:.1f} ms, "
                f"p99 {1000 * hz['jitter_p99']:.1f} ms; collector CPU "
                f"{100 * hz['cpu_s'] / hz['elapsed']:.0f} % of a core; "
                f"peak memory {hz['VmHWM']:.0f} MB (RSS at end {hz['VmRSS']:.0f} MB)",
                flush=True,
            )
            figures = {"baseline_rps": base, "saturation_rps": sat_rate, **hz}
    finally:
        sim.terminate()
        sim.wait(10)
    checks = [
        (
            "no missed poll cycles",
            figures["missed"] == 0 and figures["polls"] >= 0.98 * meters * figures["elapsed"],
        ),
        ("p99 poll jitter < 200 ms", figures["jitter_p99"] < 0.2),
        (
            "request rate >= 70 % of bare pymodbus",
            figures["saturation_rps"] >= 0.7 * figures["baseline_rps"],
        ),
        ("collector memory < 150 MB", figures["VmHWM"] < 150),
    ]
    for name, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
