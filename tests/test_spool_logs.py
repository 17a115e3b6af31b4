"""The disk spool (order, bound, restart) and log formats."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import orjson
import pytest

from shared.logs import JsonFormatter, TextFormatter
from shared.spool import Spool


def test_spool_keeps_order_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_records=100)
    for i in range(10):
        spool.put("t", str(i).encode())
    first = spool.peek(4)
    assert [r.payload for r in first] == [b"0", b"1", b"2", b"3"]
    spool.remove_through(first[-1].id)
    spool.close()
    again = Spool(path, max_records=100)
    assert len(again) == 6
    assert [r.payload for r in again.peek(100)] == [str(i).encode() for i in range(4, 10)]


def test_full_spool_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool", max_records=5)
    dropped = sum(spool.put("t", str(i).encode()) for i in range(8))
    assert dropped == 3 and spool.dropped == 3
    assert [r.payload for r in spool.peek(10)] == [b"3", b"4", b"5", b"6", b"7"]
    dropped = spool.put_many([("t", b"8"), ("t", b"9")])
    assert dropped == 2 and spool.dropped == 5 and len(spool) == 5


def test_spool_refuses_a_zero_bound(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Spool(tmp_path / "s.spool", max_records=0)


def _record(**extra: object) -> logging.LogRecord:
    logger = logging.getLogger("pfm.test")
    return logger.makeRecord(
        "pfm.test", logging.WARNING, __file__, 1, "poll of %s failed", ("m1",), None, extra=extra
    )


def test_json_lines_carry_context_fields() -> None:
    line = JsonFormatter().format(_record(meter="m1", kind="timeout", site="s"))
    entry = orjson.loads(line)
    assert entry["msg"] == "poll of m1 failed"
    assert entry["level"] == "warning" and entry["meter"] == "m1" and entry["kind"] == "timeout"
    assert entry["ts"].endswith("+00:00")


def test_text_lines_are_readable() -> None:
    line = TextFormatter().format(_record(meter="m1"))
    assert "WARNING" in line and "poll of m1 failed" in line and "meter=m1" in line


def test_setup_logging_picks_json_when_not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import logs

    buf = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", buf)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_logging("INFO", "auto")
        logging.getLogger("x").info("hello %d", 5)
        assert orjson.loads(buf.getvalue().splitlines()[-1])["msg"] == "hello 5"
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
