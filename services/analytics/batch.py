"""The site-wide analytics engine: derive, average, aggregate and alarm for many
meters at once.

:class:`SiteEngine` owns the state of every meter of a site. The service hands
it whatever arrived in one pass of its event loop (a 1,000-meter site polled at
1 Hz delivers bursts of ~1,000 readings); it returns one :class:`Output` per
input, in input order: the same messages, values, seqs and event order as
feeding the readings one at a time (``tests/test_analytics_batch.py`` holds it
to that).

Why batches: per reading, the work is a few dozen floating-point operations on
~30 quantities; in Python per reading it costs ~80 µs, almost all interpreter
and numpy-call overhead. Done as numpy operations over the readings of many
meters, the overhead is paid once per batch. How:

* **values matrix.** A batch becomes one matrix, a row per reading and a column
  per :class:`~shared.measurements.Measurement` (NaN: absent). Registers are
  read with one C-level ``itemgetter`` per meter's register set, derived
  quantities (``registers.derive_rows``) and the neutral score are columns
  worked out for all rows at once.
* **cohorts.** Meters with the same averaged quantities form a cohort whose
  averaging and 3 s / 10 min block state are numpy arrays with a row per meter
  (``aggregate.SlotSums``, ``aggregate.BlockSet``). A meter whose quantities
  change moves to another cohort and starts its averages afresh, as before.
* **site-wide state** with a row per meter: demand sub-intervals, the
  pf-erratic window (per-bucket min/max), alarm states (``AlarmStates``),
  message seqs.
* **alarms** are conditions on whole columns; the state machines advance as
  arrays, and only transitions build evidence and events in Python.
* **rounds.** A meter appears once per round: a batch with several readings of
  one meter is split into rounds, each processed in input order, so a meter's
  readings are taken in the order they came (as one at a time).
* **lazy dicts.** The metrics messages hold numpy rows and build their dicts
  when encoded (``output.MetricsOut``).

Every array operation is element-wise (or a min/max/sum along a meter's own
row), so a meter's results do not depend on the other meters in its batch.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import orjson

from services.analytics import alarms, dsp, neutral, quality, registers
from services.analytics.aggregate import (
    F64,
    I64,
    BlockSet,
    Bools,
    BucketExtremes,
    Closed,
    DemandWindow,
    RowState,
    SlotSums,
)
from services.analytics.alarms import AlarmStates, Evidence
from services.analytics.output import SERVICE, MetricsOut, Output, Quadrant, seq_seed
from services.analytics.registers import COL, LOAD_KINDS
from shared.measurements import Measurement as M
from shared.messages import Event, EventState, LoadKind, Reading, Waveform
from shared.site import SiteConfig
from shared.site.core import MeterConfig

log = logging.getLogger(__name__)
#: state is per meter and bounded; the number of meters is bounded too
MAX_METERS = 5000
_NOT_AVERAGED = {M.DEMAND_POWER, M.DEMAND_APPARENT_POWER, M.DEMAND_PF}
#: every quantity that is averaged (energy counters and demand values never are)
AVG_COLS: tuple[M, ...] = tuple(m for m in M if not m.is_counter and m not in _NOT_AVERAGED)
_AVG_IDX = np.array([COL[m] for m in AVG_COLS], dtype=np.intp)
_RMS_STEMS = ("voltage", "current", "thd_")
_PH = ("L1", "L2", "L3")
_NAN = math.nan
_STEMS = ("voltage", "current", "power", "apparent_power", "thd_voltage", "thd_current")
_PHASE_KEYS = tuple(tuple(M.per_phase(stem, n) for stem in _STEMS) for n in (1, 2, 3))
#: the averaged quantities the alarms read (columns of the alarm-slot averages)
_ALARM_INPUTS: tuple[M, ...] = (
    M.POWER,
    M.APPARENT_POWER,
    M.VOLTAGE_UNBALANCE,
    M.NEMA_UNBALANCE,
    M.NEUTRAL_SCORE,
    M.ZERO_SEQ_UNBALANCE,
    *(m for keys in _PHASE_KEYS for m in (keys[2], keys[3], keys[4], keys[5])),
    M.FREQUENCY,
)
_AVG_FREQ = len(_ALARM_INPUTS) - 1
#: the per-phase averaged alarm inputs (columns of the alarm-slot averages)
_AVG_P, _AVG_S, _AVG_THD_V, _AVG_THD_I = (
    np.array([6 + 4 * k + j for k in range(3)]) for j in range(4)
)
_V_COLS = np.array([COL[keys[0]] for keys in _PHASE_KEYS])
_I_COLS = np.array([COL[keys[1]] for keys in _PHASE_KEYS])
_NAMES = cast(list[M], [m.value for m in M])
_METER, _TS, _SEQ, _VALUES = (
    operator.attrgetter("meter"),
    operator.attrgetter("ts"),
    operator.attrgetter("seq"),
    operator.attrgetter("values"),
)  # plain str keys: orjson encodes them faster
_TOTAL = ("L1", "L2", "L3", "total")


class TooManyMeters(RuntimeError):
    """More distinct meter names than MAX_METERS arrived on the site's topics."""


