"""BACnet/IP meters: profiles as data (measurement -> BACnet object) and the transport.

A BACnet power meter exposes its measurements as objects, most often analog-inputs
whose ``present-value`` is a REAL and whose ``units`` property says what it is in
(volts, kilowatts, kilowatt-hours...). A :class:`BacnetProfile` maps each
:class:`~shared.measurements.Measurement` to one object (built in here, or a site
file's ``bacnet_profiles:`` entry, :class:`~shared.site.collector.BacnetProfileSpec`);
the collector reads every object's ``present-value`` and ``units`` in one
ReadPropertyMultiple request a poll (with the device object's name, so that a wrong
``device_instance`` is caught) and converts to SI:

* a known unit of the right quantity is scaled (kilovolts -> V x 1000, kilowatt-hours
  -> Wh x 1000, milliamperes -> A x 0.001, ...: :data:`UNITS`);
* a unit of another quantity, or one this table does not know, is refused for that
  value (named with the object, the unit the device gave and the unit expected);
  the other values of the poll are published.

The transport is bacpypes3 (its public API: ``Application``, ``read_property_multiple``,
``who_is``). One :class:`BacnetLink` is this gateway's BACnet/IP port, a UDP socket
that every meter of a ``kind: bacnet`` bus shares (requests are matched by invoke id,
so several may be in flight). Failures become :class:`~shared.errors.PeerError` with a
kind, as Modbus ones do (:mod:`shared.modbus`):

=======================  ==========================================================
kind                     meaning
=======================  ==========================================================
timeout                  no answer within the deadline (the device is off or away)
refused                  this gateway's BACnet/IP address cannot be bound
error_unknown_object     the device has no such object (profile or instance wrong)
error_unknown_property   the object has no such property
error_<code>             another BACnet error (``error_<class>`` code lower-cased)
reject_<reason>          the device rejected the request (e.g. reject_unrecognized_service)
abort_<reason>           the device aborted it (e.g. abort_segmentation_not_supported)
garbage                  an answer that does not fit the request (a value not a number)
=======================  ==========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bacpypes3.apdu import AbortPDU, ErrorPDU, ErrorRejectAbortNack, RejectPDU
from bacpypes3.app import Application
from bacpypes3.basetypes import EngineeringUnits, ErrorType, PropertyIdentifier
from bacpypes3.local.device import DeviceObject
from bacpypes3.local.networkport import NetworkPortObject
from bacpypes3.pdu import Address
from bacpypes3.primitivedata import ObjectIdentifier

from services.collector.profiles import Profile
from shared.errors import ConfigError, PeerError
from shared.measurements import Measurement as M
from shared.site.collector import BacnetProfileSpec
from shared.site.core import BACNET_MAX_INSTANCE, BACNET_PORT, BacnetTarget, BusConfig

log = logging.getLogger(__name__)

__all__ = [
    "BACNET_PROFILES",
    "UNITS",
    "BacnetLink",
    "BacnetProfile",
    "Device",
    "ObjectRead",
    "ObjectSpec",
    "convert",
    "from_spec",
    "register",
    "resolve",
]

#: the object types a profile may map (both carry a REAL present-value and units)
OBJECT_TYPES = ("analog-input", "analog-value")
#: this gateway's own device instance on the BACnet network (a client needs one)
LOCAL_DEVICE_INSTANCE = BACNET_MAX_INSTANCE
#: the vendor id of the gateway's device object (ASHRAE's own: we are no vendor)
VENDOR_ID = 0
#: kinds worth an immediate retry
TRANSIENT = frozenset({"timeout", "garbage"})

_PRESENT_VALUE = PropertyIdentifier("present-value")
_UNITS = PropertyIdentifier("units")
_OBJECT_NAME = PropertyIdentifier("object-name")


@dataclass(frozen=True, slots=True)
class ObjectSpec:
    """One BACnet object of a meter: its type and instance, and (for a PF whose device
    reports a magnitude) the measurement that gives it its sign."""

    instance: int
    object_type: str = "analog-input"
    signed_by: M | None = None

    def __post_init__(self) -> None:
        if self.object_type not in OBJECT_TYPES:
            raise ValueError(f"object type {self.object_type!r} is not one of {OBJECT_TYPES}")
        if not 0 <= self.instance <= BACNET_MAX_INSTANCE:
            raise ValueError(f"object instance {self.instance} is not 0-{BACNET_MAX_INSTANCE}")

    @property
    def ref(self) -> str:
        """``analog-input,3``: how BACnet tools write it."""
        return f"{self.object_type},{self.instance}"


@dataclass(frozen=True)
class BacnetProfile:
    """A BACnet meter model: measurement -> object."""

    name: str
    description: str
    phases: int
    objects: Mapping[M, ObjectSpec]
    manufacturer: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        refs = [s.ref for s in self.objects.values()]
        twice = sorted({r for r in refs if refs.count(r) > 1})
        if twice:
            raise ValueError(f"profile {self.name!r}: object(s) {', '.join(twice)} mapped twice")
        for m, spec in self.objects.items():
            if spec.signed_by is not None and spec.signed_by not in self.objects:
                raise ValueError(
                    f"profile {self.name!r}: {m.value}.signed_by {spec.signed_by.value} "
                    "is not in the profile"
                )

    def as_profile(self) -> Profile:
        """The collector's view of it (name, model, phases; no registers: nothing Modbus)."""
        return Profile(
            self.name,
            self.description,
            self.phases,
            {},
            manufacturer=self.manufacturer,
            model=self.model,
        )

    def primary_factors(self, ct_ratio: float, pt_ratio: float) -> dict[M, float]:
        """As :meth:`Profile.primary_factors`, for this profile's measurements."""
        factors = {m: m.scale.factor(ct_ratio, pt_ratio) for m in self.objects}
        return {m: f for m, f in factors.items() if f != 1.0}


