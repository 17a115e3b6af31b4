"""The output path: Modbus coil writes with read-back verification and retries.

The transport is :class:`shared.modbus.ModbusConnection`, the collector's: one
per bus (its lock serialises the requests of every device on that bus), with the
same error classification (``PeerError.kind``: ``exception_02``, ``timeout``,
``crc``, ``refused``, ``garbage`` ...). One :class:`CoilDevice` per output device.
:meth:`CoilDevice.set` writes a coil, reads it back, retries when the write failed
or the read-back disagrees (waiting :data:`WRITE_RETRY` between tries), and returns
what the device finally reports (``None`` when it cannot be read): the state that is
published is the device's, never the one we hoped for.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from shared.backoff import Backoff
from shared.errors import PeerError
from shared.modbus import ModbusConnection
from shared.site.actuator import OutputDevice

log = logging.getLogger(__name__)

#: the wait between tries of one coil write: 50 ms, doubling, at most 0.5 s
WRITE_RETRY = Backoff(initial_s=0.05, max_s=0.5, jitter=0.0)


@dataclass
class WriteResult:
    """What happened to one coil write."""

    requested: bool
    actual: bool | None  # read back; None = could not read
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.actual is self.requested


@dataclass
class CoilDevice:
    """An output device: coil writes, read-back, the last known coil image."""

    config: OutputDevice
    link: ModbusConnection
    coils: dict[int, bool] = field(default_factory=dict)
    online: bool = False
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    async def read(self, address: int, count: int = 1) -> list[bool]:
        return await self.link.read_coils(self.config.unit, address, count)

    async def refresh(self) -> dict[int, bool]:
        """Read every coil of the device; marks it online/offline."""
        try:
            bits = await self.read(0, self.config.coils)
        except PeerError as exc:
            self.online = False
            self.last_error = str(exc)
            raise
        self.online = True
        self.last_error = None
        self.coils = dict(enumerate(bits))
        return self.coils

    async def set(self, address: int, value: bool) -> WriteResult:
        """Write, verify by reading back, retry; report what the device shows."""
        error: str | None = None
        attempts = 0
        for attempt in range(self.config.write_retries + 1):
            attempts = attempt + 1
            try:
                await self.link.write_coil(self.config.unit, address, value)
                (actual,) = await self.read(address)
            except PeerError as exc:
                error = str(exc)
                await asyncio.sleep(WRITE_RETRY.delay(attempt))
                continue
            self.online = True
            self.coils[address] = actual
            if actual is value:
                return WriteResult(value, actual, attempts)
            error = f"read back {int(actual)} after writing {int(value)} to coil {address}"
            await asyncio.sleep(WRITE_RETRY.delay(attempt))
        # give up: find out what the device really shows
        actual_now: bool | None
        try:
            (actual_now,) = await self.read(address)
            self.coils[address] = actual_now
            self.online = True
        except PeerError as exc:
            actual_now = None
            self.online = False
            self.coils.pop(address, None)
            error = f"{error}; read-back failed: {exc}"
        self.last_error = error
        return WriteResult(value, actual_now, attempts, error)
