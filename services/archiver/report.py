"""``pfmon report``: what the power factor cost over a period, who in the plant caused
it, and the capacitor bank that fixes it.

Everything is computed from ``pfm_metrics`` energy deltas (Wh, varh per IEC quadrant,
VAh), aggregated in SQL per meter and per 15-minute window (the billing demand
interval). Conventions:

* only **billing** meters (the utility's points of common coupling) are billed; feeders
  and generation meters explain the bill: each one's energies and its share of the
  reactive energy of its billing point, and per parent the unmetered share (parent
  minus its children). A site file without meters has no topology: every meter in the
  archive is then a billing point of its own;
* inductive reactive energy = quadrants I + III, capacitive = II + IV; reactive energy
  of meters that give no lead/lag counts as inductive unless the tariff says ``ignore``;
* billing PF = kWh / sqrt(kWh^2 + kvarh^2) with kvarh = inductive - capacitive
  (what utility meters bill); true PF = kWh / kVAh is shown too;
* a window is evaluated over the time that has data: demand = window energy / hours
  covered (at most 15 min), never diluted by the part without data; each window
  carries its coverage, and the report the coverage of the whole period;
* the bank's supply, from the actuator's archived states and commands (steps in x step
  kvar x (V/Vn)^2), is added back to the measured reactive energy: the uncompensated
  load, on which the capacitor sizing is done.

The fix: Qc = P * (tan phi1 - tan phi2) for the target PF on the uncompensated load,
sized on the worst window (and shown on the period average) and compared with the
banks installed; with the short-circuit power Ssc configured, the parallel resonance
order h = sqrt(Ssc / Qc) is checked against harmonics present.
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from services.archiver.columns import BUCKET_ORIGIN
from shared.errors import ConfigError
from shared.site import BankConfig, SiteConfig

WINDOW = timedelta(minutes=15)
WINDOW_H = WINDOW.total_seconds() / 3600
#: 6-pulse rectifiers, VFDs, UPS: what to assume when THD is high but no spectrum is stored
CHARACTERISTIC_ORDERS = (5, 7, 11, 13)
#: role of a meter that is in the archive but not in the site file's meters
UNCONFIGURED = "unconfigured"


def billing_pf(kwh: float, kvarh: float) -> float | None:
    if kwh <= 0 and kvarh == 0:
        return None
    return kwh / math.hypot(kwh, kvarh) if kwh > 0 else 0.0


def tan_of(pf: float) -> float:
    return math.tan(math.acos(pf))


@dataclass
class MeterSummary:
    meter: str
    kwh: float
    kwh_export: float
    kvarh_ind: float
    kvarh_cap: float
    kvarh_unsigned: float
    kvah: float
    hours: float
    hours_below_alert: float
    hours_below_penalty: float
    role: str = "billing"
    parent: str | None = None
    #: reactive energy the banks at this meter or below it supplied (kvarh, >= 0)
    kvarh_bank: float = 0.0
    #: fraction of its billing point's uncompensated reactive energy (None: no such point)
    share: float | None = None

    @property
    def kvarh_net(self) -> float:
        return self.kvarh_ind - self.kvarh_cap

    @property
    def kvarh_load(self) -> float:
        """Net reactive energy of the load before the banks at or below this meter."""
        return self.kvarh_net + self.kvarh_bank

    @property
    def pf(self) -> float | None:
        return billing_pf(self.kwh, self.kvarh_net)


@dataclass
class Unmetered:
    """What a parent measures that none of its children does (parent minus children)."""

    parent: str
    kwh: float
    kvarh: float
    share: float | None = None


@dataclass
class BankSupply:
    name: str
    meter: str
    installed_kvar: float
    kvarh: float = 0.0
    #: hours of the meter's data during which the bank's state was known
    hours_known: float = 0.0
    hours: float = 0.0


@dataclass
class Window:
    start: datetime
    kwh: float
    kvarh_ind: float
    kvarh_cap: float
    kvah: float
    #: hours of data in the window (the best-covered billing meter's), at most 0.25
    hours: float = WINDOW_H
    #: fraction of the window the billing meters have data for (0-1)
    coverage: float = 1.0
    #: demand: each billing meter's energy over its own covered time, added up
    kw: float = 0.0
    kvar: float = 0.0
    #: reactive demand before compensation (measured + what the banks supplied)
    kvar_load: float = 0.0
    #: hours the window's energy stands for (demand = energy / this)
    energy_h: float = 0.0

    @property
    def kvarh_net(self) -> float:
        return self.kvarh_ind - self.kvarh_cap

    @property
    def kva(self) -> float:
        return math.hypot(self.kw, self.kvar)

    @property
    def pf(self) -> float | None:
        return billing_pf(self.kwh, self.kvarh_net)


@dataclass
class BillingPoint:
    meter: MeterSummary
    windows: list[Window] = field(default_factory=list)
    banks: list[BankSupply] = field(default_factory=list)
    qc_needed_kvar: float = 0.0
    qc_average_kvar: float = 0.0

    @property
    def qc_installed_kvar(self) -> float:
        return sum(b.installed_kvar for b in self.banks)

    @property
    def pf_load(self) -> float | None:
        return billing_pf(self.meter.kwh, self.meter.kvarh_load)


@dataclass
class Penalty:
    name: str
    quantity: float
    unit: str
    cost: float
    note: str


@dataclass
class Report:
    site: str
    start: datetime
    end: datetime
    currency: str
    pf_alert: float
    pf_penalty: float
    target_pf: float
    #: every meter with data (billing points, feeders, generation, unconfigured)
    meters: list[MeterSummary]
    #: the billed series: billing meters added up per 15-minute window
    windows: list[Window]
    billing: list[BillingPoint] = field(default_factory=list)
    unmetered: list[Unmetered] = field(default_factory=list)
    #: hours of data at the billing points over hours of the period (x billing points)
    coverage: float = 0.0
    penalties: list[Penalty] = field(default_factory=list)
    resonance_order: float | None = None
    harmonics: dict[int, float] = field(default_factory=dict)
    harmonics_source: str = ""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: billed PF over the period for the chart: (bucket start, PF), ``chart_step`` wide
    chart: list[tuple[datetime, float]] = field(default_factory=list)
    chart_step: timedelta = WINDOW
    #: the site's time zone: what the report's times are shown in (UTC without one)
    tz: tzinfo = UTC

    # -- billed totals (billing points only) ----------------------------------------------
    @property
    def billed(self) -> list[MeterSummary]:
        return [b.meter for b in self.billing]

    @property
    def kwh(self) -> float:
        return sum(m.kwh for m in self.billed)

    @property
    def kvarh_ind(self) -> float:
        return sum(m.kvarh_ind for m in self.billed)

    @property
    def kvarh_cap(self) -> float:
        return sum(m.kvarh_cap for m in self.billed)

    @property
    def kvah(self) -> float:
        return sum(m.kvah for m in self.billed)

    @property
    def kvarh_bank(self) -> float:
        return sum(m.kvarh_bank for m in self.billed)

    @property
    def pf(self) -> float | None:
        return billing_pf(self.kwh, self.kvarh_ind - self.kvarh_cap)

    @property
    def pf_load(self) -> float | None:
        """PF the billing points would have had without their banks."""
        return billing_pf(self.kwh, self.kvarh_ind - self.kvarh_cap + self.kvarh_bank)

    @property
    def true_pf(self) -> float | None:
        return self.kwh / self.kvah if self.kvah > 0 else None

    @property
    def hours_covered(self) -> float:
        return sum(m.hours for m in self.billed)

    @property
    def peak(self) -> Window | None:
        return max(self.windows, key=lambda w: w.kw, default=None)

    @property
    def min_window_pf(self) -> float | None:
        pfs = [w.pf for w in self.windows if w.pf is not None]
        return min(pfs) if pfs else None

    def hours_below(self, threshold: float) -> float:
        return sum(w.hours for w in self.windows if w.pf is not None and w.pf < threshold)

    @property
    def total_cost(self) -> float:
        return sum(p.cost for p in self.penalties)

    # -- the fix --------------------------------------------------------------------------
    @property
    def qc_worst_kvar(self) -> float:
        """Compensation the billing points need on their uncompensated load (worst window)."""
        return sum(b.qc_needed_kvar for b in self.billing)

    @property
    def qc_average_kvar(self) -> float:
        return sum(b.qc_average_kvar for b in self.billing)

    @property
    def qc_installed_kvar(self) -> float:
        return sum(b.qc_installed_kvar for b in self.billing)

    @property
    def qc_extra_kvar(self) -> float:
        """What to add to the banks installed (per billing point, never negative)."""
        return sum(max(0.0, b.qc_needed_kvar - b.qc_installed_kvar) for b in self.billing)


# -- data -------------------------------------------------------------------------------


def _q(unsigned_as_inductive: bool) -> tuple[str, str]:
    ind = "coalesce(delta_q1_varh, 0) + coalesce(delta_q3_varh, 0)"
    if unsigned_as_inductive:
        ind += " + coalesce(delta_unsigned_varh, 0)"
    cap = "coalesce(delta_q2_varh, 0) + coalesce(delta_q4_varh, 0)"
    return ind, cap


_WINDOW_SQL = f"date_bin(INTERVAL '15 minutes', ts, TIMESTAMPTZ '{BUCKET_ORIGIN}')"
#: mean of the phase voltages a row has (NULL when it has none)
_V_MEAN = (
    "(coalesce(voltage_l1, 0) + coalesce(voltage_l2, 0) + coalesce(voltage_l3, 0))"
    " / nullif((voltage_l1 IS NOT NULL)::int + (voltage_l2 IS NOT NULL)::int"
    " + (voltage_l3 IS NOT NULL)::int, 0)"
)


class _Topology:
    """Roles and parents from the site file; without meters there every meter bills."""

    def __init__(self, site: SiteConfig, metered: list[str]) -> None:
        self.declared = bool(site.meters)
        self.cfg = {m.name: m for m in site.meters}
        if self.declared:
            self.billing = [m.name for m in site.billing_meters()]
        else:
            self.billing = list(metered)

    def role(self, name: str) -> tuple[str, str | None]:
        if not self.declared:
            return "billing", None
        m = self.cfg.get(name)
        return (m.kind, m.parent) if m else (UNCONFIGURED, None)

    def chain(self, name: str) -> list[str]:
        """``name`` and the meters above it, nearest first."""
        out = [name]
        m = self.cfg.get(name) if self.declared else None
        while m is not None and m.parent and m.parent not in out:
            out.append(m.parent)
            m = self.cfg.get(m.parent)
        return out

    def billing_point(self, name: str) -> str | None:
        return next((n for n in self.chain(name) if n in self.billing), None)

    def children(self, name: str) -> list[str]:
        if not self.declared:
            return []
        return [m.name for m in self.cfg.values() if m.parent == name]


async def build_report(
    conn: asyncpg.Connection, site: SiteConfig, site_name: str, start: datetime, end: datetime
) -> Report:
    cfg = site.archiver.report
    tariff = cfg.tariff
    th = site.thresholds
    if end <= start:
        raise ConfigError(f"report period is empty: --from {start} is not before --to {end}")
    ind, cap = _q(tariff.unsigned_reactive == "inductive")
    pf_expr = "abs(coalesce(power_factor, power / nullif(apparent_power, 0)))"
    rows = await conn.fetch(
        f"""
        SELECT meter,
            coalesce(sum(delta_import_wh), 0) / 1000 AS kwh,
            coalesce(sum(delta_export_wh), 0) / 1000 AS kwh_export,
            coalesce(sum({ind}), 0) / 1000 AS kvarh_ind,
            coalesce(sum({cap}), 0) / 1000 AS kvarh_cap,
            coalesce(sum(delta_unsigned_varh), 0) / 1000 AS kvarh_unsigned,
            coalesce(sum(delta_apparent_vah), 0) / 1000 AS kvah,
            coalesce(sum(least(energy_s, $4)), 0) / 3600 AS hours,
            coalesce(sum(least(energy_s, $4)) FILTER (WHERE {pf_expr} < $5), 0) / 3600
                AS below_alert,
            coalesce(sum(least(energy_s, $4)) FILTER (WHERE {pf_expr} < $6), 0) / 3600
                AS below_penalty
        FROM pfm_metrics
        WHERE site = $1 AND ts >= $2 AND ts < $3 AND energy_s IS NOT NULL
        GROUP BY meter ORDER BY meter
        """,
        site_name,
        start,
        end,
        cfg.max_gap_s,
        th.pf_alert,
        th.pf_penalty,
    )
    topo = _Topology(site, [r["meter"] for r in rows])
    meters = []
    for r in rows:
        role, parent = topo.role(r["meter"])
        meters.append(
            MeterSummary(
                r["meter"],
                r["kwh"],
                r["kwh_export"],
                r["kvarh_ind"],
                r["kvarh_cap"],
                r["kvarh_unsigned"],
                r["kvah"],
                r["hours"],
                r["below_alert"],
                r["below_penalty"],
                role=role,
                parent=parent,
            )
        )
    target = cfg.target_pf or th.pf_alert
    rep = Report(
        site_name,
        start,
        end,
        tariff.currency,
        th.pf_alert,
        th.pf_penalty,
        target,
        meters,
        [],
        tz=site.zone,
    )
    if not meters:
        rep.warnings.append(f"no metrics for site {site_name!r} between {start} and {end}")
        return rep
    _topology_notes(rep, topo)
    by_name = {m.meter: m for m in meters}
    points = {name: BillingPoint(by_name[name]) for name in topo.billing if name in by_name}
    rep.billing = list(points.values())
    # what the banks supplied: per meter (and everything above it), per billing window
    supplied: dict[str, dict[datetime, float]] = defaultdict(lambda: defaultdict(float))
    for bank in site.banks:
        supply, per_window = await _bank_supply(conn, rep, site, site_name, bank)
        for name in topo.chain(bank.meter):
            if name in by_name:
                by_name[name].kvarh_bank += supply.kvarh
        point = topo.billing_point(bank.meter)
        if point in points:
            points[point].banks.append(supply)
            for w, kvarh in per_window.items():
                supplied[point][w] += kvarh
    await _billing_windows(conn, rep, points, supplied, ind, cap, len(topo.billing), cfg.max_gap_s)
    _breakdown(rep, topo, by_name)
    period_h = (end - start).total_seconds() / 3600
    rep.coverage = min(1.0, rep.hours_covered / (period_h * max(1, len(topo.billing))))
    unsigned = [m for m in meters if m.kvarh_unsigned > 0]
    if unsigned:
        share = sum(m.kvarh_unsigned for m in unsigned)
        how = "counted as inductive" if tariff.unsigned_reactive == "inductive" else "ignored"
        names = ", ".join(m.meter for m in unsigned)
        rep.notes.append(
            f"{share:.2f} kvarh came from meters that give no lead/lag (magnitude only: "
            f"{names}): {how}"
        )
    await _chart(conn, rep, ind, cap)
    _penalties(rep, site)
    _fix(rep)
    await _harmonics(conn, rep, site, site_name, start, end)
    _resonance(rep, site)
    return rep


def _topology_notes(rep: Report, topo: _Topology) -> None:
    metered = {m.meter for m in rep.meters}
    if not topo.declared:
        rep.warnings.append(
            "the site file declares no meters, so no billing point: every meter is billed "
            "as its own (pass --site-file with the meters' roles to bill the incomer only)"
        )
        return
    for name in topo.billing:
        if name not in metered:
            rep.warnings.append(f"billing meter {name!r} has no data in the period: not billed")
    if not topo.billing:
        rep.warnings.append("the site file declares no billing meter: nothing is billed")
    stray = sorted(m.meter for m in rep.meters if m.role == UNCONFIGURED)
    if stray:
        rep.warnings.append(
            f"meter(s) {', '.join(stray)} have data but are not in the site file: shown, not billed"
        )
    silent = sorted(n for n in topo.cfg if n not in metered and n not in topo.billing)
    if silent:
        rep.notes.append(f"no data in the period from: {', '.join(silent)}")


async def _billing_windows(
    conn: asyncpg.Connection,
    rep: Report,
    points: dict[str, BillingPoint],
    supplied: dict[str, dict[datetime, float]],
    ind: str,
    cap: str,
    n_billing: int,
    max_gap_s: float,
) -> None:
    """Per billing meter and 15-minute window: energies and the time they stand for.

    Demand is the window's energy over that time: a window partly covered is evaluated
    on the part that has data, and carries its coverage; the site's windows add the
    billing points' demands."""
    if not points:
        return
    rows = await conn.fetch(
        f"""
        SELECT meter, {_WINDOW_SQL} AS w,
            coalesce(sum(delta_import_wh), 0) / 1000 AS kwh,
            coalesce(sum({ind}), 0) / 1000 AS kvarh_ind,
            coalesce(sum({cap}), 0) / 1000 AS kvarh_cap,
            coalesce(sum(delta_apparent_vah), 0) / 1000 AS kvah,
            sum(energy_s) / 3600 AS energy_h,
            sum(least(energy_s, $4)) / 3600 AS covered_h
        FROM pfm_metrics
        WHERE site = $1 AND ts >= $2 AND ts < $3 AND energy_s IS NOT NULL
            AND meter = ANY($5::text[])
        GROUP BY 1, 2 ORDER BY 2, 1
        """,
        rep.site,
        rep.start,
        rep.end,
        max_gap_s,
        list(points),
    )
    site_windows: dict[datetime, Window] = {}
    for r in rows:
        point = points[r["meter"]]
        energy_h, covered_h = r["energy_h"], min(r["covered_h"], WINDOW_H)
        if energy_h <= 0:
            continue
        kvarh_net = r["kvarh_ind"] - r["kvarh_cap"]
        bank = supplied.get(r["meter"], {}).get(r["w"], 0.0)
        w = Window(
            r["w"],
            r["kwh"],
            r["kvarh_ind"],
            r["kvarh_cap"],
            r["kvah"],
            hours=covered_h,
            coverage=covered_h / WINDOW_H,
            kw=r["kwh"] / energy_h,
            kvar=kvarh_net / energy_h,
            kvar_load=(kvarh_net + bank) / energy_h,
            energy_h=energy_h,
        )
        point.windows.append(w)
        total = site_windows.get(w.start)
        if total is None:
            site_windows[w.start] = total = Window(w.start, 0.0, 0.0, 0.0, 0.0, hours=0.0)
            total.coverage = 0.0
        total.kwh += w.kwh
        total.kvarh_ind += w.kvarh_ind
        total.kvarh_cap += w.kvarh_cap
        total.kvah += w.kvah
        total.kw += w.kw
        total.kvar += w.kvar
        total.kvar_load += w.kvar_load
        total.hours = max(total.hours, w.hours)
        total.energy_h = max(total.energy_h, w.energy_h)
        total.coverage += w.coverage / n_billing
    rep.windows = [site_windows[k] for k in sorted(site_windows)]


