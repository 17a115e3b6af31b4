"""Every alarm pfmon raises, one definition each, and the state machine they share.

:data:`ALARMS` is the table: per alarm its code, severity, whether it is judged per
phase, default timings, the vectorised raise / clear / evaluable condition over
:class:`Inputs`, the evidence an event carries, and the words the docs show. The
engine (``batch.SiteEngine``), ``pfmon analyze``, the site file's defaults
(:func:`timings`), the Prometheus rules (``deploy/prometheus/alerts.yml``, checked
against :func:`critical_codes`) and the docs' alarm table (:func:`docs_table`) all read
it: a new alarm is one entry here and its tests. Most alarms are judged on each input
of one meter (scope ``meter``); ``energy_balance`` compares a parent meter with its
child meters (scope ``parent``: its condition, :func:`energy_balance`, is run by
``services/analytics/balance.py``).

Each alarm (one per meter, code and phase) is a small state machine driven by
two conditions evaluated on every input: ``bad`` (the raise condition, e.g.
PF < limit) and ``good`` (the clear condition, beyond the hysteresis band, e.g.
PF > limit + 0.02). ``bad`` must hold for ``raise_after_s`` before the alarm is
raised, ``good`` for ``clear_after_s`` before it clears; anything in between
(inside the band, or not evaluable: no load, missing value) resets the pending
timer. Time is the inputs' own timestamps, so replays and files behave the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from services.analytics.aggregate import F64, I64, Bools, RowState
from services.analytics.quality import Clipping
from shared.errors import ConfigError
from shared.messages import EventState, Severity
from shared.site import SiteConfig
from shared.site.analytics import AlarmLimits, AlarmTiming
from shared.site.core import Thresholds

Evidence = dict[str, float | str | bool | None]
PHASES = ("L1", "L2", "L3")


def ieee519_voltage_limits(bus_voltage_v: float) -> tuple[float, float]:
    """(individual harmonic %, THD %) for a bus voltage (line to line), IEEE 519-2014 T.1."""
    if bus_voltage_v <= 1_000:
        return 5.0, 8.0
    if bus_voltage_v <= 69_000:
        return 3.0, 5.0
    if bus_voltage_v <= 161_000:
        return 1.5, 2.5
    return 1.0, 1.5


@dataclass(slots=True)
class Alarm:
    """One alarm's state machine, one evaluation at a time: the definition that
    :class:`AlarmStates` (what the engine runs) is tested against."""

    code: str
    phase: str | None
    timing: AlarmTiming
    active: bool = False
    since: float | None = None  # when the pending condition started
    evidence: Evidence = field(default_factory=dict)

    def update(
        self, t: float, bad: bool | None, good: bool | None, ev: Callable[[], Evidence]
    ) -> EventState | None:
        """Feed one evaluation; returns RAISED/CLEARED on a transition.

        ``ev`` builds the evidence only when it is needed (a transition)."""
        if not self.timing.enabled:
            return None
        want = good if self.active else bad
        if not want:
            self.since = None
            return None
        if self.since is None:
            self.since = t
        hold = self.timing.clear_after_s if self.active else self.timing.raise_after_s
        if t - self.since < hold:
            return None
        self.since = None
        self.active = not self.active
        self.evidence = ev()
        return EventState.RAISED if self.active else EventState.CLEARED


class AlarmStates(RowState):
    """:class:`Alarm` for rows (meters) x alarm slots (code, phase), many meters at once.

    A slot that is not evaluated for a meter (``evaluable`` false: no load, a
    missing value) keeps its state, as :class:`Alarm` does when it is not fed.
    A slot whose raise condition never held is in the same state as an alarm
    never created (inactive, no pending timer), so every slot is simply updated
    wherever it is evaluable: the cost is a dozen array operations per call
    whatever the number of alarms pending or active, and only transitions (the
    returned mask) need scalar work (evidence, events).
    """

    def __init__(self, timings: Sequence[AlarmTiming], capacity: int = 1):
        slots = len(timings)
        self.enabled = np.array([t.enabled for t in timings])
        self.raise_after = np.array([t.raise_after_s for t in timings])
        self.clear_after = np.array([t.clear_after_s for t in timings])
        self.active = np.zeros((capacity, slots), dtype=bool)
        #: when the pending condition started (NaN: none pending)
        self.since = np.full((capacity, slots), np.nan)
        self._fresh = {"active": False, "since": np.nan}

    def update(self, rows: I64, t: F64, evaluable: Bools, bad: Bools, good: Bools) -> Bools:
        """Feed one evaluation per row and slot ((rows, slots) masks); returns the
        transitions (raised where the slot was inactive, cleared where active)."""
        fed = evaluable & self.enabled
        act = self.active[rows]
        since = self.since[rows]
        want = np.where(act, good, bad) & fed
        tt = t[:, None]
        since = np.where(want & np.isnan(since), tt, since)
        since = np.where(fed & ~want, np.nan, since)
        hold = np.where(act, self.clear_after, self.raise_after)
        fire: npt.NDArray[np.bool_] = want & (tt - since >= hold)
        if fire.any():
            since[fire] = np.nan
            self.active[rows] = act ^ fire
        self.since[rows] = since
        return fire


# -- what the conditions read ------------------------------------------------------------


@dataclass(slots=True)
class Inputs:
    """What the alarm conditions read, for ``n`` inputs (one per row); ``(n, 3)`` arrays
    hold L1, L2, L3. NaN means absent (that condition is not evaluated there)."""

    p: F64  #: total P, alarm-slot average (W)
    s: F64  #: total S, alarm-slot average (VA)
    pf_lo: F64  #: lowest |PF| in the ``pf_erratic`` window (NaN: not evaluated)
    pf_hi: F64  #: highest |PF| in that window
    v: F64  #: (n, 3) voltage of this input (V)
    i: F64  #: (n, 3) current of this input (A)
    p_ph: F64  #: (n, 3) P, alarm-slot average (W)
    s_ph: F64  #: (n, 3) S, alarm-slot average (VA)
    thd_v: F64  #: (n, 3) voltage THD, alarm-slot average (%)
    thd_i: F64  #: (n, 3) current THD, alarm-slot average (%)
    worst_pct: F64  #: (n, 3) worst individual voltage harmonic (% of the fundamental)
    worst_order: I64  #: (n, 3) its order
    pf_meter: F64  #: (n, 3) the meter's own PF register
    pf_calc: F64  #: (n, 3) |P|/S computed from the same input
    pf_pair: Bools  #: (n, 3) both of those exist
    u2: F64  #: voltage unbalance looked at: u2, or NEMA where there is no u2 (%)
    nema: Bools  #: the unbalance is NEMA's
    score: F64  #: broken-neutral score, alarm-slot average
    u0: F64  #: zero-sequence unbalance, alarm-slot average (%)
    u2_avg: F64  #: negative-sequence unbalance, alarm-slot average (%)
    three: Bools  #: a three-phase input (unbalance and neutral apply)
    export: Bools  #: the meter may export (no ``ct_reversed``)
    pf_tolerance: F64  #: the meter's ``pf_mismatch_tolerance``
    #: evidence only: the neutral score's current-sum fit, where it was applied
    fitted: Bools = field(default_factory=lambda: np.zeros(0, dtype=bool))
    score_fit: F64 = field(default_factory=lambda: np.zeros(0))
    current_ratio: F64 = field(default_factory=lambda: np.zeros(0))
    #: evidence only: the star-point shift of input ``r`` (built on a transition)
    neutral: Callable[[int], Evidence] = lambda r: {}
    #: frequency, alarm-slot average (Hz); empty: absent everywhere
    freq: F64 = field(default_factory=lambda: np.zeros(0))
    #: (n, 3) the 10-min mean voltage of an interval that closed with this input (NaN:
    #: none closed); empty: absent everywhere
    v10: F64 = field(default_factory=lambda: np.zeros(0))
    #: the meter's nominal voltage (V, line to neutral); empty: the site's
    v_nominal: F64 = field(default_factory=lambda: np.zeros(0))
    #: the meter's rated CT primary current (A), NaN: not configured
    ct_rating: F64 = field(default_factory=lambda: np.zeros(0))
    #: the meter's CT ratio (evidence: the secondary current)
    ct_ratio: F64 = field(default_factory=lambda: np.zeros(0))
    #: the current's shape per phase (waveforms); None: not known
    clip: Clipping | None = None

    def rows(self, a: F64) -> F64:
        """``a``, or NaN for each input where the field was not given."""
        return a if len(a) else np.full(len(self.p), np.nan)

    def phases(self, a: F64) -> F64:
        """``a``, or NaN for each input and phase where the field was not given."""
        return a if len(a) else np.full((len(self.p), 3), np.nan)

    def nominal(self, L: Limits) -> F64:
        """(n, 1) each input's nominal voltage."""
        un = self.rows(self.v_nominal)
        return np.where(np.isnan(un), L.th.nominal_voltage_v, un)[:, None]

    def shape(self) -> Clipping:
        return self.clip if self.clip is not None else Clipping.absent(len(self.p))


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits one site's alarms use, resolved from its file."""

    th: Thresholds
    lim: AlarmLimits
    #: IEEE 519-2014 for the bus voltage unless the site file sets its own
    thd_v: float
    harm_v: float

    @classmethod
    def of(cls, site: SiteConfig) -> Limits:
        th, lim = site.thresholds, site.analytics.limits
        indiv, thd = ieee519_voltage_limits(th.nominal_voltage_v * math.sqrt(3.0))
        return cls(th, lim, lim.thd_voltage_pct or thd, lim.harmonic_voltage_pct or indiv)