BACNET_PROFILES: dict[str, BacnetProfile] = {}


def register(profile: BacnetProfile) -> BacnetProfile:
    if profile.name in BACNET_PROFILES:
        raise RuntimeError(f"BACnet profile {profile.name!r} is registered twice")
    BACNET_PROFILES[profile.name] = profile
    return profile


def from_spec(name: str, spec: BacnetProfileSpec) -> BacnetProfile:
    """A site file's ``bacnet_profiles:`` entry as a profile."""
    return BacnetProfile(
        name,
        spec.description,
        spec.phases,
        {m: ObjectSpec(o.instance, o.type, o.signed_by) for m, o in spec.objects.items()},
    )


def resolve(
    name: str, user_profiles: Mapping[str, BacnetProfileSpec] | None = None
) -> BacnetProfile:
    """A user-defined (the site file's ``bacnet_profiles:``) or built-in BACnet profile
    by name; :class:`ConfigError` if unknown."""
    if user_profiles and name in user_profiles:
        return from_spec(name, user_profiles[name])
    if name in BACNET_PROFILES:
        return BACNET_PROFILES[name]
    known = sorted(set(BACNET_PROFILES) | set(user_profiles or {}))
    raise ConfigError(f"unknown BACnet profile {name!r}; known: {', '.join(known)}")


def _ai(instance: int, signed_by: M | None = None) -> ObjectSpec:
    return ObjectSpec(instance, "analog-input", signed_by)


