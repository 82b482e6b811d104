"""Decoders face untrusted archives: garbage must raise ArchiveError, never anything else."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlis.archive.codecs import ANS, BitPack, Codec, Huffman, Raw, Sparse
from qlis.archive.codecs._common import WIDE_TAG
from qlis.archive.codecs.ans import CLASS_TAG
from qlis.errors import ArchiveError


def _samples() -> list[tuple[Codec, np.ndarray]]:
    rng = np.random.default_rng(0)
    skewed = rng.choice(4, size=3000, p=[0.9, 0.05, 0.03, 0.02]).astype(np.uint8)
    wide = np.clip(rng.standard_t(3, 3000) * 20 + 128, 0, 255).astype(np.uint8)
    pruned = rng.standard_normal(2000).astype(np.float32)
    pruned[rng.random(2000) < 0.8] = 0
    very_sparse = np.zeros(5000, dtype=np.float16)
    very_sparse[[3, 99, 4000]] = -0.0
    laplace = np.round(rng.laplace(size=3000) * 10 + 700).astype(np.uint16)
    laplace[[5, 2000]] = [3, 60000]
    rows = rng.choice([0.3, 3.0, 30.0], size=400)  # rows coded in classes (test_row_classes)
    mixed = np.clip(np.round(rng.standard_normal((400, 48)) * rows[:, None]) + 128, 0, 255)
    return [
        (ANS(), mixed.astype(np.uint8).reshape(-1)),
        (ANS(), (mixed.astype(np.uint16) * 7).reshape(-1)),
        (BitPack(3), skewed.astype(np.uint16)),
        (BitPack(11), laplace % 2048),
        (BitPack(16), laplace),
        (Huffman(), laplace),
        (ANS(), laplace),
        (ANS(), np.full(100, 40000, dtype=np.uint16)),
        (BitPack(2), skewed),
        (BitPack(5), skewed),
        (Huffman(), skewed),
        (Huffman(), wide),
        (ANS(), skewed),
        (ANS(), wide),
        (ANS(), np.full(100, 9, dtype=np.uint8)),
        (Huffman(), np.full(100, 9, dtype=np.uint8)),
        (Sparse(), pruned),
        (Sparse(), very_sparse),
        (Raw(), pruned),
    ]


SAMPLES = _samples()
ROW_LENGTH = {0: 48, 1: 48}  # the samples encoded as a matrix's rows
ENCODED = [bytes(codec.encode_rows(array, ROW_LENGTH[i])) if i in ROW_LENGTH
           else codec.encode(array) for i, (codec, array) in enumerate(SAMPLES)]
assert all(ENCODED[i][:2] == CLASS_TAG for i in ROW_LENGTH)
IDS = [f"{codec!r}-{i}" for i, (codec, _) in enumerate(SAMPLES)]


def decode_or_archive_error(codec: Codec, data: bytes, like: np.ndarray) -> np.ndarray | None:
    """Decode into a fresh output; None when the codec rejected the data as it must."""
    out = np.empty_like(like)
    try:
        result = codec.decode(data, out)
    except ArchiveError:
        return None
    assert result is out
    return out


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=IDS)
def test_truncation_and_trailing_garbage_are_rejected(index: int) -> None:
    codec, array = SAMPLES[index]
    data = ENCODED[index]
    cuts = sorted({0, 1, 2, 3, len(data) // 2, len(data) - 4, len(data) - 1} - {len(data)})
    for cut in (c for c in cuts if 0 <= c < len(data)):
        with pytest.raises(ArchiveError):
            codec.decode(data[:cut], np.empty_like(array))
    for tail in (b"\x00", b"\x00" * 4, b"\xff\x17\x00\x00\x00\x00\x00\x00"):
        with pytest.raises(ArchiveError):
            codec.decode(data + tail, np.empty_like(array))
    for wrong in (array[:-1], np.concatenate([array, array[:1]])):
        with pytest.raises(ArchiveError):
            codec.decode(data, np.empty_like(wrong))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, len(SAMPLES) - 1),
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_byte_flips_decode_or_raise_archive_error(index: int, flips: list) -> None:
    codec, array = SAMPLES[index]
    data = bytearray(ENCODED[index])
    for position, xor in flips:
        data[position % len(data)] ^= xor
    decode_or_archive_error(codec, bytes(data), array)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(SAMPLES) - 1), st.binary(max_size=300), st.integers(0, 400))
def test_random_buffers_raise_archive_error(index: int, garbage: bytes, n: int) -> None:
    codec, array = SAMPLES[index]
    like = np.empty(n, dtype=array.dtype)
    decode_or_archive_error(codec, garbage, like)
    # The same garbage behind a valid-looking count prefix reaches the deeper parsers.
    prefix = codec.encode(np.zeros(n, dtype=array.dtype))[:4]
    decode_or_archive_error(codec, prefix + garbage, like)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("codec", [Huffman(), ANS(), BitPack(3), Sparse()], ids=repr)
def test_huge_claimed_counts_fail_before_allocating(codec: Codec, dtype: type) -> None:
    # A 10-byte varint claiming ~2**62 elements against a small output: rejected at once.
    wide = dtype == np.uint16
    if codec.codec_id == "bitpack":
        header = bytes([3 | (0x80 if wide else 0)])
    elif codec.codec_id == "sparse":
        header = bytes([np.dtype(dtype).itemsize])
    else:
        header = WIDE_TAG if wide else b""
    huge = header + b"\xff" * 8 + b"\x3f"
    with pytest.raises(ArchiveError):
        codec.decode(huge, np.empty(10, dtype=dtype))


@pytest.mark.parametrize("codec", [Huffman(), ANS()], ids=repr)
def test_hostile_16_bit_alphabets_are_bounded(codec: Codec) -> None:
    out = np.empty(10, dtype=np.uint16)
    head = WIDE_TAG + bytes([10])
    hostile = [
        b"\xff\xff\x01",  # 32768 runs claimed, no bytes for them
        b"\xff\xff\x03" + b"\x00" * 100,  # more runs than 16-bit symbols allow
        b"\x01" + b"\xff\xff\x03\x00" * 2,  # a run past 65535
        b"\x00\x00\xff\xff\x03",  # one run of 65536 symbols, no code table after it
        b"\x00\x80\x00\x00",  # a non-minimal varint
    ]
    for tail in hostile:
        with pytest.raises(ArchiveError):
            codec.decode(head + tail, out)
    # The full 65536-symbol alphabet is legal and decodes (with the tables it declares).
    every = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(codec.decode(codec.encode(every), np.empty_like(every)), every)


@pytest.mark.parametrize("bits", [9, 12, 16])
def test_bitpack_codes_wider_than_the_elements_are_refused(bits: int) -> None:
    """A head of 9-16 bits without the wide flag, decoded into uint8, kept each code's low
    byte (897 read as 129) and said nothing."""
    codes = np.array([897 % (1 << bits), 5, 300 % (1 << bits), 1], dtype=np.uint16)
    wide = BitPack(bits).encode(codes)
    narrow = bytes([wide[0] & 0x7F]) + wide[1:]  # the same stream, flagged 8-bit
    with pytest.raises(ArchiveError, match="do not fit"):
        BitPack(bits).decode(narrow, np.empty(4, dtype=np.uint8))
