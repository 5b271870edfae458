"""Voice detectors behind one protocol: webrtcvad and Silero (ONNX on onnxruntime, no torch).

A detector classifies whole frames of 16 kHz float32 audio in [-1, 1] as voiced or not, in
stream order, and keeps whatever state it needs between calls (`reset` forgets it). The
segmenter (vad.py) owns everything else: onset, hangover, pre-roll, min/max length.

Silero v5/v6 at 16 kHz reads 512-sample frames (32 ms) preceded by the last 64 samples of
the previous frame (its context), and carries a recurrent state of shape [2, 1, 128]. A frame
is voiced when its speech probability reaches `threshold`; once voiced, frames stay voiced
until the probability falls below `threshold - 0.15` (the hysteresis of Silero's own
`get_speech_timestamps`). The bundled model is `silero_vad_16k_op15.onnx` from the MIT
`silero-vad` 6.2.3 wheel (licence in stream_ser/data/silero_vad.LICENSE).
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any, Protocol

import numpy as np
import webrtcvad

from stream_ser import SAMPLE_RATE
from stream_ser.errors import ModelError
from stream_ser.settings import VadSettings

SILERO_FRAME_SAMPLES = 512  # 32 ms at 16 kHz: the only frame size the 16 kHz model reads
SILERO_CONTEXT_SAMPLES = 64  # tail of the previous frame the model sees before each frame
SILERO_HYSTERESIS = 0.15  # a voiced run ends below threshold - this
SILERO_MODEL = "silero_vad_16k_op15.onnx"


class VoiceDetector(Protocol):
    """Classifies fixed-size frames as speech or not; stateful, synchronous, not thread-safe."""

    @property
    def frame_samples(self) -> int:
        """Samples per frame at 16 kHz."""
        ...

    def classify(self, frames: np.ndarray) -> list[bool]:
        """Frames [n, frame_samples] float32 in stream order -> one voiced flag per frame."""
        ...

    def reset(self) -> None:
        """Forget the state carried between frames (start of a new, unrelated stream)."""
        ...


class WebRtcVad:
    """webrtcvad (GMM, 10/20/30 ms frames); stateless between frames as far as we see it."""

    def __init__(self, frame_ms: int, aggressiveness: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self._aggressiveness = aggressiveness
        self._frame_samples = SAMPLE_RATE * frame_ms // 1000

    @property
    def frame_samples(self) -> int:
        """Samples per frame at 16 kHz."""
        return self._frame_samples

    def classify(self, frames: np.ndarray) -> list[bool]:
        """One 16-bit PCM conversion for all frames, then one webrtcvad call per frame."""
        pcm = _to_pcm16(frames)  # one conversion per call, not one per frame
        size = 2 * self._frame_samples
        return [
            bool(self._vad.is_speech(pcm[offset : offset + size], SAMPLE_RATE))
            for offset in range(0, len(pcm), size)
        ]

    def reset(self) -> None:
        """A fresh webrtcvad instance."""
        self._vad = webrtcvad.Vad(self._aggressiveness)


class SileroVad:
    """Silero VAD v5/v6 (16 kHz ONNX) with its context and recurrent state, on onnxruntime."""

    def __init__(self, threshold: float = 0.5, session: Any = None) -> None:
        self._session = session if session is not None else silero_session()
        self._threshold = threshold
        self._sample_rate = np.array(SAMPLE_RATE, dtype=np.int64)
        self._input = np.zeros((1, SILERO_CONTEXT_SAMPLES + SILERO_FRAME_SAMPLES), np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._voiced = False

    @property
    def frame_samples(self) -> int:
        """Samples per frame at 16 kHz (512, fixed by the model)."""
        return SILERO_FRAME_SAMPLES

    def classify(self, frames: np.ndarray) -> list[bool]:
        """Voiced flag per frame: probability against the threshold, with hysteresis."""
        return [self._flag(self.probability(frame)) for frame in frames]

    def probability(self, frame: np.ndarray) -> float:
        """Speech probability of the next 512-sample frame; advances context and state."""
        self._input[0, :SILERO_CONTEXT_SAMPLES] = self._input[0, -SILERO_CONTEXT_SAMPLES:]
        self._input[0, SILERO_CONTEXT_SAMPLES:] = frame
        try:
            output, self._state = self._session.run(
                None, {"input": self._input, "state": self._state, "sr": self._sample_rate}
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"Silero VAD inference failed: {err}") from err
        return float(output[0, 0])

    def reset(self) -> None:
        """Zero context, recurrent state and the voiced run."""
        self._input[:] = 0.0
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._voiced = False

    def _flag(self, probability: float) -> bool:
        floor = self._threshold - SILERO_HYSTERESIS if self._voiced else self._threshold
        self._voiced = probability >= floor
        return self._voiced


@functools.cache
def silero_session() -> Any:
    """The bundled Silero model's onnxruntime session, loaded once per process (1 thread)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ModelError(
            "onnxruntime is not installed (needed by --vad silero): pip install 'stream-ser[cpu]'"
        ) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = importlib.resources.files("stream_ser") / "data" / SILERO_MODEL
    try:
        return ort.InferenceSession(
            model.read_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except OSError as err:
        raise ModelError(f"the bundled Silero VAD model {SILERO_MODEL} is missing: {err}") from err
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise ModelError(f"cannot load the Silero VAD model {SILERO_MODEL}: {err}") from err


def make_detector(settings: VadSettings) -> VoiceDetector:
    """The detector `settings.backend` names, configured from the same settings."""
    if settings.backend == "silero":
        return SileroVad(settings.threshold)
    return WebRtcVad(settings.frame_ms, settings.aggressiveness)


def _to_pcm16(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] as the little-endian 16-bit PCM webrtcvad reads."""
    pcm: bytes = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    return pcm
