"""The analytics service: ``reading`` and ``waveform`` in, ``metrics`` and ``event`` out.

One :class:`~services.analytics.batch.SiteEngine` holds every meter's state.
Readings are analysed in batches (numpy over many meters at once: ~20 µs a reading
in a batch of a thousand, ~0.7 ms for a batch of one): a reading waits at most
``analytics.batch_window_s`` (default 50 ms) for others, or until ``batch_max``
are waiting. A waveform first flushes the waiting readings, so each meter's inputs
are analysed in the order they arrived. Every input gives one instantaneous
``Metrics`` message (``interval_s = 0``), plus the 3 s / 10 min aggregates when an
interval closes, and alarm ``Event`` messages on transitions.

Results go out with :meth:`~shared.bus.Bus.publish_nowait`: the receive loop never
waits for a PUBACK (the bus keeps a bounded in-flight window, in order); a message
the broker does not confirm is counted in ``pfm_analytics_publish_failed_total``
and logged by the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.analytics.balance import EnergyBalance
from services.analytics.batch import MAX_METERS, SiteEngine, TooManyMeters
from services.analytics.dsp import WaveformError
from services.analytics.output import SERVICE, Output, encode_metrics
from shared import topics
from shared.bus import Bus, BusUnavailable, Incoming
from shared.measurements import Measurement as M
from shared.messages import Event, EventState, Reading, Severity, Waveform, encode
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
#: the label of inputs refused because the meter count is at its bound (not the
#: meter's own name: random names must not grow the metric's label set either)
_UNTRACKED = "_untracked"


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
            "Inputs that could not be analysed, or results that could not be encoded (reason "
            "in the log; a notice event for waveforms)",
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
            "Time to analyse one input (derive, average, alarms, encode); observed once per "
            "batch of readings as the batch's time / its size",
            buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
            registry=r,
        )
        self.unmetered = Gauge(
            "pfm_analytics_unmetered_power_watts",
            "Active power of a parent meter that its child meters do not measure (parent "
            "minus the children's sum, alarm-slot averages)",
            ["meter"],
            registry=r,
        )
        self.publish_failed = Counter(
            "pfm_analytics_publish_failed_total",
            "Messages that could not be published (broker down)",
            ["kind"],
            registry=r,
        )


class Analytics:
    """The site engine, the batching of readings and the publishing of results."""

    def __init__(
        self, site: SiteConfig, bus: Bus, metrics: AnalyticsMetrics, max_meters: int = MAX_METERS
    ):
        self.site = site
        self.bus = bus
        self.metrics = metrics
        self.engine = SiteEngine(site, max_meters=max_meters)
        self.balance = EnergyBalance(site)
        self.window_s = site.analytics.batch_window_s
        self.batch_max = site.analytics.batch_max
        self.pending: list[Reading] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.notice_seq = 0
        self.refused = 0
        #: results that could not be encoded (a bug or an input the schema should refuse)
        self.failed_outputs = 0
        self.children: dict[str, tuple[Any, Any, Any, Any]] = {}
        #: per meter, looked up once (bounded like the engine's meters)
        self._metrics_topics: dict[str, str] = {}

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

    def _tracked(self, meter: str) -> bool:
        """Whether the engine holds (or could add) ``meter``; counts and logs a refusal."""
        try:
            self.engine.track(meter)
        except TooManyMeters as exc:
            self.refused += 1
            self.metrics.rejected.labels(_UNTRACKED, "too_many_meters").inc()
            if self.refused == 1 or self.refused % 1000 == 0:
                log.error("%s (%d inputs refused so far)", exc, self.refused)
            return False
        return True

    # -- readings: batched ---------------------------------------------------------------

    async def on_reading(self, reading: Reading, incoming: Incoming) -> None:
        """Queue the reading for the next batch."""
        self.pending.append(reading)
        if len(self.pending) >= self.batch_max:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            if self.window_s > 0:
                self._timer = loop.call_later(self.window_s, self.flush)
            else:
                self._timer = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Analyse and publish the waiting readings (the timer's callback)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self.pending = self.pending, []
        if not batch:
            return
        started = time.perf_counter()
        batch = [r for r in batch if self._tracked(r.meter)]
        try:
            outs = self.engine.on_readings(batch)
        except Exception:
            # a bug, not bad input (that was refused at validation): find the reading
            # that trips it, analyse the others one by one. The failed batch may have
            # updated some meters' state before it raised: their averages can count a
            # reading twice until it leaves the window - the log says a bug happened.
            log.exception("batch of %d readings failed; analysing them one by one", len(batch))
            outs = []
            kept = []
            for r in batch:
                try:
                    outs.append(self.engine.on_readings([r])[0])
                    kept.append(r)
                except Exception:
                    self.metrics.rejected.labels(r.meter, "reading").inc()
                    log.exception(
                        "reading seq %d of %s could not be analysed",
                        r.seq,
                        r.meter,
                        extra={"service": SERVICE, "meter": r.meter},
                    )
            batch = kept
        for r, out in zip(batch, outs, strict=True):
            self._children(r.meter)[0].inc()
            try:
                self._emit(r.meter, out)
            except Exception as exc:  # our bug: this input's results, nothing else
                self._failed_output(r.meter, f"reading seq {r.seq}", exc)
        if batch:  # one observation per batch: what one input cost in it
            self.metrics.process.observe((time.perf_counter() - started) / len(batch))

    # -- waveforms: one at a time (each is a batch of FFTs already) ------------------------

    async def on_waveform(self, wf: Waveform, incoming: Incoming) -> None:
        self.flush()  # the meter's earlier readings first
        if not self._tracked(wf.meter):
            return
        started = time.perf_counter()
        try:
            out = self.engine.on_waveform(wf)
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
        self._emit(wf.meter, out)
        self.metrics.process.observe(time.perf_counter() - started)

    # -- results ---------------------------------------------------------------------------

    def _balance(self, meter: str, out: Output) -> None:
        """Feed the energy balance with the meter's average P; on a parent, add its
        ``unmetered_power`` to the metrics and the alarm's transitions to the events."""
        first = out.metrics[0]
        if first.aggregate or first.interval_s:
            return
        bal = self.balance
        bal.observe(meter, first.ts, first.value(M.POWER))
        if not bal.is_parent(meter):
            return
        result = bal.evaluate(meter, first.ts)
        if result is None:
            return
        first.values[M.UNMETERED_POWER] = result.unmetered_w
        self.metrics.unmetered.labels(meter).set(result.unmetered_w)
        if result.transition is None:
            return
        mid = self.engine.track(meter)
        self.engine.event_seq[mid] += 1
        out.events.append(
            Event(
                site=first.site,
                ts=first.ts,
                seq=self.engine.event_seq[mid],
                meter=meter,
                code="energy_balance",
                state=result.transition,
                severity=bal.definition.severity,
                message=bal.message(result),
                evidence=result.evidence,
                service=SERVICE,
            )
        )

    def _emit(self, meter: str, out: Output) -> None:
        """Publish one input's results; a message that cannot be encoded costs only
        itself (counted in ``pfm_analytics_rejected_total{kind="encode"}``)."""
        if out.metrics and self.balance.watches(meter):
            self._balance(meter, out)
        topic = self._metrics_topics.get(meter)
        if topic is None:
            topic = self._metrics_topics[meter] = topics.metrics(self.site.site, meter)
        for m in out.metrics:
            try:
                payload = encode_metrics(m)
            except Exception as exc:  # e.g. an integer beyond 64 bits (refused at entry)
                self._failed_output(meter, f"metrics seq {m.seq}", exc)
                continue
            self._publish(topic, payload, "metrics")
        for ev in out.events:
            try:
                payload = encode(ev)
            except Exception as exc:
                self._failed_output(meter, f"event {ev.code}", exc)
                continue
            self._publish(topics.event(ev.site, meter), payload, "event")
            self.metrics.transitions.labels(meter, ev.code, ev.state.value).inc()
            self.metrics.alarms_active.labels(meter, ev.code).inc(
                1 if ev.state == EventState.RAISED else -1
            )
        if out.metrics:
            _, _, pf_gauge, neutral_gauge = self._children(meter)
            first = out.metrics[0]
            pf = first.value(M.POWER_FACTOR)
            if pf is not None:
                pf_gauge.set(pf)
            score = first.value(M.NEUTRAL_SCORE)
            if score is not None:
                neutral_gauge.set(score)

    def _failed_output(self, meter: str, what: str, exc: Exception) -> None:
        """A result that could not be encoded or published: counted; logged the first
        time and every 1000th (a meter stuck on such an input does not flood the log)."""
        self.metrics.rejected.labels(meter, "encode").inc()
        self.failed_outputs += 1
        if self.failed_outputs == 1 or self.failed_outputs % 1000 == 0:
            log.error(
                "%s of %s not published: %s: %s (%d results lost so far)",
                what,
                meter,
                type(exc).__name__,
                exc,
                self.failed_outputs,
                extra={"service": SERVICE, "meter": meter},
            )

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
        """Analyse what waits, then wait (bounded) until the broker confirmed or refused
        every result."""
        self.flush()
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
        shutdown.ready_after(bus.wait_subscribed(), "subscribed")
        await shutdown.wait()
        await app.drain()