def _picker(keys: tuple[M, ...]) -> Callable[[dict[M, float]], tuple[float, ...]]:
    """``d -> tuple(d[k] for k in keys)`` in C (KeyError when one is missing)."""
    if len(keys) == 1:
        one = operator.itemgetter(keys[0])
        return lambda d: (one(d),)
    return operator.itemgetter(*keys) if keys else lambda d: ()


@dataclass(slots=True)
class _Shape:
    """A register set as meters send it: its keys, a C getter, their columns."""

    keys: tuple[M, ...]
    get: Callable[[dict[M, float]], tuple[float, ...]]
    cols: npt.NDArray[np.intp]


class _Cohort:
    """Meters with the same averaged quantities: their averaging and block state."""

    def __init__(self, keys: tuple[M, ...], slots: list[int], aggregates: bool):
        self.keys = keys
        self.cols = np.array([COL[m] for m in keys], dtype=np.intp)
        self.names = cast(list[M], [m.value for m in keys])
        #: the wire's ``"keys"`` of the compact averages, encoded once
        self.keys_json = orjson.Fragment(orjson.dumps(self.names))
        rms = [k for k, m in enumerate(keys) if m.value.startswith(_RMS_STEMS)]
        self.rms = np.array(rms, dtype=np.intp)
        index = {m: k for k, m in enumerate(keys)}
        #: the alarm inputs' columns in ``keys`` (absent: the NaN column appended at K)
        self.alarm_cols = np.array([index.get(m, len(keys)) for m in _ALARM_INPUTS])
        self.ma = SlotSums(slots, len(keys))  # values and counts (squares: blocks only)
        self.blocks = BlockSet((3.0, 600.0), len(keys), rms) if aggregates and keys else None
        self.free: list[int] = []
        self.rows = 0

    def allocate(self) -> int:
        """A row for a meter joining the cohort (fresh state)."""
        if self.free:
            row = self.free.pop()
        else:
            row = self.rows
            self.rows += 1
            self.ma.ensure(self.rows)
            if self.blocks is not None:
                self.blocks.ensure(self.rows)
        self.ma.clear(row)
        if self.blocks is not None:
            self.blocks.clear(row)
        return row

    def prepared(self, x: F64) -> F64:
        """Rows of ``[values (0 where missing) | counts | squares of the RMS-type values]``."""
        xv = x[:, self.cols]
        ok = ~np.isnan(xv)
        v0 = np.where(ok, xv, 0.0)
        sq = v0[:, self.rms]
        return np.concatenate([v0, ok, sq * sq], axis=1, dtype=np.float64)

    def nbytes(self) -> int:
        return self.ma.nbytes() + (self.blocks.nbytes() if self.blocks is not None else 0)


class _Meters(RowState):
    """Per-meter configuration and bookkeeping, a row per meter."""

    def __init__(self) -> None:
        self.sqrt3 = np.zeros(1, dtype=bool)
        self.expect_export = np.zeros(1, dtype=bool)
        self.pf_tolerance = np.zeros(1)
        #: the three_phase option: -1 unset (three voltages present), 0 no, 1 yes
        self.three = np.zeros(1, dtype=np.int8)
        self.cohort = np.zeros(1, dtype=np.intp)
        self.crow = np.zeros(1, dtype=np.intp)
        #: the averaged quantities (AVG_COLS) seen so far
        self.known = np.zeros((1, len(AVG_COLS)), dtype=bool)
        #: the last metrics seq used
        self.seq = np.zeros(1, dtype=np.int64)
        #: the CTs' rated primary current (NaN: not configured) and ratio
        self.ct_rating = np.zeros(1)
        self.ct_ratio = np.ones(1)
        self._fresh = {
            "ct_rating": _NAN,
            "ct_ratio": 1.0,
            "sqrt3": False,
            "expect_export": False,
            "pf_tolerance": 0.0,
            "three": -1,
            "cohort": 0,
            "crow": 0,
            "known": False,
            "seq": 0,
        }


@dataclass(slots=True)
class _Side:
    """Per-input facts beside the values matrix that the alarms need."""

    pf_meter: F64  # (n, 3) the meter's PF register
    pf_calc: F64  # (n, 3) |P|/S
    pf_pair: Bools  # (n, 3) both exist (meter_pf_mismatch evaluated)
    worst_order: npt.NDArray[np.int64]  # (n, 3) worst voltage harmonic (waveforms)
    worst_pct: F64  # (n, 3) its level, % of the fundamental
    current_ratio: F64  # (n,) |ΣI|/Σ|I|, NaN where unknown
    #: evidence on the star point: per input, built when a broken_neutral alarm changes
    neutral: Callable[[int], Evidence]
    #: the current's shape per phase (waveforms: ct_saturation)
    clip: quality.Clipping | None = None


@dataclass(slots=True)
class _Group:
    """The inputs of one cohort within a round: their positions and averages."""

    cohort: _Cohort
    pos: npt.NDArray[np.intp]
    means: F64  # (len(pos), slots, K)
    closed: Closed | None


