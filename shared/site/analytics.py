"""Site-file section owned by analytics (``analytics:`` in the site YAML).

Thresholds the whole site shares (``pf_alert``, ``pf_penalty``,
``voltage_unbalance_pct``, nominal voltage/frequency) live in ``thresholds:``;
this section holds the analytics service's own settings: averaging slots, the
demand window, alarm limits, hysteresis and minimum durations, and per-meter
options.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.site.core import Duration, WholeSeconds
from shared.topics import Slug


class AlarmTiming(BaseModel):
    """How long a condition must hold before an alarm is raised or cleared. In the site
    file only what differs from the alarm's defaults is given; the rest is kept."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    raise_after_s: Duration = Field(10.0, ge=0, le=86400, description="condition held this long")
    clear_after_s: Duration = Field(30.0, ge=0, le=86400, description="clear condition held")


class AlarmLimits(BaseModel):
    """Alarm limits beyond the shared ``thresholds`` (PF levels, u2 limit)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    pf_hysteresis: float = Field(0.02, ge=0, le=0.5, description="PF must exceed limit + this")
    min_apparent_power_va: float = Field(
        50.0, ge=0, description="below this load PF alarms are not evaluated"
    )
    min_current_a: float = Field(0.2, ge=0, description="current that counts as flowing")
    voltage_missing_pct: float = Field(
        10.0, gt=0, lt=100, description="a phase below this % of nominal has no voltage"
    )
    ct_reversed_w: float = Field(20.0, ge=0, description="P below -this (W) counts as reversed")
    pf_erratic_spread: float = Field(0.30, gt=0, le=2, description="max-min PF in the window")
    pf_erratic_window_s: Duration = Field(10.0, gt=0, le=3600)
    thd_current_pct: float = Field(20.0, gt=0, description="current THD limit (IEEE 519 TDD)")
    thd_voltage_pct: float | None = Field(
        None, gt=0, description="voltage THD limit; default from IEEE 519-2014 by bus voltage"
    )
    harmonic_voltage_pct: float | None = Field(
        None, gt=0, description="individual voltage harmonic limit; default IEEE 519-2014"
    )
    unbalance_hysteresis_pct: float = Field(0.3, ge=0)
    neutral_raise_score: float = Field(0.5, gt=0, le=1)
    neutral_clear_score: float = Field(0.3, ge=0, lt=1)
    neutral_u0_low_pct: float = Field(4.0, ge=0, description="u0 where the score starts")
    neutral_u0_high_pct: float = Field(10.0, gt=0, description="u0 where the score reaches 1")
    energy_balance_margin_pct: float = Field(
        5.0,
        gt=0,
        le=100,
        description="energy_balance: the child meters' sum may exceed their parent's "
        "active power by this % of the parent's",
    )
    energy_balance_hysteresis_pct: float = Field(
        2.0, ge=0, description="energy_balance clears below margin - this (% of the parent)"
    )
    energy_balance_min_parent_w: float = Field(
        1000.0, ge=0, description="energy_balance is not evaluated while |parent P| is below"
    )
    dip_pct: float = Field(
        90.0, gt=0, lt=100, description="voltage_dip: a phase below this % of nominal"
    )
    swell_pct: float = Field(
        110.0, gt=100, le=200, description="voltage_swell: a phase above this % of nominal"
    )
    interruption_pct: float = Field(
        5.0, gt=0, lt=100, description="interruption: a phase below this % of nominal"
    )
    quality_hysteresis_pct: float = Field(
        2.0,
        ge=0,
        le=10,
        description="a dip, swell or interruption ends this % of nominal inside its threshold",
    )
    overvoltage_pct: float = Field(
        10.0, gt=0, le=50, description="overvoltage: 10-min mean above nominal + this %"
    )
    undervoltage_pct: float = Field(
        10.0, gt=0, le=50, description="undervoltage: 10-min mean below nominal - this %"
    )
    voltage_hysteresis_pct: float = Field(
        1.0, ge=0, le=10, description="over/undervoltage clear this % of nominal inside"
    )
    frequency_pct: float = Field(
        1.0, gt=0, le=10, description="frequency_deviation: alarm-slot mean off nominal by more"
    )
    frequency_extreme_high_pct: float = Field(
        4.0, gt=0, le=20, description="above nominal + this % the deviation is extreme"
    )
    frequency_extreme_low_pct: float = Field(
        6.0, gt=0, le=20, description="below nominal - this % the deviation is extreme"
    )
    frequency_hysteresis_pct: float = Field(
        0.2, ge=0, le=5, description="frequency_deviation clears this % inside its band"
    )
    ct_overload_pct: float = Field(
        100.0, gt=0, le=1000, description="ct_overload: current above this % of ct_primary_a"
    )
    ct_overload_hysteresis_pct: float = Field(
        5.0, ge=0, le=50, description="ct_overload clears this % (of the rating) below"
    )
    ct_crest_margin: float = Field(
        0.08,
        gt=0,
        le=1,
        description="ct_saturation: the current's crest factor this much below the voltage's",
    )
    ct_flat_share: float = Field(
        0.30, gt=0, lt=1, description="ct_saturation: share of samples on the flat top"
    )
    ct_third_harmonic_pct: float = Field(
        5.0,
        gt=0,
        le=100,
        description="ct_saturation: 3rd current harmonic above this % of the fundamental",
    )

    @model_validator(mode="after")
    def _order(self) -> AlarmLimits:
        if self.interruption_pct >= self.dip_pct:
            raise ValueError("interruption_pct must be below dip_pct")
        if self.dip_pct + self.quality_hysteresis_pct >= self.swell_pct:
            raise ValueError("dip_pct + quality_hysteresis_pct must be below swell_pct")
        if self.frequency_hysteresis_pct >= self.frequency_pct:
            raise ValueError("frequency_hysteresis_pct must be below frequency_pct")
        if self.frequency_extreme_high_pct < self.frequency_pct or (
            self.frequency_extreme_low_pct < self.frequency_pct
        ):
            raise ValueError("the extreme frequency bands must lie beyond frequency_pct")
        if self.neutral_clear_score >= self.neutral_raise_score:
            raise ValueError("neutral_clear_score must be below neutral_raise_score")
        if self.neutral_u0_high_pct <= self.neutral_u0_low_pct:
            raise ValueError("neutral_u0_high_pct must be above neutral_u0_low_pct")
        if self.energy_balance_hysteresis_pct >= self.energy_balance_margin_pct:
            raise ValueError(
                "energy_balance_hysteresis_pct must be below energy_balance_margin_pct"
            )
        return self


class MeterAnalytics(BaseModel):
    """Per-meter options (key: meter name)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sqrt3_correction: bool | None = Field(
        None,
        description="voltages are line-to-line: divide by sqrt(3) for per-phase S "
        "(default: true when the meter's wiring is delta)",
    )
    pf_mismatch_tolerance: float = Field(
        0.05, gt=0, le=1, description="|meter PF - P/S| above this flags meter_pf_mismatch"
    )
    three_phase: bool | None = Field(
        None, description="broken-neutral/unbalance apply (default: three voltages present)"
    )
    nominal_voltage_v: float | None = Field(
        None,
        gt=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="this meter's line-to-neutral nominal voltage (V, primary: an MV meter "
        "behind PTs), for dips, swells, interruptions and over/undervoltage (default: "
        "thresholds.nominal_voltage_v)",
    )
    ct_primary_a: float | None = Field(
        None,
        gt=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="the CTs' rated primary current (A): ct_overload above it (default: "
        "no ct_overload)",
    )


class AnalyticsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    average_slots_s: list[WholeSeconds] = Field(
        default_factory=lambda: [5, 10, 20, 30, 60], description="moving-average windows"
    )
    demand_window_s: WholeSeconds = Field(900, ge=60, le=3600, description="billing demand window")
    alarm_slot_s: WholeSeconds = Field(10, description="the averaging slot the alarms look at")
    aggregates: bool = Field(True, description="publish IEC 61000-4-30 3 s / 10 min aggregates")
    batch_window_s: Duration = Field(
        0.05,
        ge=0,
        le=1,
        description="readings are analysed in batches: the longest a reading waits for "
        "others (0: whatever one read of the broker connection brought)",
    )
    batch_max: int = Field(2000, ge=1, le=100_000, description="readings per batch at most")
    #: also publish each batch's metrics messages together, in archive batches
    #: (``pfm/v1/{site}/archive/analytics``) for an archiver with ``archive_batches: true``
    archive_batches: bool = Field(
        False, description="also publish the metrics in archive batches, for the archiver"
    )
    archive_batch_max: int = Field(
        1000, ge=1, le=100_000, description="metrics messages per archive batch at most"
    )
    archive_batch_bytes: int = Field(
        512_000,
        ge=16_384,
        le=1_000_000,
        description="bytes per archive batch at most (brokers drop larger messages: "
        "Mosquitto's message_size_limit is 1 MiB in deploy/mosquitto)",
    )
    limits: AlarmLimits = Field(default_factory=AlarmLimits)
    #: per alarm code, what differs from the alarm's own defaults (the alarm table,
    #: ``services/analytics/alarms.py``, knows the codes and checks them at start)
    alarms: dict[Slug, AlarmTiming] = Field(default_factory=dict)
    meters: dict[str, MeterAnalytics] = Field(default_factory=dict)

    @field_validator("average_slots_s")
    @classmethod
    def _slots(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one averaging slot is needed")
        bad = [s for s in value if s < 1 or s > 3600]
        if bad:
            raise ValueError(f"slots must be 1..3600 s, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate slots in {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _alarm_slot(self) -> AnalyticsConfig:
        if self.alarm_slot_s not in self.average_slots_s:
            raise ValueError(
                f"alarm_slot_s {self.alarm_slot_s} is not one of average_slots_s "
                f"{self.average_slots_s}"
            )
        return self

    def meter(self, name: str) -> MeterAnalytics:
        return self.meters.get(name) or MeterAnalytics()
