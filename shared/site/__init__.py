"""The site file: one YAML document per site (meters, buses, rules, thresholds).

:func:`load_site` reads and validates it. An invalid file raises one
:class:`~shared.errors.ConfigError` that names the file and lists every bad
field with its path (``meters[2].unit: ...``); the CLI turns it into exit code 2.

Each service owns its own section module here (``collector``, ``analytics``,
``actuator``, ``archiver``, ``console``); ``core`` holds what several services share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ConfigError
from shared.measurements import Measurement
from shared.site.actuator import ActuatorConfig, BankConfig, OutputDevice, RelayAction
from shared.site.analytics import AnalyticsConfig
from shared.site.archiver import ArchiverConfig
from shared.site.collector import BacnetProfileSpec, ProfileSpec
from shared.site.console import ConsoleConfig
from shared.site.core import (
    BACNET_PORT,
    BusConfig,
    Limit,
    Limits,
    MeterConfig,
    Thresholds,
    TimeZoneName,
    merged_limits,
    zone,
)
from shared.site.homeassistant import HomeAssistantConfig
from shared.topics import Slug

__all__ = [
    "ActuatorConfig",
    "BacnetProfileSpec",
    "BankConfig",
    "BusConfig",
    "ConsoleConfig",
    "HomeAssistantConfig",
    "Limit",
    "MeterConfig",
    "OutputDevice",
    "ProfileSpec",
    "RelayAction",
    "SiteConfig",
    "Thresholds",
    "format_validation_error",
    "load_site",
    "parse_site",
]


class SiteConfig(BaseModel):
    """Root of the site YAML file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    site: Slug
    gateway: Slug = "gw1"
    description: str = ""
    #: the site's time zone (IANA name): what ``hour``/``weekday``... mean in relay actions.
    #: No default on purpose: a rule that reads the clock needs it written down
    timezone: TimeZoneName | None = None
    thresholds: Thresholds = Field(default_factory=Thresholds)
    #: tighter plausible ranges for every meter of the site (a meter's own win)
    limits: Limits = Field(default_factory=dict)
    buses: list[BusConfig] = Field(default_factory=list)
    meters: list[MeterConfig] = Field(default_factory=list)
    profiles: dict[str, ProfileSpec] = Field(default_factory=dict)
    #: user-defined BACnet/IP meter profiles (measurement -> object)
    bacnet_profiles: dict[str, BacnetProfileSpec] = Field(default_factory=dict)
    devices: list[OutputDevice] = Field(default_factory=list)
    relay_actions: list[RelayAction] = Field(default_factory=list)
    banks: list[BankConfig] = Field(default_factory=list)
    actuator: ActuatorConfig = Field(default_factory=ActuatorConfig)
    analytics: AnalyticsConfig = Field(default_factory=AnalyticsConfig)
    archiver: ArchiverConfig = Field(default_factory=ArchiverConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    #: Home Assistant MQTT discovery: off without the section
    homeassistant: HomeAssistantConfig | None = None

    @model_validator(mode="after")
    def _cross_check(self) -> SiteConfig:
        problems: list[str] = []
        bus_names = [b.name for b in self.buses]
        problems += _duplicates("buses", bus_names)
        problems += _duplicates("meters", [m.name for m in self.meters])
        problems += _duplicates("devices", [d.name for d in self.devices])
        for i, meter in enumerate(self.meters):
            if meter.bus not in bus_names:
                known = ", ".join(bus_names) or "none"
                problems.append(f"meters[{i}].bus: no bus named {meter.bus!r} (buses: {known})")
        for i, meter in enumerate(self.meters):
            for m, (lo, hi) in merged_limits(self.limits, meter.limits).items():
                if lo > hi:
                    problems.append(
                        f"meters[{i}].limits.{m.value}: min {lo:g} is above max {hi:g} "
                        "with the site's limits applied"
                    )
        meter_names = {m.name for m in self.meters}
        for name in self.analytics.meters:
            # a site without polled meters may tune waveform sources that publish directly
            if meter_names and name not in meter_names:
                problems.append(
                    f"analytics.meters.{name}: no meter named {name!r} "
                    f"(meters: {', '.join(sorted(meter_names)) or 'none'})"
                )
        for i, dev in enumerate(self.devices):
            if dev.bus not in bus_names:
                problems.append(f"devices[{i}].bus: no bus named {dev.bus!r}")
        problems += _transport_problems(self.meters, {b.name: b for b in self.buses})
        problems += _topology_problems(self.meters)
        for i, bank in enumerate(self.banks):
            if meter_names and bank.meter not in meter_names:
                problems.append(
                    f"banks[{i}].meter: no meter named {bank.meter!r} to compensate "
                    f"(meters: {', '.join(sorted(meter_names))})"
                )
        if self.homeassistant is not None and self.homeassistant.meters is not None:
            for name in self.homeassistant.meters:
                if name not in meter_names:
                    problems.append(
                        f"homeassistant.meters: no meter named {name!r} "
                        f"(meters: {', '.join(sorted(meter_names)) or 'none'})"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def zone(self) -> ZoneInfo:
        """The site's time zone (UTC when the file gives none)."""
        return zone(self.timezone)

    def meter(self, name: str) -> MeterConfig:
        for m in self.meters:
            if m.name == name:
                return m
        raise KeyError(name)

    def limits_of(self, meter: str) -> dict[Measurement, tuple[float, float]]:
        """The configured ranges for ``meter``: the site's, then the meter's own."""
        own = next((m.limits for m in self.meters if m.name == meter), {})
        return merged_limits(self.limits, own)

    def bus(self, name: str) -> BusConfig:
        for b in self.buses:
            if b.name == name:
                return b
        raise KeyError(name)

    # -- topology: the switchboard as wired ----------------------------------------------

    def billing_meters(self) -> list[MeterConfig]:
        """The utility points of common coupling: what the site is billed on."""
        return [m for m in self.meters if m.kind == "billing"]

    def children(self, name: str) -> list[MeterConfig]:
        """The meters whose parent is ``name``, in file order."""
        return [m for m in self.meters if m.parent == name]

    def billing_point(self, name: str) -> MeterConfig | None:
        """The billing meter above ``name`` (itself when it is one), None when none is."""
        meter: MeterConfig | None = self.meter(name)
        seen: set[str] = set()
        while meter is not None and meter.name not in seen:
            if meter.kind == "billing":
                return meter
            seen.add(meter.name)
            meter = self.meter(meter.parent) if meter.parent else None
        return None


def _transport_problems(meters: list[MeterConfig], buses: dict[str, BusConfig]) -> list[str]:
    """A Modbus meter has a unit id on a Modbus bus, a BACnet meter its ``bacnet`` target on
    a bus of kind bacnet; neither address is used twice."""
    problems: list[str] = []
    seen_units: dict[tuple[str, int], str] = {}
    seen_devices: dict[tuple[str, int], str] = {}
    for i, meter in enumerate(meters):
        bus = buses.get(meter.bus)
        if bus is None:
            continue  # reported with the bus
        where = f"meters[{i}]"
        if bus.kind == "bacnet":
            if meter.bacnet is None:
                problems.append(
                    f"{where}.bacnet: meter {meter.name!r} is on BACnet bus {bus.name!r} and "
                    "needs 'bacnet: {address: ..., device_instance: ...}'"
                )
            if meter.unit is not None:
                problems.append(
                    f"{where}.unit: a BACnet meter has no Modbus unit id (its device is "
                    "bacnet.device_instance)"
                )
            if meter.bacnet is not None:
                address = meter.bacnet.address
                if ":" not in address:
                    address += f":{BACNET_PORT}"
                key = (address, meter.bacnet.device_instance)
                if key in seen_devices:
                    problems.append(
                        f"{where}.bacnet: device {key[1]} at {key[0]} is already used by "
                        f"{seen_devices[key]!r}"
                    )
                seen_devices[key] = meter.name
            continue
        if meter.bacnet is not None:
            problems.append(
                f"{where}.bacnet: bus {bus.name!r} is a Modbus bus (kind {bus.kind}), a BACnet "
                "meter needs a bus of kind bacnet"
            )
        if meter.unit is None:
            problems.append(f"{where}.unit: a Modbus meter needs its unit id (1-247)")
            continue
        key = (meter.bus, meter.unit)
        if key in seen_units:
            problems.append(
                f"{where}.unit: unit {meter.unit} on bus {meter.bus!r} is already "
                f"used by {seen_units[key]!r}"
            )
        seen_units[key] = meter.name
    return problems


def _topology_problems(meters: list[MeterConfig]) -> list[str]:
    """Roles and parents: every feeder hangs, through its parents, below a billing point;
    no cycles; no unknown parents."""
    by_name = {m.name: m for m in meters}
    problems: list[str] = []
    for i, meter in enumerate(meters):
        where = f"meters[{i}]"
        if meter.parent is None:
            if meter.kind == "feeder":
                problems.append(
                    f"{where}.parent: feeder {meter.name!r} needs a parent (the meter "
                    "upstream of it)"
                )
            continue
        if meter.parent == meter.name:
            problems.append(f"{where}.parent: {meter.name!r} cannot be its own parent")
            continue
        if meter.parent not in by_name:
            problems.append(
                f"{where}.parent: no meter named {meter.parent!r} "
                f"(meters: {', '.join(sorted(by_name)) or 'none'})"
            )
            continue
        if meter.kind == "billing":
            problems.append(
                f"{where}.parent: {meter.name!r} is a billing point (a utility point of "
                f"common coupling) and has no parent (make it a feeder of {meter.parent!r})"
            )
            continue
        # walk up: a cycle, or a top that is not a billing point
        path = [meter.name]
        up = by_name[meter.parent]
        while True:
            if up.name in path:
                cycle = " -> ".join([*path[path.index(up.name) :], up.name])
                problems.append(f"{where}.parent: the parents form a cycle ({cycle})")
                break
            path.append(up.name)
            if up.parent is None:
                if up.kind != "billing":
                    problems.append(
                        f"{where}.parent: {meter.kind} {meter.name!r} has no billing point "
                        f"above it (its top is {up.kind} {up.name!r})"
                    )
                break
            if up.parent not in by_name:
                break  # reported on that meter
            up = by_name[up.parent]
    return problems


def _duplicates(section: str, names: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name in seen:
            out.append(f"{section}[{i}].name: {name!r} is used twice")
        seen.add(name)
    return out


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per bad field, with its path in the file."""
    problems = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        loc = _loc(tuple(err["loc"]))
        if err["type"] == "value_error" and loc == "(top level)":
            problems.extend(msg.split("; "))
            continue
        got = err.get("input")
        hint = ""
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict | list):
            hint = f" (got {got!r})"
        problems.append(f"{loc}: {msg}{hint}")
    return problems


def parse_site(data: Any, source: str = "<site>") -> SiteConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc)
        raise ConfigError(f"{source}: {len(problems)} invalid field(s)", problems) from exc


def load_site(path: Path | str) -> SiteConfig:
    """Read and validate a site file. Raises :class:`ConfigError` naming file and fields."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read site file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        raise ConfigError(f"{path}: not valid YAML at {where}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_site(data, str(path))
