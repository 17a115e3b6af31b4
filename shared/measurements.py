"""The one measurement vocabulary.

Every meter profile, message field, database column and rule token refers to a
:class:`Measurement`. Values are SI (V, A, W, var, VA, Hz, Wh, varh, VAh, %, s).
Sign conventions (DESIGN.md): load convention, P > 0 imported, Q > 0 inductive.

Each measurement also carries its physical plausibility bounds (:attr:`Measurement.bounds`):
generous (a 765 kV line, a 1 MA bus bar, a 10 TW total) but finite, so that
everything derived from plausible values (``S = V*I``, sums, squares of RMS
aggregates) stays finite too. A reading's value outside them is refused where the
reading enters (the collector, ``shared.messages.Reading``); a site file may only
tighten them (``limits:``, :func:`check`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

#: plausibility bounds by kind of quantity (SI units)
V_MAX = 1e6  # V: above any transmission line (765 kV line to line)
I_MAX = 1e6  # A: above any bus bar
P_MAX = 1e13  # W, var, VA: V_MAX * I_MAX, three phases and more
E_MAX = 1e15  # Wh, varh, VAh: a petawatt-hour counter
F_MAX = 1000.0  # Hz: 400 Hz aircraft and ship systems, with room
PCT_MAX = 1000.0  # %: THD-F of a very distorted current is a few hundred %
SUPPLY_MAX = 100.0  # V: a device's own supply rail


class Scale(StrEnum):
    """What a measurement scales with when a meter is read through instrument
    transformers: the current transformer (CT), the voltage transformer (PT), both,
    or neither (ratios, percentages, frequency, the device's own supply rails)."""

    NONE = "none"
    CT = "ct"
    PT = "pt"
    CT_PT = "ct*pt"

    def factor(self, ct_ratio: float, pt_ratio: float) -> float:
        """The multiplier from the meter's secondary value to the primary value."""
        if self is Scale.CT:
            return ct_ratio
        if self is Scale.PT:
            return pt_ratio
        if self is Scale.CT_PT:
            return ct_ratio * pt_ratio
        return 1.0


@dataclass(frozen=True, slots=True)
class MeasurementInfo:
    unit: str
    description: str
    #: energy counters and other accumulators are never averaged
    counter: bool = False
    #: what the value is multiplied by to go from a CT/PT's secondary to its primary
    scale: Scale = Scale.NONE
    #: the physically plausible range of a reading's value (inclusive)
    lo: float = -P_MAX
    hi: float = P_MAX


class Measurement(StrEnum):
    """A named physical quantity. The value is its wire/column name."""

    # per phase, line-to-neutral
    VOLTAGE_L1 = "voltage_l1"
    VOLTAGE_L2 = "voltage_l2"
    VOLTAGE_L3 = "voltage_l3"
    CURRENT_L1 = "current_l1"
    CURRENT_L2 = "current_l2"
    CURRENT_L3 = "current_l3"
    POWER_L1 = "power_l1"
    POWER_L2 = "power_l2"
    POWER_L3 = "power_l3"
    REACTIVE_POWER_L1 = "reactive_power_l1"
    REACTIVE_POWER_L2 = "reactive_power_l2"
    REACTIVE_POWER_L3 = "reactive_power_l3"
    FUND_REACTIVE_POWER_L1 = "fund_reactive_power_l1"
    FUND_REACTIVE_POWER_L2 = "fund_reactive_power_l2"
    FUND_REACTIVE_POWER_L3 = "fund_reactive_power_l3"
    APPARENT_POWER_L1 = "apparent_power_l1"
    APPARENT_POWER_L2 = "apparent_power_l2"
    APPARENT_POWER_L3 = "apparent_power_l3"
    NONACTIVE_POWER_L1 = "nonactive_power_l1"
    NONACTIVE_POWER_L2 = "nonactive_power_l2"
    NONACTIVE_POWER_L3 = "nonactive_power_l3"
    POWER_FACTOR_L1 = "power_factor_l1"
    POWER_FACTOR_L2 = "power_factor_l2"
    POWER_FACTOR_L3 = "power_factor_l3"
    DISPLACEMENT_PF_L1 = "displacement_pf_l1"
    DISPLACEMENT_PF_L2 = "displacement_pf_l2"
    DISPLACEMENT_PF_L3 = "displacement_pf_l3"
    FREQUENCY_L1 = "frequency_l1"
    FREQUENCY_L2 = "frequency_l2"
    FREQUENCY_L3 = "frequency_l3"
    THD_VOLTAGE_L1 = "thd_voltage_l1"
    THD_VOLTAGE_L2 = "thd_voltage_l2"
    THD_VOLTAGE_L3 = "thd_voltage_l3"
    THD_CURRENT_L1 = "thd_current_l1"
    THD_CURRENT_L2 = "thd_current_l2"
    THD_CURRENT_L3 = "thd_current_l3"
    IMPORT_ENERGY_L1 = "import_energy_l1"
    IMPORT_ENERGY_L2 = "import_energy_l2"
    IMPORT_ENERGY_L3 = "import_energy_l3"
    # line-to-line
    VOLTAGE_L1_L2 = "voltage_l1_l2"
    VOLTAGE_L2_L3 = "voltage_l2_l3"
    VOLTAGE_L3_L1 = "voltage_l3_l1"
    # totals / three-phase
    POWER = "power"
    REACTIVE_POWER = "reactive_power"
    FUND_REACTIVE_POWER = "fund_reactive_power"
    APPARENT_POWER = "apparent_power"
    EFFECTIVE_APPARENT_POWER = "effective_apparent_power"
    POWER_FACTOR = "power_factor"
    EFFECTIVE_PF = "effective_pf"
    FREQUENCY = "frequency"
    NEUTRAL_CURRENT = "neutral_current"
    VOLTAGE_UNBALANCE = "voltage_unbalance"
    ZERO_SEQ_UNBALANCE = "zero_seq_unbalance"
    NEMA_UNBALANCE = "nema_unbalance"
    NEUTRAL_SCORE = "neutral_score"
    IMPORT_ENERGY = "import_energy"
    EXPORT_ENERGY = "export_energy"
    REACTIVE_ENERGY_IND = "reactive_energy_ind"
    REACTIVE_ENERGY_CAP = "reactive_energy_cap"
    APPARENT_ENERGY = "apparent_energy"
    DEMAND_POWER = "demand_power"
    DEMAND_APPARENT_POWER = "demand_apparent_power"
    DEMAND_PF = "demand_pf"
    # site topology (analytics, on a parent meter)
    UNMETERED_POWER = "unmetered_power"
    # device housekeeping
    SUPPLY_5V = "supply_5v"
    SUPPLY_12V = "supply_12v"

    @property
    def info(self) -> MeasurementInfo:
        return _INFO[self]

    @property
    def unit(self) -> str:
        return _INFO[self].unit

    @property
    def description(self) -> str:
        return _INFO[self].description

    @property
    def is_counter(self) -> bool:
        return _INFO[self].counter

    @property
    def scale(self) -> Scale:
        """What the value scales with through instrument transformers (CT, PT)."""
        return _INFO[self].scale

    @property
    def bounds(self) -> tuple[float, float]:
        """The physically plausible range (inclusive) of this quantity in a reading."""
        return _BOUNDS[self]

    @classmethod
    def per_phase(cls, stem: str, phase: int) -> Measurement:
        """``per_phase("voltage", 2)`` -> ``Measurement.VOLTAGE_L2``."""
        return cls(f"{stem}_l{phase}")


_V, _I, _P, _0 = Scale.PT, Scale.CT, Scale.CT_PT, Scale.NONE
_VOLTS = (0.0, V_MAX)
_AMPS = (-I_MAX, I_MAX)  # some meters sign the current with the direction of flow
_POWER = (-P_MAX, P_MAX)
_PF = (-1.0, 1.0)
_HZ = (0.0, F_MAX)
_PCT = (0.0, PCT_MAX)
_ENERGY = (0.0, E_MAX)
_SUPPLY = (0.0, SUPPLY_MAX)

#: per-phase stems: unit, description, counter, CT/PT scale, plausible range
_PHASE_STEMS: dict[str, tuple[str, str, bool, Scale, tuple[float, float]]] = {
    "voltage": ("V", "RMS voltage, line to neutral", False, _V, _VOLTS),
    "current": ("A", "RMS current", False, _I, _AMPS),
    "power": ("W", "active power (P > 0 imported)", False, _P, _POWER),
    "reactive_power": ("var", "reactive power (Q > 0 inductive)", False, _P, _POWER),
    "fund_reactive_power": (
        "var",
        "fundamental reactive power Q1 (IEEE 1459)",
        False,
        _P,
        _POWER,
    ),
    "apparent_power": ("VA", "apparent power S = Vrms * Irms", False, _P, _POWER),
    "nonactive_power": (
        "var",
        "nonactive power N = sqrt(S^2 - P^2) (IEEE 1459)",
        False,
        _P,
        _POWER,
    ),
    "power_factor": ("", "true power factor P / S, signed by P", False, _0, _PF),
    "displacement_pf": (
        "",
        "displacement power factor cos(phi1), signed by P1",
        False,
        _0,
        _PF,
    ),
    "frequency": ("Hz", "frequency", False, _0, _HZ),
    "thd_voltage": ("%", "voltage THD relative to the fundamental", False, _0, _PCT),
    "thd_current": ("%", "current THD relative to the fundamental", False, _0, _PCT),
    "import_energy": ("Wh", "imported active energy counter", True, _P, _ENERGY),
}

_INFO: dict[Measurement, MeasurementInfo] = {}
for _stem, (_unit, _desc, _counter, _scale, (_lo, _hi)) in _PHASE_STEMS.items():
    for _ph in (1, 2, 3):
        _INFO[Measurement(f"{_stem}_l{_ph}")] = MeasurementInfo(
            _unit, f"L{_ph} {_desc}", _counter, _scale, _lo, _hi
        )


def _info(
    unit: str,
    desc: str,
    bounds: tuple[float, float],
    counter: bool = False,
    scale: Scale = _0,
) -> MeasurementInfo:
    return MeasurementInfo(unit, desc, counter, scale, bounds[0], bounds[1])


_INFO.update(
    {
        Measurement.VOLTAGE_L1_L2: _info("V", "RMS voltage L1-L2", _VOLTS, scale=_V),
        Measurement.VOLTAGE_L2_L3: _info("V", "RMS voltage L2-L3", _VOLTS, scale=_V),
        Measurement.VOLTAGE_L3_L1: _info("V", "RMS voltage L3-L1", _VOLTS, scale=_V),
        Measurement.POWER: _info("W", "total active power", _POWER, scale=_P),
        Measurement.REACTIVE_POWER: _info("var", "total reactive power", _POWER, scale=_P),
        Measurement.FUND_REACTIVE_POWER: _info(
            "var", "total fundamental reactive", _POWER, scale=_P
        ),
        Measurement.APPARENT_POWER: _info(
            "VA", "total apparent power (arithmetic)", _POWER, scale=_P
        ),
        Measurement.EFFECTIVE_APPARENT_POWER: _info(
            "VA", "effective apparent power Se (IEEE 1459)", _POWER, scale=_P
        ),
        Measurement.POWER_FACTOR: _info("", "total power factor P / S", _PF),
        Measurement.EFFECTIVE_PF: _info("", "effective power factor P / Se", _PF),
        Measurement.FREQUENCY: _info("Hz", "system frequency", _HZ),
        Measurement.NEUTRAL_CURRENT: _info("A", "RMS neutral current", _AMPS, scale=_I),
        Measurement.VOLTAGE_UNBALANCE: _info("%", "negative-sequence unbalance u2", _PCT),
        Measurement.ZERO_SEQ_UNBALANCE: _info("%", "zero-sequence unbalance u0", _PCT),
        Measurement.NEMA_UNBALANCE: _info("%", "NEMA max deviation from mean", _PCT),
        Measurement.NEUTRAL_SCORE: _info("", "broken-neutral score in [0, 1]", (0.0, 1.0)),
        Measurement.IMPORT_ENERGY: _info("Wh", "imported active energy", _ENERGY, True, _P),
        Measurement.EXPORT_ENERGY: _info("Wh", "exported active energy", _ENERGY, True, _P),
        Measurement.REACTIVE_ENERGY_IND: _info(
            "varh", "inductive reactive energy", _ENERGY, True, _P
        ),
        Measurement.REACTIVE_ENERGY_CAP: _info(
            "varh", "capacitive reactive energy", _ENERGY, True, _P
        ),
        Measurement.APPARENT_ENERGY: _info("VAh", "apparent energy", _ENERGY, True, _P),
        Measurement.DEMAND_POWER: _info(
            "W", "active power demand (billing window)", _POWER, scale=_P
        ),
        Measurement.DEMAND_APPARENT_POWER: _info("VA", "apparent power demand", _POWER, scale=_P),
        Measurement.DEMAND_PF: _info("", "power factor over the demand window", _PF),
        Measurement.UNMETERED_POWER: _info(
            "W",
            "active power of this meter that none of its child meters measures",
            _POWER,
            scale=_P,
        ),
        Measurement.SUPPLY_5V: _info("V", "device 5 V supply rail", _SUPPLY),
        Measurement.SUPPLY_12V: _info("V", "device 12 V supply rail", _SUPPLY),
    }
)
_missing = [m for m in Measurement if m not in _INFO]
if _missing:  # pragma: no cover - guards the table at import
    raise RuntimeError(f"measurements without unit/description: {_missing}")
#: every measurement's plausible range (inclusive), as ``Measurement.bounds`` gives it
BOUNDS: dict[Measurement, tuple[float, float]] = {m: (i.lo, i.hi) for m, i in _INFO.items()}
_BOUNDS = BOUNDS


def implausible(
    measurement: Measurement,
    value: float,
    limits: Mapping[Measurement, tuple[float, float]] | None = None,
) -> str | None:
    """Why ``value`` is not a plausible ``measurement`` (None when it is): not a finite
    number, outside the physical bounds, or outside the site's tighter ``limits``."""
    lo, hi = _BOUNDS[measurement]
    if lo <= value <= hi:  # False for NaN
        if limits is None or measurement not in limits:
            return None
        lo, hi = limits[measurement]
        if lo <= value <= hi:
            return None
        return f"outside the configured limits [{lo:g}, {hi:g}]{_unit_suffix(measurement)}"
    if not math.isfinite(value):
        return "not a finite number"
    return f"outside the plausible range [{lo:g}, {hi:g}]{_unit_suffix(measurement)}"


def _unit_suffix(measurement: Measurement) -> str:
    unit = _INFO[measurement].unit
    return f" {unit}" if unit else ""
