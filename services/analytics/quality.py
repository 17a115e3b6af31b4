"""Supply quality: voltage dips, swells and interruptions, and a CT's clipped current.

**Dips, swells, interruptions** (IEC 61000-4-30 style). From waveforms the voltage of
each phase is measured as Urms(1/2): the RMS over one cycle of the tracked
frequency, refreshed every half cycle (:func:`half_cycle_rms`), each value stamped
at the centre of its cycle. From readings (a meter's 1 Hz registers) the phase
voltage of each reading is used as it is: there the same events say *brown-out*
(a dip) and *black-out* (an interruption) and their resolution is the poll interval.

Per phase, three excursions are followed, each its own event (IEC 61000-4-30
records a dip and an interruption inside it both; the dip's residual voltage is
then below the interruption threshold):

* ``voltage_dip``: starts below ``dip_pct`` of nominal (90 %), ends at or above
  ``dip_pct + quality_hysteresis_pct`` (92 %); carries the residual voltage (its
  lowest value);
* ``voltage_swell``: starts above ``swell_pct`` (110 %), ends at or below
  ``swell_pct - quality_hysteresis_pct``; carries the peak voltage;
* ``interruption``: starts below ``interruption_pct`` (5 %), ends at or above
  ``interruption_pct + quality_hysteresis_pct``.

An excursion is raised when it starts and cleared when it ends; the cleared event
carries the whole record: start, duration, residual or peak voltage and the
resolution of the times (one half cycle for waveforms; the time between two samples
when the samples are further apart: a poll interval, or the gap between two
waveform windows).

**CT saturation.** A current transformer driven past its rating clips the
secondary current: flat tops, a crest factor below the voltage's, and a harmonic
signature of a symmetric clipped sine (the 3rd harmonic the largest). A 6-pulse
drive's current may be as flat (120° blocks, crest factor ~1.2) but has no 3rd
harmonic to speak of (5th and 7th dominate): the signature tells them apart.
:func:`clipping` gives those figures per phase of a window; the alarm table's
``ct_saturation`` judges them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

from services.analytics import dsp
from services.analytics.aggregate import F64, I64, RowState
from shared.messages import EventState
from shared.site.analytics import AlarmLimits

Evidence = dict[str, float | str | bool | None]
Source = Literal["waveform", "registers", "capture"]
PHASES = ("L1", "L2", "L3")
#: the excursion codes, in the order one sample's events are listed
CODES = ("voltage_dip", "interruption", "voltage_swell")


@dataclass(frozen=True, slots=True)
class Bands:
    """Where each excursion starts and ends, in volts."""

    nominal_v: float
    dip_v: float
    swell_v: float
    interruption_v: float
    hysteresis_v: float

    @classmethod
    def of(cls, nominal_v: float, lim: AlarmLimits) -> Bands:
        pct = nominal_v / 100.0
        return cls(
            nominal_v,
            lim.dip_pct * pct,
            lim.swell_pct * pct,
            lim.interruption_pct * pct,
            lim.quality_hysteresis_pct * pct,
        )

    def starts(self, code: str, u: float) -> bool:
        if code == "voltage_swell":
            return u > self.swell_v
        return u < (self.dip_v if code == "voltage_dip" else self.interruption_v)

    def ends(self, code: str, u: float) -> bool:
        if code == "voltage_swell":
            return u <= self.swell_v - self.hysteresis_v
        level = self.dip_v if code == "voltage_dip" else self.interruption_v
        return u >= level + self.hysteresis_v

    def quiet(self, u: F64) -> bool:
        """Whether no excursion can start on any of these values (NaN: absent)."""
        with np.errstate(invalid="ignore"):
            return not bool(((u < self.dip_v) | (u > self.swell_v)).any())


@dataclass(slots=True)
class QualityEvent:
    """One dip, swell or interruption of one phase."""

    code: str
    phase: str | None
    start: float  #: POSIX seconds (a capture: seconds from its first sample)
    extreme_v: float  #: residual (dip, interruption) or peak (swell) voltage
    nominal_v: float
    resolution_s: float
    source: Source
    duration_s: float | None = None  #: None while it lasts
    end: float | None = None

    def evidence(self) -> Evidence:
        key = "peak_v" if self.code == "voltage_swell" else "residual_v"
        start: float | str = self.start
        if self.source != "capture":
            start = datetime.fromtimestamp(self.start, UTC).isoformat()
        ev: Evidence = {
            "start": start,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 4),
            key: round(self.extreme_v, 2),
            f"{key[:-2]}_pct": round(100.0 * self.extreme_v / self.nominal_v, 2),
            "nominal_v": self.nominal_v,
            "resolution_s": round(self.resolution_s, 4),
            "source": self.source,
        }
        if self.source == "registers":
            kind = {"voltage_dip": "brown-out", "interruption": "black-out"}.get(self.code)
            if kind:
                ev["kind"] = kind
        return ev


@dataclass(slots=True)
class _Key:
    last_t: float = math.nan
    open: dict[tuple[int, str], QualityEvent] = field(default_factory=dict)


class Excursions:
    """The open excursions of many sources (meters), fed sample by sample in time order.

    :meth:`feed` takes one source's samples (times and per-phase voltages) and returns
    the transitions: ``(RAISED, event)`` when one starts and ``(CLEARED, event)``
    (with its duration) when it ends. Samples that are all inside the bands of a
    source with nothing open cost one array comparison.
    """

    def __init__(self, bands: Bands, enabled: frozenset[str] = frozenset(CODES)):
        self.bands = bands
        self.codes = tuple(c for c in CODES if c in enabled)
        self._keys: dict[Hashable, _Key] = {}
        #: the sources with their own bands (another nominal voltage)
        self._bands: dict[Hashable, Bands] = {}
        #: the sources with an excursion open
        self.active: set[Hashable] = set()

    def set_bands(self, key: Hashable, bands: Bands) -> None:
        """Source ``key`` has its own nominal voltage."""
        self._bands[key] = bands

    def quiet(self, u: F64, scale: F64) -> npt.NDArray[np.bool_]:
        """Per row of ``u`` (m, P): no excursion can start there; ``scale`` (m,) is each
        row's nominal voltage over the default bands' one."""
        b = self.bands
        with np.errstate(invalid="ignore"):
            s = scale[:, None]
            out = ~((u < b.dip_v * s) | (u > b.swell_v * s)).any(axis=1)
        return np.asarray(out, dtype=bool)

    def feed(
        self,
        key: Hashable,
        t: F64,
        u: F64,
        resolution_s: float,
        source: Source,
        phases: tuple[str, ...] = PHASES,
        prev_t: float | None = None,
    ) -> list[tuple[EventState, QualityEvent]]:
        """``t`` (m,) sample times, ``u`` (m, P) voltages (NaN: absent),
        ``resolution_s`` the spacing the samples are meant to have; ``prev_t`` the
        time of the sample before these (default: the last one fed)."""
        b = self._bands.get(key, self.bands)
        state = self._keys.get(key)
        if state is None:
            if not self.codes or b.quiet(u):
                if len(t):
                    self._keys[key] = _Key(float(t[-1]))
                return []
            state = self._keys[key] = _Key()
        elif not state.open and (not self.codes or b.quiet(u)):
            if len(t):
                state.last_t = float(t[-1])
            return []
        out: list[tuple[EventState, QualityEvent]] = []
        if prev_t is not None:
            state.last_t = prev_t
        for tj, row in zip(t.tolist(), u.tolist(), strict=True):
            prev = state.last_t
            res = resolution_s if prev != prev else max(resolution_s, tj - prev)
            for k, uk in enumerate(row):
                if uk != uk:
                    continue
                for code in self.codes:
                    ev = state.open.get((k, code))
                    if ev is None:
                        if b.starts(code, uk):
                            ev = QualityEvent(code, phases[k], tj, uk, b.nominal_v, res, source)
                            state.open[(k, code)] = ev
                            out.append((EventState.RAISED, ev))
                    elif b.ends(code, uk):
                        del state.open[(k, code)]
                        ev.end = max(tj, ev.start)  # a sample back in time ends it at once
                        ev.duration_s = ev.end - ev.start
                        ev.resolution_s = max(ev.resolution_s, res)
                        out.append((EventState.CLEARED, ev))
                    elif (uk > ev.extreme_v) if code == "voltage_swell" else (uk < ev.extreme_v):
                        ev.extreme_v = uk
            state.last_t = tj
        if state.open:
            self.active.add(key)
        else:
            self.active.discard(key)
        return out


Transitions = list[tuple[EventState, QualityEvent]]


class _Meters(RowState):
    """Per meter: its nominal voltage, poll interval and last reading with a voltage."""

    def __init__(self) -> None:
        self.nominal = np.zeros(1)
        self.poll = np.zeros(1)
        self.last_t = np.zeros(1)
        self._fresh = {"nominal": math.nan, "poll": 0.0, "last_t": math.nan}


class SupplyEvents:
    """The dips, swells and interruptions of a site's meters, as the engine meets them:
    rows of readings (:meth:`readings`) and waveform windows (:meth:`waveform`,
    :meth:`dark_window`). A meter's readings and waveforms are followed apart."""

    def __init__(self, nominal_v: float, lim: AlarmLimits, enabled: frozenset[str]):
        self.lim = lim
        self.excursions = Excursions(Bands.of(nominal_v, lim), enabled)
        self.meters = _Meters()

    def add(self, mid: int, nominal_v: float, poll_s: float) -> None:
        """Meter row ``mid`` (new): its nominal voltage and poll interval."""
        m = self.meters
        m.ensure(mid + 1)
        m.clear(mid)
        m.nominal[mid], m.poll[mid] = nominal_v, poll_s
        if nominal_v != self.excursions.bands.nominal_v:
            bands = Bands.of(nominal_v, self.lim)
            self.excursions.set_bands(mid, bands)
            self.excursions.set_bands(_wave_key(mid), bands)

    def readings(self, m: I64, t: F64, v: F64) -> list[tuple[int, Transitions]]:
        """One reading per meter ``m`` at ``t`` with phase voltages ``v`` (n, 3): the
        transitions per row (only rows that have some). Rows all inside the bands of
        meters with nothing open cost a few array operations."""
        exc, meters = self.excursions, self.meters
        prev = meters.last_t[m]
        meters.last_t[m] = np.where(np.isnan(v).all(axis=1), prev, t)
        look = ~exc.quiet(v, meters.nominal[m] / exc.bands.nominal_v)
        if exc.active:
            look |= np.isin(m, np.fromiter(exc.active, np.intp, len(exc.active)))
        out = []
        for r in np.flatnonzero(look).tolist():
            mid = int(m[r])
            poll = float(meters.poll[mid])
            got = exc.feed(
                mid, t[r : r + 1], v[r : r + 1], poll, "registers", prev_t=float(prev[r])
            )
            if got:
                out.append((r, got))
        return out

    def waveform(self, mid: int, t0: float, volts: F64, fs: float, f: float) -> Transitions:
        """A window of phase voltages ``volts`` (P, N) starting at ``t0`` (POSIX s),
        ``f`` its tracked frequency."""
        centres, u = half_cycle_rms(volts, fs, f)
        return self.excursions.feed(_wave_key(mid), t0 + centres, u, 0.5 / f, "waveform")

    def dark_window(
        self, mid: int, t0: float, volts: F64, fs: float, f_nominal: float
    ) -> Transitions | None:
        """A window without voltage on L1 (the phase whose frequency is tracked: the
        analysis refuses it): its transitions on every phase (Urms(1/2) at the nominal
        frequency). None when the window is not that, or too short to say."""
        if volts.shape[-1] < math.ceil(2 * fs / f_nominal):
            return None
        centres, u = half_cycle_rms(volts, fs, f_nominal)
        if not len(u) or not np.isfinite(u).all():
            return None
        dark = self.meters.nominal[mid] * self.lim.interruption_pct / 100.0
        if (u[:, 0] >= dark).any():
            return None
        return self.excursions.feed(_wave_key(mid), t0 + centres, u, 0.5 / f_nominal, "waveform")

    def nominal(self, m: I64) -> F64:
        """The meters' nominal voltages."""
        return self.meters.nominal[m]


