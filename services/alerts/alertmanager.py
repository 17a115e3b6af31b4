"""A small client of Alertmanager's HTTP API v2 (``/api/v2/alerts``, ``/api/v2/silences``).

Plain ``urllib`` run in a worker thread: a handful of requests a minute needs no
HTTP library. Every failure (refused, timeout, a 4xx/5xx answer) is an
:class:`AlertmanagerError` that says which URL and why.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any

import orjson

from shared.errors import PeerError

__all__ = ["Alertmanager", "AlertmanagerError", "isoformat"]


class AlertmanagerError(PeerError):
    """Alertmanager did not answer, or refused the request (``code`` = HTTP status)."""


def isoformat(ts: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as Alertmanager writes it."""
    return ts.isoformat().replace("+00:00", "Z")


class Alertmanager:
    """One Alertmanager (or a cluster's load balancer) at ``url``."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace").strip()
            raise AlertmanagerError(
                f"{method} {self.url}{path}: HTTP {exc.code} {detail}",
                code=exc.code,
                kind="refused",
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AlertmanagerError(
                f"{method} {self.url}{path}: {reason}", kind="unreachable"
            ) from exc
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise AlertmanagerError(
                f"{method} {self.url}{path}: the answer is not JSON: {raw[:200]!r}",
                kind="protocol",
            ) from exc

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self._call, method, path, body)

    async def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """Post (create, refresh or resolve) alerts."""
        if alerts:
            await self.request("POST", "/api/v2/alerts", alerts)

    async def alerts(self, filters: list[str] | None = None) -> list[dict[str, Any]]:
        query = "".join(f"&filter={urllib.parse.quote(f)}" for f in filters or [])
        got = await self.request("GET", f"/api/v2/alerts?active=true&silenced=true{query}")
        return list(got or [])

    async def silences(self) -> list[dict[str, Any]]:
        return list(await self.request("GET", "/api/v2/silences") or [])

    async def create_silence(
        self,
        matchers: dict[str, str],
        starts_at: datetime,
        ends_at: datetime,
        created_by: str,
        comment: str,
    ) -> str:
        """Create a silence of the alerts whose labels equal ``matchers``; its id."""
        body = {
            "matchers": [
                {"name": k, "value": v, "isRegex": False, "isEqual": True}
                for k, v in matchers.items()
            ],
            "startsAt": isoformat(starts_at),
            "endsAt": isoformat(ends_at),
            "createdBy": created_by,
            "comment": comment,
        }
        got = await self.request("POST", "/api/v2/silences", body)
        return str(got["silenceID"])

    async def expire_silence(self, silence_id: str) -> None:
        await self.request("DELETE", f"/api/v2/silence/{urllib.parse.quote(silence_id)}")
