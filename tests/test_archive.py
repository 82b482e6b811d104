"""The .qlis archive: exact round trips, lazy reads, atomic writes, rejection of bad files."""

from __future__ import annotations

import json
import os
import struct

import google_crc32c
import numpy as np
import pytest
import torch
from archive_layout import build, split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlis
import qlis.archive.file
import qlis.quantize.quantizers
import qlis.write_behind
from qlis.archive.codecs import Codec, codec_registry, register_codec
from qlis.archive.format import (
    ALIGN,
    COMPACT_VERSION,
    MAGIC,
    PREFIX,
    RECORD_ALIGN,
    VERSION,
    crc32c,
)
from qlis.errors import ArchiveError, InputError
from qlis.models.tensors import same_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POLICIES = [("prune", {"k": 0.5}), ("quant", {"bits": 4}), ("quant", {"bits": 1}), ("lap", {}),
            ("laq", {}), ("lapq", {}), ("lapq", {"granularity": "channel"}),
            ("quant", {"bits": 3, "method": "kmeans"})]
CODECS = ["huffman", "ans", "bitpack", "auto"]
TMP_FIXTURE = [HealthCheck.function_scoped_fixture]  # tmp_path is reused across examples


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert same_bits(a[name], b[name]), name


def small_model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 16, generator=gen),
        "block.fc.weight": torch.randn(32, 16, generator=gen) * 0.1,
        "block.fc.bias": torch.randn(32, generator=gen),
        "block.norm.weight": torch.ones(32),
        "head.weight": torch.randn(4, 32, generator=gen).half(),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("policy,options", POLICIES)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_is_bit_exact(tmp_path, policy, options, codec):
    result = qlis.compress(small_model_state(), policy=policy, **options)
    path = qlis.save(result, tmp_path / "m.qlis", codec=codec)
    assert_same_state(qlis.load(path), result.state_dict())


tensor_shapes = st.sampled_from([(), (0,), (0, 3), (3, 0), (1, 1), (5, 7), (4, 3, 2), (17,)])


@st.composite
def state_dicts(draw):
    n = draw(st.integers(1, 4))
    state = {}
    for i in range(n):
        shape = draw(tensor_shapes)
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        if draw(st.booleans()) and t.numel():
            t.view(-1)[0] = 0.0
        state[f"t{i}"] = t
    # at least one non-empty layer so that there is something to score
    state["layer"] = torch.randn(draw(st.integers(1, 6)), draw(st.integers(1, 6))).to(
        draw(st.sampled_from(DTYPES))
    )
    return state


