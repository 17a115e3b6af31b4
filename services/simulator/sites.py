"""Ready-made plants: the PF-correction factory, fleets of meters, fixed-load meters."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.simulator.equipment import VFD, Heater, Motor, ServerPSU
from services.simulator.plant import SimSite, retotal
from services.simulator.server import SimServer
from shared.measurements import Measurement as M

__all__ = ["LoadModel", "MeterFleet", "expected_pf", "fleet_site", "inductive_site"]


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


# --- fixed per-phase loads (the compose simulator, the walking-skeleton tests) -------


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
        retotal(v)
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
