"""Relay actions: whole-site checks at load, and the engine that evaluates them.

:func:`check_site` finds every problem a site's actions and banks have (bad
expression with its column, unknown meter/device, two owners of one output) so
that the actuator refuses to start and ``pfmon rules check`` lists them all.

:class:`RelayEngine` evaluates each action on every metrics message of its
meter: it activates the action when the expression becomes true, and reverts
it only after the expression stayed false for ``recovery``. It never acts on
stale or incomplete data; it only returns :class:`Intent` objects (what to
drive and why), the output path does the writing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any

import yaml

from services.actuator.expr import CLOCK_TOKENS, TOKENS, ExprError, Expression, parse
from shared.errors import ConfigError
from shared.messages import Event, EventState, Metrics, Severity
from shared.site import SiteConfig, parse_site
from shared.site.actuator import OutputRef, RelayAction

log = logging.getLogger(__name__)

Clock = Callable[[], float]


# -- checks -----------------------------------------------------------------------------


def _expr_problem(index: int, when: object) -> tuple[str | None, Expression | None]:
    where = f"relay_actions[{index}].when"
    if not isinstance(when, str):
        return f"{where}: expected an expression in quotes, got {when!r}", None
    try:
        return None, parse(when)
    except ExprError as exc:
        return f"{where}: {exc} in {when!r}", None


def _conflicts(owners: Iterable[tuple[str, str, str]]) -> list[str]:
    """``owners`` = (output, owner label, where) -> one problem per output driven twice."""
    first: dict[str, tuple[str, str]] = {}
    problems = []
    for output, owner, where in owners:
        if output in first and first[output][0] != owner:
            problems.append(
                f"{where}: output {output} is driven by both {first[output][0]} and {owner} "
                "(conflicting outputs: give each output one owner)"
            )
        first.setdefault(output, (owner, where))
    return problems


def check_site(site: SiteConfig) -> list[str]:
    """Every problem of the site's relay actions and banks (empty list = fine)."""
    problems: list[str] = []
    meters = {m.name for m in site.meters}
    devices = {d.name: d for d in site.devices}
    slots = {f"{s}s" for s in site.analytics.average_slots_s}
    owners: list[tuple[str, str, str]] = []
    names: dict[str, int] = {}
    for i, action in enumerate(site.relay_actions):
        if action.name in names:
            problems.append(
                f"relay_actions[{i}].name: {action.name!r} is already used by "
                f"relay_actions[{names[action.name]}]"
            )
        names.setdefault(action.name, i)
        problem, expr = _expr_problem(i, action.when)
        if problem:
            problems.append(problem)
        if expr is not None and expr.clock_names and site.timezone is None:
            problems.append(
                f"relay_actions[{i}].when: reads the clock ({', '.join(expr.clock_names)}) "
                "but the site file has no timezone: - add one at the top level (an IANA "
                "name, e.g. timezone: Europe/Berlin, or timezone: UTC)"
            )
        if action.meter not in meters:
            problems.append(
                f"relay_actions[{i}].meter: no meter named {action.meter!r} "
                f"(meters: {', '.join(sorted(meters)) or 'none'})"
            )
        if action.average is not None and action.average not in slots:
            problems.append(
                f"relay_actions[{i}].average: analytics publishes no {action.average} average "
                f"(slots: {', '.join(sorted(slots, key=lambda s: int(s[:-1])))} or none)"
            )
        for j, out in enumerate(action.outputs):
            where = f"relay_actions[{i}].outputs[{j}]"
            problems += _output_problems(out, where, devices)
            owners.append((str(out), f"relay action {action.name!r}", where))
    for i, bank in enumerate(site.banks):
        where = f"banks[{i}]"  # its meter is checked with the topology (shared.site)
        if bank.average is not None and bank.average not in slots:
            problems.append(f"{where}.average: analytics publishes no {bank.average} average")
        dev = devices.get(bank.device)
        if dev is None:
            problems.append(f"{where}.device: no device named {bank.device!r}")
        elif dev.kind == "pmtr001":
            problems.append(
                f"{where}.device: {bank.device!r} is a PMTR_001 meter, not a coil device"
            )
        for j, coil in enumerate(bank.step_coils):
            if dev is not None and coil >= dev.coils:
                problems.append(
                    f"{where}.coils[{j}]: coil {coil} is beyond the {dev.coils} coils of "
                    f"{bank.device!r}"
                )
            owners.append(
                (f"{bank.device}:coil:{coil}", f"bank {bank.name!r}", f"{where}.coils[{j}]")
            )
    problems += _conflicts(owners)
    problems += _upload_problems(site)
    return problems


