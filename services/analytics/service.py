"""The analytics service: ``reading`` and ``waveform`` in, ``metrics`` and ``event`` out.

One :class:`~services.analytics.batch.SiteEngine` holds every meter's state.
Readings are analysed in batches (numpy over many meters at once: ~20 µs a reading
in a batch of a thousand, ~0.7 ms for a batch of one): a reading waits at most
``analytics.batch_window_s`` (default 50 ms) for others, or until ``batch_max``
are waiting. A waveform first flushes the waiting readings, so each meter's inputs
are analysed in the order they arrived. Every input gives one instantaneous
``Metrics`` message (``interval_s = 0``) on the meter's ``metrics`` topic, plus the
3 s / 10 min aggregates when an interval closes, each on its own level below it
(``metrics/3s``, ``metrics/600s``: a bridge can forward only those), and alarm
``Event`` messages on transitions.

Results go out with :meth:`~shared.bus.Bus.publish_nowait`: the receive loop never
waits for a PUBACK (the bus keeps a bounded in-flight window, in order). Inputs are
acknowledged to the broker (manual acknowledgement) only once every result they
produced is confirmed: one :class:`~shared.bus.AckGroup` per batch of readings and
per waveform, acknowledged in arrival order. A result the broker does not confirm
(connection lost) is counted in ``pfm_analytics_publish_failed_total`` and logged by
the bus, and its inputs stay unacknowledged: the persistent session re-delivers
them after the next connection and they are analysed again (the archiver drops the
duplicate rows by meter, source and source seq).

A reading or waveform of a meter the site file does not know (neither under
``meters`` nor under ``analytics.meters``), or whose payload names another meter or
site than its topic, is a dead letter, counted under the fixed label
``meter="_unknown"``: random meter names cost neither engine memory nor metric
label children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.analytics.balance import EnergyBalance
from services.analytics.batch import MAX_METERS, SiteEngine, TooManyMeters
from services.analytics.dsp import WaveformError
from services.analytics.output import SERVICE, Output, encode_metrics, seq_seed
from shared import topics
from shared.bus import AckGroup, AckQueue, Bus, BusUnavailable, Incoming
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.messages import (
    Event,
    EventState,
    Reading,
    Severity,
    Waveform,
    archive_chunks,
    encode,
    encode_archive_batch,
)
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
#: the label of inputs refused because the meter count is at its bound (not the
#: meter's own name: random names must not grow the metric's label set either)
_UNTRACKED = "_untracked"
#: the label of inputs of meters the site file does not know
_UNKNOWN = "_unknown"


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
        #: the received messages of ``pending`` (acknowledged once their results are)
        self.pending_in: list[Incoming] = []
        self.acks = AckQueue()
        #: the meters whose inputs are analysed: the site's meters and the waveform
        #: sources listed under ``analytics.meters``
        self.known = frozenset(m.name for m in site.meters) | frozenset(site.analytics.meters)
        #: per known meter, the topics its inputs may come on
        self._input_topics: dict[str, tuple[str, str]] = {}
        self.unknown = 0
        self.closing = False
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.notice_seq = 0
        self.refused = 0
        #: results that could not be encoded (a bug or an input the schema should refuse)
        self.failed_outputs = 0
        self.children: dict[str, tuple[Any, Any, Any, Any]] = {}
        #: per meter, looked up once (bounded like the engine's meters)
        self._metrics_topics: dict[str, str] = {}
        #: per meter and aggregate interval, the aggregate's topic
        self._aggregate_topics: dict[tuple[str, float], str] = {}
        #: ``analytics.archive_batches``: the metrics of the batch being emitted, also
        #: published together on the archive topic (under the batch's ack group)
        self.archive = site.analytics.archive_batches
        self.archive_max = site.analytics.archive_batch_max
        self.archive_bytes = site.analytics.archive_batch_bytes
        self._archived: list[tuple[str, bytes]] = []
        self._archive_topic = topics.archive(site.site, SERVICE)
        self.archive_seq = seq_seed()

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

    def subscribe(self) -> None:
        """Route the site's readings and waveforms here (the bus must acknowledge
        manually: ``Bus(..., manual_ack=True)``)."""
        bus, site = self.bus, self.site.site
        bus.on_publish_failed(self.on_publish_failed)
        bus.subscribe(topics.pattern(topics.Kind.READING, site), Reading, self.on_reading)
        bus.subscribe(topics.pattern(topics.Kind.WAVEFORM, site), Waveform, self.on_waveform)

    # -- readings: batched ---------------------------------------------------------------

    async def _accept(self, meter: str, site: str, incoming: Incoming | None) -> bool:
        """Whether an input of ``meter`` is analysed. A meter the site file does not
        know, or a payload naming another meter/site than its topic, is dead-lettered
        (and acknowledged once the dead letter is with the broker)."""
        if incoming is None:  # called directly (tests, tools): no topic to check
            return meter in self.known or self._refuse_unknown(meter)
        known = meter in self.known and site == self.site.site
        if known and incoming.topic in self._inputs_of(meter):
            return True
        try:
            where = topics.parse(incoming.topic)
        except ConfigError as exc:  # a topic level that is not a slug
            where = topics.TopicParts("?", f"? ({exc})", topics.Kind.READING)
        kind = where.kind.value
        if where.name != meter or site != self.site.site:
            reason = (
                f"payload site {site!r} meter {meter!r} differ from the topic's "
                f"site {where.site!r} meter {where.name!r}"
            )
            label = "topic_mismatch"
        else:
            reason = f"meter {meter!r} is not in the site file of {self.site.site!r}"
            label = "unknown_meter"
        self.metrics.rejected.labels(_UNKNOWN, label).inc()
        group = self.acks.group([incoming])
        if not await self.bus.dead_letter(incoming.topic, incoming.payload, reason, kind):
            group.lose()
        group.seal()
        return False

    def _inputs_of(self, meter: str) -> tuple[str, str]:
        """The reading and waveform topics of a known meter (built once per meter)."""
        got = self._input_topics.get(meter)
        if got is None:
            site = self.site.site
            got = self._input_topics[meter] = (
                topics.reading(site, meter),
                topics.waveform(site, meter),
            )
        return got

    def _refuse_unknown(self, meter: str) -> bool:
        self.unknown += 1
        self.metrics.rejected.labels(_UNKNOWN, "unknown_meter").inc()
        if self.unknown == 1 or self.unknown % 1000 == 0:
            log.error("meter %r is not in the site file (%d inputs refused)", meter, self.unknown)
        return False

    def _group(self, incoming: list[Incoming]) -> AckGroup:
        return self.acks.group([i for i in incoming if i is not None])

    async def on_reading(self, reading: Reading, incoming: Incoming) -> None:
        """Queue the reading for the next batch."""
        if self.closing:
            return  # not acknowledged: re-delivered after the restart
        if not await self._accept(reading.meter, reading.site, incoming):
            return
        self.pending.append(reading)
        self.pending_in.append(incoming)
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
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        group = self._group(self.pending_in)
        self.pending_in = []
        try:
            self._analyse(batch, group)
        finally:
            self._archive_out(group)
            group.seal()

    def _analyse(self, batch: list[Reading], group: AckGroup) -> None:
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
                self._emit(r.meter, out, group)
            except Exception as exc:  # our bug: this input's results, nothing else
                self._failed_output(r.meter, f"reading seq {r.seq}", exc)
        if batch:  # one observation per batch: what one input cost in it
            self.metrics.process.observe((time.perf_counter() - started) / len(batch))

    # -- waveforms: one at a time (each is a batch of FFTs already) ------------------------

    async def on_waveform(self, wf: Waveform, incoming: Incoming) -> None:
        if self.closing:
            return  # not acknowledged: re-delivered after the restart
        if not await self._accept(wf.meter, wf.site, incoming):
            return
        self.flush()  # the meter's earlier readings first
        group = self._group([incoming])
        try:
            self._waveform(wf, incoming, group)
        finally:
            self._archive_out(group)
            group.seal()

    def _waveform(self, wf: Waveform, incoming: Incoming | None, group: AckGroup) -> None:
        if not self._tracked(wf.meter):
            return
        started = time.perf_counter()
        try:
            out = self.engine.on_waveform(wf)
        except WaveformError as exc:
            self.metrics.rejected.labels(wf.meter, "waveform").inc()
            log.warning(
                "waveform seq %d of %s rejected: %s",
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
            self._publish(topics.event(wf.site, wf.meter), encode(notice), "event", group)
            return
        self._children(wf.meter)[1].inc()
        self._emit(wf.meter, out, group)
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

    def _emit(self, meter: str, out: Output, group: AckGroup) -> None:
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
            on = self._aggregate_topic(meter, m.interval_s) if m.aggregate else topic
            self._publish(on, payload, "metrics", group)
            if self.archive:
                self._archived.append((on, payload))
        for ev in out.events:
            try:
                payload = encode(ev)
            except Exception as exc:
                self._failed_output(meter, f"event {ev.code}", exc)
                continue
            self._publish(topics.event(ev.site, meter), payload, "event", group)
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

    def _archive_out(self, group: AckGroup) -> None:
        """Publish the metrics emitted under ``group`` as archive batches (at most
        ``archive_batch_max`` messages and ``archive_batch_bytes`` each), under the same
        group: its inputs are acknowledged only once the batches are confirmed too."""
        items, self._archived = self._archived, []
        for chunk in archive_chunks(items, self.archive_max, self.archive_bytes):
            self.archive_seq += 1
            try:
                payload = encode_archive_batch(
                    self.site.site, datetime.now(UTC), self.archive_seq, SERVICE, chunk
                )
            except Exception as exc:  # our bug: the inputs stay unacknowledged
                group.lose()
                self._failed_output("_archive", f"archive batch seq {self.archive_seq}", exc)
                continue
            self._publish(self._archive_topic, payload, "archive", group)

    def _aggregate_topic(self, meter: str, interval_s: float) -> str:
        """An aggregate's own topic (``.../metrics/3s``), built once per meter and interval."""
        key = (meter, interval_s)
        got = self._aggregate_topics.get(key)
        if got is None:
            got = self._aggregate_topics[key] = topics.aggregate(self.site.site, meter, interval_s)
        return got

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

    def _publish(self, topic: str, payload: bytes, kind: str, group: AckGroup) -> None:
        try:
            self.bus.publish_nowait(topic, payload, after=group)
        except BusUnavailable as exc:
            group.lose()  # its inputs are re-delivered after the reconnection
            self.metrics.publish_failed.labels(kind).inc()
            log.warning("could not publish %s: %s", topic, exc, extra={"service": SERVICE})

    def on_publish_failed(self, topic: str, payload: bytes, reason: str) -> None:
        """The broker did not confirm a result (the bus has logged it): count it."""
        self.metrics.publish_failed.labels(topics.kind_of(topic)).inc()

    async def drain(self, timeout: float = 5.0) -> None:
        """Stop taking inputs, analyse what waits, then wait (bounded) until the broker
        confirmed or refused every result: the inputs of confirmed results are
        acknowledged; the others (and inputs that arrive meanwhile) are not, and the
        persistent session re-delivers them on the next start."""
        self.closing = True
        self.flush()
        with contextlib.suppress(TimeoutError):
            await self.bus.drain(timeout)
        await asyncio.sleep(0)  # the acknowledgements are written once per loop pass
        if self.acks.waiting:
            log.warning(
                "%d input groups not confirmed in %.1f s: left for re-delivery",
                self.acks.waiting,
                timeout,
                extra={"service": SERVICE},
            )


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    ana_metrics = AnalyticsMetrics(metrics)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)

    async with Bus(
        settings, service=SERVICE, site=site.site, metrics=metrics, manual_ack=True
    ) as bus:
        app = Analytics(site, bus, ana_metrics)
        app.subscribe()
        shutdown.ready_after(bus.wait_subscribed(), "subscribed")
        await shutdown.wait()
        await app.drain()
