"""The ALM papers' analyses in `stream-ser eval`: cue probes and prompt-template sensitivity.

Probes (`--probes aligned,none,shuffled,corrupted,conflicting`): the ALM scores the same clips
once per cue mode. The true cues are computed once per clip (each speaker's clips one causal
stream, as in a live stream) and each probe is applied to them (`acoustics.probe`). The table
gives, per probe: the ALM's UAR and the fused UAR, each with its change against `none` (no cue
sentence), and the shift toward neutral - the share of clips the ALM labels neutral and its mean
neutral probability, each minus that under `none` (the cue-token paper's analysis: do cues push
the model toward "neutral"?).

Per-template results: the prompt ensemble's members (question templates, or CLAP class-description
templates) are scored one by one, so the UAR of each template shows the prompt sensitivity.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from stream_ser.acoustics import CUE_MODES, CueTokens, StreamAcoustics
from stream_ser.alm.base import AlmBackend, template_means
from stream_ser.errors import ConfigError, StreamSerError
from stream_ser.evaluate import Clip, Report, restrict
from stream_ser.fusion import FusionConfig, align, fuse, temper

log = logging.getLogger(__name__)

Distribution = dict[str, float]
Members = list[Distribution] | None
"""One clip's per-template distributions, or None where the ALM failed."""


def parse_probes(text: str | None) -> tuple[str, ...]:
    """ "aligned,none,..." -> the cue modes, checked; None or "" -> no probes."""
    modes = tuple(dict.fromkeys(m.strip() for m in (text or "").split(",") if m.strip()))
    unknown = [m for m in modes if m not in CUE_MODES]
    if unknown:
        raise ConfigError(f"--probes: unknown probe(s) {unknown}; known: {', '.join(CUE_MODES)}")
    if modes and "none" not in modes:
        modes = (*modes, "none")  # every probe is compared with no cues
    return modes


def with_cue_mode(alm: AlmBackend, mode: str) -> AlmBackend:
    """The same loaded backend (shared model) with another cue mode."""
    if mode != "none" and alm.kind == "clap":
        raise ConfigError("--probes: cue probes need a generative ALM (qwen2-audio, openai)")
    view = copy.copy(alm)
    view.options = replace(alm.options, cues=mode)
    return view


def stream_cues(clips: Sequence[Clip], audio: Sequence[np.ndarray]) -> list[CueTokens]:
    """True cue tokens per clip, each speaker's clips one causal stream."""
    streams: dict[str | None, StreamAcoustics] = {}
    return [
        streams.setdefault(clip.speaker, StreamAcoustics()).analyse(samples).cues
        for clip, samples in zip(clips, audio, strict=True)
    ]


def run_modes(
    alm: AlmBackend,
    clips: Sequence[Clip],
    audio: Sequence[np.ndarray],
    batch: int,
    modes: Sequence[str],
) -> dict[str, list[Members]]:
    """Per cue mode, every clip's per-template distributions."""
    needs_cues = alm.kind != "clap" and any(mode != "none" for mode in modes)
    cues: list[CueTokens | None] = (
        list(stream_cues(clips, audio)) if needs_cues else [None] * len(audio)
    )
    return {
        mode: list(_members(with_cue_mode(alm, mode), audio, cues, batch))
        for mode in dict.fromkeys(modes)
    }


def _members(
    alm: AlmBackend, audio: Sequence[np.ndarray], cues: Sequence[CueTokens | None], batch: int
) -> Iterator[Members]:
    for start in range(0, len(audio), batch):
        part = audio[start : start + batch]
        try:
            yield from alm.predict_templates(part, cues[start : start + batch])
        except StreamSerError as err:
            log.warning("alm: %d clip(s) failed: %s", len(part), err)
            yield from [None] * len(part)


def means(labels: Sequence[str], members: Sequence[Members]) -> list[Distribution | None]:
    """The ensemble distribution of each clip (mean over its templates)."""
    return [None if m is None else template_means(labels, [m])[0] for m in members]


