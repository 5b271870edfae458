"""Every recognizer and their fusion on a manifest: `eval` with sources, and `calibrate`.

Sources: the specialist ("specialist"), further ONNX specialists ("specialist:<model id>")
and the ALM ("alm"). `eval` reports each source after label mapping and temperature (as it
enters fusion) and the fused output, learning nothing from the clips it scores. `calibrate`
runs the same sources on a separate development manifest and writes a fusion file.

With annotators' votes in the manifest (`votes_<label>` columns), each report also gets the
distribution metrics of the token-level-logits paper against the vote distribution
(`stream_ser.ambiguity`, which states the rules for missing columns and unscored labels).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_ser import alm_analysis
from stream_ser.alm.base import AlmBackend
from stream_ser.ambiguity import format_votes
from stream_ser.calibration import calibrate
from stream_ser.errors import StreamSerError
from stream_ser.evaluate import (
    Clip,
    Failure,
    Report,
    label_subset,
    load_audio,
    recognize,
    resolve_adaptation,
    restrict,
)
from stream_ser.fusion import FusionConfig, align, fuse, temper
from stream_ser.specialist import Specialist

log = logging.getLogger(__name__)

Distribution = dict[str, float]
MIN_CALIBRATION_CLIPS = 10
"""Fewer clips that every source answered and calibration refuses to fit."""


@dataclass
class Recognizers:
    """The sources to run on each clip."""

    specialist: Specialist
    extras: list[Specialist] = field(default_factory=list)
    alm: AlmBackend | None = None
    alm_batch: int = 8
    probes: tuple[str, ...] = ()
    """Cue probes to run the ALM with besides its own cue mode (`--probes`)."""

    def names(self) -> list[str]:
        """Source names, as in fusion files and published results."""
        names = ["specialist", *(f"specialist:{s.card.model_id}" for s in self.extras)]
        return [*names, "alm"] if self.alm is not None else names


@dataclass
class Scores:
    """Per source, one distribution (its own labels) per clip, or None where it failed."""

    clips: list[Clip]
    per_source: dict[str, list[Distribution | None]]
    adaptation: str
    failures: list[Failure]
    alm_templates: list[alm_analysis.Members] = field(default_factory=list)
    """The ALM's per-template distributions per clip (its own cue mode)."""
    template_names: list[str] = field(default_factory=list)
    probe_runs: dict[str, list[alm_analysis.Members]] = field(default_factory=dict)
    """Per probe (cue mode), the ALM's per-template distributions per clip."""


def score(recognizers: Recognizers, clips: Sequence[Clip], adapt: str = "auto") -> Scores:
    """Run every source on every clip (the specialist with causal per-speaker adaptation)."""
    specialist = recognizers.specialist
    adaptation = resolve_adaptation(adapt, specialist, clips)
    kept: list[Clip] = []
    failures: list[Failure] = []
    per_source: dict[str, list[Distribution | None]] = {n: [] for n in recognizers.names()}
    audio: list[np.ndarray] = []
    for clip, outcome in recognize(specialist, clips, adaptation):
        if isinstance(outcome, Failure):
            log.warning("skipped %s", outcome.reason)
            failures.append(outcome)
            continue
        kept.append(clip)
        audio.append(load_audio(clip.path))
        per_source["specialist"].append(_as_dict(specialist.labels, outcome))
    for extra in recognizers.extras:
        per_source[f"specialist:{extra.card.model_id}"] = list(_score_extra(extra, audio))
    scores = Scores(kept, per_source, adaptation, failures)
    if recognizers.alm is not None:
        _score_alm(recognizers, kept, audio, scores)
    return scores


def _as_dict(labels: Sequence[str], row: np.ndarray) -> Distribution:
    return {label: float(p) for label, p in zip(labels, row, strict=True)}


def _score_extra(extra: Specialist, audio: list[np.ndarray]) -> Iterator[Distribution | None]:
    for clip in audio:
        try:
            yield _as_dict(extra.labels, extra.predict([clip])[0])
        except StreamSerError as err:
            log.warning("%s: %s", extra.card.model_id, err)
            yield None


def _score_alm(
    recognizers: Recognizers, clips: list[Clip], audio: list[np.ndarray], scores: Scores
) -> None:
    """The ALM in its own cue mode (per template, and their mean), and under each probe."""
    alm = recognizers.alm
    assert alm is not None
    own = alm.options.cues if alm.kind != "clap" else "none"
    runs = alm_analysis.run_modes(
        alm, clips, audio, recognizers.alm_batch, [own, *recognizers.probes]
    )
    scores.alm_templates = runs[own]
    scores.per_source["alm"] = alm_analysis.means(alm.labels, runs[own])
    scores.template_names = alm.template_names()
    scores.probe_runs = {mode: runs[mode] for mode in recognizers.probes}


def truth(scores: Scores) -> list[str]:
    """The true label of each scored clip."""
    return [clip.label for clip in scores.clips]


