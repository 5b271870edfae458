"""The audio-over-MQTT wire format and the worker's reorder buffer (stream_ser.remote)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_ser.remote import (
    HEADER,
    MAX_CHUNK_MS,
    MAX_FILLED_GAP,
    MAX_PAYLOAD_BYTES,
    REORDER_WINDOW,
    Chunk,
    PayloadError,
    Reorderer,
    decode_chunk,
    encode_chunk,
)


def pcm(frames: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32768, (frames, channels), dtype=np.int16)


def chunk(
    seq: int,
    frames: int = 160,
    channels: int = 1,
    rate: int = 16000,
    captured_ms: int | None = None,
) -> Chunk:
    captured = 1000 + seq if captured_ms is None else captured_ms
    return decode_chunk(encode_chunk(seq, rate, pcm(frames, channels, seed=seq), captured))


def header(channels: int = 1, rate: int = 16000, magic: bytes = b"SSA1", version: int = 1) -> bytes:
    return HEADER.pack(magic, version, 0, channels, rate, 0, 0)


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (44100, 2), (48000, 8)])
def test_encode_decode_round_trip(rate: int, channels: int) -> None:
    audio = pcm(rate // 10, channels)
    decoded = decode_chunk(encode_chunk(7, rate, audio, 1_700_000_000_123, last=True))
    assert (decoded.seq, decoded.sample_rate, decoded.channels) == (7, rate, channels)
    assert decoded.captured_ms == 1_700_000_000_123
    assert decoded.last
    assert decoded.frames == rate // 10
    np.testing.assert_array_equal(decoded.pcm, audio)


def test_one_dimensional_pcm_is_mono_and_empty_chunks_decode() -> None:
    decoded = decode_chunk(encode_chunk(0, 16000, np.arange(5, dtype=np.int16), 0))
    assert decoded.channels == 1 and decoded.pcm[:, 0].tolist() == [0, 1, 2, 3, 4]
    empty = decode_chunk(encode_chunk(3, 16000, np.zeros((0, 2), np.int16), 0, last=True))
    assert empty.frames == 0 and empty.channels == 2 and empty.last


def test_a_chunk_of_exactly_the_limits_is_accepted() -> None:
    decoded = decode_chunk(header(8, 48000) + bytes(MAX_PAYLOAD_BYTES - HEADER.size))
    assert decoded.frames * 1000 == 48000 * MAX_CHUNK_MS


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (header(magic=b"XXXX") + bytes(4), "bad magic"),
        (header(version=2) + bytes(4), "bad magic or version"),
        (b"SSA1", "shorter than the header"),
        (bytes(MAX_PAYLOAD_BYTES + 1), "exceeds"),
        (header() + bytes(3), "not whole 16-bit frames"),
        (header(channels=2) + bytes(6), "not whole 16-bit frames"),
        (header(channels=0), "channel count 0"),
        (header(channels=9), "channel count 9"),
        (header(rate=7999), "sample rate 7999"),
        (header(rate=48001), "sample rate 48001"),
        (header(rate=8000) + bytes(2 * 8001), "longer than"),
    ],
)
def test_malformed_payloads_raise_payload_error(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        decode_chunk(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=64).map(lambda tail: header() + tail))
def test_decode_of_arbitrary_bytes_returns_a_chunk_or_raises_payload_error(data: bytes) -> None:
    try:
        decoded = decode_chunk(data)
    except PayloadError:
        return
    assert decoded.pcm.dtype == np.dtype("<i2")
    assert decoded.pcm.shape == (decoded.frames, decoded.channels)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=HEADER.size, max_size=HEADER.size),
    st.integers(0, 64),
)
def test_decode_of_arbitrary_headers_never_crashes(head: bytes, body: int) -> None:
    with contextlib.suppress(PayloadError):
        decode_chunk(b"SSA1\x01" + head[5:] + bytes(body))


def released(reorderer: Reorderer, chunks: list[Chunk]) -> list[Chunk]:
    return [out for item in chunks for out in reorderer.push(item)]


def test_in_order_chunks_pass_straight_through() -> None:
    reorderer = Reorderer()
    for seq in range(5):
        assert [c.seq for c in reorderer.push(chunk(seq))] == [seq]
    assert list(reorderer.flush()) == []


def test_chunks_shuffled_within_the_window_come_out_in_order() -> None:
    chunks = [chunk(seq) for seq in range(40)]
    shuffled = chunks[:1]  # the first chunk fixes where the stream starts
    for start in range(1, 40, REORDER_WINDOW):
        block = chunks[start : start + REORDER_WINDOW]
        random.Random(start).shuffle(block)
        shuffled += block
    reorderer = Reorderer()
    out = released(reorderer, shuffled) + list(reorderer.flush())
    assert [c.seq for c in out] == list(range(40))
    assert all(o is c for o, c in zip(out, chunks, strict=True))
    assert reorderer.stats.chunks_lost == reorderer.stats.chunks_late == 0


def test_a_missing_chunk_becomes_silence_after_a_window_of_later_chunks() -> None:
    reorderer = Reorderer()
    assert [c.seq for c in reorderer.push(chunk(0))] == [0]
    later = [chunk(seq, frames=320) for seq in range(2, 2 + REORDER_WINDOW)]
    assert released(reorderer, later[:-1]) == []  # still waiting for 1
    out = list(reorderer.push(later[-1]))
    assert [c.seq for c in out] == list(range(1, 2 + REORDER_WINDOW))
    filler = out[0]
    assert filler.frames == 320 and not filler.pcm.any() and filler.pcm.dtype == np.int16
    assert reorderer.stats.chunks_lost == 1


def test_late_and_duplicate_chunks_are_dropped_and_counted() -> None:
    reorderer = Reorderer()
    released(reorderer, [chunk(0), *(chunk(seq) for seq in range(2, 2 + REORDER_WINDOW))])
    assert list(reorderer.push(chunk(1))) == []  # given up already (silence stood in): late
    assert reorderer.stats.chunks_late == 1
    list(reorderer.push(chunk(12)))  # held: 10 and 11 are missing
    assert list(reorderer.push(chunk(12))) == []  # still held: a duplicate
    assert reorderer.stats.chunks_duplicate == 1


def test_a_chunk_released_already_is_a_duplicate_not_late() -> None:
    """A QoS 1 redelivery of a chunk the worker has used was counted as late."""
    reorderer = Reorderer()
    released(reorderer, [chunk(seq) for seq in range(5)])
    assert list(reorderer.push(chunk(0))) == []
    assert list(reorderer.push(chunk(3))) == []
    assert reorderer.stats.chunks_duplicate == 2
    assert reorderer.stats.chunks_late == 0


def test_an_out_of_order_first_chunk_does_not_drop_the_earlier_ones() -> None:
    """Chunk 1 arriving before chunk 0 used to fix the start at 1 and drop 0 as late."""
    reorderer = Reorderer()
    out = released(reorderer, [chunk(1), chunk(0), chunk(2)])
    assert [c.seq for c in out] == [0, 1, 2]
    assert reorderer.stats.chunks_late == reorderer.stats.chunks_lost == 0


def test_a_stream_joined_mid_way_starts_at_its_smallest_early_chunk() -> None:
    """A worker taking over mid-stream sees no chunk 0: after a window it starts at the
    smallest chunk held, without counting the chunks before it as lost."""
    reorderer = Reorderer()
    seqs = [5001, 5000, *range(5002, 5000 + REORDER_WINDOW)]
    out = released(reorderer, [chunk(seq) for seq in seqs])
    assert [c.seq for c in out] == list(range(5000, 5000 + REORDER_WINDOW))
    assert reorderer.stats.chunks_lost == 0


def test_a_capture_time_of_2_to_the_63_does_not_disable_restart_detection() -> None:
    """One chunk with an absurd capture time made every later restart look like an old chunk."""
    reorderer = Reorderer()
    released(reorderer, [chunk(0, captured_ms=1000), chunk(1, captured_ms=2**63)])
    released(reorderer, [chunk(seq, captured_ms=1000 + seq) for seq in range(2, 6)])
    out = released(reorderer, [chunk(0, captured_ms=9000)])  # the device restarted
    assert reorderer.stats.restarts == 1
    assert [c.seq for c in out] == [0]


def test_a_restarted_sender_starts_the_sequence_over_without_losing_held_chunks() -> None:
    reorderer = Reorderer()
    before = released(reorderer, [chunk(seq) for seq in (0, 1, 2, 4)])  # 3 missing: 4 held
    assert [c.seq for c in before] == [0, 1, 2]
    restarted = [chunk(seq, captured_ms=5000 + seq) for seq in range(3)]
    out = released(reorderer, restarted)
    assert [c.seq for c in out] == [3, 4, 0, 1, 2]  # held chunk and filler first, then the restart
    assert not out[0].pcm.any() and out[2] is restarted[0]
    assert reorderer.stats.restarts == 1 and reorderer.stats.format_changes == 0
    # a redelivered old chunk 0 (captured before the newest) is a duplicate, not a restart
    assert list(reorderer.push(chunk(0, captured_ms=4000))) == []
    assert reorderer.stats.restarts == 1 and reorderer.stats.chunks_duplicate == 1


def test_a_format_change_mid_stream_is_dropped_and_counted() -> None:
    reorderer = Reorderer()
    list(reorderer.push(chunk(0)))
    assert list(reorderer.push(chunk(1, rate=8000))) == []
    assert list(reorderer.push(chunk(1, channels=2))) == []
    assert reorderer.stats.format_changes == 2
    assert [c.seq for c in reorderer.push(chunk(1))] == [1]


def test_flush_releases_everything_held_and_fills_the_gaps() -> None:
    reorderer = Reorderer()
    first = released(reorderer, [chunk(0), chunk(3), chunk(2, frames=80), chunk(5)])
    assert [c.seq for c in first] == [0]
    out = list(reorderer.flush())
    assert [c.seq for c in out] == [1, 2, 3, 4, 5]
    assert out[0].frames == 80 and not out[0].pcm.any()  # as long as chunk 2
    assert not out[3].pcm.any()
    assert reorderer.stats.chunks_lost == 2
    assert list(reorderer.flush()) == []


def test_a_huge_sequence_jump_is_skipped_not_filled() -> None:
    reorderer = Reorderer()
    list(reorderer.push(chunk(0)))
    far = 2**32 - REORDER_WINDOW
    out = released(reorderer, [chunk(far + i) for i in range(REORDER_WINDOW)])
    assert [c.seq for c in out] == [far + i for i in range(REORDER_WINDOW)]
    assert reorderer.stats.chunks_lost == far - 1
    assert far - 1 > MAX_FILLED_GAP
