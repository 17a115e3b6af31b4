"""``pfmon init``: generate the secrets of one site (nothing secret ever lives in the repo).

For a site it writes, under ``--out`` (default ``deploy/secrets``):

* ``ca.crt`` / ``ca.key`` - the site's certificate authority (EC P-256). Edge bundles
  get ``ca.crt`` only: the CA key stays at the centre;
* ``broker/`` - what Mosquitto mounts: ``ca.crt``, ``server.crt``/``server.key``
  (SANs: localhost, 127.0.0.1, ``mosquitto`` and every ``--hostname``), ``passwd``
  (mosquitto_passwd format, PBKDF2-SHA512), ``acl`` (one user per service, each may
  publish only its own topics) and ``conf.d/`` (the bridge to the centre on an edge);
* ``clients/<user>/`` - ``ca.crt``, ``client.crt``, ``client.key`` and ``password`` (the
  broker password, for systemd's ``LoadCredential=``) for each service;
* ``env/<user>.env`` - ``PFM_MQTT_*`` settings of each service (systemd installs);
* the compose ``.env`` (``--env-file``): the site name and every generated password.

Roles: ``site`` (one stack: broker, four services, database, dashboards), ``edge``
(a branch gateway: collector, analytics, actuator and a broker that bridges
``metrics``/``event``/``state`` to the centre) and ``central`` (broker, archivers,
database, dashboards). An edge is initialised *at the centre* with ``--central
DIR`` (the centre's secrets folder): its certificates are signed by the central
CA and its bridge user is added to the centre's ``passwd`` and ``acl``.
Where things are: :mod:`~services.init.site` (``init_site``, step by step),
:mod:`~services.init.certs` (CA and certificates), :mod:`~services.init.broker`
(users, passwords, ACL, broker configuration), :mod:`~services.init.bridge` (an
edge's bridge and its user at the centre), :mod:`~services.init.envfile` (the
service and compose env files), :mod:`~services.init.cli` (the command).
"""

from __future__ import annotations

from services.init.bridge import BRIDGED_TOPICS, bridge_conf, bridged_topics, register_bridge
from services.init.broker import (
    MOSQUITTO_UID,
    ROLE_USERS,
    Role,
    acl_text,
    bridge_user,
    mosquitto_hash,
    read_passwd,
    render_broker_conf,
    websockets_conf,
    write_passwd,
)
from services.init.certs import CertAuthority, server_names
from services.init.cli import register
from services.init.site import PFMON_UID, InitResult, init_site, new_password

__all__ = [
    "BRIDGED_TOPICS",
    "MOSQUITTO_UID",
    "PFMON_UID",
    "ROLE_USERS",
    "CertAuthority",
    "InitResult",
    "Role",
    "acl_text",
    "bridge_conf",
    "bridge_user",
    "bridged_topics",
    "init_site",
    "mosquitto_hash",
    "new_password",
    "read_passwd",
    "register",
    "register_bridge",
    "render_broker_conf",
    "server_names",
    "websockets_conf",
    "write_passwd",
]
