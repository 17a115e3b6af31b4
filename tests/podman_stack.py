"""The project's compose files run for real on podman (tests/test_compose_podman.py).

No image registry answers here, so the upstream images are replaced by local stand-ins
built from Debian packages (``tests/podman/*.Containerfile``) on a Debian base made with
``debootstrap`` (kept as a tarball under ``PFM_PODMAN_CACHE``, /var/cache/pfmon-ci by
default), and the pfmon image is built from the project's own ``Dockerfile`` with the
stand-in Python base. Each stack runs in a network namespace of its own (``ip netns``):
podman's ``ns:`` network mode puts every container of the stack on one private loopback,
so nothing is published on the host and two stacks never collide.

Podman 4.3 runs health checks from systemd timers; without systemd (this machine) nothing
runs them, so :meth:`Stack.wait_healthy` runs each container's own check
(``podman healthcheck run``) until it passes, as the timer would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PODMAN_DIR = REPO / "tests" / "podman"
CACHE = Path(os.environ.get("PFM_PODMAN_CACHE", "/var/cache/pfmon-ci"))
DEBIAN_IMAGE = "localhost/debian:bookworm"
DEBIAN_TAR = CACHE / "debian-bookworm-minbase.tar"
PFMON_IMAGE = "localhost/pfmon:ci"
STANDINS = ("python", "mosquitto", "postgres", "prometheus", "alertmanager")
# what this machine forces on every container and build: runc (crun refuses its cgroups),
# limits it may not raise
MACHINE_ARGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def standin(name: str) -> str:
    return f"localhost/pfmon-ci/{name}:latest"


def run(
    cmd: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the error names the command and shows its output."""
    proc = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        input=input,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