def _breakdown(rep: Report, topo: _Topology, by_name: dict[str, MeterSummary]) -> None:
    """Each meter's share of its billing point's uncompensated reactive energy, and the
    unmetered share of every parent (parent minus its children)."""

    def share(name: str, kvarh: float) -> float | None:
        point = topo.billing_point(name)
        total = by_name[point].kvarh_load if point in by_name else 0.0
        return kvarh / total if total > 0 else None

    for m in rep.meters:
        if m.role != UNCONFIGURED:
            m.share = share(m.meter, m.kvarh_load)
    for m in rep.meters:
        kids = [by_name[k] for k in topo.children(m.meter) if k in by_name]
        if not topo.children(m.meter):
            continue
        kwh = (m.kwh - m.kwh_export) - sum(k.kwh - k.kwh_export for k in kids)
        kvarh = m.kvarh_load - sum(k.kvarh_load for k in kids)
        rep.unmetered.append(Unmetered(m.meter, kwh, kvarh, share(m.meter, kvarh)))


async def _bank_supply(
    conn: asyncpg.Connection, rep: Report, site: SiteConfig, site_name: str, bank: BankConfig
) -> tuple[BankSupply, dict[datetime, float]]:
    """Reactive energy a bank supplied, per 15-minute window of the meter it compensates.

    Its steps over time come from the actuator's archived states (the coils read back)
    and the coil commands between them; each row of the meter counts the kvar of the
    steps in at that moment, times (V/Vn)^2 when the row has voltages, over the time
    the row's energy stands for (the same time its measured reactive energy covers)."""
    supply = BankSupply(bank.name, bank.meter, sum(bank.steps_kvar))
    since = await conn.fetchval(
        "SELECT max(ts) FROM pfm_device_status"
        " WHERE site = $1 AND kind = 'actuator' AND device = $2 AND ts <= $3",
        site_name,
        bank.device,
        rep.start,
    )
    lo = since or rep.start
    states = await conn.fetch(
        "SELECT ts, data FROM pfm_device_status WHERE site = $1 AND kind = 'actuator'"
        " AND device = $2 AND ts >= $3 AND ts < $4 ORDER BY ts, seq",
        site_name,
        bank.device,
        lo,
        rep.end,
    )
    commands = await conn.fetch(
        "SELECT ts, address, value FROM pfm_commands WHERE site = $1 AND device = $2"
        " AND register_table = 'coil' AND NOT dry_run AND ts >= $3 AND ts < $4"
        " ORDER BY ts, seq",
        site_name,
        bank.device,
        lo,
        rep.end,
    )
    shared_device = sum(1 for b in site.banks if b.device == bank.device) > 1
    changes = _step_changes(bank, shared_device, states, commands)
    if not changes:
        rep.warnings.append(
            f"bank {bank.name!r}: no state of device {bank.device!r} in the archive up to "
            "the end of the period: what it supplied is not counted, so the sizing sees "
            "the compensated load"
        )
        return supply, {}
    bounds = [t for t, _ in changes]
    kvars = [sum(bank.steps_kvar[i] for i in steps) for _, steps in changes]
    rows = await conn.fetch(
        f"""
        SELECT {_WINDOW_SQL} AS w, width_bucket(ts, $5::timestamptz[]) AS k,
            sum(energy_s * coalesce(power({_V_MEAN} / $6, 2), 1)) / 3600 AS h_eff,
            sum(energy_s) / 3600 AS h
        FROM pfm_metrics
        WHERE site = $1 AND meter = $2 AND ts >= $3 AND ts < $4 AND energy_s IS NOT NULL
        GROUP BY 1, 2
        """,
        site_name,
        bank.meter,
        rep.start,
        rep.end,
        bounds,
        site.thresholds.nominal_voltage_v,
    )
    per_window: dict[datetime, float] = defaultdict(float)
    for r in rows:
        supply.hours += r["h"]
        if r["k"] == 0:
            continue  # before the first known state
        supply.hours_known += r["h"]
        kvarh = kvars[r["k"] - 1] * r["h_eff"]
        per_window[r["w"]] += kvarh
        supply.kvarh += kvarh
    unknown = supply.hours - supply.hours_known
    if unknown > 1e-9:
        rep.notes.append(
            f"bank {bank.name!r}: state unknown before "
            f"{_local(rep, bounds[0]):%Y-%m-%d %H:%M:%S} {_zone_name(rep)} "
            f"({unknown:.2f} h of {bank.meter!r}'s data): no supply counted there"
        )
    return supply, dict(per_window)


