"""Generative ALM backend (Qwen2-Audio): a zero-shot distribution from token-level logits.

For each utterance and each question template, the chat prompt holds the audio (`audio_repeats`
times), the question listing the labels (`text_repeats` times) and optionally the acoustic cue
sentence; one forward pass gives the next-token logits, mapped to labels by `labels.py`. Generated
text is never parsed for the distribution (the optional rationale is generated separately), except
with scoring "text", the text-level baseline, where the model writes a distribution
(`text_scoring.py`).

Audio longer than the feature extractor's window (30 s for Qwen2-Audio) is cut into consecutive
windows, each an audio entry in the prompt, so the whole utterance is heard. Sequences are
left-padded and get explicit position ids, so a batch gives what one-by-one runs give.

Other chat ALMs with the same processor conventions (chat template with {"type": "audio"}
entries, `audio=` keyword, causal-LM logits) can reuse this class through `model_class`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.acoustics import CueTokens
from stream_ser.alm import labels as label_rules
from stream_ser.alm import text_scoring
from stream_ser.alm.base import (
    AlmOptions,
    check_batch,
    check_labels,
    import_torch_stack,
    local_or_hub,
    per_template,
    resolve_cues,
    set_threads,
    softmax_rows,
    template_means,
    torch_dtype,
    torch_guard,
    warn_cue_collisions,
)
from stream_ser.alm.prompts import cue_sentence, load_generative, question_text
from stream_ser.errors import ModelError

log = logging.getLogger(__name__)


class Qwen2AudioBackend:
    """Qwen2-Audio (or a compatible chat ALM) scored through next-token logits."""

    kind = "qwen2-audio"

    def __init__(
        self,
        path: str,
        labels: Sequence[str],
        options: AlmOptions,
        model_class: str = "Qwen2AudioForConditionalGeneration",
    ) -> None:
        self._torch, transformers = import_torch_stack()
        self.spec = f"{self.kind}:{path}"
        self.labels = check_labels(labels)
        warn_cue_collisions(self.labels)
        self.options = options
        self.prompts = load_generative(options.prompts, options.prompt_set)
        set_threads(options)
        self._device = self._torch.device(options.device)
        self._processor, self._model = _load(transformers, path, options, model_class)
        self._model.to(self._device)
        tokenizer = self._processor.tokenizer
        tokenizer.padding_side = "left"
        extractor = self._processor.feature_extractor
        self._sample_rate = int(extractor.sampling_rate)
        self._window = int(getattr(extractor, "n_samples", 30 * self._sample_rate))
        self.mapping = label_rules.map_labels(
            self.labels,
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
            decode=lambda token: tokenizer.decode([token]),
        )
        self.token_mode = label_rules.resolve_token_mode(options.token_mode, self.mapping)

    def predict(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[dict[str, float]]:
        """One distribution per utterance: mean over the question templates."""
        return template_means(self.labels, self.predict_templates(batch, cues))

    def predict_templates(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[list[dict[str, float]]]:
        """Per utterance, the distribution of each question template."""
        clips = check_batch(batch)
        if self.options.scoring == "text":
            return self._written(clips, cues)
        texts, audios = self._prompts(clips, cues, self.prompts.questions)
        scores = self._scores(texts, audios)
        return per_template(self.labels, softmax_rows(scores), len(self.prompts.questions))

    def template_names(self) -> list[str]:
        """The question templates (scoring "text": the distribution question)."""
        if self.options.scoring == "text":
            return [self.prompts.distribution]
        return list(self.prompts.questions)

    def explain(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str]:
        """A short greedy free-text rationale per utterance."""
        clips = check_batch(batch)
        sentences = self._cue_sentences(clips, cues)
        texts, audios = [], []
        for clip, sentence in zip(clips, sentences, strict=True):
            parts = self._audio_parts(clip)
            question = self.prompts.explain + (f"\n{sentence}" if sentence else "")
            texts.append(self._chat(len(parts), question))
            audios.extend(parts)
        return self._generate(texts, audios, self.options.explain_tokens)

    def cue_phrases(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None = None
    ) -> list[str | None]:
        """The cue phrase of each prompt after the probe (None without cues)."""
        resolved = resolve_cues(batch, cues, self.options.cues)
        return [tokens.text() if tokens and tokens.cues else None for tokens in resolved]

    def _cue_sentences(
        self, batch: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None
    ) -> list[str | None]:
        resolved = resolve_cues(batch, cues, self.options.cues)
        return [cue_sentence(self.prompts.cues, tokens) for tokens in resolved]

    def _prompts(
        self,
        clips: Sequence[np.ndarray],
        cues: Sequence[CueTokens | None] | None,
        questions: Sequence[str],
    ) -> tuple[list[str], list[np.ndarray]]:
        """Chat texts (utterance-major, then template) and their audio entries."""
        texts, audios = [], []
        for clip, sentence in zip(clips, self._cue_sentences(clips, cues), strict=True):
            parts = self._audio_parts(clip)
            for template in questions:
                question = question_text(template, self.labels, self.options.text_repeats, sentence)
                texts.append(self._chat(len(parts), question))
                audios.extend(parts)
        return texts, audios

    def _written(
        self, clips: Sequence[np.ndarray], cues: Sequence[CueTokens | None] | None
    ) -> list[list[dict[str, float]]]:
        """Text-level baseline: the model writes a distribution, which is parsed."""
        texts, audios = self._prompts(clips, cues, [self.prompts.distribution])
        written = self._generate(texts, audios, self.options.text_tokens)
        return [[text_scoring.parse(self.labels, text, self.spec)] for text in written]

    def _generate(self, texts: list[str], audios: list[np.ndarray], tokens: int) -> list[str]:
        inputs = self._inputs(texts, audios)
        with self._guard():
            generated = self._model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        decoded = self._processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [str(text).strip() for text in decoded]

    def _audio_parts(self, clip: np.ndarray) -> list[np.ndarray]:
        if self._sample_rate != SAMPLE_RATE:
            import soxr

            clip = soxr.resample(clip, 16000, self._sample_rate).astype(np.float32)
        step = self._window
        windows = [clip[start : start + step] for start in range(0, clip.shape[0], step)]
        return windows * self.options.audio_repeats

    def _chat(self, n_audio: int, question: str) -> str:
        # Qwen2-Audio-Instruct's template tests `'audio_url' in content`: a bare {"type": "audio"}
        # would render no audio tokens. The URL is a placeholder; the audio goes to the processor.
        content = [{"type": "audio", "audio_url": f"utterance-{i}.wav"} for i in range(n_audio)]
        content.append({"type": "text", "text": question})
        messages = [
            {"role": "system", "content": self.prompts.system},
            {"role": "user", "content": content},
        ]
        text = str(
            self._processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        )
        audio_token = getattr(self._processor, "audio_token", "<|AUDIO|>")
        if text.count(audio_token) != n_audio:
            raise ModelError(
                f"{self.spec}: the chat template rendered {text.count(audio_token)} "
                f"audio tokens for {n_audio} audio entries"
            )
        return text

    def _inputs(self, texts: list[str], audios: list[np.ndarray]) -> Any:
        inputs = self._processor(
            text=texts,
            audio=audios,
            sampling_rate=self._sample_rate,
            return_tensors="pt",
            padding=True,
        )
        inputs = inputs.to(self._device)
        inputs["input_features"] = inputs["input_features"].to(self._model.dtype)
        return inputs

    def _scores(self, texts: list[str], audios: list[np.ndarray]) -> np.ndarray:
        """Log-scores (prompts, labels) in the configured token mode."""
        inputs = self._inputs(texts, audios)
        mask = inputs["attention_mask"].long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        whole_label = self.token_mode != "first"
        with self._guard():
            output = self._model(**inputs, position_ids=positions, use_cache=whole_label)
            last = output.logits[:, -1].float()
            if not whole_label:
                return label_rules.first_token_scores(self.mapping, last.cpu().numpy())
            return self._form_scores(last, _KvCache.of(output), mask, positions[:, -1])

    def _form_scores(self, last: Any, cache: _KvCache, mask: Any, last_position: Any) -> np.ndarray:
        """Teacher-force every surface form on the prompt's cache; score each label by the sum
        (token_mode "sequence") or the mean ("mean") of its forms' token log-probs."""
        torch = self._torch
        combine = (
            label_rules.sequence_form_scores
            if self.token_mode == "sequence"
            else label_rules.mean_form_scores
        )
        first_logprobs = torch.log_softmax(last, dim=-1)
        scores = np.empty((last.shape[0], len(self.labels)))
        for index, forms in enumerate(self.mapping.forms):
            per_form = [
                self._form_logprobs(form, first_logprobs, cache, mask, last_position)
                for form in forms
            ]
            for row in range(last.shape[0]):
                scores[row, index] = combine([lp[row] for lp in per_form])
        return scores

    def _form_logprobs(
        self,
        form: Sequence[int],
        first_logprobs: Any,
        cache: _KvCache,
        mask: Any,
        last_position: Any,
    ) -> np.ndarray:
        """(prompts, len(form)) log-probs of one token sequence after each prompt."""
        torch = self._torch
        columns = [first_logprobs[:, form[0]]]
        if len(form) > 1:
            n, fed = mask.shape[0], len(form) - 1
            tokens = torch.tensor(form[:-1], device=self._device).expand(n, fed)
            positions = last_position[:, None] + torch.arange(1, fed + 1, device=self._device)
            ones = torch.ones(n, fed, dtype=mask.dtype, device=self._device)
            extended = torch.cat([mask, ones], dim=-1)
            output = self._model(
                input_ids=tokens,
                attention_mask=extended,
                position_ids=positions,
                use_cache=True,
                **{cache.keyword: cache.value},
            )
            cache.value.crop(-fed)  # back to the prompt for the next form
            logprobs = torch.log_softmax(output.logits.float(), dim=-1)
            for step, token in enumerate(form[1:]):
                columns.append(logprobs[:, step, token])
        return torch.stack(columns, dim=-1).cpu().numpy().astype(np.float64)  # type: ignore[no-any-return]

    def _guard(self) -> AbstractContextManager[None]:
        return torch_guard(self._torch, self._device, self.spec)


@dataclass(frozen=True)
class _KvCache:
    """A model output's key/value cache and the keyword that feeds it back: `cache` from
    transformers 5.24 on, `past_key_values` before (now deprecated, with a FutureWarning)."""

    keyword: str
    value: Any

    @classmethod
    def of(cls, output: Any) -> _KvCache:
        """The cache of a forward pass run with `use_cache=True`."""
        keyword = "cache" if "cache" in output else "past_key_values"
        return cls(keyword, output[keyword])


def _load(transformers: Any, path: str, options: AlmOptions, model_class: str) -> tuple[Any, Any]:
    """Processor and model from a local directory (offline) or a hub id."""
    source, offline = local_or_hub(path)
    model_type = getattr(transformers, model_class)
    try:
        processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=offline)
        model = model_type.from_pretrained(
            source, local_files_only=offline, dtype=torch_dtype(options.dtype)
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"alm: cannot load {model_class} from {path}: {err}") from err
    if not hasattr(processor, "feature_extractor") or not hasattr(processor, "tokenizer"):
        raise ModelError(f"alm: {path} has no audio processor with a tokenizer")
    return processor, model.eval()
