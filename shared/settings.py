"""Process settings from ``PFM_*`` environment variables (pydantic-settings).

Per-site content (meters, buses, rules, thresholds) lives in the site YAML file
(:mod:`shared.site`); these settings say where things are and how to reach them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError
from shared.messages import DEFAULT_MAX_CLOCK_SKEW_S, set_max_clock_skew

DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_DB_DSN = "postgresql://postgres@127.0.0.1:5432/test"


class MqttTarget(BaseModel):
    """A parsed broker address."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_mqtt_url(url: str) -> MqttTarget:
    """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://host[:8883]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"PFM_MQTT_URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"PFM_MQTT_URL {url!r}: no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"PFM_MQTT_URL {url!r}: bad port") from exc
    return MqttTarget(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def parse_mqtt_urls(value: str) -> list[MqttTarget]:
    """``PFM_MQTT_URL``: one broker, or several nodes of one clustered broker separated by
    commas (``mqtt://node1:1883,mqtt://node2:1883``). Every entry is checked; an empty
    entry, a repeated one or a mix of ``mqtt://`` and ``mqtts://`` is a :class:`ConfigError`
    naming the entry by its position."""
    entries = [entry.strip() for entry in value.split(",")]
    targets: list[MqttTarget] = []
    seen: dict[tuple[str, int], int] = {}
    for n, entry in enumerate(entries, 1):
        where = f"entry {n} of {len(entries)}" if len(entries) > 1 else "the URL"
        if not entry:
            raise ConfigError(f"PFM_MQTT_URL {value!r}: {where} is empty (a stray comma?)")
        try:
            target = parse_mqtt_url(entry)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({where})") from exc
        key = (target.host, target.port)
        if key in seen:
            raise ConfigError(
                f"PFM_MQTT_URL {value!r}: {where} repeats entry {seen[key]} "
                f"({target.host}:{target.port})"
            )
        seen[key] = n
        if targets and target.tls != targets[0].tls:
            raise ConfigError(
                f"PFM_MQTT_URL {value!r}: {where} {entry!r} mixes mqtts:// and mqtt:// nodes "
                "(the TLS settings apply to every node)"
            )
        targets.append(target)
    return targets


class Settings(BaseSettings):
    """Every setting has an environment variable ``PFM_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="PFM_", env_file=None, extra="ignore", case_sensitive=False
    )

    mqtt_url: str = Field(
        DEFAULT_MQTT_URL,
        description="broker, mqtt://host:port or mqtts://; the nodes of a clustered broker"
        " separated by commas (the bus moves to the next when one is lost)",
    )
    mqtt_username: str | None = Field(None, description="broker user (overrides the URL's)")
    mqtt_password: SecretStr | None = Field(None, description="broker password")
    mqtt_ca_file: Path | None = Field(None, description="CA bundle that signed the broker cert")
    mqtt_cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    mqtt_key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="MQTT version: auto tries v5 and falls back to 3.1.1"
    )
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600)
    mqtt_session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        le=0xFFFFFFFF,
        description="MQTT v5: how long the broker keeps a disconnected service's session "
        "(and queues its QoS 1 messages)",
    )
    mqtt_client_id: str | None = Field(
        None, description="client id prefix; default pfm-<service>-<site>-<host>"
    )
    mqtt_fast: bool = Field(
        True,
        description="read and acknowledge MQTT in batches under aiomqtt (off = aiomqtt's own"
        " per-message path; on needs exactly aiomqtt 2.5.1 / paho 2.2.0, else it is off anyway)",
    )
    alertmanager_url: str = Field(
        "http://127.0.0.1:9093", description="Alertmanager that `pfmon alerts` posts to"
    )
    db_dsn: str = Field(DEFAULT_DB_DSN, description="PostgreSQL / TimescaleDB DSN")
    site_file: Path | None = Field(None, description="site YAML (meters, buses, rules)")
    data_dir: Path = Field(Path("var"), description="spool and buffer folder")
    metrics_host: str = Field("0.0.0.0", description="address of the /metrics server")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="port of /metrics (default per service; 0 = off)"
    )
    max_clock_skew_s: float = Field(
        DEFAULT_MAX_CLOCK_SKEW_S,
        gt=0,
        le=7 * 86400,
        allow_inf_nan=False,
        description="a message whose ts is further ahead of this machine's clock is refused "
        "(dead letter with the skew)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto = JSON lines unless stderr is a terminal"
    )
    log_file: Path | None = Field(
        None,
        description="also write JSON lines to this file (reopened when logrotate moves it)",
    )

    @field_validator(
        "mqtt_username",
        "mqtt_password",
        "mqtt_ca_file",
        "mqtt_cert_file",
        "mqtt_key_file",
        "mqtt_client_id",
        "site_file",
        "metrics_port",
        "log_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def mqtt(self, node: int = 0) -> MqttTarget:
        """The broker (the ``node``-th of ``PFM_MQTT_URL``'s list, wrapping around), with
        ``PFM_MQTT_USERNAME`` / ``PFM_MQTT_PASSWORD`` applied."""
        targets = self.mqtt_targets()
        return targets[node % len(targets)]

    def mqtt_targets(self) -> list[MqttTarget]:
        """Every node of ``PFM_MQTT_URL``, in order, credentials applied."""
        targets = parse_mqtt_urls(self.mqtt_url)
        for target in targets:
            if self.mqtt_username is not None:
                target.username = self.mqtt_username
            if self.mqtt_password is not None:
                target.password = self.mqtt_password.get_secret_value()
        return targets


#: default /metrics port per service
METRICS_PORTS = {
    "collector": 9101,
    "analytics": 9102,
    "actuator": 9103,
    "archiver": 9104,
    "console": 9105,
    "alerts": 9106,
}


#: credentials read from ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``):
#: the file's content is the value
CREDENTIAL_VALUES = ("mqtt_password", "db_dsn")
#: the file itself is the value (its path is passed on, its content never copied)
CREDENTIAL_FILES = ("mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file")


def credentials(directory: Path | str | None = None) -> dict[str, object]:
    """Settings found in a credentials directory (default ``$CREDENTIALS_DIRECTORY``).

    A credential named like a setting (``mqtt_password``, ``mqtt_key_file`` ...) gives
    that setting; an unreadable one is a :class:`ConfigError` naming the file.
    """
    where = directory if directory is not None else os.environ.get("CREDENTIALS_DIRECTORY")
    if not where:
        return {}
    folder = Path(where)
    found: dict[str, object] = {}
    for name in CREDENTIAL_VALUES + CREDENTIAL_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name in CREDENTIAL_FILES:
            found[name] = path
            continue
        try:
            found[name] = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"credential {path}: cannot read: {exc}") from exc
    return found


def _from_environment(name: str) -> bool:
    key = f"PFM_{name}".upper()
    return any(k.upper() == key and v.strip() for k, v in os.environ.items())


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value is a :class:`ConfigError` naming the variable.

    Also sets how far ahead of this clock a message may be (``PFM_MAX_CLOCK_SKEW_S``)
    for the message validation of this process.

    Precedence: ``overrides``, then ``PFM_*`` variables, then credentials
    (``$CREDENTIALS_DIRECTORY``), then defaults.
    """
    values = {
        k: v for k, v in credentials().items() if k not in overrides and not _from_environment(k)
    }
    values.update(overrides)
    try:
        settings = Settings(**values)  # type: ignore[arg-type]
        settings.mqtt()
    except ValidationError as exc:
        problems = [
            f"PFM_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
        raise ConfigError("invalid environment settings", problems) from exc
    set_max_clock_skew(settings.max_clock_skew_s)
    return settings
