"""Meter profiles as data: one literal table per model, measurement -> register spec.

Adding a meter means adding a table here (or a ``profiles:`` entry in the site
YAML with the same fields), never touching the polling loop. A model registers
itself under a name; a duplicate name fails at import.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.site.collector import ProfileSpec, RegisterSpec

#: Modbus limit for one read of holding/input registers
MAX_REGISTERS_PER_READ = 125

_WIDTH = {"u16": 1, "s16": 1, "u32": 2, "s32": 2, "f32": 2, "u64": 4}


def _words(regs: list[int], order: str) -> list[int]:
    return regs if order == "big" else list(reversed(regs))


def u16(regs: list[int], order: str = "big") -> float:
    return float(regs[0] & 0xFFFF)


def s16(regs: list[int], order: str = "big") -> float:
    v = regs[0] & 0xFFFF
    return float(v - 0x10000 if v & 0x8000 else v)


def u32(regs: list[int], order: str = "big") -> float:
    hi, lo = _words(regs[:2], order)
    return float((hi << 16) | lo)


def s32(regs: list[int], order: str = "big") -> float:
    v = int(u32(regs, order))
    return float(v - 0x1_0000_0000 if v & 0x8000_0000 else v)


def f32(regs: list[int], order: str = "big") -> float:
    hi, lo = _words(regs[:2], order)
    return float(struct.unpack(">f", struct.pack(">HH", hi, lo))[0])


def u64(regs: list[int], order: str = "big") -> float:
    v = 0
    for w in _words(regs[:4], order):
        v = (v << 16) | (w & 0xFFFF)
    return float(v)


DECODERS: dict[str, Callable[[list[int], str], float]] = {
    "u16": u16,
    "s16": s16,
    "u32": u32,
    "s32": s32,
    "f32": f32,
    "u64": u64,
}


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers from ``address`` of ``table``."""

    table: str
    address: int
    count: int


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    phases: int
    registers: Mapping[M, RegisterSpec]
    #: registers that may be read across although nothing is mapped there
    max_gap: int = 0

    def plan(self) -> list[Block]:
        """Coalesce adjacent registers into as few reads as the Modbus limit allows."""
        blocks: list[Block] = []
        by_table: dict[str, list[tuple[int, int]]] = {}
        for spec in self.registers.values():
            by_table.setdefault(spec.table, []).append((spec.address, _WIDTH[spec.type]))
        for table, spans in sorted(by_table.items()):
            spans.sort()
            start, end = spans[0][0], spans[0][0] + spans[0][1]
            for addr, width in spans[1:]:
                new_end = max(end, addr + width)
                if addr - end <= self.max_gap and new_end - start <= MAX_REGISTERS_PER_READ:
                    end = new_end
                else:
                    blocks.append(Block(table, start, end - start))
                    start, end = addr, addr + width
            blocks.append(Block(table, start, end - start))
        return blocks

    def decode(self, raw: Mapping[str, Mapping[int, int]]) -> dict[M, float]:
        """Decode the registers read (``raw[table][address] = value``) into SI values."""
        out: dict[M, float] = {}
        for measurement, spec in self.registers.items():
            table = raw[spec.table]
            regs = [table[spec.address + i] for i in range(_WIDTH[spec.type])]
            out[measurement] = DECODERS[spec.type](regs, spec.word_order) * spec.scale
        return out


PROFILES: dict[str, Profile] = {}


def register(profile: Profile) -> Profile:
    if profile.name in PROFILES:
        raise RuntimeError(f"meter profile {profile.name!r} is registered twice")
    PROFILES[profile.name] = profile
    return profile


def _hr(address: int, type_: str = "u16", scale: float = 1.0, order: str = "big") -> RegisterSpec:
    return RegisterSpec(table="holding", address=address, type=type_, scale=scale, word_order=order)  # type: ignore[arg-type,unused-ignore]


# PMTR_001 (../shared/reference/pmtr001-modbus-map.json): all u16 holding registers,
# big-endian bytes. kWh counters are scaled to Wh, mV rails to V.
register(
    Profile(
        name="pmtr001",
        description="PMTR_001 three-phase meter (firmware 2024-09-01)",
        phases=3,
        max_gap=2,
        registers={
            M.SUPPLY_5V: _hr(78, scale=0.001),
            M.SUPPLY_12V: _hr(79, scale=0.001),
            M.VOLTAGE_L1: _hr(80, scale=0.1),
            M.VOLTAGE_L2: _hr(81, scale=0.1),
            M.VOLTAGE_L3: _hr(82, scale=0.1),
            M.CURRENT_L1: _hr(83, scale=0.01),
            M.CURRENT_L2: _hr(84, scale=0.01),
            M.CURRENT_L3: _hr(85, scale=0.01),
            M.POWER_L1: _hr(86),
            M.POWER_L2: _hr(87),
            M.POWER_L3: _hr(88),
            M.IMPORT_ENERGY_L1: _hr(89, scale=100.0),
            M.IMPORT_ENERGY_L2: _hr(90, scale=100.0),
            M.IMPORT_ENERGY_L3: _hr(91, scale=100.0),
            M.FREQUENCY_L1: _hr(92, scale=0.1),
            M.FREQUENCY_L2: _hr(93, scale=0.1),
            M.FREQUENCY_L3: _hr(94, scale=0.1),
            M.POWER_FACTOR_L1: _hr(95, scale=0.01),
            M.POWER_FACTOR_L2: _hr(96, scale=0.01),
            M.POWER_FACTOR_L3: _hr(97, scale=0.01),
        },
    )
)


def resolve(name: str, user_profiles: Mapping[str, ProfileSpec] | None = None) -> Profile:
    """A built-in or user-defined profile by name; :class:`ConfigError` if unknown."""
    if user_profiles and name in user_profiles:
        spec = user_profiles[name]
        return Profile(name, spec.description, spec.phases, dict(spec.registers))
    if name in PROFILES:
        return PROFILES[name]
    known = sorted(set(PROFILES) | set(user_profiles or {}))
    raise ConfigError(f"unknown meter profile {name!r}; known: {', '.join(known)}")
