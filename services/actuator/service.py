"""The actuator service: relay actions and capacitor-bank control over Modbus coils.

Every metrics message of a meter is evaluated by the relay engine and the banks
that regulate on that meter; what they decide is written to the devices with
read-back verification, and every change is published as a ``command`` (with its
reason, origin and trigger values) followed by the retained ``state`` that the
device reports. A periodic tick checks stale data and reads the devices back.

An operator's :class:`~shared.messages.Request` (from the console, on the ``request``
topic only) holds a bank in manual or maintenance mode, switches a step by hand under
the controller's interlocks, or gives the bank back to the controller; every request
ends in an event that says what was done, or why it was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from services.actuator.controller import BankController, Decision, Op
from services.actuator.outputs import CoilDevice
from services.actuator.pmtr import upload
from services.actuator.rules import Intent, RelayEngine, load_actions, uploads
from shared import topics
from shared.bus import Bus, BusUnavailable, Incoming
from shared.errors import PeerError
from shared.messages import (
    ActuatorState,
    Command,
    Event,
    EventState,
    Metrics,
    Request,
    Severity,
    utcnow,
)
from shared.metrics import ServiceMetrics
from shared.modbus import ModbusConnection, quiet_library_logs
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
SERVICE = "actuator"


class ActuatorMetrics:
    """The actuator's Prometheus metrics (names used by the dashboards)."""

    def __init__(self, base: ServiceMetrics) -> None:
        r = base.registry
        self.commands = Counter(
            "pfm_actuator_commands_total", "Coil commands sent", ["device", "origin"], registry=r
        )
        self.write_errors = Counter(
            "pfm_actuator_write_errors_total",
            "Coil writes that failed or did not read back after retries",
            ["device"],
            registry=r,
        )
        self.steps_in = Gauge(
            "pfm_actuator_steps_in", "Capacitor steps in service (read back)", ["bank"], registry=r
        )
        self.step_operations = Counter(
            "pfm_actuator_step_operations_total",
            "Switching operations per capacitor step",
            ["bank", "step"],
            registry=r,
        )
        self.rule_active = Gauge(
            "pfm_actuator_rule_active", "1 while a relay action is active", ["rule"], registry=r
        )
        self.eval_seconds = Histogram(
            "pfm_actuator_eval_seconds",
            "Time to evaluate one metrics message (rules and banks, without writes)",
            buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05),
            registry=r,
        )
        self.stale = Counter(
            "pfm_actuator_stale_total",
            "Metrics messages (or ticks) found stale",
            ["meter"],
            registry=r,
        )