def _step_changes(
    bank: BankConfig,
    shared_device: bool,
    states: list[asyncpg.Record],
    commands: list[asyncpg.Record],
) -> list[tuple[datetime, frozenset[int]]]:
    """The bank's steps in over time: (from, steps in), from states and commands."""
    step_of = {coil: i for i, coil in enumerate(bank.step_coils)}
    events: list[tuple[datetime, int, Any]] = [(r["ts"], 1, r["data"]) for r in states]
    events += [(r["ts"], 0, (r["address"], r["value"])) for r in commands]
    events.sort(key=lambda e: (e[0], e[1]))  # at one instant the read-back wins
    steps: set[int] | None = None
    out: list[tuple[datetime, frozenset[int]]] = []
    for ts, kind, payload in events:
        if kind == 1:
            data = orjson.loads(payload) if isinstance(payload, str | bytes) else payload or {}
            coils = data.get("coils") or {}
            if coils:
                steps = {i for c, i in step_of.items() if coils.get(str(c))}
            elif data.get("steps_in") is not None and not shared_device:
                steps = {s - 1 for s in data["steps_in"] if 1 <= s <= len(step_of)}
            else:
                continue
        else:
            coil, value = payload
            if steps is None or coil not in step_of:
                continue
            steps = steps | {step_of[coil]} if value else steps - {step_of[coil]}
        if out and out[-1][0] == ts:
            out[-1] = (ts, frozenset(steps))
        elif not out or out[-1][1] != steps:
            out.append((ts, frozenset(steps)))
    return out


