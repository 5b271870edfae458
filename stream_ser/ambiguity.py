"""Distribution metrics against annotators' votes (the token-level-logits paper's ambiguity
analysis): how close a recognizer's distribution is to the distribution of the votes.

A manifest carries votes as `votes_<label>` columns. Rules (explicit, never silent):
- A scored label without a `votes_<label>` column counts as zero votes on every clip; a warning
  names the missing columns, and the report lists them (`missing_columns`).
- Votes for labels outside the scored set cannot be compared with a distribution over the scored
  labels: they are dropped, and the mean share of votes dropped per clip is reported
  (`dropped_vote_mass`, 0..1).
- A clip with no vote on any scored label has no target distribution: it is left out of the
  means and counted (`n_without_votes`).
Metrics are means over clips: Jensen-Shannon divergence (base 2, 0..1), KL(votes || prediction)
in nats (predictions floored at 1e-6), and the Bhattacharyya coefficient (1 = identical).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FLOOR = 1e-6
VOTE_PREFIX = "votes_"


def vote_metrics(votes: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Mean JSD (base 2), KL(votes || predicted) in nats and Bhattacharyya coefficient."""
    target = votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)
    p = np.maximum(predicted, FLOOR)
    p = p / p.sum(axis=1, keepdims=True)
    middle = (target + p) / 2
    return {
        "jsd": float(np.mean(0.5 * _kl(target, middle, 2) + 0.5 * _kl(p, middle, 2))),
        "kl": float(np.mean(_kl(target, p, np.e))),
        "bhattacharyya": float(np.mean(np.sqrt(target * p).sum(axis=1))),
        "n": len(target),
    }


def _kl(a: np.ndarray, b: np.ndarray, base: float) -> np.ndarray:
    terms = np.where(a > 0, a * (np.log(np.maximum(a, 1e-300)) - np.log(b)), 0.0)
    return terms.sum(axis=1) / np.log(base)  # type: ignore[no-any-return]


def vote_report(
    votes: Sequence[Mapping[str, float]], scored: Sequence[str], predicted: np.ndarray
) -> dict[str, Any]:
    """The metrics of `predicted` (clips, scored labels) against each clip's votes, with the
    bookkeeping of the rules above."""
    columns = set().union(*(v.keys() for v in votes)) if votes else set()
    missing = [label for label in scored if label not in columns]
    if missing:
        log.warning(
            "votes: no %s column(s) for %s: counted as zero votes",
            VOTE_PREFIX + "<label>",
            ", ".join(missing),
        )
    matrix = np.array([[float(v.get(label, 0.0)) for label in scored] for v in votes])
    totals = np.array([float(sum(v.values())) for v in votes])
    kept = matrix.sum(axis=1)
    has_votes = kept > 0
    dropped = np.where(totals > 0, 1.0 - kept / np.maximum(totals, 1e-300), 0.0)
    report: dict[str, Any] = (
        vote_metrics(matrix[has_votes], predicted[has_votes])
        if has_votes.any()
        else {"n": 0, "error": "no clip has a vote on a scored label"}
    )
    return report | {
        "dropped_vote_mass": float(dropped[totals > 0].mean()) if (totals > 0).any() else 0.0,
        "missing_columns": missing,
        "n_without_votes": int((~has_votes).sum()),
    }


def format_votes(figures: Mapping[str, Any]) -> str:
    """One line for the eval tables."""
    if figures.get("n", 0) == 0:
        return f"votes: {figures.get('error', 'none')}"
    line = (
        f"votes: JSD {figures['jsd']:.4f}  KL {figures['kl']:.4f}  "
        f"BC {figures['bhattacharyya']:.4f}  (n {figures['n']}"
    )
    if figures["dropped_vote_mass"] > 0:
        line += f", {100 * figures['dropped_vote_mass']:.1f}% of votes on unscored labels"
    if figures["missing_columns"]:
        line += f", no votes column for {', '.join(figures['missing_columns'])}"
    return line + ")"
