"""Modbus transport for one bus: TCP, RTU on a serial port, or RTU over TCP.

The one client pfmon has: the collector reads meters with it, the actuator writes
and reads back coils (and uploads PMTR_001 relay actions) with it. Library errors
become :class:`~shared.errors.PeerError` here, classified by kind so that callers
can count them (``pfm_collector_poll_errors_total{kind}``) and retry the
transient ones (:data:`TRANSIENT`):

==============  =============================================================
kind            meaning
==============  =============================================================
exception_01    Modbus exception 0x01 illegal function (the code is in ``.code``)
exception_02    0x02 illegal data address (the profile or coil does not fit the device)
exception_03    0x03 illegal data value
exception_04    0x04 server device failure
exception_0a    0x0A gateway path unavailable
exception_0b    0x0B gateway target failed to respond (the unit behind it is dead)
crc             bytes came back but no frame with a valid CRC (RTU: noise on the line)
timeout         nothing came back within the deadline
refused         the TCP connection / serial port could not be opened or was lost
garbage         a frame that does not fit the request (short answer)
==============  =============================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
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

#: error kinds worth an immediate retry (the next attempt may well succeed)
TRANSIENT = frozenset({"crc", "garbage", "timeout", "exception_06", "exception_0b"})


def quiet_library_logs() -> None:
    """pymodbus logs (and dumps frames) on every timeout; we classify and log ourselves."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def crc16(data: bytes) -> int:
    """Modbus RTU CRC-16 (poly 0xA001, init 0xFFFF), as sent: low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu_frame_ok(frame: bytes) -> bool:
    if len(frame) < 4:
        return False
    return crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


class ModbusConnection:
    """One connection to a bus; its requests are serialised (``lock``, taken by
    :meth:`call`), so several devices on one bus can share it.

    A TCP bus may have several (``BusConfig.connections``, the collector's pool); a
    serial line has one. The client is made and connected on the first request,
    and made again after the connection was lost.
    """

    def __init__(self, config: BusConfig, index: int = 0) -> None:
        self.config = config
        self.index = index
        self.lock = asyncio.Lock()
        self._client: Any = None
        self._rx = bytearray()  # bytes received since the last request (RTU CRC check)
        self.where = config.serial or f"{config.host}:{config.port}"

    @property
    def rtu(self) -> bool:
        return self.config.kind in ("rtu", "rtu_over_tcp")

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self._rx.clear()
        else:
            self._rx.extend(data)
        return data

    def _make(self, timeout: float) -> Any:
        c = self.config
        common: dict[str, Any] = {
            "timeout": timeout,
            "retries": 0,
            "reconnect_delay": 0,
        }
        if self.rtu:
            common["trace_packet"] = self._trace
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

    async def _connected(self, timeout: float) -> Any:
        if self._client is None:
            self._client = self._make(timeout)
        if not self._client.connected:
            try:
                ok = await asyncio.wait_for(self._client.connect(), timeout + 1.0)
            except (TimeoutError, OSError) as exc:
                self.close()
                raise PeerError(f"cannot connect to {self.where}: {exc}", kind="refused") from exc
            if not ok:
                self.close()
                raise PeerError(f"cannot connect to {self.where}", kind="refused")
        return self._client

    async def call(
        self, unit: int, what: str, timeout: float, fn: str, *args: Any, **kw: Any
    ) -> Any:
        """Run one client request; returns the response or raises a classified PeerError.

        ``fn`` is the pymodbus client method, ``what`` names the request in messages
        (``holding 78+20``, ``write coil 3=1``). Requests on this connection wait for
        each other (``lock``): one request on the wire at a time.
        """
        async with self.lock:
            return await self._call(unit, what, timeout, fn, *args, **kw)

    async def _call(
        self, unit: int, what: str, timeout: float, fn: str, *args: Any, **kw: Any
    ) -> Any:
        client = await self._connected(timeout)
        client.ctx.comm_params.timeout_connect = timeout  # this request's deadline
        method = getattr(client, fn)
        try:
            async with asyncio.timeout(timeout + 0.5):
                rr = await method(*args, device_id=unit, **kw)
        except ModbusIOException as exc:
            kind = self._no_answer_kind()
            raise PeerError(f"unit {unit}: {_describe(kind)} to {what}", kind=kind) from exc
        except ConnectionException as exc:
            self.close()
            raise PeerError(
                f"unit {unit}: connection to {self.where} lost ({exc})", kind="refused"
            ) from exc
        except TimeoutError as exc:
            kind = self._no_answer_kind()
            if self.rtu:
                self.close()  # a late RTU answer would be taken for the next one
            raise PeerError(f"unit {unit}: {_describe(kind)} to {what}", kind=kind) from exc
        except OSError as exc:  # the socket or serial port failed under the request
            self.close()
            raise PeerError(
                f"unit {unit}: connection to {self.where} failed ({exc})", kind="refused"
            ) from exc
        except ModbusException as exc:
            raise PeerError(f"unit {unit}: bad answer to {what}: {exc}", kind="garbage") from exc
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise PeerError(
                f"unit {unit}: Modbus exception 0x{code:02X} ({name}) to {what}",
                code=code,
                kind=f"exception_{code:02x}",
            )
        return rr

    def _no_answer_kind(self) -> str:
        if self.rtu and self._rx:
            return "crc"
        return "timeout"

    async def read(
        self, unit: int, table: str, address: int, count: int, timeout: float | None = None
    ) -> list[int]:
        """Read ``count`` registers; raises PeerError with the Modbus exception code."""
        timeout = timeout or self.config.timeout_s
        what = f"{table} {address}+{count}"
        if table == "holding":
            fn = "read_holding_registers"
        elif table == "input":
            fn = "read_input_registers"
        else:
            raise PeerError(f"unknown register table {table!r}", kind="config")
        rr = await self.call(unit, what, timeout, fn, address, count=count)
        regs = list(rr.registers)
        if len(regs) < count:
            raise PeerError(
                f"unit {unit}: short answer to {what} ({len(regs)} of {count} registers)",
                kind="garbage",
            )
        return regs[:count]

    async def read_coils(
        self, unit: int, address: int, count: int, timeout: float | None = None
    ) -> list[bool]:
        timeout = timeout or self.config.timeout_s
        rr = await self.call(
            unit, f"coils {address}+{count}", timeout, "read_coils", address, count=count
        )
        bits = list(rr.bits)
        if len(bits) < count:
            raise PeerError(f"unit {unit}: short answer to coils {address}+{count}", kind="garbage")
        return [bool(b) for b in bits[:count]]

    async def write_coil(
        self, unit: int, address: int, value: bool, timeout: float | None = None
    ) -> None:
        timeout = timeout or self.config.timeout_s
        what = f"write coil {address}={int(value)}"
        await self.call(unit, what, timeout, "write_coil", address, value)

    async def write_registers(
        self, unit: int, address: int, values: list[int], timeout: float | None = None
    ) -> None:
        timeout = timeout or self.config.timeout_s
        await self.call(
            unit,
            f"write holding {address}+{len(values)}",
            timeout,
            "write_registers",
            address,
            values,
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _describe(kind: str) -> str:
    return {"crc": "garbled answer (CRC error)", "timeout": "no answer (timeout)"}.get(kind, kind)
