"""``pfmon analyze FILE``: the power-quality analysis of a scope/logger capture.

Input: CSV with a header row; columns ``v,i`` (one phase) or
``v1,v2,v3,i1,i2,i3`` (three phase, line to neutral), optional ``in`` (neutral
current) and ``t`` (seconds). The whole capture is analysed as one window over
a whole number of cycles of the tracked frequency (``dsp.analyze``): P = mean
of v·i, RMS = root of the mean square, harmonics from the DFT.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from services.analytics import alarms, dsp, neutral, quality
from shared.errors import ConfigError
from shared.site import SiteConfig
from shared.site.core import Thresholds

ONE_PHASE = ("v", "i")
THREE_PHASE = ("v1", "v2", "v3", "i1", "i2", "i3")


class CaptureError(ConfigError):
    """The file is not a valid capture; the message names the line and column."""


def read_capture(path: Path, fs: float | None) -> tuple[dict[str, np.ndarray], float]:
    """Columns as arrays and the sample rate. Raises :class:`CaptureError`."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise CaptureError(f"{path}: line 1: empty file (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CaptureError(f"{path}: line 1: not CSV: {exc}") from exc
        names = [h.strip().lower() for h in header]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CaptureError(f"{path}: line 1: column(s) {', '.join(dupes)} appear twice")
        three = all(c in names for c in THREE_PHASE)
        wanted = THREE_PHASE if three else ONE_PHASE
        missing = [c for c in wanted if c not in names]
        if missing:
            raise CaptureError(
                f"{path}: line 1: missing column(s) {', '.join(missing)} "
                f"(need v,i or v1,v2,v3,i1,i2,i3; optional in, t; got {','.join(names)})"
            )
        use = list(wanted) + [c for c in ("in", "t") if c in names]
        idx = {c: names.index(c) for c in use}
        cols: dict[str, list[float]] = {c: [] for c in use}
        lines: list[int] = []
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(names):
                    raise CaptureError(
                        f"{path}: line {line}: expected {len(names)} fields, got {len(row)}"
                    )
                for c, k in idx.items():
                    cell = row[k].strip()
                    try:
                        val = float(cell)
                    except ValueError:
                        raise CaptureError(
                            f"{path}: line {line}, column {k + 1} ({c}): {cell!r} is not a number"
                        ) from None
                    if not math.isfinite(val):
                        raise CaptureError(
                            f"{path}: line {line}, column {k + 1} ({c}): {cell!r} is not finite"
                        )
                    cols[c].append(val)
                lines.append(line)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CaptureError(f"{path}: line {reader.line_num}: not CSV: {exc}") from exc
    arrays = {c: np.asarray(v, dtype=np.float64) for c, v in cols.items()}
    n = len(arrays[wanted[0]])
    if fs is None:
        if "t" not in arrays:
            raise CaptureError(f"{path}: no sample rate: add a 't' column or pass --fs HZ")
        t = arrays["t"]
        if n < 2:
            raise CaptureError(f"{path}: {n} sample(s): fewer than one cycle")
        dt = np.diff(t)
        if np.any(dt <= 0):
            bad = int(np.argmax(dt <= 0))
            raise CaptureError(
                f"{path}: line {lines[bad + 1]}, column {idx['t'] + 1} (t): time does not increase"
            )
        step = (t[-1] - t[0]) / (n - 1)
        jitter = np.abs(dt - step).max() / step
        if jitter > 0.01:
            bad = int(np.argmax(np.abs(dt - step)))
            raise CaptureError(
                f"{path}: line {lines[bad + 1]}, column {idx['t'] + 1} (t): samples are not "
                f"equally spaced ({jitter:.1%} off the mean step {step:g} s)"
            )
        fs = 1.0 / step
    return arrays, fs


def analyze_capture(
    arrays: dict[str, np.ndarray],
    fs: float,
    f_nominal: float = 50.0,
    v_nominal: float = 230.0,
    source: str = "capture",
    site: SiteConfig | None = None,
) -> dict[str, Any]:
    """The capture's quantities and the alarm conditions present in it, judged with the
    limits of ``site`` (its thresholds and ``analytics.limits``; default: pfmon's
    defaults at ``v_nominal``)."""
    three = "v1" in arrays
    n = len(arrays["v1" if three else "v"])
    need = math.ceil(fs / f_nominal)
    if n < need:
        raise CaptureError(
            f"{source}: {n} samples at {fs:g} Hz are fewer than one cycle at "
            f"{f_nominal:g} Hz (need at least {need})"
        )
    if three:
        v = np.stack([arrays["v1"], arrays["v2"], arrays["v3"]])
        i = np.stack([arrays["i1"], arrays["i2"], arrays["i3"]])
    else:
        v, i = arrays["v"][None], arrays["i"][None]
    i_n = arrays.get("in") if three else None
    try:
        a = dsp.analyze(v, i, fs, f_nominal, i_n)
    except dsp.WaveformError as exc:
        raise CaptureError(f"{source}: {exc}") from exc
    tot = a.totals()
    phases = []
    for k in range(a.phases):
        phases.append(
            {
                "name": f"L{k + 1}",
                "vrms_v": float(a.vrms[0, k]),
                "irms_a": float(a.irms[0, k]),
                "p_w": float(a.p[0, k]),
                "s_va": float(a.s[0, k]),
                "q1_var": float(a.q1[0, k]),
                "n_var": float(a.n[0, k]),
                "pf": float(a.pf[0, k]),
                "dpf": float(a.dpf[0, k]),
                "thd_v_pct": float(a.thd_v[0, k]),
                "thd_i_pct": float(a.thd_i[0, k]),
                "quadrant": a.quadrant(0, k),
                "load": a.load(0, k).value,
                "harmonics_v": a.harm_v[0, k].tolist(),
                "harmonics_i": a.harm_i[0, k].tolist(),
            }
        )
    total: dict[str, float] = {
        "p_w": float(tot["p"][0]),
        "q1_var": float(tot["q1"][0]),
        "s_va": float(tot["s"][0]),
        "pf": float(tot["pf"][0]),
    }
    out: dict[str, Any] = {"frequency_hz": float(a.frequency[0]), "phases": phases}
    out["total"] = total
    score = u0 = 0.0
    if three:
        total["se_va"] = float(tot["se"][0])
        total["pf_e"] = float(tot["pf_e"][0])
        out["unbalance"] = {
            "u2_pct": float(tot["u2"][0]),
            "u0_pct": float(tot["u0"][0]),
            "nema_pct": float(tot["nema"][0]),
        }
        u0 = float(tot["u0"][0])
        size = float(np.abs(a.i1[0]).sum())
        ratio = float(abs(a.i1[0].sum())) / size if size > 0 else 0.0
        score = neutral.score(u0) * neutral.consistency(u0, ratio)
        out["neutral"] = {"score": score, "displacement_v": float(tot["v0"][0])}
    if site is None:
        hz = 60 if f_nominal == 60 else 50
        th = Thresholds(nominal_voltage_v=v_nominal, nominal_frequency_hz=hz)
        site = SiteConfig(site="capture", thresholds=th)
    inputs = _alarm_inputs(a, tot, three, score, u0, pf_extremes(v, i, fs, a))
    inputs.clip = quality.clipping(v, i, fs, a)
    inputs.freq = a.frequency[:1].copy()
    out["events"] = supply_events(v, fs, float(a.frequency[0]), site) + [
        {"code": d.code, "severity": d.severity.value, **({"phase": ph} if ph else {}),
         "evidence": evidence}
        for d, ph, evidence in alarms.present(inputs, alarms.Limits.of(site))
    ]  # fmt: skip
    return out


def supply_events(v: np.ndarray, fs: float, f: float, site: SiteConfig) -> list[dict[str, Any]]:
    """The dips, swells and interruptions in a capture (Urms(1/2)), in the order they
    started; times in seconds from the first sample. One still going at the end of the
    capture has ``duration_s`` null and ``ongoing`` true."""
    timings = alarms.timings(site)
    on = frozenset(c for c in quality.CODES if timings[c].enabled)
    bands = quality.Bands.of(site.thresholds.nominal_voltage_v, site.analytics.limits)
    tracker = quality.Excursions(bands, on)
    centres, u = quality.half_cycle_rms(v, fs, f)
    got = tracker.feed("capture", centres, u, 0.5 / f, "capture")
    found = [qe for state, qe in got if state == "raised"]
    out = []
    for qe in found:
        d = alarms.BY_CODE[qe.code]
        ev = qe.evidence()
        if qe.duration_s is None:
            ev["ongoing"] = True
        out.append(
            {"code": d.code, "severity": d.severity.value, "phase": qe.phase, "evidence": ev}
        )
    return out


def pf_extremes(v: np.ndarray, i: np.ndarray, fs: float, a: dsp.Analysis) -> tuple[float, float]:
    """Lowest and highest total |PF| cycle by cycle (what ``pf_erratic`` judges)."""
    per = fs / float(a.frequency[0])
    cycles = int(a.cycles[0])
    pfs = []
    for c in range(cycles):
        lo, hi = round(c * per), round((c + 1) * per)
        vv, ii = v[:, lo:hi], i[:, lo:hi]
        p = float((vv * ii).mean(axis=1).sum())
        s = float((np.sqrt((vv**2).mean(axis=1)) * np.sqrt((ii**2).mean(axis=1))).sum())
        if s > 0:
            pfs.append(abs(p) / s)
    if len(pfs) < 2:
        return math.nan, math.nan
    return min(pfs), max(pfs)


def _alarm_inputs(
    a: dsp.Analysis,
    tot: dict[str, np.ndarray],
    three: bool,
    score: float,
    u0: float,
    pf_range: tuple[float, float],
) -> alarms.Inputs:
    """The capture as the alarm table's one input: the whole window stands for the
    averages (no minimum durations: one window)."""
    nan3 = np.full((1, 3), math.nan)

    def ph(x: np.ndarray) -> np.ndarray:
        out = nan3.copy()
        out[0, : a.phases] = x[0, : a.phases]
        return out

    h = a.harm_v[0]
    fund = h[:, :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(fund > 0, h[:, 1:] / fund * 100.0, 0.0)
    worst = ph(rel.max(axis=1)[None])
    order = np.zeros((1, 3), dtype=np.int64)
    order[0, : a.phases] = rel.argmax(axis=1) + 2
    u2 = float(tot["u2"][0]) if three else math.nan
    return alarms.Inputs(
        p=np.array([float(tot["p"][0])]),
        s=np.array([float(tot["s"][0])]),
        pf_lo=np.array([pf_range[0]]),
        pf_hi=np.array([pf_range[1]]),
        v=ph(a.vrms),
        i=ph(a.irms),
        p_ph=ph(a.p),
        s_ph=ph(a.s),
        thd_v=ph(a.thd_v),
        thd_i=ph(a.thd_i),
        worst_pct=worst,
        worst_order=order,
        pf_meter=nan3.copy(),
        pf_calc=nan3.copy(),
        pf_pair=np.zeros((1, 3), dtype=bool),
        u2=np.array([u2]),
        nema=np.zeros(1, dtype=bool),
        score=np.array([score if three else math.nan]),
        u0=np.array([u0 if three else math.nan]),
        u2_avg=np.array([u2]),
        three=np.array([three]),
        export=np.zeros(1, dtype=bool),
        pf_tolerance=np.array([0.05]),
    )


#: the per-phase columns of the table: header, key of the result, format
_COLUMNS = (
    ("phase", "name", "{}"),
    ("Vrms V", "vrms_v", "{:.2f}"),
    ("Irms A", "irms_a", "{:.3f}"),
    ("P W", "p_w", "{:.1f}"),
    ("S VA", "s_va", "{:.1f}"),
    ("Q1 var", "q1_var", "{:.1f}"),
    ("N var", "n_var", "{:.1f}"),
    ("PF", "pf", "{:.4f}"),
    ("DPF", "dpf", "{:.4f}"),
    ("THDv %", "thd_v_pct", "{:.2f}"),
    ("THDi %", "thd_i_pct", "{:.2f}"),
    ("Q", "quadrant", "{}"),
    ("load", "load", "{}"),
)


def format_table(result: dict[str, Any]) -> Group:
    """The analysis for a person (rich): the frequency, a row per phase, then totals,
    unbalance, neutral and the alarm conditions met, one line each."""
    table = Table()
    for header, key, _ in _COLUMNS:
        table.add_column(header, justify="left" if key in ("name", "load") else "right")
    for ph in result["phases"]:
        table.add_row(*(fmt.format(ph[key]) for _, key, fmt in _COLUMNS))
    t = result["total"]
    line = (
        f"total: P {t['p_w']:.1f} W  Q1 {t['q1_var']:.1f} var  "
        f"S {t['s_va']:.1f} VA  PF {t['pf']:.4f}"
    )
    if "se_va" in t:
        line += f"  Se {t['se_va']:.1f} VA  PFe {t['pf_e']:.4f}"
    lines = [line]
    if "unbalance" in result:
        u = result["unbalance"]
        nt = result["neutral"]
        lines.append(
            f"unbalance: u2 {u['u2_pct']:.3f} %  u0 {u['u0_pct']:.3f} %  NEMA {u['nema_pct']:.3f} %"
        )
        lines.append(
            f"neutral: score {nt['score']:.2f}  "
            f"star-point displacement {nt['displacement_v']:.2f} V"
        )
    ev = result["events"]
    if ev:
        lines.append(
            "events: "
            + ", ".join(e["code"] + (f" ({e['phase']})" if "phase" in e else "") for e in ev)
        )
    else:
        lines.append("events: none")
    frequency = Text(f"frequency {result['frequency_hz']:.4f} Hz")
    return Group(frequency, table, *(Text(x) for x in lines))
