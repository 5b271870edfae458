"""tools/train/train_multi.py: shared label space with a masked loss, corpus-balanced weights, the
speaker-independent split of every corpus, adaptation weights and the blocked replay."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from tests.conftest import DATASETS, REPO
from tools.train import train_multi as tm
from tools.train import train_strong as ts
from tools.train.strong_features import Row, read_corpus

LABELS = ["neutral", "calm", "happy", "sad", "angry", "boredom"]


def test_corpus_labels_and_the_masked_loss_support() -> None:
    rows = [Row("a", "x", lb, "a:1") for lb in ("neutral", "calm", "happy")]
    rows += [Row("b", "x", lb, "b:1") for lb in ("sad", "neutral", "neutral")]
    data = ts.Data(rows, {}, np.array(["train"] * 6), np.arange(6))
    covers = tm.corpus_labels(data, LABELS)
    assert covers == {"a": ["neutral", "calm", "happy"], "b": ["neutral", "sad"]}
    mask = tm.label_mask(data.corpora(), covers, LABELS)
    assert mask[0].tolist() == [True, True, True, False, False, False]
    assert mask[4].tolist() == [True, False, False, True, False, False]


def test_masked_loss_ignores_labels_outside_the_clips_corpus() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 7.0]])
    target = torch.tensor([1])
    blocked = torch.tensor([[False, False, True, True]])
    loss = tm.masked_loss(logits, target, blocked, torch.ones(1))
    expected = -torch.log_softmax(logits[:, :2], dim=1)[0, 1]
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    changed = logits.clone()
    changed[0, 3] = -50.0  # a label the corpus does not have: no effect
    assert float(tm.masked_loss(changed, target, blocked, torch.ones(1))) == pytest.approx(
        float(loss), rel=1e-6
    )
    unmasked = tm.masked_loss(logits, target, torch.zeros_like(blocked), torch.ones(1))
    assert float(unmasked) > float(loss) + 1.0  # the full softmax is pulled by label 3


def test_corpus_balanced_weights_give_each_corpus_and_each_label_inside_it_the_same_total() -> None:
    y = np.array(["sad"] * 90 + ["happy"] * 10 + ["sad"] * 3 + ["angry"] * 7)
    corpora = np.array(["big"] * 100 + ["small"] * 10)
    weights = tm.sample_weights(y, corpora, "balanced")
    assert weights.mean() == pytest.approx(1.0)
    totals = {
        (c, lb): weights[(corpora == c) & (y == lb)].sum()
        for c, lb in set(zip(corpora, y, strict=True))
    }
    assert len(set(np.round(list(totals.values()), 9))) == 1  # 4 groups, equal totals
    pooled = tm.sample_weights(y, corpora, "pooled")
    label_totals = [pooled[y == lb].sum() for lb in ("sad", "happy", "angry")]
    assert np.allclose(label_totals, label_totals[0])  # pooled: labels equal, corpora not
    assert pooled[corpora == "big"].sum() > 1.5 * pooled[corpora == "small"].sum()
    with pytest.raises(SystemExit):
        tm.sample_weights(y, corpora, "uniform")


def test_masked_head_learns_each_corpus_and_never_predicts_an_unseen_label() -> None:
    rng = np.random.default_rng(0)
    centres = {"neutral": [3, 0], "calm": [0, 3], "happy": [-3, 0], "sad": [0, -3]}
    corpus_of = {"neutral": "a", "calm": "a", "happy": "b", "sad": "b"}
    y = np.repeat(list(centres), 40)
    x = np.array([centres[lb] for lb in y]) + rng.normal(0, 0.5, (len(y), 2))
    corpora = np.array([corpus_of[lb] for lb in y])
    rows = [Row(c, "x", lb, f"{c}:1") for c, lb in zip(corpora, y, strict=True)]
    data = ts.Data(rows, {}, np.array(["train"] * len(y)), np.arange(len(y)))
    mask = tm.label_mask(corpora, tm.corpus_labels(data, LABELS), LABELS)
    head = tm.fit_masked(x, y, mask, tm.sample_weights(y, corpora, "balanced"), LABELS, c=1.0)
    # scored as eval does: restricted to the clip's corpus's labels (the masked loss never
    # compares labels of different corpora)
    predicted = np.array(LABELS)[np.where(mask, head.logits(x), -np.inf).argmax(1)]
    assert (predicted == y).mean() > 0.95
    assert head.intercept_[LABELS.index("boredom")] == -30.0  # no corpus has it
    assert head.intercept_[LABELS.index("angry")] == -30.0


def test_every_corpus_has_its_own_test_speakers(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for corpus, speakers in (("one", ["s1", "s2", "s3"]), ("two", ["s1", "s2"])):
        (root / corpus).mkdir(parents=True)
        lines = ["path,label,speaker"] + [f"{s}.wav,sad,{s}" for s in speakers]
        (root / corpus / "manifest.csv").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    for corpus, n in (("one", 3), ("two", 2)):
        np.save(cache / f"{corpus}-whisper_speech.npy", np.zeros((n, 4 * 768), np.float32))
        np.save(cache / f"{corpus}-logmel_speech.npy", np.zeros((n, 240), np.float32))
    config = {
        "seed": 1, "threads": 1, "cache_dir": str(cache),
        "data": {"root": str(root), "corpora": ["one", "two"],
                 "test_speakers": {"one": ["s2"], "two": ["s1"]}},
        "features": ts.TINY_FEATURES,
    }  # fmt: skip
    data = tm.load(config)
    assert [r.speaker for r in data.rows] == ["one:s1", "one:s2", "one:s3", "two:s1", "two:s2"]
    assert data.split.tolist() == [
        "train",
        "test",
        "train",
        "test",
        "train",
    ]  # s1 differs per corpus
    assert ts.embedding(data, ts.feature_parts(ts.TINY_FEATURES)).shape == (5, 3312)


def test_relabel_corrects_one_corpus_and_refuses_a_stale_fix() -> None:
    rows = [Row("k", f"{i}.wav", label, "k:a") for i, label in enumerate(["sad", "angry", "happy"])]
    fixed = tm.relabel(rows, {"k": {"angry": "sad", "sad": "angry"}})
    assert [r.label for r in fixed] == ["angry", "sad", "happy"]
    assert [r.path for r in fixed] == [r.path for r in rows]
    assert tm.relabel(rows, {"other": {"sad": "happy"}}) == rows
    with pytest.raises(SystemExit, match=r"no clip has the label\(s\) \['fearful'\]"):
        tm.relabel(rows, {"k": {"fearful": "sad"}})


# emotional-script Korean clips whose text decides the [data.relabel] fix: path -> (words, emotion)
KOREAN_TEXTS = {
    "audio/nea/nea00203.opus": ("너무 우울해", "sad"),  # "call-up papers, I'm so depressed"
    "audio/nea/nea00205.opus": ("애석한 마음", "sad"),  # "I cannot contain my grief"
    "audio/nea/nea00303.opus": ("라디오 소리", "angry"),  # "is it that hard to turn it down?"
    "audio/nea/nea00305.opus": ("술을 끊으시겠습니까", "angry"),  # "... to quit drinking?"
}


@pytest.mark.skipif(not (DATASETS / "korean").is_dir(), reason="no ../shared/datasets/korean")
def test_the_korean_relabel_gives_the_transcripts_their_emotion() -> None:
    """If the shared manifest is ever corrected, this fails: then drop the fix from multi.toml
    (applied to a corrected manifest it would swap the labels back)."""
    config = tm.override(tomllib.loads((REPO / "tools/train/configs/multi.toml").read_text()), [])
    with (DATASETS / "korean" / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        texts = {row["path"]: row["text"] for row in csv.DictReader(handle)}
    rows = tm.relabel(read_corpus(DATASETS, "korean"), config["data"]["relabel"])
    labels = {row.path: row.label for row in rows}
    for path, (words, emotion) in KOREAN_TEXTS.items():
        assert words in texts[path]
        assert labels[path] == emotion, path


def test_adapt_weights_pick_the_speaker_heavy_dimensions() -> None:
    rng = np.random.default_rng(0)
    speakers = np.repeat(["a", "b", "c", "d"], 20)
    y = np.tile(np.repeat(["sad", "happy"], 10), 4)
    speaker_offset = {"a": -2.0, "b": -1.0, "c": 1.0, "d": 2.0}
    x = rng.normal(0, 0.1, (80, 3))
    x[:, 0] += [speaker_offset[s] for s in speakers]  # who speaks
    x[:, 1] += np.where(y == "sad", -2.0, 2.0)  # how they feel
    x[:, 2] += [speaker_offset[s] for s in speakers] + np.where(y == "sad", -1.0, 1.0)
    ratio = tm.speaker_heaviness(x, speakers, y)
    assert ratio[0] > ratio[2] > ratio[1]
    weights = tm.adapt_weights(x, speakers, y, 2 / 3)
    assert weights is not None
    assert weights.tolist() == [1.0, 0.0, 1.0]
    assert tm.adapt_weights(x, speakers, y, 1.0) is None


def test_blocked_order_replays_each_speaker_emotion_by_emotion() -> None:
    speakers = np.repeat(["a", "b"], 6)
    y = np.tile(["sad", "happy", "angry"], 4)
    position = tm.blocked_order(y, speakers, seed=0)
    for speaker in ("a", "b"):
        inside = np.flatnonzero(speakers == speaker)
        replayed = y[inside[np.argsort(position[inside])]]
        assert sum(1 for i in range(1, 6) if replayed[i] != replayed[i - 1]) == 2
    np.testing.assert_array_equal(position, tm.blocked_order(y, speakers, seed=0))


def test_config_overrides_are_toml_values() -> None:
    config = {"head": {"c": 0.05}, "training": {"corpora": ["a"]}}
    tm.override(config, ["head.c=0.02", 'training.corpora=["a", "b"]'])
    assert config == {"head": {"c": 0.02}, "training": {"corpora": ["a", "b"]}}


def test_loco_variants_build_the_head_input_they_name() -> None:
    from tools.train.loco_variants import Variant

    adapted = np.array([[5.0, -1.0]])
    population = np.array([[0.5, -4.0]])
    assert Variant().head_input(adapted, population).tolist() == [[5.0, -1.0]]
    assert Variant(clip=3.0).head_input(adapted, population).tolist() == [[3.0, -1.0]]
    both = Variant(clip=3.0, dual=True).head_input(adapted, population)
    assert both.tolist() == [[3.0, -1.0, 0.5, -3.0]]
