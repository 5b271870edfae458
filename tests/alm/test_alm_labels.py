"""The label-token rule and logits -> distribution, with a hand-made tokenizer (no torch)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from stream_ser.alm import labels as rules
from stream_ser.errors import ModelError

VOCAB = {"neutral": 0, " neutral": 1, "Neutral": 2, "h": 3, "appy": 4, " happy": 5, "Happy": 6,
         " ": 7, "sad": 8, "ness": 9, "Sad": 10, " sad": 11, "angry": 12}
DECODE = {i: t for t, i in VOCAB.items()}


def encode(text: str) -> list[int]:
    """Greedy longest-match over VOCAB, a stand-in for a BPE."""
    ids, rest = [], text
    while rest:
        piece = max((t for t in VOCAB if rest.startswith(t)), key=len)
        ids.append(VOCAB[piece])
        rest = rest[len(piece):]
    return ids


def test_surface_forms_cover_case_and_leading_space() -> None:
    assert rules.surface_forms("happy") == ("happy", " happy", "Happy", " Happy")
    assert rules.surface_forms("Happy") == ("Happy", " Happy", "happy", " happy")


def test_first_tokens_skip_bare_space_and_keep_all_spellings() -> None:
    mapping = rules.map_labels(["neutral", "happy"], encode, DECODE.__getitem__)
    happy = dict(mapping.first[1])
    assert happy == {3: 1.0, 5: 1.0, 6: 1.0}  # "h", " happy", "Happy"; " " + "Happy" skipped
    assert VOCAB[" "] not in dict(mapping.first[0])
    assert (VOCAB[" "], VOCAB["Happy"]) in mapping.forms[1]


def test_shared_first_tokens_are_split() -> None:
    mapping = rules.map_labels(["sad", "sadness"], encode, DECODE.__getitem__)
    sad, sadness = dict(mapping.first[0]), dict(mapping.first[1])
    # "sad"/"Sad"/" sad" start both labels: each gets half of their probability.
    assert sad == sadness == {8: 0.5, 10: 0.5, 11: 0.5}
    assert mapping.forms[1][0] == (8, 9)  # "mean" mode still sees "sad" + "ness"


def test_fully_shared_labels_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rules.map_labels(["sad", "sadness"], encode, DECODE.__getitem__)
    assert "token_mode 'sequence'" in caplog.text


def test_partly_shared_label_splits_only_the_shared_tokens() -> None:
    vocab_encode = {"sad": [8], " sad": [11], "Sad": [10], " Sad": [7, 10],
                    "sadness": [8, 9], " sadness": [11, 9], "Sadness": [12], " Sadness": [7, 12]}
    mapping = rules.map_labels(["sad", "sadness"], vocab_encode.__getitem__, DECODE.__getitem__)
    assert dict(mapping.first[1]) == {8: 0.5, 11: 0.5, 12: 1.0}  # "Sadness" is its own
    assert dict(mapping.first[0]) == {8: 0.5, 11: 0.5, 10: 1.0}  # "Sad" is its own


def test_scores_are_log_mass_of_candidates() -> None:
    mapping = rules.map_labels(["neutral", "happy"], encode, DECODE.__getitem__)
    logits = np.random.default_rng(0).normal(size=(3, len(VOCAB)))
    scores = rules.first_token_scores(mapping, logits)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    neutral = probs[:, [0, 1, 2]].sum(-1)
    happy = probs[:, [3, 5, 6]].sum(-1)
    expected = np.stack([neutral, happy], -1) / (neutral + happy)[:, None]
    got = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_scores_stable_for_huge_logits() -> None:
    mapping = rules.map_labels(["neutral", "happy"], encode, DECODE.__getitem__)
    logits = np.zeros((1, len(VOCAB)))
    logits[0, 5] = 5000.0
    scores = rules.first_token_scores(mapping, logits)
    assert np.isfinite(scores).all() and scores[0, 1] > scores[0, 0] + 4000


def test_mean_form_score_prefers_likely_whole_word() -> None:
    likely = rules.mean_form_scores([[-0.1, -0.2]])
    unlikely = rules.mean_form_scores([[-0.1, -9.0]])
    two_forms = rules.mean_form_scores([[-0.1, -0.2], [-0.1, -0.2]])
    assert likely > unlikely
    assert two_forms == pytest.approx(likely + math.log(2))


def test_top_logprobs_mapping() -> None:
    labels = ["neutral", "happy", "sad", "sadness"]
    top = [("Happy", math.log(0.5)), (" happy", math.log(0.2)), ("sad", math.log(0.1)),
           (" ", math.log(0.1)), ("The", math.log(0.05))]
    dist = rules.from_top_logprobs(labels, top)
    unlisted = 1 - 0.95
    neutral = min(0.05, unlisted)
    expected = np.array([neutral, 0.7, 0.05, 0.05])
    np.testing.assert_allclose(dist, expected / expected.sum())


def test_top_logprobs_without_any_label_is_an_error() -> None:
    with pytest.raises(ModelError, match="no label token"):
        rules.from_top_logprobs(["neutral", "happy"], [("The", -0.1), (" ", -3.0)])


def test_first_tokens_that_start_common_words_warn(caplog: pytest.LogCaptureFixture) -> None:
    """"happy" starts with the token "h", which also starts "he" and "his"."""
    with caplog.at_level(logging.WARNING):
        rules.map_labels(["neutral", "happy"], encode, DECODE.__getitem__)
    assert "also start common words" in caplog.text and "'h'" in caplog.text
    assert "token_mode 'sequence'" in caplog.text
    assert rules.common_word_collisions(["h", " happy", "The"], ["happy", "the"]) == [
        ("h", "he"), ("The", "there")]  # "the" is a label here, "there" is not


def test_auto_token_mode_is_sequence_for_multi_token_spellings() -> None:
    mapping = rules.map_labels(["neutral", "happy"], encode, DECODE.__getitem__)
    assert rules.resolve_token_mode("auto", mapping) == "sequence"  # " Happy" = " " + "Happy"
    single = rules.LabelTokens(("a", "b"), (((1,), (2,)), ((3,),)), (((1, 1.0), (2, 1.0)),
                                                                   ((3, 1.0),)))
    assert rules.resolve_token_mode("auto", single) == "first"
    assert rules.resolve_token_mode("mean", mapping) == "mean"
