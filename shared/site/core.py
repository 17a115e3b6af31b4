"""Site-file sections several services share: thresholds, buses, meters."""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import unicodedata
import zoneinfo
from functools import cache
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

# -- durations ------------------------------------------------------------------------------

_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_UNIT_ORDER = ("d", "h", "min", "s", "ms")  # a compound duration goes from large to small
_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE)
_EXPONENT = re.compile(r"[0-9.][eE][+-]?[0-9]", re.ASCII)
_PLAIN = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*", re.ASCII)
#: the longest duration a site file may give (anything longer is a typo)
MAX_DURATION_S = 366 * 86400.0
_HOW = "write e.g. 15, 1000ms, 15s, 15min, 1h or 1h30min"


def _unit_key(unit: str) -> str:
    return "min" if unit == "m" else unit


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a text with units (``1000ms``, ``15s``,
    ``15min``/``15m``, ``1h``, ``2d``, ``1h30min``); a clear ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration ({_HOW})")
    if isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        seconds = float(value)
        if math.isnan(seconds):
            raise ValueError(f"{value!r} is not a duration ({_HOW})")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative: a duration is 0 or more")
    if not seconds <= MAX_DURATION_S:  # also inf
        raise ValueError(
            f"{value!r} is longer than {MAX_DURATION_S / 86400:g} days: not a plausible duration"
        )
    return seconds


def _unit_problem(number: str, unit: str) -> str:
    if not unit:
        return f"{number} needs a unit ({_HOW})"
    low = unit.lower()
    near = (
        "ms"
        if low.startswith(("ms", "milli"))
        else {"s": "s", "m": "min", "h": "h", "d": "d"}.get(low[0], "")
    )
    use = f"write {number}{near}" if near else _HOW
    return f"{unit!r} is not a unit (ms, s, min or m, h, d): {use}"


def _parse_duration_text(text: str) -> float:
    for i, c in enumerate(text):
        if not c.isascii():
            name = unicodedata.name(c, f"U+{ord(c):04X}")
            raise ValueError(
                f"{text!r}: character {i + 1} {c!r} ({name}) is not allowed; durations are "
                f"plain ASCII ({_HOW})"
            )
    if text.strip().startswith("-"):
        raise ValueError(f"{text!r} is negative: a duration is 0 or more")
    if not text.strip():
        raise ValueError(f"an empty text is not a duration ({_HOW})")
    if _EXPONENT.search(text):
        raise ValueError(f"{text!r}: a duration has no exponent ({_HOW})")
    if _PLAIN.fullmatch(text):
        return float(text)
    total, pos, seen = 0.0, 0, -1
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"{text!r} is not a duration ({_HOW})")
        number, unit = match.group(1), match.group(2)
        key = _unit_key(unit)
        if key not in _UNIT_S:
            raise ValueError(f"{text!r} is not a duration: {_unit_problem(number, unit)}")
        rank = _UNIT_ORDER.index(key)
        if rank <= seen:
            raise ValueError(
                f"{text!r} is not a duration: give each unit once, largest first (e.g. 1h30min)"
            )
        seen = rank
        total += float(number) * _UNIT_S[key]
        pos = match.end()
    return total


#: a duration in seconds: a number (seconds) or a text with units, ``1000ms``, ``15s``,
#: ``15min``, ``1h``, ``1h30min``; finite, 0 or more, at most a year; fields add their bounds
Duration = Annotated[float, BeforeValidator(parse_duration)]


def _whole_seconds(value: object) -> int:
    seconds = parse_duration(value)
    if seconds != int(seconds):
        raise ValueError(f"{value!r} is {seconds:g}s: give a whole number of seconds")
    return int(seconds)


#: a duration that must be a whole number of seconds (``15min`` = 900)
WholeSeconds = Annotated[int, BeforeValidator(_whole_seconds)]


# -- time zone ------------------------------------------------------------------------------


@cache
def _zone_names() -> tuple[str, ...]:
    return tuple(sorted(zoneinfo.available_timezones()))


def _zone_name(value: object) -> str:
    """An IANA time zone name that this machine's (or the tzdata package's) database has."""
    how = "an IANA time zone name such as Europe/Berlin, America/New_York or UTC"
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a time zone: write {how}")
    for i, c in enumerate(value):
        if not c.isascii() or not c.isprintable():
            name = unicodedata.name(c, f"U+{ord(c):04X}")
            raise ValueError(f"{value!r}: character {i + 1} ({name}) is not in a time zone name")
    if value in ("localtime", "posixrules"):
        raise ValueError(
            f"{value!r} is this machine's setting, not a place: write the site's zone ({how})"
        )
    names = _zone_names()
    if value in names:
        return value
    same_case = [n for n in names if n.lower() == value.lower()]
    near = same_case or difflib.get_close_matches(value, names, n=1, cutoff=0.75)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValueError(f"{value!r} is not a known time zone{hint}: write {how}")


#: an IANA time zone name (``Europe/Berlin``), checked against the zoneinfo database
TimeZoneName = Annotated[str, BeforeValidator(_zone_name)]


def zone(name: str | None) -> zoneinfo.ZoneInfo:
    """The zone of a validated name (UTC for None)."""
    return zoneinfo.ZoneInfo(name or "UTC")


class Limit(BaseModel):
    """A tighter plausible range for one measurement (either end may be left out)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    pf_alert: float = Field(0.97, gt=0, le=1, description="internal alert below this PF")
    pf_penalty: float = Field(0.90, gt=0, le=1, description="utility penalty below this PF")
    voltage_unbalance_pct: float = Field(2.0, gt=0, le=100, description="u2 alarm threshold")
    nominal_voltage_v: float = Field(
        230.0, gt=0, le=1_000_000, description="line-to-neutral nominal"
    )
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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Slug
    kind: Literal["tcp", "rtu", "rtu_over_tcp", "bacnet"] = "tcp"
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    serial: str | None = Field(None, description="serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout_s: Duration = Field(1.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=10)
    inter_frame_delay_s: Duration = Field(
        0.0, ge=0, le=5, description="pause between requests to different units on this bus"
    )
    connections: int | None = Field(
        None,
        ge=1,
        le=64,
        description="parallel connections (tcp/rtu_over_tcp; default 2, rtu: always 1) so "
        "that one slow unit never holds up the others",
    )
    reprobe_max_s: Duration = Field(
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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


#: the range a CT or PT ratio can have (a 50,000/1 A CT is 5e4; a 765 kV/110 V PT ~7,000)
MIN_RATIO, MAX_RATIO = 1e-3, 1e6


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
    if not MIN_RATIO <= ratio <= MAX_RATIO:
        raise ValueError(
            f"a ratio of {ratio:g} is not a CT or PT: between {MIN_RATIO:g} and {MAX_RATIO:g} "
            "(e.g. '400/5' = 80, '33000/110' = 300)"
        )
    return ratio


#: a CT or PT ratio, primary over secondary: ``"400/5"`` = 80, or a plain number
Ratio = Annotated[float, BeforeValidator(_parse_ratio)]

#: where a meter sits in the switchboard
Role = Literal["billing", "feeder", "generation"]


class MeterConfig(BaseModel):
    """One meter: where it is and which profile decodes it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    interval_s: Duration = Field(1.0, ge=0.05, le=3600, description="poll interval")
    wiring: Literal["star", "delta"] = Field(
        "star", description="delta = the meter reports line-to-line voltages (sqrt(3) correction)"
    )
    expect_export: bool = Field(False, description="site may export here (no ct_reversed alarm)")
    timeout_s: Duration | None = Field(None, gt=0, le=60, description="overrides the bus timeout")
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
