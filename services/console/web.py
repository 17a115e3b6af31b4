"""The console's web application (aiohttp): pages, live stream, reads and actions.

* ``GET /`` the page, ``/static/*`` its script and style (ours, no third-party code);
* ``GET /api/live`` Server-Sent Events: a ``snapshot`` then ``update`` frames;
* ``GET /api/snapshot``, ``/api/history``, ``/api/report`` reads (open without a login
  only when the site file's ``console.open_read`` says so);
* ``POST /api/login`` / ``/api/logout``; every other ``POST`` is an action: it needs a
  session cookie and its CSRF token in ``X-CSRF-Token``, and is published on the bus
  (an event, and a ``request`` to the actuator for a bank) - the console itself never
  touches a coil.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from services.console.auth import Auth, Session
from services.console.history import SPANS, report, series
from services.console.live import Live, alarm_id
from shared import topics
from shared.bus import Bus, BusUnavailable
from shared.errors import ConfigError
from shared.messages import Event, EventState, Request, Severity, utcnow
from shared.site import SiteConfig

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
COOKIE = "pfm_session"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ActionHandler = Callable[[web.Request, Session, dict[str, Any]], Awaitable[str]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class Console:
    """State and handlers of one console (one site)."""

    def __init__(
        self,
        site: SiteConfig,
        live: Live,
        bus: Bus | None,
        auth: Auth,
        pool: asyncpg.Pool | None = None,
        *,
        tls: bool = False,
    ) -> None:
        self.site = site
        self.live = live
        self.bus = bus
        self.auth = auth
        self.pool = pool
        self.tls = tls
        self._seq = 0
        #: called with ``done``, ``refused`` (no login, bad CSRF) or ``invalid`` per action
        self.count: Callable[[str], None] = lambda result: None

    # -- wiring ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self.index)
        r.add_static("/static/", STATIC, show_index=False)
        r.add_get("/api/me", self.me)
        r.add_get("/api/site", self.read(self.site_info))
        r.add_get("/api/snapshot", self.read(self.snapshot))
        r.add_get("/api/live", self.read(self.stream))
        r.add_get("/api/history", self.read(self.history))
        r.add_get("/api/report", self.read(self.report))
        r.add_post("/api/login", self.login)
        r.add_post("/api/logout", self.logout)
        r.add_post("/api/alarms/ack", self.action(self.ack))
        r.add_post("/api/alarms/shelve", self.action(self.shelve))
        r.add_post("/api/maintenance", self.action(self.maintenance))
        r.add_post("/api/banks/{bank}/mode", self.action(self.bank_mode))
        r.add_post("/api/banks/{bank}/step", self.action(self.bank_step))
        return app

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Cache-Control", "no-store")
        if self.tls:
            resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return resp

    def _session(self, request: web.Request) -> Session | None:
        return self.auth.session(request.cookies.get(COOKIE))

    def read(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.site.console.open_read and self._session(request) is None:
                return _error(401, "log in to read this site")
            return await handler(request)

        return guarded

    def action(self, handler: ActionHandler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            session = self._session(request)
            if session is None:
                self.count("refused")
                return _error(401, "log in first: actions need a login")
            if request.content_type != "application/json":
                return _error(415, "send JSON (Content-Type: application/json)")
            if not self.auth.csrf_ok(session, request.headers.get("X-CSRF-Token")):
                self.count("refused")
                log.warning("action %s by %s refused: bad CSRF token", request.path, session.user)
                return _error(403, "missing or wrong CSRF token")
            try:
                body = await request.json(loads=orjson.loads)
            except (ValueError, orjson.JSONDecodeError):
                return _error(400, "the body is not JSON")
            if not isinstance(body, dict):
                return _error(400, "the body must be a JSON object")
            try:
                done = await handler(request, session, body)
            except ConfigError as exc:
                self.count("invalid")
                return _error(400, str(exc))
            except BusUnavailable as exc:
                self.count("invalid")
                return _error(503, f"the bus is not reachable: {exc}")
            self.count("done")
            log.info("action by %s: %s", session.user, done)
            return _json({"ok": True, "done": done})

        return guarded

    # -- pages and reads ---------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def me(self, request: web.Request) -> web.StreamResponse:
        s = self._session(request)
        return _json(
            {
                "user": s.user if s else None,
                "csrf": s.csrf if s else None,
                "open_read": self.site.console.open_read,
                "site": self.site.site,
            }
        )

    async def site_info(self, request: web.Request) -> web.StreamResponse:
        s = self.site
        return _json(
            {
                "site": s.site,
                "description": s.description,
                "gateway": s.gateway,
                "pf_alert": s.thresholds.pf_alert,
                "pf_penalty": s.thresholds.pf_penalty,
                "stale_after_intervals": s.console.stale_after_intervals,
                "meters": [
                    {"name": m.name, "kind": m.kind, "parent": m.parent, "interval_s": m.interval_s}
                    for m in s.meters
                ],
                "banks": [
                    {
                        "name": b.name,
                        "meter": b.meter,
                        "device": b.device,
                        "steps_kvar": b.steps_kvar,
                        "target_pf": b.target_pf,
                    }
                    for b in s.banks
                ],
                "history": self.pool is not None,
            }
        )

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        return _json(self.live.snapshot())

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
        self.live.clients.add(queue)
        try:
            first = b"event: snapshot\ndata: " + orjson.dumps(self.live.snapshot()) + b"\n\n"
            await resp.write(b"retry: 1000\n\n" + first)
            while True:
                try:
                    frame = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    frame = b": keep-alive\n\n"
                if frame is None:
                    break
                await resp.write(frame)
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.live.clients.discard(queue)
        return resp

    async def history(self, request: web.Request) -> web.StreamResponse:
        meter = request.query.get("meter", "")
        span = request.query.get("span", "hour")
        if meter not in {m.name for m in self.site.meters}:
            return _error(400, f"meter: no meter named {meter!r}")
        if span not in SPANS:
            return _error(400, f"span: {span!r} is not one of {', '.join(SPANS)}")
        if self.pool is None:
            return _error(503, "no archive: the console runs without a database")
        try:
            return _json(await series(self.pool, self.site.site, meter, span))
        except asyncpg.UndefinedTableError:
            table = SPANS[span][0]
            return _json(
                {"meter": meter, "span": span, "table": table, "t": [], "pf": [], "kw": [],
                 "kvar": [], "note": f"the archive has no {table} yet (is the archiver running?)"}
            )  # fmt: skip
        except (OSError, asyncpg.PostgresError) as exc:
            return _error(503, f"the archive did not answer: {exc}")

    async def report(self, request: web.Request) -> web.StreamResponse:
        fmt = request.query.get("format", "md")
        if fmt not in ("md", "html", "csv", "json"):
            return _error(400, f"format: {fmt!r} is not one of md, html, csv, json")
        try:
            end = _when(request.query.get("to"), datetime.now(UTC))
            start = _when(request.query.get("from"), end - timedelta(days=1))
        except ValueError as exc:
            return _error(400, str(exc))
        if self.pool is None:
            return _error(503, "no archive: the console runs without a database")
        try:
            text = await report(self.pool, self.site, start, end, fmt)
        except ConfigError as exc:
            return _error(400, str(exc))
        except (OSError, asyncpg.PostgresError) as exc:
            return _error(503, f"the archive did not answer: {exc}")
        name = f"pfm-report-{self.site.site}-{start:%Y%m%d%H%M}-{end:%Y%m%d%H%M}.{fmt}"
        types = {"md": "text/markdown", "html": "text/html", "csv": "text/csv"}
        return web.Response(
            text=text,
            content_type=types.get(fmt, "application/json"),
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    # -- login ---------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":  # no cross-site form can send it
            return _error(415, "send JSON (Content-Type: application/json)")
        try:
            body = await request.json(loads=orjson.loads)
            user, password = str(body["user"]), str(body["password"])
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return _error(400, 'send {"user": ..., "password": ...}')
        address = request.remote or "?"
        wait = self.auth.limited(f"addr:{address}", f"user:{user}")
        if wait > 0:
            return web.Response(
                body=orjson.dumps({"error": f"too many failed logins: try again in {wait:.0f}s"}),
                status=429,
                content_type="application/json",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        made = await asyncio.to_thread(self.auth.login, user, password, address)
        if made is None:
            log.warning("failed login for %r from %s", user, address)
            return _error(401, "wrong user or password")
        token, session = made
        log.info("login of %s from %s", user, address)
        resp = _json({"user": session.user, "csrf": session.csrf})
        resp.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="Strict",
            secure=self.tls,
            path="/",
            max_age=int(self.auth.session_ttl),
        )
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.auth.logout(request.cookies.get(COOKIE))
        resp = _json({"ok": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    # -- actions -------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _event(
        self,
        meter: str,
        code: str,
        message: str,
        evidence: dict[str, float | str | bool | None],
        state: EventState = EventState.NOTICE,
    ) -> None:
        if self.bus is None:
            raise BusUnavailable("the console has no bus", kind="disconnected")
        ev = Event(
            site=self.site.site,
            meter=meter,
            ts=utcnow(),
            seq=self._next_seq(),
            code=code,
            state=state,
            severity=Severity.INFO,
            message=message,
            evidence=evidence,
            service="console",
        )
        await self.bus.publish(topics.event(self.site.site, meter), ev)

    def _alarm(self, body: dict[str, Any]) -> dict[str, Any]:
        key = alarm_id(str(body.get("meter", "")), str(body.get("code", "")), body.get("phase"))
        alarm = self.live.alarms.get(key)
        if alarm is None:
            raise ConfigError(f"no active alarm {key!r}")
        return alarm

    async def ack(self, request: web.Request, s: Session, body: dict[str, Any]) -> str:
        a = self._alarm(body)
        text = f"{a['code']} on {a['meter']} acknowledged by {s.user}"
        await self._event(
            a["meter"],
            "alarm_ack",
            text,
            {"code": a["code"], "phase": a["phase"], "user": s.user},
        )
        return text

    async def shelve(self, request: web.Request, s: Session, body: dict[str, Any]) -> str:
        a = self._alarm(body)
        reason = str(body.get("reason", "")).strip()
        try:
            minutes = float(body.get("minutes", 0))
        except (TypeError, ValueError):
            minutes = 0.0
        if not reason:
            raise ConfigError("reason: say why the alarm is shelved")
        if not 1 <= minutes <= 7 * 24 * 60:
            raise ConfigError("minutes: shelve for 1 minute to 7 days")
        until = utcnow().timestamp() + minutes * 60
        text = f"{a['code']} on {a['meter']} shelved {minutes:g} min by {s.user}: {reason}"
        await self._event(
            a["meter"],
            "alarm_shelved",
            text,
            {
                "code": a["code"],
                "phase": a["phase"],
                "user": s.user,
                "reason": reason[:500],
                "until": until,
            },
        )
        return text

    def _bank(self, name: str) -> Any:
        for b in self.site.banks:
            if b.name == name:
                return b
        raise ConfigError(f"no bank named {name!r}")

    async def _request(self, bank: Any, s: Session, action: str, **kw: Any) -> None:
        if self.bus is None:
            raise BusUnavailable("the console has no bus", kind="disconnected")
        req = Request(
            site=self.site.site,
            ts=utcnow(),
            seq=self._next_seq(),
            device=bank.device,
            bank=bank.name,
            action=action,
            user=s.user,
            **kw,
        )
        await self.bus.publish(topics.request(self.site.site, bank.device), req)

    async def maintenance(self, request: web.Request, s: Session, body: dict[str, Any]) -> str:
        on = body.get("on") is True
        reason = str(body.get("reason", "")).strip()[:500]
        if on and not reason:
            raise ConfigError("reason: say why maintenance starts")
        state = EventState.RAISED if on else EventState.CLEARED
        word = "starts" if on else "ends"
        if "bank" in body:
            bank = self._bank(str(body["bank"]))
            await self._request(bank, s, "maintenance" if on else "auto", reason=reason)
            text = f"maintenance of bank {bank.name} {word} ({s.user}): {reason}"
            await self._event(
                bank.device,
                "maintenance",
                text,
                {"kind": "bank", "bank": bank.name, "user": s.user, "reason": reason},
                state,
            )
            return text
        meter = str(body.get("meter", ""))
        if meter not in self.live.interval:
            raise ConfigError(f"meter: no meter named {meter!r}")
        text = f"maintenance of meter {meter} {word} ({s.user}): {reason}"
        await self._event(
            meter, "maintenance", text, {"kind": "meter", "user": s.user, "reason": reason}, state
        )
        return text

    async def bank_mode(self, request: web.Request, s: Session, body: dict[str, Any]) -> str:
        bank = self._bank(request.match_info["bank"])
        mode = body.get("mode")
        if mode not in ("manual", "auto"):
            raise ConfigError("mode: 'manual' or 'auto'")
        await self._request(bank, s, str(mode), reason=str(body.get("reason", ""))[:500])
        text = f"bank {bank.name}: {mode} requested by {s.user}"
        await self._event(
            bank.device,
            "operator_request",
            text,
            {"bank": bank.name, "action": str(mode), "user": s.user},
        )
        return text

    async def bank_step(self, request: web.Request, s: Session, body: dict[str, Any]) -> str:
        bank = self._bank(request.match_info["bank"])
        step, on = body.get("step"), body.get("on")
        if not isinstance(step, int) or not 1 <= step <= len(bank.steps_kvar):
            raise ConfigError(f"step: 1..{len(bank.steps_kvar)}")
        if not isinstance(on, bool):
            raise ConfigError("on: true or false")
        await self._request(bank, s, "step", step=step, on=on)
        text = f"bank {bank.name}: step {step} {'in' if on else 'out'} requested by {s.user}"
        await self._event(
            bank.device,
            "operator_request",
            text,
            {"bank": bank.name, "action": "step", "step": step, "on": on, "user": s.user},
        )
        return text


def _when(text: str | None, default: datetime) -> datetime:
    if not text:
        return default
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date/time (use ISO 8601, e.g. 2026-12-03T10:00)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
