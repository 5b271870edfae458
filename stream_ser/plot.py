"""`stream-ser plot`: an emotion-over-time timeline PNG of a recorded session.

Input: JSON Lines of results, as `stream-ser run` prints them (or `stream-ser tail --json`
records them). Each final utterance result is one stacked bar spanning its stream time
(`start_ms`..`end_ms`), split by the probability of each label, with its top label written
above it; silence between utterances stays blank. One panel per stream, plus a panel of
arousal and valence where the results carry them. Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from stream_ser.errors import ConfigError, StreamSerError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'stream-ser[plot]'"
STDIN = Path("-")  # the results argument that reads stdin
HORIZONTAL_LABELS_UP_TO = 12  # more utterances than this: top labels are written vertically
MAX_WIDTH_IN = 40.0  # figure width grows with the utterance count up to this
LABEL_GAP_PX = 12  # a top label closer than this to the previous one is left out
COLOURS = {
    "neutral": "#9e9e9e", "calm": "#80cbc4", "happy": "#fbc02d", "sad": "#1e88e5",
    "angry": "#e53935", "fearful": "#8e24aa", "disgust": "#43a047", "surprise": "#fb8c00",
    "contempt": "#6d4c41", "other": "#cfd8dc",
}  # fmt: skip


@dataclass(frozen=True)
class Utterance:
    """One final utterance result, as plotted."""

    stream_id: str
    start_s: float
    end_s: float
    distribution: dict[str, float]
    top_label: str
    top_probability: float
    affect: tuple[float, float] | None  # (arousal, valence), if the result has them


def read_results(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (`-`: stdin); lines that are not JSON are skipped
    (counted)."""
    try:
        text = sys.stdin.read() if path == STDIN else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise StreamSerError(f"cannot read {path}: {reason}") from err
    messages, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(message, dict):
            messages.append(message)
    if bad:
        log.warning("%s: skipped %d line(s) that are not JSON", path, bad)
    return messages


def final_utterances(messages: Iterable[Mapping[str, Any]]) -> list[Utterance]:
    """Final utterance results, each message id once, in stream time order."""
    seen: set[str] = set()
    found = []
    for message in messages:
        if message.get("type") != "utterance" or message.get("final") is False:
            continue
        message_id = str(message.get("id", ""))
        if message_id and message_id in seen:
            continue
        seen.add(message_id)
        if (utterance := _utterance(message)) is not None:
            found.append(utterance)
    return sorted(found, key=lambda u: (u.stream_id, u.start_s))


def _utterance(message: Mapping[str, Any]) -> Utterance | None:
    distribution = message.get("distribution")
    start, end = message.get("start_ms"), message.get("end_ms")
    if not isinstance(distribution, dict) or not distribution:
        return None
    if not isinstance(start, int | float) or not isinstance(end, int | float) or end <= start:
        return None
    top = max(distribution, key=distribution.__getitem__)
    return Utterance(
        stream_id=str(message.get("stream_id", "?")),
        start_s=start / 1000,
        end_s=end / 1000,
        distribution={str(k): float(v) for k, v in distribution.items()},
        top_label=str(message.get("top_label", top)),
        top_probability=float(message.get("top_probability", distribution[top])),
        affect=read_affect(message),
    )


def read_affect(message: Mapping[str, Any]) -> tuple[float, float] | None:
    """(arousal, valence) of a result: its top-level numbers (null when the model gives
    none), else an `arousal_valence` object's; None when there are none."""
    for holder in (message, message.get("arousal_valence")):
        if isinstance(holder, Mapping):
            arousal, valence = holder.get("arousal"), holder.get("valence")
            if _is_number(arousal) and _is_number(valence):
                return float(arousal), float(valence)
    return None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def label_order(utterances: Iterable[Utterance]) -> list[str]:
    """Every label, in the order the results list them."""
    labels: dict[str, None] = {}
    for utterance in utterances:
        labels.update(dict.fromkeys(utterance.distribution))
    return list(labels)


def colours(labels: list[str]) -> dict[str, Any]:
    """A fixed colour for the usual emotion names, a tab20 colour for the rest."""
    from matplotlib import colormaps

    spare = colormaps["tab20"]
    unknown = [label for label in labels if label not in COLOURS]
    return {label: COLOURS.get(label) or spare(unknown.index(label) % 20) for label in labels}


def import_pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or ConfigError with the install hint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(f"stream-ser plot needs matplotlib: {INSTALL_HINT}") from err
    return plt


