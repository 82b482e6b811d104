"""Pruned layers that stay in floating point: the positions of the non-zeros plus their values.

Works on bit patterns (float16/bfloat16 as uint16, float32 as uint32, ...), so that the round
trip is exact: -0.0 has a non-zero pattern and is kept, NaN payloads survive.
"""

from __future__ import annotations

import numpy as np

from qlis.archive.codecs._common import (
    Reader,
    as_bytes_array,
    check_input,
    check_out,
    parse_varints,
    read_count,
    write_varint,
)
from qlis.archive.codecs.base import Codec, register_codec
from qlis.compiled import njit
from qlis.errors import ArchiveError, ConfigError

_BITMASK, _DELTAS = 0, 1
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bit_patterns(dtype: np.dtype) -> type | None:
    """The unsigned dtype of the same width, or None where bit patterns make no sense."""
    if dtype.hasobject or dtype.kind not in "biufc" or dtype.itemsize not in _UNSIGNED:
        return None
    return _UNSIGNED[dtype.itemsize]


@njit(cache=True, nogil=True)
def _gap_varint_bytes(indices: np.ndarray) -> int:
    # Size of the delta-coded index list: the first index, then each gap minus one.
    total = 0
    previous = -1
    for index in indices:
        gap = index - previous - 1
        total += 1
        while gap >= 128:
            gap >>= 7
            total += 1
        previous = index
    return total


@njit(cache=True, nogil=True)
def _write_gaps(indices: np.ndarray, out: np.ndarray) -> None:
    pos = 0
    previous = -1
    for index in indices:
        gap = index - previous - 1
        while gap >= 128:
            out[pos] = (gap & 0x7F) | 0x80
            gap >>= 7
            pos += 1
        out[pos] = gap
        pos += 1
        previous = index


@njit(cache=True, nogil=True)
def _read_gaps(data: np.ndarray, n: int, indices: np.ndarray) -> int:
    # Parse len(indices) gap varints into indices; returns the bytes used, or -1 on a bad
    # stream (a varint running off the data, too long or not minimal, or an index >= n).
    pos = parse_varints(data, max(n - 1, 0), indices)
    if pos < 0:
        return -1
    previous = -1
    for j in range(indices.size):
        gap = indices[j]
        if gap >= n - previous - 1:
            return -1
        previous += gap + 1
        indices[j] = previous
    return pos


@njit(cache=True, nogil=True)
def _scatter_bitmask(mask: np.ndarray, values: np.ndarray, out: np.ndarray) -> bool:
    # out[i] = next value where bit i of the mask is set; False if the mask disagrees with
    # the number of values or sets padding bits.
    j = 0
    for i in range(out.size):
        if (mask[i >> 3] >> (i & 7)) & 1:
            if j >= values.size:
                return False
            out[i] = values[j]
            j += 1
        else:
            out[i] = 0
    if out.size & 7 and mask[out.size >> 3] >> (out.size & 7):
        return False
    return j == values.size


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


SPARSE_SHARE = 0.9
"""A plain tensor is tried as ``sparse`` only below this share of non-zero patterns."""


def sparse_bytes(patterns: np.ndarray) -> int | None:
    """The length of `Sparse.encode`'s stream for the unsigned bit ``patterns`` (1-D), when a
    writer of plain tensors takes it over the raw bytes (fewer than `SPARSE_SHARE` of them
    non-zero, and smaller), else None; without making the stream."""
    nonzero = int(np.count_nonzero(patterns))
    if not patterns.size or nonzero >= SPARSE_SHARE * patterns.size:
        return None
    positions = min(int(_gap_varint_bytes(np.flatnonzero(patterns))), (patterns.size + 7) // 8)
    size = (2 + _varint_bytes(patterns.size) + _varint_bytes(nonzero) + positions
            + nonzero * patterns.dtype.itemsize)
    return size if size < patterns.nbytes else None


@register_codec
class Sparse(Codec):
    """Non-zero positions (a bitmask or delta-coded indices, whichever is smaller) and the
    non-zero values raw; for pruned layers that are not quantized.

    Any 1/2/4/8-byte dtype is taken as its bit patterns. Stream: ``u8 itemsize``, ``varint
    n``, ``varint nnz``, ``u8 mode``; mode 0: ``ceil(n / 8)`` mask bytes (bit i of byte i/8,
    low bit first); mode 1: nnz varints (first index, then each gap minus one); then the nnz
    values, little-endian.

    >>> x = np.array([0.0, -0.0, 1.5, 0.0], dtype=np.float32)
    >>> Sparse().decode(Sparse().encode(x), np.empty(4, np.float32))
    array([ 0. , -0. ,  1.5,  0. ], dtype=float32)
    """

    codec_id = "sparse"

    def encode(self, array: np.ndarray) -> bytes:
        array = check_input(array, self.codec_id, dtypes=None)
        unsigned = _bit_patterns(array.dtype)
        if unsigned is None:
            raise ConfigError(f"codec 'sparse' takes 1, 2, 4 or 8-byte elements, got {array.dtype}")
        patterns = array.view(unsigned)
        indices = np.flatnonzero(patterns)
        stream = bytearray([array.dtype.itemsize])
        write_varint(stream, patterns.size)
        write_varint(stream, indices.size)
        gap_bytes = _gap_varint_bytes(indices)
        if gap_bytes < (patterns.size + 7) // 8:
            stream.append(_DELTAS)
            positions = np.empty(gap_bytes, dtype=np.uint8)
            _write_gaps(indices, positions)
        else:
            stream.append(_BITMASK)
            positions = np.packbits(patterns != 0, bitorder="little")
        values = patterns[indices].astype(np.dtype(unsigned).newbyteorder("<"), copy=False)
        return bytes(stream) + positions.tobytes() + values.tobytes()

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        out = check_out(out, self.codec_id, dtypes=None)
        unsigned = _bit_patterns(out.dtype)
        if unsigned is None:
            raise ArchiveError(f"codec 'sparse' cannot decode into {out.dtype}")
        reader = Reader(as_bytes_array(buf), self.codec_id)
        itemsize = reader.u8()
        if itemsize != out.dtype.itemsize:
            raise reader.fail(f"{itemsize}-byte values, the record expects {out.dtype}")
        n = read_count(reader, out)
        nnz = reader.varint(limit=n)
        mode = reader.u8()
        patterns = out.view(unsigned)
        if mode == _DELTAS:
            # Each index takes at least one byte: nnz is bounded by the buffer, as is `indices`.
            if nnz * (itemsize + 1) > reader.remaining:
                raise reader.fail("truncated index list")
            indices = np.empty(nnz, dtype=np.int64)
            used = _read_gaps(reader.data[reader.pos :], n, indices)
            if used < 0:
                raise reader.fail("bad delta-coded index list")
            reader.take(used)
            values = self._values(reader, nnz, itemsize)
            patterns[:] = 0
            patterns[indices] = values
        elif mode == _BITMASK:
            mask = reader.take((n + 7) // 8)
            values = self._values(reader, nnz, itemsize)
            if not _scatter_bitmask(mask, values.astype(unsigned, copy=False), patterns):
                raise reader.fail("the bitmask does not match the non-zero count")
        else:
            raise reader.fail(f"unknown position mode {mode}")
        return out

    @staticmethod
    def _values(reader: Reader, nnz: int, itemsize: int) -> np.ndarray:
        values = reader.take(nnz * itemsize).view(np.dtype(_UNSIGNED[itemsize]).newbyteorder("<"))
        reader.expect_end()
        if np.any(values == 0):
            raise reader.fail("a stored non-zero value is zero")
        return values
