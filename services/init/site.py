"""``init_site``: every secret of one site, in the order a reader can follow.

1. check the options (all problems at once, nothing written when one is wrong);
2. the CA: a new one for a site or the centre, the centre's for an edge;
3. the broker's server certificate;
4. per service user: a password, a client certificate, ``env/<user>.env``;
5. the broker's ``passwd`` and ``acl``;
6. an edge: its bridge to the centre, registered at the centre;
7. the compose ``.env``;
8. ownership for the containers (or a note saying how).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.init.bridge import bridge_conf, bridged_topics, central_addresses, register_bridge
from services.init.broker import (
    HOMEASSISTANT_USER,
    MOSQUITTO_UID,
    ROLE_USERS,
    Role,
    acl_text,
    bridge_sites,
    bridge_user,
    mosquitto_hash,
    read_passwd,
    websockets_conf,
    write_passwd,
)
from services.init.certs import DEFAULT_HOSTNAMES, CertAuthority, key_pem, server_names
from services.init.envfile import (
    DATABASE_PASSWORDS,
    DEFAULT_BROKER_URL,
    compose_env,
    default_env_file,
    service_env,
)
from services.init.files import chown_tree, write_private
from services.init.nats import NODES as NATS_NODES
from services.init.nats import broker_url as nats_broker_url
from services.init.nats import nats_hash, node_problems, write_nats_centre
from shared import topics
from shared.errors import ConfigError
from shared.site import load_site
from shared.site.analytics import AnalyticsConfig

__all__ = ["ENGINES", "PFMON_UID", "InitResult", "init_site", "new_password"]

#: the centre's broker: one Mosquitto, or a NATS JetStream cluster
ENGINES = ("mosquitto", "nats")
Engine = Literal["mosquitto", "nats"]

#: uid of the ``pfmon`` user in the Dockerfile (the services read clients/<user>/)
PFMON_UID = 10001


@dataclass
class InitResult:
    out: Path
    env_file: Path
    role: Role
    site: str
    passwords: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def new_password() -> str:
    """32 url-safe characters (~190 bits)."""
    return secrets.token_urlsafe(24)


def init_site(
    *,
    site: str,
    role: Role = "site",
    site_file: Path | None = None,
    simulator: bool = False,
    out: Path = Path("deploy/secrets"),
    env_file: Path | None = None,
    gateway: str = "gw1",
    hostnames: Iterable[str] = (),
    central: Path | None = None,
    central_host: str | None = None,
    central_port: int = 8883,
    broker_path: str = "/mosquitto/secrets",
    websockets_port: int | None = None,
    websockets_bind: str | None = None,
    central_tunnel: str | None = None,
    bridge_metrics: str = "all",
    client_path: str = "/run/secrets/mqtt",  # may contain {user}
    broker_url: str | None = None,
    days: int = 3650,
    force: bool = False,
    chown: bool | None = None,
    engine: Engine = "mosquitto",
    nats_nodes: Sequence[str] | None = None,
) -> InitResult:
    """Generate every secret of one site. Raises :class:`ConfigError` listing all problems.

    ``broker_path`` is where the broker sees ``broker/`` (the container path by
    default), ``client_path`` where a service sees its ``clients/<user>/`` folder;
    ``broker_url`` is what services dial (``mqtts://mosquitto:8883`` in compose).
    ``websockets_port`` (443) adds a listener for MQTT over WebSockets and TLS
    (``broker/conf.d/websockets.conf``; ``websockets_bind``: the IP address it binds).
    ``central_tunnel`` (edge): the HOST:PORT of the edge's ``pfmon wss-tunnel``, when the
    bridge reaches the centre's websockets listener (``central_port``, 443) through it.
    ``bridge_metrics`` (edge): which metrics the bridge forwards (``all``, ``aggregates``,
    one interval such as ``600s``, or ``batches``: analytics' archive batches, which the
    site file's ``analytics.archive_batches`` must turn on).
    ``engine`` ``nats`` (centre only) also writes the NATS JetStream nodes' configurations
    and users (``nats/``, :mod:`services.init.nats`) for the nodes ``nats_nodes`` (default
    ``nats1``-``nats3``); their
    names go into the broker certificate, and services dial every node.
    """
    env_file = env_file if env_file is not None else default_env_file(role)
    problems = [
        *_name_problems(site, gateway, role),
        *(_edge_problems(central, central_host) if role == "edge" else []),
        *_overwrite_problems(out, env_file, force),
    ]
    if central_tunnel is not None:
        host, _, port = central_tunnel.rpartition(":")
        if role != "edge":
            problems.append("--central-tunnel: only an edge's bridge dials the centre")
        elif not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            problems.append(
                f"--central-tunnel: {central_tunnel!r} is not HOST:PORT (e.g. wss-tunnel:8884)"
            )
        if central_host and "," in central_host:
            problems.append(
                "--central-host: a bridge through --central-tunnel reaches one central host;"
                f" {central_host!r} lists several (list the nodes without a tunnel)"
            )
    if bridge_metrics != "all":
        try:
            bridged_topics(bridge_metrics)
        except ConfigError as exc:
            problems.append(str(exc))
        if role != "edge":
            problems.append("--bridge-metrics: only an edge's bridge forwards metrics")
    if engine not in ENGINES:
        problems.append(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    elif engine == "nats":
        if role != "central":
            problems.append(
                f"--engine nats: only the centre runs on NATS (--role central), not {role!r}"
            )
        problems += node_problems(list(nats_nodes or NATS_NODES))
    if engine != "nats" and nats_nodes is not None:
        problems.append("--nats-node: only with --engine nats")
    if role == "central" and engine == "mosquitto" and (out / "nats" / "passwd").exists():
        problems.append(
            f"--engine: this centre runs on NATS ({out}/nats): pass --engine nats to rotate "
            "its secrets, or remove that folder to go back to one Mosquitto"
        )
    if websockets_port is not None and not 1 <= websockets_port <= 65535:
        problems.append(f"--websockets-port: {websockets_port} is not a TCP port (1-65535)")
    homeassistant = None  # a Home Assistant user and its ACL only with the section
    if site_file is not None:
        try:
            site_config = load_site(site_file)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            homeassistant = site_config.homeassistant
            if bridge_metrics == "batches":
                problems += _batch_problems(site_file, site_config.analytics)
    if problems:
        raise ConfigError("pfmon init: cannot generate the site's secrets", problems)

    result = InitResult(out=out, env_file=env_file, role=role, site=site)
    ca = _write_ca(result, central if role == "edge" else None, days)
    broker = out / "broker"
    nats = engine == "nats"
    nats_nodes = list(nats_nodes or NATS_NODES)
    names = [*hostnames, *(nats_nodes if nats else ())]
    _write_server_cert(ca, broker, site, names, days, also_client=nats)
    if nats and broker_url is None:
        broker_url = nats_broker_url(nats_nodes)

    users = ROLE_USERS[role]
    if homeassistant is not None and role != "central":
        users = (*users, HOMEASSISTANT_USER)
    passwd = _bridges_kept(broker) if role == "central" else {}
    nats_hashes = _bridges_kept(out / "nats") if nats else {}
    for user in users:
        password = result.passwords[user] = new_password()
        passwd[user] = mosquitto_hash(password)
        if nats:
            nats_hashes[user] = nats_hash(password)
        _write_client(ca, out, user, password, days)
        env = service_env(
            site=site,
            user=user,
            password=password,
            url=broker_url or DEFAULT_BROKER_URL,
            client_dir=client_path.format(user=user),
        )
        write_private(out / "env" / f"{user}.env", env)
    ws_conf = broker / "conf.d" / "websockets.conf"
    if websockets_port is not None:
        conf = websockets_conf(port=websockets_port, secrets_path=broker_path, bind=websockets_bind)
        write_private(ws_conf, conf)
        result.written.append(ws_conf)
    elif ws_conf.exists():
        ws_conf.unlink()  # a rotation without the option turns the listener off
    write_passwd(broker / "passwd", passwd)
    acl = acl_text(role, site, bridge_sites(passwd), homeassistant)
    write_private(broker / "acl", acl, 0o600)
    result.written += [broker / "passwd", broker / "acl"]
    if nats:
        result.written += write_nats_centre(out / "nats", nats_nodes, nats_hashes, acl)
        result.notes.append(
            f"NATS nodes {', '.join(nats_nodes)}: {out}/nats/<node>.conf and users.conf "
            "(an edge registered later rewrites users.conf: reload every node, docker "
            "compose kill -s HUP " + " ".join(nats_nodes) + ")"
        )

    if role == "edge":
        assert central is not None and central_host is not None
        _write_edge_bridge(
            result,
            ca,
            central,
            central_host,
            central_port,
            gateway,
            broker_path,
            days,
            central_tunnel,
            bridge_metrics,
        )
        if central_tunnel is not None:
            result.notes.append(
                f"the bridge dials pfmon wss-tunnel at {central_tunnel}; run it with "
                f"--url wss://{central_host}:{central_port}/mqtt --ca-file ca.crt "
                "(deploy/edge/compose.yml: --profile wss), and give the centre "
                "pfmon init --websockets-port"
            )
        if (central / "nats" / "passwd").exists():
            result.notes.append(
                f"registered {bridge_user(site)} at the centre ({central}/nats/users.conf, "
                "and broker/passwd, acl): reload every NATS node (compose.nats.yml: docker "
                "compose kill -s HUP nats1 nats2 nats3)"
            )
        else:
            result.notes.append(
                f"registered {bridge_user(site)} at the centre ({central}/broker/passwd, acl): "
                "reload the central broker (docker compose kill -s HUP mosquitto)"
            )

    if role in ("site", "central"):
        for name in DATABASE_PASSWORDS:
            result.passwords[name] = new_password()
    text = compose_env(
        role=role,
        site=site,
        gateway=gateway,
        env_file=env_file,
        site_file=site_file,
        simulator=simulator,
        users=users,
        passwords=result.passwords,
    )
    if role == "edge" and central_tunnel is not None:
        profiles = "simulator,wss" if "COMPOSE_PROFILES=simulator" in text else "wss"
        text = text.replace("COMPOSE_PROFILES=simulator\n", "")
        text += (
            "# the bridge goes through pfmon wss-tunnel (compose profile wss)\n"
            f"COMPOSE_PROFILES={profiles}\n"
            f"PFM_CENTRAL_WSS_URL=wss://{central_host}:{central_port}/mqtt\n"
        )
    write_private(env_file, text)
    result.written.append(env_file)

    _hand_over(result, users, os.geteuid() == 0 if chown is None else chown)
    return result


# -- 1. the options ----------------------------------------------------------------------


def _name_problems(site: str, gateway: str, role: str) -> list[str]:
    problems = []
    for option, value, what in (("--site", site, "site"), ("--gateway", gateway, "gateway")):
        try:
            topics.check_slug(value, what)
        except ConfigError as exc:
            problems.append(f"{option}: {exc}")
    if role not in ROLE_USERS:
        problems.append(f"--role: {role!r} is not one of site, edge, central")
    return problems


def _edge_problems(central: Path | None, central_host: str | None) -> list[str]:
    """An edge is made at the centre: its CA key, and a host its certificate names."""
    problems = []
    if central is None:
        problems.append(
            "--central: an edge is initialised at the centre; pass the centre's secrets "
            "folder (it holds the CA that signs the edge and the broker's passwd/acl)"
        )
    elif not (central / "ca.key").exists():
        problems.append(f"--central: {central}/ca.key not found (run pfmon init --role central)")
    if not central_host:
        problems.append("--central-host: the address the edge's bridge dials")
    else:
        try:
            hosts = [host for host, _ in central_addresses(central_host, 8883)]
        except ConfigError as exc:
            problems.append(str(exc))
            hosts = []
        crt = central / "broker" / "server.crt" if central is not None else None
        names = server_names(crt) if crt is not None and crt.exists() else set()
        for host in hosts if names else ():
            if host not in names:
                problems.append(
                    f"--central-host: the central broker's certificate does not name "
                    f"{host!r} (it names {', '.join(sorted(names))}); the bridge "
                    f"would fail TLS verification. Re-run the centre's init with "
                    f"--hostname {host} --force, or use one of those names"
                )
    return problems


def _overwrite_problems(out: Path, env_file: Path, force: bool) -> list[str]:
    existing = [p for p in (out / "broker" / "passwd", env_file) if p.exists()]
    if not existing or force:
        return []
    return [
        "refusing to overwrite existing secrets: "
        + ", ".join(str(p) for p in existing)
        + " (pass --force to rotate every secret of this site)"
    ]


# -- 2-4. certificates ----------------------------------------------------------------------


def _write_ca(result: InitResult, central: Path | None, days: int) -> CertAuthority:
    """The centre's CA for an edge (``central``), else a new one whose key stays here."""
    out = result.out
    if central is not None:
        ca = CertAuthority.load(central)
    else:
        ca = CertAuthority.create(result.site, days)
        if ca.key is None:
            raise ConfigError("the CA key is missing")
        write_private(out / "ca.key", key_pem(ca.key))
        result.written.append(out / "ca.key")
    write_private(out / "ca.crt", ca.cert_pem, 0o644)
    result.written.append(out / "ca.crt")
    return ca


def _write_server_cert(
    ca: CertAuthority,
    broker: Path,
    site: str,
    hostnames: Iterable[str],
    days: int,
    *,
    also_client: bool = False,
) -> None:
    """``broker/``: the CA, the broker's certificate for every name it answers to (and,
    ``also_client``, a client certificate: NATS nodes present it on their routes)."""
    sans = [*DEFAULT_HOSTNAMES, socket.gethostname(), *hostnames]
    crt, key = ca.issue(
        f"pfmon broker {site}", server=True, sans=sans, days=days, also_client=also_client
    )
    write_private(broker / "ca.crt", ca.cert_pem, 0o644)
    write_private(broker / "server.crt", crt, 0o644)
    write_private(broker / "server.key", key)
    (broker / "conf.d").mkdir(parents=True, exist_ok=True)


def _write_client(ca: CertAuthority, out: Path, user: str, password: str, days: int) -> None:
    """``clients/<user>/``: the CA, the service's client certificate, and its broker
    password as a file of its own (for systemd's ``LoadCredential=``)."""
    crt, key = ca.issue(user, server=False, days=days)
    folder = out / "clients" / user
    write_private(folder / "ca.crt", ca.cert_pem, 0o644)
    write_private(folder / "client.crt", crt, 0o644)
    write_private(folder / "client.key", key)
    write_private(folder / "password", password + "\n")


# -- 5-6. broker users and the bridge -------------------------------------------------------


def _bridges_kept(folder: Path) -> dict[str, str]:
    """The centre keeps the bridges of edges registered earlier (rotation re-registers):
    their hashes in ``folder/passwd`` (the Mosquitto broker's, or the NATS nodes')."""
    return {u: h for u, h in read_passwd(folder / "passwd").items() if u.startswith("bridge-")}


def _batch_problems(site_file: Path, analytics: AnalyticsConfig) -> list[str]:
    """``--bridge-metrics batches`` needs the site's analytics to publish archive batches
    (their size is capped by ``analytics.archive_batch_bytes``, under the brokers' limit)."""
    if not analytics.archive_batches:
        return [
            f"--bridge-metrics batches: {site_file} has analytics.archive_batches false, so "
            "its analytics publishes no batches and no metrics would reach the centre "
            "(set it to true)"
        ]
    return []


def _write_edge_bridge(
    result: InitResult,
    ca: CertAuthority,
    central: Path,
    central_host: str,
    central_port: int,
    gateway: str,
    broker_path: str,
    days: int,
    tunnel: str | None = None,
    metrics: str = "all",
) -> None:
    """The edge broker's bridge certificate and ``conf.d/bridge.conf``; its user at the centre."""
    site, broker = result.site, result.out / "broker"
    password = result.passwords[bridge_user(site)] = new_password()
    crt, key = ca.issue(bridge_user(site), server=False, days=days)
    write_private(broker / "bridge.crt", crt, 0o644)
    write_private(broker / "bridge.key", key)
    conf = bridge_conf(
        site=site,
        gateway=gateway,
        central_host=central_host,
        central_port=central_port,
        password=password,
        secrets_path=broker_path,
        tunnel=tunnel,
        metrics=metrics,
    )
    write_private(broker / "conf.d" / "bridge.conf", conf)
    register_bridge(central, site, password)


# -- 8. ownership ----------------------------------------------------------------------------


def _hand_over(result: InitResult, users: Iterable[str], chown: bool) -> None:
    """Give the broker's files to mosquitto and the clients' to pfmon (as root), or say how."""
    out, broker = result.out, result.out / "broker"
    if chown:
        chown_tree(broker, MOSQUITTO_UID)
        for user in users:
            chown_tree(out / "clients" / user, PFMON_UID)
    else:
        result.notes.append(
            "containers read these files as uid 1883 (mosquitto) and 10001 (pfmon): "
            f"sudo chown -R {MOSQUITTO_UID} {broker} && sudo chown -R {PFMON_UID} {out}/clients"
        )
