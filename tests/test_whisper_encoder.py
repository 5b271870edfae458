"""tools/train/whisper_encoder.py: CTranslate2 weight reading, the torch encoder, ONNX export."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tests.signals import buzz

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch

from tools.train.whisper_encoder import (
    PooledWhisper,
    export_onnx,
    join_parts,
    read_ct2_variables,
)

WIDTH, HEADS = 8, 2


def _string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def _variable(name: str, value: np.ndarray, code: int) -> bytes:
    header = _string(name) + struct.pack("<B", value.ndim)
    header += struct.pack(f"<{value.ndim}I", *value.shape)
    raw = value.tobytes()
    return header + struct.pack("<BI", code, len(raw)) + raw


def tiny_variables(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Encoder variables of a one-layer Whisper with width 8, as CTranslate2 names them."""

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.2, shape).astype(np.float16)

    layer = "layer_0/"
    values = {
        "conv1/weight": w(WIDTH, 80, 3),
        "conv1/bias": w(WIDTH),
        "conv2/weight": w(WIDTH, WIDTH, 3),
        "conv2/bias": w(WIDTH),
        "position_encodings/encodings": w(1500, WIDTH),
        "layer_norm/gamma": w(WIDTH) + 1,
        "layer_norm/beta": w(WIDTH),
        layer + "self_attention/layer_norm/gamma": w(WIDTH) + 1,
        layer + "self_attention/layer_norm/beta": w(WIDTH),
        layer + "self_attention/linear_0/weight": w(3 * WIDTH, WIDTH),
        layer + "self_attention/linear_0/bias": w(3 * WIDTH),
        layer + "self_attention/linear_1/weight": w(WIDTH, WIDTH),
        layer + "self_attention/linear_1/bias": w(WIDTH),
        layer + "ffn/layer_norm/gamma": w(WIDTH) + 1,
        layer + "ffn/layer_norm/beta": w(WIDTH),
        layer + "ffn/linear_0/weight": w(4 * WIDTH, WIDTH),
        layer + "ffn/linear_0/bias": w(4 * WIDTH),
        layer + "ffn/linear_1/weight": w(WIDTH, 4 * WIDTH),
        layer + "ffn/linear_1/bias": w(WIDTH),
    }
    return values


def write_model_bin(path: Path, variables: dict[str, np.ndarray]) -> None:
    """A CTranslate2 model.bin holding these encoder variables and one decoder variable."""
    body = [_variable("decoder/embeddings/weight", np.ones((3, 4), np.float32), 0)]
    body += [_variable("encoder/" + name, value, 4) for name, value in variables.items()]
    body.append(_variable("encoder/num_heads", np.array(HEADS, np.int16), 2))
    data = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(body))
    path.write_bytes(data + b"".join(body) + b"\x00\x00\x00\x00")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A synthetic model.bin and the variables written to it."""
    path = tmp_path_factory.mktemp("ct2") / "model.bin"
    variables = tiny_variables(np.random.default_rng(0))
    write_model_bin(path, variables)
    return path, variables


def test_reads_encoder_variables_only(tiny_whisper: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, variables = tiny_whisper
    loaded = read_ct2_variables(path)
    assert set(loaded) == {*variables, "num_heads"}
    np.testing.assert_array_equal(loaded["conv2/weight"], variables["conv2/weight"])
    assert int(loaded["num_heads"]) == HEADS


def test_pooled_encoder_runs_on_short_inputs_and_exports(
    tiny_whisper: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    import onnxruntime as ort

    model = PooledWhisper(read_ct2_variables(tiny_whisper[0])).eval()
    clip = buzz(0.7)
    with torch.no_grad():
        pooled = model(torch.from_numpy(clip)[None]).numpy()
    assert pooled.shape == (1, 2 * WIDTH) and np.isfinite(pooled).all()
    export_onnx(model, tmp_path / "encoder.onnx")
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"))
    (exported,) = session.run(None, {"waveform": clip[None]})
    np.testing.assert_allclose(exported, pooled, atol=1e-4)
    (longer,) = session.run(None, {"waveform": buzz(2.3)[None]})  # dynamic length
    assert longer.shape == (1, 2 * WIDTH)


def test_join_parts_rebuilds_a_model_split_in_two(
    tiny_whisper: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    whole = tiny_whisper[0].read_bytes()
    first, second = tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"
    first.write_bytes(whole[:1000])
    second.write_bytes(whole[1000:])
    config = tmp_path / "config.json"
    config.write_text("{}")
    joined = join_parts([first, second], [config], tmp_path / "joined")
    assert joined.read_bytes() == whole
    assert (tmp_path / "joined" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in joined.parent.iterdir()) == ["config.json", "model.bin"]
    loaded = read_ct2_variables(joined)
    np.testing.assert_array_equal(loaded["conv1/weight"], tiny_whisper[1]["conv1/weight"])