Condition = tuple[Bools, Bools, Bools]  # evaluable, bad (raise), good (clear)


@dataclass(frozen=True, slots=True)
class AlarmDef:
    """One alarm: what it is, when it raises and clears, what its event says."""

    code: str
    severity: Severity
    #: judged per phase (three slots: L1, L2, L3) or once per meter
    phased: bool
    timing: AlarmTiming
    raise_when: str
    clear_when: str
    evaluated_on: str
    condition: Callable[[Inputs, Limits], Condition]
    #: the values that decided input ``r`` (phase index ``k`` for phased alarms)
    evidence: Callable[[Inputs, Limits, int, int], Evidence]
    #: ``meter``: judged on each input of one meter by the engine (``condition`` over
    #: :class:`Inputs`); ``parent``: judged on a parent meter against its child meters
    #: (``services/analytics/balance.py``, with :func:`energy_balance` below)
    #: ``event``: a supply event with a start and a duration (dips, swells,
    #: interruptions), followed sample by sample by ``services/analytics/quality.py``
    scope: Literal["meter", "parent", "event"] = "meter"


def _r(x: float, digits: int = 3) -> float | None:
    return None if x != x else round(x, digits)


# -- the conditions ------------------------------------------------------------------------


def _pf_level(level: Callable[[Thresholds], float]) -> Callable[[Inputs, Limits], Condition]:
    def condition(x: Inputs, L: Limits) -> Condition:
        pf = np.abs(x.p) / x.s
        on = (x.s >= L.lim.min_apparent_power_va) & ~np.isnan(x.p)
        limit = level(L.th)
        return on, pf < limit, pf >= limit + L.lim.pf_hysteresis

    return condition


