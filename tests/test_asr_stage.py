"""The transcript stage (`--transcribe`) in the running pipeline: real Whisper on RAVDESS
statements end to end (with `--speakers`), and a slow fake transcriber that must never hold back
a provisional result (live) while a lossless file waits for it."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from stream_ser import cli
from stream_ser.asr import AsrUnavailableError, Transcript
from stream_ser.asr_options import AsrSettings, SpeakerSettings
from stream_ser.asr_stage import TranscriptSkipped, TranscriptStage
from stream_ser.errors import ConfigError
from stream_ser.fusion import FusionConfig
from stream_ser.recognizer import Recognizer
from stream_ser.settings import Settings, add_arguments, build_settings
from stream_ser.specialist import Specialist
from stream_ser.stages import FinalDraft, UtteranceStages
from tests.conftest import DATASETS, run_cli
from tests.pipelines import file_pipeline
from tests.schema import check_result, parse_lines

RAVDESS = DATASETS / "ravdess" / "audio"
KIDS = "Actor_18/03-01-05-02-01-01-18.flac"  # angry, strong, statement 1
DOGS = "Actor_19/03-01-03-01-02-02-19.flac"  # happy, normal, statement 2
STATEMENTS = ["kids are talking by the door", "dogs are sitting by the door"]


def _words(text: str) -> str:
    return " ".join(word.strip(".,!?").lower() for word in text.split())


@pytest.fixture
def two_statements(tmp_path: Path) -> Path:
    """The two RAVDESS statements, said by two actors, with 1.5 s of silence after each."""
    pieces = []
    for name in (KIDS, DOGS):
        if not (RAVDESS / name).is_file():
            pytest.skip(f"dataset not found: {RAVDESS / name}")
        audio, rate = soundfile.read(RAVDESS / name, dtype="float32")
        assert rate == 16000
        pieces += [audio, np.zeros(24000, dtype=np.float32)]
    path = tmp_path / "statements.wav"
    soundfile.write(path, np.concatenate(pieces), 16000)
    return path


@pytest.mark.slow
def test_run_transcribe_puts_each_statement_in_its_final_result(two_statements: Path) -> None:
    done = run_cli(
        "run", "--input", str(two_statements), "--transcribe", "--transcribe-words", "--speakers"
    )
    assert done.returncode == 0, done.stderr
    messages = parse_lines(done.stdout)
    for message in messages:
        check_result(message)  # docs/schema/result.schema.json, transcript included
    finals = [m for m in messages if m["final"]]
    assert [_words(m["transcript"]["text"]) for m in finals] == STATEMENTS
    assert [m["speaker"] for m in finals] == ["spk-1", "spk-2"]  # two actors, one each
    for final in finals:
        transcript = final["transcript"]
        assert transcript["language"] == "en" and -1.5 < transcript["avg_logprob"] <= 0
        assert "transcript_deadline" not in final["flags"]  # a file waits for every stage
        said = " ".join(_words(word["text"]) for word in transcript["words"])
        assert said == _words(transcript["text"])
        duration_ms = final["end_ms"] - final["start_ms"]
        for word in transcript["words"]:  # from the utterance's start
            assert 0 <= word["start_ms"] < word["end_ms"] <= duration_ms
    assert all("transcript" not in m for m in messages if not m["final"])  # windows, provisional
    provisional = [m for m in messages if m["type"] == "utterance" and not m["final"]]
    assert [m["speaker"] for m in provisional] == ["spk-1", "spk-2"]
    assert all("speaker" not in m for m in messages if m["type"] == "window")
    assert any(m["type"] == "window" for m in messages)


class SlowTranscriber:
    """A fake transcriber: speech blocks until `release` is set (silence, the warm-up, not)."""

    def __init__(self, delay_s: float | None = None) -> None:
        self.delay_s = delay_s  # None: wait for `release`
        self.release = threading.Event()
        self.answered = 0
        self.words_asked: list[bool] = []

    def transcribe(self, audio: np.ndarray, words: bool = False) -> Transcript:
        if audio.any():
            if self.delay_s is None:
                self.release.wait(30)
            else:
                time.sleep(self.delay_s)
            self.answered += 1
            self.words_asked.append(words)
        return Transcript(f"{audio.shape[0]} samples", "en", -0.25)


class Sink:
    """Keeps every result, with how many transcripts had been answered when it came."""

    def __init__(self, transcriber: SlowTranscriber) -> None:
        self.transcriber = transcriber
        self.results: list[tuple[dict[str, Any], int]] = []

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        self.results.append((message, self.transcriber.answered))

    async def speaking(self, stream_id: str, message: dict[str, Any]) -> None:
        pass


async def _run(
    path: Path, model: Path, transcriber: SlowTranscriber, lossless: bool, deadline_ms: int
) -> list[tuple[dict[str, Any], int]]:
    specialist = Specialist(model)
    stage = TranscriptStage(transcriber, words=True)
    stages = UtteranceStages(FusionConfig(specialist.labels, deadline_ms=deadline_ms), [stage])
    sink = Sink(transcriber)
    async with Recognizer(specialist) as recognizer, stage:
        stream = file_pipeline(
            path, recognizer, sink, stages, lossless=lossless, deadline_ms=deadline_ms
        )
        try:
            await asyncio.wait_for(stream.run(asyncio.Event()), 60)
        finally:
            transcriber.release.set()  # the worker's close waits for the call in progress
    return sink.results


async def test_a_slow_transcriber_never_delays_the_provisional_result(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    transcriber = SlowTranscriber()  # answers nothing until the run is over
    results = await _run(path, tiny_model, transcriber, lossless=False, deadline_ms=300)
    provisional = [(m, n) for m, n in results if m["type"] == "utterance" and not m["final"]]
    finals = [m for m, _ in results if m["final"]]
    assert len(provisional) == len(finals) == clip_count
    for message, answered in provisional:
        assert answered == 0  # published while the transcriber still held the first utterance
        assert message["latency_ms"] < 1000  # the specialist's time, not the transcriber's
        check_result(message)
    for final in finals:
        check_result(final)
        assert "transcript" not in final
        assert final["flags"] == ["transcript_deadline"]
        assert final["latency_ms"] >= 300  # it waited for the deadline, no longer needed


async def test_a_lossless_file_waits_for_the_transcript(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    transcriber = SlowTranscriber(delay_s=0.3)
    results = await _run(path, tiny_model, transcriber, lossless=True, deadline_ms=100)
    finals = [m for m, _ in results if m["final"]]
    assert len(finals) == clip_count
    for final in finals:
        check_result(final)
        assert final["flags"] == []
        samples = round((final["end_ms"] - final["start_ms"]) * 16)
        assert final["transcript"]["text"] == f"{samples} samples"  # this utterance's audio
        assert final["latency_ms"] >= 300
    assert transcriber.words_asked == [True] * clip_count


def test_flags_say_why_a_final_has_no_transcript() -> None:
    stage = TranscriptStage(SlowTranscriber())
    drafts = [FinalDraft(True) for _ in range(4)]
    outcomes = [Transcript("hi", "en", -0.1), TranscriptSkipped("behind"), RuntimeError("x"), None]
    for draft, outcome in zip(drafts, outcomes, strict=True):
        stage.add_to_final(outcome, draft)
    assert drafts[0].fields == {"transcript": {"text": "hi", "language": "en", "avg_logprob": -0.1}}
    assert [d.flags for d in drafts] == [
        [], ["transcript_skipped"], ["transcript_failed"], ["transcript_deadline"]
    ]  # fmt: skip


def test_run_without_the_asr_extra_fails_at_start_up(two_statements: Path) -> None:
    # a separate process: `run` configures logging for the whole process
    code = (
        "import sys; sys.modules['faster_whisper'] = None; from stream_ser import cli; "
        f"sys.exit(cli.main(['run', '--input', {str(two_statements)!r}, '--transcribe']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "transcripts need faster-whisper: pip install 'stream-ser[asr]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert issubclass(AsrUnavailableError, ImportError)


def test_asr_and_speaker_settings_come_from_flags_and_the_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text("[asr]\ntranscribe = true\nthreads = 2\n[speakers]\nmax_speakers = 3\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(config), "--transcribe-words", "--speakers"])
    settings = build_settings(args)
    assert settings.asr == AsrSettings(transcribe=True, words=True, threads=2)
    assert settings.speakers == SpeakerSettings(enabled=True, max_speakers=3)
    with pytest.raises(ConfigError, match=r"--max-speakers must be 1\.\.64"):
        build_settings(parser.parse_args(["--max-speakers", "0"]))


def test_asr_and_speaker_settings_without_their_switch_are_warned_about() -> None:
    idle = Settings(asr=AsrSettings(words=True), speakers=SpeakerSettings(max_speakers=3))
    assert cli.ineffective_settings(idle) == [
        "--asr-*/--transcribe-words do nothing without --transcribe: ignored",
        "--max-speakers/--speakers-* do nothing without --speakers: ignored",
    ]
    used = Settings(
        asr=AsrSettings(transcribe=True, words=True),
        speakers=SpeakerSettings(enabled=True, max_speakers=3),
    )
    assert cli.ineffective_settings(used) == []
