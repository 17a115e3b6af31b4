"""The site stack and the edge + central stacks, run for real with podman-compose.

The compose files are used as written, plus an override (tests/podman/*.override.yml)
that swaps only image names and what this machine forces: the runc runtime, limits it
may not raise and a private network namespace per stack (no container networks, no
published ports). The images are local stand-ins built from Debian packages
(tests/podman/*.Containerfile): TimescaleDB is the one image replaced by something else,
plain PostgreSQL 15 (the archiver serves both). Grafana has no Debian package: it is not
started here (tests/test_dashboards.py and tests/test_deploy_files.py check its
provisioning). Secrets come from `pfmon init`, as on a real site.

Slow: about 3 minutes with the images built, 8 from nothing (the README's Deployment
section says how to run it by hand).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests import podman_stack as ps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PFMON = str(Path(sys.executable).with_name("pfmon"))
SITE_SERVICES = [
    "mosquitto",
    "timescaledb",
    "simulator",
    "collector",
    "analytics",
    "actuator",
    "archiver",
    "alerts",
    "alertmanager",
    "console",
    "prometheus",
]


def log(message: str) -> None:
    print(f"podman: {message}", flush=True)


@pytest.fixture(scope="module")
def images() -> None:
    reason = ps.unavailable()
    if reason is not None:
        message = f"podman cannot run the compose stacks here: {reason}"
        if os.environ.get("PFM_REQUIRE_PODMAN") == "1":  # a machine where it must run
            pytest.fail(message)
        pytest.skip(message)
    started = time.monotonic()
    ps.build_images(log)
    log(f"images ready in {time.monotonic() - started:.0f} s")


@contextlib.contextmanager
def running(stack: ps.Stack) -> Iterator[ps.Stack]:
    """`down -v` on the way out, whatever happened; the test checks what it left."""
    try:
        yield stack
    finally:
        with contextlib.suppress(Exception):
            stack.down()


def psql(stack: ps.Stack, sql: str) -> str:
    """A query inside the database container (its local socket, as the pfmon user)."""
    return stack.exec("timescaledb", "psql", "-U", "pfmon", "-d", "pfmon", "-tAc", sql).stdout


def readings_per_meter(stack: ps.Stack, site: str) -> dict[str, tuple[int, int]]:
    """meter -> (rows, highest seq) in the archive."""
    out = psql(
        stack,
        f"SELECT meter, count(*), max(seq) FROM pfm_readings WHERE site = '{site}' GROUP BY 1",
    )
    rows = [line.split("|") for line in out.split()]
    return {meter: (int(n), int(top)) for meter, n, top in rows}


def prometheus_api(stack: ps.Stack, path: str) -> dict[str, object]:
    """Prometheus's HTTP API, asked from inside its container."""
    out = stack.exec("prometheus", "wget", "-q", "-O", "-", f"http://127.0.0.1:9090{path}")
    data: dict[str, object] = json.loads(out.stdout)
    assert data["status"] == "success", data
    return data


def targets(stack: ps.Stack) -> dict[str, str]:
    """'job instance' -> health of every active target."""
    data = prometheus_api(stack, "/api/v1/targets")
    active = data["data"]["activeTargets"]  # type: ignore[index]
    return {f"{t['labels']['job']} {t['labels']['instance']}": t["health"] for t in active}


def all_up(found: dict[str, str]) -> dict[str, str] | None:
    return found if found and all(h == "up" for h in found.values()) else None


def loaded_rules(stack: ps.Stack) -> set[str]:
    data = prometheus_api(stack, "/api/v1/rules")
    groups = data["data"]["groups"]  # type: ignore[index]
    return {r["name"] for g in groups for r in g["rules"]}