def _pf_evidence(level: Callable[[Thresholds], float]) -> Callable[..., Evidence]:
    def evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
        p, s = float(x.p[r]), float(x.s[r])
        return {"pf": round(abs(p) / s, 4), "p_w": round(p, 1), "s_va": round(s, 1),
                "limit": level(L.th)}  # fmt: skip

    return evidence


def _erratic(x: Inputs, L: Limits) -> Condition:
    spread = x.pf_hi - x.pf_lo
    return (
        ~np.isnan(spread),
        spread > L.lim.pf_erratic_spread,
        (spread < 0.5 * L.lim.pf_erratic_spread),
    )


def _erratic_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    lo, hi = float(x.pf_lo[r]), float(x.pf_hi[r])
    return {"spread": round(hi - lo, 4), "pf_min": round(lo, 4), "pf_max": round(hi, 4)}


def _voltage_missing(x: Inputs, L: Limits) -> Condition:
    missing = L.lim.voltage_missing_pct / 100.0 * L.th.nominal_voltage_v
    flowing = x.i > L.lim.min_current_a
    return (
        ~np.isnan(x.v) & ~np.isnan(x.i),
        (x.v < missing) & flowing,
        (x.v >= 2 * missing) | ~flowing,
    )


def _voltage_missing_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    return {"voltage_v": round(float(x.v[r, k]), 2), "current_a": round(float(x.i[r, k]), 3)}


