"""Every message on the pfmon bus, as pydantic v2 models serialised with orjson.

Each message carries ``schema`` (a literal name and version: a payload of another
schema fails validation and is dead-lettered), ``site``, ``meter`` or ``device``,
``ts`` (timezone-aware UTC, the gateway's clock at acquisition) and a per-source
``seq`` so that gaps and duplicates are visible downstream.

Values are keyed by :class:`~shared.measurements.Measurement` (SI units).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from shared.measurements import Measurement
from shared.topics import Slug

__all__ = [
    "ActuatorState",
    "Command",
    "DeadLetter",
    "Event",
    "EventState",
    "GatewayStatus",
    "LoadKind",
    "Message",
    "Metrics",
    "Reading",
    "Request",
    "Severity",
    "ValidationError",
    "Waveform",
    "compact_averages",
    "decode",
    "encode",
    "expand_averages",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


#: timezone-aware timestamp, normalised to UTC; a naive timestamp is refused.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


class Message(BaseModel):
    """Base of every bus message."""

    model_config = ConfigDict(
        extra="forbid", frozen=False, populate_by_name=True, ser_json_inf_nan="null"
    )
    #: schema name and version, e.g. ``pfm.reading/1``; subclasses fix it with a Literal.
    SCHEMA: ClassVar[str] = ""

    site: Slug
    ts: UtcDatetime
    seq: int = Field(ge=0)

    def to_bytes(self) -> bytes:
        return encode(self)


def encode(message: BaseModel) -> bytes:
    """Serialise with orjson (fast, UTC ``Z`` timestamps, enums as values)."""
    return orjson.dumps(message.model_dump(mode="json", by_alias=True))


M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], payload: bytes | str) -> M:
    """Parse and validate; raises :class:`ValueError` (orjson) or ``ValidationError``."""
    data = orjson.loads(payload)
    return model.model_validate(data)


Values = dict[Measurement, float]


class Reading(Message):
    """One poll of one meter: every measurement the profile decoded, in SI units."""

    SCHEMA: ClassVar[str] = "pfm.reading/1"
    schema_: Literal["pfm.reading/1"] = Field("pfm.reading/1", alias="schema")
    meter: Slug
    gateway: Slug | None = None
    profile: str
    values: Values
    #: how long the poll took, for health dashboards
    poll_s: float | None = Field(default=None, ge=0)


class Waveform(Message):
    """A window of raw samples from a DSP meter or ADC.

    ``channels`` holds equally spaced samples: ``v1 v2 v3`` (line to neutral, V),
    ``i1 i2 i3`` (A), optional ``in`` (neutral current, A). One phase uses ``v1, i1``.
    """

    SCHEMA: ClassVar[str] = "pfm.waveform/1"
    schema_: Literal["pfm.waveform/1"] = Field("pfm.waveform/1", alias="schema")
    meter: Slug
    fs_hz: float = Field(gt=0)
    f_nominal_hz: Literal[50, 60] = 50
    channels: dict[Literal["v1", "v2", "v3", "i1", "i2", "i3", "in"], list[float]]

    @field_validator("channels")
    @classmethod
    def _same_length(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        lengths = {name: len(samples) for name, samples in value.items()}
        if not lengths:
            raise ValueError("no channels")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"channels differ in length: {lengths}")
        if "v1" not in value or "i1" not in value:
            raise ValueError("channels v1 and i1 are required")
        return value


class LoadKind(StrEnum):
    INDUCTIVE = "inductive"
    CAPACITIVE = "capacitive"
    RESISTIVE = "resistive"
    UNKNOWN = "unknown"  # magnitude-only meters: no lead/lag information


class Metrics(Message):
    """Per-interval aggregates computed by analytics.

    ``values`` are the instantaneous computed quantities of this interval;
    ``averages`` maps a moving-average slot (``"5s"``, ``"10s"`` ...) to its values
    (energy counters are never averaged); ``load`` tells lead/lag per phase and
    ``"total"`` (``unknown`` when the meter gives no sign).

    On the wire (``pfm.metrics/2``) ``averages`` is compact: one list of quantity
    names under ``"keys"`` and, per slot, the values in that order (``null`` where a
    slot has no value), e.g. ``{"keys": ["power", "power_factor"], "5s": [1200.0,
    0.91], "60s": [1180.5, null]}``: five slots of ~27 quantities no longer repeat
    every name five times. In Python it is always ``{slot: {quantity: value}}``.
    ``pfm.metrics/1`` messages (averages as that dict) are still accepted, so an
    edge that has not been upgraded keeps feeding an upgraded centre.
    """

    SCHEMA: ClassVar[str] = "pfm.metrics/2"
    schema_: Literal["pfm.metrics/2"] = Field("pfm.metrics/2", alias="schema")
    meter: Slug
    source: Literal["reading", "waveform"] = "reading"
    interval_s: float = Field(ge=0)
    values: Values
    averages: dict[str, Values] = Field(default_factory=dict)
    load: dict[str, LoadKind] = Field(default_factory=dict)
    #: IEC quadrant (1..4) per phase and total where the sign of P and Q is known
    quadrant: dict[str, Literal[1, 2, 3, 4]] = Field(default_factory=dict)
    #: harmonic magnitudes (RMS, orders 1..50) per channel for waveform sources
    harmonics: dict[str, list[float]] = Field(default_factory=dict)
    #: seq of the newest input that went into this message
    source_seq: int | None = None
    #: True for statistics over inputs that were already published one by one (the
    #: IEC 61000-4-30 style 3 s / 10 min aggregates): they carry no energy of their own
    aggregate: bool = False

    @field_validator("schema_", mode="before")
    @classmethod
    def _upgrade_schema(cls, value: object) -> object:
        return "pfm.metrics/2" if value == "pfm.metrics/1" else value

    @field_validator("averages", mode="before")
    @classmethod
    def _expand_averages(cls, value: object) -> object:
        return expand_averages(value)

    @field_serializer("averages", when_used="json")
    def _compact_averages(self, value: dict[str, Values]) -> dict[str, list[Any]]:
        return compact_averages(value)


def compact_averages(averages: dict[str, dict[Any, float]]) -> dict[str, list[Any]]:
    """``{slot: {quantity: value}}`` as the wire's ``{"keys": [...], slot: [...]}``
    (keys in order of first appearance; ``None`` where a slot lacks one)."""
    if not averages:
        return {}
    keys: dict[Any, None] = {}
    for vals in averages.values():
        keys.update(dict.fromkeys(vals))
    out: dict[str, list[Any]] = {"keys": [str(k) for k in keys]}
    for slot, vals in averages.items():
        out[slot] = [vals.get(k) for k in keys]
    return out


def expand_averages(value: object) -> object:
    """The wire's compact averages as ``{slot: {quantity: value}}`` (``null`` entries
    left out); anything else is returned as given, for the model to check."""
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        return value
    keys = value["keys"]
    if len(set(map(str, keys))) != len(keys):
        raise ValueError(f"keys repeat a quantity: {keys}")
    out: dict[str, dict[Any, Any]] = {}
    for slot, vals in value.items():
        if slot == "keys":
            continue
        if not isinstance(vals, list):
            raise ValueError(f"slot {slot!r}: expected a list of values, got {type(vals).__name__}")
        if len(vals) != len(keys):
            raise ValueError(f"slot {slot!r} has {len(vals)} values for {len(keys)} keys")
        out[slot] = {k: v for k, v in zip(keys, vals, strict=True) if v is not None}
    return out


class EventState(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"
    #: a one-shot event (device fault, stale data, command failure)
    NOTICE = "notice"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Event(Message):
    """An alarm raised or cleared, or a device/service notice."""

    SCHEMA: ClassVar[str] = "pfm.event/1"
    schema_: Literal["pfm.event/1"] = Field("pfm.event/1", alias="schema")
    meter: Slug  # the meter or device the event is about
    code: Slug  # e.g. low_pf, broken_neutral, device_offline
    state: EventState
    severity: Severity = Severity.WARNING
    phase: Literal["L1", "L2", "L3"] | None = None
    message: str = ""
    #: the values that made the decision, for the person who reads it later
    evidence: dict[str, float | str | bool | None] = Field(default_factory=dict)
    service: str = ""


class Command(Message):
    """A coil or capacitor-step change sent by the actuator, with its reason."""

    SCHEMA: ClassVar[str] = "pfm.command/1"
    schema_: Literal["pfm.command/1"] = Field("pfm.command/1", alias="schema")
    device: Slug
    table: Literal["coil", "holding"] = "coil"
    address: int = Field(ge=0, le=65535)
    value: int
    reason: str = Field(min_length=1)
    #: rule or controller that decided (``rule:overvoltage``, ``bank:main``)
    origin: str
    trigger: dict[str, float | str | bool | None] = Field(default_factory=dict)
    dry_run: bool = False


class Request(Message):
    """An operator's request to the actuator, published by the console only.

    ``action``: ``manual`` holds the bank's controller (steps stay as they are until a
    ``step`` request or ``auto``); ``step`` switches step ``step`` (1-based) in or out
    by hand, under the same discharge and reconnection interlocks as the controller;
    ``auto`` hands the bank back to the controller; ``maintenance`` holds the bank
    (no automatic and no manual switching) until ``auto``. ``user`` is who asked.
    """

    SCHEMA: ClassVar[str] = "pfm.request/1"
    schema_: Literal["pfm.request/1"] = Field("pfm.request/1", alias="schema")
    device: Slug
    bank: Slug
    action: Literal["manual", "step", "auto", "maintenance"]
    step: int | None = Field(default=None, ge=1, le=16)
    on: bool | None = None
    user: str = Field(min_length=1, max_length=64)
    reason: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _step_needs(self) -> Request:
        if self.action == "step" and (self.step is None or self.on is None):
            raise ValueError("a step request needs 'step' (1-based) and 'on'")
        if self.action != "step" and (self.step is not None or self.on is not None):
            raise ValueError(f"'step' and 'on' belong to a step request, not {self.action!r}")
        return self


class ActuatorState(Message):
    """What an output device reports (retained): coil states as read back."""

    SCHEMA: ClassVar[str] = "pfm.state/1"
    schema_: Literal["pfm.state/1"] = Field("pfm.state/1", alias="schema")
    device: Slug
    online: bool
    coils: dict[int, bool] = Field(default_factory=dict)
    #: capacitor-bank view: steps in service and operation counters
    steps_in: list[int] = Field(default_factory=list)
    operations: dict[int, int] = Field(default_factory=dict)
    message: str = ""
    #: per bank: ``auto`` (the controller switches), ``manual`` or ``maintenance``
    modes: dict[str, Literal["auto", "manual", "maintenance"]] = Field(default_factory=dict)


class GatewayStatus(Message):
    """Retained gateway status; the last will publishes ``offline``."""

    SCHEMA: ClassVar[str] = "pfm.status/1"
    schema_: Literal["pfm.status/1"] = Field("pfm.status/1", alias="schema")
    gateway: Slug
    status: Literal["online", "offline"]
    versions: dict[str, str] = Field(default_factory=dict)
    meters_online: int | None = None
    meters_offline: int | None = None


class DeadLetter(Message):
    """Raw bytes a service could not parse, with the reason."""

    SCHEMA: ClassVar[str] = "pfm.deadletter/1"
    schema_: Literal["pfm.deadletter/1"] = Field("pfm.deadletter/1", alias="schema")
    service: str
    topic: str
    reason: str
    payload_b64: str

    @classmethod
    def of(
        cls, *, site: str, service: str, topic: str, reason: str, payload: bytes, seq: int
    ) -> DeadLetter:
        return cls(
            site=site,
            ts=utcnow(),
            seq=seq,
            service=service,
            topic=topic,
            reason=reason[:2000],
            payload_b64=base64.b64encode(payload[:65536]).decode(),
        )

    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)


def describe_error(exc: Exception) -> str:
    """One line per problem, naming the field path: what goes into a dead letter."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_url=False):
            if err["type"] == "json_invalid":  # from model_validate_json
                return f"malformed JSON: {err['ctx'].get('error', err['msg'])}"
            loc = ".".join(str(x) for x in err["loc"]) or "(root)"
            parts.append(f"{loc}: {err['msg']}")
        return "; ".join(parts)
    if isinstance(exc, orjson.JSONDecodeError):
        return f"malformed JSON: {exc}"
    return f"{type(exc).__name__}: {exc}"


def json_value(obj: Any) -> Any:
    """orjson default for odd types found in evidence dicts."""
    if isinstance(obj, StrEnum):
        return obj.value
    raise TypeError