# A typical BACnet/IP power meter (the layout most vendors' BACnet maps follow: one
# analog-input per quantity, instances 1..12). PF is a magnitude on most of them: it
# takes the sign of P (IEC), as the Modbus profiles do.
register(
    BacnetProfile(
        name="bacnet_power_meter",
        description="BACnet/IP three-phase power meter (analog-inputs 1-12)",
        manufacturer="generic",
        model="BACnet/IP power meter",
        phases=3,
        objects={
            M.VOLTAGE_L1: _ai(1),
            M.VOLTAGE_L2: _ai(2),
            M.VOLTAGE_L3: _ai(3),
            M.CURRENT_L1: _ai(4),
            M.CURRENT_L2: _ai(5),
            M.CURRENT_L3: _ai(6),
            M.POWER: _ai(7),
            M.REACTIVE_POWER: _ai(8),
            M.APPARENT_POWER: _ai(9),
            M.POWER_FACTOR: _ai(10, signed_by=M.POWER),
            M.FREQUENCY: _ai(11),
            M.IMPORT_ENERGY: _ai(12),
        },
    )
)

_E = EngineeringUnits
#: BACnet engineering units -> (SI unit of the measurement vocabulary, multiplier)
UNITS: dict[int, tuple[str, float]] = {
    int(u): si
    for u, si in (
        (_E.volts, ("V", 1.0)),
        (_E.millivolts, ("V", 1e-3)),
        (_E.kilovolts, ("V", 1e3)),
        (_E.megavolts, ("V", 1e6)),
        (_E.amperes, ("A", 1.0)),
        (_E.milliamperes, ("A", 1e-3)),
        (_E.watts, ("W", 1.0)),
        (_E.milliwatts, ("W", 1e-3)),
        (_E.kilowatts, ("W", 1e3)),
        (_E.megawatts, ("W", 1e6)),
        (_E.voltAmperes, ("VA", 1.0)),
        (_E.kilovoltAmperes, ("VA", 1e3)),
        (_E.megavoltAmperes, ("VA", 1e6)),
        (_E.voltAmperesReactive, ("var", 1.0)),
        (_E.kilovoltAmperesReactive, ("var", 1e3)),
        (_E.megavoltAmperesReactive, ("var", 1e6)),
        (_E.hertz, ("Hz", 1.0)),
        (_E.kilohertz, ("Hz", 1e3)),
        (_E.wattHours, ("Wh", 1.0)),
        (_E.kilowattHours, ("Wh", 1e3)),
        (_E.megawattHours, ("Wh", 1e6)),
        (_E.voltAmpereHours, ("VAh", 1.0)),
        (_E.kilovoltAmpereHours, ("VAh", 1e3)),
        (_E.megavoltAmpereHours, ("VAh", 1e6)),
        (_E.voltAmpereHoursReactive, ("varh", 1.0)),
        (_E.kilovoltAmpereHoursReactive, ("varh", 1e3)),
        (_E.megavoltAmpereHoursReactive, ("varh", 1e6)),
        (_E.wattHoursReactive, ("varh", 1.0)),
        (_E.kilowattHoursReactive, ("varh", 1e3)),
        (_E.megawattHoursReactive, ("varh", 1e6)),
        (_E.powerFactor, ("", 1.0)),
        (_E.noUnits, ("", 1.0)),
        (_E.percent, ("%", 1.0)),
    )
}


def unit_name(units: int | None) -> str:
    """The BACnet name of an engineering unit (``kilovolts``), or its number."""
    if units is None:
        return "no units property"
    return str(EngineeringUnits(units))


def convert(measurement: M, value: float, units: int | None) -> tuple[float | None, str]:
    """``value`` in ``units`` as ``measurement``'s SI value, or None and why not."""
    si = UNITS.get(units) if units is not None else None
    want = measurement.unit or "no unit (a ratio)"
    if si is None:
        return None, (
            f"units {unit_name(units)} are not a unit pfmon knows (expected {want} or a "
            "multiple of it)"
        )
    si_unit, factor = si
    if si_unit != measurement.unit:
        got = si_unit or "a ratio"
        return None, f"units {unit_name(units)} ({got}) do not fit {measurement.value} ({want})"
    return value * factor, ""


