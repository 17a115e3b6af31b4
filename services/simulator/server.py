"""The plant served as Modbus devices: meters, the capacitor bank and the relays.

:class:`SimServer` puts every device of a :class:`~services.simulator.plant.SimSite`
on one TCP port (one unit id each; RTU over TCP or on a serial port as options).
A meter answers with the register image of its profile
(:mod:`services.collector.profiles`) built from what it measures at that moment,
plus the quirks of the real device (PMTR_001 averages and clock handshake, the
SDM630's PF sign). Unit ids without a device answer exception 0x0B, as a TCP
gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from services.collector import profiles as prof
from services.simulator.equipment import CapacitorBank, RelayIO
from services.simulator.plant import SimMeter, SimSite
from shared.measurements import Measurement as M
from shared.site.collector import TYPE_WIDTH

__all__ = ["SimServer"]


def _regs_size(profile: prof.Profile, table: str) -> int:
    top = [s.address + TYPE_WIDTH[s.type] for s in profile.registers.values() if s.table == table]
    return max(top, default=0)


class SimServer:
    """Serve every device of ``site`` on ``host:port`` (Modbus TCP; many unit ids).

    ``framer="rtu"`` speaks RTU frames over TCP (a serial gateway in transparent
    mode); ``serial="/dev/pts/3"`` serves Modbus RTU on a serial port instead.
    Unit ids with no device answer exception 0x0B (gateway target failed to
    respond), as a Modbus TCP gateway in front of an RS-485 line does (on a
    serial line they stay silent).
    """

    def __init__(
        self,
        site: SimSite,
        port: int = 0,
        host: str = "127.0.0.1",
        units: Iterable[int] | None = None,
        *,
        framer: str = "socket",
        serial: str | None = None,
        baudrate: int = 9600,
    ) -> None:
        self.site = site
        self.port = port
        self.host = host
        chosen = set(units) if units is not None else None
        devices = [
            self._meter_device(m) for u, m in site.meters.items() if chosen is None or u in chosen
        ]
        if site.bank is not None and (chosen is None or site.bank.unit in chosen):
            devices.append(self._bank_device(site.bank))
        if site.relays is not None and (chosen is None or site.relays.unit in chosen):
            devices.append(self._relay_device(site.relays))
        self.server: ModbusTcpServer | ModbusSerialServer
        if serial is not None:
            devices.append(self._absent_device(silent=True))
            self.server = ModbusSerialServer(
                devices, framer=FramerType.RTU, port=serial, baudrate=baudrate
            )
        else:
            devices.append(self._absent_device())
            kind = FramerType.RTU if framer == "rtu" else FramerType.SOCKET
            self.server = ModbusTcpServer(devices, address=(host, port), framer=kind)

    def _meter_device(self, meter: SimMeter) -> SimDevice:
        site = self.site
        profile = meter.profile
        is_pmtr = profile.name == "pmtr001"
        is_sdm = profile.name == "sdm630"
        holding = max(_regs_size(profile, "holding"), 200 if is_pmtr else 0)
        inputs = _regs_size(profile, "input")

        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            site.tick()
            meter.requests += 1
            faults = meter.faults
            if "comm_loss" in faults:
                await asyncio.sleep(float(faults["comm_loss"].get("delay_s", 30.0)))
                return ExcCodes.GATEWAY_NO_RESPONSE
            if "slow" in faults:
                await asyncio.sleep(float(faults["slow"].get("delay_s", 0.5)))
            if "exception" in faults and fc in (3, 4):
                return ExcCodes(int(faults["exception"].get("code", 4)))
            if "flaky" in faults and meter.requests % int(faults["flaky"].get("every", 3)) == 0:
                return ExcCodes.GATEWAY_NO_RESPONSE
            if fc in (3, 4) and address + count > (holding if fc == 3 else inputs):
                return ExcCodes.ILLEGAL_ADDRESS
            if fc in (3, 4):
                meter.reads += 1
                vals = meter.values(site, site.now())
                image = profile.image(vals)
                table = image["holding" if fc == 3 else "input"]
                if is_pmtr:
                    _pmtr_extras(table, vals, "sensor_fail" in faults)
                if is_sdm:
                    _sdm_pf_sign(table, vals)
                lo, hi = address, address + count
                for addr, word in table.items():
                    if lo <= addr < hi:
                        regs[addr - start] = word
            elif fc in (6, 16) and values is not None:
                for i, val in enumerate(values):
                    meter.sync_regs[address + i] = int(val)
            elif fc in (5, 15) and values is not None and is_pmtr:
                for i, val in enumerate(values):
                    if address + i == prof.PMTR001_SYNC_COIL:
                        _pmtr_sync(meter, bool(val))
            return None

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        # both tables are allocated wide so that every request reaches the action (a
        # device in comm loss must stay silent); the action answers 0x02 itself outside
        # the device's real map
        size = max(holding, inputs, 1)
        return SimDevice(
            id=meter.unit,
            simdata=(
                bits,
                list(bits),
                [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    def _coil_device(
        self,
        unit: int,
        n: int,
        get: Callable[[], list[bool]],
        put: Callable[[int, bool], None],
        holding: list[int],
    ) -> SimDevice:
        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            self.site.tick()
            if fc in (5, 15) and values is not None:
                if address + len(values) > n:
                    return ExcCodes.ILLEGAL_ADDRESS
                for i, val in enumerate(values):
                    put(address + i, bool(val))
            if fc == 1:
                # for bit requests pymodbus hands the action the count in 16-bit
                # registers, not in coils (at most the coil count): a read that starts
                # inside the device and runs only a little past its last coil is answered,
                # the extra bits reading 0, where a strict device would say 0x02
                if address + count > n:
                    return ExcCodes.ILLEGAL_ADDRESS
                state = get()
                for w in range(len(regs)):
                    word = 0
                    for b in range(16):
                        k = (start + w) * 16 + b
                        if k < n and state[k]:
                            word |= 1 << b
                    regs[w] = word
            if fc == 3:
                for i, word in enumerate(holding):
                    if 0 <= i - start < len(regs):
                        regs[i - start] = word
            return None

        words = (n + 15) // 16
        bits = [SimData(0, count=words * 16, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=unit,
            simdata=(
                bits,
                list(bits),
                [SimData(0, count=max(len(holding), 1), values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    def _bank_device(self, bank: CapacitorBank) -> SimDevice:
        holding = [bank.steps] + [round(k * 10) for k in bank.kvar]
        return self._coil_device(bank.unit, bank.steps, lambda: bank.state, bank.switch, holding)

    def _relay_device(self, relays: RelayIO) -> SimDevice:
        return self._coil_device(
            relays.unit,
            len(relays.coils),
            lambda: relays.coils,
            self.site.set_relay,
            [len(relays.coils)],
        )

    def _absent_device(self, silent: bool = False) -> SimDevice:
        async def action(*_: Any) -> ExcCodes | None:
            if silent:  # on a serial line an absent unit says nothing at all
                await asyncio.sleep(3600)
            return ExcCodes.GATEWAY_NO_RESPONSE

        bits = [SimData(0, count=256, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=1000, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(id=0, simdata=(bits, list(bits), regs, list(regs)), action=action)

    async def start(self) -> SimServer:
        await self.server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.shutdown()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _pmtr_extras(table: dict[int, int], vals: Mapping[M, float], sensor_fail: bool) -> None:
    """PMTR_001 registers beyond the profile: rails, averages at the firmware's addresses."""
    if not table and not sensor_fail:
        return
    if sensor_fail:
        for addr in range(78, 115):
            table[addr] = 0
        return
    table.setdefault(78, 5000)
    table.setdefault(79, 12000)
    base = prof.PMTR001_AVG_BASE
    for ph in range(3):
        n = ph + 1
        table[base + ph] = prof.encode(vals.get(M.per_phase("voltage", n), 0) * 10, "u16")[0]
        table[base + 3 + ph] = prof.encode(vals.get(M.per_phase("current", n), 0) * 100, "u16")[0]
        table[base + 6 + ph] = prof.encode(abs(vals.get(M.per_phase("power", n), 0)), "u16")[0]
        table[base + 9 + ph] = prof.encode(vals.get(M.per_phase("frequency", n), 0) * 10, "u16")[0]
        pf = abs(vals.get(M.per_phase("power_factor", n), 0))
        table[prof.PMTR001_AVG_PF[ph]] = prof.encode(pf * 100, "u16")[0]