#: chart resolutions, finest first; the first that gives at most CHART_POINTS buckets wins
CHART_STEPS = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=6),
    timedelta(days=1),
)
CHART_POINTS = 400


async def _chart(conn: asyncpg.Connection, rep: Report, ind: str, cap: str) -> None:
    span = rep.end - rep.start
    step = next((s for s in CHART_STEPS if span / s <= CHART_POINTS), CHART_STEPS[-1])
    rep.chart_step = step
    if not rep.billing:
        return
    rows = await conn.fetch(
        f"""
        SELECT date_bin($4, ts, TIMESTAMPTZ '{BUCKET_ORIGIN}') AS b,
            sum(delta_import_wh) AS wh, sum({ind}) - sum({cap}) AS varh
        FROM pfm_metrics
        WHERE site = $1 AND ts >= $2 AND ts < $3 AND meter = ANY($5::text[])
        GROUP BY 1 ORDER BY 1
        """,
        rep.site,
        rep.start,
        rep.end,
        step,
        [m.meter for m in rep.billed],
    )
    rep.chart = [
        (r["b"], pf)
        for r in rows
        if r["wh"] is not None and (pf := billing_pf(r["wh"], r["varh"] or 0.0)) is not None
    ]


def _penalties(rep: Report, site: SiteConfig) -> None:
    t = site.archiver.report.tariff
    if t.tan_phi_limit is not None:
        allowed = t.tan_phi_limit * rep.kwh
        billable = max(0.0, rep.kvarh_ind - allowed)
        rep.penalties.append(
            Penalty(
                "reactive energy above tan phi limit",
                billable,
                "kvarh",
                billable * t.kvarh_price,
                f"{rep.kvarh_ind:.2f} kvarh inductive - {t.tan_phi_limit:g} x {rep.kwh:.2f} kWh",
            )
        )
    peak = rep.peak
    if peak is None:
        return
    peak_kva = max((w.kva for w in rep.windows), default=0.0)
    if t.demand_k is not None:
        billing = max(peak.kw, t.demand_k * peak_kva)
        extra = billing - peak.kw
        rep.penalties.append(
            Penalty(
                "billing demand above kW peak",
                extra,
                "kW",
                extra * t.demand_price_per_kw,
                f"max({peak.kw:.2f} kW, {t.demand_k:g} x {peak_kva:.2f} kVA) = {billing:.2f} kW",
            )
        )
    if t.pf_threshold is not None:
        tan_t = tan_of(t.pf_threshold)
        excess = max((w.kvar - w.kw * tan_t for w in rep.windows), default=0.0)
        excess = max(0.0, excess)
        rep.penalties.append(
            Penalty(
                f"kvar demand beyond PF {t.pf_threshold:g}",
                excess,
                "kvar",
                excess * t.kvar_price,
                f"worst 15-min window: kvar - kW x tan(acos {t.pf_threshold:g})",
            )
        )


