"""The ans codec's row classes: a matrix whose rows spread differently is coded a class of
alike rows at a time, each with its own table; what it writes decodes exactly, costs no more
than one table, and a forged class stream is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from format_reference import FOLDER
from hypothesis import given, settings
from hypothesis import strategies as st
from test_archive_hostile import build, split

import qlis
from qlis.archive.codecs import ANS, Auto, entropy_bits, symbol_histogram
from qlis.archive.codecs._common import write_varint
from qlis.archive.codecs.ans import CLASS_TAG
from qlis.archive.codecs.row_classes import (
    MAX_CLASSES,
    MIN_SYMBOLS,
    _streams_bytes,
    quantile_edges,
    row_classes,
    stream_bytes,
)
from qlis.errors import ArchiveError
from qlis.plan.execute import execute_layer
from qlis.plan.plans import LayerConfig
from qlis.plan.sizes import QUANTIZED_RECORD_BYTES, param_bytes


def mixed_rows(rows: int, row_length: int, spreads: list[float], dtype: type = np.uint8,
               seed: int = 0) -> np.ndarray:
    """Codes around a centre whose spread depends on the row (a step per row, or rows of
    different scales under one step), flattened."""
    rng = np.random.default_rng(seed)
    spread = rng.choice(spreads, size=rows)
    centre = 128 if dtype == np.uint8 else 3000
    top = np.iinfo(dtype).max
    codes = np.round(rng.standard_normal((rows, row_length)) * spread[:, None]) + centre
    return np.clip(codes, 0, top).astype(dtype).reshape(-1)


def class_bound_bytes(symbols: np.ndarray, row_length: int) -> float:
    """The entropy of each class's codes under its own histogram, summed (bytes)."""
    classes = row_classes(symbols, row_length)
    assert classes is not None
    matrix = symbols.reshape(-1, row_length)
    return sum(entropy_bits(symbol_histogram(matrix[classes.of_row == k].reshape(-1)))
               for k in range(classes.count)) / 8


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rows_that_spread_differently_are_coded_in_classes(dtype: type) -> None:
    codes = mixed_rows(2000, 96, [0.3, 2.0, 9.0, 30.0], dtype)
    codec = ANS()
    one_table = codec.encode_view(codes)
    in_classes = codec.encode_rows(codes, 96)
    assert bytes(in_classes[:2]) == CLASS_TAG
    assert len(in_classes) < 0.85 * len(one_table)
    # within 1% (plus tables and heads) of each class's own entropy
    assert len(in_classes) < 1.01 * class_bound_bytes(codes, 96) + 2000
    assert np.array_equal(codec.decode(in_classes, np.empty_like(codes)), codes)


def test_classes_below_the_one_tables_bound_leave_it_unencoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    codes = mixed_rows(2000, 96, [0.3, 2.0, 9.0, 30.0])
    classes = row_classes(codes, 96)
    assert np.array_equal(classes.counts, np.bincount(codes))
    encoded = []
    encode_view = ANS.encode_view
    monkeypatch.setattr(ANS, "encode_view", lambda self, array: encoded.append(array.size)
                        or encode_view(self, array))
    data = ANS().encode_rows(codes, 96)
    assert bytes(data[:2]) == CLASS_TAG and codes.size not in encoded


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 10**6), min_size=3, max_size=3), min_size=1,
                max_size=6))
def test_the_classes_streams_are_estimated_one_by_one(rows: list[list[int]]) -> None:
    counts = np.array(rows, dtype=np.int64)
    expected = sum(stream_bytes(row) for row in counts if row.any())
    assert _streams_bytes(counts) == pytest.approx(expected, rel=1e-12, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.5, 1e-300, 7e12]) | st.floats(0, 1e6),
                min_size=1, max_size=300))
def test_quantile_edges_are_numpys_to_the_bit(spreads: list[float]) -> None:
    values = np.array(spreads)
    expected = np.quantile(values, np.arange(1, MAX_CLASSES) / MAX_CLASSES)
    assert quantile_edges(values).tobytes() == expected.tobytes()


def test_alike_rows_keep_the_one_table_stream() -> None:
    codes = mixed_rows(2000, 96, [4.0])
    assert bytes(ANS().encode_rows(codes, 96)) == bytes(ANS().encode_view(codes))
    small = mixed_rows(10, 96, [0.3, 30.0])  # under MIN_SYMBOLS: one table
    assert small.size < MIN_SYMBOLS
    assert bytes(ANS().encode_rows(small, 96)) == bytes(ANS().encode_view(small))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 700), row_length=st.integers(1, 200),
       spreads=st.lists(st.floats(0, 40), min_size=1, max_size=5),
       wide=st.booleans(), seed=st.integers(0, 2**16))