class _Round:
    """The arrays of one round, building the lazy dict fields of its metrics.

    The first message encoded converts the round's arrays to Python lists in one
    call each (values of the rows sharing the first row's quantities, the
    averages of each cohort group): per message only the dicts are left to build.
    """

    def __init__(self, x: F64, slot_names: list[str], n: int):
        self.x = x
        self.slot_names = slot_names
        self.group_of = np.zeros(n, dtype=np.intp)
        self.pos_in = np.zeros(n, dtype=np.intp)
        self.groups: list[_Group] = []
        self.load_codes: npt.NDArray[np.int8] | None = None
        self.quad_codes: npt.NDArray[np.int8] | None = None
        #: load and quadrant of a one-input round given as dicts (waveforms)
        self.eager: tuple[dict[str, LoadKind], dict[str, Quadrant]] | None = None
        self._values: tuple[list[M], list[list[float]], list[bool]] | None = None
        self._averages: list[tuple[list[list[list[float]]], list[list[bool]]] | None] = []

    def add_group(self, group: _Group) -> None:
        self.group_of[group.pos] = len(self.groups)
        self.pos_in[group.pos] = np.arange(len(group.pos))
        self.groups.append(group)
        self._averages.append(None)

    def values(self, row: int) -> dict[M, float]:
        if self._values is None:
            present = ~np.isnan(self.x)
            cols = np.flatnonzero(present[0])
            same = (present == present[0]).all(axis=1)
            names = [_NAMES[c] for c in cols.tolist()]
            self._values = (names, self.x[:, cols].tolist(), same.tolist())
        names, rows, same = self._values
        if same[row]:
            return dict(zip(names, rows[row], strict=True))
        return {_NAMES[c]: v for c, v in enumerate(self.x[row].tolist()) if v == v}

    def averages(self, row: int) -> dict[str, dict[M, float]]:
        gi = int(self.group_of[row])
        g = self.groups[gi]
        got = self._averages[gi]
        if got is None:
            rows: list[list[list[float]]] = g.means.tolist()
            holes = cast(list[list[bool]], np.isnan(g.means).any(axis=2).tolist())
            got = self._averages[gi] = (rows, holes)
        pos = int(self.pos_in[row])
        means, gaps = got[0][pos], got[1][pos]
        names = g.cohort.names
        out: dict[str, dict[M, float]] = {}
        for slot, vals, gap in zip(self.slot_names, means, gaps, strict=True):
            if gap:
                out[slot] = {n: v for n, v in zip(names, vals, strict=True) if v == v}
            else:
                out[slot] = dict(zip(names, vals, strict=True))
        return out

    def averages_wire(self, row: int) -> dict[str, Any]:
        g = self.groups[int(self.group_of[row])]
        out: dict[str, Any] = {"keys": g.cohort.keys_json}
        out.update(zip(self.slot_names, g.means[int(self.pos_in[row])], strict=True))
        return out

    def value(self, row: int, name: M) -> float | None:
        v = float(self.x[row, COL[name]])
        return v if v == v else None

    def load(self, row: int) -> dict[str, LoadKind]:
        if self.eager is not None:
            return self.eager[0]
        assert self.load_codes is not None
        codes = self.load_codes[row].tolist()
        return {ph: LOAD_KINDS[c] for ph, c in zip(_TOTAL, codes, strict=True) if c >= 0}

    def quadrant(self, row: int) -> dict[str, Quadrant]:
        if self.eager is not None:
            return self.eager[1]
        assert self.quad_codes is not None
        codes = self.quad_codes[row].tolist()
        return {ph: cast(Quadrant, c) for ph, c in zip(_TOTAL, codes, strict=True) if c}


class _Aggregates:
    """The values of closed 3 s / 10 min intervals (the other dict fields are empty)."""

    def __init__(self, names: list[M], values: F64):
        self.names = names
        self.rows = values
        self.col = {n: k for k, n in enumerate(names)}

    def values(self, row: int) -> dict[M, float]:
        return {n: v for n, v in zip(self.names, self.rows[row].tolist(), strict=True) if v == v}

    def averages(self, row: int) -> dict[str, dict[M, float]]:
        return {}

    def averages_wire(self, row: int) -> dict[str, Any]:
        return {}

    def value(self, row: int, name: M) -> float | None:
        k = self.col.get(name)
        v = math.nan if k is None else float(self.rows[row, k])
        return v if v == v else None

    def load(self, row: int) -> dict[str, LoadKind]:
        return {}

    def quadrant(self, row: int) -> dict[str, Quadrant]:
        return {}


