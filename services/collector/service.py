"""The collector service: poll every meter of the site file, publish readings.

How it keeps going when things break:

* every bus runs its own scheduler; a TCP bus gets ``BusConfig.pool_size``
  connections worked by as many workers for its answering meters and one more for
  its failing and offline ones; a serial line gets one. Meters are staggered
  over their interval so the load is even; a poll has a deadline (its request
  timeout, and never more than its interval) so a dead or slow meter holds one
  connection for at most that long and the others keep their schedule. A meter
  still busy when its next poll is due skips that cycle (counted as missed);
* each failure is classified (Modbus exception 0x01..0x0B, crc, timeout,
  refused, garbage - see :mod:`shared.modbus`; a BACnet/IP meter's error_*, reject_*,
  abort_*, units - see :mod:`services.collector.bacnet`), counted in
  ``pfm_collector_poll_errors_total{meter,kind}`` and logged with the device, unit
  and registers; transient kinds are retried at once (``BusConfig.retries``);
* after ``MeterConfig.offline_after`` failures in a row the meter is offline: a
  ``device_offline`` event (state raised) on ``topics.event(site, meter)``, the
  gauge ``pfm_collector_meter_online`` drops to 0, the retained gateway status
  counts it; it is then re-probed (one attempt) with exponential backoff up to
  :data:`PROBE_MAX_S` on a TCP bus or :data:`SERIAL_PROBE_TIMEOUTS` timeouts on a
  serial line (never beyond ``BusConfig.reprobe_max_s``), and a ``device_online``
  event (state cleared) is published when it answers again;
* values are published as primary values: the meter's ``ct_ratio``/``pt_ratio`` are
  applied to what the profile decodes (what each measurement scales with comes from
  :attr:`shared.measurements.Measurement.scale`), unless the profile says the device
  reports primary values itself (``reports_primary``: then a configured ratio is
  logged as a warning at start and not applied);
* a decoded value that is not plausible (not finite, outside its measurement's
  physical bounds, or outside the site file's ``limits:`` for the meter) is left out
  of the reading - the rest is published - and reported: a dead letter on
  ``pfm/v1/{site}/deadletter/collector`` naming the meter, the measurement, the
  value and the bound, with the registers it came from, counted in
  ``pfm_collector_implausible_total{meter,measurement}``. A meter stuck on a
  garbage value reports it at most once per ``IMPLAUSIBLE_REPORT_S`` (the next
  report says how many were not reported);
* readings and events go through one outbox: published at QoS 1 while the broker
  is connected, otherwise appended to the bounded on-disk spool, which is drained
  in order when the broker is back (and survives a restart). When the spool is
  full the oldest records are dropped and counted. Per-meter ``seq`` continues
  across clean restarts (kept in the spool file); a first start, a wiped data folder
  or a crash start it from the clock, so a seq is never used twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter, Gauge, Histogram

from services.collector.homeassistant import Discovery
from services.collector.profiles import Block, Profile, Refused, resolve, to_primary
from services.collector.timesync import CLOCKS, RESYNC_S
from shared import __version__, topics
from shared.backoff import Backoff
from shared.bus import AckQueue, Bus, BusUnavailable, is_refusal
from shared.errors import ConfigError, PeerError
from shared.measurements import Measurement as M
from shared.measurements import implausible
from shared.messages import (
    DeadLetter,
    Event,
    EventState,
    GatewayStatus,
    Reading,
    Severity,
    encode,
    utcnow,
)
from shared.metrics import ServiceMetrics
from shared.modbus import TRANSIENT, ModbusConnection, quiet_library_logs
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import BusConfig, MeterConfig, SiteConfig
from shared.site.collector import TYPE_WIDTH
from shared.spool import Spool

if TYPE_CHECKING:  # imported when a site has BACnet meters (bacpypes3: ~0.4 s, ~9 MB)
    from services.collector import bacnet as bn

log = logging.getLogger(__name__)
SERVICE = "collector"

#: records published concurrently per batch (paho sends them in order)
BATCH = 64
#: save the per-meter seq this often (and at shutdown)
SEQ_SAVE_S = 5.0
#: how long a batch of records waits for the broker's PUBACKs before they are spooled
PUBLISH_TIMEOUT_S = 10.0
#: the scheduler's shortest sleep (at most a quarter of the shortest poll interval of
#: the bus): meters that fall due within one tick are polled together, at most this late
TICK_S = 0.05
#: a restart after a crash resumes seq at least this far past the last save (and past
#: the clock's seed), so no seq repeats
SEQ_MARGIN = 100
#: longest wait between probes of an offline meter on a TCP bus (probes have their own
#: connection there, so they cost the other meters nothing)
PROBE_MAX_S = 2.0
#: on a serial line a probe of a silent unit holds the line for its timeout: wait at
#: least this many timeouts between probes (at most 1/10 of the line's time)
SERIAL_PROBE_TIMEOUTS = 10.0


def _object(spec: bn.ObjectSpec) -> tuple[str, int, list[int]]:
    """Where a BACnet value came from, as a refusal's table (object type) and address
    (instance); there are no registers."""
    return spec.object_type, spec.instance, []


def clock_seq() -> int:
    """A first seq from the clock: milliseconds since the epoch. A meter is polled at most
    20 times a second, so a run started from it never reaches the seed of a later run."""
    return int(time.time() * 1000)


#: a meter's implausible measurement is reported (dead letter, log) at most this often
IMPLAUSIBLE_REPORT_S = 60.0


def _checked_limits(
    limits: dict[M, tuple[float, float]], factors: Mapping[M, float]
) -> dict[M, tuple[float, float]]:
    """What a meter's primary values are checked against after its CT/PT ratios: the
    site file's limits, and the physical bounds of every scaled measurement (a value
    the ratio pushes past them is left out with a dead letter, not the whole reading)."""
    return {**{m: m.bounds for m in factors}, **limits}


@dataclass(eq=False)
class MeterState:
    """Everything the collector tracks about one meter."""

    config: MeterConfig
    bus: BusConfig
    profile: Profile
    blocks: list[Block]
    #: secondary -> primary multipliers (CT/PT ratios), only those that are not 1
    factors: dict[M, float] = field(default_factory=dict)
    seq: int = 0
    event_seq: int = 0
    failures: int = 0
    #: None until the first poll result
    online: bool | None = None
    due: float = 0.0
    busy: bool = False
    probes: int = 0
    last_error: str = ""
    synced_at: float | None = None
    #: the block being read (for the log line when the deadline passes)
    current: Block | None = None
    polls_metric: Any = None
    missed_metric: Any = None
    #: the site file's limits for this meter (measurement -> (min, max))
    limits: dict[M, tuple[float, float]] = field(default_factory=dict)
    #: per implausible measurement: when it was last reported, and refusals since
    reported: dict[M, tuple[float, int]] = field(default_factory=dict)
    #: a BACnet/IP meter: its profile (``profile`` is then its name and model only)
    bacnet: bn.BacnetProfile | None = None
    #: where its readings go (worked out once: the names were checked at config load)
    reading_topic: str = ""

    @property
    def where(self) -> str:
        """The device in messages: ``unit 3 on b1`` or ``device 1201 at 10.0.0.5``."""
        if self.config.bacnet is not None:
            target = self.config.bacnet
            return f"device {target.device_instance} at {target.address} on {self.bus.name}"
        return f"unit {self.config.unit} on {self.bus.name}"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def timeout(self) -> float:
        return self.config.timeout_s or self.bus.timeout_s

    @property
    def troubled(self) -> bool:
        """Its last poll failed, or it is offline: polled on the bus's spare connection
        (TCP), where its timeouts hold no connection the answering meters need."""
        return self.failures > 0 or self.online is False

    def __lt__(self, other: MeterState) -> bool:  # heap tie-break
        return self.config.name < other.config.name


@dataclass
class _Outbox:
    """Records waiting for the publisher; beyond ``limit`` they spill to the spool."""

    spill: Callable[[list[tuple[str, bytes]]], None]
    limit: int = 20_000
    records: deque[tuple[str, bytes]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, topic: str, payload: bytes) -> None:
        self.records.append((topic, payload))
        if len(self.records) > self.limit:  # the broker is slower than the meters
            self.spill(self.take())
        self.wake.set()

    def take(self) -> list[tuple[str, bytes]]:
        out = list(self.records)
        self.records.clear()
        return out


class Collector:
    def __init__(
        self,
        settings: Settings,
        site: SiteConfig,
        metrics: ServiceMetrics,
        *,
        spool_max_records: int = 1_000_000,
    ) -> None:
        self.settings = settings
        self.site = site
        self.metrics = metrics
        self.meters: list[MeterState] = []
        problems = []
        for i, mc in enumerate(site.meters):
            if mc.bacnet is not None:
                from services.collector import bacnet as bn

                try:
                    bprofile = bn.resolve(mc.profile, site.bacnet_profiles)
                except ConfigError as exc:
                    problems.append(f"meters[{i}].profile: {exc}")
                    continue
                state = MeterState(
                    mc,
                    site.bus(mc.bus),
                    bprofile.as_profile(),
                    [],
                    bprofile.primary_factors(mc.ct_ratio, mc.pt_ratio),
                    bacnet=bprofile,
                )
                state.limits = _checked_limits(site.limits_of(mc.name), state.factors)
                self.meters.append(state)
                continue
            try:
                profile = resolve(mc.profile, site.profiles)
            except ConfigError as exc:
                problems.append(f"meters[{i}].profile: {exc}")
                continue
            factors = profile.primary_factors(mc.ct_ratio, mc.pt_ratio)
            if profile.reports_primary and (mc.ct_ratio != 1.0 or mc.pt_ratio != 1.0):
                log.warning(
                    "meters[%d] %s: profile %s reports primary values (the ratios are set "
                    "in the device); ct_ratio %g and pt_ratio %g are not applied again",
                    i,
                    mc.name,
                    profile.name,
                    mc.ct_ratio,
                    mc.pt_ratio,
                    extra={"meter": mc.name},
                )
            state = MeterState(mc, site.bus(mc.bus), profile, profile.plan(), factors)
            state.limits = _checked_limits(site.limits_of(mc.name), factors)
            self.meters.append(state)
        if problems:
            raise ConfigError(f"site {site.site!r}: {len(problems)} invalid field(s)", problems)
        self.spool = Spool(
            settings.data_dir / f"collector-{site.site}.spool", max_records=spool_max_records
        )
        # seq continues where the last run stopped; after a crash, or with no saved seq (a
        # new or wiped data folder), it starts from the clock, past any seq used before: a
        # seq names one reading for good (the archive keeps one row per meter and seq)
        clean = bool(self.spool.get_meta("clean_stop"))
        margin = 0 if clean else SEQ_MARGIN
        self.spool.set_meta({"clean_stop": 0})
        for ms in self.meters:
            saved = self.spool.get_meta(f"seq:{ms.name}")
            if saved is not None and clean:
                ms.seq = saved
            else:
                ms.seq = max(-1 if saved is None else saved + margin, clock_seq())
            saved = self.spool.get_meta(f"eseq:{ms.name}")
            if saved is not None:
                ms.event_seq = saved + margin
        self.outbox = _Outbox(self._to_spool)
        self.status_dirty = True
        r = metrics.registry
        self.polls = Counter(
            "pfm_collector_polls_total", "Successful meter polls", ["meter"], registry=r
        )
        self.poll_errors = Counter(
            "pfm_collector_poll_errors_total",
            "Failed meter requests by kind (exception_0x, crc, timeout, refused, garbage; "
            "BACnet: error_*, reject_*, abort_*, units)",
            ["meter", "kind"],
            registry=r,
        )
        self.online_gauge = Gauge(
            "pfm_collector_meter_online", "1 while the meter answers", ["meter"], registry=r
        )
        self.poll_seconds = Histogram(
            "pfm_collector_poll_seconds",
            "Time to read every register block of one meter",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.jitter = Histogram(
            "pfm_collector_poll_jitter_seconds",
            "Delay between when a poll was due and when it started",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.missed = Counter(
            "pfm_collector_missed_polls_total",
            "Polls skipped because the previous poll of the meter was still running",
            ["meter"],
            registry=r,
        )
        self.spool_depth = Gauge(
            "pfm_collector_spool_records", "Records waiting in the disk spool", registry=r
        )
        self.implausible = Counter(
            "pfm_collector_implausible_total",
            "Decoded values left out of a reading: not finite, outside the physical bounds "
            "or the site file's limits",
            ["meter", "measurement"],
            registry=r,
        )
        self.deadletter_seq = 0
        self.spool_dropped = Counter(
            "pfm_collector_spool_dropped_total",
            "Records dropped (oldest first) because the spool was full",
            registry=r,
        )
        self.spool_depth.set(len(self.spool))
        for ms in self.meters:  # label children and topics resolved once, not per poll
            ms.reading_topic = topics.reading(site.site, ms.name)
            self.online_gauge.labels(ms.name).set(0)
            ms.polls_metric = self.polls.labels(ms.name)
            ms.missed_metric = self.missed.labels(ms.name)
        self.poll_count = 0

    # -- status and events -------------------------------------------------------

    def status(self, state: str) -> GatewayStatus:
        online = sum(1 for m in self.meters if m.online)
        return GatewayStatus(
            site=self.site.site,
            ts=utcnow(),
            seq=0,
            gateway=self.site.gateway,
            status=state,  # type: ignore[arg-type,unused-ignore]
            versions={"pfmon": __version__},
            meters_online=online if state == "online" else None,
            meters_offline=len(self.meters) - online if state == "online" else None,
        )

    def _event(
        self, m: MeterState, code: str, state: EventState, message: str, **ev: object
    ) -> None:
        m.event_seq += 1
        event = Event(
            site=self.site.site,
            ts=utcnow(),
            seq=m.event_seq,
            meter=m.name,
            code=code,
            state=state,
            severity=Severity.WARNING,
            message=message,
            evidence={k: v for k, v in ev.items() if isinstance(v, str | int | float | bool)},
            service=SERVICE,
        )
        self.outbox.put(topics.event(self.site.site, m.name), encode(event))

    # -- polling -------------------------------------------------------------------

    async def read_meter(self, conn: ModbusConnection, m: MeterState) -> dict[str, dict[int, int]]:
        """Read every block of ``m``, retrying transient failures; raw registers."""
        raw: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
        delay = m.bus.inter_frame_delay_s
        # a probe of an offline meter is one attempt: it either answers or stays offline
        retries = 0 if m.online is False else m.bus.retries
        for block in m.blocks:
            m.current = block
            attempt = 0
            while True:
                try:
                    regs = await conn.read(
                        m.config.unit or 0, block.table, block.address, block.count, m.timeout
                    )
                    break
                except PeerError as exc:
                    if exc.kind not in TRANSIENT or attempt >= retries:
                        raise
                    attempt += 1
                    self.poll_errors.labels(m.name, exc.kind).inc()
                    log.info("retrying %s after %s", m.name, exc, extra={"meter": m.name})
                finally:
                    if delay:
                        await asyncio.sleep(delay)
            table = raw[block.table]
            for i, value in enumerate(regs):
                table[block.address + i] = value
        return raw

    async def read_bacnet(
        self, link: bn.BacnetLink, m: MeterState, refused: list[Refused]
    ) -> dict[M, float]:
        """Read every object of BACnet meter ``m`` (one request, transient failures
        retried); SI values. An object that fails or whose units do not fit is left out,
        counted by kind and reported in ``refused``; when none reads, the poll fails."""
        from services.collector import bacnet as bn

        assert m.bacnet is not None and m.config.bacnet is not None
        profile = m.bacnet
        retries = 0 if m.online is False else m.bus.retries
        attempt = 0
        while True:
            try:
                reads = await link.read(m.config.bacnet, list(profile.objects.values()), m.timeout)
                break
            except PeerError as exc:
                if exc.kind not in bn.TRANSIENT or attempt >= retries:
                    raise
                attempt += 1
                self.poll_errors.labels(m.name, exc.kind).inc()
                log.info("retrying %s after %s", m.name, exc, extra={"meter": m.name})
        values: dict[M, float] = {}
        failed: list[tuple[M, bn.ObjectRead]] = []
        for measurement, read in zip(profile.objects, reads, strict=True):
            ref = read.spec.ref
            if read.kind:
                failed.append((measurement, read))
                reason = f"object {ref}: {read.error} [{read.kind}]"
                refused.append(Refused(measurement, math.nan, reason, *_object(read.spec)))
                continue
            assert read.value is not None
            value, why = bn.convert(measurement, read.value, read.units)
            if value is None:
                self.poll_errors.labels(m.name, "units").inc()
                why = f"object {ref}: {why}"
                refused.append(Refused(measurement, read.value, why, *_object(read.spec)))
                continue
            lo, hi = measurement.bounds
            if lo <= value <= hi:  # False for NaN
                values[measurement] = value
            else:
                why = f"object {ref}: {implausible(measurement, value) or 'implausible'}"
                refused.append(Refused(measurement, value, why, *_object(read.spec)))
        for measurement, spec in profile.objects.items():
            if spec.signed_by is not None and measurement in values:
                sign = values.get(spec.signed_by, 1.0)
                mag = abs(values[measurement])
                values[measurement] = math.copysign(mag, sign) if sign else mag
        if failed and len(failed) == len(reads):  # the poll failed (counted as such)
            first = failed[0][1]
            raise PeerError(
                f"{m.where}: no object read; {first.spec.ref}: {first.error}", kind=first.kind
            )
        for _, read in failed:
            self.poll_errors.labels(m.name, read.kind).inc()
        return values

    async def poll_once(
        self, conn: ModbusConnection | bn.BacnetLink, m: MeterState, due: float
    ) -> None:
        started = time.monotonic()
        self.jitter.observe(max(0.0, started - due))
        ts = utcnow()
        retries = 0 if m.online is False else m.bus.retries
        worst = m.timeout * (1 + retries) * max(1, len(m.blocks))
        deadline = max(m.timeout + 0.05, min(m.config.interval_s, worst))
        raw: dict[str, dict[int, int]] = {}
        refused: list[Refused] = []
        try:
            async with asyncio.timeout(deadline):
                if isinstance(conn, ModbusConnection):
                    raw = await self.read_meter(conn, m)
                    values = m.profile.decode(raw, refused)
                else:
                    values = await self.read_bacnet(conn, m, refused)
            if m.factors:  # primary values: the limits below are the primary side's
                to_primary(values, m.factors)
        except TimeoutError:
            block = m.current
            where = f"{block.table} {block.address}+{block.count}" if block else "its objects"
            msg = f"{m.where}: poll deadline {deadline:g} s passed reading {where}"
            self._failed(m, PeerError(msg, kind="timeout"))
            return
        except PeerError as exc:
            self._failed(m, exc)
            return
        if m.limits:
            self._limit(m, values, raw, refused)
        if refused:
            self._refused(m, refused)
        took = time.monotonic() - started
        self.poll_seconds.observe(took)
        m.polls_metric.inc()
        self.poll_count += 1
        m.seq += 1
        reading = Reading(
            site=self.site.site,
            meter=m.name,
            gateway=self.site.gateway,
            ts=ts,
            seq=m.seq,
            profile=m.profile.name,
            values=values,
            poll_s=took,
        )
        self.outbox.put(m.reading_topic, reading.model_dump_json(by_alias=True).encode())
        self._succeeded(m)
        if m.config.time_sync and m.profile.name in CLOCKS and isinstance(conn, ModbusConnection):
            now = time.monotonic()
            if m.synced_at is None or now - m.synced_at > RESYNC_S:
                await self.sync_clock(conn, m, utcnow())

    def _limit(
        self,
        m: MeterState,
        values: dict[M, float],
        raw: dict[str, dict[int, int]],
        refused: list[Refused],
    ) -> None:
        """Leave out the values outside the site file's limits for ``m`` (and, for a meter
        behind CTs/PTs, the primary values outside their physical bounds)."""
        for measurement, (lo, hi) in m.limits.items():
            value = values.get(measurement)
            if value is None or lo <= value <= hi:
                continue
            del values[measurement]
            why = implausible(measurement, value, m.limits) or "outside the configured limits"
            if m.bacnet is not None:
                spec_b = m.bacnet.objects[measurement]
                why = f"object {spec_b.ref}: {why}"
                refused.append(Refused(measurement, value, why, *_object(spec_b)))
                continue
            spec = m.profile.registers[measurement]
            regs = [raw[spec.table][spec.address + i] for i in range(TYPE_WIDTH[spec.type])]
            refused.append(Refused(measurement, value, why, spec.table, spec.address, regs))

    def _refused(self, m: MeterState, refused: list[Refused]) -> None:
        """Count every refused value; report each measurement at most once per
        ``IMPLAUSIBLE_REPORT_S`` (a dead letter and a log line)."""
        now = time.monotonic()
        for r in refused:
            self.implausible.labels(m.name, r.measurement.value).inc()
            last, since = m.reported.get(r.measurement, (-math.inf, 0))
            if now - last < IMPLAUSIBLE_REPORT_S:
                m.reported[r.measurement] = (last, since + 1)
                continue
            m.reported[r.measurement] = (now, 0)
            more = f" ({since} more since the last report)" if since else ""
            reason = (
                f"meter {m.name}: {r.measurement.value} = {r.value!r}: {r.reason}; left out of "
                f"reading seq {m.seq + 1}, its other values published{more}"
            )
            log.warning("%s", reason, extra={"meter": m.name, "measurement": r.measurement.value})
            self.deadletter_seq += 1
            evidence = {
                "meter": m.name,
                "measurement": r.measurement.value,
                "value": r.value if math.isfinite(r.value) else repr(r.value),
                "table": r.table,
                "address": r.address,
                "registers": r.registers,
            }
            letter = DeadLetter.of(
                site=self.site.site,
                service=SERVICE,
                topic=topics.reading(self.site.site, m.name),
                reason=reason,
                payload=orjson.dumps(evidence),
                seq=self.deadletter_seq,
            )
            self.outbox.put(topics.deadletter(self.site.site, SERVICE), encode(letter))

    async def sync_clock(self, conn: ModbusConnection, m: MeterState, now: datetime) -> None:
        m.synced_at = time.monotonic()
        try:
            result = await CLOCKS[m.profile.name](conn, m.config.unit or 0, now)
        except PeerError as exc:
            log.warning("time sync of %s failed: %s", m.name, exc, extra={"meter": m.name})
            return
        drift = (
            "not exposed by the device" if result.drift_s is None else f"{result.drift_s:+.1f} s"
        )
        log.info(
            "clock of %s set to %d (drift %s)",
            m.name,
            result.pushed_epoch,
            drift,
            extra={"meter": m.name},
        )

    def _succeeded(self, m: MeterState) -> None:
        m.failures = 0
        m.probes = 0
        if m.online is not True:
            if m.online is False:
                log.warning("%s is back online", m.name, extra={"meter": m.name})
                self._event(
                    m,
                    "device_online",
                    EventState.CLEARED,
                    f"{m.name} ({m.where}) answers again",
                    unit=m.config.unit,
                    bus=m.bus.name,
                )
            m.online = True
            self.online_gauge.labels(m.name).set(1)
            self.status_dirty = True

    def _failed(self, m: MeterState, exc: PeerError) -> None:
        self.poll_errors.labels(m.name, exc.kind).inc()
        m.failures += 1
        m.last_error = str(exc)
        extra = {
            "meter": m.name,
            "unit": m.config.unit,
            "bus": m.bus.name,
            "kind": exc.kind,
        }
        if m.online is not False:
            log.warning(
                "poll of %s (%s) failed [%s]: %s",
                m.name,
                m.where,
                exc.kind,
                exc,
                extra=extra,
            )
        else:
            log.debug("probe of offline %s failed [%s]: %s", m.name, exc.kind, exc, extra=extra)
        if m.online is not False and m.failures >= m.config.offline_after:
            m.online = False
            self.online_gauge.labels(m.name).set(0)
            self.status_dirty = True
            log.error(
                "%s is offline after %d failed polls; last: %s",
                m.name,
                m.failures,
                exc,
                extra=extra,
            )
            self._event(
                m,
                "device_offline",
                EventState.RAISED,
                f"{m.name} ({m.where}) stopped answering: {exc}",
                unit=m.config.unit,
                bus=m.bus.name,
                kind=exc.kind,
                failures=m.failures,
            )
        if m.online is False:
            m.probes += 1

    def _next_due(self, m: MeterState, now: float) -> float:
        interval = m.config.interval_s
        if m.online is False:
            if m.bus.kind == "rtu":
                cap = max(PROBE_MAX_S, SERIAL_PROBE_TIMEOUTS * m.timeout)
            else:
                cap = PROBE_MAX_S
            cap = max(interval, min(cap, m.bus.reprobe_max_s))
            reprobe = Backoff(interval, cap, jitter=0.2)
            return now + reprobe.delay(m.probes)
        due = m.due + interval
        if due < now - interval:  # fell far behind (machine paused): resynchronise
            due = now + interval * random.random()
        return due

    async def run_bus(
        self, config: BusConfig, meters: list[MeterState], shutdown: Shutdown
    ) -> None:
        conns: list[ModbusConnection | bn.BacnetLink]
        queue: asyncio.Queue[tuple[MeterState, float] | None] = asyncio.Queue()
        # a TCP bus has one more connection for failing and offline meters, so
        # that their timeouts never hold a connection the healthy meters need
        spare: ModbusConnection | bn.BacnetLink | None = None
        spare_queue: asyncio.Queue[tuple[MeterState, float] | None] = asyncio.Queue()
        if config.kind == "bacnet":
            from services.collector import bacnet as bn

            # one UDP port for every meter: its workers share it, requests in flight
            # together (the spare worker too, so that a silent device holds no worker
            # the answering ones need)
            link = bn.BacnetLink(config, timeout_s=max(m.timeout for m in meters))
            conns = [link] * config.pool_size
            spare = link
        else:
            conns = [ModbusConnection(config, i) for i in range(config.pool_size)]
            if config.kind != "rtu":
                spare = ModbusConnection(config, config.pool_size)

        def queue_for(m: MeterState) -> asyncio.Queue[tuple[MeterState, float] | None]:
            return spare_queue if spare is not None and m.troubled else queue

        async def worker(
            conn: ModbusConnection | bn.BacnetLink,
            queue: asyncio.Queue[tuple[MeterState, float] | None],
        ) -> None:
            while True:
                item = await queue.get()
                if item is None:  # shutdown (a cancellation can be lost in a timeout race)
                    return
                m, due = item
                was_offline = m.online is False
                try:
                    await self.poll_once(conn, m, due)
                except Exception:  # our bug: log it, keep polling the others
                    log.exception("poll of %s crashed", m.name, extra={"meter": m.name})
                finally:
                    m.busy = False
                    if m.online is False:
                        m.due = self._next_due(m, time.monotonic())
                        heapq.heappush(heap, (m.due, m))
                    elif was_offline:
                        m.due = time.monotonic() + m.config.interval_s
                        heapq.heappush(heap, (m.due, m))

        start = time.monotonic()
        tick = min([TICK_S, *(m.config.interval_s / 4 for m in meters)])
        heap: list[tuple[float, MeterState]] = []
        n = len(meters)
        for i, m in enumerate(meters):
            m.due = start + m.config.interval_s * i / n  # stagger over the interval
            heap.append((m.due, m))
        heapq.heapify(heap)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(worker(c, queue), name=f"poll-{config.name}-{i}")
                for i, c in enumerate(conns)
            ]
            if spare is not None:
                tasks.append(
                    tg.create_task(
                        worker(spare, spare_queue), name=f"poll-{config.name}-{len(conns)}-spare"
                    )
                )
            try:
                while not shutdown.requested.is_set():
                    now = time.monotonic()
                    while heap and heap[0][0] <= now:
                        due, m = heapq.heappop(heap)
                        if due != m.due:
                            continue  # stale entry (rescheduled)
                        if m.online is False and m.busy:
                            continue
                        if m.busy:
                            m.missed_metric.inc()
                        else:
                            m.busy = True
                            queue_for(m).put_nowait((m, due))
                        if m.online is not False:
                            m.due = self._next_due(m, now)
                            heapq.heappush(heap, (m.due, m))
                    # at least one tick between rounds: the meters that fell due meanwhile
                    # go out together (a wake-up per meter costs more than its poll)
                    wait = (heap[0][0] - time.monotonic()) if heap else 0.5
                    if await shutdown.sleep(max(tick, min(wait, 0.5))):
                        break
            finally:
                for q in (queue, spare_queue):
                    while not q.empty():
                        q.get_nowait()
                for t in tasks:
                    queue.put_nowait(None)
                    spare_queue.put_nowait(None)
                    t.cancel()
                for c in conns:
                    c.close()
                if spare is not None:
                    spare.close()

    # -- publishing ----------------------------------------------------------------

    def _to_spool(self, records: list[tuple[str, bytes]]) -> None:
        if not records:
            return
        dropped = self.spool.put_many(records)
        if dropped:
            self.spool_dropped.inc(dropped)
            log.error(
                "spool full (%d records): dropped the %d oldest", self.spool.max_records, dropped
            )
        self.spool_depth.set(len(self.spool))

    async def _publish_batch(self, bus: Bus, records: list[tuple[str, bytes]]) -> list[bool]:
        """Per record: done (delivered, or refused for good) or to be sent again.

        Handed to the connection without a wait each (the bus's fast path: no future,
        task or paho message per record), then the batch waits for its PUBACKs; a
        record not confirmed in :data:`PUBLISH_TIMEOUT_S` (or lost with the
        connection) is sent again later, so it may arrive twice, never not at all."""
        pending = AckQueue()
        groups = []
        for topic, payload in records:
            group = pending.group()
            try:
                bus.publish_nowait(topic, payload, after=group)
            except BusUnavailable:
                group.lose()
            group.seal()
            groups.append(group)
        if not all(g.done for g in groups):
            with contextlib.suppress(TimeoutError):
                await bus.drain(PUBLISH_TIMEOUT_S)
        # a refusal (the broker's ACL) settles as done: the bus has counted and logged
        # it, and spooling it would block every record behind it
        return [g.done and not g.lost for g in groups]

    def on_publish_failed(self, topic: str, payload: bytes, reason: str) -> None:
        """A record the broker did not confirm (the bus has counted it): a refusal is
        final, so the record is dropped rather than spooled; say so."""
        if is_refusal(reason):
            log.error(
                "publish to %s %s: dropped, not spooled (check the broker's ACL)", topic, reason
            )

    async def _drain_spool(self, bus: Bus, stop: asyncio.Event | None = None) -> bool:
        """Send spooled records in order; False when the broker went away again."""
        while len(self.spool) and bus.connected and not (stop and stop.is_set()):
            batch = self.spool.peek(BATCH)
            ok = await self._publish_batch(bus, [(r.topic, r.payload) for r in batch])
            self.spool.remove(r.id for r, sent in zip(batch, ok, strict=True) if sent)
            self.spool_depth.set(len(self.spool))
            if not all(ok):
                return False
        return True

    async def _flush(self, bus: Bus, stop: asyncio.Event) -> None:
        box = self.outbox.records
        if len(self.spool) or not bus.connected:
            self._to_spool(self.outbox.take())
            if bus.connected:
                await self._drain_spool(bus, stop)
            return
        while box and bus.connected:
            batch = [box.popleft() for _ in range(min(BATCH, len(box)))]
            ok = await self._publish_batch(bus, batch)
            failed = [rec for rec, sent in zip(batch, ok, strict=True) if not sent]
            if failed:
                rest = list(box)
                box.clear()
                self._to_spool(failed + rest)
                return
        if box:
            records = list(box)
            box.clear()
            self._to_spool(records)

    async def publisher(self, bus: Bus, stop: asyncio.Event) -> None:
        """Move the outbox to the broker (or the spool); status when it changes."""
        status_topic = topics.gateway_status(self.site.site, self.site.gateway)
        last_save = time.monotonic()
        while True:
            self.outbox.wake.clear()
            if stop.is_set() and len(self.outbox.records) > 2 * BATCH:
                # shutting down with a backlog: keep it on disk, the next start sends it
                self._to_spool(self.outbox.take())
            await self._flush(bus, stop)
            if self.status_dirty and bus.connected:
                self.status_dirty = False
                try:
                    await bus.publish(status_topic, self.status("online"), retain=True)
                except BusUnavailable:
                    self.status_dirty = True
            if time.monotonic() - last_save > SEQ_SAVE_S:
                self.save_seq()
                last_save = time.monotonic()
            if stop.is_set() and not self.outbox.records:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2 if len(self.spool) else 1.0):
                    await self.outbox.wake.wait()
        self.save_seq(clean=True)

    def save_seq(self, clean: bool = False) -> None:
        values = {f"seq:{m.name}": m.seq for m in self.meters}
        values.update({f"eseq:{m.name}": m.event_seq for m in self.meters})
        values["clean_stop"] = int(clean)
        self.spool.set_meta(values)

    def close(self) -> None:
        self.spool.close()


async def run(
    settings: Settings,
    site: SiteConfig,
    shutdown: Shutdown,
    *,
    spool_max_records: int = 1_000_000,
    metrics: ServiceMetrics | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Run the collector until ``shutdown``; ``metrics`` / ``backoff`` (broker reconnects)
    may be passed in by tests and benchmarks."""
    serve = metrics is None
    if metrics is None:
        metrics = ServiceMetrics(SERVICE, site.site)
    quiet_library_logs()  # we classify and log Modbus failures ourselves
    # checks every meter's profile first: a bad site file starts nothing
    collector = Collector(settings, site, metrics, spool_max_records=spool_max_records)
    if serve:
        port = (
            settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
        )
        metrics.serve(settings.metrics_host, port)
    status_topic = topics.gateway_status(site.site, site.gateway)
    will = (status_topic, encode(collector.status("offline")))

    async def announce(bus: Bus) -> None:
        collector.status_dirty = True
        collector.outbox.wake.set()

    stop_publishing = asyncio.Event()
    try:
        async with Bus(
            settings, service=SERVICE, site=site.site, metrics=metrics, will=will, backoff=backoff
        ) as bus:
            bus.on_connect(announce)
            bus.on_publish_failed(collector.on_publish_failed)
            discovery = None
            if site.homeassistant is not None:
                discovery = Discovery(settings, site, SERVICE)
                bus.on_connect(discovery.on_connect)
            shutdown.ready_after(bus.wait_connected(), "connected")
            by_bus: dict[str, list[MeterState]] = {}
            for m in collector.meters:
                by_bus.setdefault(m.bus.name, []).append(m)
            async with asyncio.TaskGroup() as outer:
                outer.create_task(
                    collector.publisher(bus, stop_publishing), name="collector-publish"
                )
                try:
                    async with asyncio.TaskGroup() as tg:
                        for name, meters in by_bus.items():
                            tg.create_task(
                                collector.run_bus(site.bus(name), meters, shutdown),
                                name=f"bus-{name}",
                            )
                finally:
                    stop_publishing.set()
                    collector.outbox.wake.set()
            if discovery is not None:
                await discovery.close()
            if bus.connected:
                with contextlib.suppress(BusUnavailable):
                    await bus.publish(status_topic, collector.status("offline"), retain=True)
    finally:
        collector.close()
