"""The one measurement vocabulary.

Every meter profile, message field, database column and rule token refers to a
:class:`Measurement`. Values are SI (V, A, W, var, VA, Hz, Wh, varh, VAh, %, s).
Sign conventions (DESIGN.md): load convention, P > 0 imported, Q > 0 inductive.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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

    @classmethod
    def per_phase(cls, stem: str, phase: int) -> Measurement:
        """``per_phase("voltage", 2)`` -> ``Measurement.VOLTAGE_L2``."""
        return cls(f"{stem}_l{phase}")


_V, _I, _P, _0 = Scale.PT, Scale.CT, Scale.CT_PT, Scale.NONE

#: per-phase stems: unit, description, counter, scale
_PHASE_STEMS: dict[str, tuple[str, str, bool, Scale]] = {
    "voltage": ("V", "RMS voltage, line to neutral", False, _V),
    "current": ("A", "RMS current", False, _I),
    "power": ("W", "active power (P > 0 imported)", False, _P),
    "reactive_power": ("var", "reactive power (Q > 0 inductive)", False, _P),
    "fund_reactive_power": ("var", "fundamental reactive power Q1 (IEEE 1459)", False, _P),
    "apparent_power": ("VA", "apparent power S = Vrms * Irms", False, _P),
    "nonactive_power": ("var", "nonactive power N = sqrt(S^2 - P^2) (IEEE 1459)", False, _P),
    "power_factor": ("", "true power factor P / S, signed by P", False, _0),
    "displacement_pf": ("", "displacement power factor cos(phi1), signed by P1", False, _0),
    "frequency": ("Hz", "frequency", False, _0),
    "thd_voltage": ("%", "voltage THD relative to the fundamental", False, _0),
    "thd_current": ("%", "current THD relative to the fundamental", False, _0),
    "import_energy": ("Wh", "imported active energy counter", True, _P),
}

_INFO: dict[Measurement, MeasurementInfo] = {}
for _stem, (_unit, _desc, _counter, _scale) in _PHASE_STEMS.items():
    for _ph in (1, 2, 3):
        _INFO[Measurement(f"{_stem}_l{_ph}")] = MeasurementInfo(
            _unit, f"L{_ph} {_desc}", _counter, _scale
        )
_INFO.update(
    {
        Measurement.VOLTAGE_L1_L2: MeasurementInfo("V", "RMS voltage L1-L2", scale=_V),
        Measurement.VOLTAGE_L2_L3: MeasurementInfo("V", "RMS voltage L2-L3", scale=_V),
        Measurement.VOLTAGE_L3_L1: MeasurementInfo("V", "RMS voltage L3-L1", scale=_V),
        Measurement.POWER: MeasurementInfo("W", "total active power", scale=_P),
        Measurement.REACTIVE_POWER: MeasurementInfo("var", "total reactive power", scale=_P),
        Measurement.FUND_REACTIVE_POWER: MeasurementInfo(
            "var", "total fundamental reactive", scale=_P
        ),
        Measurement.APPARENT_POWER: MeasurementInfo(
            "VA", "total apparent power (arithmetic)", scale=_P
        ),
        Measurement.EFFECTIVE_APPARENT_POWER: MeasurementInfo(
            "VA", "effective apparent power Se (IEEE 1459)", scale=_P
        ),
        Measurement.POWER_FACTOR: MeasurementInfo("", "total power factor P / S"),
        Measurement.EFFECTIVE_PF: MeasurementInfo("", "effective power factor P / Se"),
        Measurement.FREQUENCY: MeasurementInfo("Hz", "system frequency"),
        Measurement.NEUTRAL_CURRENT: MeasurementInfo("A", "RMS neutral current", scale=_I),
        Measurement.VOLTAGE_UNBALANCE: MeasurementInfo("%", "negative-sequence unbalance u2"),
        Measurement.ZERO_SEQ_UNBALANCE: MeasurementInfo("%", "zero-sequence unbalance u0"),
        Measurement.NEMA_UNBALANCE: MeasurementInfo("%", "NEMA max deviation from mean"),
        Measurement.NEUTRAL_SCORE: MeasurementInfo("", "broken-neutral score in [0, 1]"),
        Measurement.IMPORT_ENERGY: MeasurementInfo("Wh", "imported active energy", True, _P),
        Measurement.EXPORT_ENERGY: MeasurementInfo("Wh", "exported active energy", True, _P),
        Measurement.REACTIVE_ENERGY_IND: MeasurementInfo(
            "varh", "inductive reactive energy", True, _P
        ),
        Measurement.REACTIVE_ENERGY_CAP: MeasurementInfo(
            "varh", "capacitive reactive energy", True, _P
        ),
        Measurement.APPARENT_ENERGY: MeasurementInfo("VAh", "apparent energy", True, _P),
        Measurement.DEMAND_POWER: MeasurementInfo(
            "W", "active power demand (billing window)", scale=_P
        ),
        Measurement.DEMAND_APPARENT_POWER: MeasurementInfo("VA", "apparent power demand", scale=_P),
        Measurement.DEMAND_PF: MeasurementInfo("", "power factor over the demand window"),
        Measurement.UNMETERED_POWER: MeasurementInfo(
            "W", "active power of this meter that none of its child meters measures", scale=_P
        ),
        Measurement.SUPPLY_5V: MeasurementInfo("V", "device 5 V supply rail"),
        Measurement.SUPPLY_12V: MeasurementInfo("V", "device 12 V supply rail"),
    }
)
_missing = [m for m in Measurement if m not in _INFO]
if _missing:  # pragma: no cover - guards the table at import
    raise RuntimeError(f"measurements without unit/description: {_missing}")
