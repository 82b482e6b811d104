"""Codec behaviour: round trips, sizes against their bounds, the registry and configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference
from dahuffman import HuffmanCodec
from hypothesis import given, settings
from hypothesis import strategies as st

from qlis.archive.codecs import (
    ANS,
    Auto,
    BitPack,
    Codec,
    Huffman,
    Raw,
    Sparse,
    codec_registry,
    entropy_bits,
    get_codec,
    huffman_code_lengths,
    optimal_huffman_bits,
    register_codec,
)
from qlis.archive.codecs._common import (
    WIDE_TAG,
    Reader,
    read_runs,
    read_symbol_head,
    read_varints,
    symbol_histogram,
    write_runs,
)
from qlis.archive.codecs.ans import (
    _SCALE_TOLERANCE,
    _encoder_table,
    _normalize,
    frequency_table,
)
from qlis.archive.codecs.huffman import _package_merge, canonical_codes, code_lengths
from qlis.archive.codecs.sparse import sparse_bytes
from qlis.errors import ArchiveError, ConfigError

ALL_IDS = {"ans", "auto", "bitpack", "huffman", "raw", "sparse"}
DTYPES = [np.uint8, np.uint16]


def skewed_symbols(rng: np.random.Generator, n: int, k: int, skew: float) -> np.ndarray:
    """n symbols from an alphabet of k (placed at random byte values), Zipf-like skew."""
    p = 1.0 / np.arange(1, k + 1) ** skew
    values = rng.choice(256, size=k, replace=False)
    return values[rng.choice(k, size=n, p=p / p.sum())].astype(np.uint8)


def wide_symbols(
    rng: np.random.Generator, n: int, spread: float, centre: int, outliers: int = 0
) -> np.ndarray:
    """16-bit codes as a uniform quantizer makes them: a discretised Laplacian around
    ``centre`` (``spread`` codes per unit of scale) plus a few outliers anywhere in 0..65535."""
    codes = np.clip(np.round(rng.laplace(size=n) * spread) + centre, 0, 65535).astype(np.uint16)
    if n:
        codes[rng.integers(0, n, outliers)] = rng.integers(0, 65536, outliers)
    return codes


@st.composite
def symbol_arrays(draw: st.DrawFn, dtype: type = np.uint8, max_size: int = 5000) -> np.ndarray:
    n = draw(st.integers(0, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == np.uint16:
        spread = draw(st.sampled_from([0.0, 0.3, 3.0, 30.0, 3000.0]))
        centre = draw(st.integers(0, 65535))
        return wide_symbols(rng, n, spread, centre, outliers=draw(st.integers(0, 5)))
    k = draw(st.integers(1, 256))
    skew = draw(st.sampled_from([0.0, 1.0, 2.0, 4.0]))
    return skewed_symbols(rng, n, k, skew)


def roundtrip(codec: Codec, array: np.ndarray) -> bytes:
    data = codec.encode(array)
    out = np.full(array.size, 0xAB, dtype=array.dtype) if array.size else np.empty_like(array)
    result = codec.decode(data, out)
    assert result is out
    assert out.tobytes() == array.tobytes()
    return data


def varint_size(n: int) -> int:
    return max(1, math.ceil(n.bit_length() / 7))


# -- size bounds --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**9), max_size=300))
def test_optimal_huffman_bits_are_those_of_the_built_code(counts: list[int]) -> None:
    counts_arr = np.array(counts, dtype=np.int64)
    expected = int(np.dot(counts_arr, huffman_code_lengths(counts_arr))) if counts else 0
    assert optimal_huffman_bits(counts_arr) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=256))
def test_huffman_code_lengths_are_optimal_like_dahuffman(counts: list[int]) -> None:
    counts_arr = np.array(counts, dtype=np.int64)
    lengths = huffman_code_lengths(counts_arr)
    present = np.flatnonzero(counts_arr)
    assert np.all(lengths[counts_arr == 0] == 0)
    if present.size == 0:
        return
    if present.size == 1:
        assert lengths[present[0]] == 1
        return
    assert sum(2.0 ** -lengths[present]) == pytest.approx(1.0, abs=1e-12)  # Kraft equality
    # dahuffman adds an end-of-file symbol unless one of ours is declared as it.
    table = HuffmanCodec.from_frequencies(
        {int(s): int(counts_arr[s]) for s in present}, eof=int(present[0])
    ).get_code_table()
    oracle_bits = sum(int(counts_arr[s]) * table[int(s)][0] for s in present)
    assert int(np.dot(counts_arr, lengths)) == oracle_bits


def test_entropy_bits() -> None:
    assert entropy_bits(np.array([5, 5])) == pytest.approx(10.0)
    assert entropy_bits(np.array([0, 7, 0])) == 0.0
    assert entropy_bits(np.array([], dtype=np.int64)) == 0.0
    counts = np.array([97, 1, 1, 1])
    expected = -sum(c * math.log2(c / 100) for c in counts)
    assert entropy_bits(counts) == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=256), st.integers(0, 8))
def test_package_merge_respects_its_limit_and_is_optimal_without_one(
    weights: list[int], extra: int
) -> None:
    w = np.sort(np.array(weights, dtype=np.int64))
    optimal = huffman_code_lengths(w)
    limit = max(1, (w.size - 1).bit_length()) + extra
    capped = _package_merge(w, limit)
    assert capped.max() <= limit
    assert np.sum(np.ldexp(1.0, -capped)) == pytest.approx(1.0, abs=1e-12)
    assert np.dot(w, capped) >= np.dot(w, optimal)
    if limit >= optimal.max():
        assert np.dot(w, capped) == np.dot(w, optimal)


# -- round trips --------------------------------------------------------------------------


def narrowest_bits(array: np.ndarray) -> int:
    return max(1, int(array.max()).bit_length()) if array.size else 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["bitpack", "huffman", "ans", "raw", "sparse", "auto"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_symbol_codecs_roundtrip(name: str, dtype: type, data: st.DataObject) -> None:
    array = data.draw(symbol_arrays(dtype))
    if name == "auto":
        codec, encoded = Auto().select(array)
        assert codec.codec_id in {"bitpack", "huffman", "ans"}
        out = np.empty_like(array)
        assert np.array_equal(get_codec(codec.get_config()).decode(encoded, out), array)
        return
    bits = data.draw(st.integers(narrowest_bits(array), 8 * array.itemsize))
    codec = BitPack(bits) if name == "bitpack" else get_codec(name)
    roundtrip(codec, array)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("codec", [BitPack(1), Huffman(), ANS(), Raw(), Sparse()], ids=repr)
def test_empty_arrays_roundtrip(codec: Codec, dtype: type) -> None:
    roundtrip(codec, np.zeros(0, dtype=dtype))


@pytest.mark.parametrize("codec", [BitPack(7), Huffman(), ANS()], ids=repr)
def test_stream_width_must_match_the_output(codec: Codec) -> None:
    for n, fill in ((0, 0), (5, 0), (5, 100), (300, None)):
        for dtype, other in ((np.uint8, np.uint16), (np.uint16, np.uint8)):
            array = np.arange(n, dtype=dtype) % 128 if fill is None else np.full(n, fill, dtype)
            data = roundtrip(codec, array)
            assert data.startswith(WIDE_TAG) == (dtype == np.uint16 and codec.codec_id != "bitpack")
            with pytest.raises(ArchiveError, match="bit"):
                codec.decode(data, np.empty(n, dtype=other))


def test_uint8_streams_keep_their_layout_and_uint16_streams_are_tagged() -> None:
    # The documented heads (docs/codecs.md): 8-bit streams start with the count, then the
    # alphabet; 16-bit ones with the tag, the count, then symbol runs (skip, length - 1).
    codes = np.array([0, 0, 0, 3], dtype=np.uint8)
    assert ANS().encode(codes)[:4] == bytes([4, 1, 0, 3])
    assert Huffman().encode(codes)[:5] == bytes([4, 1, 0, 3, 0x00])  # lengths 1 and 1
    assert BitPack(2).encode(codes) == bytes([2, 4, 0b11000000])
    wide = np.array([300, 300, 301, 302, 1000], dtype=np.uint16)
    runs = bytes([1, 0xAC, 0x02, 2, 0xB8, 0x05, 0])  # 300..302 (skip 300), 1000 (skip 696)
    assert ANS().encode(wide)[:10] == WIDE_TAG + bytes([5]) + runs
    assert Huffman().encode(wide)[:10] == WIDE_TAG + bytes([5]) + runs
    assert BitPack(10).encode(wide)[:2] == bytes([0x80 | 10, 5])
    assert Huffman().encode(np.full(9, 40000, np.uint16)) == WIDE_TAG + bytes(
        [9, 0, 0xC0, 0xB8, 2, 0]
    )


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 65535), min_size=1, max_size=400))
def test_symbol_runs_roundtrip(symbols: set[int]) -> None:
    present = np.array(sorted(symbols), dtype=np.int64)
    stream = bytearray()
    write_runs(stream, present)
    reader = Reader(np.frombuffer(bytes(stream), dtype=np.uint8), "test")
    assert np.array_equal(read_runs(reader), present)
    reader.expect_end()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=300))
def test_canonical_codes_follow_the_documented_rule(counts: list[int]) -> None:
    """On the codec's lengths (capped at 16 bits: skewed counts make longer Huffman codes)."""
    lengths = code_lengths(np.array(counts, dtype=np.int64))
    codes, order = canonical_codes(lengths)
    code, previous = 0, 0
    for symbol in order:  # (previous + 1) << (length - previous length), written reversed
        length = int(lengths[symbol])
        code <<= length - previous
        assert int(codes[symbol]) == int(f"{code:0{length}b}"[::-1], 2)
        code, previous = code + 1, length


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.uint64])
def test_raw_and_sparse_roundtrip_other_dtypes(dtype: type) -> None:
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(3001) * 100).astype(dtype)
    array[rng.random(array.size) < 0.7] = 0
    for codec in (Raw(), Sparse()):
        roundtrip(codec, array)
    codec, data = Auto().select(array)
    assert codec.codec_id in {"raw", "sparse"}
    assert len(data) == min(len(Raw().encode(array)), len(Sparse().encode(array)))


