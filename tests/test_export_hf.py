"""tools/train/export_hf.py on tiny random-initialised checkpoints of every supported architecture.

Each checkpoint (config + weights + feature extractor) is built and saved locally; nothing is
downloaded. The exported directory is loaded through the real `Specialist` and compared with the
torch model fed by the checkpoint's own feature extractor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from stream_ser.specialist import Specialist  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
from tools.train import export_hf  # noqa: E402

EMOTIONS = ("neutral", "happy", "sad", "angry")
TOLERANCE = 1e-5
"""Logits parity asked of fp32 exports here (the tool's own default is 1e-4)."""
WAVEFORM_TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16,) * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "classifier_proj_size": 16,
}
WHISPER_CHUNK_S = 2
"""Tiny Whisper window: 2 s = 200 mel frames (the real models take 30 s = 3000)."""


def _labels() -> dict[str, Any]:
    return {
        "id2label": dict(enumerate(EMOTIONS)),
        "label2id": {name: index for index, name in enumerate(EMOTIONS)},
    }


def _wav2vec2_extractor(do_normalize: bool, rate: int = 16000) -> Any:
    return transformers.Wav2Vec2FeatureExtractor(
        sampling_rate=rate, do_normalize=do_normalize, return_attention_mask=do_normalize
    )


def _wav2vec2() -> tuple[Any, Any]:
    config = transformers.Wav2Vec2Config(**WAVEFORM_TINY, feat_extract_norm="layer", **_labels())
    return transformers.Wav2Vec2ForSequenceClassification(config), _wav2vec2_extractor(True)


def _hubert() -> tuple[Any, Any]:
    config = transformers.HubertConfig(**WAVEFORM_TINY, **_labels())
    return transformers.HubertForSequenceClassification(config), _wav2vec2_extractor(False)


def _wavlm() -> tuple[Any, Any]:
    config = transformers.WavLMConfig(**WAVEFORM_TINY, num_buckets=16, **_labels())
    return transformers.WavLMForSequenceClassification(config), _wav2vec2_extractor(True)


def _data2vec() -> tuple[Any, Any]:
    tiny = {**WAVEFORM_TINY, "num_conv_pos_embeddings": 2, "conv_pos_kernel_size": 5}
    del tiny["num_conv_pos_embedding_groups"]
    config = transformers.Data2VecAudioConfig(**tiny, num_conv_pos_embedding_groups=2, **_labels())
    return transformers.Data2VecAudioForSequenceClassification(config), _wav2vec2_extractor(True)


def _whisper() -> tuple[Any, Any]:
    config = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=50 * WHISPER_CHUNK_S,
        classifier_proj_size=16,
        **_labels(),
    )
    extractor = transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=WHISPER_CHUNK_S)
    return transformers.WhisperForAudioClassification(config), extractor


ARCHITECTURES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "wav2vec2": _wav2vec2,
    "hubert": _hubert,
    "wavlm": _wavlm,
    "data2vec-audio": _data2vec,
    "whisper": _whisper,
}


def save_checkpoint(directory: Path, build: Callable[[], tuple[Any, Any]]) -> Path:
    """Seeded random weights + feature extractor saved as a local checkpoint directory.

    Weights are redrawn larger than the library's init (std 0.02), which gives near-constant
    logits of ~0.005; these give logits of order 1 that change with the input, so the parity
    tolerance means something.
    """
    torch.manual_seed(0)
    model, extractor = build()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.normal_(0.0, 1.5 / weight.shape[-1] ** 0.5)
    model.save_pretrained(directory)
    extractor.save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint directory per supported architecture."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_checkpoint(root / name, build) for name, build in ARCHITECTURES.items()}


def reference_logits(checkpoint: Path, clips: list[np.ndarray]) -> np.ndarray:
    """Torch logits (float64) through the checkpoint's own feature extractor."""
    extractor = transformers.AutoFeatureExtractor.from_pretrained(checkpoint)
    model = transformers.AutoModelForAudioClassification.from_pretrained(checkpoint).eval()
    rows = []
    with torch.no_grad():
        for clip in clips:
            inputs = extractor(clip, sampling_rate=16000, return_tensors="pt")
            inputs.pop("attention_mask", None)
            rows.append(model(**inputs).logits[0].double().numpy())
    return np.stack(rows)


def test_model_types_match_the_tool() -> None:
    assert set(ARCHITECTURES) == set(export_hf.WAVEFORM_MODEL_TYPES + export_hf.LOGMEL_MODEL_TYPES)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.slow