def _fix(rep: Report) -> None:
    """Per billing point: Qc = P (tan phi1 - tan phi2) on the uncompensated load."""
    tan2 = tan_of(rep.target_pf)
    for point in rep.billing:
        worst = max((w.kvar_load - w.kw * tan2 for w in point.windows if w.kw > 0), default=0)
        point.qc_needed_kvar = max(0.0, worst)
        m = point.meter
        hours = sum(w.energy_h for w in point.windows)
        if m.kwh > 0 and hours > 0:
            point.qc_average_kvar = max(0.0, (m.kvarh_load - m.kwh * tan2) / hours)


async def _harmonics(
    conn: asyncpg.Connection,
    rep: Report,
    site: SiteConfig,
    site_name: str,
    start: datetime,
    end: datetime,
) -> None:
    """Current harmonics present on site, as % of the fundamental (max over meters)."""
    cfg = site.archiver.report
    rows = await conn.fetch(
        "SELECT harmonics FROM pfm_metrics WHERE site = $1 AND ts >= $2 AND ts < $3"
        " AND harmonics IS NOT NULL ORDER BY ts DESC LIMIT 500",
        site_name,
        start,
        end,
    )
    found: dict[int, float] = {}
    for r in rows:
        spectra = orjson.loads(r["harmonics"])
        for channel, mags in spectra.items():
            if not channel.startswith("i") or not mags or mags[0] <= 0:
                continue
            for order, mag in enumerate(mags[1:], start=2):
                pct = 100 * mag / mags[0]
                if pct >= cfg.harmonic_present_pct:
                    found[order] = max(found.get(order, 0.0), pct)
    if found:
        rep.harmonics, rep.harmonics_source = found, "measured current spectra"
        return
    thd = await conn.fetchval(
        "SELECT max(greatest(thd_current_l1, thd_current_l2, thd_current_l3))"
        " FROM pfm_metrics WHERE site = $1 AND ts >= $2 AND ts < $3",
        site_name,
        start,
        end,
    )
    if thd is not None and thd >= cfg.harmonic_present_pct:
        rep.harmonics = dict.fromkeys(CHARACTERISTIC_ORDERS, float(thd))
        rep.harmonics_source = (
            f"THD-I up to {thd:.1f} % but no spectrum stored: orders 5, 7, 11, 13 assumed"
        )


def _resonance(rep: Report, site: SiteConfig) -> None:
    cfg = site.archiver.report
    qc = max(rep.qc_worst_kvar, rep.qc_installed_kvar)
    if qc <= 0:
        return
    if cfg.short_circuit_mva is None:
        rep.notes.append(
            "short-circuit power not configured (archiver.report.short_circuit_mva): "
            "resonance with the capacitor bank not checked"
        )
        return
    order = math.sqrt(cfg.short_circuit_mva * 1000 / qc)
    rep.resonance_order = order
    for h in sorted(rep.harmonics):
        if abs(order - h) <= cfg.resonance_margin * h:
            rep.warnings.append(
                f"parallel resonance at order {order:.2f} is within "
                f"{cfg.resonance_margin:.0%} of harmonic {h} present on site "
                f"({rep.harmonics[h]:.1f} % of the fundamental): use a detuned "
                "(reactor-filtered) bank or change the step size"
            )


# -- rendering ----------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _when(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}" if t.second or t.microsecond else f"{t:%Y-%m-%d %H:%M}"


def _zone_name(rep: Report) -> str:
    return str(getattr(rep.tz, "key", None) or rep.tz.tzname(None) or "UTC")


def _local(rep: Report, t: datetime) -> datetime:
    """``t`` in the site's time zone (how every time in the report is shown)."""
    return t.astimezone(rep.tz)