def podman_compose() -> str | None:
    """The podman-compose command: $PFM_PODMAN_COMPOSE, PATH, or .ci/run's tool venv."""
    for candidate in (
        os.environ.get("PFM_PODMAN_COMPOSE", ""),
        shutil.which("podman-compose") or "",
        str(CACHE / "tools" / "bin" / "podman-compose"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable() -> str | None:
    """Why podman cannot run this project's stacks here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/run installs podman, runc, debootstrap)"
    if podman_compose() is None:
        return "podman-compose not found (PFM_PODMAN_COMPOSE, PATH or .ci/run's tool venv)"
    if os.geteuid() != 0:
        return "the stacks need root (network namespaces, podman's rootful storage)"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (network namespaces)"
    have_base = run(["podman", "image", "exists", DEBIAN_IMAGE], check=False).returncode == 0
    if not have_base and not DEBIAN_TAR.exists() and shutil.which("debootstrap") is None:
        return f"no {DEBIAN_IMAGE} image, no {DEBIAN_TAR} and no debootstrap to make one"
    if have_base:
        probe = run(
            ["podman", "run", "--rm", *MACHINE_ARGS, "--network", "none", DEBIAN_IMAGE, "true"],
            check=False,
            timeout=120,
        )
        if probe.returncode != 0:
            return f"podman cannot run a container here: {probe.stderr.strip()[-500:]}"
    return None


def ensure_base_image(log: Callable[[str], None]) -> None:
    """localhost/debian:bookworm: podman's storage, else the cached tarball, else debootstrap."""
    if run(["podman", "image", "exists", DEBIAN_IMAGE], check=False).returncode == 0:
        return
    if not DEBIAN_TAR.exists():
        started = time.monotonic()
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "rootfs"
            run(["debootstrap", "--variant=minbase", "bookworm", str(root)], timeout=900)
            partial = DEBIAN_TAR.with_suffix(".partial")
            run(["tar", "-C", str(root), "-cf", str(partial), "."], timeout=300)
            partial.replace(DEBIAN_TAR)
        log(f"debootstrap bookworm minbase: {time.monotonic() - started:.0f} s")
    run(["podman", "import", str(DEBIAN_TAR), DEBIAN_IMAGE], timeout=300)
    # a fresh import confirms the probe that unavailable() skipped without an image
    run(["podman", "run", "--rm", *MACHINE_ARGS, "--network", "none", DEBIAN_IMAGE, "true"])


def build_images(log: Callable[[str], None]) -> None:
    """The stand-ins and the pfmon image (podman's layer cache makes a warm rebuild quick)."""
    ensure_base_image(log)
    build = ["podman", "build", "--network", "host", *MACHINE_ARGS]
    for name in STANDINS:
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            ctx = Path(tmp)
            for path in PODMAN_DIR.glob("*"):
                if path.is_file():
                    shutil.copy2(path, ctx / path.name)
            # the certificate authorities this host trusts beyond Debian's (an egress proxy)
            (ctx / "ca-certificates").mkdir()
            for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
                shutil.copy2(crt, ctx / "ca-certificates" / crt.name)
            run(
                [*build, "-f", f"{name}.Containerfile", "-t", standin(name), str(ctx)],
                timeout=900,
            )
        log(f"image {standin(name)}: {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    run(
        [
            *build,
            "--build-arg",
            f"PYTHON_IMAGE={standin('python')}",
            "-f",
            str(REPO / "Dockerfile"),
            "-t",
            PFMON_IMAGE,
            str(REPO),
        ],
        timeout=1200,
    )
    log(f"image {PFMON_IMAGE} (Dockerfile): {time.monotonic() - started:.0f} s")


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A private network namespace with its loopback up; deleted on exit."""
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        yield name
    finally:
        run(["ip", "netns", "delete", name], check=False)


def link(ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> None:
    """A veth pair between two namespaces, addresses in CIDR form (a /30 of its own)."""
    tag = uuid.uuid4().hex[:6]
    run(["ip", "link", "add", f"pfa{tag}", "netns", ns_a, "type", "veth", "peer", "name",
         f"pfb{tag}", "netns", ns_b])  # fmt: skip
    for ns, dev, addr in ((ns_a, f"pfa{tag}", addr_a), (ns_b, f"pfb{tag}", addr_b)):
        run(["ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev])
        run(["ip", "netns", "exec", ns, "ip", "link", "set", dev, "up"])


def podman_names(kind: str) -> set[str]:
    """Every container / volume / network podman has now (for the `down -v` check)."""
    if kind == "container":
        out = run(["podman", "ps", "-a", "--format", "{{.Names}}"]).stdout
    elif kind == "volume":
        out = run(["podman", "volume", "ls", "--format", "{{.Name}}"]).stdout
    else:
        out = run(["podman", "network", "ls", "--format", "{{.Name}}"]).stdout
    return set(out.split())


@dataclass
class Stack:
    """One compose project: its files, its folder, its namespace."""

    project: str
    folder: Path  # where the compose file's relative paths start
    files: list[Path]
    netns: str
    env_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PFM_IMAGE=PFMON_IMAGE, PFM_CI_NETNS=self.netns, **self.extra_env)
        return env

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        compose = podman_compose()
        assert compose is not None
        cmd = [compose, "--project-name", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        if self.env_file is not None:
            cmd += ["--env-file", str(self.env_file)]
        return run([*cmd, *args], timeout=timeout, cwd=self.folder, env=self.env())

    def down(self) -> None:
        """`down -v`. podman-compose 1.6 removes the containers without their anonymous
        volumes (the image's VOLUME, where no named volume is mounted), which docker
        compose removes with them: `podman rm -v` does, through --podman-rm-args."""
        self.compose("--podman-rm-args=-v", "down", "-v", timeout=300)

    def containers(self) -> dict[str, str]:
        """service -> container name, for every container of this project."""
        out = run(
            [
                "podman",
                "ps",
                "-a",
                "--filter",
                f"label=io.podman.compose.project={self.project}",
                "--format",
                "json",
            ]
        ).stdout
        found = {}
        for c in json.loads(out or "[]"):
            service = c["Labels"].get("com.docker.compose.service")
            if service:
                found[service] = c["Names"][0]
        return found

    def container(self, service: str) -> str:
        name = self.containers().get(service)
        assert name, f"{self.project}: no container for service {service}"
        return name

    def inspect(self, service: str) -> dict[str, Any]:
        out = run(["podman", "inspect", self.container(service)]).stdout
        data: dict[str, Any] = json.loads(out)[0]
        return data

    def exec(
        self, service: str, *cmd: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = ["podman", "exec"]
        for k, v in (env or {}).items():
            args += ["-e", f"{k}={v}"]
        return run([*args, self.container(service), *cmd], check=check, timeout=60)

    def logs(self, service: str) -> str:
        proc = run(["podman", "logs", "--tail", "40", self.container(service)], check=False)
        return proc.stdout + proc.stderr

    def wait_healthy(self, services: Sequence[str], timeout: float = 240) -> dict[str, float]:
        """Run each service's own health check until every one passes; seconds to healthy."""
        started = time.monotonic()
        pending = list(services)
        healthy: dict[str, float] = {}
        last: dict[str, str] = {}
        while pending:
            for service in list(pending):
                name = self.container(service)
                proc = run(["podman", "healthcheck", "run", name], check=False, timeout=60)
                last[service] = (proc.stdout + proc.stderr).strip()
                if proc.returncode == 0:
                    pending.remove(service)
                    healthy[service] = round(time.monotonic() - started, 1)
            if pending and time.monotonic() - started > timeout:
                detail = "\n".join(
                    f"--- {s}: check says {last.get(s)!r}; logs:\n{self.logs(s)}" for s in pending
                )
                raise AssertionError(f"{self.project}: not healthy after {timeout} s\n{detail}")
            if pending:
                time.sleep(2)
        return healthy

    def kill_main_process(self, service: str) -> int:
        """SIGKILL the container's main process (a crash, not `podman stop`); its restart count."""
        state = self.inspect(service)
        os.kill(int(state["State"]["Pid"]), signal.SIGKILL)
        return int(state.get("RestartCount", 0))


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Poll until probe() is truthy; its value. The error says what was awaited."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")


def read_env(path: Path) -> dict[str, str]:
    """The KEY=value lines of a compose .env (as `pfmon init` writes them)."""
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = value.strip().strip("'\"")
    return values


def copy_deploy_tree(dest: Path) -> None:
    """The compose files and deploy/ as in the repository (no secrets, no .env)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "docker-compose.yml", dest / "docker-compose.yml")
    shutil.copytree(
        REPO / "deploy",
        dest / "deploy",
        ignore=shutil.ignore_patterns("secrets", ".env", "__pycache__"),
    )
