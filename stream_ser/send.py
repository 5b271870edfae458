"""`stream-ser send`: stream a file, stdin or a microphone to the broker; no model here.

The device side of remote recognition: audio goes out as chunks in the format of
`stream_ser.remote` (int16 PCM at the source's own rate and channel count when the format
allows them, else converted to 16 kHz mono), a hello every HELLO_INTERVAL_S announces the
stream, and a worker (`run --mqtt-audio`) recognises it. Nothing on this path imports
onnxruntime or opensmile, so a Raspberry-class box needs neither.

Chunks wait in a bounded outbox while the broker is away (the link is re-established with
backoff): a live source (microphone, paced file) drops the oldest chunk when it is full,
counted and logged; an unpaced file or stdin waits for room instead. After every
(re)connection, chunks go out only once a worker has claimed the stream (its retained owner
record), for at most `uplink.CLAIM_WAIT_S`: what a device buffered during a broker outage is not
published before the worker has subscribed again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from stream_ser import SAMPLE_RATE, source
from stream_ser.errors import AudioInputError, ConfigError, PublishError
from stream_ser.logs import configure_logging
from stream_ser.remote import (
    MAX_CHANNELS,
    MAX_CHUNK_MS,
    RATES,
    encode_chunk,
)
from stream_ser.settings import Settings, add_arguments, build_settings
from stream_ser.stopping import install_stop_handlers
from stream_ser.uplink import Outbox, Outgoing, Uplink

log = logging.getLogger(__name__)

Block = tuple[np.ndarray, bool]  # int16 (frames, channels); True for the end of the input
MIN_CHUNK_MS = 10
MIN_BUFFER_S, MAX_BUFFER_S = 1, 3600


@dataclass(frozen=True)
class SendSettings:
    """How `send` chunks and publishes."""

    chunk_ms: int = 100  # audio per published chunk
    qos: int = 1  # of the pcm topic
    buffer_s: float = 30.0  # audio kept while the broker is away

    def __post_init__(self) -> None:
        if not MIN_CHUNK_MS <= self.chunk_ms <= MAX_CHUNK_MS:
            raise ConfigError(f"--send-chunk-ms must be between {MIN_CHUNK_MS} and {MAX_CHUNK_MS}")
        if self.qos not in (0, 1):
            raise ConfigError("--send-qos must be 0 or 1")
        if not MIN_BUFFER_S <= self.buffer_s <= MAX_BUFFER_S:
            raise ConfigError(f"--send-buffer-s must be between {MIN_BUFFER_S} and {MAX_BUFFER_S}")

    @property
    def outbox_chunks(self) -> int:
        """Chunks the outbox holds: `buffer_s` of audio."""
        return max(1, math.ceil(self.buffer_s * 1000 / self.chunk_ms))


@dataclass(frozen=True)
class Capture:
    """An opened source: the format it is sent in and its blocks."""

    sample_rate: int  # Hz, as sent
    channels: int  # as sent
    blocks: AsyncGenerator[Block, None]
    live: bool  # live sources drop the oldest chunks when the outbox is full; others wait


def fits_format(rate: int, channels: int) -> bool:
    """Whether audio can be sent as it is (rate and channel count within the wire limits)."""
    return RATES[0] <= rate <= RATES[1] and 1 <= channels <= MAX_CHANNELS


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] as int16 of shape (frames, 1) or (frames, channels)."""
    scaled: np.ndarray = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    return scaled[:, np.newaxis] if scaled.ndim == 1 else scaled


class WireConverter:
    """Blocks the format cannot carry as they are: to 16 kHz mono int16."""

    def __init__(self, rate: int, channels: int, stats: source.SourceStats) -> None:
        self._converter = source.Converter(rate, channels, stats)

    def convert(self, block: np.ndarray, last: bool) -> np.ndarray:
        """`block` float (frames, channels); int16 (frames, 1), possibly empty."""
        chunk = self._converter.convert(block, last=last)
        return to_int16(chunk.samples if chunk is not None else np.zeros(0, np.float32))


