"""The archiver service: every metric, event, command and status into PostgreSQL.

Flow: bus (manual ack, persistent session, optional MQTT v5 shared subscription)
-> the topic's authority (:mod:`.authority`: a message whose site or name is not its
topic's, or unknown, is dead-lettered) -> an in-memory buffer of validated messages,
not yet acknowledged -> batches
written idempotently (:mod:`.ingest`) -> acknowledged only after the commit.

When PostgreSQL is down or slow the buffer spills to an on-disk spool
(:class:`shared.spool.Spool`; spilled messages are acknowledged because they are
safe on disk) and the writer retries with backoff; when the database answers
again the spool drains first, in order, then memory. Nothing is written twice:
every table has a natural key and the merge is ``ON CONFLICT DO NOTHING``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError

from services.archiver import rollups
from services.archiver.authority import Authority, Refusal, load_site_dir
from services.archiver.ingest import (
    KINDS,
    RowBuilder,
    describe_db_error,
    group_rows,
    write_batch,
)
from services.archiver.migrate import PLAIN, MigrationResult, migrate
from services.archiver.shards import ShardManager
from shared import topics
from shared.bus import Backoff, Bus, BusUnavailable, Incoming
from shared.errors import ConfigError
from shared.messages import ArchiveBatch, DeadLetter, Metrics, decode, describe_error
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig
from shared.spool import Spool

log = logging.getLogger(__name__)
SERVICE = "archiver"

#: errors after which the same batch may well succeed later (the database or link is the issue)
TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.TransactionRollbackError,
    asyncpg.CannotConnectNowError,
)


#: errors of the data itself: the same rows will fail again, so they are isolated and dropped
DATA_ERRORS = (asyncpg.PostgresError, asyncpg.DataError, OverflowError, ValueError, TypeError)


def is_data_error(exc: BaseException) -> bool:
    return isinstance(exc, DATA_ERRORS) and not is_transient(exc)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same batch later may succeed; False for bad data."""
    if isinstance(exc, asyncpg.DataError):  # client-side encoding of a bad value
        return False
    return isinstance(exc, TRANSIENT)


class TransientError(Exception):
    """The database (or the link to it) failed; the batch is intact and will be retried."""


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.TransactionRollbackError):
        return "conflict"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, TRANSIENT):
        return "connection"
    return "data"


