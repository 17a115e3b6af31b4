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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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


# -- many readings at once ---------------------------------------------------------------

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
#: column of each quantity in a values matrix (one row per reading, NaN = absent)
COL: dict[M, int] = {m: k for k, m in enumerate(M)}
#: the order of the load-kind codes of :func:`derive_rows` (-1: no such entry)
LOAD_KINDS = (LoadKind.RESISTIVE, LoadKind.INDUCTIVE, LoadKind.CAPACITIVE, LoadKind.UNKNOWN)
_UNKNOWN = 3
#: per-phase columns (L1, L2, L3) of V, I, P, Q, S, N, PF, V line-to-line
_VC, _IC, _PC, _QC, _SC, _NC, _PFC, _LLC = (
    np.array([COL[m] for m in keys], dtype=np.intp) for keys in (_V, _I, _P, _Q, _S, _N, _PF, _LL)
)


@dataclass(slots=True)
class DerivedRows:
    """What :func:`derive_rows` works out beside the values (one row per reading)."""

    #: load-kind codes (index into ``LOAD_KINDS``, -1: absent) for L1, L2, L3, total
    load: npt.NDArray[np.int8]
    #: quadrants 1-4 (0: absent) for L1, L2, L3, total
    quadrant: npt.NDArray[np.int8]
    #: per phase: the meter's PF register, the computed |P|/S, whether both exist
    pf_meter: F64
    pf_calc: F64
    pf_pair: Bools
    #: the star-point shift was worked out from the three phase voltages
    star: Bools
    #: |ΣI|/Σ|I| (neutral.current_sum_ratio), NaN where not worked out
    current_ratio: F64


def derive_rows(x: F64, sqrt3: Bools, neutral_u0_pct: float = 0.0) -> DerivedRows:
    """:func:`derive` for many readings at once, in place on the values matrix ``x``
    (one row per reading, columns ``COL``, NaN = absent; non-finite registers must
    already be NaN). The same arithmetic in the same order, element-wise, the three
    phases side by side as (rows, 3) blocks, so a row gives what :func:`derive`
    gives for it whatever the other rows; ``sqrt3`` per row. The broken-neutral
    current-sum fit runs in Python for the rows that need it (star-point shift
    above ``neutral_u0_pct``: rare on a healthy site).
    """
    n = len(x)
    load = np.full((n, 4), -1, dtype=np.int8)
    quad = np.zeros((n, 4), dtype=np.int8)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        v = x[:, _VC]
        has_v = ~np.isnan(v)
        if sqrt3.any():
            conv = has_v & sqrt3[:, None]
            x[:, _LLC] = np.where(conv, v, x[:, _LLC])
            v = np.where(conv, v / SQRT3, v)
            x[:, _VC] = v
        amps = x[:, _IC]
        on = has_v & ~np.isnan(amps)
        s = v * amps
        p_reg = x[:, _PC]
        p = np.where(np.isnan(p_reg), 0.0, p_reg)
        x[:, _PC] = np.where(on, p, p_reg)
        x[:, _SC] = np.where(on, s, x[:, _SC])
        nn = s * s - p * p
        pos = nn > 0.0
        x[:, _NC] = np.where(on, np.where(pos, np.sqrt(np.where(pos, nn, 0.0)), 0.0), x[:, _NC])
        pf_reg = x[:, _PFC]
        live = s > 0
        pf = np.where(live, p / s, 0.0)
        pair = on & live & ~np.isnan(pf_reg)
        x[:, _PFC] = np.where(on, pf, pf_reg)
        q = x[:, _QC]
        has_q = ~np.isnan(q)
        q_known = (~on | has_q).all(axis=1)
        load[:, :3] = np.where(on, np.where(has_q, _kind_codes(p, q, s), _UNKNOWN), -1)
        quad[:, :3] = np.where(on & has_q, _quadrant_codes(p, q), 0)
        # totals over the phases counted, added in phase order (a phase not counted
        # adds +0.0, which leaves a sum that started at +0.0 unchanged)
        p_on = np.where(on, p, 0.0)
        s_on = np.where(on, s, 0.0)
        q_on = np.where(on & has_q, q, 0.0)
        p_tot = 0.0 + p_on[:, 0] + p_on[:, 1] + p_on[:, 2]
        s_tot = 0.0 + s_on[:, 0] + s_on[:, 1] + s_on[:, 2]
        q_tot = 0.0 + q_on[:, 0] + q_on[:, 1] + q_on[:, 2]
        phases = on.sum(axis=1)
        nv = has_v.sum(axis=1)
        some = phases > 0
        p_reg = x[:, COL[M.POWER]]
        _put(x, M.POWER, some, np.where(np.isnan(p_reg) | (phases > 1), p_tot, p_reg))
        _put(x, M.APPARENT_POWER, some, s_tot)
        _put(x, M.POWER_FACTOR, some, np.where(s_tot > 0, p_tot / s_tot, 0.0))
        signed = some & q_known
        _put(x, M.REACTIVE_POWER, signed, q_tot)
        load[:, 3] = np.where(
            some, np.where(q_known, _kind_codes(p_tot, q_tot, s_tot), _UNKNOWN), -1
        )
        quad[:, 3] = np.where(signed, _quadrant_codes(p_tot, q_tot), 0)
        lls = x[:, _LLC]
        # line-to-line magnitudes: the delta meter's own voltages, else the registers
        from_ll = np.where(sqrt3 & (nv > 0), nv == 3, ~np.isnan(lls).any(axis=1))
        _put(x, M.VOLTAGE_UNBALANCE, from_ll, _u2_rows(lls))
        _put(
            x, M.NEMA_UNBALANCE, from_ll | (nv == 3), _nema_rows(np.where(from_ll[:, None], lls, v))
        )
        star = (nv == 3) & ~sqrt3 & (v.min(axis=1) > 0)
        u0, consistent = neutral.star_u0_rows(v[:, 0], v[:, 1], v[:, 2])
        _put(x, M.ZERO_SEQ_UNBALANCE, star, u0)
    ratio = np.full(n, np.nan)
    for r in np.flatnonzero(star & (phases == 3) & consistent & (u0 > neutral_u0_pct)):
        row = x[r]
        volts, currents, pfs = row[_VC].tolist(), row[_IC].tolist(), row[_PFC].tolist()
        ratio[r] = neutral.current_sum_ratio(
            (volts[0], volts[1], volts[2]),
            (currents[0], currents[1], currents[2]),
            (pfs[0], pfs[1], pfs[2]),
        )
    return DerivedRows(load, quad, pf_reg, np.abs(pf), pair, star, ratio)


