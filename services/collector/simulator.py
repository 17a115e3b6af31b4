"""The plant simulator: a physical model of a site served as Modbus TCP devices.

Everyone uses it: ``pfmon simulate``, ``pfmon demo``, the tests, the benchmarks and
the actuator's closed-loop test. It is a model, not random numbers: a three-phase
supply with a small unbalance and noise feeds loads (induction motors with inrush,
slightly capacitive harmonic-rich server PSUs, VFDs with 5th/7th harmonics,
resistive heaters); meters measure the sum of the loads downstream of them; a
**capacitor bank** (coils = steps) and a **relay I/O** module (coils switch loads)
are Modbus devices whose state feeds back into what the meters read, so a
controller can close the loop. Faults can be injected on command or on a schedule.
Reproducible: every random draw comes from ``random.Random(seed)``.

Python API (stable; the actuator's tests build on it)::

    from services.collector.simulator import (
        SimSite, SimServer, Motor, Heater, ServerPSU, VFD, inductive_site)

    # a ready-made inductive plant: main meter PF ~0.78, a 6 x 25 kvar bank
    site = inductive_site(seed=1)            # meter "main" unit 1 (sdm630), bank unit
                                             # 10, relays unit 11; see its docstring
    # or build one yourself:
    site = SimSite(seed=1)
    site.add_load(Motor("compressor", kw=90, pf=0.78))
    site.add_load(Heater("oven", kw=30), running=False)
    site.add_meter(1, "main", profile="pmtr001")            # sees every load + the bank
    site.add_meter(2, "hvac", profile="sdm630", loads=["compressor"], bank=False)
    site.add_bank(10, steps=6, kvar_per_step=25.0, discharge_s=0.0)  # coils 0..5
    site.add_relays(11, coils=8, switches={0: "oven"})      # coil 0 runs the oven

    async with SimServer(site, port) as server:             # 127.0.0.1:port, all units
        state = site.state()             # PlantState: p_w, q_var, s_va, pf, bank_steps,
                                         # bank_kvar, meters={"main": MeterState...}
        site.set_load("compressor", kw=120)                 # change the load
        site.set_load("oven", running=True)
        site.inject("comm_loss", unit=2)                    # faults, see FAULTS
        site.clear(unit=2)
        site.bank.set_steps([0, 1])                         # or write coils over Modbus

Bank device (its own unit id): coils ``0..steps-1`` = steps (1 = in service);
holding 0 = number of steps, holding ``1+i`` = kvar of step i in 0.1 kvar.
Switched kvar is Q = -kvar * (V/Vn)^2, shared over the three phases, and is seen
by every meter created with ``bank=True`` (the default). ``bank.operations[i]``
counts closings; ``bank.violations`` lists re-closings inside ``discharge_s``.

Relay I/O device: coils ``0..n-1``; a coil mapped in ``switches`` runs that load.

Also: ``fleet_site(n, seed=, profile=)`` (n meters with their own load mixes, for
fleets and benchmarks); ``site.meter_values(unit)`` (what a meter reads now, with
noise and faults); ``site.waveform(unit, site_slug, seq)`` (a ``Waveform`` from the
same operating point); ``site.inject_at(t, fault, unit, duration_s)`` (scheduled
faults); ``SimServer(site, port, framer="rtu")`` (RTU over TCP) or
``SimServer(site, serial="/dev/pts/N")`` (RTU on a serial port). Unit ids without a
device answer exception 0x0B, as a TCP gateway does.

Compatibility: ``MeterFleet(port, {unit: LoadModel})`` serves fixed per-phase loads
(PMTR_001 layout) and :func:`expected_pf` gives their noiseless PF.
"""

from __future__ import annotations

import asyncio
import cmath
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from services.collector import profiles as prof
from shared.measurements import Measurement as M
from shared.messages import Waveform, utcnow
from shared.site.collector import TYPE_WIDTH

log = logging.getLogger(__name__)

__all__ = [
    "FAULTS",
    "VFD",
    "CapacitorBank",
    "Heater",
    "Load",
    "LoadModel",
    "MeterFleet",
    "MeterState",
    "Motor",
    "PlantState",
    "RelayIO",
    "ServerPSU",
    "SimServer",
    "SimSite",
    "Supply",
    "expected_pf",
    "fleet_site",
    "inductive_site",
]

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
}

_PHASE_SHIFT = (0.0, -2 * math.pi / 3, 2 * math.pi / 3)


# --- the physical model -----------------------------------------------------------


