"""Site-file sections several services share: thresholds, buses, meters."""

from __future__ import annotations

import ipaddress
import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from shared.measurements import Measurement
from shared.topics import Slug


class Limit(BaseModel):
    """A tighter plausible range for one measurement (either end may be left out)."""

    model_config = ConfigDict(extra="forbid")

    min: float | None = Field(None, allow_inf_nan=False)
    max: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _order(self) -> Limit:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g})")
        return self


def _within_bounds(limits: dict[Measurement, Limit]) -> dict[Measurement, Limit]:
    problems = []
    for m, lim in limits.items():
        lo, hi = m.bounds
        unit = f" {m.unit}" if m.unit else ""
        if lim.min is not None and not lo <= lim.min <= hi:
            problems.append(f"{m.value}.min {lim.min:g} is outside [{lo:g}, {hi:g}]{unit}")
        if lim.max is not None and not lo <= lim.max <= hi:
            problems.append(f"{m.value}.max {lim.max:g} is outside [{lo:g}, {hi:g}]{unit}")
    if problems:
        raise ValueError("limits may only tighten the physical bounds: " + "; ".join(problems))
    return limits


#: ``limits:`` of the site or of a meter: measurement -> {min, max}, inside the
#: measurement's physical bounds (``Measurement.bounds``)
Limits = Annotated[dict[Measurement, Limit], AfterValidator(_within_bounds)]


def merged_limits(*layers: dict[Measurement, Limit]) -> dict[Measurement, tuple[float, float]]:
    """The ranges the layers give: an end a later layer sets replaces the earlier one's;
    an end nobody sets is the physical bound."""
    out: dict[Measurement, tuple[float, float]] = {}
    for layer in layers:
        for m, lim in layer.items():
            lo, hi = out.get(m, m.bounds)
            out[m] = (lo if lim.min is None else lim.min, hi if lim.max is None else lim.max)
    return out


class Thresholds(BaseModel):
    """Power-factor thresholds of the site (used by analytics, actuator and reports)."""

    model_config = ConfigDict(extra="forbid")

    pf_alert: float = Field(0.97, gt=0, le=1, description="internal alert below this PF")
    pf_penalty: float = Field(0.90, gt=0, le=1, description="utility penalty below this PF")
    voltage_unbalance_pct: float = Field(2.0, gt=0, description="u2 alarm threshold")
    nominal_voltage_v: float = Field(230.0, gt=0, description="line-to-neutral nominal")
    nominal_frequency_hz: Literal[50, 60] = 50

    @model_validator(mode="after")
    def _order(self) -> Thresholds:
        if self.pf_penalty > self.pf_alert:
            raise ValueError(
                f"pf_penalty ({self.pf_penalty}) must not be above pf_alert ({self.pf_alert})"
            )
        return self


class BusConfig(BaseModel):
    """One bus: Modbus TCP, RTU on a serial port, RTU framed over TCP, or this gateway's
    BACnet/IP port (``kind: bacnet``: ``host`` is the gateway's own address on the BACnet
    network, e.g. ``192.168.1.10/24``; ``port`` its UDP port, 47808 by default)."""

    model_config = ConfigDict(extra="forbid")

    name: Slug
    kind: Literal["tcp", "rtu", "rtu_over_tcp", "bacnet"] = "tcp"
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    serial: str | None = Field(None, description="serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout_s: float = Field(1.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=10)
    inter_frame_delay_s: float = Field(
        0.0, ge=0, le=5, description="pause between requests to different units on this bus"
    )
    connections: int | None = Field(
        None,
        ge=1,
        le=64,
        description="parallel connections (tcp/rtu_over_tcp; default 2, rtu: always 1) so "
        "that one slow unit never holds up the others",
    )
    reprobe_max_s: float = Field(
        60.0, gt=0, le=3600, description="longest wait between probes of an offline device"
    )

    @model_validator(mode="after")
    def _endpoint(self) -> BusConfig:
        if self.kind in ("tcp", "rtu_over_tcp") and not self.host:
            raise ValueError(f"bus {self.name!r}: kind {self.kind} needs 'host'")
        if self.kind == "rtu" and not self.serial:
            raise ValueError(f"bus {self.name!r}: kind rtu needs 'serial' (e.g. /dev/ttyUSB0)")
        if self.kind in ("tcp", "rtu_over_tcp") and self.port is None:
            self.port = 502
        if self.kind == "bacnet":
            if not self.host:
                raise ValueError(
                    f"bus {self.name!r}: kind bacnet needs 'host', this gateway's own address "
                    "on the BACnet/IP network (e.g. 192.168.1.10/24)"
                )
            problem = bacnet_address_problem(self.host)
            if problem:
                raise ValueError(f"bus {self.name!r}: host {self.host!r}: {problem}")
            if ":" in self.host:
                raise ValueError(
                    f"bus {self.name!r}: host {self.host!r}: give the UDP port as 'port'"
                )
            if self.port is None:
                self.port = BACNET_PORT
        if self.kind == "rtu" and self.connections not in (None, 1):
            raise ValueError(f"bus {self.name!r}: a serial line has exactly one connection")
        return self

    @property
    def pool_size(self) -> int:
        """How many connections the collector opens to this bus."""
        if self.kind == "rtu":
            return 1
        return self.connections or 2


#: BACnet/IP's UDP port (0xBAC0)
BACNET_PORT = 47808
#: the highest device instance (4194303 is the wildcard)
BACNET_MAX_INSTANCE = 4194302


def bacnet_address_problem(text: str) -> str | None:
    """Why ``text`` is not an IPv4 BACnet/IP address (``a.b.c.d``, ``a.b.c.d/prefix``,
    ``a.b.c.d:port``), or None."""
    host, _, port = text.partition(":")
    host, _, prefix = host.partition("/")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return "not an IPv4 address (a.b.c.d, a.b.c.d/24 or a.b.c.d:47808)"
    if prefix and not (prefix.isdigit() and 0 <= int(prefix) <= 32):
        return f"prefix /{prefix} is not 0-32"
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port!r} is not 1-65535"
    return None


