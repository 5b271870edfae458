"""Embeddings cache for tools/bench/bench_speakers.py: speaker d-vectors and specialist embeddings.

For each corpus set (below) a seeded subset of clips per speaker is decoded once; its speaker
embedding (`stream_ser.speakers.SpeakerEmbedder`) and, for the held-out sets, the bundled
specialist's pooled embedding (the `embedding` output of models/default/model.onnx, taken before
the baseline normalisation) are saved to runs/speakers/cache/<set>.npz (gitignored).

Sets: `tune-*` are training speakers (RAVDESS actors 1-16, EmoDB speakers other than the
test speakers 03 and 08): only they choose the clustering threshold. `test-*` are held out:
RAVDESS actors 17-20 and EmoDB 03, 08 (the model's test speakers), and speakers of three
corpora the model never saw (nEMO Polish, ASED Amharic, Korean).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream_ser.evaluate import load_audio
from stream_ser.speakers import SpeakerEmbedder
from stream_ser.specialist import Specialist, bundled_model_dir

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO.parent / "shared" / "datasets"
CACHE = REPO / "runs" / "speakers" / "cache"
RAVDESS_TEST = [f"Actor_{i:02d}" for i in range(17, 21)]
EMODB_TEST = ["03", "08"]


@dataclass(frozen=True)
class ClipSet:
    """A selection of clips from one corpus."""

    name: str
    corpus: str
    speakers: tuple[str, ...] | None  # None: every speaker not excluded
    exclude: tuple[str, ...] = ()
    per_speaker: int | None = None  # seeded subset of each speaker's clips; None: all
    emotion: bool = True  # also the specialist's embeddings (held-out sets)


SETS = (
    ClipSet("tune-ravdess", "ravdess", None, tuple(RAVDESS_TEST), 12, emotion=False),
    ClipSet("tune-emodb", "emodb", None, tuple(EMODB_TEST), 12, emotion=False),
    ClipSet("test-ravdess", "ravdess", tuple(RAVDESS_TEST)),
    ClipSet("test-emodb", "emodb", tuple(EMODB_TEST)),
    ClipSet("test-nemo", "nemo", None, (), 24),
    ClipSet("test-ased", "ased", ("02", "03", "04", "05", "06", "07")),
    ClipSet("test-korean", "korean", None, (), 12),
)


@dataclass(frozen=True)
class Cached:
    """One set's clips and embeddings, in manifest order within each speaker."""

    paths: list[str]
    speakers: list[str]
    labels: list[str]
    speaker_embeddings: np.ndarray  # (n, 256) unit vectors
    model_embeddings: np.ndarray | None  # (n, dims) specialist pooled embeddings


def select(clip_set: ClipSet, seed: int = 0) -> list[dict[str, str]]:
    """The manifest rows of a set."""
    with (DATASETS / clip_set.corpus / "manifest.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_speaker: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        speaker = row["speaker"]
        wanted = clip_set.speakers is None or speaker in clip_set.speakers
        if wanted and speaker not in clip_set.exclude:
            by_speaker.setdefault(speaker, []).append(row)
    chosen: list[dict[str, str]] = []
    for speaker in sorted(by_speaker):
        clips = by_speaker[speaker]
        if clip_set.per_speaker is not None and len(clips) > clip_set.per_speaker:
            clips = random.Random(f"{seed}-{speaker}").sample(clips, clip_set.per_speaker)
        chosen += clips
    return chosen


def build(clip_set: ClipSet, embedder: SpeakerEmbedder, specialist: Specialist) -> Path:
    """Compute and save one set's embeddings (skipped when its file exists)."""
    target = CACHE / f"{clip_set.name}.npz"
    if target.is_file():
        return target
    rows = select(clip_set)
    speaker_rows, model_rows = [], []
    for index, row in enumerate(rows, start=1):
        audio = load_audio(DATASETS / clip_set.corpus / row["path"])
        speaker_rows.append(embedder.embed(audio))
        if clip_set.emotion:
            model_rows.append(specialist.analyze([audio])[1][0])  # type: ignore[index]
        if index % 50 == 0:
            print(f"{clip_set.name}: {index}/{len(rows)}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        target,
        paths=np.array([row["path"] for row in rows]),
        speakers=np.array([row["speaker"] for row in rows]),
        labels=np.array([row["label"] for row in rows]),
        speaker_embeddings=np.stack(speaker_rows),
        model_embeddings=np.stack(model_rows) if model_rows else np.zeros((0, 0)),
    )
    return target


def load(name: str) -> Cached:
    """A cached set."""
    data = np.load(CACHE / f"{name}.npz")
    model = data["model_embeddings"]
    return Cached(
        [str(p) for p in data["paths"]],
        [str(s) for s in data["speakers"]],
        [str(label) for label in data["labels"]],
        data["speaker_embeddings"],
        model if model.size else None,
    )


def main() -> None:
    """Fill the cache for every set."""
    embedder = SpeakerEmbedder()
    specialist = Specialist(bundled_model_dir())
    for clip_set in SETS:
        print(f"{clip_set.name}: {build(clip_set, embedder, specialist)}", flush=True)


if __name__ == "__main__":
    main()
