"""The `[http]` settings (`--http`, `--http-*`) that the settings tree embeds: plain values."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from stream_ser.errors import ConfigError

LOOPBACK = "127.0.0.1"


def _setting(default: Any, help: str, flag: str | None = None, **extra: Any) -> Any:
    """As stream_ser.settings.setting (not imported from there: that module imports this one)."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": {}}, **extra)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or a bare PORT (then the loopback address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = LOOPBACK, text
    host = host.removeprefix("[").removesuffix("]") or LOOPBACK
    if not port.isdigit() or not 0 <= int(port) <= 65535:  # noqa: PLR2004
        raise ConfigError(
            f"--http {text!r}: expected HOST:PORT (port 0..65535), e.g. {LOOPBACK}:8080"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: the server is not reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP server: dashboard page and WebSocket API (the `web` extra)."""

    address: str | None = _setting(
        None, "serve the dashboard and the WebSocket API on HOST:PORT (a bare PORT: localhost "
        "only; 0.0.0.0:PORT: every interface); none: off", "--http",
    )  # fmt: skip
    token: str | None = _setting(
        None, "bearer token WebSocket clients must present (header or ?token=); none: no token",
        "--http-token", repr=False,
    )  # fmt: skip
    token_file: str | None = _setting(None, "file whose first line is the bearer token")
    max_connections: int = _setting(32, "WebSocket connections at once; more are refused")
    max_connections_per_client: int = _setting(
        16, "WebSocket connections at once from one client address (behind a reverse proxy "
        "every client has the proxy's address: raise it to --http-max-connections)",
    )  # fmt: skip
    max_frame_bytes: int = _setting(1 << 20, "largest WebSocket message accepted (bytes)")
    max_queued_s: float = _setting(
        10.0, "audio of one WebSocket stream waiting for the model (s); older audio is dropped"
    )

    def __post_init__(self) -> None:
        if self.address is not None:
            parse_address(self.address)
        if self.token is not None and self.token_file is not None:
            raise ConfigError("give --http-token or --http-token-file, not both")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--http-token must not be empty")
        if not 1 <= self.max_connections <= 10_000:  # noqa: PLR2004
            raise ConfigError("--http-max-connections must be 1..10000")
        if not 1 <= self.max_connections_per_client <= 10_000:  # noqa: PLR2004
            raise ConfigError("--http-max-connections-per-client must be 1..10000")
        if not 1024 <= self.max_frame_bytes <= 64 << 20:  # noqa: PLR2004
            raise ConfigError("--http-max-frame-bytes must be 1024..67108864")
        if not 0.1 <= self.max_queued_s <= 600:  # noqa: PLR2004
            raise ConfigError("--http-max-queued-s must be 0.1..600")
