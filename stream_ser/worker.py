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
- ownership expires: an owner re-publishes its claims every OWNER_REFRESH_S (retained, with an
  MQTT v5 message expiry of OWNER_TTL_S), and a claim not refreshed for OWNER_TTL_S counts for
  nothing, so the streams of a worker that died with the broker (its last will never sent, its
  `online` status left retained) are claimed again;
- two workers claiming one stream at once see each other's claim; the smaller client id keeps
  the stream and the other releases it.

The audio link keeps a persistent MQTT session (SESSION_EXPIRY_S): while it is down, the
broker queues the QoS 1 chunks of the streams it has claimed, and they arrive on reconnection.
Every subscription's SUBACK is checked: one the broker's ACL refuses ends the worker with an
error. Every incoming message is checked; a malformed one is counted, logged and ignored.
At most `max_streams` streams run at once; hellos beyond are refused and counted.

A stream ends with a chunk flagged last, after IDLE_TIMEOUT_S without audio, or at shutdown;
its claim is then released (empty retained owner) and its state freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

import aiomqtt
import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from stream_ser.events import AudioChunk
from stream_ser.mqtt import (
    Backoff,
    BrokerAddress,
    CheckedClient,
    SubscriptionRefused,
    broker_client,
    keep_connected,
    persistent_session,
)
from stream_ser.pipeline import StreamPipeline
from stream_ser.remote import (
    MAX_CHANNELS,
    RATES,
    Chunk,
    PayloadError,
    Reorderer,
    decode_chunk,
)
from stream_ser.settings import MqttSettings
from stream_ser.source import Converter, SourceStats

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 10.0
MAX_QUEUED_CHUNKS = 200  # per stream, between the MQTT loop and the stream's pipeline
AUDIO_TOPIC_LEVELS = 4  # PREFIX/audio/STREAM/KIND at least
DEFAULT_MAX_STREAMS = 32
OWNER_REFRESH_S = 5.0  # an owner re-publishes its claims this often
OWNER_TTL_S = 15.0  # a claim not refreshed for this long has expired
SESSION_EXPIRY_S = 60  # the broker keeps the audio link's session this long after a drop
MAX_ID_CHARS = 128


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


@dataclass
class WorkerStats:
    """What the audio worker saw, for the status topic."""

    streams_claimed: int = 0
    streams_refused: int = 0  # hellos beyond max_streams, or for an id in use here
    messages_rejected: int = 0  # malformed hello, owner or status messages (ignored)


@dataclass
class Claim:
    """A stream's owner as last announced."""

    worker: str
    seen_s: float  # monotonic time of the last announcement


