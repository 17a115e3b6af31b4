"""The MQTT bus per message: receive and publish rates beside bare aiomqtt, same run.

Run: ``.venv/bin/python bench/bench_bus.py [--messages 20000] [--size 706]
[--link fast|plain|gmqtt ...] [--aiomqtt3-python PATH]``.

A private mosquitto (:class:`shared.embedded.LocalMosquitto`: ``max_queued_messages
1000000``, ``max_inflight_messages 0``, so nothing is dropped or throttled) gets every
message queued for a persistent session while its subscriber is away, published by
``mosquitto_pub -l`` (QoS 1, another process, C). The subscriber then connects and the
clock runs from its connection to the last message received: a pure receive rate.

Receive, MQTT v5 and 3.1.1, each with the same queued stream:

* bare aiomqtt: ``async for message in client.messages`` counting;
* our :class:`~shared.bus.Bus` with a no-op handler (validation included), with the
  fast path (``PFM_MQTT_FAST``) on and off, and with manual acknowledgement (archiver).

and the same with the wire on gmqtt (``bench/gmqtt_link.py``, a prototype): bare gmqtt
counting in a synchronous ``on_message``, and the bus's dispatch over ``GmqttLink``. With
``--aiomqtt3-python PATH`` (the Python of a throwaway venv holding aiomqtt 3, an alpha the
product does not depend on), bare aiomqtt 3 too (v5 only; ``bench/aiomqtt3_receive.py``).
Each receive row also gives the process's CPU time per message (µs), same clock.

Publish, v5 and 3.1.1, to a topic nobody reads, until the last PUBACK:

* aiomqtt, each ``await client.publish`` in turn;
* aiomqtt, one task per publish (``max_inflight`` at a time, as services did);
* :meth:`Bus.publish_nowait` then :meth:`Bus.drain`, on each wire.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement as M
from shared.messages import Metrics, encode
from shared.settings import Settings

PROTOCOLS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


def payload_of_size(site: str, size: int) -> bytes:
    """A valid ``Metrics`` message padded (more values) to about ``size`` bytes."""
    values: dict[M, float] = {}
    for m in M:
        if len(encode(_metrics(site, values))) >= size:
            break
        values[m] = 123.456789
    return encode(_metrics(site, values))


def _metrics(site: str, values: dict[M, float]) -> Metrics:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    return Metrics(site=site, meter="m1", ts=ts, seq=1, interval_s=1.0, values=values)


def aiomqtt_client(port: int, protocol: str, identifier: str) -> aiomqtt.Client:
    """A persistent-session client like the bus makes (v5: session expiry, no clean start)."""
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        return aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=identifier,
            protocol=PROTOCOLS[protocol],
            clean_start=False,
            properties=props,
            max_inflight_messages=100,
        )
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier,
        protocol=PROTOCOLS[protocol],
        clean_session=False,
        max_inflight_messages=100,
    )


def queue_messages(port: int, topic: str, payload: bytes, count: int) -> float:
    """Publish ``count`` copies with ``mosquitto_pub -l`` (QoS 1); returns the seconds taken."""
    started = time.perf_counter()
    subprocess.run(
        ["mosquitto_pub", "-p", str(port), "-t", topic, "-q", "1", "-l", "-M", "1000"],
        input=(payload + b"\n") * count,
        check=True,
    )
    return time.perf_counter() - started


async def bare_receive(
    port: int, protocol: str, topic: str, payload: bytes, n: int
) -> tuple[float, float]:
    ident = f"bare-{uuid.uuid4().hex[:8]}"
    async with aiomqtt_client(port, protocol, ident) as client:
        await client.subscribe(topic, qos=1)
    queue_messages(port, topic, payload, n)
    started, cpu = time.perf_counter(), time.process_time()
    got = 0
    async with aiomqtt_client(port, protocol, ident) as client:
        async for _msg in client.messages:
            got += 1
            if got == n:
                break
    return n / (time.perf_counter() - started), (time.process_time() - cpu) / n


async def bare_gmqtt_receive(
    port: int, protocol: str, topic: str, payload: bytes, n: int
) -> tuple[float, float]:
    """gmqtt on its own: a synchronous ``on_message`` that counts (PUBACK sent by gmqtt)."""
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50, MQTTv311

    ident = f"gmqtt-{uuid.uuid4().hex[:8]}"
    got = 0
    done = asyncio.Event()

    def on_message(*_args: object) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    def client() -> gmqtt.Client:
        kwargs = {"session_expiry_interval": 3600} if protocol == "5" else {}
        c = gmqtt.Client(ident, clean_session=False, **kwargs)
        c.set_config({"reconnect_retries": -2})
        c.on_message = on_message
        return c

    version = MQTTv50 if protocol == "5" else MQTTv311
    c = client()
    await c.connect("127.0.0.1", port, version=version)
    c.subscribe(topic, qos=1)
    await asyncio.sleep(0.3)  # bare client: no SUBACK wait in this baseline
    await c.disconnect()
    queue_messages(port, topic, payload, n)
    started, cpu = time.perf_counter(), time.process_time()
    c = client()
    await c.connect("127.0.0.1", port, version=version)
    await asyncio.wait_for(done.wait(), 300)
    rate, per = n / (time.perf_counter() - started), (time.process_time() - cpu) / n
    await c.disconnect()
    return rate, per


def aiomqtt3_receive(
    python: str, port: int, topic: str, payload: bytes, n: int
) -> tuple[float, float]:
    """aiomqtt 3 (alpha) in another venv's Python, against the same mosquitto."""
    script = str(Path(__file__).with_name("aiomqtt3_receive.py"))
    ident = f"a3-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [python, script, str(port), topic, str(n), ident]
    subprocess.run([*args, "subscribe"], check=True, env=env, timeout=60)
    queue_messages(port, topic, payload, n)
    out = subprocess.run(
        [*args, "receive"], check=True, env=env, timeout=300, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), float(out[1])