# --- sources -------------------------------------------------------------------------------


def open_capture(settings: Settings, chunk_ms: int) -> Capture:
    """The source the settings name, opened; AudioInputError if it cannot be."""
    src = settings.source
    stats = source.SourceStats()
    if src.mic is not None:
        return _open_mic(src.mic, chunk_ms, stats, src.mic_retries, src.mic_retry_delay_s)
    if src.input == "-":
        rate, channels = _wire_format(src.rate, src.channels)
        blocks = stdin_blocks(src.rate, src.channels, chunk_ms, stats)
        return Capture(rate, channels, blocks, live=False)
    if src.input is None:
        raise ConfigError("no audio source: give --input FILE, --input - or --mic [DEVICE]")
    path = Path(src.input)
    audio = source.open_file(path)
    rate, channels = _wire_format(audio.samplerate, audio.channels)
    pace = src.speed if src.realtime else None
    return Capture(
        rate, channels, file_blocks(path, audio, chunk_ms, pace, stats), pace is not None
    )


def _wire_format(rate: int, channels: int) -> tuple[int, int]:
    return (rate, channels) if fits_format(rate, channels) else (SAMPLE_RATE, 1)


async def file_blocks(
    path: Path,
    audio: soundfile.SoundFile,
    chunk_ms: int,
    speed: float | None,
    stats: source.SourceStats,
) -> AsyncGenerator[Block, None]:
    """Blocks of an opened file, as fast as possible (`speed` None) or paced at `speed`."""
    with audio:
        exact = fits_format(audio.samplerate, audio.channels)
        converter = None if exact else WireConverter(audio.samplerate, audio.channels, stats)
        frames = max(1, audio.samplerate * chunk_ms // 1000)
        started = time.monotonic()
        read = 0
        while True:
            try:
                block = audio.read(frames, dtype="int16" if exact else "float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as err:
                raise AudioInputError(
                    f"{path}: decoding failed after {read} frames ({err})"
                ) from err
            read += len(block)
            last = len(block) < frames
            if speed is not None:
                due = started + read / audio.samplerate / speed
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield (block if converter is None else converter.convert(block, last)), last
            if last:
                return


async def stdin_blocks(
    rate: int, channels: int, chunk_ms: int, stats: source.SourceStats
) -> AsyncGenerator[Block, None]:
    """Raw little-endian 16-bit PCM on stdin, `channels` interleaved, at `rate` Hz."""
    frame_bytes = 2 * channels
    blocks = source.read_stdin_in_thread(frame_bytes * max(1, rate * chunk_ms // 1000))
    converter = None if fits_format(rate, channels) else WireConverter(rate, channels, stats)
    pending = b""
    while True:
        data = await blocks.get()
        pending += data
        whole = len(pending) - len(pending) % frame_bytes
        pcm = np.frombuffer(pending[:whole], dtype="<i2").reshape(-1, channels)
        pending = pending[whole:]
        if converter is not None:
            pcm = converter.convert(pcm.astype(np.float32) / 32768.0, last=not data)
        if len(pcm) or not data:
            yield pcm.astype(np.int16), not data
        if not data:
            break
    if pending:
        log.warning("stdin ended with %d stray bytes: not a whole frame; check --channels",
                    len(pending))  # fmt: skip


def _open_mic(
    device: str, chunk_ms: int, stats: source.SourceStats, retries: int, retry_delay_s: float
) -> Capture:
    sd = source.load_sounddevice()
    info = source.resolve_device(sd, device)
    rate = int(info["default_samplerate"])
    channels = min(2, int(info["max_input_channels"]))
    microphone = source.Microphone(sd, device, rate, channels, chunk_ms, stats)
    wire_rate, wire_channels = _wire_format(rate, channels)
    blocks = mic_blocks(microphone, stats, retries, retry_delay_s)
    return Capture(wire_rate, wire_channels, blocks, live=True)


async def mic_blocks(
    microphone: source.Microphone,
    stats: source.SourceStats,
    retries: int,
    retry_delay_s: float,
    stall_s: float = 10.0,
) -> AsyncGenerator[Block, None]:
    """A microphone at its native rate and channels, reopened as `source.mic_source` does;
    the time it was away is sent as silence. Ends only with an AudioInputError (or a stop)."""
    rate, channels = microphone.rate, microphone.channels
    converter = None if fits_format(rate, channels) else WireConverter(rate, channels, stats)

    def wire(block: np.ndarray) -> np.ndarray:
        return to_int16(block) if converter is None else converter.convert(block, False)

    capture = microphone.open()
    log.info("capturing %r at %d Hz, %d channel(s)", capture.name, rate, channels)
    failures = 0
    while True:
        with capture.stream:
            async for block in source.captured_blocks(capture, stall_s):
                failures = 0
                yield wire(block), False
        lost_at = time.monotonic()
        failures += 1
        failure = f"input device {capture.name!r} stopped delivering audio"
        capture, failures = await microphone.reopen(failure, failures, retries, retry_delay_s)
        yield wire(source.silence(time.monotonic() - lost_at, rate, channels)), False


# --- chunks --------------------------------------------------------------------------------


def chunk_pieces(pcm: np.ndarray, max_frames: int, last: bool) -> Iterator[tuple[np.ndarray, bool]]:
    """`pcm` in pieces of at most `max_frames`; only the final piece carries `last`.
    An empty block yields one empty piece only when it is the last."""
    starts = range(0, len(pcm), max_frames) if len(pcm) else ([0] if last else [])
    for start in starts:
        yield pcm[start : start + max_frames], last and start + max_frames >= len(pcm)


class Chunker:
    """Numbers blocks and stamps them with their capture time; fills the outbox."""

    def __init__(self, capture: Capture, chunk_ms: int, outbox: Outbox) -> None:
        self.capture = capture
        self.outbox = outbox
        self.max_frames = max(1, capture.sample_rate * chunk_ms // 1000)
        self.seq = 0  # of the next chunk
        self.frames = 0  # sent so far, per channel
        self.ended = False  # the chunk flagged last is queued
        self._start_ms = time.time_ns() // 1_000_000

    async def run(self) -> None:
        """Queue every block of the capture until its end."""
        async with contextlib.aclosing(self.capture.blocks) as blocks:
            async for pcm, last in blocks:
                for piece, piece_last in chunk_pieces(pcm, self.max_frames, last):
                    await self.put(piece, piece_last)

    async def end(self) -> None:
        """Queue an empty chunk flagged last unless the last chunk is queued already."""
        if not self.ended:
            empty = np.zeros((0, self.capture.channels), dtype=np.int16)
            await self.put(empty, True, force=True)

    async def put(self, pcm: np.ndarray, last: bool, force: bool = False) -> None:
        """Encode one chunk and queue it."""
        captured_ms = self._start_ms + self.frames * 1000 // self.capture.sample_rate
        payload = encode_chunk(self.seq, self.capture.sample_rate, pcm, captured_ms, last)
        await self.outbox.put(Outgoing(self.seq, payload), force=force)
        self.seq += 1
        self.frames += len(pcm)
        self.ended = last


# --- the command ---------------------------------------------------------------------------


async def stream(
    capture: Capture, uplink: Uplink, send: SendSettings, stop: asyncio.Event
) -> tuple[Chunker, Outbox]:
    """Connect, then send the capture until its end or `stop`; returns what was done."""
    outbox = Outbox(send.outbox_chunks, drop_oldest=capture.live)
    chunker = Chunker(capture, send.chunk_ms, outbox)
    client = await uplink.connect()  # an unreachable broker at start-up is an error
    delivery = asyncio.create_task(uplink.run(client, outbox, lambda: chunker.seq), name="uplink")
    reading = asyncio.create_task(chunker.run(), name="capture")
    stopping = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait({reading, stopping, delivery}, return_when=asyncio.FIRST_COMPLETED)
        if not reading.done():
            log.info("stopping: sending the last chunk")
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading  # an AudioInputError surfaces here
        await chunker.end()
        outbox.close()
        await asyncio.wait({delivery}, timeout=uplink.settings.connect_timeout_s + 5.0)
        if delivery.done() and not delivery.cancelled() and delivery.exception() is not None:
            raise delivery.exception()  # type: ignore[misc]
    finally:
        for task in (reading, stopping, delivery):
            task.cancel()
        await asyncio.gather(reading, stopping, delivery, return_exceptions=True)
    return chunker, outbox


NOT_FOR_SEND = (  # settings of `run` and the worker that `send` does not use
    "source__mqtt_audio",
    "source__mqtt_audio_group",
    "mqtt__status_interval_s",
    "mqtt__spool_dir",
    "mqtt__spool_max_messages",
    "mqtt__spool_hard_limit",
)


def register(subparsers: Any) -> None:
    """Add the `send` command."""
    parser = subparsers.add_parser(
        "send", help="stream a file, stdin or a microphone to the broker for a remote worker"
    )
    add_arguments(parser, ("source", "mqtt"), NOT_FOR_SEND, {"source__realtime": True})
    parser.set_defaults(source__realtime=True)  # a device streams live: files are paced
    group = parser.add_argument_group("[send] settings")
    group.add_argument("--send-chunk-ms", type=int, metavar="MS",
                       help="audio per published chunk (default: --chunk-ms, 100)")  # fmt: skip
    group.add_argument("--send-qos", type=int, default=1, metavar="QOS",
                       help="QoS of the pcm topic (default: 1)")  # fmt: skip
    group.add_argument("--send-buffer-s", type=float, default=30.0, metavar="SECONDS",
                       help="audio kept while the broker is away; live sources drop the oldest "
                            "beyond it (default: 30)")  # fmt: skip
    group.add_argument("--log-level", dest="output__log_level", default=argparse.SUPPRESS,
                       metavar="LEVEL",
                       help="debug, info, warning or error (default: info)")  # fmt: skip
    group.add_argument(
        "--log-json",
        dest="output__log_json",
        default=argparse.SUPPRESS,
        action=argparse.BooleanOptionalAction,
        help="log JSON lines on stderr (default: off)",
    )
    parser.set_defaults(command=send_command)


def send_command(args: argparse.Namespace) -> int:
    """Run `stream-ser send`."""
    settings = build_settings(args)
    configure_logging(settings.output.log_level, settings.output.log_json)
    if settings.mqtt.url is None:
        raise ConfigError("send needs a broker: give --mqtt URL")
    if settings.source.input is not None and settings.source.mic is not None:
        raise ConfigError("give either --input or --mic, not both")
    send = SendSettings(
        chunk_ms=args.send_chunk_ms or settings.source.chunk_ms,
        qos=args.send_qos,
        buffer_s=args.send_buffer_s,
    )
    stream_id = source.default_stream_id(settings.source)
    client_id = settings.mqtt.client_id or f"stream-ser-send-{socket.gethostname()}-{stream_id}"
    capture = open_capture(settings, send.chunk_ms)
    uplink = Uplink(settings.mqtt, client_id, stream_id, capture, send.qos)
    return asyncio.run(_main(capture, uplink, send))


async def _main(capture: Capture, uplink: Uplink, send: SendSettings) -> int:
    stop = asyncio.Event()
    install_stop_handlers(stop)
    chunker, outbox = await stream(capture, uplink, send, stop)
    log.info("sent %d chunk(s) (%.1f s of audio) on %s; %d dropped, %d refused, %d reconnect(s)",
             uplink.sent, chunker.frames / capture.sample_rate, uplink.pcm_topic, outbox.dropped,
             uplink.publish_denied, uplink.reconnects)  # fmt: skip
    if len(outbox):
        raise PublishError(
            f"{len(outbox)} chunk(s) not delivered: broker {uplink.address} unreachable at exit"
        )
    return 0
