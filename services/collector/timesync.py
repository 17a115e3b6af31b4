"""Pushing the gateway's clock to devices that keep their own time.

A profile with a clock registers a sync function here. The PMTR_001 handshake
(``../shared/reference/pmtr001-modbus-map.json``): set coil 0, write the Unix
epoch as a u64 *least significant word first* to holding 146-149 and the
milliseconds to 150, clear coil 0. The firmware adds 6 s and truncates the epoch
to 32 bits; it does not expose its clock, so its drift cannot be read back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from services.collector import profiles as prof
from shared.modbus import ModbusConnection


@dataclass(frozen=True, slots=True)
class SyncResult:
    pushed_epoch: int
    #: device clock minus gateway clock before the push, when the device exposes it
    drift_s: float | None = None


SyncFn = Callable[[ModbusConnection, int, datetime], Awaitable[SyncResult]]


async def _pmtr001(conn: ModbusConnection, unit: int, now: datetime) -> SyncResult:
    epoch = int(now.timestamp())
    millis = now.microsecond // 1000
    words = [*prof.encode(float(epoch), "u64", "little"), millis]
    await conn.write_coil(unit, prof.PMTR001_SYNC_COIL, True)
    await conn.write_registers(unit, prof.PMTR001_SYNC_EPOCH, words)
    await conn.write_coil(unit, prof.PMTR001_SYNC_COIL, False)
    return SyncResult(pushed_epoch=epoch, drift_s=None)


CLOCKS: dict[str, SyncFn] = {"pmtr001": _pmtr001}

#: how often the collector pushes the clock again
RESYNC_S = 24 * 3600.0
