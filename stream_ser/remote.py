"""Audio over MQTT: the wire format devices publish and the reordering a worker applies.

Topics (prefix as for results, default `stream-ser`):

    {prefix}/audio/{stream_id}/pcm     QoS 0 or 1: audio chunks (binary, format below)
    {prefix}/audio/{stream_id}/hello   QoS 1, every HELLO_INTERVAL_S while the device streams:
                                       JSON {"stream_id", "sample_rate", "channels", "seq"}
    {prefix}/audio/{stream_id}/owner   retained: JSON {"worker": client_id} of the worker that
                                       recognises the stream (empty once released)

A chunk is a 24-byte little-endian header followed by interleaved signed 16-bit PCM:

    offset  size  field
    0       4     magic b"SSA1"
    4       1     version (1)
    5       1     flags (bit 0: last chunk of the stream)
    6       2     channels (1..8)
    8       4     sample rate in Hz (8000..48000)
    12      4     sequence number (0, 1, 2, ... per stream; wraps are not supported)
    16      8     capture time of the first sample, ms since the Unix epoch (device clock)

Limits: a chunk holds at most MAX_CHUNK_MS of audio and MAX_PAYLOAD_BYTES in all; anything
malformed or oversized is rejected with a counted, logged reason, never a crash.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from stream_ser.errors import StreamSerError

MAGIC = b"SSA1"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
FLAG_LAST = 0x01
MAX_CHANNELS = 8
RATES = (8000, 48000)  # inclusive range
MAX_CHUNK_MS = 1000
MAX_PAYLOAD_BYTES = HEADER.size + 2 * MAX_CHANNELS * RATES[1] * MAX_CHUNK_MS // 1000
HELLO_INTERVAL_S = 2.0
REORDER_WINDOW = 8  # chunks held back waiting for a missing one before it counts as lost
MAX_FILLED_GAP = 100  # lost chunks in a row replaced by silence; a longer jump is skipped
RECENT_RELEASED = 256  # released sequence numbers remembered to tell duplicates from late ones


class PayloadError(StreamSerError):
    """A remote audio payload that cannot be accepted."""


@dataclass(frozen=True)
class Chunk:
    """One decoded audio chunk."""

    seq: int
    sample_rate: int
    channels: int
    captured_ms: int  # device wall clock, ms since the epoch
    last: bool
    pcm: np.ndarray = field(repr=False)  # int16, (frames, channels)

    @property
    def frames(self) -> int:
        """Samples per channel."""
        return int(self.pcm.shape[0])


def encode_chunk(
    seq: int, sample_rate: int, pcm: np.ndarray, captured_ms: int, last: bool = False
) -> bytes:
    """A chunk payload; `pcm` is int16 of shape (frames, channels) or (frames,)."""
    frames = np.asarray(pcm, dtype="<i2")
    if frames.ndim == 1:  # reshape(len, -1) cannot infer the channels of an empty block
        frames = frames[:, np.newaxis]
    header = HEADER.pack(
        MAGIC, VERSION, FLAG_LAST if last else 0, frames.shape[1], sample_rate, seq, captured_ms
    )
    return header + frames.tobytes()


def decode_chunk(payload: bytes) -> Chunk:
    """Parse and check a chunk; PayloadError says what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if len(payload) < HEADER.size:
        raise PayloadError(f"payload of {len(payload)} bytes is shorter than the header")
    magic, version, flags, channels, rate, seq, captured = HEADER.unpack_from(payload)
    if magic != MAGIC or version != VERSION:
        raise PayloadError("not a stream-ser audio chunk (bad magic or version)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise PayloadError(f"channel count {channels} outside 1..{MAX_CHANNELS}")
    if not RATES[0] <= rate <= RATES[1]:
        raise PayloadError(f"sample rate {rate} outside {RATES[0]}..{RATES[1]}")
    body = len(payload) - HEADER.size
    if body % (2 * channels):
        raise PayloadError(f"{body} PCM bytes are not whole 16-bit frames of {channels} channels")
    frames = body // (2 * channels)
    if frames * 1000 > rate * MAX_CHUNK_MS:
        raise PayloadError(f"chunk of {frames} frames is longer than {MAX_CHUNK_MS} ms")
    pcm = np.frombuffer(payload, dtype="<i2", offset=HEADER.size).reshape(frames, channels)
    return Chunk(seq, rate, channels, captured, bool(flags & FLAG_LAST), pcm)


@dataclass
class ReorderStats:
    """What the reorder buffer saw."""

    chunks_late: int = 0  # arrived after their place was given up (dropped)
    chunks_duplicate: int = 0
    chunks_lost: int = 0  # never arrived: replaced by silence of the same length
    format_changes: int = 0  # rate/channels changed mid-stream (chunk dropped)
    restarts: int = 0  # the sender started numbering from 0 again (a restarted device)


class Reorderer:
    """Puts chunks back in sequence order.

    Chunks are released in order. A missing chunk is waited for until REORDER_WINDOW later
    chunks have arrived; then it counts as lost and is replaced by silence as long as the
    chunk after it (so stream time stays true). A stream starts at chunk 0, or, when its first
    chunks are missing (a worker that takes over mid-stream), at the smallest of the first
    REORDER_WINDOW chunks held. A chunk released already is a duplicate; one older than the
    last released that never came is late; both are dropped. A chunk numbered 0 that was
    captured after every chunk released or held (not after every chunk ever seen: one bogus
    capture time must not disable this) is a restarted sender (a new `stream-ser send` under
    the same stream id): what is held is released and the sequence starts over (a different
    rate or channel count is still a format change: the stream's converter and clock continue).
    """

    def __init__(self, window: int = REORDER_WINDOW) -> None:
        self.window = window
        self.stats = ReorderStats()
        self._next: int | None = None  # None until the stream's first chunk is known
        self._held: dict[int, Chunk] = {}
        self._format: tuple[int, int] | None = None
        self._released_ms = -1  # capture time of the last chunk released
        self._recent: deque[int] = deque(maxlen=RECENT_RELEASED)  # seqs released lately

    def push(self, chunk: Chunk) -> Iterator[Chunk]:
        """Accept one chunk; yield every chunk (or silence filler) now ready, in order."""
        if chunk.seq == 0 and self._next and chunk.captured_ms > self._newest_ms():
            yield from self.flush()
            self.stats.restarts += 1
            self._next = None
            self._recent.clear()
        if self._format is None:
            self._format = (chunk.sample_rate, chunk.channels)
        if (chunk.sample_rate, chunk.channels) != self._format:
            self.stats.format_changes += 1
            return
        if self._next is not None and chunk.seq < self._next:
            if chunk.seq in self._recent:
                self.stats.chunks_duplicate += 1
            else:
                self.stats.chunks_late += 1
            return
        if chunk.seq in self._held:
            self.stats.chunks_duplicate += 1
            return
        self._held[chunk.seq] = chunk
        if self._next is None and (chunk.seq == 0 or len(self._held) >= self.window):
            self._next = min(self._held)
        if self._next is not None:
            yield from self._release()

    def flush(self) -> Iterator[Chunk]:
        """End of stream: release everything held, filling gaps with silence."""
        if self._next is None and self._held:
            self._next = min(self._held)
        while self._held:
            yield from self._give_up_one()
            yield from self._release()

    def _newest_ms(self) -> int:
        return max([self._released_ms, *(held.captured_ms for held in self._held.values())])

    def _release(self) -> Iterator[Chunk]:
        while True:
            assert self._next is not None
            if self._next in self._held:
                chunk = self._held.pop(self._next)
                self._next += 1
                self._released_ms = chunk.captured_ms
                self._recent.append(chunk.seq)
                yield chunk
            elif len(self._held) >= self.window:
                yield from self._give_up_one()
            else:
                return

    def _give_up_one(self) -> Iterator[Chunk]:
        """The expected chunk is lost: silence as long as the next held chunk stands in."""
        assert self._next is not None
        if self._next in self._held:
            return
        after = self._held[min(self._held)]
        if after.seq - self._next > MAX_FILLED_GAP:  # a bogus seq must not make 2**32 fillers
            self.stats.chunks_lost += after.seq - self._next
            self._next = after.seq
            return
        self.stats.chunks_lost += 1
        silence = np.zeros_like(after.pcm)
        yield Chunk(self._next, after.sample_rate, after.channels, after.captured_ms, False,
                    silence)  # fmt: skip
        self._next += 1
