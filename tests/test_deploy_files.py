"""The deployment files, checked without a Docker engine.

* compose files (site, edge, centre) parsed with PyYAML and interpolated with the
  ``.env`` that ``pfmon init`` really writes for that role: every required variable
  is generated, every service has an image or a build context with a Dockerfile, its
  env_file/bind mounts exist (secrets: in the generated folder), named volumes are
  declared, depends_on targets exist and have the health checks their condition needs,
  PFM_* variables are real settings, the commands are real ``pfmon`` sub-commands and
  each service mounts the client certificate of the broker user it logs in as;
* the services' health check runs against a real ``/metrics`` endpoint;
* ``promtool check config`` / ``check rules`` / ``test rules`` on the Prometheus files;
* Dockerfile (multi-stage, non-root, installs requirements.runtime.lock: the dev
  lock's pins, no dev tool), .dockerignore,
  systemd units (``Restart=always``, ``systemd-analyze verify``), the example site
  files (valid and complete), and no default password anywhere in the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.init import InitResult, init_site
from shared.embedded import free_port
from shared.metrics import ServiceMetrics
from shared.settings import CREDENTIAL_FILES, CREDENTIAL_VALUES, Settings
from shared.site import SiteConfig, load_site

REPO = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")
COMPOSE = {
    "site": REPO / "docker-compose.yml",
    "edge": REPO / "deploy" / "edge" / "compose.yml",
    "central": REPO / "deploy" / "central" / "compose.yml",
    "central-nats": REPO / "deploy" / "central" / "compose.nats.yml",
}
PFMON_IMAGE = "${PFM_IMAGE:-pfmon:local}"
SETTINGS_VARS = {f"PFM_{name.upper()}" for name in Settings.model_fields}

_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str], where: str = "") -> Any:
    """Compose-style interpolation (``${X}``, ``${X:-d}``, ``${X:?msg}``, ``$$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        got = env.get(name)
        if op in (":-", "-"):
            return got if got else (arg or "")
        if op in (":?", "?"):
            if not got:
                raise MissingVariable(f"{where}: ${{{name}}} is required ({arg}) but not set")
            return got
        return got or ""

    return _VAR.sub(sub, value)


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v
    return env


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, InitResult]:
    """What `pfmon init` writes for each role (the edge signed by the centre)."""
    tmp = tmp_path_factory.mktemp("init")
    central = init_site(
        site="centre",
        role="central",
        out=tmp / "central",
        env_file=tmp / "central.env",
        site_file=REPO / "deploy" / "central" / "site.yaml",
        hostnames=["central.example.com"],
        chown=False,
    )
    return {
        "site": init_site(
            site="demo",
            out=tmp / "site",
            env_file=tmp / "site.env",
            site_file=REPO / "deploy" / "site.simulator.yaml",
            simulator=True,
            chown=False,
        ),
        "central": central,
        "central-nats": init_site(
            site="centre",
            role="central",
            engine="nats",
            out=tmp / "central-nats",
            env_file=tmp / "central-nats.env",
            site_file=REPO / "deploy" / "central" / "site.nats.yaml",
            hostnames=["central.example.com"],
            chown=False,
        ),
        "edge": init_site(
            site="plant-north",
            role="edge",
            out=tmp / "edge",
            env_file=tmp / "edge.env",
            site_file=REPO / "deploy" / "site.example.yaml",
            central=central.out,
            central_host="central.example.com",
            chown=False,
        ),
    }


def site_file_of(result: InitResult) -> Path:
    """PFM_SITE_FILE_HOST is relative to the .env's folder (the compose file's)."""
    return (result.env_file.parent / read_env(result.env_file)["PFM_SITE_FILE_HOST"]).resolve()


def load_compose(role: str, generated: dict[str, InitResult]) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE[role].read_text())
    env = read_env(generated[role].env_file)
    # the test's .env lives in a temporary folder: anchor the relative path there
    env["PFM_SITE_FILE_HOST"] = str(site_file_of(generated[role]))
    return dict(interpolate(raw, env, COMPOSE[role].name))


def resolve_source(role: str, source: str, generated: dict[str, InitResult]) -> Path:
    """A bind-mount source on the host; the secrets folder is the generated one."""
    path = (COMPOSE[role].parent / source).resolve()
    secrets = (REPO / "deploy" / "secrets").resolve()
    if path == secrets or secrets in path.parents:
        return generated[role].out / path.relative_to(secrets)
    return path


