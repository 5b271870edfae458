"""The voice detectors behind the segmenter: webrtcvad and Silero (real ONNX session)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile

from stream_ser.errors import ConfigError
from stream_ser.events import AudioChunk, UtteranceEnd
from stream_ser.settings import VadSettings, add_arguments, build_settings
from stream_ser.vad import Segmenter
from stream_ser.vad_backends import SileroVad, WebRtcVad, make_detector, silero_session
from tests.conftest import REPO, SAMPLE, run_cli
from tests.schema import parse_lines
from tests.signals import buzz, noise, silence

# samples/speech.flac: three passages; the third holds a 480 ms digital-silence sentence pause
# ("I miss the old days. | Nothing feels ...") from 15.68 s to 16.16 s.
PASSAGES_MS = [(310, 5080), (6410, 12520), (13890, 18610)]
PAUSE_MS = (15640, 16180)


def spans(audio: np.ndarray, settings: VadSettings, chunk: int = 1600) -> list[tuple[int, int]]:
    segmenter = Segmenter(settings)
    events = []
    for offset in range(0, len(audio), chunk):
        events += segmenter.process(AudioChunk(audio[offset : offset + chunk], offset // 16))
    events += segmenter.flush()
    return [(e.start_ms, e.end_ms) for e in events if isinstance(e, UtteranceEnd)]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def sample() -> np.ndarray:
    audio, rate = soundfile.read(SAMPLE, dtype="float32")
    assert rate == 16000
    return np.asarray(audio)


def speech_bounds_ms(audio: np.ndarray) -> tuple[int, int]:
    """First and last 10 ms frame whose RMS is within 35 dB of the clip's loudest frame."""
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    level_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.flatnonzero(level_db > level_db.max() - 35)
    return int(loud[0]) * 10, int(loud[-1]) * 10 + 10


class LevelDetector:
    """A fake detector with an odd frame size: voiced when the frame's RMS exceeds 0.01."""

    frame_samples = 400  # 25 ms: no real backend uses it

    def __init__(self) -> None:
        self.frames_seen = 0

    def classify(self, frames: np.ndarray) -> list[bool]:
        self.frames_seen += len(frames)
        return [bool(np.sqrt(np.mean(frame**2)) > 0.01) for frame in frames]

    def reset(self) -> None:
        self.frames_seen = 0


def test_segmenter_uses_the_injected_detector_and_its_frame_size() -> None:
    detector = LevelDetector()
    segmenter = Segmenter(VadSettings(), detector)
    audio = np.concatenate([silence(1), noise(1, level=0.1), silence(1)])
    events = segmenter.process(AudioChunk(audio, 0)) + segmenter.flush()
    ends = [e for e in events if isinstance(e, UtteranceEnd)]
    assert detector.frames_seen == len(audio) // 400
    assert len(ends) == 1
    # onset after 4 voiced frames (100 ms >= 90 ms), pre-roll of 12 frames (300 ms)
    assert 800 <= ends[0].start_ms <= 1000
    assert ends[0].end_ms == 2000  # trimmed to the last voiced 25 ms frame
    assert len(ends[0].samples) == (ends[0].end_ms - ends[0].start_ms) * 16


def test_silero_model_has_the_inputs_we_feed() -> None:
    session = silero_session()
    inputs = {item.name: item.shape for item in session.get_inputs()}
    assert set(inputs) == {"input", "state", "sr"}
    assert inputs["state"][0] == 2 and inputs["state"][2] == 128
    assert session is silero_session()  # loaded once per process


def test_make_detector_follows_the_backend_setting() -> None:
    assert isinstance(make_detector(VadSettings()), WebRtcVad)
    assert make_detector(VadSettings(frame_ms=10)).frame_samples == 160
    silero = make_detector(VadSettings(backend="silero"))
    assert isinstance(silero, SileroVad)
    assert silero.frame_samples == 512


def test_silero_segments_the_speech_sample_at_its_passages_and_pause() -> None:
    found = spans(sample(), VadSettings(backend="silero"))
    # the 480 ms sentence pause plus the frame after it reach the 500 ms hangover
    expected = [PASSAGES_MS[0], PASSAGES_MS[1], (PASSAGES_MS[2][0], PAUSE_MS[0]),
                (PAUSE_MS[1], PASSAGES_MS[2][1])]  # fmt: skip
    assert len(found) == len(expected)
    for (start, end), (speech_start, speech_end) in zip(found, expected, strict=True):
        # pre-roll (288 ms) before the onset; right after a split the pre-roll is empty and
        # the frame that ended the hangover (up to 32 ms, holding the new onset) is not in it
        assert speech_start - 330 <= start <= speech_start + 32
        assert speech_end <= end <= speech_end + 100


def test_silero_with_a_longer_hangover_gives_the_three_passages() -> None:
    found = spans(sample(), VadSettings(backend="silero", hangover_ms=600))
    assert len(found) == 3
    for (start, end), (speech_start, speech_end) in zip(found, PASSAGES_MS, strict=True):
        assert speech_start - 330 <= start <= speech_start
        assert speech_end <= end <= speech_end + 100


