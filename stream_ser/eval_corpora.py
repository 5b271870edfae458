"""`stream-ser eval` over several corpora and in a chosen replay order.

Several manifests (or one manifest with a `corpus` column) are scored corpus by corpus: each
corpus's predictions are restricted to that corpus's labels, each speaker of each corpus is one
causal stream (`stream_ser.adaptation`), and the report gives every corpus's figures, their
mean, and the pooled figures over all clips.

The replay order matters to an adaptive model, whose per-speaker baseline follows the speaker's
earlier clips:

- `manifest`: the manifest's order;
- `shuffled`: a seeded random order;
- `blocked`: each speaker's clips emotion by emotion (all of one label, then all of the next;
  labels and the clips within a label in a seeded random order) - a speaker who stays in one mood
  for a while, the hard case for a running baseline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser.errors import ConfigError
from stream_ser.evaluate import (
    ORDER_CHOICES,
    Clip,
    Report,
    evaluate,
    format_table,
    read_manifest,
)
from stream_ser.specialist import Specialist

MANIFEST_STEM = "manifest"  # <corpus>/manifest.csv is named after its folder


def corpus_name(manifest: Path) -> str:
    """The corpus a manifest without a `corpus` column stands for: its file name, or its
    folder's name for `<folder>/manifest.csv`."""
    if manifest.stem == MANIFEST_STEM and manifest.parent.name:
        return manifest.parent.name
    return manifest.stem


def read_manifests(paths: Sequence[Path], root: Path | None = None) -> list[Clip]:
    """The clips of every manifest; with more than one, each clip's corpus is its manifest's
    `corpus` column or else the manifest's name (two manifests of one name are an error)."""
    if len(paths) == 1:
        return read_manifest(paths[0], root)
    names = [corpus_name(path) for path in paths]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"several manifests are named {', '.join(repeated)}: rename one")
    clips: list[Clip] = []
    for path, name in zip(paths, names, strict=True):
        clips += read_manifest(path, root, corpus=name)
    return clips


def replay_order(clips: Sequence[Clip], order: str, seed: int = 0) -> list[Clip]:
    """The clips in `order` (one of ORDER_CHOICES, see the module docstring); seeded."""
    if order == "manifest":
        return list(clips)
    rng = np.random.default_rng(seed)
    if order == "shuffled":
        return [clips[i] for i in rng.permutation(len(clips))]
    if order == "blocked":
        return _blocked(clips, rng)
    raise ConfigError(f"--order must be one of {', '.join(ORDER_CHOICES)}")


def _blocked(clips: Sequence[Clip], rng: np.random.Generator) -> list[Clip]:
    streams: dict[tuple[str | None, str | None], list[Clip]] = {}
    for clip in clips:  # streams in order of first appearance
        streams.setdefault((clip.corpus, clip.speaker), []).append(clip)
    result: list[Clip] = []
    for members in streams.values():
        labels = sorted({clip.label for clip in members})
        for label in (labels[i] for i in rng.permutation(len(labels))):
            block = [clip for clip in members if clip.label == label]
            result += [block[i] for i in rng.permutation(len(block))]
    return result


def by_corpus(clips: Sequence[Clip]) -> dict[str | None, list[Clip]]:
    """The clips of each corpus (None: no corpus given), corpora in order of first appearance."""
    groups: dict[str | None, list[Clip]] = {}
    for clip in clips:
        groups.setdefault(clip.corpus, []).append(clip)
    return groups


def evaluate_corpora(
    specialist: Specialist, clips: Sequence[Clip], adapt: str = "auto", progress: bool = True
) -> dict[str, Report]:
    """One report per corpus (each restricted to its own labels, its speakers' streams)."""
    return {
        str(name): evaluate(specialist, members, adapt, progress)
        for name, members in by_corpus(clips).items()
    }


def pooled(reports: dict[str, Report], model_labels: Sequence[str]) -> Report:
    """All corpora's clips as one report over the union of their labels; a clip keeps its own
    corpus's restricted probabilities (zero for labels its corpus lacks)."""
    present = {label for report in reports.values() for label in report.labels}
    labels = tuple(label for label in model_labels if label in present)
    rows, truth, failures = [], [], []
    for report in reports.values():
        columns = [labels.index(label) for label in report.labels]
        wide = np.zeros((len(report.y_true), len(labels)))
        wide[:, columns] = report.probabilities
        rows.append(wide)
        truth.append(np.asarray(columns)[report.y_true])
        failures += report.failures
    first = next(iter(reports.values()))
    adaptation = "/".join(sorted({report.adaptation for report in reports.values()}))
    votes = [report.votes for report in reports.values()]
    return Report(
        first.model_id, labels, adaptation, np.concatenate(truth), np.vstack(rows), failures,
        [v for per_corpus in votes if per_corpus for v in per_corpus] if all(votes) else None,
    )  # fmt: skip


def summary(reports: dict[str, Report]) -> dict[str, float]:
    """Mean UAR, WA, macro-F1 and ECE over the corpora (each corpus counts once)."""
    figures = [report.to_dict() for report in reports.values()]
    keys = ("uar", "wa", "macro_f1", "ece")
    return {key: float(np.mean([f[key] for f in figures])) for key in keys}


def report_dict(
    reports: dict[str, Report], model_labels: Sequence[str], order: str
) -> dict[str, Any]:
    """The `--json` object: the pooled figures at the top level (as for one corpus), plus
    `order`, and with several corpora `corpora` (each corpus's figures) and `corpus_mean`."""
    if len(reports) == 1:
        return next(iter(reports.values())).to_dict() | {"order": order}
    result = pooled(reports, model_labels).to_dict() | {"order": order}
    result["corpora"] = {name: report.to_dict() for name, report in reports.items()}
    result["corpus_mean"] = summary(reports)
    return result


def corpus_table(reports: dict[str, Report]) -> str:
    """One line per corpus and their mean: n, UAR, WA, macro-F1, ECE, adaptation."""
    width = max(6, *(len(name) for name in reports))
    lines = [f"{'corpus':<{width}}  {'n':>5}  {'UAR':>5}  {'WA':>5}  {'F1':>5}  {'ECE':>5}  adapt"]
    for name, report in reports.items():
        f = report.to_dict()
        lines.append(
            f"{name:<{width}}  {f['n']:>5}  {f['uar']:>5.3f}  {f['wa']:>5.3f}  "
            f"{f['macro_f1']:>5.3f}  {f['ece']:>5.3f}  {report.adaptation}"
        )
    mean = summary(reports)
    lines.append(
        f"{'mean':<{width}}  {'':>5}  {mean['uar']:>5.3f}  {mean['wa']:>5.3f}  "
        f"{mean['macro_f1']:>5.3f}  {mean['ece']:>5.3f}"
    )
    return "\n".join(lines)


def render(
    reports: dict[str, Report], model_labels: Sequence[str], order: str, as_json: bool
) -> str:
    """What `eval` prints: the JSON object, or the pooled table plus the per-corpus table."""
    if as_json:
        return json.dumps(report_dict(reports, model_labels, order))
    if len(reports) == 1:
        return format_table(next(iter(reports.values())))
    return format_table(pooled(reports, model_labels)) + "\n\n" + corpus_table(reports)
