"""Message validation from bytes, against a bare pydantic-core model of the same shape.

Run: ``.venv/bin/python bench/bench_messages.py [--meters 200]``.

The messages are what the services exchange: readings of a PMTR_001-like meter and the
metrics analytics makes of them (per-reading ones with five compact moving-average
slots, and the 3 s aggregates). Each is validated with ``model_validate_json`` (as the
bus does); the baseline is a plain pydantic model with the same fields and no
constraints, validators or enum keys (strings and floats only), so the ratio is what
pfmon's checks (bounds, slugs, timestamps, quantities, compact averages) cost on top of
parsing. One core, best of five runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_analytics import readings, site

from services.analytics.batch import SiteEngine
from services.analytics.output import encode_metrics
from shared.messages import Metrics, Reading


class BareReading(BaseModel):
    schema_: str = Field(alias="schema")
    site: str
    ts: datetime
    seq: int
    meter: str
    gateway: str | None
    profile: str
    values: dict[str, float]
    poll_s: float | None = None


class BareMetrics(BaseModel):
    schema_: str = Field(alias="schema")
    site: str
    ts: datetime
    seq: int
    meter: str
    source: str
    interval_s: float
    values: dict[str, float]
    averages: dict[str, list[Any]]
    load: dict[str, str]
    quadrant: dict[str, int]
    harmonics: dict[str, list[float]]
    source_seq: int | None
    aggregate: bool


def per_item_us(fn: Callable[[bytes], object], items: list[bytes], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in items:
            fn(p)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=200)
    args = ap.parse_args()
    meters, seconds = args.meters, 6
    stream = readings(meters * seconds, meters)
    engine = SiteEngine(site(meters))
    per_reading, aggregates = [], []
    for k in range(seconds):
        batch = [Reading.model_validate_json(p) for p in stream[k * meters : (k + 1) * meters]]
        for out in engine.on_readings(batch):
            for m in out.metrics:
                (aggregates if m.aggregate else per_reading).append(encode_metrics(m))
    rows = [
        ("reading", stream, Reading, BareReading),
        ("metrics, per reading", per_reading, Metrics, BareMetrics),
        ("metrics, 3 s aggregate", aggregates, Metrics, BareMetrics),
    ]
    print(f"message validation from JSON bytes, {meters} meters, one core (µs a message)")
    for label, items, model, bare in rows:
        if not items:
            continue
        size = sum(map(len, items)) / len(items)
        ours = per_item_us(model.model_validate_json, items)
        base = per_item_us(bare.model_validate_json, items)
        print(
            f"  {label:24s} {size:6.0f} B  pfmon {ours:5.1f}  bare pydantic-core {base:5.1f}"
            f"  ({ours / base:.2f}x)"
        )


if __name__ == "__main__":
    main()
