"""The `eval` and `calibrate` commands: flags, and the runs built by the composition root."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stream_ser import alm_analysis, asr_eval, eval_corpora, fusion_eval
from stream_ser.app import load_recognizers
from stream_ser.errors import ConfigError
from stream_ser.evaluate import (
    ADAPT_CHOICES,
    MAX_THREADS,
    ORDER_CHOICES,
    Clip,
    check_clips_exist,
    label_subset,
    load_audio,
    read_manifest,
    write_plots,
)
from stream_ser.fusion import fusion_to_toml
from stream_ser.settings import add_arguments, build_settings
from stream_ser.specialist import Specialist, bundled_model_dir


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `stream-ser calibrate`."""
    parser.add_argument("manifest", metavar="DEV.csv", help="development manifest path,label[,...]")
    parser.add_argument("--out", "-o", required=True, metavar="FUSION.toml", help="file to write")
    parser.add_argument("--root", metavar="DIR", help="clip paths are relative to DIR")
    parser.add_argument("--model", metavar="DIR", help="specialist directory (default: bundled)")
    parser.add_argument("--adapt", choices=("auto", "stream", "none"), default="auto",
                        help="speaker adaptation while scoring (as in eval)")  # fmt: skip
    parser.add_argument("--per-class", action="store_true", help="also learn per-class weights")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    add_source_arguments(parser)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `stream-ser eval`."""
    parser.add_argument(
        "manifest",
        metavar="MANIFEST.csv",
        nargs="+",
        help="CSV with path,label[,speaker][,corpus]; several: one corpus each, scored per corpus",
    )
    parser.add_argument("--root", metavar="DIR", help="clip paths are relative to DIR")
    parser.add_argument("--model", metavar="DIR", help="model directory (default: bundled)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plots", metavar="DIR", help="write confusion.png and reliability.png")
    parser.add_argument(
        "--adapt",
        choices=ADAPT_CHOICES,
        default="auto",
        help="speaker adaptation: stream (each speaker one causal stream), none, or auto "
        "(stream when the manifest has a speaker column and the model is adaptive)",
    )
    parser.add_argument(
        "--order",
        choices=ORDER_CHOICES,
        default="manifest",
        help="replay order: the manifest's, shuffled, or blocked (each speaker's clips emotion "
        "by emotion); shuffled and blocked are seeded by --seed",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --order shuffled|blocked")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--probes", metavar="MODES",
        help="with --alm: also run the ALM under each cue probe (aligned,none,shuffled,corrupted,"
        "conflicting) and print the probe table (see docs/alm.md)",
    )  # fmt: skip
    add_source_arguments(parser)
    asr_eval.add_arguments(parser)


def _eval_sources(args: argparse.Namespace, clips: list[Clip]) -> int:
    """`eval` with an ALM, further specialists or a fusion file: every source and the fusion."""
    settings = build_settings(args)
    recognizers, fusion = load_recognizers(settings, args.model, args.model_extra, args.threads)
    recognizers.probes = alm_analysis.parse_probes(args.probes)
    if recognizers.probes and recognizers.alm is None:
        raise ConfigError("--probes needs an ALM (--alm KIND:PATH)")
    scores = fusion_eval.score(recognizers, clips, args.adapt)
    fusion_eval.print_report(fusion_eval.evaluate_sources(scores, fusion), args.json)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """Run `stream-ser eval`."""
    logging.basicConfig(level="WARNING", format="stream-ser: %(levelname)s: %(message)s")
    if not 1 <= args.threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be 1..{MAX_THREADS}")
    model_dir = Path(args.model) if args.model else bundled_model_dir()
    if not model_dir.is_dir():
        raise ConfigError(f"--model: no such model directory: {model_dir}")
    root = Path(args.root) if args.root else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--root: no such directory: {root}")
    manifests = [Path(manifest) for manifest in args.manifest]
    clips = eval_corpora.replay_order(
        eval_corpora.read_manifests(manifests, root), args.order, args.seed
    )
    manifest_name = Path(args.manifest[0]) if len(manifests) == 1 else Path("the manifests")
    if uses_sources(args) or args.probes:
        asr_eval.refuse_with_sources(args)
        check_clips_exist(clips, manifest_name, root)
        return _eval_sources(args, clips)
    specialist = Specialist(model_dir, intra_op_threads=args.threads)
    label_subset(specialist.labels, clips)  # a wrong label is reported before missing files
    check_clips_exist(clips, manifest_name, root)
    asr = asr_eval.from_args(args, load_audio)  # None without --transcribe
    reports = eval_corpora.evaluate_corpora(specialist, clips, args.adapt, not args.no_progress)
    report = eval_corpora.pooled(reports, specialist.labels)
    if args.plots:
        write_plots(report, Path(args.plots))
    asr_text = asr.format() if asr else ""
    if args.json:
        result = eval_corpora.report_dict(reports, specialist.labels, args.order)
        print(json.dumps(result | ({"asr": asr.to_dict()} if asr else {})))
    else:
        print(eval_corpora.render(reports, specialist.labels, args.order, False) + asr_text)
    return 0


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-extra, and the [alm] and [fusion] settings as flags."""
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
    logging.basicConfig(level="WARNING", format="stream-ser: %(levelname)s: %(message)s")

    settings = build_settings(args)
    root = Path(args.root) if args.root else None
    clips = read_manifest(Path(args.manifest), root)
    check_clips_exist(clips, Path(args.manifest), root)
    recognizers, base = load_recognizers(settings, args.model, args.model_extra, args.threads)
    scores = fusion_eval.score(recognizers, clips, args.adapt)
    config = fusion_eval.calibrate_sources(scores, base, args.per_class)
    Path(args.out).write_text(fusion_to_toml(config), encoding="utf-8")
    before = fusion_eval.evaluate_sources(scores, base)
    after = fusion_eval.evaluate_sources(scores, config)
    print(f"wrote {args.out} from {len(scores.clips)} clips ({len(scores.failures)} unreadable)")
    for name in config.sources:
        source = config.source(name)
        print(f"  {name}: weight {source.weight:.2f}, temperature {source.temperature:.2f}")
    print(
        f"  on the development set: UAR {before['uar']:.3f} -> {after['uar']:.3f}, "
        f"ECE {before['ece']:.3f} -> {after['ece']:.3f} (optimistic: fitted here)"
    )
    return 0
