"""``pfmon demo``: simulated meters and every service on an embedded default.

Uses the broker and database named by ``PFM_MQTT_URL`` / ``PFM_DB_DSN`` when they
answer; otherwise starts its own (a ``mosquitto`` on a free port, else the amqtt
broker in-process; a private PostgreSQL in a data folder it owns). Says where
everything is, stops on Ctrl-C or at the end of ``--duration``, and cleans up
what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import typer
import yaml
from rich.table import Table

from services.actuator import service as actuator
from services.analytics import service as analytics
from services.archiver import service as archiver
from services.archiver.report import write_report
from services.collector import service as collector
from services.collector.homeassistant import node_id
from services.collector.homeassistant import publish as publish_discovery
from services.common import console as make_console
from services.console import service as console_service
from services.console.demo import DEMO_USER, demo_console
from services.simulator import SimServer, SimSite, inductive_site
from shared import topics
from shared.bus import Bus, BusUnavailable, Incoming
from shared.embedded import (
    AmqttBroker,
    LocalMosquitto,
    LocalPostgres,
    database_answers,
    free_port,
    port_open,
)
from shared.errors import ConfigError, PeerError
from shared.logs import setup_logging
from shared.measurements import Measurement as M
from shared.messages import ActuatorState, Command, Metrics
from shared.service import Shutdown, run
from shared.settings import Settings, load_settings
from shared.site import SiteConfig, parse_site

log = logging.getLogger(__name__)
console = make_console(stderr=True)

# The plant: a small factory whose incomer runs at PF ~0.78 (motors, a VFD, servers),
# a 6 x 25 kvar capacitor bank the actuator switches, and feeder meters on the loads.
#: capacitor discharge time of the simulated bank; the controller's reconnection delay
#: must not be shorter. Real banks need ~60 s; the demo shortens both to be watchable.
DISCHARGE_S = 5.0
_FEEDERS = [
    ("compressor", "compressor"),
    ("servers", "servers"),
    ("fan-drive", "fan_drive"),
    ("pump", "pump"),
    ("conveyor", "conveyor"),
]
MAX_METERS = 1 + len(_FEEDERS)
BANK_UNIT = 10


def demo_plant(meters: int) -> SimSite:
    """The incomer (``main``, SDM630: signed P/Q) plus ``meters - 1`` PMTR_001 feeders."""
    plant = inductive_site(seed=1, bank_unit=BANK_UNIT, discharge_s=DISCHARGE_S)
    for unit, (name, load) in enumerate(_FEEDERS[: meters - 1], start=2):
        plant.add_meter(unit, name, profile="pmtr001", loads=[load], bank=False)
    return plant


def demo_site(port: int, plant: SimSite, site: str = "demo") -> dict[str, Any]:
    assert plant.bank is not None
    steps = list(plant.bank.kvar)
    return {
        "site": site,
        "gateway": "demo-gw",
        "description": "pfmon demo: a simulated factory, PF ~0.78 at the incomer, one bank",
        "buses": [{"name": "sim", "kind": "tcp", "host": "127.0.0.1", "port": port}],
        # the incomer is the billing point (and the bank's point); the others feed off it
        "meters": [
            {
                "name": m.name,
                "bus": "sim",
                "unit": u,
                "profile": m.profile.name,
                "interval_s": 1.0,
                **({"role": "billing"} if m.name == "main" else {"parent": "main"}),
            }
            for u, m in sorted(plant.meters.items())
        ],
        "devices": [
            {
                "name": "bank1",
                "bus": "sim",
                "unit": BANK_UNIT,
                "kind": "capbank",
                "coils": len(steps),
                "poll_s": 5.0,
            }
        ],
        "banks": [
            {
                "name": "main",
                "meter": "main",
                "device": "bank1",
                "steps_kvar": steps,
                "target_pf": 0.97,
                "program": "optimal",
                "average": "5s",
                "min_interval": "3s",
                "reconnect_delay": f"{DISCHARGE_S + 1:g}s",
                "alarm_delay": "60s",
            }
        ],
        # one archiver: a plain subscription, so that sessions other demos left in a
        # shared group on the same broker cannot take a share of this demo's messages
        "archiver": {"share_group": None},
        # a Home Assistant on the same broker shows the meters and alarms while the
        # demo runs (read-only: no bank switches)
        "homeassistant": {},
    }


@contextlib.asynccontextmanager
async def _broker(settings: Settings, workdir: Path) -> AsyncIterator[tuple[str, str]]:
    target = settings.mqtt()
    if port_open(target.host, target.port):
        yield settings.mqtt_url, f"the broker at {settings.mqtt_url} (PFM_MQTT_URL)"
        return
    if LocalMosquitto.available():
        with LocalMosquitto(workdir / "mosquitto") as mosq:
            yield mosq.url, f"a private mosquitto at {mosq.url} (stopped at the end)"
        return
    async with AmqttBroker() as amqtt:
        yield amqtt.url, f"the in-process amqtt broker at {amqtt.url} (MQTT 3.1.1)"


@contextlib.asynccontextmanager
async def _database(settings: Settings, workdir: Path) -> AsyncIterator[tuple[str, str]]:
    if await database_answers(settings.db_dsn):
        yield settings.db_dsn, f"the database at {settings.db_dsn} (PFM_DB_DSN)"
        return
    pg = LocalPostgres(workdir / "postgres")
    await asyncio.to_thread(pg.start)
    try:
        yield pg.dsn, f"a private PostgreSQL ({pg.flavour}) at {pg.dsn} (stopped at the end)"
    finally:
        await asyncio.to_thread(pg.stop)


class _View:
    """What the demo shows: the latest metrics per meter, the bank, the commands."""

    def __init__(self, bank_steps: int) -> None:
        self.bank_steps = bank_steps
        self.latest: dict[str, Metrics] = {}
        self.first_pf: float | None = None
        self.bank: ActuatorState | None = None
        self.commands: list[Command] = []

    async def on_metrics(self, m: Metrics, incoming: Incoming) -> None:
        if m.aggregate:
            return
        self.latest[m.meter] = m
        pf = m.values.get(M.POWER_FACTOR)
        if m.meter == "main" and self.first_pf is None and pf is not None:
            self.first_pf = pf

    async def on_state(self, m: ActuatorState, incoming: Incoming) -> None:
        self.bank = m

    async def on_command(self, m: Command, incoming: Incoming) -> None:
        self.commands.append(m)

    def incomer_pf(self) -> float | None:
        m = self.latest.get("main")
        return m.values.get(M.POWER_FACTOR) if m else None

    def table(self, rows: int) -> Table:
        table = Table(title=f"pfmon demo - {rows} metric rows archived", expand=False)
        for col in ("meter", "P kW", "Q kvar", "S kVA", "PF", "load", "V L1", "I L1"):
            table.add_column(col, justify="right")
        unsigned = False
        for name in sorted(self.latest, key=lambda n: (n != "main", n)):
            m = self.latest[name]
            v = m.values
            q = v.get(M.REACTIVE_POWER)
            p, s = v.get(M.POWER, 0.0), v.get(M.APPARENT_POWER, 0.0)
            load = m.load.get("total", "unknown")
            if q is None:
                # a magnitude-only meter: |Q| from S and P, but no sign, so no lead/lag
                unsigned = True
                q_text = f"±{math.sqrt(max(0.0, s * s - p * p)) / 1000:.1f} *"
                load = f"{load} *"
            else:
                q_text = f"{q / 1000:.1f}"
            table.add_row(
                name,
                f"{p / 1000:.1f}",
                q_text,
                f"{s / 1000:.1f}",
                f"{v.get(M.POWER_FACTOR, float('nan')):.3f}",
                load,
                f"{v.get(M.VOLTAGE_L1, 0):.1f}",
                f"{v.get(M.CURRENT_L1, 0):.1f}",
            )
        steps = len(self.bank.steps_in) if self.bank else 0
        caption = f"bank main: {steps} of {self.bank_steps} steps in"
        if unsigned:
            caption += (
                "; * magnitude-only meter (PMTR_001): it reports no sign of Q, so |Q| and "
                "no lead/lag"
            )
        if self.commands:
            caption += f"; last command: {self.commands[-1].reason}"
        table.caption = caption
        return table


async def _watch(settings: Settings, site: SiteConfig, shutdown: Shutdown, view: _View) -> None:
    async with Bus(settings, service="demo", site=site.site, persistent=False) as bus:
        bus.subscribe(topics.instant_pattern(site.site), Metrics, view.on_metrics)
        bus.subscribe(topics.pattern(topics.Kind.STATE, site.site), ActuatorState, view.on_state)
        bus.subscribe(topics.pattern(topics.Kind.COMMAND, site.site), Command, view.on_command)
        await shutdown.wait()


async def demo_main(shutdown: Shutdown, meters: int, keep: bool) -> int:
    base = load_settings()
    workdir = Path(tempfile.mkdtemp(prefix="pfmon-demo-"))
    rows = 0
    try:
        async with (
            _broker(base, workdir) as (mqtt_url, broker_note),
            _database(base, workdir) as (dsn, db_note),
        ):
            sim_port = free_port()
            plant = demo_plant(meters)
            async with SimServer(plant, sim_port):
                # each run is its own site with its own client ids: two demos on one
                # broker neither take each other's sessions over nor mix their data
                run_id = secrets.token_hex(3)
                raw_site = demo_site(sim_port, plant, f"demo-{run_id}")
                raw_site["console"], console_url, console_password = demo_console(workdir)
                site = parse_site(raw_site, "demo site")
                (workdir / "site.yaml").write_text(yaml.safe_dump(raw_site, sort_keys=False))
                settings = base.model_copy(
                    update={
                        "mqtt_url": mqtt_url,
                        "db_dsn": dsn,
                        "data_dir": workdir / "data",
                        "metrics_port": 0,
                        "mqtt_client_id": f"pfm-demo-{socket.gethostname()}-{run_id}",
                        # sessions of a run end soon after it (MQTT v5), not in a week
                        "mqtt_session_expiry_s": 60,
                    }
                )
                console.print(
                    f"[bold]pfmon demo[/] - a simulated factory: incomer PF ~0.78, {meters} "
                    "meter(s), a 6 x 25 kvar capacitor bank the actuator switches"
                )
                console.print(
                    f"  plant:    Modbus TCP 127.0.0.1:{sim_port}, meters on units "
                    f"1..{meters}, bank on unit {BANK_UNIT}"
                )
                console.print(f"  broker:   {broker_note}")
                console.print(f"  database: {db_note}, table pfm_metrics")
                console.print(f"  site:     {site.site}, {workdir / 'site.yaml'}")
                console.print(f"  mqtt ids: {settings.mqtt_client_id}-<service>")
                console.print(
                    "  home assistant: MQTT discovery under homeassistant/+/"
                    f"{node_id(site.site)}/ (cleared when the demo ends)"
                )
                console.print(f"console: {console_url}")
                console.print(
                    f"  login:    {DEMO_USER} / {console_password} (reading is open on "
                    "loopback; acknowledging and switching need the login)"
                )
                console.print("  stop with Ctrl-C")
                view = _View(len(site.banks[0].steps_kvar))
                run_from = datetime.now(UTC)
                pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
                try:
                    async with asyncio.TaskGroup() as tg:
                        for name, svc in (
                            ("archiver", archiver.run),
                            ("analytics", analytics.run),
                            ("actuator", actuator.run),
                            ("collector", collector.run),
                            ("console", console_service.run),
                        ):
                            tg.create_task(
                                _named_settings(svc, settings, site, shutdown, name),
                                name=f"demo-{name}",
                            )
                        tg.create_task(_watch(settings, site, shutdown, view), name="demo-watch")
                        started = time.monotonic()
                        while not await shutdown.sleep(5.0):
                            rows = await _count(pool, site.site, started)
                            console.print(view.table(rows))
                    rows = await _count(pool, site.site, started)
                finally:
                    await pool.close()
                    await _clear_discovery(settings, site)
                console.print(view.table(rows))
                before, after = view.first_pf, view.incomer_pf()
                if before is not None and after is not None:
                    steps = len(view.bank.steps_in) if view.bank else 0
                    console.print(
                        f"incomer PF {before:.3f} -> {after:.3f} with {steps} of "
                        f"{view.bank_steps} bank steps in ({len(view.commands)} command(s))"
                    )
                await _report(dsn, site, run_from, workdir if keep else None)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


async def _clear_discovery(settings: Settings, site: SiteConfig) -> None:
    """Take the run's Home Assistant devices away (empty retained configs)."""
    if site.homeassistant is None:
        return
    off = site.model_copy(
        update={"homeassistant": site.homeassistant.model_copy(update={"enabled": False})}
    )
    s = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-ha"})
    try:
        async with Bus(s, service="demo", site=site.site, persistent=False) as bus:
            await bus.wait_connected(5)
            await publish_discovery(s, off, bus, "demo")
    except (BusUnavailable, TimeoutError) as exc:
        console.print(f"[yellow]Home Assistant configs of the run not cleared: {exc}[/]")