@dataclass
class Supply:
    """Three-phase supply: line-to-neutral voltages with a small unbalance and noise."""

    nominal_v: float = 230.0
    unbalance: tuple[float, float, float] = (1.000, 1.006, 0.995)
    frequency_hz: float = 50.0
    #: relative standard deviation of the voltage noise
    noise: float = 0.001
    #: voltage THD of the supply (%)
    thd_v_pct: float = 1.5


@dataclass
class Load:
    """A load: active power and displacement PF, spread over the phases.

    ``pf`` is the displacement PF (cos phi1); ``leading`` makes it capacitive.
    ``spectrum`` maps harmonic order -> current relative to the fundamental.
    ``phases`` is the share of the load on L1, L2, L3.
    """

    name: str
    kw: float
    pf: float = 1.0
    leading: bool = False
    spectrum: Mapping[int, float] = field(default_factory=dict)
    phases: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    running: bool = True
    #: starting current / running current at switch-on, and how long it lasts
    inrush: float = 1.0
    inrush_s: float = 0.0
    started_at: float = -1e9
    #: relative noise on the power drawn (a real load is never quite steady)
    wobble: float = 0.005

    def demand(self, t: float, rng: random.Random) -> tuple[float, float, float]:
        """Total (P W, Q1 var, harmonic current factor) at model time ``t``."""
        if not self.running or self.kw <= 0:
            return 0.0, 0.0, 0.0
        n = 1.0 + rng.gauss(0.0, self.wobble) if self.wobble else 1.0
        p = self.kw * 1000.0 * n
        pf = min(max(self.pf, 0.01), 1.0)
        q = p * math.tan(math.acos(pf)) * (-1.0 if self.leading else 1.0)
        since = t - self.started_at
        if self.inrush > 1.0 and 0 <= since < self.inrush_s:
            # starting: locked-rotor current at PF ~0.3, decaying to the running point
            k = 1.0 + (self.inrush - 1.0) * (1.0 - since / self.inrush_s)
            s_start = math.hypot(p, q) * k
            frac = since / self.inrush_s
            pf_now = 0.3 + (pf - 0.3) * frac
            p = s_start * pf_now
            q = s_start * math.sin(math.acos(pf_now))
        h = math.sqrt(sum(a * a for a in self.spectrum.values()))
        return p, q, h


def Motor(
    name: str, kw: float, pf: float = 0.8, inrush: float = 6.0, inrush_s: float = 2.0, **kw_: Any
) -> Load:
    """Induction motor: lagging PF 0.7-0.85, ~6x current for a second or two at start."""
    return Load(name, kw, pf, inrush=inrush, inrush_s=inrush_s, spectrum={5: 0.02}, **kw_)


def ServerPSU(name: str, kw: float, pf: float = 0.98, **kw_: Any) -> Load:
    """Server power supplies (active PFC): slightly capacitive, harmonic-rich."""
    spectrum = {3: 0.20, 5: 0.12, 7: 0.07, 9: 0.04, 11: 0.03}
    return Load(name, kw, pf, leading=True, spectrum=spectrum, **kw_)


def VFD(name: str, kw: float, pf: float = 0.96, **kw_: Any) -> Load:
    """Variable-frequency drive (6-pulse): DPF ~0.96, strong 5th and 7th harmonics."""
    return Load(name, kw, pf, spectrum={5: 0.35, 7: 0.20, 11: 0.08, 13: 0.05}, **kw_)


def Heater(name: str, kw: float, **kw_: Any) -> Load:
    """Resistive heater: PF 1, no harmonics."""
    return Load(name, kw, 1.0, **kw_)