def _period(rep: Report) -> str:
    return (
        f"Period: {_when(_local(rep, rep.start))} to {_when(_local(rep, rep.end))} "
        f"{_zone_name(rep)}"
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def pf_svg(rep: Report, width: int = 720, height: int = 240) -> str:
    """Billed PF over the period (adaptive resolution), with the alert and penalty lines."""
    pad_l, pad_r, pad_t, pad_b = 48, 12, 16, 28
    pts = rep.chart
    lo = min([rep.pf_penalty - 0.05, *[pf for _, pf in pts]]) if pts else 0.8
    lo = max(0.0, math.floor(lo * 20) / 20)
    span = (rep.end - rep.start).total_seconds() or 1.0

    def x(t: datetime) -> float:
        return pad_l + (width - pad_l - pad_r) * (t - rep.start).total_seconds() / span

    def y(pf: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (1.0 - pf) / (1.0 - lo or 1.0)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>Power factor at the billing point(s), {html.escape(rep.site)}, per"
        f" {rep.chart_step.total_seconds() / 60:g} min</title>",
        f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}"'
        f' height="{height - pad_t - pad_b}" fill="none" stroke="#999"/>',
    ]
    for pf, color, label in (
        (rep.pf_alert, "#e69f00", "alert"),
        (rep.pf_penalty, "#d55e00", "penalty"),
    ):
        out.append(
            f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(pf):.1f}" y2="{y(pf):.1f}"'
            f' stroke="{color}" stroke-dasharray="4 3"/>'
            f'<text x="{width - pad_r - 4}" y="{y(pf) - 3:.1f}" text-anchor="end"'
            f' fill="{color}">{label} {pf:g}</text>'
        )
    for tick in (lo, (lo + 1) / 2, 1.0):
        out.append(
            f'<text x="{pad_l - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.2f}</text>'
        )
    start, end = _local(rep, rep.start), _local(rep, rep.end)
    out.append(f'<text x="{pad_l}" y="{height - 8}">{start:%Y-%m-%d %H:%M}</text>')
    out.append(
        f'<text x="{width - pad_r}" y="{height - 8}" text-anchor="end">'
        f"{end:%Y-%m-%d %H:%M} {html.escape(_zone_name(rep))}</text>"
    )
    if pts:
        half = rep.chart_step / 2
        poly = " ".join(f"{x(min(t + half, rep.end)):.1f},{y(pf):.1f}" for t, pf in pts)
        out.append(f'<polyline fill="none" stroke="#0072b2" stroke-width="1.5" points="{poly}"/>')
    out.append("</svg>")
    return "\n".join(out)


def _coverage_line(rep: Report) -> str:
    period_h = (rep.end - rep.start).total_seconds() / 3600
    points = ", ".join(m.meter for m in rep.billed) or "none"
    return (
        f"Billed at: {points}. Data covers {_pct(rep.coverage)} of the period "
        f"({rep.hours_covered:.2f} h of {period_h * max(1, len(rep.billing)):.2f} h); "
        "demand and PF are evaluated over the time that has data."
    )


def _summary_rows(rep: Report) -> list[tuple[str, str]]:
    peak = rep.peak
    peak_text = "n/a"
    if peak is not None:
        peak_text = f"{peak.kw:.2f} kW / {peak.kva:.2f} kVA"
        if peak.coverage < 0.999:
            peak_text += (
                f" (window {_local(rep, peak.start):%H:%M}, data for {_pct(peak.coverage)} of it)"
            )
    rows = [
        ("Data coverage of the period", _pct(rep.coverage)),
        ("Active energy imported", f"{rep.kwh:.2f} kWh"),
        ("Reactive energy, inductive", f"{rep.kvarh_ind:.2f} kvarh"),
        ("Reactive energy, capacitive", f"{rep.kvarh_cap:.2f} kvarh"),
        ("Apparent energy", f"{rep.kvah:.2f} kVAh"),
        ("Average PF (billing, kWh/kvarh)", _f(rep.pf)),
        ("Average true PF (kWh/kVAh)", _f(rep.true_pf)),
    ]
    if rep.kvarh_bank > 0:
        rows += [
            ("Reactive energy supplied by the banks", f"{rep.kvarh_bank:.2f} kvarh"),
            ("PF of the load without the banks", _f(rep.pf_load)),
        ]
    rows += [
        ("PF at the 15-min kW peak", _f(peak.pf if peak else None)),
        ("Lowest 15-min demand PF", _f(rep.min_window_pf)),
        ("Peak 15-min demand", peak_text),
        (f"Hours below alert PF {rep.pf_alert:g}", f"{rep.hours_below(rep.pf_alert):.2f} h"),
        (f"Hours below penalty PF {rep.pf_penalty:g}", f"{rep.hours_below(rep.pf_penalty):.2f} h"),
    ]
    return rows


@dataclass
class _Line:
    """One row of the breakdown of a billing point's reactive energy."""

    label: str
    role: str
    kwh: float | None
    kvarh: float
    pf: float | None
    share: float | None


def _breakdown_lines(rep: Report, point: BillingPoint) -> list[_Line]:
    m = point.meter
    by_parent: dict[str | None, list[MeterSummary]] = defaultdict(list)
    for x in rep.meters:
        by_parent[x.parent].append(x)
    unmetered = {u.parent: u for u in rep.unmetered}
    lines = [_Line(f"**{m.meter}** as metered", "billing", m.kwh, m.kvarh_net, m.pf, None)]
    for b in point.banks:
        lines.append(
            _Line(f"bank {b.name} supplied (on {b.meter})", "bank", None, -b.kvarh, None, None)
        )
    if point.banks:
        lines.append(
            _Line(
                f"{m.meter}'s load before compensation",
                "billing",
                m.kwh,
                m.kvarh_load,
                point.pf_load,
                m.share,
            )
        )

    def walk(parent: str, depth: int) -> None:
        indent = "&nbsp;&nbsp;" * depth + "└ "
        for kid in sorted(by_parent.get(parent, []), key=lambda k: -(k.share or 0)):
            lines.append(
                _Line(
                    indent + kid.meter,
                    f"{kid.role} of {parent}",
                    kid.kwh - kid.kwh_export,
                    kid.kvarh_load,
                    kid.pf,
                    kid.share,
                )
            )
            walk(kid.meter, depth + 1)
        u = unmetered.get(parent)
        if u is not None:
            lines.append(
                _Line(indent + "unmetered", f"{parent} - its meters", u.kwh, u.kvarh, None, u.share)
            )

    walk(m.meter, 1)
    return lines


def _worst(rep: Report, n: int) -> list[MeterSummary]:
    return sorted(rep.meters, key=lambda m: m.pf if m.pf is not None else 2.0)[:n]