#: commit-latency buckets: fine between 0.1 and 3 s, where the "p99 < 2 s from
#: acquisition" target of a 1 Hz site is decided, coarse beyond (outages, backlogs)
LATENCY_BUCKETS = (
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75,
    2.0, 2.5, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip

#: the ``kind`` label of the commit-latency histogram, by message model
_LATENCY_KIND: dict[type[BaseModel], str] = {model: kind for kind, (model, _) in KINDS.items()}
LATENCY_KINDS = (*_LATENCY_KIND.values(), "aggregate")


def latency_kind(model: BaseModel) -> str:
    """The message's topic kind; analytics' aggregates apart, as their ``ts`` is the end
    of a 3 s / 10 min block published when the block closes, not an acquisition time."""
    if isinstance(model, Metrics) and model.aggregate:
        return "aggregate"
    return _LATENCY_KIND[type(model)]


class _Batch:
    """A received archive batch: acknowledged once each of its messages is (stored,
    spilled or dead-lettered)."""

    __slots__ = ("incoming", "left")

    def __init__(self, incoming: Incoming, left: int) -> None:
        self.incoming = incoming
        self.left = left

    def done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.incoming.ack()


class Part:
    """One message of an archive batch, received as if alone on its own topic."""

    __slots__ = ("_batch", "_done", "payload", "topic")

    def __init__(self, topic: str, payload: bytes, batch: _Batch) -> None:
        self.topic = topic
        self.payload = payload
        self._batch = batch
        self._done = False

    def ack(self) -> None:
        if not self._done:
            self._done = True
            self._batch.done()


@dataclass(slots=True)
class Pending:
    topic: str
    payload: bytes
    model: BaseModel
    incoming: Incoming | Part | None = None


class ArchiverMetrics:
    def __init__(self, metrics: ServiceMetrics) -> None:
        r = metrics.registry
        self.rows = Counter(
            "pfm_archiver_rows_total", "Rows newly committed, by table", ["table"], registry=r
        )
        self.duplicates = Counter(
            "pfm_archiver_duplicates_total",
            "Rows offered again (re-delivery) and skipped by the natural key",
            ["table"],
            registry=r,
        )
        self.batches = Counter("pfm_archiver_batches_total", "Batches committed", registry=r)
        self.lag = Gauge(
            "pfm_archiver_lag_seconds",
            "Now minus the timestamp of the newest committed message",
            registry=r,
        )
        self.buffer = Gauge(
            "pfm_archiver_buffer_records", "Messages held in memory, not yet committed", registry=r
        )
        self.spill = Gauge(
            "pfm_archiver_spill_records",
            "Messages spilled to disk, waiting for the database",
            registry=r,
        )
        self.spill_dropped = Counter(
            "pfm_archiver_spill_dropped_total",
            "Oldest spilled messages dropped because the spill file was full",
            registry=r,
        )
        self.flush = Histogram(
            "pfm_archiver_flush_seconds",
            "Time to write and commit one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.commit_latency = Histogram(
            "pfm_archiver_commit_latency_seconds",
            "From a message's timestamp (acquisition) to the commit of its row, by kind"
            " (aggregate = analytics' 3 s / 10 min statistics, stamped at their interval's end)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        #: one histogram child per latency kind, resolved once (not per message)
        self.commit_latency_by_kind = {k: self.commit_latency.labels(k) for k in LATENCY_KINDS}
        self.refused = Counter(
            "pfm_archiver_refused_total",
            "Messages refused because their topic does not vouch for them (dead-lettered),"
            " by reason: site_mismatch, name_mismatch, unknown_site, unknown_name, bad_topic",
            ["reason"],
            registry=r,
        )
        self.rollup_quarantined = Counter(
            "pfm_archiver_rollup_quarantined_total",
            "1-minute rollup buckets the database refused (data error), parked in"
            " pfm_rollup_quarantine while the other buckets are refreshed",
            registry=r,
        )
        self.db_errors = Counter(
            "pfm_archiver_db_errors_total",
            "Database (and spill file) errors by kind: connection, timeout, conflict, data,"
            " rejected, rollup, spill",
            ["kind"],
            registry=r,
        )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


class Archiver:
    """Buffer, spill, write and acknowledge. Create, then ``await run()``."""

    def __init__(
        self,
        settings: Settings,
        site: SiteConfig,
        shutdown: Shutdown,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.site = site
        self.cfg = site.archiver
        self.shutdown = shutdown
        self.metrics = metrics or ServiceMetrics(SERVICE, site.site)
        self.m = ArchiverMetrics(self.metrics)
        intervals = {m.name: m.interval_s for m in site.meters}
        self.rows = RowBuilder(lambda meter: intervals.get(meter, 1.0))
        # the configuration is checked before anything is opened (the spool is locked)
        site_files = load_site_dir(self.cfg.site_dir) if self.cfg.site_dir is not None else []
        self.authority = Authority.for_site(site, site_files)
        client = settings.mqtt_client_id or f"pfm-{SERVICE}-{site.site}"
        self.spool = Spool(
            settings.data_dir / f"{_safe_name(client)}-{SERVICE}.spool",
            self.cfg.spill_max_records,
        )
        self.buffer: list[Pending] = []
        self.inflight: list[Pending] = []
        self._oldest: float | None = None
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._staged: set[str] = set()
        self.schema: MigrationResult | None = None
        self.newest_ts: datetime | None = None
        self.db_up = False
        self.bus: Bus | None = None
        #: shard mode (``archiver.shards``): the shards this member holds
        self.shards: ShardManager | None = None
        #: commit latencies in seconds, kept only when a benchmark sets this to a list
        self.latencies: list[float] | None = None
        self._backoff = Backoff(initial_s=0.25, max_s=self.cfg.retry_max_s)
        self._refusal_log: dict[str, tuple[float, int]] = {}
        self._dl_seq = int(time.time() * 1000) * 1000  # never reused by a later run
        self.m.buffer.set_function(lambda: len(self.buffer) + len(self.inflight))
        self.m.spill.set_function(lambda: len(self.spool))
        self.m.lag.set_function(self._lag)

    def _lag(self) -> float:
        if self.newest_ts is None:
            return 0.0
        return max(0.0, (datetime.now(UTC) - self.newest_ts).total_seconds())

    # -- the bus side ------------------------------------------------------------------

    def subscribe(self, bus: Bus, only: list[str] | None = None) -> None:
        """Subscribe the archived topics of this archiver's sites (or of ``only``)."""
        batches = self.cfg.archive_batches
        kinds = [] if batches else [topics.Kind.METRICS]
        kinds += [topics.Kind.EVENT, topics.Kind.COMMAND, topics.Kind.STATE, topics.Kind.STATUS]
        if self.cfg.keep_readings:
            kinds.append(topics.Kind.READING)
        sites = self.cfg.sites
        if sites == "own":
            sites = [self.site.site]
        elif sites == "all":
            sites = ["+"]
        for site in sites if only is None else only:
            for kind in kinds:
                model, _table = KINDS[kind]
                bus.subscribe(
                    topics.pattern(kind, site),
                    model,
                    self.on_message,
                    share_group=self.cfg.share_group,
                )
            if batches:
                bus.subscribe(
                    topics.pattern(topics.Kind.ARCHIVE, site),
                    ArchiveBatch,
                    self.on_batch,
                    share_group=self.cfg.share_group,
                )

    async def on_batch(self, batch: ArchiveBatch, incoming: Incoming) -> None:
        """An archive batch: each message checked and validated as if received alone on
        its own topic (a bad one is dead-lettered naming its topic, the others are kept);
        the batch is acknowledged once every message of it is stored (or spilled, or
        dead-lettered)."""
        site = topics.parse(incoming.topic).site
        if batch.site != site:
            text = f"payload site {batch.site!r} on topic {incoming.topic!r} of site {site!r}"
            self.refuse(incoming, Refusal("site_mismatch", text))
            return
        if not batch.messages:
            incoming.ack()
            return
        held = _Batch(incoming, len(batch.messages))
        for topic, text in batch.messages:
            part = Part(topic, text.encode(), held)
            if not topic.startswith(f"{topics.ROOT}/{site}/") or topics.kind_of(topic) != "metrics":
                reason = f"archive batch {incoming.topic!r} carries {topic!r}: not a metrics topic"
                self.refuse(part, Refusal("bad_topic", f"{reason} of site {site!r}"))
                continue
            try:
                model = Metrics.model_validate_json(part.payload)
            except ValidationError as exc:
                self.invalid(part, describe_error(exc), site)
                continue
            self.accept(part, model)

    def invalid(self, part: Part, reason: str, site: str) -> None:
        """A message of a batch that fails validation: dead letter, counted, acknowledged
        (what the bus does for a message received alone)."""
        self.metrics.deadletters.labels(SERVICE, "metrics").inc()
        self._letter(part, reason, "invalid", site)

    async def on_message(self, model: BaseModel, incoming: Incoming) -> None:
        self.accept(incoming, model)

    def accept(self, incoming: Incoming | Part, model: BaseModel) -> None:
        refusal = self.authority.check(incoming.topic, model)
        if refusal is not None:
            self.refuse(incoming, refusal)
            return
        self.buffer.append(Pending(incoming.topic, incoming.payload, model, incoming))
        if self._oldest is None:
            self._oldest = time.monotonic()
        if len(self.buffer) >= self.cfg.buffer_max_records:
            self.spill_buffer("buffer full")
        elif len(self.buffer) >= self.cfg.batch_size:
            self._wake.set()

    def refuse(self, incoming: Incoming | Part, refusal: Refusal) -> None:
        """A message its topic does not vouch for: dead letter (on the topic's site),
        counted by reason, acknowledged; logged at most once per reason every 10 s."""
        kind = topics.kind_of(incoming.topic)
        self.m.refused.labels(refusal.reason).inc()
        self.metrics.deadletters.labels(SERVICE, kind).inc()
        site = (
            self.site.site if refusal.reason == "bad_topic" else topics.parse(incoming.topic).site
        )
        self._letter(incoming, refusal.text, refusal.reason, site)

    def _letter(self, incoming: Incoming | Part, text: str, reason: str, site: str) -> None:
        """Dead-letter ``incoming`` on ``site`` and acknowledge it; the log says it at most
        once per ``reason`` every 10 s."""
        kind = topics.kind_of(incoming.topic)
        now = time.monotonic()
        last, quiet = self._refusal_log.get(reason, (0.0, 0))
        if now - last >= 10.0:
            more = f" ({quiet} more refused for this reason since the last line)" if quiet else ""
            log.warning(
                "refused a %s message: %s%s",
                kind,
                text,
                more,
                extra={"topic": incoming.topic},
            )
            self._refusal_log[reason] = (now, 0)
        else:
            self._refusal_log[reason] = (last, quiet + 1)
        bus = self.bus
        if bus is not None:
            self._dl_seq += 1
            letter = DeadLetter.of(
                site=site,
                service=SERVICE,
                topic=incoming.topic,
                reason=text,
                payload=incoming.payload,
                seq=self._dl_seq,
            )
            try:
                bus.publish_nowait(topics.deadletter(site, SERVICE), letter)
            except BusUnavailable as exc:
                log.error("could not publish a dead letter: %s", exc)
        incoming.ack()

    def spill(self, items: list[Pending], why: str) -> bool:
        """Put ``items`` on disk and acknowledge them; False (nothing acked) if the disk
        refused - the caller keeps them, the broker re-delivers what is never acked."""
        if not items:
            return True
        try:
            dropped = self.spool.put_many((p.topic, p.payload) for p in items)
        except (OSError, sqlite3.Error) as exc:
            self.m.db_errors.labels("spill").inc()
            log.error("cannot spill %d messages to %s: %s", len(items), self.spool.path, exc)
            return False
        for p in items:
            if p.incoming is not None:
                p.incoming.ack()  # safe on disk now
        if dropped:
            self.m.spill_dropped.inc(dropped)
            log.error("spill file full: dropped the %d oldest messages", dropped)
        log.debug("spilled %d messages (%s)", len(items), why)
        return True

    def spill_buffer(self, why: str) -> None:
        items, self.buffer, self._oldest = self.buffer, [], None
        if not self.spill(items, why):
            self.buffer = items + self.buffer
            self._oldest = time.monotonic()

    # -- the database side -------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        self._staged = set()
        conn = await asyncpg.connect(self.settings.db_dsn, timeout=10, command_timeout=60)
        try:
            if self.schema is None:
                self.schema = await migrate(conn, self.cfg)
                log.info(
                    "archive schema ready (%s%s)",
                    self.schema.flavour,
                    f" {self.schema.timescale_version}" if self.schema.timescale_version else "",
                )
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def write(self, items: list[Pending]) -> None:
        """Write one batch or raise a TRANSIENT error (data errors are isolated here)."""
        started = time.perf_counter()
        conn = await self._connect()
        plain = self.schema is not None and self.schema.flavour == PLAIN
        rows = []
        for p in items:
            try:
                rows.append(self.rows.row(p.model))
            except Exception as exc:  # a message we cannot turn into a row: our bug
                self.m.db_errors.labels("rejected").inc()
                log.error("cannot archive a message from %s: %s", p.topic, exc)
        try:
            result = await write_batch(
                conn, group_rows(rows), mark_dirty=plain, staged=self._staged
            )
        except Exception as exc:
            if not is_data_error(exc):
                raise
            self.m.db_errors.labels("data").inc()
            log.warning(
                "batch refused (%s); writing its %d rows one by one",
                describe_db_error(exc),
                len(rows),
            )
            result = None
            for row in rows:
                try:
                    one = await write_batch(
                        conn, group_rows([row]), mark_dirty=plain, staged=self._staged
                    )
                except Exception as one_exc:
                    if not is_data_error(one_exc):
                        raise
                    self.m.db_errors.labels("rejected").inc()
                    log.error(
                        "row refused by %s: %s; row dropped", row[0], describe_db_error(one_exc)
                    )
                    continue
                self._count(one.inserted, one.offered)
        if result is not None:
            self._count(result.inserted, result.offered)
        self.m.batches.inc()
        self.m.flush.observe(time.perf_counter() - started)
        now = datetime.now(UTC)
        newest = self.newest_ts
        for p in items:
            ts = getattr(p.model, "ts", None)
            if ts is None:
                continue
            latency = (now - ts).total_seconds()
            self.m.commit_latency_by_kind[latency_kind(p.model)].observe(latency)
            if self.latencies is not None:
                self.latencies.append(latency)
            if newest is None or ts > newest:
                newest = ts
        self.newest_ts = newest

    def _count(self, inserted: dict[str, int], offered: dict[str, int]) -> None:
        for table, n in inserted.items():
            self.m.rows.labels(table).inc(n)
            self.m.duplicates.labels(table).inc(offered.get(table, n) - n)

    def _decode(self, topic: str, payload: bytes) -> BaseModel | None:
        try:
            kind = topics.parse(topic).kind
            model, _ = KINDS[kind]
            decoded = decode(model, payload)
        except (ConfigError, KeyError, ValueError) as exc:
            self.m.db_errors.labels("rejected").inc()
            log.error("spilled record from %s cannot be decoded: %s; dropped", topic, exc)
            return None
        refusal = self.authority.check(topic, decoded)
        if refusal is not None:  # spilled by a version that did not check
            self.m.refused.labels(refusal.reason).inc()
            log.error("spilled record refused: %s; dropped", refusal.text)
            return None
        return decoded

    async def _failed(self, exc: BaseException, attempt: int) -> None:
        kind = error_kind(exc)
        if not is_transient(exc):
            log.error("unexpected error while writing a batch; retrying", exc_info=exc)
        self.m.db_errors.labels(kind).inc()
        if self.db_up or attempt == 0:
            log.warning(
                "database unavailable (%s: %s); spilling to disk", kind, describe_db_error(exc)
            )
        self.db_up = False
        await self._drop_conn()
        # put everything we hold on disk (acknowledged), in arrival order
        held, self.inflight = self.inflight, []
        if not self.spill(held, "write failed"):
            self.buffer = held + self.buffer
        self.spill_buffer("database down")
        delay = self._backoff.delay(attempt)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if await self.shutdown.sleep(min(self.cfg.flush_interval_s, delay)):
                return
            self.spill_buffer("database down")

    async def flusher(self) -> None:
        """Write batches until shutdown; spool first, then memory."""
        attempt = 0
        while True:
            stopping = self.shutdown.requested.is_set()
            if len(self.spool) and not stopping:
                self.spill_buffer("spool draining")  # keep the order: spool first
                records = await asyncio.to_thread(self.spool.peek, self.cfg.batch_size)
                items = []
                for rec in records:
                    model = self._decode(rec.topic, rec.payload)
                    if model is not None:
                        items.append(Pending(rec.topic, rec.payload, model))
                try:
                    await self.write(items)
                except ConfigError:
                    raise  # e.g. timescaledb: on, and the server cannot have it: exit 2
                except Exception as exc:
                    if stopping:
                        return
                    await self._failed(exc, attempt)
                    attempt += 1
                    continue
                await asyncio.to_thread(self.spool.remove_through, records[-1].id)
                if not self.db_up:
                    log.info("database back; draining %d spilled messages", len(self.spool))
                self.db_up, attempt = True, 0
                continue
            if stopping and not self.buffer:
                return
            if not stopping:
                await self._wait_for_batch()
            if not self.buffer:
                continue
            n = self.cfg.batch_size
            self.inflight, self.buffer = self.buffer[:n], self.buffer[n:]
            self._oldest = time.monotonic() if self.buffer else None
            try:
                await self.write(self.inflight)
            except ConfigError:
                raise  # e.g. timescaledb: on, and the server cannot have it: exit 2
            except Exception as exc:
                if stopping:
                    # what cannot be spilled stays unacknowledged: the broker re-delivers it
                    self.spill(self.inflight, "stopping, database down")
                    self.inflight = []
                    self.spill_buffer("stopping, database down")
                    return
                await self._failed(exc, attempt)
                attempt += 1
                continue
            for p in self.inflight:
                if p.incoming is not None:
                    p.incoming.ack()
            self.inflight = []
            if not self.db_up:
                log.info("database reachable")
            self.db_up, attempt = True, 0

    async def _wait_for_batch(self) -> None:
        while not self.shutdown.requested.is_set():
            if len(self.buffer) >= self.cfg.batch_size or len(self.spool):
                return
            if self._oldest is not None:
                left = self._oldest + self.cfg.flush_interval_s - time.monotonic()
                if left <= 0:
                    return
            else:
                left = self.cfg.flush_interval_s
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(self.shutdown.requested.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=left, return_when="FIRST_COMPLETED")
            finally:
                waiter.cancel()
                stopper.cancel()

    async def rollup_loop(self) -> None:
        """Plain PostgreSQL: refresh the rollup tables every ``rollup_interval_s``."""
        conn: asyncpg.Connection | None = None
        try:
            while True:
                stop = await self.shutdown.sleep(self.cfg.rollup_interval_s)
                if self.schema is None or self.schema.flavour != PLAIN:
                    if stop:
                        return
                    continue
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.settings.db_dsn, timeout=10)
                    result = await rollups.refresh(conn)
                    for q in result.quarantined if result is not None else ():
                        self.m.rollup_quarantined.inc()
                        log.error(
                            "rollup bucket %s of %s/%s refused by the database: %s;"
                            " quarantined in pfm_rollup_quarantine, other buckets go on",
                            q.ts.isoformat(),
                            q.site,
                            q.meter,
                            q.reason,
                            extra={"site": q.site, "meter": q.meter},
                        )
                except (*TRANSIENT, asyncpg.PostgresError) as exc:
                    self.m.db_errors.labels("rollup").inc()
                    log.warning("rollup refresh failed: %s", describe_db_error(exc))
                    if conn is not None:
                        conn.terminate()
                        conn = None
                if stop:
                    return
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def close(self) -> None:
        await self._drop_conn()
        self.spool.close()

    async def run(self) -> None:
        """Consume until shutdown, then commit (or spill) what is held and close."""
        try:
            try:
                await self._connect()  # migrate now when the database answers
                self.db_up = True
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning(
                    "database unavailable at start (%s); messages will spill",
                    describe_db_error(exc),
                )
            try:
                await self._consume()
            except* ConfigError as group:  # the schema cannot be set up as configured
                raise group.exceptions[0] from None
        finally:
            await self.close()

    def shard_sites(self) -> list[str]:
        """The sites split into shards: the list, or every known site for ``all``."""
        sites = self.cfg.sites
        if sites == "own":
            return [self.site.site]
        if sites == "all":
            return sorted(self.authority.known)
        return list(sites)

    async def _consume(self) -> None:
        """Bus, flusher and rollups until shutdown; then the flusher drains."""
        async with asyncio.TaskGroup() as tg:
            flusher = tg.create_task(self.flusher(), name="archiver-flusher")
            tg.create_task(self.rollup_loop(), name="archiver-rollups")
            if self.cfg.shards:  # a clustered broker: this member holds some shards
                async with ShardManager(
                    self.settings,
                    site=self.site.site,
                    sites=self.shard_sites(),
                    shards=self.cfg.shards,
                    heartbeat_s=self.cfg.heartbeat_s,
                    metrics=self.metrics,
                    subscribe=self.subscribe,
                ) as shards:
                    self.bus, self.shards = shards.bus, shards
                    self.shutdown.ready_after(shards.bus.wait_subscribed(), "subscribed")
                    await self.shutdown.wait()
                await flusher
                return
            async with Bus(
                self.settings,
                service=SERVICE,
                site=self.site.site,
                metrics=self.metrics,
                manual_ack=True,
            ) as bus:
                self.bus = bus
                self.subscribe(bus)
                self.shutdown.ready_after(bus.wait_subscribed(), "subscribed")
                await self.shutdown.wait()
            # the bus is closed: no new messages; the flusher commits (or spills) the rest
            await flusher


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)
    archiver = Archiver(settings, site, shutdown, metrics)
    await archiver.run()
