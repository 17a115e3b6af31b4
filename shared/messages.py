"""Every message on the pfmon bus, as pydantic v2 models serialised with orjson.

Each message carries ``schema`` (a literal name and version: a payload of another
schema fails validation and is dead-lettered), ``site``, ``meter`` or ``device``,
``ts`` (timezone-aware UTC, the gateway's clock at acquisition) and a per-source
``seq`` so that gaps and duplicates are visible downstream.

Values are keyed by :class:`~shared.measurements.Measurement` (SI units).

What a message may hold is bounded where it enters (pydantic-core constraints,
one Python check per reading): ``seq`` fits a PostgreSQL ``bigint``
(0..2^63-1); ``ts`` lies in 2000..2099 and at most :func:`max_clock_skew` seconds
ahead of the receiver's clock (a collector draining an old spool legitimately
sends old timestamps, so there is no tighter bound into the past); every float
is finite; a reading's values lie within their measurement's physical bounds
(:attr:`~shared.measurements.Measurement.bounds`). A reading whose only faults
are such values is not lost: :meth:`Reading.salvage` keeps its other values and
the bus dead-letters the refused ones, naming them.
"""

from __future__ import annotations

import base64
import math
import time
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
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, from_json

from shared.measurements import BOUNDS as _BOUNDS
from shared.measurements import Measurement, implausible
from shared.topics import Slug

