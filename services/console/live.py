"""What the console shows, kept live from the bus: meters, alarms, banks, gateways.

Handlers update :class:`Live` as messages arrive and mark what changed; every
``period`` the broadcaster turns what changed into one Server-Sent-Events frame
that every open page receives (one encoding, however many pages). A meter whose
newest metrics are older than ``stale_after_intervals`` x its poll interval is
``stale`` (with its age), a meter behind an offline gateway is ``offline``: the
page never shows a frozen number as if it were live.

Operator actions are events on the bus (``alarm_ack``, ``alarm_shelved``,
``maintenance``): the console applies them when they come back from the broker, so
what every page shows is what was archived.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from shared.measurements import Measurement as M
from shared.messages import ActuatorState, Command, Event, EventState, GatewayStatus, Metrics
from shared.site import SiteConfig

Clock = Callable[[], float]
_V = (M.VOLTAGE_L1, M.VOLTAGE_L2, M.VOLTAGE_L3)
_I = (M.CURRENT_L1, M.CURRENT_L2, M.CURRENT_L3)
_THD_I = (M.THD_CURRENT_L1, M.THD_CURRENT_L2, M.THD_CURRENT_L3)
#: codes of the console's own audit events
CONSOLE_CODES = ("alarm_ack", "alarm_shelved", "maintenance", "operator_request")


def _num(x: float | None, digits: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


def display(m: Metrics) -> dict[str, Any]:
    """One meter's numbers as the page shows them (kW, kvar, kVA, V, A, %)."""
    v = m.values
    p, q, s = v.get(M.POWER), v.get(M.REACTIVE_POWER), v.get(M.APPARENT_POWER)
    q_abs = None
    if q is None and p is not None and s is not None:
        q_abs = math.sqrt(max(0.0, s * s - p * p))  # magnitude-only meter: no sign
    thd = [v[k] for k in _THD_I if k in v]
    return {
        "pf": _num(v.get(M.POWER_FACTOR), 3),
        "kw": _num(p / 1000 if p is not None else None, 2),
        "kvar": _num(q / 1000 if q is not None else None, 2),
        "kvar_abs": _num(q_abs / 1000 if q_abs is not None else None, 2),
        "kva": _num(s / 1000 if s is not None else None, 2),
        "v": [_num(v[k], 1) for k in _V if k in v],
        "a": [_num(v[k], 1) for k in _I if k in v],
        "thd_i": _num(max(thd), 1) if thd else None,
        "hz": _num(v.get(M.FREQUENCY, v.get(M.FREQUENCY_L1)), 2),
        "load": str(m.load.get("total", "unknown")),
        "ts": m.ts.timestamp(),
        "seq": m.seq,
    }


def alarm_id(meter: str, code: str, phase: str | None) -> str:
    return f"{meter}|{code}|{phase or ''}"


def _event_dict(ev: Event) -> dict[str, Any]:
    return {
        "meter": ev.meter,
        "code": ev.code,
        "state": ev.state.value,
        "severity": ev.severity.value,
        "phase": ev.phase,
        "message": ev.message,
        "evidence": ev.evidence,
        "service": ev.service,
        "ts": ev.ts.timestamp(),
    }


