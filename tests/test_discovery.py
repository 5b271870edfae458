"""Home Assistant MQTT discovery configs: their keys, templates and a real broker round trip."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiomqtt
import pytest
from conftest import Broker

from stream_ser.discovery import (
    discovery_configs,
    discovery_messages,
    node_id,
    removal_messages,
)

PREFIX = "ser"
STATUS = "ser/status/stream-ser-host-room1"

# Full key names from https://www.home-assistant.io/integrations/sensor.mqtt/ and
# .../binary_sensor.mqtt/ (the subset a read-only entity can use).
COMMON_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "device", "enabled_by_default", "encoding", "entity_category", "entity_picture",
    "expire_after", "force_update", "icon", "json_attributes_template",
    "json_attributes_topic", "name", "default_entity_id", "object_id", "origin",
    "payload_available", "payload_not_available", "platform", "qos", "state_topic",
    "unique_id", "value_template", "device_class",
}  # fmt: skip
SENSOR_KEYS = COMMON_KEYS | {
    "last_reset_value_template", "options", "suggested_display_precision", "state_class",
    "unit_of_measurement",
}  # fmt: skip
BINARY_SENSOR_KEYS = COMMON_KEYS | {"off_delay", "payload_off", "payload_on"}
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
AVAILABILITY_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/[a-zA-Z0-9_-]+/[a-zA-Z0-9_-]+/config$")


def configs() -> dict[str, dict[str, Any]]:
    """object_id -> config for stream `room1`."""
    return {topic.split("/")[3]: c for topic, c in discovery_configs(PREFIX, "room1", STATUS)}


def test_configs_use_only_documented_keys_and_well_formed_topics() -> None:
    messages = discovery_messages(PREFIX, "room1", STATUS, device_name="Living room")
    assert len(messages) == 4
    for topic, payload in messages:
        assert TOPIC.match(topic), topic
        config = json.loads(payload)
        allowed = SENSOR_KEYS if "/sensor/" in topic else BINARY_SENSOR_KEYS
        assert set(config) <= allowed, set(config) - allowed
        assert set(config["device"]) <= DEVICE_KEYS
        assert config["device"]["name"] == "Living room"
        for entry in config["availability"]:
            assert set(entry) <= AVAILABILITY_KEYS
            assert entry["topic"] == STATUS
        assert config["state_topic"].startswith("ser/room1/")
    ids = [json.loads(p)["unique_id"] for _, p in messages]
    assert len(set(ids)) == 4
    assert {json.dumps(json.loads(p)["device"]) for _, p in messages} == {
        json.dumps(json.loads(messages[0][1])["device"])
    }  # one device groups them


def test_entities_read_the_right_topics() -> None:
    by_id = configs()
    assert set(by_id) == {"emotion", "arousal", "valence", "speaking"}
    assert by_id["emotion"]["state_topic"] == "ser/room1/utterance"
    assert by_id["emotion"]["json_attributes_topic"] == "ser/room1/utterance"
    assert by_id["arousal"]["state_class"] == "measurement"
    speaking = by_id["speaking"]
    assert speaking["state_topic"] == "ser/room1/speaking"
    assert (speaking["payload_on"], speaking["payload_off"]) == ("ON", "OFF")


def test_node_ids_are_safe_and_distinct() -> None:
    assert node_id("stream-ser", "mic") == "stream-ser_mic"
    odd = node_id("home/ser", "room.1")
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", odd)
    assert odd != node_id("home_ser", "room_1")
    ids = {c["unique_id"] for _, c in discovery_configs("home/ser", "room.1", STATUS)}
    assert ids.isdisjoint({c["unique_id"] for _, c in discovery_configs("x", "room.1", STATUS)})


class State:
    """Stand-in for HA's `this` (the entity's current state object)."""

    state = "happy"
    attributes = {"happy": 0.7, "sad": 0.3}  # noqa: RUF012


def render(template: str, message: dict[str, Any]) -> str:
    """Render like HA does: Jinja2 sandbox, `value_json` and `this` in scope."""
    jinja2 = pytest.importorskip("jinja2.sandbox")
    environment = jinja2.ImmutableSandboxedEnvironment()
    return environment.from_string(template).render(value_json=message, this=State())


FINAL = {
    "type": "utterance", "final": True, "top_label": "angry",
    "distribution": {"angry": 0.6, "calm": 0.4},
    "arousal": 0.61234, "valence": -0.5,
}  # fmt: skip


def test_templates_read_final_results_and_keep_state_otherwise() -> None:
    by_id = configs()
    emotion, arousal, valence = (
        by_id[k]["value_template"] for k in ("emotion", "arousal", "valence")
    )
    attributes = by_id["emotion"]["json_attributes_template"]
    assert render(emotion, FINAL) == "angry"
    assert render(arousal, FINAL) == "0.612"
    assert render(valence, FINAL) == "-0.5"
    assert json.loads(render(attributes, FINAL)) == {"angry": 0.6, "calm": 0.4}
    provisional = FINAL | {"final": False, "top_label": "calm"}
    assert render(emotion, provisional) == "happy"  # kept
    assert render(arousal, provisional) == ""  # ignored by a numeric HA sensor
    assert json.loads(render(attributes, provisional)) == State.attributes
    assert render(arousal, FINAL | {"arousal": None}) == ""  # no estimate: state kept
    without_affect = {k: v for k, v in FINAL.items() if k not in ("arousal", "valence")}
    assert render(arousal, without_affect) == ""
    nested = without_affect | {"arousal_valence": {"arousal": 0.25, "valence": 0.1}}
    assert render(arousal, nested) == "0.25"
    legacy = {k: v for k, v in FINAL.items() if k != "final"}  # schema without `final`
    assert render(emotion, legacy) == "angry"
    status = by_id["emotion"]["availability"][0]["value_template"]
    assert render(status, {"state": "offline", "counters": {}}) == "offline"


async def retained(broker: Broker, topic_filter: str) -> dict[str, bytes]:
    """Every retained message a new subscriber gets for `topic_filter`."""
    found: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(topic_filter, qos=1)
        # Retained messages are queued at subscribe time, so they arrive before this marker.
        await client.publish("homeassistant/marker", b"end", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                if str(message.topic) == "homeassistant/marker":
                    return found
                assert message.retain
                assert isinstance(message.payload, bytes)
                found[str(message.topic)] = message.payload
    return found


async def test_retained_configs_reach_a_late_subscriber_and_removal_clears_them(
    broker: Broker,
) -> None:
    messages = discovery_messages(PREFIX, "room1", STATUS)
    async with asyncio.timeout(10), aiomqtt.Client("127.0.0.1", broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1, retain=True)
    found = await retained(broker, "homeassistant/#")
    assert found == dict(messages)
    assert json.loads(found[messages[0][0]])["availability"][0]["topic"] == STATUS

    async with asyncio.timeout(10), aiomqtt.Client("127.0.0.1", broker.port) as client:
        for topic, payload in removal_messages(PREFIX, "room1"):
            assert payload == b""
            await client.publish(topic, payload, qos=1, retain=True)
    assert await retained(broker, "homeassistant/#") == {}
