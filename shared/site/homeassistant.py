"""Site-file section ``homeassistant:``: Home Assistant MQTT discovery (off without it).

With the section, the collector publishes retained discovery configs under
``{prefix}/{component}/pfm-{site}/{object_id}/config`` for the meters and quantities
chosen here (every meter and every quantity by default), binary sensors for the alarms,
and, only with ``allow_control: true``, one switch per capacitor-bank step whose
commands go to the actuator's request topic (never to the coils)::

    homeassistant:
      prefix: homeassistant        # Home Assistant's discovery prefix
      meters: [main, hvac]         # default: every meter
      quantities: [pf, power, energy, voltage, current]
      alarms: true
      allow_control: false
"""

from __future__ import annotations

import re
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.topics import Slug

__all__ = ["QUANTITIES", "HomeAssistantConfig", "Quantity"]

#: what can be shown, each a group of sensors (per phase where the meter has phases)
Quantity = Literal[
    "pf",
    "power",
    "reactive_power",
    "apparent_power",
    "voltage",
    "current",
    "thd",
    "frequency",
    "energy",
]
QUANTITIES: tuple[Quantity, ...] = typing.get_args(Quantity)
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


class HomeAssistantConfig(BaseModel):
    """Home Assistant MQTT discovery for the site's meters (and, if allowed, its banks)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(True, description="publish discovery configs (false: clear them)")
    prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix")
    meters: list[Slug] | None = Field(None, description="meters to show (default: all)")
    quantities: list[Quantity] = Field(
        default_factory=lambda: list(QUANTITIES), description="quantities to show"
    )
    alarms: bool = Field(True, description="one binary sensor per alarm of each meter")
    allow_control: bool = Field(
        False,
        description="capacitor-bank steps as switches (commands go through the actuator's "
        "request topic, under its interlocks)",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a topic prefix: letters, digits, '_' and '-' in levels "
                "separated by '/', no wildcards, no leading or trailing '/'"
            )
        return value

    @field_validator("quantities")
    @classmethod
    def _quantities(cls, value: list[Quantity]) -> list[Quantity]:
        if len(set(value)) != len(value):
            raise ValueError(f"a quantity is listed twice: {value}")
        return value