def _ct_reversed(x: Inputs, L: Limits) -> Condition:
    return (
        ~x.export[:, None] & ~np.isnan(x.p_ph) & ~np.isnan(x.s_ph),
        x.p_ph < -np.maximum(L.lim.ct_reversed_w, 0.02 * x.s_ph),
        x.p_ph >= 0,
    )


def _ct_reversed_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    return {"p_w": round(float(x.p_ph[r, k]), 1), "s_va": round(float(x.s_ph[r, k]), 1)}


def _mismatch(x: Inputs, L: Limits) -> Condition:
    diff = np.abs(np.abs(x.pf_meter) - x.pf_calc)
    tol = x.pf_tolerance[:, None]
    return x.pf_pair, diff > tol, diff <= 0.5 * tol


def _mismatch_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    return {
        "pf_meter": float(x.pf_meter[r, k]),
        "pf_p_over_s": round(float(x.pf_calc[r, k]), 4),
        "tolerance": float(x.pf_tolerance[r]),
    }


def _thd(x: Inputs, L: Limits) -> Condition:
    def over(share: float) -> Bools:
        return (
            (x.thd_v > share * L.thd_v)
            | (x.thd_i > share * L.lim.thd_current_pct)
            | (x.worst_pct > share * L.harm_v)
        )

    return ~np.isnan(x.thd_v) | ~np.isnan(x.thd_i), over(1.0), ~over(0.9)


def _thd_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    return {
        "thd_v_pct": _r(float(x.thd_v[r, k])),
        "thd_i_pct": _r(float(x.thd_i[r, k])),
        "worst_v_order": int(x.worst_order[r, k]),
        "worst_v_pct": round(float(x.worst_pct[r, k]), 3),
        "limit_thd_v_pct": L.thd_v,
        "limit_harmonic_v_pct": L.harm_v,
        "limit_thd_i_pct": L.lim.thd_current_pct,
    }


def _unbalance(x: Inputs, L: Limits) -> Condition:
    limit = L.th.voltage_unbalance_pct
    return (
        x.three & ~np.isnan(x.u2),
        x.u2 > limit,
        x.u2 < limit - L.lim.unbalance_hysteresis_pct,
    )


def _unbalance_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    return {
        "unbalance_pct": round(float(x.u2[r]), 3),
        "measure": "nema" if x.nema[r] else "u2",
        "limit_pct": L.th.voltage_unbalance_pct,
    }


def _neutral(x: Inputs, L: Limits) -> Condition:
    return (
        x.three & ~np.isnan(x.score),
        x.score >= L.lim.neutral_raise_score,
        x.score < L.lim.neutral_clear_score,
    )


def _neutral_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    ev: Evidence = {
        "score": round(float(x.score[r]), 3),
        "u0_pct": _r(float(x.u0[r])),
        "u2_pct": _r(float(x.u2_avg[r])),
        **x.neutral(r),
    }
    if len(x.fitted) and x.fitted[r]:
        ev["current_sum_ratio"] = round(float(x.current_ratio[r]), 4)
        ev["floating_fit"] = round(float(x.score_fit[r]), 3)
    return ev


