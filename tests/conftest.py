"""Shared fixtures: a tiny real ONNX specialist, a real mosquitto broker, real speech clips."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tools.net import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO.parent / "shared" / "datasets"
SAMPLE = REPO / "samples" / "speech.flac"
LABELS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprise")


def build_tiny_model(directory: Path, labels: tuple[str, ...] = LABELS, seed: int = 0) -> Path:
    """A real ONNX model: waveform -> (mean square, mean |x|) -> linear -> logits."""
    from onnx import TensorProto, helper, save

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 20, (2, len(labels))).astype(np.float32)
    bias = rng.normal(0, 1, len(labels)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["waveform", "waveform"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["power"], axes=[1], keepdims=1),
        helper.make_node("Abs", ["waveform"], ["magnitude"]),
        helper.make_node("ReduceMean", ["magnitude"], ["level"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["power", "level"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[
            helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.ravel()),
            helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    save(model, str(directory / "model.onnx"))
    card = {
        "format": "stream-ser-model/1",
        "id": "tiny-test-model",
        "labels": list(labels),
        "sample_rate": 16000,
        "window_ms": 1000,
        "hop_ms": 500,
        "min_input_ms": 100,
        "input": {"kind": "waveform", "name": "waveform", "normalize": "none"},
        "output": {"name": "logits", "kind": "logits"},
    }
    (directory / "card.json").write_text(json.dumps(card))
    return directory


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own $XDG_STATE_HOME, so no spool leaks from one test to the next."""
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny, real ONNX specialist with the eight default labels."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ravdess_clips() -> list[Path]:
    """A few real RAVDESS speech clips (one actor, several emotions)."""
    folder = DATASETS / "ravdess" / "audio" / "Actor_01"
    if not folder.is_dir():
        pytest.skip(f"dataset not found: {folder}")
    return sorted(folder.glob("*.flac"))[::12][:5]


@pytest.fixture
def speech_with_pauses(tmp_path: Path, ravdess_clips: list[Path]) -> tuple[Path, int]:
    """Three real clips separated by 1.5 s of silence in one file; returns (path, clip count)."""
    pieces = []
    for clip in ravdess_clips[:3]:
        audio, rate = soundfile.read(clip, dtype="float32")
        assert rate == 16000
        pieces += [audio, np.zeros(24000, dtype=np.float32)]
    path = tmp_path / "three-utterances.wav"
    soundfile.write(path, np.concatenate(pieces), 16000)
    return path, 3


class Broker:
    """A real mosquitto on a free loopback port, restartable."""

    def __init__(self, directory: Path, persistence: bool = False) -> None:
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        self.database = directory / "mosquitto.db" if persistence else None
        if persistence:  # queued QoS 1 messages survive a (graceful) broker restart
            # started as root, mosquitto drops to the `mosquitto` user, which cannot write the
            # database into a root-owned tmp_path ("Permission denied", persistence silently off)
            lines += ["persistence true", f"persistence_location {directory}/"]
            lines += [f"user {getpass.getuser()}"]
        else:
            lines += ["persistence false"]
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM); with persistence, the broker must have saved its state."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
            if self.database is not None and not self.database.is_file():
                raise AssertionError(f"mosquitto saved no persistence database {self.database}")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A running mosquitto broker, stopped after the test."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    server = Broker(tmp_path)
    server.start()
    yield server
    server.stop()


def run_cli(
    *args: str, stdin: bytes | None = None, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m stream_ser ARGS` (stdin as raw bytes); output decoded as text."""
    done = subprocess.run(
        [sys.executable, "-m", "stream_ser", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout_s,
        cwd=REPO, check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )
