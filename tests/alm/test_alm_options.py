"""Templates file, options validation, spec parsing and load errors (no torch needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stream_ser import alm
from stream_ser.alm import prompts
from stream_ser.errors import ConfigError, ModelError

LABELS = ["neutral", "happy", "sad", "angry"]


def test_bundled_templates_load() -> None:
    generative = prompts.load_generative(None, "default")
    clap = prompts.load_clap(None, "default")
    assert len(generative.questions) >= 3 and all("{labels}" in q for q in generative.questions)
    assert len(clap.templates) >= 3 and clap.descriptions["neutral"] == "neutral"


def test_question_repeats_and_cues() -> None:
    text = prompts.question_text("Pick one: {labels}.", LABELS, 3, "Cues: pitch: high.")
    question = "Pick one: neutral, happy, sad or angry."
    assert text.split("\n") == [question] * 3 + ["Cues: pitch: high."]
    assert "Cues" not in prompts.question_text("{labels}", LABELS, 1, None)


def test_class_texts_shape_and_repeats() -> None:
    clap = prompts.ClapPrompts("x", ("a {label} voice", "{label} speech"), {"sad": "gloomy"})
    texts = prompts.class_texts(clap, LABELS, 2)
    assert len(texts) == 2 and all(len(row) == len(LABELS) for row in texts)
    assert texts[0][2] == "a gloomy voice. a gloomy voice"


def test_user_templates_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[generative.short]\nquestions = ["Emotion ({labels})?"]\n'
                    '[clap.short]\ntemplates = ["{label}"]\n')
    assert prompts.load_generative(str(path), "short").questions == ("Emotion ({labels})?",)
    with pytest.raises(ConfigError, match=r"no \[generative.default\]"):
        prompts.load_generative(str(path), "default")


def test_templates_must_have_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[generative.a]\nquestions = ["no placeholder"]\n[clap.a]\ntemplates = ["x"]\n')
    with pytest.raises(ConfigError, match="labels"):
        prompts.load_generative(str(path), "a")
    with pytest.raises(ConfigError, match="label"):
        prompts.load_clap(str(path), "a")
    with pytest.raises(ConfigError, match="cannot read"):
        prompts.load_clap(str(tmp_path / "missing.toml"), "a")


@pytest.mark.parametrize(
    "raw",
    [{"max_batch": 0}, {"cues": "loud"}, {"token_mode": "last"}, {"device": "tpu"},
     {"dtype": "fp16"}, {"max_wait_ms": -1}, {"top_logprobs": 21}, {"colour": "red"},
     {"scoring": "words"}, {"text_tokens": 0}],
)
def test_invalid_options(raw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        alm.AlmOptions.from_mapping(raw)


def test_options_from_toml_table() -> None:
    options = alm.AlmOptions.from_mapping({"max_batch": 4, "cues": "shuffled", "audio_repeats": 2})
    assert (options.max_batch, options.cues, options.audio_repeats, options.text_repeats) == (
        4, "shuffled", 2, 1)


@pytest.mark.parametrize("spec", ["qwen2-audio", "whisper:/x", "clap:", "/models/clap"])
def test_bad_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="KIND:PATH"):
        alm.parse_spec(spec)


def test_spec_keeps_url_colons() -> None:
    assert alm.parse_spec("openai:http://host:8000/v1") == ("openai", "http://host:8000/v1")


def test_missing_model_directory_is_clear(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    with pytest.raises(ModelError, match="not found"):
        alm.load(f"qwen2-audio:{tmp_path / 'nope'}", LABELS)


def test_empty_model_directory_is_clear(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    with pytest.raises(ModelError, match="cannot load"):
        alm.load(f"clap:{tmp_path}", LABELS)


def test_import_is_light_and_missing_extra_gives_install_hint() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # as if the alm extra were not installed
        "import stream_ser, stream_ser.alm, stream_ser.acoustics\n"
        "from stream_ser.alm import AlmUnavailableError\n"
        "try:\n"
        "    stream_ser.alm.load('qwen2-audio:.', ['a', 'b'])\n"
        "except AlmUnavailableError as err:\n"
        "    print('HINT', err)\n"
        "print('TRANSFORMERS', 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert "HINT" in out and "pip install 'stream-ser[alm]'" in out
    assert "TRANSFORMERS False" in out


def test_import_does_not_load_torch() -> None:
    code = "import sys, stream_ser.alm, stream_ser.acoustics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "False"
