"""The generative backend on a tiny random Qwen2-Audio: real processor, real forward passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stream_ser import acoustics, alm  # noqa: E402
from stream_ser import errors as alm_errors  # noqa: E402
from stream_ser.alm.qwen2_audio import Qwen2AudioBackend  # noqa: E402

from .alm_helpers import LABELS, noise  # noqa: E402


def _load(tiny_qwen: Path, **overrides: Any) -> Qwen2AudioBackend:
    """`alm.load` of the tiny model, narrowed to the class these white-box tests look into."""
    loaded = alm.load(f"qwen2-audio:{tiny_qwen}", LABELS, **overrides)
    assert isinstance(loaded, Qwen2AudioBackend)
    return loaded


@pytest.fixture(scope="module")
def backend(tiny_qwen: Path) -> Qwen2AudioBackend:
    return _load(tiny_qwen, cpu_threads=1)


def _close(a: list[dict[str, float]], b: list[dict[str, float]], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y)
        np.testing.assert_allclose(list(x.values()), list(y.values()), atol=tol)


def test_label_tokens_decode_to_label_prefixes(backend: Qwen2AudioBackend) -> None:
    tokenizer = backend._processor.tokenizer
    for label, pairs in zip(LABELS, backend.mapping.first, strict=True):
        assert pairs
        for token, _ in pairs:
            text = tokenizer.decode([token]).strip().lower()
            assert text and label.startswith(text)


def test_distribution_is_softmax_of_label_token_logits(tiny_qwen: Path) -> None:
    """Recompute one prompt by hand: chat template, processor, logits[:, -1], rule, softmax."""
    single = _load(tiny_qwen, prompt_set="single", cpu_threads=1, token_mode="first")
    clip = noise(1.0, 7)
    processor = single._processor
    question = "What emotion does the speaker express? Answer with one word: " \
        "neutral, happy, sad or angry."
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )  # Qwen2-Audio-Instruct's chat format, written out
    inputs = processor(text=[text], audio=[clip], sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        logits = single._model(**inputs).logits[0, -1].double().numpy()
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    mass = [sum(probs[t] * w for t, w in pairs) for pairs in single.mapping.first]
    expected = np.array(mass) / sum(mass)
    got = single.predict([clip])[0]
    np.testing.assert_allclose(list(got.values()), expected, atol=1e-6)


def test_distributions_sum_to_one_and_are_deterministic(
    backend: Qwen2AudioBackend, mixed_clips: list[np.ndarray]
) -> None:
    first = backend.predict(mixed_clips)
    assert len(first) == len(mixed_clips)
    for dist in first:
        assert list(dist) == list(LABELS)
        assert sum(dist.values()) == pytest.approx(1.0, abs=1e-12)
        assert all(p > 0 for p in dist.values())
    _close(first, backend.predict(mixed_clips), tol=0)


def test_mixed_length_batch_equals_one_by_one(
    backend: Qwen2AudioBackend, mixed_clips: list[np.ndarray]
) -> None:
    batched = backend.predict(mixed_clips)
    alone = [backend.predict([clip])[0] for clip in mixed_clips]
    _close(batched, alone)
    reordered = backend.predict(mixed_clips[::-1])[::-1]
    _close(batched, reordered)


def test_mean_token_mode_batch_equals_one_by_one(
    tiny_qwen: Path, mixed_clips: list[np.ndarray], backend: Qwen2AudioBackend
) -> None:
    mean = _load(tiny_qwen, token_mode="mean", prompt_set="single", cpu_threads=1)
    clips = mixed_clips[:3]
    batched = mean.predict(clips)
    _close(batched, [mean.predict([clip])[0] for clip in clips])
    first = backend.predict(clips)
    assert any(abs(batched[0][k] - first[0][k]) > 1e-4 for k in LABELS)


def test_long_audio_is_heard_in_windows(backend: Qwen2AudioBackend, speech: np.ndarray) -> None:
    window = backend._window
    assert window == 4 * 16000  # the tiny model's 4 s window
    parts = backend._audio_parts(speech[: int(9.5 * 16000)])
    assert [p.shape[0] for p in parts] == [window, window, int(1.5 * 16000)]
    # The tail beyond the first window changes the answer: it is not cropped away.
    head = speech[:window]
    longer = np.concatenate([head, noise(3.0, 9, level=0.5)])
    a, b = backend.predict([head, longer])
    assert max(abs(a[k] - b[k]) for k in LABELS) > 1e-6


def test_ensemble_and_amplification_shape_the_prompt(tiny_qwen: Path) -> None:
    amplified = _load(tiny_qwen, audio_repeats=3, text_repeats=2, cpu_threads=1)
    parts = amplified._audio_parts(noise(5.0, 3))
    assert len(parts) == 2 * 3  # two windows, three times
    chat = amplified._chat(len(parts), "Q?")
    assert chat.count("<|AUDIO|>") == 6
    questions = amplified.prompts.questions
    assert len(questions) == 3  # the bundled default ensemble
    seen: list[int] = []
    original = amplified._scores

    def spy(texts: list[str], audios: list[np.ndarray]) -> np.ndarray:
        seen.extend([len(texts), len(audios)])
        assert all(t.count("Answer") + t.count("Reply") + t.count("Classify") >= 2 for t in texts)
        return original(texts, audios)

    amplified._scores = spy  # type: ignore[method-assign]
    dists = amplified.predict([noise(1.0, 1), noise(5.0, 2)])
    assert seen == [2 * 3, (1 + 2) * 3 * 3]  # prompts = items x templates; audios x repeats
    assert len(dists) == 2


def test_cue_modes_change_the_prompt(tiny_qwen: Path, speech: np.ndarray) -> None:
    clip = speech[: 2 * 16000]
    cues = acoustics.cue_tokens(acoustics.analyse_functionals(clip))
    results = {}
    for mode in ("aligned", "none", "conflicting", "shuffled"):
        backend = _load(tiny_qwen, cues=mode, prompt_set="single", cpu_threads=1)
        (phrase,) = backend.cue_phrases([clip], [cues])
        results[mode] = (phrase, backend.predict([clip], [cues])[0])
    assert results["none"][0] is None
    assert results["aligned"][0] == cues.text()
    assert results["conflicting"][0] != cues.text()
    assert results["aligned"][1] != results["none"][1]
    assert results["aligned"][1] != results["conflicting"][1]


def test_missing_cues_are_computed(tiny_qwen: Path, speech: np.ndarray) -> None:
    backend = _load(tiny_qwen, cues="aligned", prompt_set="single", cpu_threads=1)
    clip = speech[: 2 * 16000]
    expected = acoustics.cue_tokens(acoustics.analyse_functionals(clip))
    assert backend.cue_phrases([clip]) == [expected.text()]
    assert backend.predict([clip]) == backend.predict([clip], [expected])


def test_explain_generates_text(tiny_qwen: Path) -> None:
    backend = _load(tiny_qwen, explain=True, explain_tokens=5, cpu_threads=1)
    texts = backend.explain([noise(1.0, 1), noise(0.5, 2)])
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


def test_out_of_memory_becomes_alm_error(backend: Qwen2AudioBackend) -> None:
    with pytest.raises(alm.AlmOutOfMemoryError), backend._guard():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _full_forward_logprob(backend: Qwen2AudioBackend, clip: np.ndarray, form: tuple[int, ...]
                          ) -> float:
    """log P(form | prompt) by one plain forward pass over prompt + form (no KV cache)."""
    (text,), audios = backend._prompts([clip], None, backend.prompts.questions)
    inputs = backend._inputs([text], audios)
    ids = torch.cat([inputs["input_ids"], torch.tensor([form])], dim=-1)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        logits = backend._model(input_ids=ids, attention_mask=mask,
                                input_features=inputs["input_features"],
                                feature_attention_mask=inputs["feature_attention_mask"]).logits
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    start = inputs["input_ids"].shape[1] - 1
    return float(sum(logprobs[start + i, token] for i, token in enumerate(form)))


def test_sequence_mode_is_the_probability_of_each_label(tiny_qwen: Path) -> None:
    """token_mode "sequence" (the default for multi-token scoring) equals the product of the
    label's token probabilities, computed here without the KV cache, summed over spellings."""
    backend = _load(tiny_qwen, token_mode="sequence", prompt_set="single", cpu_threads=1)
    assert any(len(form) > 1 for forms in backend.mapping.forms for form in forms)
    clip = noise(1.2, 11)
    scores = np.array([
        np.logaddexp.reduce([_full_forward_logprob(backend, clip, form) for form in forms])
        for forms in backend.mapping.forms
    ])
    expected = np.exp(scores - scores.max())
    got = backend.predict([clip, noise(2.6, 12)])[0]  # in a padded batch
    np.testing.assert_allclose([got[k] for k in LABELS], expected / expected.sum(), atol=1e-5)
    mean = _load(tiny_qwen, token_mode="mean", prompt_set="single",
                 cpu_threads=1).predict([clip])[0]
    assert max(abs(mean[k] - got[k]) for k in LABELS) > 1e-4
    # the default ("auto") is "sequence" here: the tiny tokenizer spells labels in several tokens
    default = _load(tiny_qwen, prompt_set="single", cpu_threads=1)
    assert default.token_mode == "sequence"
    assert default.predict([clip])[0] == backend.predict([clip])[0]


