"""Helpers shared by the archiver and report tests (no tests here)."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit


def schema_dsn(dsn: str, schema: str) -> str:
    """``dsn`` with ``search_path`` set to ``schema`` (asyncpg passes it as a server setting)."""
    parts = urlsplit(dsn)
    query = (parts.query + "&" if parts.query else "") + urlencode({"search_path": schema})
    return urlunsplit(parts._replace(query=query))


import asyncio  # noqa: E402
import contextlib  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from datetime import datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

from pydantic import BaseModel  # noqa: E402

from services.archiver.service import Archiver  # noqa: E402
from shared.bus import Bus  # noqa: E402
from shared.measurements import Measurement as M  # noqa: E402
from shared.messages import Metrics  # noqa: E402
from shared.service import Shutdown  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.site import SiteConfig, parse_site  # noqa: E402

#: the meters and devices the archiver tests publish for (archiver.known of their site)
TEST_NAMES = ["m", *(f"m{i}" for i in range(20)), "bank1"]


def archiver_site(site: str, **archiver: Any) -> SiteConfig:
    """A site file with only an archiver section; unless ``known`` is given, the site
    knows :data:`TEST_NAMES` (the topic is the authority: unknown names are refused)."""
    archiver.setdefault("known", {site: TEST_NAMES})
    return parse_site({"site": site, "archiver": archiver})


@contextlib.asynccontextmanager
async def running_archiver(settings: Settings, site: SiteConfig) -> AsyncIterator[Archiver]:
    """An archiver consuming in the background; stopped (and drained) at exit."""
    shutdown = Shutdown()
    arch = Archiver(settings, site, shutdown)
    task = asyncio.create_task(arch.run(), name="test-archiver")
    for _ in range(200):
        if arch.bus is not None and arch.bus.connected:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    assert arch.bus is not None and arch.bus.connected, "archiver did not connect"
    try:
        yield arch
    finally:
        shutdown.request("test done")
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def publisher(settings: Settings, site: str) -> AsyncIterator[Bus]:
    s = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-pub"})
    async with Bus(s, service="testpub", site=site, persistent=False) as bus:
        await bus.wait_connected(10)
        yield bus


def metrics_msg(
    site: str, meter: str, ts: datetime, seq: int, p: float, s: float, **extra: float
) -> Metrics:
    values = {M.POWER: p, M.APPARENT_POWER: s, M.POWER_FACTOR: p / s if s else 0.0}
    values.update({M(k): v for k, v in extra.items()})
    return Metrics(site=site, meter=meter, ts=ts, seq=seq, interval_s=1.0, values=values)


async def publish_all(bus: Bus, items: list[tuple[str, BaseModel]]) -> None:
    for topic, model in items:
        await bus.publish(topic, model)


async def wait_for(predicate: Any, timeout: float = 30.0, every: float = 0.1) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await predicate():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


def at(base: datetime, seconds: float) -> datetime:
    return base + timedelta(seconds=seconds)