__all__ = [
    "DEFAULT_MAX_CLOCK_SKEW_S",
    "SEQ_MAX",
    "TS_MAX",
    "TS_MIN",
    "ActuatorState",
    "Command",
    "DeadLetter",
    "Event",
    "EventState",
    "GatewayStatus",
    "LoadKind",
    "Message",
    "MessageTs",
    "Metrics",
    "Reading",
    "Request",
    "Seq",
    "Severity",
    "ValidationError",
    "Waveform",
    "compact_averages",
    "decode",
    "encode",
    "expand_averages",
    "max_clock_skew",
    "set_max_clock_skew",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


#: the range of every message timestamp: 0001-01-01 or 9999-12-31 never reach a database
TS_MIN = datetime(2000, 1, 1, tzinfo=UTC)
TS_MAX = datetime(2100, 1, 1, tzinfo=UTC)
#: the largest seq (and source_seq): what a PostgreSQL bigint holds
SEQ_MAX = 2**63 - 1
#: default of PFM_MAX_CLOCK_SKEW_S
DEFAULT_MAX_CLOCK_SKEW_S = 600.0
_skew_s = [DEFAULT_MAX_CLOCK_SKEW_S]


def set_max_clock_skew(seconds: float) -> None:
    """How far ahead of this process's clock a message's ``ts`` may be (seconds);
    set from ``PFM_MAX_CLOCK_SKEW_S`` by :func:`shared.settings.load_settings`."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"max clock skew must be a positive number of seconds, not {seconds}")
    _skew_s[0] = float(seconds)
    _cutoff[1] = -math.inf


def max_clock_skew() -> float:
    return _skew_s[0]


#: the latest acceptable ts and the time.time() it was worked out at (renewed twice a
#: second: a datetime.now() per message costs more than the check itself)
_cutoff: list[Any] = [TS_MIN, -math.inf]


def _received_ts(value: datetime) -> datetime:
    now = time.time()
    if now - _cutoff[1] > 0.5:
        _cutoff[0] = datetime.fromtimestamp(now + _skew_s[0], UTC)
        _cutoff[1] = now
    if value > _cutoff[0]:
        ahead = value.timestamp() - now
        if ahead > _skew_s[0]:
            raise PydanticCustomError(
                "ts_ahead",
                "{ts} is {ahead} s ahead of this receiver's clock (at most {limit} s allowed, "
                "PFM_MAX_CLOCK_SKEW_S)",
                {
                    "ts": value.astimezone(UTC).isoformat(),
                    "ahead": round(ahead),
                    "limit": round(_skew_s[0]),
                },
            )
    return value.astimezone(UTC)


#: timezone-aware timestamp, normalised to UTC; a naive timestamp is refused.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
#: a message's ``ts``: UTC, 2000..2099, not further ahead of our clock than the skew allows
MessageTs = Annotated[AwareDatetime, Field(ge=TS_MIN, lt=TS_MAX), AfterValidator(_received_ts)]
#: a per-source sequence number (fits a PostgreSQL bigint)
Seq = Annotated[int, Field(ge=0, le=SEQ_MAX)]
#: a finite float (NaN and infinities refused in pydantic-core)
Finite = Annotated[float, Field(allow_inf_nan=False)]
#: a Modbus address or register/coil index
Address = Annotated[int, Field(ge=0, le=65535)]


class Message(BaseModel):
    """Base of every bus message."""

    model_config = ConfigDict(
        extra="forbid", frozen=False, populate_by_name=True, ser_json_inf_nan="null"
    )
    #: schema name and version, e.g. ``pfm.reading/1``; subclasses fix it with a Literal.
    SCHEMA: ClassVar[str] = ""

    site: Slug
    ts: MessageTs
    seq: Seq

    def to_bytes(self) -> bytes:
        return encode(self)

    @classmethod
    def salvage(cls, payload: bytes, exc: ValidationError) -> tuple[Message, str] | None:
        """What can be kept of a ``payload`` that failed validation with ``exc``, and a
        reason naming what was refused; None: nothing (the whole message is refused)."""
        return None


def encode(message: BaseModel) -> bytes:
    """Serialise with orjson (fast, UTC ``Z`` timestamps, enums as values)."""
    return orjson.dumps(message.model_dump(mode="json", by_alias=True))


M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], payload: bytes | str) -> M:
    """Parse and validate; raises :class:`ValueError` (orjson) or ``ValidationError``."""
    data = orjson.loads(payload)
    return model.model_validate(data)


Values = dict[Measurement, float]
#: computed values: finite, no other bound (derived from plausible readings)
FiniteValues = dict[Measurement, Finite]


def _plausible(values: dict[Measurement, float]) -> dict[Measurement, float]:
    """Every value within its measurement's physical bounds (the loop that fails fast)."""
    bounds = _BOUNDS
    for m, v in values.items():
        lo, hi = bounds[m]
        if not lo <= v <= hi:
            raise PydanticCustomError(
                "implausible",
                "{refused}",
                {"refused": "; ".join(_refusals(values))},
            )
    return values


def _refusals(values: dict[Any, Any]) -> list[str]:
    """``"current_l1 = 1e+308: outside the plausible range [...] A"`` per implausible
    number of ``values`` (keys that are no measurement, or not numbers, are left to
    the schema's own errors)."""
    out = []
    for key, v in values.items():
        try:
            m = Measurement(key)
        except ValueError:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        why = implausible(m, float(v))
        if why is not None:
            out.append(f"{m.value} = {v!r}: {why}")
    return out


#: a reading's values: finite (pydantic-core) and physically plausible
PlausibleValues = Annotated[dict[Measurement, Finite], AfterValidator(_plausible)]


class Reading(Message):
    """One poll of one meter: every measurement the profile decoded, in SI units."""

    SCHEMA: ClassVar[str] = "pfm.reading/1"
    schema_: Literal["pfm.reading/1"] = Field("pfm.reading/1", alias="schema")
    meter: Slug
    gateway: Slug | None = None
    profile: str
    values: PlausibleValues
    #: how long the poll took, for health dashboards
    poll_s: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)

    @classmethod
    def salvage(cls, payload: bytes, exc: ValidationError) -> tuple[Message, str] | None:
        """A reading whose only faults are implausible values (not finite, outside the
        physical bounds): the reading without them, and a reason naming each one."""
        if not all(err["loc"][:1] == ("values",) for err in exc.errors(include_url=False)):
            return None
        try:  # pydantic-core's parser: NaN / Infinity / 1e999 as the validation saw them
            data = from_json(payload, allow_inf_nan=True)
        except ValueError:
            return None
        values = data.get("values") if isinstance(data, dict) else None
        if not isinstance(values, dict):
            return None
        refused = _refusals(values)
        if not refused or len(refused) == len(values):
            return None
        kept = {k: v for k, v in values.items() if not _refused_value(k, v)}
        try:
            reading = cls.model_validate({**data, "values": kept})
        except ValidationError:
            return None
        return reading, "values refused, the reading's other values kept: " + "; ".join(refused)


def _refused_value(key: str, value: object) -> bool:
    return bool(_refusals({key: value}))


