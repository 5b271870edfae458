"""stream-ser: streaming speech emotion recognition, audio in, emotion distributions out.

The Python API (docs/python.md): `recognize`, `listen`, `Microphone`, `PushSource`, `Result`,
`Descriptor`. They are imported on first use, so `import stream_ser` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stream_ser.api import Microphone, listen, recognize
    from stream_ser.push import PushSource
    from stream_ser.results import Descriptor, Result

__version__ = "0.1.0"

SAMPLE_RATE = 16000
"""Every stage after the source works on 16 kHz mono float32 audio."""

_LAZY = {
    "recognize": "stream_ser.api",
    "listen": "stream_ser.api",
    "Microphone": "stream_ser.api",
    "PushSource": "stream_ser.push",
    "Result": "stream_ser.results",
    "Descriptor": "stream_ser.results",
}

__all__ = [
    "SAMPLE_RATE",
    "Descriptor",
    "Microphone",
    "PushSource",
    "Result",
    "__version__",
    "listen",
    "recognize",
]


def __getattr__(name: str) -> Any:
    """The API's names, imported when first used (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'stream_ser' has no attribute {name!r}")
    # importlib, not an import statement: the package must not import its modules at import
    # time (they import `stream_ser` for SAMPLE_RATE), see tests/test_architecture.py
    return getattr(importlib.import_module(_LAZY[name]), name)
