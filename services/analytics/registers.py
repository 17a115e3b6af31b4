"""Register-level readings (meters that report V, I, P, PF): derived quantities.

Per phase: ``S = V·I``; ``N = sqrt(S² − P²)`` (nonactive power). The sign of the
reactive power is unknown unless the meter reports ``reactive_power_lN`` itself:
then it is kept and the load is inductive/capacitive from the sign of ``P·Q``;
otherwise the load is ``unknown`` (never guessed). ``PF = P/S`` (sign of P).

The meter's own PF register is cross-checked against ``|P|/S``: a difference
above the meter's tolerance flags ``meter_pf_mismatch`` (a corrupted firmware
calculation). Meters wired delta report line-to-line voltages: with the √3
correction the per-phase voltage is ``V_LL/√3`` and the line-to-line values are
kept as ``voltage_l1_l2``...

Voltage unbalance from magnitudes: ``u2`` needs line-to-line magnitudes (exact
formula of IEC 61000-4-30 from three magnitudes); NEMA is computed from the
line-to-line magnitudes when known, else from the line-to-neutral ones; the
star-point shift (``neutral.star_shift``) from the three line-to-neutral ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from services.analytics import neutral
from shared.measurements import Measurement as M
from shared.messages import LoadKind

SQRT3 = math.sqrt(3.0)
_V = [M.VOLTAGE_L1, M.VOLTAGE_L2, M.VOLTAGE_L3]
_I = [M.CURRENT_L1, M.CURRENT_L2, M.CURRENT_L3]
_P = [M.POWER_L1, M.POWER_L2, M.POWER_L3]
_Q = [M.REACTIVE_POWER_L1, M.REACTIVE_POWER_L2, M.REACTIVE_POWER_L3]
_S = [M.APPARENT_POWER_L1, M.APPARENT_POWER_L2, M.APPARENT_POWER_L3]
_N = [M.NONACTIVE_POWER_L1, M.NONACTIVE_POWER_L2, M.NONACTIVE_POWER_L3]
_PF = [M.POWER_FACTOR_L1, M.POWER_FACTOR_L2, M.POWER_FACTOR_L3]
_LL = [M.VOLTAGE_L1_L2, M.VOLTAGE_L2_L3, M.VOLTAGE_L3_L1]
PHASE_NAMES = ("L1", "L2", "L3")
#: per phase: name and the keys of V, I, P, Q, S, N, PF, V line-to-line
_PHASES = tuple(zip(PHASE_NAMES, _V, _I, _P, _Q, _S, _N, _PF, _LL, strict=True))
Quadrant = Literal[1, 2, 3, 4]


@dataclass(slots=True)
class Derived:
    values: dict[M, float]
    load: dict[str, LoadKind]
    quadrant: dict[str, Quadrant]
    #: phase -> (meter PF, computed |P|/S) where the meter reported a PF
    pf_pairs: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: the three phase-voltage magnitudes the star-point shift was worked out from
    star_volts: tuple[float, float, float] | None = None
    #: |ΣI|/Σ|I| of the currents rebuilt from magnitudes (neutral.current_sum_ratio)
    current_ratio: float | None = None

    @property
    def star(self) -> neutral.StarShift | None:
        """The star-point shift (with the implied angles: built on demand, for evidence)."""
        return None if self.star_volts is None else neutral.star_shift(*self.star_volts)


def u2_from_line_magnitudes(a: float, b: float, c: float) -> float:
    """Negative-sequence unbalance (%) from three line-to-line RMS magnitudes.

    IEC 61000-4-30: ``β = (a⁴+b⁴+c⁴)/(a²+b²+c²)²``, ``u2 = sqrt((1−√(3−6β))/(1+√(3−6β)))``.
    """
    sq = a * a + b * b + c * c
    if sq <= 0:
        return 0.0
    beta = (a**4 + b**4 + c**4) / (sq * sq)
    root = math.sqrt(max(0.0, 3.0 - 6.0 * beta))
    return 100.0 * math.sqrt(max(0.0, (1.0 - root) / (1.0 + root)))


def nema(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return 100.0 * max(abs(v - mean) for v in values) / mean if mean > 0 else 0.0


def derive(reading: dict[M, float], *, sqrt3: bool = False, neutral_u0_pct: float = 0.0) -> Derived:
    """Everything computable from one register-level reading.

    The phase-current sum (broken-neutral fit) is only worked out when the
    star-point shift exceeds ``neutral_u0_pct`` (below it the score is 0 anyway).
    """
    out = dict(reading)
    if not all(map(math.isfinite, out.values())):  # NaN/inf registers are left out
        out = {k: v for k, v in out.items() if math.isfinite(v)}
    get = out.get
    load: dict[str, LoadKind] = {}
    quad: dict[str, Quadrant] = {}
    pairs: dict[str, tuple[float, float]] = {}
    p_tot = s_tot = q_tot = 0.0
    q_known = True
    phases = 0
    volts: list[float] = []
    lls: list[float] = []
    for name, k_v, k_i, k_p, k_q, k_s, k_n, k_pf, k_ll in _PHASES:
        v = get(k_v)
        if v is None:
            continue
        if sqrt3:
            out[k_ll] = v
            lls.append(v)
            v = v / SQRT3
            out[k_v] = v
        volts.append(v)
        amps = get(k_i)
        if amps is None:
            continue
        phases += 1
        s = v * amps
        p = get(k_p, 0.0)
        out[k_p] = p
        out[k_s] = s
        nn = s * s - p * p
        out[k_n] = math.sqrt(nn) if nn > 0.0 else 0.0
        pf_meter = reading.get(k_pf)
        pf = p / s if s > 0 else 0.0
        if pf_meter is not None and s > 0:
            pairs[name] = (pf_meter, abs(pf))
        out[k_pf] = pf
        q = get(k_q)
        if q is None:
            q_known = False
            load[name] = LoadKind.UNKNOWN
        else:
            q_tot += q
            load[name] = _kind(p, q, s)
            quad[name] = _quadrant(p, q)
        p_tot += p
        s_tot += s
    if phases:
        out[M.POWER] = p_tot if M.POWER not in reading or phases > 1 else reading[M.POWER]
        out[M.APPARENT_POWER] = s_tot
        out[M.POWER_FACTOR] = p_tot / s_tot if s_tot > 0 else 0.0
        if q_known:
            out[M.REACTIVE_POWER] = q_tot
            load["total"] = _kind(p_tot, q_tot, s_tot)
            quad["total"] = _quadrant(p_tot, q_tot)
        else:
            load["total"] = LoadKind.UNKNOWN
    star_volts = None
    if not lls and _LL[0] in out and _LL[1] in out and _LL[2] in out:
        lls = [out[x] for x in _LL]
    if len(lls) == 3:
        out[M.VOLTAGE_UNBALANCE] = u2_from_line_magnitudes(*lls)
        out[M.NEMA_UNBALANCE] = _nema3(lls[0], lls[1], lls[2])
    elif len(volts) == 3:
        out[M.NEMA_UNBALANCE] = _nema3(volts[0], volts[1], volts[2])
    ratio = None
    if len(volts) == 3 and not sqrt3 and min(volts) > 0:
        star_volts = (volts[0], volts[1], volts[2])
        _, _, u0, consistent = neutral.star_u0(*star_volts)
        out[M.ZERO_SEQ_UNBALANCE] = u0
        if phases == 3 and consistent and u0 > neutral_u0_pct:
            currents = (out[_I[0]], out[_I[1]], out[_I[2]])
            pfs = (out[_PF[0]], out[_PF[1]], out[_PF[2]])
            ratio = neutral.current_sum_ratio((volts[0], volts[1], volts[2]), currents, pfs)
    return Derived(out, load, quad, pairs, star_volts, ratio)


def _nema3(a: float, b: float, c: float) -> float:
    """:func:`nema` of three values (same arithmetic, without the generator)."""
    mean = (a + b + c) / 3
    if mean > 0:
        return 100.0 * max(abs(a - mean), abs(b - mean), abs(c - mean)) / mean
    return 0.0


def _kind(p: float, q: float, s: float) -> LoadKind:
    if s <= 0 or abs(q) <= 0.02 * s:
        return LoadKind.RESISTIVE
    return LoadKind.INDUCTIVE if p * q > 0 or (p == 0 and q > 0) else LoadKind.CAPACITIVE


def _quadrant(p: float, q: float) -> Quadrant:
    if p >= 0:
        return 1 if q >= 0 else 4
    return 2 if q >= 0 else 3