def test_per_template_distributions(backend: Qwen2AudioBackend) -> None:
    clips = [noise(0.8, 13), noise(1.9, 14)]
    members = backend.predict_templates(clips)
    assert backend.template_names() == list(backend.prompts.questions)
    assert [len(m) for m in members] == [3, 3]
    for member, mean in zip(members, backend.predict(clips), strict=True):
        np.testing.assert_allclose([mean[k] for k in LABELS],
                                   np.mean([[d[k] for k in LABELS] for d in member], axis=0))
        assert max(abs(member[0][k] - member[1][k]) for k in LABELS) > 1e-6


def test_cue_sentence_names_the_baseline_in_the_prompt(tiny_qwen: Path, speech: np.ndarray
                                                        ) -> None:
    backend = _load(tiny_qwen, cues="aligned", prompt_set="single", cpu_threads=1)
    clip = speech[: 2 * 16000]
    tokens = acoustics.cue_tokens(acoustics.analyse_functionals(clip))
    (population,), _ = backend._prompts([clip], [tokens], backend.prompts.questions)
    speaker_tokens = acoustics.CueTokens(tokens.cues, "speaker")
    (speaker,), _ = backend._prompts([clip], [speaker_tokens], backend.prompts.questions)
    assert "relative to typical adult speech" in population
    assert "relative to this speaker" not in population
    assert f"relative to this speaker's earlier speech: {tokens.text()}." in speaker


def test_text_level_scoring_asks_for_and_parses_a_written_distribution(
    tiny_qwen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _load(tiny_qwen, scoring="text", text_tokens=6, cpu_threads=1)
    assert backend.template_names() == [backend.prompts.distribution]
    clips = [noise(0.9, 15), noise(1.4, 16)]
    # the tiny random model writes gibberish: no distribution is invented from it
    with pytest.raises(alm_errors.ModelError, match="no distribution"):
        backend.predict(clips)
    asked: list[str] = []
    original = backend._generate

    def written(texts: list[str], audios: list[np.ndarray], tokens: int) -> list[str]:
        asked.extend(texts)
        assert tokens == 6 and len(original(texts, audios, tokens)) == len(texts)
        return ["neutral: 10%, happy: 60%, sad: 20%, angry: 10%", "sad 0.5 angry 0.5"]

    monkeypatch.setattr(backend, "_generate", written)
    first, second = backend.predict(clips)
    assert first == {"neutral": 0.1, "happy": 0.6, "sad": 0.2, "angry": 0.1}
    assert second == {"neutral": 0.0, "happy": 0.0, "sad": 0.5, "angry": 0.5}
    assert all("percent" in text and "neutral, happy, sad or angry" in text for text in asked)
