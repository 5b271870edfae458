"""Build tiny random-initialised Qwen2-Audio and CLAP model directories (nothing downloaded).

They load through the same code path as the real checkpoints, so tests and benchmarks run the
real stream-ser ALM backends offline:

    python -m tests.fakes.make_tiny_alm OUT_DIR        # writes OUT_DIR/qwen2-audio and OUT_DIR/clap

The tokenizers are byte-level BPEs trained with the `tokenizers` library on a small corpus that
contains the emotion label words. Weights are random (seeded): the distributions are meaningless,
but shapes, padding, batching and determinism are those of the real models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS = [
    "neutral happy sad angry fear disgust surprise calm excited frustrated",
    "Neutral Happy Sad Angry Fear Disgust Surprise Calm",
    "What emotion does the speaker express? Answer with one word: neutral, happy, sad or angry.",
    "Which of these best describes the voice of the speaker? Reply with a single word.",
    "Acoustic cues relative to this speaker: pitch low mid high, pitch variability flat varied,",
    "loudness quiet loud, speaking rate slow fast, brightness dark bright, voice quality tense",
    "modal breathy moderate. The speaker sounds upset because the voice is loud and fast.",
    "this is the sound of a person speaking in a happy voice. a recording of speech that is sad.",
    "You are a helpful assistant. Audio 1: system user assistant",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                 "<|audio_eos|>"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
QWEN_N_MELS = 16
QWEN_CHUNK_S = 4
"""Tiny Qwen2-Audio window: 4 s of audio (the real model takes 30 s)."""
QWEN_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The chat template of Qwen2-Audio-7B-Instruct (it needs `audio_url` in an audio entry)."""
CLAP_MAX_LENGTH_S = 2
"""Tiny CLAP window: 2 s at 48 kHz (the LAION models take 10 s)."""


def _bpe(specials: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(p) if isinstance(p, list) else tuple(p.split(" ")) for p in model["merges"]]
    return dict(model["vocab"]), merges


def build_qwen2_audio(out: Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2-Audio model and processor to `out`; returns `out`."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Tokenizer,
        WhisperFeatureExtractor,
    )

    vocab, merges = _bpe(QWEN_SPECIALS, 400)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # tuples work, str annotated
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    extractor = WhisperFeatureExtractor(feature_size=QWEN_N_MELS, chunk_length=QWEN_CHUNK_S)
    processor = Qwen2AudioProcessor(extractor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    audio_token = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert isinstance(audio_token, int)
    config = Qwen2AudioConfig(
        audio_config={
            "num_mel_bins": QWEN_N_MELS, "encoder_layers": 1, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32, "d_model": 16, "max_source_positions": 50 * QWEN_CHUNK_S,
        },
        text_config={
            "model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        audio_token_index=audio_token,
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_clap(out: Path, seed: int = 0) -> Path:
    """Write a tiny CLAP model and processor to `out`; returns `out`."""
    import torch
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        RobertaTokenizer,
    )

    vocab, merges = _bpe(ROBERTA_SPECIALS, 300)
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # as above
    extractor = ClapFeatureExtractor(
        feature_size=16, max_length_s=CLAP_MAX_LENGTH_S, truncation="rand_trunc",
        padding="repeatpad",
    )
    processor = ClapProcessor(extractor, tokenizer)
    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 130,
            "projection_dim": 16,
        },
        audio_config={
            "num_mel_bins": 16, "spec_size": 64, "patch_embeds_hidden_size": 8,
            "depths": [1, 1], "num_attention_heads": [2, 2], "hidden_size": 16,
            "window_size": 4, "projection_dim": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    """Command line: build both tiny models under one directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(build_qwen2_audio(args.out / "qwen2-audio"))
    print(build_clap(args.out / "clap"))


if __name__ == "__main__":
    main()