@settings(max_examples=40, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(state=state_dicts(), policy=st.sampled_from(POLICIES), codec=st.sampled_from(CODECS))
def test_round_trip_any_dtype_and_shape(tmp_path, state, policy, codec):
    name, options = policy
    result = qlis.compress(state, policy=name, **options)
    path = qlis.save(result, tmp_path / "h.qlis", codec=codec)
    assert_same_state(qlis.load(path), result.state_dict())


AFFINE = [("quant", {"bits": 4}),
          ("quant", {"quantizer": {"id": "group", "bits": 4, "group_size": 4}}),
          ("quant", {"quantizer": {"id": "uniform", "rel_mse": 1e-3, "granularity": "channel"}})]


@pytest.mark.parametrize("policy,options", [*POLICIES, *AFFINE[1:]])
def test_pieces_are_the_tensor_a_range_of_rows_at_a_time(tmp_path, monkeypatch, policy,
                                                         options):
    """read_pieces, joined, is read: in several pieces where an affine grid's rows are
    chunked (chunks made small here), in one otherwise, none for an empty quantized one."""
    monkeypatch.setattr(qlis.quantize.quantizers, "CHUNK_ELEMENTS", 100)
    state = {**small_model_state(), "empty": torch.zeros(0, 5),
             "wide.weight": torch.randn(48, 20).half()}
    path = qlis.save(qlis.compress(state, policy=policy, **options), tmp_path / "m.qlis")
    counts = {}
    with qlis.open(path) as archive:
        for name in archive.names():
            pieces = list(archive.read_pieces(name))
            whole = archive.read(name)
            counts[name] = len(pieces)
            assert all(p.dim() == 1 and p.dtype == whole.dtype for p in pieces), name
            joined = torch.cat(pieces) if pieces else torch.empty(0, dtype=whole.dtype)
            assert same_bits(joined, whole.reshape(-1)), name
    assert counts["steps"] == 1
    if (policy, options) in AFFINE:
        assert counts["embed.weight"] > 1 and counts["empty"] == 0  # 640 elements in 100s


def test_verify_checks_every_tensor_a_piece_at_a_time(tmp_path, monkeypatch):
    """verify never holds a tensor's whole float copy, yet still finds a bad record."""
    path = qlis.save(qlis.compress(small_model_state(), policy="quant", bits=4),
                     tmp_path / "m.qlis")

    def whole(self, name):
        raise AssertionError(f"verify read all of {name!r} at once")

    monkeypatch.setattr(qlis.archive.file.Archive, "read", whole)
    with qlis.open(path) as archive:
        archive.verify()
        last = max(archive.names(), key=lambda n: archive.entry(n).data.offset)
        at = archive._data_start + archive.entry(last).data.offset
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with qlis.open(path) as archive, pytest.raises(ArchiveError, match=last):
        archive.verify()


def test_pieces_from_a_quantizer_that_skips_rows_are_refused(tmp_path, monkeypatch):
    path = qlis.save(qlis.compress({"w": torch.randn(8, 4)}, "quant", bits=4),
                     tmp_path / "m.qlis")

    def skipping(self, q):
        yield 0, 2, torch.zeros(2, 4)
        yield 3, 8, torch.zeros(5, 4)

    monkeypatch.setattr(qlis.quantize.quantizers.Quantizer, "dequantized_rows", skipping)
    with qlis.open(path) as archive, pytest.raises(ArchiveError, match="'w': the quantizer "
                                                   "returned the wrong rows"):
        list(archive.read_pieces("w"))


def test_memory_that_runs_out_while_dequantizing_is_said_so(tmp_path, monkeypatch):
    """Under a process memory limit the system's free memory says a tensor fits and its
    allocation fails (torch raises a RuntimeError): the reader says so, and does not blame
    the file's parameters; other failures still do."""
    path = qlis.save(qlis.compress({"w": torch.randn(8, 4)}, "quant", bits=4),
                     tmp_path / "m.qlis")
    failure = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 4294967296 bytes. Error code 12")

    def failing(self, q):
        raise failure

    def failing_rows(self, q):  # a generator, as the quantizers' own: it fails when read
        yield failing(self, q)

    monkeypatch.setattr(qlis.quantize.quantizers.Quantizer, "dequantize", failing)
    monkeypatch.setattr(qlis.quantize.quantizers.Quantizer, "dequantized_rows", failing_rows)
    with qlis.open(path) as archive:
        for read in (archive.read, lambda name: list(archive.read_pieces(name))):
            with pytest.raises(InputError, match=r"not enough memory to dequantize tensor "
                               r"'w' \(128 bytes\)"):
                read("w")
        failure = ValueError("shapes do not match")
        with pytest.raises(ArchiveError, match="'w': inconsistent parameters"):
            archive.read("w")


def test_lazy_reads_and_load_into_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    result = qlis.compress(model, policy="quant", bits=8)
    path = qlis.save(result, tmp_path / "m.qlis", metadata={"family": "mlp"})
    with qlis.open(path) as archive:
        assert archive.names() == list(model.state_dict())
        assert archive.metadata == {"family": "mlp"}
        assert same_bits(archive.read("2.weight"), result.state_dict()["2.weight"])
        quantized = archive.read_quantized("0.weight")
        assert quantized.codes.shape == (16, 8) and quantized.n_levels == 256
        assert archive.read_quantized("0.bias") is None
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    qlis.load(path, model=fresh)
    assert torch.equal(fresh[0].weight, result.state_dict()["0.weight"])
    with pytest.raises(InputError, match="does not fit"):
        qlis.load(path, model=torch.nn.Linear(3, 3))


def test_records_are_aligned_and_sizes_add_up(tmp_path):
    result = qlis.compress(small_model_state(), policy="lapq")
    path = qlis.save(result, tmp_path / "m.qlis", source_bytes=12345)
    raw = path.read_bytes()
    magic, version, _, header_len, data_len = PREFIX.unpack(raw[: PREFIX.size])
    header, _ = split(raw)
    assert magic == MAGIC and version == COMPACT_VERSION == header["version"]
    data_start = -(-(PREFIX.size + header_len) // ALIGN) * ALIGN
    assert data_start + data_len == len(raw)
    offsets = [entry["data"]["offset"] for entry in header["tensors"]]
    assert all(offset % RECORD_ALIGN == 0 for offset in offsets)
    assert any(offset % ALIGN for offset in offsets)  # small records are not padded to 64
    assert header["summary"]["source_bytes"] == 12345
    assert header["summary"]["cr"] == pytest.approx(result.cr)


def test_existing_file_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "m.qlis"
    target.write_bytes(b"precious")
    result = qlis.compress(small_model_state(), policy="quant", bits=8)
    with pytest.raises(InputError, match="exists"):
        qlis.save(result, target, overwrite=False)
    assert target.read_bytes() == b"precious"


def test_interrupted_write_leaves_no_partial_archive(tmp_path, monkeypatch):
    target = tmp_path / "m.qlis"
    target.write_bytes(b"old archive")
    result = qlis.compress(small_model_state(), policy="quant", bits=8)
    import qlis.archive.atomic as atomic_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_module.os, "fsync", crash)  # the file is written, not published
    with pytest.raises(KeyboardInterrupt):
        qlis.save(result, target)
    assert target.read_bytes() == b"old archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qlis"]


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory) -> tuple[bytes, dict]:
    path = tmp_path_factory.mktemp("fuzz") / "m.qlis"
    result = qlis.compress(small_model_state(), policy="lapq")
    qlis.save(result, path, codec="auto")
    return path.read_bytes(), result.state_dict()


