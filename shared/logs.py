"""Logging: JSON lines when stderr is not a terminal, readable lines otherwise.

Use ``log.info("polled %s", meter, extra={"meter": meter})``: lazy ``%`` arguments,
context fields (site, meter, device, service) through ``extra``.

Bounded whatever the input: a line quotes at most :data:`MAX_MESSAGE` characters of
its message, :data:`MAX_FIELD` of each context field and :data:`MAX_EXCEPTION` of a
traceback, each cut saying how much was left out; and :class:`RateLimit` lets
through the first :data:`BURST` warnings/errors of one kind (same logger, level and
format string) per :data:`INTERVAL_S` seconds, then the first one after the interval
says how many were suppressed (``suppressed`` field).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from shared.errors import ConfigError

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
    "suppressed",
)
#: characters of a log line's message kept (the rest is cut, saying how much)
MAX_MESSAGE = 600
#: characters of one context field (``reason``, ``topic`` ...) kept
MAX_FIELD = 300
#: characters of a traceback kept
MAX_EXCEPTION = 4000
#: warnings/errors of one kind let through per interval, then one line per interval
BURST = 10
INTERVAL_S = 60.0
#: kinds remembered at most (format strings are few; this only bounds the worst case)
_MAX_KINDS = 1000


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} chars cut]"


def _field(value: Any) -> Any:
    if isinstance(value, str):
        return clip(value, MAX_FIELD)
    if isinstance(value, int | float | bool):
        return value
    return clip(str(value), MAX_FIELD)


class RateLimit(logging.Filter):
    """Lets through the first :data:`BURST` records of a kind per :data:`INTERVAL_S`;
    the next one let through carries ``suppressed`` (how many were dropped meanwhile).

    A kind is (logger, level, format string): ``"dead-lettered a %s message from %s"``
    is one kind whatever the topic. Records below WARNING are never limited.
    """

    def __init__(
        self, burst: int = BURST, interval_s: float = INTERVAL_S, level: int = logging.WARNING
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.level = level
        self._kinds: dict[tuple[str, int, str], list[float]] = {}  # [start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            state = self._kinds.get(key)
            if state is None:
                if len(self._kinds) >= _MAX_KINDS:
                    self._kinds.clear()
                state = self._kinds[key] = [now, 0, 0]
            elif now - state[0] >= self.interval_s:
                dropped = int(state[2])
                state[0], state[1], state[2] = now, 0, 0
                if dropped:
                    record.suppressed = dropped
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(record.getMessage(), MAX_MESSAGE),
        }
        for field in _CONTEXT_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = _field(value)
        if record.exc_info:
            entry["exc"] = clip(self.formatException(record.exc_info), MAX_EXCEPTION)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.message = clip(record.getMessage(), MAX_MESSAGE)
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info:
            line += "\n" + clip(self.formatException(record.exc_info), MAX_EXCEPTION)
        ctx = " ".join(
            f"{f}={_field(record.__dict__[f])}"
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


def bounded(handler: logging.Handler, use_json: bool) -> logging.Handler:
    """``handler`` with the service formatter (JSON or text, cut lines) and :class:`RateLimit`."""
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(RateLimit())
    return handler


def setup_logging(level: str = "INFO", fmt: str = "auto", file: Path | None = None) -> None:
    """Configure the root logger once for a process.

    With ``file``, JSON lines also go to that file (appended; created if missing). The
    file is reopened when it is moved or removed (logrotate's default ``create`` mode),
    so no signal is needed after a rotation.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handlers = [bounded(_StderrHandler(), use_json)]
    if file is not None:
        try:
            watched = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"PFM_LOG_FILE {file}: cannot open for appending: {exc}") from exc
        handlers.append(bounded(watched, use_json=True))
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    # chatty libraries: their warnings are still shown
    for name in ("pymodbus", "asyncio", "amqtt", "transitions", "aiomqtt"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # pymodbus logs every refused connection at ERROR; we count and log those ourselves
    logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)
