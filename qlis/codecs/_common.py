"""Pieces shared by the codecs' byte streams: varints, a bounds-checked reader, the alphabet.

Every stream parser goes through `Reader`, so that a short or garbled header becomes an
ArchiveError at the first bad byte instead of an IndexError or a huge allocation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qlis.errors import ArchiveError, ConfigError

_MAX_VARINT_BYTES = 10
_SYMBOL_LIST_MAX = 32  # alphabets up to this size are listed; larger ones use a 256-bit map


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


def check_input(array: np.ndarray, codec_id: str, dtype: type | None = np.uint8) -> np.ndarray:
    """The 1-D contiguous array a codec encodes; ConfigError if the codec cannot take it."""
    if not isinstance(array, np.ndarray):
        raise ConfigError(f"codec {codec_id!r} encodes numpy arrays, got {type(array).__name__}")
    if array.ndim != 1:
        raise ConfigError(f"codec {codec_id!r} encodes 1-D arrays; flatten the tensor first")
    if dtype is not None and array.dtype != dtype:
        raise ConfigError(
            f"codec {codec_id!r} encodes {np.dtype(dtype).name} arrays, got {array.dtype}; "
            "use the 'raw' or 'sparse' codec for other dtypes"
        )
    return np.ascontiguousarray(array)


def check_out(out: np.ndarray, codec_id: str, dtype: type | None = np.uint8) -> np.ndarray:
    """Validate the caller's preallocated output; a mismatch means the record is inconsistent."""
    if not isinstance(out, np.ndarray) or out.ndim != 1:
        raise ArchiveError(f"codec {codec_id!r} decodes into a preallocated 1-D numpy array")
    if dtype is not None and out.dtype != dtype:
        raise ArchiveError(
            f"codec {codec_id!r} decodes {np.dtype(dtype).name} data, the record says {out.dtype}"
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


@njit(cache=True, nogil=True)
def _histogram(symbols: np.ndarray) -> np.ndarray:
    # Four partial histograms break the store-to-load dependency of runs of equal symbols.
    h = np.zeros((4, 256), dtype=np.int64)
    n = symbols.size
    n4 = n - (n & 3)
    for i in range(0, n4, 4):
        h[0, symbols[i]] += 1
        h[1, symbols[i + 1]] += 1
        h[2, symbols[i + 2]] += 1
        h[3, symbols[i + 3]] += 1
    for i in range(n4, n):
        h[0, symbols[i]] += 1
    return h[0] + h[1] + h[2] + h[3]


def byte_histogram(symbols: np.ndarray) -> np.ndarray:
    """Counts of the 256 byte values (int64), fast and without numpy's intp conversion."""
    return _histogram(symbols)


def start_symbol_stream(symbols: np.ndarray) -> tuple[bytearray, np.ndarray, np.ndarray]:
    """The head shared by the entropy coders: element count, then the present symbols.

    Returns (stream, counts, present); the stream is already complete when at most one
    symbol is present, since the head alone then says everything.
    """
    stream = bytearray()
    write_varint(stream, symbols.size)
    counts = byte_histogram(symbols) if symbols.size else np.zeros(256, dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size:
        write_alphabet(stream, present)
    return stream, counts, present


def read_symbol_head(reader: Reader, out: np.ndarray) -> np.ndarray | None:
    """Read what `start_symbol_stream` wrote: the present symbols, or None when the head alone
    has filled ``out`` (no symbol, or a single repeated one)."""
    if read_count(reader, out) == 0:
        reader.expect_end()
        return None
    present = read_alphabet(reader)
    if present.size == 1:
        reader.expect_end()
        out[:] = present[0]
        return None
    return present
