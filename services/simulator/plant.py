"""The plant model: a supply feeding loads, meters that measure them, faults.

:class:`SimSite` holds the equipment (:mod:`services.simulator.equipment`), the
meters (unit id -> :class:`SimMeter`) and a schedule of faults; it answers what a
metering point measures now (:meth:`SimSite.measure`, load convention, SI), the
noise-free :class:`PlantState` for tests and controllers, and waveform windows.
Reproducible: every random draw comes from ``random.Random(seed)``.
"""

from __future__ import annotations

import cmath
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.collector import profiles as prof
from services.simulator.equipment import CapacitorBank, Load, RelayIO, Supply
from shared.measurements import Measurement as M
from shared.messages import Waveform, utcnow

log = logging.getLogger(__name__)

__all__ = ["FAULTS", "MeterState", "PlantState", "SimMeter", "SimSite", "retotal"]

#: faults a meter can be given: name -> what it does
FAULTS = {
    "broken_neutral": "star point floats: lightly loaded phases rise, heavy ones sag",
    "reversed_ct": "the CT of `phase` is mounted backwards: P and Q of that phase negated",
    "blown_fuse": "the voltage fuse of `phase` is blown: that phase reads ~0 V and no current",
    "comm_loss": "the device does not answer (requests time out)",
    "slow": "the device answers after `delay_s` seconds",
    "exception": "the device answers every read with Modbus exception `code`",
    "sensor_fail": "PMTR_001 firmware: a failed sensor read is stored as 0",
    "flaky": "every `every`-th request (default 3) is answered with exception 0x0B",
    "supply_voltage": "the supply at the meter is at `level_pct` % of its voltage (70: a dip, "
    "120: a swell, 0: an interruption) on `phase` (default all); waveform windows show it "
    "from the sample where it starts to the one where its `duration_s` ends",
    "ct_saturation": "the CT of `phase` (default all) clips the secondary current at "
    "`clip_pct` (default 70) % of its peak: flat tops in waveforms, a lower RMS in readings",
}

_PHASE_SHIFT = (0.0, -2 * math.pi / 3, 2 * math.pi / 3)


@dataclass
class MeterState:
    """What one meter measures right now (noise-free totals, SI)."""

    name: str
    unit: int
    p_w: float
    q_var: float
    s_va: float
    pf: float
    values: dict[M, float]


@dataclass
class PlantState:
    """The plant as a whole (the supply point), for tests and controllers."""

    p_w: float
    q_var: float
    s_va: float
    pf: float
    bank_steps: list[int]
    bank_kvar: float
    meters: dict[str, MeterState]


class _Source(Protocol):
    def sample(self, site: SimSite, t: float, rng: random.Random) -> dict[M, float]: ...


@dataclass
class _LoadMeter:
    """A meter that measures a set of loads (and the bank when ``bank``)."""

    loads: list[str] | None  # None = every load of the site
    bank: bool = True

    def sample(self, site: SimSite, t: float, rng: random.Random) -> dict[M, float]:
        return site.measure(self.loads, self.bank, t, rng)


@dataclass
class SimMeter:
    unit: int
    name: str
    profile: prof.Profile
    source: _Source
    rng: random.Random
    phase_fault: dict[str, int] = field(default_factory=dict)
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    energy_wh: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    q_energy: list[float] = field(default_factory=lambda: [0.0, 0.0])  # ind, cap
    export_wh: float = 0.0
    last_t: float | None = None
    #: PMTR_001 time sync: the device clock's offset from the model clock (s)
    clock_epoch: int | None = None
    sync_regs: dict[int, int] = field(default_factory=dict)
    sync_coil: bool = False
    #: per fault, the model times it holds (waveform windows apply it sample by sample)
    fault_span: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: register reads answered with values / every request received
    reads: int = 0
    requests: int = 0

    def values(self, site: SimSite, t: float) -> dict[M, float]:
        v = self.source.sample(site, t, self.rng)
        _apply_faults(v, self.faults)
        if self.profile.phases == 1:
            _single_phase(v)
        dt = 0.0 if self.last_t is None else max(0.0, t - self.last_t)
        self.last_t = t
        for ph in range(3):
            p = v.get(M.per_phase("power", ph + 1), 0.0)
            self.energy_wh[ph] += max(p, 0.0) * dt / 3600.0
        p_tot = v.get(M.POWER, 0.0)
        q_tot = v.get(M.REACTIVE_POWER, 0.0)
        self.export_wh += max(-p_tot, 0.0) * dt / 3600.0
        self.q_energy[0 if q_tot >= 0 else 1] += abs(q_tot) * dt / 3600.0
        for ph in range(3):
            v[M.per_phase("import_energy", ph + 1)] = self.energy_wh[ph]
        v[M.IMPORT_ENERGY] = sum(self.energy_wh)
        v[M.EXPORT_ENERGY] = self.export_wh
        v[M.REACTIVE_ENERGY_IND] = self.q_energy[0]
        v[M.REACTIVE_ENERGY_CAP] = self.q_energy[1]
        v[M.APPARENT_ENERGY] = math.hypot(sum(self.energy_wh), sum(self.q_energy))
        return v


