"""The Python examples of docs/python.md and README.md, run as written on the bundled speech
sample and checked against what `stream-ser run` publishes for the same audio."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SAMPLE, run_cli
from tests.test_microphone import pulse_env  # noqa: F401  (a fixture)

EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", re.DOTALL)


def examples(path: Path) -> dict[str, str]:
    """name -> code of each marked example in a Markdown file."""
    return dict(EXAMPLE.findall(path.read_text(encoding="utf-8")))


DOCS = examples(REPO / "docs" / "python.md")
README = examples(REPO / "README.md")


@pytest.fixture(scope="module")
def published() -> list[dict[str, Any]]:
    """What `stream-ser run` publishes for the bundled sample (JSON Lines: stdout is a pipe)."""
    done = run_cli("run", "--input", str(SAMPLE))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def stage(message: dict[str, Any]) -> str:
    if message["type"] == "window":
        return "window"
    return "final" if message["final"] else "provisional"


def of(messages: list[dict[str, Any]], *stages: str) -> list[dict[str, Any]]:
    return [m for m in messages if stage(m) in stages]


def run_example(code: str, env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO,
        env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    return done.stdout.splitlines()


def test_every_example_is_checked() -> None:
    assert set(DOCS) == {
        "recognize-file", "recognize-array", "listen-file", "listen-microphone",
        "listen-arrays", "listen-push", "result-fields",
    }  # fmt: skip
    assert set(README) == {"readme"}
    lines = README["readme"].strip().splitlines()
    assert len(lines) <= 10, "the README example is at most ten lines"


@pytest.mark.slow
def test_recognize_examples(published: list[dict[str, Any]]) -> None:
    finals = of(published, "final")
    assert len(finals) == 3  # the sample's three passages
    assert run_example(DOCS["recognize-file"]) == [
        f"{m['utterance_id']} {m['start_ms']} {m['end_ms']} {m['top_label']} "
        f"{round(m['top_probability'], 3)} {m['descriptors']['pitch']['level']}"
        for m in finals
    ]
    utterances = of(published, "provisional", "final")
    assert sorted(run_example(DOCS["recognize-array"])) == sorted(
        f"{stage(m)} {m['utterance_id']} {m['top_label']} {round(m['top_probability'], 3)}"
        for m in utterances
    )


@pytest.mark.slow
def test_listen_examples(published: list[dict[str, Any]]) -> None:
    finals = of(published, "final")
    shown = run_example(DOCS["listen-file"])
    assert sorted(shown) == sorted(
        f"{stage(m)} {m['utterance_id']} {m['top_label']} {m['start_ms']} {m['end_ms']}"
        for m in of(published, "window", "final")
    )
    assert len(of(published, "window")) > len(finals)  # windows were there to compare
    assert run_example(DOCS["listen-arrays"]) == [
        f"kitchen {m['utterance_id']} {m['top_label']}" for m in finals
    ]
    assert run_example(DOCS["listen-push"]) == [
        f"{m['utterance_id']} {m['top_label']} {m['arousal']} {m['valence']}" for m in finals
    ]


@pytest.mark.slow
def test_result_fields_and_readme_examples(published: list[dict[str, Any]]) -> None:
    first = of(published, "final")[0]
    pitch_like = sorted(
        name for name, d in first["descriptors"].items()
        if isinstance(d, dict) and d["level"] in ("low", "high")
    )  # fmt: skip
    assert run_example(DOCS["result-fields"]) == [
        f"final True speech 1 {first['end_ms'] - first['start_ms']}",
        "True",
        str(pitch_like),
        "() None None",
        "True",
    ]
    finals = of(published, "final")
    expected = [
        f"{m['utterance_id']} {m['top_label']} {m['top_probability']:.0%} {m['arousal']}"
        for m in finals
    ]
    live = of(published, "window", "final")
    expected += [f"{stage(m)} {m['utterance_id']} {m['top_label']} {m['start_ms']}" for m in live]
    shown = run_example(README["readme"])
    assert shown[: len(finals)] == expected[: len(finals)]
    assert sorted(shown[len(finals) :]) == sorted(expected[len(finals) :])


@pytest.mark.slow
def test_microphone_example_on_a_virtual_microphone(
    pulse_env: dict[str, str],  # noqa: F811
    speech_with_pauses: tuple[Path, int],
) -> None:
    """The example as written, on PulseAudio's default source (a null sink's monitor) while
    three real speech clips are played into it in real time."""
    path, clips = speech_with_pauses
    assert clips == 3  # the example stops after the third utterance
    example = subprocess.Popen(
        [sys.executable, "-c", DOCS["listen-microphone"]], env=pulse_env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3.0)  # let capture start (and the model load)
        subprocess.run(["paplay", "--device=vsink", str(path)], env=pulse_env, check=True,
                       timeout=60)  # fmt: skip
        out, err = example.communicate(timeout=60)
    finally:
        if example.poll() is None:
            example.send_signal(signal.SIGKILL)
            example.wait()
    assert example.returncode == 0, err
    finals = [line for line in out.splitlines() if " final " in line]
    assert [line.split()[1:3] for line in finals] == [["mic", f"#{n}"] for n in (1, 2, 3)]
    assert len([line for line in out.splitlines() if "descriptors:" in line]) == clips
