"""The disk spool (order, bound, restart) and log formats."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from shared.embedded import free_port
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


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_lines(path: Path, deadline: float, meter: str | None = None) -> list[dict[str, object]]:
    """The lines of ``path`` once it has one (about ``meter`` when given)."""
    while time.monotonic() < deadline:
        found = _lines(path)
        if found and (meter is None or any(line.get("meter") == meter for line in found)):
            return found
        time.sleep(0.1)
    raise AssertionError(f"no log lines in {path}" + (f" about {meter}" if meter else ""))


def test_a_service_writes_json_lines_to_the_log_file_and_follows_logrotate(
    tmp_path: Path, mqtt_url: str, site_name: str
) -> None:
    """PFM_LOG_FILE: a collector polling a dead port logs each probe (DEBUG); after the
    file is renamed, as logrotate does, new lines go to a new file of the same name."""
    site = tmp_path / "site.yaml"
    site.write_text(
        f"site: {site_name}\n"
        f"buses: [{{name: b1, host: 127.0.0.1, port: {free_port()}, timeout_s: 0.2}}]\n"
        "meters: [{name: m1, bus: b1, unit: 1, profile: pmtr001, interval_s: 0.2}]\n"
    )
    log_file = tmp_path / "pfmon.log"
    env = {
        **os.environ,
        "PFM_MQTT_URL": mqtt_url,
        "PFM_LOG_FILE": str(log_file),
        "PFM_LOG_LEVEL": "DEBUG",
        "PFM_LOG_FORMAT": "text",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "collector", "-s", str(site), "--duration", "30"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        before = _wait_lines(log_file, deadline)
        assert all({"ts", "level", "logger", "msg"} <= set(line) for line in before)
        rotated = tmp_path / "pfmon.log.1"
        log_file.rename(rotated)
        # the first line after the rotation may be the service's, not the meter's
        after = _wait_lines(log_file, deadline, meter="m1")
        assert after[0]["ts"] >= before[-1]["ts"]  # type: ignore[operator]
        assert len(_lines(rotated)) >= len(before)
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_unwritable_log_file_is_a_clear_error(tmp_path: Path) -> None:
    from shared import logs
    from shared.errors import ConfigError

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with pytest.raises(ConfigError, match=r"PFM_LOG_FILE .*missing.*cannot open"):
            logs.setup_logging("INFO", "auto", tmp_path / "missing" / "pfmon.log")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
