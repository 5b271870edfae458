"""Embeddings cache for tools/bench/bench_speakers.py: speaker d-vectors and specialist embeddings.

For each corpus set (below) a seeded subset of clips per speaker is decoded once; its speaker
embedding (`stream_ser.speakers.SpeakerEmbedder`) and, for the held-out sets, the bundled
specialist's pooled embedding (the `embedding` output of models/default/model.onnx, taken before
the baseline normalisation) are saved to runs/speakers/cache/<set>.npz (gitignored), with the id
of the model that made them: a cache of another model is rebuilt, never read.

Sets: `tune-*` are training speakers (RAVDESS and EmoDB speakers other than the test speakers):
only they chose the clustering threshold. `test-*` are the bundled model's test speakers and
nothing else, read from the `[data.test_speakers]` table of its training config
(tools/train/configs/multi.toml, whose `[export] model_id` must be the bundled model's id):
RAVDESS Actor_17-20, EmoDB 03 08, nEMO KS0 MK0, ASED 01 02 04 05 13 20 48 50 58 59 and Korean
ema emf nek (Korean is not in training, but its other speakers scored the recipe choice).
"""

from __future__ import annotations

import csv
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream_ser.evaluate import load_audio
from stream_ser.speakers import SpeakerEmbedder
from stream_ser.specialist import Specialist, bundled_model_dir, load_card

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO.parent / "shared" / "datasets"
CACHE = REPO / "runs" / "speakers" / "cache"
TRAIN_CONFIG = REPO / "tools" / "train" / "configs" / "multi.toml"
TEST_CORPORA = ("ravdess", "emodb", "nemo", "ased", "korean")
# seeded subset per test speaker; None: all clips. nEMO has 450-540 clips per speaker: 60 keeps
# its streams as long as RAVDESS's (60 per actor) and ASED's (20-70 per speaker)
TEST_PER_SPEAKER: dict[str, int | None] = {"nemo": 60}


@dataclass(frozen=True)
class ClipSet:
    """A selection of clips from one corpus."""

    name: str
    corpus: str
    speakers: tuple[str, ...] | None  # None: every speaker not excluded
    exclude: tuple[str, ...] = ()
    per_speaker: int | None = None  # seeded subset of each speaker's clips; None: all
    emotion: bool = True  # also the specialist's embeddings (held-out sets)


def bundled_model_id() -> str:
    """The id of the bundled specialist."""
    return load_card(bundled_model_dir()).model_id


def held_out_speakers(config: Path = TRAIN_CONFIG) -> dict[str, tuple[str, ...]]:
    """The bundled model's test speakers per corpus, from its training config."""
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    trained = raw["export"]["model_id"]
    if trained != bundled_model_id():
        raise ValueError(f"{config} trains {trained}, the bundled model is {bundled_model_id()}: "
                         "its test speakers are not the bundled model's")
    return {corpus: tuple(speakers) for corpus, speakers in raw["data"]["test_speakers"].items()}


def clip_sets(test: Mapping[str, tuple[str, ...]]) -> tuple[ClipSet, ...]:
    """Training-speaker sets for tuning, then one set of test speakers per corpus."""
    tune = tuple(ClipSet(f"tune-{corpus}", corpus, None, test[corpus], 12, emotion=False)
                 for corpus in ("ravdess", "emodb"))
    return tune + tuple(ClipSet(f"test-{corpus}", corpus, test[corpus],
                                per_speaker=TEST_PER_SPEAKER.get(corpus))
                        for corpus in TEST_CORPORA)


@dataclass(frozen=True)
class Cached:
    """One set's clips and embeddings, in manifest order within each speaker."""

    paths: list[str]
    speakers: list[str]
    labels: list[str]
    speaker_embeddings: np.ndarray  # (n, 256) unit vectors
    model_embeddings: np.ndarray | None  # (n, dims) specialist pooled embeddings


def label_fixes(config: Path = TRAIN_CONFIG) -> dict[str, dict[str, str]]:
    """The training config's `[data.relabel]` label corrections, per corpus."""
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    fixes: dict[str, dict[str, str]] = raw["data"].get("relabel", {})
    return fixes


def select(clip_set: ClipSet, seed: int = 0) -> list[dict[str, str]]:
    """The manifest rows of a set, labels corrected as the training config says."""
    with (DATASETS / clip_set.corpus / "manifest.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fix = label_fixes().get(clip_set.corpus, {})
    by_speaker: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        row["label"] = fix.get(row["label"], row["label"])
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


class StaleCache(ValueError):
    """A cached set made by another model than the bundled one."""


def cached_model(path: Path) -> str | None:
    """The model id a cache file was made with (None: no file, or one from before ids)."""
    if not path.is_file():
        return None
    data = np.load(path)
    return str(data["model_id"]) if "model_id" in data.files else None


def build(
    clip_set: ClipSet, embedder: SpeakerEmbedder, specialist: Specialist, cache: Path = CACHE
) -> Path:
    """Compute and save one set's embeddings (skipped when this model's file exists)."""
    target = cache / f"{clip_set.name}.npz"
    if cached_model(target) == specialist.card.model_id:
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
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        target,
        model_id=np.array(specialist.card.model_id),
        paths=np.array([row["path"] for row in rows]),
        speakers=np.array([row["speaker"] for row in rows]),
        labels=np.array([row["label"] for row in rows]),
        speaker_embeddings=np.stack(speaker_rows),
        model_embeddings=np.stack(model_rows) if model_rows else np.zeros((0, 0)),
    )
    return target


def load(name: str, cache: Path = CACHE) -> Cached:
    """A cached set; StaleCache when the bundled model did not make it."""
    path = cache / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run python -m tools.bench.speaker_cache")
    made_by, wanted = cached_model(path), bundled_model_id()
    if made_by != wanted:
        raise StaleCache(f"{path} was made by {made_by or 'a model before ids were stored'}, "
                         f"not by the bundled {wanted}: rerun python -m tools.bench.speaker_cache")
    data = np.load(path)
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
    for clip_set in clip_sets(held_out_speakers()):
        print(f"{clip_set.name}: {build(clip_set, embedder, specialist)}", flush=True)


if __name__ == "__main__":
    main()
