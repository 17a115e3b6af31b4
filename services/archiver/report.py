"""``pfmon report``: what the power factor cost over a period, and the capacitor that fixes it.

Everything is computed from ``pfm_metrics`` energy deltas (Wh, varh per IEC quadrant,
VAh), aggregated in SQL per meter and per 15-minute window (the billing demand
interval). Conventions:

* inductive reactive energy = quadrants I + III, capacitive = II + IV; reactive energy
  of meters that give no lead/lag counts as inductive unless the tariff says ``ignore``;
* billing PF = kWh / sqrt(kWh^2 + kvarh^2) with kvarh = inductive - capacitive
  (what utility meters bill); true PF = kWh / kVAh is shown too;
* demand = energy of a 15-minute window x 4; kVA demand = sqrt(kW^2 + kvar^2).

The fix: Qc = P * (tan phi1 - tan phi2) for the target PF, sized on the worst window
(and shown on the period average); with the short-circuit power Ssc configured, the
parallel resonance order h = sqrt(Ssc / Qc) is checked against harmonics present.
"""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg
import orjson

from services.archiver.columns import BUCKET_ORIGIN
from shared.site import SiteConfig

WINDOW = timedelta(minutes=15)
#: 6-pulse rectifiers, VFDs, UPS: what to assume when THD is high but no spectrum is stored
CHARACTERISTIC_ORDERS = (5, 7, 11, 13)


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

    @property
    def pf(self) -> float | None:
        return billing_pf(self.kwh, self.kvarh_ind - self.kvarh_cap)


@dataclass
class Window:
    start: datetime
    kwh: float
    kvarh_ind: float
    kvarh_cap: float
    kvah: float
    #: hours of data in the window (the best-covered meter's), at most 0.25
    hours: float = 0.25

    @property
    def kvarh_net(self) -> float:
        return self.kvarh_ind - self.kvarh_cap

    @property
    def kw(self) -> float:
        return self.kwh * 4

    @property
    def kvar(self) -> float:
        return self.kvarh_net * 4

    @property
    def kva(self) -> float:
        return math.hypot(self.kw, self.kvar)

    @property
    def pf(self) -> float | None:
        return billing_pf(self.kwh, self.kvarh_net)


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
    meters: list[MeterSummary]
    windows: list[Window]
    penalties: list[Penalty] = field(default_factory=list)
    qc_worst_kvar: float = 0.0
    qc_average_kvar: float = 0.0
    resonance_order: float | None = None
    harmonics: dict[int, float] = field(default_factory=dict)
    harmonics_source: str = ""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: site PF over the period for the chart: (bucket start, PF), ``chart_step`` wide
    chart: list[tuple[datetime, float]] = field(default_factory=list)
    chart_step: timedelta = WINDOW

    # -- site totals --------------------------------------------------------------------
    @property
    def kwh(self) -> float:
        return sum(m.kwh for m in self.meters)

    @property
    def kvarh_ind(self) -> float:
        return sum(m.kvarh_ind for m in self.meters)

    @property
    def kvarh_cap(self) -> float:
        return sum(m.kvarh_cap for m in self.meters)

    @property
    def kvah(self) -> float:
        return sum(m.kvah for m in self.meters)

    @property
    def pf(self) -> float | None:
        return billing_pf(self.kwh, self.kvarh_ind - self.kvarh_cap)

    @property
    def true_pf(self) -> float | None:
        return self.kwh / self.kvah if self.kvah > 0 else None

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


# -- data -------------------------------------------------------------------------------


def _q(unsigned_as_inductive: bool) -> tuple[str, str]:
    ind = "coalesce(delta_q1_varh, 0) + coalesce(delta_q3_varh, 0)"
    if unsigned_as_inductive:
        ind += " + coalesce(delta_unsigned_varh, 0)"
    cap = "coalesce(delta_q2_varh, 0) + coalesce(delta_q4_varh, 0)"
    return ind, cap


