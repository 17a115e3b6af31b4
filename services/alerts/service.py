"""``pfmon alerts``: pfmon's alarm events to Alertmanager, so that a site without
Prometheus still notifies people.

Every ``event`` of the site that raises or clears an alarm becomes one Alertmanager
alert (``alertname="PfmAlarm"``, labels ``site``, ``meter``, ``code``, ``severity``
and ``phase`` when the alarm is judged per phase; the message and the evidence in
annotations). A raised alarm starts at the event's time (``startsAt``); a cleared one
is posted with ``endsAt`` = the time it cleared.

Nothing is lost when Alertmanager is away:

* the active alarms and the resolutions not yet delivered are kept in
  ``{data_dir}/alerts-{site}.json`` (written before the event is acknowledged to the
  broker, so a restart of this service loses nothing either);
* a post that fails is retried with exponential backoff (at most ``backoff.max_s``);
* every active alarm is posted again every ``resend_s`` with ``endsAt`` =
  now + ``4 × resend_s``, as Prometheus does: Alertmanager resolves an alert it has
  not heard of by then, so a forgotten alarm cannot stay firing for ever and a living
  one never expires while this service runs.

One-shot notices (``state: notice``) are not alarms and are not forwarded. The
collector's ``device_online`` (cleared) ends its ``device_offline`` alarm.

The console's operator actions, which it publishes as events, become Alertmanager
silences, so that the console, ``pfmon alarms`` and Alertmanager share one notion of
silence: ``alarm_ack`` silences that alarm until it clears, ``alarm_shelved`` until
the time the operator chose, ``maintenance`` (raised) every alarm of that meter or
device until the maintenance ends (cleared). They are queued and kept on disk like the
alerts, and created (or expired) in order when Alertmanager answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from services.alerts.alertmanager import Alertmanager, AlertmanagerError, isoformat
from shared import topics
from shared.backoff import Backoff
from shared.bus import Bus, Incoming
from shared.messages import Event, EventState, utcnow
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import METRICS_PORTS, Settings
from shared.site import SiteConfig

__all__ = ["ALERTNAME", "SERVICE", "Forwarder", "run"]

log = logging.getLogger(__name__)

SERVICE = "alerts"
#: the alertname of every alert this service posts (Prometheus' rules use others)
ALERTNAME = "PfmAlarm"
#: a cleared event whose code differs from the raised one it ends
_CLEARS = {"device_online": "device_offline"}
#: the console's operator actions (not alarms): silences
_CONSOLE_SILENCES = ("alarm_ack", "alarm_shelved", "maintenance")
#: the console's other audit events: neither alarms nor silences
_CONSOLE_OTHER = ("operator_request",)
#: how long an acknowledgement or a maintenance silence lasts at most (expired earlier
#: when the alarm clears or the maintenance ends)
_OPEN_ENDED = timedelta(days=30)


def alarm_key(meter: str, code: str, phase: str | None) -> str:
    return f"{meter}/{code}/{phase or ''}"


def _words(code: str) -> str:
    """The alarm table's words for ``code`` (what raises it), or '' for other codes."""
    from services.analytics.alarms import ALARMS

    for alarm in ALARMS:
        if alarm.code == code:
            return f"raised when {alarm.raise_when}; clears when {alarm.clear_when}"
    return ""


def to_alert(site: str, ev: Event, code: str) -> dict[str, Any]:
    """The Alertmanager alert of ``ev`` (``endsAt`` is set when it is posted)."""
    labels = {
        "alertname": ALERTNAME,
        "site": site,
        "meter": ev.meter,
        "code": code,
        "severity": ev.severity.value,
    }
    if ev.phase:
        labels["phase"] = ev.phase
    summary = ev.message or f"{code} on {ev.meter}" + (f" {ev.phase}" if ev.phase else "")
    annotations = {
        "summary": summary,
        "evidence": orjson.dumps(ev.evidence, option=orjson.OPT_SORT_KEYS).decode(),
    }
    if words := _words(code):
        annotations["description"] = words
    if ev.service:
        annotations["source"] = ev.service
    return {"labels": labels, "annotations": annotations, "startsAt": isoformat(ev.ts)}


class AlertsMetrics:
    def __init__(self, base: ServiceMetrics):
        r = base.registry
        self.active = Gauge(
            "pfm_alerts_active", "Alarms active (posted to Alertmanager until they clear)",
            registry=r,
        )  # fmt: skip
        self.pending = Gauge(
            "pfm_alerts_pending",
            "Resolutions (and changes) not yet accepted by Alertmanager",
            registry=r,
        )
        self.posts = Counter(
            "pfm_alerts_posts_total", "Posts to Alertmanager, by outcome", ["outcome"], registry=r
        )
        self.events = Counter(
            "pfm_alerts_events_total", "Events received, by state", ["state"], registry=r
        )


