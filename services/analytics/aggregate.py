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

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


class MovingAverages:
    """Time-based moving averages of K quantities over several slots (seconds).

    Samples fall into buckets of ``bucket_s`` (default: the shortest slot / 10);
    the average of a slot covers the buckets of the last ``slot`` seconds, so its
    edge is exact to one bucket. A quantity missing from a sample (NaN) is left
    out of that quantity's average (per-column counts).
    """

    def __init__(self, slots_s: Iterable[float], width: int, bucket_s: float | None = None):
        self.slots = sorted(float(s) for s in slots_s)
        self.bucket_s = bucket_s or self.slots[0] / 10.0
        self.spans = [max(1, round(s / self.bucket_s)) for s in self.slots]
        self.size = max(self.spans) + 1
        self._ones = np.ones(width)
        self._spans = np.array(self.spans)
        self.width = width
        self.sums = np.zeros((self.size, width))
        self.counts = np.zeros((self.size, width))
        self.run_sum = np.zeros((len(self.slots), width))
        self.run_cnt = np.zeros((len(self.slots), width))
        self.last: int | None = None
        self._advances = 0

    def add(self, t: float, x: F64, complete: bool = False) -> None:
        """Add a sample; ``complete=True`` promises no NaN in ``x`` (a faster path)."""
        b = math.floor(t / self.bucket_s)
        if self.last is None:
            self.last = b
        elif b > self.last:
            self._advance(b)
        elif b < self.last:  # out of order (clock step back): count it in the newest bucket
            b = self.last
        if complete:
            ok: npt.NDArray[np.bool_] | F64 = self._ones
            xv = x
        else:
            ok = ~np.isnan(x)
            xv = np.where(ok, x, 0.0)
        row = b % self.size
        self.sums[row] += xv
        self.counts[row] += ok
        self.run_sum += xv
        self.run_cnt += ok

    def _advance(self, b: int) -> None:
        assert self.last is not None
        steps = b - self.last
        if steps >= self.size:
            self.sums[:] = 0.0
            self.counts[:] = 0.0
            self.run_sum[:] = 0.0
            self.run_cnt[:] = 0.0
            self.last = b
            return
        new = np.arange(self.last + 1, b + 1)
        # buckets leaving each slot's span as the window moves forward (S, steps)
        old = (new[None, :] - self._spans[:, None]) % self.size
        self.run_sum -= self.sums[old].sum(axis=1)
        self.run_cnt -= self.counts[old].sum(axis=1)
        rows = new % self.size
        self.sums[rows] = 0.0
        self.counts[rows] = 0.0
        self.last = b
        self._advances += steps
        if self._advances >= 4 * self.size:  # wipe accumulated rounding now and then
            self._advances = 0
            self._recompute()

    def _recompute(self) -> None:
        assert self.last is not None
        for k, span in enumerate(self.spans):
            rows = [(self.last - j) % self.size for j in range(span)]
            self.run_sum[k] = self.sums[rows].sum(axis=0)
            self.run_cnt[k] = self.counts[rows].sum(axis=0)

    def means(self) -> F64:
        """(slots, K) averages; NaN where a slot has no sample of a quantity."""
        out = np.full(self.run_sum.shape, np.nan)
        np.divide(self.run_sum, self.run_cnt, out=out, where=self.run_cnt > 0.5)
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
