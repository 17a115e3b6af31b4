"""Message schemas and topics: round trips, refusals with reasons."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from pydantic import ValidationError

from shared import topics
from shared.errors import ConfigError
from shared.measurements import Measurement
from shared.messages import (
    ActuatorState,
    Command,
    DeadLetter,
    Event,
    EventState,
    GatewayStatus,
    Metrics,
    Reading,
    Waveform,
    decode,
    describe_error,
    encode,
)

TS = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)


def samples() -> list[object]:
    return [
        Reading(
            site="s1",
            meter="m1",
            ts=TS,
            seq=1,
            profile="pmtr001",
            values={Measurement.VOLTAGE_L1: 230.1},
        ),
        Waveform(
            site="s1",
            meter="m1",
            ts=TS,
            seq=2,
            fs_hz=12800,
            channels={"v1": [0.0, 1.0], "i1": [0.0, 0.5]},
        ),
        Metrics(
            site="s1",
            meter="m1",
            ts=TS,
            seq=3,
            interval_s=0,
            values={Measurement.POWER_FACTOR: 0.93},
            averages={"10s": {Measurement.POWER: 5.0}},
        ),
        Event(
            site="s1",
            meter="m1",
            ts=TS,
            seq=4,
            code="low_pf",
            state=EventState.RAISED,
            evidence={"pf": 0.8},
        ),
        Command(
            site="s1",
            device="cap1",
            ts=TS,
            seq=5,
            address=2,
            value=1,
            reason="pf 0.80 below target 0.97",
            origin="bank:main",
        ),
        ActuatorState(site="s1", device="cap1", ts=TS, seq=6, online=True, coils={0: True}),
        GatewayStatus(site="s1", gateway="gw1", ts=TS, seq=0, status="online"),
        DeadLetter.of(
            site="s1", service="analytics", topic="x", reason="bad", payload=b"\xff", seq=1
        ),
    ]


@pytest.mark.parametrize("message", samples(), ids=lambda m: type(m).__name__)
def test_round_trip_keeps_every_field(message: object) -> None:
    raw = encode(message)  # type: ignore[arg-type]
    data = orjson.loads(raw)
    assert data["schema"] == type(message).SCHEMA  # type: ignore[attr-defined]
    assert data["ts"].endswith("Z")  # UTC on the wire
    again = decode(type(message), raw)  # type: ignore[arg-type]
    assert again == message


def test_wrong_schema_is_refused_with_the_field_named() -> None:
    raw = orjson.loads(encode(samples()[0]))  # type: ignore[arg-type]
    raw["schema"] = "pfm.reading/2"
    with pytest.raises(ValidationError) as info:
        Reading.model_validate(raw)
    assert "schema" in describe_error(info.value)


def test_naive_timestamp_is_refused_and_offsets_become_utc() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Reading(site="s1", meter="m1", ts=datetime(2026, 1, 1), seq=0, profile="x", values={})
    r = Reading(
        site="s1",
        meter="m1",
        ts=datetime(2026, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))),
        seq=0,
        profile="x",
        values={},
    )
    assert r.ts == datetime(2026, 1, 1, 0, tzinfo=UTC) and r.ts.tzinfo == UTC


def test_unknown_measurement_and_negative_seq_are_refused() -> None:
    with pytest.raises(ValidationError) as info:
        Reading.model_validate(
            {
                "schema": "pfm.reading/1",
                "site": "s",
                "meter": "m",
                "ts": TS,
                "seq": -1,
                "profile": "p",
                "values": {"voltage_l9": 1},
            }
        )
    text = describe_error(info.value)
    assert "seq" in text and "values.voltage_l9" in text


def test_waveform_channels_must_match() -> None:
    with pytest.raises(ValidationError, match="differ in length"):
        Waveform(
            site="s", meter="m", ts=TS, seq=0, fs_hz=1000, channels={"v1": [1.0], "i1": [1.0, 2.0]}
        )


def test_every_measurement_has_unit_and_description() -> None:
    for m in Measurement:
        assert m.description
        assert isinstance(m.unit, str)
    assert Measurement.per_phase("voltage", 2) is Measurement.VOLTAGE_L2
    assert Measurement.IMPORT_ENERGY.is_counter and not Measurement.POWER.is_counter


def test_topics_build_and_parse() -> None:
    assert topics.reading("plant-1", "main_board") == "pfm/v1/plant-1/main_board/reading"
    assert topics.command("p", "cap1") == "pfm/v1/p/actuator/cap1/command"
    parts = topics.parse("pfm/v1/p/actuator/cap1/state")
    assert (parts.site, parts.name, parts.kind) == ("p", "cap1", topics.Kind.STATE)
    assert topics.parse("pfm/v1/p/m1/metrics").kind is topics.Kind.METRICS
    assert topics.pattern(topics.Kind.READING) == "pfm/v1/+/+/reading"


def test_aggregates_have_their_own_level_below_metrics() -> None:
    assert topics.aggregate("p", "m1", 3.0) == "pfm/v1/p/m1/metrics/3s"
    assert topics.aggregate("p", "m1", 600) == "pfm/v1/p/m1/metrics/600s"
    with pytest.raises(ConfigError, match="whole number of seconds"):
        topics.aggregate("p", "m1", 0.5)
    parts = topics.parse("pfm/v1/p/m1/metrics/600s")
    assert parts == topics.TopicParts("p", "m1", topics.Kind.METRICS, "600s")
    assert topics.parse("pfm/v1/p/m1/metrics").interval is None
    for bad in ("pfm/v1/p/m1/metrics/3", "pfm/v1/p/m1/metrics/0s", "pfm/v1/p/m1/reading/3s"):
        with pytest.raises(ConfigError, match="unknown layout"):
            topics.parse(bad)
    # the labels of services' counters: an aggregate counts as metrics
    assert topics.kind_of("pfm/v1/p/m1/metrics/3s") == "metrics"
    assert topics.kind_of("pfm/v1/p/m1/metrics") == "metrics"
    assert topics.kind_of("pfm/v1/p/deadletter/analytics") == "analytics"
    assert topics.kind_of(topics.pattern(topics.Kind.METRICS)) == "metrics"
    assert topics.kind_of(topics.aggregates_pattern()) == "metrics"
    assert topics.kind_of("pfm/v1/p/#") == "#"
    assert topics.pattern(topics.Kind.METRICS, "p") == "pfm/v1/p/+/metrics/#"
    assert topics.instant_pattern("p") == "pfm/v1/p/+/metrics"
    assert topics.aggregates_pattern("p", interval="600s") == "pfm/v1/p/+/metrics/600s"


@pytest.mark.parametrize("bad", ["Main", "main board", "mäin", "a/b", "", "x+"])
def test_non_slug_names_are_refused_not_rewritten(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a slug"):
        topics.reading("site", bad)
    with pytest.raises(ValidationError, match="not a slug"):
        Reading(site="s", meter=bad, ts=TS, seq=0, profile="p", values={})


def test_foreign_topics_are_refused() -> None:
    with pytest.raises(ConfigError, match="not under"):
        topics.parse("other/v1/a/b/reading")
    with pytest.raises(ConfigError, match="unknown layout"):
        topics.parse("pfm/v1/a/b/c/d/e")


def _metrics_doc(averages: object, schema: str = "pfm.metrics/2") -> dict[str, object]:
    return {
        "schema": schema,
        "site": "s1",
        "ts": "2026-01-02T03:04:05Z",
        "seq": 7,
        "meter": "m1",
        "interval_s": 0,
        "values": {"power": 1.0},
        "averages": averages,
    }


def test_metrics_averages_travel_compact_with_one_key_list() -> None:
    m = Metrics(
        site="s1",
        meter="m1",
        ts=TS,
        seq=3,
        interval_s=0,
        values={Measurement.POWER: 1200.0},
        averages={
            "5s": {Measurement.POWER: 1200.0, Measurement.POWER_FACTOR: 0.91},
            "60s": {Measurement.POWER: 1180.5},  # no PF yet in this slot
        },
    )
    wire = orjson.loads(encode(m))
    assert wire["schema"] == "pfm.metrics/2"
    assert wire["averages"] == {
        "keys": ["power", "power_factor"],
        "5s": [1200.0, 0.91],
        "60s": [1180.5, None],
    }
    back = decode(Metrics, encode(m))
    assert back.averages == m.averages  # null is "no value", not a value
    assert Measurement.POWER_FACTOR not in back.averages["60s"]
    # in Python the model keeps the dicts every consumer reads
    assert m.model_dump()["averages"]["5s"][Measurement.POWER_FACTOR] == 0.91


def test_metrics_of_schema_1_with_dict_averages_are_still_accepted() -> None:
    """An edge that has not been upgraded yet keeps feeding an upgraded centre."""
    old = _metrics_doc({"10s": {"power": 5.0, "power_factor": 0.8}}, "pfm.metrics/1")
    m = Metrics.model_validate(old)
    assert m.averages == {"10s": {Measurement.POWER: 5.0, Measurement.POWER_FACTOR: 0.8}}
    # re-encoded (archiver, bridge, report) it is a schema-2 message
    assert orjson.loads(encode(m))["schema"] == "pfm.metrics/2"
    assert orjson.loads(encode(m))["averages"] == {
        "keys": ["power", "power_factor"],
        "10s": [5.0, 0.8],
    }


@pytest.mark.parametrize(
    ("averages", "says"),
    [
        ({"keys": ["power"], "5s": [1.0, 2.0]}, "slot '5s' has 2 values for 1 keys"),
        ({"keys": ["power"], "5s": {"power": 1.0}}, "slot '5s': expected a list of values"),
        ({"keys": ["bogus"], "5s": [1.0]}, "averages.5s.bogus"),
        ({"keys": ["power"], "5s": ["high"]}, "averages.5s.power"),
        ({"keys": ["power", "power"], "5s": [1.0, 2.0]}, "keys repeat a quantity"),
    ],
)
def test_malformed_compact_averages_are_refused_saying_where(averages: object, says: str) -> None:
    with pytest.raises(ValidationError) as info:
        Metrics.model_validate(_metrics_doc(averages))
    assert says in str(info.value)
    with pytest.raises(ValidationError):
        Metrics.model_validate(_metrics_doc({}, "pfm.metrics/3"))


def test_request_topic_and_message() -> None:
    from shared.messages import Request

    t = topics.request("s1", "bank1")
    assert t == "pfm/v1/s1/actuator/bank1/request"
    assert topics.parse(t) == topics.TopicParts("s1", "bank1", topics.Kind.REQUEST)
    assert topics.pattern(topics.Kind.REQUEST, "s1") == "pfm/v1/s1/actuator/+/request"
    base = {"site": "s1", "ts": "2026-01-01T00:00:00Z", "seq": 1, "device": "bank1"}
    req = Request.model_validate({**base, "bank": "main", "action": "step", "step": 2, "on": True,
                                  "user": "ann"})  # fmt: skip
    assert Request.model_validate_json(req.to_bytes()) == req
    with pytest.raises(ValidationError, match="needs 'step'"):
        Request.model_validate({**base, "bank": "main", "action": "step", "user": "ann"})
    with pytest.raises(ValidationError, match="belong to a step request"):
        Request.model_validate({**base, "bank": "main", "action": "auto", "step": 1, "user": "a"})
