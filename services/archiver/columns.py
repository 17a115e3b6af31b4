"""The column vocabulary of the archive: one place that both SQL flavours use.

``pfm_metrics`` has one ``double precision`` column per
:class:`~shared.measurements.Measurement`, named by its value, plus the energy
deltas of the interval (per IEC quadrant) that the archiver derives. The rollups
(``pfm_metrics_1m`` / ``_15m`` / ``_1h``) average every non-counter measurement
under the same name, keep min/max of the quantities people plot as bands, take
the last value of counters and sum the energy deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.measurements import Measurement

#: energy of one metrics interval, derived by the archiver (all >= 0, SI units)
ENERGY_COLUMNS: tuple[str, ...] = (
    "delta_import_wh",  # active energy imported (P > 0)
    "delta_export_wh",  # active energy exported (P < 0)
    "delta_q1_varh",  # IEC quadrant I   (P >= 0, Q >= 0): inductive import
    "delta_q2_varh",  # IEC quadrant II  (P < 0,  Q >= 0): capacitive export
    "delta_q3_varh",  # IEC quadrant III (P < 0,  Q < 0):  inductive export
    "delta_q4_varh",  # IEC quadrant IV  (P >= 0, Q < 0):  capacitive import
    "delta_unsigned_varh",  # reactive energy of meters that give no lead/lag
    "delta_apparent_vah",  # apparent energy
)

#: measurements whose min and max per bucket the rollups keep (``<name>_min``, ``<name>_max``)
MINMAX: tuple[Measurement, ...] = (
    Measurement.POWER_FACTOR,
    Measurement.EFFECTIVE_PF,
    Measurement.POWER,
    Measurement.REACTIVE_POWER,
    Measurement.APPARENT_POWER,
    Measurement.VOLTAGE_L1,
    Measurement.VOLTAGE_L2,
    Measurement.VOLTAGE_L3,
    Measurement.CURRENT_L1,
    Measurement.CURRENT_L2,
    Measurement.CURRENT_L3,
    Measurement.FREQUENCY,
    Measurement.THD_CURRENT_L1,
    Measurement.THD_CURRENT_L2,
    Measurement.THD_CURRENT_L3,
)

ROLLUPS: dict[str, str] = {
    "pfm_metrics_1m": "1 minute",
    "pfm_metrics_15m": "15 minutes",
    "pfm_metrics_1h": "1 hour",
}

#: time_bucket()'s default origin for sub-month buckets (a Monday); date_bin uses the same
BUCKET_ORIGIN = "2000-01-03 00:00:00+00"


def measurement_columns() -> list[str]:
    return [m.value for m in Measurement]


@dataclass(frozen=True, slots=True)
class RollupColumn:
    """One rollup column: its name, how it aggregates raw rows, how it re-aggregates rollups."""

    name: str
    source: str  # the pfm_metrics column
    func: str  # avg | min | max | sum | last


def rollup_columns() -> list[RollupColumn]:
    cols: list[RollupColumn] = []
    for m in Measurement:
        cols.append(RollupColumn(m.value, m.value, "last" if m.is_counter else "avg"))
    for m in MINMAX:
        cols.append(RollupColumn(f"{m.value}_min", m.value, "min"))
        cols.append(RollupColumn(f"{m.value}_max", m.value, "max"))
    for e in ENERGY_COLUMNS:
        cols.append(RollupColumn(e, e, "sum"))
    return cols


def raw_aggregate(col: RollupColumn) -> str:
    """SQL aggregate over ``pfm_metrics`` rows (immutable functions only: caggs need that)."""
    if col.func == "last":
        # counters only grow: the newest value is the largest
        return f"max({col.source}) AS {col.name}"
    return f"{col.func}({col.source}) AS {col.name}"


def rollup_reaggregate(col: RollupColumn) -> str:
    """SQL aggregate over a finer rollup (``samples`` weights the averages)."""
    n = col.name
    if col.func == "avg":
        return f"sum({n} * samples) / nullif(sum(samples) FILTER (WHERE {n} IS NOT NULL), 0) AS {n}"
    if col.func == "last":
        return f"max({n}) AS {n}"
    return f"{col.func}({n}) AS {n}"