def test_encode_rows_round_trips_and_never_costs_more(rows: int, row_length: int,
                                                      spreads: list[float], wide: bool,
                                                      seed: int) -> None:
    codes = mixed_rows(rows, row_length, spreads, np.uint16 if wide else np.uint8, seed)
    codec = ANS()
    data = codec.encode_rows(codes, row_length)
    assert len(data) <= len(codec.encode_view(codes))
    assert np.array_equal(codec.decode(data, np.empty_like(codes)), codes)


def test_auto_and_the_archive_code_a_layer_in_row_classes(tmp_path) -> None:
    codes = mixed_rows(1000, 64, [0.3, 3.0, 25.0])
    codec, data = Auto().select(codes, 64)
    assert codec.codec_id == "ans" and bytes(data[:2]) == CLASS_TAG
    # a layer whose rows differ in scale, under one step for the tensor
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 0.1, 1.0])[torch.randint(0, 3, (1000,), generator=gen)]
    weight = torch.randn(1000, 64, generator=gen) * scales[:, None]
    config = LayerConfig(quantizer={"id": "uniform", "step": 0.02})
    result = qlis.compress({"w": weight}, plan={"w": config.to_json()})
    path = qlis.save(result, tmp_path / "m.qlis")
    with qlis.open(path) as archive:
        stored = archive.read_quantized("w")
        record = archive.entry("w").data.length
    assert torch.equal(qlis.load(path)["w"], result.state_dict()["w"])
    flat = np.asarray(stored.codes).reshape(-1)
    assert record < 0.9 * len(ANS().encode_view(flat))
    # the plan's size estimate counts the classes: within 3% of the codes' record
    _, layer = execute_layer("w", weight, config)
    estimate = layer.coded_bytes - param_bytes(stored.params) - QUANTIZED_RECORD_BYTES
    assert abs(estimate - record) < 0.03 * record, (estimate, record)


def _class_stream(row_length: int, count_byte: int, parts: list[bytes]) -> bytes:
    stream = bytearray(CLASS_TAG)
    write_varint(stream, row_length)
    stream.append(count_byte)
    for part in parts:
        write_varint(stream, len(part))
        stream += part
    return bytes(stream)


def test_forged_class_streams_raise_archive_error() -> None:
    codec = ANS()
    rows, row_length = 6, 4
    out = np.empty(rows * row_length, dtype=np.uint8)
    ids = np.array([0, 1, 0, 1, 1, 0], dtype=np.uint8)

    def part(n_rows: int, value: int = 5) -> bytes:
        return bytes(codec.encode_view(np.full(n_rows * row_length, value, dtype=np.uint8)))

    good = _class_stream(row_length, 1, [bytes(codec.encode_view(ids)), part(3, 5), part(3, 9)])
    expected = np.where(np.repeat(ids, row_length) == 0, 5, 9)
    assert np.array_equal(codec.decode(good, out), expected)
    forged = {
        "rows of no codes": _class_stream(0, 1, [bytes(codec.encode_view(ids))]),
        "rows that do not tile": _class_stream(5, 1, [bytes(codec.encode_view(ids))]),
        "one class": _class_stream(row_length, 0, [bytes(codec.encode_view(ids)), part(6)]),
        "more classes than rows": _class_stream(row_length, 6, [bytes(codec.encode_view(ids))]),
        "17 classes": _class_stream(row_length, 16, [bytes(codec.encode_view(ids))]),
        "a class id past the count": _class_stream(row_length, 1, [
            bytes(codec.encode_view(ids * 2)), part(3), part(3)]),
        "an unused class": _class_stream(row_length, 2, [
            bytes(codec.encode_view(ids)), part(3), part(3), part(0)]),
        "a part of the wrong length": _class_stream(row_length, 1, [
            bytes(codec.encode_view(ids)), part(2), part(3)]),
        "a class stream inside": _class_stream(row_length, 1, [
            bytes(codec.encode_view(ids)), good, part(3)]),
        "a part longer than the stream": good[:-3],
        "trailing garbage": good + b"\x00",
        "a 16-bit part": _class_stream(row_length, 1, [
            bytes(codec.encode_view(ids)),
            bytes(codec.encode_view(np.full(12, 5, dtype=np.uint16))), part(3)]),
    }
    for what, data in forged.items():
        with pytest.raises(ArchiveError):
            codec.decode(data, np.empty_like(out))
            pytest.fail(what)


def test_archives_with_row_classes_are_version_4_and_older_versions_hold_none(tmp_path):
    committed = FOLDER.parent / "format-v2-v4" / "row-classes.qlis"  # what version 4 wrote
    header, data = split(committed.read_bytes())
    assert header["version"] == 4 and qlis.load(committed)["rows"].numel()
    for older in (2, 3):
        path = tmp_path / f"v{older}.qlis"
        path.write_bytes(build({**header, "version": older}, data, version=older))
        with pytest.raises(ArchiveError, match="row classes.*version 4.*version " + str(older)):
            qlis.load(path)
