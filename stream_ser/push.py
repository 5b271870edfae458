"""Audio pushed by a caller for one stream: a WebSocket connection, a Pipecat pipeline, code.

    source = PushSource(48000, 2, "s16le")
    pipeline = runtime.start("kitchen", source.chunks(), source.stats)
    source.push(pcm_bytes)        # never blocks (live audio)
    await source.put(pcm_bytes)   # or: waits while the queue is full (a recording)
    source.end()                  # the pipeline flushes the last utterance

The audio is converted (stream_ser.source.Converter) to 16 kHz mono float32 when it is pushed,
then queued for the pipeline. Queue and overflow rule: at most `max_queued_s` seconds of
converted audio wait; `push` then drops the oldest queued chunks (each counted in the stats'
`blocks_dropped`), `put` waits for room instead. Not thread-safe: call it from the event loop
that runs the pipeline (from another thread: `loop.call_soon_threadsafe(source.push, data)`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal, get_args

import numpy as np

from stream_ser import SAMPLE_RATE
from stream_ser.errors import AudioInputError
from stream_ser.events import AudioChunk
from stream_ser.remote import MAX_CHANNELS, RATES
from stream_ser.source import Converter, SourceStats

SampleFormat = Literal["s16le", "f32le"]
SAMPLE_FORMATS: tuple[str, ...] = get_args(SampleFormat)
_DTYPES: dict[str, np.dtype[Any]] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
_INT16_SCALE = 32768.0


def check_format(sample_rate: int, channels: int, sample_format: str) -> None:
    """AudioInputError naming the problem unless the three describe audio a PushSource takes."""
    if not RATES[0] <= sample_rate <= RATES[1]:
        raise AudioInputError(f"sample rate {sample_rate} Hz is outside {RATES[0]}..{RATES[1]}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioInputError(f"channels {channels} is outside 1..{MAX_CHANNELS}")
    if sample_format not in SAMPLE_FORMATS:
        raise AudioInputError(
            f"sample format {sample_format!r} is not one of {', '.join(SAMPLE_FORMATS)}"
        )


class PushSource:
    """One stream's audio, pushed in; `chunks()` is the pipeline's source."""

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        sample_format: SampleFormat = "s16le",
        stats: SourceStats | None = None,
        max_queued_s: float = 10.0,
    ) -> None:
        check_format(sample_rate, channels, sample_format)
        if max_queued_s <= 0:
            raise AudioInputError("max_queued_s must be positive")
        self.sample_rate = sample_rate
        self.channels = channels
        self.sample_format = sample_format
        self.stats = stats if stats is not None else SourceStats()
        self._dtype = _DTYPES[sample_format]
        self._frame_bytes = self._dtype.itemsize * channels
        self._converter = Converter(sample_rate, channels, self.stats)
        self._max_samples = round(max_queued_s * SAMPLE_RATE)  # 16 kHz samples queued at most
        self._queue: deque[AudioChunk] = deque()
        self._queued_samples = 0
        self._ready = asyncio.Event()  # the queue holds audio, or the stream ended
        self._room = asyncio.Event()  # the queue has room
        self._room.set()
        self._ended = False
        self._iterated = False

    @property
    def ended(self) -> bool:
        """True once `end` was called."""
        return self._ended

    @property
    def queued_ms(self) -> int:
        """Converted audio waiting for the pipeline (ms)."""
        return self._queued_samples * 1000 // SAMPLE_RATE

    def push(self, samples: bytes | np.ndarray) -> None:
        """Queue audio now; never blocks. When full, the oldest queued audio is dropped (counted).

        `samples`: interleaved little-endian PCM bytes in the declared format, or an array of
        shape (frames,) for mono or (frames, channels): int16, or float in [-1, 1].
        AudioInputError if they do not fit the declared format or the stream has ended."""
        chunk = self._convert(samples)
        if chunk is None:
            return
        self._append(chunk)
        while self._queued_samples > self._max_samples and len(self._queue) > 1:
            dropped = self._queue.popleft()
            self._queued_samples -= len(dropped.samples)
            self.stats.blocks_dropped += 1

    async def put(self, samples: bytes | np.ndarray) -> None:
        """Queue audio, waiting while the queue is full (a producer that must lose nothing)."""
        chunk = self._convert(samples)
        if chunk is None:
            return
        while self._queued_samples >= self._max_samples and not self._ended:
            self._room.clear()
            await self._room.wait()
        self._append(chunk)

    def end(self) -> None:
        """End of the stream: what is queued is still delivered, then `chunks()` ends."""
        if self._ended:
            return
        tail = self._converter.convert(np.zeros((0, self.channels), np.float32), last=True)
        if tail is not None:
            self._append(tail)
        self._ended = True
        self._ready.set()
        self._room.set()

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """16 kHz mono float32 chunks, in order, until `end` (one consumer only)."""
        if self._iterated:
            raise AudioInputError("a PushSource has one consumer: chunks() was called twice")
        self._iterated = True
        while True:
            if self._queue:
                chunk = self._queue.popleft()
                self._queued_samples -= len(chunk.samples)
                self._room.set()
                yield chunk
            elif self._ended:
                return
            else:
                self._ready.clear()
                await self._ready.wait()

    def _convert(self, samples: bytes | np.ndarray) -> AudioChunk | None:
        if self._ended:
            raise AudioInputError("audio pushed after the stream ended")
        block = self._block(samples)
        if len(block) == 0:
            return None
        return self._converter.convert(block)

    def _block(self, samples: bytes | np.ndarray) -> np.ndarray:
        """(frames, channels) float32 in [-1, 1] from bytes or an array."""
        if isinstance(samples, bytes | bytearray | memoryview):
            return self._from_bytes(bytes(samples))
        array = np.asarray(samples)
        if array.ndim == 1 and self.channels == 1:
            array = array[:, np.newaxis]
        if array.ndim != 2 or array.shape[1] != self.channels:  # noqa: PLR2004  (frames x channels)
            raise AudioInputError(
                f"audio array of shape {array.shape}: expected (frames, {self.channels})"
                + (" or (frames,)" if self.channels == 1 else "")
            )
        if array.dtype == np.int16:
            return array.astype(np.float32) / _INT16_SCALE
        if array.dtype.kind != "f":
            raise AudioInputError(f"audio array of dtype {array.dtype}: expected int16 or float")
        return array.astype(np.float32, copy=False)

    def _from_bytes(self, data: bytes) -> np.ndarray:
        if len(data) % self._frame_bytes:
            raise AudioInputError(
                f"{len(data)} bytes is not a whole number of frames: a frame of "
                f"{self.channels} channel(s) of {self.sample_format} is {self._frame_bytes} bytes"
            )
        pcm = np.frombuffer(data, dtype=self._dtype).reshape(-1, self.channels)
        block: np.ndarray = pcm.astype(np.float32)  # NaN/inf: counted, zeroed by the Converter
        return block / _INT16_SCALE if self.sample_format == "s16le" else block

    def _append(self, chunk: AudioChunk) -> None:
        self._queue.append(chunk)
        self._queued_samples += len(chunk.samples)
        self._ready.set()