def uploads(site: SiteConfig) -> dict[str, list[Any]]:
    """PMTR_001 device name -> the :class:`~services.actuator.pmtr.Upload` of its actions.

    Raises :class:`~services.actuator.pmtr.UploadError` for the first action the
    firmware cannot express (:func:`check_site` lists them all).
    """
    from services.actuator.pmtr import encode

    out: dict[str, list[Any]] = {}
    for action in site.relay_actions:
        devs = {o.device for o in action.outputs if o.table == "pin"}
        for dev in sorted(devs):
            slot = len(out.setdefault(dev, []))
            out[dev].append(encode(action, slot))
    return out


def _upload_problems(site: SiteConfig) -> list[str]:
    from services.actuator.pmtr import UploadError, encode

    problems = []
    devices = {d.name: d for d in site.devices}
    meters = {m.name: m for m in site.meters}
    slots: dict[str, int] = {}
    for i, action in enumerate(site.relay_actions):
        pin_devs = sorted({o.device for o in action.outputs if o.table == "pin"})
        if not pin_devs:
            continue
        if len(pin_devs) != 1 or any(o.table != "pin" for o in action.outputs):
            problems.append(
                f"relay_actions[{i}].outputs: an action uploaded to a PMTR_001 drives the pins "
                "of that one meter only"
            )
            continue
        dev = devices.get(pin_devs[0])
        meter = meters.get(action.meter)
        if dev is None or meter is None:
            continue  # reported above
        if (meter.bus, meter.unit) != (dev.bus, dev.unit):
            problems.append(
                f"relay_actions[{i}].meter: {action.meter!r} is not the PMTR_001 {dev.name!r} "
                f"(bus {dev.bus}, unit {dev.unit}): the firmware evaluates its own measurements"
            )
        slot = slots.get(dev.name, 0)
        slots[dev.name] = slot + 1
        try:
            encode(action, slot)
        except ExprError:
            continue  # the expression's own problem is listed with its column already
        except UploadError as exc:
            problems.append(f"relay_actions[{i}]: cannot upload to PMTR_001 {dev.name!r}: {exc}")
    return problems


def _output_problems(out: OutputRef, where: str, devices: dict[str, Any]) -> list[str]:
    dev = devices.get(out.device)
    if dev is None:
        known = ", ".join(sorted(devices)) or "none"
        return [f"{where}: no device named {out.device!r} (devices: {known})"]
    if dev.kind == "pmtr001" and out.table != "pin":
        return [f"{where}: {out.device!r} is a PMTR_001: its outputs are pins (device:pin:N)"]
    if dev.kind != "pmtr001" and out.table != "coil":
        return [f"{where}: {out.device!r} is a {dev.kind} device: its outputs are coils"]
    if out.table == "coil" and out.address >= dev.coils:
        return [f"{where}: coil {out.address} is beyond the {dev.coils} coils of {out.device!r}"]
    if out.table == "pin" and out.address > 255:
        return [f"{where}: pin {out.address} is not a PMTR_001 pin (0-255)"]
    return []


def _raw_checks(data: dict[str, Any]) -> list[str]:
    """Expression and conflict checks on an unparsed file (when other fields are bad)."""
    problems: list[str] = []
    owners: list[tuple[str, str, str]] = []
    actions = data.get("relay_actions") or []
    if not isinstance(actions, list):
        return problems
    for i, raw in enumerate(actions):
        if not isinstance(raw, dict):
            continue
        if "when" in raw:
            problem, _ = _expr_problem(i, raw["when"])
            if problem:
                problems.append(problem)
        outputs = raw.get("outputs")
        if isinstance(outputs, list):
            for j, out in enumerate(outputs):
                owners.append(
                    (
                        str(out).strip(),
                        f"relay action {raw.get('name')!r}",
                        f"relay_actions[{i}].outputs[{j}]",
                    )
                )
    return problems + _conflicts(owners)