class Waveform(Message):
    """A window of raw samples from a DSP meter or ADC.

    ``channels`` holds equally spaced samples: ``v1 v2 v3`` (line to neutral, V),
    ``i1 i2 i3`` (A), optional ``in`` (neutral current, A). One phase uses ``v1, i1``.
    """

    SCHEMA: ClassVar[str] = "pfm.waveform/1"
    schema_: Literal["pfm.waveform/1"] = Field("pfm.waveform/1", alias="schema")
    meter: Slug
    fs_hz: float = Field(gt=0, le=1e7, allow_inf_nan=False)
    f_nominal_hz: Literal[50, 60] = 50
    #: samples in V and A: finite and physically plausible (at most 1e7 in magnitude)
    channels: dict[
        Literal["v1", "v2", "v3", "i1", "i2", "i3", "in"],
        list[Annotated[float, Field(allow_inf_nan=False, ge=-1e7, le=1e7)]],
    ]

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
    interval_s: float = Field(ge=0, le=366 * 86400, allow_inf_nan=False)
    values: FiniteValues
    averages: dict[str, FiniteValues] = Field(default_factory=dict)
    load: dict[str, LoadKind] = Field(default_factory=dict)
    #: IEC quadrant (1..4) per phase and total where the sign of P and Q is known
    quadrant: dict[str, Literal[1, 2, 3, 4]] = Field(default_factory=dict)
    #: harmonic magnitudes (RMS, orders 1..50) per channel for waveform sources
    harmonics: dict[str, list[Finite]] = Field(default_factory=dict)
    #: seq of the newest input that went into this message
    source_seq: Seq | None = None
    #: True for statistics over inputs that were already published one by one (the
    #: IEC 61000-4-30 style 3 s / 10 min aggregates): they carry no energy of their own
    aggregate: bool = False

    @field_validator("schema_", mode="before")
    @classmethod
    def _upgrade_schema(cls, value: object) -> object:
        return "pfm.metrics/2" if value == "pfm.metrics/1" else value

    @field_validator("averages", mode="wrap")
    @classmethod
    def _expand_averages(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        fast = _expand_compact(value)
        if fast is not None:
            return fast
        return handler(expand_averages(value))

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


#: the compact form's parts, checked in pydantic-core (unique keys: the order is the wire's)
_AVERAGE_KEYS: TypeAdapter[list[Measurement]] = TypeAdapter(list[Measurement])
_AVERAGE_SLOTS: TypeAdapter[dict[str, list[Finite | None]]] = TypeAdapter(
    dict[str, list[Finite | None]]
)


def _expand_compact(value: object) -> dict[str, dict[Measurement, float]] | None:
    """Well-formed compact averages as ``{slot: {quantity: value}}``, every part checked
    by pydantic-core (quantities, finite numbers) and the rest by C-level builtins; None
    for anything else (another form, or a fault: :func:`expand_averages` and the
    model's own schema then say what and where)."""
    if type(value) is not dict or "keys" not in value:
        return None
    slots = dict(value)
    try:
        keys = _AVERAGE_KEYS.validate_python(slots.pop("keys"))
        lists = _AVERAGE_SLOTS.validate_python(slots)
    except ValidationError:
        return None
    n = len(keys)
    if len(set(keys)) != n:
        return None
    out: dict[str, dict[Measurement, float]] = {}
    for slot, vals in lists.items():
        if len(vals) != n:
            return None
        if None in vals:
            out[slot] = {k: v for k, v in zip(keys, vals, strict=True) if v is not None}
        else:
            out[slot] = dict(zip(keys, vals, strict=True))  # type: ignore[arg-type]
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
    address: Address
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
    coils: dict[Address, bool] = Field(default_factory=dict)
    #: capacitor-bank view: steps in service and operation counters
    steps_in: list[Address] = Field(default_factory=list)
    operations: dict[Address, Seq] = Field(default_factory=dict)
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
    meters_online: int | None = Field(None, ge=0, le=2**31 - 1)
    meters_offline: int | None = Field(None, ge=0, le=2**31 - 1)


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


#: problems a dead letter's reason lists at most (then how many more there were)
MAX_PROBLEMS = 10
#: characters of one problem's field path or message quoted at most
_MAX_PART = 200


def describe_error(exc: Exception) -> str:
    """One line per problem, naming the field path: what goes into a dead letter.

    At most :data:`MAX_PROBLEMS` problems are listed, then how many more there were;
    a path or message longer than a short line is cut, saying how much was cut (a
    payload with thousands of unknown keys gives a reason of a few hundred characters).
    """
    if isinstance(exc, ValidationError):
        parts = []
        errors = exc.errors(include_url=False)
        for err in errors[:MAX_PROBLEMS]:
            if err["type"] == "json_invalid":  # from model_validate_json
                return _cut(f"malformed JSON: {err['ctx'].get('error', err['msg'])}")
            loc = _cut(".".join(str(x) for x in err["loc"]) or "(root)")
            got = err.get("input")
            if err["type"] in ("implausible", "ts_ahead") or isinstance(got, dict | list):
                parts.append(f"{loc}: {_cut(err['msg'])}")  # the message names the input itself
            else:
                parts.append(f"{loc}: {_cut(err['msg'])} (got {_short(got)})")
        if len(errors) > MAX_PROBLEMS:
            parts.append(f"... and {len(errors) - MAX_PROBLEMS} more problems")
        return "; ".join(parts)
    if isinstance(exc, orjson.JSONDecodeError):
        return _cut(f"malformed JSON: {exc}")
    return _cut(f"{type(exc).__name__}: {exc}", 4 * _MAX_PART)


def _cut(text: str, limit: int = _MAX_PART) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more chars)"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def json_value(obj: Any) -> Any:
    """orjson default for odd types found in evidence dicts."""
    if isinstance(obj, StrEnum):
        return obj.value
    raise TypeError


