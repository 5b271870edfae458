"""Settings from flags and TOML: precedence and validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from stream_ser.errors import ConfigError
from stream_ser.settings import add_arguments, build_settings
from tests.conftest import run_cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    settings = build_settings(parse())
    assert settings.vad.frame_ms == 30
    assert settings.model.providers == ("CPUExecutionProvider",)
    assert settings.mqtt.url is None


def test_flags_override_toml_which_overrides_defaults(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(
        '[vad]\nhangover_ms = 700\nframe_ms = 20\n[model]\nproviders = ["A", "B"]\n'
        "[source]\nmic = 3\n[mqtt]\nconnect_timeout_s = 2\n"
    )
    settings = build_settings(parse("--config", str(config), "--vad-hangover-ms", "400"))
    assert settings.vad.hangover_ms == 400  # flag wins
    assert settings.vad.frame_ms == 20  # from TOML
    assert settings.vad.aggressiveness == 2  # default
    assert settings.model.providers == ("A", "B")
    assert settings.source.mic == "3"
    assert settings.mqtt.connect_timeout_s == 2.0


def test_short_flags_and_lists() -> None:
    settings = build_settings(
        parse(
            "--input",
            "x.wav",
            "--realtime",
            "--model-providers",
            "CUDAExecutionProvider,CPUExecutionProvider",
            "--no-model-windows",
            "--mqtt",
            "mqtt://h",
        )
    )
    assert settings.source.input == "x.wav"
    assert settings.source.realtime is True
    assert settings.model.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert settings.model.windows is False
    assert settings.mqtt.url == "mqtt://h"
    assert build_settings(parse("--mic")).source.mic == "default"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vad-frame-ms", "25"], "frame-ms must be 10, 20 or 30"),
        (["--vad-aggressiveness", "4"], "aggressiveness"),
        (["--vad-min-utterance-ms", "20000"], "min-utterance-ms"),
        (["--rate", "100"], "--rate"),
        (["--channels", "0"], "--channels"),
        (["--stream-id", "a/b"], "--stream-id"),
        (["--mqtt-ca-file", "/nonexistent/ca.pem"], "no such file"),
    ],
)
def test_bad_values_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings(parse(*argv))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[vad]\nhangover = 3\n", "unknown key 'hangover'"),
        ("[nonsense]\nx = 1\n", "unknown section"),
        ('[vad]\nhangover_ms = "long"\n', "expected int"),
        ("[vad\n", "invalid TOML"),
    ],
)
def test_bad_toml_is_a_config_error(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        build_settings(parse("--config", str(config)))


def test_cli_rejects_bad_value_with_one_line_and_exit_2() -> None:
    done = run_cli("run", "--input", "x.wav", "--vad-frame-ms", "25")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "stream-ser: error: --vad-frame-ms must be 10, 20 or 30"
    ]
    assert "Traceback" not in done.stderr


def test_cli_needs_a_source() -> None:
    done = run_cli("run")
    assert done.returncode == 2
    assert "no audio source" in done.stderr