def _put(x: F64, key: M, where: Bools, value: F64) -> None:
    c = COL[key]
    x[:, c] = np.where(where, value, x[:, c])


def _kind_codes(p: F64, q: F64, s: F64) -> npt.NDArray[np.int8]:
    """:func:`_kind` as codes into ``LOAD_KINDS``."""
    resistive = (s <= 0) | (np.abs(q) <= 0.02 * s)
    inductive = (p * q > 0) | ((p == 0) & (q > 0))
    return np.where(resistive, 0, np.where(inductive, 1, 2)).astype(np.int8)


def _quadrant_codes(p: F64, q: F64) -> npt.NDArray[np.int8]:
    up = q >= 0
    return np.where(p >= 0, np.where(up, 1, 4), np.where(up, 2, 3)).astype(np.int8)


def _u2_rows(ll: F64) -> F64:
    """:func:`u2_from_line_magnitudes` per row of three line-to-line magnitudes."""
    a, b, c = ll[:, 0], ll[:, 1], ll[:, 2]
    a2, b2, c2 = a * a, b * b, c * c
    sq = a2 + b2 + c2
    beta = (a2 * a2 + b2 * b2 + c2 * c2) / (sq * sq)
    root = np.sqrt(np.maximum(0.0, 3.0 - 6.0 * beta))
    u2 = 100.0 * np.sqrt(np.maximum(0.0, (1.0 - root) / (1.0 + root)))
    return np.where(sq <= 0, 0.0, u2)


def _nema_rows(v: F64) -> F64:
    """:func:`_nema3` per row of three magnitudes."""
    mean = (v[:, 0] + v[:, 1] + v[:, 2]) / 3
    dev = np.maximum(
        np.maximum(np.abs(v[:, 0] - mean), np.abs(v[:, 1] - mean)), np.abs(v[:, 2] - mean)
    )
    return np.where(mean > 0, 100.0 * dev / mean, 0.0)
