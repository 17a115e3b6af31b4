"""Capacitor-bank power-factor controller: decides which step to switch, and why.

Pure logic with an injectable clock, so it can be run against a plant model at
any speed. It reads :class:`~shared.messages.Metrics` and returns :class:`Op`
(one coil change with its reason) and :class:`~shared.messages.Event` objects;
the output path writes the coils and reports back with :meth:`BankController.feedback`
what the device actually shows. The controller's view of the steps is only ever
what was read back (or, in dry-run, what it would have done).

Regulation (load convention, Q > 0 inductive):

* reactive demand ``d = Q - |P| * tan(acos(target_pf))`` (var), on Q1 when analytics
  gives it, else on Q; with magnitude-only meters the sign comes from ``load``;
* a step is switched in when the deficit ``d`` exceeds ``k * smallest step``
  (``k`` = response threshold C/k) and the step does not make the PF lead below
  the target; a step is switched out when the PF leads below the target, or when
  the site stays at or above the target without it (by ``k * smallest step``);
  so the controller aims at *at least* the target, one step per operation,
  never two operations closer than ``min_interval``;
* before any operation the controller follows the decisions that would come
  after it at constant load and refuses it if they would come back to a state
  already seen (no hunting: with a constant load it settles and stays put);
* a step switched off stays off for ``reconnect_delay`` (discharge); at start
  every step that is off is treated as just switched off;
* no capacitor is added while the load is capacitive (nor when exporting with
  capacitive reactive power).

An operator can hold the controller (:attr:`BankController.mode` ``manual`` or
``maintenance``, from a console request) and, in ``manual``, switch a step by hand with
:meth:`BankController.manual_step`: the same discharge, minimum-interval and
operation-limit interlocks apply, and a refusal says why. The protections (harmonic
block, no current, stale data) still take steps out in every mode.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from shared.measurements import Measurement
from shared.messages import Event, EventState, LoadKind, Metrics, Severity
from shared.site.actuator import BankConfig

Clock = Callable[[], float]
Mode = Literal["auto", "manual", "maintenance"]
M = Measurement
_CURRENTS = (M.CURRENT_L1, M.CURRENT_L2, M.CURRENT_L3)
_THD_I = (M.THD_CURRENT_L1, M.THD_CURRENT_L2, M.THD_CURRENT_L3)


@dataclass(frozen=True, slots=True)
class Op:
    """Switch ``step`` (index) on coil ``coil`` to ``value``."""

    step: int
    coil: int
    value: bool
    reason: str
    trigger: dict[str, float | str | bool | None]


@dataclass
class Decision:
    ops: list[Op] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


@dataclass
class Inputs:
    """What one metrics message tells the controller (SI)."""

    p_w: float
    q_var: float | None
    current_a: float | None
    thd_i_pct: float | None
    q_source: str

    @property
    def pf(self) -> float:
        if self.q_var is None:
            return math.nan
        s = math.hypot(self.p_w, self.q_var)
        return abs(self.p_w) / s if s else 1.0


def read_inputs(m: Metrics, average: str | None) -> Inputs | None:
    """P, Q (Q1 preferred, sign from ``load`` when only a magnitude is known), I, THD-I."""
    avg = m.averages.get(average) if average else None

    def get(key: Measurement) -> float | None:
        for src in (avg, m.values):
            if src is not None and key in src and math.isfinite(src[key]):
                return src[key]
        return None

    p = get(M.POWER)
    if p is None:
        return None
    q: float | None = None
    source = ""
    for key in (M.FUND_REACTIVE_POWER, M.REACTIVE_POWER):
        q = get(key)
        if q is not None:
            source = key.value
            break
    if q is None:
        pf = get(M.POWER_FACTOR)
        if pf is not None and 0 < abs(pf) <= 1:
            q = abs(p) * math.tan(math.acos(min(1.0, abs(pf))))
            source = "power_factor"
    load = m.load.get("total", LoadKind.UNKNOWN)
    if q is not None and source != M.FUND_REACTIVE_POWER.value and load is not LoadKind.UNKNOWN:
        # magnitude-only meters: the sign of Q is what analytics says about the load
        if load is LoadKind.CAPACITIVE:
            q = -abs(q)
        elif load is LoadKind.INDUCTIVE:
            q = abs(q)
    elif q is not None and source == "power_factor":
        q = None  # a magnitude with no lead/lag information: cannot regulate
    currents = [get(k) for k in _CURRENTS]
    known = [c for c in currents if c is not None]
    current = sum(known) if known else None
    thds = [t for t in (get(k) for k in _THD_I) if t is not None]
    return Inputs(p, q, current, max(thds) if thds else None, source)


class BankController:
    """One capacitor bank. Call :meth:`on_metrics`, :meth:`tick`, :meth:`feedback`."""

    def __init__(self, site: str, cfg: BankConfig, *, clock: Clock = time.time) -> None:
        self.site = site
        self.cfg = cfg
        self.clock = clock
        n = len(cfg.steps_kvar)
        self.coils = cfg.step_coils
        self.size_var = [k * 1000.0 for k in cfg.steps_kvar]
        now = clock()
        self.steps_in: list[bool] = [False] * n
        self.known = False  # steps_in read back from the device at least once
        self.off_since: list[float] = [now] * n  # conservative: every step just went off
        self.on_since: list[float] = [0.0] * n
        self.operations: list[int] = [0] * n
        self.last_op = -math.inf
        self.last_metrics_ts: float | None = None
        self.started = now
        self.alarms: dict[str, bool] = {}
        self.pending: dict[str, float] = {}
        self.last_inputs: Inputs | None = None
        self.last_q_instant: float | None = None
        self._learn: tuple[int, bool, float, float] | None = None  # step, value, q_before, t
        self._seq = 0
        #: auto = the controller switches; manual/maintenance = held by an operator
        self.mode: Mode = "auto"

    # -- device feedback ---------------------------------------------------------------

    def adopt(self, coils: dict[int, bool], operations: dict[int, int] | None = None) -> None:
        """Start from the device's read-back coils (and retained operation counters)."""
        for i, coil in enumerate(self.coils):
            if coil in coils:
                self.steps_in[i] = coils[coil]
        if operations:
            for i in range(len(self.coils)):
                self.operations[i] = max(self.operations[i], operations.get(i, 0))
        self.known = True

    def feedback(self, step: int, actual: bool | None) -> None:
        """What the device shows after an operation on ``step`` (None = unknown)."""
        now = self.clock()
        was = self.steps_in[step]
        if actual is None:
            # could not read back: assume the worst for discharge, keep counting honest
            self.off_since[step] = now
            return
        if actual != was:
            self.operations[step] += 1
            if actual:
                self.on_since[step] = now
            else:
                self.off_since[step] = now
            if self.cfg.learn_steps and self.last_q_instant is not None:
                self._learn = (step, actual, self.last_q_instant, now)
        self.steps_in[step] = actual

    # -- helpers ------------------------------------------------------------------------

    def _event(
        self,
        code: str,
        state: EventState,
        message: str,
        evidence: dict[str, Any],
        severity: Severity = Severity.WARNING,
    ) -> Event:
        self._seq += 1
        return Event(
            site=self.site,
            meter=self.cfg.device,
            ts=datetime.fromtimestamp(self.clock(), UTC),
            seq=self._seq,
            code=code,
            state=state,
            severity=severity,
            message=message,
            evidence={"bank": self.cfg.name, **evidence},
            service="actuator",
        )

    def _alarm(
        self,
        out: Decision,
        code: str,
        active: bool,
        message: str,
        evidence: dict[str, Any],
        key: str | None = None,
    ) -> None:
        key = key or code
        was = self.alarms.get(key, False)
        if active and not was:
            out.events.append(self._event(code, EventState.RAISED, message, evidence))
        elif not active and was:
            out.events.append(
                self._event(code, EventState.CLEARED, f"{code} cleared", evidence, Severity.INFO)
            )
        self.alarms[key] = active

    def _delayed(self, code: str, condition: bool, now: float) -> bool:
        """True once ``condition`` has held for ``alarm_delay``."""
        if not condition:
            self.pending.pop(code, None)
            return False
        since = self.pending.setdefault(code, now)
        return now - since >= self.cfg.alarm_delay

    def locked(self, i: int) -> bool:
        return self.operations[i] >= self.cfg.operation_limit

    def discharged(self, i: int, now: float) -> bool:
        return now - self.off_since[i] >= self.cfg.reconnect_delay

    @property
    def kvar_in(self) -> float:
        return sum(s for s, on in zip(self.size_var, self.steps_in, strict=True) if on) / 1000.0

    def _all_out(self, reason: str, trigger: dict[str, float | str | bool | None]) -> list[Op]:
        return [
            Op(i, self.coils[i], False, reason, trigger) for i, on in enumerate(self.steps_in) if on
        ]

    # -- timers ------------------------------------------------------------------------

    def tick(self) -> Decision:
        """Periodic check: stale data (metrics stopped arriving)."""
        out = Decision()
        now = self.clock()
        ref = self.last_metrics_ts if self.last_metrics_ts is not None else self.started
        age = now - ref
        if age > self.cfg.stale_after:
            self._stale(out, age)
        return out

    def _stale(self, out: Decision, age: float) -> None:
        first = not self.alarms.get("stale_data", False)
        self._alarm(
            out,
            "stale_data",
            True,
            f"bank {self.cfg.name!r}: metrics of {self.cfg.meter!r} are {age:.1f}s old "
            f"(limit {self.cfg.stale_after:g}s): {self.cfg.on_stale}",
            {"age_s": round(age, 3), "on_stale": self.cfg.on_stale},
        )
        if self.cfg.on_stale == "disconnect" and first:
            out.ops += self._all_out(
                f"bank {self.cfg.name}: stale data ({age:.1f}s), fail-safe disconnect",
                {"age_s": round(age, 3)},
            )

    # -- regulation ----------------------------------------------------------------------

    def on_metrics(self, m: Metrics) -> Decision:
        out = Decision()
        if m.meter != self.cfg.meter:
            return out
        now = self.clock()
        ts = m.ts.timestamp()
        if self.last_metrics_ts is not None and ts <= self.last_metrics_ts:
            return out  # old or duplicated
        age = now - ts
        if age > self.cfg.stale_after:
            self._stale(out, age)
            return out
        self.last_metrics_ts = ts
        self._alarm(out, "stale_data", False, "", {"age_s": round(age, 3)})
        inst = read_inputs(m, None)
        if inst is not None and inst.q_var is not None:
            self._learn_step(out, inst.q_var, ts)
            self.last_q_instant = inst.q_var
        x = read_inputs(m, self.cfg.average)
        if x is None or x.q_var is None:
            self._alarm(
                out,
                "no_reactive_power",
                True,
                f"bank {self.cfg.name!r}: {m.meter!r} gives no active/reactive power "
                "(or no lead/lag): holding the steps as they are",
                {},
            )
            return out
        self._alarm(out, "no_reactive_power", False, "", {})
        self.last_inputs = x
        target = self.cfg.target_pf
        q_target = abs(x.p_w) * math.tan(math.acos(target))
        d = x.q_var - q_target
        trigger: dict[str, float | str | bool | None] = {
            "p_w": round(x.p_w, 3),
            "q_var": round(x.q_var, 3),
            "q_source": x.q_source,
            "pf": round(x.pf, 4),
            "target_pf": target,
            "demand_var": round(d, 3),
            "kvar_in": round(self.kvar_in, 3),
            "meter_seq": m.seq,
        }
        if x.thd_i_pct is not None:
            trigger["thd_i_pct"] = round(x.thd_i_pct, 3)

        # no current: nothing to compensate (or a CT is open)
        no_current = x.current_a is not None and x.current_a < self.cfg.no_current_a
        was_no_current = self.alarms.get("no_current", False)
        self._alarm(
            out,
            "no_current",
            no_current,
            f"bank {self.cfg.name!r}: current {x.current_a or 0:.2f} A below "
            f"{self.cfg.no_current_a:g} A: {self.cfg.on_no_current}",
            {"current_a": x.current_a},
        )
        if no_current:
            if self.cfg.on_no_current == "disconnect" and not was_no_current:
                out.ops += self._all_out(f"bank {self.cfg.name}: no current", trigger)
            return out

        # harmonics: capacitors resonate; block and take every step out
        limit = self.cfg.thd_limit_pct
        thd = x.thd_i_pct
        blocked = self.alarms.get("thd_block", False)
        if thd is not None and (thd > limit or (blocked and thd > 0.9 * limit)):
            evidence: dict[str, Any] = {"thd_i_pct": round(thd, 3), "limit_pct": limit}
            qc = self.kvar_in or sum(self.size_var) / 1000.0
            text = ""
            if self.cfg.short_circuit_kva:
                order = math.sqrt(self.cfg.short_circuit_kva / qc)
                evidence["resonance_order"] = round(order, 2)
                evidence["qc_kvar"] = round(qc, 3)
                text = f"; resonance order sqrt(Ssc/Qc) = {order:.2f} at {qc:g} kvar"
            self._alarm(
                out,
                "thd_block",
                True,
                f"bank {self.cfg.name!r}: current THD {thd:.1f}% above {limit:g}%: "
                f"switching blocked, steps out{text}",
                evidence,
            )
            reason = f"bank {self.cfg.name}: thd_block (THD-I {thd:.1f}% > {limit:g}%){text}"
            trig = {**trigger, **{k: v for k, v in evidence.items() if k != "limit_pct"}}
            out.ops += self._all_out(reason, trig)
            return out
        self._alarm(out, "thd_block", False, "", {"thd_i_pct": thd})

        # overcompensated: leading PF with steps in
        over = x.q_var < 0 and x.pf < target and any(self.steps_in)
        self._alarm(
            out,
            "overcompensated",
            self._delayed("overcompensated", over, now),
            f"bank {self.cfg.name!r}: leading PF {x.pf:.3f} with {self.kvar_in:g} kvar in",
            {"pf": round(x.pf, 4), "q_var": round(x.q_var, 1), "kvar_in": self.kvar_in},
        )
        # undercompensated: every usable step in and PF still below target
        usable_out = [i for i, on in enumerate(self.steps_in) if not on and not self.locked(i)]
        under = x.q_var > 0 and x.pf < target and not usable_out
        self._alarm(
            out,
            "undercompensated",
            self._delayed("undercompensated", under, now),
            f"bank {self.cfg.name!r}: all steps in and PF {x.pf:.3f} below {target:g}",
            {"pf": round(x.pf, 4), "q_var": round(x.q_var, 1), "kvar_in": self.kvar_in},
        )

        for i in range(len(self.steps_in)):
            self._alarm(
                out,
                "operation_limit",
                self.locked(i),
                f"bank {self.cfg.name!r}: step {i + 1} reached its operation limit "
                f"({self.operations[i]} of {self.cfg.operation_limit}); it is no longer switched",
                {"step": i + 1, "operations": self.operations[i]},
                key=f"operation_limit:{i + 1}",
            )
        if self.mode != "auto" or now - self.last_op < self.cfg.min_interval:
            return out
        op = self._choose(d, x.q_var, q_target, now)
        if op is None:
            return out
        step, value = op
        verb = "in" if value else "out"
        size = self.size_var[step] / 1000.0
        reason = (
            f"bank {self.cfg.name} ({self.cfg.program}): step {step + 1} ({size:g} kvar) {verb}: "
            f"PF {x.pf:.3f}, target {target:g}, reactive demand {d / 1000.0:+.2f} kvar"
        )
        trigger["step"] = step + 1
        trigger["step_kvar"] = round(size, 3)
        self.last_op = now
        out.ops.append(Op(step, self.coils[step], value, reason, trigger))
        return out

    def manual_step(self, step: int, on: bool, user: str) -> Op | str:
        """Switch ``step`` (index) by hand: the :class:`Op`, or why it is refused."""
        n = len(self.steps_in)
        name = f"bank {self.cfg.name}"
        if self.mode != "manual":
            return f"{name} is in {self.mode} mode: switch it to manual first"
        if not 0 <= step < n:
            return f"{name} has steps 1..{n}, not {step + 1}"
        if self.steps_in[step] == on:
            return f"{name}: step {step + 1} is already {'in' if on else 'out'}"
        if self.locked(step):
            return (
                f"{name}: step {step + 1} reached its operation limit "
                f"({self.operations[step]} of {self.cfg.operation_limit})"
            )
        now = self.clock()
        since = now - self.last_op
        if since < self.cfg.min_interval:
            return (
                f"{name}: the last operation was {since:.1f}s ago; steps are switched at "
                f"most every {self.cfg.min_interval:g}s ({self.cfg.min_interval - since:.1f}s left)"
            )
        if on and not self.discharged(step, now):
            left = self.cfg.reconnect_delay - (now - self.off_since[step])
            return (
                f"{name}: step {step + 1} is discharging ({left:.1f}s left of "
                f"{self.cfg.reconnect_delay:g}s reconnection delay)"
            )
        if on and self.alarms.get("thd_block", False):
            return f"{name}: switching is blocked by current harmonics (thd_block)"
        self.last_op = now
        size = self.size_var[step] / 1000.0
        reason = f"{name}: step {step + 1} ({size:g} kvar) {'in' if on else 'out'} by hand ({user})"
        return Op(step, self.coils[step], on, reason, {"step": step + 1, "user": user})

    def _candidates(
        self, d: float, q: float, q_t: float, steps_in: list[bool], now: float
    ) -> tuple[int | None, int | None]:
        """(step to add, step to remove) under the switching program, ignoring thresholds."""
        n = len(steps_in)
        addable = [
            i
            for i in range(n)
            if not steps_in[i] and not self.locked(i) and self.discharged(i, now)
        ]
        removable = [i for i in range(n) if steps_in[i] and not self.locked(i)]
        program = self.cfg.program
        if program == "linear":
            return (min(addable) if addable else None, max(removable) if removable else None)
        if program == "circular":
            add = min(addable, key=lambda i: (self.off_since[i], i)) if addable else None
            rem = min(removable, key=lambda i: (self.on_since[i], i)) if removable else None
            return add, rem
        # optimal: the combination that reaches the target with the least excess
        # (never leading beyond the target), reached one step at a time
        fixed = {i for i in range(n) if self.locked(i) or (not steps_in[i] and i not in addable)}
        now_total = sum(self.size_var[i] for i in range(n) if steps_in[i])
        want = now_total + d  # kvar that puts Q exactly on the target
        most = now_total + q + q_t  # beyond this the PF leads below the target
        best: tuple[int, float, int, tuple[bool, ...]] | None = None
        best_combo: tuple[bool, ...] = ()
        for combo in itertools.product((False, True), repeat=n):
            if any(combo[i] != steps_in[i] for i in fixed):
                continue
            total = sum(self.size_var[i] for i in range(n) if combo[i])
            changes = sum(1 for i in range(n) if combo[i] != steps_in[i])
            # equal otherwise, the lower-numbered steps first (step 1 before step 2)
            order = tuple(not c for c in combo)
            if want <= total <= most:
                key = (0, round(total - want, 6), changes, order)
            else:
                key = (1, round(abs(total - want), 6), changes, order)
            if best is None or key < best:
                best, best_combo = key, combo
        assert best is not None
        combo = best_combo
        adds = [i for i in range(n) if combo[i] and not steps_in[i]]
        rems = [i for i in range(n) if steps_in[i] and not combo[i]]
        add = max(adds, key=lambda i: (self.size_var[i], -i)) if adds else None
        rem = max(rems, key=lambda i: (self.size_var[i], -i)) if rems else None
        return add, rem

    def _wanted(
        self, d: float, q: float, q_t: float, steps_in: list[bool], now: float
    ) -> tuple[int, bool] | None:
        """The next operation, or None.

        Add a step when the deficit exceeds the response threshold and the step does
        not make the PF lead below the target; remove one when the PF leads below the
        target, or when removing it still leaves the PF at or above the target.
        """
        margin = self.cfg.response_threshold * min(self.size_var)
        add, rem = self._candidates(d, q, q_t, steps_in, now)
        if add is not None and q > 0 and d > margin and q - self.size_var[add] >= -q_t:
            return add, True
        if rem is not None and (q < -q_t or d + self.size_var[rem] < -margin):
            return rem, False
        return None

    def _choose(self, d: float, q: float, q_t: float, now: float) -> tuple[int, bool] | None:
        op = self._wanted(d, q, q_t, self.steps_in, now)
        if op is None:
            return None
        # no hunting: at constant load, the decisions that would follow must settle
        # without coming back to a state already seen
        far_future = now + self.cfg.reconnect_delay + 1.0  # every step discharged by then
        state = list(self.steps_in)
        seen = {tuple(state)}
        nxt: tuple[int, bool] | None = op
        while nxt is not None:
            step, value = nxt
            size = self.size_var[step]
            state[step] = value
            d, q = (d - size, q - size) if value else (d + size, q + size)
            if tuple(state) in seen:
                return None
            seen.add(tuple(state))
            nxt = self._wanted(d, q, q_t, state, far_future)
        return op

    def _learn_step(self, out: Decision, q_now: float, ts: float) -> None:
        if self._learn is None:
            return
        step, value, q_before, t_op = self._learn
        if ts < t_op + self.cfg.settle:
            return
        self._learn = None
        delta = (q_before - q_now) if value else (q_now - q_before)
        nominal = self.cfg.steps_kvar[step] * 1000.0
        if 0.3 * nominal <= delta <= 3.0 * nominal:
            old = self.size_var[step]
            self.size_var[step] = 0.5 * old + 0.5 * delta
        else:
            out.events.append(
                self._event(
                    "step_size_implausible",
                    EventState.NOTICE,
                    f"bank {self.cfg.name!r}: step {step + 1} changed Q by "
                    f"{delta / 1000:.2f} kvar, "
                    f"nominal {nominal / 1000:g} kvar: not learned (load changing, or a fault)",
                    {"step": step + 1, "delta_var": round(delta, 1)},
                )
            )
