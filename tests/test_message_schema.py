"""docs/schema/*.schema.json, the TypedDicts of stream_ser.messages and the Literal kinds agree,
and the schema rejects what subscribers must never see."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, get_type_hints

import jsonschema
import numpy as np
import pytest

from stream_ser import kinds, messages
from stream_ser.events import Recognition
from stream_ser.fusion import FusionConfig
from stream_ser.messages import StreamInfo
from stream_ser.stages import UtteranceStages
from tests.schema import check_result, check_speaking, check_status, validator

LABELS = ("neutral", "happy", "sad", "angry")
STREAM = StreamInfo("room1", "abcd1234", "tiny", LABELS)


def final() -> dict[str, Any]:
    """A final result as the pipeline builds it (the specialist alone)."""
    recognition = Recognition("utterance", 3, 100, 2100, np.array([0.1, 0.6, 0.2, 0.1]), 12.5,
                              "silence")  # fmt: skip
    fused, extras = UtteranceStages(FusionConfig(LABELS)).final(
        STREAM, recognition.probabilities, None, {}
    )
    fused_result = replace(recognition, probabilities=fused)
    message = dict(messages.result_message(STREAM, fused_result, "final")) | extras
    return message | {"model_ms": 3.2, "lag_ms": 0}


def test_the_typed_dicts_list_every_schema_property() -> None:
    for name, typed in (("result", messages.ResultMessage), ("speaking", messages.SpeakingMessage),
                        ("status", messages.StatusMessage)):  # fmt: skip
        assert set(get_type_hints(typed)) == set(validator(name).schema["properties"]), name


def test_the_kinds_are_the_schema_enums() -> None:
    properties = validator("result").schema["properties"]
    assert kinds.values(kinds.Flag) == tuple(properties["flags"]["items"]["enum"])
    assert kinds.values(kinds.EndReason) == tuple(properties["end_reason"]["enum"])
    assert kinds.values(kinds.ResultType) == tuple(properties["type"]["enum"])
    fusion = properties["fusion"]["properties"]
    assert kinds.values(kinds.FusionRule) == tuple(fusion["rule"]["enum"])
    assert kinds.values(kinds.CueBaseline) == tuple(
        properties["descriptors"]["properties"]["baseline"]["enum"]
    )
    source = validator("result").schema["$defs"]["source"]["properties"]
    assert kinds.values(kinds.CueMode) == tuple(source["cue_mode"]["enum"])
    status = validator("status").schema["properties"]
    assert kinds.values(kinds.StatusState) == tuple(status["state"]["enum"])


def test_built_messages_follow_the_schema() -> None:
    check_result(final(), LABELS)
    window = Recognition("window", 3, 100, 2100, np.array([0.25] * 4), 1.0)
    check_result(dict(messages.result_message(STREAM, window, "window")), LABELS)
    check_speaking(dict(messages.speaking_message(STREAM, 3, True, 100)))
    check_status(dict(messages.status_message("online", ["room1"], {"utterances": 3},
                                              {"room1": {"utterances": 3}})))  # fmt: skip
    check_status(dict(messages.status_message("offline", [], {})))  # the last will


@pytest.mark.parametrize(
    "change",
    [
        {"flags": ["late"]},  # not a known flag
        {"final": True, "type": "window"},
        {"end_reason": "tired"},
        {"schema_version": 2},
        {"transcript": "hello"},  # a field the schema does not declare
        {"id": "abcd1234:room1:3:p"},  # a final's id ends in :f
        {"arousal": 1.5},
    ],
)
def test_the_schema_rejects_bad_results(change: dict[str, Any]) -> None:
    message = copy.deepcopy(final()) | change
    with pytest.raises(jsonschema.ValidationError):
        validator("result").validate(message)


def test_a_final_without_sources_is_rejected() -> None:
    message = final()
    del message["sources"]
    with pytest.raises(jsonschema.ValidationError):
        validator("result").validate(message)
