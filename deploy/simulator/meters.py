"""Simulated PMTR_001 meters on Modbus TCP for the compose "simulator" profile.

Serves ``--meters`` units (1..N) on ``0.0.0.0:--port`` with the load models of
``pfmon demo``; the collector polls them as it would real meters
(``deploy/site.simulator.yaml``). Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from services.simulator import LoadModel, MeterFleet

LOADS = [
    LoadModel(current_a=(40.0, 42.0, 39.0), pf=(0.78, 0.79, 0.77)),
    LoadModel(current_a=(12.0, 9.0, 15.0), pf=(0.93, 0.91, 0.95)),
    LoadModel(current_a=(20.0, 20.0, 20.0), pf=(0.99, 0.99, 0.99)),
]


async def main(port: int, meters: int, host: str) -> None:
    models = {unit: LOADS[(unit - 1) % len(LOADS)] for unit in range(1, meters + 1)}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with MeterFleet(port, models, host=host):
        print(f"simulated meters: units 1..{meters} on {host}:{port}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=5020)
    parser.add_argument("--meters", type=int, default=3)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.meters, args.host))
