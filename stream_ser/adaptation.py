"""Causal speaker adaptation: a running per-stream baseline of the model's embedding.

A microphone stream is mostly one speaker. An adaptive model (one whose card has an
`[adaptation]` section) outputs a pooled embedding per input and normalises it with the
baseline it is given before classifying. `StreamBaseline` keeps that baseline for one stream:

- it is updated once per finished utterance, after that utterance has been recognised, so an
  utterance is never normalised with its own audio or anything after it (causal);
- sliding windows use the current baseline but never update it;
- for the first `warmup_utterances` utterances the population's statistics are used unchanged
  (the model then behaves as without adaptation);
- afterwards the stream's running mean and variance (Welford) are shrunk toward the
  population's, as if the population had contributed `prior_weight` utterances:

      mean = (n * stream_mean + w * population_mean) / (n + w)
      var  = (n * stream_var  + w * population_var)  / (n + w)

- with per-dimension `adapt_weights` w in the card (0..1), a dimension uses
  `w * adapted + (1 - w) * population` for both mean and variance: dimensions that carry the
  emotion more than the speaker (w = 0) keep the population's statistics, so a speaker who stays
  in one mood is not normalised toward neutral there;
- with `emotion_offsets` in the card, an update takes away `offset_scale` x the embedding
  offset the utterance's recognised label distribution p expects (`p @ offsets`, each label's
  mean displacement from the speaker's centre on training speakers), so the statistics follow
  the speaker rather than the mood they are in (a speaker angry for ten utterances in a row).

A new stream (another speaker) needs a new `StreamBaseline`. Within a stream with several
voices, `PerSpeaker` keeps one baseline (or any per-speaker state, such as the descriptors'
`StreamAcoustics`) per speaker label: a new speaker starts from the population's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np

from stream_ser.specialist import AdaptationCard, Baseline

MIN_STD = 1e-4
DEFAULT_SPEAKER = ""  # the key of utterances without a speaker label (one voice per stream)

T = TypeVar("T")


class StreamBaseline:
    """Running embedding statistics of one stream, shrunk toward the population's."""

    def __init__(self, card: AdaptationCard) -> None:
        self._card = card
        self._count = 0
        self._mean = np.zeros(card.dims, dtype=np.float64)
        self._m2 = np.zeros(card.dims, dtype=np.float64)  # sum of squared deviations
        self._current: tuple[int, Baseline | None] | None = None  # (count it was made at, value)

    @property
    def utterances(self) -> int:
        """Utterances seen so far."""
        return self._count

    def current(self) -> Baseline | None:
        """The baseline to use now; None (the population's) during warm-up. Computed once
        per update (the same object until the next utterance joins)."""
        if self._current is None or self._current[0] != self._count:
            self._current = (self._count, self._compute())
        return self._current[1]

    def _compute(self) -> Baseline | None:
        n = self._count
        if n == 0 or n < self._card.warmup_utterances:
            return None
        weight = self._card.prior_weight
        population = self._card.population
        variance = self._m2 / n
        population_var = population.std.astype(np.float64) ** 2
        mean = (n * self._mean + weight * population.mean) / (n + weight)
        var = (n * variance + weight * population_var) / (n + weight)
        share = self._card.weights
        if share is not None:
            mean = share * mean + (1 - share) * population.mean
            var = share * var + (1 - share) * population_var
        std = np.maximum(np.sqrt(var), MIN_STD)
        return Baseline(mean.astype(np.float32), std.astype(np.float32))

    def update(self, embedding: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Add one finished utterance's embedding (shape (dims,)); `probabilities` (one per
        model label) is what was recognised in it, used by cards with emotion offsets."""
        value = np.asarray(embedding, dtype=np.float64).reshape(-1)
        if value.shape[0] != self._card.dims or not np.isfinite(value).all():
            return  # a broken embedding must not poison the stream's statistics
        value = value - self._expected_offset(probabilities)
        self._count += 1
        delta = value - self._mean
        self._mean += delta / self._count
        self._m2 += delta * (value - self._mean)

    def _expected_offset(self, probabilities: np.ndarray | None) -> np.ndarray | float:
        offsets = self._card.offsets
        if offsets is None or probabilities is None:
            return 0.0
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
        if p.shape[0] != offsets.shape[0] or not np.isfinite(p).all():
            return 0.0  # no usable label distribution: the plain update
        return self._card.offset_scale * (p @ offsets)  # type: ignore[no-any-return]


class PerSpeaker(Generic[T]):
    """Per-speaker state within one stream, made by `new` when a speaker is first seen.

    `PerSpeaker(lambda: StreamBaseline(card))` is the keyed stream baseline: each speaker's
    utterances update only that speaker's statistics. Utterances without a label (None) share
    one state, so a stream without speaker labels behaves exactly like one `StreamBaseline`.
    """

    def __init__(self, new: Callable[[], T]) -> None:
        self._new = new
        self._states: dict[Hashable, T] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, speaker: object) -> bool:
        return (DEFAULT_SPEAKER if speaker is None else speaker) in self._states

    def get(self, speaker: Hashable | None) -> T:
        """The speaker's state; a new one for a speaker not seen before."""
        key = DEFAULT_SPEAKER if speaker is None else speaker
        if key not in self._states:
            self._states[key] = self._new()
        return self._states[key]
