"""An edge's bridge to the centre: its ``bridge.conf`` and its user at the central broker.

The edge forwards its summaries (``metrics``, or analytics' archive batches of them,
``event``, actuator ``state``, gateway ``status``) out to the centre, with persistent
sessions both ways so that QoS 1 messages queue at the edge while the WAN is down;
nothing comes back.

Over MQTT + TLS (8883, client certificate and password) by default. Mosquitto's bridges
cannot speak WebSockets, so for an edge whose firewall passes only HTTPS the bridge dials
``pfmon wss-tunnel`` (``tunnel``: its HOST:PORT on the edge) in plain MQTT, and the
tunnel carries the connection to the centre's ``wss://HOST:443/mqtt`` (TLS verified
against the site CA; the bridge user's password then authenticates it, as mosquitto's
websockets listener asks for no client certificate).
"""

from __future__ import annotations

import re
from pathlib import Path

from services.init.broker import (
    ROOT,
    acl_text,
    bridge_sites,
    bridge_user,
    mosquitto_hash,
    read_passwd,
    write_passwd,
)
from services.init.files import write_private
from services.init.nats import register_nats_bridge
from shared.errors import ConfigError

#: the topics an edge forwards to the centre (direction ``out`` only: nothing comes back);
#: ``+/metrics/#`` is every metrics message: per input and the aggregates below it
BRIDGED_TOPICS = ("+/metrics/#", "+/event", "actuator/+/state", "gateway/+/status")
#: ``--bridge-metrics``: which metrics an edge forwards (an aggregate interval level such
#: as ``600s`` forwards that interval only); ``batches``: analytics' archive batches
#: (every metrics message, many in one MQTT message) instead of the per-meter topics
BRIDGE_METRICS = {"all": "+/metrics/#", "aggregates": "+/metrics/+", "batches": "archive/analytics"}
_INTERVAL = re.compile(r"^[1-9][0-9]*s$")


def bridged_topics(metrics: str = "all") -> tuple[str, ...]:
    """The topics (below the site) an edge forwards: ``metrics`` is ``all`` (per-input
    metrics and aggregates), ``aggregates`` (the 3 s and 10 min aggregates only), one
    aggregate interval (``600s``) or ``batches`` (analytics' archive batches, which hold
    every metrics message, instead of the per-meter topics). Anything else is a
    :class:`ConfigError`."""
    if metrics in BRIDGE_METRICS:
        chosen = BRIDGE_METRICS[metrics]
    elif _INTERVAL.fullmatch(metrics):
        chosen = f"+/metrics/{metrics}"
    else:
        raise ConfigError(
            f"--bridge-metrics {metrics!r}: expected all, aggregates, batches or one aggregate"
            " interval in whole seconds (3s, 600s)"
        )
    return (chosen, *BRIDGED_TOPICS[1:])


def central_addresses(central_host: str, central_port: int) -> list[tuple[str, int]]:
    """``--central-host``: one host, or the nodes of a clustered central broker separated
    by commas, each ``host`` (at ``central_port``) or ``host:port``. A bad entry is a
    :class:`ConfigError` naming it."""
    out: list[tuple[str, int]] = []
    entries = [e.strip() for e in central_host.split(",")]
    for n, entry in enumerate(entries, 1):
        where = f"--central-host {central_host!r}, entry {n}"
        host, sep, port_text = entry.rpartition(":")
        if not sep:
            host, port_text = entry, str(central_port)
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ConfigError(f"{where}: {entry!r} is not a host or host:port")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{where}: port {port_text!r} is not 1-65535")
        address = (host, int(port_text))
        if address in out:
            raise ConfigError(f"{where}: {host}:{port_text} is listed twice")
        out.append(address)
    return out


def bridge_conf(
    *,
    site: str,
    gateway: str,
    central_host: str,
    central_port: int,
    password: str,
    secrets_path: str,
    tunnel: str | None = None,
    metrics: str = "all",
) -> str:
    """The ``conf.d/bridge.conf`` of an edge broker. ``central_host`` may list the nodes
    of a clustered centre (:func:`central_addresses`): the bridge dials the first that
    answers and moves to the next when it is lost. Through ``tunnel`` HOST:PORT (the
    edge's ``pfmon wss-tunnel``, when the centre is reached over WebSockets) it dials the
    tunnel, which reaches one central host. ``metrics``: which metrics messages it forwards
    (:func:`bridged_topics`)."""
    topics_lines = [f"topic {ROOT}/{site}/{t} out 1" for t in bridged_topics(metrics)]
    if tunnel is None:
        addresses = " ".join(f"{h}:{p}" for h, p in central_addresses(central_host, central_port))
        link = [
            f"address {addresses}",
            "# several addresses: the first that answers; after a loss the next one, and back",
            "# to the first when it answers again",
            "round_robin false",
            "bridge_protocol_version mqttv311",
        ]
        tls = [
            f"bridge_cafile {secrets_path}/ca.crt",
            f"bridge_certfile {secrets_path}/bridge.crt",
            f"bridge_keyfile {secrets_path}/bridge.key",
            "bridge_insecure false",
        ]
    else:
        if "," in central_host:
            raise ConfigError(
                f"--central-host {central_host!r}: a bridge through pfmon wss-tunnel reaches"
                " one central host; list several nodes without --central-tunnel"
            )
        link = [
            f"# through pfmon wss-tunnel ({tunnel}) to wss://{central_host}:{central_port}/mqtt:",
            "# plain MQTT on the edge's own network, TLS from the tunnel to the centre",
            f"address {tunnel}",
            "bridge_protocol_version mqttv311",
        ]
        tls = []
    return "\n".join(
        [
            f"# Bridge edge site {site} (gateway {gateway}) -> central broker. Generated by",
            "# `pfmon init --role edge`. Holds a password: keep this file private.",
            f"connection central-{site}",
            *link,
            f"remote_clientid pfm-bridge-{site}-{gateway}",
            f"remote_username {bridge_user(site)}",
            f"remote_password {password}",
            *tls,
            "# persistent session both ways: QoS 1 messages queue here while the WAN is down",
            "cleansession false",
            "local_cleansession false",
            "start_type automatic",
            "restart_timeout 2 60",
            "keepalive_interval 30",
            "notifications false",
            "# out only, so there is no loop to detect; a clustered centre (NATS) refuses the",
            "# bridge's private protocol flag",
            "try_private false",
            *topics_lines,
            "",
        ]
    )


def register_bridge(central: Path, site: str, password: str) -> None:
    """Add (or replace) an edge's bridge user in the centre's passwd and ACL, and in its
    NATS users when the centre runs on NATS (``nats/``)."""
    broker = central / "broker"
    passwd = read_passwd(broker / "passwd")
    passwd[bridge_user(site)] = mosquitto_hash(password)
    write_passwd(broker / "passwd", passwd)
    central_site = _central_site(broker / "acl")
    acl = acl_text("central", central_site, bridge_sites(passwd))
    write_private(broker / "acl", acl)
    register_nats_bridge(central, bridge_user(site), password, acl)


def _central_site(acl: Path) -> str:
    """The centre's site, from the first line of the ACL its init wrote."""
    if acl.exists():
        first = acl.read_text().splitlines()[0]
        if ", site " in first:
            return first.rsplit(", site ", 1)[1].strip()
    return "central"