def _phases_of(params: Mapping[str, Any]) -> tuple[int, ...]:
    ph = params.get("phase")
    return (1, 2, 3) if ph is None else (int(ph),)


def clipped_rms(clip: float) -> float:
    """RMS of a unit-RMS sine clipped at ``clip`` times its peak."""
    if clip >= 1.0:
        return 1.0
    th = math.asin(max(clip, 0.0))
    mean_sq = (2 / math.pi) * (th / 2 - math.sin(2 * th) / 4 + clip * clip * (math.pi / 2 - th))
    return math.sqrt(2.0 * mean_sq)


def _apply_faults(v: dict[M, float], faults: Mapping[str, Mapping[str, Any]]) -> None:
    if "supply_voltage" in faults:
        # the loads draw the same current (their power follows the voltage)
        k = float(faults["supply_voltage"].get("level_pct", 70.0)) / 100.0
        for ph in _phases_of(faults["supply_voltage"]):
            for stem in ("voltage", "power", "reactive_power", "apparent_power"):
                key = M.per_phase(stem, ph)
                if key in v:
                    v[key] *= k
            if k == 0.0:
                for stem in ("current", "power_factor"):
                    v[M.per_phase(stem, ph)] = 0.0
        retotal(v)
    if "ct_saturation" in faults:
        k = clipped_rms(float(faults["ct_saturation"].get("clip_pct", 70.0)) / 100.0)
        for ph in _phases_of(faults["ct_saturation"]):
            for stem in ("current", "power", "reactive_power", "apparent_power"):
                key = M.per_phase(stem, ph)
                if key in v:
                    v[key] *= k
        retotal(v)
    if "blown_fuse" in faults:
        ph = int(faults["blown_fuse"].get("phase", 1))
        for stem in ("voltage", "current", "power", "reactive_power", "apparent_power"):
            v[M.per_phase(stem, ph)] = 0.0
        v[M.per_phase("voltage", ph)] = 3.0  # a little backfeed through the loads
        v[M.per_phase("power_factor", ph)] = 0.0
        retotal(v)
    if "reversed_ct" in faults:
        ph = int(faults["reversed_ct"].get("phase", 1))
        for stem in ("power", "reactive_power", "power_factor"):
            key = M.per_phase(stem, ph)
            v[key] = -v.get(key, 0.0)
        retotal(v)
    if "broken_neutral" in faults:
        currents = [v.get(M.per_phase("current", ph), 0.0) for ph in (1, 2, 3)]
        mean = sum(currents) / 3 or 1.0
        for ph in (1, 2, 3):
            k = 1.0 + 0.6 * (mean - currents[ph - 1]) / mean
            k = min(1.7, max(0.4, k))
            key = M.per_phase("voltage", ph)
            v[key] = v.get(key, 0.0) * k
        v[M.NEUTRAL_CURRENT] = 0.0


