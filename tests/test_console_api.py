"""The console over plain HTTP: logins, CSRF, the rate limit, and manual switching that
reaches the simulated bank's coils only through the actuator's request topic."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.console.auth import Auth, add_user, load_users
from services.console.live import Live
from services.console.web import COOKIE, Console
from shared import topics
from shared.errors import ConfigError
from shared.settings import Settings
from shared.site import parse_site
from tests.console_stack import PASSWORD, USER, Client, Stack, wait_until

pytestmark = pytest.mark.timeout(120)


# -- users file, sessions, rate limit (the web app on a real socket, no bus) ---------------


def test_user_add_writes_an_argon2_hash_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "users.json"
    assert add_user(path, "alice", "long-enough-1") is True
    assert add_user(path, "alice", "another-one-2") is False
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = load_users(path)
    assert list(users) == ["alice"] and users["alice"].startswith("$argon2id$")
    assert "another-one-2" not in path.read_text()
    with pytest.raises(ConfigError, match="too short"):
        add_user(path, "bob", "short")
    with pytest.raises(ConfigError, match="user name"):
        add_user(path, "bob smith", "long-enough-1")
    (tmp_path / "bad.json").write_text('{"users": {"x": {"hash": "plain"}}}')
    with pytest.raises(ConfigError, match=r"bad.json: users.x.hash"):
        load_users(tmp_path / "bad.json")


def _bare_site(tmp_path: Path, open_read: bool) -> Any:
    return parse_site(
        {
            "site": "web",
            "buses": [{"name": "b", "host": "127.0.0.1"}],
            "meters": [{"name": "m1", "bus": "b", "unit": 1, "profile": "sdm630"}],
            "devices": [{"name": "bank1", "bus": "b", "unit": 10, "kind": "capbank"}],
            "banks": [{"name": "main", "meter": "m1", "device": "bank1", "steps_kvar": [5, 5]}],
            "console": {
                "open_read": open_read,
                "users_file": str(tmp_path / "users.json"),
                "login_attempts": 3,
            },
        }
    )


async def _client(tmp_path: Path, open_read: bool) -> TestClient[Any, Any]:
    site = _bare_site(tmp_path, open_read)
    add_user(site.console.users_file, USER, PASSWORD)
    auth = Auth(site.console.users_file, attempts=3, window=300)
    app = Console(site, Live(site), None, auth).app()
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_reading_needs_a_login_unless_the_site_opens_it(tmp_path: Path) -> None:
    closed = await _client(tmp_path / "a", open_read=False)
    opened = await _client(tmp_path / "b", open_read=True)
    try:
        for path in ("/api/snapshot", "/api/site", "/api/live", "/api/history?meter=m1"):
            assert (await closed.get(path)).status == 401, path
        assert (await opened.get("/api/snapshot")).status == 200
        page = await closed.get("/")  # the page itself (with its login form) loads
        assert page.status == 200 and "login-form" in await page.text()
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        r = await closed.post("/api/login", json={"user": USER, "password": PASSWORD})
        assert r.status == 200
        cookie = r.headers["Set-Cookie"]
        assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "Secure" not in cookie  # no TLS configured here
        assert (await closed.get("/api/snapshot")).status == 200
    finally:
        await closed.close()
        await opened.close()


async def test_logins_are_rate_limited_per_address_and_user(tmp_path: Path) -> None:
    client = await _client(tmp_path, open_read=True)
    try:
        for _ in range(3):
            r = await client.post("/api/login", json={"user": USER, "password": "wrong-guess"})
            assert r.status == 401
        r = await client.post("/api/login", json={"user": USER, "password": PASSWORD})
        assert r.status == 429, "the right password is refused too while limited"
        assert int(r.headers["Retry-After"]) > 0
        assert "too many failed logins" in (await r.json())["error"]
    finally:
        await client.close()


async def test_an_action_without_login_or_with_a_forged_csrf_token_is_refused(
    tmp_path: Path,
) -> None:
    client = await _client(tmp_path, open_read=True)
    try:
        body = {"mode": "manual"}
        r = await client.post("/api/banks/main/mode", json=body)
        assert r.status == 401 and "log in" in (await r.json())["error"]
        login = await client.post("/api/login", json={"user": USER, "password": PASSWORD})
        csrf = (await login.json())["csrf"]
        for forged in ({}, {"X-CSRF-Token": "x" * len(csrf)}):
            r = await client.post("/api/banks/main/mode", json=body, headers=forged)
            assert r.status == 403, forged
        # the right token passes the guard (and fails further on: this app has no bus)
        r = await client.post("/api/banks/main/mode", json=body, headers={"X-CSRF-Token": csrf})
        assert r.status == 503 and "bus" in (await r.json())["error"]
        r = await client.post("/api/banks/nope/mode", json=body, headers={"X-CSRF-Token": csrf})
        assert r.status == 400 and "no bank named 'nope'" in (await r.json())["error"]
    finally:
        await client.close()


# -- the live stack: broker, simulator, collector, analytics, actuator, console -------------


@pytest.fixture(scope="module")
def stack(mqtt_url: str, db_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import uuid

    site_name = f"c{uuid.uuid4().hex[:10]}"
    folder = tmp_path_factory.mktemp("console-api")
    settings = Settings(
        mqtt_url=mqtt_url,
        db_dsn=db_dsn,
        data_dir=folder / "data",
        metrics_port=0,
        mqtt_client_id=f"pfm-test-{site_name}",
        log_format="text",
    )
    with Stack(settings, site_name, folder) as s:
        yield s


def _bank(client: Client) -> dict[str, Any]:
    return client.snapshot()["banks"]["main"]  # type: ignore[no-any-return]


def test_forged_and_logged_out_actions_leave_no_trace_on_the_bus(stack: Stack) -> None:
    c = Client(stack.url)
    assert c.act("api/maintenance", {"meter": "servers", "on": True, "reason": "x"})[0] == 401
    assert c.login() == 200
    status, _ = c.act("api/maintenance", {"meter": "servers", "on": True, "reason": "x"}, "f")
    assert status == 403
    # a valid action afterwards: once its event is back, the forged one would be too
    status, body = c.act("api/maintenance", {"meter": "pump", "on": True, "reason": "sentinel"})
    assert status == 400 and "no meter named 'pump'" in body["error"]
    status, _ = c.act("api/maintenance", {"meter": "compressor", "on": True, "reason": "oil"})
    assert status == 200
    wait_until(lambda: "compressor" in c.snapshot()["maintenance"], 10, "the maintenance event")
    snap = c.snapshot()
    assert "servers" not in snap["maintenance"]
    assert [e["evidence"]["reason"] for e in snap["recent"] if e["code"] == "maintenance"] == [
        "oil"
    ]
    assert c.act("api/maintenance", {"meter": "compressor", "on": False})[0] == 200
    wait_until(lambda: not c.snapshot()["maintenance"], 10, "the end of maintenance")


def test_a_step_switched_by_hand_moves_the_simulated_coil_under_the_interlocks(
    stack: Stack,
) -> None:
    c = Client(stack.url)
    assert c.login() == 200
    assert stack.plant.bank is not None
    bank = stack.plant.bank
    # the controller switches steps in (incomer PF ~0.78); take one that is in
    wait_until(lambda: any(s["in"] for s in _bank(c)["steps"]), 40, "a step switched in")
    assert c.act("api/banks/main/mode", {"mode": "manual"})[0] == 200
    wait_until(lambda: _bank(c)["mode"] == "manual", 10, "manual mode")
    step = next(s for s in _bank(c)["steps"] if s["in"])
    coil = step["coil"]
    held = stack.call(lambda: list(bank.state))
    assert held[coil] is True
    status, body = c.act("api/banks/main/step", {"step": step["step"], "on": False})
    assert status == 200, body
    wait_until(lambda: stack.call(lambda: bank.state[coil]) is False, 10, "the coil to open")
    wait_until(lambda: _bank(c)["steps"][step["step"] - 1]["in"] is False, 10, "state read back")
    # re-closing at once: the discharge interlock refuses, the coil stays open
    assert c.act("api/banks/main/step", {"step": step["step"], "on": True})[0] == 200
    refused = wait_until(
        lambda: [e for e in _bank(c)["events"] if e["code"] == "request_refused"],
        10,
        "the refusal event",
    )
    assert "discharging" in refused[0]["message"], refused[0]
    assert refused[0]["evidence"]["user"] == USER
    assert stack.call(lambda: bank.state[coil]) is False
    assert stack.call(lambda: list(bank.violations)) == []
    # manual mode holds the controller: nothing else moved while we were in charge
    others = [i for i in range(len(held)) if i != coil]
    assert [stack.call(lambda i=i: bank.state[i]) for i in others] == [held[i] for i in others]
    commands = _bank(c)["commands"]
    assert commands[0]["origin"] == "bank:main" and f"by hand ({USER})" in commands[0]["reason"]
    assert c.act("api/banks/main/mode", {"mode": "auto"})[0] == 200
    wait_until(lambda: _bank(c)["mode"] == "auto", 10, "automatic mode")


def test_a_meter_without_metrics_is_shown_stale_with_its_age(stack: Stack) -> None:
    c = Client(stack.url)
    wait_until(lambda: c.snapshot()["status"]["servers"][0] == "live", 20, "servers live")
    stack.call(lambda: stack.plant.inject("comm_loss", unit=3))
    try:
        status = wait_until(
            lambda: (s := c.snapshot()["status"]["servers"])[0] == "stale" and s,
            30,
            "servers stale",
        )
        assert status[1] >= 5.0  # 5 x its 1 s interval
        assert c.snapshot()["status"]["main"][0] == "live"
    finally:
        stack.call(lambda: stack.plant.clear(3))
    wait_until(lambda: c.snapshot()["status"]["servers"][0] == "live", 30, "servers live again")


# -- history and the report from the archive (a private schema of the real database) ------


async def test_history_and_report_come_from_the_archive(
    tmp_path: Path, db_dsn: str, db_schema: str
) -> None:
    import math
    from datetime import UTC, datetime, timedelta

    import asyncpg

    from services.archiver.ingest import RowBuilder, group_rows, write_batch
    from services.archiver.migrate import migrate
    from services.archiver.rollups import refresh
    from shared.measurements import Measurement as M
    from shared.messages import Metrics
    from shared.site.archiver import ArchiverConfig
    from tests.test_archiver_helpers import schema_dsn

    dsn = schema_dsn(db_dsn, db_schema)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    rows = []
    for k in range(30):  # the last half hour, one row a minute: 100 kW, then 50 kvar less
        p, q = 100_000.0, 75_000.0 if k < 15 else 25_000.0
        rows.append(
            Metrics(
                site="web",
                meter="m1",
                ts=now - timedelta(minutes=30 - k),
                seq=k,
                interval_s=60,
                values={
                    M.POWER: p,
                    M.REACTIVE_POWER: q,
                    M.APPARENT_POWER: math.hypot(p, q),
                    M.POWER_FACTOR: p / math.hypot(p, q),
                },
            )
        )
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, ArchiverConfig())
        builder = RowBuilder(lambda m: 60.0)
        await write_batch(
            conn, group_rows(builder.row(m) for m in rows), mark_dirty=True, staged=set()
        )
        await refresh(conn)
    finally:
        await conn.close()
    site = _bare_site(tmp_path, open_read=True)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    client: TestClient[Any, Any] = TestClient(
        TestServer(Console(site, Live(site), None, Auth(site.console.users_file), pool).app())
    )
    await client.start_server()
    try:
        r = await client.get("/api/history?meter=m1&span=hour")
        assert r.status == 200, await r.text()
        h = await r.json()
        assert h["table"] == "pfm_metrics_1m" and len(h["t"]) == 30
        assert h["kw"] == pytest.approx([100.0] * 30)
        assert h["kvar"] == pytest.approx([75.0] * 15 + [25.0] * 15)
        assert h["pf"][0] == pytest.approx(0.8)
        bad = await client.get("/api/history?meter=nope&span=hour")
        assert bad.status == 400 and "no meter named 'nope'" in (await bad.json())["error"]
        start = (now - timedelta(hours=1)).isoformat()
        r = await client.get("/api/report", params={"from": start, "format": "json"})
        assert r.status == 200, await r.text()
        assert "attachment" in r.headers["Content-Disposition"]
        report = await r.json(content_type=None)
        assert report["site"] == "web" and report["billing_points"] == ["m1"]
        assert report["kwh"] == pytest.approx(50.0)  # 30 min of 100 kW
        r = await client.get("/api/report?from=yesterday")
        assert r.status == 400 and "not a date/time" in (await r.json())["error"]
    finally:
        await client.close()
        await pool.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    crt, pem = folder / "console.crt", folder / "console.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, pem


async def test_tls_serves_https_with_a_secure_cookie_and_a_bad_certificate_refuses_the_start(
    tmp_path: Path,
) -> None:
    import ssl

    from services.console.service import tls_context

    crt, key = _self_signed(tmp_path)
    raw = _bare_site(tmp_path, open_read=False).model_dump()
    raw["console"].update(tls_cert=str(crt), tls_key=str(key))
    site = parse_site(raw)
    ctx = tls_context(site)
    assert ctx is not None
    add_user(site.console.users_file, USER, PASSWORD)
    app = Console(site, Live(site), None, Auth(site.console.users_file), tls=True).app()
    server = TestServer(app)
    await server.start_server(ssl=ctx)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    try:
        trust = ssl.create_default_context(cafile=str(crt))
        trust.check_hostname = False  # the test server answers on 127.0.0.1
        r = await client.post("/api/login", json={"user": USER, "password": PASSWORD}, ssl=trust)
        assert r.status == 200 and str(r.url).startswith("https://")
        cookie = r.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "max-age=31536000" in r.headers["Strict-Transport-Security"]
    finally:
        await client.close()
    raw["console"].update(tls_cert=str(key), tls_key=str(crt))  # swapped: does not load
    with pytest.raises(ConfigError, match=r"console.tls_cert/tls_key: cannot load .*console.key"):
        tls_context(parse_site(raw))


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool (Debian package prometheus) not installed",
)
def test_console_metric_names_pass_promtool(tmp_path: Path) -> None:
    import subprocess

    from services.console.service import ConsoleMetrics
    from shared.metrics import ServiceMetrics

    site = _bare_site(tmp_path, open_read=True)
    base = ServiceMetrics("console", "web")
    cm = ConsoleMetrics(base, Live(site))
    cm.count("refused")
    cm.frames.inc()
    text = base.exposition()
    res = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert b'pfm_console_actions_total{result="refused"} 1.0' in text
    assert b"pfm_console_clients 0.0" in text


def test_a_session_ends_after_its_lifetime_and_at_logout(tmp_path: Path) -> None:
    now = [1000.0]
    users = tmp_path / "users.json"
    add_user(users, USER, PASSWORD)
    auth = Auth(users, session_ttl=60, clock=lambda: now[0])
    assert auth.login(USER, "wrong-one-1", "10.0.0.9") is None
    made = auth.login(USER, PASSWORD, "10.0.0.9")
    assert made is not None
    token, session = made
    assert auth.session(token) is session and len(session.csrf) >= 40
    assert auth.csrf_ok(session, session.csrf) and not auth.csrf_ok(session, None)
    now[0] += 61
    assert auth.session(token) is None
    token2, _ = auth.login(USER, PASSWORD, "10.0.0.9") or ("", None)
    auth.logout(token2)
    assert auth.session(token2) is None


def test_an_alarm_is_shelved_with_a_reason_and_a_period(stack: Stack) -> None:
    c = Client(stack.url)
    assert c.login() == 200
    alarm = wait_until(
        lambda: next((a for a in c.snapshot()["alarms"] if a["code"] == "low_pf"), None),
        30,
        "a low_pf alarm",
    )
    key = {"meter": alarm["meter"], "code": "low_pf", "phase": alarm["phase"]}
    status, body = c.act("api/alarms/shelve", {**key, "minutes": 30})
    assert status == 400 and "say why" in body["error"]
    status, body = c.act("api/alarms/shelve", {**key, "minutes": 0, "reason": "x"})
    assert status == 400 and "1 minute to 7 days" in body["error"]
    status, body = c.act("api/alarms/shelve", {**key, "minutes": 30, "reason": "known motor"})
    assert status == 200, body

    def shelved() -> dict[str, Any] | None:
        for a in c.snapshot()["alarms"]:
            if a["id"] == alarm["id"] and a["shelved"]:
                return a["shelved"]  # type: ignore[no-any-return]
        return None

    sh = wait_until(shelved, 10, "the shelved alarm")
    assert sh["user"] == USER and sh["reason"] == "known motor"
    assert 29 * 60 < sh["until"] - c.snapshot()["t"] <= 30 * 60


def test_an_offline_gateway_shows_every_meter_offline(stack: Stack) -> None:
    import asyncio

    from shared.bus import Bus
    from shared.messages import GatewayStatus, utcnow

    c = Client(stack.url)
    wait_until(lambda: c.snapshot()["status"]["main"][0] == "live", 20, "main live")

    async def say(status: str) -> None:
        s = stack.settings.model_copy(
            update={"mqtt_client_id": f"{stack.settings.mqtt_client_id}-gw-{status}"}
        )
        async with Bus(s, service="test", site=stack.site.site, persistent=False) as bus:
            await bus.wait_connected(10)
            msg = GatewayStatus(
                site=stack.site.site, ts=utcnow(), seq=1, gateway=stack.site.gateway, status=status
            )
            await bus.publish(
                topics.gateway_status(stack.site.site, stack.site.gateway), msg, retain=True
            )

    asyncio.run(say("offline"))
    try:
        snap = wait_until(
            lambda: (
                (s := c.snapshot())["gateways"].get(stack.site.gateway, {}).get("status")
                == "offline"
                and s
            ),
            10,
            "the gateway offline",
        )
        assert {name: st[0] for name, st in snap["status"].items()} == {
            m.name: "offline" for m in stack.site.meters
        }
    finally:
        asyncio.run(say("online"))
    wait_until(lambda: c.snapshot()["status"]["main"][0] == "live", 10, "main live again")