def rule_names(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    return {r.get("alert") or r.get("record") for g in doc["groups"] for r in g["rules"]}


def mqtt(ns: str, tool: str, root: Path, user: str | None) -> list[str]:
    """mosquitto_pub/sub run from the host inside the stack's namespace, with a client's
    certificate from `pfmon init` and its user and password from .env (none if user is
    None: an anonymous client, the monitor's certificate)."""
    client = root / "deploy/secrets/clients" / (user or "monitor")
    cmd = ["ip", "netns", "exec", ns, tool, "-h", "localhost", "-p", "8883"]
    cmd += ["--cafile", str(client / "ca.crt"), "--cert", str(client / "client.crt")]
    cmd += ["--key", str(client / "client.key")]
    if user is not None:
        password = ps.read_env(root / ".env")[f"PFM_{user.upper()}_MQTT_PASSWORD"]
        cmd += ["-u", user, "-P", password]
    return cmd


def test_site_stack_runs_on_podman(images: None, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    root = tmp_path / "site"
    ps.copy_deploy_tree(root)
    ps.run([PFMON, "init", "--site-file", "deploy/site.simulator.yaml"], cwd=root)
    env = ps.read_env(root / ".env")
    secrets = root / "deploy" / "secrets"
    site = env["PFM_SITE"]
    before = {kind: ps.podman_names(kind) for kind in ("container", "volume", "network")}

    with ps.netns(f"pfmci-site-{tag}") as ns:
        stack = ps.Stack(
            project=f"pfmci-site-{tag}",
            folder=root,
            files=[root / "docker-compose.yml", ps.PODMAN_DIR / "site.override.yml"],
            netns=ns,
        )
        with running(stack):
            started = time.monotonic()
            # depends_on: service_healthy, in the order compose would keep
            stack.compose("--profile", "simulator", "up", "-d", "mosquitto", "timescaledb")
            stack.wait_healthy(["mosquitto", "timescaledb"])
            stack.compose("--profile", "simulator", "up", "-d", *SITE_SERVICES)
            healthy = stack.wait_healthy(SITE_SERVICES)
            log(f"site: every health check passed {time.monotonic() - started:.0f} s after up")
            log(f"site: seconds to healthy per service: {healthy}")

            # the containers use the secrets `pfmon init` wrote
            assert (
                stack.exec("collector", "printenv", "PFM_MQTT_PASSWORD").stdout.strip()
                == (env["PFM_COLLECTOR_MQTT_PASSWORD"])
            )
            assert stack.exec("mosquitto", "cat", "/mosquitto/secrets/passwd").stdout == (
                (secrets / "broker" / "passwd").read_text()
            )
            login = ["psql", "-h", "127.0.0.1", "-U", "pfmon", "-d", "pfmon", "-tAc", "SELECT 1"]
            ok = stack.exec("timescaledb", *login, env={"PGPASSWORD": env["PFM_DB_PASSWORD"]})
            assert ok.stdout.strip() == "1"
            bad = stack.exec("timescaledb", *login, check=False, env={"PGPASSWORD": "wrong"})
            assert bad.returncode != 0 and "password authentication failed" in bad.stderr

            # readings flow from the simulated meters into the database in its container
            meters = {m["name"] for m in yaml.safe_load((root / "deploy/site.simulator.yaml")
                                                        .read_text())["meters"]}  # fmt: skip
            flowing = ps.wait_for(
                "readings of every meter in the database",
                lambda: (
                    (r := readings_per_meter(stack, site)).keys() == meters
                    and all(n >= 5 for n, _ in r.values())
                    and r
                ),
                timeout=120,
            )
            log(f"site: readings archived per meter (rows, last seq): {flowing}")

            # the bank corrects PF: the simulated plant's incomer runs at PF ~0.78 with the
            # bank out; the actuator switches steps in until it reaches the target (0.97)
            pf_sql = (
                "SELECT round(((power_l1 + power_l2 + power_l3) / (apparent_power_l1"
                " + apparent_power_l2 + apparent_power_l3))::numeric, 3) FROM pfm_metrics"
                f" WHERE site = '{site}' AND meter = 'main' AND apparent_power_l1 > 0"
                " ORDER BY ts {} LIMIT 1"
            )
            first_pf = float(
                ps.wait_for(
                    "a metric of the incomer", lambda: psql(stack, pf_sql.format("ASC")), timeout=60
                )
            )
            assert first_pf < 0.85, first_pf
            corrected = ps.wait_for(
                "the incomer's PF corrected to 0.95 or better",
                lambda: (pf := float(psql(stack, pf_sql.format("DESC")))) >= 0.95 and pf,
                timeout=180,
                every=3,
            )
            commands = int(
                psql(
                    stack,
                    f"SELECT count(*) FROM pfm_commands WHERE site = '{site}' AND device = 'bank1'",
                )
            )
            assert commands > 0, "the PF rose without a command archived"
            log(f"site: incomer PF {first_pf} -> {corrected} after {commands} bank command(s)")

            # Prometheus (its HTTP API): every target up, every rule of alerts.yml loaded
            up = ps.wait_for(
                "every Prometheus target up", lambda: all_up(targets(stack)), timeout=90, every=3
            )
            assert {target.split()[0] for target in up} == {
                "pfm-collector", "pfm-analytics", "pfm-actuator", "pfm-archiver",
                "pfm-alerts", "pfm-console", "prometheus"
            }, up  # fmt: skip
            assert loaded_rules(stack) == rule_names(root / "deploy/prometheus/alerts.yml")

            # the broker refuses an anonymous client (a valid certificate, no user) ...
            uptime = ["-t", "$SYS/broker/uptime", "-C", "1", "-W", "5"]
            anon = ps.run([*mqtt(ns, "mosquitto_sub", root, None), *uptime], check=False)
            assert anon.returncode != 0, anon
            assert "not authorised" in (anon.stdout + anon.stderr).lower(), anon
            monitor = ps.run([*mqtt(ns, "mosquitto_sub", root, "monitor"), *uptime], check=False)
            assert monitor.returncode == 0, monitor
            # ... and a collector publishing a command: a subscriber to the command topic
            # gets the actuator's and never the collector's (a device the site does not
            # have, so the real bank's commands stay apart)
            topic = f"pfm/v1/{site}/actuator/acl-probe/command"
            sub = subprocess.Popen(
                [*mqtt(ns, "mosquitto_sub", root, "monitor"), "-t", topic, "-W", "8"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    for user in ("collector", "actuator"):
                        publish = [*mqtt(ns, "mosquitto_pub", root, user), "-q", "1"]
                        ps.run([*publish, "-t", topic, "-m", f"from-{user}"], check=False)
                    time.sleep(0.3)
                out, err = sub.communicate(timeout=15)
            finally:
                sub.kill()
            got = out.split()
            assert "from-actuator" in got, (out, err)
            assert "from-collector" not in got, out

            # a service container that dies is restarted by its policy; nothing is lost
            last = {m: top for m, (_, top) in readings_per_meter(stack, site).items()}
            restarts = stack.kill_main_process("archiver")
            ps.wait_for(
                "the archiver restarted by its restart policy",
                lambda: (
                    stack.inspect("archiver")["RestartCount"] > restarts
                    and stack.inspect("archiver")["State"]["Running"]
                ),
                timeout=60,
            )
            stack.wait_healthy(["archiver"])
            ps.wait_for(
                "readings archived again after the restart",
                lambda: all(
                    top > last[m] + 10 for m, (_, top) in readings_per_meter(stack, site).items()
                ),
                timeout=120,
            )
            for meter, seq in last.items():
                span = psql(
                    stack,
                    "SELECT count(DISTINCT seq), max(seq) - min(seq) + 1 FROM pfm_readings "
                    f"WHERE site = '{site}' AND meter = '{meter}' AND seq >= {seq - 5}",
                ).strip()
                have, expected = (int(x) for x in span.split("|"))
                assert have == expected, f"{meter}: {expected - have} readings lost"

            stack.down()
        after = {kind: ps.podman_names(kind) for kind in ("container", "volume", "network")}
        assert after == before, "down -v left something behind"


def test_edge_and_central_stacks_on_podman(images: None, tmp_path: Path) -> None:
    """An edge's bridge forwards into the central broker, the central archiver stores it."""
    tag = uuid.uuid4().hex[:6]
    centre, edge = tmp_path / "central", tmp_path / "edge"
    ps.copy_deploy_tree(centre)
    ps.copy_deploy_tree(edge)
    ps.run([PFMON, "init", "--role", "central", "--site-file", "deploy/central/site.yaml",
            "--hostname", "central"], cwd=centre)  # fmt: skip
    # the edge is initialised at the centre (its CA, its bridge user), then "copied over"
    ps.run([PFMON, "init", "--role", "edge", "--site-file", "deploy/site.simulator.yaml",
            "--central", str(centre / "deploy/secrets"), "--central-host", "central"],
           cwd=edge)  # fmt: skip
    edge_site = yaml.safe_load((edge / "deploy/site.simulator.yaml").read_text())["site"]
    # the centre knows the edge's site file (archiver.site_dir) and scrapes its services
    # over the link (file_sd, as over the VPN)
    (centre / "deploy/central/sites" / f"{edge_site}.yaml").write_text(
        (edge / "deploy/site.simulator.yaml").read_text()
    )
    centre_ip, edge_ip = "10.231.0.1", "10.231.0.2"
    (centre / "deploy/prometheus/edges" / f"{edge_site}.yml").write_text(
        yaml.safe_dump(
            [
                {
                    "targets": [f"{edge_ip}:{p}" for p in (9101, 9102, 9103)],
                    "labels": {"gateway_site": edge_site},
                }
            ]
        )
    )
    before = {kind: ps.podman_names(kind) for kind in ("container", "volume", "network")}

    with ps.netns(f"pfmci-c-{tag}") as ns_c, ps.netns(f"pfmci-e-{tag}") as ns_e:
        ps.link(ns_c, f"{centre_ip}/30", ns_e, f"{edge_ip}/30")
        central = ps.Stack(
            project=f"pfmci-central-{tag}",
            folder=centre,
            files=[centre / "deploy/central/compose.yml", ps.PODMAN_DIR / "central.override.yml"],
            netns=ns_c,
            env_file=centre / "deploy/central/.env",
        )
        branch = ps.Stack(
            project=f"pfmci-edge-{tag}",
            folder=edge,
            files=[edge / "deploy/edge/compose.yml", ps.PODMAN_DIR / "edge.override.yml"],
            netns=ns_e,
            env_file=edge / "deploy/edge/.env",
            extra_env={"PFM_CI_CENTRAL_IP": centre_ip},
        )
        with running(central), running(branch):
            started = time.monotonic()
            central.compose("up", "-d", "mosquitto", "timescaledb")
            central.wait_healthy(["mosquitto", "timescaledb"])
            central.compose(
                "up", "-d", "mosquitto", "timescaledb", "archiver", "alertmanager", "prometheus"
            )
            central.wait_healthy(["archiver", "alertmanager", "prometheus"])
            branch.compose("--profile", "simulator", "up", "-d", "mosquitto")
            branch.wait_healthy(["mosquitto"])
            edge_services = ["simulator", "collector", "analytics", "actuator", "alerts", "console"]
            branch.compose("--profile", "simulator", "up", "-d", "mosquitto", *edge_services)
            branch.wait_healthy(edge_services)
            log(f"edge+central: every health check passed {time.monotonic() - started:.0f} s")

            # the edge's metrics cross the bridge and the central archiver stores them
            stored = ps.wait_for(
                "the edge's metrics stored by the central archiver",
                lambda: int(
                    psql(central, f"SELECT count(*) FROM pfm_metrics WHERE site = '{edge_site}'")
                ),
                timeout=180,
                every=3,
            )
            log(f"edge+central: {stored} metrics rows of site {edge_site} at the centre")
            # nothing but the summaries crosses: the edge's readings stay at the edge
            assert psql(central, "SELECT count(*) FROM pfm_readings").strip() == "0"

            # the central Prometheus scrapes the edge across the link; rules loaded
            # (pfm-archiver is found by DNS, dns_sd_configs: a namespace without a container
            # network has no DNS server, so that one target is not discovered here)
            up = ps.wait_for(
                "the edge's three targets up at the central Prometheus",
                lambda: (
                    (found := all_up(targets(central)))
                    and sum(t.startswith("pfm-edge ") for t in found) == 3
                    and found
                ),
                timeout=120,
                every=3,
            )
            assert "prometheus 127.0.0.1:9090" in up, up
            assert loaded_rules(central) == rule_names(centre / "deploy/prometheus/alerts.yml")

            branch.down()
            central.down()
        after = {kind: ps.podman_names(kind) for kind in ("container", "volume", "network")}
        assert after == before, "down -v left something behind"
