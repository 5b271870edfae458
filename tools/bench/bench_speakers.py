"""Benchmark: speaker labels and per-speaker baselines in two-speaker "conversations".

    .venv/bin/python -m tools.bench.speaker_cache  # embeddings once (runs/speakers/cache)
    .venv/bin/python -m tools.bench.bench_speakers tune [--max-speakers N]  # training speakers only
    python -m tools.bench.bench_speakers test [--threshold T] [--max-speakers N] [--seeds S]
    .venv/bin/python -m tools.bench.bench_speakers check | speed  # head == specialist; embedder RTF

Held-out speakers: the bundled model's test speakers of each corpus only
(tools/bench/speaker_cache.py reads them from its training config); `tune` uses training
speakers of RAVDESS and EmoDB.

A conversation interleaves the clips of two speakers of one corpus (each speaker's clips in a
seeded random order; turns of 1-3 utterances, seeded; until both run out). Every pair of the
set's speakers is one conversation per seed. Each utterance is one clip.

Speakers: `stream_ser.speakers.OnlineSpeakers` labels each utterance online from its cached
d-vector. Speaker-assignment accuracy maps the labels found one-to-one onto the two true
speakers (the best mapping; utterances of a third or fourth label found count as wrong).

Emotion: the bundled specialist's head applied offline to each clip's cached pooled embedding,
normalised with the causal baseline the condition gives it (`stream_ser.adaptation`), exactly as
`stream-ser eval` does (checked by `check`): the head is the part of models/default/model.onnx
from its `embedding` output (and the baseline inputs) to its logits. Conditions:
- single:      each speaker alone in its own stream (= per-speaker baselines with true labels);
- per-stream:  the conversation as one stream, one baseline (today's behaviour);
- per-speaker: one baseline per label found by OnlineSpeakers (`adaptation.PerSpeaker`);
- single+clustering: each speaker alone, but with OnlineSpeakers and per-label baselines (what
  `--speakers` costs a one-voice stream when it splits a voice in two).
UAR pooled over every utterance of every conversation of a set, on the corpus's labels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_ser.adaptation import PerSpeaker, StreamBaseline
from stream_ser.asr_options import DEFAULT_MAX_SPEAKERS
from stream_ser.evaluate import confusion_matrix, restrict, unweighted_average_recall
from stream_ser.speakers import OnlineSpeakers
from stream_ser.specialist import AdaptationCard, Baseline, bundled_model_dir, load_card, softmax
from tools.bench.speaker_cache import REPO, Cached, load

TUNE_SETS = ("tune-ravdess", "tune-emodb")
TEST_SETS = ("test-ravdess", "test-emodb", "test-nemo", "test-ased", "test-korean")
THRESHOLDS = [round(0.05 + 0.025 * i, 3) for i in range(27)]  # 0.05 .. 0.70
HEAD_PATH = REPO / "runs" / "speakers" / "head.onnx"

Turn = tuple[int, str]  # (clip index in the set, true speaker)


def conversation(clips: dict[str, list[int]], pair: Sequence[str], seed: int) -> list[Turn]:
    """Two speakers' clips (each in a seeded order) interleaved in turns of 1-3 utterances."""
    rng = random.Random(f"{seed}-{pair[0]}-{pair[1]}")
    queues = {speaker: rng.sample(clips[speaker], len(clips[speaker])) for speaker in pair}
    speaker = rng.choice(list(pair))
    turns: list[Turn] = []
    while any(queues.values()):
        if not queues[speaker]:
            speaker = pair[1] if speaker == pair[0] else pair[0]
        for _ in range(rng.randint(1, 3)):
            if queues[speaker]:
                turns.append((queues[speaker].pop(0), speaker))
        speaker = pair[1] if speaker == pair[0] else pair[0]
    return turns


def by_speaker(cached: Cached) -> dict[str, list[int]]:
    """Clip indices per speaker."""
    clips: dict[str, list[int]] = {}
    for index, speaker in enumerate(cached.speakers):
        clips.setdefault(speaker, []).append(index)
    return clips


MAX_SPEAKERS = [DEFAULT_MAX_SPEAKERS]  # set by --max-speakers


def cluster(cached: Cached, turns: list[Turn], threshold: float) -> list[str]:
    """The label OnlineSpeakers gives each utterance."""
    online = OnlineSpeakers(threshold, MAX_SPEAKERS[0])
    return [online.assign(cached.speaker_embeddings[index]).label for index, _ in turns]


