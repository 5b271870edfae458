"""Audio sources: files, raw PCM on stdin, microphones. Each yields 16 kHz mono AudioChunks."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr

from stream_ser import SAMPLE_RATE
from stream_ser.errors import AudioInputError
from stream_ser.events import AudioChunk, samples_to_ms
from stream_ser.settings import MAX_STREAM_ID_BYTES, SourceSettings

log = logging.getLogger(__name__)

FILE_RATES_HZ = (4000, 384000)  # sample rates accepted from files
MIC_QUEUE_BLOCKS = 100  # capture blocks buffered for the loop; older ones are kept, newer dropped


@dataclass
class SourceStats:
    """Counters a source keeps; shown in the status output."""

    blocks_dropped: int = 0  # microphone blocks the loop could not take in time
    input_overflows: int = 0  # PortAudio reported lost input
    bad_samples: int = 0  # NaN/inf samples replaced by 0
    device_errors: int = 0  # the microphone stopped or stalled and was reopened (or given up)


@dataclass
class Damage:
    """Decoding errors of files, held back until the audio before the damage is published."""

    errors: list[AudioInputError] = field(default_factory=list)

    def check(self) -> None:
        """Raise the first error held back, if any."""
        if self.errors:
            raise self.errors[0]


class Converter:
    """Any rate and channel count to 16 kHz mono float32 chunks with stream times."""

    def __init__(self, rate: int, channels: int, stats: SourceStats) -> None:
        self.channels = channels
        self._stats = stats
        self._resampler = (
            None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32")
        )
        self._position = 0  # 16 kHz samples emitted

    def convert(self, block: np.ndarray, last: bool = False) -> AudioChunk | None:
        """`block` is (frames, channels) or (frames,) float; None if nothing is ready yet."""
        if block.ndim == 1:
            mono = block
        elif block.shape[1] == 1 and block.dtype == np.float32:
            mono = block[:, 0]  # the mean of one channel is that channel; skip the reduction
        else:
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, overflow: counted below
                mono = block.mean(axis=1, dtype=np.float32)
        finite = np.isfinite(mono)
        if not finite.all():
            self._stats.bad_samples += int((~finite).sum())
            mono = np.where(finite, mono, np.float32(0.0))
        mono = np.clip(mono, -1.0, 1.0)  # before resampling too: huge values overflow soxr
        if self._resampler is not None:
            mono = np.clip(self._resampler.resample_chunk(mono, last=last), -1.0, 1.0)
        mono = mono.astype(np.float32, copy=False)
        if len(mono) == 0:
            return None
        chunk = AudioChunk(mono, samples_to_ms(self._position))
        self._position += len(mono)
        return chunk


def default_stream_id(settings: SourceSettings) -> str:
    """The stream id used when none is configured."""
    if settings.stream_id:
        return settings.stream_id
    if settings.mic is not None:
        return "mic"
    if settings.input in (None, "-"):
        return "stdin"
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(settings.input).stem)
    return stem[: MAX_STREAM_ID_BYTES - 8] or "file"  # room for a -2 suffix


def is_recording(settings: SourceSettings) -> bool:
    """A recording read as fast as possible: a file without --realtime, or stdin redirected
    from a file. Making it wait loses nothing (a pipe's live producer, such as arecord, would
    overrun instead), so its stream is lossless."""
    if settings.mic is not None or settings.input is None or settings.realtime:
        return False
    if settings.input == "-":
        return stat.S_ISREG(os.fstat(_stdin_fd()).st_mode)
    return True


def _stdin_fd() -> int:
    """Standard input's descriptor; AudioInputError if the process was started without one."""
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise AudioInputError("--input -: standard input is closed; give it raw PCM audio")
    return sys.stdin.fileno()


