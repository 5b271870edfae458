"""One validated settings tree, built from CLI flags and an optional TOML file.

Every field of a section is both a TOML key (`[vad] hangover_ms = 500`) and a flag
(`--vad-hangover-ms 500`); a few common ones have short flags (`--input`, `--mic`, `--mqtt`).
Precedence: defaults < TOML file < flags. Invalid values raise ConfigError at start-up.
"""

from __future__ import annotations

import argparse
import tomllib
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from stream_ser.errors import ConfigError
from stream_ser.kinds import FusionRule, values
from stream_ser.options import ALM_HELP, AlmOptions
from stream_ser.web.options import HttpSettings

FRAME_MS_CHOICES = (10, 20, 30)
VAD_BACKENDS = ("webrtc", "silero")
MAX_STREAM_ID_BYTES = 128  # UTF-8; a stream id is a topic level and part of the client id
MAX_CLIENT_ID_BYTES = 200  # UTF-8; the client id names the spool file (255 bytes at most)
RULES = values(FusionRule)


def setting(default: Any, help: str, flag: str | None = None, **argparse_options: Any) -> Any:
    """A dataclass field that also documents its CLI flag."""
    metadata = {"help": help, "flag": flag, "argparse": argparse_options}
    return field(default=default, metadata=metadata)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_name(flag: str, value: str, max_bytes: int) -> None:
    """A name used as an MQTT topic level and a file name: ConfigError unless it is
    non-empty, at most `max_bytes` of UTF-8, without '/', '#', '+' or control characters."""
    _require(value != "", f"{flag} must not be empty")
    size = len(value.encode("utf-8", "surrogatepass"))
    _require(size <= max_bytes, f"{flag} is too long: {size} bytes, at most {max_bytes}")
    _require(
        not any(c in value for c in "/#+") and value.isprintable(),
        f"{flag} must not contain '/', '#', '+' (MQTT topic characters) or control characters",
    )


