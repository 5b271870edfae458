"""Word/character error rates (stream_ser.wer): exact counts on hand-made pairs."""

from __future__ import annotations

import pytest

from stream_ser.wer import ErrorCounts, edit_distance, normalize, word_error_rate


def test_normalize_drops_case_punctuation_and_extra_spaces() -> None:
    assert normalize("  Kids are talking by the DOOR!  ") == "kids are talking by the door"
    assert normalize("Lubię czytać, przed snem.") == "lubię czytać przed snem"


def test_edit_distance_counts_each_kind_of_edit() -> None:
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert edit_distance(["a", "b", "c"], ["a", "x", "c"]) == 1  # substitution
    assert edit_distance(["a", "b", "c"], ["a", "c"]) == 1  # deletion
    assert edit_distance(["a", "b", "c"], ["a", "b", "b", "c"]) == 1  # insertion
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance("kitten", "sitting") == 3


def test_word_error_rate_of_the_two_ravdess_statements() -> None:
    # "kids"->"dogs", "talking"->"sitting": 2 substitutions over 6 reference words
    wer = word_error_rate("Kids are talking by the door", "Dogs are sitting by the door.")
    assert wer == pytest.approx(2 / 6)


def test_pooled_counts_weight_utterances_by_length() -> None:
    counts = ErrorCounts()
    counts.add("one two three four", "one two three four")
    counts.add("five six", "five")
    assert (counts.word_edits, counts.words, counts.utterances, counts.exact) == (1, 6, 2, 1)
    assert counts.wer == pytest.approx(1 / 6)
    assert counts.cer == pytest.approx(3 / 22)  # "six" deleted: 3 of 22 characters


def test_insertions_can_push_wer_above_one() -> None:
    assert word_error_rate("yes", "yes yes yes") == pytest.approx(2.0)
