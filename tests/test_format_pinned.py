"""The format is pinned: committed archives decode bit for bit and re-encode byte for byte.

The reference files come from tests/format_reference.py (numcodecs'
check_backwards_compatibility is the model). A failure here means the bytes of the format
changed: that needs a format version bump and regenerated files (docs/format.md).
"""

from __future__ import annotations

import pytest
from format_reference import FOLDER, archives, available_quantizers
from safetensors.torch import load_file

import qlis
from qlis.archive.file import write_tensors
from qlis.models.tensors import same_bits

FILES = sorted(p.name for p in FOLDER.glob("*.qlis"))


def test_every_codec_quantizer_and_dtype_is_pinned():
    inputs = load_file(FOLDER / "inputs.safetensors")
    assert set(FILES) == set(archives(inputs))
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


@pytest.mark.parametrize("name", FILES)
def test_committed_archives_decode_to_the_committed_tensors(name):
    expected = load_file(FOLDER / name.replace(".qlis", ".expected.safetensors"))
    state = qlis.load(FOLDER / name)
    assert sorted(state) == sorted(expected)  # safetensors keeps no order
    for key, tensor in state.items():
        assert tensor.dtype == expected[key].dtype and tensor.shape == expected[key].shape, key
        assert same_bits(tensor, expected[key]), key


@pytest.mark.parametrize("name", FILES)
def test_re_encoding_the_inputs_gives_the_same_bytes(tmp_path, monkeypatch, name):
    committed = (FOLDER / name).read_bytes()
    with qlis.open(FOLDER / name) as archive:
        monkeypatch.setattr(qlis.version, "__version__", archive.writer["version"])
    tensors, options = archives(load_file(FOLDER / "inputs.safetensors"))[name]
    path = write_tensors(tmp_path / name, tensors, **options)
    assert path.read_bytes() == committed