def test_raw_is_little_endian() -> None:
    array = np.array([1, 2], dtype=">u2")
    assert Raw().encode(array) == b"\x01\x00\x02\x00"


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 17))
def test_bitpack_size_is_exact(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for dtype in DTYPES if bits <= 8 else [np.uint16]:
        for n in (0, 1, 7, 8, 9, 1001):
            array = rng.integers(0, 2**bits, n).astype(dtype)
            data = roundtrip(BitPack(bits), array)
            assert len(data) == 1 + varint_size(n) + math.ceil(n * bits / 8)


def test_bitpack_rejects_wide_codes_and_bad_widths() -> None:
    with pytest.raises(ConfigError):
        BitPack(2).encode(np.array([0, 4], dtype=np.uint8))
    with pytest.raises(ConfigError):
        BitPack(11).encode(np.array([0, 4096], dtype=np.uint16))
    with pytest.raises(ConfigError):
        BitPack(9).encode(np.array([0, 4], dtype=np.uint8))
    for bits in (0, 17, 2.0, True):
        with pytest.raises(ConfigError):
            BitPack(bits)


def test_huffman_size_is_within_02_percent_of_optimal_on_1m_symbols() -> None:
    rng = np.random.default_rng(2)
    # Heavy-tailed 8-bit codes: optimal codes exceed 16 bits, so lengths get capped.
    x = rng.standard_t(3, 1_000_000)
    array = np.clip(np.round(x / np.abs(x).max() * 127 + 128), 0, 255).astype(np.uint8)
    counts = np.bincount(array, minlength=256)
    optimal_bits = int(np.dot(counts, huffman_code_lengths(counts)))
    assert huffman_code_lengths(counts).max() > 16
    data = roundtrip(Huffman(), array)
    assert 8 * len(data) <= optimal_bits * 1.002


@settings(max_examples=40, deadline=None)
@given(symbol_arrays(max_size=3000))
def test_huffman_size_small_arrays(array: np.ndarray) -> None:
    data = Huffman().encode(array)
    counts = np.bincount(array, minlength=256)
    lengths = huffman_code_lengths(counts)
    header = 1 + 3 + 32 + 128
    if np.count_nonzero(counts) > 1:
        assert len(data) <= math.ceil(np.dot(counts, lengths) * 1.001 / 8) + header
    else:
        assert len(data) <= 5


def test_ans_size_close_to_entropy_on_skewed_data() -> None:
    rng = np.random.default_rng(3)
    # 2-bit codes of a quantized transformer: one symbol ~97%, about 0.2 bits of entropy.
    two_bit = rng.choice(4, size=200_000, p=[0.97, 0.014, 0.011, 0.005]).astype(np.uint8)
    eight_bit = skewed_symbols(rng, 200_000, 256, 1.5)
    for array in (two_bit, eight_bit):
        data = roundtrip(ANS(), array)
        bound = entropy_bits(np.bincount(array, minlength=256)) / 8
        assert len(data) <= bound * 1.03 + 40
    single = np.full(100_000, 3, dtype=np.uint8)
    assert len(roundtrip(ANS(), single)) <= 6


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("codec", [Huffman(), ANS()], ids=repr)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fewest_bytes_bounds_the_stream(codec: Codec, dtype: type, data: st.DataObject) -> None:
    array = data.draw(symbol_arrays(dtype))
    row_length = data.draw(st.integers(1, 64))
    assert codec.fewest_bytes(array) <= len(codec.encode(array))
    if array.size % row_length == 0:
        assert codec.fewest_bytes(array, row_length) <= len(codec.encode_rows(array, row_length))


@pytest.mark.parametrize("codec", [Huffman(), ANS()], ids=repr)
def test_fewest_bytes_is_close_on_large_arrays(codec: Codec) -> None:
    rng = np.random.default_rng(4)
    for array in (skewed_symbols(rng, 200_000, 200, 1.0),
                  wide_symbols(rng, 200_000, spread=12.0, centre=1000)):
        assert codec.fewest_bytes(array) > 0.99 * len(codec.encode(array)) - 400


def exhaustive_choice(array: np.ndarray, row_length: int) -> tuple[str, bytes]:
    """Every default candidate encoded, the smallest kept (the earlier on a tie)."""
    bits = max(1, int(array.max()).bit_length() if array.size else 1)
    best: tuple[str, bytes] | None = None
    for codec in (BitPack(bits), Huffman(), ANS()):
        data = bytes(codec.encode_rows(array, row_length))
        if best is None or len(data) < len(best[1]):
            best = (codec.codec_id, data)
    return best


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_auto_chooses_as_if_it_encoded_every_candidate(dtype: type,
                                                       data: st.DataObject) -> None:
    array = data.draw(symbol_arrays(dtype))
    row_length = max(1, array.size // data.draw(st.integers(1, 8)))
    if array.size % row_length:
        row_length = 1
    codec, encoded = Auto().select(array, row_length)
    assert (codec.codec_id, bytes(encoded)) == exhaustive_choice(array, row_length)


def test_auto_does_not_build_a_code_that_cannot_win(monkeypatch: pytest.MonkeyPatch) -> None:
    # a norm's float16 patterns, nearly all distinct: a Huffman table of them alone takes
    # more than the 16-bit packing, which wins
    patterns = np.random.default_rng(0).normal(size=1024).astype(np.float16).view(np.uint16)
    built = []
    encode = Huffman.encode
    monkeypatch.setattr(Huffman, "encode", lambda self, array: built.append(1) or encode(
        self, array))
    codec, _ = Auto().select(patterns, 1024)
    assert codec.codec_id == "bitpack" and not built


def test_ans_within_1_percent_of_entropy_on_16_bit_laplacian_codes() -> None:
    rng = np.random.default_rng(6)
    # A uniform quantizer's codes of Laplacian weights: ~200 symbols around 1000, plus
    # outliers far away (as a heavy-tailed layer's largest weights give).
    codes = wide_symbols(rng, 300_000, spread=12.0, centre=1000, outliers=30)
    counts = np.bincount(codes, minlength=65536)
    assert 150 <= np.count_nonzero(counts) <= 300
    data = roundtrip(ANS(), codes)
    assert 8 * len(data) <= entropy_bits(counts) * 1.01


@pytest.mark.parametrize("n", [2, 3, 5, 6, 7, 8, 13])
def test_ans_checks_every_state_where_decoding_ends(n: int) -> None:
    """A stream decodes only if each of its four states ends where the encoder began,
    whichever state the last symbol came from (one with no symbol at all included)."""
    symbols = np.arange(n, dtype=np.uint8) % 2
    data = ANS().encode(symbols)
    out = np.empty(n, dtype=np.uint8)
    reader = Reader(np.frombuffer(data, dtype=np.uint8), "ans")
    present = read_symbol_head(reader, out)
    scale = reader.u8()
    read_varints(reader, present.size - 1, limit=(1 << scale) - 1)
    assert np.array_equal(ANS().decode(data, out), symbols)
    for lane in range(4):
        forged = bytearray(data)
        forged[reader.pos + 8 * lane + 5] ^= 1  # bit 40 of that state: above every slot
        with pytest.raises(ArchiveError):
            ANS().decode(bytes(forged), out)


def test_huffman_caps_long_codes_on_large_16_bit_alphabets() -> None:
    rng = np.random.default_rng(7)
    # ~5000 symbols (more than a 2**11 table holds) and optimal codes over 16 bits.
    x = rng.standard_t(2, 400_000) * 400 + 30000
    codes = np.clip(np.round(x), 0, 65535).astype(np.uint16)
    counts = np.bincount(codes, minlength=65536)
    optimal = huffman_code_lengths(counts)
    assert np.count_nonzero(counts) > 2048 and optimal.max() > 16
    data = roundtrip(Huffman(), codes)
    header = 2 + 3 + 3 + 3 * np.count_nonzero(counts) + np.count_nonzero(counts) // 2 + 1
    assert 8 * len(data) <= np.dot(counts, optimal) * 1.001 + 8 * header


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=300).filter(any), st.data())
def test_ans_frequency_table_follows_its_rule(counts: list[int], data: st.DataObject) -> None:
    array = np.array(counts, dtype=np.int64)
    scale = data.draw(st.integers(max(1, (len(counts) - 1).bit_length()), 16))
    expected = reference.normalized_frequencies(array, scale)
    assert np.array_equal(_normalize(array, scale), expected)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([np.uint8, np.uint16]), st.integers(0, 70_000), st.integers(0, 2**32),
       st.data())