class BacnetTarget(BaseModel):
    """Where a BACnet/IP meter is: its IP address (and UDP port) and device instance."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(description="the device's IPv4 address, e.g. 192.168.1.50 or :47808")
    device_instance: int = Field(
        ge=0, le=BACNET_MAX_INSTANCE, description="the device object's instance number"
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        problem = bacnet_address_problem(value)
        if problem or "/" in value:
            raise ValueError(problem or "no /prefix here: the device's address, e.g. 10.0.0.9")
        return value


def _parse_ratio(value: object) -> float:
    """``"400/5"`` (primary/secondary), ``"11000/110"`` or a plain number as a ratio > 0."""
    if isinstance(value, bool):
        raise ValueError("not a ratio: write primary/secondary like '400/5'")
    if isinstance(value, int | float):
        ratio = float(value)
    elif isinstance(value, str):
        text = value.strip()
        parts = text.split("/")
        if len(parts) > 2 or not all(p.strip() for p in parts):
            raise ValueError("not a ratio: write primary/secondary like '400/5'")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ValueError("not a ratio: write primary/secondary like '400/5'") from None
        if any(not math.isfinite(n) or n <= 0 for n in numbers):
            raise ValueError("primary and secondary must both be finite numbers > 0")
        ratio = numbers[0] / numbers[1] if len(numbers) == 2 else numbers[0]
    else:
        raise ValueError("not a ratio: write primary/secondary like '400/5'")
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError("a ratio must be a finite number > 0")
    return ratio


#: a CT or PT ratio, primary over secondary: ``"400/5"`` = 80, or a plain number
Ratio = Annotated[float, BeforeValidator(_parse_ratio)]

#: where a meter sits in the switchboard
Role = Literal["billing", "feeder", "generation"]


class MeterConfig(BaseModel):
    """One meter: where it is and which profile decodes it."""

    model_config = ConfigDict(extra="forbid")

    name: Slug
    bus: Slug
    unit: int | None = Field(
        None,
        ge=1,
        le=247,
        description="Modbus unit id 1-247 (0 is broadcast, 248-255 reserved); "
        "a BACnet meter has none",
    )
    bacnet: BacnetTarget | None = Field(
        None, description="a BACnet/IP meter (on a bus of kind bacnet): address, device_instance"
    )
    profile: str = Field(min_length=1, description="built-in or user-defined profile name")
    interval_s: float = Field(1.0, ge=0.05, le=3600, description="poll interval")
    wiring: Literal["star", "delta"] = Field(
        "star", description="delta = the meter reports line-to-line voltages (sqrt(3) correction)"
    )
    expect_export: bool = Field(False, description="site may export here (no ct_reversed alarm)")
    timeout_s: float | None = Field(None, gt=0, le=60, description="overrides the bus timeout")
    offline_after: int = Field(3, ge=1, le=100, description="failed polls before offline")
    time_sync: bool = Field(
        True,
        description="push the gateway's clock to the device at start and daily "
        "(profiles with a clock, e.g. pmtr001)",
    )
    role: Role | None = Field(
        None,
        description="billing = a utility point of common coupling (billed); feeder = below "
        "its parent; generation = PV or genset (export expected). Default: feeder when a "
        "parent is given, else billing",
    )
    parent: Slug | None = Field(None, description="the meter upstream of this one")
    ct_ratio: Ratio = Field(
        1.0, description="current transformer, primary/secondary ('400/5'); 1 = direct"
    )
    pt_ratio: Ratio = Field(
        1.0, description="voltage transformer, primary/secondary ('11000/110'); 1 = direct"
    )
    limits: Limits = Field(
        default_factory=dict,
        description="tighter plausible ranges of this meter's values (over the site's)",
    )

    @property
    def kind(self) -> Role:
        """The meter's role, with the default filled in."""
        if self.role is not None:
            return self.role
        return "feeder" if self.parent else "billing"

    @property
    def exports(self) -> bool:
        """Whether export (P < 0) is expected here: generation, or said so."""
        return self.expect_export or self.kind == "generation"