def energy_balance(parent_w: float, children_w: float, lim: AlarmLimits) -> tuple[bool, bool, bool]:
    """(evaluable, bad, good) of ``energy_balance`` for a parent's active power and the
    sum of its child meters' (W, signed): the children may not exceed the parent by
    more than the margin (% of |parent|); below the minimum parent power the balance
    is not judged (a near-idle parent would flap)."""
    ref = abs(parent_w)
    excess = children_w - parent_w
    return (
        ref >= lim.energy_balance_min_parent_w,
        excess > lim.energy_balance_margin_pct / 100.0 * ref,
        excess <= (lim.energy_balance_margin_pct - lim.energy_balance_hysteresis_pct) / 100.0 * ref,
    )


def _across_meters(x: Inputs, L: Limits) -> Condition:
    """A ``parent`` alarm is never judged on one meter's inputs (not evaluable)."""
    none = np.zeros(len(x.p), dtype=bool)
    return none, none, none


def _voltage_level(over: bool) -> Callable[[Inputs, Limits], Condition]:
    def condition(x: Inputs, L: Limits) -> Condition:
        v10 = x.phases(x.v10)
        un = x.nominal(L)
        pct = L.lim.overvoltage_pct if over else L.lim.undervoltage_pct
        inside = pct - L.lim.voltage_hysteresis_pct
        if over:
            return ~np.isnan(v10), v10 > un * (1 + pct / 100), v10 <= un * (1 + inside / 100)
        return ~np.isnan(v10), v10 < un * (1 - pct / 100), v10 >= un * (1 - inside / 100)

    return condition


def _voltage_level_evidence(over: bool) -> Callable[..., Evidence]:
    def evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
        v = float(x.phases(x.v10)[r, k])
        un = float(x.nominal(L)[r, 0])
        pct = L.lim.overvoltage_pct if over else L.lim.undervoltage_pct
        return {
            "mean_10min_v": _r(v, 2),
            "deviation_pct": _r(100.0 * (v - un) / un, 2),
            "nominal_v": un,
            "limit_v": round(un * (1 + (pct if over else -pct) / 100), 2),
            "hysteresis_pct": L.lim.voltage_hysteresis_pct,
        }

    return evidence


def _frequency(x: Inputs, L: Limits) -> Condition:
    fn = float(L.th.nominal_frequency_hz)
    dev = np.abs(x.rows(x.freq) - fn) / fn * 100.0
    lim = L.lim
    return (
        ~np.isnan(dev),
        dev > lim.frequency_pct,
        dev < lim.frequency_pct - (lim.frequency_hysteresis_pct),
    )


def _frequency_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    fn = float(L.th.nominal_frequency_hz)
    f = float(x.rows(x.freq)[r])
    dev = 100.0 * (f - fn) / fn
    lim = L.lim
    extreme = dev > lim.frequency_extreme_high_pct or dev < -lim.frequency_extreme_low_pct
    return {
        "frequency_hz": _r(f, 4),
        "deviation_pct": _r(dev, 3),
        "band": "extreme" if extreme else "normal",
        "limit_pct": lim.frequency_pct,
        "extreme_high_pct": lim.frequency_extreme_high_pct,
        "extreme_low_pct": lim.frequency_extreme_low_pct,
        "hysteresis_pct": lim.frequency_hysteresis_pct,
    }


def _ct_overload(x: Inputs, L: Limits) -> Condition:
    rating = x.rows(x.ct_rating)[:, None]
    lim = L.lim
    return (
        ~np.isnan(rating) & ~np.isnan(x.i),
        x.i > rating * lim.ct_overload_pct / 100.0,
        x.i <= rating * (lim.ct_overload_pct - lim.ct_overload_hysteresis_pct) / 100.0,
    )


