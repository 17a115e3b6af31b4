"""Analytics acknowledges an input only once its results are confirmed by the broker:
a shutdown with results in flight, or a broker restart mid-stream, loses no reading's
metrics downstream (counted by source seq; duplicates are allowed, gaps are not).
Both wires (the fast link and aiomqtt's plain path)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from services.analytics import service as analytics
from shared import topics
from shared.bus import Backoff, Bus, BusUnavailable, Incoming
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement as M
from shared.messages import Metrics, Reading
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FAST = Backoff(initial_s=0.1, max_s=0.5)
METERS = ("m0", "m1", "m2", "m3")
WIRES = [pytest.param(True, id="fast"), pytest.param(False, id="plain")]


def reading(site: str, meter: str, k: int) -> Reading:
    vals: dict[M, float] = {}
    for ph in (1, 2, 3):
        vals[M.per_phase("voltage", ph)] = 230.0
        vals[M.per_phase("current", ph)] = 10.0 + k % 5
        vals[M.per_phase("power", ph)] = 230.0 * (10.0 + k % 5) * 0.9
    return Reading(
        site=site,
        meter=meter,
        ts=T0 + timedelta(seconds=0.1 * k),
        seq=k,
        profile="pmtr001",
        values=vals,
    )


def site_cfg(name: str) -> SiteConfig:
    return parse_site(
        {"site": name, "analytics": {"batch_window_s": 0.05, "meters": {m: {} for m in METERS}}}
    )


class Downstream:
    """(meter, source seq) of every per-reading metrics message received."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self._event = asyncio.Event()

    async def handler(self, m: Metrics, incoming: Incoming) -> None:
        if not m.aggregate and m.interval_s == 0 and m.source_seq is not None:
            self.seen.append((m.meter, m.source_seq))
            self._event.set()

    async def wait_for_all(self, want: set[tuple[str, int]], timeout: float) -> None:
        async def loop() -> None:
            while not want <= set(self.seen):
                self._event.clear()
                await self._event.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loop(), timeout)


def named(settings: Settings, name: str) -> Settings:
    return settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}"})


@contextlib.asynccontextmanager
async def downstream_and_feed(
    settings: Settings, site: str
) -> AsyncIterator[tuple[Downstream, Bus]]:
    """A persistent listener on the site's metrics and a publisher of readings."""
    down = Downstream()
    async with (
        Bus(named(settings, "down"), service="down", site=site, backoff=FAST) as listener,
        Bus(named(settings, "feed"), service="feed", site=site, backoff=FAST) as feed,
    ):
        listener.subscribe(topics.pattern(topics.Kind.METRICS, site), Metrics, down.handler)
        await listener.wait_connected(10)
        await feed.wait_connected(10)
        yield down, feed


async def feed_readings(
    bus: Bus, site: str, rounds: int, pause_s: float, sent: list[tuple[str, int]]
) -> None:
    """Every reading is with the broker before the next (re-sent until it is)."""
    for k in range(rounds):
        for meter in METERS:
            while True:
                try:
                    await bus.publish(topics.reading(site, meter), reading(site, meter, k))
                    break
                except BusUnavailable:
                    await asyncio.sleep(0.05)
            sent.append((meter, k))
        await asyncio.sleep(pause_s)


def missing(sent: list[tuple[str, int]], down: Downstream) -> list[tuple[str, int]]:
    seen = set(down.seen)
    return [x for x in sent if x not in seen]


@pytest.mark.parametrize("fast", WIRES)
async def test_shutdowns_with_results_in_flight_lose_no_reading(
    settings: Settings, site_name: str, fast: bool
) -> None:
    s = settings.model_copy(update={"mqtt_fast": fast, "mqtt_session_expiry_s": 120})
    site = site_cfg(site_name)
    sent: list[tuple[str, int]] = []
    async with downstream_and_feed(s, site_name) as (down, feed):
        shutdown = Shutdown()
        task = asyncio.create_task(analytics.run(named(s, "ana"), site, shutdown))
        await shutdown.wait_ready(10)  # subscribed (its session keeps the rest)
        feeding = asyncio.create_task(feed_readings(feed, site_name, 150, 0.01, sent))
        try:
            for _ in range(3):  # stop while readings stream in, start again
                await asyncio.sleep(0.5)
                shutdown.request("test")
                await asyncio.wait_for(task, 15)
                shutdown = Shutdown()
                task = asyncio.create_task(analytics.run(named(s, "ana"), site, shutdown))
            await asyncio.wait_for(feeding, 30)
            await down.wait_for_all(set(sent), 30)
        finally:
            feeding.cancel()
            shutdown.request("test done")
            await asyncio.wait_for(task, 15)
    assert len(sent) == 150 * len(METERS)
    assert missing(sent, down) == []


@pytest.mark.parametrize("fast", WIRES)
async def test_broker_restarts_mid_stream_lose_no_reading(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, fast: bool
) -> None:
    s = settings.model_copy(update={"mqtt_url": mosquitto.url, "mqtt_fast": fast})
    site = site_cfg(site_name)
    sent: list[tuple[str, int]] = []
    shutdown = Shutdown()
    async with downstream_and_feed(s, site_name) as (down, feed):
        task = asyncio.create_task(analytics.run(named(s, "ana"), site, shutdown))
        await shutdown.wait_ready(10)
        feeding = asyncio.create_task(feed_readings(feed, site_name, 150, 0.01, sent))
        try:
            for _ in range(2):
                await asyncio.sleep(0.6)
                mosquitto.stop()
                await asyncio.sleep(0.3)
                mosquitto.start()
            await asyncio.wait_for(feeding, 60)
            await down.wait_for_all(set(sent), 40)
        finally:
            feeding.cancel()
            shutdown.request("test done")
            await asyncio.wait_for(task, 15)
    assert len(sent) == 150 * len(METERS)
    assert missing(sent, down) == []
