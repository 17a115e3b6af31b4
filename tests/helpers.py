"""Small helpers for tests that talk to a real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from pydantic import BaseModel

from shared.bus import Bus, Incoming
from shared.settings import Settings

M = TypeVar("M", bound=BaseModel)


class Inbox:
    """Collects the models a subscription receives; ``await inbox.get()`` with a timeout."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self._event = asyncio.Event()

    async def handler(self, model: BaseModel, incoming: Incoming) -> None:
        self.items.append(model)
        self._event.set()

    async def wait_for(
        self, predicate: Callable[[list[object]], bool], timeout: float = 10
    ) -> None:
        async def _loop() -> None:
            while not predicate(self.items):
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(_loop(), timeout)

    async def get(self, n: int = 1, timeout: float = 10) -> list[object]:
        await self.wait_for(lambda items: len(items) >= n, timeout)
        return self.items


@contextlib.asynccontextmanager
async def listening(
    settings: Settings, site: str, pattern: str, model: type[M], name: str = "listener"
) -> AsyncIterator[Inbox]:
    """A connected bus subscribed to ``pattern``; yields its inbox."""
    inbox = Inbox()
    s = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}"})
    async with Bus(s, service=name, site=site, persistent=False) as bus:
        bus.subscribe(pattern, model, inbox.handler)
        await bus.wait_subscribed(10)
        yield inbox
