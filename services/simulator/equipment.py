"""What the simulated plant is made of: the supply, the loads, a capacitor bank, relays.

Loads are data (active power, displacement PF, harmonic spectrum, phase shares,
inrush); :func:`Motor`, :func:`ServerPSU`, :func:`VFD` and :func:`Heater` build
the usual kinds. The bank and the relay module are what a controller switches;
:class:`~services.simulator.plant.SimSite` turns all of them into what meters read.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "VFD",
    "CapacitorBank",
    "Heater",
    "Load",
    "Motor",
    "RelayIO",
    "ServerPSU",
    "Supply",
]


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
