"""Alarms with hysteresis and minimum durations.

Each alarm (one per meter, code and phase) is a small state machine driven by
two conditions evaluated on every input: ``bad`` (the raise condition, e.g.
PF < limit) and ``good`` (the clear condition, beyond the hysteresis band, e.g.
PF > limit + 0.02). ``bad`` must hold for ``raise_after_s`` before the alarm is
raised, ``good`` for ``clear_after_s`` before it clears; anything in between
(inside the band, or not evaluable: no load, missing value) resets the pending
timer. Time is the inputs' own timestamps, so replays and files behave the same.

The limits: ``low_pf``/``penalty_pf`` on the alarm slot's average |P|/S,
``ct_reversed`` on the average P per phase (meters not expected to export),
``voltage_missing`` when current flows on a phase with (almost) no voltage,
``pf_erratic`` on the max−min PF inside a window, ``thd_limit`` against
IEEE 519-2014 voltage limits for the bus voltage (and a configured current
limit), ``unbalance`` on u2 (NEMA where no line-to-line data exists),
``meter_pf_mismatch`` on |meter PF − |P|/S|, ``broken_neutral`` on the score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.analytics.aggregate import F64, I64, Bools, RowState
from shared.messages import EventState
from shared.site.analytics import AlarmTiming

Evidence = dict[str, float | str | bool | None]


def ieee519_voltage_limits(bus_voltage_v: float) -> tuple[float, float]:
    """(individual harmonic %, THD %) for a bus voltage (line to line), IEEE 519-2014 T.1."""
    if bus_voltage_v <= 1_000:
        return 5.0, 8.0
    if bus_voltage_v <= 69_000:
        return 3.0, 5.0
    if bus_voltage_v <= 161_000:
        return 1.5, 2.5
    return 1.0, 1.5


@dataclass(slots=True)
class Alarm:
    """One alarm's state machine, one evaluation at a time: the definition that
    :class:`AlarmStates` (what the engine runs) is tested against."""

    code: str
    phase: str | None
    timing: AlarmTiming
    active: bool = False
    since: float | None = None  # when the pending condition started
    evidence: Evidence = field(default_factory=dict)

    def update(
        self, t: float, bad: bool | None, good: bool | None, ev: Callable[[], Evidence]
    ) -> EventState | None:
        """Feed one evaluation; returns RAISED/CLEARED on a transition.

        ``ev`` builds the evidence only when it is needed (a transition)."""
        if not self.timing.enabled:
            return None
        want = good if self.active else bad
        if not want:
            self.since = None
            return None
        if self.since is None:
            self.since = t
        hold = self.timing.clear_after_s if self.active else self.timing.raise_after_s
        if t - self.since < hold:
            return None
        self.since = None
        self.active = not self.active
        self.evidence = ev()
        return EventState.RAISED if self.active else EventState.CLEARED


class AlarmStates(RowState):
    """:class:`Alarm` for rows (meters) x alarm slots (code, phase), many meters at once.

    A slot that is not evaluated for a meter (``evaluable`` false: no load, a
    missing value) keeps its state, as :class:`Alarm` does when it is not fed.
    A slot whose raise condition never held is in the same state as an alarm
    never created (inactive, no pending timer), so every slot is simply updated
    wherever it is evaluable: the cost is a dozen array operations per call
    whatever the number of alarms pending or active, and only transitions (the
    returned mask) need scalar work (evidence, events).
    """

    def __init__(self, timings: Sequence[AlarmTiming], capacity: int = 1):
        slots = len(timings)
        self.enabled = np.array([t.enabled for t in timings])
        self.raise_after = np.array([t.raise_after_s for t in timings])
        self.clear_after = np.array([t.clear_after_s for t in timings])
        self.active = np.zeros((capacity, slots), dtype=bool)
        #: when the pending condition started (NaN: none pending)
        self.since = np.full((capacity, slots), np.nan)
        self._fresh = {"active": False, "since": np.nan}

    def update(self, rows: I64, t: F64, evaluable: Bools, bad: Bools, good: Bools) -> Bools:
        """Feed one evaluation per row and slot ((rows, slots) masks); returns the
        transitions (raised where the slot was inactive, cleared where active)."""
        fed = evaluable & self.enabled
        act = self.active[rows]
        since = self.since[rows]
        want = np.where(act, good, bad) & fed
        tt = t[:, None]
        since = np.where(want & np.isnan(since), tt, since)
        since = np.where(fed & ~want, np.nan, since)
        hold = np.where(act, self.clear_after, self.raise_after)
        fire: npt.NDArray[np.bool_] = want & (tt - since >= hold)
        if fire.any():
            since[fire] = np.nan
            self.active[rows] = act ^ fire
        self.since[rows] = since
        return fire