@dataclass
class Actuator:
    """Wiring of engine, controllers and devices to the bus (testable without a process)."""

    site: SiteConfig
    bus: Bus
    metrics: ServiceMetrics
    clock: Callable[[], float] = time.time
    devices: dict[str, CoilDevice] = field(default_factory=dict)
    banks: list[BankController] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.am = ActuatorMetrics(self.metrics)
        actions = load_actions(self.site)  # ConfigError listing every problem
        self.engine = RelayEngine(
            self.site.site,
            actions,
            stale_after_s=self.site.actuator.stale_after,
            clock=self.clock,
            zone=self.site.zone,
        )
        links: dict[str, ModbusConnection] = {}  # one connection per bus, shared by its devices
        for dev in self.site.devices:
            if dev.kind == "pmtr001":
                continue
            if dev.bus not in links:
                links[dev.bus] = ModbusConnection(self.site.bus(dev.bus))
            link = links[dev.bus]
            self.devices[dev.name] = CoilDevice(dev, link)
        self.banks = [BankController(self.site.site, b, clock=self.clock) for b in self.site.banks]
        self._lock = asyncio.Lock()
        for a in actions:
            self.am.rule_active.labels(a.name).set(0)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _publish(
        self, topic: str, message: Command | Event | ActuatorState, retain: bool = False
    ) -> None:
        try:
            await self.bus.publish(topic, message, retain=retain)
        except BusUnavailable as exc:
            log.warning("could not publish %s: %s", topic, exc)

    async def publish_event(self, ev: Event) -> None:
        ev.seq = self._next_seq()
        await self._publish(topics.event(self.site.site, ev.meter), ev)

    async def publish_state(self, dev: CoilDevice, message: str = "") -> None:
        steps_in: list[int] = []
        operations: dict[int, int] = {}
        modes = {b.cfg.name: b.mode for b in self.banks if b.cfg.device == dev.name}
        for bank in self.banks:
            if bank.cfg.device == dev.name:
                # what the device shows, also for a dry-run bank (which drives nothing)
                steps_in += [i + 1 for i, c in enumerate(bank.coils) if dev.coils.get(c)]
                if not bank.cfg.dry_run:  # a dry run's would-be operations are not real
                    operations.update({i + 1: n for i, n in enumerate(bank.operations)})
        state = ActuatorState(
            site=self.site.site,
            ts=utcnow(),
            seq=self._next_seq(),
            device=dev.name,
            online=dev.online,
            coils=dict(dev.coils),
            steps_in=steps_in,
            operations=operations,
            message=message or (dev.last_error or ""),
            modes=modes,
        )
        await self._publish(topics.state(self.site.site, dev.name), state, retain=True)

    def close(self) -> None:
        """Close the Modbus connections."""
        for dev in self.devices.values():
            dev.link.close()

    # -- start -----------------------------------------------------------------------

    async def upload_pmtr(self) -> None:
        """Upload the actions that drive PMTR_001 pins to their meters (verified)."""
        for name, items in uploads(self.site).items():
            cfg = next(d for d in self.site.devices if d.name == name)
            link = ModbusConnection(self.site.bus(cfg.bus))
            try:
                for item in items:
                    await upload(link, cfg.unit, item)
                    log.info(
                        "uploaded %s to %s slot %d: %s", item.action, name, item.slot, item.formula
                    )
            except PeerError as exc:
                await self.publish_event(
                    Event(
                        site=self.site.site,
                        meter=name,
                        ts=utcnow(),
                        seq=0,
                        code="upload_failed",
                        state=EventState.NOTICE,
                        severity=Severity.CRITICAL,
                        message=f"uploading relay actions to PMTR_001 {name!r} failed: {exc}",
                        service=SERVICE,
                    )
                )
            finally:
                link.close()

    async def start(self) -> None:
        """Read every device back; adopt what it shows; publish the retained states."""
        await self.upload_pmtr()
        for dev in self.devices.values():
            try:
                await dev.refresh()
            except PeerError as exc:
                log.warning("device %s offline at start: %s", dev.name, exc)
                await self.publish_event(self._device_event(dev, "device_offline", str(exc)))
            await self.publish_state(dev)
        for bank in self.banks:
            dev = self.devices[bank.cfg.device]
            if dev.online:
                bank.adopt(dev.coils)
            self._gauge(bank)
        for action in self.engine.actions:
            outs = [o for o in action.config.outputs if o.table == "coil"]
            level = action.config.level == "high"
            shown = [self.devices[o.device].coils.get(o.address) for o in outs]
            active = bool(outs) and all(v is level for v in shown)
            self.engine.adopt(action.name, active)
            self.am.rule_active.labels(action.name).set(int(active))

    def adopt_retained(self, state: ActuatorState) -> None:
        """Operation counters survive restarts through the retained state."""
        for bank in self.banks:
            if bank.cfg.device == state.device and state.operations:
                ops = {i - 1: n for i, n in state.operations.items()}
                for i in range(len(bank.operations)):
                    bank.operations[i] = max(bank.operations[i], ops.get(i, 0))
            if bank.cfg.device == state.device and bank.cfg.name in state.modes:
                bank.mode = state.modes[bank.cfg.name]  # an operator's hold survives restarts

    def _device_event(self, dev: CoilDevice, code: str, message: str) -> Event:
        return Event(
            site=self.site.site,
            meter=dev.name,
            ts=utcnow(),
            seq=0,
            code=code,
            state=EventState.NOTICE,
            severity=Severity.CRITICAL,
            message=message,
            service=SERVICE,
        )

    # -- handling --------------------------------------------------------------------

    async def on_metrics(self, m: Metrics) -> None:
        async with self._lock:
            t0 = time.perf_counter()
            result = self.engine.on_metrics(m)
            decisions = [(bank, bank.on_metrics(m)) for bank in self.banks]
            self.am.eval_seconds.observe(time.perf_counter() - t0)
            for meter in result.stale_meters:
                self.am.stale.labels(meter).inc()
            touched: set[str] = set()
            for intent in result.intents:
                await self._drive_intent(intent, touched)
            for action in self.engine.actions:
                self.am.rule_active.labels(action.name).set(
                    int(self.engine.state[action.name].active)
                )
            for ev in result.events:
                await self.publish_event(ev)
            for bank, decision in decisions:
                await self._apply(bank, decision, touched)
            for name in touched:
                await self.publish_state(self.devices[name])

    async def on_request(self, req: Request) -> None:
        """An operator's request: mode change or a step by hand, answered by an event."""
        async with self._lock:
            bank = next((b for b in self.banks if b.cfg.name == req.bank), None)
            if bank is None or bank.cfg.device != req.device:
                await self._request_event(req, f"no bank {req.bank!r} on device {req.device!r}")
                return
            dev = self.devices[bank.cfg.device]
            if req.action != "step":
                before = bank.mode
                bank.mode = "auto" if req.action == "auto" else req.action
                log.info("bank %s: %s -> %s (%s)", bank.cfg.name, before, bank.mode, req.user)
                await self._request_event(
                    req, None, f"bank {bank.cfg.name}: {before} -> {bank.mode} by {req.user}"
                )
                await self.publish_state(dev)
                return
            assert req.step is not None and req.on is not None
            if not dev.online:
                await self._request_event(req, f"device {dev.name!r} is offline")
                return
            op = bank.manual_step(req.step - 1, req.on, req.user)
            if isinstance(op, str):
                await self._request_event(req, op)
                return
            touched: set[str] = set()
            await self._drive_step(bank, op, touched)
            shown = dev.coils.get(op.coil)
            if shown is req.on:
                await self._request_event(req, None, op.reason)
            else:
                await self._request_event(
                    req, f"{op.reason}: the device shows {shown} (see command_failed)"
                )
            for name in touched:
                await self.publish_state(self.devices[name])

    async def _request_event(self, req: Request, refused: str | None, done: str = "") -> None:
        """``request_done`` (notice) or ``request_refused`` (warning, with why)."""
        evidence: dict[str, float | str | bool | None] = {
            "bank": req.bank,
            "action": req.action,
            "user": req.user,
            "reason": req.reason,
        }
        if req.step is not None:
            evidence["step"] = req.step
            evidence["on"] = req.on
        if refused is not None:
            log.warning("request of %s refused: %s", req.user, refused)
        await self.publish_event(
            Event(
                site=self.site.site,
                meter=req.device,
                ts=utcnow(),
                seq=0,
                code="request_refused" if refused is not None else "request_done",
                state=EventState.NOTICE,
                severity=Severity.WARNING if refused is not None else Severity.INFO,
                message=refused if refused is not None else done,
                evidence=evidence,
                service=SERVICE,
            )
        )

    async def tick(self) -> None:
        async with self._lock:
            result = self.engine.tick()
            for meter in result.stale_meters:
                self.am.stale.labels(meter).inc()
            for ev in result.events:
                await self.publish_event(ev)
            touched: set[str] = set()
            for bank in self.banks:
                decision = bank.tick()
                if any(e.code == "stale_data" for e in decision.events):
                    self.am.stale.labels(bank.cfg.meter).inc()
                await self._apply(bank, decision, touched)
            for name in touched:
                await self.publish_state(self.devices[name])

    async def poll(self, dev: CoilDevice) -> None:
        """Read a device back; publish its state when it changed or went on/offline."""
        async with self._lock:
            before = (dict(dev.coils), dev.online)
            try:
                await dev.refresh()
            except PeerError as exc:
                if before[1]:
                    await self.publish_event(self._device_event(dev, "device_offline", str(exc)))
            for bank in self.banks:
                if bank.cfg.device == dev.name and dev.online and not bank.cfg.dry_run:
                    for i, coil in enumerate(bank.coils):
                        shown = dev.coils.get(coil)
                        if shown is not None and shown != bank.steps_in[i]:
                            bank.feedback(i, shown)  # changed by hand: count it, honour discharge
                    self._gauge(bank)
            if (dict(dev.coils), dev.online) != before:
                await self.publish_state(dev)

    async def _apply(self, bank: BankController, decision: Decision, touched: set[str]) -> None:
        for op in decision.ops:
            await self._drive_step(bank, op, touched)
        for ev in decision.events:
            await self.publish_event(ev)

    async def _drive_step(self, bank: BankController, op: Op, touched: set[str]) -> None:
        intent = Intent(
            device=bank.cfg.device,
            table="coil",
            address=op.coil,
            value=op.value,
            reason=op.reason,
            origin=f"bank:{bank.cfg.name}",
            trigger=op.trigger,
            dry_run=bank.cfg.dry_run,
        )
        before = bank.operations[op.step]
        actual = await self._drive_intent(intent, touched)
        bank.feedback(op.step, op.value if bank.cfg.dry_run else actual)
        if bank.operations[op.step] > before and not bank.cfg.dry_run:
            self.am.step_operations.labels(bank.cfg.name, str(op.step + 1)).inc()
        self._gauge(bank)

    def _gauge(self, bank: BankController) -> None:
        dev = self.devices[bank.cfg.device]
        shown = sum(1 for c in bank.coils if dev.coils.get(c))
        self.am.steps_in.labels(bank.cfg.name).set(shown)

    async def _drive_intent(self, intent: Intent, touched: set[str]) -> bool | None:
        """Publish the command, write it (unless dry-run), verify; returns what the device shows."""
        dev = self.devices[intent.device]
        cmd = Command(
            site=self.site.site,
            ts=utcnow(),
            seq=self._next_seq(),
            device=intent.device,
            table="coil",
            address=intent.address,
            value=int(intent.value),
            reason=intent.reason,
            origin=intent.origin,
            trigger=intent.trigger,
            dry_run=intent.dry_run,
        )
        self.am.commands.labels(intent.device, intent.origin).inc()
        if intent.dry_run:
            log.info(
                "dry run: %s coil %d -> %d: %s",
                dev.name,
                intent.address,
                intent.value,
                intent.reason,
            )
            await self._publish(topics.command(self.site.site, intent.device), cmd)
            return None
        result = await dev.set(intent.address, intent.value)
        touched.add(dev.name)
        await self._publish(topics.command(self.site.site, intent.device), cmd)
        if not result.ok:
            self.am.write_errors.labels(dev.name).inc()
            shown = "unknown" if result.actual is None else str(int(result.actual))
            await self.publish_event(
                Event(
                    site=self.site.site,
                    meter=dev.name,
                    ts=utcnow(),
                    seq=0,
                    code="command_failed",
                    state=EventState.NOTICE,
                    severity=Severity.CRITICAL,
                    message=(
                        f"coil {intent.address} of {dev.name!r} not set to {int(intent.value)} "
                        "after "
                        f"{result.attempts} attempt(s): {result.error}; device shows {shown}"
                    ),
                    evidence={
                        "origin": intent.origin,
                        "address": intent.address,
                        "reason": intent.reason,
                    },
                    service=SERVICE,
                )
            )
        return result.actual


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    load_actions(site)  # a bad rule refuses the start before anything connects
    quiet_library_logs()  # write errors are classified and logged here, not by pymodbus
    metrics = ServiceMetrics(SERVICE, site.site)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics) as bus:
        act = Actuator(site, bus, metrics)  # refuses a bad site before anything moves
        metrics.serve(settings.metrics_host, port)

        async def on_state(state: ActuatorState, incoming: Incoming) -> None:
            if incoming.retain:
                act.adopt_retained(state)

        bus.subscribe(topics.pattern(topics.Kind.STATE, site.site), ActuatorState, on_state)
        with contextlib.suppress(TimeoutError):
            await bus.wait_connected(timeout=5)
        await asyncio.sleep(0.2)  # let retained states arrive
        await act.start()

        async def on_metrics(m: Metrics, incoming: Incoming) -> None:
            await act.on_metrics(m)

        bus.subscribe(topics.instant_pattern(site.site), Metrics, on_metrics)

        async def on_request(req: Request, incoming: Incoming) -> None:
            named = topics.parse(incoming.topic).name
            if req.site != site.site or req.device != named:  # the topic is the authority
                log.warning(
                    "request on %s names %s/%s: ignored", incoming.topic, req.site, req.device
                )
                return
            await act.on_request(req)

        bus.subscribe(topics.pattern(topics.Kind.REQUEST, site.site), Request, on_request)
        shutdown.ready_after(bus.wait_subscribed(), "subscribed to metrics")

        async def ticker() -> None:
            while not await shutdown.sleep(site.actuator.tick):
                await act.tick()

        async def poller(dev: CoilDevice) -> None:
            while not await shutdown.sleep(dev.config.poll_s):
                await act.poll(dev)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(ticker(), name="actuator-tick")
                for dev in act.devices.values():
                    tg.create_task(poller(dev), name=f"actuator-poll-{dev.name}")
                await shutdown.wait()
        finally:
            act.close()