class SiteEngine:
    """Analytics state of all meters of a site; inputs in batches, outputs per input.

    ``on_readings`` takes any batch of readings (several per meter allowed) and
    returns one :class:`Output` per reading, in order; ``on_waveform`` one
    waveform window. A meter's readings and waveforms share one state. At most
    ``max_meters`` meters are tracked (:meth:`track` raises :class:`TooManyMeters`
    beyond that, before anything of the batch is processed).
    """

    def __init__(self, site: SiteConfig, max_meters: int = MAX_METERS):
        self.config = site
        self.site = site.site
        cfg = site.analytics
        self.cfg = cfg
        self.limits = cfg.limits
        self.thresholds = site.thresholds
        self.max_meters = max_meters
        self.slots = cfg.average_slots_s
        self.slot_names = [f"{s}s" for s in self.slots]
        self.alarm_row = self.slots.index(cfg.alarm_slot_s)
        self.alarm_limits = alarms.Limits.of(site)
        self._configs: dict[str, MeterConfig] = {mc.name: mc for mc in site.meters}
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self.meters = _Meters()
        self.event_seq: list[int] = []
        self.last_source_seq: list[int | None] = []
        self._meter_shape: list[_Shape | None] = []
        self._shapes: dict[tuple[M, ...], _Shape] = {}
        self.cohorts: list[_Cohort] = []
        self._cohort_ids: dict[tuple[M, ...], int] = {}
        self._cohort(())  # id 0: meters with nothing averaged yet
        self.demand = DemandWindow(cfg.demand_window_s)
        window = self.limits.pf_erratic_window_s
        bucket = min(self.slots) / 10.0  # the averages' bucket, at most 64 per window
        self.pf_window = BucketExtremes(window, max(bucket, window / 64))
        timings = alarms.timings(site)
        self.alarms = AlarmStates([timings[d.code] for d, _ in alarms.SLOTS])
        #: dips, swells and interruptions, per meter (``quality.py``)
        on = frozenset(c for c in quality.CODES if timings[c].enabled)
        self.supply = quality.SupplyEvents(site.thresholds.nominal_voltage_v, self.limits, on)
        #: closed intervals whose end no datetime can hold (their message is dropped)
        self.dropped_aggregates = 0

    # -- meters ------------------------------------------------------------------------

    def track(self, meter: str) -> int:
        """The meter's row, added on first sight (raises :class:`TooManyMeters`)."""
        mid = self.index.get(meter)
        if mid is None:
            if len(self.names) >= self.max_meters:
                raise TooManyMeters(
                    f"meter {meter!r}: already tracking {self.max_meters} meters; "
                    "refusing more (is something publishing random meter names?)"
                )
            mid = self._add(meter)
        return mid

    def _add(self, meter: str) -> int:
        mid = len(self.names)
        for state in (self.meters, self.demand, self.pf_window, self.alarms):
            state.ensure(mid + 1)
            state.clear(mid)
        mc = self._configs.get(meter)
        opts = self.cfg.meter(meter)
        m = self.meters
        m.expect_export[mid] = bool(mc and mc.exports)
        delta = bool(mc and mc.wiring == "delta")
        m.sqrt3[mid] = opts.sqrt3_correction if opts.sqrt3_correction is not None else delta
        m.pf_tolerance[mid] = opts.pf_mismatch_tolerance
        m.three[mid] = -1 if opts.three_phase is None else int(opts.three_phase)
        m.ct_rating[mid] = _NAN if opts.ct_primary_a is None else opts.ct_primary_a
        m.ct_ratio[mid] = mc.ct_ratio if mc else 1.0
        nominal = opts.nominal_voltage_v or self.thresholds.nominal_voltage_v
        self.supply.add(mid, nominal, mc.interval_s if mc else 0.0)
        m.cohort[mid] = 0
        m.crow[mid] = self.cohorts[0].allocate()
        # seq of the messages published for this meter: contiguous within a run (gaps
        # stay visible) and seeded from the start time, so that a restarted service
        # never reuses a seq the archiver already holds
        m.seq[mid] = seed = seq_seed()
        self.event_seq.append(seed)
        self.last_source_seq.append(None)
        self._meter_shape.append(None)
        self.index[meter] = mid
        self.names.append(meter)
        return mid

    def seq(self, meter: str) -> int:
        """The last metrics seq used for ``meter``."""
        return int(self.meters.seq[self.index[meter]])

    def state_bytes(self) -> int:
        """Bytes of numpy state (fixed per meter: rings and per-meter rows)."""
        states: list[RowState] = [self.meters, self.demand, self.pf_window, self.alarms]
        return sum(s.nbytes() for s in states) + sum(c.nbytes() for c in self.cohorts)

    def _cohort(self, keys: tuple[M, ...]) -> int:
        cid = self._cohort_ids.get(keys)
        if cid is None:
            cid = self._cohort_ids[keys] = len(self.cohorts)
            self.cohorts.append(_Cohort(keys, self.slots, self.cfg.aggregates))
        return cid

    def _grow(self, mid: int, present: Bools) -> None:
        """New averaged quantities appeared: the meter moves to the cohort of the wider
        set and its averages start afresh (demand, window and alarms carry on)."""
        m = self.meters
        known = m.known[mid] | present
        m.known[mid] = known
        keys = tuple(AVG_COLS[k] for k in np.flatnonzero(known))
        old = int(m.cohort[mid])
        self.cohorts[old].free.append(int(m.crow[mid]))
        cid = self._cohort(keys)
        m.cohort[mid] = cid
        m.crow[mid] = self.cohorts[cid].allocate()

    # -- inputs ------------------------------------------------------------------------

    def on_readings(self, readings: Sequence[Reading]) -> list[Output]:
        """One :class:`Output` per reading, in order (a meter's readings in the order
        given: a batch with repeats is processed in rounds of one reading per meter)."""
        mids = list(map(self.track, map(_METER, readings)))
        if len(set(mids)) == len(mids):
            return self._readings(list(readings), mids) if readings else []
        outs: list[Output | None] = [None] * len(readings)
        for pos in _rounds(mids):
            got = self._readings([readings[i] for i in pos], [mids[i] for i in pos])
            for i, out in zip(pos, got, strict=True):
                outs[i] = out
        return cast(list[Output], outs)

    def on_waveform(self, wf: Waveform) -> Output:
        """Analyse one waveform window (raises ``dsp.WaveformError`` before any state
        changes when it cannot be analysed; a window without voltage on L1 gives no
        metrics but the supply events it is part of)."""
        mid = self.track(wf.meter)
        try:
            a, samples = analyze_waveform(wf)
        except dsp.WaveformError:
            volts = np.array([wf.channels[n] for n in ("v1", "v2", "v3") if n in wf.channels])
            t0, fs = wf.ts.timestamp(), wf.fs_hz
            dark = self.supply.dark_window(mid, t0, volts, fs, float(wf.f_nominal_hz))
            if dark is None:
                raise
            return self._excursion_events(mid, dark, Output([], []))
        x = np.full((1, len(M)), np.nan)
        for key, v in dsp.window_values(a).items():
            x[0, COL[key]] = v
        load = {_PH[k]: a.load(0, k) for k in range(a.phases)}
        quad = {_PH[k]: a.quadrant(0, k) for k in range(a.phases)}
        load["total"] = a.load(0)
        quad["total"] = a.quadrant(0)
        harmonics: dict[str, list[float]] = {}
        for k in range(a.phases):
            harmonics[f"v{k + 1}"] = a.harm_v[0, k].tolist()
            harmonics[f"i{k + 1}"] = a.harm_i[0, k].tolist()
        evidence: Evidence = {}
        ratio = _NAN
        if a.phases == 3:
            tot = a.totals()
            evidence = {"displacement_v": round(float(tot["v0"][0]), 3)}
            size = float(np.abs(a.i1[0]).sum())
            if size > 0:
                ratio = float(abs(a.i1[0].sum())) / size
        order, pct = np.zeros((1, 3), dtype=np.int64), np.zeros((1, 3))
        for k, (o, p) in _worst_harmonics(a).items():
            order[0, k], pct[0, k] = o, p
        no_pf = np.zeros((1, 3))
        side = _Side(no_pf, no_pf, no_pf > 0, order, pct, np.array([ratio]), lambda _: evidence)
        volts, amps = samples[: a.phases], samples[a.phases : 2 * a.phases]
        side.clip = quality.clipping(volts, amps, wf.fs_hz, a)
        rnd = _Round(x, self.slot_names, 1)
        rnd.eager = (load, quad)
        t = np.array([wf.ts.timestamp()])
        out = self._process(np.array([mid]), t, [wf.ts], [wf.seq], "waveform", rnd, side)[0]
        out.metrics[0].harmonics = harmonics
        f = float(a.frequency[0])
        self._excursion_events(mid, self.supply.waveform(mid, t[0], volts, wf.fs_hz, f), out)
        return out

    # -- readings ------------------------------------------------------------------------

    def _readings(self, batch: list[Reading], mids: list[int]) -> list[Output]:
        """One round: each meter at most once."""
        m = np.array(mids, dtype=np.intp)
        ts = list(map(_TS, batch))
        t = np.fromiter(map(datetime.timestamp, ts), np.float64, len(ts))
        x = self._matrix(batch, mids)
        d = registers.derive_rows(x, self.meters.sqrt3[m], self.limits.neutral_u0_low_pct)
        n = len(batch)
        side = _Side(
            d.pf_meter,
            d.pf_calc,
            d.pf_pair,
            np.zeros((n, 3), dtype=np.int64),
            np.zeros((n, 3)),
            d.current_ratio,
            lambda r: _star_evidence(x[r]) if d.star[r] else {},
        )
        rnd = _Round(x, self.slot_names, n)
        rnd.load_codes, rnd.quad_codes = d.load, d.quadrant
        return self._process(m, t, ts, list(map(_SEQ, batch)), "reading", rnd, side)

    def _matrix(self, batch: list[Reading], mids: list[int]) -> F64:
        """The values matrix of a round (NaN: absent or not finite). Each meter's
        register set is remembered; rows with the same set are read with one
        C-level getter and land in the matrix as one block."""
        dicts = list(map(_VALUES, batch))
        x = np.full((len(batch), len(M)), np.nan)
        shapes = self._meter_shape
        first = shapes[mids[0]]
        if first is not None and all(shapes[mid] is first for mid in mids):
            width = len(first.keys)
            if all(n == width for n in map(len, dicts)):
                try:  # the usual case: every reading has the register set of the last one
                    x[:, first.cols] = np.fromiter(
                        chain.from_iterable(map(first.get, dicts)), np.float64, len(dicts) * width
                    ).reshape(len(dicts), width)
                    return _finite(x)
                except KeyError:
                    pass
        groups: dict[int, tuple[_Shape, list[int], list[tuple[float, ...]]]] = {}
        for i, (vals, mid) in enumerate(zip(dicts, mids, strict=True)):
            shape = shapes[mid]
            got: tuple[float, ...] | None = None
            if shape is not None and len(vals) == len(shape.keys):
                try:  # noqa: SIM105 (per reading: cheaper than contextlib.suppress)
                    got = shape.get(vals)
                except KeyError:
                    pass
            if got is None:
                shape = shapes[mid] = self._shape(tuple(vals))
                got = shape.get(vals)
            assert shape is not None
            g = groups.get(id(shape))
            if g is None:
                groups[id(shape)] = (shape, [i], [got])
            else:
                g[1].append(i)
                g[2].append(got)
        for shape, rows, tuples in groups.values():
            width = len(shape.keys)
            block = np.fromiter(chain.from_iterable(tuples), np.float64, len(rows) * width)
            x[np.ix_(np.array(rows, dtype=np.intp), shape.cols)] = block.reshape(len(rows), width)
        return _finite(x)

    def _shape(self, keys: tuple[M, ...]) -> _Shape:
        shape = self._shapes.get(keys)
        if shape is None:
            cols = np.array([COL[k] for k in keys], dtype=np.intp)
            shape = self._shapes[keys] = _Shape(keys, _picker(keys), cols)
        return shape

    # -- the common path ------------------------------------------------------------------

    def _process(
        self,
        m: I64,
        t: F64,
        ts: list[datetime],
        source_seq: list[int],
        source: Literal["reading", "waveform"],
        rnd: _Round,
        side: _Side,
    ) -> list[Output]:
        """Neutral score, averages, blocks, demand, messages and alarms of one round."""
        x = rnd.x
        meters = self.meters
        lim = self.limits
        opt = meters.three[m]
        v_cols = (COL[M.VOLTAGE_L2], COL[M.VOLTAGE_L3])
        three = np.where(opt < 0, ~np.isnan(x[:, v_cols[0]]) & ~np.isnan(x[:, v_cols[1]]), opt > 0)
        u0 = x[:, COL[M.ZERO_SEQ_UNBALANCE]]
        scored = three & ~np.isnan(u0)
        score = neutral.score_rows(u0, lim.neutral_u0_low_pct, lim.neutral_u0_high_pct)
        fitted = scored & ~np.isnan(side.current_ratio) & (score > 0)
        fit = neutral.consistency_rows(u0, side.current_ratio)
        score = np.where(fitted, score * fit, score)
        c = COL[M.NEUTRAL_SCORE]
        x[:, c] = np.where(scored, score, x[:, c])
        # plausible inputs give finite results; should one not, it is absent, never a
        # NaN/inf that would poison an average or the demand window for its span
        _finite(x)
        present = ~np.isnan(x[:, _AVG_IDX])
        for r in np.flatnonzero((present & ~meters.known[m]).any(axis=1)):
            self._grow(int(m[r]), present[r])
        avg = self._averages(m, t, rnd)
        self._demand(m, t, x)
        outs = self._publish(m, ts, source_seq, source, rnd)
        lo, hi = self._pf_window(m, t, x)
        u2, nema = _unbalance(avg)
        inputs = alarms.Inputs(
            p=avg[:, 0],
            s=avg[:, 1],
            pf_lo=lo,
            pf_hi=hi,
            v=x[:, _V_COLS],
            i=x[:, _I_COLS],
            p_ph=avg[:, _AVG_P],
            s_ph=avg[:, _AVG_S],
            thd_v=avg[:, _AVG_THD_V],
            thd_i=avg[:, _AVG_THD_I],
            worst_pct=side.worst_pct,
            worst_order=side.worst_order,
            pf_meter=side.pf_meter,
            pf_calc=side.pf_calc,
            pf_pair=side.pf_pair,
            u2=u2,
            nema=nema,
            score=avg[:, 4],
            u0=avg[:, 5],
            u2_avg=avg[:, 2],
            three=three,
            export=meters.expect_export[m],
            pf_tolerance=meters.pf_tolerance[m],
            fitted=fitted,
            score_fit=fit,
            current_ratio=side.current_ratio,
            neutral=side.neutral,
            freq=avg[:, _AVG_FREQ],
            v10=_ten_minute_voltages(rnd, len(m)),
            ct_rating=meters.ct_rating[m],
            v_nominal=self.supply.nominal(m),
            ct_ratio=meters.ct_ratio[m],
            clip=side.clip,
        )
        self._alarms(m, t, ts, inputs, outs)
        if source == "reading":
            for row, got in self.supply.readings(m, t, x[:, _V_COLS]):
                self._excursion_events(int(m[row]), got, outs[row])
        return outs

    def _excursion_events(self, mid: int, got: quality.Transitions, out: Output) -> Output:
        """The events of dips, swells and interruptions starting (at their start) and
        ending (at their end, with the record), added to ``out``."""
        for state, qe in got:
            when = qe.start if state is EventState.RAISED else (qe.end or qe.start)
            ts = datetime.fromtimestamp(when, UTC)
            d = alarms.BY_CODE[qe.code]
            out.events.append(self._event(mid, ts, d, qe.phase, state, qe.evidence()))
        return out

    def _averages(self, m: I64, t: F64, rnd: _Round) -> F64:
        """Moving averages and blocks per cohort; returns the alarm inputs' averages
        over the alarm slot, (n, len(_ALARM_INPUTS)), NaN where a meter has none."""
        x = rnd.x
        n = len(m)
        cid = self.meters.cohort[m]
        crow = self.meters.crow[m]
        avg = np.empty((n, len(_ALARM_INPUTS)))
        if (cid == cid[0]).all():
            parts = [(int(cid[0]), np.arange(n))]
        else:
            parts = [(int(c), np.flatnonzero(cid == c)) for c in np.unique(cid)]
        for c, pos in parts:
            coh = self.cohorts[c]
            rows, tt = crow[pos], t[pos]
            prep = coh.prepared(x[pos])
            coh.ma.add(rows, tt, prep[:, : 2 * len(coh.keys)])
            means = coh.ma.means(rows)
            a = np.concatenate([means[:, self.alarm_row], np.full((len(pos), 1), _NAN)], axis=1)
            avg[pos] = a[:, coh.alarm_cols]
            closed = coh.blocks.add(rows, tt, prep) if coh.blocks is not None else None
            rnd.add_group(_Group(coh, pos, means, closed))
        return avg

    def _demand(self, m: I64, t: F64, x: F64) -> None:
        p = x[:, COL[M.POWER]]
        s = x[:, COL[M.APPARENT_POWER]]
        on = ~np.isnan(p) & ~np.isnan(s)
        if not on.any():
            return
        dp, ds = self.demand.add(m[on], t[on], p[on], s[on])
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            dpf = np.where(ds > 0, dp / ds, 0.0)
        ok = np.isfinite(dp) & np.isfinite(ds)  # finite or absent, as every value
        rows = np.flatnonzero(on)
        x[rows, COL[M.DEMAND_POWER]] = np.where(ok, dp, _NAN)
        x[rows, COL[M.DEMAND_APPARENT_POWER]] = np.where(ok, ds, _NAN)
        x[rows, COL[M.DEMAND_PF]] = np.where(ok & np.isfinite(dpf), dpf, _NAN)

    def _pf_window(self, m: I64, t: F64, x: F64) -> tuple[F64, F64]:
        """The window's min and max of |PF| per input (NaN where not evaluated: no
        PF, or S below ``min_apparent_power_va``; those inputs are not added)."""
        pf = np.abs(x[:, COL[M.POWER_FACTOR]])
        on = ~np.isnan(pf) & (x[:, COL[M.APPARENT_POWER]] >= self.limits.min_apparent_power_va)
        lo = np.full(len(m), _NAN)
        hi = np.full(len(m), _NAN)
        if on.any():
            lo[on], hi[on] = self.pf_window.add(m[on], t[on], pf[on])
        return lo, hi

    # -- outputs ------------------------------------------------------------------------

    def _publish(
        self,
        m: I64,
        ts: list[datetime],
        source_seq: list[int],
        source: Literal["reading", "waveform"],
        rnd: _Round,
    ) -> list[Output]:
        """The metrics messages of a round (instantaneous, then closed intervals),
        with their seqs."""
        n = len(m)
        closed = np.zeros(n, dtype=np.int64)
        for g in rnd.groups:
            if g.closed is not None and len(g.closed.pos):
                np.add.at(closed, g.pos[g.closed.pos], 1)
        meters = self.meters
        first = meters.seq[m] + 1
        meters.seq[m] = first + closed
        seqs = first.tolist()
        site, last = self.site, self.last_source_seq
        mids = m.tolist()
        meter = list(map(self.names.__getitem__, mids))
        outs = [
            Output([MetricsOut(site, t_i, seq, name, source, 0.0, src, rnd, i)], [])
            for i, (name, seq, t_i, src) in enumerate(zip(meter, seqs, ts, source_seq, strict=True))
        ]
        for g in rnd.groups:
            if g.closed is not None and len(g.closed.pos):
                self._aggregates(g, mids, seqs, source, outs)
        for mid, src in zip(mids, source_seq, strict=True):
            last[mid] = src
        return outs

    def _aggregates(
        self,
        g: _Group,
        mids: list[int],
        seqs: list[int],
        source: Literal["reading", "waveform"],
        outs: list[Output],
    ) -> None:
        assert g.closed is not None
        lazy = _Aggregates(g.cohort.names, g.closed.values)
        ends: dict[tuple[float, float], datetime] = {}
        intervals = g.cohort.blocks.intervals.tolist() if g.cohort.blocks is not None else []
        rows = g.pos[g.closed.pos].tolist()
        site, names, last = self.site, self.names, self.last_source_seq
        for k, (r, j, start) in enumerate(
            zip(rows, g.closed.interval.tolist(), g.closed.start.tolist(), strict=True)
        ):
            iv = intervals[j]
            end = ends.get((start, iv))
            if end is None:
                try:
                    end = datetime.fromtimestamp(start, UTC) + timedelta(seconds=iv)
                except (OverflowError, OSError, ValueError) as exc:
                    # a timestamp no datetime holds (refused at entry; kept apart here):
                    # this interval's message is lost, nothing else
                    self._unrepresentable(names[mids[r]], start, iv, exc)
                    continue
                ends[(start, iv)] = end
            metrics = outs[r].metrics
            mid = mids[r]
            seq = seqs[r] + len(metrics)
            metrics.append(
                MetricsOut(site, end, seq, names[mid], source, iv, last[mid], lazy, k, True)
            )

    def _unrepresentable(self, meter: str, start: float, iv: float, exc: Exception) -> None:
        self.dropped_aggregates += 1
        if self.dropped_aggregates == 1 or self.dropped_aggregates % 1000 == 0:
            log.error(
                "%s: the %g s interval starting at %r s cannot be stamped (%s); its aggregate "
                "is dropped (%d so far)",
                meter,
                iv,
                start,
                exc,
                self.dropped_aggregates,
                extra={"service": SERVICE, "meter": meter},
            )

    # -- alarms ---------------------------------------------------------------------------

    def _alarms(
        self, m: I64, t: F64, ts: list[datetime], inputs: alarms.Inputs, outs: list[Output]
    ) -> None:
        """Every alarm condition as columns (the table in ``alarms.ALARMS``), one
        state-machine step for all, then the events of the transitions in slot order."""
        ev, bad, good = alarms.evaluate(inputs, self.alarm_limits, len(m))
        fire = self.alarms.update(m, t, ev, bad, good)
        if not fire.any():
            return
        for r, j in zip(*np.nonzero(fire), strict=True):
            mid = int(m[r])
            alarm, k = alarms.SLOTS[j]
            active = bool(self.alarms.active[mid, j])
            state = EventState.RAISED if active else EventState.CLEARED
            evidence = alarm.evidence(inputs, self.alarm_limits, int(r), max(k, 0))
            phase = alarms.PHASES[k] if k >= 0 else None
            outs[r].events.append(self._event(mid, ts[r], alarm, phase, state, evidence))

    def _event(
        self,
        mid: int,
        ts: datetime,
        alarm: alarms.AlarmDef,
        phase: str | None,
        state: EventState,
        ev: Evidence,
    ) -> Event:
        self.event_seq[mid] += 1
        where = f" on {phase}" if phase else ""
        return Event(
            site=self.site,
            ts=ts,
            seq=self.event_seq[mid],
            meter=self.names[mid],
            code=alarm.code,
            state=state,
            severity=alarm.severity,
            phase=phase,
            message=f"{alarm.code}{where} {state.value}",
            evidence=ev,
            service=SERVICE,
        )


