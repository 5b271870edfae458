"""Recognising remote devices' audio from the broker, shared among workers (`run --mqtt-audio`).

Work sharing uses MQTT v5 shared subscriptions, so any standard broker (cluster) spreads it:

- every worker subscribes to `$share/{group}/{prefix}/audio/+/hello`: each hello a device
  sends reaches exactly one worker of the group;
- a worker that gets a hello for a stream nobody alive owns claims it: it publishes a
  retained `{prefix}/audio/{stream_id}/owner` naming itself and subscribes to that stream's
  `pcm` topic. Later hellos of the stream, wherever they land, are ignored while the owner is
  alive (stream affinity: one stream, one worker, one VAD and speaker baseline);
- workers watch `{prefix}/status/+` (retained, with a last will) to know who is alive. When
  an owner goes offline, the next hello of its streams (devices send one every 2 s) is claimed
  by whichever worker receives it: failover within about one hello interval. Results the dead
  worker had produced wait in its spool; audio it had not recognised is lost;
- two workers claiming one stream at once see each other's claim; the smaller client id keeps
  the stream and the other releases it.

A stream ends with a chunk flagged last, after IDLE_TIMEOUT_S without audio, or at shutdown;
its claim is then released (empty retained owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import aiomqtt
import numpy as np

from stream_ser.errors import PublishError
from stream_ser.events import AudioChunk
from stream_ser.pipeline import StreamPipeline
from stream_ser.publish import BrokerAddress, broker_client
from stream_ser.remote import Chunk, PayloadError, Reorderer, decode_chunk
from stream_ser.settings import MqttSettings
from stream_ser.source import Converter, SourceStats

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 10.0
MAX_QUEUED_CHUNKS = 200  # per stream, between the MQTT loop and the stream's pipeline
MAX_BACKOFF_S = 30.0


@dataclass
class RemoteStats:
    """Per-stream counters of a remote stream, merged into its status counters."""

    payloads_rejected: int = 0
    chunks_dropped: int = 0  # the pipeline fell behind: oldest queued chunk dropped


@dataclass
class RemoteStream:
    """The worker's side of one claimed stream: reorder, convert, queue for the pipeline."""

    stream_id: str
    source_stats: SourceStats
    reorderer: Reorderer = field(default_factory=Reorderer)
    stats: RemoteStats = field(default_factory=RemoteStats)
    converter: Converter | None = None

    def __post_init__(self) -> None:
        self.queue: asyncio.Queue[AudioChunk | None] = asyncio.Queue(MAX_QUEUED_CHUNKS)
        self.ended = False

    def counters(self) -> dict[str, int]:
        """Payload, queue and reordering counters for the status topic."""
        return asdict(self.stats) | asdict(self.reorderer.stats)

    def accept(self, payload: bytes) -> None:
        """One pcm payload from the broker (never raises on bad input: counts it)."""
        if self.ended:
            return
        try:
            chunk = decode_chunk(payload)
        except PayloadError as err:
            self.stats.payloads_rejected += 1
            log.warning("%s: rejected an audio payload: %s", self.stream_id, err)
            return
        for ready in self.reorderer.push(chunk):
            self._forward(ready)
        if chunk.last:
            self.end()

    def end(self) -> None:
        """No more audio: release what is held and close the source."""
        if self.ended:
            return
        for ready in self.reorderer.flush():
            self._forward(ready)
        self.ended = True
        self._put(None)

    def _forward(self, chunk: Chunk) -> None:
        if self.converter is None:
            self.converter = Converter(chunk.sample_rate, chunk.channels, self.source_stats)
        converted = self.converter.convert(chunk.pcm.astype(np.float32) / 32768.0)
        if converted is not None:
            self._put(converted)

    def _put(self, item: AudioChunk | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.stats.chunks_dropped += 1
        self.queue.put_nowait(item)

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """The stream's audio for its pipeline; ends at the last chunk or when idle."""
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), IDLE_TIMEOUT_S)
            except TimeoutError:
                log.warning("%s: no audio for %.0f s, ending the stream", self.stream_id,
                            IDLE_TIMEOUT_S)  # fmt: skip
                self.end()
                continue
            if item is None:
                return
            yield item


