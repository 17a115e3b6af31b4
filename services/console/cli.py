"""``pfmon console`` (the web page) and ``pfmon console user add NAME``."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import typer

from services.common import DURATION_OPTION, SITE_FILE_OPTION, fail, run_service


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="The operator's console: a live web page of the site (run it with no sub-command).",
        invoke_without_command=True,
    )
    app.add_typer(group, name="console")

    @group.callback()
    def _run(
        ctx: typer.Context,
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Serve the console: overview, banks, alarms, history (site file: console:)."""
        if ctx.invoked_subcommand is not None:
            return
        from services.console.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)

    user = typer.Typer(help="Console users (argon2 password hashes in the users file).")
    group.add_typer(user, name="user")

    @user.command("add")
    def _add(
        name: str = typer.Argument(..., help="user name"),
        users_file: Path | None = typer.Option(
            None,
            "--users-file",
            help="users file (default: the site file's console.users_file)",
        ),
        site_file: Path | None = SITE_FILE_OPTION,
        password_stdin: bool = typer.Option(
            False, "--password-stdin", help="read the password from standard input"
        ),
    ) -> None:
        """Add a user (or set a user's password); the file is written with mode 0600."""
        from services.console.auth import add_user
        from shared.errors import ConfigError

        path = users_file
        if path is None:
            from services.common import load_config

            _, site = load_config(site_file)
            path = site.console.users_file
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass(f"password for {name}: ")
            if getpass.getpass("again: ") != password:
                fail("the passwords differ")
        try:
            new = add_user(path, name, password)
        except (ConfigError, OSError) as exc:
            fail(str(exc))
        typer.echo(f"{path}: user {name} {'added' if new else 'updated'}")