def _rounds(mids: list[int]) -> list[list[int]]:
    """Positions split into rounds: round k holds each meter's k-th input."""
    seen: dict[int, int] = {}
    rounds: list[list[int]] = []
    for i, mid in enumerate(mids):
        k = seen.get(mid, 0)
        seen[mid] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds


def _finite(x: F64) -> F64:
    """NaN/inf registers are left out (NaN: absent)."""
    bad = np.isinf(x)
    if bad.any():
        x[bad] = np.nan
    return x


def _unbalance(avg: F64) -> tuple[F64, Bools]:
    """The unbalance the alarm looks at: u2, or NEMA where there is no u2."""
    u2 = avg[:, 2]
    nema = np.isnan(u2)
    return np.where(nema, avg[:, 3], u2), nema


def _star_evidence(row: F64) -> Evidence:
    """The star-point shift of a reading's three phase voltages, for evidence."""
    star = neutral.star_shift(
        float(row[COL[M.VOLTAGE_L1]]), float(row[COL[M.VOLTAGE_L2]]), float(row[COL[M.VOLTAGE_L3]])
    )
    return {
        "displacement_v": round(star.displacement_v, 3),
        "line_v": round(star.line_v, 3),
        "angle_sum_deg": round(sum(star.angles_deg), 3),
        "consistent": star.consistent,
    }


