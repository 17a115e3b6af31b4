"""Register-level readings, moving averages, demand, aggregates and alarms."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from services.analytics import neutral, registers
from services.analytics.aggregate import BucketExtremes, MovingAverages
from services.analytics.batch import SiteEngine
from services.analytics.engine import MeterEngine, Output, encode_metrics
from shared.measurements import Measurement as M
from shared.messages import EventState, LoadKind, Metrics, Reading, ValidationError, decode
from shared.site import parse_site

T0 = datetime(2026, 1, 5, 8, 0, 0, tzinfo=UTC)
A = np.exp(2j * np.pi / 3)


def site(**analytics: Any) -> Any:
    return parse_site(
        {
            "site": "s1",
            "buses": [{"name": "b1", "host": "127.0.0.1"}],
            "meters": [
                {"name": "m1", "bus": "b1", "unit": 1, "profile": "pmtr001"},
                {"name": "dl", "bus": "b1", "unit": 2, "profile": "pmtr001", "wiring": "delta"},
            ],
            "analytics": analytics,
        }
    )


def reading(seq: int, t: float, values: dict[M, float], meter: str = "m1") -> Reading:
    return Reading(
        site="s1", meter=meter, ts=T0 + timedelta(seconds=t), seq=seq, profile="x", values=values
    )


def three(v: tuple[float, ...], i: tuple[float, ...], pf: tuple[float, ...]) -> dict[M, float]:
    out: dict[M, float] = {}
    for k in range(3):
        n = k + 1
        out[M.per_phase("voltage", n)] = v[k]
        out[M.per_phase("current", n)] = i[k]
        out[M.per_phase("power", n)] = v[k] * i[k] * pf[k]
        out[M.per_phase("power_factor", n)] = pf[k]
    return out


def test_register_derivation_magnitude_only() -> None:
    vals = three((230.0, 232.0, 228.0), (10.0, 20.0, 5.0), (0.8, 0.9, 0.7))
    d = registers.derive(vals)
    s = [230 * 10, 232 * 20, 228 * 5]
    p = [s[0] * 0.8, s[1] * 0.9, s[2] * 0.7]
    assert d.values[M.APPARENT_POWER_L2] == pytest.approx(s[1], rel=1e-12)
    assert d.values[M.NONACTIVE_POWER_L1] == pytest.approx(math.sqrt(s[0] ** 2 - p[0] ** 2))
    assert d.values[M.POWER_FACTOR] == pytest.approx(sum(p) / sum(s))
    assert M.REACTIVE_POWER not in d.values and M.REACTIVE_POWER_L1 not in d.values
    assert d.load == dict.fromkeys(("L1", "L2", "L3", "total"), LoadKind.UNKNOWN)
    assert d.quadrant == {}
    assert d.pf_pairs["L3"] == (0.7, pytest.approx(0.7))


def test_signed_reactive_power_gives_load_and_quadrant() -> None:
    vals = {M.VOLTAGE_L1: 230.0, M.CURRENT_L1: 10.0, M.POWER_L1: -1840.0}
    vals[M.REACTIVE_POWER_L1] = 1380.0
    d = registers.derive(vals)
    assert d.quadrant["L1"] == 2 and d.load["L1"] == LoadKind.CAPACITIVE  # P*Q < 0
    assert d.values[M.REACTIVE_POWER] == 1380.0


def test_delta_sqrt3_correction_and_u2_from_line_magnitudes() -> None:
    vll = (400.0, 404.0, 396.0)
    vals = three(vll, (10.0, 10.0, 10.0), (1.0, 1.0, 1.0))
    for k in range(3):  # a delta meter's P register is per element: V_LL/sqrt3 * I
        vals[M.per_phase("power", k + 1)] = vll[k] / math.sqrt(3) * 10.0
    d = registers.derive(vals, sqrt3=True)
    assert d.values[M.VOLTAGE_L1] == pytest.approx(400 / math.sqrt(3))
    assert d.values[M.VOLTAGE_L1_L2] == 400.0
    assert d.values[M.APPARENT_POWER_L1] == pytest.approx(400 / math.sqrt(3) * 10)
    assert d.values[M.POWER_FACTOR] == pytest.approx(1.0)
    # u2 from magnitudes agrees with the phasor definition: build a triangle with
    # these sides, take its line phasors and compute V2/V1 directly
    a, b, c = vll
    ang = math.acos((a * a + c * c - b * b) / (2 * a * c))  # angle between sides a and c
    vab = a
    vca = -c * np.exp(-1j * ang)  # vab + vbc + vca = 0 closes the triangle
    vbc = -(vab + vca)
    assert abs(abs(vbc) - b) < 1e-9
    v1 = (vab + A * vbc + A**2 * vca) / 3
    v2 = (vab + A**2 * vbc + A * vca) / 3
    assert d.values[M.VOLTAGE_UNBALANCE] == pytest.approx(100 * abs(v2) / abs(v1), rel=1e-9)


def test_moving_averages_exact_and_bounded() -> None:
    ma = MovingAverages([5, 10], width=2, bucket_s=0.1)
    size = ma.sums.shape
    for k in range(1000):  # 100 s at 10 Hz, value = k
        ma.add(k * 0.1 + 0.05, np.array([float(k), np.nan if k % 2 else 1.0]))
    m = ma.means()
    assert m[0, 0] == pytest.approx(np.mean(np.arange(950, 1000)))
    assert m[1, 0] == pytest.approx(np.mean(np.arange(900, 1000)))
    assert m[0, 1] == 1.0  # NaN samples left out
    assert ma.sums.shape == size  # state does not grow
    ma.add(1000.0, np.array([7.0, 7.0]))  # a gap longer than every slot resets
    assert ma.means()[1, 0] == 7.0


def spread(w: BucketExtremes, t: float, x: float) -> float:
    lo, hi = w.add(np.array([0]), np.array([t]), np.array([x]))
    return float(hi[0] - lo[0])


def test_window_extremes() -> None:
    w = BucketExtremes(10.0, 0.5)
    for k, x in enumerate([0.9, 0.5, 0.95, 0.6, 0.99]):
        got = spread(w, float(k), x)
    assert got == pytest.approx(0.49)
    assert spread(w, 20.0, 0.8) == 0.0


def fast(**kw: Any) -> dict[str, Any]:
    timing = {"raise_after_s": 6, "clear_after_s": 6}
    codes = [
        "low_pf",
        "penalty_pf",
        "ct_reversed",
        "voltage_missing",
        "pf_erratic",
        "thd_limit",
        "unbalance",
        "meter_pf_mismatch",
        "broken_neutral",
    ]
    base: dict[str, Any] = {"alarms": dict.fromkeys(codes, timing), "alarm_slot_s": 5}
    base.update(kw)
    return base


def run(eng: MeterEngine, seq0: int, t0: float, n: int, vals: dict[M, float]) -> Output:
    out = Output()
    for k in range(n):
        o = eng.on_reading(reading(seq0 + k, t0 + k, dict(vals)))
        out.metrics += o.metrics
        out.events += o.events
    return out


def codes(out: Output) -> list[tuple[str, str | None, EventState]]:
    return [(e.code, e.phase, e.state) for e in out.events]


def test_metrics_message_contract_and_averages() -> None:
    eng = MeterEngine(site(), "m1")
    vals = three((230.0, 230.0, 230.0), (10.0, 10.0, 10.0), (0.99, 0.99, 0.99))
    vals[M.IMPORT_ENERGY_L1] = 1234.0
    out = Output()
    for k in range(12):
        v = dict(vals)
        v[M.POWER_L1] = 2277.0 + (100.0 if k == 11 else 0.0)  # one spike
        o = eng.on_reading(reading(k, 0.5 + k, v))
        out.metrics += o.metrics
    m = out.metrics[-1]
    assert m.interval_s == 0 and m.source_seq == 11 and m.source == "reading"
    assert m.values[M.POWER_L1] == 2377.0
    assert set(m.averages) == {"5s", "10s", "20s", "30s", "60s"}
    assert m.averages["5s"][M.POWER_L1] == pytest.approx(2277 + 100 / 5)
    assert m.averages["10s"][M.POWER_L1] == pytest.approx(2277 + 100 / 10)
    assert M.IMPORT_ENERGY_L1 not in m.averages["5s"] and m.values[M.IMPORT_ENERGY_L1] == 1234.0
    total_s = 3 * 2300.0
    assert m.values[M.DEMAND_APPARENT_POWER] == pytest.approx(total_s)
    p_mean = (12 * 3 * 2277 + 100) / 12
    assert m.values[M.DEMAND_POWER] == pytest.approx(p_mean)
    # the JSON round-trips through the public model (what every consumer does)
    back = decode(Metrics, encode_metrics(m))
    assert back.values == m.values and back.averages["5s"] == m.averages["5s"]
    # 3 s aggregates closed on the way (interval_s = 3), voltages RMS-aggregated
    aggs = [x for x in out.metrics if x.interval_s == 3]
    assert aggs and aggs[0].values[M.VOLTAGE_L1] == pytest.approx(230.0)
    # ... marked as aggregates (the archiver counts no energy twice) and per-input ones not
    assert all(x.aggregate for x in aggs) and not m.aggregate
    assert decode(Metrics, encode_metrics(aggs[0])).aggregate is True
    assert all(e.code != "low_pf" for o in [out] for e in o.events)


def test_low_and_penalty_pf_hysteresis_and_minimum_duration() -> None:
    eng = MeterEngine(site(**fast()), "m1")
    good = three((230.0,) * 3, (10.0,) * 3, (0.99,) * 3)
    low = three((230.0,) * 3, (10.0,) * 3, (0.85,) * 3)
    mid = three((230.0,) * 3, (10.0,) * 3, (0.975,) * 3)  # inside the hysteresis band
    out = run(eng, 0, 0, 10, good)
    assert codes(out) == []
    # one noisy second of low PF does not raise anything
    out = run(eng, 10, 10, 1, low)
    out.events += run(eng, 11, 11, 10, good).events
    assert codes(out) == []
    out = run(eng, 21, 21, 15, low)
    assert codes(out) == [
        ("low_pf", None, EventState.RAISED),
        ("penalty_pf", None, EventState.RAISED),
    ]
    ev = out.events[1]
    assert ev.evidence["pf"] == pytest.approx(0.85, abs=1e-3) and ev.evidence["limit"] == 0.9
    out = run(eng, 36, 36, 15, mid)  # above penalty + hysteresis, inside low_pf band
    assert codes(out) == [("penalty_pf", None, EventState.CLEARED)]
    out = run(eng, 51, 51, 15, good)
    assert codes(out) == [("low_pf", None, EventState.CLEARED)]


def test_ct_reversed_voltage_missing_and_pf_mismatch() -> None:
    eng = MeterEngine(site(**fast()), "m1")
    vals = three((230.0,) * 3, (10.0,) * 3, (0.95,) * 3)
    vals[M.POWER_L2] = -vals[M.POWER_L2]  # reversed CT on L2
    vals[M.VOLTAGE_L3] = 0.0  # L3 voltage lost, current still flowing
    vals[M.POWER_L3] = 0.0
    vals[M.POWER_FACTOR_L1] = 0.60  # the meter's own PF register is wrong on L1
    out = run(eng, 0, 0, 10, vals)
    got = set(codes(out))
    assert ("ct_reversed", "L2", EventState.RAISED) in got
    assert ("voltage_missing", "L3", EventState.RAISED) in got
    assert ("meter_pf_mismatch", "L1", EventState.RAISED) in got
    assert not any(c == "ct_reversed" and p != "L2" for c, p, _ in got)
    mm = next(e for e in out.events if e.code == "meter_pf_mismatch")
    assert mm.evidence["pf_meter"] == 0.6 and mm.evidence["pf_p_over_s"] == pytest.approx(0.95)


def test_export_meter_never_flags_ct_reversed() -> None:
    s = site(**fast())
    s.meters[0].expect_export = True
    eng = MeterEngine(s, "m1")
    vals = three((230.0,) * 3, (10.0,) * 3, (-0.95,) * 3)
    assert not any(e.code == "ct_reversed" for e in run(eng, 0, 0, 10, vals).events)


def test_generation_meter_never_flags_ct_reversed() -> None:
    s = site(**fast())
    s.meters[0].role = "generation"  # PV or a genset: export is what it does
    assert not s.meters[0].expect_export
    eng = MeterEngine(s, "m1")
    vals = three((230.0,) * 3, (10.0,) * 3, (-0.95,) * 3)
    assert not any(e.code == "ct_reversed" for e in run(eng, 0, 0, 10, vals).events)


def test_pf_erratic_on_swinging_pf() -> None:
    eng = MeterEngine(site(**fast()), "m1")
    out = Output()
    for k in range(12):
        pf = 0.95 if k % 2 else 0.55
        out.events += run(eng, k, k, 1, three((230.0,) * 3, (10.0,) * 3, (pf,) * 3)).events
    assert ("pf_erratic", None, EventState.RAISED) in codes(out)


def test_broken_neutral_from_magnitudes_and_not_on_ordinary_unbalance() -> None:
    e = [230.0, 230.0 * A**2, 230.0 * A]
    r = [5.0, 20.0, 40.0]
    vn = sum(ee / rr for ee, rr in zip(e, r, strict=True)) / sum(1 / x for x in r)
    vp = [abs(ee - vn) for ee in e]
    ip = [x / rr for x, rr in zip(vp, r, strict=True)]
    eng = MeterEngine(site(**fast()), "m1")
    out = run(eng, 0, 0, 10, three(tuple(vp), tuple(ip), (1.0,) * 3))
    ev = [x for x in out.events if x.code == "broken_neutral"]
    assert [x.state for x in ev] == [EventState.RAISED]
    assert ev[0].evidence["displacement_v"] == pytest.approx(abs(vn), rel=1e-3)
    assert ev[0].evidence["angle_sum_deg"] == pytest.approx(360.0, abs=1e-3)
    assert out.metrics[-1].values[M.NEUTRAL_SCORE] == 1.0
    # a supply with 2.5 % negative-sequence unbalance and an intact neutral
    v1, v2 = 230.0, 230 * 0.025 * np.exp(0.4j)
    ev_ = [abs(v1 + v2), abs(A**2 * v1 + A * v2), abs(A * v1 + A**2 * v2)]
    eng2 = MeterEngine(site(**fast()), "m1")
    out2 = run(eng2, 0, 0, 10, three(tuple(ev_), (10.0, 12.0, 8.0), (0.99,) * 3))
    assert not any(x.code == "broken_neutral" for x in out2.events)
    assert out2.metrics[-1].values[M.NEUTRAL_SCORE] == 0.0
    assert neutral.score(out2.metrics[-1].values[M.ZERO_SEQ_UNBALANCE]) == 0.0


def test_seq_is_contiguous_and_survives_a_restart() -> None:
    vals = three((230.0,) * 3, (10.0,) * 3, (0.99,) * 3)
    first = MeterEngine(site(), "m1")
    out = run(first, 0, 0, 5, vals)
    seqs = [m.seq for m in out.metrics]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    restarted = MeterEngine(site(), "m1")
    assert run(restarted, 0, 0, 1, vals).metrics[0].seq > seqs[-1]


def test_memory_bounded_per_meter() -> None:
    eng = MeterEngine(site(), "m1")
    vals = three((230.0,) * 3, (10.0,) * 3, (0.5, 0.99, 0.7))
    run(eng, 0, 0, 200, vals)
    size = eng.site.state_bytes()
    assert size < 200_000  # averaging ring, blocks, demand, window, alarms
    run(eng, 200, 200, 2000, vals)
    assert eng.site.state_bytes() == size


def test_one_phase_sag_on_intact_neutral_raises_no_broken_neutral() -> None:
    # L1 sags to 70 % at the supply; balanced 10-ohm loads, neutral intact
    mags = (0.7 * 230.0, 230.0, 230.0)
    eng = MeterEngine(site(**fast()), "m1")
    out = run(eng, 0, 0, 10, three(mags, tuple(m / 10.0 for m in mags), (1.0,) * 3))
    assert out.metrics[-1].values[M.ZERO_SEQ_UNBALANCE] > 10  # u0 alone would alarm
    assert out.metrics[-1].values[M.NEUTRAL_SCORE] < 0.05
    assert not any(e.code == "broken_neutral" for e in out.events)


def test_bad_analytics_config_lists_every_problem() -> None:
    from shared.errors import ConfigError

    bad = {
        "average_slots_s": [5, 5, 0],
        "alarm_slot_s": 7,
        "limits": {"neutral_clear_score": 0.9, "pf_hysteresis": -1},
    }
    with pytest.raises(ConfigError) as err:
        site(**bad)
    text = "\n".join(err.value.problems)
    assert "analytics.average_slots_s" in text
    assert "analytics.limits.pf_hysteresis" in text
    # alarm codes are the alarm table's: the engine (analytics at start) names a stranger
    with pytest.raises(ConfigError) as err3:
        SiteEngine(site(alarms={"no_such_alarm": {"raise_after_s": 1}}))
    assert "analytics.alarms.no_such_alarm: no alarm named" in "\n".join(err3.value.problems)
    with pytest.raises(ConfigError) as err2:
        site(alarm_slot_s=7)
    assert "alarm_slot_s 7 is not one of" in "\n".join(err2.value.problems)


def test_site_refuses_analytics_options_for_unknown_meters() -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        site(meters={"nope": {"pf_mismatch_tolerance": 0.1}})
    assert "analytics.meters.nope" in err.value.problems[0]


def test_unanalysable_waveforms_are_refused_with_a_reason() -> None:
    from services.analytics.dsp import WaveformError
    from shared.messages import Waveform

    eng = MeterEngine(site(), "m1")
    seq0 = eng.seq
    short = Waveform(
        site="s1",
        meter="m1",
        ts=T0,
        seq=1,
        fs_hz=1000.0,
        channels={"v1": [1.0] * 20, "i1": [0.0] * 20},
    )
    with pytest.raises(WaveformError, match="cycle"):
        eng.on_waveform(short)
    t = np.arange(200) / 10000.0
    v = (325 * np.sin(2 * np.pi * 50 * t)).tolist()
    fields: dict[str, Any] = {
        "site": "s1",
        "meter": "m1",
        "ts": T0,
        "seq": 2,
        "fs_hz": 10000.0,
        "channels": {"v1": v, "i1": [float("nan")] * 200},
    }
    with pytest.raises(ValidationError, match=r"channels\.i1\.0"):  # refused at entry
        Waveform(**fields)
    nan = Waveform.model_construct(**fields)  # and the engine refuses it all the same
    with pytest.raises(WaveformError, match="i1"):
        eng.on_waveform(nan)
    assert eng.seq == seq0  # nothing was published or averaged


def test_prometheus_metric_names_for_dashboards() -> None:
    from services.analytics.service import AnalyticsMetrics
    from shared.metrics import ServiceMetrics

    base = ServiceMetrics("analytics", "s1")
    m = AnalyticsMetrics(base)
    m.readings.labels("m1").inc()
    m.waveforms.labels("m1").inc()
    m.alarms_active.labels("m1", "low_pf").inc()
    m.transitions.labels("m1", "low_pf", "raised").inc()
    m.pf.labels("m1").set(0.9)
    m.neutral.labels("m1").set(0.0)
    m.process.observe(0.0001)
    text = base.exposition().decode()
    for name in (
        'pfm_analytics_readings_total{meter="m1"}',
        'pfm_analytics_waveforms_total{meter="m1"}',
        'pfm_analytics_alarms_active{code="low_pf",meter="m1"}',
        'pfm_analytics_alarm_transitions_total{code="low_pf",meter="m1",state="raised"}',
        'pfm_analytics_power_factor{meter="m1"}',
        'pfm_analytics_neutral_score{meter="m1"}',
        "pfm_analytics_process_seconds_bucket",
    ):
        assert name in text, name