def _single_phase(v: dict[M, float]) -> None:
    """A single-phase meter sits on L1: its totals are the L1 values."""
    for stem, total in (
        ("power", M.POWER),
        ("reactive_power", M.REACTIVE_POWER),
        ("apparent_power", M.APPARENT_POWER),
        ("power_factor", M.POWER_FACTOR),
        ("frequency", M.FREQUENCY),
    ):
        key = M.per_phase(stem, 1)
        if key in v:
            v[total] = v[key]
    for stem in ("voltage", "current", "power", "reactive_power", "apparent_power"):
        for ph in (2, 3):
            v.pop(M.per_phase(stem, ph), None)


def retotal(v: dict[M, float]) -> None:
    """Totals (P, Q, S, PF) from the per-phase values, after a fault changed them."""
    p = sum(v.get(M.per_phase("power", ph), 0.0) for ph in (1, 2, 3))
    q = sum(v.get(M.per_phase("reactive_power", ph), 0.0) for ph in (1, 2, 3))
    s = sum(v.get(M.per_phase("apparent_power", ph), 0.0) for ph in (1, 2, 3))
    v[M.POWER], v[M.REACTIVE_POWER], v[M.APPARENT_POWER] = p, q, s
    v[M.POWER_FACTOR] = p / s if s else 0.0


