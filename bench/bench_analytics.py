"""Analytics benchmarks, each beside a baseline measured in the same run.

1. Waveform analysis, 3 phases x 10 cycles at 12.8 kHz (2560 samples per channel),
   vs a bare-numpy baseline (rfft + RMS of the same six channels).
2. The reading path in-process (validate, derive, moving averages in all slots,
   demand window, 3 s/10 min aggregates, alarms) vs bare validation, for a site
   of 1,000 meters handed to ``SiteEngine`` one second (1,000 readings) at a time;
   JSON encoding excluded (the metrics hold numpy rows until encoded), then the
   same with every message encoded, and one reading at a time (batch size 1).
3. Memory per meter: traced memory after 20k and after 60k readings.
4. The service end to end over a private Mosquitto (``pfmon analytics`` in its own
   process, a 1,000-meter site) vs the bare aiomqtt receive rate of the same stream,
   same MQTT version. A separate publisher process sends the readings as fast as the
   broker takes them, so both figures are receive capacities, not the publisher's pace.

Usage: ``python bench/bench_analytics.py [--quick] [--protocol 5|3.1.1] [--no-mqtt|--mqtt-only]``.
BLAS threads are pinned to 1: "one core" figures.
"""

from __future__ import annotations

import multiprocessing as mp
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import asyncio
import math
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import numpy as np
import orjson

from services.analytics import alarms, dsp
from services.analytics.batch import SiteEngine
from services.analytics.output import encode_metrics
from shared import topics
from shared.bus import Bus
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement as M
from shared.messages import Reading, encode
from shared.settings import Settings, parse_mqtt_url
from shared.site import SiteConfig, parse_site

