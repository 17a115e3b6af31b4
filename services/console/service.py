"""``pfmon console``: the operator's web page, live from the bus, history from the archive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from pathlib import Path

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import Counter, Gauge

from services.console.auth import Auth, load_users
from services.console.live import Live
from services.console.web import Console
from shared import topics
from shared.bus import Bus, Incoming
from shared.errors import ConfigError
from shared.messages import ActuatorState, Command, Event, EventState, GatewayStatus, Metrics
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

log = logging.getLogger(__name__)
SERVICE = "console"
#: how often changes go out to the pages (a value reaches the page within this + transit)
FRAME_PERIOD_S = 0.5


class ConsoleMetrics:
    """The console's own Prometheus metrics, beside every service's bus metrics."""

    def __init__(self, base: ServiceMetrics, live: Live) -> None:
        r = base.registry
        Gauge("pfm_console_clients", "Pages connected to the live stream", registry=r).set_function(
            lambda: len(live.clients)
        )
        self.frames = Counter("pfm_console_frames_total", "Live update frames sent", registry=r)
        self.actions = Counter(
            "pfm_console_actions_total",
            "Operator actions by result: done, refused (no login, bad CSRF token), invalid",
            ["result"],
            registry=r,
        )
        for result in ("done", "refused", "invalid"):
            self.actions.labels(result)

    def count(self, result: str) -> None:
        self.actions.labels(result).inc()


def tls_context(site: SiteConfig) -> ssl.SSLContext | None:
    cfg = site.console
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"console.tls_cert/tls_key: cannot load {cfg.tls_cert} / {cfg.tls_key}: {exc}"
        ) from exc
    return ctx


async def _open_archive(dsn: str) -> asyncpg.Pool | None:
    try:
        return await asyncpg.create_pool(dsn, min_size=0, max_size=3, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        log.warning("no archive at %s (%s): history and reports are off", dsn, exc)
        return None


async def replay_events(pool: asyncpg.Pool, live: Live, site: str, days: float = 7) -> int:
    """Rebuild active alarms, acknowledgements and maintenance from archived events."""
    try:
        rows = await pool.fetch(
            """SELECT meter, ts, seq, code, state, severity, phase, message, evidence::text,
                      service
               FROM pfm_events WHERE site = $1 AND ts > now() - make_interval(days => $2)
               ORDER BY ts, seq""",
            site,
            int(days),
        )
    except asyncpg.UndefinedTableError:
        return 0
    for r in rows:
        live.on_event(
            Event(
                site=site,
                meter=r["meter"],
                ts=r["ts"],
                seq=r["seq"],
                code=r["code"],
                state=EventState(r["state"]),
                severity=r["severity"],
                phase=r["phase"],
                message=r["message"],
                evidence=orjson.loads(r["evidence"]),
                service=r["service"],
            )
        )
    return len(rows)


def users_path(configured: Path) -> Path:
    """The users file: systemd's credential ``console_users`` when the unit passes one
    (``LoadCredential=``, readable by this service only), else the site file's."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / "console_users").is_file():
        return Path(creds) / "console_users"
    return configured


async def run(settings: Settings, site: SiteConfig, shutdown: Shutdown) -> None:
    cfg = site.console
    ssl_ctx = tls_context(site)  # a bad certificate refuses the start
    metrics = ServiceMetrics(SERVICE, site.site)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    live = Live(site)
    users_file = users_path(cfg.users_file)
    auth = Auth(users_file, cfg.session_ttl, cfg.login_attempts, cfg.login_window)
    if not load_users(users_file):  # a bad users file refuses the start
        log.warning("no users in %s: nobody can act (pfmon console user add NAME)", users_file)
    pool = await _open_archive(settings.db_dsn)
    if pool is not None:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            n = await replay_events(pool, live, site.site)
            log.info("replayed %d archived event(s)", n)
    cm = ConsoleMetrics(metrics, live)
    try:
        async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics) as bus:
            console = Console(site, live, bus, auth, pool, tls=ssl_ctx is not None)
            console.count = cm.count

            async def on_metrics(m: Metrics, incoming: Incoming) -> None:
                live.on_metrics(m)

            async def on_event(ev: Event, incoming: Incoming) -> None:
                live.on_event(ev)

            async def on_state(st: ActuatorState, incoming: Incoming) -> None:
                live.on_state(st)

            async def on_command(c: Command, incoming: Incoming) -> None:
                live.on_command(c)

            async def on_status(st: GatewayStatus, incoming: Incoming) -> None:
                live.on_status(st)

            s = site.site
            bus.subscribe(topics.instant_pattern(s), Metrics, on_metrics)
            bus.subscribe(topics.pattern(topics.Kind.EVENT, s), Event, on_event)
            bus.subscribe(topics.pattern(topics.Kind.STATE, s), ActuatorState, on_state)
            bus.subscribe(topics.pattern(topics.Kind.COMMAND, s), Command, on_command)
            bus.subscribe(topics.pattern(topics.Kind.STATUS, s), GatewayStatus, on_status)
            metrics.serve(settings.metrics_host, port)

            runner = web.AppRunner(console.app(), access_log=None, handle_signals=False)
            await runner.setup()
            try:
                tcp = web.TCPSite(runner, cfg.listen, cfg.port, ssl_context=ssl_ctx)
                try:
                    await tcp.start()
                except OSError as exc:
                    raise ConfigError(
                        f"console: cannot listen on {cfg.listen}:{cfg.port}: {exc.strerror or exc}"
                    ) from exc
                scheme = "https" if ssl_ctx else "http"
                log.info("console on %s://%s:%d/", scheme, cfg.listen, cfg.port)
                shutdown.ready_after(bus.wait_subscribed(), "subscribed; page served")
                stop = asyncio.Event()

                async def broadcast() -> None:
                    while not stop.is_set():
                        frame = live.frame()
                        if frame is not None:
                            live.publish(frame)
                            cm.frames.inc()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), FRAME_PERIOD_S)

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(broadcast(), name="console-broadcast")
                    await shutdown.wait()
                    stop.set()
                    for q in list(live.clients):  # end the open streams
                        with contextlib.suppress(asyncio.QueueFull):
                            q.put_nowait(None)
            finally:
                await runner.cleanup()
    finally:
        if pool is not None:
            await pool.close()
