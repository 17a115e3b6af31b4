"""Uploading relay actions to a PMTR_001 meter (registers 151-188, coils 1-4).

The firmware evaluates its formula on raw scaled integers (0.1 V, 0.01 A, W,
0.1 kWh, 0.1 Hz, PF x 100), not SI, and knows only the per-phase tokens
U, I, P, e, f, pf. :func:`encode` converts an action's SI thresholds into raw
units and refuses, saying why, what the firmware cannot express: other tokens,
arithmetic on measurements, thresholds finer than the register resolution,
formulas over 63 characters, more than five slots (0-4), windows outside 1-20 s,
more than eight pins. Register layout (``../shared/reference/pmtr001-modbus-map.json``):

* 151: low byte = slot 0-4, high byte = moving-average window in s (1-20);
* 152-155: 8 output pin numbers, first in the high byte (255 = unused);
* 156: recovery seconds; 157-188: the formula, NUL-terminated, first char high;
* coil 2 = level high when true, coil 3 = dry run, coil 4 = automatic recovery,
  coil 1 = apply (set last; the firmware clears it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.actuator.expr import (
    CLOCK_TOKENS,
    BinOp,
    Compare,
    Logic,
    Neg,
    Node,
    Not,
    Num,
    Var,
    parse,
)
from shared.errors import PeerError
from shared.modbus import ModbusConnection
from shared.site.actuator import RelayAction

#: firmware token -> raw units per SI unit (raw = SI * factor)
RAW_FACTOR = {"U": 10.0, "I": 100.0, "P": 1.0, "e": 10.0, "f": 10.0, "pf": 100.0}
RAW_UNIT = {"U": "0.1 V", "I": "0.01 A", "P": "1 W", "e": "0.1 kWh", "f": "0.1 Hz", "pf": "0.01"}
FIRST_REGISTER = 151
REGISTER_COUNT = 38  # 151..188
FORMULA_MAX = 63
SLOTS = 5
UNUSED_PIN = 0xFF
COIL_APPLY, COIL_HIGH, COIL_DRY, COIL_AUTO = 1, 2, 3, 4


class UploadError(ValueError):
    """The firmware cannot express this action; the message says why."""


@dataclass(frozen=True)
class Upload:
    """What to write for one action: the register image and coils 2-4."""

    action: str
    slot: int
    formula: str
    registers: list[int]  # 151..188
    coils: dict[int, bool]


def _suffix(name: str) -> str | None:
    if len(name) >= 3 and name[0] == "L" and name[1] in "123":
        suffix = name[2:]
        return suffix if suffix in RAW_FACTOR else None
    return None


def _const(node: Node) -> float | None:
    """The value of a constant sub-expression (numbers only), else None."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Neg):
        v = _const(node.operand)
        return None if v is None else -v
    if isinstance(node, BinOp):
        a, b = _const(node.left), _const(node.right)
        if a is None or b is None:
            return None
        if node.op == "+":
            return a + b
        if node.op == "-":
            return a - b
        if node.op == "*":
            return a * b
        return a / b if b else None
    return None


def _raw_int(value: float, suffix: str, token: str, column: int) -> int:
    raw = value * RAW_FACTOR[suffix]
    if abs(raw - round(raw)) > 1e-6:
        raise UploadError(
            f"column {column}: {value:g} for {token} is finer than the firmware's "
            f"{RAW_UNIT[suffix]} resolution"
        )
    return round(raw)


_LEVEL = {"||": 1, "&&": 2}


def _convert(node: Node) -> tuple[str, int]:
    """Firmware text of ``node`` (raw units) and its precedence (higher binds tighter)."""
    if isinstance(node, Logic):
        prec = _LEVEL[node.op]
        parts = []
        for child in (node.left, node.right):
            text, p = _convert(child)
            parts.append(text if p >= prec else f"({text})")
        return node.op.join(parts), prec
    if isinstance(node, Not):
        text, p = _convert(node.operand)
        return (f"!{text}" if p >= 9 else f"!({text})"), 9
    if isinstance(node, Compare):
        return _compare(node), 5
    raise UploadError(f"column {getattr(node, 'column', 1)}: only conditions can be uploaded")


def _compare(node: Compare) -> str:
    left, right = node.left, node.right
    lvar = left if isinstance(left, Var) else None
    rvar = right if isinstance(right, Var) else None
    for var in (lvar, rvar):
        if var is not None and _suffix(var.name) is None:
            raise UploadError(
                f"column {var.column}: the PMTR_001 firmware has no token {var.name} "
                "(it knows L1..L3 U, I, P, e, f, pf)"
            )
    if lvar is not None and rvar is not None:
        ls, rs = _suffix(lvar.name), _suffix(rvar.name)
        if ls != rs:
            raise UploadError(
                f"column {node.column}: {lvar.name} and {rvar.name} have different raw units "
                "on the firmware; compare a token with a number"
            )
        return f"{lvar.name}{node.op}{rvar.name}"
    if lvar is not None:
        c = _const(right)
        if c is None:
            raise UploadError(_arith(node))
        suffix = _suffix(lvar.name)
        assert suffix is not None
        return f"{lvar.name}{node.op}{_raw_int(c, suffix, lvar.name, node.column)}"
    if rvar is not None:
        c = _const(left)
        if c is None:
            raise UploadError(_arith(node))
        suffix = _suffix(rvar.name)
        assert suffix is not None
        return f"{_raw_int(c, suffix, rvar.name, node.column)}{node.op}{rvar.name}"
    raise UploadError(_arith(node))