T = TypeVar("T")
#: a subscriber: (url, pattern, how many, set when subscribed) -> when the last arrived
Observer = Callable[[str, str, int, asyncio.Event], Coroutine[Any, Any, float]]
FS = 12800.0
N = 2560
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def best_rate(fn: object, count: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` items/s (the machine is shared: the best run is the cleanest)."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = max(best, count / (time.perf_counter() - t0))
    return best


def windows(b: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    t = np.arange(N) / FS
    f = rng.uniform(49.9, 50.1, size=(b, 1, 1))
    ph = np.array([0.0, -2 * np.pi / 3, 2 * np.pi / 3])[None, :, None]
    w = 2 * np.pi * f * t[None, None, :]
    v = 325 * np.sin(w + ph) + 9 * np.sin(5 * (w + ph)) + rng.normal(0, 0.2, (b, 3, N))
    i = 20 * np.sin(w + ph - 0.5) + 6 * np.sin(3 * (w + ph)) + rng.normal(0, 0.02, (b, 3, N))
    return np.concatenate([v, i], axis=1)


def bench_dsp(quick: bool) -> None:
    b = 128 if quick else 512
    x = windows(b)

    def baseline() -> None:
        np.fft.rfft(x, axis=-1)
        np.sqrt(np.mean(x * x, axis=-1))

    def batched(size: int) -> None:
        for k in range(0, b, size):
            dsp.analyze_stacked(x[k : k + size], 3, FS)

    def single() -> None:
        for k in range(min(b, 200)):
            dsp.analyze_stacked(x[k : k + 1], 3, FS)

    base = best_rate(baseline, b)
    ours64 = best_rate(lambda: batched(64), b)
    ours_all = best_rate(lambda: batched(b), b)
    one = best_rate(single, min(b, 200))
    print("== waveform analysis: 3 phases x 10 cycles at 12.8 kHz, one core")
    print(f"  baseline rfft + RMS (numpy)       {base:10.0f} windows/s")
    print(f"  analytics, batches of 64          {ours64:10.0f} windows/s ({ours64 / base:.0%})")
    print(f"  analytics, one batch of {b:<4d}      {ours_all:10.0f} windows/s")
    print(f"  analytics, one window at a time   {one:10.0f} windows/s (service latency path)")


def site_dict(n_meters: int, name: str = "bench") -> dict[str, Any]:
    """A site file of ``n_meters`` PMTR_001 meters, 200 per Modbus bus."""
    return {
        "site": name,
        "buses": [
            {"name": f"b{j}", "host": "127.0.0.1", "port": 5020 + j}
            for j in range((n_meters + 199) // 200)
        ],
        "meters": [
            {"name": f"m{k}", "bus": f"b{k // 200}", "unit": k % 200 + 1, "profile": "pmtr001"}
            for k in range(n_meters)
        ],
    }


def site(n_meters: int, name: str = "bench") -> SiteConfig:
    return parse_site(site_dict(n_meters, name))


def readings(count: int, meters: int, site_name: str = "bench") -> list[bytes]:
    out = []
    for k in range(count):
        vals: dict[M, float] = {}
        for ph in (1, 2, 3):
            vals[M.per_phase("voltage", ph)] = 229.0 + ph + (k % 5) * 0.1
            vals[M.per_phase("current", ph)] = 10.0 + k % 7
            vals[M.per_phase("power", ph)] = 2000.0 + k % 13
            vals[M.per_phase("power_factor", ph)] = 0.87
            vals[M.per_phase("frequency", ph)] = 50.0
            vals[M.per_phase("import_energy", ph)] = 1000.0 + k
        r = Reading(
            site=site_name,
            meter=f"m{k % meters}",
            ts=T0 + timedelta(seconds=k // meters),
            seq=k,
            profile="pmtr001",
            values=vals,
        )
        out.append(encode(r))
    return out


def best_time(setup: Callable[[], T], fn: Callable[[T], None], repeat: int) -> float:
    """Best-of-``repeat`` seconds of ``fn(setup())`` (setup untimed)."""
    best = math.inf
    for _ in range(repeat):
        state = setup()
        t0 = time.perf_counter()
        fn(state)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_readings(quick: bool) -> None:
    meters, seconds = (200, 5) if quick else (1000, 20)
    s = site(meters)
    stream = readings(meters * (seconds + 1), meters)
    # one second of the site per batch; second 0 warms the engine up (meters added)
    warm, batches = (
        stream[:meters],
        [stream[k * meters : (k + 1) * meters] for k in range(1, seconds + 1)],
    )
    count = meters * seconds

    def engine() -> SiteEngine:
        eng = SiteEngine(s)
        eng.on_readings([Reading.model_validate_json(p) for p in warm])
        return eng

    def validate(_: None) -> None:
        for batch in batches:
            [Reading.model_validate_json(p) for p in batch]

    def batched(eng: SiteEngine) -> None:
        for batch in batches:
            eng.on_readings([Reading.model_validate_json(p) for p in batch])

    def encoded(eng: SiteEngine) -> None:
        for batch in batches:
            for out in eng.on_readings([Reading.model_validate_json(p) for p in batch]):
                for m in out.metrics:
                    encode_metrics(m)

    singles = batches[: max(1, seconds // 5)]

    def one_by_one(eng: SiteEngine) -> None:
        for batch in singles:
            for p in batch:
                for out in eng.on_readings([Reading.model_validate_json(p)]):
                    for m in out.metrics:
                        encode_metrics(m)

    base = count / best_time(lambda: None, validate, 5)
    ours = count / best_time(engine, batched, 5)
    enc = count / best_time(engine, encoded, 3)
    one = meters * len(singles) / best_time(engine, one_by_one, 3)
    print(f"== reading path in-process, {meters} meters at 1 Hz, one core (validate, derive,")
    kinds = len(alarms.PER_METER)
    print(f"   5 averaging slots, demand, 3 s/10 min aggregates, {kinds} alarm kinds,")
    print("   supply events)")
    print(f"  baseline: validation only            {base:10.0f} readings/s")
    print(
        f"  batches of {meters} (one second of the site), JSON encoding excluded"
        f"\n                                       {ours:10.0f} readings/s ({ours / base:.0%})"
    )
    print(f"  the same, encoding every message     {enc:10.0f} readings/s")
    print(f"  one reading at a time, encoding      {one:10.0f} readings/s (batch size 1)")

    # memory: state per meter after 20k and after more readings (5 per s)
    eng = SiteEngine(s, max_meters=1)
    one_meter = [Reading.model_validate_json(p) for p in readings(2000, 1)]
    total = 60000 if not quick else 30000
    tracemalloc.start()
    first = 0
    for k in range(total):
        r = one_meter[k % 2000].model_copy(update={"ts": T0 + timedelta(seconds=0.2 * k)})
        eng.on_readings([r])
        if k == 19999:
            first, _ = tracemalloc.get_traced_memory()
    second, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"  memory: traced {first / 1e3:.1f} kB after 20k readings (5 per s), "
        f"{second / 1e3:.1f} kB after {total // 1000}k; numpy state "
        f"{eng.state_bytes() / 1e3:.0f} kB for one meter"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _publish_file(url: str, name: str, path: str, meters: int) -> None:
    """Publisher process: every payload of ``path`` (one per line, meters in turn) at
    QoS 1 through the bus's non-blocking publish, then wait for every PUBACK."""

    lines = Path(path).read_bytes().splitlines()

    async def go() -> None:
        settings = Settings(
            mqtt_url=url, mqtt_client_id=f"{name}-pub-{os.getpid()}", metrics_port=0
        )
        async with Bus(settings, service="bench", site=name, persistent=False) as bus:
            await bus.wait_connected(10)
            for k, line in enumerate(lines):
                bus.publish_nowait(topics.reading(name, f"m{k % meters}"), line)
            await bus.drain(300)

    asyncio.run(go())


async def bench_mqtt(protocol: str, quick: bool) -> None:
    count, meters = (10000, 1000) if quick else (30000, 1000)
    name = f"bench{uuid.uuid4().hex[:8]}"
    # second 0 of the stream warms the service up (1,000 meters join, their state is
    # allocated once: a deployed service runs for months); the rest is measured
    stream = readings(count + meters, meters, name)
    warm_up, payloads = stream[:meters], stream[meters:]
    version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311

    async def receive(url: str, pattern: str, want: int, ready: asyncio.Event) -> float:
        target = parse_mqtt_url(url)
        async with aiomqtt.Client(
            target.host, target.port, protocol=version, max_queued_incoming_messages=0
        ) as sub:
            sub.pending_calls_threshold = 1_000_000
            await sub.subscribe(pattern, qos=1)
            ready.set()
            got = 0
            async for _msg in sub.messages:
                got += 1
                if got >= want:
                    break
        return time.perf_counter()

    async def observe_c(url: str, pattern: str, want: int, ready: asyncio.Event) -> float:
        """Receive with mosquitto_sub (C): the lightest subscriber there is, so that the
        service, not its observer, sets the pace. A first ``-E`` run registers the
        persistent session's subscription and exits at the SUBACK; the counting run
        resumes that session, so nothing published after ``ready`` is missed."""
        target = parse_mqtt_url(url)
        common = ["-h", target.host, "-p", str(target.port), "-q", "1", "-t", pattern]
        common += ["-i", f"observer-{uuid.uuid4().hex[:8]}", "-c"]
        common += ["-V", "5", "-x", "600"] if protocol == "5" else ["-V", "mqttv311"]
        sub = await asyncio.create_subprocess_exec("mosquitto_sub", "-E", *common)
        if await asyncio.wait_for(sub.wait(), 10) != 0:
            raise RuntimeError("mosquitto_sub could not subscribe")
        sub = await asyncio.create_subprocess_exec(
            "mosquitto_sub", "-C", str(want), *common, stdout=asyncio.subprocess.DEVNULL
        )
        ready.set()
        if await sub.wait() != 0:
            raise RuntimeError(f"mosquitto_sub exited with {sub.returncode}")
        return time.perf_counter()

    async def run_once(
        url: str, pattern: str, work: Path, observer: Observer, batch: list[bytes]
    ) -> float:
        """Publish ``batch`` from another process; the rate at which ``observer`` gets
        as many messages on ``pattern``."""
        lines = work / "readings.jsonl"
        lines.write_bytes(b"".join(p + b"\n" for p in batch))
        ready = asyncio.Event()
        task = asyncio.create_task(observer(url, pattern, len(batch), ready))
        await ready.wait()
        publisher = mp.get_context("spawn").Process(
            target=_publish_file, args=(url, name, str(lines), meters)
        )
        t0 = time.perf_counter()
        publisher.start()
        t1 = await asyncio.wait_for(task, 300)
        await asyncio.to_thread(publisher.join, 60)
        return len(batch) / (t1 - t0)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with LocalMosquitto(work / "mosq") as mosq:
            pattern = topics.pattern(topics.Kind.READING, name)
            await run_once(mosq.url, pattern, work, receive, warm_up)
            cpu0 = time.process_time()  # this process: the receiver (and little else)
            bare = await run_once(mosq.url, pattern, work, receive, payloads)
            cpu_bare = (time.process_time() - cpu0) / count
            site_file = work / "site.yaml"
            # one metrics message per reading: the 3 s / 10 min aggregates are extra
            # messages, left out of the count
            doc = site_dict(meters, name) | {"analytics": {"aggregates": False}}
            site_file.write_text(orjson.dumps(doc).decode())
            env = dict(os.environ)
            env.update(
                PFM_MQTT_URL=mosq.url,
                PFM_MQTT_PROTOCOL=protocol,
                PFM_METRICS_PORT="0",
                PFM_MQTT_CLIENT_ID=f"{name}-analytics",
                PFM_LOG_LEVEL="WARNING",
            )
            pfmon = Path(sys.executable).with_name("pfmon")

            async def service(observer: Observer) -> tuple[float, float]:
                """A fresh ``pfmon analytics`` (no state from an earlier run): the rate
                at which ``observer`` receives its metrics, and the service's CPU
                seconds per reading meanwhile."""
                proc = await asyncio.create_subprocess_exec(
                    str(pfmon), "analytics", "--site-file", str(site_file), env=env
                )
                try:
                    await asyncio.sleep(3.0)  # connect and subscribe
                    pattern = topics.pattern(topics.Kind.METRICS, name)
                    await run_once(mosq.url, pattern, work, observe_c, warm_up)
                    cpu0 = cpu_seconds(proc.pid)
                    rate = await run_once(mosq.url, pattern, work, observer, payloads)
                    return rate, (cpu_seconds(proc.pid) - cpu0) / count
                finally:
                    proc.terminate()
                    await asyncio.wait_for(proc.wait(), 10)

            by_c, cpu_c = await service(observe_c)
            by_python = None if quick else (await service(receive))[0]
    print(f"== service end to end over Mosquitto (MQTT {protocol}; pfmon analytics in its own")
    print(f"   process, {meters} meters; readings published as fast as the broker takes them;")
    print(f"   {count} readings measured after a warm-up second in which the meters join)")
    print(
        f"  baseline: bare aiomqtt receive     {bare:10.0f} readings/s "
        f"(CPU {cpu_bare * 1e6:.0f} µs a message)"
    )
    print(
        f"  readings in -> metrics received    {by_c:10.0f} readings/s "
        f"({by_c / bare:.0%} of bare; observer mosquitto_sub)"
    )
    print(f"  service CPU per reading              {cpu_c * 1e6:10.0f} µs")
    if by_python is not None:
        print(
            f"  the same, observer bare aiomqtt    {by_python:10.0f} readings/s "
            f"({by_python / bare:.0%}; a Python observer of ~3 kB messages sets this pace)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs (CI smoke)")
    parser.add_argument(
        "--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version of both runs"
    )
    parser.add_argument("--no-mqtt", action="store_true", help="skip the broker benchmark")
    parser.add_argument("--mqtt-only", action="store_true", help="only the broker benchmark")
    args = parser.parse_args()
    if not args.mqtt_only:
        bench_dsp(args.quick)
        bench_readings(args.quick)
    if not args.no_mqtt:
        asyncio.run(bench_mqtt(args.protocol, args.quick))


if __name__ == "__main__":
    main()
