"""The collector service: poll every meter of the site file, publish readings.

Different buses are polled concurrently; meters on one bus in turn. A reading
that cannot be published (broker away) goes to the on-disk spool and is drained
in order when the broker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from prometheus_client import Counter, Gauge

from services.collector.modbus import ModbusBus
from services.collector.profiles import Profile, resolve
from shared import __version__, topics
from shared.bus import Bus, BusUnavailable
from shared.errors import PeerError
from shared.messages import GatewayStatus, Reading, encode, utcnow
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import MeterConfig, SiteConfig
from shared.spool import Spool

log = logging.getLogger(__name__)
SERVICE = "collector"


class Collector:
    def __init__(self, settings: Settings, site: SiteConfig, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.site = site
        self.metrics = metrics
        self.profiles: dict[str, Profile] = {
            m.name: resolve(m.profile, site.profiles) for m in site.meters
        }
        self.seq: dict[str, int] = defaultdict(int)
        self.spool = Spool(settings.data_dir / f"collector-{site.site}.spool")
        r = metrics.registry
        self.polls = Counter(
            "pfm_collector_polls_total", "Successful meter polls", ["meter"], registry=r
        )
        self.poll_errors = Counter(
            "pfm_collector_poll_errors_total",
            "Failed meter polls by kind",
            ["meter", "kind"],
            registry=r,
        )
        self.spool_depth = Gauge(
            "pfm_collector_spool_records", "Readings waiting in the disk spool", registry=r
        )
        self.spool_depth.set(len(self.spool))

    def status(self, state: str) -> GatewayStatus:
        return GatewayStatus(
            site=self.site.site,
            ts=utcnow(),
            seq=0,
            gateway=self.site.gateway,
            status=state,  # type: ignore[arg-type,unused-ignore]
            versions={"pfmon": __version__},
        )

    async def poll(self, bus: ModbusBus, meter: MeterConfig) -> Reading:
        profile = self.profiles[meter.name]
        started = time.perf_counter()
        ts = utcnow()
        raw: dict[str, dict[int, int]] = defaultdict(dict)
        async with bus.lock:
            for block in profile.plan():
                regs = await bus.read(meter.unit, block.table, block.address, block.count)
                for i, value in enumerate(regs):
                    raw[block.table][block.address + i] = value
        self.seq[meter.name] += 1
        return Reading(
            site=self.site.site,
            meter=meter.name,
            gateway=self.site.gateway,
            ts=ts,
            seq=self.seq[meter.name],
            profile=profile.name,
            values=profile.decode(raw),
            poll_s=time.perf_counter() - started,
        )

    async def publish(self, bus: Bus, reading: Reading) -> None:
        topic = topics.reading(reading.site, reading.meter)
        payload = encode(reading)
        if len(self.spool) == 0:
            try:
                await bus.publish(topic, payload)
                return
            except BusUnavailable:
                pass
        dropped = self.spool.put(topic, payload)
        if dropped:
            log.error("spool full: dropped %d oldest readings", dropped)
        self.spool_depth.set(len(self.spool))

    async def drain(self, bus: Bus, shutdown: Shutdown) -> None:
        """Send spooled readings in order whenever the broker is connected."""
        while not shutdown.requested.is_set():
            if len(self.spool) == 0 or not bus.connected:
                await shutdown.sleep(0.2)
                continue
            for record in self.spool.peek(200):
                try:
                    await bus.publish(record.topic, record.payload)
                except BusUnavailable:
                    break
                self.spool.remove_through(record.id)
            self.spool_depth.set(len(self.spool))

    async def run_bus(
        self, bus: Bus, mb: ModbusBus, meters: list[MeterConfig], shutdown: Shutdown
    ) -> None:
        interval = min(m.interval_s for m in meters)
        next_at = time.monotonic()
        while not shutdown.requested.is_set():
            for meter in meters:
                try:
                    reading = await self.poll(mb, meter)
                except PeerError as exc:
                    self.poll_errors.labels(meter.name, exc.kind).inc()
                    log.warning(
                        "poll of %s failed: %s",
                        meter.name,
                        exc,
                        extra={"meter": meter.name, "kind": exc.kind},
                    )
                    continue
                self.polls.labels(meter.name).inc()
                await self.publish(bus, reading)
                if mb.config.inter_frame_delay_s:
                    await asyncio.sleep(mb.config.inter_frame_delay_s)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            if await shutdown.sleep(delay):
                break
        mb.close()


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)
    collector = Collector(settings, site, metrics)
    status_topic = topics.gateway_status(site.site, site.gateway)
    will = (status_topic, encode(collector.status("offline")))

    async def announce(bus: Bus) -> None:
        await bus.publish(status_topic, collector.status("online"), retain=True)

    async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics, will=will) as bus:
        bus.on_connect(announce)
        by_bus: dict[str, list[MeterConfig]] = defaultdict(list)
        for meter in site.meters:
            by_bus[meter.bus].append(meter)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(collector.drain(bus, shutdown), name="collector-drain")
            for name, meters in by_bus.items():
                mb = ModbusBus(site.bus(name))
                tg.create_task(collector.run_bus(bus, mb, meters, shutdown), name=f"poll-{name}")
        if bus.connected:
            with contextlib.suppress(BusUnavailable):
                await bus.publish(status_topic, collector.status("offline"), retain=True)
    collector.spool.close()
