"""Word and character error rates of transcripts against reference texts.

Both texts are normalised the same way before they are compared: Unicode NFKC, lower case,
punctuation removed (letters and digits of any script are kept), whitespace collapsed. Numbers
are not spelled out, so "3" against "three" counts as an error.

Corpus rates are pooled (total edits / total reference words), not averaged per utterance.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces."""
    folded = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(
        " " if unicodedata.category(char).startswith(("P", "S")) else char for char in folded
    )
    return " ".join(kept.split())


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance: substitutions + deletions + insertions."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            current.append(
                min(
                    previous[j] + 1,  # deletion
                    current[j - 1] + 1,  # insertion
                    previous[j - 1] + (ref != hyp),  # substitution or match
                )
            )
        previous = current
    return previous[-1]


@dataclass
class ErrorCounts:
    """Edits and reference lengths pooled over utterances."""

    word_edits: int = 0
    words: int = 0
    char_edits: int = 0
    chars: int = 0  # reference characters, spaces excluded
    utterances: int = 0
    exact: int = 0  # utterances transcribed without a word error

    def add(self, reference: str, hypothesis: str) -> None:
        """Count one utterance."""
        ref, hyp = normalize(reference), normalize(hypothesis)
        word_edits = edit_distance(ref.split(), hyp.split())
        self.word_edits += word_edits
        self.words += len(ref.split())
        self.char_edits += edit_distance(ref.replace(" ", ""), hyp.replace(" ", ""))
        self.chars += len(ref.replace(" ", ""))
        self.utterances += 1
        self.exact += word_edits == 0

    @property
    def wer(self) -> float:
        """Word error rate (can exceed 1 with many insertions)."""
        return self.word_edits / self.words if self.words else 0.0

    @property
    def cer(self) -> float:
        """Character error rate, spaces ignored (the fairer rate for scripts without spaces)."""
        return self.char_edits / self.chars if self.chars else 0.0


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of one utterance."""
    counts = ErrorCounts()
    counts.add(reference, hypothesis)
    return counts.wer