class AudioWorker:
    """Claims remote streams from the broker and hands each to a new StreamPipeline."""

    def __init__(
        self,
        settings: MqttSettings,
        address: BrokerAddress,
        client_id: str,
        group: str,
        make_pipeline: Callable[[RemoteStream], StreamPipeline],
        max_streams: int = DEFAULT_MAX_STREAMS,
        *,
        taken: Callable[[str], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.address = address
        self.client_id = client_id
        self.group = group
        self.make_pipeline = make_pipeline
        self.max_streams = max_streams
        self.taken = taken  # a stream id another stream of this process has (a WebSocket's)
        self.prefix = settings.topic_prefix
        self.mine: dict[str, RemoteStream] = {}
        self.owners: dict[str, Claim] = {}
        self.alive: set[str] = {client_id}
        self.stats = WorkerStats()
        self._arrivals: asyncio.Queue[StreamPipeline | None] = asyncio.Queue()
        self._client: CheckedClient | None = None
        self._connected_once = False
        self._rejections_logged: set[str] = set()

    def counters(self) -> dict[str, int]:
        """Claims, refusals and rejected messages, and the streams running now."""
        return asdict(self.stats) | {"streams_active": len(self.mine)}

    async def streams(self) -> AsyncIterator[StreamPipeline]:
        """The pipelines of claimed streams, as they are claimed; ends after `close`."""
        while (pipeline := await self._arrivals.get()) is not None:
            yield pipeline

    async def run(self, stop: asyncio.Event) -> None:
        """Listen (reconnecting with backoff) until `stop`; then end every stream.

        A subscription the broker refuses ends the run with SubscriptionRefused."""
        listening = asyncio.create_task(
            keep_connected(self._session, self._link_lost), name="audio-listen"
        )
        stopping = asyncio.create_task(stop.wait(), name="audio-stop")
        try:
            await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (listening, stopping):
                task.cancel()
            await asyncio.gather(listening, stopping, return_exceptions=True)
            for stream in list(self.mine.values()):
                stream.end()
            await self._release_all()
            self._arrivals.put_nowait(None)
        if not listening.cancelled() and (error := listening.exception()) is not None:
            raise error

    def _link_lost(self, err: Exception, delay: float) -> float:
        if isinstance(err, SubscriptionRefused):
            raise err
        log.warning("audio link to %s: %s; retrying in %.1f s", self.address, err, delay)
        return delay

    async def _session(self, backoff: Backoff) -> None:
        async with self._make_client() as client:
            self._client = client
            self._connected_once = True
            refreshing = asyncio.create_task(self._refresh_claims(client), name="audio-claims")
            try:
                await client.subscribe_checked(f"{self.prefix}/status/+", 1)
                await client.subscribe_checked(f"{self.prefix}/audio/+/owner", 1)
                for stream_id in list(self.mine):
                    await self._claim(stream_id)
                await client.subscribe_checked(
                    f"$share/{self.group}/{self.prefix}/audio/+/hello", 1
                )
                backoff.reset()
                log.info("listening for remote audio as %s (group %s)", self.client_id, self.group)
                async for message in client.messages:
                    await self._handle_safely(str(message.topic), message.payload)
            finally:
                self._client = None
                refreshing.cancel()
                await asyncio.gather(refreshing, return_exceptions=True)

    def _make_client(self, persistent: bool = True) -> CheckedClient:
        session = persistent_session(SESSION_EXPIRY_S) if persistent else {}
        return broker_client(
            self.settings, self.address, f"{self.client_id}-audio",
            max_queued_incoming_messages=10_000, **session,
        )  # fmt: skip

    async def _refresh_claims(self, client: CheckedClient) -> None:
        """Re-announce this worker's claims, so that they do not expire while it lives."""
        while True:
            await asyncio.sleep(OWNER_REFRESH_S)
            for stream_id in list(self.mine):
                await self._publish_owner(client, stream_id)

    async def _handle_safely(self, topic: str, payload: object) -> None:
        """Handle one message; one that breaks the handling is logged and ignored."""
        try:
            await self._handle(topic, payload if isinstance(payload, bytes) else b"")
        except (aiomqtt.MqttError, SubscriptionRefused):
            raise
        except Exception:  # the listener must outlive a message nobody foresaw
            self.stats.messages_rejected += 1
            log.exception("ignored a message on %s that could not be handled", topic)

    async def _handle(self, topic: str, data: bytes) -> None:
        parts = topic.split("/")
        if topic.startswith(f"{self.prefix}/status/"):
            self._on_status(parts[-1], data)
        elif len(parts) >= AUDIO_TOPIC_LEVELS and parts[-3] == "audio" and _valid_id(parts[-2]):
            stream_id, kind = parts[-2], parts[-1]
            if kind == "pcm" and stream_id in self.mine:
                self.mine[stream_id].accept(data)
            elif kind == "hello":
                await self._on_hello(stream_id, data)
            elif kind == "owner":
                await self._on_owner(stream_id, data)

    def _reject(self, topic: str, why: str) -> None:
        """Count a malformed message; log the first of each kind at warning level."""
        self.stats.messages_rejected += 1
        level = logging.DEBUG if why in self._rejections_logged else logging.WARNING
        self._rejections_logged.add(why)
        log.log(level, "ignored a message on %s: %s", topic, why)

    def _on_status(self, worker: str, data: bytes) -> None:
        state = "offline"
        if data:
            message = _json_object(data)
            if message is None or not isinstance(message.get("state"), str):
                self._reject(f"{self.prefix}/status/{worker}", "status without a text state")
                return
            state = message["state"]
        if state == "online":
            self.alive.add(worker)
        else:
            self.alive.discard(worker)

    async def _on_hello(self, stream_id: str, data: bytes) -> None:
        if stream_id in self.mine:
            return
        if (why := _hello_problem(stream_id, data)) is not None:
            self._reject(f"{self.prefix}/audio/{stream_id}/hello", why)
            return
        if self._live_owner(stream_id) is not None:
            return
        if len(self.mine) >= self.max_streams:
            self.stats.streams_refused += 1
            if self.stats.streams_refused % 100 == 1:
                log.warning("refused stream %s: %d streams run already (--mqtt-audio-max-streams);"
                            " %d refused so far", stream_id, len(self.mine),
                            self.stats.streams_refused)  # fmt: skip
            return
        if self.taken is not None and self.taken(stream_id):
            self._refuse_taken(stream_id)
            return
        await self._claim(stream_id)
        stream = RemoteStream(stream_id, SourceStats())
        self.mine[stream_id] = stream
        self.stats.streams_claimed += 1
        log.info("claimed remote stream %s", stream_id)
        pipeline = self.make_pipeline(stream)
        self._arrivals.put_nowait(pipeline)
        asyncio.get_running_loop().create_task(self._release_when_done(stream, pipeline))

    def _refuse_taken(self, stream_id: str) -> None:
        """Count a hello for an id another stream of this process has; warn once per id."""
        self.stats.streams_refused += 1
        why = f"stream {stream_id}: a live stream of this process has its id"
        level = logging.DEBUG if why in self._rejections_logged else logging.WARNING
        self._rejections_logged.add(why)
        log.log(level, "refused %s", why)

    def _live_owner(self, stream_id: str) -> str | None:
        """Another worker that owns the stream: alive, and its claim not expired."""
        claim = self.owners.get(stream_id)
        if claim is None or claim.worker == self.client_id or claim.worker not in self.alive:
            return None
        if time.monotonic() - claim.seen_s > OWNER_TTL_S:
            return None
        return claim.worker

    async def _on_owner(self, stream_id: str, data: bytes) -> None:
        if not data:
            self.owners.pop(stream_id, None)
            return
        message = _json_object(data)
        owner = message.get("worker") if message is not None else None
        if not isinstance(owner, str) or not _valid_id(owner):
            self._reject(f"{self.prefix}/audio/{stream_id}/owner", "owner without a valid worker")
            return
        self.owners[stream_id] = Claim(owner, time.monotonic())
        if stream_id in self.mine and owner != self.client_id:
            if owner < self.client_id:  # the smaller id keeps a contested stream
                log.info("stream %s is %s's: releasing it", stream_id, owner)
                self.mine.pop(stream_id).end()
            else:
                await self._claim(stream_id)

    async def _claim(self, stream_id: str) -> None:
        if self._client is None:
            return
        # subscribed before the claim is announced: a device sends its audio once it sees it
        await self._client.subscribe_checked(f"{self.prefix}/audio/{stream_id}/pcm", 1)
        await self._publish_owner(self._client, stream_id)

    async def _publish_owner(self, client: aiomqtt.Client, stream_id: str) -> None:
        expiry = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        expiry.MessageExpiryInterval = int(OWNER_TTL_S)
        await client.publish(f"{self.prefix}/audio/{stream_id}/owner",
                             json.dumps({"worker": self.client_id}), qos=1, retain=True,
                             properties=expiry)  # fmt: skip

    async def _release_when_done(self, stream: RemoteStream, pipeline: StreamPipeline) -> None:
        await pipeline.finished.wait()
        if self.mine.get(stream.stream_id) is stream:
            del self.mine[stream.stream_id]
            await self._release(stream.stream_id)

    async def _release(self, stream_id: str) -> None:
        claim = self.owners.get(stream_id)
        if self._client is None or (claim is not None and claim.worker != self.client_id):
            return
        topic = f"{self.prefix}/audio/{stream_id}"
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.unsubscribe(f"{topic}/pcm")
            await self._client.publish(f"{topic}/owner", b"", qos=1, retain=True)

    async def _release_all(self) -> None:
        """At shutdown: a short-lived clean connection clears this worker's claims and ends
        its persistent session (so that the broker queues nothing more for it)."""
        claimed = [s for s, claim in self.owners.items() if claim.worker == self.client_id]
        if not claimed and not self._connected_once:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(self.settings.connect_timeout_s), \
                    self._make_client(persistent=False) as client:  # fmt: skip
                for stream_id in claimed:
                    await client.publish(f"{self.prefix}/audio/{stream_id}/owner", b"", qos=1,
                                         retain=True)  # fmt: skip


def _valid_id(stream_id: str) -> bool:
    return 0 < len(stream_id) <= MAX_ID_CHARS and not any(c in stream_id for c in "/#+\0")


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


def _hello_problem(stream_id: str, data: bytes) -> str | None:
    """What is wrong with a hello (remote.py documents its fields), or None."""
    message = _json_object(data)
    if message is None:
        return "hello is not a JSON object"
    rate, channels = message.get("sample_rate"), message.get("channels")
    if message.get("stream_id") != stream_id:
        return "hello names another stream than its topic"
    if not _is_int(rate) or not RATES[0] <= rate <= RATES[1]:
        return f"hello sample_rate outside {RATES[0]}..{RATES[1]}"
    if not _is_int(channels) or not 1 <= channels <= MAX_CHANNELS:
        return f"hello channels outside 1..{MAX_CHANNELS}"
    if not _is_int(message.get("seq")) or message["seq"] < 0:
        return "hello seq is not a count"
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