@dataclass(frozen=True, slots=True)
class ObjectRead:
    """What one object gave in a poll: its value and units, or an error (kind, text)."""

    spec: ObjectSpec
    value: float | None = None
    units: int | None = None
    kind: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Device:
    """A device that answered a Who-Is."""

    instance: int
    address: str
    vendor_id: int
    max_apdu: int
    name: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "device_instance": self.instance,
            "address": self.address,
            "vendor_id": self.vendor_id,
            "max_apdu": self.max_apdu,
            "name": self.name,
        }


def _slug(text: object) -> str:
    return str(text).replace("-", "_").lower()


def classify(exc: BaseException) -> str:
    """The kind of a bacpypes3 error/reject/abort (module docstring's table)."""
    if isinstance(exc, AbortPDU):
        reason = _slug(exc.apduAbortRejectReason)
        return "timeout" if reason == "no_response" else f"abort_{reason}"
    if isinstance(exc, RejectPDU):
        return f"reject_{_slug(exc.apduAbortRejectReason)}"
    if isinstance(exc, ErrorPDU):
        return f"error_{_slug(getattr(exc, 'errorCode', 'unknown'))}"
    return "garbage"


def _address(target: str) -> Address:
    host, _, port = target.partition(":")
    return Address(f"{host}:{port or BACNET_PORT}")