def assignment_accuracy(truth: list[str], found: list[str]) -> float:
    """Share of utterances right under the best one-to-one map of labels onto speakers."""
    speakers, labels = sorted(set(truth)), sorted(set(found))
    best = 0
    for chosen in itertools.permutations(labels, min(len(labels), len(speakers))):
        mapping = dict(zip(chosen, speakers, strict=False))
        best = max(best, sum(mapping.get(f) == t for f, t in zip(found, truth, strict=True)))
    return best / len(truth)


# --------------------------------------------------------------------------- emotion


class Head:
    """The specialist's classifier head: (embedding, baseline) -> probabilities."""

    def __init__(self) -> None:
        import onnx.utils
        import onnxruntime as ort

        model_dir = bundled_model_dir()
        self.card = load_card(model_dir)
        adaptation = self.card.adaptation
        assert adaptation is not None, "the bundled model is adaptive"
        self.adaptation: AdaptationCard = adaptation
        HEAD_PATH.parent.mkdir(parents=True, exist_ok=True)
        onnx.utils.extract_model(
            str(model_dir / "model.onnx"), str(HEAD_PATH),
            [adaptation.embedding_output, adaptation.mean_input, adaptation.std_input],
            [self.card.output_name],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(str(HEAD_PATH), options)

    def __call__(self, embedding: np.ndarray, baseline: Baseline | None) -> np.ndarray:
        used = baseline or self.adaptation.population
        (logits,) = self._session.run(None, {
            self.adaptation.embedding_output: embedding[np.newaxis].astype(np.float32),
            self.adaptation.mean_input: used.mean.astype(np.float32),
            self.adaptation.std_input: used.std.astype(np.float32),
        })
        return softmax(np.asarray(logits))[0]  # type: ignore[no-any-return]


def replay(head: Head, cached: Cached, turns: list[Turn], keys: list[str]) -> list[np.ndarray]:
    """Probabilities of each utterance, with one causal baseline per key."""
    assert cached.model_embeddings is not None
    baselines = PerSpeaker(lambda: StreamBaseline(head.adaptation))
    rows = []
    for (index, _), key in zip(turns, keys, strict=True):
        baseline = baselines.get(key)
        embedding = cached.model_embeddings[index]
        rows.append(head(embedding, baseline.current()))
        baseline.update(embedding)
    return rows


@dataclass
class Pool:
    """Predictions pooled over conversations, per condition."""

    rows: dict[str, list[np.ndarray]]
    truth: dict[str, list[str]]

    def add(self, condition: str, rows: list[np.ndarray], labels: list[str]) -> None:
        self.rows.setdefault(condition, []).extend(rows)
        self.truth.setdefault(condition, []).extend(labels)

    def uar(self, condition: str, model_labels: Sequence[str]) -> float:
        truth = self.truth[condition]
        subset = [label for label in model_labels if label in set(truth)]
        probabilities = restrict(np.vstack(self.rows[condition]), model_labels, subset)
        y_true = np.array([subset.index(label) for label in truth])
        matrix = confusion_matrix(y_true, probabilities.argmax(axis=1), len(subset))
        return unweighted_average_recall(matrix)


def evaluate_set(name: str, head: Head | None, threshold: float, seeds: int) -> dict[str, Any]:
    """Speaker accuracy (and UARs when `head`) over every pair of the set's speakers."""
    cached = load(name)
    clips = by_speaker(cached)
    pool = Pool({}, {})
    accuracies, found, solo_splits, utterances = [], [], [], 0
    for seed, pair in itertools.product(range(seeds), itertools.combinations(sorted(clips), 2)):
        turns = conversation(clips, pair, seed)
        truth = [speaker for _, speaker in turns]
        utterances += len(turns)
        labels = cluster(cached, turns, threshold)
        accuracies.append(assignment_accuracy(truth, labels))
        found.append(len(set(labels)))
        solos = {s: [t for t in turns if t[1] == s] for s in pair}
        solo_labels = {s: cluster(cached, solos[s], threshold) for s in pair}
        for s in pair:
            solo_splits.append(1 - max(map(solo_labels[s].count, set(solo_labels[s])))
                               / len(solo_labels[s]))
        if head is None:
            continue
        emotions = [cached.labels[index] for index, _ in turns]
        pool.add("per-stream", replay(head, cached, turns, ["stream"] * len(turns)), emotions)
        pool.add("per-speaker", replay(head, cached, turns, labels), emotions)
        for s in pair:
            solo_emotions = [cached.labels[index] for index, _ in solos[s]]
            pool.add("single", replay(head, cached, solos[s], [s] * len(solos[s])), solo_emotions)
            pool.add("single+clustering", replay(head, cached, solos[s], solo_labels[s]),
                     solo_emotions)
    result: dict[str, Any] = {
        "set": name, "speakers": len(clips), "conversations": len(accuracies),
        "utterances": utterances,
        "speaker_accuracy": float(np.mean(accuracies)),
        "speakers_found": float(np.mean(found)),
        "one_voice_split": float(np.mean(solo_splits)),
    }
    if head is not None:
        result["uar"] = {c: pool.uar(c, head.card.labels) for c in sorted(pool.rows)}
    return result


# --------------------------------------------------------------------------- commands


def tune(seeds: int) -> float:
    """Print speaker accuracy per threshold on the training speakers; return the best."""
    print("threshold  " + "  ".join(f"{name:>14}" for name in TUNE_SETS) + "      mean")
    best = (-1.0, 0.0)
    for threshold in THRESHOLDS:
        scores = [evaluate_set(name, None, threshold, seeds)["speaker_accuracy"]
                  for name in TUNE_SETS]
        mean = float(np.mean(scores))
        print(f"{threshold:9.3f}  " + "  ".join(f"{s:14.3f}" for s in scores) + f"  {mean:8.3f}")
        best = max(best, (mean, threshold))
    print(f"best threshold {best[1]} (mean speaker accuracy {best[0]:.3f})")
    return best[1]


def test(threshold: float, seeds: int, sets: Sequence[str]) -> list[dict[str, Any]]:
    """Print the table on the held-out speakers."""
    head = Head()
    results = [evaluate_set(name, head, threshold, seeds) for name in sets
               if (REPO / "runs" / "speakers" / "cache" / f"{name}.npz").is_file()]
    print(f"threshold {threshold}, max {MAX_SPEAKERS[0]} speakers, {seeds} seed(s)")
    print("| set | speakers | conversations | speaker acc. | speakers found | one voice split "
          "| UAR single | UAR per-stream | UAR per-speaker | UAR single+clustering |")
    print("| --- " * 10 + "|")
    for r in results:
        u = r["uar"]
        print(f"| {r['set']} | {r['speakers']} | {r['conversations']} | "
              f"{r['speaker_accuracy']:.3f} | {r['speakers_found']:.2f} | "
              f"{r['one_voice_split']:.3f} | {u['single']:.3f} | {u['per-stream']:.3f} | "
              f"{u['per-speaker']:.3f} | {u['single+clustering']:.3f} |")
    return results


def check(count: int = 3) -> None:
    """The offline head reproduces the specialist on real clips (population baseline)."""
    from stream_ser.evaluate import load_audio
    from stream_ser.specialist import Specialist
    from tools.bench.speaker_cache import DATASETS

    head, cached = Head(), load("test-ravdess")
    specialist = Specialist(bundled_model_dir())
    assert cached.model_embeddings is not None
    for index in range(count):
        audio = load_audio(DATASETS / "ravdess" / cached.paths[index])
        probabilities, embeddings = specialist.analyze([audio])
        assert embeddings is not None
        np.testing.assert_allclose(embeddings[0], cached.model_embeddings[index], atol=1e-5)
        np.testing.assert_allclose(head(embeddings[0], None), probabilities[0], atol=1e-5)
    print(f"head matches the specialist on {count} clips")


def speed(count: int = 20) -> dict[str, float]:
    """Real-time factor of the speaker embedder (one thread) on RAVDESS test clips."""
    import os
    import time

    from stream_ser.evaluate import load_audio
    from stream_ser.speakers import SpeakerEmbedder
    from tools.bench.speaker_cache import DATASETS

    embedder, cached = SpeakerEmbedder(), load("test-ravdess")
    clips = [load_audio(DATASETS / "ravdess" / p) for p in cached.paths[:count]]
    embedder.embed(clips[0])  # warm-up
    started = time.perf_counter()
    for clip in clips:
        embedder.embed(clip)
    elapsed = time.perf_counter() - started
    audio_s = sum(len(clip) for clip in clips) / 16000
    result = {"clips": count, "audio_s": audio_s, "ms_per_clip": 1000 * elapsed / count,
              "rtf": elapsed / audio_s, "load_1min": os.getloadavg()[0]}
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("tune", "test", "check", "speed"))
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sets", nargs="*", default=list(TEST_SETS))
    parser.add_argument("--max-speakers", type=int, default=DEFAULT_MAX_SPEAKERS)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    MAX_SPEAKERS[0] = args.max_speakers
    commands: dict[str, Callable[[], Any]] = {
        "tune": lambda: tune(args.seeds),
        "check": check,
        "speed": speed,
        "test": lambda: test(
            args.threshold if args.threshold is not None else _default_threshold(),
            args.seeds, args.sets,
        ),
    }
    result = commands[args.command]()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def _default_threshold() -> float:
    from stream_ser.asr_options import DEFAULT_THRESHOLD

    return DEFAULT_THRESHOLD


if __name__ == "__main__":
    main()
