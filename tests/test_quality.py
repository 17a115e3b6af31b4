"""Supply quality and CT health: dips, swells and interruptions (waveforms and readings),
over/undervoltage on 10-min means, frequency deviation, ct_overload and ct_saturation,
through the engine, the simulator, ``pfmon analyze`` and the running service."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from services.analytics import quality
from services.analytics import service as analytics
from services.analytics.batch import SiteEngine
from services.analytics.output import Output
from services.cli import app
from services.simulator import SimSite
from services.simulator.equipment import VFD, Heater
from shared import topics
from shared.embedded import free_port
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.messages import Event, Reading, Waveform, decode, encode
from shared.service import Shutdown
from shared.settings import Settings, parse_mqtt_url
from shared.site import SiteConfig, parse_site
from shared.site.analytics import AlarmLimits

T0 = datetime(2026, 3, 2, 6, 0, 0, tzinfo=UTC)
FS, F0 = 6400.0, 50.0
WIN = 1280  # 10 cycles: 200 ms
SQ2 = math.sqrt(2.0)


def site(wired: list[dict[str, Any]] | None = None, **analytics_: Any) -> SiteConfig:
    return parse_site(
        {
            "site": "s1",
            "buses": [{"name": "b1", "host": "127.0.0.1"}],
            "meters": wired or [{"name": "m1", "bus": "b1", "unit": 1, "profile": "pmtr001"}],
            "analytics": analytics_,
        }
    )


# -- synthetic waveforms ---------------------------------------------------------------


def envelope(n: int, start: int, dips: list[tuple[float, float, float, int | None]]) -> Any:
    """(3, n) voltage levels (1 = nominal) for samples start..start+n of a stream:
    ``dips`` are (from s, to s, level, phase index or None for all)."""
    t = (start + np.arange(n)) / FS
    lvl = np.ones((3, n))
    for a, b, level, ph in dips:
        on = (t >= a) & (t < b)
        for k in range(3) if ph is None else (ph,):
            lvl[k, on] = level
    return lvl


def windows(
    count: int,
    dips: list[tuple[float, float, float, int | None]] = (),  # type: ignore[assignment]
    current: str = "sine",
    meter: str = "wf",
) -> list[Waveform]:
    """Contiguous 200 ms windows of a 230 V / 10 A three-phase feed."""
    out = []
    for w in range(count):
        start = w * WIN
        t = (start + np.arange(WIN)) / FS
        lvl = envelope(WIN, start, dips)
        ch: dict[str, list[float]] = {}
        for k in range(3):
            x = 2 * np.pi * F0 * t - 2 * np.pi * k / 3
            ch[f"v{k + 1}"] = (SQ2 * 230 * lvl[k] * np.sin(x)).tolist()
            ch[f"i{k + 1}"] = current_shape(current, x).tolist()
        out.append(
            Waveform(
                site="s1",
                meter=meter,
                ts=T0 + timedelta(seconds=start / FS),
                seq=w + 1,
                fs_hz=FS,
                channels=ch,  # type: ignore[arg-type]
            )
        )
    return out


def current_shape(kind: str, x: Any) -> Any:
    """10 A RMS-ish currents: a sine, a CT clipped at 70 % of its peak, a 6-pulse
    drive with THD-I ~35 % (5th 30 %, 7th 15 %, 11th 7 %, 13th 5 %), or the 120°
    blocks of a drive with a large DC choke."""
    lag = x - 0.3
    if kind == "sine":
        return SQ2 * 10 * np.sin(lag)
    if kind == "clipped":
        return np.clip(SQ2 * 14 * np.sin(lag), -0.7 * SQ2 * 14, 0.7 * SQ2 * 14)
    if kind == "vfd":
        spec = ((1, 1.0), (5, 0.30), (7, 0.15), (11, 0.07), (13, 0.05))
        return SQ2 * 10 * sum(a * np.sin(h * lag) for h, a in spec)
    if kind == "smps":  # single-phase rectifiers: narrow pulses at the voltage's peaks
        s = np.sin(x)
        return 30 * np.where(np.abs(s) > 0.85, np.sign(s) * (np.abs(s) - 0.85), 0.0) / 0.15
    if kind == "blocks":
        return 12 * np.where(np.abs(np.sin(lag)) >= 0.5, np.sign(np.sin(lag)), 0.0)
    raise AssertionError(kind)


def feed(eng: SiteEngine, items: list[Waveform] | list[Reading]) -> list[Event]:
    out: list[Output] = []
    for item in items:
        if isinstance(item, Waveform):
            out.append(eng.on_waveform(item))
        else:
            out += eng.on_readings([item])
    return [e for o in out for e in o.events]


def pairs(events: list[Event], code: str) -> list[tuple[Event, Event]]:
    """The (raised, cleared) events of ``code``, by phase, in order."""
    open_: dict[str | None, Event] = {}
    done = []
    for e in events:
        if e.code != code:
            continue
        if e.state == "raised":
            assert e.phase not in open_, f"{code} raised twice on {e.phase}"
            open_[e.phase] = e
        else:
            done.append((open_.pop(e.phase), e))
    assert not open_, f"{code} still open on {list(open_)}"
    return done


def test_half_cycle_rms_follows_a_dip_within_half_a_cycle() -> None:
    t = np.arange(3200) / FS
    lvl = np.where((t >= 0.1) & (t < 0.2), 0.7, 1.0)
    v = (SQ2 * 230 * lvl * np.sin(2 * np.pi * F0 * t))[None]
    centres, u = quality.half_cycle_rms(v, FS, F0)
    assert np.allclose(np.diff(centres), 0.01)
    inside = (centres > 0.11) & (centres < 0.19)
    assert np.allclose(u[inside, 0], 161.0, rtol=1e-3)
    outside = (centres < 0.09) | (centres > 0.21)
    assert np.allclose(u[outside, 0], 230.0, rtol=1e-3)


def test_a_100_ms_dip_to_70_pct_across_two_windows_is_one_event() -> None:
    # from 150 ms to 250 ms on L1: crosses the boundary of the first two windows
    eng = SiteEngine(site())
    events = feed(eng, windows(3, [(0.15, 0.25, 0.7, 0)]))
    dips = pairs(events, "voltage_dip")
    assert len(dips) == 1
    raised, cleared = dips[0]
    assert raised.phase == cleared.phase == "L1" and raised.severity == "warning"
    ev = cleared.evidence
    assert ev["duration_s"] == pytest.approx(0.1, abs=0.02)
    assert ev["residual_v"] == pytest.approx(161.0, rel=0.01)
    assert ev["residual_pct"] == pytest.approx(70.0, abs=1)
    assert ev["resolution_s"] == pytest.approx(0.01, rel=0.02)  # half a (tracked) cycle
    assert ev["source"] == "waveform"
    start = datetime.fromisoformat(str(ev["start"]))
    assert abs((start - T0).total_seconds() - 0.15) <= 0.011
    assert raised.ts == start and cleared.ts > start
    assert {e.code for e in events} == {"voltage_dip"}  # no swell, no interruption


def test_windows_apart_widen_the_resolution_and_time_never_runs_back() -> None:
    # one 200 ms window a second: a dip to the end of the first window ends somewhere
    # in the 800 ms nobody saw
    eng = SiteEngine(site())
    first, second = windows(1, [(0.1, 0.2, 0.5, None)])[0], windows(1)[0]
    second = second.model_copy(update={"ts": T0 + timedelta(seconds=1.0), "seq": 2})
    dips = pairs(feed(eng, [first, second]), "voltage_dip")
    assert len(dips) == 3
    ev = dips[0][1].evidence
    # from the last half cycle seen (centred at ~0.19 s) to the next (1.01 s)
    assert ev["resolution_s"] == pytest.approx(0.82, abs=0.02)
    assert ev["duration_s"] == pytest.approx(0.91, abs=0.02)  # to the first sample seen
    # a reading from before the dip started ends it, with no negative duration
    tracker = quality.Excursions(quality.Bands.of(230.0, AlarmLimits()))
    got = tracker.feed("m", np.array([10.0]), np.array([[150.0]]), 1.0, "registers")
    got += tracker.feed("m", np.array([9.0]), np.array([[230.0]]), 1.0, "registers")
    assert [s.value for s, _ in got] == ["raised", "cleared"]
    assert got[1][1].duration_s == 0.0 and got[1][1].end == 10.0


def test_swell_and_interruption_carry_their_peak_and_residual() -> None:
    eng = SiteEngine(site())
    dips = [(0.05, 0.11, 1.2, 2), (0.3, 0.6, 0.0, None)]
    events = feed(eng, windows(5, dips))
    ((_, swell),) = pairs(events, "voltage_swell")
    assert swell.phase == "L3" and swell.evidence["peak_v"] == pytest.approx(276.0, rel=0.01)
    assert swell.evidence["duration_s"] == pytest.approx(0.06, abs=0.02)
    cuts = pairs(events, "interruption")
    assert sorted(c.phase or "" for _, c in cuts) == ["L1", "L2", "L3"]
    for raised, cleared in cuts:
        assert raised.severity == "critical"
        assert cleared.evidence["residual_v"] == pytest.approx(0.0, abs=1e-6)
        assert cleared.evidence["duration_s"] == pytest.approx(0.3, abs=0.02)
    # the 300 ms covers one window (200-400 ms... 400-600 ms) with no voltage at all: it
    # has no fundamental to analyse, yet the interruption runs through it
    assert len(pairs(events, "voltage_dip")) == 3


def test_a_blown_l1_fuse_is_an_interruption_on_l1_though_its_windows_have_no_metrics() -> None:
    eng = SiteEngine(site())
    outs = [eng.on_waveform(w) for w in windows(5, [(0.2, 0.6, 0.0, 0)])]
    assert [len(o.metrics) for o in outs] == [1, 0, 0, 1, 1]  # L1 carries the frequency
    events = [e for o in outs for e in o.events]
    ((_, cut),) = pairs(events, "interruption")
    assert cut.phase == "L1" and cut.evidence["duration_s"] == pytest.approx(0.4, abs=0.02)
    assert {(e.code, e.phase) for e in events} == {("interruption", "L1"), ("voltage_dip", "L1")}


def test_a_clipped_ct_raises_ct_saturation_and_a_6_pulse_drive_does_not() -> None:
    eng = SiteEngine(site())
    vfd = [eng.on_waveform(w) for w in windows(4, current="vfd")]
    thd = vfd[-1].metrics[0].value(M.THD_CURRENT_L1)
    assert thd is not None and 30 <= thd <= 40
    blocks = [eng.on_waveform(w) for w in windows(4, current="blocks", meter="blk")]
    thd_b = blocks[-1].metrics[0].value(M.THD_CURRENT_L1)
    assert thd_b is not None and thd_b > 25
    smps = [eng.on_waveform(w) for w in windows(4, current="smps", meter="it")]
    h3 = smps[-1].metrics[0].harmonics["i1"][2] / smps[-1].metrics[0].harmonics["i1"][0]
    assert h3 > 0.5  # a large 3rd harmonic, but in peaks, not flat tops
    assert [e.code for o in vfd + blocks + smps for e in o.events] == []
    clipped = [eng.on_waveform(w) for w in windows(2, current="clipped", meter="sat")]
    ev = [e for o in clipped for e in o.events if e.code == "ct_saturation"]
    assert sorted(e.phase or "" for e in ev) == ["L1", "L2", "L3"]
    assert all(e.state == "raised" and e.severity == "critical" for e in ev)
    x = ev[0].evidence
    assert x["crest_factor_i"] < x["crest_factor_v"] - 0.08  # type: ignore[operator]
    assert x["flat_top_share"] > 0.3 and x["h3_pct"] > 5  # type: ignore[operator]


# -- readings ----------------------------------------------------------------------------


def reading(meter: str, t: float, v: float | list[float], seq: int, **extra: float) -> Reading:
    volts = v if isinstance(v, list) else [v] * 3
    vals: dict[M, float] = {}
    for k, vk in enumerate(volts):
        vals[M.per_phase("voltage", k + 1)] = vk
        vals[M.per_phase("current", k + 1)] = extra.get("i", 10.0)
        vals[M.per_phase("power", k + 1)] = vk * extra.get("i", 10.0) * 0.99
    if "f" in extra:
        vals[M.FREQUENCY] = extra["f"]
    return Reading(
        site="s1", meter=meter, ts=T0 + timedelta(seconds=t), seq=seq, profile="x", values=vals
    )


def test_brown_out_and_black_out_from_1_hz_registers() -> None:
    eng = SiteEngine(site())
    volts = [230.0] * 5 + [190.0, 185.0, 195.0] + [230.0] * 3 + [0.0] * 4 + [230.0] * 3
    events = feed(eng, [reading("m1", float(k), v, k) for k, v in enumerate(volts)])
    dips = pairs(events, "voltage_dip")
    assert len(dips) == 2 * 3  # each phase: the brown-out, then the dip around the black-out
    first = [c for _, c in dips if c.evidence["residual_v"] == 185.0]
    assert len(first) == 3
    ev = first[0].evidence
    assert ev["kind"] == "brown-out" and ev["source"] == "registers"
    assert ev["duration_s"] == 3.0 and ev["resolution_s"] == 1.0
    cuts = pairs(events, "interruption")
    assert len(cuts) == 3
    assert cuts[0][1].evidence["kind"] == "black-out"
    assert cuts[0][1].evidence["duration_s"] == 4.0


def test_brown_out_resolution_is_the_poll_gap() -> None:
    eng = SiteEngine(site())
    items = [reading("m1", 0.0, 230.0, 1), reading("m1", 5.0, 180.0, 2)]
    items += [reading("m1", 15.0, 230.0, 3)]
    (raised, cleared), *_ = pairs(feed(eng, items), "voltage_dip")
    assert raised.evidence["resolution_s"] == 5.0
    assert cleared.evidence["resolution_s"] == 10.0 and cleared.evidence["duration_s"] == 10.0


def ten_minutes(eng: SiteEngine, levels: list[float], seq0: int = 0) -> list[Event]:
    """A reading every 10 s, one 10-min interval per level."""
    items = []
    for block, v in enumerate(levels):
        for k in range(60):
            t = block * 600.0 + k * 10.0 + 1.0
            items.append(reading("m1", t, v, seq0 + len(items) + 1))
    items.append(reading("m1", len(levels) * 600.0 + 1.0, 230.0, seq0 + len(items) + 1))
    return feed(eng, items)


def test_overvoltage_on_10_min_means_with_hysteresis() -> None:
    # 255 V > 253 (nominal + 10 %): raised when the interval closes; 251 V is inside the
    # 1 % hysteresis (clears at or below 250.7 V): still raised; 249 V clears
    eng = SiteEngine(site())
    events = [e for e in ten_minutes(eng, [230.0, 255.0, 251.0, 249.0]) if e.phase == "L1"]
    ov = [e for e in events if e.code == "overvoltage"]
    assert [e.state for e in ov] == ["raised", "cleared"]
    assert ov[0].ts == T0 + timedelta(seconds=1201)  # the first reading after 20 min
    assert ov[0].evidence["mean_10min_v"] == pytest.approx(255.0)
    assert ov[0].evidence["limit_v"] == pytest.approx(253.0)
    assert ov[1].ts == T0 + timedelta(seconds=2401)
    assert ov[1].evidence["mean_10min_v"] == pytest.approx(249.0)
    # each reading above 253 V is a swell too: one, until the 230 V reading at the end
    # (251 and 249 V are inside the swell's 2 % hysteresis: it ends at or below 248.4 V)
    swells = pairs(events, "voltage_swell")
    assert [c.evidence["duration_s"] for _, c in swells] == [1800.0]
    assert {e.code for e in events} == {"overvoltage", "voltage_swell"}


def test_undervoltage_on_10_min_means_with_hysteresis() -> None:
    eng = SiteEngine(site())
    events = ten_minutes(eng, [205.0, 208.0, 210.0])
    uv = [e for e in events if e.code == "undervoltage" and e.phase == "L2"]
    assert [e.state for e in uv] == ["raised", "cleared"]
    assert uv[0].evidence["deviation_pct"] == pytest.approx(-10.87, abs=0.01)
    assert uv[1].evidence["mean_10min_v"] == pytest.approx(210.0)
    # a site with a lower nominal voltage does not see 205 V as under
    eng2 = SiteEngine(parse_site({"site": "s1", "thresholds": {"nominal_voltage_v": 220}}))
    assert [e for e in ten_minutes(eng2, [205.0, 230.0]) if e.code == "undervoltage"] == []


def test_frequency_deviation_normal_and_extreme_bands() -> None:
    eng = SiteEngine(site(alarm_slot_s=5, average_slots_s=[5]))
    freqs = [50.0] * 10 + [50.6] * 12 + [50.45] * 20 + [50.0] * 20 + [46.8] * 15
    items = [reading("m1", float(k), 230.0, k, f=f) for k, f in enumerate(freqs)]
    fd = [e for e in feed(eng, items) if e.code == "frequency_deviation"]
    assert [e.state for e in fd] == ["raised", "cleared", "raised"]
    assert fd[0].evidence["band"] == "normal"
    assert fd[0].evidence["deviation_pct"] > 1.0  # type: ignore[operator]
    # 50.45 Hz (0.9 %) is inside the hysteresis: the clear waits for 50.0 Hz
    assert fd[1].ts >= T0 + timedelta(seconds=40)
    assert fd[2].evidence["band"] == "extreme"
    assert fd[2].evidence["deviation_pct"] < -6.0  # type: ignore[operator]


def test_ct_overload_against_the_rated_primary_with_the_ct_ratio() -> None:
    meters = [
        {"name": "m1", "bus": "b1", "unit": 1, "profile": "pmtr001", "ct_ratio": "400/5"},
        {"name": "m2", "bus": "b1", "unit": 2, "profile": "pmtr001", "ct_ratio": "400/5"},
    ]
    eng = SiteEngine(site(meters, meters={"m1": {"ct_primary_a": 400}}))
    amps = [300.0] * 5 + [420.0] * 15 + [385.0] * 40 + [370.0] * 40
    items = [reading("m1", float(k), 230.0, k, i=a) for k, a in enumerate(amps)]
    items += [reading("m2", float(k), 230.0, k, i=a) for k, a in enumerate(amps)]
    ov = [e for e in feed(eng, items) if e.code == "ct_overload" and e.phase == "L1"]
    assert [(e.meter, e.state) for e in ov] == [("m1", "raised"), ("m1", "cleared")]
    assert ov[0].ts == T0 + timedelta(seconds=15)  # 420 A from 5 s, held 10 s
    ev = ov[0].evidence
    assert ev["current_a"] == 420.0 and ev["ct_primary_a"] == 400.0 and ev["ct_ratio"] == 80.0
    assert ev["secondary_a"] == pytest.approx(5.25) and ev["load_pct"] == pytest.approx(105.0)
    # 385 A is inside the 5 % hysteresis: the clear starts with 370 A (at 60 s) + 30 s
    assert ov[1].ts == T0 + timedelta(seconds=90)


def test_an_mv_meter_is_judged_against_its_own_nominal_voltage() -> None:
    meters = [
        {"name": "mv", "bus": "b1", "unit": 1, "profile": "sdm630", "pt_ratio": "11000/110"},
        {"name": "lv", "bus": "b1", "unit": 2, "profile": "pmtr001"},
    ]
    eng = SiteEngine(site(meters, meters={"mv": {"nominal_voltage_v": 6351}}))
    items = [reading("mv", float(k), v, k) for k, v in enumerate([6350.0] * 3 + [5500.0] * 2)]
    items += [reading("mv", 5.0, 6350.0, 5), reading("lv", 0.0, 230.0, 1)]
    events = feed(eng, items)
    dips = pairs(events, "voltage_dip")
    assert len(dips) == 3 and {e.meter for e, _ in dips} == {"mv"}
    assert dips[0][1].evidence["residual_pct"] == pytest.approx(86.6, abs=0.1)
    assert dips[0][1].evidence["nominal_v"] == 6351
    assert {e.code for e in events} == {"voltage_dip"}  # 6350 V is no swell there
    # 10-min means too: 6000 V is 5.5 % under the MV nominal, no undervoltage
    levels = [6000.0, 6000.0]
    mv = [reading("mv", b * 600.0 + k * 10.0 + 10.0, v, 100 + b * 60 + k)
          for b, v in enumerate(levels) for k in range(60)]  # fmt: skip
    assert [e.code for e in feed(eng, mv)] == []


def test_limits_are_checked_with_their_names() -> None:
    with pytest.raises(ValueError, match="interruption_pct must be below dip_pct"):
        AlarmLimits(dip_pct=4.0)
    with pytest.raises(ConfigError, match=r"analytics.meters.m1.ct_primary_a: Input should be"):
        site(meters={"m1": {"ct_primary_a": 0}})


def test_disabled_supply_events_are_not_followed() -> None:
    eng = SiteEngine(site(alarms={"voltage_dip": {"enabled": False}}))
    events = feed(eng, windows(3, [(0.15, 0.25, 0.7, 0)]))
    assert events == []


# -- the simulator ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sim() -> tuple[SimSite, Clock]:
    clock = Clock()
    s = SimSite(seed=3, clock=clock)
    s.add_load(VFD("drive", 30.0))
    s.add_load(Heater("oven", 20.0))
    s.add_meter(1, "drive", loads=["drive"], bank=False)
    s.add_meter(2, "main", profile="sdm630", bank=False)
    return s, clock


def sim_windows(s: SimSite, clock: Clock, unit: int, count: int, first: int = 0) -> list[Waveform]:
    out = []
    for k in range(count):
        wf = s.waveform(unit, "s1", first + k + 1)
        out.append(wf.model_copy(update={"ts": T0 + timedelta(seconds=clock.t - 1000.0)}))
        clock.t += 0.2  # the windows follow one another
        s.tick()
    return out


def test_simulator_drive_current_is_no_saturation_until_its_ct_clips() -> None:
    s, clock = sim()
    eng = SiteEngine(site([{"name": "drive", "bus": "b1", "unit": 1, "profile": "pmtr001"}]))
    outs = [eng.on_waveform(w) for w in sim_windows(s, clock, 1, 5)]
    thd = outs[-1].metrics[0].value(M.THD_CURRENT_L1)
    assert thd is not None and thd > 30
    assert [e.code for o in outs for e in o.events] == []
    s.inject("ct_saturation", 1, phase=2, clip_pct=60)
    outs = [eng.on_waveform(w) for w in sim_windows(s, clock, 1, 2, 5)]
    ev = [e for o in outs for e in o.events]
    assert [(e.code, e.phase, e.state) for e in ev] == [("ct_saturation", "L2", "raised")]
    # the readings of a clipping CT lose current
    full = s.meter_values(1)[M.CURRENT_L1]
    assert s.meter_values(1)[M.CURRENT_L2] < 0.9 * full


def test_simulator_dip_in_waveforms_and_brown_out_in_readings() -> None:
    s, clock = sim()
    eng = SiteEngine(site([{"name": "main", "bus": "b1", "unit": 2, "profile": "sdm630"}]))
    items: list[Waveform] = sim_windows(s, clock, 2, 2)
    clock.t += 0.05
    s.inject("supply_voltage", 2, duration_s=0.12, level_pct=60, phase=1)
    clock.t -= 0.05  # the window starts 50 ms before the dip
    items += sim_windows(s, clock, 2, 3, 2)
    ((_, dip),) = pairs(feed(eng, items), "voltage_dip")
    assert dip.phase == "L1" and dip.evidence["duration_s"] == pytest.approx(0.12, abs=0.02)
    assert dip.evidence["residual_pct"] == pytest.approx(60.0, abs=2)
    # the same fault held for seconds, polled at 1 Hz: a brown-out in the readings
    s2, clock2 = sim()
    eng2 = SiteEngine(site([{"name": "main", "bus": "b1", "unit": 2, "profile": "sdm630"}]))
    rs = []
    for k in range(12):
        if k == 3:
            s2.inject("supply_voltage", 2, duration_s=4.5, level_pct=80)
        vals = s2.meter_values(2)
        ts = T0 + timedelta(seconds=k)
        rs.append(Reading(site="s1", meter="main", ts=ts, seq=k, profile="sdm630", values=vals))
        clock2.t += 1.0
        s2.tick()
    browns = pairs(feed(eng2, rs), "voltage_dip")
    assert len(browns) == 3
    assert all(c.evidence["kind"] == "brown-out" for _, c in browns)
    assert all(c.evidence["duration_s"] == 5.0 for _, c in browns)


# -- pfmon analyze -----------------------------------------------------------------------


def capture(path: Path, current: str, dips: list[tuple[float, float, float, int | None]]) -> Path:
    n = 6400  # 1 s
    t = np.arange(n) / FS
    lvl = envelope(n, 0, dips)
    cols = {}
    for k in range(3):
        x = 2 * np.pi * F0 * t - 2 * np.pi * k / 3
        cols[f"v{k + 1}"] = SQ2 * 230 * lvl[k] * np.sin(x)
    for k in range(3):
        x = 2 * np.pi * F0 * t - 2 * np.pi * k / 3
        cols[f"i{k + 1}"] = current_shape(current, x)
    lines = [",".join(cols)] + [",".join(f"{cols[c][j]:.6g}" for c in cols) for j in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def analyze(path: Path) -> dict[str, Any]:
    res = CliRunner().invoke(app, ["analyze", str(path), "--fs", str(FS), "--json"])
    assert res.exit_code == 0, res.output
    data: dict[str, Any] = orjson.loads(res.output)
    return data


def test_pfmon_analyze_lists_supply_events_and_ct_saturation(tmp_path: Path) -> None:
    data = analyze(capture(tmp_path / "dip.csv", "vfd", [(0.3, 0.4, 0.7, 1), (0.8, 1.0, 0.5, 0)]))
    ev = data["events"]
    dips = [e for e in ev if e["code"] == "voltage_dip"]
    assert [e["phase"] for e in dips] == ["L2", "L1"]
    assert dips[0]["evidence"]["start"] == pytest.approx(0.3, abs=0.02)
    assert dips[0]["evidence"]["duration_s"] == pytest.approx(0.1, abs=0.02)
    assert dips[0]["evidence"]["residual_v"] == pytest.approx(161.0, rel=0.01)
    # the second dip lasts to the end of the capture
    assert dips[1]["evidence"]["duration_s"] is None and dips[1]["evidence"]["ongoing"]
    assert "ct_saturation" not in [e["code"] for e in ev]
    clipped = analyze(capture(tmp_path / "sat.csv", "clipped", []))
    sat = [e for e in clipped["events"] if e["code"] == "ct_saturation"]
    assert [e["phase"] for e in sat] == ["L1", "L2", "L3"]
    assert sat[0]["severity"] == "critical" and sat[0]["evidence"]["flat_top_share"] > 0.3
    assert [e for e in clipped["events"] if e["code"] == "voltage_dip"] == []
    assert [e for e in clipped["events"] if e["code"] == "frequency_deviation"] == []


def test_pfmon_analyze_judges_the_captures_frequency(tmp_path: Path) -> None:
    n = 6400
    t = np.arange(n) / FS
    cols = {
        "v": SQ2 * 230 * np.sin(2 * np.pi * 46.5 * t),
        "i": SQ2 * 5 * np.sin(2 * np.pi * 46.5 * t),
    }
    lines = ["v,i"] + [f"{cols['v'][j]:.6g},{cols['i'][j]:.6g}" for j in range(n)]
    (tmp_path / "f.csv").write_text("\n".join(lines) + "\n")
    (fd,) = [e for e in analyze(tmp_path / "f.csv")["events"] if e["code"] == "frequency_deviation"]
    assert fd["evidence"]["band"] == "extreme"
    assert fd["evidence"]["frequency_hz"] == pytest.approx(46.5, abs=0.01)


# -- the running service -----------------------------------------------------------------


async def test_service_publishes_dip_and_brown_out_events(
    settings: Settings, site_name: str
) -> None:
    cfg = parse_site(
        {
            "site": site_name,
            "analytics": {"meters": {"m1": {}, "wf": {}}},
        }
    )
    shutdown = Shutdown()
    target = parse_mqtt_url(settings.mqtt_url)
    got: list[Event] = []
    svc = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-q"})
    task = asyncio.create_task(analytics.run(svc, cfg, shutdown))
    try:
        async with aiomqtt.Client(target.host, target.port) as client:
            await client.subscribe(topics.pattern(topics.Kind.EVENT, site_name), qos=1)
            await shutdown.wait_ready(15)
            for wf in windows(3, [(0.15, 0.25, 0.7, 0)]):
                wf = wf.model_copy(update={"site": site_name})
                await client.publish(topics.waveform(site_name, "wf"), encode(wf), qos=1)
            for k, v in enumerate([230.0, 230.0, 150.0, 150.0, 230.0]):
                r = reading("m1", float(k), v, k).model_copy(update={"site": site_name})
                await client.publish(topics.reading(site_name, "m1"), encode(r), qos=1)

            async def collect() -> None:
                async for msg in client.messages:
                    got.append(decode(Event, bytes(msg.payload)))  # type: ignore[arg-type]
                    done = {(e.meter, e.code, e.state) for e in got}
                    if {("wf", "voltage_dip", "cleared"), ("m1", "voltage_dip", "cleared")} <= (
                        done
                    ) and len([e for e in got if e.meter == "m1"]) >= 6:
                        return

            await asyncio.wait_for(collect(), 20)
    finally:
        shutdown.request("test done")
        await asyncio.wait_for(task, 10)
    wf_dip = [e for e in got if e.meter == "wf" and e.state == "cleared"]
    assert [(e.code, e.phase) for e in wf_dip] == [("voltage_dip", "L1")]
    assert wf_dip[0].evidence["duration_s"] == pytest.approx(0.1, abs=0.02)
    brown = [e for e in got if e.meter == "m1" and e.state == "cleared"]
    assert sorted(e.phase or "" for e in brown) == ["L1", "L2", "L3"]
    assert all(e.evidence["kind"] == "brown-out" for e in brown)
    assert all(e.evidence["duration_s"] == 2.0 for e in brown)


async def test_pfmon_simulate_with_a_clipping_ct_raises_ct_saturation_in_the_service(
    settings: Settings, site_name: str
) -> None:
    """The whole path: ``pfmon simulate --fault 1:ct_saturation:phase=2 --waveform-site``
    publishes its windows to the broker, the running service raises ct_saturation."""
    cfg = parse_site({"site": site_name, "analytics": {"meters": {"meter1": {}}}})
    shutdown = Shutdown()
    target = parse_mqtt_url(settings.mqtt_url)
    got: list[Event] = []
    svc = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-s"})
    task = asyncio.create_task(analytics.run(svc, cfg, shutdown))
    env = {**os.environ, "PFM_MQTT_URL": settings.mqtt_url}
    env["PFM_MQTT_CLIENT_ID"] = f"{settings.mqtt_client_id}-sim"
    proc = None
    try:
        async with aiomqtt.Client(target.host, target.port) as client:
            await client.subscribe(topics.pattern(topics.Kind.EVENT, site_name), qos=1)
            await shutdown.wait_ready(15)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", "simulate", "--port", str(free_port()),
                "--meters", "1", "--fault", "1:ct_saturation:phase=2",
                "--waveform-site", site_name, "--waveform-every", "0.2", "--duration", "20",
                env=env, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip

            async def collect() -> None:
                async for msg in client.messages:
                    got.append(decode(Event, bytes(msg.payload)))  # type: ignore[arg-type]
                    if any(e.code == "ct_saturation" for e in got):
                        return

            await asyncio.wait_for(collect(), 20)
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        shutdown.request("test done")
        await asyncio.wait_for(task, 10)
    sat = [e for e in got if e.code == "ct_saturation"]
    assert [(e.meter, e.phase, e.state) for e in sat] == [("meter1", "L2", "raised")]
    assert sat[0].evidence["flat_top_share"] > 0.3  # type: ignore[operator]
    assert [e.code for e in got if e.code != "ct_saturation"] == []
