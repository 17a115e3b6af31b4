"""Actuator benchmarks: expression evaluation rate, metrics -> coil write latency.

1. Expression evaluation on one core: the issue's overvoltage expression and a
   longer mixed one, evaluated by our compiled AST; baseline = the same
   expressions as Python lambdas (what ``eval`` would give, without its risks).
2. Latency from publishing the metrics message that makes a condition true to the
   coil write arriving at a Modbus TCP device, through Mosquitto and the running
   actuator service (recovery 0 s, so no configured delay is included). Baselines
   in the same run: a bare MQTT publish -> receive, and a bare Modbus coil write.

Run: ``.venv/bin/python bench/bench_actuator.py`` (uses PFM_MQTT_URL or
127.0.0.1:1883; starts a private mosquitto when none answers).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.actuator.expr import parse
from services.actuator.rules import env_for
from services.actuator.service import run
from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import LocalMosquitto, free_port, port_open
from shared.measurements import Measurement as M
from shared.messages import Metrics, utcnow
from shared.service import Shutdown
from shared.settings import DEFAULT_MQTT_URL, Settings, parse_mqtt_url
from shared.site import parse_site

EXPRESSIONS: list[tuple[str, Callable[[dict[str, float]], bool]]] = [
    (
        "(L1U > 253) || (L2U > 253) || (L3U > 253)",
        lambda e: (e["L1U"] > 253) or (e["L2U"] > 253) or (e["L3U"] > 253),
    ),
    (
        "(L1I + L2I + L3I) / 3 > 100 and pf < 0.9 or not (u2 < 2) && L1f > 49.5",
        lambda e: (
            ((e["L1I"] + e["L2I"] + e["L3I"]) / 3 > 100 and e["pf"] < 0.9)
            or (not (e["u2"] < 2) and e["L1f"] > 49.5)
        ),
    ),
]


def bench_eval(n: int = 300_000) -> None:
    env = {
        "L1U": 230.0,
        "L2U": 231.0,
        "L3U": 229.0,
        "L1I": 90.0,
        "L2I": 95.0,
        "L3I": 99.0,
        "pf": 0.85,
        "u2": 1.2,
        "L1f": 50.0,
    }
    print("== expression evaluation (one core)")
    for text, baseline in EXPRESSIONS:
        expr = parse(text)
        assert expr.evaluate(env) == bool(baseline(env))
        for name, fn in (("pfmon AST", expr.evaluate), ("python lambda (baseline)", baseline)):
            best = 0.0
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(env)
                dt = time.perf_counter() - t0
                best = max(best, n / dt)
            print(f"  {name:26s} {best:>12,.0f} evals/s   {text}")
    # the engine's real work per message: token values looked up in a Metrics + evaluate
    expr = parse(EXPRESSIONS[0][0])
    values = {M.VOLTAGE_L1: 230.0, M.VOLTAGE_L2: 231.0, M.VOLTAGE_L3: 229.0}
    m = Metrics(
        site="bench",
        meter="main",
        ts=utcnow(),
        seq=1,
        interval_s=1.0,
        values=values,
        averages={"10s": values},
    )
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n // 3):
            expr.evaluate(env_for(expr, m, "10s")[0])
        best = max(best, (n // 3) / (time.perf_counter() - t0))
    print(f"  {'lookup in Metrics + eval':26s} {best:>12,.0f} evals/s   (what the engine does)")


class CoilProbe:
    """A Modbus TCP device with 8 coils that timestamps every coil write."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.coils = [False] * 8
        self.written: asyncio.Queue[tuple[float, int, bool]] = asyncio.Queue()

    def device(self) -> SimDevice:
        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> None:
            if fc in (5, 15) and values is not None:
                now = time.perf_counter()
                for i, v in enumerate(values):
                    self.coils[address + i] = bool(v)
                    self.written.put_nowait((now, address + i, bool(v)))
            word = sum(1 << i for i, on in enumerate(self.coils) if on)
            for w in range(len(regs)):
                regs[w] = word if start + w == 0 else 0

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=2, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(id=5, simdata=(bits, list(bits), regs, list(regs)), action=action)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def report(name: str, xs: list[float]) -> None:
    ms = [x * 1000 for x in xs]
    print(
        f"  {name:34s} n={len(ms):4d}  p50 {statistics.median(ms):6.2f} ms  "
        f"p99 {pct(ms, 99):6.2f} ms  max {max(ms):6.2f} ms"
    )


