"""The console in ``pfmon demo``: open reading on loopback, a demo login for actions."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from services.console.auth import add_user
from shared.embedded import free_port

DEMO_USER = "demo"


def demo_console(workdir: Path) -> tuple[dict[str, Any], str, str]:
    """The ``console:`` section of the demo site, its URL and the demo user's password
    (a fresh one per run, written to a users file in the demo's work folder)."""
    port = free_port()
    users = workdir / "console-users.json"
    password = secrets.token_urlsafe(9)
    add_user(users, DEMO_USER, password)
    section = {
        "listen": "127.0.0.1",
        "port": port,
        "open_read": True,
        "users_file": str(users),
    }
    return section, f"http://127.0.0.1:{port}/", password
