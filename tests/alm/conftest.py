"""ALM fixtures: tiny random-initialised Qwen2-Audio and CLAP models built locally, test clips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.fakes import fake_openai_alm, make_tiny_alm

from .alm_helpers import RATE, noise

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def torch_one_thread() -> None:
    """Keep torch modest on shared machines."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None) -> Path:
    """A tiny Qwen2-Audio directory (4 s audio window, BPE tokenizer trained here)."""
    return make_tiny_alm.build_qwen2_audio(tmp_path_factory.mktemp("alm") / "qwen2-audio")


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None) -> Path:
    """A tiny CLAP directory (48 kHz, 2 s window, rand_trunc truncation)."""
    return make_tiny_alm.build_clap(tmp_path_factory.mktemp("alm") / "clap")


@pytest.fixture
def fake_server() -> Iterator[Any]:
    """A fake OpenAI-compatible audio chat server on 127.0.0.1 (tests/fakes/fake_openai_alm.py)."""
    with fake_openai_alm.FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """The bundled real speech clip (about 20 s, 16 kHz)."""
    audio, rate = soundfile.read(REPO / "samples" / "speech.flac", dtype="float32")
    assert rate == RATE
    return audio  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def mixed_clips(speech: np.ndarray) -> list[np.ndarray]:
    """Utterances of very different lengths (0.3 s to 9 s): longer than the tiny windows too."""
    return [speech[: int(1.3 * RATE)], noise(0.3, 1), speech[RATE: int(10 * RATE)], noise(2.5, 2)]
