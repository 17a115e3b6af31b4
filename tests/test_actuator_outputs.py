"""The output path against a pymodbus coil server started in the test.

The server can refuse writes (Modbus exception), ignore them (a stuck relay: the
read-back disagrees) or go away; the device state reported is always what the
device shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from services.actuator.outputs import CoilDevice
from shared.embedded import free_port
from shared.modbus import ModbusConnection
from shared.site.actuator import OutputDevice
from shared.site.core import BusConfig

pytestmark = pytest.mark.timeout(30)


@dataclass
class CoilServer:
    """Eight coils on unit 5; ``refuse`` writes answer an exception, ``stuck`` coils ignore."""

    port: int
    coils: list[bool] = field(default_factory=lambda: [False] * 8)
    refuse: int = 0
    stuck: set[int] = field(default_factory=set)
    writes: list[tuple[int, bool]] = field(default_factory=list)

    def device(self) -> SimDevice:
        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if fc in (5, 15) and values is not None:
                if self.refuse > 0:
                    self.refuse -= 1
                    return ExcCodes.DEVICE_FAILURE
                for i, v in enumerate(values):
                    self.writes.append((address + i, bool(v)))
                    if address + i not in self.stuck:
                        self.coils[address + i] = bool(v)
            word = sum(1 << i for i, on in enumerate(self.coils) if on)
            for w in range(len(regs)):
                regs[w] = word if start + w == 0 else 0
            return None

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=4, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(id=5, simdata=(bits, list(bits), regs, list(regs)), action=action)


@pytest.fixture
async def server() -> AsyncIterator[tuple[CoilServer, ModbusTcpServer]]:
    cs = CoilServer(free_port())
    srv = ModbusTcpServer([cs.device()], address=("127.0.0.1", cs.port))
    await srv.serve_forever(background=True)
    yield cs, srv
    await srv.shutdown()  # type: ignore[no-untyped-call]


def device(port: int, retries: int = 2) -> CoilDevice:
    bus = BusConfig(name="b", host="127.0.0.1", port=port, timeout_s=0.3)
    cfg = OutputDevice(name="io1", bus="b", unit=5, coils=8, write_retries=retries)
    return CoilDevice(cfg, ModbusConnection(bus))


async def test_write_is_verified_by_read_back(server: tuple[CoilServer, ModbusTcpServer]) -> None:
    cs, _ = server
    dev = device(cs.port)
    res = await dev.set(3, True)
    assert res.ok and res.attempts == 1 and cs.coils[3] is True
    coils = await dev.refresh()
    assert coils[3] is True and sum(coils.values()) == 1 and dev.online
    dev.link.close()


async def test_refused_write_is_retried(server: tuple[CoilServer, ModbusTcpServer]) -> None:
    cs, _ = server
    cs.refuse = 2
    dev = device(cs.port, retries=2)
    res = await dev.set(1, True)
    assert res.ok and res.attempts == 3 and cs.coils[1] is True
    dev.link.close()


async def test_stuck_relay_gives_up_and_reports_the_truth(
    server: tuple[CoilServer, ModbusTcpServer],
) -> None:
    cs, _ = server
    cs.stuck = {2}
    dev = device(cs.port, retries=1)
    res = await dev.set(2, True)
    assert not res.ok and res.actual is False and res.attempts == 2
    assert "read back 0 after writing 1" in (res.error or "")
    assert dev.coils[2] is False  # the honest state
    assert cs.writes == [(2, True), (2, True)]
    dev.link.close()


async def test_device_gone(server: tuple[CoilServer, ModbusTcpServer]) -> None:
    cs, srv = server
    dev = device(cs.port, retries=1)
    await dev.refresh()
    await srv.shutdown()  # type: ignore[no-untyped-call]
    await asyncio.sleep(0.1)
    res = await dev.set(0, True)
    assert res.actual is None and not res.ok and not dev.online
    assert "read-back failed" in (res.error or "")
    dev.link.close()
