"""A NATS cluster on loopback for tests and benches: N ``nats-server`` processes with
JetStream, cluster routes and the MQTT gateway, each on free ports with its own store."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from services.init.nats import NODES, node_conf
from shared.embedded import free_port, wait_port


def deploy_mqtt_options() -> str:
    """The ``mqtt {}`` tuning of the configuration ``pfmon init --engine nats`` writes for
    the centre's nodes (``max_ack_pending``, ``ack_wait``), so that the tests run what is
    deployed."""
    keep = ("max_ack_pending", "ack_wait")
    text = node_conf(NODES[0], NODES)
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line.startswith(keep))


def nats_server() -> str | None:
    """The ``nats-server`` binary, or None."""
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.path.exists(p)), None
    )


class NatsCluster:
    """``nodes`` nats-server processes: routes between all, JetStream, MQTT on each."""

    def __init__(
        self,
        workdir: Path,
        nodes: int = 3,
        *,
        name: str = "pfm",
        mqtt_options: str | None = None,
    ) -> None:
        binary = nats_server()
        if binary is None:
            raise RuntimeError("nats-server is not installed")
        self.binary = binary
        self.workdir = Path(workdir)
        self.name = name
        #: more settings of the ``mqtt {}`` block (default: the deployed configuration's)
        self.mqtt_options = deploy_mqtt_options() if mqtt_options is None else mqtt_options
        self.client_ports = [free_port() for _ in range(nodes)]
        self.route_ports = [free_port() for _ in range(nodes)]
        self.mqtt_ports = [free_port() for _ in range(nodes)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes

    @property
    def urls(self) -> list[str]:
        return [f"mqtt://127.0.0.1:{p}" for p in self.mqtt_ports]

    @property
    def mqtt_url(self) -> str:
        """Every node, comma-separated (``PFM_MQTT_URL``)."""
        return ",".join(self.urls)

    def config(self, i: int) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        store = self.workdir / f"n{i}" / "store"
        return "\n".join(
            [
                f"server_name: n{i}",
                f"listen: 127.0.0.1:{self.client_ports[i]}",
                f"jetstream {{ store_dir: {store!s} }}",
                f"cluster {{ name: {self.name}, listen: 127.0.0.1:{self.route_ports[i]},"
                f" routes: [{routes}] }}"
                if len(self.procs) > 1
                else "",  # one node: a plain server
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[i]}"
                + (f", {self.mqtt_options}" if self.mqtt_options else "")
                + " }",
                "",
            ]
        )

    def start(self, i: int | None = None) -> NatsCluster:
        """Start node ``i`` (or every node that is not running)."""
        for n in range(len(self.procs)) if i is None else [i]:
            if self.procs[n] is not None and self.procs[n].poll() is None:  # type: ignore[union-attr]
                continue
            folder = self.workdir / f"n{n}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "nats.conf"
            conf.write_text(self.config(n))
            log = (folder / "nats.log").open("ab")
            self.procs[n] = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        for n in range(len(self.procs)) if i is None else [i]:
            wait_port("127.0.0.1", self.mqtt_ports[n], timeout=20)
        return self

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no clean shutdown)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for n, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.procs[n] = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every node's MQTT gateway accepts a persistent session (JetStream up and
        the MQTT streams created with their replicas)."""
        deadline = time.monotonic() + timeout
        for n, port in enumerate(self.mqtt_ports):
            while not _persistent_connect(port, f"pfm-ready-{n}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NATS node {n} MQTT not ready in {timeout:.0f} s")
                time.sleep(0.5)

    def log(self, i: int) -> str:
        path = self.workdir / f"n{i}" / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _persistent_connect(port: int, client_id: str) -> bool:
    """An MQTT 3.1.1 CONNECT with clean session off: True on CONNACK return code 0."""
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x00\x00\x1e"  # protocol 4, flags: clean session off, keepalive 30
    body = var + len(cid).to_bytes(2, "big") + cid
    packet = b"\x10" + bytes([len(body)]) + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(packet)
            answer = sock.recv(4)
            ok = len(answer) == 4 and answer[0] == 0x20 and answer[3] == 0
            if ok:
                sock.sendall(b"\xe0\x00")  # DISCONNECT
            return ok
    except OSError:
        return False
