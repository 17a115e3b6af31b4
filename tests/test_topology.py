"""The switchboard as wired, end to end: the simulator serves the secondary values of
CT-connected meters over real Modbus TCP and the collector applies the site file's
CT ratios. Analytics compares a parent's children with the parent on the real broker,
publishes the unmetered share in the parent's metrics and raises ``energy_balance``
when a child's ratio is wrong; the actuator regulates the bank's point on its primary
kvar."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.actuator import service as actuator
from services.analytics import service as analytics
from services.analytics.balance import EnergyBalance
from services.simulator import (
    Heater,
    Motor,
    ServerPSU,
    SimServer,
    SimSite,
    inductive_site,
)
from shared import topics
from shared.embedded import free_port
from shared.measurements import Measurement as M
from shared.messages import Event, EventState, Metrics
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from tests.helpers import listening
from tests.test_collector import running
from tests.test_ratios import expected_factor

#: the CTs as they are installed (primary/secondary A); main is a 400/5 incomer
REAL_CT = {"main": 80.0, "compressor": 30.0, "ovens": 20.0, "servers": 10.0}
LOADS = {"compressor": 90.0, "ovens": 60.0, "servers": 30.0, "lighting": 20.0}  # kW


class Secondary:
    """What a meter behind CTs of ``ct`` reads: the plant's values at its point divided
    by the ratio (P, Q, S and energies by CT, currents by CT, voltages as they are)."""

    def __init__(self, loads: list[str] | None, ct: float, bank: bool = False):
        self.loads, self.ct, self.bank = loads, ct, bank

    def sample(self, site: SimSite, t: float, rng: random.Random) -> dict[M, float]:
        values = site.measure(self.loads, self.bank, t, rng)
        return {m: v / expected_factor(m, self.ct, 1.0) for m, v in values.items()}


def plant() -> SimSite:
    sim = SimSite(seed=11)
    sim.add_load(Motor("compressor", kw=LOADS["compressor"], pf=0.8))
    sim.add_load(Heater("ovens", kw=LOADS["ovens"]))
    sim.add_load(ServerPSU("servers", kw=LOADS["servers"]))
    sim.add_load(Heater("lighting", kw=LOADS["lighting"]))  # no meter of its own
    sim.add_meter(1, "main", profile="sdm630", source=Secondary(None, REAL_CT["main"]))
    for unit, name in enumerate(("compressor", "ovens", "servers"), start=2):
        sim.add_meter(unit, name, profile="sdm630", source=Secondary([name], REAL_CT[name]))
    return sim


def site_file(name: str, port: int, compressor_ct: str) -> SiteConfig:
    def meter(unit: int, meter: str, ct: str, **kw: Any) -> dict[str, Any]:
        return {
            "name": meter,
            "bus": "b1",
            "unit": unit,
            "profile": "sdm630",
            "interval_s": 0.2,
            "ct_ratio": ct,
            **kw,
        }

    return parse_site(
        {
            "site": name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                meter(1, "main", "400/5", role="billing"),
                meter(2, "compressor", compressor_ct, parent="main"),
                meter(3, "ovens", "100/5", parent="main"),
                meter(4, "servers", "50/5", parent="main"),
            ],
            "analytics": {
                "average_slots_s": [1, 5],
                "alarm_slot_s": 1,
                "aggregates": False,
                "limits": {"energy_balance_margin_pct": 5, "energy_balance_min_parent_w": 1000},
                "alarms": {"energy_balance": {"raise_after_s": 1.0, "clear_after_s": 1.0}},
            },
        }
    )


@contextlib.asynccontextmanager
async def service_running(
    settings: Settings, site: SiteConfig, module: Any, name: str
) -> AsyncIterator[None]:
    shutdown = Shutdown()
    s = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}"})
    task = asyncio.create_task(module.run(s, site, shutdown))
    try:
        yield
    finally:
        shutdown.request("test done")
        await asyncio.wait_for(task, 15)


def analytics_running(settings: Settings, site: SiteConfig) -> Any:
    return service_running(settings, site, analytics, "ana")


def balance_events(items: list[object]) -> list[Event]:
    return [e for e in items if isinstance(e, Event) and e.code == "energy_balance"]


async def test_children_against_their_parent_with_a_wrong_ct_ratio(
    settings: Settings, site_name: str
) -> None:
    sim = plant()
    port = free_port()
    right = site_file(site_name, port, "150/5")  # the compressor's CT as installed
    wrong = site_file(site_name, port, "300/5")  # its ratio mistyped: it reads double
    main_metrics = topics.metrics(site_name, "main")
    event_topics = topics.pattern(topics.Kind.EVENT, site_name)
    async with (
        SimServer(sim, port),
        listening(settings, site_name, main_metrics, Metrics, "metrics") as metrics,
        listening(settings, site_name, event_topics, Event, "events") as events,
        analytics_running(settings, right),
    ):
        # 1. wired and configured right: the children add up to less than main
        async with running(settings, right):

            def balanced(items: list[object]) -> bool:
                got = [m for m in items if isinstance(m, Metrics) and M.UNMETERED_POWER in m.values]
                # at least 3 s of balance evaluations: past the 1 s raise delay
                return len(got) > 1 and got[-1].ts - got[0].ts > timedelta(seconds=3)

            await metrics.wait_for(balanced, timeout=20)
        assert balance_events(events.items) == []
        evaluated = [
            m for m in metrics.items if isinstance(m, Metrics) and M.UNMETERED_POWER in m.values
        ]
        last = evaluated[-1]
        # main sees 200 kW, its feeders 180 kW: 20 kW of lighting has no meter (the
        # lamps' wobble and the 1 s averages of four meters: a few hundred W)
        assert last.values[M.UNMETERED_POWER] == pytest.approx(20_000, abs=1_500)
        assert last.values[M.POWER] == pytest.approx(200_000, rel=0.02)

        # 2. the compressor's ratio mistyped: its feeder reads 180 kW, the children 270
        async with running(settings, wrong):
            await events.wait_for(lambda items: len(balance_events(items)) >= 1, timeout=20)
        raised = balance_events(events.items)[0]
        assert raised.state == EventState.RAISED and raised.meter == "main"
        ev = raised.evidence
        assert ev["parent_kw"] == pytest.approx(200, rel=0.03)
        assert ev["children_kw"] == pytest.approx(270, rel=0.03)
        assert ev["child_compressor_kw"] == pytest.approx(180, rel=0.03)
        assert ev["child_ovens_kw"] == pytest.approx(60, rel=0.03)
        assert ev["child_servers_kw"] == pytest.approx(30, rel=0.03)
        assert ev["excess_pct"] == pytest.approx(35, abs=3)
        assert ev["margin_pct"] == 5
        assert "compressor" in raised.message and "ratio" in raised.message

        # 3. fixed: cleared
        async with running(settings, right):
            await events.wait_for(lambda items: len(balance_events(items)) >= 2, timeout=20)
        cleared = balance_events(events.items)[1]
        assert cleared.state == EventState.CLEARED and cleared.meter == "main"
        assert cleared.evidence["children_kw"] == pytest.approx(180, rel=0.03)


def _topology(**limits: float) -> SiteConfig:
    return parse_site(
        {
            "site": "s1",
            "buses": [{"name": "b1", "host": "127.0.0.1"}],
            "meters": [
                {"name": "main", "bus": "b1", "unit": 1, "profile": "sdm630"},
                {"name": "a", "bus": "b1", "unit": 2, "profile": "sdm630", "parent": "main"},
                {"name": "b", "bus": "b1", "unit": 3, "profile": "sdm630", "parent": "main"},
                {"name": "pv", "bus": "b1", "unit": 4, "profile": "sdm630", "parent": "main",
                 "role": "generation"},
            ],
            "analytics": {
                "limits": limits,
                "alarms": {"energy_balance": {"raise_after_s": 0, "clear_after_s": 0}},
            },
        }
    )  # fmt: skip


def test_an_idle_parent_or_a_silent_child_is_not_evaluated() -> None:
    bal = EnergyBalance(_topology(energy_balance_min_parent_w=500))
    t0 = datetime(2026, 5, 1, 12, tzinfo=UTC)

    def at(seconds: float, **power: float) -> datetime:
        t = t0 + timedelta(seconds=seconds)
        for meter, w in power.items():
            bal.observe(meter, t, w)
        return t

    # a generation feeder exporting 3 kW counts negative: 5 + 4 - 3 = 6 kW, all of main
    t = at(0, a=5000.0, b=4000.0, pv=-3000.0, main=6000.0)
    got = bal.evaluate("main", t)
    assert got is not None and got.unmetered_w == 0.0 and got.transition is None
    # the window's mean (10 s): a second input 5 s later averages with the first
    t = at(5, main=7000.0)
    got = bal.evaluate("main", t)
    assert got is not None and got.parent_w == 6500.0 and got.unmetered_w == 500.0
    # a near-idle parent whose children read more: not evaluated, no alarm
    t = at(20, a=5000.0, b=4000.0, pv=-3000.0, main=200.0)
    idle = bal.evaluate("main", t)
    assert idle is not None and idle.transition is None
    # a child that stopped reporting is not taken for zero
    t = at(60, main=6000.0)
    assert bal.evaluate("main", t) is None
    # all fresh, the children 50 % above the parent: raised at once (no delay set)
    t = at(60, a=8000.0, b=4000.0, pv=-3000.0)
    raised = bal.evaluate("main", t)
    assert raised is not None and raised.transition == EventState.RAISED
    assert raised.evidence["excess_pct"] == 50.0
    assert raised.evidence["child_pv_kw"] == -3.0


async def test_the_bank_regulates_its_point_on_primary_kvar(
    settings: Settings, site_name: str
) -> None:
    """main is read through 400/5 A CTs: its meter holds 1/80 of the plant's kvar. The
    bank compensates main: with the ratio applied the controller sees ~160 kvar and
    switches in what PF 0.97 needs (5 x 25 kvar); on the secondary's 2 kvar it would
    switch nothing."""
    sim = inductive_site(seed=2, bank_unit=10)
    sim.meters[1].source = Secondary(None, 80.0, bank=True)
    port = free_port()
    site = parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                {
                    "name": "main",
                    "bus": "b1",
                    "unit": 1,
                    "profile": "sdm630",
                    "interval_s": 0.25,
                    "role": "billing",
                    "ct_ratio": "400/5",
                }
            ],
            "devices": [{"name": "bank1", "bus": "b1", "unit": 10, "kind": "capbank", "coils": 6}],
            "banks": [
                {
                    "name": "main",
                    "meter": "main",
                    "device": "bank1",
                    "steps_kvar": [25.0] * 6,
                    "target_pf": 0.97,
                    "average": "1s",
                    "min_interval": "0.5s",
                    "reconnect_delay": "1s",
                    "settle": "0.5s",
                }
            ],
            "analytics": {"average_slots_s": [1, 5], "alarm_slot_s": 1, "aggregates": False},
        }
    )
    assert sim.bank is not None and sim.state().pf < 0.8
    async with (
        SimServer(sim, port),
        analytics_running(settings, site),
        service_running(settings, site, actuator, "act"),
        running(settings, site),
    ):
        async with asyncio.timeout(40):
            while len(sim.bank.steps_in) < 5:
                await asyncio.sleep(0.1)
    state = sim.state()
    assert len(sim.bank.steps_in) == 5
    assert 0.97 <= state.pf <= 1.0


def test_the_demo_declares_its_switchboard() -> None:
    from services.demo import MAX_METERS, demo_plant, demo_site

    site = parse_site(demo_site(free_port(), demo_plant(MAX_METERS)))
    assert [m.name for m in site.billing_meters()] == ["main"]
    feeders = site.children("main")
    assert len(feeders) == MAX_METERS - 1
    assert all(m.kind == "feeder" for m in feeders)
    assert all(site.billing_point(m.name) is site.meter("main") for m in feeders)
    assert [b.meter for b in site.banks] == ["main"]