@pytest.mark.parametrize("role", ["site", "edge", "central", "central-nats"])
def test_compose_file_resolves(role: str, generated: dict[str, InitResult]) -> None:
    try:
        compose = load_compose(role, generated)
    except MissingVariable as exc:
        raise AssertionError(f"pfmon init --role {role} does not generate: {exc}") from exc
    from services.cli import app

    commands = {c.name for c in app.registered_commands}
    commands |= {g.name for g in app.registered_groups}  # `pfmon console` runs its group
    services: dict[str, Any] = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    problems: list[str] = []
    ports: dict[str, str] = {}
    for name, svc in services.items():
        where = f"{COMPOSE[role].relative_to(REPO)} / {name}"
        if "image" not in svc and "build" not in svc:
            problems.append(f"{where}: neither image nor build")
        if "image" in svc and (":" not in svc["image"] or svc["image"].endswith(":latest")):
            problems.append(f"{where}: image {svc['image']!r} is not pinned to a version")
        if "build" in svc:
            ctx = (COMPOSE[role].parent / svc["build"]["context"]).resolve()
            if not (ctx / svc["build"].get("dockerfile", "Dockerfile")).exists():
                problems.append(f"{where}: build context {ctx} has no Dockerfile")
        if svc.get("restart") not in ("always", "unless-stopped"):
            problems.append(f"{where}: restart policy {svc.get('restart')!r}")
        for env_file in svc.get("env_file", []):
            if not (COMPOSE[role].parent / env_file).exists():
                problems.append(f"{where}: env_file {env_file} does not exist")
        for vol in svc.get("volumes", []):
            parts = vol.split(":")
            if len(parts) == 1:
                continue  # anonymous volume
            source = parts[0]
            if source.startswith((".", "/")):
                if not resolve_source(role, source, generated).exists():
                    problems.append(f"{where}: bind mount source {source} does not exist")
            elif source not in declared_volumes:
                problems.append(f"{where}: named volume {source} is not declared")
        for dep, spec in (svc.get("depends_on") or {}).items():
            if dep not in services:
                problems.append(f"{where}: depends_on {dep}, no such service")
                continue
            cond = spec.get("condition") if isinstance(spec, dict) else None
            if cond == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{where}: waits for {dep} to be healthy; it has no healthcheck")
            if services[dep].get("profiles") and not (
                isinstance(spec, dict) and spec.get("required") is False
            ):
                problems.append(f"{where}: depends on profiled {dep} without required: false")
        if "healthcheck" not in svc:
            problems.append(f"{where}: no healthcheck")
        elif not svc["healthcheck"].get("test"):
            problems.append(f"{where}: healthcheck without a test")
        for port in svc.get("ports", []):
            host = port.rsplit(":", 1)[0]
            if host in ports:
                problems.append(f"{where}: host port {host} also used by {ports[host]}")
            ports[host] = name
        env = svc.get("environment") or {}
        if svc.get("image") == "pfmon:local" and svc.get("command"):
            cmd = svc["command"][0]
            if "entrypoint" not in svc and cmd not in commands:
                problems.append(f"{where}: `pfmon {cmd}` is not a pfmon command")
            for key in env:
                if key.startswith("PFM_") and key not in SETTINGS_VARS:
                    problems.append(f"{where}: {key} is not a pfmon setting (typo?)")
            user = env.get("PFM_MQTT_USERNAME")
            if user:
                mount = f"{role}:clients/{user}:/run/secrets/mqtt"
                if not any(
                    v.endswith(f"secrets/clients/{user}:/run/secrets/mqtt:ro")
                    for v in svc.get("volumes", [])
                ):
                    problems.append(f"{where}: logs in as {user} without its certificate ({mount})")
                expected = generated[role].passwords.get(user, f"stand-in-{user}")
                if env.get("PFM_MQTT_PASSWORD") != expected:
                    problems.append(f"{where}: PFM_MQTT_PASSWORD is not {user}'s generated one")
                if not env.get("PFM_MQTT_URL", "").startswith("mqtts://"):
                    problems.append(f"{where}: the broker URL is not TLS")
    assert not problems, "\n".join(problems)


