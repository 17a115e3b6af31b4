"""Home Assistant MQTT discovery: the site's meters (and, if allowed, its bank steps) as
Home Assistant devices, from the ``homeassistant:`` section of the site file.

Every config is published retained under
``{prefix}/{component}/pfm-{site}/{object_id}/config``:

* ``sensor``: per meter its PF, P, Q, S, voltages, currents, THD, frequency and energy
  (the quantities chosen), with Home Assistant's ``device_class``, ``state_class`` and
  unit; the state is the meter's ``metrics`` topic, and a ``value_template`` takes the
  value from the ``pfm.metrics/2`` JSON (``values``); a message that does not carry it
  (or an aggregate) renders an empty string, which Home Assistant ignores;
* ``binary_sensor``: one per alarm of the alarm table (per phase where the alarm is)
  and one for the meter being offline, from the meter's ``event`` topic;
* ``switch``: only with ``allow_control: true``, per capacitor bank "Manual control"
  (a ``manual``/``auto`` request) and one per step (a ``step`` request, which the
  actuator accepts in manual mode), as ``pfm.request/1`` messages on the actuator's
  request topic (``pfm/v1/{site}/actuator/{device}/request``): the actuator carries them
  out under its interlocks - never a coil write;
* availability: the gateway's retained status (``online``/``offline``, the collector's
  last will).

One Home Assistant device per meter, with the manufacturer and model of its profile.
On every connection the collector reads the configs already retained for the site and
clears (empty retained payload) those it no longer publishes: a removed meter, a
quantity taken out, or everything with ``enabled: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from shared import __version__, topics
from shared.bus import Bus, BusUnavailable, Incoming
from shared.measurements import Measurement as M
from shared.settings import Settings
from shared.site import SiteConfig

__all__ = ["Discovery", "configs", "node_id", "publish"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Sensor:
    quantity: str
    measurement: M
    name: str
    device_class: str | None
    state_class: str
    unit: str | None
    per_phase: bool = False


def _phase(
    stem: str,
    quantity: str,
    name: str,
    dc: str | None,
    unit: str | None,
    state_class: str = "measurement",
) -> list[_Sensor]:
    return [
        _Sensor(quantity, M(f"{stem}_l{k}"), f"{name} L{k}", dc, state_class, unit, True)
        for k in (1, 2, 3)
    ]


#: what each quantity shows: Home Assistant's sensor device classes and their units
_SENSORS: tuple[_Sensor, ...] = (
    _Sensor("pf", M.POWER_FACTOR, "Power factor", "power_factor", "measurement", None),
    *_phase("power_factor", "pf", "Power factor", "power_factor", None),
    _Sensor("power", M.POWER, "Active power", "power", "measurement", "W"),
    *_phase("power", "power", "Active power", "power", "W"),
    _Sensor(
        "reactive_power", M.REACTIVE_POWER, "Reactive power", "reactive_power", "measurement", "var"
    ),
    *_phase("reactive_power", "reactive_power", "Reactive power", "reactive_power", "var"),
    _Sensor(
        "apparent_power", M.APPARENT_POWER, "Apparent power", "apparent_power", "measurement", "VA"
    ),
    *_phase("apparent_power", "apparent_power", "Apparent power", "apparent_power", "VA"),
    *_phase("voltage", "voltage", "Voltage", "voltage", "V"),
    *_phase("current", "current", "Current", "current", "A"),
    *_phase("thd_voltage", "thd", "Voltage THD", None, "%"),
    *_phase("thd_current", "thd", "Current THD", None, "%"),
    _Sensor("frequency", M.FREQUENCY, "Frequency", "frequency", "measurement", "Hz"),
    # meters that give the frequency per phase only: L1's is the system's
    _Sensor("frequency", M.FREQUENCY_L1, "Frequency", "frequency", "measurement", "Hz"),
    _Sensor("energy", M.IMPORT_ENERGY, "Imported energy", "energy", "total_increasing", "Wh"),
    _Sensor("energy", M.EXPORT_ENERGY, "Exported energy", "energy", "total_increasing", "Wh"),
    *_phase("import_energy", "energy", "Imported energy", "energy", "Wh", "total_increasing"),
)


def _available(m: M, has: set[M], phases: int) -> bool:
    """Whether the meter's metrics carry ``m``: what its profile reads, and what analytics
    derives from that (totals from the phases, S = V x I, PF = P / S). Q is never
    derived from magnitudes (its sign is unknown), so a magnitude-only meter has none."""
    if m in has:
        return True
    if m == M.FREQUENCY_L1:
        return False  # the total, when read, is already shown; else L1 is read or absent
    stem, _, k = m.value.rpartition("_l")
    if k.isdigit():  # per phase
        if int(k) > phases:
            return False
        if stem in ("apparent_power", "power_factor"):
            return M(f"voltage_l{k}") in has and M(f"current_l{k}") in has
        return False
    if m in (M.POWER_FACTOR, M.APPARENT_POWER, M.POWER):
        return any(M(f"current_l{k}") in has for k in range(1, phases + 1))
    if m is M.REACTIVE_POWER:
        return any(M(f"reactive_power_l{k}") in has for k in range(1, phases + 1))
    return False


#: alarms that only a three-phase meter can raise
_THREE_PHASE_ONLY = frozenset({"unbalance", "broken_neutral"})


def _total_shown(m: M, has: set[M], phases: int) -> bool:
    """Whether the total of per-phase ``m`` is shown (e.g. ``power`` for ``power_l1``)."""
    try:
        total = M(m.value.rpartition("_l")[0])
    except ValueError:  # voltage, current: no total
        return False
    return _available(total, has, phases)


def node_id(site: str) -> str:
    return f"pfm-{site}"


def _value_template(m: M) -> str:
    key = m.value
    return (
        f"{{% if not value_json.get('aggregate') and '{key}' in value_json['values'] %}}"
        f"{{{{ value_json['values']['{key}'] }}}}{{% endif %}}"
    )


def _event_template(codes: list[str], phase: str | None) -> str:
    phase_test = "value_json.phase is none" if phase is None else f"value_json.phase == '{phase}'"
    return (
        f"{{% if value_json.code in {codes!r} and {phase_test} %}}"
        "{{ {'raised': 'ON', 'cleared': 'OFF'}.get(value_json.state, '') }}{% endif %}"
    )


def _step_template(step: int) -> str:
    return f"{{{{ 'ON' if {step} in value_json.steps_in else 'OFF' }}}}"


def _request_template(site: str, device: str, bank: str, action: str) -> str:
    """A ``pfm.request/1`` request, rendered by Home Assistant (``now()``, ``value``):
    ``action`` is the JSON of the action's fields."""
    return (
        '{"schema": "pfm.request/1", '
        f'"site": "{site}", "device": "{device}", "bank": "{bank}", '
        '"ts": "{{ now().isoformat() }}", "seq": {{ (as_timestamp(now()) * 1000) | int }}, '
        f"{action}, "
        '"user": "homeassistant", "reason": "switched in Home Assistant"}'
    )


