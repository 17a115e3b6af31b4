"""What the analytics engine returns: metrics and events per input, and their encoding.

A :class:`MetricsOut` carries the fields of a :class:`~shared.messages.Metrics`
without validating them (the engine made them). Its ``values``, ``averages``,
``load`` and ``quadrant`` may be held as the engine's numpy rows and turned into
dicts on first use (reading the attribute, or :func:`encode_metrics`): a site
engine handling a thousand readings at once builds a thousand small objects, not
ten thousand dicts, and the dicts are built where the JSON is made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

import numpy as np
import orjson

from shared.measurements import Measurement as M
from shared.messages import Event, LoadKind, Metrics, compact_averages

SERVICE = "analytics"
T = TypeVar("T")
Quadrant = Literal[1, 2, 3, 4]


class LazyFields(Protocol):
    """Builds the dict fields of the ``row``-th metrics message of a batch."""

    def values(self, row: int) -> dict[M, float]: ...

    def averages(self, row: int) -> dict[str, dict[M, float]]: ...

    def load(self, row: int) -> dict[str, LoadKind]: ...

    def quadrant(self, row: int) -> dict[str, Quadrant]: ...

    def averages_wire(self, row: int) -> dict[str, Any]:
        """The averages in the wire's compact form (``Metrics``), ready for orjson
        with ``OPT_SERIALIZE_NUMPY`` (numpy rows allowed; NaN is written as null)."""
        ...

    def value(self, row: int, name: M) -> float | None:
        """One quantity of ``values`` (None when absent), without building the dict."""
        ...


class _Lazy(Generic[T]):
    """A dict field of :class:`MetricsOut`: built by the message's ``lazy`` builder
    (``LazyFields.<name>(row)``) on first use when none was given, then kept."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = f"_{name}"

    def __get__(self, obj: MetricsOut, owner: type | None = None) -> T:
        got: T | None = getattr(obj, self.slot)
        if got is None:
            if obj.lazy is None:
                raise TypeError(f"MetricsOut without {self.name} and without a builder")
            got = getattr(obj.lazy, self.name)(obj.row)
            setattr(obj, self.slot, got)
        return cast(T, got)


class MetricsOut:
    """A :class:`Metrics` built by the engine. Same fields; :meth:`model` gives the
    validated pydantic model, ``encode_metrics`` the JSON. A dict field given as
    ``None`` is built by ``lazy`` (for row ``row``) on first use, then kept."""

    __slots__ = (
        "_averages",
        "_load",
        "_quadrant",
        "_values",
        "aggregate",
        "harmonics",
        "interval_s",
        "lazy",
        "meter",
        "row",
        "seq",
        "site",
        "source",
        "source_seq",
        "ts",
    )

    def __init__(
        self,
        site: str,
        ts: datetime,
        seq: int,
        meter: str,
        source: Literal["reading", "waveform"],
        interval_s: float,
        source_seq: int | None,
        lazy: LazyFields | None = None,
        row: int = 0,
        aggregate: bool = False,
        *,
        values: dict[M, float] | None = None,
        averages: dict[str, dict[M, float]] | None = None,
        load: dict[str, LoadKind] | None = None,
        quadrant: dict[str, Quadrant] | None = None,
        harmonics: dict[str, list[float]] | None = None,
    ):
        self.site = site
        self.ts = ts
        self.seq = seq
        self.meter = meter
        self.source = source
        self.interval_s = interval_s
        self.source_seq = source_seq
        self.lazy = lazy
        self.row = row
        self._values = values
        self._averages = averages
        self._load = load
        self._quadrant = quadrant
        self.harmonics = harmonics if harmonics is not None else {}
        self.aggregate = aggregate

    values: _Lazy[dict[M, float]] = _Lazy()
    averages: _Lazy[dict[str, dict[M, float]]] = _Lazy()
    load: _Lazy[dict[str, LoadKind]] = _Lazy()
    quadrant: _Lazy[dict[str, Quadrant]] = _Lazy()

    def model(self) -> Metrics:
        return Metrics.model_validate_json(encode_metrics(self))

    def value(self, name: M) -> float | None:
        """``values.get(name)``; from the engine's arrays while the dict is unbuilt."""
        if self._values is not None or self.lazy is None:
            return self.values.get(name)
        return self.lazy.value(self.row, name)


@dataclass(slots=True)
class Output:
    metrics: list[MetricsOut] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def _numpy_rows(obj: object) -> object:
    """orjson's fallback: a numpy array it does not take directly (not contiguous)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def encode_metrics(m: MetricsOut | Metrics) -> bytes:
    """Fast serialisation of a Metrics built here (same JSON as ``shared.messages.encode``
    gives for the same message, fields in the schema's order of this function)."""
    if isinstance(m, MetricsOut) and m.lazy is not None:
        # straight from the builder: a field nobody read is not kept as a dict
        lazy, row = m.lazy, m.row
        values = m._values if m._values is not None else lazy.values(row)
        averages: dict[str, Any] = (
            lazy.averages_wire(row) if m._averages is None else compact_averages(m._averages)
        )
        load = m._load if m._load is not None else lazy.load(row)
        quadrant = m._quadrant if m._quadrant is not None else lazy.quadrant(row)
    else:
        values, averages = m.values, compact_averages(m.averages)
        load, quadrant = m.load, m.quadrant
    return orjson.dumps(
        {
            "schema": Metrics.SCHEMA,
            "site": m.site,
            "ts": m.ts,
            "seq": m.seq,
            "meter": m.meter,
            "source": m.source,
            "interval_s": m.interval_s,
            "values": values,
            "averages": averages,
            "load": load,
            "quadrant": quadrant,
            "harmonics": m.harmonics,
            "source_seq": m.source_seq,
            "aggregate": m.aggregate,
        },
        option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY,
        default=_numpy_rows,
    )


_last_seed = 0


def seq_seed() -> int:
    """A per-run starting seq: milliseconds since the epoch x 1000 (room for 1000
    messages per millisecond of run time before a later run could overlap)."""
    global _last_seed
    _last_seed = max(int(time.time() * 1000) * 1000, _last_seed + 1_000_000)
    return _last_seed