class SimSite:
    """The plant model: supply, loads, meters, capacitor bank, relays, faults."""

    def __init__(
        self,
        seed: int = 1,
        supply: Supply | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seed = seed
        self.supply = supply or Supply()
        self.clock = clock
        self.t0 = clock()
        self.rng = random.Random(seed)
        self.loads: dict[str, Load] = {}
        self.meters: dict[int, SimMeter] = {}
        self.bank: CapacitorBank | None = None
        self.relays: RelayIO | None = None
        self.schedule: list[tuple[float, str, int, dict[str, Any], float | None]] = []

    # -- building ------------------------------------------------------------------

    def now(self) -> float:
        """Model time in seconds since the site was built."""
        return self.clock() - self.t0

    def add_load(self, load: Load, running: bool | None = None) -> Load:
        if load.name in self.loads:
            raise ValueError(f"load {load.name!r} exists already")
        if running is not None:
            load.running = running
        if load.running:
            load.started_at = -1e9  # running since long ago: no inrush at build time
        self.loads[load.name] = load
        return load

    def add_meter(
        self,
        unit: int,
        name: str | None = None,
        profile: str = "pmtr001",
        loads: Iterable[str] | None = None,
        bank: bool = True,
        source: _Source | None = None,
    ) -> SimMeter:
        _check_unit(unit, self)
        chosen = list(loads) if loads is not None else None
        for load in chosen or []:
            if load not in self.loads:
                raise ValueError(f"meter {name or unit}: no load named {load!r}")
        meter = SimMeter(
            unit=unit,
            name=name or f"meter{unit}",
            profile=prof.PROFILES[profile],
            source=source or _LoadMeter(chosen, bank),
            rng=random.Random(self.seed * 100_003 + unit),
        )
        self.meters[unit] = meter
        return meter

    def add_bank(
        self,
        unit: int,
        steps: int = 6,
        kvar_per_step: float | Iterable[float] = 25.0,
        discharge_s: float = 0.0,
    ) -> CapacitorBank:
        _check_unit(unit, self)
        self.bank = CapacitorBank(unit, steps, kvar_per_step, discharge_s, self.clock)
        return self.bank

    def add_relays(
        self, unit: int, coils: int = 8, switches: Mapping[int, str] | None = None
    ) -> RelayIO:
        _check_unit(unit, self)
        for coil, load in (switches or {}).items():
            if load not in self.loads:
                raise ValueError(f"relay coil {coil}: no load named {load!r}")
        self.relays = RelayIO(unit, coils, switches)
        for coil, load in self.relays.switches.items():
            self.relays.coils[coil] = self.loads[load].running
        return self.relays

    # -- changing the plant --------------------------------------------------------

    def set_load(
        self,
        name: str,
        *,
        running: bool | None = None,
        kw: float | None = None,
        pf: float | None = None,
    ) -> None:
        load = self.loads[name]
        if kw is not None:
            load.kw = kw
        if pf is not None:
            load.pf = pf
        if running is not None and running != load.running:
            load.running = running
            if running:
                load.started_at = self.now()

    def set_relay(self, coil: int, on: bool) -> None:
        relays = self.relays
        if relays is None:
            raise ValueError("this site has no relay module")
        if on != relays.coils[coil]:
            relays.operations[coil] += 1
        relays.coils[coil] = on
        load = relays.switches.get(coil)
        if load is not None:
            self.set_load(load, running=on)

    def inject(
        self, fault: str, unit: int, *, duration_s: float | None = None, **params: Any
    ) -> None:
        """Start ``fault`` (see :data:`FAULTS`) on meter ``unit`` (params: phase, code, delay_s)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        meter = self.meters[unit]
        meter.faults[fault] = dict(params)
        now = self.now()
        meter.fault_span[fault] = (now, math.inf if duration_s is None else now + duration_s)
        if duration_s is not None:
            self.schedule.append((self.now() + duration_s, "", unit, {"clear": fault}, None))
        log.info("fault %s on unit %d %s", fault, unit, params)

    def inject_at(
        self, at_s: float, fault: str, unit: int, duration_s: float | None = None, **params: Any
    ) -> None:
        """Schedule ``fault`` at model time ``at_s`` (optionally for ``duration_s``)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        self.schedule.append((at_s, fault, unit, params, duration_s))

    def clear(self, unit: int, fault: str | None = None) -> None:
        faults = self.meters[unit].faults
        if fault is None:
            faults.clear()
        else:
            faults.pop(fault, None)

    def tick(self) -> None:
        """Apply scheduled faults that are due (called on every device access)."""
        if not self.schedule:
            return
        now = self.now()
        due = [s for s in self.schedule if s[0] <= now]
        if not due:
            return
        self.schedule = [s for s in self.schedule if s[0] > now]
        for _, fault, unit, params, duration in due:
            if "clear" in params:
                self.clear(unit, params["clear"])
            else:
                self.inject(fault, unit, duration_s=duration, **params)

    # -- measuring -----------------------------------------------------------------

    def measure(
        self, loads: list[str] | None, bank: bool, t: float, rng: random.Random
    ) -> dict[M, float]:
        """Per-phase and total quantities at a metering point (load convention, SI)."""
        sup = self.supply
        names = self.loads if loads is None else loads
        p = [0.0, 0.0, 0.0]
        q = [0.0, 0.0, 0.0]
        ih2 = [0.0, 0.0, 0.0]  # sum of squared harmonic currents, per phase
        volts = [
            sup.nominal_v * sup.unbalance[ph] * (1.0 + rng.gauss(0.0, sup.noise)) for ph in range(3)
        ]
        for name in names:
            load = self.loads[name]
            lp, lq, h = load.demand(t, rng)
            if lp == 0 and lq == 0:
                continue
            for ph in range(3):
                share = load.phases[ph]
                if share:
                    pp, qq = lp * share, lq * share
                    p[ph] += pp
                    q[ph] += qq
                    if h:
                        i1 = math.hypot(pp, qq) / volts[ph]
                        ih2[ph] += (i1 * h) ** 2
        if bank and self.bank is not None:
            kvar = self.bank.kvar_in
            for ph in range(3):
                q[ph] -= kvar * 1000.0 / 3.0 * (volts[ph] / sup.nominal_v) ** 2
        v: dict[M, float] = {}
        currents = []
        for ph in range(3):
            n = ph + 1
            s1 = math.hypot(p[ph], q[ph])
            i1 = s1 / volts[ph]
            ih = math.sqrt(ih2[ph])
            irms = math.hypot(i1, ih)
            s = volts[ph] * irms
            v[M.per_phase("voltage", n)] = volts[ph]
            v[M.per_phase("current", n)] = irms
            v[M.per_phase("power", n)] = p[ph]
            v[M.per_phase("reactive_power", n)] = q[ph]
            v[M.per_phase("fund_reactive_power", n)] = q[ph]
            v[M.per_phase("apparent_power", n)] = s
            v[M.per_phase("power_factor", n)] = p[ph] / s if s else 1.0
            v[M.per_phase("displacement_pf", n)] = p[ph] / s1 if s1 else 1.0
            v[M.per_phase("frequency", n)] = sup.frequency_hz
            v[M.per_phase("thd_voltage", n)] = sup.thd_v_pct
            v[M.per_phase("thd_current", n)] = 100.0 * ih / i1 if i1 else 0.0
            currents.append(cmath.rect(i1, _PHASE_SHIFT[ph] - math.atan2(q[ph], p[ph])))
        for a, b, key in (
            (0, 1, M.VOLTAGE_L1_L2),
            (1, 2, M.VOLTAGE_L2_L3),
            (2, 0, M.VOLTAGE_L3_L1),
        ):
            va = cmath.rect(volts[a], _PHASE_SHIFT[a])
            vb = cmath.rect(volts[b], _PHASE_SHIFT[b])
            v[key] = abs(va - vb)
        p_t, q_t = sum(p), sum(q)
        s_t = sum(v[M.per_phase("apparent_power", n)] for n in (1, 2, 3))
        v[M.POWER] = p_t
        v[M.REACTIVE_POWER] = q_t
        v[M.FUND_REACTIVE_POWER] = q_t
        v[M.APPARENT_POWER] = s_t
        v[M.POWER_FACTOR] = p_t / s_t if s_t else 1.0
        v[M.FREQUENCY] = sup.frequency_hz
        v[M.NEUTRAL_CURRENT] = abs(sum(currents))
        v[M.DEMAND_POWER] = p_t
        v[M.DEMAND_APPARENT_POWER] = s_t
        return v

    def meter_values(self, unit: int) -> dict[M, float]:
        """What meter ``unit`` measures now (with its faults), advancing its counters."""
        return self.meters[unit].values(self, self.now())

    def state(self) -> PlantState:
        """Noise-free state of the supply point and of every meter (no counters advanced)."""
        t = self.now()
        quiet = _Quiet()
        saved = self.supply.noise
        self.supply.noise = 0.0
        wobbles = {name: load.wobble for name, load in self.loads.items()}
        try:
            for load in self.loads.values():
                load.wobble = 0.0
            total = self.measure(None, True, t, quiet)  # type: ignore[arg-type]
            meters = {}
            for unit, meter in self.meters.items():
                vals = meter.source.sample(self, t, quiet)  # type: ignore[arg-type]
                _apply_faults(vals, meter.faults)
                if meter.profile.phases == 1:
                    _single_phase(vals)
                meters[meter.name] = MeterState(
                    meter.name,
                    unit,
                    vals.get(M.POWER, 0.0),
                    vals.get(M.REACTIVE_POWER, 0.0),
                    vals.get(M.APPARENT_POWER, 0.0),
                    vals.get(M.POWER_FACTOR, 1.0),
                    vals,
                )
        finally:
            self.supply.noise = saved
            for name, w in wobbles.items():
                self.loads[name].wobble = w
        bank = self.bank
        return PlantState(
            p_w=total[M.POWER],
            q_var=total[M.REACTIVE_POWER],
            s_va=total[M.APPARENT_POWER],
            pf=total[M.POWER_FACTOR],
            bank_steps=bank.steps_in if bank else [],
            bank_kvar=bank.kvar_in if bank else 0.0,
            meters=meters,
        )

    def waveform(
        self, unit: int, site: str, seq: int, fs_hz: float = 6400.0, cycles: int = 10
    ) -> Waveform:
        """A window of samples (v1..v3, i1..i3, in) from meter ``unit``'s operating point.

        Each current is its fundamental (angle from P and Q) plus the harmonic
        spectrum of the loads, scaled to the meter's THD; voltages carry the
        supply's THD as a 5th harmonic.
        """
        meter = self.meters[unit]
        t0 = self.now()
        v = meter.source.sample(self, t0, meter.rng)
        # the supply and CT faults are drawn on the samples below, at their times
        shaped = {k: p for k, p in meter.faults.items() if k in _SAMPLED}
        _apply_faults(v, {k: p for k, p in meter.faults.items() if k not in _SAMPLED})
        f = self.supply.frequency_hz
        n = round(fs_hz / f * cycles)
        spectrum = self._spectrum(getattr(meter.source, "loads", None))
        chans: dict[str, list[float]] = {}
        i_n = [0.0] * n
        for ph in range(3):
            k = ph + 1
            vr = v.get(M.per_phase("voltage", k), 0.0)
            p = v.get(M.per_phase("power", k), 0.0)
            q = v.get(M.per_phase("reactive_power", k), 0.0)
            i1 = math.hypot(p, q) / vr if vr > 1 else 0.0
            phi = math.atan2(q, p)
            thd_i = v.get(M.per_phase("thd_current", k), 0.0) / 100.0
            thd_v = self.supply.thd_v_pct / 100.0
            shift = _PHASE_SHIFT[ph]
            vs, cs = [], []
            for j in range(n):
                w = 2 * math.pi * f * j / fs_hz
                vv = math.sqrt(2) * vr * (math.sin(w + shift) + thd_v * math.sin(5 * (w + shift)))
                ii = math.sqrt(2) * i1 * math.sin(w + shift - phi)
                for order, rel in spectrum.items():
                    ii += math.sqrt(2) * i1 * thd_i * rel * math.sin(order * (w + shift))
                vs.append(round(vv, 3))
                cs.append(round(ii, 4))
                i_n[j] += ii
            _shape(vs, cs, i_n, k, shaped, meter.fault_span, t0, fs_hz)
            chans[f"v{k}"] = vs
            chans[f"i{k}"] = cs
        chans["in"] = [round(x, 4) for x in i_n]
        return Waveform(
            site=site,
            ts=utcnow(),
            seq=seq,
            meter=meter.name,
            fs_hz=fs_hz,
            f_nominal_hz=50 if f < 55 else 60,
            channels=chans,
        )

    def _spectrum(self, names: list[str] | None) -> dict[int, float]:
        """Harmonic orders of the loads, normalised to a unit THD."""
        acc: dict[int, float] = {}
        for name in self.loads if names is None else names:
            load = self.loads[name]
            if not load.running:
                continue
            for order, rel in load.spectrum.items():
                acc[order] = acc.get(order, 0.0) + rel * load.kw
        norm = math.sqrt(sum(a * a for a in acc.values()))
        return {o: a / norm for o, a in acc.items()} if norm else {}


#: faults a waveform window draws sample by sample
_SAMPLED = ("supply_voltage", "ct_saturation")


def _shape(
    vs: list[float],
    cs: list[float],
    i_n: list[float],
    k: int,
    faults: Mapping[str, Mapping[str, Any]],
    spans: Mapping[str, tuple[float, float]],
    t0: float,
    fs_hz: float,
) -> None:
    """Phase ``k``'s samples under the supply and CT faults (in place)."""
    sag = faults.get("supply_voltage")
    if sag is not None and k in _phases_of(sag):
        level = float(sag.get("level_pct", 70.0)) / 100.0
        start, end = spans.get("supply_voltage", (-math.inf, math.inf))
        for j in range(len(vs)):
            if start <= t0 + j / fs_hz < end:
                vs[j] = round(vs[j] * level, 3)
                old = cs[j]
                cs[j] = round(old * (level > 0), 4)
                i_n[j] += cs[j] - old
    sat = faults.get("ct_saturation")
    if sat is not None and k in _phases_of(sat):
        peak = max((abs(c) for c in cs), default=0.0)
        top = peak * float(sat.get("clip_pct", 70.0)) / 100.0
        for j, old in enumerate(cs):
            cs[j] = max(-top, min(top, old))
            i_n[j] += cs[j] - old


class _Quiet:
    """An rng stand-in that draws no noise (for noise-free state)."""

    def gauss(self, mu: float, sigma: float) -> float:
        return mu


def _check_unit(unit: int, site: SimSite) -> None:
    if not 1 <= unit <= 247:
        raise ValueError(f"unit id {unit} is outside 1-247")
    used = set(site.meters)
    if site.bank is not None:
        used.add(site.bank.unit)
    if site.relays is not None:
        used.add(site.relays.unit)
    if unit in used:
        raise ValueError(f"unit id {unit} is already used")
