"""Waveform analysis: IEEE 1459-2010 power quantities from sampled v and i.

Vectorised over a batch of windows and phases (numpy). For every window:

1. **Frequency tracking.** The fundamental frequency is estimated from ``v1`` by an
   interpolated DFT (Hann window, two-bin ratio interpolation; error ~1e-6 relative
   with harmonics present). The analysis then covers a whole number of cycles
   ``L = n·fs/f`` samples (``n`` = as many cycles as the window holds):
   time-domain quantities (RMS, P) integrate over exactly ``L`` samples (the last,
   partial sample gets weight ``frac(L)``); the DFT runs on ``round(L)`` samples so
   that harmonic ``h`` falls on bin ``h·n``. A fixed 200 ms window at 49.8 Hz would
   leak (P off by ~0.3 %, THD by ~3 %); tracked windows stay within 1e-4.
2. **Per phase** (IEEE 1459 single-phase non-sinusoidal): ``V``, ``I`` (RMS),
   ``P = mean(v·i)``, ``S = V·I``, fundamental phasors ``V1, I1`` (RMS, complex),
   ``P1 = Re(V1·I1*)``, ``Q1 = Im(V1·I1*)`` (> 0 inductive), ``N = sqrt(S² − P²)``,
   ``PF = P/S`` (sign of P), ``DPF = cos φ1 = P1/S1``, THD-F over orders 2..50.
3. **Three phase**: arithmetic totals, effective ``Ve``/``Ie``/``Se``/``PF_e``
   (IEEE 1459 four-wire, neutral current measured or ``i1+i2+i3``), symmetrical
   components of the fundamental voltages (``u2 = |V2|/|V1|``, ``u0 = |V0|/|V1|``),
   NEMA unbalance of the line-to-line RMS voltages.

Load and quadrant follow DESIGN.md: quadrant from the signs of P and Q1; lead/lag
from the sign of ``P·Q1`` (a reversed CT on an inductive load is still inductive).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from shared.measurements import Measurement as M
from shared.messages import LoadKind

F64 = npt.NDArray[np.float64]
C128 = npt.NDArray[np.complex128]

MAX_ORDER = 50
#: |Q1| below this fraction of S1 counts as resistive (about 1.1 degrees)
RESISTIVE_Q_FRACTION = 0.02
_A = np.exp(2j * np.pi / 3)


class WaveformError(ValueError):
    """The window cannot be analysed (too short, no fundamental, bad shape)."""


@dataclass(slots=True)
class Analysis:
    """Results for a batch of B windows with P phases (arrays indexed [window, phase])."""

    frequency: F64  # (B,)
    cycles: npt.NDArray[np.int64]  # (B,) whole cycles analysed
    vrms: F64
    irms: F64
    p: F64
    s: F64
    q1: F64
    p1: F64
    s1: F64
    n: F64
    pf: F64
    dpf: F64
    thd_v: F64  # percent
    thd_i: F64
    harm_v: F64  # (B, P, 50) RMS of orders 1..50
    harm_i: F64
    v1: C128  # (B, P) fundamental phasors, RMS
    i1: C128
    vll: F64  # (B, 3) RMS of v1-v2, v2-v3, v3-v1 (three phase only, else empty)
    in_rms: F64  # (B,) neutral current RMS (three phase only)

    @property
    def phases(self) -> int:
        return int(self.vrms.shape[1])

    # --- three-phase ---------------------------------------------------------
    def totals(self) -> dict[str, F64]:
        p = self.p.sum(axis=1)
        s = self.s.sum(axis=1)
        q1 = self.q1.sum(axis=1)
        out = {"p": p, "s": s, "q1": q1, "pf": _div(p, s)}
        if self.phases == 3:
            ie = np.sqrt(((self.irms**2).sum(axis=1) + self.in_rms**2) / 3.0)
            ve = np.sqrt((3.0 * (self.vrms**2).sum(axis=1) + (self.vll**2).sum(axis=1)) / 18.0)
            se = 3.0 * ve * ie
            out.update(ve=ve, ie=ie, se=se, pf_e=_div(p, se))
            seq = self.sequences()
            out.update(
                u2=100.0 * _div(np.abs(seq[:, 2]), np.abs(seq[:, 1])),
                u0=100.0 * _div(np.abs(seq[:, 0]), np.abs(seq[:, 1])),
                v0=np.abs(seq[:, 0]),
                nema=nema_unbalance(self.vll),
            )
        return out

    def sequences(self) -> C128:
        """Zero, positive, negative sequence fundamental voltage phasors (B, 3)."""
        va, vb, vc = self.v1[:, 0], self.v1[:, 1], self.v1[:, 2]
        v0 = (va + vb + vc) / 3.0
        v1 = (va + _A * vb + _A**2 * vc) / 3.0
        v2 = (va + _A**2 * vb + _A * vc) / 3.0
        return np.stack([v0, v1, v2], axis=1)

    def quadrant(self, k: int, ph: int | None = None) -> Literal[1, 2, 3, 4]:
        p = float(self.p[k].sum() if ph is None else self.p[k, ph])
        q = float(self.q1[k].sum() if ph is None else self.q1[k, ph])
        s1 = float(self.s1[k].sum() if ph is None else self.s1[k, ph])
        return quadrant(p, q, 1e-9 * s1)

    def load(self, k: int, ph: int | None = None) -> LoadKind:
        if ph is None:
            p, q, s1 = self.p[k].sum(), self.q1[k].sum(), self.s1[k].sum()
        else:
            p, q, s1 = self.p[k, ph], self.q1[k, ph], self.s1[k, ph]
        return load_kind(float(p), float(q), float(s1))


def quadrant(p: float, q: float, tol: float = 0.0) -> Literal[1, 2, 3, 4]:
    """IEC quadrant: 1 import+inductive, 2 export+Q>0, 3 export+Q<0, 4 import+capacitive.

    ``|q| <= tol`` counts as Q = 0 (numerical noise on a resistive load).
    """
    if abs(q) <= tol:
        q = 0.0
    if p >= 0:
        return 1 if q >= 0 else 4
    return 2 if q >= 0 else 3


def load_kind(p: float, q: float, s1: float) -> LoadKind:
    if s1 <= 0 or abs(q) <= RESISTIVE_Q_FRACTION * s1:
        return LoadKind.RESISTIVE
    return LoadKind.INDUCTIVE if p * q > 0 or (p == 0 and q > 0) else LoadKind.CAPACITIVE


def nema_unbalance(vll: F64) -> F64:
    """NEMA MG-1: max deviation from the mean of the line voltages, percent of the mean."""
    mean = vll.mean(axis=-1)
    dev = np.abs(vll - mean[..., None]).max(axis=-1)
    return 100.0 * _div(dev, mean)


def _div(a: F64, b: F64) -> F64:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)


def estimate_frequency(x: F64, fs: float, f_nominal: float) -> F64:
    """Fundamental frequency of each row of ``x`` (B, N): Hann-interpolated DFT peak.

    The peak is searched between 0.7 and 1.3 times nominal, so a strong harmonic
    never wins. Error is ~1e-6 relative for 10 cycles with a few % of harmonics.
    """
    x = np.asarray(x, dtype=np.float64)
    return _peak_frequency(
        np.fft.rfft(x - x.mean(axis=-1, keepdims=True), axis=-1), x.shape[-1], fs, f_nominal
    )


@functools.lru_cache(maxsize=32)
def _hann(n: int) -> F64:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def _hann_kernel(d: F64, n: int) -> C128:
    """DFT of the periodic Hann window at a distance of ``d`` bins (closed form).

    ``W(d) = 0.5 G(d) - 0.25 G(d-1) - 0.25 G(d+1)`` with the Dirichlet kernel
    ``G(x) = exp(-j pi x (n-1)/n) sin(pi x) / sin(pi x / n)``; one complex
    exponential and three sines per point (G(0) = n).
    """
    d = np.asarray(d, dtype=np.float64)
    common = np.exp(-1j * np.pi * d * (n - 1) / n) * np.sin(np.pi * d)
    rot = np.exp(1j * np.pi * (n - 1) / n)

    def ratio(shift: float) -> F64:
        den = np.sin(np.pi * (d + shift) / n)
        tiny = np.abs(den) < 1e-12
        return np.asarray(np.where(tiny, 0.0, 1.0 / np.where(tiny, 1.0, den)))

    g0 = np.where(np.abs(d) < 1e-12, complex(n), common * ratio(0.0))
    gm = -common * rot * ratio(-1.0)
    gp = -common * np.conj(rot) * ratio(1.0)
    gm = np.where(np.abs(d - 1.0) < 1e-12, complex(n), gm)
    gp = np.where(np.abs(d + 1.0) < 1e-12, complex(n), gp)
    return np.asarray(0.5 * g0 - 0.25 * gm - 0.25 * gp)


def whole_cycles(n: int, fs: float, f: F64) -> npt.NDArray[np.int64]:
    cycles = np.floor(n * f / fs + 1e-9).astype(np.int64)
    if np.any(cycles < 1):
        raise WaveformError(f"fewer than one cycle in {n} samples at {fs:g} Hz")
    return cycles


def analyze(
    v: F64,
    i: F64,
    fs: float,
    f_nominal: float = 50.0,
    i_n: F64 | None = None,
    *,
    frequency: F64 | None = None,
) -> Analysis:
    """Analyse a batch: ``v``, ``i`` of shape (B, P, N) (or (P, N) for one window).

    ``i_n`` (B, N) is the measured neutral current (three phase); without it the
    neutral current is ``i1 + i2 + i3`` (zero in a three-wire system).
    ``frequency`` (B,) skips the estimate (tests, or a meter that reports it).
    """
    v = np.asarray(v, dtype=np.float64)
    i = np.asarray(i, dtype=np.float64)
    if v.ndim == 2:
        v, i = v[None], i[None]
        if i_n is not None:
            i_n = np.asarray(i_n, dtype=np.float64)[None]
    if v.shape != i.shape or v.ndim != 3:
        raise WaveformError(f"voltage {v.shape} and current {i.shape} shapes differ")
    nph = v.shape[1]
    if nph not in (1, 3):
        raise WaveformError(f"expected 1 or 3 phases, got {nph}")
    parts = [v, i]
    if nph == 3 and i_n is not None:
        parts.append(np.asarray(i_n, dtype=np.float64)[:, None, :])
    x = np.concatenate(parts, axis=1)  # (B, C, N): v..., i..., [in]
    return analyze_stacked(x, nph, fs, f_nominal, i_n is not None, frequency=frequency)


def _peak_frequency(spec: C128, n: int, fs: float, f_nominal: float) -> F64:
    """Hann-interpolated peak of an (unwindowed) rfft row set, between 0.7 and 1.3 f_nom."""
    lo = max(2, int(np.floor(0.7 * f_nominal * n / fs)))
    hi = min(n // 2 - 2, int(np.ceil(1.3 * f_nominal * n / fs)) + 1)
    if hi <= lo:
        raise WaveformError(f"window of {n} samples at {fs:g} Hz is shorter than two cycles")
    band = spec[:, lo - 2 : hi + 2]
    mag = np.abs(0.5 * band[:, 1:-1] - 0.25 * (band[:, :-2] + band[:, 2:]))  # bins lo-1..hi
    k = np.argmax(mag[:, 1:-1], axis=-1) + 1
    rows = np.arange(spec.shape[0])
    xm, x0, xp = mag[rows, k - 1], mag[rows, k], mag[rows, k + 1]
    if np.any(x0 <= 0):
        raise WaveformError("no fundamental in the voltage (v1 is zero)")
    up = xp > xm
    a = np.where(up, xp, xm) / x0
    d = (2.0 * a - 1.0) / (a + 1.0)
    d = np.clip(np.where(up, d, -d), -1.0, 1.0)
    return np.asarray((k + lo - 1 + d) * fs / n, dtype=np.float64)


def analyze_stacked(
    x: F64,
    nph: int,
    fs: float,
    f_nominal: float = 50.0,
    has_neutral: bool = False,
    *,
    frequency: F64 | None = None,
) -> Analysis:
    """The core on one stacked array ``x`` (B, C, N): ``v1..vP, i1..iP[, in]``."""
    b, _, n = x.shape
    need = math.ceil(2 * fs / f_nominal)
    if n < need:
        raise WaveformError(
            f"window of {n} samples at {fs:g} Hz holds fewer than two cycles at "
            f"{f_nominal:g} Hz (need at least {need} samples)"
        )
    chans = 2 * nph
    spec = np.fft.rfft(x[:, :chans], axis=-1)
    if frequency is None:
        f = _peak_frequency(spec[:, 0], n, fs, f_nominal)
    else:
        f = np.broadcast_to(np.asarray(frequency, dtype=np.float64), (b,)).copy()
    cycles = whole_cycles(n, fs, f)
    length = cycles * (fs / f)
    whole = np.minimum(np.floor(length).astype(np.int64), n - 1)
    frac = length - whole

    # -- time domain over exactly L samples: Gram matrix of every channel pair --
    gram = np.empty((b, x.shape[1], x.shape[1]))
    for lw in np.unique(whole):
        sel = np.flatnonzero(whole == lw)
        xs = x if len(sel) == b else x[sel]
        head = xs[..., :lw]
        gram[sel] = np.matmul(head, head.transpose(0, 2, 1))
        tail = xs[..., lw]
        gram[sel] += frac[sel, None, None] * tail[:, :, None] * tail[:, None, :]
    gram /= length[:, None, None]
    ci = np.arange(nph)
    vrms = np.sqrt(np.maximum(gram[:, ci, ci], 0.0))
    irms = np.sqrt(np.maximum(gram[:, nph + ci, nph + ci], 0.0))
    p = gram[:, ci, nph + ci]
    if nph == 3:
        nxt = (ci + 1) % 3
        vll = np.sqrt(np.maximum(gram[:, ci, ci] + gram[:, nxt, nxt] - 2 * gram[:, ci, nxt], 0.0))
        if has_neutral:
            in_rms = np.sqrt(np.maximum(gram[:, 6, 6], 0.0))
        else:
            in_rms = np.sqrt(np.maximum(gram[:, 3:6, 3:6].sum(axis=(1, 2)), 0.0))
    else:
        vll = np.zeros((b, 0))
        in_rms = np.zeros(b)

    # -- frequency domain: one FFT of the Hann-windowed window per channel --------
    # Order h sits at the fractional bin kappa_h = h*f*N/fs; its complex amplitude
    # is read from the nearest bin through the closed-form Hann kernel W(d). The
    # fundamental is corrected for its negative-frequency image, and its known
    # contribution is removed from every harmonic bin. Hann sidelobes fall as
    # 1/d^3: a component leaks < 1e-3 of itself into a bin 10 away.
    # (the Hann window is applied in the frequency domain: 0.5 X[k] - 0.25 X[k+-1])
    kappa1 = f * n / fs  # (B,)
    k1 = np.rint(kappa1).astype(np.int64)
    rows = np.arange(b)[:, None]
    cidx = np.arange(chans)[None, :]

    def hann_at(
        r: npt.NDArray[np.int64], c: npt.NDArray[np.int64], k: npt.NDArray[np.int64]
    ) -> C128:
        return np.asarray(0.5 * spec[r, c, k] - 0.25 * (spec[r, c, k - 1] + spec[r, c, k + 1]))

    x1 = hann_at(rows, cidx, k1[:, None])  # (B, C)
    w_main = _hann_kernel(k1 - kappa1, n)[:, None]
    w_image = _hann_kernel(k1 + kappa1, n)[:, None]
    half = x1 / w_main  # Z/2, first pass
    half = (x1 - np.conj(half) * w_image) / w_main  # image removed
    phasor = np.sqrt(2.0) * half  # RMS phasor (cos reference)
    v1, i1 = phasor[:, :nph], phasor[:, nph:]
    harm = np.zeros((b, chans, MAX_ORDER))
    harm[:, :, 0] = np.abs(phasor)
    top = min(MAX_ORDER, int((n / 2 - 2) // float(kappa1.max())))
    if top >= 2:
        h = np.arange(2, top + 1)
        kap = kappa1[:, None] * h[None, :]  # (B, H)
        near = np.rint(kap).astype(np.int64)
        w_h = _hann_kernel(near - kap, n)[:, None, :]
        pick = hann_at(rows[:, :, None], cidx[:, :, None], near[:, None, :])
        # the fundamental's leakage matters only in the nearest orders (Hann)
        lo = near[:, :3]
        w_pos = _hann_kernel(lo - kappa1[:, None], n)[:, None, :]
        w_neg = _hann_kernel(lo + kappa1[:, None], n)[:, None, :]
        pick[..., :3] -= half[..., None] * w_pos + np.conj(half[..., None]) * w_neg
        harm[:, :, 1:top] = np.sqrt(2.0) * np.abs(pick / w_h)
    harm_v, harm_i = harm[:, :nph], harm[:, nph:]

    vi = v1 * np.conj(i1)
    p1 = vi.real
    q1 = vi.imag
    s1 = np.abs(vi)
    s = vrms * irms
    nonactive = np.sqrt(np.maximum(s * s - p * p, 0.0))
    pf = _div(p, s)
    dpf = _div(p1, s1)
    thd_v = 100.0 * _div(np.sqrt((harm_v[..., 1:] ** 2).sum(axis=-1)), harm_v[..., 0])
    thd_i = 100.0 * _div(np.sqrt((harm_i[..., 1:] ** 2).sum(axis=-1)), harm_i[..., 0])
    return Analysis(
        frequency=f,
        cycles=cycles,
        vrms=vrms,
        irms=irms,
        p=p,
        s=s,
        q1=q1,
        p1=p1,
        s1=s1,
        n=nonactive,
        pf=pf,
        dpf=dpf,
        thd_v=thd_v,
        thd_i=thd_i,
        harm_v=harm_v,
        harm_i=harm_i,
        v1=v1.astype(np.complex128),
        i1=i1.astype(np.complex128),
        vll=vll,
        in_rms=in_rms,
    )


def window_values(a: Analysis, k: int = 0) -> dict[M, float]:
    """The Measurement-keyed values of window ``k`` (what a Metrics message carries)."""
    out: dict[M, float] = {}
    for ph in range(a.phases):
        n = ph + 1
        out[M.per_phase("voltage", n)] = float(a.vrms[k, ph])
        out[M.per_phase("current", n)] = float(a.irms[k, ph])
        out[M.per_phase("power", n)] = float(a.p[k, ph])
        out[M.per_phase("apparent_power", n)] = float(a.s[k, ph])
        out[M.per_phase("fund_reactive_power", n)] = float(a.q1[k, ph])
        # IEEE 1459 defines no total Q under distortion: the signed reactive power
        # published for waveforms is Q1 (N = sqrt(S^2 - P^2) carries the rest)
        out[M.per_phase("reactive_power", n)] = float(a.q1[k, ph])
        out[M.per_phase("nonactive_power", n)] = float(a.n[k, ph])
        out[M.per_phase("power_factor", n)] = float(a.pf[k, ph])
        out[M.per_phase("displacement_pf", n)] = float(a.dpf[k, ph])
        out[M.per_phase("thd_voltage", n)] = float(a.thd_v[k, ph])
        out[M.per_phase("thd_current", n)] = float(a.thd_i[k, ph])
        out[M.per_phase("frequency", n)] = float(a.frequency[k])
    tot = a.totals()
    out[M.POWER] = float(tot["p"][k])
    out[M.APPARENT_POWER] = float(tot["s"][k])
    out[M.FUND_REACTIVE_POWER] = float(tot["q1"][k])
    out[M.REACTIVE_POWER] = float(tot["q1"][k])
    out[M.POWER_FACTOR] = float(tot["pf"][k])
    out[M.FREQUENCY] = float(a.frequency[k])
    if a.phases == 3:
        out[M.EFFECTIVE_APPARENT_POWER] = float(tot["se"][k])
        out[M.EFFECTIVE_PF] = float(tot["pf_e"][k])
        out[M.NEUTRAL_CURRENT] = float(a.in_rms[k])
        out[M.VOLTAGE_UNBALANCE] = float(tot["u2"][k])
        out[M.ZERO_SEQ_UNBALANCE] = float(tot["u0"][k])
        out[M.NEMA_UNBALANCE] = float(tot["nema"][k])
        out[M.VOLTAGE_L1_L2] = float(a.vll[k, 0])
        out[M.VOLTAGE_L2_L3] = float(a.vll[k, 1])
        out[M.VOLTAGE_L3_L1] = float(a.vll[k, 2])
    return out