def _figures(
    rows: Sequence[Distribution | None],
    truth: Sequence[str],
    fusion: FusionConfig,
    subset: tuple[str, ...],
    name: str = "alm",
) -> tuple[dict[str, Any], np.ndarray | None]:
    """UAR and the like of one source's distributions, and its restricted probabilities."""
    answered = [(i, row) for i, row in enumerate(rows) if row is not None]
    if not answered:
        return {"n": 0, "uar": None}, None
    source = fusion.source(name)
    aligned = [align(row, source, fusion.labels, name) for _, row in answered]
    tempered = np.vstack([temper(a.probabilities, a.covered, source.temperature) for a in aligned])
    probabilities = restrict(tempered, fusion.labels, subset)
    y_true = np.array([subset.index(truth[i]) for i, _ in answered])
    report = Report(name, subset, "none", y_true, probabilities).to_dict()
    return {"n": report["n"], "uar": report["uar"]}, probabilities


def template_report(
    names: Sequence[str],
    members: Sequence[Members],
    truth: Sequence[str],
    fusion: FusionConfig,
    subset: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Per prompt template: its text and its UAR alone."""
    report = []
    for index, name in enumerate(names):
        rows = [None if m is None else m[index] for m in members]
        figures, _ = _figures(rows, truth, fusion, subset)
        report.append({"template": name, **figures})
    return report


def probe_table(
    runs: Mapping[str, Sequence[Members]],
    specialist: Sequence[Distribution | None],
    truth: Sequence[str],
    fusion: FusionConfig,
    subset: tuple[str, ...],
) -> dict[str, dict[str, Any]]:
    """Per probe: ALM and fused UAR, changes against `none`, and the shift toward neutral."""
    table = {}
    for mode, members in runs.items():
        alm = means(fusion.labels, members)
        figures, probabilities = _figures(alm, truth, fusion, subset)
        fused = [_fused(s, a, fusion) for s, a in zip(specialist, alm, strict=True)]
        fused_figures, _ = _figures(fused, truth, fusion, subset, "fused")
        table[mode] = {
            "alm_uar": figures["uar"],
            "fused_uar": fused_figures["uar"],
            "n": figures["n"],
            **_neutral(probabilities, subset),
        }
    return _against_none(table)


def _fused(
    specialist: Distribution | None, alm: Distribution | None, fusion: FusionConfig
) -> Distribution | None:
    available = {k: v for k, v in (("specialist", specialist), ("alm", alm)) if v is not None}
    if not available:
        return None
    return dict(zip(fusion.labels, fuse(available, fusion)[0].tolist(), strict=True))


def _neutral(probabilities: np.ndarray | None, subset: tuple[str, ...]) -> dict[str, Any]:
    if probabilities is None or "neutral" not in subset:
        return {"neutral_share": None, "neutral_mean_p": None}
    column = subset.index("neutral")
    return {
        "neutral_share": float(np.mean(probabilities.argmax(axis=1) == column)),
        "neutral_mean_p": float(probabilities[:, column].mean()),
    }


def _against_none(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    base = table["none"]
    for row in table.values():
        for key in ("alm_uar", "fused_uar", "neutral_share", "neutral_mean_p"):
            both = row[key] is not None and base[key] is not None
            row[f"{key}_vs_none"] = row[key] - base[key] if both else None
    return table


def format_probes(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The probe table as text."""
    head = (
        f"{'probe':<12} {'ALM UAR':>8} {'vs none':>8} {'fused UAR':>9} {'vs none':>8} "
        f"{'neutral %':>9} {'vs none':>8} {'P(neutral)':>10} {'vs none':>8}"
    )
    lines = [head]
    for mode, row in table.items():
        cells = [
            _num(row["alm_uar"], 8), _num(row["alm_uar_vs_none"], 8, True),
            _num(row["fused_uar"], 9), _num(row["fused_uar_vs_none"], 8, True),
            _num(_pct(row["neutral_share"]), 9, digits=1),
            _num(_pct(row["neutral_share_vs_none"]), 8, True, 1),
            _num(row["neutral_mean_p"], 10), _num(row["neutral_mean_p_vs_none"], 8, True),
        ]  # fmt: skip
        lines.append(f"{mode:<12} " + " ".join(cells))
    return "\n".join(lines)


def format_templates(report: Sequence[Mapping[str, Any]]) -> str:
    """Per-template UAR lines."""
    return "\n".join(
        f"  template {i + 1}: UAR {_num(row['uar'], 5).strip()}  {row['template'][:70]}"
        for i, row in enumerate(report)
    )


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _num(value: float | None, width: int, signed: bool = False, digits: int = 3) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>+{width}.{digits}f}" if signed else f"{value:>{width}.{digits}f}"