def open_source(
    settings: SourceSettings, stats: SourceStats, damage: Damage | None = None
) -> AsyncIterator[AudioChunk]:
    """The source the settings name: --mic, --input -, or --input FILE (a file damaged
    part-way ends its stream there and its error goes to `damage`; None: raised at once)."""
    if settings.mic is not None:
        return mic_source(
            settings.mic, settings.chunk_ms, stats, settings.mic_retries, settings.mic_retry_delay_s
        )
    if settings.input == "-":
        return stdin_source(settings.rate, settings.channels, settings.chunk_ms, stats)
    if settings.input is None:
        raise AudioInputError("no audio source: give --input FILE, --input - or --mic")
    path = Path(settings.input)
    pace = settings.speed if settings.realtime else None
    return file_source(path, open_file(path), settings.chunk_ms, pace, stats, damage)


def open_file(path: Path) -> soundfile.SoundFile:
    """An audio file opened for reading; a clear AudioInputError when it cannot be."""
    if not path.exists():
        raise AudioInputError(f"{path}: no such file")
    if path.is_dir():
        raise AudioInputError(f"{path}: is a directory, not an audio file")
    try:
        audio = soundfile.SoundFile(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioInputError(f"{path}: cannot decode audio ({err})") from err
    if not FILE_RATES_HZ[0] <= audio.samplerate <= FILE_RATES_HZ[1]:
        audio.close()  # a corrupt header's 1 Hz would be resampled 16000-fold in memory
        raise AudioInputError(
            f"{path}: unsupported sample rate {audio.samplerate} Hz "
            f"(need {FILE_RATES_HZ[0]} to {FILE_RATES_HZ[1]})"
        )
    return audio


async def file_source(
    path: Path,
    audio: soundfile.SoundFile,
    chunk_ms: int,
    speed: float | None,
    stats: SourceStats,
    damage: Damage | None = None,
) -> AsyncIterator[AudioChunk]:
    """Decode an opened file block by block, as fast as possible (`speed` None) or paced:
    each block is released at its stream time divided by `speed` (1.0 = real time).

    A decoding error part-way raises AudioInputError, or with `damage` ends the stream
    there (the audio before it is recognised) and is added to `damage`."""
    with audio:
        converter = Converter(audio.samplerate, audio.channels, stats)
        frames = max(1, audio.samplerate * chunk_ms // 1000)
        # One buffer read into again and again: with `out`, soundfile skips its per-read
        # seek/tell and allocation. The converter never returns a view of it (np.clip copies).
        buffer = np.empty((frames, audio.channels), dtype=np.float32)
        started = time.monotonic()
        read = 0
        while True:
            try:
                block = audio.read(out=buffer)
            except (soundfile.LibsndfileError, RuntimeError) as err:
                block = buffer[:0]  # the end of the readable audio
                _damaged(AudioInputError(
                    f"{path}: decoding failed after {read / audio.samplerate:.1f} s of audio "
                    f"({err})"
                ), err, damage)  # fmt: skip
            read += len(block)
            last = len(block) < frames
            chunk = converter.convert(block, last=last)
            if speed is not None:
                due = started + read / audio.samplerate / speed
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(0)
            if chunk is not None:
                yield chunk
            if last:
                break
    if read == 0:
        log.warning("%s: the file holds no audio", path)


def _damaged(error: AudioInputError, cause: Exception, damage: Damage | None) -> None:
    if damage is None:
        raise error from cause
    damage.errors.append(error)
    log.error("%s; the results for the audio before it are published first", error)


def read_stdin_in_thread(block_bytes: int) -> asyncio.Queue[bytes]:
    """A daemon thread reads stdin (a blocking read can't be cancelled); b"" marks the end."""
    loop = asyncio.get_running_loop()
    blocks: asyncio.Queue[bytes] = asyncio.Queue(MIC_QUEUE_BLOCKS)
    fd = _stdin_fd()

    def reader() -> None:
        while True:
            data = os.read(fd, block_bytes)
            asyncio.run_coroutine_threadsafe(blocks.put(data), loop).result()
            if not data:
                return

    threading.Thread(target=reader, name="stdin-reader", daemon=True).start()
    return blocks


async def stdin_source(
    rate: int, channels: int, chunk_ms: int, stats: SourceStats
) -> AsyncIterator[AudioChunk]:
    """Raw little-endian 16-bit PCM on stdin, `channels` interleaved, at `rate` Hz."""
    frame_bytes = 2 * channels
    blocks = read_stdin_in_thread(frame_bytes * max(1, rate * chunk_ms // 1000))
    converter = Converter(rate, channels, stats)
    pending = b""
    while True:
        data = await blocks.get()
        pending += data
        whole = len(pending) - len(pending) % frame_bytes
        if whole or not data:
            pcm = np.frombuffer(pending[:whole], dtype="<i2").reshape(-1, channels)
            chunk = converter.convert(pcm.astype(np.float32) / 32768.0, last=not data)
            pending = pending[whole:]
            if chunk is not None:
                yield chunk
        if not data:
            break
    if pending:
        log.warning(
            "stdin ended with %d stray bytes: not a whole frame of %d channel(s) of 16-bit PCM; "
            "check --channels",
            len(pending),
            channels,
        )


def load_sounddevice() -> Any:
    """The sounddevice module; an AudioInputError naming the fix when PortAudio is missing."""
    try:
        import sounddevice
    except OSError as err:  # raised when the PortAudio library is missing
        raise AudioInputError(
            f"microphone support needs the PortAudio library (apt-get install libportaudio2): {err}"
        ) from err
    return sounddevice


def list_input_devices() -> list[dict[str, Any]]:
    """Input-capable devices: index, name, channels, default rate, host API."""
    sd = load_sounddevice()
    apis = sd.query_hostapis()
    return [
        {
            "index": index,
            "name": device["name"],
            "channels": device["max_input_channels"],
            "default_rate": int(device["default_samplerate"]),
            "host_api": apis[device["hostapi"]]["name"],
        }
        for index, device in enumerate(sd.query_devices())
        if device["max_input_channels"] > 0
    ]


def resolve_device(sd: Any, device: str) -> dict[str, Any]:
    """A device by index or (part of its) name; 'default' is the default input."""
    key: int | str | None = None if device == "default" else device
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    try:
        info: dict[str, Any] = sd.query_devices(key, "input")
    except (ValueError, sd.PortAudioError) as err:
        raise AudioInputError(
            f"no input device {device!r} ({err}); `stream-ser devices` lists them"
        ) from err
    return info


@dataclass
class _Capture:
    """One open PortAudio input stream and the queue its callback fills."""

    name: str
    stream: Any
    blocks: asyncio.Queue[np.ndarray | None]


@dataclass
class Microphone:
    """Opens (and reopens) one input device at a fixed rate and channel count."""

    sd: Any
    device: str  # index or name, as the user gave it
    rate: int
    channels: int
    chunk_ms: int
    stats: SourceStats

    def open(self) -> _Capture:
        """Find the device, open and start a stream; AudioInputError if it cannot."""
        info = resolve_device(self.sd, self.device)
        loop = asyncio.get_running_loop()
        blocks: asyncio.Queue[np.ndarray | None] = asyncio.Queue(MIC_QUEUE_BLOCKS)
        stats = self.stats

        def deliver(block: np.ndarray | None) -> None:
            try:
                blocks.put_nowait(block)
            except asyncio.QueueFull:
                if block is None:  # the end must get through: make room for it
                    blocks.get_nowait()
                    blocks.put_nowait(None)
                stats.blocks_dropped += 1

        def callback(indata: np.ndarray, frames: int, when: Any, status: Any) -> None:
            if status.input_overflow:
                stats.input_overflows += 1
            loop.call_soon_threadsafe(deliver, indata.copy())

        def finished() -> None:
            loop.call_soon_threadsafe(deliver, None)

        try:
            stream = self.sd.InputStream(
                device=info["index"],
                samplerate=self.rate,
                channels=self.channels,
                dtype="float32",
                blocksize=max(1, self.rate * self.chunk_ms // 1000),
                callback=callback,
                finished_callback=finished,
            )
            stream.start()
        except self.sd.PortAudioError as err:
            raise AudioInputError(f"cannot open input device {info['name']!r}: {err}") from err
        return _Capture(info["name"], stream, blocks)

    async def reopen(
        self, failure: str, failures: int, retries: int, delay_s: float
    ) -> tuple[_Capture, int]:
        """Retry `open` with exponential backoff; AudioInputError after `retries` tries.

        `failures` counts this failure and the ones right before it (no audio in between);
        returns the stream and the failures counted so far.
        """
        for attempt in range(failures, retries + 1):
            self.stats.device_errors += 1
            wait_s = delay_s * 2 ** (attempt - 1)
            log.warning("%s; reopening it in %.1f s (attempt %d of %d)", failure, wait_s,
                        attempt, retries)  # fmt: skip
            await asyncio.sleep(wait_s)
            self._rescan()
            try:
                return self.open(), attempt
            except AudioInputError as err:
                failure = str(err)
        self.stats.device_errors += 1
        raise AudioInputError(f"{failure}; gave up after {retries} attempt(s) to reopen it")

    def _rescan(self) -> None:
        """PortAudio lists devices once, at initialisation: re-scan, as a device that came
        back may have a new index. Possible only while no stream is open."""
        try:
            self.sd._terminate()  # noqa: SLF001  (sounddevice has no public re-scan)
            self.sd._initialize()  # noqa: SLF001
        except (AttributeError, self.sd.PortAudioError) as err:
            log.debug("could not re-scan audio devices: %s", err)


async def mic_source(
    device: str,
    chunk_ms: int,
    stats: SourceStats,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    stall_s: float = 10.0,
) -> AsyncIterator[AudioChunk]:
    """Capture a microphone at its native rate and channels; the callback never blocks.

    If the device stops (unplugged, its sound server gone) or delivers nothing for
    `stall_s`, it is found again by name and reopened, up to `retries` times in a row,
    after `retry_delay_s`, then twice as long each time; the time it was away is filled
    with silence, so stream times stay true and an utterance cut off by the failure ends.
    After the last try: AudioInputError. A device that cannot be opened at start-up is
    an error at once.
    """
    sd = load_sounddevice()
    info = resolve_device(sd, device)
    rate = int(info["default_samplerate"])
    channels = min(2, int(info["max_input_channels"]))
    microphone = Microphone(sd, device, rate, channels, chunk_ms, stats)
    converter = Converter(rate, channels, stats)
    capture = microphone.open()
    log.info("capturing %r at %d Hz, %d channel(s)", capture.name, rate, channels)
    failures = 0
    while True:
        with capture.stream:
            async for block in captured_blocks(capture, stall_s):
                failures = 0
                if (chunk := converter.convert(block)) is not None:
                    yield chunk
        lost_at = time.monotonic()
        failures += 1
        failure = f"input device {capture.name!r} stopped delivering audio"
        capture, failures = await microphone.reopen(failure, failures, retries, retry_delay_s)
        away_s = time.monotonic() - lost_at
        log.warning("input device %r is back after %.1f s", capture.name, away_s)
        if (gap := converter.convert(silence(away_s, rate, channels))) is not None:
            yield gap


async def captured_blocks(capture: _Capture, stall_s: float) -> AsyncIterator[np.ndarray]:
    """The stream's blocks until it ends or stalls for `stall_s`."""
    while True:
        try:
            block = await asyncio.wait_for(capture.blocks.get(), stall_s)
        except TimeoutError:
            log.warning("no audio from the input device for %.0f s", stall_s)
            return
        if block is None:
            return
        yield block


def silence(seconds: float, rate: int, channels: int) -> np.ndarray:
    """Zeros standing for audio lost while the device was away (at most a minute)."""
    return np.zeros((int(min(seconds, 60.0) * rate), channels), dtype=np.float32)
