"""Site-file section owned by the collector: user-defined meter profiles."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.measurements import Measurement


class RegisterSpec(BaseModel):
    """Where one measurement lives on the device and how to decode it."""

    model_config = ConfigDict(extra="forbid")

    table: Literal["holding", "input"] = "holding"
    address: int = Field(ge=0, le=65535)
    type: Literal["u16", "s16", "u32", "s32", "f32", "u64"] = "u16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    unit: str = ""


class ProfileSpec(BaseModel):
    """A user-defined meter profile: measurement -> register spec."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    phases: Literal[1, 3] = 3
    registers: dict[Measurement, RegisterSpec]
