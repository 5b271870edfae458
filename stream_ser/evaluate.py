"""`stream-ser eval`: run the specialist on labelled clips and report how well it does.

A manifest is a CSV file with at least `path,label` (paths relative to the manifest's folder, or
to `--root`); an optional `speaker` column turns on causal speaker adaptation for adaptive models:
each speaker's clips are one stream, replayed in manifest order, and a clip is normalised only
with the clips of that speaker that came before it (see `stream_ser.adaptation`).

Each clip is recognised as one utterance. Clips that cannot be read are reported and counted,
and left out of the metrics. When the manifest's labels are a subset of the model's, the model's
probabilities are restricted to that subset (and renormalised) before scoring. Several manifests
(corpora) and replay orders: `stream_ser.eval_corpora`.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr

from stream_ser import SAMPLE_RATE
from stream_ser.adaptation import StreamBaseline
from stream_ser.ambiguity import VOTE_PREFIX, format_votes, vote_report
from stream_ser.errors import AudioInputError, ConfigError, ModelError, StreamSerError
from stream_ser.specialist import Specialist

log = logging.getLogger(__name__)

ADAPT_CHOICES = ("auto", "stream", "none")
MAX_THREADS = 64
DARK_CELL_SHARE = 0.5  # confusion-matrix cells darker than this get white text
ORDER_CHOICES = ("manifest", "shuffled", "blocked")  # see stream_ser.eval_corpora
ECE_BINS = 15
PROGRESS_MIN_CLIPS = 20
TOOLS_HINT = "pip install 'stream-ser[tools]'"


@dataclass(frozen=True)
class Clip:
    """One manifest row."""

    path: Path
    label: str
    speaker: str | None  # None: the manifest has no speaker column
    votes: dict[str, float] | None = None  # annotators' votes per label (votes_<label> columns)
    corpus: str | None = None  # the `corpus` column, or the manifest's name (several manifests)


@dataclass(frozen=True)
class Failure:
    """A clip that could not be evaluated."""

    path: str
    reason: str


@dataclass
class Report:
    """Everything `eval` measured; `to_dict` is the `--json` output."""

    model_id: str
    labels: tuple[str, ...]  # the scored labels, in the model's order
    adaptation: str  # "stream" or "none"
    y_true: np.ndarray  # label indices into `labels`
    probabilities: np.ndarray  # (n, len(labels)), restricted and renormalised
    failures: list[Failure] = field(default_factory=list)
    votes: list[dict[str, float]] | None = None  # per scored clip, when the manifest has votes

    @property
    def y_pred(self) -> np.ndarray:
        """Predicted label indices."""
        return self.probabilities.argmax(axis=1)  # type: ignore[no-any-return]

    def confusion(self) -> np.ndarray:
        """Counts, rows true label, columns predicted label."""
        return confusion_matrix(self.y_true, self.y_pred, len(self.labels))

    def to_dict(self) -> dict[str, Any]:
        """The metrics as one JSON-ready object."""
        matrix = self.confusion()
        confidences = self.probabilities.max(axis=1)
        correct = self.y_pred == self.y_true
        return {
            "model_id": self.model_id,
            "n": len(self.y_true),
            "n_failed": len(self.failures),
            "uar": unweighted_average_recall(matrix),
            "wa": accuracy(matrix),
            "macro_f1": macro_f1(matrix),
            "per_class_recall": dict(zip(self.labels, recalls(matrix).tolist(), strict=True)),
            "support": dict(zip(self.labels, matrix.sum(axis=1).tolist(), strict=True)),
            "confusion": {"labels": list(self.labels), "matrix": matrix.tolist()},
            "ece": expected_calibration_error(confidences, correct),
            "adaptation": self.adaptation,
            "failed": [{"path": f.path, "reason": f.reason} for f in self.failures],
        } | self._votes()

    def _votes(self) -> dict[str, Any]:
        if not self.votes:
            return {}
        return {"votes": vote_report(self.votes, self.labels, self.probabilities)}


# --------------------------------------------------------------------------- metrics


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """Counts (classes, classes): rows true, columns predicted."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def recalls(matrix: np.ndarray) -> np.ndarray:
    """Recall per true class; 0 for classes with no examples."""
    support = matrix.sum(axis=1)
    diagonal = np.diag(matrix).astype(np.float64)
    result: np.ndarray = np.divide(diagonal, support, out=np.zeros(len(matrix)), where=support > 0)
    return result


