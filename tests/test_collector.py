"""The collector against the simulator over real Modbus TCP and the real broker:
fault classification and isolation, offline/online events, gateway status, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.collector import service as collector
from services.simulator import Heater, SimServer, SimSite
from shared import topics
from shared.bus import Bus, Incoming
from shared.embedded import free_port
from shared.messages import Event, GatewayStatus, Reading
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from shared.topics import Kind, pattern


class Sink:
    """Everything the collector published for one site, as a subscriber sees it."""

    def __init__(self) -> None:
        self.readings: dict[str, list[Reading]] = defaultdict(list)
        self.arrived: dict[str, list[float]] = defaultdict(list)
        self.events: list[Event] = []
        self.status: list[GatewayStatus] = []

    async def on_reading(self, r: Reading, _: Incoming) -> None:
        self.readings[r.meter].append(r)
        self.arrived[r.meter].append(time.monotonic())

    async def on_event(self, e: Event, _: Incoming) -> None:
        self.events.append(e)

    async def on_status(self, s: GatewayStatus, _: Incoming) -> None:
        self.status.append(s)

    def codes(self, meter: str) -> list[str]:
        return [e.code for e in self.events if e.meter == meter]


@contextlib.asynccontextmanager
async def sink_for(settings: Settings, site: str) -> AsyncIterator[Sink]:
    sink = Sink()
    sub = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-sink"})
    async with Bus(sub, service="test", site=site, persistent=False) as bus:
        bus.subscribe(pattern(Kind.READING, site), Reading, sink.on_reading)
        bus.subscribe(pattern(Kind.EVENT, site), Event, sink.on_event)
        bus.subscribe(topics.gateway_status(site, "gw1"), GatewayStatus, sink.on_status)
        await bus.wait_connected(10)
        await asyncio.sleep(0.3)
        yield sink


@contextlib.asynccontextmanager
async def running(settings: Settings, site: SiteConfig, **kw: Any) -> AsyncIterator[Shutdown]:
    shutdown = Shutdown()
    col = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-col"})
    task = asyncio.create_task(collector.run(col, site, shutdown, **kw))
    try:
        yield shutdown
    finally:
        shutdown.request("test done")
        await asyncio.wait_for(task, 15)


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def fleet(n_healthy: int = 1) -> SimSite:
    site = SimSite(seed=5)
    site.add_load(Heater("h", kw=20.0))
    for unit in range(1, 20):
        site.add_meter(unit, f"m{unit}", profile="sdm630")
    return site


async def test_every_fault_kind_is_counted_and_the_healthy_meter_keeps_its_rate(
    settings: Settings, site_name: str
) -> None:
    sim = fleet()
    port = free_port()
    dead_port = free_port()  # nothing listens: refused
    faults = {
        2: ("exception", {"code": 1}),
        3: ("exception", {"code": 2}),
        4: ("exception", {"code": 3}),
        5: ("exception", {"code": 4}),
        6: ("exception", {"code": 10}),
        7: ("exception", {"code": 11}),
        8: ("comm_loss", {"delay_s": 5.0}),
        9: ("slow", {"delay_s": 0.6}),
    }
    for unit, (fault, params) in faults.items():
        sim.inject(fault, unit=unit, **params)
    interval = 0.25
    meters = [
        {
            "name": f"m{u}",
            "bus": "b1",
            "unit": u,
            "profile": "sdm630",
            "interval_s": interval,
            "timeout_s": 0.3,
            "offline_after": 2,
        }
        for u in range(1, 10)
    ]
    meters.append(
        {
            "name": "gone",
            "bus": "b2",
            "unit": 1,
            "profile": "sdm630",
            "interval_s": interval,
            "offline_after": 2,
        }
    )
    site = parse_site(
        {
            "site": site_name,
            "buses": [
                {
                    "name": "b1",
                    "host": "127.0.0.1",
                    "port": port,
                    "connections": 3,
                    "retries": 0,
                    "reprobe_max_s": 1.0,
                },
                {"name": "b2", "host": "127.0.0.1", "port": dead_port, "timeout_s": 0.3},
            ],
            "meters": meters,
        }
    )
    metrics = ServiceMetrics("collector", site_name)
    async with SimServer(sim, port), sink_for(settings, site_name) as sink:
        async with running(settings, site, metrics=metrics):
            await asyncio.sleep(3.0)
            healthy = sink.arrived["m1"]
            # the healthy meter keeps its 4 Hz rate although 9 others fail
            assert len(healthy) >= int(2.5 / interval), len(healthy)
            gaps = [b - a for a, b in itertools.pairwise(healthy[2:])]
            assert max(gaps) < 2.5 * interval, gaps
            for unit in (2, 3, 4, 5, 6, 7, 8):
                assert "device_offline" in sink.codes(f"m{unit}"), unit
            assert "device_offline" in sink.codes("gone")
            # the slow meter (0.6 s > its 0.3 s timeout) counts as timing out
            assert "device_offline" in sink.codes("m9")
            # clear a fault: the meter comes back, with an event
            sim.clear(3)
            await asyncio.sleep(2.0)
            assert "device_online" in sink.codes("m3")
            assert sink.readings["m3"], "m3 did not resume"
            status = sink.status[-1]
            assert status.status == "online"
            assert status.meters_offline is not None and status.meters_offline >= 7
        for _ in range(50):  # the collector says goodbye: retained status offline
            if sink.status[-1].status == "offline":
                break
            await asyncio.sleep(0.05)
    assert sink.status[-1].status == "offline"
    offline = next(e for e in sink.events if e.meter == "m5" and e.code == "device_offline")
    assert offline.evidence["kind"] == "exception_04"
    assert offline.state == "raised"
    expected = {
        "m2": "exception_01",
        "m3": "exception_02",
        "m4": "exception_03",
        "m5": "exception_04",
        "m6": "exception_0a",
        "m7": "exception_0b",
        "m8": "timeout",
        "m9": "timeout",
        "gone": "refused",
    }
    for meter, kind in expected.items():
        event = next(e for e in sink.events if e.meter == meter and e.code == "device_offline")
        assert event.evidence["kind"] == kind, meter
        assert sample(metrics, "pfm_collector_poll_errors_total", meter=meter, kind=kind) >= 2
        assert sample(metrics, "pfm_collector_meter_online", meter=meter) == (
            1.0 if meter == "m3" else 0.0
        )
    assert sample(metrics, "pfm_collector_poll_errors_total", meter="m1", kind="timeout") == 0
    assert sample(metrics, "pfm_collector_polls_total", meter="m1") == len(sink.readings["m1"])
    assert sample(metrics, "pfm_collector_poll_jitter_seconds_count") > 0
    seqs = [r.seq for r in sink.readings["m1"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_collector_pushes_the_clock_and_publishes_decoded_values(
    settings: Settings, site_name: str
) -> None:
    sim = SimSite(seed=2)
    sim.add_load(Heater("h", kw=12.0, wobble=0.0))
    sim.supply.noise = 0.0
    sim.add_meter(4, "pm", profile="pmtr001")
    sim.add_meter(5, "pz", profile="pzem004t")
    port = free_port()
    site = parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                {"name": "pm", "bus": "b1", "unit": 4, "profile": "pmtr001", "interval_s": 0.2},
                {"name": "pz", "bus": "b1", "unit": 5, "profile": "pzem004t", "interval_s": 0.2},
            ],
        }
    )
    before = int(time.time())
    async with SimServer(sim, port), sink_for(settings, site_name) as sink, running(settings, site):
        for _ in range(50):
            await asyncio.sleep(0.1)
            if len(sink.readings["pm"]) >= 3 and len(sink.readings["pz"]) >= 3:
                break
    epoch = sim.meters[4].clock_epoch
    assert epoch is not None and before + 6 <= epoch <= int(time.time()) + 6
    truth = sim.state().meters
    pm = sink.readings["pm"][-1]
    assert pm.profile == "pmtr001"
    assert sum(pm.values[k] for k in pm.values if k.startswith("power_l")) == pytest.approx(
        truth["pm"].p_w, abs=3
    )
    pz = sink.readings["pz"][-1]
    # a single-phase PZEM on L1 sees a third of the balanced heater
    assert pz.values["power"] == pytest.approx(truth["pz"].values["power_l1"], abs=0.1)
    assert pz.values["power"] == pytest.approx(4000.0, abs=0.1)
    assert pz.ts.tzinfo is not None


async def test_transient_errors_are_retried_and_offline_meters_probed_with_backoff(
    settings: Settings, site_name: str
) -> None:
    sim = fleet()
    sim.inject("flaky", unit=1, every=3)  # every 3rd request fails with 0x0B
    sim.inject("exception", unit=2, code=4)  # dead for good
    port = free_port()
    interval = 0.1
    site = parse_site(
        {
            "site": site_name,
            "buses": [
                {
                    "name": "b1",
                    "host": "127.0.0.1",
                    "port": port,
                    "retries": 1,
                    "reprobe_max_s": 0.8,
                }
            ],
            "meters": [
                {
                    "name": f"m{u}",
                    "bus": "b1",
                    "unit": u,
                    "profile": "sdm630",
                    "interval_s": interval,
                    "offline_after": 2,
                }
                for u in (1, 2)
            ],
        }
    )
    metrics = ServiceMetrics("collector", site_name)
    async with (
        SimServer(sim, port),
        sink_for(settings, site_name) as sink,
        running(settings, site, metrics=metrics),
    ):
        await asyncio.sleep(1.0)
        probes_before = sim.meters[2].requests
        await asyncio.sleep(3.0)
        probes = sim.meters[2].requests - probes_before
    # the flaky meter never went offline: each 0x0B was retried at once
    assert "device_offline" not in sink.codes("m1")
    assert sample(metrics, "pfm_collector_poll_errors_total", meter="m1", kind="exception_0b") >= 5
    assert len(sink.readings["m1"]) >= 30
    # the dead meter is probed with backoff (up to 0.8 s), not 10 times a second
    assert "device_offline" in sink.codes("m2")
    assert 2 <= probes <= 12, probes  # <= 2 requests (one retry) per probe


class _CountingShutdown(Shutdown):
    """A Shutdown that counts the scheduler's sleeps (its wake-ups)."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps = 0

    async def sleep(self, seconds: float) -> bool:
        self.sleeps += 1
        return await super().sleep(seconds)


