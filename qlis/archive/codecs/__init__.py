"""Codecs that turn 1-D arrays into bytes and back (numcodecs-style, found by id).

The archive stores each record's ``codec.get_config()`` and decodes with
``get_codec(config).decode(data, out)``; docs/codecs.md specifies every byte stream.
"""

from qlis.archive.codecs._bounds import (
    entropy_bits,
    huffman_code_lengths,
    optimal_huffman_bits,
)
from qlis.archive.codecs._common import symbol_histogram
from qlis.archive.codecs.ans import ANS
from qlis.archive.codecs.auto import Auto
from qlis.archive.codecs.base import Codec, codec_registry, get_codec, register_codec
from qlis.archive.codecs.bitpack import BitPack
from qlis.archive.codecs.huffman import Huffman
from qlis.archive.codecs.raw import Raw
from qlis.archive.codecs.sparse import Sparse

__all__ = [
    "symbol_histogram",
    "ANS",
    "Auto",
    "BitPack",
    "Codec",
    "Huffman",
    "Raw",
    "Sparse",
    "codec_registry",
    "entropy_bits",
    "get_codec",
    "huffman_code_lengths",
    "optimal_huffman_bits",
    "register_codec",
]