@dataclass(frozen=True)
class SourceSettings:
    """Where audio comes from."""

    input: str | None = setting(
        None,
        "audio file (WAV/FLAC/OGG) or '-' for raw 16-bit PCM on stdin; repeat for several",
        "--input",
        action="append",
        metavar="FILE",
    )
    mic: str | None = setting(
        None,
        "capture a microphone (index or name; default device if omitted); repeat for several",
        "--mic",
        nargs="?",
        const="default",
        metavar="DEVICE",
        action="append",
    )
    rate: int = setting(16000, "sample rate of raw PCM on stdin (Hz)", "--rate")
    channels: int = setting(1, "channel count of raw PCM on stdin", "--channels")
    realtime: bool = setting(False, "pace file input like a live stream", "--realtime")
    speed: float = setting(1.0, "with --realtime: play the file this many times faster", "--speed")
    chunk_ms: int = setting(100, "capture block length (ms)", "--chunk-ms")
    mic_retries: int = setting(
        3, "times a microphone that stopped or stalled is reopened before giving up"
    )
    mic_retry_delay_s: float = setting(1.0, "first wait before reopening it; doubles each try (s)")
    stream_id: str | None = setting(
        None, "stream id in results (default: file stem, 'stdin' or 'mic')", "--stream-id"
    )
    mqtt_audio: bool = setting(
        False, "also recognise remote devices streaming audio to the broker (--mqtt)",
        "--mqtt-audio",
    )  # fmt: skip
    mqtt_audio_group: str = setting(
        "stream-ser", "shared-subscription group the workers share remote streams in",
        "--mqtt-audio-group",
    )  # fmt: skip
    mqtt_audio_max_streams: int = setting(
        32, "remote streams this worker recognises at once; hellos beyond are refused, counted",
        "--mqtt-audio-max-streams",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _require(8000 <= self.rate <= 384000, "--rate must be between 8000 and 384000 Hz")
        _require(1 <= self.channels <= 64, "--channels must be between 1 and 64")
        _require(10 <= self.chunk_ms <= 1000, "--chunk-ms must be between 10 and 1000")
        _require(0.1 <= self.speed <= 1000, "--speed must be between 0.1 and 1000")
        _require(self.realtime or self.speed == 1.0, "--speed does nothing without --realtime")
        _require(0 <= self.mic_retries <= 100, "--source-mic-retries must be 0..100")
        _require(0 < self.mic_retry_delay_s <= 60, "--source-mic-retry-delay-s must be 0..60")
        _require(
            bool(self.mqtt_audio_group) and not any(c in self.mqtt_audio_group for c in "/#+"),
            "--mqtt-audio-group must be a non-empty name without '/', '#' or '+'",
        )
        _require(
            1 <= self.mqtt_audio_max_streams <= 10_000, "--mqtt-audio-max-streams must be 1..10000"
        )
        if self.stream_id is not None:
            check_name("--stream-id", self.stream_id, MAX_STREAM_ID_BYTES)


@dataclass(frozen=True)
class VadSettings:
    """Speech segmentation (webrtcvad or Silero)."""

    backend: str = setting(
        "webrtc", "voice detector: webrtc or silero (ONNX, 32 ms frames)", "--vad"
    )
    threshold: float = setting(0.5, "silero: speech probability that starts a voiced run")
    frame_ms: int = setting(30, "webrtc: VAD frame length 10, 20 or 30 ms")
    aggressiveness: int = setting(2, "webrtcvad aggressiveness 0 (least) to 3 (most)")
    preroll_ms: int = setting(300, "audio kept before speech onset (ms)")
    onset_ms: int = setting(90, "voiced audio within the pre-roll that starts speech (ms)")
    hangover_ms: int = setting(500, "silence that ends an utterance (ms)")
    min_utterance_ms: int = setting(400, "shorter voiced segments are ignored (ms)")
    max_utterance_ms: int = setting(15000, "longer turns are split here (ms)")

    def __post_init__(self) -> None:
        _require(self.backend in VAD_BACKENDS, "--vad must be webrtc or silero")
        _require(0.15 < self.threshold < 1.0, "--vad-threshold must be between 0.15 and 1")
        _require(self.frame_ms in FRAME_MS_CHOICES, "--vad-frame-ms must be 10, 20 or 30")
        _require(0 <= self.aggressiveness <= 3, "--vad-aggressiveness must be 0..3")
        _require(self.preroll_ms >= self.frame_ms, "--vad-preroll-ms must be >= frame_ms")
        _require(
            self.frame_ms <= self.onset_ms <= self.preroll_ms,
            "--vad-onset-ms must be between frame_ms and preroll_ms",
        )
        _require(self.hangover_ms >= self.frame_ms, "--vad-hangover-ms must be >= frame_ms")
        _require(
            self.frame_ms <= self.min_utterance_ms < self.max_utterance_ms,
            "need frame_ms <= --vad-min-utterance-ms < --vad-max-utterance-ms",
        )
        _require(self.max_utterance_ms <= 120_000, "--vad-max-utterance-ms must be <= 120000")


@dataclass(frozen=True)
class ModelSettings:
    """The ONNX specialist."""

    path: str | None = setting(
        None, "model directory (default: the bundled model)", "--model", metavar="DIR"
    )
    providers: tuple[str, ...] = setting(
        ("CPUExecutionProvider",),
        "onnxruntime providers in order of preference, comma-separated "
        "(e.g. CUDAExecutionProvider,CPUExecutionProvider)",
    )
    intra_op_threads: int = setting(1, "onnxruntime intra-op threads")
    inter_op_threads: int = setting(1, "onnxruntime inter-op threads")
    window_ms: int | None = setting(None, "sliding window length (default: the model card's)")
    hop_ms: int | None = setting(None, "window hop (default: the model card's)")
    windows: bool = setting(True, "recognise and publish sliding windows during speech")
    extra: tuple[str, ...] = setting(
        (), "further specialist model directories, comma-separated: fusion sources per utterance"
    )

    def __post_init__(self) -> None:
        _require(len(self.providers) > 0, "--model-providers must name at least one")
        for path in self.extra:
            _require(Path(path).is_dir(), f"--model-extra: no such model directory: {path}")
        _require(1 <= self.intra_op_threads <= 64, "--model-intra-op-threads must be 1..64")
        _require(1 <= self.inter_op_threads <= 64, "--model-inter-op-threads must be 1..64")
        for name, value in (("window-ms", self.window_ms), ("hop-ms", self.hop_ms)):
            _require(value is None or 100 <= value <= 30000, f"--model-{name} must be 100..30000")
        if self.window_ms is not None and self.hop_ms is not None:
            _require(self.hop_ms <= self.window_ms, "--model-hop-ms must be <= window_ms")


@dataclass(frozen=True)
class MqttSettings:
    """The broker results are published to."""

    url: str | None = setting(
        None, "broker URL mqtt://[user@]host[:port] or mqtts://...; none: JSON Lines", "--mqtt",
        metavar="URL",
    )  # fmt: skip
    topic_prefix: str = setting("stream-ser", "first level of every topic stream-ser uses")
    client_id: str | None = setting(
        None,
        "MQTT client id; it names the status topic and the spool (default: run: "
        "stream-ser-HOST-STREAM, or stream-ser-HOST-worker with several sources or "
        "--mqtt-audio; send: stream-ser-send-HOST-STREAM)",
    )
    ca_file: str | None = setting(None, "CA certificate file for mqtts:// (default: system CAs)")
    cert_file: str | None = setting(None, "client certificate file for mqtts://")
    key_file: str | None = setting(None, "client private key file for mqtts://")
    username: str | None = setting(None, "broker username (default: the URL's user, if any)")
    password_file: str | None = setting(
        None,
        "file whose first line is the broker password (else $STREAM_SER_MQTT_PASSWORD; "
        "a password in the URL shows in process listings)",
    )
    keepalive_s: int = setting(30, "MQTT keep-alive (s)")
    connect_timeout_s: float = setting(10.0, "give up connecting after this long (s)")
    status_interval_s: float = setting(10.0, "how often the retained status is refreshed (s)")
    spool_dir: str | None = setting(
        None, "folder of the on-disk outbox (default: $XDG_STATE_HOME/stream-ser/spool)"
    )
    spool_max_messages: int = setting(
        10_000, "waiting results beyond which the oldest window results are dropped"
    )
    spool_hard_limit: int = setting(
        100_000, "waiting results beyond which even the oldest utterance result is dropped"
    )
    spool_max_mb: float = setting(
        256.0, "waiting payload megabytes beyond which the oldest results are dropped, "
        "window results first"
    )  # fmt: skip

    def __post_init__(self) -> None:
        _require(
            bool(self.topic_prefix) and not any(c in self.topic_prefix for c in "#+"),
            "--mqtt-topic-prefix must be non-empty and contain no '#' or '+'",
        )
        _require(self.topic_prefix.isprintable(), "--mqtt-topic-prefix: no control characters")
        if self.client_id is not None:
            check_name("--mqtt-client-id", self.client_id, MAX_CLIENT_ID_BYTES)
        _require(0 < self.spool_max_mb <= 1_000_000, "--mqtt-spool-max-mb must be 0..1000000")
        _require(5 <= self.keepalive_s <= 3600, "--mqtt-keepalive-s must be 5..3600")
        _require(0 < self.connect_timeout_s <= 300, "--mqtt-connect-timeout-s must be 0..300")
        _require(self.status_interval_s >= 0.5, "--mqtt-status-interval-s must be >= 0.5")
        _require(
            1 <= self.spool_max_messages <= self.spool_hard_limit,
            "need 1 <= --mqtt-spool-max-messages <= --mqtt-spool-hard-limit",
        )
        for name in ("ca_file", "cert_file", "key_file", "password_file"):
            path = getattr(self, name)
            flag = "--mqtt-" + name.replace("_", "-")
            _require(path is None or Path(path).is_file(), f"{flag}: no such file: {path}")
        _require(self.username != "", "--mqtt-username must not be empty")
        _require(
            self.key_file is None or self.cert_file is not None,
            "--mqtt-key-file needs --mqtt-cert-file",
        )
        tls_files = (self.ca_file, self.cert_file, self.key_file)
        _require(  # a forgotten 's' must not silently send in clear text what was meant for TLS
            self.url is None or self.url.startswith("mqtts://") or tls_files == (None,) * 3,
            "--mqtt-ca-file/--mqtt-cert-file/--mqtt-key-file need an mqtts:// broker URL",
        )


@dataclass(frozen=True)
class AlmSettings(AlmOptions):
    """The audio-language-model stage (`alm` extra); every AlmOptions field is a setting."""

    spec: str | None = setting(
        None, "audio-language model KIND:PATH, KIND qwen2-audio, clap or openai", "--alm",
        metavar="KIND:PATH",
    )  # fmt: skip

    def options(self) -> AlmOptions:
        """The backend and batcher options."""
        return AlmOptions(**{item.name: getattr(self, item.name) for item in fields(AlmOptions)})


@dataclass(frozen=True)
class FusionSettings:
    """How the final utterance result combines the recognizers."""

    file: str | None = setting(
        None, "fusion file (TOML; `stream-ser calibrate` writes one)", "--fusion", metavar="FILE"
    )
    rule: str | None = setting(None, "mean or geometric (default: the file's, else geometric)")
    deadline_ms: int | None = setting(
        None,
        "how long a live stream's final result waits for the ALM and descriptors (default: "
        "the file's, else 3000; a file without --realtime waits for them)",
    )

    def __post_init__(self) -> None:
        _require(self.rule is None or self.rule in RULES, f"--fusion-rule must be one of {RULES}")
        _require(
            self.deadline_ms is None or 0 <= self.deadline_ms <= 600_000,
            "--fusion-deadline-ms must be 0..600000",
        )
        _require(
            self.file is None or Path(self.file).is_file(), f"--fusion: no such file: {self.file}"
        )


@dataclass(frozen=True)
class HomeAssistantSettings:
    """Home Assistant MQTT discovery (needs --mqtt)."""

    discovery: bool = setting(
        False, "publish retained Home Assistant discovery configs for each stream", "--ha-discovery"
    )
    discovery_prefix: str = setting("homeassistant", "Home Assistant's discovery topic prefix")
    device_name: str | None = setting(None, "device name shown in Home Assistant")

    def __post_init__(self) -> None:
        _require(
            bool(self.discovery_prefix) and not any(c in self.discovery_prefix for c in "#+"),
            "--ha-discovery-prefix must be non-empty and contain no '#' or '+'",
        )


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus and health endpoint."""

    port: int | None = setting(
        None, "serve /metrics and /healthz on this TCP port (0: any free port); none: off"
    )
    host: str = setting("127.0.0.1", "address the metrics endpoint listens on")

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError("--metrics-port must be 0..65535")
        if not self.host:
            raise ConfigError("--metrics-host must not be empty")


@dataclass(frozen=True)
class OutputSettings:
    """Local output and logging."""

    jsonl: bool = setting(
        False, "write results as JSON Lines on stdout (even with --mqtt)", "--jsonl"
    )
    log_level: str = setting("info", "debug, info, warning or error", "--log-level")
    log_json: bool = setting(False, "log JSON lines on stderr (for log collectors)", "--log-json")
    max_pending_windows: int = setting(
        8, "window jobs of one stream waiting for the model; the oldest beyond are dropped"
    )
    descriptors: bool = setting(
        True, "publish eGeMAPS descriptors with each utterance (opensmile)", "--descriptors"
    )

    def __post_init__(self) -> None:
        levels = ("debug", "info", "warning", "error")
        _require(self.log_level in levels, f"--log-level must be one of {', '.join(levels)}")
        _require(self.max_pending_windows >= 1, "--output-max-pending-windows must be >= 1")


@dataclass(frozen=True)
class Settings:
    """The whole settings tree of `stream-ser run`."""

    source: SourceSettings = field(default_factory=SourceSettings)
    vad: VadSettings = field(default_factory=VadSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    alm: AlmSettings = field(default_factory=AlmSettings)
    fusion: FusionSettings = field(default_factory=FusionSettings)
    ha: HomeAssistantSettings = field(default_factory=HomeAssistantSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    http: HttpSettings = field(default_factory=HttpSettings)

    def __post_init__(self) -> None:
        _require(
            self.mqtt.url is not None or not self.ha.discovery, "--ha-discovery needs --mqtt URL"
        )


SECTIONS: dict[str, type[Any]] = {
    "source": SourceSettings,
    "vad": VadSettings,
    "model": ModelSettings,
    "mqtt": MqttSettings,
    "alm": AlmSettings,
    "fusion": FusionSettings,
    "ha": HomeAssistantSettings,
    "metrics": MetricsSettings,
    "output": OutputSettings,
    "http": HttpSettings,
}

TOML_ONLY = {("alm", "api_key")}  # secrets never go on the command line


def _flag(section: str, name: str, metadata: Any) -> str:
    return metadata.get("flag") or f"--{section}-{name}".replace("_", "-")


def _dest(section: str, name: str) -> str:
    return f"{section}__{name}"


def _base_type(annotation: Any) -> Any:
    """int for `int | None`, tuple for `tuple[str, ...]`, else the annotation itself."""
    if isinstance(annotation, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner
    return typing.get_origin(annotation) or annotation


def add_arguments(
    parser: argparse.ArgumentParser,
    sections: Sequence[str] | None = None,
    skip: Collection[str] = (),
    shown_defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add every setting (of `sections`, default all) as a flag; unset flags stay absent.

    `skip` leaves out settings by dest (`section__name`) that the command does not use;
    `shown_defaults` are the defaults the help names where the command sets its own.
    """
    parser.add_argument("--config", metavar="TOML", help="settings file (same keys as flags)")
    for section, cls in SECTIONS.items():
        if sections is not None and section not in sections:
            continue
        group = parser.add_argument_group(f"[{section}] settings")
        hints = typing.get_type_hints(cls)
        for item in fields(cls):
            dest = _dest(section, item.name)
            if (section, item.name) in TOML_ONLY or dest in skip:
                continue
            default = (shown_defaults or {}).get(dest, item.default)
            options: dict[str, Any] = {
                "dest": dest,
                "default": argparse.SUPPRESS,
                "help": _help(section, item, default),
            }
            kind = _base_type(hints[item.name])
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction
            else:
                options["metavar"] = item.name.upper()
                options["type"] = _split_list if kind is tuple else kind
            options.update(item.metadata.get("argparse", {}))
            group.add_argument(_flag(section, item.name, item.metadata), **options)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part)


