"""Site-file section owned by the actuator: output devices, relay actions, banks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.topics import Slug


class OutputDevice(BaseModel):
    """A relay I/O module or capacitor-bank controller reached over Modbus."""

    model_config = ConfigDict(extra="forbid")

    name: Slug
    bus: Slug
    unit: int = Field(ge=1, le=247)
    kind: Literal["relay", "capbank", "pmtr001"] = "relay"


class RelayAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Slug
    meter: Slug
    when: str


class BankConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Slug
    meter: Slug
    device: Slug
