"""Helpers shared by the archiver and report tests (not a test module)."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit


def schema_dsn(dsn: str, schema: str) -> str:
    """``dsn`` with ``search_path`` set to ``schema`` (asyncpg passes it as a server setting)."""
    parts = urlsplit(dsn)
    query = (parts.query + "&" if parts.query else "") + urlencode({"search_path": schema})
    return urlunsplit(parts._replace(query=query))