class BacnetLink:
    """This gateway's BACnet/IP port (a bacpypes3 ``Application``): made on the first
    request, shared by every meter of its bus; requests may run concurrently."""

    def __init__(self, config: BusConfig, *, timeout_s: float | None = None) -> None:
        if config.kind != "bacnet":
            raise ConfigError(f"bus {config.name!r} is not a BACnet bus (kind {config.kind})")
        self.config = config
        self.index = 0
        self.timeout_s = timeout_s or config.timeout_s
        self.where = f"{config.host}:{config.port}"
        self._app: Application | None = None

    def _bind_check(self) -> None:
        """A clear ``refused`` when the address is not this host's (bacpypes3 would
        retry the bind for ever and every request would only time out)."""
        host = (self.config.host or "").partition("/")[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, 0))
            except OSError as exc:
                raise PeerError(
                    f"cannot open BACnet/IP port {self.where}: {exc.strerror or exc} "
                    f"(is {host} an address of this host?)",
                    kind="refused",
                ) from exc

    def _application(self) -> Application:
        if self._app is None:
            self._bind_check()
            device = DeviceObject(
                objectIdentifier=("device", LOCAL_DEVICE_INSTANCE),
                objectName=f"pfmon-{self.config.name}",
                vendorIdentifier=VENDOR_ID,
                # the library's own deadline, a little past ours (ours decides)
                apduTimeout=int(self.timeout_s * 1000) + 500,
                numberOfApduRetries=0,
            )
            port = NetworkPortObject(
                f"{self.config.host}:{self.config.port}",
                objectIdentifier=("network-port", 1),
                objectName="NetworkPort-1",
            )
            self._app = Application.from_object_list([device, port])
        return self._app

    async def read(
        self,
        target: BacnetTarget,
        objects: Sequence[ObjectSpec],
        timeout: float | None = None,
    ) -> list[ObjectRead]:
        """``present-value`` and ``units`` of each object, in one ReadPropertyMultiple.

        Raises :class:`PeerError` when the request as a whole fails (no answer, the
        device refused it, or ``target``'s device instance is not the device at that
        address); an object the device does not have comes back as an
        :class:`ObjectRead` with its error kind."""
        app = self._application()
        timeout = timeout or self.timeout_s
        device = ObjectIdentifier(("device", target.device_instance))
        params: list[Any] = [device, [_OBJECT_NAME]]
        for spec in objects:
            params += [ObjectIdentifier(spec.ref), [_PRESENT_VALUE, _UNITS]]
        where = f"device {target.device_instance} at {target.address}"
        try:
            async with asyncio.timeout(timeout):
                result = await app.read_property_multiple(_address(target.address), params)
        except TimeoutError as exc:
            raise PeerError(f"{where}: no answer (timeout {timeout:g} s)", kind="timeout") from exc
        except ErrorRejectAbortNack as exc:
            kind = classify(exc)
            if kind == "timeout":
                raise PeerError(f"{where}: no answer (timeout)", kind=kind) from None
            raise PeerError(f"{where}: {kind.replace('_', ' ')} ({exc})", kind=kind) from None
        if not isinstance(result, list):
            raise PeerError(f"{where}: no usable answer to ReadPropertyMultiple", kind="garbage")
        return self._results(where, target, objects, result)

    def _results(
        self,
        where: str,
        target: BacnetTarget,
        objects: Sequence[ObjectSpec],
        result: list[Any],
    ) -> list[ObjectRead]:
        got: dict[tuple[str, int, str], Any] = {}
        for objid, prop, _index, value in result:
            got[(str(objid[0]), int(objid[1]), str(prop))] = value
        name = got.get(("device", target.device_instance, "object-name"))
        if name is None or isinstance(name, ErrorType):
            why = _error_text(name) if isinstance(name, ErrorType) else "no object-name"
            raise PeerError(
                f"{where}: the device there is not device {target.device_instance} ({why}; "
                "check bacnet.device_instance, `pfmon scan --bacnet` lists what answers)",
                kind=_error_kind(name) if isinstance(name, ErrorType) else "garbage",
            )
        out = []
        for spec in objects:
            value = got.get((spec.object_type, spec.instance, "present-value"))
            units = got.get((spec.object_type, spec.instance, "units"))
            if isinstance(value, ErrorType):
                out.append(ObjectRead(spec, kind=_error_kind(value), error=_error_text(value)))
                continue
            if value is None or isinstance(value, bool) or not isinstance(value, int | float):
                out.append(
                    ObjectRead(
                        spec, kind="garbage", error=f"present-value {value!r} is not a number"
                    )
                )
                continue
            # a NaN or infinite value is refused by the caller's plausibility check
            out.append(
                ObjectRead(spec, float(value), None if isinstance(units, ErrorType) else units)
            )
        return out

    async def who_is(
        self,
        address: str | None = None,
        low: int | None = None,
        high: int | None = None,
        timeout: float = 2.0,
    ) -> list[Device]:
        """The devices that answer a Who-Is: sent to ``address`` (directed) or as a global
        broadcast; ``low``/``high`` limit the device instances asked for. Each one's
        name is read too (None when it does not answer that)."""
        app = self._application()
        dest = _address(address) if address else None
        if low is None and high is not None:
            low = 0
        if high is None and low is not None:
            high = BACNET_MAX_INSTANCE
        answers = await app.who_is(low, high, dest, timeout=timeout)
        found: dict[int, Device] = {}
        for i_am in answers:
            instance = int(i_am.iAmDeviceIdentifier[1])
            source = str(i_am.pduSource)
            name = None
            with contextlib.suppress(ErrorRejectAbortNack, TimeoutError):
                async with asyncio.timeout(timeout):
                    value = await app.read_property(
                        i_am.pduSource, ObjectIdentifier(("device", instance)), _OBJECT_NAME
                    )
                name = str(value) if value is not None else None
            found[instance] = Device(
                instance, source, int(i_am.vendorID), int(i_am.maxAPDULengthAccepted), name
            )
        return [found[k] for k in sorted(found)]

    def close(self) -> None:
        app, self._app = self._app, None
        if app is not None:
            with contextlib.suppress(Exception):
                app.close()

    async def __aenter__(self) -> BacnetLink:
        self._application()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _error_kind(err: ErrorType) -> str:
    return f"error_{_slug(err.errorCode)}"


def _error_text(err: ErrorType) -> str:
    return f"{err.errorClass}: {err.errorCode}"
