"""shared.backoff: the one wait-before-retry helper (bus, archiver, collector, actuator)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shared.backoff import Backoff
from shared.bus import Bus
from shared.embedded import LocalMosquitto, free_port
from shared.settings import Settings


def test_waits_double_up_to_the_ceiling_with_jitter_below_it() -> None:
    b = Backoff(initial_s=0.5, max_s=30.0)
    assert [b.ceiling(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    for n in range(8):
        waits = [b.delay(n) for _ in range(200)]
        assert all(b.ceiling(n) / 2 <= w <= b.ceiling(n) for w in waits)
        assert max(waits) - min(waits) > 0.1 * b.ceiling(n)  # jittered, not one value


def test_jitter_share_and_none() -> None:
    b = Backoff(initial_s=1.0, max_s=60.0, jitter=0.2)
    assert all(0.8 * 4.0 <= b.delay(2) <= 4.0 for _ in range(200))
    exact = Backoff(initial_s=0.05, max_s=0.5, jitter=0.0)
    assert [exact.delay(n) for n in range(6)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])


def test_a_long_outage_waits_the_longest_and_never_overflows() -> None:
    """A broker away for a day is thousands of attempts; 2.0 ** 1100 overflows a float."""
    b = Backoff(initial_s=0.5, max_s=30.0)
    for attempt in (1023, 1100, 5000, 10**6):
        assert b.ceiling(attempt) == 30.0
        assert 15.0 <= b.delay(attempt) <= 30.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"initial_s": 0.0}, "initial_s"),
        ({"initial_s": 5.0, "max_s": 1.0}, "max_s"),
        ({"factor": 0.5}, "factor"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_bad_parameters_are_refused_by_name(kwargs: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Backoff(**kwargs)


async def test_the_bus_reconnects_after_more_attempts_than_a_float_can_double(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    """1,200 failed connects (seven hours of outage at the default waits), then the broker
    comes: the bus connects. Short waits keep it quick (not so short that the retry loop
    starves the broker's start on a busy machine); the attempt count is what counts."""
    port = free_port()
    s = settings.model_copy(update={"mqtt_url": f"mqtt://127.0.0.1:{port}"})
    tries: list[int] = []

    class Counted(Backoff):
        def delay(self, attempt: int) -> float:
            tries.append(attempt)
            return super().delay(attempt)

    async with Bus(s, service="svc", site=site_name, backoff=Counted(1e-4, 5e-3)) as bus:
        deadline = time.monotonic() + 60
        while len(tries) < 1200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(tries) >= 1200, f"the bus stopped retrying after {len(tries)} attempts"
        assert not bus.connected
        with LocalMosquitto(tmp_path / "mosq", port=port):
            await bus.wait_connected(15)
            assert bus.connected
