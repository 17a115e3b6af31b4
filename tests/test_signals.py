"""A service process stops cleanly on SIGTERM: exit 0, gateway status offline."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from services.simulator import LoadModel, MeterFleet
from shared import topics
from shared.embedded import free_port
from shared.messages import GatewayStatus, Reading
from shared.settings import Settings
from tests.helpers import listening


async def test_sigterm_stops_the_collector_cleanly(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    port = free_port()
    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        yaml.safe_dump(
            {
                "site": site_name,
                "gateway": "gw1",
                "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
                "meters": [
                    {"name": "m1", "bus": "b1", "unit": 1, "profile": "pmtr001", "interval_s": 0.2}
                ],
            }
        )
    )
    env = {
        **os.environ,
        "PFM_MQTT_URL": settings.mqtt_url,
        "PFM_METRICS_PORT": "0",
        "PFM_DATA_DIR": str(tmp_path / "data"),
        "PFM_MQTT_CLIENT_ID": f"{settings.mqtt_client_id}-proc",
    }
    async with (
        MeterFleet(port, {1: LoadModel()}),
        listening(
            settings, site_name, topics.pattern(topics.Kind.READING, site_name), Reading
        ) as readings,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            "collector",
            "--site-file",
            str(site_file),
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await readings.get(3, timeout=20)
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
        assert rc == 0, (await proc.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
    # the retained status says offline (published by the clean shutdown, not the will)
    async with listening(
        settings, site_name, topics.gateway_status(site_name, "gw1"), GatewayStatus, "status"
    ) as status:
        items = await status.get(1)
        assert items[-1].status == "offline"  # type: ignore[attr-defined]


async def test_ready_is_said_once_to_the_caller_and_to_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from shared.service import Shutdown

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        shutdown = Shutdown()
        gate = asyncio.Event()
        shutdown.ready_after(gate.wait(), "test")
        with pytest.raises(TimeoutError):
            await shutdown.wait_ready(0.2)  # not before its condition holds
        gate.set()
        await shutdown.wait_ready(5)
        assert sock.recv(64) == b"READY=1"
        shutdown.ready("again")  # said once
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(64)


async def test_a_shutdown_sleep_ends_at_once_on_request_and_holds_no_task() -> None:
    from shared.service import Shutdown

    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await shutdown.sleep(0.05) is False  # slept its time, no request
    assert loop.time() - started >= 0.04
    before = len(asyncio.all_tasks())
    sleeper = asyncio.create_task(shutdown.sleep(30))
    await asyncio.sleep(0.01)
    # only the sleeper itself: no helper task per sleep (schedulers sleep many times a second)
    assert len(asyncio.all_tasks()) == before + 1
    started = loop.time()
    shutdown.request("test")
    assert await asyncio.wait_for(sleeper, 1) is True
    assert loop.time() - started < 0.5
    assert await shutdown.sleep(30) is True  # already requested: no wait at all


def test_a_service_process_collects_garbage_seldom_and_never_its_start_objects() -> None:
    import gc

    from shared.service import GC_GEN0_THRESHOLD, run

    before = gc.get_threshold()
    seen: list[tuple[tuple[int, int, int], int]] = []

    async def main(shutdown: object) -> None:
        seen.append((gc.get_threshold(), gc.get_freeze_count()))

    try:
        run(main)
        (threshold, frozen) = seen[0]
        assert threshold == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert frozen > 1000  # the modules and objects loaded before the service started
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
