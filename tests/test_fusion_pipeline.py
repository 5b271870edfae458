"""The ALM stage in the running pipeline: provisional then final results, fusion, deadlines
(live streams; a file read as fast as possible waits for every stage).

The ALM is a local fake of an OpenAI-compatible server (tests/fakes/fake_openai_alm.py) reached over
real HTTP by the real remote backend; the CLI runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.conftest import LABELS, REPO, build_tiny_model, run_cli
from tests.fakes import fake_openai_alm as fake
from tests.schema import check_result, parse_lines


def run_with_alm(path: Path, model: Path, url: str, *extra: str) -> list[dict[str, Any]]:
    done = run_cli(
        "run", "--input", str(path), "--model", str(model), "--no-model-windows",
        "--alm", f"openai:{url}", "--alm-max-wait-ms", "20", *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    messages = parse_lines(done.stdout)
    for message in messages:
        check_result(message)
    return messages


def by_stage(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    provisional = [m for m in messages if m["type"] == "utterance" and not m["final"]]
    finals = [m for m in messages if m["type"] == "utterance" and m["final"]]
    return provisional, finals


@pytest.mark.slow
def test_provisional_then_one_fused_final_per_utterance(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    with fake.FakeOpenAIServer(latency_s=0.05) as server:
        messages = run_with_alm(path, tiny_model, server.url)
        assert len(server.requests) >= clip_count  # every utterance reached the ALM
    provisional, finals = by_stage(messages)
    assert [m["utterance_id"] for m in provisional] == list(range(1, clip_count + 1))
    assert [m["utterance_id"] for m in finals] == list(range(1, clip_count + 1))
    for early, final in zip(provisional, finals, strict=True):
        assert messages.index(early) < messages.index(final)
        assert early["id"] != final["id"]
        assert final["flags"] == []
        alm = final["sources"]["alm"]
        assert alm["ok"] is True and alm["backend"].startswith("openai:")
        assert (alm["audio_repeats"], alm["text_repeats"], alm["cue_mode"]) == (1, 1, "none")
        assert alm["cue_baseline"] is None and "templates" not in alm
        assert alm["latency_ms"] >= 50
        assert final["fusion"]["sources"] == ["specialist", "alm"]
        specialist = final["sources"]["specialist"]["distribution"]
        assert specialist == early["distribution"]
        assert tuple(final["distribution"]) == LABELS
        # the default log-linear pool (weights 1): the product of the two sources, renormalised
        alm_p = np.maximum([alm["distribution"][k] for k in LABELS], 1e-6)
        expected = np.maximum([specialist[k] for k in LABELS], 1e-6) * alm_p
        np.testing.assert_allclose(
            [final["distribution"][k] for k in LABELS], expected / expected.sum(), atol=2e-5
        )
        assert "descriptors" in final


@pytest.mark.slow
def test_slow_alm_meets_the_deadline_with_flagged_specialist_only_results(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    with fake.FakeOpenAIServer(latency_s=4.0) as server:
        started = time.monotonic()
        messages = run_with_alm(
            path, tiny_model, server.url, "--fusion-deadline-ms", "400", "--alm-max-batch", "1",
            "--no-descriptors", "--realtime", "--speed", "4",  # paced: a live stream
        )
        elapsed_s = time.monotonic() - started
    provisional, finals = by_stage(messages)
    assert len(finals) == clip_count
    for early, final in zip(provisional, finals, strict=True):
        assert final["flags"] == ["alm_deadline", "specialist_only"]
        assert final["sources"]["alm"]["ok"] is False
        assert final["fusion"]["sources"] == ["specialist"]
        np.testing.assert_allclose(
            list(final["distribution"].values()), list(early["distribution"].values()), atol=1e-5
        )
        assert 400 <= final["latency_ms"] < 2000  # the deadline, not the ALM, decides
    # answering every utterance would take the ALM >= 3 utterances x 3 templates x 4 s = 36 s;
    # the run ends long before (only the one request in flight at exit is waited for)
    assert elapsed_s < 25


@pytest.mark.slow
def test_a_file_read_as_fast_as_possible_waits_for_a_slow_alm(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """No live deadline for a file without --realtime: every final has the ALM's answer and its
    descriptors, however long they take, so the output does not depend on the machine."""
    path, clip_count = speech_with_pauses
    with fake.FakeOpenAIServer(latency_s=0.5) as server:
        messages = run_with_alm(
            path, tiny_model, server.url, "--fusion-deadline-ms", "100", "--alm-max-batch", "1"
        )
    _, finals = by_stage(messages)
    assert [m["utterance_id"] for m in finals] == list(range(1, clip_count + 1))
    for final in finals:
        assert final["flags"] == []
        assert final["sources"]["alm"]["ok"] is True
        assert final["fusion"]["sources"] == ["specialist", "alm"]
        assert "descriptors" in final
        assert final["latency_ms"] > 500  # it waited past the 100 ms deadline for the ALM


@pytest.mark.slow
def test_failing_alm_gives_flagged_results(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    with fake.FakeOpenAIServer(fail_status=500) as server:
        # descriptors off: on a loaded machine they can miss the deadline and add their own flag
        messages = run_with_alm(path, tiny_model, server.url, "--no-descriptors")
    _, finals = by_stage(messages)
    assert len(finals) == clip_count
    for final in finals:
        assert final["flags"] == ["alm_failed", "specialist_only"]
        assert "500" in final["sources"]["alm"]["error"]


@pytest.mark.slow
def test_fusion_file_weights_and_mapping(
    tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, _ = speech_with_pauses
    fusion = tmp_path / "fusion.toml"
    fusion.write_text(
        'labels = ["neutral", "happy", "sad", "angry"]\nrule = "mean"\n'
        "[sources.specialist]\nweight = 0.0\n"
        '[sources.specialist.mapping]\ncalm = "neutral"\nfearful = ""\ndisgust = ""\n'
        'surprise = ""\n[sources.alm]\nweight = 1.0\n'
    )
    with fake.FakeOpenAIServer() as server:
        messages = run_with_alm(path, tiny_model, server.url, "--fusion", str(fusion))
    _, finals = by_stage(messages)
    for final in finals:
        assert tuple(final["distribution"]) == ("neutral", "happy", "sad", "angry")
        alm = final["sources"]["alm"]["distribution"]  # the ALM was asked the output labels
        assert tuple(alm) == ("neutral", "happy", "sad", "angry")
        # specialist weight 0: the final is the ALM's distribution
        np.testing.assert_allclose(
            list(final["distribution"].values()), list(alm.values()), atol=2e-5
        )
        assert final["fusion"]["dropped_mass"]["specialist"] > 0


@pytest.mark.slow
def test_a_further_specialist_is_fused_per_utterance(
    tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    extra = build_tiny_model(tmp_path / "extra", seed=5)
    card = json.loads((extra / "card.json").read_text()) | {"id": "tiny-extra"}
    (extra / "card.json").write_text(json.dumps(card))
    done = run_cli("run", "--input", str(path), "--model", str(tiny_model), "--no-model-windows",
                   "--model-extra", str(extra))  # fmt: skip
    assert done.returncode == 0, done.stderr
    finals = [m for m in parse_lines(done.stdout) if m["final"]]
    assert len(finals) == clip_count
    for final in finals:
        check_result(final, LABELS)
        assert final["fusion"]["sources"] == ["specialist", "specialist:tiny-extra"]
        a = np.maximum([final["sources"]["specialist"]["distribution"][k] for k in LABELS], 1e-6)
        b = np.maximum(
            [final["sources"]["specialist:tiny-extra"]["distribution"][k] for k in LABELS], 1e-6
        )
        expected = a * b  # the default log-linear pool: product of experts
        np.testing.assert_allclose(
            [final["distribution"][k] for k in LABELS], expected / expected.sum(), atol=2e-5
        )


@pytest.mark.slow
def test_stdin_redirected_from_a_file_is_a_recording_a_pipe_is_live(
    tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """`--input - < file.raw` waits for the ALM like a file; a pipe (arecord) keeps the deadline."""
    path, clip_count = speech_with_pauses
    audio, _ = soundfile.read(path, dtype="int16")
    raw = tmp_path / "speech.raw"
    raw.write_bytes(audio.astype("<i2").tobytes())
    args = ["run", "--input", "-", "--rate", "16000", "--model", str(tiny_model),
            "--no-model-windows", "--no-descriptors", "--alm-max-wait-ms", "20",
            "--alm-max-batch", "1", "--fusion-deadline-ms", "100"]  # fmt: skip
    with fake.FakeOpenAIServer(latency_s=0.5) as server:
        alm = ["--alm", f"openai:{server.url}"]
        with raw.open("rb") as redirected:
            done = subprocess.run(
                [sys.executable, "-m", "stream_ser", *args, *alm], stdin=redirected,
                capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
            )  # fmt: skip
        piped = run_cli(*args, *alm, stdin=raw.read_bytes())
    for run in (done, piped):
        assert run.returncode == 0, run.stderr
    _, from_file = by_stage(parse_lines(done.stdout))
    _, from_pipe = by_stage(parse_lines(piped.stdout))
    assert len(from_file) == len(from_pipe) == clip_count
    assert all(m["flags"] == [] for m in from_file)
    assert all(m["flags"] == ["alm_deadline", "specialist_only"] for m in from_pipe)


@pytest.mark.slow
def test_a_stopped_file_run_stops_waiting_for_a_slow_alm(
    tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """SIGTERM during a file read as fast as possible: reading stops, and the utterances in
    flight get their finals by the fusion deadline counted from the stop, not by the ALM."""
    path, _ = speech_with_pauses
    with fake.FakeOpenAIServer(latency_s=5.0) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_ser", "run", "--input", str(path), "--model",
             str(tiny_model), "--no-model-windows", "--alm", f"openai:{server.url}",
             "--alm-max-batch", "1", "--fusion-deadline-ms", "1000"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            first = json.loads(process.stdout.readline())  # a provisional: the ALM is asked
            process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            rest, stderr = process.communicate(timeout=60)
            elapsed_s = time.monotonic() - stopped
        finally:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0, stderr
    messages = [first, *parse_lines(rest)]
    provisional, finals = by_stage(messages)
    assert [m["utterance_id"] for m in finals] == [m["utterance_id"] for m in provisional]
    assert finals and all("alm_deadline" in m["flags"] for m in finals)
    # answering one utterance takes the ALM 3 templates x 5 s = 15 s: the finals did not wait
    assert all(m["latency_ms"] < 8000 for m in finals)
    # exit waits only for the backend call in flight (15 s), not for every utterance's
    assert elapsed_s < 25


async def test_analyser_skips_work_it_cannot_finish_in_time() -> None:
    """Overflow rule of the acoustics stage: too many waiting, or past the deadline."""
    from stream_ser.acoustics import AnalysisSkipped, StreamAcoustics
    from stream_ser.stages import Analyzer

    audio = np.zeros(16000, dtype=np.float32)
    async with Analyzer(max_pending=1) as analyzer:
        late = asyncio.create_task(
            analyzer.analyse(StreamAcoustics(), audio, deadline_s=time.monotonic() - 1)
        )
        await asyncio.sleep(0)  # the late one is now waiting for the thread
        with pytest.raises(AnalysisSkipped, match="already waiting"):
            await analyzer.analyse(StreamAcoustics(), audio, deadline_s=time.monotonic() + 60)
        with pytest.raises(AnalysisSkipped, match="already gone out"):
            await asyncio.wait_for(late, 60)
        assert analyzer.skipped == 2
        # no deadline (a lossless stream bounds its own utterances): never skipped
        waiting = asyncio.create_task(analyzer.analyse(StreamAcoustics(), audio, deadline_s=None))
        await asyncio.sleep(0)
        also = await asyncio.wait_for(
            analyzer.analyse(StreamAcoustics(), audio, deadline_s=None), 60
        )
        assert (await asyncio.wait_for(waiting, 60)).descriptors and also.descriptors
        assert analyzer.skipped == 2


def five_utterances(tmp_path: Path, ravdess_clips: list[Path]) -> Path:
    """Five real clips, 1.5 s of silence after each: the speaker baseline forms after three."""
    pieces = []
    for clip in ravdess_clips[:5]:
        audio, _ = soundfile.read(clip, dtype="float32")
        pieces += [audio, np.zeros(24000, dtype=np.float32)]
    path = tmp_path / "five.wav"
    soundfile.write(path, np.concatenate(pieces), 16000)
    return path


@pytest.mark.slow
def test_no_descriptors_keeps_the_speaker_relative_cues(
    tmp_path: Path, tiny_model: Path, ravdess_clips: list[Path]
) -> None:
    """Cues are relative to the stream's speaker once it has three utterances, also with
    --no-descriptors (which used to fall back to the population baseline for every utterance);
    the published ALM source says which baseline, and --alm-explain lists the template members."""
    path = five_utterances(tmp_path, ravdess_clips)
    runs = {}
    for name, extra in (("with", ()), ("without", ("--no-descriptors",))):
        with fake.FakeOpenAIServer() as server:
            messages = run_with_alm(path, tiny_model, server.url, "--alm-cues", "aligned",
                                    "--alm-explain", *extra)  # fmt: skip
            texts = [r["messages"][1]["content"][-1]["text"] for r in server.requests
                     if r.get("logprobs")]  # fmt: skip
        _, finals = by_stage(messages)
        runs[name] = [f["sources"]["alm"] for f in finals]
        assert len(finals) == 5
        assert all(("descriptors" in f) == (name == "with") for f in finals)
        assert sum("relative to this speaker's earlier speech" in t for t in texts) == 2 * 3
    for alm in runs["without"]:
        assert len(alm["templates"]) == 3 and alm["rationale"]
    assert [a["cue_baseline"] for a in runs["without"]] == ["population"] * 3 + ["speaker"] * 2
    assert [a["cues"] for a in runs["without"]] == [a["cues"] for a in runs["with"]]
    assert [a["distribution"] for a in runs["without"]] == [a["distribution"] for a in runs["with"]]