async def bench_latency(mqtt_url: str, rounds: int = 300) -> None:
    site_name = f"bench{uuid.uuid4().hex[:8]}"
    probe = CoilProbe(free_port())
    server = ModbusTcpServer([probe.device()], address=("127.0.0.1", probe.port))
    await server.serve_forever(background=True)
    settings = Settings(mqtt_url=mqtt_url, metrics_port=0, log_format="text", log_level="WARNING")
    site = parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b", "host": "127.0.0.1", "port": probe.port}],
            "meters": [{"name": "main", "bus": "b", "unit": 1, "profile": "sdm630"}],
            "devices": [{"name": "io1", "bus": "b", "unit": 5, "coils": 8, "poll_s": 3600}],
            "relay_actions": [
                {
                    "name": "overvoltage",
                    "meter": "main",
                    "when": "(L1U > 253) || (L2U > 253) || (L3U > 253)",
                    "average": "10s",
                    "recovery": "0s",
                    "level": "high",
                    "outputs": ["io1:coil:0"],
                }
            ],
        }
    )
    print("== latency: metrics message -> coil write (Mosquitto + Modbus TCP)")
    # baseline 1: a bare Modbus coil write round trip
    client = AsyncModbusTcpClient("127.0.0.1", port=probe.port)
    await client.connect()
    bare: list[float] = []
    for i in range(rounds):
        t0 = time.perf_counter()
        await client.write_coil(7, bool(i % 2), device_id=5)
        bare.append(time.perf_counter() - t0)
    client.close()
    while not probe.written.empty():
        probe.written.get_nowait()

    # baseline 2: bare MQTT publish -> receive on the same broker
    received: asyncio.Queue[float] = asyncio.Queue()

    async def on_m(m: Metrics, _: Incoming) -> None:
        received.put_nowait(time.perf_counter())

    sub = Bus(settings, service="benchsub", site=site_name, client_id=f"{site_name}-s")
    pub = Bus(settings, service="benchpub", site=site_name, client_id=f"{site_name}-p")
    sub.subscribe(topics.metrics(site_name, "echo"), Metrics, on_m)
    mqtt: list[float] = []
    latency: list[float] = []
    async with sub, pub:
        await sub.wait_connected(5)
        await pub.wait_connected(5)
        await asyncio.sleep(0.3)
        for i in range(rounds):
            m = _metrics(site_name, "echo", i, 230.0)
            t0 = time.perf_counter()
            await pub.publish(topics.metrics(site_name, "echo"), m)
            t1 = await asyncio.wait_for(received.get(), 5)
            mqtt.append(t1 - t0)

        shutdown = Shutdown()
        task = asyncio.create_task(run(settings, site, shutdown))
        await asyncio.sleep(1.0)  # connected, devices read back, subscribed
        for i in range(rounds):
            # alternate: over (coil on), normal (coil off); each message flips the coil
            v = 260.0 if i % 2 == 0 else 230.0
            m = _metrics(site_name, "main", i + 1, v)
            t0 = time.perf_counter()
            await pub.publish(topics.metrics(site_name, "main"), m)
            t1, _, value = await asyncio.wait_for(probe.written.get(), 5)
            assert value is (i % 2 == 0)
            latency.append(t1 - t0)
        shutdown.request("bench over")
        await asyncio.wait_for(task, 10)
    await server.shutdown()  # type: ignore[no-untyped-call]
    report("bare Modbus write (baseline)", bare)
    report("bare MQTT publish->receive (baseline)", mqtt)
    report("metrics -> coil write (actuator)", latency)
    ok = pct(latency, 99) < 0.050
    print(f"  target p99 < 50 ms: {'met' if ok else 'NOT met'}")


def _metrics(site: str, meter: str, seq: int, v: float) -> Metrics:
    values: dict[M, float] = {M.VOLTAGE_L1: v, M.VOLTAGE_L2: 230.0, M.VOLTAGE_L3: 230.0}
    return Metrics(
        site=site,
        meter=meter,
        ts=utcnow(),
        seq=seq,
        interval_s=1.0,
        values=values,
        averages={"10s": values},
    )


def main() -> None:
    bench_eval()
    url = os.environ.get("PFM_MQTT_URL", DEFAULT_MQTT_URL)
    target = parse_mqtt_url(url)
    if port_open(target.host, target.port):
        asyncio.run(bench_latency(url))
        return
    with tempfile.TemporaryDirectory() as tmp, LocalMosquitto(Path(tmp)) as mosq:
        asyncio.run(bench_latency(mosq.url))


if __name__ == "__main__":
    main()
