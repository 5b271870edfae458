"""From next-token logits to a label distribution: which tokens stand for which label.

The rule (token_mode "first"):
1. Surface forms of a label: as written, lower case and Capitalised, each with and without a
   leading space (the answer may start after a newline or after a space). Forms are tokenised
   without special tokens; the first token of each form is a candidate.
2. A candidate that decodes to whitespace only (a bare space token) is dropped: it names no label.
3. A candidate shared by k labels (e.g. "sad" starts both "sad" and "sadness") counts for each
   of them with weight 1/k: the first token cannot tell them apart, so its mass is split, not
   dropped (dropping would lose the most natural spelling). A warning names the shared tokens and
   suggests token_mode "sequence", which tells such labels apart by their later tokens.
4. score(label) = log sum_t w_t * exp(logit_t) over its candidates (probability mass of any of its
   spellings), and the distribution is the softmax of the scores over labels - the vocabulary-wide
   normaliser cancels.

token_mode "sequence" (the multi-token mode, and what the default "auto" uses whenever a spelling
of a label spans several tokens; with single-token spellings "first" is the same): every surface
form is teacher-forced on the prompt's KV cache and scored by the SUM of its token
log-probabilities - the log-probability that the model says exactly that spelling;
score(label) = log sum over forms of exp(sum). Labels sharing a first token are told apart by
their later tokens, and the score is the model's probability of saying the label, whatever its
length.

token_mode "mean" (length-normalised): the MEAN token log-probability per form instead. Kept as an
option only: it inflates labels whose later tokens are near-certain continuations. A one-token
label at p = 0.05 against a two-token label at 0.0099 x 1.0 scores 0.05 vs sqrt(0.0099) = 0.0995,
i.e. 0.33 vs 0.67, although the model is five times likelier to say the first (sequence: 0.83 vs
0.17).

Collisions, warned about at load: a first token shared by several labels (rule 3), and a first
token that is also a prefix of common answer words ("h" starts "he", "his"; "the" starts "there"):
in token_mode "first" such a token's whole probability counts for the label although the model may
be starting another word. token_mode "sequence" removes both problems.

Remote servers give top-k token strings instead of ids: `from_top_logprobs` documents its rule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stream_ser.errors import ModelError

log = logging.getLogger(__name__)


def surface_forms(label: str) -> tuple[str, ...]:
    """The spellings an answer may start with, deduplicated, in a fixed order."""
    words = dict.fromkeys((label, label.lower(), label[:1].upper() + label[1:].lower()))
    return tuple(dict.fromkeys(form for word in words for form in (word, " " + word)))


@dataclass(frozen=True)
class LabelTokens:
    """The token ids that stand for each label."""

    labels: tuple[str, ...]
    forms: tuple[tuple[tuple[int, ...], ...], ...]
    """Per label: the token sequence of each surface form (token_mode "sequence" and "mean")."""
    first: tuple[tuple[tuple[int, float], ...], ...]
    """Per label: (candidate first-token id, weight) pairs (for token_mode "first")."""


def map_labels(
    labels: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[int], str],
) -> LabelTokens:
    """Apply the rule above with a tokenizer's encode (no special tokens) and decode."""
    forms = tuple(
        tuple(dict.fromkeys(tuple(encode(form)) for form in surface_forms(label)))
        for label in labels
    )
    if any(not seq for label_forms in forms for seq in label_forms):
        raise ModelError("alm: a label tokenises to nothing")
    candidates = [
        [seq[0] for seq in dict.fromkeys(label_forms) if decode(seq[0]).strip()]
        for label_forms in forms
    ]
    owners: dict[int, set[int]] = {}
    for index, ids in enumerate(candidates):
        for token in ids:
            owners.setdefault(token, set()).add(index)
    shared = sorted(decode(token) for token, holders in owners.items() if len(holders) > 1)
    if shared:
        log.warning(
            "alm: first tokens %s start several labels; their probability is split "
            "equally - token_mode 'sequence' tells such labels apart",
            shared,
        )
    common = common_word_collisions([decode(token) for token in owners], labels)
    if common:
        log.warning(
            "alm: first label tokens %s also start common words (%s); in token_mode 'first' "
            "their whole probability counts for the label - token_mode 'sequence' scores the "
            "whole label",
            [token for token, _ in common],
            ", ".join(dict.fromkeys(word for _, word in common)),
        )
    first = tuple(_weighted(labels[i], ids, owners) for i, ids in enumerate(candidates))
    return LabelTokens(labels=tuple(labels), forms=forms, first=first)