def _ten_minute_voltages(rnd: _Round, n: int) -> F64:
    """(n, 3) the phase voltages of the 10-min intervals that closed with each input of
    the round (NaN: none closed, or no voltage)."""
    out = np.full((n, 3), _NAN)
    for g in rnd.groups:
        blocks = g.cohort.blocks
        if g.closed is None or blocks is None or not len(g.closed.pos):
            continue
        ten = blocks.intervals[g.closed.interval] == 600.0
        if not ten.any():
            continue
        keys = g.cohort.keys
        for k, ph in enumerate(_PHASE_KEYS):
            if ph[0] in keys:
                col = keys.index(ph[0])
                out[g.pos[g.closed.pos[ten]], k] = g.closed.values[ten, col]
    return out


def analyze_waveform(wf: Waveform) -> tuple[dsp.Analysis, F64]:
    ch = wf.channels
    three = all(k in ch for k in ("v2", "v3", "i2", "i3"))
    names = ["v1", "v2", "v3", "i1", "i2", "i3"] if three else ["v1", "i1"]
    has_in = three and "in" in ch
    if has_in:
        names.append("in")
    x = np.array([ch[n] for n in names], dtype=np.float64)[None]  # type: ignore[index]
    if not np.isfinite(x).all():
        bad = [n for k, n in enumerate(names) if not np.isfinite(x[0, k]).all()]
        raise dsp.WaveformError(f"non-finite samples in channel(s) {', '.join(bad)}")
    a = dsp.analyze_stacked(x, 3 if three else 1, wf.fs_hz, float(wf.f_nominal_hz), has_in)
    return a, x[0]


def _worst_harmonics(a: dsp.Analysis) -> dict[int, tuple[int, float]]:
    """Per phase index: the order and level (% of the fundamental) of the largest
    voltage harmonic."""
    out = {}
    for k in range(a.phases):
        h = a.harm_v[0, k]
        if h[0] <= 0:
            continue
        rel = h[1:] / h[0] * 100.0
        j = int(np.argmax(rel))
        out[k] = (j + 2, float(rel[j]))
    return out
