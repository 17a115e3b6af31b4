"""Moving averages, demand and IEC 61000-4-30 aggregates, in bounded memory.

Every structure here has a fixed size per meter: values are added into time
buckets of a ring (numpy, one row per bucket, one column per quantity), and
running sums per slot are updated on the fly, so a reading costs O(slots)
whatever the reading rate, and state never grows with run time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import cast

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


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


class WindowExtremes:
    """Sliding-window min and max of one quantity (monotonic deques, O(1) amortised).

    Bounded: at most ``maxlen`` samples are kept (the oldest are dropped first).
    """

    def __init__(self, window_s: float, maxlen: int = 4096):
        self.window_s = window_s
        self.maxlen = maxlen
        self._min: deque[tuple[float, float]] = deque()
        self._max: deque[tuple[float, float]] = deque()

    def add(self, t: float, x: float) -> None:
        while self._min and self._min[-1][1] >= x:
            self._min.pop()
        self._min.append((t, x))
        while self._max and self._max[-1][1] <= x:
            self._max.pop()
        self._max.append((t, x))
        cutoff = t - self.window_s
        for dq in (self._min, self._max):
            while dq and (dq[0][0] < cutoff or len(dq) > self.maxlen):
                dq.popleft()

    def spread(self) -> float:
        if not self._min:
            return 0.0
        return self._max[0][1] - self._min[0][1]

    def extremes(self) -> tuple[float, float]:
        return self._min[0][1], self._max[0][1]


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


class SlotSums:
    """:class:`MovingAverages` for the engine's hot path: the same buckets, slots and
    arithmetic (so the same averages), fed a prepared row instead of an array.

    A row is ``[x_1..x_K, n_1..n_K, extra...]``: the values (missing ones as 0),
    their counts (1 or 0) and any extra columns that ride along (the engine puts
    the squares of the RMS-type values there for :class:`BlockSet`). One vector
    addition per sample, one row copy per bucket, five numpy calls for the means.
    """

    def __init__(
        self, slots_s: Iterable[float], width: int, extra: int = 0, bucket_s: float | None = None
    ):
        self.slots = sorted(float(s) for s in slots_s)
        self.bucket_s = bucket_s or self.slots[0] / 10.0
        self.spans = [max(1, round(s / self.bucket_s)) for s in self.slots]
        self.size = max(self.spans) + 1
        self.width = width
        cols = 2 * width + extra
        #: running sums at the start of bucket b, at row b % size
        self.sums = np.zeros((self.size, cols))
        self.cum = np.zeros(cols)
        # row where each slot starts (the oldest of its ``span`` buckets), by row of b
        spans = np.array(self.spans, dtype=np.intp)
        self._table = (np.arange(self.size, dtype=np.intp)[:, None] + 1 - spans) % self.size
        self._starts = self._table[0]
        self._no_gaps = [False] * len(self.slots)
        self.last: int | None = None
        self._advances = 0

    def add(self, t: float, row: F64) -> None:
        b = math.floor(t / self.bucket_s)
        last = self.last
        if last is None:
            self._set_last(b)
        elif b > last:
            self._advance(last, b)
        # b < last: out of order (clock step back): counted in the newest bucket
        self.cum += row

    def _set_last(self, b: int) -> None:
        self.last = b
        self._starts = self._table[b % self.size]

    def _advance(self, last: int, b: int) -> None:
        steps = b - last
        if steps >= self.size:  # a gap longer than every slot: start afresh
            self.sums[:] = 0.0
            self.cum[:] = 0.0
            self._advances = 0
            self._set_last(b)
            return
        sums, cum, size = self.sums, self.cum, self.size
        for j in range(last + 1, b + 1):  # buckets with no sample start alike
            sums[j % size] = cum
        self._set_last(b)
        self._advances += steps
        if self._advances >= 4 * size:  # re-base: keep the magnitudes small
            self._advances = 0
            sums -= cum
            cum[:] = 0.0

    def mean_rows(self) -> tuple[list[list[float]], list[bool]]:
        """Averages, one list of K per slot (NaN where a slot has no sample of a
        quantity), and per slot whether any is NaN."""
        d = self.cum - self.sums.take(self._starts, axis=0)
        k = self.width
        total = d[:, :k]
        cnt = d[:, k : 2 * k]
        if k and cnt.min() > 0.5:
            rows: list[list[float]] = (total / cnt).tolist()
            return rows, self._no_gaps
        empty = cnt < 0.5
        out = total / np.where(empty, 1.0, cnt)
        out[empty] = np.nan
        gaps = cast(list[bool], empty.any(axis=1).tolist())
        return out.tolist(), gaps


class BlockSet:
    """Clock-aligned intervals (:class:`BlockAggregate`, e.g. 3 s and 10 min) over the
    rows of :class:`SlotSums`, all intervals in one array (one vector addition per
    sample). ``rms_cols``: the columns that aggregate as RMS, whose squares are the
    row's extra columns in that order. Same arithmetic as :class:`BlockAggregate`.
    """

    def __init__(self, intervals_s: Iterable[float], width: int, rms_cols: list[int]):
        self.intervals = [float(iv) for iv in intervals_s]
        self.width = width
        self.rms_cols = np.array(rms_cols, dtype=np.intp)
        self.sum = np.zeros((len(self.intervals), 2 * width + len(rms_cols)))
        self.block: list[int | None] = [None] * len(self.intervals)

    def add(self, t: float, row: F64) -> list[tuple[float, float, F64]]:
        """Add a row; returns ``(interval_s, start, values)`` for each interval the
        sample closes (values: NaN where the interval had no sample)."""
        done = []
        for j, iv in enumerate(self.intervals):
            block = math.floor(t / iv)
            cur = self.block[j]
            if cur != block:
                if cur is not None:
                    done.append((iv, cur * iv, self._result(j)))
                    self.sum[j] = 0.0
                self.block[j] = block
        self.sum += row
        return done

    def _result(self, j: int) -> F64:
        k = self.width
        acc = self.sum[j]
        cnt = acc[k : 2 * k]
        rms = self.rms_cols
        with np.errstate(invalid="ignore", divide="ignore"):
            mean: F64 = acc[:k] / cnt
            mean[rms] = np.sqrt(np.abs(acc[2 * k :] / cnt[rms]))
        mean[cnt < 0.5] = np.nan
        return mean


class DemandWindow:
    """Rolling billing demand: mean P and S over ``window_s`` in sub-intervals.

    Utilities bill the mean power over a demand window (15 min by default); the
    window rolls in ``subintervals`` steps (90: 10 s for 15 min). Pure Python on
    two values: cheaper than numpy at this size, and bounded (a fixed deque).
    """

    def __init__(self, window_s: float, subintervals: int = 90):
        self.width = window_s / subintervals
        self.n = subintervals
        self.buckets: deque[list[float]] = deque()  # [index, sum_p, sum_s, count]
        self.sum_p = self.sum_s = 0.0
        self.count = 0

    def add(self, t: float, p: float, s: float) -> tuple[float, float]:
        b = math.floor(t / self.width)
        if not self.buckets or b > self.buckets[-1][0]:
            self.buckets.append([b, 0.0, 0.0, 0])
        last = self.buckets[-1]
        last[1] += p
        last[2] += s
        last[3] += 1
        self.sum_p += p
        self.sum_s += s
        self.count += 1
        while self.buckets and self.buckets[0][0] <= b - self.n:
            _, sp, ss, c = self.buckets.popleft()
            self.sum_p -= sp
            self.sum_s -= ss
            self.count -= int(c)
        if len(self.buckets) == 1:  # re-sync the running sums (no drift)
            self.sum_p, self.sum_s, self.count = last[1], last[2], int(last[3])
        return self.sum_p / self.count, self.sum_s / self.count
