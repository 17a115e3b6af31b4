"""``pfmon archiver`` and ``pfmon report``."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path

import typer

from services.common import DURATION_OPTION, SITE_FILE_OPTION, fail, run_service
from shared.settings import DEFAULT_DB_DSN

FORMATS = ("md", "html", "csv", "json")
REPORT_HELP = (
    "What the power factor cost over a period at the billing points, which feeders caused "
    "it, and the capacitor bank that fixes it.\n\n"
    f"Reads the archive in the database named by PFM_DB_DSN (default {DEFAULT_DB_DSN}): "
    "pfm_metrics, and for the banks' steps pfm_device_status and pfm_commands. The site is "
    "--site, else the site file's 'site'; the site file's meters say which ones are billed "
    "(without a site file every meter is billed as its own billing point)."
)


def parse_when(text: str, option: str, tz: tzinfo = UTC) -> datetime:
    """ISO date or date-time; a naive value is in ``tz`` (the site's time zone)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        try:
            value = datetime.combine(date.fromisoformat(text), datetime.min.time())
        except ValueError:
            fail(f"{option} {text!r}: expected an ISO date or date-time, e.g. 2026-03-01T00:00")
    return value if value.tzinfo else value.replace(tzinfo=tz)


def register(app: typer.Typer) -> None:
    @app.command("archiver")
    def _run(
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Store metrics, events and commands in TimescaleDB / PostgreSQL."""
        from services.archiver.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)

    @app.command("report", help=REPORT_HELP)
    def _report(
        site: str | None = typer.Option(
            None,
            "--site",
            help="Site slug to report on (default: the site file's 'site').",
        ),
        start: str = typer.Option(
            ...,
            "--from",
            help="Start, ISO date/time (without an offset: in the site file's timezone, else UTC).",
        ),
        end: str = typer.Option(..., "--to", help="End (exclusive), ISO date/time."),
        fmt: str = typer.Option("md", "--format", help="md, html, csv or json."),
        out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
        site_file: Path | None = typer.Option(
            None,
            "--site-file",
            envvar="PFM_SITE_FILE",
            help="Site YAML: the meters' roles (billing, feeder, generation) and parents, "
            "the banks, thresholds and archiver.report tariff. Default: $PFM_SITE_FILE; "
            "without one every meter is billed as its own billing point and the tariff "
            "is the default.",
        ),
    ) -> None:
        from services.archiver.report import build_report, pf_svg, render
        from shared.errors import ConfigError
        from shared.settings import load_settings
        from shared.site import load_site, parse_site

        if fmt not in FORMATS:
            fail(f"--format {fmt!r}: expected {', '.join(FORMATS)}")
        try:
            settings = load_settings()
            if site_file is not None:
                cfg = load_site(site_file)
            elif site:
                cfg = parse_site({"site": site}, "--site")
            else:
                raise ConfigError("pass --site SITE (or --site-file FILE)")
        except ConfigError as exc:
            fail(str(exc))
        name = site or cfg.site
        t0, t1 = parse_when(start, "--from", cfg.zone), parse_when(end, "--to", cfg.zone)

        async def main() -> str:
            import asyncpg

            try:
                conn = await asyncpg.connect(settings.db_dsn, timeout=10)
            except (OSError, asyncpg.PostgresError) as exc:
                fail(f"cannot reach the database {settings.db_dsn}: {exc}", code=1)
            try:
                rep = await build_report(conn, cfg, name, t0, t1)
            except asyncpg.UndefinedTableError:
                fail("no pfm_metrics table: has the archiver run against this database?", 1)
            finally:
                await conn.close()
            chart = None
            if fmt == "md" and out is not None:
                chart_path = out.with_suffix(".pf.svg")
                chart_path.write_text(pf_svg(rep), encoding="utf-8")
                chart = chart_path.name
            return render(rep, fmt, cfg.archiver.report.worst_meters, chart)

        try:
            text = asyncio.run(main())
        except ConfigError as exc:
            fail(str(exc))
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text, encoding="utf-8")
            typer.echo(f"report written to {out}", err=True)
