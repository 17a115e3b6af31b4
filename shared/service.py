"""How every service process runs: signals, shutdown order, exit codes.

``main()`` of a service reads as nested ``async with`` blocks (bus, pool,
``asyncio.TaskGroup``). SIGTERM/SIGINT set :attr:`Shutdown.requested`; producers
watch it and stop first so that sinks drain, then the group ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Shutdown:
    """A stop request shared by a service's tasks."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()

    def request(self, reason: str = "") -> None:
        if not self.requested.is_set():
            log.info("shutdown requested%s", f" ({reason})" if reason else "")
            self.requested.set()

    async def wait(self) -> None:
        await self.requested.wait()

    async def sleep(self, seconds: float) -> bool:
        """Sleep, but wake at once on shutdown. Returns True if shutdown was requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.requested.wait(), seconds)
        return self.requested.is_set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request, sig.name)


def run(main: Callable[[Shutdown], Awaitable[None]], *, duration: float | None = None) -> None:
    """Run ``main(shutdown)`` until it returns, a signal arrives, or ``duration`` passes."""

    async def _runner() -> None:
        shutdown = Shutdown()
        shutdown.install_signal_handlers()
        timer = None
        if duration is not None:
            timer = asyncio.get_running_loop().call_later(
                duration, shutdown.request, f"--duration {duration:g}s reached"
            )
        try:
            await main(shutdown)
        finally:
            if timer is not None:
                timer.cancel()

    asyncio.run(_runner())
