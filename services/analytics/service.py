"""The analytics service: ``reading`` and ``waveform`` in, ``metrics`` and ``event`` out.

One :class:`~services.analytics.engine.MeterEngine` per meter (created on the
first message). Every input gives one instantaneous ``Metrics`` message
(``interval_s = 0``) at once, plus the 3 s / 10 min aggregates when an interval
closes, and alarm ``Event`` messages on transitions. Results go out with
:meth:`~shared.bus.Bus.publish_nowait`: the receive loop never waits for a PUBACK
(the bus keeps a bounded in-flight window, in order); a message the broker does not
confirm is counted in ``pfm_analytics_publish_failed_total`` and logged by the bus.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.analytics.dsp import WaveformError
from services.analytics.engine import SERVICE, MeterEngine, Output, encode_metrics
from shared import topics
from shared.bus import Bus, BusUnavailable, Incoming
from shared.measurements import Measurement as M
from shared.messages import Event, EventState, Reading, Severity, Waveform, encode
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
#: state is per meter and bounded; the number of meters is bounded too
MAX_METERS = 5000


class TooManyMeters(RuntimeError):
    """More distinct meter names than MAX_METERS arrived on the site's topics."""


__all__ = ["SERVICE", "Analytics", "AnalyticsMetrics", "run"]


class AnalyticsMetrics:
    def __init__(self, base: ServiceMetrics):
        r = base.registry
        self.readings = Counter(
            "pfm_analytics_readings_total", "Readings analysed", ["meter"], registry=r
        )
        self.waveforms = Counter(
            "pfm_analytics_waveforms_total", "Waveform windows analysed", ["meter"], registry=r
        )
        self.rejected = Counter(
            "pfm_analytics_rejected_total",
            "Inputs that could not be analysed (reason in the log and a notice event)",
            ["meter", "kind"],
            registry=r,
        )
        self.alarms_active = Gauge(
            "pfm_analytics_alarms_active", "Active alarms", ["meter", "code"], registry=r
        )
        self.transitions = Counter(
            "pfm_analytics_alarm_transitions_total",
            "Alarm raised/cleared transitions",
            ["meter", "code", "state"],
            registry=r,
        )
        self.pf = Gauge(
            "pfm_analytics_power_factor", "Latest total power factor", ["meter"], registry=r
        )
        self.neutral = Gauge(
            "pfm_analytics_neutral_score", "Latest broken-neutral score", ["meter"], registry=r
        )
        self.process = Histogram(
            "pfm_analytics_process_seconds",
            "Time to analyse one input (derive, average, alarms, encode)",
            buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
            registry=r,
        )
        self.publish_failed = Counter(
            "pfm_analytics_publish_failed_total",
            "Messages that could not be published (broker down)",
            ["kind"],
            registry=r,
        )


class Analytics:
    """The per-meter engines and the publishing of their output."""

    def __init__(self, site: SiteConfig, bus: Bus, metrics: AnalyticsMetrics):
        self.site = site
        self.bus = bus
        self.metrics = metrics
        self.engines: dict[str, MeterEngine] = {}
        self.notice_seq = 0
        self.children: dict[str, tuple[Any, Any, Any, Any]] = {}

    def _children(self, meter: str) -> tuple[Any, Any, Any, Any]:
        """Labelled Prometheus children per meter, looked up once."""
        got = self.children.get(meter)
        if got is None:
            m = self.metrics
            got = self.children[meter] = (
                m.readings.labels(meter),
                m.waveforms.labels(meter),
                m.pf.labels(meter),
                m.neutral.labels(meter),
            )
        return got

    def engine(self, meter: str) -> MeterEngine:
        eng = self.engines.get(meter)
        if eng is None:
            if len(self.engines) >= MAX_METERS:
                raise TooManyMeters(
                    f"meter {meter!r}: already tracking {MAX_METERS} meters; "
                    "refusing more (is something publishing random meter names?)"
                )
            eng = self.engines[meter] = MeterEngine(self.site, meter)
        return eng

    async def on_reading(self, reading: Reading, incoming: Incoming) -> None:
        started = time.perf_counter()
        out = self.engine(reading.meter).on_reading(reading)
        self._children(reading.meter)[0].inc()
        self._emit(reading.meter, out, started)

    async def on_waveform(self, wf: Waveform, incoming: Incoming) -> None:
        started = time.perf_counter()
        try:
            out = self.engine(wf.meter).on_waveform(wf)
        except WaveformError as exc:
            self.metrics.rejected.labels(wf.meter, "waveform").inc()
            log.warning(
                "waveform %s seq %d of %s rejected: %s",
                incoming.topic,
                wf.seq,
                wf.meter,
                exc,
                extra={"service": SERVICE, "meter": wf.meter},
            )
            self.notice_seq += 1
            notice = Event(
                site=wf.site,
                ts=wf.ts,
                seq=self.notice_seq,
                meter=wf.meter,
                code="waveform_rejected",
                state=EventState.NOTICE,
                severity=Severity.WARNING,
                message=f"waveform seq {wf.seq}: {exc}",
                evidence={"source_seq": wf.seq},
                service=SERVICE,
            )
            self._publish(topics.event(wf.site, wf.meter), encode(notice), "event")
            return
        self._children(wf.meter)[1].inc()
        self._emit(wf.meter, out, started)

    def _emit(self, meter: str, out: Output, started: float) -> None:
        for m in out.metrics:
            self._publish(topics.metrics(m.site, meter), encode_metrics(m), "metrics")
        for ev in out.events:
            self._publish(topics.event(ev.site, meter), encode(ev), "event")
            self.metrics.transitions.labels(meter, ev.code, ev.state.value).inc()
            self.metrics.alarms_active.labels(meter, ev.code).inc(
                1 if ev.state == EventState.RAISED else -1
            )
        if out.metrics:
            _, _, pf_gauge, neutral_gauge = self._children(meter)
            vals = out.metrics[0].values
            pf = vals.get(M.POWER_FACTOR)
            if pf is not None:
                pf_gauge.set(pf)
            score = vals.get(M.NEUTRAL_SCORE)
            if score is not None:
                neutral_gauge.set(score)
        self.metrics.process.observe(time.perf_counter() - started)

    def _publish(self, topic: str, payload: bytes, kind: str) -> None:
        try:
            self.bus.publish_nowait(topic, payload)
        except BusUnavailable as exc:
            self.metrics.publish_failed.labels(kind).inc()
            log.warning("could not publish %s: %s", topic, exc, extra={"service": SERVICE})

    def on_publish_failed(self, topic: str, payload: bytes, reason: str) -> None:
        """The broker did not confirm a result (the bus has logged it): count it."""
        self.metrics.publish_failed.labels(topic.rsplit("/", 1)[-1]).inc()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until the broker confirmed or refused every result."""
        with contextlib.suppress(TimeoutError):
            await self.bus.drain(timeout)


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    ana_metrics = AnalyticsMetrics(metrics)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)

    async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics) as bus:
        app = Analytics(site, bus, ana_metrics)
        bus.on_publish_failed(app.on_publish_failed)
        bus.subscribe(topics.pattern(topics.Kind.READING, site.site), Reading, app.on_reading)
        bus.subscribe(topics.pattern(topics.Kind.WAVEFORM, site.site), Waveform, app.on_waveform)
        await shutdown.wait()
        await app.drain()
