"""Modbus RTU framing: over TCP (a serial gateway) against a pymodbus server with the
RTU framer, CRC errors injected by a corrupting proxy, and RTU on a serial line
(a pty pair from socat)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.collector.profiles import PROFILES
from services.simulator import SimServer, inductive_site
from shared.embedded import free_port
from shared.errors import PeerError
from shared.measurements import Measurement as M
from shared.modbus import ModbusConnection, crc16, rtu_frame_ok
from shared.site import BusConfig


class CorruptingProxy:
    """TCP proxy; while ``corrupt`` is set, it flips a bit in every answer."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.corrupt = False
        self.server: asyncio.Server | None = None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(4096):
                if answers and self.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0x55])
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_w, False), self._pipe(up_r, writer, True))

    async def __aenter__(self) -> CorruptingProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def test_crc16_known_frame() -> None:
    # read holding registers, unit 1, address 0, count 1: 01 03 00 00 00 01 84 0A
    frame = bytes.fromhex("010300000001")
    assert crc16(frame) == 0x0A84
    assert rtu_frame_ok(frame + bytes([0x84, 0x0A]))
    assert not rtu_frame_ok(frame + bytes([0x84, 0x0B]))


@pytest.fixture
async def rtu_over_tcp() -> AsyncIterator[tuple[int, CorruptingProxy]]:
    site = inductive_site(profile="pmtr001", scale=0.25)
    port = free_port()
    async with SimServer(site, port, framer="rtu"), CorruptingProxy(port) as proxy:
        yield port, proxy


async def test_rtu_over_tcp_reads_and_classifies_crc_errors(
    rtu_over_tcp: tuple[int, CorruptingProxy],
) -> None:
    _, proxy = rtu_over_tcp
    bus = BusConfig(
        name="gw", kind="rtu_over_tcp", host="127.0.0.1", port=proxy.port, timeout_s=0.5
    )
    conn = ModbusConnection(bus)
    try:
        block = PROFILES["pmtr001"].plan()[0]
        regs = await conn.read(1, block.table, block.address, block.count)
        values = PROFILES["pmtr001"].decode(
            {"holding": {block.address + i: r for i, r in enumerate(regs)}, "input": {}}
        )
        assert 225 < values[M.VOLTAGE_L1] < 235
        proxy.corrupt = True
        with pytest.raises(PeerError) as err:
            await conn.read(1, block.table, block.address, block.count)
        assert err.value.kind == "crc"
        assert "CRC" in str(err.value) and "holding 78+20" in str(err.value)
        proxy.corrupt = False
        regs = await conn.read(1, block.table, block.address, block.count)  # recovers
        assert len(regs) == 20
        # coils over RTU: the capacitor bank
        await conn.write_coil(10, 2, True)
        assert (await conn.read_coils(10, 0, 6))[:3] == [False, False, True]
    finally:
        conn.close()


@contextlib.contextmanager
def pty_pair(tmp: Path) -> Iterator[tuple[str, str]]:
    a, b = str(tmp / "ttyA"), str(tmp / "ttyB")
    proc = subprocess.Popen(
        ["socat", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if Path(a).exists() and Path(b).exists():
                break
            import time

            time.sleep(0.05)
        yield a, b
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
async def test_rtu_on_a_serial_line(tmp_path: Path) -> None:
    site = inductive_site(profile="pmtr001", scale=0.25)
    with pty_pair(tmp_path) as (dev_side, gw_side):
        async with SimServer(site, serial=dev_side, baudrate=19200):
            await asyncio.sleep(0.2)
            bus = BusConfig(name="rs485", kind="rtu", serial=gw_side, baudrate=19200, timeout_s=1.0)
            conn = ModbusConnection(bus)
            try:
                regs = await conn.read(1, "holding", 78, 20)
                assert 2250 < regs[2] < 2350  # 0.1 V
                with pytest.raises(PeerError) as err:
                    await conn.read(99, "holding", 78, 20)  # nobody answers on the line
                assert err.value.kind == "timeout"
                regs = await conn.read(1, "holding", 78, 20)
                assert 2250 < regs[2] < 2350
            finally:
                conn.close()
