"""Static rANS over uint8 or uint16 symbols: within a fraction of a percent of the Shannon bound.

Huffman cannot spend less than one bit per symbol, yet 2-bit codes of real transformers
carry about 0.27 bits of entropy per symbol; an entropy-bound coder closes that gap. This is
a 64-bit-state rANS with 32-bit renormalisation and four interleaved states (for
instruction-level parallelism), with a frequency table normalised to ``2**scale``
(``scale <= 16``) chosen per array.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qlis.archive.codecs._bounds import entropy_bits
from qlis.archive.codecs._common import (
    Reader,
    as_bytes_array,
    check_input,
    check_out,
    read_symbol_head,
    read_varints,
    start_symbol_stream,
    symbol_head,
    symbol_histogram,
    write_varint,
    write_varints,
)
from qlis.archive.codecs.base import Codec, register_codec
from qlis.archive.codecs.row_classes import MAX_CLASSES, RowClasses, may_split, row_classes
from qlis.compiled import njit

MAX_SCALE = 16  # the format's cap: a decode table never exceeds 2**16 entries
_LOWER = 1 << 31  # every state lies in [_LOWER, 2**63) between symbols
_LANES = 4
_SCALE_TOLERANCE = 2e-4  # a smaller table may cost at most this fraction more
CLASS_TAG = b"\x81\x00"
"""Starts a stream of row classes: a non-minimal varint, so no one-table stream starts so."""


@njit(cache=True, nogil=True)
def _sift_down(keys: np.ndarray, index: np.ndarray, size: int, at: int) -> None:
    # A binary min-heap of (key, index) pairs, ordered by key, then index.
    while True:
        child = 2 * at + 1
        if child >= size:
            return
        if child + 1 < size and (keys[child + 1] < keys[child] or (
                keys[child + 1] == keys[child] and index[child + 1] < index[child])):
            child += 1
        if keys[child] < keys[at] or (keys[child] == keys[at] and index[child] < index[at]):
            keys[at], keys[child] = keys[child], keys[at]
            index[at], index[child] = index[child], index[at]
            at = child
        else:
            return


@njit(cache=True, nogil=True)
def _normalize(counts: np.ndarray, scale: int) -> np.ndarray:
    # Frequencies summing to 2**scale, each >= 1, close to minimal cross-entropy: round the
    # scaled counts, then move single units where they cost (or save) the most bits, the
    # lowest symbol first among equals. The moves all go one way (up while the sum is short,
    # down while it is over), so a heap of each symbol's next move finds them in log time.
    total_freq = 1 << scale
    total = counts.sum()
    freqs = np.empty(counts.size, dtype=np.int64)
    for i in range(counts.size):
        freqs[i] = max(1, int(counts[i] * total_freq / total + 0.5))
    diff = total_freq - freqs.sum()
    if diff == 0:
        return freqs
    step = 1 if diff > 0 else -1
    keys = np.empty(counts.size, dtype=np.float64)  # minus the gain of the symbol's move
    index = np.empty(counts.size, dtype=np.int64)
    size = 0
    for i in range(counts.size):
        if step > 0 or freqs[i] > 1:
            keys[size] = -(counts[i] * np.log2((freqs[i] + step) / freqs[i]))
            index[size] = i
            size += 1
    for at in range(size // 2 - 1, -1, -1):
        _sift_down(keys, index, size, at)
    while diff != 0:
        best = index[0]
        freqs[best] += step
        diff -= step
        if step > 0 or freqs[best] > 1:  # its next move replaces the one just made
            keys[0] = -(counts[best] * np.log2((freqs[best] + step) / freqs[best]))
        else:  # at 1 it cannot go lower
            size -= 1
            keys[0], index[0] = keys[size], index[size]
        _sift_down(keys, index, size, 0)
    return freqs


def frequency_table(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Normalised frequencies of the present symbols and their scale, chosen to minimise the
    estimated stream size (coded bits + table), preferring the smallest near-best table."""
    return _frequency_table(counts, max(1, (counts.size - 1).bit_length()))


