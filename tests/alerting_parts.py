"""Real Alertmanager and Prometheus processes, a webhook receiver and an SMTP sink on
loopback, for the alerting tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiosmtpd.controller import Controller

from shared.embedded import free_port

REPO = Path(__file__).resolve().parents[1]
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
PROMETHEUS = shutil.which("prometheus")
AMTOOL = shutil.which("amtool")


class Webhook:
    """Collects the notifications Alertmanager posts (its webhook JSON)."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.notifications.append(orjson.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self, status: str | None = None, **labels: str) -> list[dict[str, Any]]:
        """Every alert notified so far (one entry per notification it was in)."""
        with self.lock:
            found = [a for n in self.notifications for a in n["alerts"]]
        return [
            a
            for a in found
            if (status is None or a["status"] == status)
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpSink:
    """An SMTP server (aiosmtpd) that keeps every message."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                outer.messages.append(envelope.content.decode("utf-8", "replace"))
                return "250 Message accepted for delivery"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def alertmanager_config(webhook: Webhook, smtp: SmtpSink) -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml with the test's receivers and short waits."""
    config = yaml.safe_load((REPO / "deploy/alertmanager/alertmanager.yml").read_text())
    config["global"].update(smtp_smarthost=f"127.0.0.1:{smtp.port}", smtp_require_tls=False)
    for key in ("smtp_auth_username", "smtp_auth_password_file"):
        config["global"].pop(key, None)
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="2s", group_interval="1s", repeat_interval="1h")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook.url
    return config


class AlertmanagerProcess:
    """``prometheus-alertmanager`` on its own port and storage; stop() and start() again."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config_file = folder / "alertmanager.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert ALERTMANAGER
        self.proc = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={self.config_file}",
                f"--storage.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "alertmanager.log", "ab"),  # noqa: SIM115
        )
        _wait_http(f"{self.url}/-/ready", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class PrometheusProcess:
    """Debian's ``prometheus`` scraping ``targets`` every second, evaluating ``rules``
    every second and sending to ``alertmanager``."""

    def __init__(
        self,
        folder: Path,
        site: str,
        targets: list[str],
        rules: dict[str, Any],
        alertmanager: str,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "external_labels": {"site": site},
            },
            "rule_files": ["rules.yml"],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
            "scrape_configs": [
                {"job_name": "pfm-analytics", "static_configs": [{"targets": targets}]}
            ],
        }
        self.config_file = folder / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert PROMETHEUS
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "prometheus.log", "ab"),  # noqa: SIM115
        )
        _wait_http(f"{self.url}/-/ready", self.proc, timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=5) as resp:
            return list(orjson.loads(resp.read())["data"]["alerts"])


@contextlib.contextmanager
def receivers() -> Iterator[tuple[Webhook, SmtpSink]]:
    hook, smtp = Webhook(), SmtpSink()
    try:
        yield hook, smtp
    finally:
        hook.close()
        smtp.close()