async def build_report(
    conn: asyncpg.Connection, site: SiteConfig, site_name: str, start: datetime, end: datetime
) -> Report:
    cfg = site.archiver.report
    tariff = cfg.tariff
    th = site.thresholds
    if end <= start:
        from shared.errors import ConfigError

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
            coalesce(sum(least(coalesce(energy_s, 0), $4)), 0) / 3600 AS hours,
            coalesce(sum(least(coalesce(energy_s, 0), $4)) FILTER (WHERE {pf_expr} < $5), 0) / 3600
                AS below_alert,
            coalesce(sum(least(coalesce(energy_s, 0), $4)) FILTER (WHERE {pf_expr} < $6), 0) / 3600
                AS below_penalty
        FROM pfm_metrics WHERE site = $1 AND ts >= $2 AND ts < $3
        GROUP BY meter ORDER BY meter
        """,
        site_name,
        start,
        end,
        cfg.max_gap_s,
        th.pf_alert,
        th.pf_penalty,
    )
    meters = [
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
        )
        for r in rows
    ]
    wrows = await conn.fetch(
        f"""
        SELECT w, sum(kwh) AS kwh, sum(kvarh_ind) AS kvarh_ind, sum(kvarh_cap) AS kvarh_cap,
            sum(kvah) AS kvah, least(max(covered), 900) / 3600 AS hours
        FROM (
            SELECT date_bin(INTERVAL '15 minutes', ts, TIMESTAMPTZ '{BUCKET_ORIGIN}') AS w,
                coalesce(sum(delta_import_wh), 0) / 1000 AS kwh,
                coalesce(sum({ind}), 0) / 1000 AS kvarh_ind,
                coalesce(sum({cap}), 0) / 1000 AS kvarh_cap,
                coalesce(sum(delta_apparent_vah), 0) / 1000 AS kvah,
                coalesce(sum(least(coalesce(energy_s, 0), $4)), 0) AS covered
            FROM pfm_metrics WHERE site = $1 AND ts >= $2 AND ts < $3
            GROUP BY 1, meter
        ) per_meter
        GROUP BY w ORDER BY w
        """,
        site_name,
        start,
        end,
        cfg.max_gap_s,
    )
    windows = [
        Window(r["w"], r["kwh"], r["kvarh_ind"], r["kvarh_cap"], r["kvah"], r["hours"])
        for r in wrows
    ]
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
        windows,
    )
    if not meters:
        rep.warnings.append(f"no metrics for site {site_name!r} between {start} and {end}")
        return rep
    if any(m.kvarh_unsigned > 0 for m in meters):
        share = sum(m.kvarh_unsigned for m in meters)
        how = "counted as inductive" if tariff.unsigned_reactive == "inductive" else "ignored"
        rep.notes.append(
            f"{share:.2f} kvarh came from meters that give no lead/lag (magnitude only): {how}"
        )
    await _chart(conn, rep, ind, cap)
    _penalties(rep, site)
    _fix(rep, site)
    await _harmonics(conn, rep, site, site_name, start, end)
    _resonance(rep, site)
    return rep


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
    rows = await conn.fetch(
        f"""
        SELECT date_bin($4, ts, TIMESTAMPTZ '{BUCKET_ORIGIN}') AS b,
            sum(delta_import_wh) AS wh, sum({ind}) - sum({cap}) AS varh
        FROM pfm_metrics WHERE site = $1 AND ts >= $2 AND ts < $3
        GROUP BY 1 ORDER BY 1
        """,
        rep.site,
        rep.start,
        rep.end,
        step,
    )
    rep.chart_step = step
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


def _fix(rep: Report, site: SiteConfig) -> None:
    tan2 = tan_of(rep.target_pf)
    worst = 0.0
    for w in rep.windows:
        if w.kw > 0:
            worst = max(worst, w.kw * (w.kvar / w.kw - tan2))
    rep.qc_worst_kvar = worst
    hours = (rep.end - rep.start).total_seconds() / 3600
    covered = sum(w.hours for w in rep.windows) or hours
    p_avg = rep.kwh / covered if covered else 0.0
    if rep.kwh > 0:
        tan1 = (rep.kvarh_ind - rep.kvarh_cap) / rep.kwh
        rep.qc_average_kvar = max(0.0, p_avg * (tan1 - tan2))


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
    if rep.qc_worst_kvar <= 0:
        return
    if cfg.short_circuit_mva is None:
        rep.notes.append(
            "short-circuit power not configured (archiver.report.short_circuit_mva): "
            "resonance with the capacitor bank not checked"
        )
        return
    order = math.sqrt(cfg.short_circuit_mva * 1000 / rep.qc_worst_kvar)
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


def pf_svg(rep: Report, width: int = 720, height: int = 240) -> str:
    """Site PF over the period (adaptive resolution), with the alert and penalty lines."""
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
        f"<title>Power factor, {html.escape(rep.site)}, per"
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
    out.append(f'<text x="{pad_l}" y="{height - 8}">{rep.start:%Y-%m-%d %H:%M}</text>')
    out.append(
        f'<text x="{width - pad_r}" y="{height - 8}" text-anchor="end">'
        f"{rep.end:%Y-%m-%d %H:%M} UTC</text>"
    )
    if pts:
        half = rep.chart_step / 2
        poly = " ".join(f"{x(min(t + half, rep.end)):.1f},{y(pf):.1f}" for t, pf in pts)
        out.append(f'<polyline fill="none" stroke="#0072b2" stroke-width="1.5" points="{poly}"/>')
    out.append("</svg>")
    return "\n".join(out)


def _summary_rows(rep: Report) -> list[tuple[str, str]]:
    peak = rep.peak
    return [
        ("Active energy imported", f"{rep.kwh:.2f} kWh"),
        ("Reactive energy, inductive", f"{rep.kvarh_ind:.2f} kvarh"),
        ("Reactive energy, capacitive", f"{rep.kvarh_cap:.2f} kvarh"),
        ("Apparent energy", f"{rep.kvah:.2f} kVAh"),
        ("Average PF (billing, kWh/kvarh)", _f(rep.pf)),
        ("Average true PF (kWh/kVAh)", _f(rep.true_pf)),
        ("PF at the 15-min kW peak", _f(peak.pf if peak else None)),
        ("Lowest 15-min demand PF", _f(rep.min_window_pf)),
        ("Peak 15-min demand", f"{peak.kw:.2f} kW / {peak.kva:.2f} kVA" if peak else "n/a"),
        (f"Hours below alert PF {rep.pf_alert:g}", f"{rep.hours_below(rep.pf_alert):.2f} h"),
        (f"Hours below penalty PF {rep.pf_penalty:g}", f"{rep.hours_below(rep.pf_penalty):.2f} h"),
    ]


def _worst(rep: Report, n: int) -> list[MeterSummary]:
    return sorted(rep.meters, key=lambda m: m.pf if m.pf is not None else 2.0)[:n]


def _fix_lines(rep: Report) -> list[str]:
    lines = []
    if rep.qc_worst_kvar <= 0:
        lines.append(
            f"No correction needed: every 15-min window is at or above PF {rep.target_pf:g}."
        )
    else:
        lines.append(
            f"Capacitor bank to reach PF {rep.target_pf:g}: **{rep.qc_worst_kvar:.1f} kvar** "
            f"(Qc = P x (tan phi1 - tan phi2) on the worst 15-min window; "
            f"{rep.qc_average_kvar:.1f} kvar on the period average)."
        )
    if rep.resonance_order is not None:
        lines.append(
            "Parallel resonance order with that bank: "
            f"h = sqrt(Ssc/Qc) = {rep.resonance_order:.2f}."
        )
    if rep.harmonics:
        orders = ", ".join(f"{h} ({p:.1f} %)" for h, p in sorted(rep.harmonics.items()))
        lines.append(f"Current harmonics present: {orders} - {rep.harmonics_source}.")
    return lines


def render_markdown(rep: Report, worst: int = 5, chart_file: str | None = None) -> str:
    out = [
        f"# Power-factor report - {rep.site}",
        "",
        f"Period: {rep.start:%Y-%m-%d %H:%M} to {rep.end:%Y-%m-%d %H:%M} UTC",
        "",
    ]
    for w in rep.warnings:
        out.append(f"> **Warning:** {w}")
        out.append("")
    if chart_file:
        step = f"{rep.chart_step.total_seconds() / 60:g} min"
        out += [f"![site PF per {step}]({chart_file})", ""]
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
    out += [
        "",
        "## Worst meters",
        "",
        "| meter | kWh | kvarh ind | kvarh cap | PF | h < alert | h < penalty |",
    ]
    out.append("|---|---|---|---|---|---|---|")
    for m in _worst(rep, worst):
        out.append(
            f"| {m.meter} | {m.kwh:.2f} | {m.kvarh_ind:.2f} | {m.kvarh_cap:.2f} | {_f(m.pf)} "
            f"| {m.hours_below_alert:.2f} | {m.hours_below_penalty:.2f} |"
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
        f"<p>Period: {rep.start:%Y-%m-%d %H:%M} to {rep.end:%Y-%m-%d %H:%M} UTC</p>",
    ]
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
    parts.append("</table><h2>Worst meters</h2><table><tr><th>meter</th><th>kWh</th>")
    parts.append("<th>kvarh ind</th><th>kvarh cap</th><th>PF</th><th>h &lt; alert</th>")
    parts.append("<th>h &lt; penalty</th></tr>")
    for m in _worst(rep, worst):
        parts.append(
            f"<tr><td>{e(m.meter)}</td><td>{m.kwh:.2f}</td><td>{m.kvarh_ind:.2f}</td>"
            f"<td>{m.kvarh_cap:.2f}</td><td>{_f(m.pf)}</td><td>{m.hours_below_alert:.2f}</td>"
            f"<td>{m.hours_below_penalty:.2f}</td></tr>"
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
    """One row per 15-minute window (the billing series)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["window_start", "kwh", "kvarh_ind", "kvarh_cap", "kvah", "kw", "kvar", "kva", "pf"])
    for x in rep.windows:
        w.writerow(
            [
                x.start.isoformat(),
                f"{x.kwh:.6f}",
                f"{x.kvarh_ind:.6f}",
                f"{x.kvarh_cap:.6f}",
                f"{x.kvah:.6f}",
                f"{x.kw:.6f}",
                f"{x.kvar:.6f}",
                f"{x.kva:.6f}",
                "" if x.pf is None else f"{x.pf:.6f}",
            ]
        )
    return buf.getvalue()
