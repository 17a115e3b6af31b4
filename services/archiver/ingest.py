"""Messages to rows, and idempotent batch writes.

A batch goes in ONE transaction. Each table's rows are first copied straight into
the table (binary ``copy_records_to_table``, in a savepoint): the unique natural keys
refuse the whole COPY when one of its rows is already stored (or repeats inside the
batch). Only then do they go the idempotent way: COPY into a temporary staging table
and ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` into the real table, so a
re-delivered message never becomes a second row. On plain PostgreSQL the same
transaction marks the touched 1-minute buckets dirty for the rollup refresher
(:mod:`.rollups`).

The moving averages of a metrics message (``averages``) are not archived: each is a
window over the per-input rows stored at the meter's rate, and as JSON they would
cost the database several times the rest of the row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import asyncpg
import orjson
from pydantic import BaseModel

from services.archiver.columns import BUCKET_ORIGIN, ENERGY_COLUMNS, measurement_columns
from shared import topics
from shared.measurements import Measurement as M
from shared.messages import (
    ActuatorState,
    Command,
    Event,
    GatewayStatus,
    LoadKind,
    Metrics,
    Reading,
    json_value,
)

MEASUREMENTS = measurement_columns()

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "pfm_readings": ("site", "meter", "ts", "seq", "gateway", "profile", "poll_s", "data"),
    "pfm_metrics": (
        "site",
        "meter",
        "ts",
        "seq",
        "interval_s",
        "source",
        "source_seq",
        "energy_s",
        *MEASUREMENTS,
        *ENERGY_COLUMNS,
        "load",
        "quadrant",
        "harmonics",
    ),
    "pfm_events": (
        "site",
        "meter",
        "ts",
        "seq",
        "code",
        "state",
        "severity",
        "phase",
        "message",
        "evidence",
        "service",
    ),
    "pfm_commands": (
        "site",
        "device",
        "ts",
        "seq",
        "register_table",
        "address",
        "value",
        "reason",
        "origin",
        "trigger",
        "dry_run",
    ),
    "pfm_device_status": ("site", "kind", "device", "ts", "seq", "online", "message", "data"),
}

#: which model each topic kind carries, and the table it goes to
KINDS: dict[topics.Kind, tuple[type[BaseModel], str]] = {
    topics.Kind.READING: (Reading, "pfm_readings"),
    topics.Kind.METRICS: (Metrics, "pfm_metrics"),
    topics.Kind.EVENT: (Event, "pfm_events"),
    topics.Kind.COMMAND: (Command, "pfm_commands"),
    topics.Kind.STATE: (ActuatorState, "pfm_device_status"),
    topics.Kind.STATUS: (GatewayStatus, "pfm_device_status"),
}


def describe_db_error(exc: BaseException) -> str:
    """An error as the log shows it: the server's own message with its SQLSTATE (and
    detail/hint when it gives them), e.g. ``value out of range: overflow (SQLSTATE
    22003)``; anything else as ``Type: text``."""
    if isinstance(exc, asyncpg.PostgresError):
        text = f"{exc} (SQLSTATE {exc.sqlstate})"
        for extra in ("detail", "hint"):
            value = getattr(exc, extra, None)
            if value:
                text += f"; {extra}: {value}"
        return text
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json(value: Any) -> str:
    return orjson.dumps(value, default=json_value, option=orjson.OPT_NON_STR_KEYS).decode()


def _json_or_none(value: dict[Any, Any]) -> str | None:
    return _json(value) if value else None


def energy_deltas(m: Metrics, seconds: float) -> tuple[float | None, ...]:
    """Energy of one interval in Wh/varh/VAh, split by IEC quadrant (load convention).

    Q is the signed ``reactive_power`` (or ``fund_reactive_power``); a meter that gives
    only magnitudes yields |Q| = sqrt(S^2 - P^2), signed by ``load["total"]`` when
    analytics knows it, otherwise counted as ``delta_unsigned_varh``.
    """
    v = m.values
    p = v.get(M.POWER)
    if p is None or seconds <= 0:
        return (None,) * len(ENERGY_COLUMNS)
    q = v.get(M.REACTIVE_POWER, v.get(M.FUND_REACTIVE_POWER))
    s = v.get(M.APPARENT_POWER, v.get(M.EFFECTIVE_APPARENT_POWER))
    signed = q is not None
    if q is None and s is not None:
        q = math.sqrt(max(0.0, s * s - p * p))
        load = m.load.get("total")
        if load is LoadKind.INDUCTIVE:
            signed = True
        elif load is LoadKind.CAPACITIVE:
            q, signed = -q, True
    if s is None:
        s = math.hypot(p, q or 0.0)
    h = seconds / 3600.0
    quads = [0.0, 0.0, 0.0, 0.0]
    unsigned = 0.0
    if q is not None:
        if signed:
            idx = (0 if q >= 0 else 3) if p >= 0 else (1 if q >= 0 else 2)
            quads[idx] = abs(q) * h
        else:
            unsigned = abs(q) * h
    return (
        max(p, 0.0) * h,
        max(-p, 0.0) * h,
        *quads,
        unsigned if q is not None else None,
        s * h,
    )


@dataclass
class RowBuilder:
    """Turns validated messages into COPY records (tuples in TABLE_COLUMNS order)."""

    #: seconds of energy a metrics row with interval_s == 0 stands for (the poll interval)
    poll_interval: Callable[[str], float]

    def row(self, model: BaseModel) -> tuple[str, tuple[Any, ...]]:
        if isinstance(model, Metrics):
            return "pfm_metrics", self.metrics(model)
        if isinstance(model, Reading):
            return "pfm_readings", (
                model.site,
                model.meter,
                model.ts,
                model.seq,
                model.gateway,
                model.profile,
                model.poll_s,
                _json({k.value: x for k, x in model.values.items()}),
            )
        if isinstance(model, Event):
            return "pfm_events", (
                model.site,
                model.meter,
                model.ts,
                model.seq,
                model.code,
                model.state.value,
                model.severity.value,
                model.phase,
                model.message,
                _json(model.evidence),
                model.service,
            )
        if isinstance(model, Command):
            return "pfm_commands", (
                model.site,
                model.device,
                model.ts,
                model.seq,
                model.table,
                model.address,
                model.value,
                model.reason,
                model.origin,
                _json(model.trigger),
                model.dry_run,
            )
        if isinstance(model, ActuatorState):
            data = model.model_dump(mode="json", include={"coils", "steps_in", "operations"})
            return "pfm_device_status", (
                model.site,
                "actuator",
                model.device,
                model.ts,
                model.seq,
                model.online,
                model.message,
                _json(data),
            )
        if isinstance(model, GatewayStatus):
            data = model.model_dump(
                mode="json", include={"status", "versions", "meters_online", "meters_offline"}
            )
            return "pfm_device_status", (
                model.site,
                "gateway",
                model.gateway,
                model.ts,
                model.seq,
                model.status == "online",
                "",
                _json(data),
            )
        raise TypeError(f"the archiver does not store {type(model).__name__}")

    def metrics(self, m: Metrics) -> tuple[Any, ...]:
        # An aggregate (analytics' 3 s / 10 min statistics) summarises inputs stored one by
        # one: it covers no time of its own (energy_s NULL) and carries no energy, or
        # energy, hours and rollups would count the same inputs twice.
        seconds: float | None = None
        if not m.aggregate:
            seconds = m.interval_s if m.interval_s > 0 else self.poll_interval(m.meter)
        v: dict[Any, float] = m.values  # StrEnum keys hash and compare as their str value
        values = list(map(v.get, MEASUREMENTS))
        return (
            m.site,
            m.meter,
            m.ts,
            m.seq,
            m.interval_s,
            m.source,
            m.source_seq,
            seconds,
            *values,
            *(energy_deltas(m, seconds) if seconds else (None,) * len(ENERGY_COLUMNS)),
            # orjson writes StrEnum keys and values as their strings: no copies needed
            _json_or_none(m.load),
            _json_or_none(m.quadrant),
            _json_or_none(m.harmonics),
        )


@dataclass
class BatchResult:
    inserted: dict[str, int] = field(default_factory=dict)
    offered: dict[str, int] = field(default_factory=dict)
    #: tables whose rows went through the staging merge (a key was already stored)
    merged: set[str] = field(default_factory=set)


def group_rows(rows: Iterable[tuple[str, tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, row in rows:
        out.setdefault(table, []).append(row)
    return out


def _stage(table: str) -> str:
    return f"pfm_stage_{table.removeprefix('pfm_')}"


async def write_batch(
    conn: asyncpg.Connection,
    groups: dict[str, list[tuple[Any, ...]]],
    *,
    mark_dirty: bool,
    staged: set[str],
) -> BatchResult:
    """Write one batch in one transaction; returns rows offered and rows new per table.

    ``staged`` remembers which temporary staging tables exist on this connection.
    """
    result = BatchResult()
    created: set[str] = set()  # remembered only once committed (a rollback drops them)
    async with conn.transaction():
        for table, rows in groups.items():
            if not rows:
                continue
            cols = TABLE_COLUMNS[table]
            result.offered[table] = len(rows)
            if await _copy_new(conn, table, rows, cols):
                result.inserted[table] = len(rows)
                if table == "pfm_metrics" and mark_dirty:
                    await _mark_dirty(conn, rows)
                continue
            result.merged.add(table)
            stage = _stage(table)
            if stage not in staged:
                await conn.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {stage}"
                    f" (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                created.add(stage)
            await conn.copy_records_to_table(stage, records=rows, columns=cols)
            collist = ", ".join(cols)
            status = await conn.execute(
                f"INSERT INTO {table} ({collist}) SELECT {collist} FROM {stage}"
                " ON CONFLICT DO NOTHING"
            )
            result.inserted[table] = int(status.rsplit(" ", 1)[-1])
            if table == "pfm_metrics" and mark_dirty:
                # sorted: concurrent archivers take the same keys in the same order
                await conn.execute(
                    "INSERT INTO pfm_rollup_dirty (site, meter, ts)"
                    f" SELECT DISTINCT site, meter, date_bin('1 minute', ts,"
                    f" TIMESTAMPTZ '{BUCKET_ORIGIN}') FROM {stage} ORDER BY 1, 2, 3"
                    " ON CONFLICT DO NOTHING"
                )
    staged |= created
    return result


async def _copy_new(
    conn: asyncpg.Connection, table: str, rows: list[tuple[Any, ...]], cols: tuple[str, ...]
) -> bool:
    """COPY ``rows`` straight into ``table``; False, and nothing written, when a unique
    key refuses one of them (a re-delivered message, or a repeat within the batch)."""
    try:
        async with conn.transaction():  # a savepoint: a refused COPY leaves the batch usable
            await conn.copy_records_to_table(table, records=rows, columns=cols)
    except asyncpg.UniqueViolationError:
        return False
    return True


async def _mark_dirty(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Mark the 1-minute buckets of ``pfm_metrics`` rows (site, meter, ts first) dirty.

    The buckets start on whole UTC minutes (``date_bin('1 minute', ...)`` from a
    midnight origin), so flooring ``ts`` to its minute names the same bucket.
    """
    marks = sorted(
        {(r[0], r[1], r[2].astimezone(UTC).replace(second=0, microsecond=0)) for r in rows}
    )
    # sorted: concurrent archivers take the same keys in the same order
    await conn.execute(
        "INSERT INTO pfm_rollup_dirty (site, meter, ts)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])"
        " ON CONFLICT DO NOTHING",
        [m[0] for m in marks],
        [m[1] for m in marks],
        [m[2] for m in marks],
    )
