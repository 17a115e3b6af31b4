"""One meter's analytics state: derive, average, aggregate, alarm.

:class:`MeterEngine` takes a register-level :class:`Reading` or a
:class:`Waveform` and returns the :class:`Metrics` and :class:`Event` messages
to publish. It holds only fixed-size state (rings, deques with a bound), so
memory per meter does not grow with run time. No I/O here: the service wires it
to the bus, the ``analyze`` command and the benchmark use it directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import orjson

from services.analytics import dsp, neutral, registers
from services.analytics.aggregate import (
    BlockAggregate,
    DemandWindow,
    MovingAverages,
    WindowExtremes,
)
from services.analytics.alarms import AlarmSet, Evidence, ieee519_voltage_limits
from shared.measurements import Measurement as M
from shared.messages import Event, EventState, LoadKind, Metrics, Reading, Severity, Waveform
from shared.site import SiteConfig
from shared.site.core import MeterConfig

SERVICE = "analytics"
_NOT_AVERAGED = {M.DEMAND_POWER, M.DEMAND_APPARENT_POWER, M.DEMAND_PF}
#: every quantity that is averaged (energy counters and demand values never are)
AVG_COLS: tuple[M, ...] = tuple(m for m in M if not m.is_counter and m not in _NOT_AVERAGED)
COL = {m: k for k, m in enumerate(AVG_COLS)}
_RMS_STEMS = ("voltage", "current", "thd_")
RMS_MASK = np.array([m.value.startswith(_RMS_STEMS) for m in AVG_COLS])
_CRITICAL = {"broken_neutral", "voltage_missing", "ct_reversed"}
_PH = ("L1", "L2", "L3")
_NAN = math.nan
_STEMS = ("voltage", "current", "power", "apparent_power", "thd_voltage", "thd_current")
_PHASE_KEYS = tuple(tuple(M.per_phase(stem, n) for stem in _STEMS) for n in (1, 2, 3))


@dataclass(slots=True)
class MetricsOut:
    """A :class:`Metrics` built by the engine (no validation: we made it). Same fields;
    :meth:`model` gives the validated pydantic model, ``encode_metrics`` the JSON."""

    site: str
    ts: datetime
    seq: int
    meter: str
    source: Literal["reading", "waveform"]
    interval_s: float
    values: dict[M, float]
    averages: dict[str, dict[M, float]]
    load: dict[str, LoadKind]
    quadrant: dict[str, Literal[1, 2, 3, 4]]
    harmonics: dict[str, list[float]]
    source_seq: int | None
    aggregate: bool = False

    def model(self) -> Metrics:
        return Metrics.model_validate_json(encode_metrics(self))


@dataclass(slots=True)
class Output:
    metrics: list[MetricsOut] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class MeterEngine:
    def __init__(self, site: SiteConfig, meter: str):
        self.site = site.site
        self.meter = meter
        cfg = site.analytics
        self.cfg = cfg
        self.limits = cfg.limits
        self.thresholds = site.thresholds
        try:
            mc: MeterConfig | None = site.meter(meter)
        except KeyError:
            mc = None
        opts = cfg.meter(meter)
        self.expect_export = bool(mc and mc.expect_export)
        wiring_delta = bool(mc and mc.wiring == "delta")
        self.sqrt3 = opts.sqrt3_correction if opts.sqrt3_correction is not None else wiring_delta
        self.pf_tolerance = opts.pf_mismatch_tolerance
        self.three_phase_opt = opts.three_phase
        self.slots = cfg.average_slots_s
        self.slot_names = [f"{s}s" for s in self.slots]
        self.alarm_row = self.slots.index(cfg.alarm_slot_s)
        #: the averaged quantities this meter reports (grows when a new one appears)
        self.keys: list[M] = []
        self.key_index: dict[M, int] = {}
        self.known: set[M] = set()
        self.rms_mask = np.zeros(0, dtype=bool)
        self.ma = MovingAverages(self.slots, 0)
        self.blocks: list[BlockAggregate] = []
        self.demand = DemandWindow(cfg.demand_window_s)
        self.pf_window = WindowExtremes(self.limits.pf_erratic_window_s)
        self.alarms = AlarmSet({str(k): v for k, v in cfg.alarms.items()})
        # seq of the messages this engine publishes: contiguous within a run (gaps
        # stay visible) and seeded from the start time, so that a restarted
        # service never reuses a seq the archiver already holds
        self.seq = self.event_seq = seq_seed()
        self.last_source_seq: int | None = None
        bus_v = self.thresholds.nominal_voltage_v * math.sqrt(3.0)
        indiv, thd = ieee519_voltage_limits(bus_v)
        self.harm_v_limit = self.limits.harmonic_voltage_pct or indiv
        self.thd_v_limit = self.limits.thd_voltage_pct or thd

    # -- inputs ------------------------------------------------------------------

    def on_reading(self, reading: Reading) -> Output:
        d = registers.derive(
            reading.values, sqrt3=self.sqrt3, neutral_u0_pct=self.limits.neutral_u0_low_pct
        )
        evidence: Evidence = {}
        if d.star is not None:
            evidence = {
                "displacement_v": round(d.star.displacement_v, 3),
                "line_v": round(d.star.line_v, 3),
                "angle_sum_deg": round(sum(d.star.angles_deg), 3),
                "consistent": d.star.consistent,
            }
        return self._process(
            reading.ts,
            reading.seq,
            "reading",
            d.values,
            d.load,
            d.quadrant,
            {},
            d.pf_pairs,
            evidence,
            current_ratio=d.current_ratio,
        )

    def on_waveform(self, wf: Waveform) -> Output:
        a = analyze_waveform(wf)
        values = dsp.window_values(a)
        load = {_PH[k]: a.load(0, k) for k in range(a.phases)}
        quad = {_PH[k]: a.quadrant(0, k) for k in range(a.phases)}
        load["total"] = a.load(0)
        quad["total"] = a.quadrant(0)
        harmonics: dict[str, list[float]] = {}
        for k in range(a.phases):
            harmonics[f"v{k + 1}"] = a.harm_v[0, k].tolist()
            harmonics[f"i{k + 1}"] = a.harm_i[0, k].tolist()
        evidence: Evidence = {}
        ratio = None
        if a.phases == 3:
            tot = a.totals()
            evidence = {"displacement_v": round(float(tot["v0"][0]), 3)}
            size = float(np.abs(a.i1[0]).sum())
            ratio = float(abs(a.i1[0].sum())) / size if size > 0 else None
        worst = _worst_harmonics(a)
        return self._process(
            wf.ts,
            wf.seq,
            "waveform",
            values,
            load,
            quad,
            harmonics,
            {},
            evidence,
            worst,
            current_ratio=ratio,
        )

    # -- common path -----------------------------------------------------------------

    def _process(
        self,
        ts: datetime,
        source_seq: int,
        source: Literal["reading", "waveform"],
        values: dict[M, float],
        load: dict[str, LoadKind],
        quad: dict[str, Literal[1, 2, 3, 4]],
        harmonics: dict[str, list[float]],
        pf_pairs: dict[str, tuple[float, float]],
        neutral_ev: Evidence,
        worst_harm: dict[str, tuple[int, float]] | None = None,
        current_ratio: float | None = None,
    ) -> Output:
        out = Output()
        t = ts.timestamp()
        u0 = values.get(M.ZERO_SEQ_UNBALANCE)
        three = self.three_phase_opt
        if three is None:
            three = M.VOLTAGE_L3 in values and M.VOLTAGE_L2 in values
        if three and u0 is not None:
            score = neutral.score(
                u0, self.limits.neutral_u0_low_pct, self.limits.neutral_u0_high_pct
            )
            if current_ratio is not None and score > 0:
                fit = neutral.consistency(u0, current_ratio)
                score *= fit
                neutral_ev = {
                    **neutral_ev,
                    "current_sum_ratio": round(current_ratio, 4),
                    "floating_fit": round(fit, 3),
                }
            values[M.NEUTRAL_SCORE] = score
        if not self.known.issuperset(values):
            self._grow(values)
        get = values.get
        row = [get(k, _NAN) for k in self.keys]
        complete = _NAN not in row
        x = np.array(row)
        self.ma.add(t, x, complete)
        means = self.ma.means()
        p = values.get(M.POWER)
        s = values.get(M.APPARENT_POWER)
        if p is not None and s is not None:
            dp, ds = self.demand.add(t, p, s)
            values[M.DEMAND_POWER] = dp
            values[M.DEMAND_APPARENT_POWER] = ds
            values[M.DEMAND_PF] = dp / ds if ds > 0 else 0.0
        names = self.keys
        averages: dict[str, dict[M, float]] = {}
        gaps: list[bool] = np.asarray(np.isnan(means).any(axis=1), dtype=bool).tolist()
        rows = means.tolist()
        for mrow, slot, gap in zip(rows, self.slot_names, gaps, strict=True):
            if gap:
                averages[slot] = {n: v for n, v in zip(names, mrow, strict=True) if v == v}
            else:
                averages[slot] = dict(zip(names, mrow, strict=True))
        self.seq += 1
        out.metrics.append(
            MetricsOut(
                site=self.site,
                ts=ts,
                seq=self.seq,
                meter=self.meter,
                source=source,
                interval_s=0.0,
                values=values,
                averages=averages,
                load=load,
                quadrant=quad,
                harmonics=harmonics,
                source_seq=source_seq,
            )
        )
        if self.blocks:
            if complete:
                ok: np.ndarray = self.ma._ones
                xv = np.where(self.rms_mask, x * x, x)
            else:
                ok = ~np.isnan(x)
                xv = np.where(ok, np.where(self.rms_mask, x * x, x), 0.0)
        for block in self.blocks:
            done = block.add_prepared(t, xv, ok)
            if done is not None:
                start, res = done
                agg = {n: v for n, v in zip(names, res.tolist(), strict=True) if v == v}
                self.seq += 1
                out.metrics.append(
                    MetricsOut(
                        site=self.site,
                        ts=datetime.fromtimestamp(start, UTC) + timedelta(seconds=block.interval_s),
                        seq=self.seq,
                        meter=self.meter,
                        source=source,
                        interval_s=block.interval_s,
                        values=agg,
                        averages={},
                        load={},
                        quadrant={},
                        harmonics={},
                        source_seq=self.last_source_seq,
                        aggregate=True,
                    )
                )
        self.last_source_seq = source_seq
        avg = rows[self.alarm_row]
        self._alarms(t, ts, values, avg, pf_pairs, neutral_ev, worst_harm or {}, bool(three), out)
        return out

    def _grow(self, values: dict[M, float]) -> None:
        """New averaged quantities appeared: widen the per-meter state (starts afresh)."""
        self.known |= values.keys()
        keys = [m for m in AVG_COLS if m in self.known]
        if keys == self.keys:
            return
        self.keys = keys
        self.key_index = {m: k for k, m in enumerate(keys)}
        self.rms_mask = np.array([m.value.startswith(_RMS_STEMS) for m in keys], dtype=bool)
        self.ma = MovingAverages(self.slots, len(keys))
        if self.cfg.aggregates:
            self.blocks = [
                BlockAggregate(3.0, self.rms_mask),
                BlockAggregate(600.0, self.rms_mask),
            ]

    def _alarms(
        self,
        t: float,
        ts: datetime,
        values: dict[M, float],
        avg: list[float],
        pf_pairs: dict[str, tuple[float, float]],
        neutral_ev: Evidence,
        worst: dict[str, tuple[int, float]],
        three: bool,
        out: Output,
    ) -> None:
        lim = self.limits
        th = self.thresholds

        idx = self.key_index
        tracked = self.alarms.alarms

        def a(m: M) -> float:
            k = idx.get(m)
            return _NAN if k is None else avg[k]

        def fire(
            code: str,
            phase: str | None,
            bad: bool | None,
            good: bool | None,
            ev: Callable[[], Evidence],
        ) -> None:
            if not bad and (code, phase) not in tracked:
                return  # fast path: nothing to track until the condition first appears
            res = self.alarms.update(t, code, phase, bad, good, ev)
            if res is not None:
                alarm, state = res
                out.events.append(self._event(ts, alarm.code, phase, state, alarm.evidence))

        p_avg, s_avg = a(M.POWER), a(M.APPARENT_POWER)
        if s_avg == s_avg and s_avg >= lim.min_apparent_power_va and p_avg == p_avg:
            pf = abs(p_avg) / s_avg
            for code, level in (("low_pf", th.pf_alert), ("penalty_pf", th.pf_penalty)):
                fire(
                    code,
                    None,
                    pf < level,
                    pf >= level + lim.pf_hysteresis,
                    lambda: {
                        "pf": round(pf, 4),
                        "p_w": round(p_avg, 1),
                        "s_va": round(s_avg, 1),
                        "limit": level,  # noqa: B023 (called at once)
                    },
                )
        pf_now = values.get(M.POWER_FACTOR)
        s_now = values.get(M.APPARENT_POWER)
        if pf_now is not None and s_now is not None and s_now >= lim.min_apparent_power_va:
            self.pf_window.add(t, abs(pf_now))
            spread = self.pf_window.spread()
            fire(
                "pf_erratic",
                None,
                spread > lim.pf_erratic_spread,
                spread < 0.5 * lim.pf_erratic_spread,
                lambda: {
                    "spread": round(spread, 4),
                    "pf_min": round(self.pf_window.extremes()[0], 4),
                    "pf_max": round(self.pf_window.extremes()[1], 4),
                },
            )
        v_missing = lim.voltage_missing_pct / 100.0 * th.nominal_voltage_v
        for ph, keys in zip(_PH, _PHASE_KEYS, strict=True):
            k_v, k_i, k_p, k_s, k_thv, k_thi = keys
            v_now = values.get(k_v)
            i_now = values.get(k_i)
            if v_now is not None and i_now is not None:
                flowing = i_now > lim.min_current_a
                fire(
                    "voltage_missing",
                    ph,
                    v_now < v_missing and flowing,
                    v_now >= 2 * v_missing or not flowing,
                    lambda: {
                        "voltage_v": round(v_now, 2),  # noqa: B023 (called at once)
                        "current_a": round(i_now, 3),  # noqa: B023 (called at once)
                    },
                )
            pk, sk = a(k_p), a(k_s)
            if not self.expect_export and pk == pk and sk == sk:
                fire(
                    "ct_reversed",
                    ph,
                    pk < -max(lim.ct_reversed_w, 0.02 * sk),
                    pk >= 0,
                    lambda: {"p_w": round(pk, 1), "s_va": round(sk, 1)},  # noqa: B023 (called at once)
                )
            if ph in pf_pairs:
                pf_m, pf_c = pf_pairs[ph]
                diff = abs(abs(pf_m) - pf_c)
                fire(
                    "meter_pf_mismatch",
                    ph,
                    diff > self.pf_tolerance,
                    diff <= 0.5 * self.pf_tolerance,
                    lambda: {
                        "pf_meter": pf_m,  # noqa: B023 (called at once)
                        "pf_p_over_s": round(pf_c, 4),  # noqa: B023 (called at once)
                        "tolerance": self.pf_tolerance,
                    },
                )
            thd_v, thd_i = a(k_thv), a(k_thi)
            if thd_v == thd_v or thd_i == thd_i:
                order, pct = worst.get(ph, (0, 0.0))
                over_v = thd_v == thd_v and thd_v > self.thd_v_limit
                over_i = thd_i == thd_i and thd_i > lim.thd_current_pct
                over_h = pct > self.harm_v_limit
                ok = not (
                    (thd_v == thd_v and thd_v > 0.9 * self.thd_v_limit)
                    or (thd_i == thd_i and thd_i > 0.9 * lim.thd_current_pct)
                    or pct > 0.9 * self.harm_v_limit
                )
                fire(
                    "thd_limit",
                    ph,
                    over_v or over_i or over_h,
                    ok,
                    lambda: {
                        "thd_v_pct": _r(thd_v),  # noqa: B023 (called at once)
                        "thd_i_pct": _r(thd_i),  # noqa: B023 (called at once)
                        "worst_v_order": order,  # noqa: B023 (called at once)
                        "worst_v_pct": round(pct, 3),  # noqa: B023 (called at once)
                        "limit_thd_v_pct": self.thd_v_limit,
                        "limit_harmonic_v_pct": self.harm_v_limit,
                        "limit_thd_i_pct": lim.thd_current_pct,
                    },
                )
        if three:
            u2 = a(M.VOLTAGE_UNBALANCE)
            kind = "u2"
            if u2 != u2:
                u2, kind = a(M.NEMA_UNBALANCE), "nema"
            if u2 == u2:
                limit = th.voltage_unbalance_pct
                fire(
                    "unbalance",
                    None,
                    u2 > limit,
                    u2 < limit - lim.unbalance_hysteresis_pct,
                    lambda: {"unbalance_pct": round(u2, 3), "measure": kind, "limit_pct": limit},
                )
            score = a(M.NEUTRAL_SCORE)
            if score == score:
                fire(
                    "broken_neutral",
                    None,
                    score >= lim.neutral_raise_score,
                    score < lim.neutral_clear_score,
                    lambda: {
                        "score": round(score, 3),
                        "u0_pct": _r(a(M.ZERO_SEQ_UNBALANCE)),
                        "u2_pct": _r(a(M.VOLTAGE_UNBALANCE)),
                        **neutral_ev,
                    },
                )

    def _event(
        self, ts: datetime, code: str, phase: str | None, state: EventState, ev: Evidence
    ) -> Event:
        self.event_seq += 1
        where = f" on {phase}" if phase else ""
        return Event(
            site=self.site,
            ts=ts,
            seq=self.event_seq,
            meter=self.meter,
            code=code,
            state=state,
            severity=Severity.CRITICAL if code in _CRITICAL else Severity.WARNING,
            phase=phase,
            message=f"{code}{where} {state.value}",
            evidence=ev,
            service=SERVICE,
        )


_last_seed = 0


def seq_seed() -> int:
    """A per-run starting seq: milliseconds since the epoch x 1000 (room for 1000
    messages per millisecond of run time before a later run could overlap)."""
    global _last_seed
    _last_seed = max(int(time.time() * 1000) * 1000, _last_seed + 1_000_000)
    return _last_seed


def _r(x: float) -> float | None:
    return round(x, 3) if x == x else None


def analyze_waveform(wf: Waveform) -> dsp.Analysis:
    ch = wf.channels
    three = all(k in ch for k in ("v2", "v3", "i2", "i3"))
    names = ["v1", "v2", "v3", "i1", "i2", "i3"] if three else ["v1", "i1"]
    has_in = three and "in" in ch
    if has_in:
        names.append("in")
    x = np.array([ch[n] for n in names], dtype=np.float64)[None]  # type: ignore[index]
    if not np.isfinite(x).all():
        bad = [n for k, n in enumerate(names) if not np.isfinite(x[0, k]).all()]
        raise dsp.WaveformError(f"non-finite samples in channel(s) {', '.join(bad)}")
    a = dsp.analyze_stacked(x, 3 if three else 1, wf.fs_hz, float(wf.f_nominal_hz), has_in)
    return a


def _worst_harmonics(a: dsp.Analysis) -> dict[str, tuple[int, float]]:
    out = {}
    for k in range(a.phases):
        h = a.harm_v[0, k]
        if h[0] <= 0:
            continue
        rel = h[1:] / h[0] * 100.0
        j = int(np.argmax(rel))
        out[_PH[k]] = (j + 2, float(rel[j]))
    return out


def encode_metrics(m: MetricsOut | Metrics) -> bytes:
    """Fast serialisation of a Metrics built here (same JSON as ``shared.messages.encode``)."""
    return orjson.dumps(
        {
            "schema": "pfm.metrics/1",
            "site": m.site,
            "ts": m.ts,
            "seq": m.seq,
            "meter": m.meter,
            "source": m.source,
            "interval_s": m.interval_s,
            "values": m.values,
            "averages": m.averages,
            "load": m.load,
            "quadrant": m.quadrant,
            "harmonics": m.harmonics,
            "source_seq": m.source_seq,
            "aggregate": m.aggregate,
        },
        option=orjson.OPT_NON_STR_KEYS,
    )
