"""The site-wide engine: large batches give what one input at a time gives, and the
vectorised parts equal their one-meter definitions (MovingAverages, oracles.derive,
alarms.Alarm)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from services.analytics import registers
from services.analytics.alarms import ALARMS, Alarm, AlarmStates
from services.analytics.batch import AVG_COLS, SiteEngine, TooManyMeters
from services.analytics.output import MetricsOut, Output, encode_metrics
from shared.measurements import Measurement as M
from shared.messages import Event, Metrics, Reading, Waveform, decode
from shared.site import parse_site
from shared.site.analytics import AlarmTiming
from tests import oracles
from tests.oracles import MovingAverages

T0 = datetime(2026, 3, 2, 6, 0, 0, tzinfo=UTC)
A = np.exp(2j * np.pi / 3)
#: every alarm the per-meter stream raises (energy_balance compares meters: test_topology;
#: over/undervoltage are judged on 10-min means, longer than the stream: test_quality)
TEN_MINUTE = {"overvoltage", "undervoltage"}
CODES = [d.code for d in ALARMS if d.scope == "meter" and d.code not in TEN_MINUTE]
#: ... and the supply events (a missing voltage is an interruption, a floating neutral
#: a dip on one phase and a swell on another)
EVENTS = [d.code for d in ALARMS if d.scope == "event"]
#: star meters' conditions, each held for a stretch of the stream
CONDITIONS = ["normal", "low_pf", "ct", "vmiss", "erratic", "unbalance", "mismatch", "neutral"]
CONDITIONS += ["overload", "frequency"]
STAR = [f"m{k}" for k in range(8)]
FS, F0 = 6400.0, 50.0


def site() -> Any:
    meters: list[dict[str, Any]] = [
        {"name": n, "bus": "b1", "unit": k + 1, "profile": "pmtr001"} for k, n in enumerate(STAR)
    ]
    meters += [
        {"name": "dl", "bus": "b1", "unit": 20, "profile": "pmtr001", "wiring": "delta"},
        {"name": "ex", "bus": "b1", "unit": 21, "profile": "pmtr001", "expect_export": True},
        {"name": "sp", "bus": "b1", "unit": 22, "profile": "pmtr001"},
        {"name": "wf", "bus": "b1", "unit": 23, "profile": "pmtr001"},
    ]
    timing = {"raise_after_s": 3, "clear_after_s": 4}
    return parse_site(
        {
            "site": "s1",
            "buses": [{"name": "b1", "host": "127.0.0.1"}],
            "meters": meters,
            "analytics": {
                "alarms": dict.fromkeys(CODES, timing),
                "alarm_slot_s": 5,
                "meters": {
                    "m3": {"three_phase": False},
                    **{m: {"ct_primary_a": 20.0} for m in STAR if m != "m3"},
                },
            },
        }
    )


# -- the stream ---------------------------------------------------------------------


def three(v: list[float], i: list[float], pf: list[float]) -> dict[M, float]:
    out: dict[M, float] = {}
    for k in range(3):
        out[M.per_phase("voltage", k + 1)] = v[k]
        out[M.per_phase("current", k + 1)] = i[k]
        out[M.per_phase("power", k + 1)] = v[k] * i[k] * pf[k]
        out[M.per_phase("power_factor", k + 1)] = pf[k]
    return out


def condition_values(cond: str, rng: random.Random, n: int) -> dict[M, float]:
    v = [230.0 + rng.gauss(0, 0.5) for _ in range(3)]
    i = [10.0 + rng.gauss(0, 0.3) for _ in range(3)]
    pf = [0.99] * 3
    if cond == "low_pf":
        pf = [0.8] * 3
    elif cond == "overload":
        i = [25.0 + rng.gauss(0, 0.3) for _ in range(3)]
    elif cond == "erratic":
        pf = [0.55 if n % 2 else 0.95] * 3
    elif cond == "unbalance":
        v = [230.0, 221.0, 239.0]
    elif cond == "neutral":  # floating neutral, unequal star loads (Millman)
        e = [230.0, 230.0 * A**2, 230.0 * A]
        r = [5.0, 20.0, 40.0]
        vn = sum(ee / rr for ee, rr in zip(e, r, strict=True)) / sum(1 / x for x in r)
        v = [float(abs(ee - vn)) for ee in e]
        i = [x / rr for x, rr in zip(v, r, strict=True)]
        pf = [1.0] * 3
    vals = three(v, i, pf)
    if cond == "ct":
        vals[M.POWER_L2] = -vals[M.POWER_L2]
    elif cond == "vmiss":
        vals[M.VOLTAGE_L3] = 0.0
        vals[M.POWER_L3] = 0.0
    elif cond == "mismatch":
        vals[M.POWER_FACTOR_L1] = 0.6
    elif cond == "frequency":
        vals[M.FREQUENCY] = 51.0 + rng.gauss(0, 0.01)
    return vals


def meter_values(meter: str, rng: random.Random, t: float, n: int) -> dict[M, float]:
    """One reading's registers for ``meter`` at stream time ``t``."""
    if meter == "sp":  # one phase, with a signed reactive power and a total P register
        vals = {M.VOLTAGE_L1: 230.0 + rng.gauss(0, 1), M.CURRENT_L1: 5.0, M.POWER_L1: 1000.0}
        vals[M.REACTIVE_POWER_L1] = rng.choice([-400.0, 300.0, 5.0])
        vals[M.POWER] = 1000.0 + rng.gauss(0, 5)
        return vals
    if meter == "dl":
        vll = [400.0, 404.0 + rng.gauss(0, 1), 396.0] if (t // 40) % 2 else [400.0] * 3
        return three(vll, [10.0, 11.0, 9.0], [0.9, 0.92, 0.95])
    if meter == "ex":
        return three([230.0] * 3, [10.0] * 3, [-0.95] * 3)
    if meter == "wf":
        return three([231.0, 229.0, 230.0], [3.0] * 3, [0.97] * 3)
    k = int(meter[1:])
    cond = CONDITIONS[(int(t // 35) + k) % len(CONDITIONS)]
    vals = condition_values(cond, rng, n)
    if k % 3 == 1:  # a meter that reports signed reactive power
        for ph in (1, 2, 3):
            vals[M.per_phase("reactive_power", ph)] = rng.choice([1.0, -1.0]) * 800.0
    if k % 3 == 2:  # ... and one with line-to-line registers and extras
        vals[M.VOLTAGE_L1_L2] = 398.0 + rng.gauss(0, 1)
        vals[M.VOLTAGE_L2_L3] = 400.0
        vals[M.VOLTAGE_L3_L1] = 402.0
        vals.setdefault(M.FREQUENCY, 50.0 + rng.gauss(0, 0.01))
        vals[M.IMPORT_ENERGY] = 1000.0 + t
    r = rng.random()
    if r < 0.05:  # a register missing now and then
        del vals[rng.choice(list(vals))]
    elif r < 0.08:  # or not finite
        vals[rng.choice(list(vals))] = rng.choice([math.nan, math.inf, -math.inf])
    return vals


def waveform(seq: int, t: float, thd: bool, clipped: bool = False) -> Waveform:
    n = int(FS / F0 * 10)
    tt = np.arange(n) / FS
    ch: dict[str, list[float]] = {}
    for k in range(3):
        w = 2 * np.pi * F0 * tt - 2 * np.pi * k / 3
        v = 325 * np.sin(w) + (45 if thd else 3) * np.sin(5 * w)
        ch[f"v{k + 1}"] = v.tolist()
        i = 14 * np.sin(w - 0.3) + 2 * np.sin(3 * w)
        if clipped:  # a saturated CT: flat tops
            i = np.clip(20 * np.sin(w - 0.3), -14.0, 14.0)
        ch[f"i{k + 1}"] = i.tolist()
    return Waveform(
        site="s1", meter="wf", ts=T0 + timedelta(seconds=t), seq=seq, fs_hz=FS, channels=ch
    )


def stream(seed: int, seconds: float = 420.0) -> list[Reading | Waveform]:
    """Every meter's inputs merged by time: jittered steps, gaps shorter and longer
    than the slots, steps back in time; meter wf mostly sends waveforms."""
    rng = random.Random(seed)
    items: list[tuple[float, int, Reading | Waveform]] = []
    for meter in [*STAR, "dl", "ex", "sp", "wf"]:
        t, n = rng.uniform(0, 2), 0
        while t < seconds:
            r = rng.random()
            if r < 0.6:
                t += rng.choice([0.2, 0.5, 1.0, 1.7])
            elif r < 0.96:
                t += rng.expovariate(1.0)
            elif r < 0.99:
                t += rng.uniform(5.0, 90.0)
            else:
                t -= rng.uniform(0.0, 2.0)
            n += 1
            item: Reading | Waveform
            if meter == "wf" and rng.random() < 0.8:
                item = waveform(n, t, thd=(t // 30) % 2 == 1, clipped=(t // 70) % 3 == 1)
            else:
                vals = meter_values(meter, rng, t, n)
                ts = T0 + timedelta(seconds=t)
                # not validated: the engine itself treats a NaN/inf register as absent
                # (the schema refuses them where readings enter: test_entry.py)
                item = Reading.model_construct(
                    site="s1", meter=meter, ts=ts, seq=n, profile="x", values=vals
                )
            items.append((t + rng.uniform(0, 0.3), len(items), item))
    items.sort(key=lambda x: (x[0], x[1]))
    return [x[2] for x in items]


def run_batches(
    eng: SiteEngine, items: list[Reading | Waveform], sizes: Iterator[int]
) -> list[Output]:
    """Feed readings in batches of the given sizes (cut at every waveform)."""
    outs: list[Output] = []
    batch: list[Reading] = []
    want = next(sizes)
    for item in items:
        if isinstance(item, Waveform):
            outs += eng.on_readings(batch)
            batch = []
            outs.append(eng.on_waveform(item))
            continue
        batch.append(item)
        if len(batch) >= want:
            outs += eng.on_readings(batch)
            batch, want = [], next(sizes)
    return outs + eng.on_readings(batch)


# -- comparing --------------------------------------------------------------------------


def close(a: Any, b: Any, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), where
        else:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {set(a) ^ set(b)}"
        for k in a:
            close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{where}[{k}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


METRICS_FIELDS = (
    "site",
    "ts",
    "meter",
    "source",
    "interval_s",
    "values",
    "averages",
    "load",
    "quadrant",
    "harmonics",
    "source_seq",
    "aggregate",
)


def metrics_fields(m: MetricsOut, seed: int) -> dict[str, Any]:
    """Every field of the message; the seq relative to the meter's seed."""
    return {"seq": m.seq - seed, **{f: getattr(m, f) for f in METRICS_FIELDS}}


def event_fields(e: Event, seed: int) -> dict[str, Any]:
    return {
        "ts": e.ts,
        "seq": e.seq - seed,
        "meter": e.meter,
        "code": e.code,
        "phase": e.phase,
        "state": e.state,
        "severity": e.severity,
        "message": e.message,
        "evidence": e.evidence,
    }


def seeds(eng: SiteEngine, outs: list[Output]) -> dict[str, int]:
    """Each meter's seq seed (the seq before its first message)."""
    first: dict[str, int] = {}
    for out in outs:
        for m in out.metrics:
            first.setdefault(m.meter, m.seq - 1)
    return first


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [11, 12])
def test_large_batches_give_what_one_input_at_a_time_gives(seed: int) -> None:
    items = stream(seed)
    one = SiteEngine(site())
    ref = run_batches(one, items, iter(lambda: 1, 0))
    big = SiteEngine(site())
    rng = random.Random(seed)
    got = run_batches(big, items, iter(lambda: rng.choice([7, 60, 250, 1000]), 0))
    assert len(got) == len(ref) == len(items)
    s_ref, s_got = seeds(one, ref), seeds(big, got)
    raised: set[tuple[str, str]] = set()
    wire_checked = wire_holes = 0
    for k, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert len(a.metrics) == len(b.metrics), k
        for ma, mb in zip(a.metrics, b.metrics, strict=True):
            # the JSON made straight from the engine's arrays (dicts not built yet)...
            wire = encode_metrics(mb) if k % 2 == 0 else None
            close(metrics_fields(ma, s_ref[ma.meter]), metrics_fields(mb, s_got[mb.meter]), f"#{k}")
            if wire is not None:
                # ... says what the dicts say (their JSON is made by the model's rules)
                assert decode(Metrics, wire) == decode(Metrics, encode_metrics(mb)), k
                wire_checked += 1
                wire_holes += b"null" in wire.split(b'"averages"', 1)[1]
        assert len(a.events) == len(b.events), k
        for ea, eb in zip(a.events, b.events, strict=True):
            close(event_fields(ea, s_ref[ea.meter]), event_fields(eb, s_got[eb.meter]), f"#{k}")
            raised.add((ea.code, ea.state.value))
    # the stream exercises every alarm, both ways
    assert {c for c, s in raised if s == "raised"} == set(CODES + EVENTS)
    assert {c for c, s in raised if s == "cleared"} == set(CODES + EVENTS)
    assert sum(len(o.metrics) > 1 for o in ref) > 100  # 3 s / 10 min aggregates closed
    assert wire_checked > 1000 and wire_holes > 10, (wire_checked, wire_holes)  # with gaps


@pytest.mark.timeout(300)
def test_averages_equal_the_moving_averages_reference() -> None:
    """Every slot's averages equal MovingAverages fed the same values (restarted when
    a meter's averaged quantities change, as the engine does)."""
    items = stream(5, seconds=300.0)
    eng = SiteEngine(site())
    outs = run_batches(eng, items, iter(lambda: 200, 0))
    cfg = site().analytics
    refs: dict[str, tuple[set[M], MovingAverages]] = {}
    compared = 0
    for out in outs:
        m = out.metrics[0]
        known, ref = refs.get(m.meter, (set(), None))
        now = {k for k in m.values if k in AVG_COLS}
        if ref is None or not now <= known:
            known = known | now
            ref = MovingAverages(cfg.average_slots_s, len(AVG_COLS))
            refs[m.meter] = (known, ref)
        x = np.array([m.values.get(k, math.nan) for k in AVG_COLS])
        ref.add(m.ts.timestamp(), x)
        want = ref.means()
        for row, slot in enumerate(f"{s}s" for s in cfg.average_slots_s):
            got = m.averages[slot]
            for col, key in enumerate(AVG_COLS):
                if key not in known:
                    assert key not in got
                elif math.isnan(want[row, col]):
                    assert key not in got, (slot, key)
                else:
                    assert got[key] == pytest.approx(want[row, col], rel=1e-9, abs=1e-12)
                    compared += 1
    assert compared > 100_000


def random_registers(rng: random.Random) -> dict[M, float]:
    keys = [
        *(
            M.per_phase(s, n)
            for s in ("voltage", "current", "power", "power_factor")
            for n in (1, 2, 3)
        ),
        *(M.per_phase("reactive_power", n) for n in (1, 2, 3)),
        M.VOLTAGE_L1_L2,
        M.VOLTAGE_L2_L3,
        M.VOLTAGE_L3_L1,
        M.POWER,
        M.FREQUENCY,
        M.APPARENT_POWER_L1,
    ]
    vals: dict[M, float] = {}
    for k in keys:
        if rng.random() < 0.8:
            stem = k.value
            if stem.startswith("voltage"):
                vals[k] = rng.choice([0.0, 120.0, 230.0, 400.0]) + rng.gauss(0, 20)
            elif stem.startswith("power_factor"):
                vals[k] = rng.uniform(-1, 1)
            else:
                vals[k] = rng.choice([0.0, rng.gauss(0, 3000)])
            if rng.random() < 0.03:
                vals[k] = rng.choice([math.nan, math.inf])
    return vals


def test_derive_rows_equals_derive() -> None:
    rng = random.Random(3)
    dicts = [random_registers(rng) for _ in range(3000)]
    # three-phase star readings with a shifted star point: the current-sum fit runs
    for _ in range(200):
        volts = [rng.uniform(150, 300) for _ in range(3)]
        dicts.append(three(volts, [rng.uniform(1, 20) for _ in range(3)], [0.9, 0.8, 1.0]))
    sqrt3 = np.array([rng.random() < 0.3 for _ in dicts])
    x = np.full((len(dicts), len(M)), np.nan)
    for r, d in enumerate(dicts):
        for k, v in d.items():
            if math.isfinite(v):
                x[r, registers.COL[k]] = v
    got = registers.derive_rows(x, sqrt3, neutral_u0_pct=4.0)
    fits = 0
    for r, d in enumerate(dicts):
        want = oracles.derive(d, sqrt3=bool(sqrt3[r]), neutral_u0_pct=4.0)
        mine = {
            k: float(x[r, registers.COL[k]]) for k in M if not math.isnan(x[r, registers.COL[k]])
        }
        close(mine, {k: v for k, v in want.values.items() if not math.isnan(v)}, f"row {r}")
        load = {
            ph: registers.LOAD_KINDS[c]
            for ph, c in zip(("L1", "L2", "L3", "total"), got.load[r], strict=True)
            if c >= 0
        }
        quad = {
            ph: int(c)
            for ph, c in zip(("L1", "L2", "L3", "total"), got.quadrant[r], strict=True)
            if c
        }
        assert load == want.load and quad == want.quadrant, r
        pairs = {
            ph: (float(got.pf_meter[r, k]), float(got.pf_calc[r, k]))
            for k, ph in enumerate(("L1", "L2", "L3"))
            if got.pf_pair[r, k]
        }
        close(
            {k: list(v) for k, v in pairs.items()},
            {k: list(v) for k, v in want.pf_pairs.items()},
            f"pairs {r}",
        )
        assert bool(got.star[r]) == (want.star_volts is not None), r
        if want.current_ratio is None:
            assert math.isnan(got.current_ratio[r]), r
        else:
            fits += 1
            assert got.current_ratio[r] == pytest.approx(want.current_ratio, rel=1e-9)
    assert fits > 20


def test_alarm_states_equal_the_alarm_state_machine() -> None:
    rng = random.Random(8)
    timings = [
        AlarmTiming(raise_after_s=3, clear_after_s=5),
        AlarmTiming(raise_after_s=0, clear_after_s=2),
        AlarmTiming(enabled=False),
    ]
    meters = 4
    states = AlarmStates(timings, capacity=meters)
    ref = [[Alarm("x", None, tm) for tm in timings] for _ in range(meters)]
    clock = [0.0] * meters
    transitions = 0
    for _ in range(4000):
        rows = sorted(rng.sample(range(meters), rng.randint(1, meters)))
        t = []
        for r in rows:
            clock[r] += rng.choice([0.5, 1.0, 2.0, -1.0])
            t.append(clock[r])
        shape = (len(rows), len(timings))
        ev = np.array([[rng.random() < 0.9 for _ in timings] for _ in rows]).reshape(shape)
        bad = np.array([[rng.random() < 0.6 for _ in timings] for _ in rows]).reshape(shape)
        good = ~bad & np.array([[rng.random() < 0.8 for _ in timings] for _ in rows]).reshape(shape)
        fire = states.update(np.array(rows), np.array(t), ev, bad, good)
        for p, r in enumerate(rows):
            for j, alarm in enumerate(ref[r]):
                want = (
                    alarm.update(t[p], bool(bad[p, j]), bool(good[p, j]), dict)
                    if ev[p, j]
                    else None
                )
                assert bool(fire[p, j]) == (want is not None)
                assert bool(states.active[r, j]) == alarm.active
                transitions += want is not None
    assert transitions > 300


def test_meter_count_is_bounded() -> None:
    eng = SiteEngine(site(), max_meters=2)
    vals = three([230.0] * 3, [10.0] * 3, [0.99] * 3)
    rs = [
        Reading(site="s1", meter=n, ts=T0, seq=1, profile="x", values=vals)
        for n in ("m0", "m1", "m2")
    ]
    assert len(eng.on_readings(rs[:2])) == 2
    before = eng.seq("m1")
    with pytest.raises(TooManyMeters, match="'m2': already tracking 2 meters"):
        eng.on_readings(rs[1:])
    assert eng.seq("m1") == before  # nothing of the refused batch was processed
