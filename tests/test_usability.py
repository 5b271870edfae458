"""What a new user meets first: help texts, options that do nothing, a missing clip (#17)."""

from __future__ import annotations

import argparse
import socket
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import soundfile

from stream_ser.alm.base import ALM_HELP
from stream_ser.cli import _parser
from stream_ser.publish import default_client_id
from stream_ser.settings import SECTIONS, field_help
from tests.conftest import run_cli


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = commands.choices[name]
    assert isinstance(sub, argparse.ArgumentParser)
    return sub


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", ["run", "send"])
def test_help_has_no_internal_names_and_one_default_each(command: str) -> None:
    parser = command_parser(command)
    assert "__" not in parser.format_help()  # dest names such as SOURCE__INPUT
    for flag, action in options(parser).items():
        assert action.help, flag
        assert action.help.count("default:") <= 1, (flag, action.help)
        assert "see docs" not in action.help, (flag, action.help)


def test_every_alm_flag_says_what_it_does() -> None:
    alm = {f: a for f, a in options(command_parser("run")).items() if f.startswith("--alm-")}
    assert len(alm) >= 17
    for flag, action in alm.items():
        described = (action.help or "").split(" (default:")[0]
        assert len(described.split()) >= 3 and "docs" not in described, (flag, action.help)


def test_client_id_help_names_the_real_default() -> None:
    text = options(command_parser("run"))["--mqtt-client-id"].help or ""
    assert "<random>" not in text and "stream-ser-HOST-STREAM" in text
    assert default_client_id("room1") == f"stream-ser-{socket.gethostname()}-room1"


def test_send_help_lists_only_what_send_uses_and_its_real_defaults() -> None:
    flags = options(command_parser("send"))
    for worker_only in ("--mqtt-audio", "--mqtt-audio-group", "--mqtt-spool-dir",
                        "--mqtt-status-interval-s", "--mqtt-spool-max-messages"):  # fmt: skip
        assert worker_only not in flags
    assert "(default: on)" in (flags["--realtime"].help or "")
    assert "(default: off)" in (options(command_parser("run"))["--realtime"].help or "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speed", "4"], "--speed does nothing without --realtime"),
        (["--ha-discovery"], "--ha-discovery needs --mqtt URL"),
    ],
)
def test_options_that_would_do_nothing_are_refused(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = run_cli("run", "--input", str(tmp_path / "x.wav"), *args, timeout_s=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"stream-ser: error: {message}"]


def test_eval_with_missing_clips_says_no_such_file_and_hints_at_root(tmp_path: Path) -> None:
    manifest = tmp_path / "dev.csv"
    manifest.write_text("path,label\nActor_01/a.wav,angry\nActor_01/b.wav,sad\n")
    done = run_cli("eval", str(manifest), timeout_s=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "no such file" in line and "--root" in line and "Actor_01/a.wav" in line


def test_every_setting_has_its_own_help() -> None:
    for section, cls in SECTIONS.items():
        for item in fields(cls):
            own = item.metadata.get("help") or (section == "alm" and item.name in ALM_HELP)
            assert own, (section, item.name)
            assert "see docs" not in field_help(section, item)


def test_settings_that_do_nothing_here_are_warned_about(tmp_path: Path, tiny_model: Path) -> None:
    audio = tmp_path / "quiet.wav"
    soundfile.write(audio, np.zeros(8000, dtype=np.float32), 16000)
    done = run_cli("run", "--input", str(audio), "--model", str(tiny_model), "--no-descriptors",
                   "--rate", "8000", "--mqtt-client-id", "x", "--metrics-host", "0.0.0.0",
                   timeout_s=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 3, done.stderr
    for flag in ("--rate", "--mqtt-*", "--metrics-host"):
        assert any(flag in line and "ignored" in line for line in warnings), (flag, warnings)