def _fix_lines(rep: Report) -> list[str]:
    lines = []
    for point in rep.billing:
        name, need, have = point.meter.meter, point.qc_needed_kvar, point.qc_installed_kvar
        banks = ", ".join(b.name for b in point.banks)
        if need <= 0:
            text = (
                f"{name}: no correction needed - every 15-min window of the load is at or "
                f"above PF {rep.target_pf:g}"
            )
            if have > 0:
                text += f" with the banks out (installed: {have:g} kvar, bank {banks})"
            lines.append(text + ".")
            continue
        how = (
            f"to reach PF {rep.target_pf:g} on the uncompensated load "
            f"(Qc = P x (tan phi1 - tan phi2) on the worst 15-min window; "
            f"{point.qc_average_kvar:.1f} kvar on the period average)"
        )
        if have <= 0:
            lines.append(f"{name}: capacitor bank **{need:.1f} kvar** {how}.")
        elif have >= need:
            lines.append(
                f"{name}: installed {have:g} kvar (bank {banks}), needed ~**{need:.1f} kvar** "
                f"{how}: no extra bank."
            )
        else:
            lines.append(
                f"{name}: installed {have:g} kvar (bank {banks}), needed ~**{need:.1f} kvar** "
                f"{how}: add ~{need - have:.1f} kvar."
            )
    if rep.resonance_order is not None:
        qc = max(rep.qc_worst_kvar, rep.qc_installed_kvar)
        lines.append(
            "Parallel resonance order with that bank: "
            f"h = sqrt(Ssc/Qc) = {rep.resonance_order:.2f} (Qc = {qc:.1f} kvar)."
        )
    if rep.harmonics:
        orders = ", ".join(f"{h} ({p:.1f} %)" for h, p in sorted(rep.harmonics.items()))
        lines.append(f"Current harmonics present: {orders} - {rep.harmonics_source}.")
    return lines


def render_markdown(rep: Report, worst: int = 5, chart_file: str | None = None) -> str:
    out = [
        f"# Power-factor report - {rep.site}",
        "",
        _period(rep),
        "",
    ]
    if rep.meters:
        out += [_coverage_line(rep), ""]
    for w in rep.warnings:
        out.append(f"> **Warning:** {w}")
        out.append("")
    if chart_file:
        step = f"{rep.chart_step.total_seconds() / 60:g} min"
        out += [f"![billed PF per {step}]({chart_file})", ""]
    out += ["## Summary", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _summary_rows(rep)]
    out += [
        "",
        f"## Penalty estimate ({rep.currency})",
        "",
        "| component | quantity | cost | how |",
    ]
    out.append("|---|---|---|---|")
    for p in rep.penalties:
        out.append(f"| {p.name} | {p.quantity:.2f} {p.unit} | {p.cost:.2f} | {p.note} |")
    out.append(f"| **total** | | **{rep.total_cost:.2f}** | |")
    for point in rep.billing:
        out += [
            "",
            f"## Where the reactive energy of {point.meter.meter} comes from",
            "",
            "| | role | kWh | kvarh (net) | PF | share of the load's kvarh |",
            "|---|---|---|---|---|---|",
        ]
        for line in _breakdown_lines(rep, point):
            kwh = "" if line.kwh is None else f"{line.kwh:.2f}"
            out.append(
                f"| {line.label} | {line.role} | {kwh} | {line.kvarh:.2f} | "
                f"{'' if line.pf is None else _f(line.pf)} | "
                f"{'' if line.share is None else _pct(line.share)} |"
            )
    out += [
        "",
        "## Worst meters",
        "",
        "| meter | role | kWh | kvarh ind | kvarh cap | PF | h < alert | h < penalty |",
    ]
    out.append("|---|---|---|---|---|---|---|---|")
    for m in _worst(rep, worst):
        out.append(
            f"| {m.meter} | {m.role} | {m.kwh:.2f} | {m.kvarh_ind:.2f} | {m.kvarh_cap:.2f} "
            f"| {_f(m.pf)} | {m.hours_below_alert:.2f} | {m.hours_below_penalty:.2f} |"
        )
    out += ["", "## The fix", ""]
    out += [f"- {line}" for line in _fix_lines(rep)]
    if rep.notes:
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in rep.notes]
    return "\n".join(out) + "\n"


