"""Site-file section owned by the console (``console:`` in the site YAML).

Where the operator's web page listens, whether reading is open without a login, where
the users file is, and the TLS certificate when the page is served over HTTPS. Every
action (acknowledge, shelve, maintenance, manual switching) needs a login whatever
``open_read`` says.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.site.core import Duration


class ConsoleConfig(BaseModel):
    """``console:`` of the site file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    listen: str = Field("127.0.0.1", min_length=1, description="address the web page binds")
    port: int = Field(8080, ge=0, le=65535, description="port of the web page (0 = any free)")
    open_read: bool = Field(
        False, description="the page and its live data are readable without a login"
    )
    users_file: Path = Field(
        Path("/etc/pfmon/console-users.json"),
        description="users and argon2 password hashes (pfmon console user add)",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    stale_after_intervals: float = Field(
        5.0, ge=1.0, le=1000.0, description="a meter is stale after this many poll intervals"
    )
    session_ttl: Duration = Field(8 * 3600.0, gt=0, description="login lifetime")
    login_attempts: int = Field(5, ge=1, le=100, description="failed logins per window")
    login_window: Duration = Field(300.0, gt=0, description="window of login_attempts")

    @model_validator(mode="after")
    def _tls_pair(self) -> ConsoleConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