@njit(cache=True, nogil=True)
def _frequency_table(counts: np.ndarray, first_scale: int) -> tuple[np.ndarray, int]:
    # Compiled whole: in numpy, its steps over a small alphabet held the GIL (a ViT-L/14
    # pack on two threads: 40 ms of it, for ~15 scales of every layer).
    costs = np.empty(MAX_SCALE + 1 - first_scale)
    for scale in range(first_scale, MAX_SCALE + 1):
        freqs = _normalize(counts, scale)
        bits = 0.0
        table_bytes = 0
        for i in range(counts.size):
            bits += counts[i] * (scale - np.log2(freqs[i]))
            if i < counts.size - 1:  # the last one follows from the others
                f = freqs[i]
                table_bytes += 1 + (f >= 1 << 7) + (f >= 1 << 14) + (f >= 1 << 21)
        costs[scale - first_scale] = bits + 8 * table_bytes
    limit = costs.min() * (1 + _SCALE_TOLERANCE)
    for scale in range(first_scale, MAX_SCALE + 1):
        if costs[scale - first_scale] <= limit:
            return _normalize(counts, scale), scale
    return _normalize(counts, MAX_SCALE), MAX_SCALE  # not reached: the minimum is <= limit


@njit(cache=True, nogil=True)
def _encode(symbols: np.ndarray, enc: np.ndarray, out: np.ndarray, states: np.ndarray) -> int:
    # Symbol i goes to state i % 4. Encoding runs backwards and writes words from the end of
    # `out`, so that decoding runs forwards. Returns where the words start (-1: out too
    # small). Before each symbol the state is brought below enc[s, 0] by emitting its low
    # 32 bits; then x // f is a multiply by the reciprocal enc[s, 1] (shift enc[s, 2]): a
    # 64-bit division would halve the speed. The four states rotate through locals (a is
    # the current symbol's, b the next one's), as in `_decode`. All in one body: numba adds
    # reference counting to calls that take arrays.
    low = np.uint64(0xFFFFFFFF)
    a = b = c = d = np.uint64(_LOWER)
    pos = out.size
    for i in range(symbols.size - 1, -1, -1):
        s = symbols[i]
        x = a
        if x >= enc[s, 0]:
            pos -= 4
            if pos < 0:
                return -1
            out[pos] = np.uint8(x & np.uint64(0xFF))
            out[pos + 1] = np.uint8((x >> np.uint64(8)) & np.uint64(0xFF))
            out[pos + 2] = np.uint8((x >> np.uint64(16)) & np.uint64(0xFF))
            out[pos + 3] = np.uint8((x >> np.uint64(24)) & np.uint64(0xFF))
            x >>= np.uint64(32)
        m = enc[s, 1]
        x_lo, x_hi = x & low, x >> np.uint64(32)
        m_lo, m_hi = m & low, m >> np.uint64(32)
        hi_lo = x_hi * m_lo
        cross = ((x_lo * m_lo) >> np.uint64(32)) + (hi_lo & low) + x_lo * m_hi
        q = (x_hi * m_hi + (hi_lo >> np.uint64(32)) + (cross >> np.uint64(32))) >> enc[s, 2]
        a, b, c, d = b, c, d, x + enc[s, 3] + q * enc[s, 4]
    # after symbol 0, a holds lane 3's state (that of symbol -1), d lane 0's
    states[0], states[1], states[2], states[3] = d, c, b, a
    return pos


