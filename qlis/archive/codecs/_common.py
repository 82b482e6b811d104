"""Pieces shared by the codecs' byte streams: varints, a bounds-checked reader, the alphabet.

Every stream parser goes through `Reader`, so that a short or garbled header becomes an
ArchiveError at the first bad byte instead of an IndexError or a huge allocation.
"""

from __future__ import annotations

import numpy as np

from qlis.compiled import njit
from qlis.errors import ArchiveError, ConfigError

_MAX_VARINT_BYTES = 10
_SYMBOL_LIST_MAX = 32  # alphabets up to this size are listed; larger ones use a 256-bit map
SYMBOL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))  # what the symbol codecs take
WIDE_TAG = b"\x80\x00"  # starts a 16-bit symbol stream: a non-minimal varint, so no 8-bit one


def as_bytes_array(buf: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A read-only uint8 view of an encoded buffer, without copying it.

    Always read-only, so that the compiled kernels see one array type whatever the caller
    passed (numba compiles a writable and a read-only array argument separately).
    """
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise ArchiveError("an encoded buffer must be bytes or a 1-D uint8 array")
        view = buf.view()
    else:
        try:
            view = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as err:
            raise ArchiveError(f"an encoded buffer must be bytes-like: {err}") from None
    view.flags.writeable = False
    return view


def _names(dtypes: tuple[np.dtype, ...]) -> str:
    return " or ".join(dtype.name for dtype in dtypes)


def check_input(
    array: np.ndarray, codec_id: str, dtypes: tuple[np.dtype, ...] | None = SYMBOL_DTYPES
) -> np.ndarray:
    """The 1-D contiguous array a codec encodes; ConfigError if the codec cannot take it."""
    if not isinstance(array, np.ndarray):
        raise ConfigError(f"codec {codec_id!r} encodes numpy arrays, got {type(array).__name__}")
    if array.ndim != 1:
        raise ConfigError(f"codec {codec_id!r} encodes 1-D arrays; flatten the tensor first")
    if dtypes is not None and array.dtype not in dtypes:
        raise ConfigError(
            f"codec {codec_id!r} encodes {_names(dtypes)} arrays, got {array.dtype}; "
            "use the 'raw' or 'sparse' codec for other dtypes"
        )
    return np.ascontiguousarray(array)


def check_out(
    out: np.ndarray, codec_id: str, dtypes: tuple[np.dtype, ...] | None = SYMBOL_DTYPES
) -> np.ndarray:
    """Validate the caller's preallocated output; a mismatch means the record is inconsistent."""
    if not isinstance(out, np.ndarray) or out.ndim != 1:
        raise ArchiveError(f"codec {codec_id!r} decodes into a preallocated 1-D numpy array")
    if dtypes is not None and out.dtype not in dtypes:
        raise ArchiveError(
            f"codec {codec_id!r} decodes {_names(dtypes)} data, the record says {out.dtype}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ArchiveError(f"codec {codec_id!r} needs a contiguous, writeable output array")
    return out


def write_varint(dst: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) as an unsigned LEB128 varint: 7 bits a byte, low bits first."""
    if value < 0:
        raise ValueError("varints are unsigned")
    while value >= 0x80:
        dst.append((value & 0x7F) | 0x80)
        value >>= 7
    dst.append(value)


class Reader:
    """Sequential reader of a stream header; every read is checked against the buffer end."""

    def __init__(self, data: np.ndarray, codec_id: str) -> None:
        self.data = data
        self.pos = 0
        self.codec_id = codec_id

    def fail(self, what: str) -> ArchiveError:
        return ArchiveError(f"corrupt {self.codec_id!r} stream: {what}")

    @property
    def remaining(self) -> int:
        return self.data.size - self.pos

    def u8(self) -> int:
        if self.pos >= self.data.size:
            raise self.fail("truncated header")
        value = int(self.data[self.pos])
        self.pos += 1
        return value

    def varint(self, limit: int = 1 << 62) -> int:
        """A varint no larger than ``limit`` (and in its shortest form)."""
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            byte = self.u8()
            value |= (byte & 0x7F) << (7 * i)
            if value > limit:
                raise self.fail(f"a header field exceeds its limit {limit}")
            if byte < 0x80:
                if byte == 0 and i > 0:
                    raise self.fail("a varint is not in its shortest form")
                return value
        raise self.fail("a varint is too long")

    def take(self, n: int) -> np.ndarray:
        if n < 0 or n > self.remaining:
            raise self.fail("truncated")
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def rest(self) -> np.ndarray:
        return self.take(self.remaining)

    def expect_end(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} bytes of trailing garbage")


def read_count(reader: Reader, out: np.ndarray) -> int:
    """The element count at the head of a stream; it must match the caller's output length."""
    n = reader.varint()
    if n != out.size:
        raise reader.fail(f"it holds {n} elements, the record expects {out.size}")
    return n


def symbol_width(dtype: np.dtype) -> int:
    """8 or 16: the bits of one symbol of a uint8 or uint16 stream."""
    return 8 * np.dtype(dtype).itemsize


@njit(cache=True, nogil=True)
def _write_varints(values: np.ndarray, out: np.ndarray) -> int:
    pos = 0
    for value in values:
        v = np.uint64(value)
        while v >= 0x80:
            out[pos] = np.uint8((v & np.uint64(0x7F)) | np.uint64(0x80))
            v >>= np.uint64(7)
            pos += 1
        out[pos] = np.uint8(v)
        pos += 1
    return pos


@njit(cache=True, nogil=True)
def parse_varints(data: np.ndarray, limit: int, out: np.ndarray) -> int:
    # Parse len(out) minimal varints, each <= limit (< 2**62); the bytes used, or -1.
    pos = 0
    for j in range(out.size):
        value = 0
        shift = 0
        while True:
            if pos >= data.size or shift > 56:
                return -1
            byte = np.int64(data[pos])
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if value > limit:
                return -1
            if byte < 0x80:
                if byte == 0 and shift > 7:
                    return -1
                break
        out[j] = value
    return pos


def write_varints(dst: bytearray, values: np.ndarray) -> None:
    """Append each of ``values`` (>= 0) as a varint (`write_varint`, compiled for long lists)."""
    buffer = np.empty(10 * len(values), dtype=np.uint8)
    dst += buffer[: _write_varints(np.asarray(values, dtype=np.int64), buffer)].tobytes()


def read_varints(reader: Reader, count: int, limit: int) -> np.ndarray:
    """``count`` varints, each <= ``limit``, as int64; each takes a byte, so ``count`` is
    checked against the stream before anything is allocated."""
    if count > reader.remaining:
        raise reader.fail("truncated")
    values = np.empty(count, dtype=np.int64)
    used = parse_varints(reader.data[reader.pos :], limit, values)
    if used < 0:
        raise reader.fail(f"a bad varint (truncated, not minimal or over {limit})")
    reader.take(used)
    return values


def write_alphabet(dst: bytearray, symbols: np.ndarray) -> None:
    """Append the sorted set of present byte symbols: count-1, then a list or a 256-bit map."""
    k = int(symbols.size)
    dst.append(k - 1)
    if k <= _SYMBOL_LIST_MAX:
        dst += symbols.astype(np.uint8).tobytes()
    else:
        present = np.zeros(256, dtype=bool)
        present[symbols] = True
        dst += np.packbits(present, bitorder="little").tobytes()


def read_alphabet(reader: Reader) -> np.ndarray:
    """The sorted present symbols written by `write_alphabet` (validated: strictly increasing)."""
    k = reader.u8() + 1
    if k <= _SYMBOL_LIST_MAX:
        symbols = reader.take(k).astype(np.int64)
        if k > 1 and np.any(np.diff(symbols) <= 0):
            raise reader.fail("the symbol list is not strictly increasing")
    else:
        bitmap = np.unpackbits(reader.take(32), bitorder="little")
        symbols = np.flatnonzero(bitmap)
        if symbols.size != k:
            raise reader.fail("the symbol map does not match the symbol count")
    return symbols


def write_runs(dst: bytearray, symbols: np.ndarray) -> None:
    """Append the sorted set of present 16-bit symbols as runs of consecutive values:
    ``varint r-1``, then per run ``varint skip`` (absent values before it, minus one after the
    first run) and ``varint length-1``. A range like 40..300 takes a handful of bytes."""
    breaks = np.flatnonzero(np.diff(symbols) > 1)
    starts = symbols[np.concatenate([[0], breaks + 1])].astype(np.int64)
    ends = symbols[np.concatenate([breaks, [symbols.size - 1]])].astype(np.int64) + 1
    skips = starts - np.concatenate([[0], ends[:-1] + 1])
    write_varint(dst, starts.size - 1)
    write_varints(dst, np.stack([skips, ends - starts - 1], axis=1).ravel())


def read_runs(reader: Reader) -> np.ndarray:
    """The sorted present symbols written by `write_runs`; every symbol must be < 2**16."""
    runs = reader.varint(limit=(1 << 15) - 1) + 1
    fields = read_varints(reader, 2 * runs, limit=(1 << 16) - 1)
    skips, lengths = fields[0::2], fields[1::2] + 1
    ends = np.cumsum(skips + lengths) + np.arange(runs)
    if ends[-1] > 1 << 16:
        raise reader.fail("a symbol run goes past 65535")
    starts = ends - lengths
    before = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - before, lengths)


@njit(cache=True, nogil=True)
def write_codes_lsb(
    symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray, out: np.ndarray
) -> int:
    """Write ``codes[s]`` (``lengths[s]`` bits) for each symbol, least significant bit first,
    into ``out``; returns the bytes written (the last one zero-padded)."""
    acc = np.uint64(0)
    filled = 0
    pos = 0
    for i in range(symbols.size):
        s = symbols[i]
        acc |= codes[s] << np.uint64(filled)
        filled += lengths[s]
        if filled >= 32:
            out[pos] = np.uint8(acc & np.uint64(0xFF))
            out[pos + 1] = np.uint8((acc >> np.uint64(8)) & np.uint64(0xFF))
            out[pos + 2] = np.uint8((acc >> np.uint64(16)) & np.uint64(0xFF))
            out[pos + 3] = np.uint8((acc >> np.uint64(24)) & np.uint64(0xFF))
            pos += 4
            acc >>= np.uint64(32)
            filled -= 32
    while filled > 0:
        out[pos] = np.uint8(acc & np.uint64(0xFF))
        acc >>= np.uint64(8)
        pos += 1
        filled -= 8
    return pos


@njit(cache=True, nogil=True)
def _histogram(symbols: np.ndarray, bins: int) -> np.ndarray:
    # Four partial histograms break the store-to-load dependency of runs of equal symbols;
    # fewer symbols than bins are counted in one (four tables of 65536 to zero and add cost
    # more than counting a norm's 1,024 float16 patterns).
    n = symbols.size
    if n < bins:
        counts = np.zeros(bins, dtype=np.int64)
        for i in range(n):
            counts[symbols[i]] += 1
        return counts
    h = np.zeros((4, bins), dtype=np.int64)
    n4 = n - (n & 3)
    for i in range(0, n4, 4):
        h[0, symbols[i]] += 1
        h[1, symbols[i + 1]] += 1
        h[2, symbols[i + 2]] += 1
        h[3, symbols[i + 3]] += 1
    for i in range(n4, n):
        h[0, symbols[i]] += 1
    return h[0] + h[1] + h[2] + h[3]


def symbol_histogram(symbols: np.ndarray) -> np.ndarray:
    """Counts (int64) of every value of a uint8 or uint16 array: 256 or 65536 of them."""
    bins = 1 << symbol_width(symbols.dtype)
    if symbols.size == 0:
        return np.zeros(bins, dtype=np.int64)
    return _histogram(symbols, bins)


def start_symbol_stream(symbols: np.ndarray) -> tuple[bytearray, np.ndarray, np.ndarray]:
    """The head shared by the entropy coders: width tag (16-bit only), element count, then the
    present symbols.

    Returns (stream, counts, present); the stream is already complete when at most one
    symbol is present, since the head alone then says everything.
    """
    counts = symbol_histogram(symbols)
    present = np.flatnonzero(counts)
    return symbol_head(symbols.size, present, symbols.dtype == np.uint16), counts, present


def symbol_head(size: int, present: np.ndarray, wide: bool) -> bytearray:
    """`start_symbol_stream`'s head for ``size`` symbols (16-bit where ``wide``) of which
    ``present`` (sorted) occur: what the coders' size bounds count without encoding."""
    stream = bytearray(WIDE_TAG if wide else b"")
    write_varint(stream, size)
    if present.size:
        (write_runs if wide else write_alphabet)(stream, present)
    return stream


def read_width(reader: Reader, out: np.ndarray) -> None:
    """Consume the width tag, if any; ArchiveError unless the stream's width is ``out``'s."""
    data, pos = reader.data, reader.pos
    wide = reader.remaining >= 2 and data[pos] == WIDE_TAG[0] and data[pos + 1] == WIDE_TAG[1]
    if wide:
        reader.take(2)
    if wide != (out.dtype == np.uint16):
        raise reader.fail(f"it holds {16 if wide else 8}-bit symbols, the record says {out.dtype}")


def read_symbol_head(reader: Reader, out: np.ndarray) -> np.ndarray | None:
    """Read what `start_symbol_stream` wrote: the present symbols, or None when the head alone
    has filled ``out`` (no symbol, or a single repeated one)."""
    read_width(reader, out)
    if read_count(reader, out) == 0:
        reader.expect_end()
        return None
    present = read_runs(reader) if out.dtype == np.uint16 else read_alphabet(reader)
    if present.size == 1:
        reader.expect_end()
        out[:] = present[0]
        return None
    return present
