"""Fixed-width bit packing of unsigned codes: the baseline every quantized layer gets."""

from __future__ import annotations

import numpy as np

from qlis.archive.codecs._common import (
    Reader,
    as_bytes_array,
    check_input,
    check_out,
    read_count,
    symbol_width,
    write_codes_lsb,
    write_varint,
)
from qlis.archive.codecs.base import Codec, register_codec
from qlis.compiled import njit
from qlis.config import Param
from qlis.errors import ConfigError

_WIDE = 0x80  # flag in the head byte: the elements are uint16


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
def _unpack_wide(data: np.ndarray, bits: int, out: np.ndarray) -> bool:
    # The inverse of write_codes_lsb with `bits`-bit codes; False if the padding bits of
    # the last byte are not zero.
    mask = np.uint64((1 << bits) - 1)
    acc = np.uint64(0)
    filled = 0
    pos = 0
    for i in range(out.size):
        while filled < bits:
            acc |= np.uint64(data[pos]) << np.uint64(filled)
            pos += 1
            filled += 8
        out[i] = acc & mask
        acc >>= np.uint64(bits)
        filled -= bits
    return acc == 0


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
            out[8 * g + k] = (word >> np.uint64(k * bits)) & mask
        if count < 8 and (word >> np.uint64(count * bits)) != 0:
            return False
    return True


@register_codec
class BitPack(Codec):
    """Packs uint8 or uint16 codes below ``2**bits`` into exactly ``bits`` bits each (1-16; more
    than 8 only for uint16), low bits first.

    Stream: ``u8 head`` (``bits``, plus 0x80 for uint16 elements), ``varint n``, then
    ``ceil(n * bits / 8)`` bytes; zero padding bits.

    >>> len(BitPack(bits=2).encode(np.array([0, 1, 2, 3] * 4, dtype=np.uint8)))
    6
    """

    codec_id = "bitpack"
    params = {"bits": Param("int", 1, 16)}

    def __init__(self, bits: int = 8) -> None:
        self.bits = bits

    def encode(self, array: np.ndarray) -> bytes:
        array = check_input(array, self.codec_id)
        width = symbol_width(array.dtype)
        if self.bits > width:
            raise ConfigError(
                f"bitpack(bits={self.bits}) is wider than the {array.dtype} codes it was given; "
                f"use bits <= {width}"
            )
        if array.size and int(array.max()) >> self.bits:
            raise ConfigError(
                f"bitpack(bits={self.bits}) got the code {int(array.max())} >= 2**{self.bits}; "
                "use more bits or the codes of a narrower quantizer"
            )
        header = bytearray([self.bits | (_WIDE if width == 16 else 0)])
        write_varint(header, array.size)
        payload = np.empty((array.size * self.bits + 7) // 8, dtype=np.uint8)
        if self.bits == width:
            payload[:] = array.astype("<u2" if width == 16 else np.uint8).view(np.uint8)
        elif self.bits <= 8:
            _pack(array, self.bits, payload)
        else:
            identity = np.arange(1 << self.bits, dtype=np.uint64)  # 9-15 bits: each code as is
            write_codes_lsb(array, identity, np.full(identity.size, self.bits), payload)
        return bytes(header) + payload.tobytes()

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        out = check_out(out, self.codec_id)
        reader = Reader(as_bytes_array(buf), self.codec_id)
        head = reader.u8()
        width = 16 if head & _WIDE else 8
        if head & ~_WIDE != self.bits:
            raise reader.fail(f"its width is not the configured {self.bits} bits")
        if width != symbol_width(out.dtype):
            raise reader.fail(f"it holds {width}-bit elements, the record says {out.dtype}")
        if self.bits > width:  # would be cut to the element's low bits
            raise reader.fail(f"{self.bits}-bit codes do not fit {width}-bit elements")
        n = read_count(reader, out)
        payload = reader.take((n * self.bits + 7) // 8)
        reader.expect_end()
        if self.bits == width:
            out[:] = payload.view("<u2" if width == 16 else np.uint8)
        elif self.bits <= 8:
            if not _unpack(payload, self.bits, out):
                raise reader.fail("non-zero padding bits")
        elif not _unpack_wide(payload, self.bits, out):
            raise reader.fail("non-zero padding bits")
        return out
