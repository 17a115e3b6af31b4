"""The output path: Modbus coil writes with read-back verification and retries.

One :class:`ModbusLink` per bus (one TCP connection serialises requests); one
:class:`CoilDevice` per output device. :meth:`CoilDevice.set` writes a coil,
reads it back, retries when the write failed or the read-back disagrees, and
returns what the device finally reports (``None`` when it cannot be read): the
state that is published is the device's, never the one we hoped for.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from shared.errors import PeerError
from shared.site.actuator import OutputDevice
from shared.site.core import BusConfig

log = logging.getLogger(__name__)


class ModbusLink:
    """One connection to a bus; requests on it are serialised."""

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.lock = asyncio.Lock()
        self._client: Any = None

    def _make(self) -> Any:
        c = self.config
        common: dict[str, Any] = {"timeout": c.timeout_s, "retries": 0}
        if c.kind in ("tcp", "rtu_over_tcp"):
            framer = FramerType.RTU if c.kind == "rtu_over_tcp" else FramerType.SOCKET
            return AsyncModbusTcpClient(c.host or "", port=c.port or 502, framer=framer, **common)
        return AsyncModbusSerialClient(
            c.serial or "",
            framer=FramerType.RTU,
            baudrate=c.baudrate,
            bytesize=c.bytesize,
            parity=c.parity,
            stopbits=c.stopbits,
            **common,
        )

    async def _client_ready(self) -> Any:
        if self._client is None:
            self._client = self._make()
        if not self._client.connected and not await self._client.connect():
            where = self.config.serial or f"{self.config.host}:{self.config.port}"
            raise PeerError(f"bus {self.config.name}: cannot connect to {where}", kind="refused")
        return self._client

    async def call(self, what: str, unit: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one request; library errors become :class:`PeerError` naming unit and request."""
        async with self.lock:
            client = await self._client_ready()
            try:
                rr = await getattr(client, method)(*args, device_id=unit, **kwargs)
            except (ModbusException, TimeoutError, OSError) as exc:
                self.close()
                raise PeerError(f"unit {unit}: {what}: {exc}", kind="timeout") from exc
            if rr.isError():
                code = int(getattr(rr, "exception_code", 0) or 0)
                raise PeerError(
                    f"unit {unit}: {what}: Modbus exception 0x{code:02X}",
                    code=code,
                    kind=f"exception_{code:02x}",
                )
            return rr

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


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
    link: ModbusLink
    coils: dict[int, bool] = field(default_factory=dict)
    online: bool = False
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    async def read(self, address: int, count: int = 1) -> list[bool]:
        rr = await self.link.call(
            f"read coils {address}+{count}", self.config.unit, "read_coils", address, count=count
        )
        bits = list(rr.bits)[:count]
        if len(bits) < count:
            raise PeerError(f"unit {self.config.unit}: short coil answer", kind="garbage")
        return [bool(b) for b in bits]

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
                await self.link.call(
                    f"write coil {address}={int(value)}",
                    self.config.unit,
                    "write_coil",
                    address,
                    value,
                )
                (actual,) = await self.read(address)
            except PeerError as exc:
                error = str(exc)
                await asyncio.sleep(0.05 * attempts)
                continue
            self.online = True
            self.coils[address] = actual
            if actual is value:
                return WriteResult(value, actual, attempts)
            error = f"read back {int(actual)} after writing {int(value)} to coil {address}"
            await asyncio.sleep(0.05 * attempts)
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
