"""The bus's fast wire (shared/_mqtt_fast.py) against a real mosquitto, and its parser.

Each broker test runs with the fast path on and off (``PFM_MQTT_FAST``), MQTT v5 and
3.1.1: what it checks is the contract, which both must keep.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import aiomqtt
import pytest

from shared import _mqtt_fast, topics
from shared.bus import Backoff, Bus, BusUnavailable, Incoming
from shared.embedded import LocalMosquitto
from shared.measurements import Measurement
from shared.messages import Reading, Waveform, encode
from shared.settings import Settings

TS = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FAST = Backoff(initial_s=0.1, max_s=0.5)
WIRES = [
    pytest.param("5", True, id="v5-fast"),
    pytest.param("3.1.1", True, id="v311-fast"),
    pytest.param("5", False, id="v5-plain"),
    pytest.param("3.1.1", False, id="v311-plain"),
]


def reading(site: str, seq: int) -> Reading:
    values = {Measurement.VOLTAGE_L1: 230.0, Measurement.CURRENT_L1: 1.0}
    return Reading(site=site, meter="m1", ts=TS, seq=seq, profile="pmtr001", values=values)


def wire(settings: Settings, mosq: LocalMosquitto, proto: str, fast: bool, who: str) -> Settings:
    return settings.model_copy(
        update={
            "mqtt_url": mosq.url,
            "mqtt_protocol": proto,
            "mqtt_fast": fast,
            "mqtt_client_id": f"{settings.mqtt_client_id}-{who}",
        }
    )


def assert_wire(bus: Bus, fast: bool) -> None:
    """The test exercises the path it names (the fast one is on for these versions)."""
    assert isinstance(bus._link, _mqtt_fast.FastLink if fast else _mqtt_fast.PlainLink)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("proto", "fast"), WIRES)
async def test_a_burst_queued_while_away_arrives_whole_once_and_in_order(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, proto: str, fast: bool
) -> None:
    n = 20_000 if fast else 2_000
    seqs: list[int] = []
    done = asyncio.Event()

    async def handler(r: Reading, incoming: Incoming) -> None:
        seqs.append(r.seq)
        if len(seqs) >= n:
            done.set()

    sub_s = wire(settings, mosquitto, proto, fast, "sub")
    pattern = topics.pattern(topics.Kind.READING, site_name)
    async with Bus(sub_s, service="sub", site=site_name) as sub:
        sub.subscribe(pattern, Reading, handler)
        await sub.wait_connected(10)
    pub_s = wire(settings, mosquitto, proto, fast, "pub")
    async with Bus(pub_s, service="pub", site=site_name, persistent=False) as pub:
        await pub.wait_connected(10)
        assert_wire(pub, fast)
        for seq in range(n):
            pub.publish_nowait(topics.reading(site_name, "m1"), reading(site_name, seq))
        await pub.drain(120)
        assert pub.metrics.published.labels("pub", "reading")._value.get() == n
        assert pub.metrics.publish_failures.labels("pub", "reading")._value.get() == 0
    async with Bus(sub_s, service="sub", site=site_name) as sub:
        sub.subscribe(pattern, Reading, handler)
        await asyncio.wait_for(done.wait(), 120)
        assert_wire(sub, fast)
        await asyncio.sleep(0.5)  # a duplicate would arrive now
    assert seqs == list(range(n))


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("proto", "fast"), WIRES)
async def test_manual_ack_unacked_messages_are_redelivered_after_reconnect(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, proto: str, fast: bool
) -> None:
    seen: list[int] = []
    held: list[Incoming] = []

    async def ack_even(r: Reading, incoming: Incoming) -> None:
        seen.append(r.seq)
        if r.seq % 2 == 0:
            incoming.ack()
        else:
            held.append(incoming)

    async def ack_all(r: Reading, incoming: Incoming) -> None:
        seen.append(r.seq)
        incoming.ack()

    sub_s = wire(settings, mosquitto, proto, fast, "sub")
    pattern = topics.pattern(topics.Kind.READING, site_name)

    async def session(handler: object, want: int) -> None:
        async with Bus(sub_s, service="sub", site=site_name, manual_ack=True) as sub:
            sub.subscribe(pattern, Reading, handler)  # type: ignore[arg-type]
            await sub.wait_connected(10)
            assert_wire(sub, fast)
            for _ in range(200):
                if len(seen) >= want:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # let the acks reach the broker

    await session(ack_all, 0)  # the persistent session and its subscription
    pub_s = wire(settings, mosquitto, proto, fast, "pub")
    async with Bus(pub_s, service="pub", site=site_name, persistent=False) as pub:
        await pub.wait_connected(10)
        for seq in range(10):
            await pub.publish(topics.reading(site_name, "m1"), reading(site_name, seq))
    await session(ack_even, 10)
    assert seen == list(range(10))
    # acks of a connection that is gone are dropped, never sent on the next one
    for incoming in held:
        incoming.ack()
    seen.clear()
    await session(ack_all, 5)
    assert sorted(seen) == [1, 3, 5, 7, 9]
    seen.clear()
    await session(ack_all, 1)
    assert seen == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("proto", "fast"), WIRES[:2])
async def test_large_payloads_between_small_ones(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, proto: str, fast: bool
) -> None:
    got: list[object] = []
    s = wire(settings, mosquitto, proto, fast, "sub")

    async def handler(m: Reading | Waveform, incoming: Incoming) -> None:
        got.append(m)

    samples = [float(i % 977) / 7 for i in range(60_000)]  # about 3 x 1.1 MB of JSON
    wave = Waveform(
        site=site_name,
        meter="m1",
        ts=TS,
        seq=1,
        fs_hz=12800.0,
        channels={"v1": samples, "i1": samples, "v2": samples},
    )
    assert len(encode(wave)) > 2_000_000
    async with Bus(s, service="sub", site=site_name, persistent=False) as sub:
        sub.subscribe(topics.pattern(topics.Kind.READING, site_name), Reading, handler)
        sub.subscribe(topics.pattern(topics.Kind.WAVEFORM, site_name), Waveform, handler)
        await sub.wait_connected(10)
        assert_wire(sub, fast)
        pub_s = wire(settings, mosquitto, proto, fast, "pub")
        async with Bus(pub_s, service="pub", site=site_name, persistent=False) as pub:
            await pub.wait_connected(10)
            pub.publish_nowait(topics.reading(site_name, "m1"), reading(site_name, 1))
            pub.publish_nowait(topics.waveform(site_name, "m1"), wave)
            pub.publish_nowait(topics.reading(site_name, "m1"), reading(site_name, 2))
            await pub.drain(30)
        for _ in range(200):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.05)
    assert [type(m).__name__ for m in got] == ["Reading", "Waveform", "Reading"]
    assert got[1] == wave


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("proto", "fast"), WIRES)
async def test_publishes_unconfirmed_at_a_disconnection_are_failed_and_reported(
    settings: Settings, site_name: str, mosquitto: LocalMosquitto, proto: str, fast: bool
) -> None:
    failed: list[tuple[str, bytes, str]] = []
    s = wire(settings, mosquitto, proto, fast, "pub")
    bus = Bus(s, service="pub", site=site_name, persistent=False, backoff=FAST)
    bus.on_publish_failed(lambda topic, payload, why: failed.append((topic, payload, why)))
    async with bus:
        await bus.wait_connected(10)
        assert_wire(bus, fast)
        assert mosquitto.proc is not None
        mosquitto.proc.send_signal(signal.SIGSTOP)  # no PUBACK will come
        try:
            sent = [reading(site_name, seq) for seq in range(5)]
            for r in sent:
                bus.publish_nowait(topics.reading(site_name, "m1"), r)
            await asyncio.sleep(0.3)
            assert bus.unconfirmed == 5
        finally:
            mosquitto.proc.send_signal(signal.SIGKILL)
            mosquitto.proc.wait()
            mosquitto.proc = None
        await bus.drain(15)
        assert bus.unconfirmed == 0
        with pytest.raises(BusUnavailable):
            bus.publish_nowait(topics.reading(site_name, "m1"), sent[0])
    assert [p for _t, p, _why in failed] == [encode(r) for r in sent]
    assert {why for _t, _p, why in failed} == {"disconnected"}
    assert bus.metrics.publish_failures.labels("pub", "reading")._value.get() == 5
    assert bus.metrics.published.labels("pub", "reading")._value.get() == 0


async def test_an_unknown_aiomqtt_or_paho_version_gets_the_plain_wire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = aiomqtt.Client("127.0.0.1")
    assert _mqtt_fast.fast_supported(client) is None  # the pinned versions
    monkeypatch.setattr(_mqtt_fast, "version", lambda dist: "9.0.0")
    assert "9.0.0" in (_mqtt_fast.fast_supported(client) or "")
    link = _mqtt_fast.make_link(
        client, manual_ack=False, on_published=lambda t: None, on_failed=lambda t, w: None
    )
    assert isinstance(link, _mqtt_fast.PlainLink)


def v5_publish(topic: bytes, mid: int, properties: bytes, payload: bytes, *, retain: bool) -> bytes:
    """A QoS 1 MQTT v5 PUBLISH, written out by hand from the spec (section 3.3)."""
    prop_len = len(properties)
    varint = bytes([prop_len]) if prop_len < 128 else bytes([prop_len % 128 | 128, prop_len // 128])
    body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big")
    body += varint + properties + payload
    n, length = len(body), bytearray()
    while True:
        n, digit = n // 128, n % 128
        length.append(digit | (128 if n else 0))
        if not n:
            break
    return bytes([0x32 | int(retain)]) + bytes(length) + body


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
async def test_parser_reassembles_packets_cut_anywhere(chunk: int) -> None:
    client = aiomqtt.Client("127.0.0.1", protocol=aiomqtt.ProtocolVersion.V5)
    link = _mqtt_fast.FastLink(
        client, manual_ack=False, on_published=lambda t: None, on_failed=lambda t, w: None
    )
    user_property = b"\x26" + b"\x00\x01k" + b"\x00\x78" + b"v" * 120  # 125 bytes: 2-byte varint
    big = bytes(range(256)) * 800  # 204,800 bytes: a 3-byte remaining length
    stream = (
        v5_publish(b"a/b", 1, b"", b"first", retain=False)
        + v5_publish(b"a/c", 2, user_property, big, retain=True)
        + v5_publish(b"a/b", 300, b"\x01\x01", b"", retain=False)  # payload format indicator
    )
    for i in range(0, len(stream), chunk):
        link._take(stream[i : i + chunk])
    assert link._ready == [
        ("a/b", b"first", 1, False, 1),
        ("a/c", big, 1, True, 2),
        ("a/b", b"", 1, False, 300),
    ]
    assert bytes(link._acks) == b"\x40\x02\x00\x01" + b"\x40\x02\x00\x02" + b"\x40\x02\x01\x2c"
    assert not link._parts