def unweighted_average_recall(matrix: np.ndarray) -> float:
    """Macro recall over the classes that occur."""
    present = matrix.sum(axis=1) > 0
    return float(recalls(matrix)[present].mean()) if present.any() else 0.0


def accuracy(matrix: np.ndarray) -> float:
    """Weighted accuracy: correct / all."""
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else 0.0


def macro_f1(matrix: np.ndarray) -> float:
    """Mean F1 over the classes that occur (F1 = 0 where nothing was predicted right)."""
    present = matrix.sum(axis=1) > 0
    if not present.any():
        return 0.0
    true_positive = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(len(matrix)), where=denominator > 0)
    return float(f1[present].mean())


def calibration_bins(
    confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per equal-width confidence bin, empty bins included."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        if count:
            rows.append((float(confidences[members].mean()), float(correct[members].mean()), count))
        else:
            rows.append(((edges[b] + edges[b + 1]) / 2, 0.0, 0))
    return rows


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Sum over confidence bins of |accuracy - confidence| weighted by the bin's share."""
    total = len(confidences)
    if total == 0:
        return 0.0
    rows = calibration_bins(np.asarray(confidences), np.asarray(correct, dtype=float), bins)
    return float(sum(count * abs(acc - conf) for conf, acc, count in rows) / total)


# --------------------------------------------------------------------------- data


def read_manifest(path: Path, root: Path | None = None, corpus: str | None = None) -> list[Clip]:
    """The rows of a manifest CSV; paths resolved against `root` or the manifest's folder; a
    `corpus` column overrides `corpus` (see `stream_ser.eval_corpora`)."""
    base = root if root is not None else path.parent
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            if not {"path", "label"} <= columns:
                raise ConfigError(f"{path}: a manifest needs the columns path,label")
            has_speaker = "speaker" in columns
            has_corpus = "corpus" in columns
            vote_columns = sorted(c for c in columns if c.startswith(VOTE_PREFIX))
            clips = [
                Clip(
                    base / row["path"],
                    row["label"].strip(),
                    row["speaker"] if has_speaker else None,
                    _votes(row, vote_columns, path) if vote_columns else None,
                    row["corpus"].strip() if has_corpus else corpus,
                )
                for row in reader
            ]
    except OSError as err:
        raise ConfigError(f"cannot read manifest {path}: {err.strerror}") from err
    except (csv.Error, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: invalid CSV: {err}") from err
    if not clips:
        raise ConfigError(f"{path}: the manifest lists no clips")
    return clips


def check_clips_exist(clips: Sequence[Clip], manifest: Path, root: Path | None) -> None:
    """Warn about clips that are not there, with a hint at --root; none there: ConfigError."""
    missing = [clip.path for clip in clips if not clip.path.is_file()]
    if not missing:
        return
    base = f"--root {root}" if root is not None else f"the manifest's folder {manifest.parent}"
    message = (
        f"{len(missing)} of {len(clips)} clip(s) in {manifest}: no such file, e.g. {missing[0]} "
        f"(paths are relative to {base}; give --root DIR if they are relative to another folder)"
    )
    if len(missing) == len(clips):
        raise ConfigError(message)
    log.warning("%s", message)


def _votes(row: dict[str, str], columns: Sequence[str], path: Path) -> dict[str, float]:
    try:
        votes = {c[len(VOTE_PREFIX) :]: float(row[c] or 0) for c in columns}
    except ValueError as err:
        raise ConfigError(f"{path}: vote columns must be numbers ({err})") from err
    if any(v < 0 for v in votes.values()):
        raise ConfigError(f"{path}: vote counts must be >= 0")
    return votes


def load_audio(path: Path) -> np.ndarray:
    """A whole file as 16 kHz mono float32."""
    if not path.is_file():
        raise AudioInputError(f"{path}: no such file")
    try:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioInputError(f"{path}: cannot read audio: {err}") from err
    mono = audio.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32)
    mono = np.where(np.isfinite(mono), mono, np.float32(0.0))
    return np.clip(mono, -1.0, 1.0)


def label_subset(model_labels: Sequence[str], clips: Iterable[Clip]) -> tuple[str, ...]:
    """The manifest's labels in the model's order; a label the model lacks is a ConfigError."""
    wanted = {clip.label for clip in clips}
    unknown = sorted(wanted - set(model_labels))
    if unknown:
        raise ConfigError(
            f"the manifest has label(s) {', '.join(unknown)} that the model cannot produce "
            f"(model labels: {', '.join(model_labels)})"
        )
    return tuple(label for label in model_labels if label in wanted)


def restrict(
    probabilities: np.ndarray, model_labels: Sequence[str], subset: Sequence[str]
) -> np.ndarray:
    """Keep the subset's columns (in subset order) and renormalise each row."""
    columns = [list(model_labels).index(label) for label in subset]
    kept = probabilities[:, columns]
    return kept / np.maximum(kept.sum(axis=1, keepdims=True), 1e-300)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- replay


def resolve_adaptation(mode: str, specialist: Specialist, clips: Sequence[Clip]) -> str:
    """'stream' or 'none' for --adapt auto|stream|none."""
    adaptive = specialist.card.adaptation is not None
    has_speakers = all(clip.speaker is not None for clip in clips)
    if mode == "auto":
        return "stream" if adaptive and has_speakers else "none"
    if mode == "stream" and not adaptive:
        raise ConfigError(f"--adapt stream: model {specialist.card.model_id} has no adaptation")
    if mode == "stream" and not has_speakers:
        log.warning("--adapt stream without a speaker column: all clips are one stream")
    return mode


def recognize(
    specialist: Specialist, clips: Sequence[Clip], adaptation: str
) -> Iterator[tuple[Clip, np.ndarray | Failure]]:
    """Each clip with its probabilities (model label order) or why it failed, in order."""
    streams: dict[tuple[str | None, str | None], StreamBaseline] = {}
    card = specialist.card.adaptation
    for clip in clips:
        try:
            audio = load_audio(clip.path)
            if adaptation == "stream" and card is not None:
                stream = streams.setdefault((clip.corpus, clip.speaker), StreamBaseline(card))
                probabilities, embeddings = specialist.analyze([audio], stream.current())
                if embeddings is not None:
                    stream.update(embeddings[0], probabilities[0])
            else:
                probabilities = specialist.predict([audio])
        except (AudioInputError, ModelError) as err:
            yield clip, Failure(str(clip.path), str(err))
            continue
        yield clip, probabilities[0]


def evaluate(
    specialist: Specialist, clips: Sequence[Clip], adapt: str = "auto", progress: bool = True
) -> Report:
    """Recognise every clip and collect the scores."""
    subset = label_subset(specialist.labels, clips)
    adaptation = resolve_adaptation(adapt, specialist, clips)
    rows: list[np.ndarray] = []
    truth: list[int] = []
    votes: list[dict[str, float] | None] = []
    failures: list[Failure] = []
    for clip, outcome in _with_progress(
        recognize(specialist, clips, adaptation), len(clips), progress
    ):
        if isinstance(outcome, Failure):
            log.warning("skipped %s", outcome.reason)
            failures.append(outcome)
            continue
        rows.append(outcome)
        truth.append(subset.index(clip.label))
        votes.append(clip.votes)
    if not rows:
        raise StreamSerError(f"no clip could be evaluated ({len(failures)} failed)")
    probabilities = restrict(np.vstack(rows), specialist.labels, subset)
    return Report(
        specialist.card.model_id, subset, adaptation, np.asarray(truth), probabilities, failures,
        [v for v in votes if v is not None] if all(v is not None for v in votes) else None,
    )  # fmt: skip


def _with_progress(items: Iterator[Any], total: int, enabled: bool) -> Iterator[Any]:
    if not enabled or total < PROGRESS_MIN_CLIPS:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield from _progress_lines(items, total)
        return
    yield from tqdm(items, total=total, unit="clip", file=sys.stderr, leave=False)


def _progress_lines(items: Iterator[Any], total: int) -> Iterator[Any]:
    step = max(1, total // 10)
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0 or done == total:
            print(f"stream-ser eval: {done}/{total} clips", file=sys.stderr)


# --------------------------------------------------------------------------- output


def format_table(report: Report) -> str:
    """A readable summary: headline metrics, per-class table, confusion matrix."""
    metrics = report.to_dict()
    matrix = report.confusion()
    predicted = matrix.sum(axis=0)
    width = max(8, *(len(label) for label in report.labels))
    lines = [
        f"model {report.model_id}: {metrics['n']} clip(s), {metrics['n_failed']} failed, "
        f"adaptation {report.adaptation}",
        f"UAR {metrics['uar']:.3f}  WA {metrics['wa']:.3f}  macro-F1 {metrics['macro_f1']:.3f}"
        f"  ECE {metrics['ece']:.3f}",
        "",
        f"{'label':<{width}}  {'n':>5}  {'recall':>6}  {'precision':>9}",
    ]
    for i, label in enumerate(report.labels):
        precision = matrix[i, i] / predicted[i] if predicted[i] else 0.0
        recall = metrics["per_class_recall"][label]
        lines.append(f"{label:<{width}}  {matrix[i].sum():>5}  {recall:>6.3f}  {precision:>9.3f}")
    lines += ["", "confusion (rows: true, columns: predicted)"]
    lines.append(" " * width + "  " + " ".join(f"{label[:5]:>5}" for label in report.labels))
    for i, label in enumerate(report.labels):
        lines.append(f"{label:<{width}}  " + " ".join(f"{count:>5}" for count in matrix[i]))
    if "votes" in metrics:
        lines += ["", format_votes(metrics["votes"])]
    for failure in report.failures:
        lines.append(f"failed: {failure.reason}")
    return "\n".join(lines)


def write_plots(report: Report, directory: Path) -> list[Path]:
    """confusion.png and reliability.png in `directory`; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(f"--plots needs matplotlib: {TOOLS_HINT}") from err
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "confusion.png", directory / "reliability.png"]
    _plot_confusion(plt, report, paths[0])
    _plot_reliability(plt, report, paths[1])
    return paths


def _plot_confusion(plt: Any, report: Report, path: Path) -> None:
    matrix = report.confusion()
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * len(report.labels),) * 2)
    axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(report.labels))
    axes.set_xticks(ticks, report.labels, rotation=45, ha="right")
    axes.set_yticks(ticks, report.labels)
    for i in ticks:
        for j in ticks:
            colour = "white" if share[i, j] > DARK_CELL_SHARE else "black"
            axes.text(j, i, str(matrix[i, j]), ha="center", va="center", color=colour)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    uar = unweighted_average_recall(matrix)
    axes.set_title(f"{report.model_id}\nUAR {uar:.3f}, adaptation {report.adaptation}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_reliability(plt: Any, report: Report, path: Path) -> None:
    confidences = report.probabilities.max(axis=1)
    correct = (report.y_pred == report.y_true).astype(float)
    rows = calibration_bins(confidences, correct)
    width = 1.0 / len(rows)
    centers = [(b + 0.5) * width for b in range(len(rows))]
    figure, axes = plt.subplots(figsize=(5, 5.4))
    axes.bar(centers, [acc for _, acc, _ in rows], width=width * 0.9, label="accuracy")
    for center, (_, acc, count) in zip(centers, rows, strict=True):
        if count:  # how many clips a bar stands for
            axes.text(center, acc + 0.01, str(count), ha="center", va="bottom", fontsize=7)
    axes.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("confidence (top probability); clips per bin above the bars")
    axes.set_ylabel("accuracy")
    ece = expected_calibration_error(confidences, correct)
    axes.set_title(f"reliability, ECE {ece:.3f}")
    figure.legend(loc="lower center", ncol=2, frameon=False)  # below: bars fill the axes
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
