"""The format is pinned: committed archives decode bit for bit and re-encode to the same file.

The reference files come from tests/format_reference.py (numcodecs'
check_backwards_compatibility is the model). A failure here means the bytes of the format
changed: that needs a format version bump and regenerated files (docs/format.md). The files
earlier versions wrote (tests/data/format-v2-v4: versions 2-4, their headers plain JSON) are
kept, and must decode to the same tensors.
"""

from __future__ import annotations

import pytest
from archive_layout import split
from format_reference import FOLDER, archives, available_quantizers
from safetensors.torch import load_file

import qlis
from qlis.archive.file import write_tensors
from qlis.archive.format import PREFIX
from qlis.models.tensors import same_bits

FILES = sorted(p.name for p in FOLDER.glob("*.qlis"))
EARLIER = FOLDER.parent / "format-v2-v4"


def test_every_codec_quantizer_and_dtype_is_pinned():
    inputs = load_file(FOLDER / "inputs.safetensors")
    assert set(FILES) == set(archives(inputs))
    assert {p.name for p in EARLIER.glob("*.qlis")} == set(FILES)
    codecs, quantizers, dtypes = set(), set(), set()
    for name in FILES:
        with qlis.open(FOLDER / name) as archive:
            for row in archive.tensor_info():
                codecs.add(row["codec"])
                quantizers.add(row["quantizer"])
                dtypes.add(row["dtype"])
    assert {"raw", "bitpack", "huffman", "ans", "sparse"} <= codecs
    assert {c["id"] for c in available_quantizers().values()} <= quantizers
    assert {"float32", "float16", "bfloat16", "int64", "bool"} <= dtypes


@pytest.mark.parametrize("folder", [FOLDER, EARLIER], ids=["current", "earlier"])
@pytest.mark.parametrize("name", FILES)
def test_committed_archives_decode_to_the_committed_tensors(folder, name):
    expected = load_file(FOLDER / name.replace(".qlis", ".expected.safetensors"))
    state = qlis.load(folder / name)
    assert sorted(state) == sorted(expected)  # safetensors keeps no order
    for key, tensor in state.items():
        assert tensor.dtype == expected[key].dtype and tensor.shape == expected[key].shape, key
        assert same_bits(tensor, expected[key]), key


@pytest.mark.parametrize("name", FILES)
def test_re_encoding_the_inputs_gives_the_same_file(tmp_path, monkeypatch, name):
    """The same version, header and records; the deflated header's bytes may differ with the
    zlib build (zlib-ng deflates otherwise), what it inflates to may not."""
    committed = (FOLDER / name).read_bytes()
    with qlis.open(FOLDER / name) as archive:
        monkeypatch.setattr(qlis.version, "__version__", archive.writer["version"])
    tensors, options = archives(load_file(FOLDER / "inputs.safetensors"))[name]
    written = write_tensors(tmp_path / name, tensors, **options).read_bytes()
    version, data_len = PREFIX.unpack_from(written)[1::3]
    assert (version, data_len) == PREFIX.unpack_from(committed)[1::3]
    assert split(written) == split(committed)
