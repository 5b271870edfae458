"""The WebSocket protocol's rules and the [http] settings, without a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stream_ser.cli import ineffective_settings
from stream_ser.errors import ConfigError
from stream_ser.settings import Settings
from stream_ser.web.options import HttpSettings, is_loopback, parse_address
from stream_ser.web.protocol import (
    Close,
    EventsParams,
    Refusal,
    authorized,
    events_params,
    is_end,
    read_token,
    same_origin,
)
from stream_ser.web.protocol import stream_params as params
from stream_ser.web.server import MAX_REASON_BYTES, _reason


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("8080", ("127.0.0.1", 8080)),
     (":0", ("127.0.0.1", 0)), ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:9", ("::1", 9))],
)  # fmt: skip
def test_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["127.0.0.1:", "host:port", "1.2.3.4:65536", ""])
def test_bad_addresses_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        HttpSettings(address=text)


def test_only_loopback_counts_as_local() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="not both"):
        HttpSettings(token="a", token_file="b")
    with pytest.raises(ConfigError, match="max-connections"):
        HttpSettings(max_connections=0)
    with pytest.raises(ConfigError, match="max-frame-bytes"):
        HttpSettings(max_frame_bytes=10)
    assert "s3cret" not in repr(Settings(http=HttpSettings(token="s3cret")))  # logs stay clean


def test_http_settings_without_http_are_warned_about() -> None:
    notes = ineffective_settings(Settings(http=HttpSettings(max_connections=3)))
    assert any("--http-*" in note for note in notes)
    assert not ineffective_settings(Settings(http=HttpSettings("8080", max_connections=3)))


def test_stream_parameters_default_and_parse() -> None:
    got = params({"rate": "48000", "channels": "2", "format": "f32le", "stream_id": "k",
                  "mode": "lossless", "token": "x"})  # fmt: skip
    assert (got.rate, got.channels, got.sample_format, got.stream_id, got.mode) == (
        48000, 2, "f32le", "k", "lossless"
    )
    default = params({})
    assert (default.rate, default.channels, default.sample_format, default.mode) == (
        16000, 1, "s16le", "live"
    )
    assert default.stream_id.startswith("ws-") and params({}).stream_id != default.stream_id


@pytest.mark.parametrize(
    "query", [{"rate": "-1"}, {"rate": "1" * 20}, {"stream_id": "a#b"}, {"stream_id": "x" * 129}]
)
def test_bad_stream_parameters_are_refused(query: dict[str, str]) -> None:
    with pytest.raises(Refusal) as refused:
        params(query)
    assert refused.value.code == Close.BAD_PARAMETERS


def test_events_parameters_default_and_parse() -> None:
    assert events_params({}) == EventsParams(None, True)
    assert events_params({"stream_id": "kitchen", "history": "0", "token": "x"}) == EventsParams(
        "kitchen", False
    )


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ({"history": "yes"}, "history 'yes' is not 0 or 1"),
        ({"stream_id": "a#b"}, "stream_id"),
        ({"rate": "16000"}, "unknown parameter(s): rate"),
    ],
)
def test_bad_events_parameters_are_refused(query: dict[str, str], words: str) -> None:
    with pytest.raises(Refusal) as refused:
        events_params(query)
    assert refused.value.code == Close.BAD_PARAMETERS
    assert words in refused.value.reason


def test_the_token_by_header_or_query() -> None:
    assert authorized(None, None, None)
    assert authorized("t", "Bearer t", None) and authorized("t", "bearer  t ", None)
    assert authorized("t", None, "t")
    assert not authorized("t", None, None)
    assert not authorized("t", "Bearer u", "t")  # a header that is wrong is not saved by a query
    assert not authorized("t", "Basic t", None)


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("abc \nignored\n")
    assert read_token(None, str(path)) == "abc"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token(None, str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(None, str(tmp_path / "missing"))


def test_same_origin() -> None:
    assert same_origin(None, "127.0.0.1:8080")
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not same_origin("http://evil.example", "127.0.0.1:8080")
    assert not same_origin("null", "127.0.0.1:8080")


def test_end_frame() -> None:
    assert is_end('{"type": "end"}') and is_end('{"type":"end"}')
    assert not is_end('{"type": "end", "x": 1}') and not is_end("end") and not is_end("[")


def test_close_reasons_fit_a_close_frame() -> None:
    long = "é" * 100
    assert len(_reason(long)) <= MAX_REASON_BYTES
    assert _reason(long).decode().endswith("...")
    assert _reason("short") == b"short"


def test_without_aiohttp_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from stream_ser.web import require_aiohttp\n"
        "try:\n    require_aiohttp()\nexcept Exception as err:\n    print(type(err).__name__, err)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    assert out.startswith("ConfigError") and "pip install 'stream-ser[web]'" in out


def test_the_documented_python_client_is_the_tested_example() -> None:
    repo = Path(__file__).resolve().parent.parent
    doc = (repo / "docs" / "websocket.md").read_text(encoding="utf-8")
    section = doc.split("## A Python client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    example = (repo / "examples" / "ws_client.py").read_text(encoding="utf-8")
    assert code == example  # tests/test_web_cli.py runs the example
    assert len(code.splitlines()) <= 40