def test_webrtc_bridges_the_pause_and_gives_the_three_passages() -> None:
    found = spans(sample(), VadSettings())
    assert len(found) == 3
    for (start, end), (speech_start, speech_end) in zip(found, PASSAGES_MS, strict=True):
        assert speech_start - 330 <= start <= speech_start
        assert speech_end <= end <= speech_end + 250


@pytest.mark.parametrize("backend", ["webrtc", "silero"])
def test_real_speech_clip_is_one_utterance(backend: str, ravdess_clips: list[Path]) -> None:
    for clip in ravdess_clips[:3]:
        audio, _ = soundfile.read(clip, dtype="float32")
        speech_start, speech_end = speech_bounds_ms(audio)
        found = spans(np.concatenate([audio, silence(1)]), VadSettings(backend=backend))
        assert len(found) == 1, clip.name
        start, end = found[0]
        assert speech_start - 400 <= start <= speech_start + 100
        assert speech_end - 300 <= end <= speech_end + 300


def test_silero_ignores_noise_and_buzz_that_webrtc_takes_for_speech() -> None:
    audio = np.concatenate([silence(1), noise(1), silence(1), buzz(1.5), silence(1)])
    assert len(spans(audio, VadSettings())) == 2
    assert spans(audio, VadSettings(backend="silero")) == []
    assert spans(silence(5), VadSettings(backend="silero")) == []


def test_silero_chunk_size_does_not_change_the_result() -> None:
    audio = sample()[: 16000 * 13]
    reference = spans(audio, VadSettings(backend="silero"))
    assert len(reference) == 2
    for chunk in (160, 777, len(audio)):
        assert spans(audio, VadSettings(backend="silero"), chunk=chunk) == reference


def test_silero_reset_forgets_context_and_state() -> None:
    frames = sample()[16000 : 16000 + 512 * 10].reshape(10, 512)
    detector = SileroVad()
    first = [detector.probability(frame) for frame in frames]
    assert max(first) > 0.5  # it does hear the speech
    detector.reset()
    assert [detector.probability(frame) for frame in frames] == first


class ScriptedSession:
    """Stands in for the onnxruntime session: returns the given probabilities in turn."""

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = probabilities
        self.inputs: list[np.ndarray] = []

    def run(self, _outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.inputs.append(feeds["input"].copy())
        probability = self.probabilities[len(self.inputs) - 1]
        return [np.array([[probability]], np.float32), feeds["state"] + 1]


def test_silero_hysteresis_keeps_a_run_voiced_down_to_threshold_minus_0_15() -> None:
    session = ScriptedSession([0.4, 0.5, 0.4, 0.36, 0.34, 0.4])
    detector = SileroVad(threshold=0.5, session=session)
    frames = np.arange(6 * 512, dtype=np.float32).reshape(6, 512)
    assert detector.classify(frames) == [False, True, True, True, False, False]
    # each input is the previous frame's last 64 samples, then the frame itself
    assert session.inputs[0].shape == (1, 576)
    np.testing.assert_array_equal(session.inputs[0][0, :64], np.zeros(64))
    np.testing.assert_array_equal(session.inputs[3][0, :64], frames[2, -64:])
    np.testing.assert_array_equal(session.inputs[3][0, 64:], frames[3])


def test_silero_runs_without_torch() -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from stream_ser.settings import VadSettings
        from stream_ser.vad import Segmenter
        from stream_ser.events import AudioChunk
        segmenter = Segmenter(VadSettings(backend="silero"))
        segmenter.process(AudioChunk(np.zeros(16000, np.float32), 0))
        assert segmenter.detector.frame_samples == 512
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vad", "rnnoise"], "--vad must be webrtc or silero"),
        (["--vad", "silero", "--vad-threshold", "1.5"], "--vad-threshold"),
        (["--vad-threshold", "0.1"], "--vad-threshold"),
    ],
)
def test_bad_vad_backend_settings_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings(parse(*argv))


def test_vad_backend_from_toml_and_flag(tmp_path: Path) -> None:
    config = tmp_path / "vad.toml"
    config.write_text('[vad]\nbackend = "silero"\nthreshold = 0.6\n')
    settings = build_settings(parse("--config", str(config)))
    assert (settings.vad.backend, settings.vad.threshold) == ("silero", 0.6)
    assert build_settings(parse("--config", str(config), "--vad", "webrtc")).vad.backend == "webrtc"
    assert build_settings(parse()).vad.backend == "webrtc"


def test_cli_rejects_an_unknown_backend_in_one_line() -> None:
    done = run_cli("run", "--input", "x.wav", "--vad", "rnnoise")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["stream-ser: error: --vad must be webrtc or silero"]


@pytest.mark.slow
def test_cli_run_with_silero_gives_the_three_passages(tiny_model: Path) -> None:
    done = run_cli(
        "run", "--input", str(SAMPLE), "--model", str(tiny_model), "--no-model-windows",
        "--vad", "silero", "--vad-hangover-ms", "600",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    finals = [m for m in parse_lines(done.stdout) if m["type"] == "utterance" and m["final"]]
    assert [m["utterance_id"] for m in finals] == [1, 2, 3]
    for message, (speech_start, speech_end) in zip(finals, PASSAGES_MS, strict=True):
        assert speech_start - 330 <= message["start_ms"] <= speech_start
        assert speech_end <= message["end_ms"] <= speech_end + 100