def _load_bytes(tmp_path, data: bytes) -> dict:
    path = tmp_path / "fuzzed.qlis"
    path.write_bytes(data)
    return qlis.load(path)


def _rejected_or_unchanged(tmp_path, data: bytes, expected: dict) -> None:
    """A damaged archive is rejected with ArchiveError, or (damage in padding) reads the same."""
    try:
        state = _load_bytes(tmp_path, data)
    except ArchiveError:
        return
    assert_same_state(state, expected)


@settings(max_examples=150, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(data=st.data())
def test_byte_flips_are_detected(tmp_path, archive_bytes, data):
    raw, expected = archive_bytes
    damaged = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        damaged[i] ^= data.draw(st.integers(1, 255))
    _rejected_or_unchanged(tmp_path, bytes(damaged), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(data=st.data())
def test_truncation_and_appended_garbage_are_rejected(tmp_path, archive_bytes, data):
    raw, _ = archive_bytes
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ArchiveError):
        _load_bytes(tmp_path, raw[:cut])
    garbage = data.draw(st.binary(min_size=1, max_size=200))
    with pytest.raises(ArchiveError):
        _load_bytes(tmp_path, raw + garbage)


@pytest.mark.parametrize("cut", [1, 8, 31])
def test_a_cut_within_the_prefix_is_called_truncated_not_foreign(tmp_path, archive_bytes, cut):
    raw, _ = archive_bytes
    with pytest.raises(ArchiveError, match=f"truncated: {cut} bytes"):
        _load_bytes(tmp_path, raw[:cut])
    with pytest.raises(ArchiveError, match="bad magic bytes"):
        _load_bytes(tmp_path, b"PK" + raw[2:cut])


def _with_header(raw: bytes, mutate) -> bytes:
    """Rewrite the JSON header (with a valid checksum) the way a hostile writer would."""
    header, data = split(raw)
    mutate(header)
    return build(header, data)


def _first_quantized(header: dict) -> dict:
    return next(e for e in header["tensors"] if "quantizer" in e)


HOSTILE = {
    "huge shape": lambda h: h["tensors"][0].update(shape=[1 << 20, 1 << 20]),
    "negative dim": lambda h: h["tensors"][0].update(shape=[-1, 4]),
    "offset past end": lambda h: h["tensors"][0]["data"].update(offset=1 << 40),
    "unaligned offset": lambda h: h["tensors"][0]["data"].update(offset=4),
    "length past end": lambda h: h["tensors"][0]["data"].update(length=1 << 40),
    "string offset": lambda h: h["tensors"][0]["data"].update(offset="0"),
    "unknown dtype": lambda h: h["tensors"][0].update(dtype="complex64"),
    "unknown codec": lambda h: h["tensors"][0].update(codec={"id": "nope"}),
    "codec params": lambda h: h["tensors"][0].update(codec={"id": "bitpack", "bits": 99}),
    "unknown quantizer": lambda h: _first_quantized(h).update(quantizer={"id": "evil"}),
    "quantizer params": lambda h: _first_quantized(h)["quantizer"].update(bits="x"),
    "alphabet": lambda h: _first_quantized(h).update(n_levels=100000),
    "small alphabet": lambda h: _first_quantized(h).update(n_levels=1),
    "duplicate name": lambda h: h["tensors"].append(dict(h["tensors"][0])),
    "no tensors": lambda h: h.update(tensors={"a": 1}),
    "metadata": lambda h: h.update(metadata=["x"]),
    "summary": lambda h: h.update(summary={"cr": "big"}),
    "not qlis": lambda h: h.update(format="zip"),
    "shape type": lambda h: h["tensors"][0].update(shape="4x4"),
    "param shape": lambda h: next(iter(_first_quantized(h)["params"].values())).update(
        shape=[1 << 30]
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_rejected(tmp_path, archive_bytes, case):
    raw, _ = archive_bytes
    with pytest.raises(ArchiveError):
        _load_bytes(tmp_path, _with_header(raw, HOSTILE[case]))


def test_deeply_nested_header_is_rejected(tmp_path, archive_bytes):
    raw, _ = archive_bytes
    import google_crc32c

    nested = b"[" * 200000 + b"]" * 200000
    prefix = PREFIX.pack(MAGIC, VERSION, google_crc32c.value(nested), len(nested), 0)
    pad = -(-(PREFIX.size + len(nested)) // ALIGN) * ALIGN - PREFIX.size - len(nested)
    with pytest.raises(ArchiveError):
        _load_bytes(tmp_path, prefix + nested + b" " * pad)


def test_other_files_are_not_archives(tmp_path):
    for content in (b"", b"hello world", MAGIC, MAGIC + struct.pack("<I", 99) + bytes(20)):
        with pytest.raises(ArchiveError):
            _load_bytes(tmp_path, content)
    with pytest.raises(InputError):
        qlis.load(tmp_path / "missing.qlis")


def test_checksum_mismatch_names_the_tensor(tmp_path):
    result = qlis.compress(small_model_state(), policy="quant", bits=8)
    path = qlis.save(result, tmp_path / "m.qlis", codec="bitpack")
    with qlis.open(path) as archive:
        entry = archive.entry("block.fc.weight")
        start = archive._data_start + entry.data.offset
    raw = bytearray(path.read_bytes())
    raw[start + 3] ^= 0xFF
    with pytest.raises(ArchiveError, match="block.fc.weight.*checksum"):
        _load_bytes(tmp_path, bytes(raw))


def test_archive_is_smaller_than_the_tensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {f"l{i}.weight": torch.randn(256, 256, generator=gen) for i in range(4)}
    result = qlis.compress(state, policy="quant", bits=4)
    path = qlis.save(result, tmp_path / "m.qlis", codec="huffman")
    original = sum(t.numel() * 4 for t in state.values())
    ratio = original / os.path.getsize(path)
    assert 7.0 < ratio <= result.hcr
    assert np.isclose(result.cr, 8.0)


# -- version 2: no codec substitution, the decoded-size bound, threads, model checks ----------


def test_the_codec_asked_for_is_the_codec_stored(tmp_path):
    w = torch.randn(4000, 1000, generator=torch.Generator().manual_seed(0)) * 0.01
    w[0, 0] = 5  # one outlier: 2-bit codes almost all equal, a ratio far above 4096
    result = qlis.compress({"w": w}, "quant", bits=2)
    sizes = {}
    for codec in ("ans", "huffman", "bitpack"):
        path = qlis.save(result, tmp_path / f"{codec}.qlis", codec=codec)
        with qlis.open(path) as archive:
            assert archive.entry("w").codec["id"] == codec
            assert same_bits(archive.read("w"), result.state_dict()["w"])
        sizes[codec] = path.stat().st_size
    assert sizes["ans"] * 100 < sizes["huffman"] < sizes["bitpack"]


def _declared_bytes(result) -> int:
    total = 0
    for t in result.tensors.values():
        numel = int(np.prod(t.shape))
        if isinstance(t, qlis.QuantizedTensor):
            code_width = 1 if t.n_levels <= 256 else 2
            total += numel * (t.dtype.itemsize + code_width)
            total += sum(np.asarray(p).nbytes for p in t.params.values())
        else:
            total += numel * t.element_size()
    return total


def test_decoded_size_is_bounded_before_reading(tmp_path):
    result = qlis.compress(small_model_state(), policy="lapq", granularity="channel")
    path = qlis.save(result, tmp_path / "m.qlis")
    declared = _declared_bytes(result)
    with qlis.open(path, max_decoded_bytes=declared) as archive:
        assert archive.decoded_bytes == declared
    with pytest.raises(ArchiveError, match=rf"take {declared:,} bytes once decoded, over the "
                                           rf"limit of {declared - 1:,} bytes.*max_decoded_bytes"):
        qlis.open(path, max_decoded_bytes=declared - 1)  # a small limit in bytes, not 0.00 GiB
    with pytest.raises(ArchiveError, match="max_decoded_bytes"):
        qlis.load(path, max_decoded_bytes=declared - 1)
    with pytest.raises(qlis.ConfigError):
        qlis.open(path, max_decoded_bytes=True)


def test_one_archive_is_safe_to_share_between_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    result = qlis.compress(small_model_state(), policy="quant", bits=4)
    path = qlis.save(result, tmp_path / "m.qlis", codec="ans")
    expected = result.state_dict()
    names = list(expected) * 40
    with qlis.open(path) as archive, ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(lambda n: (n, archive.read(n)), names * 8))
    assert len(reads) == 8 * len(names)
    assert all(same_bits(tensor, expected[name]) for name, tensor in reads)


def test_a_mismatched_model_is_left_untouched(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    path = qlis.save(qlis.compress(model, policy="quant", bits=2), tmp_path / "m.qlis")
    wrong_shape = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)  # last layer differs
    )
    wrong_dtype = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    ).half()
    extra = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2),
                                torch.nn.Linear(2, 2))
    for other, reason in ((wrong_shape, "2.weight"), (wrong_dtype, "float16"), (extra, "3.")):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(InputError, match=reason):
            qlis.load(path, model=other)
        assert_same_state(other.state_dict(), before)


