"""Home Assistant MQTT discovery configs: their keys, templates and a real broker round trip."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import soundfile

from stream_ser.discovery import (
    discovery_configs,
    discovery_messages,
    node_id,
    removal_messages,
)
from tests.conftest import REPO, Broker, run_cli

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


def test_local_streams_of_two_hosts_get_distinct_devices() -> None:
    assert node_id("stream-ser", "mic", "kitchen") != node_id("stream-ser", "mic", "attic")
    kitchen = discovery_configs("stream-ser", "mic", STATUS, host="kitchen")
    attic = discovery_configs("stream-ser", "mic", STATUS, host="attic")
    assert {t for t, _ in kitchen}.isdisjoint({t for t, _ in attic})
    assert {c["unique_id"] for _, c in kitchen}.isdisjoint({c["unique_id"] for _, c in attic})
    assert kitchen[0][1]["device"]["identifiers"] != attic[0][1]["device"]["identifiers"]


class State:
    """Stand-in for HA's `this` (the entity's current state object)."""

    state = "happy"
    attributes = {"happy": 0.7, "sad": 0.3}  # noqa: RUF012


def render(template: str, message: dict[str, Any]) -> str:
    """Render like HA does: Jinja2 sandbox, `value_json` and `this` in scope."""
    jinja2 = pytest.importorskip("jinja2.sandbox")
    environment = jinja2.ImmutableSandboxedEnvironment()
    rendered: str = environment.from_string(template).render(value_json=message, this=State())
    return rendered


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


async def retained_json(broker: Broker, topic_filter: str) -> dict[str, Any]:
    """Every retained message under `topic_filter`, decoded (empty payloads left out)."""
    marker = "ha-test/marker"
    found: dict[str, Any] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(topic_filter, qos=1)
        await client.subscribe(marker, qos=1)
        await client.publish(marker, b"end", qos=1)  # queued after the retained ones
        async with asyncio.timeout(10):
            async for message in client.messages:
                if str(message.topic) == marker:
                    return found
                assert isinstance(message.payload, bytes)
                if message.retain and message.payload:
                    found[str(message.topic)] = json.loads(message.payload)
    return found


def availability_topics(found: dict[str, Any]) -> set[str]:
    return {
        item["topic"]
        for topic, config in found.items()
        if topic.startswith("homeassistant/")
        for item in config["availability"]
    }


async def test_several_sources_announce_the_status_their_process_publishes(
    broker: Broker, tmp_path: Path, tiny_model: Path
) -> None:
    inputs = []
    for name in ("kitchen", "hall"):
        inputs += ["--input", str(tmp_path / f"{name}.wav")]
        soundfile.write(tmp_path / f"{name}.wav", np.zeros(8000, dtype=np.float32), 16000)
    done = await asyncio.to_thread(
        run_cli, "run", *inputs, "--mqtt", broker.url, "--ha-discovery", "--model",
        str(tiny_model), "--no-descriptors", "--mqtt-spool-dir", str(tmp_path), timeout_s=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = await retained_json(broker, "#")
    configs = {t: c for t, c in found.items() if t.startswith("homeassistant/")}
    assert len(configs) == 8  # four entities per stream
    (status_topic,) = availability_topics(found)
    assert found[status_topic]["state"] == "offline"  # the process's final status is there
    host = socket.gethostname()
    assert all(host in c["unique_id"] for c in configs.values())


async def test_a_worker_announces_the_remote_streams_it_claims(
    broker: Broker, tmp_path: Path, tiny_model: Path
) -> None:
    from tests.test_workers import PREFIX as FLEET
    from tests.test_workers import device

    worker = subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--mqtt-audio", "--mqtt", broker.url,
         "--mqtt-topic-prefix", FLEET, "--mqtt-client-id", "ha-worker", "--model",
         str(tiny_model), "--no-model-windows", "--no-descriptors", "--ha-discovery",
         "--mqtt-spool-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        tone = 0.3 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000).astype(np.float32)
        async with asyncio.timeout(60):
            found: dict[str, Any] = {}
            while not any("porch" in topic for topic in found):
                await device(broker, "porch", tone, speed=4.0)
                found = await retained_json(broker, "homeassistant/#")
        configs = [c for t, c in found.items() if "porch" in t]
        assert len(configs) == 4
        assert availability_topics(found) == {f"{FLEET}/status/ha-worker"}
        assert all(c["state_topic"].startswith(f"{FLEET}/porch/") for c in configs)
    finally:
        worker.terminate()
        _, errors = worker.communicate(timeout=30)
        assert worker.returncode == 0, errors.decode()
