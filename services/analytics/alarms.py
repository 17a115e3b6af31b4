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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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


class AlarmSet:
    """All alarms of one meter (created lazily per code and phase)."""

    def __init__(self, timings: dict[str, AlarmTiming]):
        self.timings = timings
        self.alarms: dict[tuple[str, str | None], Alarm] = {}

    def update(
        self,
        t: float,
        code: str,
        phase: str | None,
        bad: bool | None,
        good: bool | None,
        ev: Callable[[], Evidence],
    ) -> tuple[Alarm, EventState] | None:
        key = (code, phase)
        alarm = self.alarms.get(key)
        if alarm is None:
            if not bad:
                return None  # nothing to track until the condition first appears
            alarm = self.alarms[key] = Alarm(code, phase, self.timings[code])
        state = alarm.update(t, bad, good, ev)
        return (alarm, state) if state is not None else None

    def active(self) -> list[Alarm]:
        return [a for a in self.alarms.values() if a.active]


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