async def bus_receive(
    settings: Settings,
    site: str,
    topic: str,
    payload: bytes,
    n: int,
    *,
    manual_ack: bool,
    bus_class: type[Bus] = Bus,
) -> tuple[float, float]:
    settings = settings.model_copy(update={"mqtt_client_id": f"bus-{uuid.uuid4().hex[:8]}"})
    done = asyncio.Event()
    got = 0

    async def handler(_m: Metrics, incoming: Incoming) -> None:
        nonlocal got
        got += 1
        incoming.ack()
        if got == n:
            done.set()

    def bus() -> Bus:
        b = bus_class(settings, service="bench", site=site, manual_ack=manual_ack)
        b.subscribe(topic, Metrics, handler)
        return b

    async with bus() as b:
        await b.wait_connected(10)
    queue_messages(settings.mqtt().port, topic, payload, n)
    started, cpu = time.perf_counter(), time.process_time()
    async with bus():
        await asyncio.wait_for(done.wait(), 300)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        await asyncio.sleep(0.2)
        if got != n:
            raise SystemExit(f"bus received {got} messages for {n}")
    return n / elapsed, cpu / n


async def aiomqtt_publish(port: int, protocol: str, payload: bytes, n: int, tasks: int) -> float:
    topic = f"bench/{uuid.uuid4().hex[:8]}/sink"
    async with aiomqtt_client(port, protocol, f"pub-{uuid.uuid4().hex[:8]}") as client:
        client.pending_calls_threshold = 1_000_000
        started = time.perf_counter()
        if tasks <= 1:
            for _ in range(n):
                await client.publish(topic, payload, qos=1)
        else:
            sem = asyncio.Semaphore(tasks)

            async def one() -> None:
                async with sem:
                    await client.publish(topic, payload, qos=1)

            await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - started)


async def bus_publish(
    settings: Settings, site: str, payload: bytes, n: int, bus_class: type[Bus] = Bus
) -> float:
    settings = settings.model_copy(update={"mqtt_client_id": f"pub-{uuid.uuid4().hex[:8]}"})
    topic = f"bench/{uuid.uuid4().hex[:8]}/sink"
    async with bus_class(settings, service="bench", site=site, persistent=False) as bus:
        await bus.wait_connected(10)
        started = time.perf_counter()
        for _ in range(n):
            bus.publish_nowait(topic, payload)
        await bus.drain(300)
        elapsed = time.perf_counter() - started
        sent = bus.metrics.published.labels("bench", "sink")._value.get()
        if sent != n:
            raise SystemExit(f"{sent} of {n} publishes confirmed")
    return n / elapsed