def _clock_vars(node: Node) -> list[Var]:
    """The clock tokens (``hour`` ...) anywhere in ``node``, in order."""
    if isinstance(node, Var):
        return [node] if node.name in CLOCK_TOKENS else []
    if isinstance(node, Neg | Not):
        return _clock_vars(node.operand)
    if isinstance(node, BinOp | Compare | Logic):
        return _clock_vars(node.left) + _clock_vars(node.right)
    return []


def _arith(node: Compare) -> str:
    return (
        f"column {node.column}: the firmware compares raw integers; only 'token OP number' "
        "(or two tokens of one kind) can be converted from SI, not arithmetic on measurements"
    )


def encode(action: RelayAction, slot: int) -> Upload:
    """Register image and coils for ``action`` in ``slot``; raises :class:`UploadError`."""
    problems: list[str] = []
    if not 0 <= slot < SLOTS:
        problems.append(f"slot {slot}: the firmware has slots 0-4 (at most 5 actions per meter)")
    window = 1 if action.average is None else int(action.average[:-1])
    if not 1 <= window <= 20:
        problems.append(f"average {action.average}: the firmware's windows are 1-20 s")
    pins = [o.address for o in action.outputs if o.table == "pin"]
    if len(pins) != len(action.outputs):
        problems.append("outputs: a PMTR_001 drives its own pins only (device:pin:N)")
    if len(pins) > 8:
        problems.append(f"outputs: {len(pins)} pins, the firmware drives at most 8")
    if any(p >= UNUSED_PIN for p in pins):
        problems.append("outputs: pin numbers are 0-254")
    recovery = action.recovery
    if recovery != int(recovery) or not 0 <= recovery <= 65535:
        problems.append(f"recovery {recovery:g}s: the firmware counts whole seconds 0-65535")
    formula = ""
    tree = parse(action.when).tree
    clock = _clock_vars(tree)
    if clock:
        names = ", ".join(dict.fromkeys(v.name for v in clock))
        problems.append(
            f"when: column {clock[0].column}: the PMTR_001 firmware has no clock tokens "
            f"({names}): an action that reads the time cannot run on the meter; let the "
            "gateway drive a coil device instead"
        )
    else:
        try:
            formula, _ = _convert(tree)
        except UploadError as exc:
            problems.append(f"when: {exc}")
    if len(formula) > FORMULA_MAX:
        problems.append(
            f"when: converted to raw units the formula is {len(formula)} characters "
            f"({formula!r}); the firmware takes {FORMULA_MAX}"
        )
    if problems:
        raise UploadError(f"relay action {action.name!r}: " + "; ".join(problems))
    regs = [0] * REGISTER_COUNT
    regs[0] = (window << 8) | slot
    padded = (pins + [UNUSED_PIN] * 8)[:8]
    for i in range(4):
        regs[1 + i] = (padded[2 * i] << 8) | padded[2 * i + 1]
    regs[5] = int(recovery)
    raw = formula.encode("ascii") + b"\0"
    raw += b"\0" * (64 - len(raw))
    for i in range(32):
        regs[6 + i] = (raw[2 * i] << 8) | raw[2 * i + 1]
    coils = {COIL_HIGH: action.level == "high", COIL_DRY: action.dry_run, COIL_AUTO: True}
    return Upload(action.name, slot, formula, regs, coils)


def decode_formula(registers: list[int]) -> str:
    """The formula text in registers 157-188 (for read-back checks)."""
    raw = bytearray()
    for word in registers[6:38]:
        raw += bytes(((word >> 8) & 0xFF, word & 0xFF))
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


async def upload(link: ModbusConnection, unit: int, item: Upload) -> None:
    """Write one action to a PMTR_001 and verify the registers by reading them back."""
    await link.write_registers(unit, FIRST_REGISTER, item.registers)
    for coil, value in sorted(item.coils.items()):
        await link.write_coil(unit, coil, value)
    got = await link.read(unit, "holding", FIRST_REGISTER, REGISTER_COUNT)
    if got != item.registers:
        raise PeerError(
            f"unit {unit}: action {item.action!r} read back as {decode_formula(got)!r}, "
            f"not {item.formula!r}",
            kind="verify",
        )
    await link.write_coil(unit, COIL_APPLY, True)