def test_header_records_writer_plan_and_distortion(tmp_path):
    result = qlis.compress(small_model_state(), policy="lapq", granularity="channel")
    path = qlis.save(result, tmp_path / "m.qlis", codec="ans")
    with qlis.open(path) as archive:
        assert archive.writer == {"name": "qlis", "version": qlis.__version__}
        assert archive.compression == json.loads(json.dumps(result.config))
        assert archive.distortion == json.loads(json.dumps(result.distortion))
        rows = {row["name"]: row for row in archive.tensor_info()}
    for layer in result.layers:
        row = rows[layer.name]
        assert (row["bits"], row["k"]) == (layer.bits, layer.k)
        assert row["quantizer"] == (layer.quantizer or {}).get("id")
        assert row["codec"] in ("ans", "sparse", "raw")
        assert row["bytes"] > 0
    assert rows["steps"]["quantizer"] is None and rows["steps"]["codec"] == "raw"


def test_non_finite_values_are_refused_at_save(tmp_path):
    import dataclasses

    result = qlis.compress(small_model_state(), policy="prune", k=0.5)
    result.layers[0] = dataclasses.replace(result.layers[0], k=float("inf"))
    with pytest.raises(qlis.QlisError, match=r"plan\.k.*finite"):
        qlis.save(result, tmp_path / "m.qlis")
    assert list(tmp_path.iterdir()) == []


