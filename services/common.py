"""What every ``pfmon <service>`` command does before its service runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from shared import service
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.settings import Settings, load_settings
from shared.site import SiteConfig, load_site

ServiceMain = Callable[[Settings, SiteConfig, service.Shutdown], Awaitable[None]]

SITE_FILE_OPTION = typer.Option(
    None,
    "--site-file",
    "-s",
    help="Site YAML (meters, buses, rules). Default: $PFM_SITE_FILE.",
    show_default=False,
)
DURATION_OPTION = typer.Option(
    None, "--duration", help="Stop after this many seconds (default: run until SIGTERM/Ctrl-C)."
)


#: width of tables written to a file or a pipe (logs, CI) when ``COLUMNS`` does not say
PIPE_WIDTH = 200


def console(*, stderr: bool = False) -> Console:
    """A rich console for pfmon's tables. On a terminal it follows the terminal; written
    to a file or a pipe it is ``COLUMNS`` wide, else :data:`PIPE_WIDTH`, not rich's 80
    (which wraps every row of a table into several lines in a log)."""
    out = Console(stderr=stderr)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(stderr=stderr, width=PIPE_WIDTH)
    return out


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"pfmon: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def load_config(site_file: Path | None) -> tuple[Settings, SiteConfig]:
    """Settings + site file, or exit 2 with every problem listed (nothing half-starts)."""
    try:
        settings = load_settings()
        path = site_file or settings.site_file
        if path is None:
            raise ConfigError(
                "no site file: pass --site-file FILE or set PFM_SITE_FILE "
                "(an example is deploy/site.example.yaml)"
            )
        site = load_site(path)
    except ConfigError as exc:
        fail(str(exc))
    return settings, site


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def run_service(
    name: str, main: ServiceMain, site_file: Path | None, duration: float | None
) -> None:
    settings, site = load_config(site_file)
    try:
        setup_logging(settings.log_level, settings.log_format, settings.log_file)
    except ConfigError as exc:
        fail(f"{name}: {exc}")
    try:
        service.run(lambda shutdown: main(settings, site, shutdown), duration=duration)
    except ConfigError as exc:
        fail(f"{name}: {exc}")
    except BaseExceptionGroup as group:  # a ConfigError raised inside a task group
        found = group.subgroup(ConfigError)
        if found is None:
            raise
        fail(f"{name}: {_first(found)}")
    except KeyboardInterrupt:  # pragma: no cover - second Ctrl-C
        sys.exit(130)