def render_html(rep: Report, worst: int = 5) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>PF report {e(rep.site)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".warn{background:#fde;padding:.5em}</style></head><body>",
        f"<h1>Power-factor report - {e(rep.site)}</h1>",
        f"<p>{e(_period(rep))}</p>",
    ]
    if rep.meters:
        parts.append(f"<p>{e(_coverage_line(rep))}</p>")
    parts += [f"<p class='warn'><b>Warning:</b> {e(w)}</p>" for w in rep.warnings]
    parts.append(pf_svg(rep))
    parts.append("<h2>Summary</h2><table>")
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary_rows(rep)]
    parts.append(f"</table><h2>Penalty estimate ({e(rep.currency)})</h2><table>")
    parts.append("<tr><th>component</th><th>quantity</th><th>cost</th><th>how</th></tr>")
    for p in rep.penalties:
        parts.append(
            f"<tr><td>{e(p.name)}</td><td>{p.quantity:.2f} {p.unit}</td>"
            f"<td>{p.cost:.2f}</td><td>{e(p.note)}</td></tr>"
        )
    parts.append(f"<tr><th>total</th><td></td><th>{rep.total_cost:.2f}</th><td></td></tr>")
    parts.append("</table>")
    for point in rep.billing:
        parts.append(
            f"<h2>Where the reactive energy of {e(point.meter.meter)} comes from</h2><table>"
            "<tr><th></th><th>role</th><th>kWh</th><th>kvarh (net)</th><th>PF</th>"
            "<th>share of the load's kvarh</th></tr>"
        )
        for line in _breakdown_lines(rep, point):
            label = e(line.label.replace("**", "")).replace("&amp;nbsp;", "&nbsp;")
            parts.append(
                f"<tr><td>{label}</td><td>{e(line.role)}</td>"
                f"<td>{'' if line.kwh is None else f'{line.kwh:.2f}'}</td>"
                f"<td>{line.kvarh:.2f}</td><td>{'' if line.pf is None else _f(line.pf)}</td>"
                f"<td>{'' if line.share is None else _pct(line.share)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Worst meters</h2><table><tr><th>meter</th><th>role</th><th>kWh</th>")
    parts.append("<th>kvarh ind</th><th>kvarh cap</th><th>PF</th><th>h &lt; alert</th>")
    parts.append("<th>h &lt; penalty</th></tr>")
    for m in _worst(rep, worst):
        parts.append(
            f"<tr><td>{e(m.meter)}</td><td>{e(m.role)}</td><td>{m.kwh:.2f}</td>"
            f"<td>{m.kvarh_ind:.2f}</td><td>{m.kvarh_cap:.2f}</td><td>{_f(m.pf)}</td>"
            f"<td>{m.hours_below_alert:.2f}</td><td>{m.hours_below_penalty:.2f}</td></tr>"
        )
    parts.append("</table><h2>The fix</h2><ul>")
    parts += [f"<li>{e(line).replace('**', '')}</li>" for line in _fix_lines(rep)]
    parts.append("</ul>")
    if rep.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in rep.notes))
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_csv(rep: Report) -> str:
    """One row per 15-minute window (the billed series)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "window_start",
            "coverage",
            "kwh",
            "kvarh_ind",
            "kvarh_cap",
            "kvah",
            "kw",
            "kvar",
            "kva",
            "pf",
            "kvar_uncompensated",
        ]
    )
    for x in rep.windows:
        w.writerow(
            [
                _local(rep, x.start).isoformat(),
                f"{x.coverage:.4f}",
                f"{x.kwh:.6f}",
                f"{x.kvarh_ind:.6f}",
                f"{x.kvarh_cap:.6f}",
                f"{x.kvah:.6f}",
                f"{x.kw:.6f}",
                f"{x.kvar:.6f}",
                f"{x.kva:.6f}",
                "" if x.pf is None else f"{x.pf:.6f}",
                f"{x.kvar_load:.6f}",
            ]
        )
    return buf.getvalue()


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def report_dict(rep: Report) -> dict[str, Any]:
    """The report as plain data (``--format json``); energies in kWh/kvarh, powers in kW/kvar."""
    peak = rep.peak
    return {
        "site": rep.site,
        "period": {
            "from": _local(rep, rep.start).isoformat(),
            "to": _local(rep, rep.end).isoformat(),
            "timezone": _zone_name(rep),
        },
        "coverage": _r(rep.coverage),
        "hours_covered": _r(rep.hours_covered),
        "billing_points": [m.meter for m in rep.billed],
        "kwh": _r(rep.kwh),
        "kvarh_ind": _r(rep.kvarh_ind),
        "kvarh_cap": _r(rep.kvarh_cap),
        "kvah": _r(rep.kvah),
        "kvarh_bank": _r(rep.kvarh_bank),
        "pf_billing": _r(rep.pf),
        "pf_true": _r(rep.true_pf),
        "pf_uncompensated": _r(rep.pf_load),
        "peak_demand_kw": _r(peak.kw if peak else None),
        "peak_demand_kva": _r(peak.kva if peak else None),
        "peak_window": None
        if peak is None
        else {"start": _local(rep, peak.start).isoformat(), "coverage": _r(peak.coverage)},
        "hours_below_alert": _r(rep.hours_below(rep.pf_alert)),
        "hours_below_penalty": _r(rep.hours_below(rep.pf_penalty)),
        "currency": rep.currency,
        "penalties": [
            {
                "name": p.name,
                "quantity": _r(p.quantity),
                "unit": p.unit,
                "cost": _r(p.cost),
                "how": p.note,
            }
            for p in rep.penalties
        ],
        "penalty_total": _r(rep.total_cost),
        "target_pf": rep.target_pf,
        "qc_needed_kvar": _r(rep.qc_worst_kvar),
        "qc_average_kvar": _r(rep.qc_average_kvar),
        "qc_installed_kvar": _r(rep.qc_installed_kvar),
        "qc_extra_kvar": _r(rep.qc_extra_kvar),
        "resonance_order": _r(rep.resonance_order),
        "harmonics": {str(h): _r(p) for h, p in sorted(rep.harmonics.items())},
        "banks": [
            {
                "name": b.name,
                "meter": b.meter,
                "billing_point": point.meter.meter,
                "installed_kvar": b.installed_kvar,
                "kvarh_supplied": _r(b.kvarh),
                "hours_state_known": _r(b.hours_known),
            }
            for point in rep.billing
            for b in point.banks
        ],
        "meters": [
            {
                "name": m.meter,
                "role": m.role,
                "parent": m.parent,
                "kwh": _r(m.kwh),
                "kwh_export": _r(m.kwh_export),
                "kvarh_ind": _r(m.kvarh_ind),
                "kvarh_cap": _r(m.kvarh_cap),
                "kvarh_bank": _r(m.kvarh_bank),
                "pf": _r(m.pf),
                "share": _r(m.share),
                "hours": _r(m.hours),
            }
            for m in rep.meters
        ],
        "unmetered": [
            {"parent": u.parent, "kwh": _r(u.kwh), "kvarh": _r(u.kvarh), "share": _r(u.share)}
            for u in rep.unmetered
        ],
        "warnings": rep.warnings,
        "notes": rep.notes,
    }


def render_json(rep: Report) -> str:
    return orjson.dumps(report_dict(rep), option=orjson.OPT_INDENT_2).decode() + "\n"


def render(rep: Report, fmt: str, worst: int = 5, chart_file: str | None = None) -> str:
    """The report in ``md``, ``html``, ``csv`` or ``json``."""
    if fmt == "csv":
        return render_csv(rep)
    if fmt == "html":
        return render_html(rep, worst)
    if fmt == "json":
        return render_json(rep)
    if fmt == "md":
        return render_markdown(rep, worst, chart_file)
    raise ConfigError(f"report format {fmt!r}: expected md, html, csv or json")


async def write_report(
    dsn: str, site: SiteConfig, start: datetime, end: datetime, out: Path
) -> Report:
    """Build the site's report from the database at ``dsn`` and write it as Markdown to
    ``out`` (with its chart beside it, ``<out>.pf.svg``)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rep = await build_report(conn, site, site.site, start, end)
    finally:
        await conn.close()
    chart = out.with_suffix(".pf.svg")
    text = render_markdown(rep, site.archiver.report.worst_meters, chart.name)
    await asyncio.to_thread(chart.write_text, pf_svg(rep), encoding="utf-8")
    await asyncio.to_thread(out.write_text, text, encoding="utf-8")
    return rep