def _sdm_pf_sign(table: dict[int, int], vals: Mapping[M, float]) -> None:
    """SDM630 PF registers: magnitude, negative for inductive (Q > 0), as the meter does."""
    for addr, pkey, qkey in (
        (0x1E, M.POWER_FACTOR_L1, M.REACTIVE_POWER_L1),
        (0x20, M.POWER_FACTOR_L2, M.REACTIVE_POWER_L2),
        (0x22, M.POWER_FACTOR_L3, M.REACTIVE_POWER_L3),
        (0x3E, M.POWER_FACTOR, M.REACTIVE_POWER),
    ):
        pf = abs(vals.get(pkey, 0.0))
        signed = -pf if vals.get(qkey, 0.0) > 0 else pf
        table[addr], table[addr + 1] = prof.encode(signed, "f32")


def _pmtr_sync(meter: SimMeter, coil: bool) -> None:
    """PMTR_001 handshake: coil 0 set, 146-150 written, coil 0 cleared -> clock set."""
    if coil:
        meter.sync_coil = True
        return
    if not meter.sync_coil:
        return
    meter.sync_coil = False
    regs = meter.sync_regs
    words = [regs.get(prof.PMTR001_SYNC_EPOCH + i, 0) for i in range(4)]
    epoch = int(prof.u64(words, "little"))
    meter.clock_epoch = (epoch + prof.PMTR001_SYNC_OFFSET_S) & 0xFFFF_FFFF