# -- archive batches ---------------------------------------------------------------------


class ArchiveBatch(Message):
    """Many ``Metrics`` messages of one site for its archiver in one MQTT message
    (``pfm/v1/{site}/archive/{service}``): ``messages`` is ``[[topic, json], ...]``, each
    the per-meter topic the message is also published on and its payload as published,
    as a JSON string. The receiver validates each payload alone, exactly as one received
    on its own topic (``Metrics.model_validate_json``), so one bad message costs only
    itself and its dead letter carries its bytes. (Embedded as JSON objects instead,
    the receiver would validate Python dicts - about twice the time - and could not
    give a refused message's bytes back.)"""

    SCHEMA: ClassVar[str] = "pfm.archive/1"
    schema_: Literal["pfm.archive/1"] = Field("pfm.archive/1", alias="schema")
    service: Slug
    messages: list[tuple[str, str]] = Field(max_length=100_000)


#: what a batch adds around each message: the quotes, comma and brackets of
#: ``["topic","payload"],``
_BATCH_ITEM_OVERHEAD = 8
#: what a batch adds around its messages (schema, site, ts, seq, service)
_BATCH_ENVELOPE = 512


def archive_item_size(topic: str, payload: bytes) -> int:
    """The bytes ``(topic, payload)`` takes inside an encoded archive batch: the payload
    is embedded as a JSON string, so each ``"`` and ``\\`` in it gains an escape."""
    return (
        len(topic.encode())
        + len(payload)
        + payload.count(b'"')
        + payload.count(b"\\")
        + _BATCH_ITEM_OVERHEAD
    )


def archive_chunks(
    messages: list[tuple[str, bytes]], max_count: int, max_bytes: int
) -> list[list[tuple[str, bytes]]]:
    """``messages`` split, in order, into archive batches of at most ``max_count``
    messages and ``max_bytes`` encoded bytes each (a broker drops a message above its
    size limit: Mosquitto's ``message_size_limit``). A message that alone exceeds
    ``max_bytes`` goes in a batch of its own."""
    out: list[list[tuple[str, bytes]]] = []
    chunk: list[tuple[str, bytes]] = []
    size = _BATCH_ENVELOPE
    for item in messages:
        n = archive_item_size(*item)
        if chunk and (len(chunk) >= max_count or size + n > max_bytes):
            out.append(chunk)
            chunk, size = [], _BATCH_ENVELOPE
        chunk.append(item)
        size += n
    if chunk:
        out.append(chunk)
    return out


def encode_archive_batch(
    site: str, ts: datetime, seq: int, service: str, messages: list[tuple[str, bytes]]
) -> bytes:
    """An :class:`ArchiveBatch` of already-encoded messages (``(topic, payload)``)."""
    return orjson.dumps(
        {
            "schema": ArchiveBatch.SCHEMA,
            "site": site,
            "ts": ts,
            "seq": seq,
            "service": service,
            "messages": [(topic, payload.decode()) for topic, payload in messages],
        }
    )