def _step_command(site: str, device: str, bank: str, step: int) -> str:
    """Step ``step`` in (``ON``) or out: a ``step`` request."""
    action = (
        f'"action": "step", "step": {step}, "on": {{{{ "true" if value == "ON" else "false" }}}}'
    )
    return _request_template(site, device, bank, action)


def _mode_command(site: str, device: str, bank: str) -> str:
    """Manual control on (``ON``: the controller holds, steps switch by hand) or back to
    the controller (``auto``)."""
    action = '"action": "{{ "manual" if value == "ON" else "auto" }}"'
    return _request_template(site, device, bank, action)


def _mode_template(bank: str) -> str:
    return f"{{{{ 'ON' if value_json.get('modes', {{}}).get('{bank}') == 'manual' else 'OFF' }}}}"


def configs(site: SiteConfig) -> dict[str, dict[str, Any]]:
    """Every discovery config the site's ``homeassistant:`` section asks for, by topic."""
    from services.analytics.alarms import ALARMS
    from services.collector.profiles import resolve

    ha = site.homeassistant
    if ha is None or not ha.enabled:
        return {}
    node = node_id(site.site)
    status = topics.gateway_status(site.site, site.gateway)
    availability = [
        {
            "topic": status,
            "value_template": "{{ value_json.status }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    origin = {"name": "pfmon", "sw_version": __version__}
    out: dict[str, dict[str, Any]] = {}

    def add(component: str, object_id: str, config: dict[str, Any]) -> None:
        config = {
            "unique_id": f"{node}-{object_id}",
            **config,
            "availability": availability,
            "origin": origin,
        }
        out[f"{ha.prefix}/{component}/{node}/{object_id}/config"] = config

    wanted = set(ha.quantities)
    chosen = [m for m in site.meters if ha.meters is None or m.name in ha.meters]
    for meter in chosen:
        if meter.bacnet is not None:
            from services.collector import bacnet

            bprofile = bacnet.resolve(meter.profile, site.bacnet_profiles)
            profile = bprofile.as_profile()
            has = set(bprofile.objects)
        else:
            profile = resolve(meter.profile, site.profiles)
            has = set(profile.registers)
        phases = profile.phases
        device = {
            "identifiers": [f"{node}-{meter.name}"],
            "name": f"{meter.name} ({site.site})",
            "manufacturer": profile.manufacturer or "unknown",
            "model": profile.model or profile.description or profile.name,
            "sw_version": profile.name,
        }
        state = topics.metrics(site.site, meter.name)
        for s in _SENSORS:
            if s.quantity not in wanted or not _available(s.measurement, has, phases):
                continue
            if s.measurement is M.FREQUENCY_L1 and M.FREQUENCY in has:
                continue
            if phases == 1 and s.per_phase and _total_shown(s.measurement, has, phases):
                continue  # a single-phase meter: its total is its only phase
            config: dict[str, Any] = {
                "name": s.name,
                "state_topic": state,
                "value_template": _value_template(s.measurement),
                "state_class": s.state_class,
                "device": device,
            }
            if s.device_class:
                config["device_class"] = s.device_class
            if s.unit:
                config["unit_of_measurement"] = s.unit
            add("sensor", f"{meter.name}_{s.measurement.value}", config)
        if not ha.alarms:
            continue
        event_topic = topics.event(site.site, meter.name)
        alarms: list[tuple[str, list[str], str | None, str]] = [
            ("device_offline", ["device_offline", "device_online"], None, "Offline")
        ]
        for a in ALARMS:
            if phases == 1 and a.code in _THREE_PHASE_ONLY:
                continue
            words = a.code.replace("_", " ").capitalize()
            if a.phased:
                alarms += [(f"{a.code}_l{k}", [a.code], f"L{k}", f"{words} L{k}")
                           for k in range(1, phases + 1)]  # fmt: skip
            else:
                alarms.append((a.code, [a.code], None, words))
        for object_id, codes, phase, name in alarms:
            add(
                "binary_sensor",
                f"{meter.name}_alarm_{object_id}",
                {
                    "name": f"Alarm: {name}",
                    "state_topic": event_topic,
                    "value_template": _event_template(codes, phase),
                    "device_class": "problem",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device": device,
                },
            )
    if ha.allow_control:
        for bank in site.banks:
            device = {
                "identifiers": [f"{node}-bank-{bank.name}"],
                "name": f"bank {bank.name} ({site.site})",
                "manufacturer": "pfmon",
                "model": f"capacitor bank, {len(bank.steps_kvar)} steps",
                "via_device": f"{node}-{bank.meter}",
            }
            state = topics.state(site.site, bank.device)
            command_topic = topics.request(site.site, bank.device)
            add(
                "switch",
                f"bank_{bank.name}_manual",
                {
                    "name": "Manual control",
                    "state_topic": state,
                    "value_template": _mode_template(bank.name),
                    "command_topic": command_topic,
                    "command_template": _mode_command(site.site, bank.device, bank.name),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device": device,
                },
            )
            for i, kvar in enumerate(bank.steps_kvar, start=1):
                add(
                    "switch",
                    f"bank_{bank.name}_step_{i}",
                    {
                        "name": f"Step {i} ({kvar:g} kvar)",
                        "state_topic": state,
                        "value_template": _step_template(i),
                        "command_topic": command_topic,
                        "command_template": _step_command(site.site, bank.device, bank.name, i),
                        "payload_on": "ON",
                        "payload_off": "OFF",
                        "device": device,
                    },
                )
    return out


class _Retained(BaseModel):
    """Any JSON object (a discovery config already on the broker)."""

    model_config = ConfigDict(extra="allow")


class Discovery:
    """Publishes the site's discovery configs and clears stale ones, once per connection."""

    def __init__(self, settings: Settings, site: SiteConfig, service: str) -> None:
        self.settings = settings
        self.site = site
        self.service = service
        self.published = 0
        self.cleared = 0
        self._task: asyncio.Task[None] | None = None

    async def on_connect(self, bus: Bus) -> None:
        """The collector's bus (re)connected: refresh in the background."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._refresh(bus), name="homeassistant-discovery"
            )

    async def _refresh(self, bus: Bus) -> None:
        try:
            await publish(self.settings, self.site, bus, self.service)
        except (BusUnavailable, TimeoutError) as exc:
            log.warning("Home Assistant discovery not refreshed: %s", exc)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def publish(
    settings: Settings,
    site: SiteConfig,
    bus: Bus,
    service: str,
    *,
    quiet_s: float = 0.5,
    max_wait_s: float = 5.0,
) -> tuple[int, int]:
    """Publish every config (retained) on ``bus`` and clear the stale ones; returns
    (published, cleared). The configs already retained are read on a connection of
    its own, so the service's persistent session never keeps that subscription."""
    ha = site.homeassistant
    if ha is None:
        return 0, 0
    wanted = configs(site)
    found: set[str] = set()
    arrived = asyncio.Event()

    async def seen(_: _Retained, incoming: Incoming) -> None:
        if incoming.retain:
            found.add(incoming.topic)
            arrived.set()

    reader = settings.model_copy(update={"mqtt_client_id": f"{bus.client_id}-discovery"})
    async with Bus(reader, service=service, site=site.site, persistent=False) as peek:
        peek.subscribe(f"{ha.prefix}/+/{node_id(site.site)}/+/config", _Retained, seen)
        await peek.wait_subscribed(max_wait_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        while loop.time() < deadline:  # retained configs come at once: wait for a pause
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), quiet_s)
            except TimeoutError:
                break
    for topic, config in wanted.items():
        await bus.publish(topic, orjson.dumps(config), retain=True)
    stale = sorted(found - set(wanted))
    for topic in stale:
        await bus.publish(topic, b"", retain=True)
    log.info(
        "Home Assistant discovery: %d config(s) published under %s/, %d stale one(s) cleared",
        len(wanted), ha.prefix, len(stale),
    )  # fmt: skip
    return len(wanted), len(stale)