class _Lookup(qlis.Quantizer):
    """A test quantizer with a large alphabet: code c means table[c] (uint16 codes)."""

    strategy_id = "test-lookup16"

    def quantize(self, weight: torch.Tensor) -> qlis.QuantizedTensor:
        table, codes = torch.unique(weight.float().reshape(-1), return_inverse=True)
        return qlis.QuantizedTensor(
            codes=codes.numpy().astype(np.int64).reshape(weight.shape),
            n_levels=table.numel(),
            quantizer=self.get_config(),
            params={"table": table.numpy().astype(np.float16)},
            dtype=weight.dtype,
        )

    def dequantize(self, q: qlis.QuantizedTensor) -> torch.Tensor:
        table = torch.from_numpy(np.asarray(q.params["table"], dtype=np.float32))
        return table[torch.from_numpy(q.codes.astype(np.int64))].to(q.dtype)


@pytest.mark.parametrize("codec", ["raw", "bitpack", "huffman", "ans", "auto"])
def test_large_alphabets_use_uint16_codes_and_float16_params(tmp_path, codec):
    from qlis.archive.file import write_tensors

    qlis.register_quantizer(_Lookup)
    weight = torch.arange(1000, dtype=torch.float32).reshape(40, 25) - 500
    q = _Lookup().quantize(weight)
    assert q.n_levels == 1000
    try:
        path = write_tensors(tmp_path / "u16.qlis", {"w": q}, codec=codec)
    except qlis.ConfigError as err:
        pytest.skip(f"codec {codec} does not take uint16 codes yet: {err}")
    with qlis.open(path) as archive:
        back = archive.read_quantized("w")
        assert back.codes.dtype == np.uint16 and back.params["table"].dtype == np.float16
        assert np.array_equal(back.codes, q.codes)
        assert same_bits(archive.read("w"), q.dequantize())


