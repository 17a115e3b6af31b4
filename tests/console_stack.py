"""The demo's plant and every live service (collector, analytics, actuator, console) on
the test broker, run in a thread of its own so that synchronous tests (a browser, plain
HTTP) can drive the console while it runs."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.actuator import service as actuator
from services.analytics import service as analytics
from services.collector import service as collector
from services.console import service as console
from services.console.auth import add_user
from services.demo import demo_plant, demo_site
from services.simulator import SimServer, SimSite
from shared.embedded import free_port
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site

USER, PASSWORD = "operator", "correct-horse-1"


class Stack:
    """``with Stack(settings, site_name, folder) as stack:`` - ``stack.url``, ``stack.plant``."""

    def __init__(self, settings: Settings, site_name: str, folder: Path, meters: int = 3) -> None:
        self.settings = settings
        self.plant: SimSite = demo_plant(meters)
        self.sim_port = free_port()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        users = folder / "users.json"
        add_user(users, USER, PASSWORD)
        raw = demo_site(self.sim_port, self.plant)
        raw["site"] = site_name
        raw["console"] = {
            "listen": "127.0.0.1",
            "port": self.port,
            "open_read": True,
            "users_file": str(users),
            "login_attempts": 5,
        }
        # alarms at once (the demo's feeders run at PF 0.70); switching as fast as it may
        raw["analytics"] = {"alarms": {"low_pf": {"raise_after_s": 1, "clear_after_s": 600}}}
        raw["banks"][0]["min_interval"] = "0s"
        self.site: SiteConfig = parse_site(raw, "console test site")
        self.loop = asyncio.new_event_loop()
        self.shutdowns: dict[str, Shutdown] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="console-stack", daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by __exit__
            self.error = exc
            self._started.set()

    async def _main(self) -> None:
        services = {
            "collector": collector.run,
            "analytics": analytics.run,
            "actuator": actuator.run,
            "console": console.run,
        }
        self.shutdowns = {name: Shutdown() for name in services}
        self._started.set()
        async with SimServer(self.plant, self.sim_port), asyncio.TaskGroup() as tg:
            for name, run in services.items():
                s = self.settings.model_copy(
                    update={"mqtt_client_id": f"{self.settings.mqtt_client_id}-{name}"}
                )
                tg.create_task(run(s, self.site, self.shutdowns[name]), name=name)

    def __enter__(self) -> Stack:
        self._thread.start()
        self._started.wait(10)
        for name, sd in self.shutdowns.items():
            fut = asyncio.run_coroutine_threadsafe(sd.wait_ready(30), self.loop)
            try:
                fut.result(35)
            except Exception as exc:
                self.__exit__()
                raise AssertionError(f"{name} not ready: {self.error or exc!r}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        for sd in self.shutdowns.values():
            self.loop.call_soon_threadsafe(sd.request, "test over")
        self._thread.join(30)
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise AssertionError(f"the stack failed: {self.error!r}") from self.error

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the stack's loop (the plant is not thread-safe)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class Client:
    """A plain HTTP client with a cookie jar (no browser)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf: str | None = None

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path.lstrip("/"), data=data, method=method)
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with self.opener.open(req, timeout=10) as resp:
                raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed, hdrs

    def login(self, user: str = USER, password: str = PASSWORD) -> int:
        status, body, _ = self.request("POST", "api/login", {"user": user, "password": password})
        if status == 200:
            self.csrf = body["csrf"]
        return status

    def act(self, path: str, body: Any, csrf: str | None = None) -> tuple[int, Any]:
        token = csrf if csrf is not None else self.csrf
        headers = {"X-CSRF-Token": token} if token else {}
        status, parsed, _ = self.request("POST", path, body, headers)
        return status, parsed

    def snapshot(self) -> dict[str, Any]:
        status, body, _ = self.request("GET", "api/snapshot")
        assert status == 200, body
        return body  # type: ignore[no-any-return]
