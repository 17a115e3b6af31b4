"""The actuator service as it runs: metrics in over Mosquitto, coils out over Modbus TCP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymodbus.server import ModbusTcpServer

from services.actuator.service import run
from shared import topics
from shared.bus import Bus
from shared.embedded import free_port
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.messages import ActuatorState, Command, Event, Metrics, utcnow
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from tests.test_actuator_outputs import CoilServer

pytestmark = pytest.mark.timeout(60)


def site(name: str, port: int, **action: Any) -> SiteConfig:
    return parse_site(
        {
            "site": name,
            "buses": [{"name": "b", "host": "127.0.0.1", "port": port, "timeout_s": 0.3}],
            "meters": [{"name": "main", "bus": "b", "unit": 1, "profile": "sdm630"}],
            "devices": [{"name": "io1", "bus": "b", "unit": 5, "coils": 8, "write_retries": 1}],
            "actuator": {"stale_after": "5s", "tick": "0.2s"},
            "relay_actions": [
                {
                    "name": "overvoltage",
                    "meter": "main",
                    "when": "(L1U > 253) || (L2U > 253) || (L3U > 253)",
                    "average": "10s",
                    "recovery": "0s",
                    "level": "high",
                    "outputs": ["io1:coil:0", "io1:coil:1"],
                    **action,
                }
            ],
        }
    )


def metrics(name: str, seq: int, v: float, ts: datetime | None = None) -> Metrics:
    values = {M.VOLTAGE_L1: v, M.VOLTAGE_L2: 230.0, M.VOLTAGE_L3: 230.0}
    return Metrics(
        site=name,
        meter="main",
        ts=ts or utcnow(),
        seq=seq,
        interval_s=1.0,
        values=values,
        averages={"10s": values},
    )


class Harness:
    def __init__(self, settings: Settings, name: str, cs: CoilServer) -> None:
        self.settings = settings
        self.name = name
        self.cs = cs
        self.commands: list[Command] = []
        self.events: list[Event] = []
        self.states: list[ActuatorState] = []
        self.bus = Bus(settings, service="harness", site=name, client_id=f"{name}-h")

    async def __aenter__(self) -> Harness:
        async def on_cmd(m: Command, _: Any) -> None:
            self.commands.append(m)

        async def on_ev(m: Event, _: Any) -> None:
            self.events.append(m)

        async def on_state(m: ActuatorState, _: Any) -> None:
            self.states.append(m)

        self.bus.subscribe(topics.pattern(topics.Kind.COMMAND, self.name), Command, on_cmd)
        self.bus.subscribe(topics.pattern(topics.Kind.EVENT, self.name), Event, on_ev)
        self.bus.subscribe(topics.pattern(topics.Kind.STATE, self.name), ActuatorState, on_state)
        await self.bus.__aenter__()
        await self.bus.wait_connected(5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bus.close()

    async def send(self, m: Metrics | bytes) -> None:
        await self.bus.publish(topics.metrics(self.name, "main"), m)

    async def until(self, what: Callable[[], bool], timeout: float = 5.0) -> None:
        for _ in range(int(timeout / 0.02)):
            if what():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("condition not reached")


@pytest.fixture
async def coil_server() -> AsyncIterator[CoilServer]:
    cs = CoilServer(free_port())
    srv = ModbusTcpServer([cs.device()], address=("127.0.0.1", cs.port))
    await srv.serve_forever(background=True)
    yield cs
    await srv.shutdown()  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def service(settings: Settings, cfg: SiteConfig) -> AsyncIterator[Shutdown]:
    shutdown = Shutdown()
    task = asyncio.create_task(run(settings, cfg, shutdown))
    yield shutdown
    shutdown.request("test over")
    await asyncio.wait_for(task, 10)


async def wait_online(h: Harness) -> None:
    await h.until(lambda: any(s.device == "io1" and s.online for s in h.states))


async def test_relay_action_end_to_end(
    settings: Settings, site_name: str, coil_server: CoilServer
) -> None:
    cs = coil_server
    cfg = site(site_name, cs.port)
    async with Harness(settings, site_name, cs) as h, service(settings, cfg) as svc:
        await wait_online(h)
        await svc.wait_ready(10)  # subscribed to metrics
        await h.send(metrics(site_name, 1, 240.0))
        await h.send(metrics(site_name, 2, 260.0))
        await h.until(lambda: cs.coils[0] and cs.coils[1])
        await h.until(lambda: len(h.commands) == 2)
        c = h.commands[0]
        assert (c.device, c.address, c.value, c.origin) == ("io1", 0, 1, "rule:overvoltage")
        assert "overvoltage" in c.reason and c.trigger["L1U"] == 260.0
        await h.until(lambda: h.states[-1].coils.get(0) is True)
        # a bad payload is dead-lettered, the service carries on
        await h.send(b'{"schema": "pfm.metrics/1", "nonsense": 1}')
        await h.send(metrics(site_name, 3, 230.0))
        await h.until(lambda: not cs.coils[0] and not cs.coils[1])
        # the state is retained: a newcomer sees it
        late = Harness(settings, site_name, cs)
        late.bus.client_id = f"{site_name}-late"
        async with late:
            await late.until(lambda: bool(late.states))
            assert late.states[-1].coils.get(0) is False


async def test_stuck_relay_raises_an_event_and_state_stays_honest(
    settings: Settings, site_name: str, coil_server: CoilServer
) -> None:
    cs = coil_server
    cs.stuck = {1}
    cfg = site(site_name, cs.port)
    async with Harness(settings, site_name, cs) as h, service(settings, cfg) as svc:
        await wait_online(h)
        await svc.wait_ready(10)
        await h.send(metrics(site_name, 1, 260.0))
        await h.until(lambda: any(e.code == "command_failed" for e in h.events))
        ev = next(e for e in h.events if e.code == "command_failed")
        assert ev.meter == "io1" and "coil 1" in ev.message and "device shows 0" in ev.message
        await h.until(lambda: h.states[-1].coils.get(0) is True)
        assert h.states[-1].coils.get(1) is False  # what the device reports


async def test_stale_metrics_and_dry_run(
    settings: Settings, site_name: str, coil_server: CoilServer
) -> None:
    cs = coil_server
    cfg = site(site_name, cs.port, dry_run=True)
    async with Harness(settings, site_name, cs) as h, service(settings, cfg) as svc:
        await wait_online(h)
        await svc.wait_ready(10)
        old = utcnow() - timedelta(seconds=30)
        await h.send(metrics(site_name, 1, 300.0, ts=old))
        await h.until(lambda: any(e.code == "stale_data" for e in h.events))
        assert h.commands == [] and cs.writes == []
        await h.send(metrics(site_name, 2, 300.0, ts=datetime.now(UTC)))
        await h.until(lambda: len(h.commands) == 2)
        assert all(c.dry_run for c in h.commands)
        await asyncio.sleep(0.2)
        assert cs.writes == [] and not any(cs.coils)


async def test_bad_rules_refuse_to_start(settings: Settings, site_name: str) -> None:
    cfg = site(site_name, free_port(), when="(L1U > 253) || (LII > 10)")
    starter: Awaitable[None] = run(settings, cfg, Shutdown())
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(starter, 10)
    assert "did you mean 'L1I'" in "\n".join(info.value.problems)