def _ct_overload_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    i = float(x.i[r, k])
    rating = float(x.rows(x.ct_rating)[r])
    ratio = float(x.rows(x.ct_ratio)[r])
    return {
        "current_a": round(i, 3),
        "ct_primary_a": rating,
        "load_pct": round(100.0 * i / rating, 1),
        "ct_ratio": _r(ratio, 4),
        "secondary_a": _r(i / ratio, 4) if ratio == ratio and ratio > 0 else None,
        "limit_pct": L.lim.ct_overload_pct,
    }


def _ct_saturation(x: Inputs, L: Limits) -> Condition:
    c = x.shape()
    lim = L.lim

    def clipped(share: float) -> Bools:
        return (
            (c.crest_i < c.crest_v - share * lim.ct_crest_margin)
            & (c.flat_i > share * lim.ct_flat_share)
            & (c.h3_pct > share * lim.ct_third_harmonic_pct)
        )

    known = ~np.isnan(c.crest_i) & ~np.isnan(c.crest_v) & (c.irms > lim.min_current_a)
    return known, clipped(1.0), ~clipped(0.5)


def _ct_saturation_evidence(x: Inputs, L: Limits, r: int, k: int) -> Evidence:
    c = x.shape()
    return {
        "current_a": _r(float(c.irms[r, k])),
        "crest_factor_i": _r(float(c.crest_i[r, k])),
        "crest_factor_v": _r(float(c.crest_v[r, k])),
        "flat_top_share": _r(float(c.flat_i[r, k])),
        "h3_pct": _r(float(c.h3_pct[r, k]), 2),
        "h5_pct": _r(float(c.h5_pct[r, k]), 2),
    }


def _timing(raise_s: float, clear_s: float) -> AlarmTiming:
    return AlarmTiming(raise_after_s=raise_s, clear_after_s=clear_s)


W, C = Severity.WARNING, Severity.CRITICAL

