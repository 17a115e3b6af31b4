"""Bare receive on aiomqtt 3 (alpha, on the Rust ``mqtt5`` core), for bench_bus.py only.

The product does not depend on it: bench_bus.py runs this file with the Python of a
throwaway venv (``--aiomqtt3-python``) against its own mosquitto, in the same run as
the other rows. aiomqtt 3 speaks MQTT v5 only and acknowledges nothing by itself: each
QoS 1 message gets an awaited ``puback``.

Usage: ``python aiomqtt3_receive.py PORT TOPIC COUNT IDENTIFIER subscribe|receive``;
``receive`` prints ``<msg/s> <CPU seconds per message>``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiomqtt  # 3.x


async def main(port: int, topic: str, n: int, ident: str, phase: str) -> None:
    def client() -> aiomqtt.Client:
        return aiomqtt.Client(
            hostname="127.0.0.1",
            port=port,
            identifier=ident,
            clean_start=False,
            session_expiry_interval=3600,
            receive_max=100,
        )

    if phase == "subscribe":
        async with client() as c:
            await c.subscribe(topic, max_qos=aiomqtt.QoS.AT_LEAST_ONCE)
        return
    started, cpu = time.perf_counter(), time.process_time()
    got = 0
    async with client() as c:
        async for message in c.messages():
            if isinstance(message, aiomqtt.PublishPacket):
                got += 1
                if message.qos == aiomqtt.QoS.AT_LEAST_ONCE:
                    await c.puback(message.packet_id)
                if got == n:
                    break
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"{n / elapsed} {cpu / n}")


if __name__ == "__main__":
    port, topic, count, ident, phase = sys.argv[1:6]
    asyncio.run(main(int(port), topic, int(count), ident, phase))
