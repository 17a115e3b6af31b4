"""The analytics service: ``reading`` in, ``metrics`` out.

Register-level readings (V, I, P, PF per phase): S = V*I, N = sqrt(S^2 - P^2)
(reactive sign unknown: such meters give no lead/lag), PF = P / S, totals.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

from shared import topics
from shared.bus import Bus, Incoming
from shared.measurements import Measurement as M
from shared.messages import LoadKind, Metrics, Reading
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
SERVICE = "analytics"


def reading_metrics(reading: Reading, seq: int) -> Metrics:
    v = reading.values
    out: dict[M, float] = {}
    load: dict[str, LoadKind] = {}
    p_tot = s_tot = 0.0
    for ph in (1, 2, 3):
        volts = v.get(M.per_phase("voltage", ph))
        amps = v.get(M.per_phase("current", ph))
        if volts is None or amps is None:
            continue
        s = volts * amps
        p = v.get(M.per_phase("power", ph), 0.0)
        out[M.per_phase("voltage", ph)] = volts
        out[M.per_phase("current", ph)] = amps
        out[M.per_phase("power", ph)] = p
        out[M.per_phase("apparent_power", ph)] = s
        out[M.per_phase("nonactive_power", ph)] = math.sqrt(max(0.0, s * s - p * p))
        if s > 0:
            out[M.per_phase("power_factor", ph)] = p / s
        load[f"L{ph}"] = LoadKind.UNKNOWN
        p_tot += p
        s_tot += s
    out[M.POWER] = p_tot
    out[M.APPARENT_POWER] = s_tot
    if s_tot > 0:
        out[M.POWER_FACTOR] = p_tot / s_tot
    return Metrics(
        site=reading.site,
        meter=reading.meter,
        ts=reading.ts,
        seq=seq,
        interval_s=0,
        values=out,
        load=load,
        source_seq=reading.seq,
    )


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)
    seqs: dict[str, int] = defaultdict(int)

    async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics) as bus:

        async def on_reading(reading: Reading, incoming: Incoming) -> None:
            seqs[reading.meter] += 1
            out = reading_metrics(reading, seqs[reading.meter])
            await bus.publish(topics.metrics(out.site, out.meter), out)

        bus.subscribe(topics.pattern(topics.Kind.READING, site.site), Reading, on_reading)
        await shutdown.wait()
