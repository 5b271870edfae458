"""Every recognizer and their fusion on a manifest: `eval` with sources, and `calibrate`.

Sources: the specialist ("specialist"), further ONNX specialists ("specialist:<model id>")
and the ALM ("alm"). `eval` reports each source after label mapping and temperature (as it
enters fusion) and the fused output, learning nothing from the clips it scores. `calibrate`
runs the same sources on a separate development manifest and writes a fusion file.

With annotators' votes in the manifest (`votes_<label>` columns), each report also gets the
distribution metrics of the token-level-logits paper against the vote distribution, as means
over clips: Jensen-Shannon divergence (base 2, 0..1), KL(votes || prediction) in nats, and the
Bhattacharyya coefficient (1 = identical).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser.acoustics import CueTokens, StreamAcoustics
from stream_ser.alm.base import AlmBackend
from stream_ser.calibration import calibrate
from stream_ser.errors import StreamSerError
from stream_ser.evaluate import (
    Clip,
    Failure,
    Report,
    check_clips_exist,
    label_subset,
    load_audio,
    read_manifest,
    recognize,
    resolve_adaptation,
    restrict,
)
from stream_ser.fusion import FLOOR, FusionConfig, align, fuse, fusion_to_toml, temper
from stream_ser.specialist import Specialist

log = logging.getLogger(__name__)

Distribution = dict[str, float]


@dataclass
class Recognizers:
    """The sources to run on each clip."""

    specialist: Specialist
    extras: list[Specialist] = field(default_factory=list)
    alm: AlmBackend | None = None
    alm_batch: int = 8

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
    if recognizers.alm is not None:
        cues = _cues(recognizers.alm, kept, audio)
        per_source["alm"] = list(_score_alm(recognizers.alm, audio, cues, recognizers.alm_batch))
    return Scores(kept, per_source, adaptation, failures)


def _as_dict(labels: Sequence[str], row: np.ndarray) -> Distribution:
    return {label: float(p) for label, p in zip(labels, row, strict=True)}


def _score_extra(extra: Specialist, audio: list[np.ndarray]) -> Iterator[Distribution | None]:
    for clip in audio:
        try:
            yield _as_dict(extra.labels, extra.predict([clip])[0])
        except StreamSerError as err:
            log.warning("%s: %s", extra.card.model_id, err)
            yield None


def _cues(alm: AlmBackend, clips: list[Clip], audio: list[np.ndarray]) -> list[CueTokens | None]:
    """Cue tokens per clip, each speaker's clips one causal stream, when the ALM uses cues."""
    if alm.options.cues == "none" or alm.kind == "clap":
        return [None] * len(audio)
    streams: dict[str | None, StreamAcoustics] = {}
    cues: list[CueTokens | None] = []
    for clip, samples in zip(clips, audio, strict=True):
        stream = streams.setdefault(clip.speaker, StreamAcoustics())
        cues.append(stream.analyse(samples).cues)
    return cues


def _score_alm(
    alm: AlmBackend, audio: list[np.ndarray], cues: list[CueTokens | None], batch: int
) -> Iterator[Distribution | None]:
    for start in range(0, len(audio), batch):
        part = audio[start : start + batch]
        try:
            yield from alm.predict(part, cues[start : start + batch])
        except StreamSerError as err:
            log.warning("alm: %d clip(s) failed: %s", len(part), err)
            yield from [None] * len(part)


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
    report = Report(name, subset, scores.adaptation, y_true, probabilities)
    result = report.to_dict() | {"n_failed": len(rows) - len(index)}
    votes = [scores.clips[i].votes for i in index]
    if all(v is not None for v in votes):
        result["votes"] = vote_metrics(
            np.array([[v[label] for label in subset] for v in votes if v is not None]),
            probabilities,
        )
    return result


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
    result["fusion"] = {"rule": fusion.rule, "labels": list(fusion.labels)}
    result["failed"] = [{"path": f.path, "reason": f.reason} for f in scores.failures]
    return result


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


def calibrate_sources(scores: Scores, base: FusionConfig, per_class: bool) -> FusionConfig:
    """Fit temperatures and weights on a development set's scores (clips where all answered)."""
    complete = [
        i for i in range(len(scores.clips))
        if all(d[i] is not None for d in scores.per_source.values())
    ]  # fmt: skip
    if len(complete) < 10:
        raise StreamSerError(
            f"calibration needs at least 10 clips every source answered; {len(complete)} here"
        )
    label_subset(base.labels, scores.clips)  # every dev label must be an output label
    per_source: dict[str, list[Distribution]] = {
        name: [d for i, d in enumerate(column) if i in complete and d is not None]
        for name, column in scores.per_source.items()
    }
    labels = [scores.clips[i].label for i in complete]
    return calibrate(per_source, labels, base, per_class)


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
            v = figures["votes"]
            print(f"votes: JSD {v['jsd']:.4f}  KL {v['kl']:.4f}  BC {v['bhattacharyya']:.4f}")
        print()


def _table(figures: dict[str, Any]) -> str:
    lines = [
        f"n {figures['n']} ({figures['n_failed']} without an answer)   "
        f"UAR {figures['uar']:.3f}   WA {figures['wa']:.3f}   "
        f"macro-F1 {figures['macro_f1']:.3f}   ECE {figures['ece']:.3f}",
        "recall: " + "  ".join(f"{k} {v:.2f}" for k, v in figures["per_class_recall"].items()),
    ]
    return "\n".join(lines)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-extra, and the [alm] and [fusion] settings as flags."""
    from stream_ser.settings import add_arguments

    parser.add_argument(
        "--model-extra", action="append", default=[], metavar="DIR",
        help="a further ONNX specialist (repeatable); source name specialist:<model id>",
    )  # fmt: skip
    add_arguments(parser, sections=("alm", "fusion"))


def uses_sources(args: argparse.Namespace) -> bool:
    """Whether `eval` was asked for more than the specialist alone."""
    return bool(
        getattr(args, "alm__spec", None)
        or getattr(args, "fusion__file", None)
        or getattr(args, "model_extra", None)
    )


def calibrate_command(args: argparse.Namespace) -> int:
    """Run `stream-ser calibrate`: learn a fusion file on a development manifest."""
    from stream_ser.cli import load_recognizers, source_settings

    logging.basicConfig(level="WARNING", format="stream-ser: %(levelname)s: %(message)s")

    settings = source_settings(args)
    root = Path(args.root) if args.root else None
    clips = read_manifest(Path(args.manifest), root)
    check_clips_exist(clips, Path(args.manifest), root)
    recognizers, base = load_recognizers(settings, args.model, args.model_extra, args.threads)
    scores = score(recognizers, clips, args.adapt)
    config = calibrate_sources(scores, base, args.per_class)
    Path(args.out).write_text(fusion_to_toml(config), encoding="utf-8")
    before = evaluate_sources(scores, base)
    after = evaluate_sources(scores, config)
    print(f"wrote {args.out} from {len(scores.clips)} clips ({len(scores.failures)} unreadable)")
    for name in config.sources:
        source = config.source(name)
        print(f"  {name}: weight {source.weight:.2f}, temperature {source.temperature:.2f}")
    print(
        f"  on the development set: UAR {before['uar']:.3f} -> {after['uar']:.3f}, "
        f"ECE {before['ece']:.3f} -> {after['ece']:.3f} (optimistic: fitted here)"
    )
    return 0