def _weighted(
    label: str, ids: Sequence[int], owners: Mapping[int, set[int]]
) -> tuple[tuple[int, float], ...]:
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ModelError(f"alm: label {label!r} has no usable first token")
    return tuple((token, 1.0 / len(owners[token])) for token in ids)


def resolve_token_mode(mode: str, mapping: LabelTokens) -> str:
    """ "auto": "sequence" when any surface form of a label spans several tokens (the multi-token
    default), else "first" - which then scores exactly what "sequence" would, in one pass."""
    if mode != "auto":
        return mode
    multi = any(len(form) > 1 for forms in mapping.forms for form in forms)
    return "sequence" if multi else "first"


def first_token_scores(mapping: LabelTokens, logits: np.ndarray) -> np.ndarray:
    """Log-scores (batch, labels) from next-token logits (batch, vocab), rule steps 3-4."""
    logits = np.asarray(logits, dtype=np.float64)
    scores = np.empty((logits.shape[0], len(mapping.labels)))
    for index, pairs in enumerate(mapping.first):
        ids = np.array([token for token, _ in pairs])
        log_weights = np.log(np.array([weight for _, weight in pairs]))
        scores[:, index] = _logsumexp(logits[:, ids] + log_weights, axis=-1)
    return scores


COMMON_WORDS = (
    "the", "this", "that", "there", "they", "their", "it", "is", "i", "a", "an", "and", "he",
    "his", "she", "her", "speaker", "speech", "sounds", "voice", "emotion", "answer", "not", "no",
    "none", "yes", "unknown", "maybe", "probably", "based", "in", "of", "to", "with", "as",
)  # fmt: skip
"""Words an answer may start with instead of a label."""


def common_word_collisions(
    first_tokens: Sequence[str], labels: Sequence[str]
) -> list[tuple[str, str]]:
    """(token text, common word) pairs: a label's first token that also starts a common word
    which is not itself a label."""
    names = {label.lower() for label in labels}
    found = []
    for token in dict.fromkeys(first_tokens):
        prefix = token.strip().lower()
        for word in COMMON_WORDS:
            if prefix and word.startswith(prefix) and word not in names:
                found.append((token, word))
                break
    return found


def sequence_form_scores(form_logprobs: Sequence[Sequence[float]]) -> float:
    """Log-score of one label: log of the summed probabilities of its spellings, each the
    product of its token probabilities (token_mode "sequence")."""
    sums = np.array([float(np.sum(lp)) for lp in form_logprobs])
    return float(_logsumexp(sums, axis=-1))


def mean_form_scores(form_logprobs: Sequence[Sequence[float]]) -> float:
    """Log-score of one label from the mean token log-probs of its forms (token_mode "mean")."""
    means = np.array([float(np.mean(lp)) for lp in form_logprobs])
    return float(_logsumexp(means, axis=-1))


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    top = values.max(axis=axis, keepdims=True)
    summed = np.log(np.exp(values - top).sum(axis=axis, keepdims=True)) + top
    return np.squeeze(summed, axis=axis)  # type: ignore[no-any-return]


def from_top_logprobs(labels: Sequence[str], top: Sequence[tuple[str, float]]) -> np.ndarray:
    """Probabilities over labels from a server's top-k (token text, logprob) list.

    A listed token counts for every label whose lower-case word starts with the token's
    lower-case, stripped text (whitespace-only tokens count for none); a token matching k labels
    gives each 1/k of its probability. A label none of whose tokens is listed is known to be less
    likely than the least likely listed token: it gets min(that probability, the unlisted mass
    divided by the number of such labels). No label token listed at all is a ModelError.
    """
    words = [label.lower() for label in labels]
    mass = np.zeros(len(labels))
    for text, logprob in top:
        prefix = text.strip().lower()
        matches = [i for i, word in enumerate(words) if prefix and word.startswith(prefix)]
        for index in matches:
            mass[index] += math.exp(logprob) / len(matches)
    if not mass.any():
        raise ModelError(f"alm: no label token among the server's top {len(top)} logprobs")
    missing = mass == 0
    if missing.any():
        listed = [math.exp(logprob) for _, logprob in top]
        unlisted = max(0.0, 1.0 - sum(listed))
        mass[missing] = min([*listed, unlisted / int(missing.sum())]) or 1e-12
    return mass / mass.sum()  # type: ignore[no-any-return]