def test_symbol_histogram_counts_every_value_short_or_long(dtype, size: int, seed: int,
                                                           data: st.DataObject) -> None:
    """Arrays shorter than their bins are counted in one table, longer ones in four."""
    top = data.draw(st.integers(0, np.iinfo(dtype).max))
    symbols = np.random.default_rng(seed).integers(0, top + 1, size).astype(dtype)
    bins = np.iinfo(dtype).max + 1
    assert np.array_equal(symbol_histogram(symbols), np.bincount(symbols, minlength=bins))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=200).filter(any))
def test_ans_table_scale_follows_its_rule(counts: list[int]) -> None:
    array = np.array(counts, dtype=np.int64)
    freqs, scale = frequency_table(array)
    want_freqs, want_scale = reference.ans_table(array, _SCALE_TOLERANCE)
    assert scale == want_scale
    assert np.array_equal(freqs, want_freqs)


def test_ans_reciprocals_divide_exactly() -> None:
    # The encoder's multiply-by-reciprocal must equal x -> (x // f) * 2**scale + x % f + start.
    rng = np.random.default_rng(4)
    scale = 16
    freqs = [1, 2, 3, 4, 5, 255, 256, 257, 4095, 32768]
    freqs.append((1 << scale) - sum(freqs))
    starts = np.cumsum([0, *freqs[:-1]]).tolist()
    table = _encoder_table(np.arange(len(freqs)), np.array(freqs), scale)[: len(freqs)].tolist()
    states = rng.integers(1 << 15, 1 << 63, 500, dtype=np.uint64).tolist() + [(1 << 63) - 1]
    for (_, reciprocal, shift, bias, complement), f, start in zip(
        table, freqs, starts, strict=True
    ):
        for x in states:
            q = ((x * reciprocal) >> 64) >> shift
            assert x + bias + q * complement == (x // f << scale) + x % f + start


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 3000), share=st.floats(0, 1), seed=st.integers(0, 2**32 - 1),
       width=st.sampled_from([np.uint8, np.uint16, np.uint32]))
