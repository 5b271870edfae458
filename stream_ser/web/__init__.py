"""The HTTP server of `stream-ser run --http`: the dashboard page and the WebSocket API.

Needs the optional `web` extra (aiohttp), imported only when the server starts; `options`
(the `[http]` settings) and `protocol` (parameters, tokens, close codes) import without it.
"""

from __future__ import annotations

from stream_ser.errors import ConfigError


def require_aiohttp() -> None:
    """ConfigError naming the extra to install unless aiohttp can be imported."""
    try:
        import aiohttp  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "--http needs aiohttp, which the `web` extra installs: pip install 'stream-ser[web]'"
        ) from err
