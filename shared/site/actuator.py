"""Site-file section owned by the actuator: output devices, relay actions, capacitor banks.

Only the shape of each entry is checked here (types, ranges, durations, the
``device:table:address`` output form). What needs the whole site -- expressions,
meters and devices that exist, two actions driving one output -- is checked by
``services.actuator.rules.check_site`` (the actuator at start and ``pfmon rules check``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from shared.site.core import Duration, parse_duration
from shared.topics import Slug

__all__ = [
    "ActuatorConfig",
    "AverageSlot",
    "BankConfig",
    "Duration",
    "Output",
    "OutputDevice",
    "OutputRef",
    "RelayAction",
    "parse_duration",
]

_OUTPUT = re.compile(r"^([a-z0-9_-]+):(coil|pin):(\d{1,5})$")


class OutputRef(BaseModel):
    """One output: ``device:table:address`` (``io1:coil:0``; ``pin`` on a PMTR_001)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    device: str
    table: Literal["coil", "pin"]
    address: int

    def __str__(self) -> str:
        return f"{self.device}:{self.table}:{self.address}"


def _parse_output(value: object) -> object:
    if isinstance(value, OutputRef | dict):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"{value!r} is not an output (write device:table:address, e.g. io1:coil:0)"
        )
    match = _OUTPUT.match(value.strip())
    if not match:
        raise ValueError(
            f"{value!r} is not an output: write device:table:address with table coil "
            "(or pin on a PMTR_001), e.g. io1:coil:0"
        )
    address = int(match.group(3))
    if address > 65535:
        raise ValueError(f"{value!r}: address {address} is above 65535")
    return {"device": match.group(1), "table": match.group(2), "address": address}


Output = Annotated[OutputRef, BeforeValidator(_parse_output)]


def _parse_average(value: object) -> object:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "0", "0s")):
        return None
    seconds = parse_duration(value)
    if seconds != int(seconds) or seconds <= 0:
        raise ValueError(f"{value!r}: the average window is a whole number of seconds, e.g. 10s")
    return f"{int(seconds)}s"


#: moving-average slot name as analytics publishes it (``"10s"``), or None = instantaneous
AverageSlot = Annotated[str | None, BeforeValidator(_parse_average)]


class OutputDevice(BaseModel):
    """A relay I/O module or capacitor-bank controller reached over Modbus (coils)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Slug
    bus: Slug
    unit: int = Field(ge=1, le=247)
    kind: Literal["relay", "capbank", "pmtr001"] = "relay"
    coils: int = Field(16, ge=1, le=2000, description="number of coils the device has")
    write_retries: int = Field(2, ge=0, le=10, description="retries of a failed/unverified write")
    poll_s: Duration = Field(10.0, gt=0, le=3600, description="read-back period of the coils")


class RelayAction(BaseModel):
    """A relay action: exactly the keys of the PMTR_001 semantics (issue 5)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Slug
    meter: Slug
    when: str = Field(min_length=1)
    average: AverageSlot = None
    dry_run: bool = False
    recovery: Duration = 0.0
    level: Literal["high", "low"] = "high"
    outputs: list[Output] = Field(min_length=1)


class BankConfig(BaseModel):
    """A capacitor bank regulated by the PF controller."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Slug
    meter: Slug
    device: Slug
    #: step sizes in kvar, list or ``"1:1:2:2"``
    steps_kvar: list[float] = Field(min_length=1, max_length=16)
    #: coil of each step on the device (default 0, 1, 2, ...)
    coils: list[int] | None = None
    target_pf: float = Field(0.97, ge=0.8, le=1.0)
    #: C/k: react when the reactive deficit/surplus exceeds this fraction of the smallest step
    response_threshold: float = Field(0.33, gt=0.0, le=1.0)
    program: Literal["linear", "circular", "optimal"] = "optimal"
    min_interval: Duration = 10.0
    reconnect_delay: Duration = 60.0
    operation_limit: int = Field(100_000, ge=1)
    learn_steps: bool = False
    settle: Duration = 2.0
    average: AverageSlot = "10s"
    alarm_delay: Duration = 60.0
    thd_limit_pct: float = Field(20.0, gt=0)
    short_circuit_kva: float | None = Field(None, gt=0)
    no_current_a: float = Field(0.5, ge=0)
    on_no_current: Literal["hold", "disconnect"] = "disconnect"
    stale_after: Duration = 15.0
    on_stale: Literal["hold", "disconnect"] = "hold"
    dry_run: bool = False

    @model_validator(mode="before")
    @classmethod
    def _steps_text(cls, data: object) -> object:
        raw = data.get("steps_kvar") if isinstance(data, dict) else None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            # YAML 1.1 reads an unquoted 25:25:25:25 as one base-60 number (5493025)
            raise ValueError(
                f"steps_kvar: got the single number {raw:g}; write the steps as a list "
                "([25, 25, 50]) or a quoted string ('25:25:50') - YAML reads an unquoted "
                "25:25:50 as one base-60 number"
            )
        if isinstance(data, dict) and isinstance(data.get("steps_kvar"), str):
            text = data["steps_kvar"]
            try:
                steps = [float(x) for x in text.split(":")]
            except ValueError:
                raise ValueError(
                    f"steps_kvar: {text!r} is not a list of kvar like 1:1:2:2"
                ) from None
            data = {**data, "steps_kvar": steps}
        return data

    @model_validator(mode="after")
    def _check(self) -> BankConfig:
        problems = []
        if any(s <= 0 for s in self.steps_kvar):
            problems.append(f"steps_kvar: every step must be > 0 kvar (got {self.steps_kvar})")
        if self.coils is not None:
            if len(self.coils) != len(self.steps_kvar):
                problems.append(
                    f"coils: {len(self.coils)} coil(s) for {len(self.steps_kvar)} step(s)"
                )
            if len(set(self.coils)) != len(self.coils):
                problems.append(f"coils: a coil is used twice ({self.coils})")
        if self.reconnect_delay < 1.0:
            problems.append(
                f"reconnect_delay: {self.reconnect_delay:g}s is too short for a capacitor "
                "to discharge (at least 1s; 60s is usual)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def step_coils(self) -> list[int]:
        return list(self.coils) if self.coils is not None else list(range(len(self.steps_kvar)))


class ActuatorConfig(BaseModel):
    """Site-wide actuator settings (``actuator:`` in the site file)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: metrics older than this are stale: relay actions do not switch, an event is raised
    stale_after: Duration = 15.0
    #: how often stale data and bank timers are checked
    tick: Duration = 1.0
