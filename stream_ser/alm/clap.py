"""Dual-encoder ALM backend (CLAP): zero-shot scores from audio and text embeddings.

Class descriptions ("a {label} speaker", several templates per label, from the templates file)
are embedded once at load. Each utterance is resampled to the model's rate (48 kHz for the LAION
models) and cut into consecutive windows of the feature extractor's length (10 s), so nothing is
cropped at random (`rand_trunc`) and the fusion path's random `is_longer` never applies; the
window embeddings are averaged.

Audio amplification (`audio_repeats = k`) gives a dual encoder k distinct views of the utterance:
view i is the waveform rotated circularly by i/k of its length (its start moved to the end), cut
into windows as above; the k view embeddings are averaged before the cosine. Tiling the waveform
instead would be a no-op: the feature extractor repeat-pads a short clip to its window anyway, so
k copies give bit-identical input whenever they fit it. Rotated views repeat-pad differently
(the window's content shifts), so k changes the embedding for any utterance. Text amplification
repeats each class description. Per template the scaled cosine similarities are softmaxed over
labels; the distribution is the mean over templates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.acoustics import CueTokens
from stream_ser.alm.base import (
    AlmOptions,
    as_distributions,
    check_batch,
    check_labels,
    import_torch_stack,
    local_or_hub,
    set_threads,
    softmax_rows,
    template_means,
    torch_dtype,
    torch_guard,
)
from stream_ser.alm.prompts import class_texts, load_clap
from stream_ser.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


class ClapBackend:
    """CLAP zero-shot classification over the label descriptions."""

    kind = "clap"

    def __init__(self, path: str, labels: Sequence[str], options: AlmOptions) -> None:
        if options.cues != "none":
            raise ConfigError(
                "alm: cue tokens need a generative backend (qwen2-audio, openai); "
                "clap has no per-utterance text prompt - use cues = 'none'"
            )
        if options.scoring != "logits":
            raise ConfigError(
                "alm: scoring 'text' needs a generative backend (qwen2-audio, openai)"
            )
        self._torch, transformers = import_torch_stack()
        self.spec = f"{self.kind}:{path}"
        self.labels = check_labels(labels)
        self.options = options
        self.prompts = load_clap(options.prompts, options.prompt_set)
        set_threads(options)
        self._device = self._torch.device(options.device)
        self._processor, self._model = _load(transformers, path, options)
        self._model.to(self._device)
        extractor = self._processor.feature_extractor
        self._sample_rate = int(extractor.sampling_rate)
        self._window = int(extractor.nb_max_samples)
        self._scale = float(self._model.logit_scale_a.exp().item())
        self._text = self._embed_texts()

    def predict(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[dict[str, float]]:
        """One distribution per utterance (cues are not used by a dual encoder)."""
        return template_means(self.labels, self.predict_templates(batch, cues))

    def predict_templates(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[list[dict[str, float]]]:
        """Per utterance, the distribution of each class-description template."""
        clips = check_batch(batch)
        windows, owner = [], []
        for index, clip in enumerate(clips):
            for view in self._views(clip):
                parts = self._windows(view)
                windows.extend(parts)
                owner.extend([index] * len(parts))
        embedded = self._embed_audio(windows)
        owners = np.array(owner)
        audio = np.stack(
            [_unit(self._pooled_views(embedded, owners == i)) for i in range(len(clips))]
        )
        logits = self._scale * np.einsum("bd,tld->btl", audio, self._text)
        return [as_distributions(self.labels, row) for row in softmax_rows(logits)]

    def template_names(self) -> list[str]:
        """The class-description templates."""
        return list(self.prompts.templates)

    def explain(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str]:
        """A dual encoder cannot generate text: the rationale lists the top labels."""
        return [
            "clap similarity ranking: "
            + ", ".join(
                f"{label} {p:.2f}" for label, p in sorted(d.items(), key=lambda kv: -kv[1])[:3]
            )
            for d in self.predict(batch)
        ]

    def cue_phrases(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str | None]:
        """CLAP takes no cues."""
        return [None] * len(batch)

    def _views(self, clip: np.ndarray) -> list[np.ndarray]:
        """The k = audio_repeats views of a 16 kHz clip: rotated circularly by i/k."""
        k = self.options.audio_repeats
        return [np.roll(clip, -((i * clip.shape[0]) // k)) for i in range(k)]

    def _pooled_views(self, embedded: np.ndarray, mine: np.ndarray) -> np.ndarray:
        """One utterance's embedding: the mean over its views' windows (every view of a clip
        has the same number of windows, so this is the mean of the per-view means)."""
        return embedded[mine].mean(axis=0)  # type: ignore[no-any-return]

    def _windows(self, clip: np.ndarray) -> list[np.ndarray]:
        """A 16 kHz clip at the model's rate, in consecutive windows of the extractor's length."""
        if self._sample_rate != SAMPLE_RATE:
            import soxr

            clip = soxr.resample(clip, SAMPLE_RATE, self._sample_rate).astype(np.float32)
        return [
            clip[start : start + self._window] for start in range(0, clip.shape[0], self._window)
        ]

    def _embed_audio(self, windows: list[np.ndarray]) -> np.ndarray:
        features = self._processor.feature_extractor(
            windows, sampling_rate=self._sample_rate, return_tensors="pt"
        )
        # Every window fits the extractor's length: nothing is "longer", no random fusion pick.
        is_longer = self._torch.zeros_like(features["is_longer"])
        with self._guard():
            output = self._model.get_audio_features(
                input_features=features["input_features"].to(self._device, self._model.dtype),
                is_longer=is_longer.to(self._device),
            )
            return _rows_unit(_pooled(output).float().cpu().numpy().astype(np.float64))

    def _embed_texts(self) -> np.ndarray:
        """(templates, labels, dim) unit text embeddings."""
        texts = class_texts(self.prompts, self.labels, self.options.text_repeats)
        flat = [text for row in texts for text in row]
        tokens = self._processor.tokenizer(flat, padding=True, truncation=True, return_tensors="pt")
        with self._guard():
            output = self._model.get_text_features(**tokens.to(self._device))
            embedded = _rows_unit(_pooled(output).float().cpu().numpy().astype(np.float64))
        return embedded.reshape(len(texts), len(self.labels), -1)

    def _guard(self) -> AbstractContextManager[None]:
        return torch_guard(self._torch, self._device, self.spec)


def _pooled(output: Any) -> Any:
    """transformers 5 returns an output object (pooler_output); 4.x a tensor."""
    return getattr(output, "pooler_output", output)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _rows_unit(rows: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return rows / norms  # type: ignore[no-any-return]


def _load(transformers: Any, path: str, options: AlmOptions) -> tuple[Any, Any]:
    source, offline = local_or_hub(path)
    try:
        processor = transformers.ClapProcessor.from_pretrained(source, local_files_only=offline)
        model = transformers.ClapModel.from_pretrained(
            source, local_files_only=offline, dtype=torch_dtype(options.dtype)
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"alm: cannot load CLAP from {path}: {err}") from err
    return processor, model.eval()
