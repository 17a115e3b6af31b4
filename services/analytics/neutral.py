"""Broken (floating) neutral detection in a three-phase star system.

A floating neutral moves the load's star point N' away from the supply neutral by
a displacement D. The meter measures ``V'k = Ek − D``: one phase voltage rises, the
others fall, the line-to-line triangle is untouched, and the shift is pure zero
sequence: ``V0' = −D`` (the supply's own ``V0`` is ~0). Negative-sequence
unbalance ``u2`` cannot see it; ``u0 = |V0|/|V1|`` can.

**With waveforms** ``|V0|`` comes from the fundamental phasors (``dsp``).

**With magnitudes only** (PZEM/PMTR-class meters: ``a, b, c`` = |V'1|, |V'2|, |V'3|,
no angles) the geometry still gives ``|D|`` exactly, assuming the line-to-line
triangle is equilateral with unknown side ``L``:

* a point at distances a, b, c from the vertices of an equilateral triangle of
  side L satisfies ``3(a⁴+b⁴+c⁴+L⁴) = (a²+b²+c²+L²)²``. With ``Σ = a²+b²+c²`` and
  ``K`` = area of a triangle with sides a, b, c (Heron; ``16K² = Σ² − 2(a⁴+b⁴+c⁴)``)
  the root with N' inside the triangle is ``L² = Σ/2 + 2√3·K``;
* the parallel-axis theorem gives ``Σ = 3|D|² + L²``, hence
  ``|D|² = (Σ − L²)/3 = Σ/6 − (2/√3)·K`` and ``u0 = |D| / (L/√3)``.
* the implied angles between phase voltages follow from the law of cosines,
  ``cos θab = (a² + b² − L²)/(2ab)``; they sum to 360° exactly when N' is inside
  the triangle (reported as evidence). ``16K² < 0`` (no triangle a, b, c) means
  the magnitudes cannot come from a shifted star point on a balanced triangle.

**The pre-check bound.** For a shift ``ε = |D|/V`` the largest relative phase
deviation ``δ = max_k | |V'k|/V − 1 |`` is bounded by ``δ_min(ε) ≤ δ ≤ ε`` (upper:
triangle inequality, reached when D is along a phase). The lower bound is reached
when D is perpendicular to a phase, and to first order ``δ_min = (√3/2)·ε``; the
exact value balances the rising and falling phases and is computed by
:func:`min_max_deviation` (e.g. ε = 0.10 → δ_min = 0.0838). So a "10 % pre-check"
on δ only catches shifts ε ≥ ~11.9 %; the PMTR_001 proposal's closed form
√(4+12ε²)/(4ε) has the wrong limit (it diverges as ε → 0 instead of tending
to √3/2) and is not used.

The score is a ramp on ``u0`` (0 below ``score_u0_low_pct``, 1 at
``score_u0_high_pct``): a balanced supply scores 0, and ordinary supply unbalance
(a few % of u2, ~0 u0) stays far below the alarm level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SQRT3 = math.sqrt(3.0)
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class StarShift:
    """The star-point displacement implied by three phase-voltage magnitudes."""

    displacement_v: float  # |D|
    line_v: float  # L, side of the implied line-to-line triangle
    u0_pct: float  # |D| / (L/√3) * 100
    angles_deg: tuple[float, float, float]  # θ12, θ23, θ31 from the law of cosines
    consistent: bool  # the magnitudes fit a shifted star point (K² ≥ 0)


def star_u0(a: float, b: float, c: float) -> tuple[float, float, float, bool]:
    """(|D|, L, u0 %, consistent) of :func:`star_shift` without the angles (cheaper)."""
    disp, line, u0, consistent, _ = _star(a, b, c)
    return disp, line, u0, consistent


def _star(a: float, b: float, c: float) -> tuple[float, float, float, bool, float]:
    a2, b2, c2 = a * a, b * b, c * c
    sq = a2 + b2 + c2
    quartic = a2 * a2 + b2 * b2 + c2 * c2
    k16 = sq * sq - 2.0 * quartic  # 16 K²
    consistent = k16 >= 0.0
    area = math.sqrt(max(k16, 0.0)) / 4.0
    line2 = sq / 2.0 + 2.0 * SQRT3 * area
    disp2 = max((sq - line2) / 3.0, 0.0)
    line = math.sqrt(line2)
    disp = math.sqrt(disp2)
    u0 = 100.0 * disp / (line / SQRT3) if line > 0 else 0.0
    return disp, line, u0, consistent, line2


def star_u0_rows(a: F64, b: F64, c: F64) -> tuple[F64, npt.NDArray[np.bool_]]:
    """(u0 %, consistent) of :func:`star_u0` for arrays of magnitudes (same arithmetic)."""
    a2, b2, c2 = a * a, b * b, c * c
    sq = a2 + b2 + c2
    k16 = sq * sq - 2.0 * (a2 * a2 + b2 * b2 + c2 * c2)
    with np.errstate(invalid="ignore", divide="ignore"):
        line2 = sq / 2.0 + 2.0 * SQRT3 * (np.sqrt(np.maximum(k16, 0.0)) / 4.0)
        disp = np.sqrt(np.maximum((sq - line2) / 3.0, 0.0))
        line = np.sqrt(line2)
        u0 = np.where(line > 0, 100.0 * disp / (line / SQRT3), 0.0)
    return u0, k16 >= 0.0


def star_shift(a: float, b: float, c: float) -> StarShift:
    """Displacement of the star point from |V1|, |V2|, |V3| (see the module text)."""
    disp, line, u0, consistent, line2 = _star(a, b, c)

    def angle(x: float, y: float) -> float:
        if x <= 0 or y <= 0:
            return float("nan")
        cos = (x * x + y * y - line2) / (2.0 * x * y)
        return math.degrees(math.acos(min(1.0, max(-1.0, cos))))

    return StarShift(disp, line, u0, (angle(a, b), angle(b, c), angle(c, a)), consistent)


def min_max_deviation(eps: float, steps: int = 3600) -> float:
    """Smallest possible largest relative phase deviation for a star shift ``eps``·V."""
    best = math.inf
    for k in range(steps + 1):
        psi = (math.pi / 3.0) * k / steps  # the pattern repeats every 60 degrees
        worst = 0.0
        for theta in (0.0, -2.0 * math.pi / 3.0, 2.0 * math.pi / 3.0):
            mag = math.sqrt(1.0 + eps * eps - 2.0 * eps * math.cos(theta - psi))
            worst = max(worst, abs(mag - 1.0))
        best = min(best, worst)
    return best


def score(u0_pct: float, low_pct: float = 4.0, high_pct: float = 10.0) -> float:
    """Broken-neutral score in [0, 1]: a ramp on the zero-sequence unbalance."""
    if not math.isfinite(u0_pct) or u0_pct <= low_pct:
        return 0.0
    if u0_pct >= high_pct:
        return 1.0
    return (u0_pct - low_pct) / (high_pct - low_pct)


def score_rows(u0_pct: F64, low_pct: float, high_pct: float) -> F64:
    """:func:`score` of an array of u0 values."""
    with np.errstate(invalid="ignore"):
        ramp = np.where(u0_pct >= high_pct, 1.0, (u0_pct - low_pct) / (high_pct - low_pct))
        return np.where(~np.isfinite(u0_pct) | (u0_pct <= low_pct), 0.0, ramp)


def star_point(a: float, b: float, c: float) -> tuple[complex, tuple[complex, complex, complex]]:
    """The star point D and the supply phasors E1..E3 from three magnitudes.

    Frame: E_k = (L/√3)·exp(−j·120°·(k−1)) (positive sequence L1, L2, L3). The
    star point is found by trilateration: ``|E_k − D| = a_k`` gives two linear
    equations ``Re(conj(E1 − Ek)·D) = (a_k² − a1²)/2``. Returns (D, (E1, E2, E3));
    the measured phase voltages are then ``E_k − D`` (angles included).
    """
    shift = star_shift(a, b, c)
    r = shift.line_v / SQRT3
    rot = complex(-0.5, -SQRT3 / 2)  # exp(-j 120°)
    e = (complex(r, 0.0), r * rot, r * rot * rot)
    mags = (a, b, c)
    rows = []
    rhs = []
    for k in (1, 2):
        d = e[0] - e[k]
        rows.append((d.real, d.imag))
        rhs.append((mags[k] ** 2 - mags[0] ** 2) / 2.0)
    det = rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0]
    if abs(det) < 1e-12:
        return 0j, e
    x = (rhs[0] * rows[1][1] - rows[0][1] * rhs[1]) / det
    y = (rows[0][0] * rhs[1] - rhs[0] * rows[1][0]) / det
    return complex(x, y), e


def current_sum_ratio(
    volts: tuple[float, float, float],
    amps: tuple[float, float, float],
    pfs: tuple[float, float, float],
) -> float:
    """|ΣI| / Σ|I| of the phase currents rebuilt from magnitudes.

    Voltage angles come from :func:`star_point`; each current lags its voltage by
    ``acos(|PF|)`` (the lead/lag sign is unknown: lagging is assumed, which
    matters little at the PFs where it matters at all).
    """
    d, e = star_point(*volts)
    total = 0j
    size = 0.0
    for k in range(3):
        v = e[k] - d
        ang = math.atan2(v.imag, v.real) - math.acos(min(1.0, abs(pfs[k])))
        total += amps[k] * complex(math.cos(ang), math.sin(ang))
        size += amps[k]
    return abs(total) / size if size > 0 else 0.0


def consistency(u0_pct: float, current_ratio: float) -> float:
    """How well a zero-sequence shift fits a floating neutral, in [0, 1].

    With a floating neutral no current returns: the phase currents sum to zero
    (Millman), whatever the loads. With an intact neutral and a supply-side
    zero-sequence shift (a one-phase sag), the currents follow the voltages:
    for balanced constant-impedance (or constant-power) loads ``|ΣI|/Σ|I| = u0``
    exactly, and unequal loads only add to ``ΣI``. So ``k = ratio / u0`` is ~0
    for a broken neutral and ≥ ~1 for an intact one; the factor falls linearly
    from 1 at ``k = 0.1`` (meter resolution, PF sign unknown) to 0 at ``k = 1``.
    """
    if u0_pct <= 0:
        return 1.0
    k = current_ratio / (u0_pct / 100.0)
    return min(1.0, max(0.0, (1.0 - k) / 0.9))


def consistency_rows(u0_pct: F64, current_ratio: F64) -> F64:
    """:func:`consistency` of arrays (NaN in, NaN out)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        k = current_ratio / (u0_pct / 100.0)
        fit = np.minimum(1.0, np.maximum(0.0, (1.0 - k) / 0.9))
    return np.where(u0_pct <= 0, 1.0, fit)
