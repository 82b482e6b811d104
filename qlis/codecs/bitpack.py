"""Fixed-width bit packing of small unsigned codes: the baseline every quantized layer gets."""

from __future__ import annotations

import numpy as np
from numba import njit

from qlis.codecs._common import (
    Reader,
    as_bytes_array,
    check_input,
    check_out,
    read_count,
    write_varint,
)
from qlis.codecs.base import Codec, register_codec
from qlis.errors import ConfigError


@njit(cache=True, nogil=True)
def _pack(values: np.ndarray, bits: int, out: np.ndarray) -> None:
    # Eight codes fill exactly `bits` bytes: build them in one 64-bit word, low bits first.
    n = values.size
    groups = n // 8
    for g in range(groups + 1):
        count = 8 if g < groups else n - 8 * groups
        if count == 0:
            break
        word = np.uint64(0)
        for k in range(count):
            word |= np.uint64(values[8 * g + k]) << np.uint64(k * bits)
        nbytes = bits if g < groups else (count * bits + 7) // 8
        for b in range(nbytes):
            out[g * bits + b] = np.uint8((word >> np.uint64(8 * b)) & np.uint64(0xFF))


@njit(cache=True, nogil=True)
def _unpack(data: np.ndarray, bits: int, out: np.ndarray) -> bool:
    # The inverse of _pack; False if the padding bits of the last byte are not zero.
    n = out.size
    groups = n // 8
    mask = np.uint64((1 << bits) - 1)
    for g in range(groups + 1):
        count = 8 if g < groups else n - 8 * groups
        if count == 0:
            break
        nbytes = bits if g < groups else (count * bits + 7) // 8
        word = np.uint64(0)
        for b in range(nbytes):
            word |= np.uint64(data[g * bits + b]) << np.uint64(8 * b)
        for k in range(count):
            out[8 * g + k] = np.uint8((word >> np.uint64(k * bits)) & mask)
        if count < 8 and (word >> np.uint64(count * bits)) != 0:
            return False
    return True


@register_codec
class BitPack(Codec):
    """Packs uint8 codes below ``2**bits`` into exactly ``bits`` bits each, low bits first.

    Stream: ``u8 bits``, ``varint n``, then ``ceil(n * bits / 8)`` bytes; zero padding bits.

    >>> len(BitPack(bits=2).encode(np.array([0, 1, 2, 3] * 4, dtype=np.uint8)))
    6
    """

    codec_id = "bitpack"

    def __init__(self, bits: int = 8) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"bitpack needs bits in 1..8, got {bits!r}")
        self.bits = bits

    def encode(self, array: np.ndarray) -> bytes:
        array = check_input(array, self.codec_id)
        if array.size and int(array.max()) >> self.bits:
            raise ConfigError(
                f"bitpack(bits={self.bits}) got the code {int(array.max())} >= 2**{self.bits}; "
                "use more bits or the codes of a narrower quantizer"
            )
        header = bytearray([self.bits])
        write_varint(header, array.size)
        payload = np.empty((array.size * self.bits + 7) // 8, dtype=np.uint8)
        if self.bits == 8:
            payload[:] = array
        else:
            _pack(array, self.bits, payload)
        return bytes(header) + payload.tobytes()

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        out = check_out(out, self.codec_id)
        reader = Reader(as_bytes_array(buf), self.codec_id)
        if reader.u8() != self.bits:
            raise reader.fail(f"its width is not the configured {self.bits} bits")
        n = read_count(reader, out)
        payload = reader.take((n * self.bits + 7) // 8)
        reader.expect_end()
        if self.bits == 8:
            out[:] = payload
        elif not _unpack(payload, self.bits, out):
            raise reader.fail("non-zero padding bits")
        return out
