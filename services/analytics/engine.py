"""One meter's analytics state: derive, average, aggregate, alarm.

:class:`MeterEngine` takes a register-level :class:`Reading` or a
:class:`Waveform` and returns the :class:`Metrics` and :class:`Event` messages
to publish. It holds only fixed-size state (rings, deques with a bound), so
memory per meter does not grow with run time. No I/O here: the service wires it
to the bus, the ``analyze`` command and the benchmark use it directly.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, cast

import numpy as np
import orjson

from services.analytics import dsp, neutral, registers
from services.analytics.aggregate import (
    BlockSet,
    DemandWindow,
    SlotSums,
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
#: the averaged quantities the alarms read (their columns: ``MeterEngine.alarm_cols``)
_ALARM_INPUTS: tuple[M, ...] = (
    M.POWER,
    M.APPARENT_POWER,
    M.VOLTAGE_UNBALANCE,
    M.NEMA_UNBALANCE,
    M.NEUTRAL_SCORE,
    M.ZERO_SEQ_UNBALANCE,
    *(m for keys in _PHASE_KEYS for m in (keys[2], keys[3], keys[4], keys[5])),
)


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
        #: the same as plain ``str`` (equal and hashing alike): the dict keys of the
        #: averages and aggregates, which orjson encodes ~2x faster than StrEnum keys
        self.key_names: list[M] = []
        self.key_index: dict[M, int] = {}
        #: alarm inputs' columns in ``keys`` (-1: absent, reads the NaN appended to a row)
        self.alarm_cols: tuple[int, ...] = ()
        self.known: set[M] = set()
        self.rms_cols: list[int] = []
        self._ones: list[float] = []
        self.ma = SlotSums(self.slots, 0)
        self._pick: Callable[[dict[M, float]], tuple[float, ...]] = _picker([])
        self.blocks: BlockSet | None = None
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

        def evidence() -> Evidence:  # only built when a broken_neutral alarm changes
            star = d.star
            if star is None:
                return {}
            return {
                "displacement_v": round(star.displacement_v, 3),
                "line_v": round(star.line_v, 3),
                "angle_sum_deg": round(sum(star.angles_deg), 3),
                "consistent": star.consistent,
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
            lambda: evidence,
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
        neutral_ev: Callable[[], Evidence],
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
                base_ev, ratio = neutral_ev, current_ratio

                def neutral_ev() -> Evidence:
                    return {
                        **base_ev(),
                        "current_sum_ratio": round(ratio, 4),
                        "floating_fit": round(fit, 3),
                    }

            values[M.NEUTRAL_SCORE] = score
        if not self.known.issuperset(values):
            self._grow(values)
        try:  # the usual case: every quantity this meter reports is there
            row = list(self._pick(values))
        except KeyError:
            get = values.get
            row = [get(k, _NAN) for k in self.keys]
        total = sum(row)
        if total == total:  # no NaN: every quantity present
            vec = row + self._ones
        else:
            vec = [v if v == v else 0.0 for v in row]
            vec += [1.0 if v == v else 0.0 for v in row]
        # [values (0 where missing) | counts | squares of the RMS-type values]
        vec += [vec[k] * vec[k] for k in self.rms_cols]
        x = np.array(vec)
        self.ma.add(t, x)
        rows, gaps = self.ma.mean_rows()
        p = values.get(M.POWER)
        s = values.get(M.APPARENT_POWER)
        if p is not None and s is not None:
            dp, ds = self.demand.add(t, p, s)
            values[M.DEMAND_POWER] = dp
            values[M.DEMAND_APPARENT_POWER] = ds
            values[M.DEMAND_PF] = dp / ds if ds > 0 else 0.0
        names = self.key_names
        averages: dict[str, dict[M, float]] = {}
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
        if self.blocks is not None:
            for interval, start, res in self.blocks.add(t, x):
                agg = {n: v for n, v in zip(names, res.tolist(), strict=True) if v == v}
                self.seq += 1
                out.metrics.append(
                    MetricsOut(
                        site=self.site,
                        ts=datetime.fromtimestamp(start, UTC) + timedelta(seconds=interval),
                        seq=self.seq,
                        meter=self.meter,
                        source=source,
                        interval_s=interval,
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
        self.key_names = cast(list[M], [m.value for m in keys])
        self.key_index = {m: k for k, m in enumerate(keys)}
        self._pick = _picker(keys)
        self.alarm_cols = tuple(self.key_index.get(m, -1) for m in _ALARM_INPUTS)
        self.rms_cols = [k for k, m in enumerate(keys) if m.value.startswith(_RMS_STEMS)]
        self._ones = [1.0] * len(keys)
        self.ma = SlotSums(self.slots, len(keys), len(self.rms_cols))
        if self.cfg.aggregates:
            self.blocks = BlockSet((3.0, 600.0), len(keys), self.rms_cols)

    def _alarms(
        self,
        t: float,
        ts: datetime,
        values: dict[M, float],
        avg: list[float],
        pf_pairs: dict[str, tuple[float, float]],
        neutral_ev: Callable[[], Evidence],
        worst: dict[str, tuple[int, float]],
        three: bool,
        out: Output,
    ) -> None:
        lim = self.limits
        th = self.thresholds
        tracked = self.alarms.alarms
        # the alarm slot's averages of _ALARM_INPUTS; an absent column reads the NaN
        av = [*avg, _NAN]
        cols = self.alarm_cols

        def fire(
            code: str,
            phase: str | None,
            bad: bool | None,
            good: bool | None,
            ev: Callable[[], Evidence],
        ) -> None:
            alarm = tracked.get((code, phase))
            if alarm is None:
                res = self.alarms.update(t, code, phase, bad, good, ev)
                if res is None:
                    return
                alarm, state = res
            else:
                got = alarm.update(t, bad, good, ev)
                if got is None:
                    return
                state = got
            out.events.append(self._event(ts, alarm.code, phase, state, alarm.evidence))

        # fast path everywhere below: an alarm is only looked at (and its evidence
        # closure made) when its raise condition holds or it is already tracked
        p_avg, s_avg = av[cols[0]], av[cols[1]]
        if s_avg == s_avg and s_avg >= lim.min_apparent_power_va and p_avg == p_avg:
            pf = abs(p_avg) / s_avg
            for code, level in (("low_pf", th.pf_alert), ("penalty_pf", th.pf_penalty)):
                bad = pf < level
                if bad or (code, None) in tracked:
                    fire(
                        code,
                        None,
                        bad,
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
            bad = spread > lim.pf_erratic_spread
            if bad or ("pf_erratic", None) in tracked:
                fire(
                    "pf_erratic",
                    None,
                    bad,
                    spread < 0.5 * lim.pf_erratic_spread,
                    lambda: {
                        "spread": round(spread, 4),
                        "pf_min": round(self.pf_window.extremes()[0], 4),
                        "pf_max": round(self.pf_window.extremes()[1], 4),
                    },
                )
        v_missing = lim.voltage_missing_pct / 100.0 * th.nominal_voltage_v
        for n, (ph, keys) in enumerate(zip(_PH, _PHASE_KEYS, strict=True)):
            k_v, k_i = keys[0], keys[1]
            v_now = values.get(k_v)
            i_now = values.get(k_i)
            if v_now is not None and i_now is not None:
                flowing = i_now > lim.min_current_a
                bad = v_now < v_missing and flowing
                if bad or ("voltage_missing", ph) in tracked:
                    fire(
                        "voltage_missing",
                        ph,
                        bad,
                        v_now >= 2 * v_missing or not flowing,
                        lambda: {
                            "voltage_v": round(v_now, 2),  # noqa: B023 (called at once)
                            "current_a": round(i_now, 3),  # noqa: B023 (called at once)
                        },
                    )
            c = 6 + 4 * n
            pk, sk = av[cols[c]], av[cols[c + 1]]
            if not self.expect_export and pk == pk and sk == sk:
                bad = pk < -max(lim.ct_reversed_w, 0.02 * sk)
                if bad or ("ct_reversed", ph) in tracked:
                    fire(
                        "ct_reversed",
                        ph,
                        bad,
                        pk >= 0,
                        lambda: {"p_w": round(pk, 1), "s_va": round(sk, 1)},  # noqa: B023 (called at once)
                    )
            pair = pf_pairs.get(ph)
            if pair is not None:
                pf_m, pf_c = pair
                diff = abs(abs(pf_m) - pf_c)
                bad = diff > self.pf_tolerance
                if bad or ("meter_pf_mismatch", ph) in tracked:
                    fire(
                        "meter_pf_mismatch",
                        ph,
                        bad,
                        diff <= 0.5 * self.pf_tolerance,
                        lambda: {
                            "pf_meter": pf_m,  # noqa: B023 (called at once)
                            "pf_p_over_s": round(pf_c, 4),  # noqa: B023 (called at once)
                            "tolerance": self.pf_tolerance,
                        },
                    )
            thd_v, thd_i = av[cols[c + 2]], av[cols[c + 3]]
            if thd_v == thd_v or thd_i == thd_i:
                order, pct = worst.get(ph, (0, 0.0))
                over_v = thd_v == thd_v and thd_v > self.thd_v_limit
                over_i = thd_i == thd_i and thd_i > lim.thd_current_pct
                over_h = pct > self.harm_v_limit
                bad = over_v or over_i or over_h
                if bad or ("thd_limit", ph) in tracked:
                    ok = not (
                        (thd_v == thd_v and thd_v > 0.9 * self.thd_v_limit)
                        or (thd_i == thd_i and thd_i > 0.9 * lim.thd_current_pct)
                        or pct > 0.9 * self.harm_v_limit
                    )
                    fire(
                        "thd_limit",
                        ph,
                        bad,
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
            u2 = av[cols[2]]
            kind = "u2"
            if u2 != u2:
                u2, kind = av[cols[3]], "nema"
            if u2 == u2:
                limit = th.voltage_unbalance_pct
                bad = u2 > limit
                if bad or ("unbalance", None) in tracked:
                    fire(
                        "unbalance",
                        None,
                        bad,
                        u2 < limit - lim.unbalance_hysteresis_pct,
                        lambda: {
                            "unbalance_pct": round(u2, 3),
                            "measure": kind,
                            "limit_pct": limit,
                        },
                    )
            score = av[cols[4]]
            if score == score:
                bad = score >= lim.neutral_raise_score
                if bad or ("broken_neutral", None) in tracked:
                    fire(
                        "broken_neutral",
                        None,
                        bad,
                        score < lim.neutral_clear_score,
                        lambda: {
                            "score": round(score, 3),
                            "u0_pct": _r(av[cols[5]]),
                            "u2_pct": _r(av[cols[2]]),
                            **neutral_ev(),
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


def _picker(keys: list[M]) -> Callable[[dict[M, float]], tuple[float, ...]]:
    """``d -> tuple(d[k] for k in keys)`` in C (KeyError when one is missing)."""
    if len(keys) == 1:
        one = operator.itemgetter(keys[0])
        return lambda d: (one(d),)
    return operator.itemgetter(*keys) if keys else lambda d: ()


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
