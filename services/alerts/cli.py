"""``pfmon alerts`` (the service) and ``pfmon alarms list|ack|shelve|expire``.

Alertmanager's silences are pfmon's shelving and maintenance: ``ack`` silences one
active alarm for a while, ``shelve`` a meter's alarm (or all of its alarms, for
maintenance) for a given time, ``expire`` ends a silence early. Silences match the
labels ``site``, ``meter`` and ``code``, which the alarms posted by ``pfmon alerts``
and Prometheus' alerts (its ``external_labels`` carry ``site``) both have.
"""

from __future__ import annotations

import asyncio
import getpass
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import typer

from services.common import DURATION_OPTION, SITE_FILE_OPTION, console, fail, run_service

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``4h``, ``2d`` as a timedelta; ValueError saying what is expected."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (expected e.g. 30m, 4h, 2d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _site_and_am(site_file: Path | None, url: str | None) -> tuple[str, Any]:
    from services.alerts.alertmanager import Alertmanager
    from services.common import load_config

    settings, site = load_config(site_file)
    return site.site, Alertmanager(url or settings.alertmanager_url)


URL_OPTION = typer.Option(
    None, "--alertmanager", help="Alertmanager URL (default: $PFM_ALERTMANAGER_URL)."
)
BY_OPTION = typer.Option(None, "--by", help="Who does it (default: the login name).")


def register(app: typer.Typer) -> None:
    @app.command("alerts")
    def _run(
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Post the site's alarms (raised and cleared) to Alertmanager."""
        from services.alerts.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)

    alarms = typer.Typer(
        help="The site's alarms in Alertmanager: list them, acknowledge or shelve them "
        "(Alertmanager silences).",
        no_args_is_help=True,
    )
    app.add_typer(alarms, name="alarms")

    @alarms.command("list")
    def _list(
        site_file: Path | None = SITE_FILE_OPTION,
        url: str | None = URL_OPTION,
    ) -> None:
        """The site's active alerts (and whether a silence holds them) and its silences."""
        from rich.table import Table

        from services.alerts.alertmanager import AlertmanagerError

        site, am = _site_and_am(site_file, url)
        try:
            alerts = asyncio.run(am.alerts([f'site="{site}"']))
            silences = asyncio.run(am.silences())
        except AlertmanagerError as exc:
            fail(str(exc), code=1)
        out = console()
        table = Table("alert", "meter", "code", "phase", "severity", "since", "state")
        for a in sorted(alerts, key=lambda a: a.get("startsAt", "")):
            lb = a.get("labels", {})
            status = a.get("status", {})
            state = status.get("state", "?")
            if status.get("silencedBy"):
                state += f" (silenced by {', '.join(status['silencedBy'])})"
            if status.get("inhibitedBy"):
                state += " (inhibited)"
            table.add_row(
                lb.get("alertname", ""), lb.get("meter", ""), lb.get("code", ""),
                lb.get("phase", ""), lb.get("severity", ""), a.get("startsAt", "")[:19],
                state,
            )  # fmt: skip
        out.print(table)
        mine = [
            s for s in silences
            if s.get("status", {}).get("state") != "expired"
            and any(m["name"] == "site" and m["value"] == site for m in s.get("matchers", []))
        ]  # fmt: skip
        stable = Table("silence", "matches", "until", "by", "comment", "state")
        for s in mine:
            matches = ", ".join(f"{m['name']}={m['value']}" for m in s["matchers"])
            stable.add_row(
                s["id"], matches, s["endsAt"][:19], s.get("createdBy", ""),
                s.get("comment", ""), s["status"]["state"],
            )  # fmt: skip
        out.print(stable)

    def _silence(
        site_file: Path | None,
        url: str | None,
        meter: str,
        code: str | None,
        phase: str | None,
        for_: str,
        by: str | None,
        comment: str,
    ) -> None:
        from services.alerts.alertmanager import AlertmanagerError
        from shared.errors import ConfigError
        from shared.messages import utcnow
        from shared.topics import check_slug

        try:
            length = parse_duration(for_)
            check_slug(meter, "meter")
            if code is not None:
                check_slug(code, "alarm code")
        except (ValueError, ConfigError) as exc:
            fail(str(exc))
        if phase is not None and phase not in ("L1", "L2", "L3"):
            fail(f"--phase must be L1, L2 or L3, got {phase!r}")
        site, am = _site_and_am(site_file, url)
        matchers = {"site": site, "meter": meter}
        if code is not None:
            matchers["code"] = code
        if phase is not None:
            matchers["phase"] = phase
        now = utcnow()
        try:
            sid = asyncio.run(
                am.create_silence(matchers, now, now + length, by or getpass.getuser(), comment)
            )
        except AlertmanagerError as exc:
            fail(str(exc), code=1)
        typer.echo(f"silence {sid}: {', '.join(f'{k}={v}' for k, v in matchers.items())} "
                   f"until {(now + length).isoformat(timespec='seconds')}")  # fmt: skip

    @alarms.command("ack")
    def _ack(
        meter: str = typer.Argument(..., help="The meter (or device) the alarm is about."),
        code: str = typer.Argument(..., help="The alarm code, e.g. low_pf."),
        phase: str | None = typer.Option(None, "--phase", help="Only this phase (L1/L2/L3)."),
        for_: str = typer.Option("4h", "--for", help="How long notifications stay quiet."),
        by: str | None = BY_OPTION,
        comment: str = typer.Option("", "--comment", help="Why (kept with the silence)."),
        site_file: Path | None = SITE_FILE_OPTION,
        url: str | None = URL_OPTION,
    ) -> None:
        """Acknowledge an alarm: a silence of that alarm (default 4 h)."""
        _silence(site_file, url, meter, code, phase, for_, by, f"acknowledged: {comment}".strip())

    @alarms.command("shelve")
    def _shelve(
        meter: str = typer.Argument(..., help="The meter (or device)."),
        code: str | None = typer.Argument(
            None, help="The alarm code (default: every alarm of the meter, for maintenance)."
        ),
        for_: str = typer.Option(..., "--for", help="How long, e.g. 30m, 8h, 2d."),
        by: str | None = BY_OPTION,
        comment: str = typer.Option("", "--comment", help="Why (kept with the silence)."),
        site_file: Path | None = SITE_FILE_OPTION,
        url: str | None = URL_OPTION,
    ) -> None:
        """Shelve a meter's alarm, or all of its alarms (maintenance): a silence."""
        words = "maintenance" if code is None else "shelved"
        _silence(site_file, url, meter, code, None, for_, by, f"{words}: {comment}".strip(": "))

    @alarms.command("expire")
    def _expire(
        silence_id: str = typer.Argument(..., help="The silence's id (pfmon alarms list)."),
        site_file: Path | None = SITE_FILE_OPTION,
        url: str | None = URL_OPTION,
    ) -> None:
        """End a silence (an acknowledgement or a shelving) now."""
        from services.alerts.alertmanager import AlertmanagerError

        _, am = _site_and_am(site_file, url)
        try:
            asyncio.run(am.expire_silence(silence_id))
        except AlertmanagerError as exc:
            fail(str(exc), code=1)
        typer.echo(f"silence {silence_id} expired")
