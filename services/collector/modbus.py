"""Modbus transport for one bus: TCP, RTU on a serial port, or RTU over TCP.

Library errors become :class:`~shared.errors.PeerError` here, classified by kind
(``timeout``, ``refused``, ``exception_02``, ...), so the poller can count them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer import FramerType

from shared.errors import PeerError
from shared.site.core import BusConfig

log = logging.getLogger(__name__)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class ModbusBus:
    """One connection; requests on it are serialised (one TCP connection, one RS-485 line)."""

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.lock = asyncio.Lock()
        self._client: Any = None

    def _make(self) -> Any:
        c = self.config
        common: dict[str, Any] = {"timeout": c.timeout_s, "retries": 0}
        if c.kind == "tcp":
            return AsyncModbusTcpClient(c.host or "", port=c.port or 502, **common)
        if c.kind == "rtu_over_tcp":
            return AsyncModbusTcpClient(
                c.host or "", port=c.port or 502, framer=FramerType.RTU, **common
            )
        return AsyncModbusSerialClient(
            c.serial or "",
            framer=FramerType.RTU,
            baudrate=c.baudrate,
            bytesize=c.bytesize,
            parity=c.parity,
            stopbits=c.stopbits,
            **common,
        )

    async def _connected(self) -> Any:
        if self._client is None:
            self._client = self._make()
        if not self._client.connected:
            ok = await self._client.connect()
            if not ok:
                where = self.config.serial or f"{self.config.host}:{self.config.port}"
                raise PeerError(f"cannot connect to {where}", kind="refused")
        return self._client

    async def read(self, unit: int, table: str, address: int, count: int) -> list[int]:
        """Read ``count`` registers; raises PeerError with the Modbus exception code."""
        client = await self._connected()
        try:
            if table == "holding":
                rr = await client.read_holding_registers(address, count=count, device_id=unit)
            elif table == "input":
                rr = await client.read_input_registers(address, count=count, device_id=unit)
            else:
                raise PeerError(f"unknown register table {table!r}", kind="config")
        except ModbusIOException as exc:
            raise PeerError(f"unit {unit}: no answer ({exc})", kind=_io_kind(exc)) from exc
        except ConnectionException as exc:
            self.close()
            raise PeerError(f"unit {unit}: connection lost ({exc})", kind="refused") from exc
        except TimeoutError as exc:
            raise PeerError(f"unit {unit}: timeout", kind="timeout") from exc
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise PeerError(
                f"unit {unit}: Modbus exception 0x{code:02X} ({name}) reading {table} "
                f"{address}+{count}",
                code=code,
                kind=f"exception_{code:02x}",
            )
        regs = list(rr.registers)
        if len(regs) < count:
            raise PeerError(
                f"unit {unit}: short answer ({len(regs)} of {count} registers)", kind="garbage"
            )
        return regs[:count]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _io_kind(exc: Exception) -> str:
    text = str(exc).lower()
    if "crc" in text:
        return "crc"
    return "timeout"