def check_file(path: Path | str) -> list[str]:
    """Every problem of a site file (YAML, fields, actions, banks); empty = fine."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror or exc}"]
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {exc}"]
    try:
        site = parse_site(data, str(path))
    except ConfigError as exc:
        problems = list(exc.problems) or [str(exc)]
        if isinstance(data, dict):
            problems += [p for p in _raw_checks(data) if p not in problems]
        return problems
    return check_site(site)


def load_actions(site: SiteConfig) -> list[CompiledAction]:
    """Compiled actions of a site; raises :class:`ConfigError` listing every problem."""
    problems = check_site(site)
    if problems:
        raise ConfigError(f"site {site.site!r}: {len(problems)} actuator problem(s)", problems)
    return [CompiledAction(a, parse(a.when)) for a in site.relay_actions]


# -- engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledAction:
    config: RelayAction
    expr: Expression

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True, slots=True)
class Intent:
    """Drive ``device`` ``table``/``address`` to ``value``, and why."""

    device: str
    table: str
    address: int
    value: bool
    reason: str
    origin: str
    trigger: dict[str, float | str | bool | None]
    dry_run: bool = False


@dataclass
class ActionState:
    active: bool = False
    false_since: float | None = None
    last_eval_ts: float | None = None
    blocked: str | None = None  # stale / missing: reported once per episode


@dataclass
class EngineResult:
    intents: list[Intent] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stale_meters: list[str] = field(default_factory=list)


def clock_values(m: Metrics, zone: tzinfo) -> dict[str, float]:
    """The clock tokens for ``m``: its acquisition time (``ts``) in the site's ``zone``
    (never the process's clock, so that a replay decides as the live run did)."""
    local = m.ts.astimezone(zone)
    return {
        "hour": float(local.hour),
        "minute": float(local.minute),
        "weekday": float(local.isoweekday()),
        "month": float(local.month),
    }


def env_for(
    expr: Expression, m: Metrics, average: str | None, zone: tzinfo = UTC
) -> tuple[dict[str, float], list[str]]:
    """Token values of ``m`` for ``expr`` (SI; clock tokens in ``zone``), and the tokens
    the message lacks."""
    env: dict[str, float] = {}
    missing: list[str] = []
    avg = m.averages.get(average) if average is not None else None
    if expr.clock_names:
        clock = clock_values(m, zone)
        env.update((name, clock[name]) for name in expr.clock_names)
    for name in expr.names:
        if name in CLOCK_TOKENS:
            continue
        spec = TOKENS[name]
        src = m.values if (average is None or not spec.averaged) else avg
        value = src.get(spec.measurement) if src is not None else None
        if value is None or not math.isfinite(value):
            missing.append(name)
        else:
            env[name] = value * spec.factor
    return env, missing


class RelayEngine:
    """Evaluates relay actions; returns intents and events. ``clock`` = wall seconds (for
    staleness only); ``zone`` = the site's time zone, for the clock tokens."""

    def __init__(
        self,
        site: str,
        actions: list[CompiledAction],
        *,
        stale_after_s: float,
        clock: Clock = time.time,
        zone: tzinfo = UTC,
    ) -> None:
        self.site = site
        self.zone = zone
        self.actions = actions
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.state: dict[str, ActionState] = {a.name: ActionState() for a in actions}
        self.by_meter: dict[str, list[CompiledAction]] = {}
        for a in actions:
            self.by_meter.setdefault(a.config.meter, []).append(a)
        self._seq = 0
        self._started = clock()
        self._last_ts: dict[str, float] = {}

    def _event(
        self, meter: str, code: str, state: EventState, message: str, evidence: dict[str, Any]
    ) -> Event:
        self._seq += 1
        return Event(
            site=self.site,
            meter=meter,
            ts=_utc(self.clock()),
            seq=self._seq,
            code=code,
            state=state,
            severity=Severity.WARNING,
            message=message,
            evidence=evidence,
            service="actuator",
        )

    def tick(self) -> EngineResult:
        """Metrics that stopped arriving are stale too: report it (nothing switches)."""
        out = EngineResult()
        now = self.clock()
        for meter, actions in self.by_meter.items():
            last = self._last_ts.get(meter, self._started)
            age = now - last
            if age <= self.stale_after_s:
                continue
            for action in actions:
                st = self.state[action.name]
                if st.blocked == "stale":
                    continue
                st.blocked = "stale"
                out.stale_meters.append(meter)
                out.events.append(
                    self._event(
                        meter,
                        "stale_data",
                        EventState.NOTICE,
                        f"relay action {action.name!r}: no metrics from {meter!r} for "
                        f"{age:.1f}s (limit {self.stale_after_s:g}s); holding the outputs",
                        {"rule": action.name, "age_s": round(age, 3)},
                    )
                )
        return out

    def adopt(self, name: str, active: bool) -> None:
        """Start from what the outputs show (read back at start)."""
        self.state[name].active = active

    def on_metrics(self, m: Metrics) -> EngineResult:
        out = EngineResult()
        actions = self.by_meter.get(m.meter)
        if not actions:
            return out
        ts = m.ts.timestamp()
        age = self.clock() - ts
        stale = age > self.stale_after_s
        if not stale:
            self._last_ts[m.meter] = max(ts, self._last_ts.get(m.meter, ts))
        if stale:
            out.stale_meters.append(m.meter)
        for action in actions:
            st = self.state[action.name]
            cfg = action.config
            if stale:
                if st.blocked != "stale":
                    st.blocked = "stale"
                    out.events.append(
                        self._event(
                            m.meter,
                            "stale_data",
                            EventState.NOTICE,
                            f"relay action {cfg.name!r}: metrics of {m.meter!r} are {age:.1f}s "
                            f"old (limit {self.stale_after_s:g}s); not switching",
                            {"rule": cfg.name, "age_s": round(age, 3)},
                        )
                    )
                continue
            env, missing = env_for(action.expr, m, cfg.average, self.zone)
            if missing:
                if st.blocked != "missing":
                    st.blocked = "missing"
                    slot = cfg.average or "instantaneous"
                    out.events.append(
                        self._event(
                            m.meter,
                            "rule_missing_data",
                            EventState.NOTICE,
                            f"relay action {cfg.name!r}: {m.meter!r} sent no {slot} value for "
                            f"{', '.join(missing)}; not switching",
                            {"rule": cfg.name, "missing": ", ".join(missing)},
                        )
                    )
                continue
            st.blocked = None
            if st.last_eval_ts is not None and ts <= st.last_eval_ts:
                continue  # an old or duplicated message: never step back in time
            st.last_eval_ts = ts
            result = action.expr.evaluate(env)
            trigger: dict[str, float | str | bool | None] = dict(env)
            trigger["meter_seq"] = m.seq
            if result:
                st.false_since = None
                if not st.active:
                    st.active = True
                    out.intents += self._drive(
                        action, True, f"rule {cfg.name}: {cfg.when} became true", trigger
                    )
            elif st.active:
                if st.false_since is None:
                    st.false_since = ts
                if ts - st.false_since >= cfg.recovery:
                    st.active = False
                    st.false_since = None
                    out.intents += self._drive(
                        action,
                        False,
                        f"rule {cfg.name}: {cfg.when} false for {cfg.recovery:g}s (recovery)",
                        trigger,
                    )
        return out

    def _drive(
        self,
        action: CompiledAction,
        active: bool,
        reason: str,
        trigger: dict[str, float | str | bool | None],
    ) -> list[Intent]:
        cfg = action.config
        level_high = cfg.level == "high"
        value = level_high if active else not level_high
        return [
            Intent(
                device=o.device,
                table=o.table,
                address=o.address,
                value=value,
                reason=reason,
                origin=f"rule:{cfg.name}",
                trigger=trigger,
                dry_run=cfg.dry_run,
            )
            for o in cfg.outputs
            if o.table == "coil"
        ]


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)
