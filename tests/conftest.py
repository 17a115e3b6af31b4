"""Shared fixtures: the real Mosquitto and PostgreSQL of the machine, or private ones.

Hosts come from ``PFM_MQTT_URL`` / ``PFM_DB_DSN`` (defaults: 127.0.0.1:1883 and
postgresql://postgres@127.0.0.1:5432/test). When they do not answer, a private
mosquitto and PostgreSQL are started for the session. Every test gets its own
site slug (so topics never collide) and its own data folder.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from shared.embedded import LocalMosquitto, LocalPostgres, port_open
from shared.settings import DEFAULT_DB_DSN, DEFAULT_MQTT_URL, Settings, parse_mqtt_url


@pytest.fixture(scope="session")
def mqtt_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("PFM_MQTT_URL", DEFAULT_MQTT_URL)
    target = parse_mqtt_url(url)
    if port_open(target.host, target.port):
        yield url
        return
    with LocalMosquitto(tmp_path_factory.mktemp("mosquitto")) as mosq:
        yield mosq.url


@pytest.fixture(scope="session")
def db_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn = os.environ.get("PFM_DB_DSN", DEFAULT_DB_DSN)

    async def answers() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except Exception:
            return False
        await conn.close()
        return True

    if asyncio.run(answers()):
        yield dsn
        return
    with LocalPostgres(tmp_path_factory.mktemp("postgres")) as pg:
        yield pg.dsn


@pytest.fixture
def site_name() -> str:
    """A site slug no other test uses: topics and rows never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(mqtt_url: str, db_dsn: str, tmp_path: Path, site_name: str) -> Settings:
    return Settings(
        mqtt_url=mqtt_url,
        db_dsn=db_dsn,
        data_dir=tmp_path / "data",
        metrics_port=0,
        mqtt_client_id=f"pfm-test-{site_name}",
        log_format="text",
    )


@pytest.fixture
async def db_schema(db_dsn: str, site_name: str) -> AsyncIterator[str]:
    """A private PostgreSQL schema, dropped after the test; DSN with search_path set."""
    conn = await asyncpg.connect(db_dsn)
    await conn.execute(f'CREATE SCHEMA "{site_name}"')
    await conn.close()
    yield site_name
    conn = await asyncpg.connect(db_dsn)
    await conn.execute(f'DROP SCHEMA "{site_name}" CASCADE')
    await conn.close()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[LocalMosquitto]:
    """A private mosquitto (persistent sessions) that a test may stop and restart."""
    mosq = LocalMosquitto(tmp_path / "mosq", persistence=True)
    mosq.start()
    yield mosq
    mosq.stop()