#: every alarm, in the order a single input's events are listed
ALARMS: tuple[AlarmDef, ...] = (
    AlarmDef(
        "low_pf", W, False, _timing(60, 60),
        "\\|P\\|/S < `thresholds.pf_alert` (0.97)", "≥ limit + `pf_hysteresis`",
        "alarm-slot averages, S ≥ `min_apparent_power_va`",
        _pf_level(lambda th: th.pf_alert), _pf_evidence(lambda th: th.pf_alert),
    ),
    AlarmDef(
        "penalty_pf", W, False, _timing(60, 60),
        "\\|P\\|/S < `thresholds.pf_penalty` (0.90)", "≥ limit + `pf_hysteresis`", "same",
        _pf_level(lambda th: th.pf_penalty), _pf_evidence(lambda th: th.pf_penalty),
    ),
    AlarmDef(
        "pf_erratic", W, False, _timing(0, 60),
        "max − min \\|PF\\| over the buckets of the last `pf_erratic_window_s` > "
        "`pf_erratic_spread`", "< half of it",
        "each input (S ≥ `min_apparent_power_va`)",
        _erratic, _erratic_evidence,
    ),
    AlarmDef(
        "voltage_missing", C, True, _timing(5, 10),
        "V < `voltage_missing_pct` of nominal with I > `min_current_a`",
        "V ≥ 2× that, or no current", "each input",
        _voltage_missing, _voltage_missing_evidence,
    ),
    AlarmDef(
        "ct_reversed", C, True, _timing(10, 30),
        "P < −max(`ct_reversed_w`, 2 % S)", "P ≥ 0",
        "averages; never on meters that may export (`expect_export`, role `generation`)",
        _ct_reversed, _ct_reversed_evidence,
    ),
    AlarmDef(
        "meter_pf_mismatch", W, True, _timing(30, 60),
        "\\|meter PF − \\|P\\|/S\\| > `pf_mismatch_tolerance`", "≤ half of it",
        "each reading",
        _mismatch, _mismatch_evidence,
    ),
    AlarmDef(
        "thd_limit", W, True, _timing(60, 60),
        "THD_V or an individual V harmonic above IEEE 519-2014 for the bus voltage "
        "(√3 × nominal; ≤ 1 kV: 5 % / 8 %), or THD_I > `thd_current_pct`",
        "all below 90 % of limits", "averages (+ harmonics of the window)",
        _thd, _thd_evidence,
    ),
    AlarmDef(
        "unbalance", W, False, _timing(60, 60),
        "u2 (NEMA where no line-to-line data) > `thresholds.voltage_unbalance_pct` (2 %)",
        "< limit − `unbalance_hysteresis_pct`", "averages",
        _unbalance, _unbalance_evidence,
    ),
    AlarmDef(
        "broken_neutral", C, False, _timing(5, 30),
        "score ≥ `neutral_raise_score`", "< `neutral_clear_score`", "averages",
        _neutral, _neutral_evidence,
    ),
    AlarmDef(
        "energy_balance", W, False, _timing(60, 60),
        "a parent's child meters add up to more than the parent + "
        "`energy_balance_margin_pct` (5) % of \\|parent P\\|",
        "excess < margin − `energy_balance_hysteresis_pct`",
        "on the parent: the mean P of the last `alarm_slot_s` of it and of every child, "
        "\\|parent P\\| ≥ `energy_balance_min_parent_w`",
        _across_meters, lambda x, L, r, k: {}, scope="parent",
    ),
    AlarmDef(
        "voltage_dip", W, True, _timing(0, 0),
        "Urms(1/2) (waveforms) or a reading's phase voltage (brown-out) < `dip_pct` (90) "
        "% of nominal",
        "≥ `dip_pct` + `quality_hysteresis_pct` (2) %",
        "each half cycle of a waveform, each reading; the cleared event carries start, "
        "duration, residual voltage and the resolution",
        _across_meters, lambda x, L, r, k: {}, scope="event",
    ),
    AlarmDef(
        "voltage_swell", W, True, _timing(0, 0),
        "as `voltage_dip`, > `swell_pct` (110) % of nominal",
        "≤ `swell_pct` − `quality_hysteresis_pct`", "same; with the peak voltage",
        _across_meters, lambda x, L, r, k: {}, scope="event",
    ),
    AlarmDef(
        "interruption", C, True, _timing(0, 0),
        "as `voltage_dip`, < `interruption_pct` (5) % of nominal (black-out from readings)",
        "≥ `interruption_pct` + `quality_hysteresis_pct`", "same",
        _across_meters, lambda x, L, r, k: {}, scope="event",
    ),
    AlarmDef(
        "overvoltage", W, True, _timing(0, 0),
        "10-min mean voltage > nominal + `overvoltage_pct` (10) % (EN 50160)",
        "≤ nominal + (`overvoltage_pct` − `voltage_hysteresis_pct`) %",
        "each closed 10-min interval",
        _voltage_level(True), _voltage_level_evidence(True),
    ),
    AlarmDef(
        "undervoltage", W, True, _timing(0, 0),
        "10-min mean voltage < nominal − `undervoltage_pct` (10) % (EN 50160)",
        "≥ nominal − (`undervoltage_pct` − `voltage_hysteresis_pct`) %", "same",
        _voltage_level(False), _voltage_level_evidence(False),
    ),
    AlarmDef(
        "frequency_deviation", W, False, _timing(10, 10),
        "\\|f − nominal\\| > `frequency_pct` (1) %; evidence `band` says `extreme` beyond "
        "+`frequency_extreme_high_pct` (4) / −`frequency_extreme_low_pct` (6) % (EN 50160)",
        "< `frequency_pct` − `frequency_hysteresis_pct`", "alarm-slot averages",
        _frequency, _frequency_evidence,
    ),
    AlarmDef(
        "ct_overload", W, True, _timing(10, 30),
        "I > `ct_overload_pct` (100) % of the meter's `ct_primary_a`",
        "≤ (`ct_overload_pct` − `ct_overload_hysteresis_pct`) % of it",
        "each input of a meter with `ct_primary_a` (evidence: the secondary current by "
        "`ct_ratio`)",
        _ct_overload, _ct_overload_evidence,
    ),
    AlarmDef(
        "ct_saturation", C, True, _timing(0, 10),
        "the current clips: crest factor < the voltage's − `ct_crest_margin`, > "
        "`ct_flat_share` of samples on the flat top, 3rd harmonic > "
        "`ct_third_harmonic_pct` (a 6-pulse drive's current has none)",
        "not so at half those margins", "waveforms, I > `min_current_a`",
        _ct_saturation, _ct_saturation_evidence,
    ),
)  # fmt: skip