def test_export_matches_torch_through_the_specialist(
    name: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "model"
    settings = export_hf.ExportSettings(str(checkpoints[name]), out, model_id=f"tiny-{name}")
    report = export_hf.export(settings)
    assert report.passed, report.summary()
    assert report.logits_max_abs < TOLERANCE

    specialist = Specialist(out)
    assert specialist.labels == EMOTIONS
    assert specialist.card.model_id == f"tiny-{name}"
    clips = export_hf.synthetic_clips((12000, 12000, 12000, 20800), seed=5)  # batch of 3, then 1
    expected = torch.log_softmax(torch.from_numpy(reference_logits(checkpoints[name], clips)), -1)
    got = np.log(specialist.predict(clips))
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    ("name", "normalize"),
    [("wav2vec2", "zero_mean_unit_var"), ("hubert", "none"), ("whisper", "none")],
)
def test_card_records_preprocessing(
    name: str, normalize: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    extractor, model = export_hf.load_checkpoint(str(checkpoints[name]))
    settings = export_hf.ExportSettings(str(checkpoints[name]), tmp_path)
    longest = export_hf.max_input_ms(model, extractor)
    normalized = export_hf.input_normalization(extractor, name)
    card = export_hf.build_card(settings, model, EMOTIONS, normalized, longest)
    assert card["input"]["normalize"] == normalize
    assert card["id"] == name
    assert (longest == WHISPER_CHUNK_S * 1000) if name == "whisper" else longest is None


def test_logmel_front_end_matches_the_whisper_extractor() -> None:
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=30)
    front = export_hf.LogMelFrontEnd(extractor, 3000).eval()
    for clip in export_hf.synthetic_clips((16000 * 3, 16000 * 31), seed=2):
        expected = extractor(clip, sampling_rate=16000, return_tensors="np").input_features
        with torch.no_grad():
            got = front(torch.from_numpy(clip)[None]).numpy()
        assert got.shape == expected.shape == (1, 80, 3000)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)


@pytest.mark.slow
def test_cli_exports_and_prints_the_parity_check(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cli-model"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.train.export_hf",
            str(checkpoints["hubert"]),
            str(out),
            "--id",
            "cli-hubert",
            "--window-ms",
            "1500",
            "--hop-ms",
            "250",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "parity on" in done.stdout and ": OK" in done.stdout
    card = json.loads((out / "card.json").read_text())
    assert (card["id"], card["window_ms"], card["hop_ms"]) == ("cli-hubert", 1500, 250)
    assert Specialist(out).predict(export_hf.synthetic_clips((8000,))).shape == (1, 4)


@pytest.mark.slow
def test_fp16_keeps_float32_io(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    settings = export_hf.ExportSettings(str(checkpoints["whisper"]), tmp_path, fp16=True)
    report = export_hf.export(settings)
    assert report.passed, report.summary()
    model = onnx.load(str(tmp_path / "model.onnx"))
    float32 = onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == float32
    assert model.graph.output[0].type.tensor_type.elem_type == float32
    kinds = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds
    assert json.loads((tmp_path / "card.json").read_text())["id"] == "whisper-fp16"


@pytest.mark.slow
def test_parity_failure_is_reported(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    settings = export_hf.ExportSettings(str(checkpoints["hubert"]), tmp_path, tolerance=1e-12)
    report = export_hf.export(settings)
    assert not report.passed
    assert "FAILED" in report.summary()


def test_rejects_other_sample_rates(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(
        tmp_path / "8k", lambda: (_hubert()[0], _wav2vec2_extractor(False, rate=8000))
    )
    with pytest.raises(export_hf.ExportError, match="8000 Hz"):
        export_hf.export(export_hf.ExportSettings(str(checkpoint), tmp_path / "out"))


def test_rejects_unsupported_architectures(tmp_path: Path) -> None:
    transformers.ASTConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(export_hf.ExportError, match=r"unsupported architecture .*wav2vec2"):
        export_hf.export(export_hf.ExportSettings(str(tmp_path), tmp_path / "out"))


def test_rejects_models_without_a_classification_head(tmp_path: Path) -> None:
    config = transformers.HubertConfig(**WAVEFORM_TINY)
    transformers.HubertModel(config).save_pretrained(tmp_path)
    with pytest.raises(export_hf.ExportError, match="not an audio classifier"):
        export_hf.export(export_hf.ExportSettings(str(tmp_path), tmp_path / "out"))


def test_placeholder_labels_need_a_flag(tmp_path: Path) -> None:
    def build() -> tuple[Any, Any]:
        config = transformers.HubertConfig(**WAVEFORM_TINY, num_labels=3)
        return transformers.HubertForSequenceClassification(config), _wav2vec2_extractor(False)

    checkpoint = save_checkpoint(tmp_path / "placeholder", build)
    with pytest.raises(export_hf.ExportError, match="--labels-from-config"):
        export_hf.export(export_hf.ExportSettings(str(checkpoint), tmp_path / "out"))
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    keep = export_hf.ExportSettings(str(checkpoint), tmp_path, labels_from_config=True)
    assert export_hf.choose_labels(config, keep) == ("LABEL_0", "LABEL_1", "LABEL_2")
    named = export_hf.ExportSettings(str(checkpoint), tmp_path, labels=("a", "b", "c"))
    assert export_hf.choose_labels(config, named) == ("a", "b", "c")
