"""Moving averages, demand and IEC 61000-4-30 aggregates, in bounded memory.

Every structure here has a fixed size per meter: values are added into time
buckets of a ring (numpy, one row per bucket, one column per quantity), so a
reading costs O(slots) whatever the reading rate, and state never grows with
run time.

The engine's state is in the ``RowState`` classes: one row per meter, each call
updating many meters at once with numpy (the site-wide engine hands them one
reading per meter per call), element-wise only, so a meter's numbers do not
depend on which other meters shared its call. The plain one-meter definitions the
tests hold them to are in ``tests/oracles.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


NO_BUCKET = np.iinfo(np.int64).min
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class RowState:
    """Per-row state arrays (axis 0 = row) that grow by doubling and reset per row.

    Subclasses name their arrays and the value a fresh row holds in ``_fresh``.
    Every update takes a vector of distinct rows: the engine hands each meter at
    most once per call, so fancy-indexed in-place updates never collide.
    """

    _fresh: dict[str, float | int | bool]

    def capacity(self) -> int:
        return len(getattr(self, next(iter(self._fresh))))

    def ensure(self, rows: int) -> None:
        """Room for ``rows`` rows (doubling: amortised O(1) per new row)."""
        cap = self.capacity()
        if rows <= cap:
            return
        cap = max(rows, 2 * cap)
        for name, fill in self._fresh.items():
            old = getattr(self, name)
            new = np.full((cap, *old.shape[1:]), fill, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def clear(self, row: int) -> None:
        """Start a row afresh (a new meter, or one whose quantities changed)."""
        for name, fill in self._fresh.items():
            getattr(self, name)[row] = fill

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self._fresh)


class SlotSums(RowState):
    """:class:`MovingAverages` for many rows (meters) at once: the same buckets, slots
    and arithmetic (so the same averages, element for element), fed prepared rows.

    A row is ``[x_1..x_K, n_1..n_K, extra...]``: the values (missing ones as 0),
    their counts (1 or 0) and any extra columns that ride along (the engine puts
    the squares of the RMS-type values there for :class:`BlockSet`). Per call:
    one fancy-indexed addition for the running sums, one row copy per bucket
    crossed (a loop over the largest number of buckets crossed, usually 1-2),
    and one gather of the slot-start rows for the means. Only element-wise
    arithmetic: a row's result does not depend on the other rows of the call.
    """

    def __init__(
        self,
        slots_s: Iterable[float],
        width: int,
        extra: int = 0,
        bucket_s: float | None = None,
        capacity: int = 1,
    ):
        self.slots = sorted(float(s) for s in slots_s)
        self.bucket_s = bucket_s or self.slots[0] / 10.0
        self.spans = [max(1, round(s / self.bucket_s)) for s in self.slots]
        self.size = max(self.spans) + 1
        self.width = width
        cols = 2 * width + extra
        #: running sums at the start of bucket b, at [row, b % size]
        self.sums = np.zeros((capacity, self.size, cols))
        self.cum = np.zeros((capacity, cols))
        self.last = np.full(capacity, NO_BUCKET, dtype=np.int64)
        self.advances = np.zeros(capacity, dtype=np.int64)
        self._fresh = {"sums": 0.0, "cum": 0.0, "last": NO_BUCKET, "advances": 0}
        # ring row where each slot starts (the oldest of its ``span`` buckets), by b % size
        spans = np.array(self.spans, dtype=np.intp)
        self._table = (np.arange(self.size, dtype=np.intp)[:, None] + 1 - spans) % self.size

    def add(self, rows: I64, t: F64, x: F64) -> None:
        """Add one prepared row per meter row (``rows`` distinct), at times ``t``."""
        b = np.floor(t / self.bucket_s).astype(np.int64)
        last = self.last[rows]
        last = np.where(last == NO_BUCKET, b, last)
        steps = b - last
        newer = steps > 0
        if newer.any():
            gap = steps >= self.size  # a gap longer than every slot: start afresh
            if gap.any():
                r = rows[gap]
                self.sums[r] = 0.0
                self.cum[r] = 0.0
                self.advances[r] = 0
            walk = newer & ~gap
            if walk.any():
                self._advance(rows[walk], last[walk], steps[walk])
        # b < last: out of order (clock step back): counted in the newest bucket
        self.last[rows] = np.maximum(b, last)
        self.cum[rows] += x

    def _advance(self, rows: I64, last: I64, steps: I64) -> None:
        """Buckets last+1..b start with the running sums (empty buckets alike)."""
        adv = self.advances[rows] + steps
        # ring rows by flat index: row r, bucket j at r * size + j % size
        flat = self.sums.reshape(-1, self.sums.shape[2])
        base, first, n, cum = rows * self.size, last + 1, steps, self.cum[rows]
        for k in range(int(steps.max())):
            if k:
                more = n > k
                if not more.all():
                    base, first, n, cum = base[more], first[more], n[more], cum[more]
            flat[base + (first + k) % self.size] = cum
        rebase = adv >= 4 * self.size  # keep the magnitudes small
        if rebase.any():
            rr = rows[rebase]
            self.sums[rr] -= self.cum[rr][:, None, :]
            self.cum[rr] = 0.0
            adv[rebase] = 0
        self.advances[rows] = adv

    def means(self, rows: I64) -> F64:
        """(rows, slots, K) averages; NaN where a slot has no sample of a quantity."""
        k = self.width
        starts = self._table[self.last[rows] % self.size]
        # whole ring rows by flat index (contiguous copies), then the values and counts
        ring = self.sums.reshape(-1, self.sums.shape[2])[rows[:, None] * self.size + starts]
        d = self.cum[rows][:, None, : 2 * k] - ring[..., : 2 * k]
        total = d[..., :k]
        cnt = d[..., k:]
        empty = cnt < 0.5
        if not empty.any():
            out: F64 = total / cnt
            return out
        out = total / np.where(empty, 1.0, cnt)
        out[empty] = np.nan
        return out


@dataclass(slots=True)
class Closed:
    """Intervals closed by one :meth:`BlockSet.add`: which input (position in the
    call), which interval (index), its start time and its values (NaN: no sample)."""

    pos: npt.NDArray[np.intp]
    interval: npt.NDArray[np.intp]
    start: F64
    values: F64


class BlockSet(RowState):
    """Clock-aligned intervals (:class:`BlockAggregate`, e.g. 3 s and 10 min) over the
    rows of :class:`SlotSums`, for many meters at once, all intervals in one array.
    ``rms_cols``: the columns that aggregate as RMS, whose squares are the row's
    extra columns in that order. Same arithmetic as :class:`BlockAggregate`.
    """

    def __init__(
        self, intervals_s: Iterable[float], width: int, rms_cols: list[int], capacity: int = 1
    ):
        self.intervals = np.array([float(iv) for iv in intervals_s])
        self.width = width
        self.rms_cols = np.array(rms_cols, dtype=np.intp)
        cols = 2 * width + len(rms_cols)
        self.sum = np.zeros((capacity, len(self.intervals), cols))
        #: the open interval's index (floor(t / interval)), NaN before the first sample
        self.block = np.full((capacity, len(self.intervals)), np.nan)
        self._fresh = {"sum": 0.0, "block": np.nan}

    def add(self, rows: I64, t: F64, x: F64) -> Closed:
        """Add one row per meter row; returns the intervals these samples close."""
        blk = np.floor(t[:, None] / self.intervals)
        cur = self.block[rows]
        changed = cur != blk
        pos, iv = np.nonzero(changed & ~np.isnan(cur))
        done = Closed(pos, iv, cur[pos, iv] * self.intervals[iv], self._result(rows[pos], iv))
        if changed.any():
            cp, ci = np.nonzero(changed)
            self.sum[rows[cp], ci] = 0.0
            self.block[rows] = blk
        self.sum[rows] += x[:, None, :]
        return done

    def _result(self, rows: I64, iv: npt.NDArray[np.intp]) -> F64:
        k = self.width
        acc = self.sum[rows, iv]
        cnt = acc[:, k : 2 * k]
        rms = self.rms_cols
        with np.errstate(invalid="ignore", divide="ignore"):
            mean: F64 = acc[:, :k] / cnt
            mean[:, rms] = np.sqrt(np.abs(acc[:, 2 * k :] / cnt[:, rms]))
        mean[cnt < 0.5] = np.nan
        return mean


class DemandWindow(RowState):
    """Rolling billing demand for many meters: mean P and S over ``window_s``.

    Utilities bill the mean power over a demand window (15 min by default); the
    window rolls in ``subintervals`` steps (90: 10 s for 15 min). Per meter a ring
    of sub-interval sums (P, S, count) keyed by the sub-interval index; the
    demand is the sum of the live ones (no running sums that could drift). A
    sample older than the newest sub-interval counts in the newest (as the
    averages do); sub-intervals at or before ``b - subintervals`` (``b``: the
    sample's own) are dropped for good.
    """

    def __init__(self, window_s: float, subintervals: int = 90, capacity: int = 1):
        self.width = window_s / subintervals
        self.n = subintervals
        self.index = np.full((capacity, subintervals), NO_BUCKET, dtype=np.int64)
        self.p = np.zeros((capacity, subintervals))
        self.s = np.zeros((capacity, subintervals))
        self.count = np.zeros((capacity, subintervals))
        self.newest = np.full(capacity, NO_BUCKET, dtype=np.int64)
        self._fresh = {"index": NO_BUCKET, "p": 0.0, "s": 0.0, "count": 0.0, "newest": NO_BUCKET}

    def add(self, rows: I64, t: F64, p: F64, s: F64) -> tuple[F64, F64]:
        """Add P and S per meter row; returns the demand P and S (means over the window)."""
        b = np.floor(t / self.width).astype(np.int64)
        eb = np.maximum(b, self.newest[rows])
        self.newest[rows] = eb
        col = eb % self.n
        fresh = self.index[rows, col] != eb
        self.index[rows, col] = eb
        for arr, x in ((self.p, p), (self.s, s), (self.count, 1.0)):
            arr[rows, col] = np.where(fresh, 0.0, arr[rows, col]) + x
        idx = self.index[rows]
        live = idx > (b - self.n)[:, None]
        self.index[rows] = np.where(live, idx, NO_BUCKET)
        cnt = np.where(live, self.count[rows], 0.0).sum(axis=1)
        dp = np.where(live, self.p[rows], 0.0).sum(axis=1) / cnt
        ds = np.where(live, self.s[rows], 0.0).sum(axis=1) / cnt
        return dp, ds


class BucketExtremes(RowState):
    """Sliding-window min and max of one quantity for many meters, in buckets.

    The window covers the buckets of its last ``window_s`` seconds (like a slot of
    the moving averages, so its edge is exact to one bucket); each meter keeps a
    ring of per-bucket min and max, so memory is fixed whatever the input rate.
    A sample older than the newest bucket counts in the newest.
    """

    def __init__(self, window_s: float, bucket_s: float, capacity: int = 1):
        self.bucket_s = bucket_s
        self.span = max(1, round(window_s / bucket_s))
        self.index = np.full((capacity, self.span), NO_BUCKET, dtype=np.int64)
        self.lo = np.full((capacity, self.span), np.inf)
        self.hi = np.full((capacity, self.span), -np.inf)
        self.newest = np.full(capacity, NO_BUCKET, dtype=np.int64)
        self._fresh = {"index": NO_BUCKET, "lo": np.inf, "hi": -np.inf, "newest": NO_BUCKET}

    def add(self, rows: I64, t: F64, x: F64) -> tuple[F64, F64]:
        """Add one sample per meter row; returns the window's (min, max) per row."""
        eb = np.maximum(np.floor(t / self.bucket_s).astype(np.int64), self.newest[rows])
        self.newest[rows] = eb
        col = eb % self.span
        fresh = self.index[rows, col] != eb
        self.index[rows, col] = eb
        self.lo[rows, col] = np.where(fresh, x, np.minimum(self.lo[rows, col], x))
        self.hi[rows, col] = np.where(fresh, x, np.maximum(self.hi[rows, col], x))
        live = self.index[rows] > (eb - self.span)[:, None]
        lo = np.where(live, self.lo[rows], np.inf).min(axis=1)
        hi = np.where(live, self.hi[rows], -np.inf).max(axis=1)
        return lo, hi