BY_CODE: dict[str, AlarmDef] = {d.code: d for d in ALARMS}
if len(BY_CODE) != len(ALARMS):  # pragma: no cover - a definition error
    raise RuntimeError("two alarms share a code")

#: the alarms the engine judges on each input of a meter
PER_METER: tuple[AlarmDef, ...] = tuple(d for d in ALARMS if d.scope == "meter")

#: the engine's state-machine slots: (alarm, phase index or -1), phased alarms L1, L2, L3
SLOTS: tuple[tuple[AlarmDef, int], ...] = tuple(
    (d, k) for d in PER_METER for k in (range(3) if d.phased else (-1,))
)


def critical_codes() -> list[str]:
    return [d.code for d in ALARMS if d.severity == Severity.CRITICAL]


def timings(site: SiteConfig) -> dict[str, AlarmTiming]:
    """Each alarm's timing: the table's default, with what the site file sets over it
    (field by field). Raises :class:`ConfigError` naming an unknown code."""
    over = site.analytics.alarms
    unknown = sorted(set(over) - set(BY_CODE))
    if unknown:
        raise ConfigError(
            f"analytics.alarms.{unknown[0]}: no alarm named {unknown[0]!r} "
            f"(alarms: {', '.join(BY_CODE)})",
            [f"analytics.alarms.{c}: no alarm named {c!r}" for c in unknown],
        )
    out = {}
    for d in ALARMS:
        mine = over.get(d.code)
        if mine is None:
            out[d.code] = d.timing
        else:
            out[d.code] = d.timing.model_copy(update=mine.model_dump(include=mine.model_fields_set))
    return out


def evaluate(x: Inputs, L: Limits, n: int) -> tuple[Bools, Bools, Bools]:
    """Every slot's (evaluable, bad, good) as ``(n, len(SLOTS))`` masks."""
    ev = np.zeros((n, len(SLOTS)), dtype=bool)
    bad = np.zeros_like(ev)
    good = np.zeros_like(ev)
    col = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for d in PER_METER:
            e, b, g = d.condition(x, L)
            width = 3 if d.phased else 1
            cols = slice(col, col + width)
            ev[:, cols] = e.reshape(n, width)
            bad[:, cols] = b.reshape(n, width)
            good[:, cols] = g.reshape(n, width)
            col += width
    return ev, bad, good


def present(x: Inputs, L: Limits) -> list[tuple[AlarmDef, str | None, Evidence]]:
    """The alarms whose raise condition holds for input 0 (no minimum durations): what
    ``pfmon analyze`` reports for one capture."""
    ev, bad, _ = evaluate(x, L, 1)
    out: list[tuple[AlarmDef, str | None, Evidence]] = []
    for j, (d, k) in enumerate(SLOTS):
        if ev[0, j] and bad[0, j]:
            out.append((d, PHASES[k] if k >= 0 else None, d.evidence(x, L, 0, max(k, 0))))
    return out


def docs_table() -> str:
    """The alarm table of docs/analytics.md, rendered from :data:`ALARMS`."""
    rows = [
        "| code | severity | raise when | clear when | evaluated on | raise / clear after |",
        "|---|---|---|---|---|---|",
    ]
    for d in ALARMS:
        name = f"`{d.code}` (phase)" if d.phased else f"`{d.code}`"
        t = d.timing
        rows.append(
            f"| {name} | {d.severity.value} | {d.raise_when} | {d.clear_when} | "
            f"{d.evaluated_on} | {t.raise_after_s:g} s / {t.clear_after_s:g} s |"
        )
    return "\n".join(rows)
