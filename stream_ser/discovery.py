"""Home Assistant MQTT discovery: each stream appears as one device with four entities.

Published retained (QoS 1) under `{discovery_prefix}/{component}/{node_id}/{object_id}/config`:

    sensor          emotion   top label of the latest final utterance result; the full
                              distribution as attributes
    sensor          arousal   expected arousal of the latest final utterance, -1..1
    sensor          valence   expected valence of the latest final utterance, -1..1
    binary_sensor   speaking  from the retained `{prefix}/{stream_id}/speaking` JSON (`speaking`)

A local stream's node id names the host (`{prefix}_{host}_{stream_id}`); a remote stream
(announced by the worker that claims it) is `{prefix}_{stream_id}`, its id being unique on
the broker already.

Every entity is available while the retained status of the publishing process says `online`
(the status is JSON; the availability template reads its `state`), so a crash or a clean exit
(last will or final status `offline`) greys them out. Templates ignore messages without the
value they read (a provisional result, or a model without arousal/valence): the entity keeps
its state and attributes instead of going `unknown`.

Payloads use Home Assistant's full key names (no abbreviations), documented at
https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from stream_ser import __version__

DISCOVERY_PREFIX = "homeassistant"
DISCOVERY_QOS = 1  # configs are published retained, so a late Home Assistant still finds them
AROUSAL_VALENCE_KEY = "arousal_valence"  # an object form, read when there are no top-level ones
_SAFE_ID = re.compile(r"[^a-zA-Z0-9_-]")

# HA renders MQTT templates with `this`, the entity's current state object.
_KEEP_STATE = "{{ this.state }}"
_IS_FINAL = "value_json.get('final', true) is not false"


def node_id(prefix: str, stream_id: str, host: str | None = None) -> str:
    """A discovery node id for one stream: only `[a-zA-Z0-9_-]`, stable, collision-free.

    `host` names the machine of a local stream (two hosts may both have a `mic`); a remote
    stream's id is already unique on the broker (its audio topic). Characters HA does not
    allow become `_`; if any did, a short hash of the original keeps `a.b` and `a_b` apart.
    """
    raw = f"{prefix}_{host}_{stream_id}" if host else f"{prefix}_{stream_id}"
    safe = _SAFE_ID.sub("_", raw)
    if safe != raw:
        safe += "_" + hashlib.sha256(raw.encode()).hexdigest()[:6]
    return safe


def status_availability(status_topic: str) -> list[dict[str, str]]:
    """HA availability reading `state` (online/offline) from the JSON status topic."""
    return [
        {
            "topic": status_topic,
            "value_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]


def emotion_template() -> str:
    """Top label of a final utterance result; other messages keep the state."""
    return (
        f"{{% if {_IS_FINAL} and value_json.top_label is defined %}}"
        f"{{{{ value_json.top_label }}}}{{% else %}}{_KEEP_STATE}{{% endif %}}"
    )


def affect_template(axis: str) -> str:
    """`arousal` or `valence` of a final result: the top-level number of that name (or, in
    an `arousal_valence` object, the key of that name).

    Other messages render empty, which a numeric HA sensor ignores (it keeps its state).
    """
    return (
        f"{{% set av = value_json.get('{AROUSAL_VALENCE_KEY}') %}}"
        f"{{% set x = value_json.get('{axis}') %}}"
        f"{{% set x = x if x is number else (av.get('{axis}') if av is mapping else none) %}}"
        f"{{% if {_IS_FINAL} and x is number %}}{{{{ x | round(3) }}}}{{% endif %}}"
    )


def distribution_template() -> str:
    """The distribution of a final result as entity attributes; other messages keep them."""
    return (
        f"{{% if {_IS_FINAL} and value_json.distribution is mapping %}}"
        "{{ value_json.distribution | tojson }}{% else %}{{ this.attributes | tojson }}{% endif %}"
    )


def device_block(
    prefix: str, stream_id: str, device_name: str | None = None, host: str | None = None
) -> dict[str, Any]:
    """The HA device all of a stream's entities belong to."""
    return {
        "identifiers": [node_id(prefix, stream_id, host)],
        "name": device_name or f"stream-ser {stream_id}" + (f" on {host}" if host else ""),
        "manufacturer": "stream-ser",
        "model": "speech emotion recognition",
        "sw_version": __version__,
    }


def discovery_configs(
    prefix: str,
    stream_id: str,
    status_topic: str,
    discovery_prefix: str = DISCOVERY_PREFIX,
    device_name: str | None = None,
    host: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(discovery topic, config) for each entity of one stream, before encoding."""
    node = node_id(prefix, stream_id, host)
    results = f"{prefix}/{stream_id}/utterance"
    common: dict[str, Any] = {
        "availability": status_availability(status_topic),
        "availability_mode": "latest",
        "device": device_block(prefix, stream_id, device_name, host),
        "origin": {"name": "stream-ser", "sw_version": __version__},
        "qos": 1,
    }
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "emotion", {
            "name": "Emotion",
            "icon": "mdi:emoticon-outline",
            "state_topic": results,
            "value_template": emotion_template(),
            "json_attributes_topic": results,
            "json_attributes_template": distribution_template(),
        }),
        ("sensor", "arousal", {
            "name": "Arousal",
            "icon": "mdi:lightning-bolt-outline",
            "state_topic": results,
            "value_template": affect_template("arousal"),
            "state_class": "measurement",
            "suggested_display_precision": 2,
        }),
        ("sensor", "valence", {
            "name": "Valence",
            "icon": "mdi:emoticon-happy-outline",
            "state_topic": results,
            "value_template": affect_template("valence"),
            "state_class": "measurement",
            "suggested_display_precision": 2,
        }),
        ("binary_sensor", "speaking", {
            "name": "Speaking",
            "device_class": "sound",
            "state_topic": f"{prefix}/{stream_id}/speaking",
            "value_template": "{{ 'ON' if value_json.speaking else 'OFF' }}",
            "payload_on": "ON",
            "payload_off": "OFF",
        }),
    ]  # fmt: skip
    return [
        (
            f"{discovery_prefix}/{component}/{node}/{object_id}/config",
            {**entity, "unique_id": f"{node}_{object_id}", **common},
        )
        for component, object_id, entity in entities
    ]


def discovery_messages(
    prefix: str,
    stream_id: str,
    status_topic: str,
    discovery_prefix: str = DISCOVERY_PREFIX,
    device_name: str | None = None,
    host: str | None = None,
) -> list[tuple[str, bytes]]:
    """(topic, payload) of each retained discovery config of one stream (publish QoS 1)."""
    configs = discovery_configs(
        prefix, stream_id, status_topic, discovery_prefix, device_name, host
    )
    return [(topic, json.dumps(config).encode()) for topic, config in configs]


def removal_messages(
    prefix: str, stream_id: str, discovery_prefix: str = DISCOVERY_PREFIX, host: str | None = None
) -> list[tuple[str, bytes]]:
    """Empty retained payloads that remove a stream's entities from HA and the broker."""
    configs = discovery_configs(prefix, stream_id, "", discovery_prefix, host=host)
    return [(topic, b"") for topic, _ in configs]
