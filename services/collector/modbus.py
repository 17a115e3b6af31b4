"""The collector's Modbus transport is :mod:`shared.modbus` (shared with the actuator).

This module only re-exports it, so that ``services.collector.modbus`` imports
written before the move keep working; new code imports :mod:`shared.modbus`.
"""

from __future__ import annotations

from shared.modbus import (
    EXCEPTION_NAMES,
    TRANSIENT,
    ModbusConnection,
    crc16,
    quiet_library_logs,
    rtu_frame_ok,
)

#: the name the first version used; one connection
ModbusBus = ModbusConnection

__all__ = [
    "EXCEPTION_NAMES",
    "TRANSIENT",
    "ModbusBus",
    "ModbusConnection",
    "crc16",
    "quiet_library_logs",
    "rtu_frame_ok",
]
