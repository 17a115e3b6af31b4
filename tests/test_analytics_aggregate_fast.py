"""The engine's aggregation (SlotSums, BlockSet: many meters at once) against brute
force and the plain one-meter classes."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import numpy as np
import pytest

from services.analytics.aggregate import BlockSet, SlotSums
from shared.measurements import Measurement as M
from shared.messages import Reading
from tests.oracles import BlockAggregate, MeterEngine, MovingAverages
from tests.test_analytics_engine import T0, site, three

SLOTS = [5, 10, 20, 30, 60]


def times(rng: random.Random, n: int) -> list[float]:
    """Irregular timestamps: steady, jittered, gaps shorter and longer than the
    slots (the ones between the shortest and the longest slot included), and a
    few steps back."""
    t, out = 1000.0, []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            t += 0.2
        elif r < 0.95:
            t += rng.expovariate(1.0)
        elif r < 0.99:
            t += rng.uniform(5.0, 90.0)
        else:
            t -= rng.uniform(0.0, 2.0)
        out.append(t)
    return out


def brute_means(
    samples: list[tuple[int, np.ndarray]], last: int, spans: list[int], width: int
) -> np.ndarray:
    out = np.full((len(spans), width), np.nan)
    for k, span in enumerate(spans):
        rows = [x for b, x in samples if last - span < b <= last]
        for c in range(width):
            col = [x[c] for x in rows if not math.isnan(x[c])]
            if col:
                out[k, c] = sum(col) / len(col)
    return out


def prepared(x: np.ndarray, rms_cols: list[int]) -> np.ndarray:
    vals = [0.0 if math.isnan(v) else float(v) for v in x]
    return np.array(
        vals + [0.0 if math.isnan(v) else 1.0 for v in x] + [vals[k] * vals[k] for k in rms_cols]
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_slot_sums_and_moving_averages_match_brute_force(seed: int) -> None:
    """Three meters' streams in one SlotSums, each call updating a random subset of
    them: every meter's averages equal brute force and its own MovingAverages."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    width, rms_cols, meters = 4, [0, 2], 3
    fast = SlotSums(SLOTS, width, len(rms_cols), capacity=meters)
    plain = [MovingAverages(SLOTS, width) for _ in range(meters)]
    streams = [iter(times(rng, 3000)) for _ in range(meters)]
    samples: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(meters)]
    last: list[int | None] = [None] * meters
    for _ in range(3000):
        rows = sorted(rng.sample(range(meters), rng.randint(1, meters)))
        ts = [next(streams[r]) for r in rows]
        xs = nrng.normal(230.0, 50.0, (len(rows), width))
        for x in xs:
            if rng.random() < 0.2:
                x[rng.randrange(width)] = np.nan
        prep = np.array([prepared(x, rms_cols) for x in xs])
        fast.add(np.array(rows), np.array(ts), prep)
        got_all = fast.means(np.array(rows))
        for r, t, x, got in zip(rows, ts, xs, got_all, strict=True):
            plain[r].add(t, x, complete=not np.isnan(x).any())
            b = math.floor(t / fast.bucket_s)
            lr = last[r]
            if lr is not None and b - lr >= fast.size:
                samples[r] = []
            if lr is None or b > lr:
                last[r] = lr = b
            samples[r].append((lr, x))
            samples[r] = samples[r][-2000:]
            ref = brute_means(samples[r], lr, fast.spans, width)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
            np.testing.assert_allclose(got, ref, rtol=1e-9, equal_nan=True)
            np.testing.assert_allclose(plain[r].means(), ref, rtol=1e-9, equal_nan=True)


def test_block_set_matches_one_block_aggregate_per_interval() -> None:
    """Two meters in one BlockSet against a pair of BlockAggregate each."""
    rng = random.Random(5)
    nrng = np.random.default_rng(5)
    width, meters = 5, 2
    rms_mask = np.array([True, False, True, False, False])
    rms_cols = [0, 2]
    blocks = BlockSet((3.0, 600.0), width, rms_cols, capacity=meters)
    plain = [[BlockAggregate(3.0, rms_mask), BlockAggregate(600.0, rms_mask)] for _ in range(2)]
    streams = [iter(times(rng, 5000)) for _ in range(meters)]
    closed = 0
    for _ in range(5000):
        rows = sorted(rng.sample(range(meters), rng.randint(1, meters)))
        ts = [next(streams[r]) for r in rows]
        xs = nrng.normal(100.0, 30.0, (len(rows), width))
        for x in xs:
            if rng.random() < 0.3:
                x[rng.randrange(width)] = np.nan
        prep = np.array([prepared(x, rms_cols) for x in xs])
        got = blocks.add(np.array(rows), np.array(ts), prep)
        for k, (r, t, x) in enumerate(zip(rows, ts, xs, strict=True)):
            want = [(b.interval_s, d) for b in plain[r] if (d := b.add(t, x)) is not None]
            mine = [q for q in range(len(got.pos)) if got.pos[q] == k]
            assert [blocks.intervals[got.interval[q]] for q in mine] == [w[0] for w in want]
            for q, (_, (wstart, wres)) in zip(mine, want, strict=True):
                assert got.start[q] == wstart
                np.testing.assert_allclose(got.values[q], wres, rtol=1e-12, equal_nan=True)
                closed += 1
    assert closed > 200


def test_engine_averages_and_aggregates_follow_the_inputs() -> None:
    """End to end through MeterEngine on jittered readings with a missing register
    now and then: each slot's average is the mean of the inputs of its buckets."""
    rng = random.Random(9)
    eng = MeterEngine(site(), "m1")
    t = 0.0
    seen: list[tuple[int, float, float | None]] = []
    bucket = 0.5
    for k in range(600):
        t += rng.choice([0.2, 0.5, 1.0, 1.7])
        vals = three(
            tuple(230 + rng.gauss(0, 2) for _ in range(3)),
            tuple(10 + rng.gauss(0, 1) for _ in range(3)),
            (0.9, 0.95, 0.99),
        )
        if rng.random() < 0.2:
            del vals[M.POWER_FACTOR_L2]
        r = Reading(
            site="s1", meter="m1", ts=T0 + timedelta(seconds=t), seq=k, profile="x", values=vals
        )
        out = eng.on_reading(r)
        m = out.metrics[0]
        b = math.floor(r.ts.timestamp() / bucket)
        seen.append((b, m.values[M.VOLTAGE_L1], r.values.get(M.POWER_FACTOR_L2)))
        for slot in (5, 60):
            span = round(slot / bucket)
            inside = [x for x in seen if b - span < x[0] <= b]
            want_v = sum(x[1] for x in inside) / len(inside)
            assert m.averages[f"{slot}s"][M.VOLTAGE_L1] == pytest.approx(want_v, rel=1e-12)
            pfs = [x[2] for x in inside if x[2] is not None]
            if pfs:
                assert m.averages[f"{slot}s"][M.POWER_FACTOR_L2] == pytest.approx(
                    sum(pfs) / len(pfs), rel=1e-12
                )
            else:
                assert M.POWER_FACTOR_L2 not in m.averages[f"{slot}s"]
        for agg in out.metrics[1:]:
            assert agg.aggregate
            end = agg.ts.timestamp()
            start = end - agg.interval_s
            inside = [x for x in seen[:-1] if start <= x[0] * bucket < end]
            want = math.sqrt(sum(x[1] ** 2 for x in inside) / len(inside))
            assert agg.values[M.VOLTAGE_L1] == pytest.approx(want, rel=1e-12)