class CapacitorBank:
    """A stepped capacitor bank on its own unit id: coil i = step i in service."""

    def __init__(
        self,
        unit: int,
        steps: int = 6,
        kvar_per_step: float | Iterable[float] = 25.0,
        discharge_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        if isinstance(kvar_per_step, int | float):
            self.kvar = [float(kvar_per_step)] * steps
        else:
            self.kvar = [float(k) for k in kvar_per_step]
        self.steps = len(self.kvar)
        self.discharge_s = discharge_s
        self._clock = clock
        self.state = [False] * self.steps
        self.operations = [0] * self.steps
        self.opened_at: list[float | None] = [None] * self.steps
        #: (step, seconds since it opened) for every re-closing inside ``discharge_s``
        self.violations: list[tuple[int, float]] = []

    def switch(self, step: int, on: bool) -> None:
        if not 0 <= step < self.steps:
            raise IndexError(f"bank has steps 0..{self.steps - 1}, not {step}")
        if on == self.state[step]:
            return
        now = self._clock()
        if on:
            opened = self.opened_at[step]
            if opened is not None and now - opened < self.discharge_s:
                self.violations.append((step, now - opened))
                log.warning("bank step %d re-closed %.2f s after opening", step, now - opened)
            self.operations[step] += 1
        else:
            self.opened_at[step] = now
        self.state[step] = on

    def set_steps(self, steps_in: Iterable[int]) -> None:
        wanted = set(steps_in)
        for i in range(self.steps):
            self.switch(i, i in wanted)

    @property
    def steps_in(self) -> list[int]:
        return [i for i, on in enumerate(self.state) if on]

    @property
    def kvar_in(self) -> float:
        """Nominal kvar in service (at nominal voltage)."""
        return sum(k for k, on in zip(self.kvar, self.state, strict=True) if on)


class RelayIO:
    """A relay output module: coils; a coil listed in ``switches`` runs that load."""

    def __init__(self, unit: int, coils: int = 8, switches: Mapping[int, str] | None = None):
        self.unit = unit
        self.coils = [False] * coils
        self.switches = dict(switches or {})
        self.operations = [0] * coils


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


def _apply_faults(v: dict[M, float], faults: Mapping[str, Mapping[str, Any]]) -> None:
    if "blown_fuse" in faults:
        ph = int(faults["blown_fuse"].get("phase", 1))
        for stem in ("voltage", "current", "power", "reactive_power", "apparent_power"):
            v[M.per_phase(stem, ph)] = 0.0
        v[M.per_phase("voltage", ph)] = 3.0  # a little backfeed through the loads
        v[M.per_phase("power_factor", ph)] = 0.0
        _retotal(v)
    if "reversed_ct" in faults:
        ph = int(faults["reversed_ct"].get("phase", 1))
        for stem in ("power", "reactive_power", "power_factor"):
            key = M.per_phase(stem, ph)
            v[key] = -v.get(key, 0.0)
        _retotal(v)
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


def _retotal(v: dict[M, float]) -> None:
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
        v = meter.source.sample(self, self.now(), meter.rng)
        _apply_faults(v, meter.faults)
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


def inductive_site(
    seed: int = 1,
    *,
    meter_unit: int = 1,
    bank_unit: int = 10,
    relay_unit: int = 11,
    profile: str = "sdm630",
    steps: int = 6,
    kvar_per_step: float = 25.0,
    discharge_s: float = 0.0,
    scale: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> SimSite:
    """A small factory with PF ~0.78 at the incomer and a bank able to correct it.

    Loads: three motors (compressor 90 kW PF 0.70, pump 45 kW PF 0.70, conveyor
    15 kW PF 0.65), a VFD ``fan_drive`` (30 kW), server PSUs ``servers`` (20 kW,
    slightly capacitive), a 15 kW ``heater`` switched by relay coil 0 (off at
    start). One meter (``main``, unit ``meter_unit``, default profile ``sdm630``:
    signed P/Q/PF) sees everything including the bank; the bank has ``steps`` x
    ``kvar_per_step`` (coils 0..steps-1 on ``bank_unit``); relays on
    ``relay_unit``. With the bank out P ~200 kW, Q ~160 kvar, PF ~0.78; 4 steps
    of 25 kvar give PF ~0.956, 5 steps ~0.983, 6 steps ~0.996.

    ``scale`` multiplies every load and step (the PMTR_001 registers saturate at
    65,535 W per phase: use ``profile="pmtr001", scale=0.25`` for it).
    """
    site = SimSite(seed=seed, clock=clock)
    site.add_load(Motor("compressor", kw=90.0 * scale, pf=0.70))
    site.add_load(Motor("pump", kw=45.0 * scale, pf=0.70))
    site.add_load(Motor("conveyor", kw=15.0 * scale, pf=0.65))
    site.add_load(VFD("fan_drive", kw=30.0 * scale))
    site.add_load(ServerPSU("servers", kw=20.0 * scale))
    site.add_load(Heater("heater", kw=15.0 * scale), running=False)
    site.add_meter(meter_unit, "main", profile=profile)
    site.add_bank(
        bank_unit, steps=steps, kvar_per_step=kvar_per_step * scale, discharge_s=discharge_s
    )
    site.add_relays(relay_unit, coils=8, switches={0: "heater"})
    return site


def fleet_site(
    meters: int,
    *,
    seed: int = 1,
    profile: str = "pmtr001",
    first_unit: int = 1,
    name_prefix: str = "meter",
    clock: Callable[[], float] = time.monotonic,
) -> SimSite:
    """``meters`` meters (units ``first_unit``.., named ``{name_prefix}{unit}``), each
    measuring its own small mix of
    loads drawn from ``seed``: motors (PF 0.7-0.85), server PSUs, VFDs, heaters.
    ``profile="mixed"`` rotates pmtr001 / sdm630 / pzem004t."""
    if first_unit < 1 or first_unit + meters - 1 > 247:
        raise ValueError(f"units {first_unit}..{first_unit + meters - 1} do not fit in 1-247")
    site = SimSite(seed=seed, clock=clock)
    rng = random.Random(seed)
    kinds = ("motor", "servers", "vfd", "heater")
    names = ("pmtr001", "sdm630", "pzem004t")
    for i in range(meters):
        unit = first_unit + i
        loads = []
        for j in range(rng.randint(1, 3)):
            kind = rng.choice(kinds)
            name = f"u{unit}_{kind}{j}"
            kw = rng.uniform(3.0, 40.0)
            if kind == "motor":
                load = Motor(name, kw=kw, pf=rng.uniform(0.70, 0.85))
            elif kind == "servers":
                load = ServerPSU(name, kw=kw)
            elif kind == "vfd":
                load = VFD(name, kw=kw)
            else:
                load = Heater(name, kw=kw)
            site.add_load(load)
            loads.append(name)
        chosen = names[i % 3] if profile == "mixed" else profile
        site.add_meter(unit, f"{name_prefix}{unit}", profile=chosen, loads=loads, bank=False)
    return site


# --- Modbus exposure ----------------------------------------------------------------


def _regs_size(profile: prof.Profile, table: str) -> int:
    top = [s.address + TYPE_WIDTH[s.type] for s in profile.registers.values() if s.table == table]
    return max(top, default=0)


class SimServer:
    """Serve every device of ``site`` on ``host:port`` (Modbus TCP; many unit ids).

    ``framer="rtu"`` speaks RTU frames over TCP (a serial gateway in transparent
    mode); ``serial="/dev/pts/3"`` serves Modbus RTU on a serial port instead.
    Unit ids with no device answer exception 0x0B (gateway target failed to
    respond), as a Modbus TCP gateway in front of an RS-485 line does (on a
    serial line they stay silent).
    """

    def __init__(
        self,
        site: SimSite,
        port: int = 0,
        host: str = "127.0.0.1",
        units: Iterable[int] | None = None,
        *,
        framer: str = "socket",
        serial: str | None = None,
        baudrate: int = 9600,
    ) -> None:
        self.site = site
        self.port = port
        self.host = host
        chosen = set(units) if units is not None else None
        devices = [
            self._meter_device(m) for u, m in site.meters.items() if chosen is None or u in chosen
        ]
        if site.bank is not None and (chosen is None or site.bank.unit in chosen):
            devices.append(self._bank_device(site.bank))
        if site.relays is not None and (chosen is None or site.relays.unit in chosen):
            devices.append(self._relay_device(site.relays))
        self.server: ModbusTcpServer | ModbusSerialServer
        if serial is not None:
            devices.append(self._absent_device(silent=True))
            self.server = ModbusSerialServer(
                devices, framer=FramerType.RTU, port=serial, baudrate=baudrate
            )
        else:
            devices.append(self._absent_device())
            kind = FramerType.RTU if framer == "rtu" else FramerType.SOCKET
            self.server = ModbusTcpServer(devices, address=(host, port), framer=kind)

    def _meter_device(self, meter: SimMeter) -> SimDevice:
        site = self.site
        profile = meter.profile
        is_pmtr = profile.name == "pmtr001"
        is_sdm = profile.name == "sdm630"
        holding = max(_regs_size(profile, "holding"), 200 if is_pmtr else 0)
        inputs = _regs_size(profile, "input")

        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            site.tick()
            meter.requests += 1
            faults = meter.faults
            if "comm_loss" in faults:
                await asyncio.sleep(float(faults["comm_loss"].get("delay_s", 30.0)))
                return ExcCodes.GATEWAY_NO_RESPONSE
            if "slow" in faults:
                await asyncio.sleep(float(faults["slow"].get("delay_s", 0.5)))
            if "exception" in faults and fc in (3, 4):
                return ExcCodes(int(faults["exception"].get("code", 4)))
            if "flaky" in faults and meter.requests % int(faults["flaky"].get("every", 3)) == 0:
                return ExcCodes.GATEWAY_NO_RESPONSE
            if fc in (3, 4) and address + count > (holding if fc == 3 else inputs):
                return ExcCodes.ILLEGAL_ADDRESS
            if fc in (3, 4):
                meter.reads += 1
                vals = meter.values(site, site.now())
                image = profile.image(vals)
                table = image["holding" if fc == 3 else "input"]
                if is_pmtr:
                    _pmtr_extras(table, vals, "sensor_fail" in faults)
                if is_sdm:
                    _sdm_pf_sign(table, vals)
                lo, hi = address, address + count
                for addr, word in table.items():
                    if lo <= addr < hi:
                        regs[addr - start] = word
            elif fc in (6, 16) and values is not None:
                for i, val in enumerate(values):
                    meter.sync_regs[address + i] = int(val)
            elif fc in (5, 15) and values is not None and is_pmtr:
                for i, val in enumerate(values):
                    if address + i == prof.PMTR001_SYNC_COIL:
                        _pmtr_sync(meter, bool(val))
            return None

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        # both tables are allocated wide so that every request reaches the action (a
        # device in comm loss must stay silent); the action answers 0x02 itself outside
        # the device's real map
        size = max(holding, inputs, 1)
        return SimDevice(
            id=meter.unit,
            simdata=(
                bits,
                list(bits),
                [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    def _coil_device(
        self,
        unit: int,
        n: int,
        get: Callable[[], list[bool]],
        put: Callable[[int, bool], None],
        holding: list[int],
    ) -> SimDevice:
        async def action(
            fc: int,
            start: int,
            address: int,
            count: int,
            regs: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            self.site.tick()
            if fc in (5, 15) and values is not None:
                if address + len(values) > n:
                    return ExcCodes.ILLEGAL_ADDRESS
                for i, val in enumerate(values):
                    put(address + i, bool(val))
            if fc == 1:
                # for bit requests pymodbus hands the action the count in 16-bit
                # registers, not in coils (at most the coil count): a read that starts
                # inside the device and runs only a little past its last coil is answered,
                # the extra bits reading 0, where a strict device would say 0x02
                if address + count > n:
                    return ExcCodes.ILLEGAL_ADDRESS
                state = get()
                for w in range(len(regs)):
                    word = 0
                    for b in range(16):
                        k = (start + w) * 16 + b
                        if k < n and state[k]:
                            word |= 1 << b
                    regs[w] = word
            if fc == 3:
                for i, word in enumerate(holding):
                    if 0 <= i - start < len(regs):
                        regs[i - start] = word
            return None

        words = (n + 15) // 16
        bits = [SimData(0, count=words * 16, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=unit,
            simdata=(
                bits,
                list(bits),
                [SimData(0, count=max(len(holding), 1), values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    def _bank_device(self, bank: CapacitorBank) -> SimDevice:
        holding = [bank.steps] + [round(k * 10) for k in bank.kvar]
        return self._coil_device(bank.unit, bank.steps, lambda: bank.state, bank.switch, holding)

    def _relay_device(self, relays: RelayIO) -> SimDevice:
        return self._coil_device(
            relays.unit,
            len(relays.coils),
            lambda: relays.coils,
            self.site.set_relay,
            [len(relays.coils)],
        )

    def _absent_device(self, silent: bool = False) -> SimDevice:
        async def action(*_: Any) -> ExcCodes | None:
            if silent:  # on a serial line an absent unit says nothing at all
                await asyncio.sleep(3600)
            return ExcCodes.GATEWAY_NO_RESPONSE

        bits = [SimData(0, count=256, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=1000, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(id=0, simdata=(bits, list(bits), regs, list(regs)), action=action)

    async def start(self) -> SimServer:
        await self.server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.shutdown()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _pmtr_extras(table: dict[int, int], vals: Mapping[M, float], sensor_fail: bool) -> None:
    """PMTR_001 registers beyond the profile: rails, averages at the firmware's addresses."""
    if not table and not sensor_fail:
        return
    if sensor_fail:
        for addr in range(78, 115):
            table[addr] = 0
        return
    table.setdefault(78, 5000)
    table.setdefault(79, 12000)
    base = prof.PMTR001_AVG_BASE
    for ph in range(3):
        n = ph + 1
        table[base + ph] = prof.encode(vals.get(M.per_phase("voltage", n), 0) * 10, "u16")[0]
        table[base + 3 + ph] = prof.encode(vals.get(M.per_phase("current", n), 0) * 100, "u16")[0]
        table[base + 6 + ph] = prof.encode(abs(vals.get(M.per_phase("power", n), 0)), "u16")[0]
        table[base + 9 + ph] = prof.encode(vals.get(M.per_phase("frequency", n), 0) * 10, "u16")[0]
        pf = abs(vals.get(M.per_phase("power_factor", n), 0))
        table[prof.PMTR001_AVG_PF[ph]] = prof.encode(pf * 100, "u16")[0]


def _sdm_pf_sign(table: dict[int, int], vals: Mapping[M, float]) -> None:
    """SDM630 PF registers: magnitude, negative for inductive (Q > 0), as the meter does."""
    for addr, pkey, qkey in (
        (0x1E, M.POWER_FACTOR_L1, M.REACTIVE_POWER_L1),
        (0x20, M.POWER_FACTOR_L2, M.REACTIVE_POWER_L2),
        (0x22, M.POWER_FACTOR_L3, M.REACTIVE_POWER_L3),
        (0x3E, M.POWER_FACTOR, M.REACTIVE_POWER),
    ):
        pf = abs(vals.get(pkey, 0.0))
        signed = -pf if vals.get(qkey, 0.0) > 0 else pf
        table[addr], table[addr + 1] = prof.encode(signed, "f32")


def _pmtr_sync(meter: SimMeter, coil: bool) -> None:
    """PMTR_001 handshake: coil 0 set, 146-150 written, coil 0 cleared -> clock set."""
    if coil:
        meter.sync_coil = True
        return
    if not meter.sync_coil:
        return
    meter.sync_coil = False
    regs = meter.sync_regs
    words = [regs.get(prof.PMTR001_SYNC_EPOCH + i, 0) for i in range(4)]
    epoch = int(prof.u64(words, "little"))
    meter.clock_epoch = (epoch + prof.PMTR001_SYNC_OFFSET_S) & 0xFFFF_FFFF


# --- compatibility: fixed per-phase loads (demo, walking skeleton) ---------------


@dataclass
class LoadModel:
    """Per-phase star load: voltage, current and displacement PF (magnitudes)."""

    voltage_v: tuple[float, float, float] = (230.0, 231.0, 229.5)
    current_a: tuple[float, float, float] = (10.0, 11.0, 9.5)
    pf: tuple[float, float, float] = (0.82, 0.80, 0.84)
    frequency_hz: float = 50.0
    noise: float = 0.002
    rng: random.Random = field(default_factory=lambda: random.Random(1))

    def sample(self, site: SimSite, t: float, rng: random.Random) -> dict[M, float]:
        v: dict[M, float] = {}
        for ph in range(3):
            k = ph + 1
            n = 1 + self.rng.gauss(0, self.noise) if self.noise else 1.0
            volts = self.voltage_v[ph] * n
            amps = self.current_a[ph] * n
            s = volts * amps
            p = s * self.pf[ph]
            q = s * math.sin(math.acos(min(1.0, self.pf[ph])))
            v[M.per_phase("voltage", k)] = volts
            v[M.per_phase("current", k)] = amps
            v[M.per_phase("power", k)] = p
            v[M.per_phase("reactive_power", k)] = q
            v[M.per_phase("apparent_power", k)] = s
            v[M.per_phase("power_factor", k)] = self.pf[ph]
            v[M.per_phase("frequency", k)] = self.frequency_hz
        _retotal(v)
        v[M.FREQUENCY] = self.frequency_hz
        return v


class MeterFleet(SimServer):
    """Serve ``models`` (unit id -> LoadModel) on ``host:port`` (PMTR_001 layout)."""

    def __init__(
        self,
        port: int,
        models: Mapping[int, LoadModel],
        host: str = "127.0.0.1",
        profile: str = "pmtr001",
    ) -> None:
        site = SimSite()
        for unit, model in models.items():
            site.add_meter(unit, profile=profile, source=model)
        self.models = dict(models)
        super().__init__(site, port, host)

    async def __aenter__(self) -> MeterFleet:
        await self.start()
        return self


def expected_pf(model: LoadModel) -> float:
    """Total PF of a model without noise (used by tests)."""
    p = sum(v * i * pf for v, i, pf in zip(model.voltage_v, model.current_a, model.pf, strict=True))
    s = sum(v * i for v, i in zip(model.voltage_v, model.current_a, strict=True))
    return p / s if s else math.nan
