"""Logging: JSON lines when stderr is not a terminal, readable lines otherwise.

Use ``log.info("polled %s", meter, extra={"meter": meter})``: lazy ``%`` arguments,
context fields (site, meter, device, service) through ``extra``.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_CONTEXT_FIELDS = (
    "service",
    "site",
    "meter",
    "device",
    "rule",
    "topic",
    "kind",
    "register",
    "code",
    "reason",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = " ".join(
            f"{f}={record.__dict__[f]}"
            for f in _CONTEXT_FIELDS
            if record.__dict__.get(f) is not None
        )
        return f"{line} [{ctx}]" if ctx else line


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after setup)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger once for a process."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # chatty libraries: their warnings are still shown
    for name in ("pymodbus", "asyncio", "amqtt", "transitions", "aiomqtt"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # pymodbus logs every refused connection at ERROR; we count and log those ourselves
    logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)
