"""Closed loop: the actuator against the plant simulator, over Modbus TCP.

The simulator's clock and the actuator's clock are one accelerated clock, so an
hour of plant time runs in seconds. Each simulated second the test takes what the
``main`` meter measures, turns it into a Metrics message (as analytics would) and
hands it to the actuator; the actuator writes the bank's coils over Modbus TCP to
the simulator, whose Q (and so PF) follows. Commands, events and states go out on
the real broker and are collected by a listener.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from services.actuator.service import Actuator
from services.simulator import SimServer, SimSite, inductive_site
from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import free_port
from shared.measurements import Measurement as M
from shared.messages import ActuatorState, Command, Event, LoadKind, Metrics
from shared.metrics import ServiceMetrics
from shared.settings import Settings
from shared.site import SiteConfig, parse_site

pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0  # a simulated clock, in the past: a ts ahead is refused

    def __call__(self) -> float:
        return self.t


@dataclass
class Listener:
    commands: list[Command] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    states: list[ActuatorState] = field(default_factory=list)

    async def on_command(self, m: Command, _: Incoming) -> None:
        self.commands.append(m)

    async def on_event(self, m: Event, _: Incoming) -> None:
        self.events.append(m)

    async def on_state(self, m: ActuatorState, _: Incoming) -> None:
        self.states.append(m)

    def codes(self) -> list[tuple[str, str]]:
        return [(e.code, e.state.value) for e in self.events]


def site_config(name: str, port: int, **bank: Any) -> SiteConfig:
    return parse_site(
        {
            "site": name,
            "buses": [{"name": "sim", "host": "127.0.0.1", "port": port, "timeout_s": 1.0}],
            "meters": [{"name": "main", "bus": "sim", "unit": 1, "profile": "sdm630"}],
            "devices": [
                {"name": "cap1", "bus": "sim", "unit": 10, "kind": "capbank", "coils": 6},
                {"name": "io1", "bus": "sim", "unit": 11, "coils": 8},
            ],
            "banks": [
                {
                    "name": "main",
                    "meter": "main",
                    "device": "cap1",
                    "steps_kvar": [25.0] * 6,
                    "target_pf": 0.97,
                    "min_interval": "10s",
                    "reconnect_delay": "60s",
                    "alarm_delay": "30s",
                    "short_circuit_kva": 10_000,
                    **bank,
                }
            ],
        }
    )


@dataclass
class Loop:
    act: Actuator
    sim: SimSite
    clock: Clock
    listener: Listener
    seq: int = 0

    def metrics(self, lag_s: float = 0.0) -> Metrics:
        self.seq += 1
        values = self.sim.meter_values(1)
        q = values[M.REACTIVE_POWER]
        load = LoadKind.INDUCTIVE if q > 0 else LoadKind.CAPACITIVE
        return Metrics(
            site=self.act.site.site,
            meter="main",
            ts=datetime.fromtimestamp(self.clock.t - lag_s, UTC),
            seq=self.seq,
            interval_s=1.0,
            values=values,
            averages={"10s": dict(values)},
            load={"total": load},
        )

    async def run(self, seconds: int, lag_s: float = 0.0) -> None:
        for _ in range(seconds):
            self.clock.t += 1.0
            await self.act.on_metrics(self.metrics(lag_s))
            await self.act.tick()

    @property
    def operations(self) -> int:
        assert self.sim.bank is not None
        return sum(self.sim.bank.operations)

    async def settle_bus(self, want: int) -> None:
        """Wait (real time) until the listener has ``want`` commands."""
        for _ in range(100):
            if len(self.listener.commands) >= want:
                return
            await asyncio.sleep(0.05)


@pytest.fixture
async def loop_factory(settings: Settings, site_name: str) -> AsyncIterator[Any]:
    stack: list[Any] = []

    async def make(seed: int = 1, **bank: Any) -> Loop:
        clock = Clock()
        sim = inductive_site(seed=seed, discharge_s=60.0, clock=clock)
        port = free_port()
        server = SimServer(sim, port)
        await server.start()
        stack.append(server.stop)
        cfg = site_config(site_name, port, **bank)
        listener = Listener()
        lbus = Bus(settings, service="listener", site=site_name, client_id=f"{site_name}-l")
        lbus.subscribe(topics.pattern(topics.Kind.COMMAND, site_name), Command, listener.on_command)
        lbus.subscribe(topics.pattern(topics.Kind.EVENT, site_name), Event, listener.on_event)
        lbus.subscribe(
            topics.pattern(topics.Kind.STATE, site_name), ActuatorState, listener.on_state
        )
        await lbus.__aenter__()
        stack.append(lbus.close)
        await lbus.wait_subscribed(5)
        bus = Bus(settings, service="actuator", site=site_name, client_id=f"{site_name}-a")
        await bus.__aenter__()
        stack.append(bus.close)
        await bus.wait_connected(5)
        act = Actuator(cfg, bus, ServiceMetrics("actuator", site_name), clock=clock)
        await act.start()
        stack.append(lambda: _close_links(act))
        return Loop(act, sim, clock, listener)

    yield make
    for close in reversed(stack):
        await close()


async def _close_links(act: Actuator) -> None:
    for dev in act.devices.values():
        dev.link.close()


async def test_inductive_site_reaches_target_and_stays_put(loop_factory: Any) -> None:
    loop: Loop = await loop_factory()
    assert loop.sim.state().pf == pytest.approx(0.78, abs=0.02)
    reached: float | None = None
    start = loop.clock.t
    for _ in range(60 + 6 * 10 + 10):
        await loop.run(1)
        if reached is None and loop.sim.state().pf >= 0.97:
            reached = loop.clock.t - start
    pf = loop.sim.state().pf
    assert pf >= 0.97, (pf, loop.sim.bank and loop.sim.bank.steps_in)
    ops = loop.operations
    assert ops >= 5  # ~160 kvar to compensate with 25 kvar steps
    # within the configured delays: start-up discharge (60 s), then one step per
    # min_interval (10 s); the first step goes in as soon as the discharge is over
    assert reached is not None and reached <= 60 + (ops - 1) * 10 + 1, reached
    # constant load: no further operation for 10 simulated minutes
    await loop.run(600)
    assert loop.operations == ops
    assert loop.sim.bank is not None and loop.sim.bank.violations == []
    # every command went out with reason, origin and trigger; states are what the bank shows
    await loop.settle_bus(ops)
    cmds = loop.listener.commands
    assert len(cmds) == ops
    for c in cmds:
        assert c.origin == "bank:main" and "PF" in c.reason and c.trigger["pf"] is not None
        assert c.dry_run is False and c.value == 1
    await asyncio.sleep(0.2)
    last = [s for s in loop.listener.states if s.device == "cap1"][-1]
    assert last.steps_in == [i + 1 for i in loop.sim.bank.steps_in]
    assert sum(last.operations.values()) == ops
    # the dashboards' metrics
    text = loop.act.metrics.exposition().decode()
    assert f'pfm_actuator_commands_total{{device="cap1",origin="bank:main"}} {float(ops)}' in text
    assert f'pfm_actuator_steps_in{{bank="main"}} {float(len(loop.sim.bank.steps_in))}' in text
    per_step = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('pfm_actuator_step_operations_total{bank="main"')
    ]
    assert sum(per_step) == ops
    assert "pfm_actuator_eval_seconds_count" in text
    # operation counters survive a restart through the retained state
    fresh = Actuator(loop.act.site, loop.act.bus, ServiceMetrics("actuator", "x"), clock=loop.clock)
    fresh.adopt_retained(last.model_copy(update={}))
    assert fresh.banks[0].operations == loop.act.banks[0].operations


async def test_reconnection_delay_never_violated_under_fluctuating_load(loop_factory: Any) -> None:
    loop: Loop = await loop_factory(seed=4, program="circular", min_interval="5s")
    rng = random.Random(5)
    sim = loop.sim
    for _ in range(90):  # 90 x 40 s = one simulated hour
        sim.set_load("compressor", kw=rng.uniform(10, 120), running=rng.random() > 0.2)
        sim.set_load("pump", running=rng.random() > 0.3)
        sim.set_load("heater", running=rng.random() > 0.5)
        await loop.run(40)
    assert sim.bank is not None
    assert loop.operations > 20, sim.bank.operations
    assert sim.bank.violations == []
    # the controller's own counters agree with the plant's closings (it counts openings too)
    closings = sum(sim.bank.operations)
    assert sum(loop.act.banks[0].operations) >= closings


async def test_stale_data_holds_and_is_reported(loop_factory: Any) -> None:
    loop: Loop = await loop_factory()
    await loop.run(130)
    assert loop.sim.bank is not None
    steps = list(loop.sim.bank.steps_in)
    loop.sim.set_load("compressor", running=False)  # big load change...
    await loop.run(60, lag_s=40.0)  # ...but the metrics are 40 s old: hold
    assert loop.sim.bank.steps_in == steps
    await asyncio.sleep(0.3)
    assert ("stale_data", "raised") in loop.listener.codes()
    await loop.run(120)  # fresh data again: the controller corrects the overcompensation
    assert len(loop.sim.bank.steps_in) < len(steps)
    assert loop.sim.state().pf >= 0.97
    await asyncio.sleep(0.3)
    assert ("stale_data", "cleared") in loop.listener.codes()


async def test_thd_block_takes_the_steps_out(loop_factory: Any) -> None:
    loop: Loop = await loop_factory(thd_limit_pct=15.0)
    await loop.run(130)
    assert loop.sim.bank is not None and len(loop.sim.bank.steps_in) >= 4
    kvar_in = loop.act.banks[0].kvar_in
    # a large VFD comes on: current THD rises above the limit
    loop.sim.set_load("fan_drive", kw=400.0)
    await loop.run(3)
    assert loop.sim.bank.steps_in == []
    await asyncio.sleep(0.3)
    raised = [e for e in loop.listener.events if e.code == "thd_block" and e.state == "raised"]
    assert raised, loop.listener.codes()
    order = raised[0].evidence["resonance_order"]
    assert isinstance(order, float) and order == pytest.approx((10_000 / kvar_in) ** 0.5, abs=0.01)
    outs = [c for c in loop.listener.commands if c.value == 0]
    assert outs and all("thd_block" in c.reason for c in outs)
    ops = loop.operations
    await loop.run(200)  # still blocked: nothing switches in
    assert loop.operations == ops and loop.sim.bank.steps_in == []


async def test_dry_run_bank_publishes_but_drives_nothing(loop_factory: Any) -> None:
    loop: Loop = await loop_factory(dry_run=True)
    await loop.run(130)
    assert loop.sim.bank is not None and loop.sim.bank.steps_in == []
    assert loop.sim.state().pf < 0.8  # nothing was corrected
    await loop.settle_bus(5)
    cmds = loop.listener.commands
    assert len(cmds) >= 5 and all(c.dry_run and c.origin == "bank:main" for c in cmds)
    # the published state is the device's: no step in, no operation counted
    for dev in loop.act.devices.values():
        await loop.act.poll(dev)
    await loop.act.publish_state(loop.act.devices["cap1"])
    await asyncio.sleep(0.3)
    last = [s for s in loop.listener.states if s.device == "cap1"][-1]
    assert last.steps_in == [] and last.operations == {}


async def test_learns_the_real_step_size(loop_factory: Any) -> None:
    # configured 35 kvar per step; the simulator's steps are 25 kvar (at nominal voltage)
    loop: Loop = await loop_factory(steps_kvar=[35.0] * 6, learn_steps=True, settle="2s")
    await loop.run(200)
    bank = loop.act.banks[0]
    assert loop.sim.bank is not None
    switched = loop.sim.bank.steps_in
    assert switched
    for i in switched:
        # each switching moves the estimate half-way from 35 toward the measured ~25
        assert 28.0 <= bank.size_var[i] / 1000 <= 32.0, bank.size_var
    assert loop.sim.state().pf >= 0.97
