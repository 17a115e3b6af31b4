"""Console benchmark: 20 live pages watching a 1,000-meter site.

``pfmon console`` runs in its own process on a site file of 1,000 meters; this process
publishes one metrics message per meter per second (1,000 msg/s) to the broker and
opens 20 Server-Sent-Events streams (``/api/live``), as 20 browsers would. For every
meter value a page receives, latency = arrival at the page - the metrics' timestamp
(taken just before publishing). Baseline in the same run: a bare MQTT subscriber's
publish -> receive latency for the same messages. Figures: latency p50/p99 (target
p99 < 2 s), the console's CPU (% of one core) and peak memory (VmHWM).

Run: ``.venv/bin/python bench/bench_console.py [--meters 1000] [--clients 20] [--seconds 30]``
(a private mosquitto, or the broker of PFM_MQTT_URL when it is set and answers).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import LocalMosquitto, free_port, port_open
from shared.measurements import Measurement as M
from shared.messages import Metrics, utcnow
from shared.settings import Settings, parse_mqtt_url

REPO = Path(__file__).resolve().parents[1]


def site_file(folder: Path, site: str, meters: int, port: int) -> Path:
    per_bus = 200
    buses = (meters + per_bus - 1) // per_bus
    data: dict[str, Any] = {
        "site": site,
        "buses": [{"name": f"b{i}", "host": "127.0.0.1", "port": 1502} for i in range(buses)],
        "meters": [
            {
                "name": f"m{i:04d}",
                "bus": f"b{i // per_bus}",
                "unit": i % per_bus + 1,
                "profile": "sdm630",
                "interval_s": 1.0,
                **({"parent": "m0000"} if i else {}),
            }
            for i in range(meters)
        ],
        "console": {
            "listen": "127.0.0.1",
            "port": port,
            "open_read": True,
            "users_file": str(folder / "users.json"),
        },
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def metrics(site: str, meter: str, seq: int) -> Metrics:
    p, q = 20_000.0 + seq % 7 * 100, 12_000.0
    s = (p * p + q * q) ** 0.5
    values = {
        M.POWER: p, M.REACTIVE_POWER: q, M.APPARENT_POWER: s, M.POWER_FACTOR: p / s,
        M.VOLTAGE_L1: 230.1, M.VOLTAGE_L2: 229.8, M.VOLTAGE_L3: 231.0,
        M.CURRENT_L1: 29.0, M.CURRENT_L2: 28.7, M.CURRENT_L3: 29.4,
        M.THD_CURRENT_L1: 4.1, M.THD_CURRENT_L2: 4.0, M.THD_CURRENT_L3: 4.3, M.FREQUENCY: 50.0,
    }  # fmt: skip
    return Metrics(site=site, meter=meter, ts=utcnow(), seq=seq, interval_s=1.0, values=values)


def proc_status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS")):
            key, value = line.split(":")
            out[key] = float(value.split()[0]) / 1024.0
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def page(url: str, lat: list[float], stop: asyncio.Event, got: list[int]) -> None:
    """One browser's worth of live stream: parse SSE frames, record per-value latency."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url + "api/live") as resp,
    ):
        event, data = "", b""
        async for raw in resp.content:
            if stop.is_set():
                return
            line = raw.rstrip(b"\n")
            if line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
            elif not line and data:
                now = time.time()
                frame = orjson.loads(data)
                if event == "update":
                    for m in frame.get("meters", {}).values():
                        lat.append(now - m["ts"])
                got[0] += 1
                data = b""