def test_site_compose_has_the_whole_stack(generated: dict[str, InitResult]) -> None:
    compose = load_compose("site", generated)
    services = compose["services"]
    assert {"mosquitto", "timescaledb", "prometheus", "grafana", "simulator"} <= set(services)
    assert {"collector", "analytics", "actuator", "archiver", "console"} <= set(services)
    assert services["simulator"]["profiles"] == ["simulator"]
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    # the simulator profile is on by default after init with the simulator site file
    env = read_env(generated["site"].env_file)
    assert env["COMPOSE_PROFILES"] == "simulator"
    assert env["PFM_SITE_FILE_HOST"].startswith(("./", "/")), env["PFM_SITE_FILE_HOST"]
    site = load_site(site_file_of(generated["site"]))
    assert site.site == env["PFM_SITE"] == "demo"
    assert {b.host for b in site.buses} == {"simulator"}
    sim_port = services["simulator"]["command"][
        services["simulator"]["command"].index("--port") + 1
    ]
    assert {str(b.port) for b in site.buses} == {sim_port}
    # Prometheus scrapes exactly the services' metrics ports
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        t
        for job in prom["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    for name in ("collector", "analytics", "actuator", "archiver", "console"):
        port = services[name]["environment"]["PFM_METRICS_PORT"]
        assert f"{name}:{port}" in targets, f"prometheus does not scrape {name}:{port}"
    # the broker's config and secrets are mounted where mosquitto.conf expects them
    conf = (REPO / "deploy/mosquitto/mosquitto.conf").read_text()
    vols = services["mosquitto"]["volumes"]
    assert any(v.endswith(":/mosquitto/config/mosquitto.conf:ro") for v in vols)
    assert "/mosquitto/secrets/passwd" in conf and any(":/mosquitto/secrets:" in v for v in vols)
    assert "allow_anonymous false" in conf and "require_certificate true" in conf


def test_init_writes_the_console_broker_user(generated: dict[str, InitResult]) -> None:
    assert "console" in generated["site"].passwords and "console" in generated["edge"].passwords
    assert (generated["site"].out / "clients" / "console").is_dir()
    acl = (generated["site"].out / "broker" / "acl").read_text()
    # only the console may publish requests; nobody else's block names the topic
    blocks = {b.split("\n")[1]: b for b in acl.split("\n# ") if "\nuser " in "\n" + b}
    writers = [u for u, b in blocks.items() if "/actuator/+/request" in b]
    assert writers == ["user console"], writers


def test_edge_and_centre_split(generated: dict[str, InitResult]) -> None:
    edge = load_compose("edge", generated)["services"]
    central = load_compose("central", generated)["services"]
    assert {"collector", "analytics", "actuator", "mosquitto"} <= set(edge)
    assert not {"archiver", "timescaledb", "grafana"} & set(edge)
    assert {"mosquitto", "archiver", "timescaledb", "prometheus", "grafana"} <= set(central)
    assert not {"collector", "actuator"} & set(central)
    assert all(s.get("restart") == "always" for s in edge.values() if "profiles" not in s)
    # one archiver with plain persistent subscriptions (a share group is opt-in)
    assert int(central["archiver"]["deploy"]["replicas"]) == 1
    assert central["archiver"]["environment"]["PFM_MQTT_PROTOCOL"] == "5"
    assert "PFM_MQTT_CLIENT_ID" not in central["archiver"]["environment"]
    # the edge bundle carries the bridge and no CA key
    bundle = generated["edge"].out
    assert (bundle / "broker" / "conf.d" / "bridge.conf").exists()
    assert not (bundle / "ca.key").exists()
    assert "address central.example.com:8883" in (bundle / "broker/conf.d/bridge.conf").read_text()
    assert load_site(site_file_of(generated["edge"])).site == "plant-north"


@pytest.mark.parametrize("connected", [1, 0])
def test_service_healthcheck_reads_bus_connected(connected: int) -> None:
    compose = yaml.safe_load(COMPOSE["site"].read_text())
    test = compose["services"]["collector"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    metrics = ServiceMetrics("collector", "demo")
    metrics.bus_connected.labels("collector").set(connected)
    port = free_port()
    served = metrics.serve("127.0.0.1", port)
    assert served is not None
    server, _thread = served
    try:
        res = subprocess.run(
            [sys.executable, "-c", test[3]],
            env={**os.environ, "PFM_METRICS_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=20,
        )
    finally:
        server.shutdown()
    if connected:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0 and "not connected to the broker" in res.stderr


# -- Prometheus ---------------------------------------------------------------------------


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-central.yml"])
def test_promtool_check_config(config: str) -> None:
    res = subprocess.run(
        [str(PROMTOOL), "check", "config", str(REPO / "deploy/prometheus" / config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout and "rule files found" in res.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_check_and_test_rules() -> None:
    prom = REPO / "deploy" / "prometheus"
    res = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(prom / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=prom,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# -- image, units, site files, secrets -----------------------------------------------------


def test_dockerfile_is_multistage_slim_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) >= 2, "not multi-stage"
    # every stage starts from the base image argument, whose default is the official slim one
    assert all(image == "${PYTHON_IMAGE}" for image, _ in stages), stages
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert default and default[1] == "python:${PYTHON_VERSION}-slim", default
    final = text[text.rfind("\nFROM ") :]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image runs as root"
    assert "-r requirements.runtime.lock" in text and "-r requirements.lock" not in text
    assert "COPY --from=builder" in final
    assert re.search(r"^ENTRYPOINT \[\"pfmon\"\]", final, re.M)
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "**", ".dockerignore must start by excluding everything"
    included = [p[1:] for p in patterns if p.startswith("!")]
    for secret in (".env", "deploy/secrets/ca.key", "deploy/edge/.env"):
        assert not any(secret.startswith(p.rstrip("*").rstrip("/")) for p in included), secret
    for path in ("requirements.runtime.lock", "pyproject.toml", "shared/", "services/"):
        assert any(p.startswith(path.rstrip("/")) for p in included), path
    # uid shared with pfmon init (which hands the client keys to it)
    from services.init import PFMON_UID

    assert f"--uid {PFMON_UID}" in text


def _unit(path: Path) -> dict[str, list[str]]:
    """A unit file as ``Section.Key -> [values]`` (systemd allows a key many times)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {raw!r}"
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def _dist(requirement: str) -> str:
    """The normalised distribution name of a requirement (``PyYAML>=6`` -> ``pyyaml``)."""
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    """Normalised name -> version of a ``name==version`` lock file (every line checked)."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"{path.name}:{n}: not name==version: {line!r}"
        pins[_dist(name)] = version.strip()
    return pins


def test_runtime_lock_is_the_dev_locks_pins_without_dev_tools() -> None:
    """The image installs requirements.runtime.lock: each pin is the dev lock's (the set
    the tests ran against), every dependency of pyproject.toml is there, no dev tool is."""
    dev = _pins(REPO / "requirements.lock")
    runtime = _pins(REPO / "requirements.runtime.lock")
    differ = {k: (v, dev.get(k)) for k, v in runtime.items() if dev.get(k) != v}
    assert not differ, f"runtime pins not in requirements.lock (runtime, dev): {differ}"
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_dist(d) for d in project["dependencies"]}
    assert wanted <= set(runtime), f"not in the runtime lock: {sorted(wanted - set(runtime))}"
    dev_tools = {_dist(d) for d in project["optional-dependencies"]["dev"]}
    dev_tools |= {k for k in dev if k.startswith(("types-", "pytest", "mypy", "ruff"))}
    assert dev_tools <= set(dev), "the dev lock lacks a dev tool: the check would prove nothing"
    assert not dev_tools & set(runtime), (
        f"dev tools in the runtime lock: {dev_tools & set(runtime)}"
    )


def test_systemd_units() -> None:
    unit = (REPO / "deploy/systemd/pfmon@.service").read_text()
    assert re.search(r"^Restart=always$", unit, re.M)
    assert "EnvironmentFile=/etc/pfmon/env/%i.env" in unit
    assert "Restart=always" in (REPO / "deploy/systemd/mosquitto-pfmon.conf").read_text()
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    res = subprocess.run(
        [tool, "verify", str(REPO / "deploy/systemd/pfmon@.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    noise = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        if line.strip() and "is not executable" not in line and "/opt/pfmon" not in line
    ]
    assert not noise, "\n".join(noise)


def test_systemd_unit_isolates_each_service() -> None:
    """One user per service, secrets as credentials only, the hardening set."""
    u = _unit(REPO / "deploy/systemd/pfmon@.service")
    one = {k.removeprefix("Service."): v[-1] for k, v in u.items() if k.startswith("Service.")}
    assert one["DynamicUser"] == "yes" and "Service.User" not in u
    # active when the service says READY=1 (shared.service.sd_notify), however long that takes
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    creds = {c.split(":", 1)[0]: c.split(":", 1)[1] for c in u["Service.LoadCredential"]}
    assert creds == {
        "mqtt_password": "/etc/pfmon/secrets/clients/%i/password",
        "mqtt_key_file": "/etc/pfmon/secrets/clients/%i/client.key",
        "mqtt_cert_file": "/etc/pfmon/secrets/clients/%i/client.crt",
        "mqtt_ca_file": "/etc/pfmon/secrets/clients/%i/ca.crt",
    }
    # the names are the settings the service reads from $CREDENTIALS_DIRECTORY
    assert set(creds) == set(CREDENTIAL_VALUES + CREDENTIAL_FILES) - {"db_dsn"}
    # what an env file still says about secrets never reaches the process
    assert set(one["UnsetEnvironment"].split()) >= {
        "PFM_MQTT_PASSWORD",
        "PFM_MQTT_KEY_FILE",
        "PFM_MQTT_CERT_FILE",
        "PFM_MQTT_CA_FILE",
    }
    expected = {
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateUsers": "yes",
        "PrivateMounts": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictRealtime": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "UMask": "0077",
        "RestartPreventExitStatus": "2",
    }
    assert {k: one.get(k) for k in expected} == expected
    assert u["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # the serial-port drop-in opens the ports (and only them) to collector and actuator
    d = _unit(REPO / "deploy/systemd/serial-ports.conf")
    assert d["Service.PrivateDevices"] == ["no"] and d["Service.DevicePolicy"] == ["closed"]
    assert set(d["Service.DeviceAllow"]) == {"char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"}
    assert d["Service.SupplementaryGroups"] == ["dialout"]


@pytest.mark.parametrize("service", ["collector", "analytics", "actuator", "archiver"])
def test_systemd_analyze_security_rates_the_unit_ok(service: str, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / f"pfmon@{service}.service"
    unit.write_text((REPO / "deploy/systemd/pfmon@.service").read_text())
    if service in ("collector", "actuator"):
        dropin = tmp_path / f"pfmon@{service}.service.d"
        dropin.mkdir()
        (dropin / "serial-ports.conf").write_text(
            (REPO / "deploy/systemd/serial-ports.conf").read_text()
        )
    res = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if "--offline" in res.stderr and "unrecognized" in res.stderr:
        pytest.skip("this systemd-analyze has no --offline")
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr[-2000:]
    # the score counts what a network service cannot give up (sockets, network);
    # everything else it asks for is set
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", res.stdout
    for option in ("ProtectProc", "DynamicUser", "CapabilityBoundingSet", "SystemCallFilter"):
        bad = [ln for ln in res.stdout.splitlines() if ln.startswith("✗") and option in ln]
        assert not bad, bad


@pytest.mark.parametrize(
    "path", ["deploy/site.example.yaml", "deploy/site.simulator.yaml", "deploy/central/site.yaml"]
)
def test_site_files_are_valid(path: str) -> None:
    load_site(REPO / path)


def test_site_example_is_complete() -> None:
    """Every top-level section of the site file (and every section's keys) is shown."""
    data = yaml.safe_load((REPO / "deploy/site.example.yaml").read_text())
    missing = sorted(set(SiteConfig.model_fields) - set(data))
    assert not missing, f"deploy/site.example.yaml lacks the sections {missing}"
    config = load_site(REPO / "deploy/site.example.yaml")
    for section in ("thresholds", "analytics", "archiver"):
        model = getattr(config, section)
        absent = sorted(set(type(model).model_fields) - set(data[section]))
        assert not absent, f"deploy/site.example.yaml: {section} lacks {absent}"
    assert {b.kind for b in config.buses} == {"tcp", "rtu", "rtu_over_tcp"}
    text = (REPO / "deploy/site.example.yaml").read_text()
    assert text.count("#") > 40, "the example should explain its fields"


_PASSWORD_KEY = re.compile(
    r"^\s*-?\s*(?P<key>[\w.]*(?:password|passwd|secret)[\w.]*)\s*[:=]\s*(?P<value>\S.*)?$",
    re.I,
)
_DSN_PASSWORD = re.compile(r"://[^:/@\s]+:(?P<value>[^@\s]+)@")
_SQL_PASSWORD = re.compile(r"PASSWORD\s+'", re.I)


def test_no_default_password_in_the_repository() -> None:
    # the scanner itself sees the usual offenders
    assert _PASSWORD_KEY.match("      POSTGRES_PASSWORD: changeme")
    assert _DSN_PASSWORD.search("postgresql://pfmon:hunter2@db/pfmon")
    assert _SQL_PASSWORD.search("CREATE ROLE x LOGIN PASSWORD 'x'")
    files = [
        REPO / "docker-compose.yml",
        REPO / ".env.example",
        REPO / "Dockerfile",
        *[p for p in (REPO / "deploy").rglob("*") if p.is_file()],
    ]
    problems = []
    for path in files:
        rel = path.relative_to(REPO)
        if "secrets" in rel.parts or path.suffix in (".json", ".py", ".md"):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            values = []
            m = _PASSWORD_KEY.match(line)
            if m and m.group("value"):
                values.append(m.group("value").strip().strip("'\""))
            values += [d.group("value") for d in _DSN_PASSWORD.finditer(line)]
            for value in values:
                if not value.startswith(("${", "$PFM_", "$$PFM_")):
                    problems.append(f"{rel}:{n}: {line.strip()}")
            if _SQL_PASSWORD.search(line):
                problems.append(f"{rel}:{n}: {line.strip()}")
    assert not problems, "literal secrets in the repository:\n" + "\n".join(problems)
    assert not list((REPO / "deploy").rglob("*.key")), "a private key is in deploy/"
    assert not (REPO / "deploy/secrets").exists() or not any(
        p
        for p in subprocess.run(
            ["git", "ls-files", "deploy/secrets", ".env"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    ), "generated secrets are tracked by git"


def test_timescaledb_init_script_is_valid_shell() -> None:
    script = REPO / "deploy/timescaledb/initdb/10-pfmon-roles.sh"
    assert os.access(script, os.X_OK), "docker-entrypoint-initdb.d scripts must be executable"
    res = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert "PFM_GRAFANA_DB_PASSWORD" in text and "GRANT SELECT" in text
    assert not re.search(r"GRANT (ALL|INSERT|UPDATE|DELETE)", text)


async def test_simulator_entry_point_serves_meters() -> None:
    """deploy/simulator/meters.py (compose profile "simulator") answers Modbus TCP."""
    import asyncio

    from pymodbus.client import AsyncModbusTcpClient

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "deploy/simulator/meters.py"),
        "--port",
        str(port),
        "--meters",
        "2",
        "--host",
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"units 1..2" in line, line
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            for unit in (1, 2):
                rr = await client.read_holding_registers(80, count=3, device_id=unit)
                assert not rr.isError(), rr
                volts = [r / 10 for r in rr.registers]
                assert all(220 < v < 240 for v in volts), volts
        finally:
            client.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_image_context_builds_the_package(tmp_path: Path) -> None:
    """What `docker build` sees (.dockerignore applied) has every COPY source and builds
    a wheel holding the services, the shared code and their data files (SQL, YAML)."""
    import fnmatch
    import zipfile

    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    ctx = tmp_path / "ctx"
    for rel in tracked:
        included = False
        for pat in patterns:  # last matching pattern wins, as in Docker
            neg = pat.startswith("!")
            glob = pat[1:] if neg else pat
            if fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(rel, glob.rstrip("*") + "*"):
                included = neg
        if included and (REPO / rel).is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, ctx / rel)
    assert not (ctx / ".env").exists() and not (ctx / "deploy").exists()
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        for source in line.split()[:-1]:
            assert (ctx / source).exists(), f"COPY {source}: not in the build context"
    wheel_dir = tmp_path / "wheel"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    res = subprocess.run(
        [*pip, "-w", str(wheel_dir), str(ctx)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = wheel_dir.glob("pfmon-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "services/cli.py" in names and "services/init/__init__.py" in names
    assert "shared/bus.py" in names
    sql = sorted((REPO / "services").rglob("*.sql"))
    for path in sql:  # the archiver's migrations must ship in the image
        assert str(path.relative_to(REPO)) in names, f"{path} is not packaged"


def test_init_points_compose_at_the_site_file(tmp_path: Path) -> None:
    """Under the compose folder: ./relative (right even when init ran in a container)."""
    (tmp_path / "deploy").mkdir()
    site = tmp_path / "deploy" / "site.yaml"
    shutil.copy(REPO / "deploy/site.simulator.yaml", site)
    result = init_site(
        site="demo",
        out=tmp_path / "deploy/secrets",
        env_file=tmp_path / ".env",
        site_file=site,
        chown=False,
    )
    assert read_env(result.env_file)["PFM_SITE_FILE_HOST"] == "./deploy/site.yaml"
    outside = init_site(
        site="demo",
        out=tmp_path / "x/secrets",
        env_file=tmp_path / "x/.env",
        site_file=REPO / "deploy/site.simulator.yaml",
        chown=False,
    )
    value = read_env(outside.env_file)["PFM_SITE_FILE_HOST"]
    assert Path(value).is_absolute() and Path(value).exists()


def test_nats_centre_compose(generated: dict[str, InitResult]) -> None:
    """compose.nats.yml: three nodes on the configurations init generates, archivers that
    dial every node and share the sites by shards; the rest as in compose.yml."""
    compose = load_compose("central-nats", generated)
    services = compose["services"]
    out = generated["central-nats"].out
    nodes = ["nats1", "nats2", "nats3"]
    assert "mosquitto" not in services
    for node in nodes:
        svc = services[node]
        assert svc["image"].startswith("nats:2.") and svc["command"][:2] == ["nats-server", "-c"]
        conf_path = svc["command"][2]
        # container folder -> host folder, of the bind mounts
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"] if v.startswith(".")}
        host_dir = mounts[str(Path(conf_path).parent)]  # the generated nats/ folder
        conf = resolve_source("central-nats", host_dir, generated) / Path(conf_path).name
        text = conf.read_text()
        assert f"server_name: {node}" in text
        # routes reach the other nodes by their service names, certificates where mounted
        assert all(f"nats-route://{n}:6222" in text for n in nodes)
        for path in re.findall(r"(?:cert|key|ca)_file: (\S+)", text):
            folder, name = path.rsplit("/", 1)
            assert folder in mounts, f"{node}: {path} is not mounted"
            assert (resolve_source("central-nats", mounts[folder], generated) / name).exists()
        store = re.search(r"store_dir: (\S+)", text)
        assert store and any(
            v.endswith(":/data") and not v.startswith(".") for v in svc["volumes"]
        ), "JetStream's store is not on a named volume"
        assert store.group(1).startswith("/data/")
        assert "js-enabled-only" in " ".join(svc["healthcheck"]["test"])
    assert (out / "nats" / "users.conf").exists()
    archivers = {n: s for n, s in services.items() if s.get("command") == ["archiver"]}
    assert len(archivers) >= 2
    ids = [s["environment"]["PFM_MQTT_CLIENT_ID"] for s in archivers.values()]
    assert len(set(ids)) == len(ids), ids  # one member id each
    for name, svc in archivers.items():
        env = svc["environment"]
        assert env["PFM_MQTT_URL"].split(",") == [f"mqtts://{n}:8883" for n in nodes], name
        assert env["PFM_MQTT_PROTOCOL"] == "3.1.1"
        assert set(svc["depends_on"]) >= set(nodes)
        assert "archiver" in svc["networks"]["default"]["aliases"]  # Prometheus's DNS name
    assert load_site(site_file_of(generated["central-nats"])).archiver.shards > 0
    # the services that do not depend on the broker are compose.yml's, unchanged
    raw = yaml.safe_load(COMPOSE["central-nats"].read_text())["services"]
    central = yaml.safe_load(COMPOSE["central"].read_text())["services"]
    for name in ("timescaledb", "alertmanager", "prometheus", "grafana"):
        assert raw[name] == central[name], name