def test_sparse_bytes_is_the_length_the_writer_stores_without_encoding(size, share, seed,
                                                                        width) -> None:
    rng = np.random.default_rng(seed)
    patterns = np.where(rng.random(size) < share, rng.integers(1, 200, size), 0).astype(width)
    predicted = sparse_bytes(patterns)
    encoded = len(Sparse().encode(patterns)) if size else None
    sparse_taken = bool(size) and np.count_nonzero(patterns) < 0.9 * size and (
        encoded < patterns.nbytes)
    assert predicted == (encoded if sparse_taken else None)


def test_sparse_keeps_bit_patterns_and_picks_the_smaller_position_coding() -> None:
    special = np.array([0.0, -0.0, np.nan, -np.inf, 1e-45, 0.0], dtype=np.float32)
    odd_nan = np.array([0, 0x7FC01234, 0xFFFFFFFF, 0], dtype=np.uint32)
    for array in (special, special.astype(np.float16), odd_nan, odd_nan.view(np.float32)):
        roundtrip(Sparse(), array)
    bfloat16 = np.array([0, 0x8000, 0x7FC1, 0, 0x3F80], dtype=np.uint16)
    roundtrip(Sparse(), bfloat16)

    dense = np.arange(1, 10_001, dtype=np.uint32)
    dense[::3] = 0
    very_sparse = np.zeros(10_000, dtype=np.uint32)
    very_sparse[[5, 700, 9_999]] = 7
    assert len(roundtrip(Sparse(), dense)) == 1 + 2 + 2 + 1 + 1250 + 4 * 6666
    assert len(roundtrip(Sparse(), very_sparse)) < 40
    with pytest.raises(ConfigError):
        Sparse().encode(np.zeros(4, dtype=np.complex128))


