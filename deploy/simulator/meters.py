"""Simulated meters and a capacitor bank on Modbus TCP for the compose "simulator" profile.

Serves on ``0.0.0.0:--port``: ``--meters`` PMTR_001 units (1..N) with fixed load models,
and the PF-correction plant of ``pfmon demo``: its incomer (unit 100, SDM630, PF ~0.78
with the bank out), a 6 x 25 kvar capacitor bank (unit 101) that the incomer sees, and
relays (unit 102). The collector and the actuator use them as real devices
(``deploy/site.simulator.yaml``). Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from services.simulator import LoadModel, SimServer, inductive_site

LOADS = [
    LoadModel(current_a=(40.0, 42.0, 39.0), pf=(0.78, 0.79, 0.77)),
    LoadModel(current_a=(12.0, 9.0, 15.0), pf=(0.93, 0.91, 0.95)),
    LoadModel(current_a=(20.0, 20.0, 20.0), pf=(0.99, 0.99, 0.99)),
]
#: the plant's units (above the fixed meters' 1..N)
PLANT_METER_UNIT, BANK_UNIT, RELAY_UNIT = 100, 101, 102
#: the bank's capacitor discharge time: the site file's reconnect_delay is not shorter
DISCHARGE_S = 5.0


async def main(port: int, meters: int, host: str) -> None:
    if not 0 <= meters < PLANT_METER_UNIT:
        raise SystemExit(f"--meters: 0 to {PLANT_METER_UNIT - 1} (units 1..N), got {meters}")
    plant = inductive_site(
        seed=1,
        meter_unit=PLANT_METER_UNIT,
        bank_unit=BANK_UNIT,
        relay_unit=RELAY_UNIT,
        discharge_s=DISCHARGE_S,
    )
    for unit in range(1, meters + 1):
        plant.add_meter(unit, profile="pmtr001", source=LOADS[(unit - 1) % len(LOADS)])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with SimServer(plant, port, host):
        print(
            f"simulated meters: units 1..{meters} on {host}:{port}; the plant: incomer unit "
            f"{PLANT_METER_UNIT}, capacitor bank unit {BANK_UNIT}, relays unit {RELAY_UNIT}",
            flush=True,
        )
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=5020)
    parser.add_argument("--meters", type=int, default=3)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.meters, args.host))