def _aligned(distribution: Distribution, name: str, fusion: FusionConfig) -> np.ndarray:
    source = fusion.source(name)
    aligned = align(distribution, source, fusion.labels, name)
    return temper(aligned.probabilities, aligned.covered, source.temperature)


def report_dict(
    name: str,
    rows: list[np.ndarray | None],
    scores: Scores,
    fusion: FusionConfig,
    subset: tuple[str, ...],
) -> dict[str, Any]:
    """The eval figures of one source (or of the fusion) over the clips where it answered."""
    answered = [(i, row) for i, row in enumerate(rows) if row is not None]
    if not answered:
        return {"n": 0, "n_failed": len(rows), "error": "no answer on any clip"}
    index = [i for i, _ in answered]
    probabilities = restrict(np.vstack([row for _, row in answered]), fusion.labels, subset)
    y_true = np.array([subset.index(scores.clips[i].label) for i in index])
    votes = [scores.clips[i].votes for i in index]
    report = Report(
        name, subset, scores.adaptation, y_true, probabilities,
        votes=[v for v in votes if v is not None] if all(v is not None for v in votes) else None,
    )  # fmt: skip
    return report.to_dict() | {"n_failed": len(rows) - len(index)}


def evaluate_sources(scores: Scores, fusion: FusionConfig) -> dict[str, Any]:
    """The fused output's figures at the top level, each source's under `sources`."""
    subset = label_subset(fusion.labels, scores.clips)
    per_source: dict[str, list[np.ndarray | None]] = {
        name: [None if d is None else _aligned(d, name, fusion) for d in distributions]
        for name, distributions in scores.per_source.items()
    }
    fused: list[np.ndarray | None] = []
    for item in range(len(scores.clips)):
        available = {name: d[item] for name, d in scores.per_source.items() if d[item] is not None}
        fused.append(fuse(available, fusion)[0] if available else None)  # type: ignore[arg-type]
    result = report_dict("fused", fused, scores, fusion, subset)
    result["sources"] = {
        name: report_dict(name, rows, scores, fusion, subset) for name, rows in per_source.items()
    }
    if "alm" in result["sources"]:
        result["sources"]["alm"]["templates"] = alm_analysis.template_report(
            scores.template_names, scores.alm_templates, truth(scores), fusion, subset
        )
    if scores.probe_runs:
        result["probes"] = alm_analysis.probe_table(
            scores.probe_runs, scores.per_source["specialist"], truth(scores), fusion, subset
        )
    result["fusion"] = {"rule": fusion.rule, "labels": list(fusion.labels)}
    result["failed"] = [{"path": f.path, "reason": f.reason} for f in scores.failures]
    return result


def calibrate_sources(scores: Scores, base: FusionConfig, per_class: bool) -> FusionConfig:
    """Fit temperatures and weights on a development set's scores (clips where all answered)."""
    complete = [
        i for i in range(len(scores.clips))
        if all(d[i] is not None for d in scores.per_source.values())
    ]  # fmt: skip
    if len(complete) < MIN_CALIBRATION_CLIPS:
        raise StreamSerError(
            f"calibration needs at least {MIN_CALIBRATION_CLIPS} clips every source answered; "
            f"{len(complete)} here"
        )
    scored = label_subset(base.labels, scores.clips)  # every dev label must be an output label
    per_source: dict[str, list[Distribution]] = {
        name: [d for i, d in enumerate(column) if i in complete and d is not None]
        for name, column in scores.per_source.items()
    }
    labels = [scores.clips[i].label for i in complete]
    return calibrate(per_source, labels, base, per_class, scored)


def print_report(result: dict[str, Any], as_json: bool) -> None:
    """The eval output: one JSON object, or a table per source and for the fusion."""
    if as_json:
        print(json.dumps(result))
        return
    for name, figures in [*result["sources"].items(), ("fused", result)]:
        print(f"== {name} ==")
        if figures.get("n", 0) == 0:
            print("no answer on any clip\n")
            continue
        print(_table(figures))
        if "votes" in figures:
            print(format_votes(figures["votes"]))
        if len(figures.get("templates", [])) > 1:
            print(alm_analysis.format_templates(figures["templates"]))
        print()
    if "probes" in result:
        print("== cue probes (ALM and fused; neutral: the ALM's) ==")
        print(alm_analysis.format_probes(result["probes"]))


def _table(figures: dict[str, Any]) -> str:
    lines = [
        f"n {figures['n']} ({figures['n_failed']} without an answer)   "
        f"UAR {figures['uar']:.3f}   WA {figures['wa']:.3f}   "
        f"macro-F1 {figures['macro_f1']:.3f}   ECE {figures['ece']:.3f}",
        "recall: " + "  ".join(f"{k} {v:.2f}" for k, v in figures["per_class_recall"].items()),
    ]
    return "\n".join(lines)