# -- registry and configs -----------------------------------------------------------------


def test_registry_and_config_roundtrip() -> None:
    assert set(codec_registry.names()) >= ALL_IDS
    codecs = [Raw(), BitPack(3), Huffman(), ANS(), Sparse(), Auto(), Auto(["huffman"], bits=4)]
    for codec in codecs:
        config = codec.get_config()
        assert config["id"] == codec.codec_id
        assert get_codec(config) == codec
        assert type(codec).from_config(config).get_config() == config
    assert get_codec("bitpack").get_config() == {"id": "bitpack", "bits": 8}
    for bad in ("nope", {"bits": 2}, {"id": "bitpack", "width": 2}, {"id": 3}, ["huffman"]):
        with pytest.raises(ConfigError):
            get_codec(bad)
    with pytest.raises(ConfigError):
        BitPack.from_config({"id": "huffman"})
    with pytest.raises(ConfigError):
        Auto([{"id": "auto"}])


def test_third_party_codec_is_found_by_get_codec() -> None:
    @register_codec
    class Xor(Codec):
        codec_id = "test-xor"

        def __init__(self, key: int = 0x5A) -> None:
            self.key = key

        def encode(self, array: np.ndarray) -> bytes:
            return (array ^ self.key).tobytes()

        def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
            out[:] = np.frombuffer(buf, dtype=np.uint8) ^ self.key
            return out

    codec = get_codec({"id": "test-xor", "key": 3})
    assert isinstance(codec, Xor)
    assert codec.get_config() == {"id": "test-xor", "key": 3}
    roundtrip(codec, np.arange(10, dtype=np.uint8))
    chosen, _ = Auto([{"id": "test-xor", "key": 1}, "huffman"]).select(np.zeros(50, np.uint8))
    assert chosen.codec_id == "huffman"