def test_params_of_other_dtypes_are_refused(tmp_path):
    from qlis.archive.file import write_tensors

    q = qlis.AffineQuantizer(bits=4).quantize(torch.randn(4, 4))
    q.params["scale"] = q.params["scale"].astype(np.float64)
    with pytest.raises(InputError, match="float64"):
        write_tensors(tmp_path / "m.qlis", {"w": q})


def test_a_tensor_larger_than_the_free_memory_is_refused_before_it_is_decoded(tmp_path,
                                                                             monkeypatch):
    """Linux promises memory it may not have: an archive whose tensor (codes, then its
    float32 values) needs more than MemAvailable is one error naming it, not an OOM kill."""
    result = qlis.compress({"w": torch.randn(64, 64), "b": torch.randn(64)}, "quant", bits=4)
    path = qlis.save(result, tmp_path / "m.qlis")
    monkeypatch.setattr(qlis.archive.file, "_ASK_FROM_BYTES", 1024)
    needs = 64 * 64 * (1 + 4)  # uint8 codes, then the float32 tensor
    monkeypatch.setattr(qlis.archive.file, "available_memory", lambda: needs - 1)
    with qlis.open(path) as archive:
        with pytest.raises(InputError, match=f"tensor 'w' needs {needs:,} bytes"):
            archive.read("w")
        assert archive.read("b").shape == (64,)  # smaller tensors still read
    monkeypatch.setattr(qlis.archive.file, "available_memory", lambda: needs)
    assert torch.equal(qlis.load(path)["w"], result.state_dict()["w"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_header_value_json_cannot_hold_is_refused_by_where_it_is(tmp_path, value):
    """JSON has no NaN or infinity: the writer names where one is, writes nothing and keeps
    an archive already there."""
    path = tmp_path / "a.qlis"
    path.write_bytes(b"before")
    with pytest.raises(InputError, match=r"header\.distortion\.output\.cosine is not a finite"):
        qlis.archive.file.write_tensors(path, {"w": torch.ones(3)},
                                        distortion={"output": {"cosine": value}})
    assert path.read_bytes() == b"before" and os.listdir(tmp_path) == ["a.qlis"]


def test_short_records_are_written_together_into_the_same_bytes(tmp_path, monkeypatch):
    """Records shorter than GATHER_BYTES go to the file in a few writes (one system call
    each: a record a write cost a 100,000-tensor archive 3.5 s), and the archive is the same
    bytes as one written record by record."""
    gen = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(1 + i % 7, generator=gen) for i in range(300)}
    tensors["large"] = torch.randn(200_000, generator=gen)
    tensors["after"] = torch.randn(5, generator=gen)
    writes = []
    write = qlis.write_behind.WriteBehind.write

    def counted(self, data, offset):
        writes.append(data.size)
        write(self, data, offset)

    monkeypatch.setattr(qlis.write_behind.WriteBehind, "write", counted)
    gathered = qlis.archive.file.write_tensors(tmp_path / "gathered.qlis", tensors,
                                               codec="raw").read_bytes()
    assert len(writes) <= 4  # the small ones, the large one, the last small one, the header
    monkeypatch.setattr(qlis.archive.file, "GATHER_BYTES", 0)
    one_by_one = qlis.archive.file.write_tensors(tmp_path / "one.qlis", tensors,
                                                 codec="raw").read_bytes()
    assert len(writes) > 300
    assert gathered == one_by_one
    assert same_bits(qlis.load(tmp_path / "gathered.qlis")["after"], tensors["after"])


@pytest.mark.parametrize("size", [0, 1, 7, (1 << 24) + 3])
def test_a_records_crc_is_that_of_its_bytes_whatever_holds_them(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    expected = google_crc32c.value(data.tobytes())
    assert crc32c(data.tobytes()) == expected
    assert crc32c(memoryview(data).toreadonly()) == expected
    assert crc32c(memoryview(bytearray(data.tobytes()))) == expected



class _Misbehaving(Codec):
    """A user's codec that breaks its contract in the way its ``how`` says."""

    how = ""

    def encode(self, array: np.ndarray) -> bytes:
        if self.how == "raises":
            raise ZeroDivisionError("the plugin's own bug")
        return "text" if self.how == "text" else array.tobytes()

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        if self.how == "short":
            return out[:3]
        if self.how == "none":
            return None
        out[:] = np.frombuffer(buf, dtype=out.dtype)
        if self.how == "lossy":
            out[::7] = 0
        return out


@pytest.mark.parametrize(("how", "match"), [
    ("raises", r"^w: codec 'test-bad-raises' failed to encode \(ZeroDivisionError"),
    ("text", r"^w: codec 'test-bad-text' encoded to a str, not bytes"),
    ("short", r"^w: codec 'test-bad-short' does not decode its stream back to the codes"),
    ("none", r"^w: codec 'test-bad-none' does not decode its stream back to the codes"),
    ("lossy", r"^w: codec 'test-bad-lossy' does not decode its stream back to the codes"),
    ("", None),  # keeping its contract, the same codec stores and reads the layer
])
def test_a_user_codec_that_breaks_its_contract_is_named(tmp_path, monkeypatch, how, match):
    """A codec whose stream does not decode back to its codes is refused by the writer: a
    lossy one made an archive that loaded other values than compress reported, silently."""
    from qlis.archive.file import write_tensors

    monkeypatch.setattr(codec_registry, "_classes", dict(codec_registry._classes))
    codec = f"test-bad-{how}"
    register_codec(type(f"Bad{how}", (_Misbehaving,), {"codec_id": codec, "how": how}))
    q = qlis.AffineQuantizer(bits=8).quantize(torch.randn(16, 16))
    if match is None:
        write_tensors(tmp_path / "m.qlis", {"w": q}, codec=codec)
        assert torch.equal(qlis.load(tmp_path / "m.qlis")["w"], q.dequantize())
        return
    with pytest.raises(qlis.ConfigError, match=match):
        write_tensors(tmp_path / "m.qlis", {"w": q}, codec=codec)
    assert not (tmp_path / "m.qlis").exists()


@pytest.mark.parametrize("how", ["short", "none"])
def test_a_user_codec_that_decodes_wrong_is_named_by_the_reader(tmp_path, monkeypatch, how):
    """An archive written by a codec and read where another class has that id."""
    from qlis.archive.file import write_tensors

    monkeypatch.setattr(codec_registry, "_classes", dict(codec_registry._classes))
    register_codec(type("Good", (_Misbehaving,), {"codec_id": "test-codec", "how": ""}))
    q = qlis.AffineQuantizer(bits=8).quantize(torch.randn(16, 16))
    path = write_tensors(tmp_path / "m.qlis", {"w": q}, codec="test-codec")
    codec_registry._classes["test-codec"] = type("Bad", (_Misbehaving,),
                                                 {"codec_id": "test-codec", "how": how})
    with pytest.raises(qlis.ArchiveError,
                       match="tensor 'w': codec 'test-codec' did not decode 256 values of uint8"):
        qlis.load(path)


def test_a_closed_archive_reads_nothing_more(tmp_path):
    """The reader kept the closed descriptor's number, which the next file opened takes:
    a read after close read that file."""
    path = qlis.save(qlis.compress(torch.nn.Linear(16, 16), "quant", bits=4), tmp_path / "m.qlis")
    archive = qlis.Archive(path)
    archive.close()
    other = os.open(path, os.O_RDONLY)  # the lowest free number: the one just closed
    try:
        with pytest.raises(ArchiveError, match="closed"):
            archive.read("weight")
    finally:
        os.close(other)
