"""Simulated Modbus TCP meters for the demo and the tests (pymodbus server).

A fleet of PMTR_001-layout meters on one port, one unit id each, whose registers
are filled on every read from a simple three-phase load model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


@dataclass
class LoadModel:
    """Per-phase star load: voltage, current and displacement angle."""

    voltage_v: tuple[float, float, float] = (230.0, 231.0, 229.5)
    current_a: tuple[float, float, float] = (10.0, 11.0, 9.5)
    pf: tuple[float, float, float] = (0.82, 0.80, 0.84)
    frequency_hz: float = 50.0
    noise: float = 0.002
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    energy_wh: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def registers(self) -> dict[int, int]:
        """Holding-register image of the PMTR_001 map (78..114)."""
        regs: dict[int, int] = {78: 5000, 79: 12000}
        for ph in range(3):
            n = 1 + self.rng.gauss(0, self.noise)
            v = self.voltage_v[ph] * n
            i = self.current_a[ph] * n
            p = v * i * self.pf[ph]
            self.energy_wh[ph] += p / 3600.0
            regs[80 + ph] = _u16(v * 10)
            regs[83 + ph] = _u16(i * 100)
            regs[86 + ph] = _u16(p)
            regs[89 + ph] = _u16(self.energy_wh[ph] / 100.0)
            regs[92 + ph] = _u16(self.frequency_hz * 10)
            regs[95 + ph] = _u16(self.pf[ph] * 100)
        return regs


def _u16(x: float) -> int:
    return max(0, min(0xFFFF, round(x)))


class MeterFleet:
    """Serve ``models`` (unit id -> LoadModel) on 127.0.0.1:``port``."""

    def __init__(self, port: int, models: dict[int, LoadModel], host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.models = models
        devices = [self._device(unit, model) for unit, model in models.items()]
        self.server = ModbusTcpServer(devices, address=(host, port), ignore_missing_devices=True)

    def _device(self, unit: int, model: LoadModel) -> SimDevice:
        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> None:
            if fc == 3:
                for addr, value in model.registers().items():
                    if 0 <= addr - start < len(regs):
                        regs[addr - start] = value
            return None

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=unit,
            simdata=(
                bits,
                list(bits),
                [SimData(0, count=200, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    async def start(self) -> MeterFleet:
        await self.server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        await self.server.shutdown()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> MeterFleet:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def expected_pf(model: LoadModel) -> float:
    """Total PF of a model without noise (used by tests)."""
    p = sum(v * i * pf for v, i, pf in zip(model.voltage_v, model.current_a, model.pf, strict=True))
    s = sum(v * i for v, i in zip(model.voltage_v, model.current_a, strict=True))
    return p / s if s else math.nan
