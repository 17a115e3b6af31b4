"""A meter of the plant served as a BACnet/IP device (bacpypes3), for tests and trials.

:class:`BacnetMeter` puts one :class:`~services.simulator.plant.SimMeter` of a
:class:`~services.simulator.plant.SimSite` on a UDP address as a BACnet device whose
analog-inputs are the objects of a BACnet profile
(:mod:`services.collector.bacnet`): on every ReadProperty(Multiple) the present
values are the meter's measurements at that moment (the same plant model as the
Modbus devices), in the units the device is given (SI by default; ``units=`` sets a
BACnet unit per measurement, e.g. ``{M.POWER: "kilowatts"}``, the value then scaled
to it). The meter's ``comm_loss`` fault makes the device silent, ``slow`` delays
its answers; ``omit=`` leaves objects out (a device without them); a Who-Is is
answered with an I-Am::

    site = inductive_site(seed=1)
    async with BacnetMeter(site, unit=1, port=47809, device_instance=1201) as dev:
        ...   # read 127.0.0.1:47809, device 1201 (profile bacnet_power_meter)

On one host the device and the client need different UDP ports (bacpypes3 takes any
127.x.x.x on its own port for itself); a Who-Is must then be sent to the device's
address (a broadcast goes to the sender's port only).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from bacpypes3.app import Application
from bacpypes3.basetypes import EngineeringUnits
from bacpypes3.local.analog import AnalogInputObject, AnalogValueObject
from bacpypes3.local.device import DeviceObject
from bacpypes3.local.networkport import NetworkPortObject

from services.collector.bacnet import UNITS, BacnetProfile, resolve
from services.simulator.plant import SimMeter, SimSite
from shared.measurements import Measurement as M

__all__ = ["BacnetMeter"]

#: the SI unit of the vocabulary -> the BACnet unit a device reports it in by default
_SI_UNITS = {
    "V": "volts",
    "A": "amperes",
    "W": "watts",
    "var": "volt-amperes-reactive",
    "VA": "volt-amperes",
    "Hz": "hertz",
    "Wh": "watt-hours",
    "varh": "volt-ampere-hours-reactive",
    "VAh": "volt-ampere-hours",
    "": "power-factor",
    "%": "percent",
}


class _Device(Application):  # type: ignore[misc]
    """The device's application: refreshes the present values before it answers."""

    meter: BacnetMeter

    async def do_ReadPropertyRequest(self, apdu: Any) -> None:
        if await self.meter.before_answer():
            await super().do_ReadPropertyRequest(apdu)

    async def do_ReadPropertyMultipleRequest(self, apdu: Any) -> None:
        if await self.meter.before_answer():
            await super().do_ReadPropertyMultipleRequest(apdu)

    async def do_WhoIsRequest(self, apdu: Any) -> None:
        if "comm_loss" not in self.meter.sim.faults:
            await super().do_WhoIsRequest(apdu)


class BacnetMeter:
    """Meter ``unit`` of ``site`` as BACnet device ``device_instance`` on ``host:port``."""

    def __init__(
        self,
        site: SimSite,
        unit: int,
        *,
        port: int,
        device_instance: int,
        host: str = "127.0.0.1",
        profile: str | BacnetProfile = "bacnet_power_meter",
        units: Mapping[M, str] | None = None,
        omit: Iterable[M] = (),
        name: str | None = None,
    ) -> None:
        self.site = site
        self.sim: SimMeter = site.meters[unit]
        self.profile = resolve(profile) if isinstance(profile, str) else profile
        self.host = host
        self.port = port
        self.device_instance = device_instance
        self.name = name or f"{self.sim.name}-bacnet"
        self.units: dict[M, EngineeringUnits] = {
            m: EngineeringUnits(_SI_UNITS[m.unit]) for m in self.profile.objects
        }
        for m, u in (units or {}).items():
            self.units[m] = EngineeringUnits(u)
        #: measurements of the profile the device does not have (no such object)
        self.omit = frozenset(omit)
        self.objects: dict[M, Any] = {}
        self.app: _Device | None = None
        #: ReadProperty(Multiple) requests answered
        self.reads = 0

    def _objects(self) -> list[Any]:
        out = []
        for m, spec in self.profile.objects.items():
            if m in self.omit:
                continue
            cls = AnalogInputObject if spec.object_type == "analog-input" else AnalogValueObject
            obj = cls(
                objectIdentifier=(spec.object_type, spec.instance),
                objectName=m.value,
                presentValue=0.0,
                units=self.units[m],
                statusFlags=[0, 0, 0, 0],
                eventState="normal",
                outOfService=False,
            )
            self.objects[m] = obj
            out.append(obj)
        return out

    def refresh(self) -> None:
        """Present values = what the meter measures now, in each object's units."""
        values = self.sim.values(self.site, self.site.now())
        for m, obj in self.objects.items():
            value = values.get(m)
            if value is None:
                continue
            si = UNITS.get(int(self.units[m]))
            factor = si[1] if si is not None else 1.0
            obj.presentValue = value / factor

    async def before_answer(self) -> bool:
        """Apply the meter's faults; False when the device stays silent."""
        self.site.tick()
        self.sim.requests += 1
        faults = self.sim.faults
        if "comm_loss" in faults:
            return False
        if "slow" in faults:
            await asyncio.sleep(float(faults["slow"].get("delay_s", 0.5)))
        self.refresh()
        self.sim.reads += 1
        self.reads += 1
        return True

    async def start(self) -> BacnetMeter:
        device = DeviceObject(
            objectIdentifier=("device", self.device_instance),
            objectName=self.name,
            vendorIdentifier=0,
            modelName=self.profile.model,
        )
        port = NetworkPortObject(
            f"{self.host}:{self.port}",
            objectIdentifier=("network-port", 1),
            objectName="NetworkPort-1",
        )
        app = _Device.from_object_list([device, port, *self._objects()])
        app.meter = self
        self.app = app
        return self

    def stop(self) -> None:
        app, self.app = self.app, None
        if app is not None:
            with contextlib.suppress(Exception):
                app.close()

    async def __aenter__(self) -> BacnetMeter:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
