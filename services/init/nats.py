"""The clustered centre on NATS JetStream: each node's configuration and the users.

``pfmon init --role central --engine nats`` writes, beside the Mosquitto files, a
``nats/`` folder:

* ``<node>.conf`` per node (three by default: ``nats1``, ``nats2``, ``nats3``, the
  compose services' names): JetStream, cluster routes to every node, the MQTT gateway on
  8883, TLS with client certificates on MQTT and on the routes (the broker certificate,
  which names every node and serves as the nodes' client certificate on routes);
* ``users.conf``, included by every node: one user per service and per edge bridge,
  password bcrypt-hashed, MQTT connections only, with subject permissions made from the
  same ACL that the Mosquitto centre uses (:func:`services.init.broker.acl_text`);
* ``passwd``: the bcrypt hashes (``user:hash``), so that registering an edge later
  rewrites ``users.conf`` without knowing the other passwords.

NATS's MQTT gateway maps a topic to a subject: ``/`` becomes ``.``, the wildcards ``+``
and ``#`` become ``*`` and ``>``. A QoS 1 subscription is a JetStream consumer that
delivers on ``$MQTT.sub.<id>``: every user that reads needs to subscribe there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import bcrypt

from services.init.broker import read_passwd, write_passwd
from services.init.files import write_private
from shared.errors import ConfigError

__all__ = [
    "NODES",
    "broker_url",
    "node_conf",
    "node_problems",
    "permissions",
    "register_nats_bridge",
    "subject",
    "users_conf",
    "write_nats_centre",
]

#: the default nodes: the compose services' names (deploy/central/compose.nats.yml)
NODES = ("nats1", "nats2", "nats3")
MQTT_PORT = 8883
ROUTE_PORT = 6222
#: where a node sees the ``broker/`` folder (certificates) and the ``nats/`` folder
SECRETS_PATH = "/secrets"
STORE_DIR = "/data/jetstream"
#: the subjects a QoS 1 subscription's JetStream consumer delivers on
DELIVERY_SUBJECTS = "$MQTT.sub.>"
BCRYPT_ROUNDS = 11
_NODE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


def node_problems(nodes: Sequence[str]) -> list[str]:
    """``--nats-node``: three or more distinct host names."""
    problems = []
    for node in nodes:
        if not _NODE.match(node):
            problems.append(
                f"--nats-node: {node!r} is not a host name (lower-case letters, digits, '.', '-')"
            )
    if len(set(nodes)) != len(nodes):
        twice = sorted({n for n in nodes if nodes.count(n) > 1})
        problems.append(f"--nats-node: {', '.join(twice)} listed twice")
    if len(nodes) < 3:
        problems.append(
            f"--nats-node: {len(nodes)} node(s); a JetStream cluster that survives the loss"
            " of a node needs three or more"
        )
    return problems


def broker_url(nodes: Iterable[str]) -> str:
    """``PFM_MQTT_URL`` listing every node."""
    return ",".join(f"mqtts://{node}:{MQTT_PORT}" for node in nodes)


# -- users and permissions -----------------------------------------------------------------


def subject(topic: str) -> str:
    """The NATS subject of an MQTT topic or filter (pfmon's topics: slugs and ``/``)."""
    levels = topic.split("/")
    for level in levels:
        if not level or "." in level or " " in level:
            raise ConfigError(f"topic {topic!r}: level {level!r} has no NATS subject here")
    return ".".join({"+": "*", "#": ">"}.get(level, level) for level in levels)


def permissions(acl: str) -> dict[str, tuple[list[str], list[str]]]:
    """user -> (publish, subscribe) subjects, from a Mosquitto ACL ``acl_text`` wrote.

    ``topic read`` is a subscribe permission, ``write`` a publish one, ``readwrite`` both;
    ``a/#`` is ``a`` and ``a.>`` (MQTT's ``#`` matches its parent level too, and NATS
    subscribes to both subjects for it).
    ``$SYS`` topics are Mosquitto's own and have no NATS subject: they are left out (a
    node's health is its HTTP ``/healthz``). A user that reads may also subscribe to the
    consumers' delivery subjects (:data:`DELIVERY_SUBJECTS`).
    """
    out: dict[str, tuple[list[str], list[str]]] = {}
    user: str | None = None
    for n, line in enumerate(acl.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user" and len(words) == 2:
            user = words[1]
            out[user] = ([], [])
            continue
        if words[0] != "topic" or len(words) != 3 or user is None:
            raise ConfigError(f"ACL line {n}: {line!r} is not 'user NAME' or 'topic ACCESS T'")
        access, topic = words[1], words[2]
        if access not in ("read", "write", "readwrite"):
            raise ConfigError(f"ACL line {n}: access {access!r} is not read, write, readwrite")
        if topic.startswith("$SYS/"):
            continue
        publish, subscribe = out[user]
        subjects = [subject(topic)]
        if topic.endswith("/#"):  # MQTT's a/# also matches a itself, and NATS asks for both
            subjects.insert(0, subject(topic[:-2]))
        if access in ("write", "readwrite"):
            publish += subjects
        if access in ("read", "readwrite"):
            subscribe += subjects
    for _publish, subscribe in out.values():
        if subscribe:
            subscribe.append(DELIVERY_SUBJECTS)
    return out


def nats_hash(password: str) -> str:
    """A bcrypt hash, which nats-server accepts in place of a user's password."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def users_conf(hashes: Mapping[str, str], acl: str) -> str:
    """``users.conf``: every user with a hash, MQTT only, with the ACL's permissions.

    A user without a block in the ACL would be allowed nothing, and is refused here.
    """
    perms = permissions(acl)
    missing = sorted(set(hashes) - set(perms))
    if missing:
        raise ConfigError(f"NATS users without an ACL block: {', '.join(missing)}")
    q = json.dumps
    lines = [
        "# pfmon centre's NATS users, generated by `pfmon init` from the same ACL as the",
        "# Mosquitto centre's: regenerate it rather than editing. Anything not allowed here",
        "# is denied; passwords are bcrypt hashes; MQTT connections only.",
        "authorization {",
        "  users: [",
    ]
    for user in sorted(hashes):
        publish, subscribe = perms[user]
        lines += [
            "    {",
            f"      user: {q(user)}",
            f"      password: {q(hashes[user])}",
            '      allowed_connection_types: ["MQTT"]',
            "      permissions: {",
            f"        publish: {_allowed(publish)}",
            f"        subscribe: {_allowed(subscribe)}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _allowed(subjects: list[str]) -> str:
    """A permission map; nothing at all is an explicit ``deny: [">"]``, never an empty
    ``allow`` list whose meaning would rest on how nats-server reads it."""
    if not subjects:
        return '{ deny: [">"] }'
    return f"{{ allow: {json.dumps(subjects)} }}"


# -- the nodes -------------------------------------------------------------------------------


def node_conf(node: str, nodes: Sequence[str], *, cluster: str = "pfm-centre") -> str:
    """One node's configuration: JetStream, routes to every node, MQTT with TLS."""
    routes = "\n".join(f"    nats-route://{n}:{ROUTE_PORT}" for n in nodes)
    tls = "\n".join(
        [
            f"    cert_file: {SECRETS_PATH}/broker/server.crt",
            f"    key_file: {SECRETS_PATH}/broker/server.key",
            f"    ca_file: {SECRETS_PATH}/broker/ca.crt",
            "    verify: true  # client certificates signed by the centre's CA",
            "    timeout: 5",
        ]
    )
    return f"""# pfmon centre on NATS JetStream: node {node} of {", ".join(nodes)}.
# Generated by `pfmon init --role central --engine nats`: regenerate rather than edit.
# pfmon speaks MQTT 3.1.1 to it (PFM_MQTT_PROTOCOL=3.1.1). Sessions, QoS 1 queues and
# retained messages are JetStream streams replicated on the nodes: a client whose node
# dies resumes its session on another.

server_name: {node}
# plain NATS clients: pfmon needs none (users are MQTT-only); loopback for the nats CLI
listen: 127.0.0.1:4222
# /healthz?js-enabled-only=true for health checks, /varz for monitoring (not published)
http: 127.0.0.1:8222

jetstream {{
  store_dir: {STORE_DIR}
  max_file_store: 200G  # the edges' backlog while the archivers are away (docs/scale.md)
}}

cluster {{
  name: {cluster}
  listen: 0.0.0.0:{ROUTE_PORT}
  routes: [
{routes}
  ]
  tls {{
{tls}
  }}
}}

mqtt {{
  listen: 0.0.0.0:{MQTT_PORT}
  tls {{
{tls}
  }}
  # QoS 1 messages in flight per subscription; the sum over one session's
  # subscriptions may not exceed 65535 (docs/deployment.md, "Several broker nodes")
  max_ack_pending: 4096
  ack_wait: "30s"
}}

include users.conf
"""


def write_nats_centre(
    folder: Path, nodes: Sequence[str], hashes: Mapping[str, str], acl: str
) -> list[Path]:
    """``folder`` (``<out>/nats``): every node's configuration, users.conf, passwd."""
    written = []
    for node in nodes:
        path = folder / f"{node}.conf"
        write_private(path, node_conf(node, nodes), 0o644)
        written.append(path)
    write_passwd(folder / "passwd", dict(hashes))
    write_private(folder / "users.conf", users_conf(hashes, acl))
    return [*written, folder / "passwd", folder / "users.conf"]


def register_nats_bridge(central: Path, user: str, password: str, acl: str) -> bool:
    """Add (or replace) an edge's bridge user at a NATS centre (``central/nats``), with
    the centre's new ``acl``; False when the centre has no NATS nodes."""
    folder = central / "nats"
    if not (folder / "passwd").exists():
        return False
    hashes = read_passwd(folder / "passwd")
    hashes[user] = nats_hash(password)
    write_passwd(folder / "passwd", hashes)
    write_private(folder / "users.conf", users_conf(hashes, acl))
    return True
