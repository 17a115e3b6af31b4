"""Waveform analysis against values derived analytically (IEEE 1459)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.analytics import dsp, neutral
from shared.messages import LoadKind

FS = 12800.0
SQ2 = math.sqrt(2.0)
A = np.exp(2j * np.pi / 3)


def rel(x: float, y: float) -> float:
    return abs(x / y - 1.0)


def tone(f: float, parts: dict[int, tuple[float, float]], n: int) -> np.ndarray:
    """Sum of harmonics ``{h: (rms, phase_rad)}`` (sine reference) sampled at FS."""
    t = np.arange(n) / FS
    return sum(SQ2 * r * np.sin(2 * np.pi * h * f * t + ph) for h, (r, ph) in parts.items())


def one(v: np.ndarray, i: np.ndarray, f_nom: float = 50.0) -> dsp.Analysis:
    return dsp.analyze(v[None, None], i[None, None], FS, f_nom)


def window(f_nom: float) -> int:
    return round(FS * (10 if f_nom == 50 else 12) / f_nom)


@pytest.mark.parametrize("f", [50.0, 49.8, 50.3, 47.5])
@pytest.mark.parametrize(
    ("phi_deg", "kind", "quad"),
    [(0.0, LoadKind.RESISTIVE, 1), (36.87, LoadKind.INDUCTIVE, 1), (-25.0, LoadKind.CAPACITIVE, 4)],
)
def test_sinusoidal_loads(f: float, phi_deg: float, kind: LoadKind, quad: int) -> None:
    vr, ir = 230.0, 12.5
    phi = math.radians(phi_deg)  # current lags by phi (phi < 0: leads)
    n = window(50.0)
    a = one(tone(f, {1: (vr, 0.3)}, n), tone(f, {1: (ir, 0.3 - phi)}, n))
    assert rel(a.frequency[0], f) < 1e-5
    assert rel(a.vrms[0, 0], vr) < 1e-3 and rel(a.irms[0, 0], ir) < 1e-3
    assert rel(a.p[0, 0], vr * ir * math.cos(phi)) < 1e-3
    assert rel(a.s[0, 0], vr * ir) < 1e-3
    assert rel(a.pf[0, 0], math.cos(phi)) < 1e-3
    assert rel(a.dpf[0, 0], math.cos(phi)) < 1e-3
    assert abs(a.q1[0, 0] - vr * ir * math.sin(phi)) < 1e-3 * vr * ir
    assert a.thd_v[0, 0] < 0.05 and a.thd_i[0, 0] < 0.05
    assert a.load(0, 0) == kind and a.quadrant(0, 0) == quad


@pytest.mark.parametrize(("f", "f_nom"), [(50.0, 50), (49.8, 50), (50.4, 50), (59.7, 60)])
def test_harmonic_rich_current_and_voltage(f: float, f_nom: int) -> None:
    n = window(float(f_nom))
    vh = {1: (230.0, 0.0), 3: (2.3 * 2, 0.4), 5: (230 * 0.03, 1.0), 7: (230 * 0.02, -0.5)}
    ih = {1: (20.0, -0.5), 3: (6.0, 0.2), 5: (4.0, 2.0), 7: (2.0, 0.1), 11: (1.0, 0.0)}
    a = one(tone(f, vh, n), tone(f, ih, n), float(f_nom))
    vrms = math.sqrt(sum(r * r for r, _ in vh.values()))
    irms = math.sqrt(sum(r * r for r, _ in ih.values()))
    # P = sum over common harmonics of Vh Ih cos(theta_vh - theta_ih)
    p = sum(vh[h][0] * ih[h][0] * math.cos(vh[h][1] - ih[h][1]) for h in vh if h in ih)
    phi1 = vh[1][1] - ih[1][1]
    thd_v = 100 * math.sqrt(sum(r * r for h, (r, _) in vh.items() if h > 1)) / vh[1][0]
    thd_i = 100 * math.sqrt(sum(r * r for h, (r, _) in ih.items() if h > 1)) / ih[1][0]
    assert rel(a.vrms[0, 0], vrms) < 1e-3 and rel(a.irms[0, 0], irms) < 1e-3
    assert rel(a.p[0, 0], p) < 1e-3
    assert rel(a.pf[0, 0], p / (vrms * irms)) < 1e-3
    assert rel(a.dpf[0, 0], math.cos(phi1)) < 1e-3
    assert rel(a.q1[0, 0], vh[1][0] * ih[1][0] * math.sin(phi1)) < 1e-3
    assert rel(a.n[0, 0], math.sqrt((vrms * irms) ** 2 - p * p)) < 1e-3
    assert rel(a.thd_v[0, 0], thd_v) < 0.01 and rel(a.thd_i[0, 0], thd_i) < 0.01
    # individual harmonics: 0.5 % of reading, spurious orders below 2e-4 of I1
    # (IEC 61000-4-7 class I allows 5 % of reading)
    for h, (r, _) in ih.items():
        assert rel(a.harm_i[0, 0, h - 1], r) < 5e-3
    assert a.harm_i[0, 0, 1] < 2e-4 * ih[1][0]  # no 2nd harmonic


def _phase_cut(alpha: float, f: float, vr: float, r_ohm: float, n: int) -> np.ndarray:
    """Triac-controlled resistive current: conducts from alpha to pi in each half cycle."""
    t = np.arange(n) / FS
    theta = np.mod(2 * np.pi * f * t, np.pi)
    i = SQ2 * vr / r_ohm * np.sin(2 * np.pi * f * t)
    return np.where(theta > alpha, i, 0.0)


def test_phase_cut_current_pf_differs_from_dpf() -> None:
    # firing at 90.7 degrees: the step falls exactly halfway between two samples,
    # so each sample stands for its own dt and the rectangle rule stays exact
    f, vr, r_ohm, alpha = 50.0, 230.0, 23.0, math.pi * 64.5 / 128
    n = window(50.0)
    v = tone(f, {1: (vr, 0.0)}, n)
    i = _phase_cut(alpha, f, vr, r_ohm, n)
    a = one(v, i)
    ip = SQ2 * vr / r_ohm
    irms = ip * math.sqrt((math.pi - alpha + math.sin(2 * alpha) / 2) / (2 * math.pi))
    p = vr**2 / r_ohm * (math.pi - alpha + math.sin(2 * alpha) / 2) / math.pi
    b1 = ip / math.pi * (math.pi - alpha + math.sin(2 * alpha) / 2)
    a1 = -ip / math.pi * math.sin(alpha) ** 2
    dpf = b1 / math.hypot(a1, b1)
    q1 = vr * (-a1) / SQ2

    # odd harmonics h >= 3 of the chopped sine (closed-form Fourier integrals)
    def coeff(h: int) -> float:
        def s_int(x: float) -> float:
            return math.sin((h - 1) * x) / (2 * (h - 1)) - math.sin((h + 1) * x) / (2 * (h + 1))

        def c_int(x: float) -> float:
            return -math.cos((h + 1) * x) / (2 * (h + 1)) + math.cos((h - 1) * x) / (2 * (h - 1))

        bh = 2 * ip / math.pi * (s_int(math.pi) - s_int(alpha))
        ah = 2 * ip / math.pi * (c_int(math.pi) - c_int(alpha))
        return math.hypot(ah, bh) / SQ2

    harm = {h: coeff(h) for h in range(3, 51, 2)}
    thd_i = 100 * math.sqrt(sum(x * x for x in harm.values())) / (math.hypot(a1, b1) / SQ2)
    assert rel(a.irms[0, 0], irms) < 1e-3
    assert rel(a.p[0, 0], p) < 1e-3
    assert rel(a.pf[0, 0], p / (vr * irms)) < 1e-3
    assert rel(a.dpf[0, 0], dpf) < 1e-3
    assert rel(a.q1[0, 0], q1) < 1e-3
    assert rel(a.thd_i[0, 0], thd_i) < 0.01
    assert rel(a.harm_i[0, 0, 2], harm[3]) < 1e-3
    # PF != DPF, and Vrms*Irms*cos(phi1) is the wrong active power here
    assert a.pf[0, 0] < a.dpf[0, 0] - 0.1
    assert rel(vr * irms * dpf, p) > 0.1
    assert a.load(0, 0) == LoadKind.INDUCTIVE  # a phase-cut current lags


def test_sixty_hertz_fractional_samples_per_cycle() -> None:
    f = 60.0  # 213.33 samples per cycle at 12.8 kHz
    n = window(60.0)
    a = one(tone(f, {1: (120.0, 0.0), 5: (3.6, 0.0)}, n), tone(f, {1: (8.0, -0.6)}, n), 60.0)
    assert rel(a.frequency[0], 60.0) < 1e-5
    assert a.cycles[0] == 12
    assert rel(a.vrms[0, 0], math.hypot(120.0, 3.6)) < 1e-3
    assert rel(a.p[0, 0], 120 * 8 * math.cos(0.6)) < 1e-3
    assert rel(a.thd_v[0, 0], 3.0) < 0.01


def test_reversed_ct_on_inductive_load() -> None:
    n = window(50.0)
    phi = math.acos(0.8)
    a = one(tone(50.0, {1: (230.0, 0.0)}, n), -tone(50.0, {1: (10.0, -phi)}, n))
    assert rel(a.p[0, 0], -2300 * 0.8) < 1e-3 and a.p[0, 0] < 0
    assert rel(a.pf[0, 0], -0.8) < 1e-3
    assert a.q1[0, 0] < 0 and a.quadrant(0, 0) == 3
    assert a.load(0, 0) == LoadKind.INDUCTIVE  # sign of P*Q: still a lagging load


def _three_phase(
    ev: list[complex], iv: list[complex], f: float = 50.0, i_n: bool = False
) -> dsp.Analysis:
    n = window(50.0)
    t = np.arange(n) / FS
    w = 2 * np.pi * f * t

    def sig(ph: complex) -> np.ndarray:
        return SQ2 * abs(ph) * np.sin(w + np.angle(ph))

    v = np.stack([sig(x) for x in ev])
    i = np.stack([sig(x) for x in iv])
    neutral_i = i.sum(axis=0) if i_n else None
    return dsp.analyze(v[None], i[None], FS, 50.0, neutral_i[None] if i_n else None)


def test_unbalanced_supply_sequences_nema_and_effective_power() -> None:
    v1, v2 = 230.0, 230 * 0.03 * np.exp(0.7j)
    ev = [v1 + v2, A**2 * v1 + A * v2, A * v1 + A**2 * v2]
    z = [10 * np.exp(0.5j), 12 * np.exp(0.3j), 8 * np.exp(0.0j)]  # star loads, neutral intact
    iv = [e / zz for e, zz in zip(ev, z, strict=True)]
    a = _three_phase(ev, iv, f=49.8, i_n=True)
    tot = a.totals()
    assert rel(float(tot["u2"][0]), 3.0) < 1e-3
    assert float(tot["u0"][0]) < 1e-3
    vll = [abs(ev[k] - ev[(k + 1) % 3]) for k in range(3)]
    mean = sum(vll) / 3
    assert rel(float(tot["nema"][0]), 100 * max(abs(x - mean) for x in vll) / mean) < 1e-3
    in_rms = abs(sum(iv))
    ie = math.sqrt((sum(abs(x) ** 2 for x in iv) + in_rms**2) / 3)
    ve = math.sqrt((3 * sum(abs(x) ** 2 for x in ev) + sum(x * x for x in vll)) / 18)
    p = sum((e * np.conj(c)).real for e, c in zip(ev, iv, strict=True))
    assert rel(float(a.in_rms[0]), in_rms) < 1e-3
    assert rel(float(tot["se"][0]), 3 * ve * ie) < 1e-3
    assert rel(float(tot["pf_e"][0]), p / (3 * ve * ie)) < 1e-3
    assert rel(float(tot["p"][0]), p) < 1e-3
    assert float(tot["pf_e"][0]) < float(tot["pf"][0])  # Se >= arithmetic S
    assert neutral.score(float(tot["u0"][0])) == 0.0


def test_broken_neutral_unequal_star_loads() -> None:
    e = [230.0 * A**0, 230.0 * A**2, 230.0 * A]  # L1 0, L2 -120, L3 +120 degrees
    r = [5.0, 20.0, 40.0]  # unequal resistive star loads, neutral open
    y = [1 / x for x in r]
    vn = sum(ee * yy for ee, yy in zip(e, y, strict=True)) / sum(y)  # Millman
    vp = [ee - vn for ee in e]
    iv = [v / rr for v, rr in zip(vp, r, strict=True)]
    a = _three_phase(vp, iv)
    tot = a.totals()
    assert rel(float(tot["v0"][0]), abs(vn)) < 1e-3
    assert rel(float(tot["u0"][0]), 100 * abs(vn) / 230.0) < 1e-3
    assert float(tot["u2"][0]) < 1e-3  # the line triangle is untouched
    assert float(a.in_rms[0]) < 1e-6  # no neutral current
    assert neutral.score(float(tot["u0"][0])) == 1.0
    # magnitudes only: the closed form recovers the same displacement
    shift = neutral.star_shift(*(abs(x) for x in vp))
    assert rel(shift.displacement_v, abs(vn)) < 1e-9
    assert rel(shift.line_v, 230 * math.sqrt(3)) < 1e-9
    assert shift.consistent and abs(sum(shift.angles_deg) - 360.0) < 1e-6
    angle12 = math.degrees(abs(np.angle(vp[0] / vp[1])))
    assert abs(shift.angles_deg[0] - angle12) < 1e-6


def test_magnitude_only_ordinary_unbalance_scores_zero() -> None:
    for u2, ang in ((0.02, 0.3), (0.03, 2.0), (0.0, 0.0)):
        v1, v2 = 230.0, 230 * u2 * np.exp(1j * ang)
        ev = [v1 + v2, A**2 * v1 + A * v2, A * v1 + A**2 * v2]
        shift = neutral.star_shift(*(abs(x) for x in ev))
        assert neutral.score(shift.u0_pct) == 0.0, shift


def test_pre_check_bound_from_geometry() -> None:
    for eps in (0.01, 0.05, 0.1, 0.3):
        dmin = neutral.min_max_deviation(eps)
        # first order: sqrt(3)/2 * eps; never above eps (triangle inequality)
        assert abs(dmin / eps - math.sqrt(3) / 2) < eps
        assert dmin <= eps
        # brute force over shift directions agrees
        worst = []
        for psi in np.linspace(0, 2 * np.pi, 2001):
            mags = [abs(ph - eps * np.exp(1j * psi)) for ph in (1, A**2, A)]
            worst.append(max(abs(m - 1) for m in mags))
        assert abs(min(worst) - dmin) < 1e-4


def test_batch_equals_single_windows_and_rejects_short() -> None:
    n = window(50.0)
    rng = np.random.default_rng(1)
    v = np.stack([tone(f, {1: (230.0, 0.1), 5: (5.0, 0.0)}, n) for f in (49.9, 50.0, 50.2)])
    i = np.stack([tone(f, {1: (9.0, -0.4)}, n) for f in (49.9, 50.0, 50.2)])
    v = v + rng.normal(0, 0.01, v.shape)
    batch = dsp.analyze(v[:, None], i[:, None], FS)
    for k in range(3):
        single = one(v[k], i[k])
        assert rel(batch.p[k, 0], single.p[0, 0]) < 1e-12
    with pytest.raises(dsp.WaveformError):
        dsp.analyze(v[:1, None, :100], i[:1, None, :100], FS)


def test_hann_kernel_closed_form_matches_the_sum() -> None:
    n = 2560
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    for d in (0.0, 0.3, -0.5, 1.0, -1.0, 9.7, 20.02):
        direct = np.sum(w * np.exp(-2j * np.pi * d * np.arange(n) / n))
        assert abs(dsp._hann_kernel(np.array([d]), n)[0] - direct) < 1e-9 * n


def test_star_point_trilateration_and_floating_fit() -> None:
    e = [230.0, 230.0 * A**2, 230.0 * A]
    r = [5.0, 20.0, 40.0]
    vn = sum(ee / rr for ee, rr in zip(e, r, strict=True)) / sum(1 / x for x in r)
    mags = tuple(abs(ee - vn) for ee in e)
    d, sup = neutral.star_point(*mags)
    assert abs(d - vn) < 1e-9 * 230 and abs(sup[1] - e[1]) < 1e-9 * 230
    # floating neutral: the rebuilt currents sum to zero (Millman), fit = 1
    amps = tuple(m / rr for m, rr in zip(mags, r, strict=True))
    ratio = neutral.current_sum_ratio(mags, amps, (1.0, 1.0, 1.0))  # type: ignore[arg-type]
    assert ratio < 1e-9
    u0 = neutral.star_shift(*mags).u0_pct
    assert neutral.consistency(u0, ratio) == 1.0


def test_one_phase_supply_sag_with_intact_neutral_is_not_a_broken_neutral() -> None:
    # L1 sags to 70 %: u0 = u2 = 11.1 %, far past the score ramp; balanced 10-ohm
    # loads on an intact neutral draw currents that follow the voltages
    e = [0.7 * 230.0, 230.0 * A**2, 230.0 * A]
    iv = [x / 10.0 for x in e]
    a = _three_phase(e, iv)
    tot = a.totals()
    u0 = float(tot["u0"][0])
    # V0 = (0.7 - 1) * 230 / 3, V1 = (0.7 + 2) * 230 / 3
    assert u0 == pytest.approx(100 * 0.3 / 2.7, rel=1e-3)
    assert neutral.score(u0) == 1.0  # u0 alone would alarm
    ratio = float(abs(a.i1[0].sum()) / np.abs(a.i1[0]).sum())
    assert neutral.consistency(u0, ratio) < 0.05  # the currents say: neutral intact
    mags = tuple(abs(x) for x in e)
    amps = tuple(abs(x) for x in iv)
    ratio_m = neutral.current_sum_ratio(mags, amps, (1.0, 1.0, 1.0))  # type: ignore[arg-type]
    u0_m = neutral.star_shift(*mags).u0_pct
    assert neutral.consistency(u0_m, ratio_m) < 0.05
