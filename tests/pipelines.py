"""One file through a real StreamPipeline (stream "s" of the tiny model), and a sink keeping its
results: what the stage and recognizer tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream_ser.backpressure import for_stream
from stream_ser.fusion import FusionConfig
from stream_ser.messages import StreamInfo
from stream_ser.pipeline import StreamPipeline
from stream_ser.recognizer import Recognizer
from stream_ser.settings import SourceSettings, VadSettings
from stream_ser.source import SourceStats, open_source
from stream_ser.stages import UtteranceStages
from stream_ser.vad import Segmenter


class ResultSink:
    """A sink keeping every result (the part of stream_ser.publish.Sink a pipeline calls)."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    async def result(self, stream_id: str, message: dict[str, Any]) -> None:
        self.results.append(message)

    async def speaking(self, stream_id: str, message: dict[str, Any]) -> None:
        pass


def file_pipeline(
    path: Path,
    recognizer: Recognizer,
    sink: object,
    stages: UtteranceStages | None = None,
    *,
    lossless: bool = True,
    deadline_ms: int = 3000,
    windows: bool = False,
) -> StreamPipeline:
    """The audio file as stream "s", read lossless (as fast as the pipeline takes it) or live;
    `stages` default to none (the specialist alone); `deadline_ms` is the back-pressure's."""
    specialist = recognizer.specialist
    return StreamPipeline(
        StreamInfo("s", "test", "tiny", specialist.labels),
        open_source(SourceSettings(input=str(path)), SourceStats()),
        Segmenter(VadSettings()), recognizer, sink,  # type: ignore[arg-type]
        specialist.card.window_ms, specialist.card.hop_ms,
        stages if stages is not None else UtteranceStages(FusionConfig(specialist.labels)),
        windows=windows,
        backpressure=for_stream(lossless, deadline_ms, recognizer.max_pending_windows),
    )  # fmt: skip
