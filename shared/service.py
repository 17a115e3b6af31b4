"""How every service process runs: signals, readiness, shutdown order, exit codes.

``main()`` of a service reads as nested ``async with`` blocks (bus, pool,
``asyncio.TaskGroup``). SIGTERM/SIGINT set :attr:`Shutdown.requested`; producers
watch it and stop first so that sinks drain, then the group ends.

A service says it is ready (connected and subscribed, its database migrated) with
:meth:`Shutdown.ready`: a test waits for it with :meth:`Shutdown.wait_ready` instead of
sleeping, and under systemd (``Type=notify``) the unit becomes active then (``READY=1``
on ``$NOTIFY_SOCKET``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Shutdown:
    """A stop request shared by a service's tasks."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self._ready = asyncio.Event()
        self._waiting: set[asyncio.Task[None]] = set()
        #: the futures :meth:`sleep` waits on, resolved at once by :meth:`request`
        self._sleepers: set[asyncio.Future[None]] = set()

    def ready(self, what: str = "") -> None:
        """The service does its job from now on (said once: to tests and to systemd)."""
        if self._ready.is_set():
            return
        self._ready.set()
        log.info("ready%s", f" ({what})" if what else "")
        sd_notify("READY=1")

    def ready_after(self, condition: Awaitable[None], what: str = "") -> None:
        """Call :meth:`ready` once ``condition`` completes (e.g. the bus's
        ``wait_subscribed()``), without holding up the caller."""

        async def wait_then_ready() -> None:
            await condition
            self.ready(what)

        task = asyncio.get_running_loop().create_task(wait_then_ready(), name="ready")
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the service said it is ready; raises :class:`TimeoutError`."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    def request(self, reason: str = "") -> None:
        if not self.requested.is_set():
            log.info("shutdown requested%s", f" ({reason})" if reason else "")
            self.requested.set()
            for fut in list(self._sleepers):
                # a sleeper of an event loop that has closed meanwhile has no one to wake
                with contextlib.suppress(RuntimeError):
                    _resolve(fut)

    async def wait(self) -> None:
        await self.requested.wait()

    async def sleep(self, seconds: float) -> bool:
        """Sleep, but wake at once on shutdown. Returns True if shutdown was requested.

        One future and one timer (no task per call): schedulers call this many times
        a second."""
        if self.requested.is_set():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(max(0.0, seconds), _resolve, fut)
        self._sleepers.add(fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._sleepers.discard(fut)
        return self.requested.is_set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request, sig.name)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's ``$NOTIFY_SOCKET``; False without one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", path, exc)
        return False
    return True


#: allocations between two collections of the youngest generation in a service process
#: (CPython's default, 700, has a service that builds a few dicts per message collect
#: thousands of times a second; only reference cycles wait longer to be freed)
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Garbage collection for a long-running service: what exists at start (modules,
    settings, site) is frozen out of every later collection, and the youngest
    generation is collected every :data:`GC_GEN0_THRESHOLD` allocations. With a buffer
    of thousands of validated messages, the default thresholds cost the archiver about
    a third of its CPU."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run(main: Callable[[Shutdown], Awaitable[None]], *, duration: float | None = None) -> None:
    """Run ``main(shutdown)`` until it returns, a signal arrives, or ``duration`` passes
    (garbage collection tuned for a long-running process: :func:`tune_gc`)."""

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

    tune_gc()
    asyncio.run(_runner())
