"""Energy balance of the switchboard: each parent meter against the sum of its children.

A parent meter (any meter some other meter names as ``parent``) measures everything
downstream of it; its child meters measure parts of that. With every CT the right
way round and every ratio right, the children add up to at most the parent: the
rest is the **unmetered** share (loads without their own meter, losses). Children
that add up to *more* than their parent mean a reversed CT, a wrong CT/PT ratio or a
meter on the wrong feeder - the commissioning check an electrician does by hand.

How it is computed, per parent, each time the parent's instantaneous metrics are
made: the active power of the parent and of each child, averaged over the alarm
slot (``analytics.alarm_slot_s``, the window the other alarms look at: the mean of
the meter's instantaneous total P of that many seconds, kept here so that the
engine's averages need not be built as dicts; the signed P, so a generation child
counts as negative while it exports). The sum is
evaluated only when every child has metrics that are recent (not older than the
parent's by more than three of the child's poll intervals, and never less than the
slot): a child that stopped reporting is not taken for zero.

* ``unmetered_power`` (W) = parent - sum(children) goes out in the parent's metrics
  message and in the gauge ``pfm_analytics_unmetered_power_watts{meter}``;
* the alarm ``energy_balance`` (on the parent meter) is raised when the children
  exceed the parent by more than ``limits.energy_balance_margin_pct`` % of |parent|
  and cleared when the excess is below that margin minus
  ``limits.energy_balance_hysteresis_pct``; with |parent| below
  ``limits.energy_balance_min_parent_w`` it is not evaluated (a near-idle parent
  would flap). Its timing (``alarms.energy_balance``) works as every alarm's does.
  Its definition (severity, default timings, the condition :func:`energy_balance`,
  the docs' words) is the ``energy_balance`` entry of ``alarms.ALARMS``, with scope
  ``parent``: the engine does not judge it on one meter's inputs, this module does.
  The evidence: the parent's kW, the children's sum, each child's kW, the excess and
  the margin.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from services.analytics.alarms import BY_CODE, Alarm, Evidence, energy_balance, timings
from shared.messages import EventState
from shared.site import SiteConfig

CODE = "energy_balance"
#: a child's average may be this many of its poll intervals older than the parent's
STALE_INTERVALS = 3.0


@dataclass(slots=True)
class Balance:
    """One evaluation of a parent: powers in W (signed, load convention)."""

    parent: str
    parent_w: float
    children_w: dict[str, float]
    #: RAISED/CLEARED when the alarm changed with this evaluation
    transition: EventState | None = None
    evidence: Evidence = field(default_factory=dict)

    @property
    def children_sum_w(self) -> float:
        return sum(self.children_w.values())

    @property
    def unmetered_w(self) -> float:
        return self.parent_w - self.children_sum_w


class EnergyBalance:
    """The site's parents and children, each meter's latest average power, and one
    ``energy_balance`` alarm per parent."""

    def __init__(self, site: SiteConfig):
        cfg = site.analytics
        self.limits = cfg.limits
        self.margin_pct = cfg.limits.energy_balance_margin_pct
        #: the table's definition (``alarms.ALARMS``): severity, timings, conditions
        self.definition = BY_CODE[CODE]
        #: the averaging window whose active power is compared
        self.slot = f"{cfg.alarm_slot_s}s"
        self.window_s = float(cfg.alarm_slot_s)
        #: parent -> its child meters, in file order (one pass: sites of thousands)
        self.children: dict[str, list[str]] = {}
        for meter in site.meters:
            if meter.parent is not None:
                self.children.setdefault(meter.parent, []).append(meter.name)
        members = set(self.children) | {c for kids in self.children.values() for c in kids}
        self.stale_s = {
            m.name: max(float(cfg.alarm_slot_s), STALE_INTERVALS * m.interval_s)
            for m in site.meters
            if m.name in members
        }
        timing = timings(site)["energy_balance"]
        self.alarms = {p: Alarm(CODE, None, timing) for p in self.children}
        #: meter -> (time in s since the epoch, average P in W)
        self.latest: dict[str, tuple[float, float]] = {}
        #: meter -> the instantaneous P of the window, and their sum
        self._window: dict[str, deque[tuple[float, float]]] = {m: deque() for m in self.stale_s}
        self._sum: dict[str, float] = dict.fromkeys(self.stale_s, 0.0)

    def watches(self, meter: str) -> bool:
        """Whether ``meter`` is a parent or a child (its power is needed)."""
        return meter in self.stale_s

    def is_parent(self, meter: str) -> bool:
        return meter in self.children

    def observe(self, meter: str, ts: datetime, power_w: float | None) -> None:
        """One instantaneous total active power of ``meter`` (None: the input had none);
        its mean over the window becomes the meter's latest power."""
        t = ts.timestamp()
        window = self._window[meter]
        total = self._sum[meter]
        if power_w is not None:
            window.append((t, power_w))
            total += power_w
        while window and window[0][0] <= t - self.window_s:
            total -= window.popleft()[1]
        if not window:
            self._sum[meter] = 0.0
            self.latest.pop(meter, None)
            return
        self._sum[meter] = total
        self.latest[meter] = (t, total / len(window))

    def evaluate(self, parent: str, ts: datetime) -> Balance | None:
        """The parent's balance now, and the alarm fed with it; None while the parent's
        or a child's power is unknown or stale (the alarm is then not fed)."""
        got = self.latest.get(parent)
        if got is None:
            return None
        t, parent_w = got
        children_w: dict[str, float] = {}
        for child in self.children[parent]:
            seen = self.latest.get(child)
            if seen is None or t - seen[0] > self.stale_s[child]:
                return None
            children_w[child] = seen[1]
        bal = Balance(parent, parent_w, children_w)
        evaluable, bad, good = energy_balance(parent_w, bal.children_sum_w, self.limits)
        alarm = self.alarms[parent]
        if not evaluable:
            # a near-idle parent: a pending raise/clear starts over
            alarm.update(t, False, False, dict)
            return bal
        bal.transition = alarm.update(t, bad, good, lambda: self._evidence(bal))
        if bal.transition is not None:
            bal.evidence = alarm.evidence
        return bal

    def _evidence(self, bal: Balance) -> Evidence:
        ref = abs(bal.parent_w)
        excess = bal.children_sum_w - bal.parent_w
        ev: Evidence = {
            "parent_kw": round(bal.parent_w / 1000.0, 3),
            "children_kw": round(bal.children_sum_w / 1000.0, 3),
            "unmetered_kw": round(bal.unmetered_w / 1000.0, 3),
            "excess_pct": round(100.0 * excess / ref, 2) if ref else None,
            "margin_pct": self.margin_pct,
            "slot": self.slot,
        }
        for child, w in bal.children_w.items():
            ev[f"child_{child}_kw"] = round(w / 1000.0, 3)
        return ev

    def message(self, bal: Balance) -> str:
        """The event's sentence for a transition."""
        ev = bal.evidence
        kids = ", ".join(bal.children_w)
        if bal.transition == EventState.RAISED:
            return (
                f"the meters below {bal.parent} ({kids}) add up to {ev['children_kw']} kW, "
                f"{ev['excess_pct']} % more than {bal.parent}'s {ev['parent_kw']} kW "
                f"(margin {self.margin_pct:g} %): a reversed CT, a wrong CT/PT ratio or a "
                "meter on the wrong feeder"
            )
        return (
            f"the meters below {bal.parent} ({kids}) add up to {ev['children_kw']} kW "
            f"against {bal.parent}'s {ev['parent_kw']} kW: within the margin again"
        )