class AudioWorker:
    """Claims remote streams from the broker and hands each to a new StreamPipeline."""

    def __init__(
        self,
        settings: MqttSettings,
        address: BrokerAddress,
        client_id: str,
        group: str,
        make_pipeline: Callable[[RemoteStream], StreamPipeline],
    ) -> None:
        self.settings = settings
        self.address = address
        self.client_id = client_id
        self.group = group
        self.make_pipeline = make_pipeline
        self.prefix = settings.topic_prefix
        self.mine: dict[str, RemoteStream] = {}
        self.owners: dict[str, str] = {}
        self.alive: set[str] = {client_id}
        self._arrivals: asyncio.Queue[StreamPipeline | None] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None

    async def streams(self) -> AsyncIterator[StreamPipeline]:
        """The pipelines of claimed streams, as they are claimed; ends after `close`."""
        while (pipeline := await self._arrivals.get()) is not None:
            yield pipeline

    async def run(self, stop: asyncio.Event) -> None:
        """Listen (reconnecting with backoff) until `stop`; then end every stream."""
        backoff = 0.5
        listening = asyncio.create_task(self._listen_forever(backoff), name="audio-listen")
        await stop.wait()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        for stream in list(self.mine.values()):
            stream.end()
        await self._release_all()
        self._arrivals.put_nowait(None)

    async def _listen_forever(self, backoff: float) -> None:
        while True:
            try:
                await self._listen()
            except (aiomqtt.MqttError, PublishError) as err:
                delay = backoff * random.uniform(0.5, 1.5)
                log.warning("audio link to %s: %s; retrying in %.1f s", self.address, err, delay)
                await asyncio.sleep(delay)
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _listen(self) -> None:
        async with self._make_client() as client:
            self._client = client
            try:
                await client.subscribe(f"{self.prefix}/status/+", qos=1)
                await client.subscribe(f"{self.prefix}/audio/+/owner", qos=1)
                for stream_id in self.mine:
                    await self._claim(stream_id)
                await client.subscribe(f"$share/{self.group}/{self.prefix}/audio/+/hello", qos=1)
                log.info("listening for remote audio as %s (group %s)", self.client_id, self.group)
                async for message in client.messages:
                    await self._handle(str(message.topic), message.payload)
            finally:
                self._client = None

    def _make_client(self) -> aiomqtt.Client:
        return broker_client(
            self.settings, self.address, f"{self.client_id}-audio",
            max_queued_incoming_messages=10_000,
        )  # fmt: skip

    async def _handle(self, topic: str, payload: object) -> None:
        data = payload if isinstance(payload, bytes) else b""
        parts = topic.split("/")
        if topic.startswith(f"{self.prefix}/status/"):
            self._on_status(parts[-1], data)
        elif len(parts) >= 4 and parts[-3] == "audio":
            stream_id, kind = parts[-2], parts[-1]
            if kind == "pcm" and stream_id in self.mine:
                self.mine[stream_id].accept(data)
            elif kind == "hello":
                await self._on_hello(stream_id)
            elif kind == "owner":
                await self._on_owner(stream_id, data)

    def _on_status(self, worker: str, data: bytes) -> None:
        try:
            state = json.loads(data).get("state") if data else "offline"
        except (ValueError, AttributeError):
            return
        if state == "online":
            self.alive.add(worker)
        else:
            self.alive.discard(worker)

    async def _on_hello(self, stream_id: str) -> None:
        if stream_id in self.mine or not _valid_id(stream_id):
            return
        owner = self.owners.get(stream_id)
        if owner is not None and owner != self.client_id and owner in self.alive:
            return
        await self._claim(stream_id)
        stream = RemoteStream(stream_id, SourceStats())
        self.mine[stream_id] = stream
        log.info("claimed remote stream %s", stream_id)
        pipeline = self.make_pipeline(stream)
        self._arrivals.put_nowait(pipeline)
        asyncio.get_running_loop().create_task(self._release_when_done(stream, pipeline))

    async def _on_owner(self, stream_id: str, data: bytes) -> None:
        try:
            owner = json.loads(data)["worker"] if data else None
        except (ValueError, KeyError, TypeError):
            return
        if owner is None:
            self.owners.pop(stream_id, None)
            return
        self.owners[stream_id] = owner
        if stream_id in self.mine and owner != self.client_id:
            if owner < self.client_id:  # the smaller id keeps a contested stream
                log.info("stream %s is %s's: releasing it", stream_id, owner)
                self.mine.pop(stream_id).end()
            else:
                await self._claim(stream_id)

    async def _claim(self, stream_id: str) -> None:
        if self._client is None:
            return
        topic = f"{self.prefix}/audio/{stream_id}"
        await self._client.publish(f"{topic}/owner", json.dumps({"worker": self.client_id}),
                                   qos=1, retain=True)  # fmt: skip
        await self._client.subscribe(f"{topic}/pcm", qos=1)

    async def _release_when_done(self, stream: RemoteStream, pipeline: StreamPipeline) -> None:
        await pipeline.finished.wait()
        if self.mine.get(stream.stream_id) is stream:
            del self.mine[stream.stream_id]
            await self._release(stream.stream_id)

    async def _release(self, stream_id: str) -> None:
        if self._client is None or self.owners.get(stream_id) not in (None, self.client_id):
            return
        topic = f"{self.prefix}/audio/{stream_id}"
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.unsubscribe(f"{topic}/pcm")
            await self._client.publish(f"{topic}/owner", b"", qos=1, retain=True)

    async def _release_all(self) -> None:
        """At shutdown: a short-lived connection clears this worker's claims."""
        claimed = [s for s, owner in self.owners.items() if owner == self.client_id]
        if not claimed:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(self.settings.connect_timeout_s), self._make_client() as c:
                for stream_id in claimed:
                    await c.publish(f"{self.prefix}/audio/{stream_id}/owner", b"", qos=1,
                                    retain=True)  # fmt: skip


def _valid_id(stream_id: str) -> bool:
    return 0 < len(stream_id) <= 128 and not any(c in stream_id for c in "/#+")