def plot_timeline(utterances: list[Utterance], output: Path, title: str = "") -> Path:
    """Draw the timeline PNG of `utterances` (one or more streams) to `output`."""
    plt = import_pyplot()
    streams = list(dict.fromkeys(u.stream_id for u in utterances))
    labels = label_order(utterances)
    palette = colours(labels)
    rows: list[tuple[str, str]] = []
    for stream_id in streams:
        rows.append((stream_id, "distribution"))
        if any(u.affect for u in utterances if u.stream_id == stream_id):
            rows.append((stream_id, "affect"))
    heights = [3.0 if kind == "distribution" else 1.4 for _, kind in rows]
    most = max(sum(1 for u in utterances if u.stream_id == s) for s in streams)
    width = min(MAX_WIDTH_IN, max(10.0, 0.3 * most))
    figure, axes_list = plt.subplots(
        len(rows), 1, figsize=(width, sum(heights) + 1.0), sharex=True,
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    for axes, (stream_id, kind) in zip(axes_list[:, 0], rows, strict=True):
        mine = [u for u in utterances if u.stream_id == stream_id]
        if kind == "distribution":
            _draw_distribution(axes, mine, labels, palette)
        else:
            _draw_affect(axes, mine)
    axes_list[-1, 0].set_xlabel("stream time (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[label]) for label in labels]
    figure.legend(handles, labels, loc="center right", frameon=False)
    figure.suptitle(title or "stream-ser: emotion over time")
    figure.tight_layout(rect=(0, 0, 0.88, 1))
    for axes, (stream_id, kind) in zip(axes_list[:, 0], rows, strict=True):
        if kind == "distribution":
            _annotate_top_labels(axes, [u for u in utterances if u.stream_id == stream_id])
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def _draw_distribution(
    axes: Any, utterances: list[Utterance], labels: list[str], palette: dict[str, Any]
) -> None:
    starts = [u.start_s for u in utterances]
    widths = [u.end_s - u.start_s for u in utterances]
    bottom = [0.0] * len(utterances)
    for label in labels:
        heights = [u.distribution.get(label, 0.0) for u in utterances]
        axes.bar(
            starts, heights, width=widths, bottom=bottom, align="edge", color=palette[label],
            edgecolor="white", linewidth=0.4,
        )  # fmt: skip
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    vertical = len(utterances) > HORIZONTAL_LABELS_UP_TO
    axes.set_ylim(0, 1.45 if vertical else 1.15)
    axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("probability")
    axes.set_title(f"{utterances[0].stream_id}: {len(utterances)} utterance(s)", loc="left")
    axes.spines[["top", "right"]].set_visible(False)


def _annotate_top_labels(axes: Any, utterances: list[Utterance]) -> None:
    """Write each utterance's top label above its bar, leaving out those with no room."""
    vertical = len(utterances) > HORIZONTAL_LABELS_UP_TO
    last_px = -float("inf")
    for u in utterances:
        centre = (u.start_s + u.end_s) / 2
        text = f"{u.top_label} {u.top_probability:.0%}"
        centre_px = axes.transData.transform((centre, 0))[0]
        needed_px = LABEL_GAP_PX if vertical else 6.5 * len(text)
        if centre_px - last_px < needed_px:
            continue
        last_px = centre_px
        axes.text(
            centre, 1.02, text, ha="center", va="bottom", fontsize=8,
            rotation=90 if vertical else 0,
        )  # fmt: skip


def _draw_affect(axes: Any, utterances: list[Utterance]) -> None:
    for index, (name, colour) in enumerate((("arousal", "#e53935"), ("valence", "#1e88e5"))):
        points = [((u.start_s + u.end_s) / 2, u.affect[index]) for u in utterances if u.affect]
        axes.plot(*zip(*points, strict=True), marker="o", markersize=3, color=colour, label=name)
    axes.axhline(0, color="#9e9e9e", linewidth=0.6)
    axes.set_ylim(-1.05, 1.05)
    axes.set_ylabel("-1 .. 1")
    axes.legend(loc="upper left", fontsize=8, frameon=False, ncols=2)
    axes.spines[["top", "right"]].set_visible(False)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `plot` subcommand."""
    parser = commands.add_parser(
        "plot", help="draw an emotion-over-time PNG from recorded results (JSON Lines)"
    )
    parser.add_argument(
        "results", metavar="RESULTS.jsonl", help="results as JSON Lines (-: stdin, with -o)"
    )
    parser.add_argument(
        "-o", "--output", metavar="PNG", help="image to write (default: RESULTS.png)"
    )
    parser.add_argument("--stream", metavar="ID", help="only this stream (default: all)")
    parser.add_argument("--title", help="figure title")
    parser.set_defaults(command=plot_command)


def plot_command(args: argparse.Namespace) -> int:
    """Run `stream-ser plot`; prints the image's path."""
    path = Path(args.results)
    if path == STDIN and args.output is None:
        raise ConfigError("results on stdin (-) need -o PNG, the image to write")
    utterances = final_utterances(read_results(path))
    if args.stream is not None:
        streams = sorted({u.stream_id for u in utterances})
        utterances = [u for u in utterances if u.stream_id == args.stream]
        if not utterances:
            raise ConfigError(
                f"--stream {args.stream}: no utterances; streams in {path}: "
                + (", ".join(streams) or "none")
            )
    if not utterances:
        raise StreamSerError(f"{path}: no final utterance results to plot")
    output = Path(args.output) if args.output else path.with_suffix(".png")
    title = args.title or f"stream-ser: {'stdin' if path == STDIN else path.name}"
    print(plot_timeline(utterances, output, title))
    return 0
