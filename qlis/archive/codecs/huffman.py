"""Canonical Huffman coding of uint8 or uint16 symbols: the paper's coder, table-decoded.

The stream stores only the code length of each present symbol; codes are canonical, so the
decoder rebuilds them. Lengths are capped at 16 bits so that one table lookup decodes a
symbol; where the optimal code is longer than 11 bits, the smallest cap from 11 to 16 bits
that costs at most 0.1% over optimal is used (a small table stays in L1 cache); an alphabet
of more than 2**11 symbols starts from the smallest cap that can hold it.
"""

from __future__ import annotations

import numpy as np

from qlis.archive.codecs._bounds import huffman_code_lengths, optimal_huffman_bits
from qlis.archive.codecs._common import (
    Reader,
    as_bytes_array,
    check_input,
    check_out,
    read_symbol_head,
    start_symbol_stream,
    symbol_width,
    write_codes_lsb,
)
from qlis.archive.codecs.base import Codec, register_codec
from qlis.compiled import njit

MAX_CODE_LENGTH = 16  # the format's cap: a decode table never exceeds 2**16 entries
_SMALL_TABLE_BITS = 11  # a cap this low keeps the decode table in L1 cache
_LIMIT_TOLERANCE = 1e-3  # a cap may cost at most this fraction over optimal Huffman bits


def _bit_reversal_16() -> np.ndarray:
    values = np.arange(1 << 16, dtype=np.int64)
    reversed_ = np.zeros_like(values)
    for bit in range(16):
        reversed_ |= ((values >> bit) & 1) << (15 - bit)
    return reversed_


_REVERSED_16 = _bit_reversal_16()


def _package_merge(weights: np.ndarray, limit: int) -> np.ndarray:
    """Optimal code lengths no longer than ``limit`` for ascending ``weights`` (package-merge).

    At every level the chosen items are a prefix of the level's merged list, so it is enough
    to remember which entries of each list are leaves and walk the prefixes back down.
    """
    k = weights.size
    leaf_flags = []
    level = weights
    for _ in range(limit - 1):
        pairs = level.size // 2
        packages = level[0 : 2 * pairs : 2] + level[1 : 2 * pairs : 2]
        merged = np.concatenate([weights, packages])
        order = np.argsort(merged, kind="stable")
        leaf_flags.append(order < k)
        level = merged[order]
    lengths = np.zeros(k, dtype=np.int64)
    take = 2 * k - 2
    for is_leaf in reversed(leaf_flags):
        leaves = int(np.count_nonzero(is_leaf[:take]))
        lengths[:leaves] += 1
        take = 2 * (take - leaves)
    lengths[:take] += 1
    return lengths


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """The code lengths the codec uses: optimal Huffman, capped as the module docstring says."""
    lengths = huffman_code_lengths(counts)
    present = np.flatnonzero(lengths)
    longest = int(lengths.max()) if present.size else 0
    if present.size < 2 or longest <= _SMALL_TABLE_BITS:
        return lengths
    weights = counts[present]
    order = np.argsort(weights, kind="stable")
    optimal_bits = int(np.dot(weights, lengths[present]))
    smallest = max(_SMALL_TABLE_BITS, (present.size - 1).bit_length())
    for limit in range(smallest, MAX_CODE_LENGTH + 1):
        if limit >= longest:
            return lengths
        capped = _package_merge(weights[order], limit)
        if int(np.dot(weights[order], capped)) <= optimal_bits * (1 + _LIMIT_TOLERANCE):
            break
    result = np.zeros_like(lengths)
    result[present[order]] = capped
    return result


def canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes, bit-reversed for the LSB-first stream, and the symbols in code order.

    Codes are assigned in order of (length, symbol): the decoder needs only the lengths.
    Code i is ``(code[i-1] + 1) << (length[i] - length[i-1])``, i.e. the Kraft sum of the codes
    before it, in units of its own length.
    """
    present = np.flatnonzero(lengths)
    order = present[np.lexsort((present, lengths[present]))]
    ordered = lengths[order].astype(np.int64)
    longest = int(ordered[-1]) if ordered.size else 0
    units = np.left_shift(1, longest - ordered)
    code = (np.cumsum(units) - units) >> (longest - ordered)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    codes[order] = _REVERSED_16[code] >> (16 - ordered)
    return codes, order


def decode_table(lengths: np.ndarray, width: int = 8) -> tuple[np.ndarray, int]:
    """The lookup table indexed by the next ``bits`` stream bits: ``symbol | length << width``
    (uint16 entries for 8-bit symbols, uint32 for 16-bit ones)."""
    _, order = canonical_codes(lengths)
    bits = int(lengths.max())
    span = np.left_shift(1, bits - lengths[order])
    dtype = np.uint16 if width == 8 else np.uint32
    by_code = np.repeat((order | (lengths[order] << width)).astype(dtype), span)
    table = np.empty(1 << bits, dtype=dtype)
    table[_REVERSED_16[: 1 << bits] >> (16 - bits)] = by_code
    return table, bits


@njit(cache=True, nogil=True)
def _decode(data: np.ndarray, table: np.ndarray, bits: int, width: int, out: np.ndarray) -> int:
    # Returns 0 on success, 1 if the bits do not end in the last byte, 2 on non-zero padding.
    end = data.size
    acc = np.uint64(0)
    filled = 0  # valid bits in acc
    pos = 0
    virtual = 0  # zero bits supplied past the end of the data
    mask = np.uint64((1 << bits) - 1)
    symbol_mask = (1 << width) - 1
    for i in range(out.size):
        if filled < bits:
            if pos + 4 <= end:
                word = (
                    np.uint64(data[pos])
                    | (np.uint64(data[pos + 1]) << np.uint64(8))
                    | (np.uint64(data[pos + 2]) << np.uint64(16))
                    | (np.uint64(data[pos + 3]) << np.uint64(24))
                )
                acc |= word << np.uint64(filled)
                pos += 4
                filled += 32
            else:
                while filled <= 56 and pos < end:
                    acc |= np.uint64(data[pos]) << np.uint64(filled)
                    pos += 1
                    filled += 8
                if filled < bits:
                    virtual += 32
                    filled += 32
        entry = table[acc & mask]
        length = entry >> width
        out[i] = entry & symbol_mask
        acc >>= np.uint64(length)
        filled -= length
    consumed = 8 * pos + virtual - filled
    if consumed > 8 * end or consumed <= 8 * (end - 1):
        return 1
    if acc != 0:
        return 2
    return 0


@register_codec
class Huffman(Codec):
    """Canonical Huffman code per array of uint8 or uint16 symbols (the paper's coder);
    within 0.1% of optimal Huffman size, table-decoded.

    Stream: (16-bit symbols only: the tag ``0x80 0x00``) ``varint n``; if n > 0 the alphabet;
    if k > 1 the code lengths minus one as 4-bit nibbles, low nibble first, then the codes
    LSB-first, zero-padded to a byte. A lone symbol needs no payload (docs/codecs.md).

    >>> codec = Huffman()
    >>> codec.decode(codec.encode(np.array([7, 7, 1], dtype=np.uint8)), np.empty(3, np.uint8))
    array([7, 7, 1], dtype=uint8)
    """

    codec_id = "huffman"

    def encode(self, array: np.ndarray) -> bytes:
        symbols = check_input(array, self.codec_id)
        stream, counts, present = start_symbol_stream(symbols)
        if present.size <= 1:
            return bytes(stream)
        lengths = code_lengths(counts)
        nibbles = np.zeros(2 * ((present.size + 1) // 2), dtype=np.uint8)
        nibbles[: present.size] = lengths[present] - 1
        stream += (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
        codes, _ = canonical_codes(lengths)
        payload = np.empty((int(np.dot(counts, lengths)) + 7) // 8 + 8, dtype=np.uint8)
        size = write_codes_lsb(symbols, codes, lengths, payload)
        return bytes(stream) + payload[:size].tobytes()

    def fewest_bytes(self, array: np.ndarray, row_length: int | None = None) -> float:
        """The head, the nibbles and the codes at optimal Huffman lengths (capped lengths
        only cost more): on the float16 patterns of a norm, where bitpack wins, building
        the code took 2 ms a tensor."""
        symbols = check_input(array, self.codec_id)
        stream, counts, present = start_symbol_stream(symbols)
        if present.size <= 1:
            return float(len(stream))
        return float(len(stream) + (present.size + 1) // 2
                     + (optimal_huffman_bits(counts) + 7) // 8)

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        out = check_out(out, self.codec_id)
        reader = Reader(as_bytes_array(buf), self.codec_id)
        present = read_symbol_head(reader, out)
        if present is None:
            return out
        packed = reader.take((present.size + 1) // 2)
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).ravel()
        if present.size % 2 and nibbles[-1]:
            raise reader.fail("non-zero padding nibble in the code lengths")
        width = symbol_width(out.dtype)
        lengths = np.zeros(1 << width, dtype=np.int64)
        lengths[present] = nibbles[: present.size].astype(np.int64) + 1
        longest = int(lengths.max())
        kraft = int(np.sum(np.left_shift(1, longest - lengths[present])))
        if kraft != 1 << longest:
            raise reader.fail("the code lengths do not form a complete prefix code")
        payload = reader.rest()
        if not out.size <= 8 * payload.size <= out.size * longest + 7:
            raise reader.fail(f"{payload.size} payload bytes cannot hold {out.size} codes")
        table, bits = decode_table(lengths, width)
        status = _decode(payload, table, bits, width, out)
        if status == 1:
            raise reader.fail("the coded bits do not end in the last byte (truncated or padded)")
        if status == 2:
            raise reader.fail("non-zero padding bits")
        return out