def _wave_key(mid: int) -> int:
    """The key of a meter's waveforms (its readings' key is ``mid``)."""
    return -1 - mid


def half_cycle_rms(v: F64, fs: float, f: float) -> tuple[F64, F64]:
    """Urms(1/2) of each row of ``v`` (P, N): the RMS over one cycle of ``f``, every
    half cycle. Returns ``(centres, values)``: the centre of each cycle in seconds
    from the first sample, ``(m,)``, and the values ``(m, P)``."""
    half = fs / (2.0 * f)
    n = v.shape[-1]
    m = int((n - 2.0 * half) // half) + 1 if n >= 2.0 * half else 0
    if m <= 0:
        return np.zeros(0), np.zeros((0, v.shape[0]))
    sq = np.concatenate([np.zeros((v.shape[0], 1)), np.cumsum(v * v, axis=-1)], axis=-1)
    starts = np.rint(np.arange(m) * half).astype(np.intp)
    ends = np.rint(np.arange(m) * half + 2.0 * half).astype(np.intp)
    ends = np.minimum(ends, n)
    width = (ends - starts).astype(np.float64)
    ms = (sq[:, ends] - sq[:, starts]) / width
    centres = (starts + ends) / 2.0 / fs
    return centres, np.sqrt(np.maximum(ms, 0.0)).T


@dataclass(slots=True)
class Clipping:
    """The shape of each phase's current and voltage in one window, ``(n, 3)`` arrays
    (NaN: no such phase)."""

    irms: F64
    crest_i: F64  #: peak / RMS of the current
    crest_v: F64  #: peak / RMS of the voltage
    flat_i: F64  #: share of the samples within 3 % of the current's peak
    h3_pct: F64  #: 3rd harmonic of the current, % of its fundamental
    h5_pct: F64  #: 5th harmonic of the current, % of its fundamental

    @classmethod
    def absent(cls, n: int) -> Clipping:
        return cls(*(np.full((n, 3), np.nan) for _ in range(6)))


#: samples within this share of the peak count as the flat top
FLAT_SHARE = 0.97


def clipping(v: F64, i: F64, fs: float, a: dsp.Analysis) -> Clipping:
    """The clipping figures of one window: ``v``, ``i`` (P, N) samples at ``fs``, ``a``
    its analysis (the whole cycles it covered and the harmonics)."""
    out = Clipping.absent(1)
    phases = v.shape[0]
    whole = float(a.cycles[0]) * fs / float(a.frequency[0])
    length = max(2, min(v.shape[-1], round(whole)))
    vv, ii = v[:, :length], i[:, :length]
    with np.errstate(invalid="ignore", divide="ignore"):
        vr = np.sqrt((vv * vv).mean(axis=-1))
        ir = np.sqrt((ii * ii).mean(axis=-1))
        vp = np.abs(vv).max(axis=-1)
        mag = np.abs(ii)
        ip = mag.max(axis=-1)
        flat = (mag >= FLAT_SHARE * ip[:, None]).mean(axis=-1)
        h = a.harm_i[0]
        fund = h[:, 0]
        out.irms[0, :phases] = ir
        out.crest_i[0, :phases] = np.where(ir > 0, ip / ir, np.nan)
        out.crest_v[0, :phases] = np.where(vr > 0, vp / vr, np.nan)
        out.flat_i[0, :phases] = np.where(ip > 0, flat, np.nan)
        out.h3_pct[0, :phases] = np.where(fund > 0, 100.0 * h[:, 2] / fund, np.nan)
        out.h5_pct[0, :phases] = np.where(fund > 0, 100.0 * h[:, 4] / fund, np.nan)
    return out
