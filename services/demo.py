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
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import typer
import yaml
from rich.console import Console
from rich.table import Table

from services.actuator import service as actuator
from services.analytics import service as analytics
from services.archiver import service as archiver
from services.collector import service as collector
from services.collector.simulator import LoadModel, MeterFleet
from shared import topics
from shared.bus import Bus, Incoming
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
from shared.messages import Metrics
from shared.service import Shutdown, run
from shared.settings import Settings, load_settings
from shared.site import SiteConfig, parse_site

log = logging.getLogger(__name__)
console = Console(stderr=True)

# three loads a site engineer recognises: motors, mixed office, an almost resistive heater
_DEMO_LOADS = [
    LoadModel(current_a=(40.0, 42.0, 39.0), pf=(0.78, 0.79, 0.77)),
    LoadModel(current_a=(12.0, 9.0, 15.0), pf=(0.93, 0.91, 0.95)),
    LoadModel(current_a=(20.0, 20.0, 20.0), pf=(0.99, 0.99, 0.99)),
]


def demo_site(port: int, meters: int) -> dict[str, Any]:
    return {
        "site": "demo",
        "gateway": "demo-gw",
        "description": "pfmon demo: simulated PMTR_001 meters",
        "buses": [{"name": "sim", "kind": "tcp", "host": "127.0.0.1", "port": port}],
        "meters": [
            {"name": f"meter{u}", "bus": "sim", "unit": u, "profile": "pmtr001", "interval_s": 1.0}
            for u in range(1, meters + 1)
        ],
        # one archiver: a plain subscription, so that sessions other demos left in a
        # shared group on the same broker cannot take a share of this demo's messages
        "archiver": {"share_group": None},
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


async def _watch(
    settings: Settings, site: SiteConfig, shutdown: Shutdown, latest: dict[str, Metrics]
) -> None:
    async with Bus(settings, service="demo", site=site.site, persistent=False) as bus:

        async def on_metrics(m: Metrics, incoming: Incoming) -> None:
            latest[m.meter] = m

        bus.subscribe(topics.pattern(topics.Kind.METRICS, site.site), Metrics, on_metrics)
        await shutdown.wait()


def _table(latest: dict[str, Metrics], rows: int) -> Table:
    table = Table(title=f"pfmon demo - {rows} metric rows archived", expand=False)
    for col in ("meter", "P kW", "S kVA", "PF", "V L1", "I L1"):
        table.add_column(col, justify="right")
    for name in sorted(latest):
        v = latest[name].values
        table.add_row(
            name,
            f"{v.get(M.POWER, 0) / 1000:.2f}",
            f"{v.get(M.APPARENT_POWER, 0) / 1000:.2f}",
            f"{v.get(M.POWER_FACTOR, float('nan')):.3f}",
            f"{v.get(M.VOLTAGE_L1, 0):.1f}",
            f"{v.get(M.CURRENT_L1, 0):.2f}",
        )
    return table


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
            models = {u: _DEMO_LOADS[(u - 1) % len(_DEMO_LOADS)] for u in range(1, meters + 1)}
            async with MeterFleet(sim_port, models):
                site = parse_site(demo_site(sim_port, meters), "demo site")
                (workdir / "site.yaml").write_text(yaml.safe_dump(demo_site(sim_port, meters)))
                settings = base.model_copy(
                    update={
                        "mqtt_url": mqtt_url,
                        "db_dsn": dsn,
                        "data_dir": workdir / "data",
                        "metrics_port": 0,
                        # stable ids: a second demo resumes the first one's sessions
                        # instead of leaving more behind on a shared broker
                        "mqtt_client_id": f"pfm-demo-{socket.gethostname()}",
                    }
                )
                console.print(f"[bold]pfmon demo[/] - {meters} simulated meters")
                console.print(f"  meters:   Modbus TCP 127.0.0.1:{sim_port}, units 1..{meters}")
                console.print(f"  broker:   {broker_note}")
                console.print(f"  database: {db_note}, table pfm_metrics")
                console.print(f"  site:     {workdir / 'site.yaml'}")
                console.print("  stop with Ctrl-C")
                latest: dict[str, Metrics] = {}
                pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
                try:
                    async with asyncio.TaskGroup() as tg:
                        for name, svc in (
                            ("archiver", archiver.run),
                            ("analytics", analytics.run),
                            ("actuator", actuator.run),
                            ("collector", collector.run),
                        ):
                            tg.create_task(
                                _named_settings(svc, settings, site, shutdown, name),
                                name=f"demo-{name}",
                            )
                        tg.create_task(_watch(settings, site, shutdown, latest), name="demo-watch")
                        started = time.monotonic()
                        while not await shutdown.sleep(5.0):
                            rows = await _count(pool, site.site, started)
                            console.print(_table(latest, rows))
                    rows = await _count(pool, site.site, started)
                finally:
                    await pool.close()
                console.print(_table(latest, rows))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


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
            3, "--meters", min=1, max=247, help="How many simulated meters."
        ),
        keep: bool = typer.Option(False, "--keep", help="Keep the demo's work folder."),
    ) -> None:
        """Run simulated meters and every service end to end, on an embedded default."""
        setup_logging("WARNING", "text")
        result: dict[str, int] = {}

        async def main(shutdown: Shutdown) -> None:
            result["rows"] = await demo_main(shutdown, meters, keep)

        try:
            run(main, duration=duration)
        except (ConfigError, PeerError) as exc:
            console.print(f"[red]pfmon demo: {exc}[/]")
            raise typer.Exit(1) from exc
        rows = result.get("rows", 0)
        console.print(f"demo finished: {rows} metric rows archived")
        if duration is not None and duration >= 10 and rows == 0:
            console.print("[red]no data reached the database[/]")
            raise typer.Exit(1)
