"""``pfmon scan``: which unit ids answer on a bus, and which built-in profile fits;
``pfmon scan --bacnet``: which BACnet/IP devices answer a Who-Is (:func:`scan_bacnet`).

A unit is present when it answers at all (even with an exception such as 0x02:
the device is there, the register map is not its own). Silence, 0x0A and 0x0B
(a gateway saying nobody answered behind it) mean absent. A profile fits when
every one of its blocks reads and the values are plausible for a meter
(voltage 50-300 V, frequency 45-65 Hz where the profile has them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.collector.profiles import PROFILES, Profile
from shared.errors import ConfigError, PeerError
from shared.measurements import Measurement as M
from shared.modbus import ModbusConnection
from shared.site import BusConfig

if TYPE_CHECKING:
    from services.collector.bacnet import Device

ABSENT = frozenset({"timeout", "exception_0a", "exception_0b", "refused"})


@dataclass(frozen=True, slots=True)
class Found:
    unit: int
    profile: str | None
    evidence: str

    def as_dict(self) -> dict[str, object]:
        return {"unit": self.unit, "profile": self.profile, "evidence": self.evidence}


def plausible(values: dict[M, float]) -> str | None:
    """Why these values look like a live meter, or None."""
    v = values.get(M.VOLTAGE_L1)
    f = values.get(M.FREQUENCY_L1, values.get(M.FREQUENCY))
    if v is None or not 50.0 <= v <= 300.0:
        return None
    if f is not None and not 45.0 <= f <= 65.0:
        return None
    return f"V1 {v:.1f} V" + (f", f {f:.2f} Hz" if f is not None else "")


async def _try(conn: ModbusConnection, unit: int, profile: Profile) -> dict[M, float]:
    raw: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
    for b in profile.plan():
        regs = await conn.read(unit, b.table, b.address, b.count)
        raw[b.table].update({b.address + i: v for i, v in enumerate(regs)})
    return profile.decode(raw)


async def scan(
    bus: BusConfig, units: list[int], progress: Callable[[], None] | None = None
) -> list[Found]:
    conn = ModbusConnection(bus)
    found: list[Found] = []
    try:
        for unit in units:
            present = False
            answer = ""
            match: Found | None = None
            for profile in PROFILES.values():
                try:
                    values = await _try(conn, unit, profile)
                except PeerError as exc:
                    if exc.kind == "refused":
                        raise
                    if exc.kind in ABSENT and not present:
                        break  # nobody there: do not try the other profiles
                    present = True
                    answer = answer or f"answers {exc.kind}"
                    continue
                present = True
                why = plausible(values)
                if why:
                    match = Found(unit, profile.name, why)
                    break
                answer = answer or f"answers, {profile.name} values implausible"
            if match:
                found.append(match)
            elif present:
                found.append(Found(unit, None, answer))
            if progress:
                progress()
    finally:
        conn.close()
    return found


async def scan_bacnet(
    bus: BusConfig,
    address: str | None = None,
    low: int | None = None,
    high: int | None = None,
    timeout: float = 2.0,
) -> list[Device]:
    """The BACnet/IP devices that answer a Who-Is from ``bus`` (this machine's BACnet/IP
    port) within ``timeout``: sent to the device at ``address`` (directed) or as a global
    broadcast, which needs the bus's host with its prefix (``192.168.1.10/24``). Device
    instances ``low``..``high`` only, if given."""
    from services.collector.bacnet import BacnetLink

    if address is None and "/" not in (bus.host or ""):
        raise ConfigError(
            f"a broadcast Who-Is needs this machine's address with its prefix "
            f"(e.g. {bus.host}/24), or a device's address to ask it directly"
        )
    async with BacnetLink(bus) as link:
        return await link.who_is(address, low, high, timeout)
