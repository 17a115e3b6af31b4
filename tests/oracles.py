"""Oracles: the plain, one-meter definitions the production engine is held to.

The analytics service runs the site-wide batched engine (``services/analytics/batch.py``:
numpy over many meters at once). These are the readable scalar definitions of the same
arithmetic, kept here because only the tests use them: moving averages and clock-aligned
blocks for one meter (``MovingAverages``, ``BlockAggregate``), the register-level
derivation of one reading (``derive``), and the engine fed one input at a time
(``MeterEngine``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from services.analytics import neutral
from services.analytics.batch import SiteEngine
from services.analytics.output import Output
from services.analytics.registers import _I, _LL, _N, _P, _PF, _Q, _S, _V, SQRT3
from shared.measurements import Measurement as M
from shared.messages import LoadKind, Reading, Waveform
from shared.site import SiteConfig

F64 = npt.NDArray[np.float64]
PHASE_NAMES = ("L1", "L2", "L3")


# -- one meter's moving averages and blocks ----------------------------------------------


class MovingAverages:
    """Time-based moving averages of K quantities over several slots (seconds).

    Samples fall into buckets of ``bucket_s`` (default: the shortest slot / 10);
    the average of a slot covers the buckets of the last ``slot`` seconds, so its
    edge is exact to one bucket. A quantity missing from a sample (NaN) is left
    out of that quantity's average (per-column counts).

    Implementation: running (cumulative) sums and counts of everything added,
    plus a ring holding their value at the start of each of the last buckets.
    A slot's sum is the running sum minus the ring entry where the slot starts:
    a sample costs two vector additions, and moving to a new bucket one row copy,
    whatever the number of slots. The running sums are re-based now and then
    (subtracted from the ring), so they never grow with run time.
    """

    def __init__(self, slots_s: Iterable[float], width: int, bucket_s: float | None = None):
        self.slots = sorted(float(s) for s in slots_s)
        self.bucket_s = bucket_s or self.slots[0] / 10.0
        self.spans = [max(1, round(s / self.bucket_s)) for s in self.slots]
        self.size = max(self.spans) + 1
        self._ones = np.ones(width)
        self._spans = np.array(self.spans)
        self.width = width
        #: running sums and counts at the start of bucket b, at row b % size
        self.sums = np.zeros((self.size, width))
        self.counts = np.zeros((self.size, width))
        self.cum_sum = np.zeros(width)
        self.cum_cnt = np.zeros(width)
        self._starts = np.zeros(len(self.slots), dtype=np.intp)
        self._empty = np.zeros((len(self.slots), width), dtype=bool)
        self.last: int | None = None
        self._advances = 0

    def add(self, t: float, x: F64, complete: bool = False) -> None:
        """Add a sample; ``complete=True`` promises no NaN in ``x`` (a faster path)."""
        b = math.floor(t / self.bucket_s)
        if self.last is None:
            self._set_last(b)
        elif b > self.last:
            self._advance(b)
        # b < last: out of order (clock step back): counted in the newest bucket
        if complete:
            self.cum_sum += x
            self.cum_cnt += self._ones
        else:
            ok = ~np.isnan(x)
            self.cum_sum += np.where(ok, x, 0.0)
            self.cum_cnt += ok

    def _set_last(self, b: int) -> None:
        self.last = b
        # row where each slot starts: the oldest of its ``span`` buckets
        self._starts = (b + 1 - self._spans) % self.size

    def _advance(self, b: int) -> None:
        assert self.last is not None
        steps = b - self.last
        if steps >= self.size:  # a gap longer than every slot: start afresh
            self.sums[:] = 0.0
            self.counts[:] = 0.0
            self.cum_sum[:] = 0.0
            self.cum_cnt[:] = 0.0
            self._advances = 0
            self._set_last(b)
            return
        for j in range(self.last + 1, b + 1):  # buckets with no sample start alike
            row = j % self.size
            self.sums[row] = self.cum_sum
            self.counts[row] = self.cum_cnt
        self._set_last(b)
        self._advances += steps
        if self._advances >= 4 * self.size:  # re-base: keep the magnitudes small
            self._advances = 0
            self.sums -= self.cum_sum
            self.counts -= self.cum_cnt
            self.cum_sum[:] = 0.0
            self.cum_cnt[:] = 0.0

    def means(self) -> F64:
        """(slots, K) averages; NaN where a slot has no sample of a quantity."""
        cnt = self.cum_cnt - self.counts[self._starts]
        out = self.cum_sum - self.sums[self._starts]
        empty = np.less(cnt, 0.5, out=self._empty)
        out /= np.where(empty, 1.0, cnt)
        out[empty] = np.nan
        return out


class BlockAggregate:
    """Clock-aligned fixed intervals (IEC 61000-4-30: 3 s ~ 150/180 cycles, 10 min).

    RMS-type quantities aggregate as the root of the mean of squares, the others
    as the mean. :meth:`add` returns the finished interval's values (and its
    start) when a sample opens a new interval.
    """

    def __init__(self, interval_s: float, rms_mask: npt.NDArray[np.bool_]):
        self.interval_s = interval_s
        self.rms = rms_mask
        width = len(rms_mask)
        self.sum = np.zeros(width)
        self.cnt = np.zeros(width)
        self.block: int | None = None

    def add(self, t: float, x: F64) -> tuple[float, F64] | None:
        ok = ~np.isnan(x)
        return self.add_prepared(t, np.where(ok, np.where(self.rms, x * x, x), 0.0), ok)

    def add_prepared(
        self, t: float, xv: F64, ok: npt.NDArray[np.bool_]
    ) -> tuple[float, F64] | None:
        """``xv``: squares for RMS columns, NaN replaced by 0; ``ok``: present columns."""
        block = math.floor(t / self.interval_s)
        done = None
        if self.block is not None and block != self.block:
            done = (self.block * self.interval_s, self.result())
            self.sum[:] = 0.0
            self.cnt[:] = 0.0
        self.block = block
        self.sum += xv
        self.cnt += ok
        return done

    def result(self) -> F64:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum / self.cnt
        mean[self.cnt < 0.5] = np.nan
        return np.where(self.rms, np.sqrt(np.abs(mean)), mean)


# -- the engine's state: one row per meter, updated for many meters at once ------------

#: "no bucket yet" in the int64 bucket-index arrays (a fresh row)


# -- one reading's derived quantities --------------------------------------------------

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
    a2, b2, c2 = a * a, b * b, c * c
    sq = a2 + b2 + c2
    if sq <= 0:
        return 0.0
    beta = (a2 * a2 + b2 * b2 + c2 * c2) / (sq * sq)
    root = math.sqrt(max(0.0, 3.0 - 6.0 * beta))
    return 100.0 * math.sqrt(max(0.0, (1.0 - root) / (1.0 + root)))


def derive(reading: dict[M, float], *, sqrt3: bool = False, neutral_u0_pct: float = 0.0) -> Derived:
    """Everything computable from one register-level reading (the definition:
    :func:`derive_rows` does the same for many readings at once).

    A NaN/inf register counts as absent everywhere (also the meter's own PF and
    total P registers).

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
        pf_meter = get(k_pf)
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
        p_meter = get(M.POWER)
        out[M.POWER] = p_tot if p_meter is None or phases > 1 else p_meter
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
    """NEMA unbalance of three values (%): the largest deviation from their mean."""
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


# -- the engine, one input at a time ----------------------------------------------------


class MeterEngine:
    """The analytics of one meter (a :class:`SiteEngine` holding that meter only): the
    engine fed one input at a time, which the batch-size equivalence tests compare with."""

    def __init__(self, site: SiteConfig, meter: str):
        self.meter = meter
        self.site = SiteEngine(site, max_meters=1)
        self.site.track(meter)

    @property
    def seq(self) -> int:
        """The last metrics seq used."""
        return self.site.seq(self.meter)

    def on_reading(self, reading: Reading) -> Output:
        return self.site.on_readings([reading])[0]

    def on_waveform(self, wf: Waveform) -> Output:
        return self.site.on_waveform(wf)