class Forwarder:
    """The active alarms of one site and their delivery to Alertmanager."""

    def __init__(
        self,
        site: str,
        am: Alertmanager,
        store: Path,
        metrics: AlertsMetrics,
        *,
        resend_s: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.site = site
        self.am = am
        self.store = store
        self.metrics = metrics
        self.resend_s = resend_s
        self.backoff = backoff or Backoff(initial_s=1.0, max_s=30.0)
        #: key -> alert (without endsAt) of every active alarm
        self.active: dict[str, dict[str, Any]] = {}
        #: key -> resolved alert (with endsAt) not yet accepted by Alertmanager
        self.resolved: dict[str, dict[str, Any]] = {}
        #: silences to create or expire, in order (the console's actions)
        self.ops: list[dict[str, Any]] = []
        #: silence key (``ack/...``, ``shelve/...``, ``maintenance/...``) -> its id
        self.silences: dict[str, str] = {}
        #: keys changed since the last successful post
        self.dirty = False
        self._wake = asyncio.Event()
        self._load()

    # -- state on disk ---------------------------------------------------------------------

    def _load(self) -> None:
        if not self.store.exists():
            return
        try:
            data = orjson.loads(self.store.read_bytes())
            self.active = dict(data["active"])
            self.resolved = dict(data["resolved"])
            self.ops = list(data.get("ops", []))
            self.silences = dict(data.get("silences", {}))
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("%s: cannot read the alarm state (%s); starting empty", self.store, exc)
            return
        self.dirty = bool(self.active or self.resolved or self.ops)
        log.info(
            "%d active alarm(s), %d resolution(s) to deliver from %s",
            len(self.active), len(self.resolved), self.store,
        )  # fmt: skip

    def _save(self) -> None:
        self.store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.store.with_suffix(".tmp")
        tmp.write_bytes(
            orjson.dumps(
                {
                    "active": self.active,
                    "resolved": self.resolved,
                    "ops": self.ops,
                    "silences": self.silences,
                }
            )
        )
        os.replace(tmp, self.store)
        self.metrics.active.set(len(self.active))
        self.metrics.pending.set(len(self.resolved))

    # -- events in -------------------------------------------------------------------------

    async def on_event(self, ev: Event, incoming: Incoming) -> None:
        self.metrics.events.labels(ev.state.value).inc()
        if ev.code in _CONSOLE_SILENCES:
            self._console_action(ev)
        elif ev.state is EventState.NOTICE or ev.code in _CONSOLE_OTHER:
            return
        else:
            self._alarm(ev)
        self._save()  # safe on disk before the broker hears the acknowledgement
        self.dirty = True
        self._wake.set()

    def _alarm(self, ev: Event) -> None:
        if ev.state is EventState.RAISED:
            key = alarm_key(ev.meter, ev.code, ev.phase)
            self.active[key] = to_alert(self.site, ev, ev.code)
            self.resolved.pop(key, None)
        else:
            code = _CLEARS.get(ev.code, ev.code)
            key = alarm_key(ev.meter, code, ev.phase)
            alert = self.active.pop(key, None) or to_alert(self.site, ev, code)
            ends = max(ev.ts, datetime.fromisoformat(alert["startsAt"]))
            alert = {**alert, "endsAt": isoformat(ends)}
            self.resolved[key] = alert
            self._expire(f"ack/{key}")  # an acknowledgement lasts while the alarm does

    # -- the console's actions: silences ---------------------------------------------------

    def _console_action(self, ev: Event) -> None:
        e = ev.evidence
        user = str(e.get("user") or "console")
        reason = str(e.get("reason") or "")
        matchers = {"site": self.site, "meter": ev.meter}
        if ev.code == "maintenance":
            key = f"maintenance/{ev.meter}"
            self._expire(key)
            if ev.state is EventState.RAISED:
                comment = f"maintenance (console, {user})" + (f": {reason}" if reason else "")
                self._create(key, matchers, ev.ts + _OPEN_ENDED, user, comment)
            return
        code = e.get("code")
        if not isinstance(code, str) or not code:
            log.warning("%s event of %s names no alarm code: no silence", ev.code, ev.meter)
            return
        phase = e.get("phase")
        matchers["code"] = code
        if isinstance(phase, str) and phase:
            matchers["phase"] = phase
        alarm = alarm_key(ev.meter, code, phase if isinstance(phase, str) else None)
        if ev.code == "alarm_ack":
            key, ends = f"ack/{alarm}", ev.ts + _OPEN_ENDED
            comment = f"acknowledged (console, {user})"
        else:
            until = e.get("until")
            if not isinstance(until, int | float) or isinstance(until, bool):
                log.warning("alarm_shelved of %s %s has no 'until': no silence", ev.meter, code)
                return
            key, ends = f"shelve/{alarm}", datetime.fromtimestamp(float(until), UTC)
            comment = f"shelved (console, {user})" + (f": {reason}" if reason else "")
        self._expire(key)
        self._create(key, matchers, ends, user, comment)

    def _create(
        self, key: str, matchers: dict[str, str], ends: datetime, user: str, comment: str
    ) -> None:
        self.ops.append(
            {"op": "create", "key": key, "matchers": matchers, "endsAt": isoformat(ends),
             "createdBy": user, "comment": comment}
        )  # fmt: skip

    def _expire(self, key: str) -> None:
        """Expire the silence ``key``, after its creation if that is still queued (the
        queue is worked in order, possibly while this runs: nothing is taken out of it)."""
        if key in self.silences or any(op["key"] == key for op in self.ops):
            self.ops.append({"op": "expire", "key": key})

    async def _apply_ops(self) -> None:
        """Create and expire the queued silences in order; stop at the first failure."""
        while self.ops:
            op = self.ops[0]
            if op["op"] == "create":
                try:
                    sid = await self.am.create_silence(
                        op["matchers"], utcnow(), datetime.fromisoformat(op["endsAt"]),
                        op["createdBy"], op["comment"],
                    )  # fmt: skip
                except AlertmanagerError as exc:
                    if exc.code is None or exc.code >= 500:
                        raise  # away or failing: retry
                    # refused (e.g. a shelving that already ended): it never will be
                    log.error("silence %s refused by Alertmanager: %s", op["key"], exc)
                else:
                    self.silences[op["key"]] = sid
            else:
                sid = self.silences.get(op["key"], "")
                if sid:
                    try:
                        await self.am.expire_silence(sid)
                    except AlertmanagerError as exc:
                        # an answer (not found, already expired: Alertmanager says 404 or
                        # 500) means there is nothing left to expire; no answer: retry
                        if exc.code is None:
                            raise
                        log.info("silence %s (%s) not expired: %s", sid, op["key"], exc)
                self.silences.pop(op["key"], None)
            # events may have queued more meanwhile: take out this one, by identity
            self.ops = [o for o in self.ops if o is not op]
            self._save()

    # -- alerts out ------------------------------------------------------------------------

    def batch(self, now: datetime) -> list[dict[str, Any]]:
        """Every active alarm (valid for ``4 × resend_s``) and every pending resolution."""
        ends = isoformat(now + timedelta(seconds=4 * self.resend_s))
        return [{**a, "endsAt": ends} for a in self.active.values()] + list(self.resolved.values())

    async def post_once(self) -> None:
        """Post the batch; on success forget the resolutions it carried."""
        await self._apply_ops()
        sent = dict(self.resolved)
        await self.am.post_alerts(self.batch(utcnow()))
        for key, alert in sent.items():
            if self.resolved.get(key) is alert:
                del self.resolved[key]
        if sent:
            self._save()

    async def run(self, shutdown: Shutdown) -> None:
        """Post on every change and every ``resend_s``; retry failures with backoff."""
        attempt = 0
        while not shutdown.requested.is_set():
            self._wake.clear()
            if self.active or self.resolved or self.ops:
                try:
                    self.dirty = False
                    await self.post_once()
                except AlertmanagerError as exc:
                    self.dirty = True
                    self.metrics.posts.labels("failed").inc()
                    delay = self.backoff.delay(attempt)
                    attempt += 1
                    log.warning(
                        "could not post %d alert(s) to Alertmanager (attempt %d, again in "
                        "%.1f s): %s",
                        len(self.active) + len(self.resolved), attempt, delay, exc,
                    )  # fmt: skip
                    await shutdown.sleep(delay)
                    continue
                if attempt:
                    log.info("Alertmanager at %s accepts alerts again", self.am.url)
                attempt = 0
                self.metrics.posts.labels("ok").inc()
            if self.dirty:
                continue
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(shutdown.requested.wait())
            try:
                await asyncio.wait(
                    {waiter, stopper}, timeout=self.resend_s, return_when="FIRST_COMPLETED"
                )
            finally:
                for fut in (waiter, stopper):
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fut


async def run(
    settings: Settings,
    site: SiteConfig,
    shutdown: Shutdown,
    *,
    resend_s: float = 60.0,
    backoff: Backoff | None = None,
) -> None:
    metrics = ServiceMetrics(SERVICE, site.site)
    alerts_metrics = AlertsMetrics(metrics)
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[SERVICE]
    metrics.serve(settings.metrics_host, port)
    am = Alertmanager(settings.alertmanager_url)
    store = Path(settings.data_dir) / f"alerts-{site.site}.json"
    forwarder = Forwarder(site.site, am, store, alerts_metrics, resend_s=resend_s, backoff=backoff)
    log.info("forwarding the alarms of %s to %s", site.site, am.url)
    async with Bus(settings, service=SERVICE, site=site.site, metrics=metrics) as bus:
        bus.subscribe(topics.pattern(topics.Kind.EVENT, site.site), Event, forwarder.on_event)
        shutdown.ready_after(bus.wait_subscribed(), "subscribed")
        await forwarder.run(shutdown)
