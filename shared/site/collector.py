"""Site-file sections owned by the collector: user-defined meter profiles (Modbus
``profiles:`` and BACnet/IP ``bacnet_profiles:``).

A ``profiles:`` entry uses exactly the fields of the built-in tables in
``services/collector/profiles.py``::

    profiles:
      my_meter:
        description: "Acme PM-3 (firmware 2.1)"
        phases: 3
        max_gap: 4            # registers read across to merge two requests
        reports_primary: false  # true: the device applies its CT/PT ratios itself
        registers:
          voltage_l1: {table: input, address: 0, type: f32}
          current_l1: {table: input, address: 6, type: u32, word_order: little, scale: 0.001}
          power_factor_l1: {table: input, address: 30, type: f32, signed_by: power_l1}

A ``bacnet_profiles:`` entry maps measurements to BACnet objects (present-value and
units are read; the units are checked and scaled to SI by the collector)::

    bacnet_profiles:
      acme_bms_meter:
        description: "Acme BMS meter"
        phases: 3
        objects:
          voltage_l1: {instance: 101}                  # analog-input by default
          power: {type: analog-value, instance: 7}
          power_factor: {instance: 110, signed_by: power}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.measurements import Measurement

RegisterType = Literal["u16", "s16", "u32", "s32", "f32", "u64"]

#: registers each type occupies
TYPE_WIDTH: dict[str, int] = {"u16": 1, "s16": 1, "u32": 2, "s32": 2, "f32": 2, "u64": 4}


class RegisterSpec(BaseModel):
    """Where one measurement lives on the device and how to decode it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    table: Literal["holding", "input"] = "holding"
    address: int = Field(ge=0, le=65535, description="0-based register address (PDU)")
    type: RegisterType = "u16"
    word_order: Literal["big", "little"] = Field(
        "big", description="big = most significant word first; little = least significant first"
    )
    scale: float = Field(1.0, description="multiply the raw number by this to get SI units")
    unit: str = Field("", description="the device's unit, for documentation (e.g. 0.1 kWh)")
    signed_by: Measurement | None = Field(
        None,
        description="take the magnitude from this register and the sign of that measurement "
        "(a PF whose vendor sign means lead/lag becomes P/S signed by P)",
    )
    zero_is_missing: bool = Field(
        False, description="the device writes 0 when its own read failed: drop the value"
    )

    @model_validator(mode="after")
    def _fits(self) -> RegisterSpec:
        if self.address + TYPE_WIDTH[self.type] > 65536:
            raise ValueError(f"{self.type} at {self.address} runs past register 65535")
        return self


class ProfileSpec(BaseModel):
    """A user-defined meter profile: measurement -> register spec."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    description: str = ""
    phases: Literal[1, 3] = 3
    max_gap: int = Field(0, ge=0, le=100, description="unmapped registers read across")
    reports_primary: bool = Field(
        False,
        description="the device applies its CT/PT ratios itself (set in the meter) and "
        "reports primary values: the meter's ct_ratio/pt_ratio are not applied again",
    )
    registers: dict[Measurement, RegisterSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _signs(self) -> ProfileSpec:
        bad = [
            f"{m.value}.signed_by: {spec.signed_by.value} is not in this profile"
            for m, spec in self.registers.items()
            if spec.signed_by is not None and spec.signed_by not in self.registers
        ]
        if bad:
            raise ValueError("; ".join(bad))
        return self


#: the BACnet object types a profile may map (a REAL present-value with units)
BacnetObjectType = Literal["analog-input", "analog-value"]


class BacnetObjectSpec(BaseModel):
    """One BACnet object of a meter: its type and instance."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    type: BacnetObjectType = "analog-input"
    instance: int = Field(ge=0, le=4194302, description="the object's instance number")
    signed_by: Measurement | None = Field(
        None, description="magnitude from this object, sign from that measurement (a PF)"
    )


class BacnetProfileSpec(BaseModel):
    """A user-defined BACnet meter profile: measurement -> object."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    description: str = ""
    phases: Literal[1, 3] = 3
    objects: dict[Measurement, BacnetObjectSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> BacnetProfileSpec:
        problems = [
            f"{m.value}.signed_by: {spec.signed_by.value} is not in this profile"
            for m, spec in self.objects.items()
            if spec.signed_by is not None and spec.signed_by not in self.objects
        ]
        seen: dict[tuple[str, int], Measurement] = {}
        for m, spec in self.objects.items():
            key = (spec.type, spec.instance)
            if key in seen:
                problems.append(
                    f"{m.value}: object {spec.type},{spec.instance} is already {seen[key].value}"
                )
            seen[key] = m
        if problems:
            raise ValueError(", ".join(problems))
        return self