def test_auto_cannot_decode_and_rejects_unusable_input() -> None:
    with pytest.raises(ConfigError):
        Auto().decode(b"", np.empty(0, np.uint8))
    with pytest.raises(ConfigError):
        Auto(["huffman", "ans"]).select(np.zeros(3, dtype=np.float32))
    codec, _ = Auto(bits=4).select(np.random.default_rng(5).integers(0, 16, 64).astype(np.uint8))
    assert codec.get_config() == {"id": "bitpack", "bits": 4}


def test_encode_rejects_wrong_inputs_and_decode_wrong_outputs() -> None:
    for codec in (Huffman(), ANS(), BitPack(4)):
        for bad in (np.zeros(4, dtype=np.float32), np.zeros(4, np.uint32), np.zeros(4, np.int16)):
            with pytest.raises(ConfigError):
                codec.encode(bad)
        with pytest.raises(ConfigError):
            codec.encode(np.zeros((2, 2), dtype=np.uint8))
        data = codec.encode(np.zeros(4, dtype=np.uint8))
        for out in (
            np.empty(4, np.uint16),
            np.empty(4, np.int8),
            np.empty(5, np.uint8),
            np.empty(8, np.uint8)[::2],
        ):
            with pytest.raises(ArchiveError):
                codec.decode(data, out)