class Live:
    """The console's picture of the site."""

    def __init__(self, site: SiteConfig, *, clock: Clock = time.time) -> None:
        self.site = site
        self.clock = clock
        self.stale_n = site.console.stale_after_intervals
        self.interval = {m.name: m.interval_s for m in site.meters}
        self.meters: dict[str, dict[str, Any]] = {}
        self.status: dict[str, tuple[str, float | None]] = {}
        self.alarms: dict[str, dict[str, Any]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        self.maintenance: dict[str, dict[str, Any]] = {}  # meter -> who, why, since
        self.states: dict[str, dict[str, Any]] = {}  # device -> state
        self.commands: dict[str, deque[dict[str, Any]]] = {}
        self.off_at: dict[tuple[str, int], float] = {}  # (device, coil) -> ts it went off
        self.gateways: dict[str, dict[str, Any]] = {}
        self._dirty_meters: set[str] = set()
        self._dirty: set[str] = set()
        self.clients: set[asyncio.Queue[bytes | None]] = set()
        self.frames = 0

    # -- bus handlers ----------------------------------------------------------------

    def on_metrics(self, m: Metrics) -> None:
        if m.aggregate:
            return
        old = self.meters.get(m.meter)
        if old is not None and old["ts"] > m.ts.timestamp():
            return  # an older message re-delivered: keep the newest
        self.meters[m.meter] = display(m)
        self._dirty_meters.add(m.meter)

    def on_event(self, ev: Event) -> None:
        d = _event_dict(ev)
        ev_ts = d["ts"]
        if ev.service == "console" and ev.code in CONSOLE_CODES:
            self._apply_console_event(ev, d)
        elif ev.state is EventState.RAISED:
            key = alarm_id(ev.meter, ev.code, ev.phase)
            old = self.alarms.get(key)
            if old is None or old["ts"] <= ev_ts:
                self.alarms[key] = {**d, "id": key, "since": ev_ts, "ack": None, "shelved": None}
        elif ev.state is EventState.CLEARED:
            self.alarms.pop(alarm_id(ev.meter, ev.code, ev.phase), None)
        self.recent.appendleft(d)
        self._dirty.add("alarms")
        if ev.service == "actuator":
            self._dirty.add("banks")

    def _apply_console_event(self, ev: Event, d: dict[str, Any]) -> None:
        e = ev.evidence
        user = str(e.get("user", ""))
        if ev.code in ("alarm_ack", "alarm_shelved"):
            key = alarm_id(ev.meter, str(e.get("code", "")), e.get("phase") or None)  # type: ignore[arg-type]
            alarm = self.alarms.get(key)
            if alarm is None:
                return
            if ev.code == "alarm_ack":
                alarm["ack"] = {"user": user, "ts": d["ts"]}
            else:
                until = e.get("until")
                alarm["shelved"] = {
                    "user": user,
                    "until": float(until) if isinstance(until, int | float) else None,
                    "reason": str(e.get("reason", "")),
                }
        elif ev.code == "maintenance" and e.get("kind") == "meter":
            if ev.state is EventState.RAISED:
                self.maintenance[ev.meter] = {
                    "user": user,
                    "reason": str(e.get("reason", "")),
                    "since": d["ts"],
                }
            else:
                self.maintenance.pop(ev.meter, None)
            self._dirty_meters.add(ev.meter)
            self._dirty.add("maintenance")

    def on_state(self, st: ActuatorState) -> None:
        self.states[st.device] = {
            "online": st.online,
            "coils": {str(k): v for k, v in st.coils.items()},
            "steps_in": st.steps_in,
            "operations": {str(k): v for k, v in st.operations.items()},
            "modes": dict(st.modes),
            "message": st.message,
            "ts": st.ts.timestamp(),
        }
        self._dirty.add("banks")

    def on_command(self, c: Command) -> None:
        q = self.commands.setdefault(c.device, deque(maxlen=20))
        q.appendleft(
            {
                "ts": c.ts.timestamp(),
                "address": c.address,
                "value": c.value,
                "reason": c.reason,
                "origin": c.origin,
                "dry_run": c.dry_run,
            }
        )
        if not c.value and not c.dry_run:
            self.off_at[(c.device, c.address)] = c.ts.timestamp()
        self._dirty.add("banks")

    def on_status(self, st: GatewayStatus) -> None:
        self.gateways[st.gateway] = {"status": st.status, "ts": st.ts.timestamp()}
        self._dirty.add("gateways")
        self._dirty_meters.update(self.interval)

    # -- views -----------------------------------------------------------------------

    def meter_status(self, name: str, now: float) -> tuple[str, float | None]:
        """``live``, ``stale`` (with age), ``offline`` (gateway down) or ``nodata``."""
        gw = self.gateways.get(self.site.gateway)
        m = self.meters.get(name)
        age = None if m is None else max(0.0, now - m["ts"])
        if gw is not None and gw["status"] == "offline":
            return "offline", age
        if m is None or age is None:
            return "nodata", None
        if age > self.stale_n * self.interval.get(name, 1.0):
            return "stale", round(age, 1)
        return "live", None

    def banks(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for b in self.site.banks:
            st = self.states.get(b.device, {})
            coils = st.get("coils", {})
            ops = st.get("operations", {})
            steps = []
            for i, (kvar, coil) in enumerate(zip(b.steps_kvar, b.step_coils, strict=True)):
                off = self.off_at.get((b.device, coil))
                left = None
                if off is not None and not coils.get(str(coil), False):
                    left = b.reconnect_delay - (now - off)
                    left = round(left, 1) if left > 0 else None
                steps.append(
                    {
                        "step": i + 1,
                        "kvar": kvar,
                        "coil": coil,
                        "in": coils.get(str(coil)),
                        "operations": ops.get(str(i + 1), 0),
                        "wear_pct": round(100.0 * ops.get(str(i + 1), 0) / b.operation_limit, 2),
                        "lockout_s": left,
                    }
                )
            events = [
                e
                for e in self.recent
                if e["meter"] == b.device and e["evidence"].get("bank") in (b.name, None)
            ][:20]
            out[b.name] = {
                "name": b.name,
                "meter": b.meter,
                "device": b.device,
                "target_pf": b.target_pf,
                "reconnect_delay_s": b.reconnect_delay,
                "min_interval_s": b.min_interval,
                "operation_limit": b.operation_limit,
                "mode": st.get("modes", {}).get(b.name, "unknown" if not st else "auto"),
                "online": st.get("online"),
                "message": st.get("message", ""),
                "steps": steps,
                "kvar_in": sum(s["kvar"] for s in steps if s["in"]),
                "commands": list(self.commands.get(b.device, ()))[:20],
                "events": events,
            }
        return out

    def alarm_list(self, now: float) -> list[dict[str, Any]]:
        out = []
        for a in self.alarms.values():
            sh = a.get("shelved")
            if sh and sh.get("until") is not None and sh["until"] < now:
                a["shelved"] = None
            out.append({**a, "maintenance": a["meter"] in self.maintenance})
        out.sort(key=lambda a: (a["severity"] != "critical", -a["since"]))
        return out

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "t": now,
            "meters": self.meters,
            "status": {n: self.meter_status(n, now) for n in self.interval},
            "maintenance": self.maintenance,
            "alarms": self.alarm_list(now),
            "recent": list(self.recent)[:50],
            "banks": self.banks(now),
            "gateways": self.gateways,
        }

    # -- broadcasting ----------------------------------------------------------------

    def frame(self) -> bytes | None:
        """What changed since the last frame, as one SSE ``update``; None if nothing."""
        now = self.clock()
        out: dict[str, Any] = {"t": now}
        status: dict[str, tuple[str, float | None]] = {}
        for name in self.interval:
            st = self.meter_status(name, now)
            if st != self.status.get(name):
                status[name] = st
                self.status[name] = st
        if status:
            out["status"] = status
        if self._dirty_meters:
            out["meters"] = {n: self.meters[n] for n in self._dirty_meters if n in self.meters}
            self._dirty_meters.clear()
        if "maintenance" in self._dirty:
            out["maintenance"] = self.maintenance
        if "alarms" in self._dirty or any(
            a.get("shelved") and (a["shelved"].get("until") or math.inf) < now
            for a in self.alarms.values()
        ):
            out["alarms"] = self.alarm_list(now)
            out["recent"] = list(self.recent)[:50]
        banks = self.banks(now)
        if "banks" in self._dirty or any(
            s["lockout_s"] for b in banks.values() for s in b["steps"]
        ):
            out["banks"] = banks
        if "gateways" in self._dirty:
            out["gateways"] = self.gateways
        self._dirty.clear()
        if len(out) == 1:
            return None
        return b"event: update\ndata: " + orjson.dumps(out) + b"\n\n"

    def publish(self, frame: bytes) -> None:
        self.frames += 1
        for q in list(self.clients):
            try:
                q.put_nowait(frame)
            except asyncio.QueueFull:
                # a page that cannot keep up is closed; it reconnects and gets a snapshot
                self.clients.discard(q)
                with contextlib.suppress(asyncio.QueueFull):
                    q.get_nowait()
                    q.put_nowait(None)

    async def broadcast(self, period: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            frame = self.frame()
            if frame is not None:
                self.publish(frame)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