@njit(cache=True, nogil=True)
def _decode(data, table, freq, start, scale, states, out) -> bool:
    # False if the words run out, are left over, or the states do not end where they began.
    # Symbol i comes from state i % 4: the four states rotate through locals (a is the next
    # one's), which the compiler keeps in registers; kept in `states` they went through
    # memory on every symbol (a quarter slower).
    mask = np.uint64((1 << scale) - 1)
    shift = np.uint64(scale)
    lower = np.uint64(_LOWER)
    pos = 0
    a, b, c, d = states[0], states[1], states[2], states[3]
    for i in range(out.size):
        x = a
        slot = x & mask
        s = table[slot]
        x = freq[s] * (x >> shift) + slot - start[s]
        if x < lower:
            if pos + 4 > data.size:
                return False
            word = (
                np.uint64(data[pos])
                | (np.uint64(data[pos + 1]) << np.uint64(8))
                | (np.uint64(data[pos + 2]) << np.uint64(16))
                | (np.uint64(data[pos + 3]) << np.uint64(24))
            )
            x = (x << np.uint64(32)) | word
            pos += 4
        out[i] = s
        a, b, c, d = b, c, d, x
    return a == lower and b == lower and c == lower and d == lower and pos == data.size


def _encoder_table(present: np.ndarray, freqs: np.ndarray, scale: int) -> np.ndarray:
    """Per symbol: the renormalisation bound, reciprocal, shift, bias and 2**scale - freq.

    With f in [2, 2**16) and s = ceil(log2 f), m = ceil(2**(63 + s) / f) < 2**64 gives
    x // f = mulhi(x, m) >> (s - 1) exactly for every x < 2**63. For f = 1, m = 2**64 - 1
    gives x - 1, and the bias absorbs the difference (the encoded state is still x * 2**scale
    + start). Whole arrays in uint64: m = (2**63 // f) * 2**s + ceil((2**63 % f) * 2**s / f),
    each part within 64 bits.
    """
    f = freqs.astype(np.uint64)
    start = np.cumsum(f) - f
    total = np.uint64(1 << scale)
    s = np.zeros(f.size, dtype=np.uint64)
    wide = f > 1
    s[wide] = np.floor(np.log2(f[wide] - 1.0)).astype(np.uint64) + np.uint64(1)  # bit_length
    half = np.uint64(1 << 63)
    spill = (half % f) << s  # < f * 2**s <= 2**32
    reciprocal = ((half // f) << s) + spill // f + (spill % f != 0)
    table = np.zeros((int(present[-1]) + 1, 5), dtype=np.uint64)
    table[present] = np.stack([
        f << np.uint64(63 - scale),
        np.where(wide, reciprocal, np.uint64(2**64 - 1)),
        np.where(wide, s - np.uint64(1), np.uint64(0)),
        np.where(wide, start, start + total - np.uint64(1)),
        total - f,
    ], axis=1)
    return table


def _symbol_tables(present: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    freq = np.zeros(int(present[-1]) + 1, dtype=np.uint64)
    start = np.zeros(int(present[-1]) + 1, dtype=np.uint64)
    freq[present] = freqs
    start[present] = np.cumsum(freqs) - freqs
    return freq, start


def in_row_classes(codec: Mapping[str, object], data: bytes | memoryview) -> bool:
    """Whether a record of ``codec`` (its config) is an ans stream in row classes, which
    archives hold from format version 4 on."""
    return codec.get("id") == ANS.codec_id and bytes(data[:2]) == CLASS_TAG


def one_table_bytes_at_least(counts: np.ndarray, dtype: np.dtype) -> float:
    """A lower bound of the one-table stream of symbols (``dtype``) with these ``counts``:
    the head, a byte per table entry, the words and the states. Each state grows by
    ``2**scale / f`` per symbol, less at most ``2**-15`` of itself (``x >= f * 2**15``
    before each step), and sheds at most 32 bits and as little more per word; a final
    state's 8 bytes hold at most 4 bytes above its start: so words and states hold the
    coded bits less 1e-4 bit per symbol, and the table's coded bits are at least the
    entropy."""
    present = np.flatnonzero(counts)
    size = int(counts.sum())
    head = len(symbol_head(size, present, dtype == np.uint16))
    if present.size <= 1:
        return float(head)
    words_and_states = (entropy_bits(counts[present]) - 1e-4 * size) / 8 + 4 * _LANES
    return head + present.size + max(words_and_states, 0.0)


@register_codec
class ANS(Codec):
    """rANS entropy coder for uint8 or uint16 symbols: reaches the entropy where Huffman
    cannot go under one bit per symbol (e.g. 2-bit codes with one dominant value).

    Stream: (16-bit symbols only: the tag ``0x80 0x00``) ``varint n``; if n > 0 the alphabet
    (as in Huffman); if k > 1: ``u8 scale``,
    k-1 varint frequencies (the last is ``2**scale`` minus their sum), the four final states
    as u64 little-endian, then 32-bit little-endian words. A lone symbol needs nothing more.
    A matrix's codes (`encode_rows`) may instead be coded in classes of alike rows, a table
    each (docs/codecs.md, "Row classes").

    >>> codec = ANS()
    >>> codec.decode(codec.encode(np.array([0, 0, 0, 3], dtype=np.uint8)), np.empty(4, np.uint8))
    array([0, 0, 0, 3], dtype=uint8)
    """

    codec_id = "ans"

    def encode(self, array: np.ndarray) -> bytes:
        return bytes(self.encode_view(array))

    def encode_view(self, array: np.ndarray) -> bytes | memoryview:
        """The stream in the buffer the words were encoded into, the head written just in
        front of them: no copy of the words (a 2 GB archive's took 0.5 s, holding the GIL)."""
        symbols = check_input(array, self.codec_id)
        stream, counts, present = start_symbol_stream(symbols)
        if present.size <= 1:
            return bytes(stream)
        freqs, scale = frequency_table(counts[present])
        stream.append(scale)
        write_varints(stream, freqs[:-1])
        enc = _encoder_table(present, freqs, scale)
        # rANS emits at most the coded bits plus < 1e-4 bit per symbol (docs/codecs.md).
        coded_bits = float(np.dot(counts[present], scale - np.log2(freqs)))
        head = len(stream) + 8 * _LANES  # the stream so far, then the final states
        buffer = np.empty(head + 4 * (int(coded_bits + 1e-4 * symbols.size) // 32 + 8),
                          dtype=np.uint8)
        states = np.empty(_LANES, dtype=np.uint64)
        pos = _encode(symbols, enc, buffer[head:], states)
        if pos < 0:
            raise AssertionError("internal error: the rANS output bound was exceeded")
        # the words are buffer[head + pos:]; the head goes right before them
        buffer[pos:pos + len(stream)] = np.frombuffer(stream, dtype=np.uint8)
        buffer[pos + len(stream):pos + head] = np.frombuffer(
            states.astype("<u8").tobytes(), dtype=np.uint8)
        return memoryview(buffer[pos:]).toreadonly()

    def encode_rows(self, array: np.ndarray, row_length: int) -> bytes | memoryview:
        """One table, or a table per class of alike rows where that is smaller
        (`qlis.archive.codecs.row_classes`); the one table is not encoded where the classes
        beat its bound (`one_table_bytes_at_least`)."""
        symbols = check_input(array, self.codec_id)
        classes = row_classes(symbols, row_length)
        if classes is None:
            return self.encode_view(symbols)
        in_classes = self._encode_classes(symbols, row_length, classes)
        if len(in_classes) < one_table_bytes_at_least(classes.counts, symbols.dtype):
            return in_classes
        one_table = self.encode_view(symbols)
        return in_classes if len(in_classes) < len(one_table) else one_table

    def fewest_bytes(self, array: np.ndarray, row_length: int | None = None) -> float:
        """`one_table_bytes_at_least`; 0 where rows of ``row_length`` may be coded in
        classes, which can take less."""
        symbols = check_input(array, self.codec_id)
        if row_length is not None and may_split(symbols.size, row_length):
            return 0.0
        return one_table_bytes_at_least(symbol_histogram(symbols), symbols.dtype)

    def _encode_classes(self, symbols: np.ndarray, row_length: int,
                        classes: RowClasses) -> bytes:
        stream = bytearray(CLASS_TAG)
        write_varint(stream, row_length)
        stream.append(classes.count - 1)
        matrix = symbols.reshape(-1, row_length)
        parts = [classes.of_row] + [matrix[classes.of_row == k].reshape(-1)
                                    for k in range(classes.count)]
        for part in parts:
            coded = self.encode_view(part)
            write_varint(stream, len(coded))
            stream += coded
        return bytes(stream)

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        out = check_out(out, self.codec_id)
        reader = Reader(as_bytes_array(buf), self.codec_id)
        data = reader.data
        if data.size >= 2 and data[0] == CLASS_TAG[0] and data[1] == CLASS_TAG[1]:
            reader.take(2)
            return self._decode_classes(reader, out)
        return self._decode_one_table(reader, out)

    def _decode_classes(self, reader: Reader, out: np.ndarray) -> np.ndarray:
        """Rows of ``row_length`` codes, each class's rows from a one-table stream of its own
        (a class stream inside is refused by that stream's head: a non-minimal varint)."""
        row_length = reader.varint(limit=max(out.size, 1))
        if row_length == 0 or out.size % row_length:
            raise reader.fail(f"rows of {row_length} codes do not tile {out.size}")
        rows = out.size // row_length
        count = reader.u8() + 1
        if not 2 <= count <= min(MAX_CLASSES, rows):
            raise reader.fail(f"{count} row classes for {rows} rows")
        of_row = self._decode_part(reader, np.empty(rows, dtype=np.uint8))
        members = np.bincount(of_row, minlength=count)
        if members.size > count or not members.all():
            raise reader.fail(f"the row classes are not exactly 0..{count - 1}, each used")
        matrix = out.reshape(rows, row_length)
        for k in range(count):
            chosen = of_row == k
            part = np.empty(int(members[k]) * row_length, dtype=out.dtype)
            matrix[chosen] = self._decode_part(reader, part).reshape(-1, row_length)
        reader.expect_end()
        return out

    def _decode_part(self, reader: Reader, part: np.ndarray) -> np.ndarray:
        length = reader.varint(limit=reader.remaining)
        return self._decode_one_table(Reader(reader.take(length), self.codec_id), part)

    def _decode_one_table(self, reader: Reader, out: np.ndarray) -> np.ndarray:
        present = read_symbol_head(reader, out)
        if present is None:
            return out
        scale = reader.u8()
        if not present.size <= 1 << scale <= 1 << MAX_SCALE:
            raise reader.fail(f"scale {scale} out of range for {present.size} symbols")
        freqs = np.empty(present.size, dtype=np.int64)
        freqs[:-1] = read_varints(reader, present.size - 1, limit=(1 << scale) - 1)
        if np.any(freqs[:-1] == 0):
            raise reader.fail("a present symbol has frequency 0")
        freqs[-1] = (1 << scale) - int(freqs[:-1].sum())
        if freqs[-1] < 1:
            raise reader.fail("the frequencies exceed the total")
        states = reader.take(8 * _LANES).view("<u8").astype(np.uint64)
        if np.any(states < _LOWER) or np.any(states >= 1 << 63):
            raise reader.fail("a coder state is out of range")
        words = reader.rest()
        if words.size % 4:
            raise reader.fail("the payload is not a whole number of 32-bit words")
        freq, start = _symbol_tables(present, freqs)
        table = np.repeat(present.astype(out.dtype), freqs)
        if not _decode(words, table, freq, start, scale, states, out):
            raise reader.fail("the coded words do not decode to exactly the expected symbols")
        return out