async def row(
    label: str,
    run: Awaitable[float | tuple[float, float]],
    base: float | None,
    of: str = "bare",
) -> float:
    """Print one figure: rate, ratio to ``base``, and CPU µs per message when measured."""
    got = await run
    rate, cpu = got if isinstance(got, tuple) else (got, None)
    ratio = f"  {rate / base:6.0%} of {of}" if base else " " * (len(of) + 11)
    per = f"  {cpu * 1e6:6.1f} µs CPU/msg" if cpu is not None else ""
    print(f"  {label:<46} {rate:>9,.0f} msg/s{ratio}{per}", flush=True)
    return rate


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=706, help="payload bytes (about)")
    ap.add_argument(
        "--link",
        action="append",
        choices=["fast", "plain", "gmqtt"],
        help="the bus wires to measure (repeat; default all): FastLink, PlainLink"
        " (PFM_MQTT_FAST=0), the gmqtt prototype",
    )
    ap.add_argument(
        "--aiomqtt3-python",
        metavar="PATH",
        help="Python of a throwaway venv with aiomqtt 3 (alpha): adds its bare receive (v5)",
    )
    args = ap.parse_args()
    links = set(args.link or ["fast", "plain", "gmqtt"])
    if "gmqtt" in links:
        from bench.gmqtt_link import GmqttBus
    logging.basicConfig(level=logging.WARNING)
    if not shutil.which("mosquitto_pub") or not LocalMosquitto.available():
        raise SystemExit("needs mosquitto and mosquitto_pub")
    n = args.messages
    site = f"bench{uuid.uuid4().hex[:6]}"
    payload = payload_of_size(site, args.size)
    topic = topics.metrics(site, "m1")
    work = Path(tempfile.mkdtemp(prefix="pfm-bench-bus-"))
    try:
        with LocalMosquitto(work / "mosq") as mosq:
            base = Settings(
                mqtt_url=mosq.url, metrics_port=0, data_dir=work / "data", log_level="WARNING"
            )
            t = queue_messages(mosq.port, "bench/warmup", payload, n)
            print(f"bus benchmark: {n} messages of {len(payload)} bytes, QoS 1, mosquitto")
            print(f"  (mosquitto_pub -l queues {n / t:,.0f} msg/s)")
            for proto in PROTOCOLS:
                s = base.model_copy(update={"mqtt_protocol": proto})
                slow = s.model_copy(update={"mqtt_fast": False})
                print(f"receive, MQTT {proto}:")
                bare = await row(
                    "bare aiomqtt 2.5", bare_receive(mosq.port, proto, topic, payload, n), None
                )
                if "gmqtt" in links:
                    await row(
                        "bare gmqtt",
                        bare_gmqtt_receive(mosq.port, proto, topic, payload, n),
                        bare,
                    )
                if args.aiomqtt3_python and proto == "5":
                    await row(
                        "bare aiomqtt 3 alpha (puback each)",
                        asyncio.to_thread(
                            aiomqtt3_receive, args.aiomqtt3_python, mosq.port, topic, payload, n
                        ),
                        bare,
                    )
                cases: list[tuple[str, Settings, bool, type[Bus]]] = []
                if "fast" in links:
                    cases += [
                        ("Bus, no-op handler (FastLink)", s, False, Bus),
                        ("Bus, no-op handler, manual ack (FastLink)", s, True, Bus),
                    ]
                if "plain" in links:
                    cases += [
                        ("Bus, no-op handler, PFM_MQTT_FAST=0", slow, False, Bus),
                        ("Bus, no-op handler, manual ack, FAST=0", slow, True, Bus),
                    ]
                if "gmqtt" in links:
                    cases += [
                        ("Bus, no-op handler (GmqttLink)", s, False, GmqttBus),
                        ("Bus, no-op handler, manual ack (GmqttLink)", s, True, GmqttBus),
                    ]
                for label, cfg, manual, bus_class in cases:
                    await row(
                        label,
                        bus_receive(
                            cfg, site, topic, payload, n, manual_ack=manual, bus_class=bus_class
                        ),
                        bare,
                    )
            for proto in PROTOCOLS:
                s = base.model_copy(update={"mqtt_protocol": proto})
                print(f"publish, MQTT {proto} (until the last PUBACK):")
                awaited = await row(
                    "aiomqtt, await each publish",
                    aiomqtt_publish(mosq.port, proto, payload, n, 1),
                    None,
                )
                await row(
                    "aiomqtt, a task per publish (100 at a time)",
                    aiomqtt_publish(mosq.port, proto, payload, n, 100),
                    awaited,
                    "awaited",
                )
                if "fast" in links:
                    await row(
                        "Bus.publish_nowait + drain (FastLink)",
                        bus_publish(s, site, payload, n),
                        awaited,
                        "awaited",
                    )
                if "gmqtt" in links:
                    await row(
                        "Bus.publish_nowait + drain (GmqttLink)",
                        bus_publish(s, site, payload, n, GmqttBus),
                        awaited,
                        "awaited",
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