async def test_meters_due_within_a_tick_are_polled_together(
    settings: Settings, site_name: str
) -> None:
    """60 meters staggered over one second: the scheduler wakes once per tick, not once
    per meter, and every meter keeps its 1 Hz rate at most a tick late."""
    n = 60
    sim = SimSite(seed=3)
    sim.add_load(Heater("h", kw=20.0))
    for unit in range(1, n + 1):
        sim.add_meter(unit, f"m{unit}", profile="pmtr001")
    port = free_port()
    site = parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port, "connections": 4}],
            "meters": [
                {"name": f"m{u}", "bus": "b1", "unit": u, "profile": "pmtr001"}
                for u in range(1, n + 1)
            ],
        }
    )
    shutdown = _CountingShutdown()
    col = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-col"})
    metrics = ServiceMetrics("collector", site_name)
    async with SimServer(sim, port), sink_for(settings, site_name) as sink:
        task = asyncio.create_task(collector.run(col, site, shutdown, metrics=metrics))
        try:
            await asyncio.sleep(1.5)
            sleeps, started = shutdown.sleeps, time.monotonic()
            polls = sample(metrics, "pfm_collector_polls_total", meter="m1")
            await asyncio.sleep(3.0)
            rate = (shutdown.sleeps - sleeps) / (time.monotonic() - started)
            m1 = sample(metrics, "pfm_collector_polls_total", meter="m1") - polls
        finally:
            shutdown.request("test done")
            await asyncio.wait_for(task, 15)
    # one wake-up a meter would be 60 a second; one a tick is at most 1 / TICK_S
    assert rate <= 1.2 / collector.TICK_S, rate
    assert 2 <= m1 <= 4, m1
    assert all(len(sink.readings[f"m{u}"]) >= 3 for u in range(1, n + 1))
    assert sample(metrics, "pfm_collector_missed_polls_total", meter="m1") == 0
