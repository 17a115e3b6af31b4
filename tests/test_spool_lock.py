"""One process per spool: a second one on the same data folder stops at start (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.settings import Settings
from shared.spool import Spool, SpoolLocked

pytestmark = pytest.mark.timeout(60)

_HOLD = """
import sys, time
from shared.spool import Spool
spool = Spool(sys.argv[1])
spool.put("t", b"x")
print("held", flush=True)
sys.stdin.readline()
spool.close()
print("released", flush=True)
"""


def test_a_second_process_cannot_open_a_held_spool(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SpoolLocked) as info:
            Spool(path)
        text = str(info.value)
        assert str(path) in text and f"pid {holder.pid}" in text, text
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        again = Spool(path)  # free again: opens, and the record is still there
        assert len(again) == 1
        again.close()
    finally:
        holder.kill()
        holder.wait(10)


def test_the_lock_goes_with_the_process_even_when_it_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(10)
    spool = Spool(path)
    assert len(spool) == 1
    assert (tmp_path / "s.spool.lock").read_text().strip() == str(os.getpid())
    spool.close()


def test_two_collectors_on_one_data_dir_the_second_exits_2(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        f"site: {site_name}\n"
        "buses: [{name: b1, host: 127.0.0.1, port: 1, timeout_s: 0.2}]\n"
        "meters: [{name: m1, bus: b1, unit: 1, profile: pmtr001}]\n"
    )
    procs = []
    for n in (1, 2):
        env = {
            **os.environ,
            "PFM_MQTT_URL": settings.mqtt_url,
            "PFM_MQTT_CLIENT_ID": f"pfm-{site_name}-{n}",
            "PFM_DATA_DIR": str(tmp_path / "data"),
            "PFM_METRICS_PORT": "0",
            "PFM_LOG_FORMAT": "text",
        }
        cmd = [sys.executable, "-m", "services.cli", "collector", "--site-file", str(site)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
        if n == 1:  # the first one holds the spool before the second starts
            lock = tmp_path / "data" / f"collector-{site_name}.spool.lock"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
                time.sleep(0.1)
    first, second = procs
    try:
        _, err = second.communicate(timeout=30)
        assert second.returncode == 2, err
        assert f"collector-{site_name}.spool" in err and f"pid {first.pid}" in err, err
        assert "Traceback" not in err
        assert first.poll() is None
    finally:
        first.terminate()
        first.communicate(timeout=20)
    assert first.returncode == 0
