"""The actuator service (thin so far): follows the metrics of every meter."""

from __future__ import annotations

import logging

from shared import topics
from shared.bus import Bus, Incoming
from shared.messages import Metrics
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
SERVICE = "actuator"


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)
    latest: dict[str, Metrics] = {}

    async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics) as bus:

        async def on_metrics(m: Metrics, incoming: Incoming) -> None:
            latest[m.meter] = m

        bus.subscribe(topics.pattern(topics.Kind.METRICS, site.site), Metrics, on_metrics)
        await shutdown.wait()