def field_help(section: str, item: Any) -> str:
    """A setting's one-line help (tests/test_usability.py checks that each has one)."""
    described = item.metadata.get("help") or ALM_HELP.get(item.name if section == "alm" else "")
    return str(described or item.name.replace("_", " "))


def _help(section: str, item: Any, default: Any) -> str:
    """The field's help, with its default unless the help already names one."""
    described = field_help(section, item)
    if "default" in described:
        return str(described)
    return f"{described} (default: {_show(default)})"


def _show(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(default)
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else str(default)


MULTI_SOURCE = ("source__input", "source__mic")  # repeatable flags: one stream each


def split_sources(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per --input/--mic given (each with just that source); --stream-id
    names a stream only when there is one source."""
    given = [(dest, value) for dest in MULTI_SOURCE for value in getattr(args, dest, None) or []]
    if len(given) <= 1:
        return [args]
    if getattr(args, "source__stream_id", None):
        raise ConfigError("--stream-id names one stream: leave it out with several sources")
    variants = []
    for dest, value in given:
        variant = argparse.Namespace(**vars(args))
        for other in MULTI_SOURCE:
            if hasattr(variant, other):
                delattr(variant, other)
        setattr(variant, dest, [value])
        variants.append(variant)
    return variants


def build_settings(args: argparse.Namespace) -> Settings:
    """Merge defaults, the TOML file named by --config, and the flags; validate."""
    values = _read_toml(Path(args.config)) if getattr(args, "config", None) else {}
    for section, cls in SECTIONS.items():
        for item in fields(cls):
            dest = _dest(section, item.name)
            if hasattr(args, dest):
                value = getattr(args, dest)
                if dest in MULTI_SOURCE:
                    if len(value) > 1:
                        raise ConfigError("several sources: build one settings tree per source")
                    value = value[0]
                values.setdefault(section, {})[item.name] = value
    return Settings(**{name: _build_section(name, raw) for name, raw in values.items()})


def _build_section(section: str, raw: dict[str, Any]) -> Any:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        raw[name] = _coerce(section, name, hints[name], value)
    return replace(cls(), **raw) if raw else cls()


def _coerce(section: str, name: str, annotation: Any, value: Any) -> Any:
    kind = _base_type(annotation)
    optional = isinstance(annotation, types.UnionType)
    if value is None and optional:
        return None
    if kind is tuple and isinstance(value, list | tuple):
        return tuple(str(item) for item in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and section == "source" and name == "mic" and isinstance(value, int):
        return str(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"[{section}] {name}: expected {kind.__name__}, got {value!r}")


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read settings file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        known = {item.name for item in fields(SECTIONS[section])}
        for key in table:
            if key not in known:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
    return data