async def main(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="pfm-bench-console-"))
    mosq = None
    url = os.environ.get("PFM_MQTT_URL", "")
    if not url or not port_open(parse_mqtt_url(url).host, parse_mqtt_url(url).port):
        # a private broker: other work on a shared one must not make the figures
        mosq = LocalMosquitto(folder / "mosq")
        mosq.__enter__()
        url = mosq.url
    site = f"bc{uuid.uuid4().hex[:8]}"
    port = free_port()
    path = site_file(folder, site, args.meters, port)
    env = {
        **os.environ,
        "PFM_MQTT_URL": url,
        "PFM_METRICS_PORT": "0",
        "PFM_LOG_LEVEL": "ERROR",
        "PFM_MQTT_CLIENT_ID": f"pfm-bench-{site}",
        "PFM_DB_DSN": "postgresql://nobody@127.0.0.1:1/none",  # no archive: live only
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "console", "--site-file", str(path), env=env, cwd=REPO
    )
    base_url = f"http://127.0.0.1:{port}/"
    settings = Settings(mqtt_url=url, metrics_port=0, mqtt_client_id=f"pfm-bench-pub-{site}")
    names = [f"m{i:04d}" for i in range(args.meters)]
    mqtt_lat: list[float] = []

    async def on_metrics(m: Metrics, incoming: Incoming) -> None:
        mqtt_lat.append(time.time() - m.ts.timestamp())

    try:
        for _ in range(100):  # the page answers
            try:
                async with aiohttp.ClientSession() as s, s.get(base_url + "api/me") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        else:
            print("the console did not start")
            return 1
        stop = asyncio.Event()
        lat: list[float] = []
        got = [0]
        async with (
            Bus(settings, service="bench", site=site, persistent=False) as pub,
            Bus(
                settings.model_copy(update={"mqtt_client_id": f"pfm-bench-sub-{site}"}),
                service="bench-sub",
                site=site,
                persistent=False,
            ) as sub,
        ):
            sub.subscribe(topics.pattern(topics.Kind.METRICS, site), Metrics, on_metrics)
            failed = [0]
            pub.on_publish_failed(
                lambda topic, payload, reason: failed.__setitem__(0, failed[0] + 1)
            )
            logging.getLogger("shared.bus").setLevel(logging.ERROR)  # counted, not printed
            await pub.wait_connected(10)
            await sub.wait_subscribed(10)
            pages = [
                asyncio.create_task(page(base_url, lat, stop, got)) for _ in range(args.clients)
            ]
            seq = published = 0
            warmup = 5.0
            t_start = time.monotonic()
            cpu0 = None
            t_cpu0 = own0 = 0.0
            while time.monotonic() - t_start < warmup + args.seconds:
                tick = time.monotonic()
                if cpu0 is None and tick - t_start >= warmup:
                    cpu0, t_cpu0, own0 = cpu_seconds(proc.pid), tick, time.process_time()
                    lat.clear()
                    mqtt_lat.clear()
                    published = 0
                seq += 1
                for i, name in enumerate(names):
                    pub.publish_nowait(topics.metrics(site, name), metrics(site, name, seq))
                    published += 1
                    if i % 100 == 99:
                        await asyncio.sleep(0)
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            assert cpu0 is not None
            wall = time.monotonic() - t_cpu0
            cpu = 100.0 * (cpu_seconds(proc.pid) - cpu0) / wall
            mine = 100.0 * (time.process_time() - own0) / wall
            await asyncio.sleep(3.0)  # the last frames arrive
            stop.set()
            for t in pages:
                t.cancel()
            mem = proc_status(proc.pid)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        if mosq is not None:
            mosq.__exit__(None, None, None)

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=1000)[int(p * 1000) - 1] if len(xs) > 10 else float("nan")

    ms = {k: q(v, p) * 1000 for k, v in (("mqtt", mqtt_lat), ("page", lat)) for p in (0.5,)}
    ms99 = {k: q(v, 0.99) * 1000 for k, v in (("mqtt", mqtt_lat), ("page", lat))}
    expected = published * args.clients  # every value published once the pages were open
    print(f"console: {args.meters} meters at 1 Hz, {args.clients} live pages, {args.seconds:g} s")
    print(
        f"  baseline MQTT publish -> subscriber: p50 {ms['mqtt']:.0f} ms, p99 {ms99['mqtt']:.0f} ms"
    )
    print(f"  metrics -> page (SSE): p50 {ms['page']:.0f} ms, p99 {ms99['page']:.0f} ms")
    print(f"  values at the pages: {len(lat)} of {expected} ({100 * len(lat) / expected:.1f} %)")
    if failed[0]:
        print(f"  publishes the broker did not confirm: {failed[0]}")
    print(f"  console CPU {cpu:.0f} % of one core; memory peak {mem.get('VmHWM', 0):.0f} MB")
    load = os.getloadavg()[0]
    print(f"  (this process, publisher and pages: {mine:.0f} % of one core; load {load:.1f})")
    ok = q(lat, 0.99) < 2.0 and len(lat) > 0.95 * expected
    print("  p99 < 2 s and >= 95 % delivered:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meters", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30)
    sys.exit(asyncio.run(main(ap.parse_args())))