async def _report(dsn: str, site: SiteConfig, since: datetime, folder: Path | None) -> None:
    """Write the bill of the run (``pfmon report``) and say where it is."""
    out = (folder or Path(tempfile.mkdtemp(prefix="pfmon-demo-report-"))) / "report.md"
    try:
        rep = await write_report(dsn, site, since, datetime.now(UTC), out)
    except (OSError, asyncpg.PostgresError, ConfigError) as exc:
        console.print(f"[yellow]no report of the run: {exc}[/]")
        return
    pf = "n/a" if rep.pf is None else f"{rep.pf:.3f}"
    console.print(
        f"report of the run (pfmon report): {out} - billed PF {pf}, "
        f"penalty estimate {rep.total_cost:.2f} {rep.currency}"
    )


async def _named_settings(
    svc: Any, settings: Settings, site: SiteConfig, shutdown: Shutdown, name: str
) -> None:
    svc_settings = settings.model_copy(
        update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}"}
    )
    await svc(svc_settings, site, shutdown)


async def _count(pool: asyncpg.Pool, site: str, since: float) -> int:
    with contextlib.suppress(asyncpg.UndefinedTableError):
        value = await pool.fetchval(
            "SELECT count(*) FROM pfm_metrics"
            " WHERE site = $1 AND ts > now() - make_interval(secs => $2)",
            site,
            time.monotonic() - since + 5,
        )
        return int(value or 0)
    return 0


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def _demo(
        duration: float | None = typer.Option(
            None, "--duration", help="Stop after this many seconds (default: until Ctrl-C)."
        ),
        meters: int = typer.Option(
            3,
            "--meters",
            min=1,
            max=MAX_METERS,
            help="How many meters: the incomer plus feeders (compressor, servers, ...).",
        ),
        keep: bool = typer.Option(False, "--keep", help="Keep the demo's work folder."),
    ) -> None:
        """Run a simulated factory and every service end to end, on an embedded default:
        meters are polled, analysed and archived, and the actuator switches the
        capacitor bank until the incomer's PF reaches its target."""
        setup_logging("WARNING", "text")
        result: dict[str, int] = {}

        async def main(shutdown: Shutdown) -> None:
            result["rows"] = await demo_main(shutdown, meters, keep)

        try:
            run(main, duration=duration)
        except (ConfigError, PeerError) as exc:
            console.print(f"[red]pfmon demo: {exc}[/]")
            raise typer.Exit(1) from exc
        except BaseExceptionGroup as group:  # one service refused (e.g. its client id)
            found = group.subgroup((ConfigError, PeerError))
            if found is None:
                raise
            first: BaseException = found
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            console.print(f"[red]pfmon demo: {first}[/]")
            raise typer.Exit(1) from group
        rows = result.get("rows", 0)
        console.print(f"demo finished: {rows} metric rows archived")
        if duration is not None and duration >= 10 and rows == 0:
            console.print("[red]no data reached the database[/]")
            raise typer.Exit(1)
