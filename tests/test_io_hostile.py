"""Hostile and odd model inputs: every one ends in one clear InputError or a correct result.

Each class of attack is crafted here in tmp_path with tiny files: repeated (stride-0) views,
deep nesting, dtypes and layouts qlis does not store, FIFOs and devices, Hugging Face folders
whose files escape the folder, crafted safetensors headers, and what the safetensors writer
must refuse.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import qlis.models.checkpoints
import qlis.models.tensors
from qlis.errors import InputError
from qlis.models.checkpoints import (
    load_state_dict,
    read_metadata,
    write_safetensors,
    write_sharded_safetensors,
)
from qlis.models.tensors import _may_overlap, as_state_dict, checked_state


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks (a FIFO) fails the test after 10 s instead of hanging the suite."""
    def timeout(*_):
        raise TimeoutError("the read blocked")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(path, *words: str) -> str:
    """The one-line message for ``path``, which must mention every word."""
    with pytest.raises(InputError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# 1. Repeated (stride-0, overlapping) views and shared storages


def test_a_tiny_file_expanding_to_gigabytes_is_refused_by_name(tmp_path):
    path = tmp_path / "expand.pt"
    torch.save({"ok": torch.ones(3), "w": torch.zeros(1).expand(20000, 20000)}, path)
    assert path.stat().st_size < 4096
    refused(path, "'w'", "repeats its elements", "1,600,000,000 bytes")


def test_small_expanded_buffers_and_tied_weights_are_kept(tmp_path):
    w = torch.randn(6, 4)
    ids = torch.arange(5).expand(1, -1)  # Hugging Face's position_ids: a size-1 stride-0 dim
    bias = torch.randn(4).expand(3, 4)  # really repeats, but only 48 bytes
    path = tmp_path / "tied.pt"
    torch.save({"embed": w, "head": w, "head_t": w.t(), "ids": ids, "bias": bias}, path)
    state = load_state_dict(path)
    assert torch.equal(state["head_t"], w.t()) and torch.equal(state["bias"], bias)
    assert torch.equal(state["ids"], ids)
    ptr = state["embed"].untyped_storage().data_ptr()
    assert state["head"].untyped_storage().data_ptr() == ptr  # still one storage, no copies
    assert state["head_t"].untyped_storage().data_ptr() == ptr


def test_many_names_on_one_storage_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(qlis.models.tensors, "VIEW_SLACK_BYTES", 0)
    w = torch.randn(64, 16)
    path = tmp_path / "aliases.pt"
    torch.save({f"layer{i}": w[i:] for i in range(3)}, path)  # three views, each processed
    refused(path, "sharing storages", "store each shared tensor once")
    torch.save({"a": w, "b": w[1:]}, path)  # under twice the storage
    assert len(load_state_dict(path)) == 2


def test_one_tensor_under_many_names_counts_once(tmp_path, monkeypatch):
    """A tie is compressed and stored once, however many names it has: a block registered in
    each of a model's 12 layers (weight sharing across layers) was refused as 12 copies."""
    monkeypatch.setattr(qlis.models.tensors, "VIEW_SLACK_BYTES", 0)
    block = torch.nn.Linear(32, 32)
    model = torch.nn.Sequential(*[block] * 12)
    path = tmp_path / "shared.pt"
    torch.save(model.state_dict(), path)
    state = load_state_dict(path)
    assert len(state) == 24
    result = qlis.compress(state, policy="quant", bits=4)
    assert result.aliases == {f"{i}.{p}": f"0.{p}" for i in range(1, 12)
                              for p in ("weight", "bias")}
    assert len(qlis.compress(model, policy="quant", bits=4).tensors) == 2


@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    strides=st.lists(st.integers(0, 12), min_size=4, max_size=4),
)
def test_views_said_not_to_overlap_address_distinct_elements(sizes, strides):
    strides = strides[: len(sizes)]
    reach = sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
    view = torch.arange(reach + 1).as_strided(sizes, strides)
    offsets = np.zeros(sizes, dtype=np.int64)
    for dim, stride in enumerate(strides):
        shape = [1] * len(sizes)
        shape[dim] = sizes[dim]
        offsets = offsets + (np.arange(sizes[dim]) * stride).reshape(shape)
    repeats = len(np.unique(offsets)) < offsets.size
    assert _may_overlap(view) or not repeats
    assert not _may_overlap(view.contiguous())
    assert not _may_overlap(view.contiguous().permute(*reversed(range(len(sizes)))))


# 2. Deep nesting


def test_deeply_nested_checkpoints_are_refused(tmp_path):
    obj = {"w": torch.ones(2, 2)}
    for _ in range(3000):
        obj = {"state_dict": obj}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # torch.save pickles recursively
    try:
        torch.save(obj, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    refused(tmp_path / "deep.pt", "nested more than")
    torch.save({"model": {"state_dict": {"w": torch.ones(2)}}}, tmp_path / "ok.pt")
    assert list(load_state_dict(tmp_path / "ok.pt")) == ["w"]


def test_recursion_inside_torch_load_is_an_input_error(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")

    def recursing(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(qlis.models.checkpoints.torch, "load", recursing)
    refused(tmp_path / "m.pt", "nested too deeply")


def test_keys_that_are_not_names_are_refused(tmp_path):
    torch.save({3: torch.ones(2)}, tmp_path / "int.pt")
    refused(tmp_path / "int.pt", "a key is a int")
    torch.save({"a": 1, (1, 2): 2}, tmp_path / "mixed.pt")
    refused(tmp_path / "mixed.pt", "no state dict found", "'a', 'tuple'")
    torch.save({"w\ud800": torch.ones(2)}, tmp_path / "surrogate.pt")
    refused(tmp_path / "surrogate.pt", "'w\\ud800'", "lone surrogate")


# 3. Layouts, devices and dtypes qlis does not store


def odd_tensors() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "sparse_coo": torch.eye(3).to_sparse(),
            "sparse_csr": torch.eye(3).to_sparse_csr(),
            "meta": torch.empty(3, 3, device="meta"),
            "nested": torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)]),
            "float8_e4m3fn": torch.ones(3).to(torch.float8_e4m3fn),
            "float8_e5m2": torch.ones(3).to(torch.float8_e5m2),
            "qint8": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
            "complex64": torch.ones(3, dtype=torch.complex64),
            "uint16": torch.ones(3, dtype=torch.uint16),
        }


@pytest.mark.parametrize("kind", list(odd_tensors()))
def test_odd_tensors_are_refused_by_name_and_kind_without_warnings(tmp_path, capfd, kind):
    path = tmp_path / "odd.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"fine": torch.ones(2), "odd": odd_tensors()[kind]}, path)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = refused(path, "'odd'", kind.split("_")[-1] if "sparse" in kind else kind)
    assert not caught and capfd.readouterr().err == ""
    assert "e.g." in message or "use " in message or "give " in message  # says what to do


@pytest.mark.parametrize("shape", [(1, 0, 2**62), (2**54,)])
def test_a_shape_no_archive_holds_is_refused_before_anything_is_done(shape):
    huge = torch.zeros(1).as_strided(shape, (0,) * len(shape))  # one element behind it
    with pytest.raises(qlis.QlisError, match=r"'huge' has shape .*at most 2\*\*53"):
        qlis.compress({"fine": torch.randn(8, 8), "huge": huge})


def test_a_nested_tensor_is_refused_silently_with_a_hint_that_applies(tmp_path):
    path = tmp_path / "nested.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"odd": torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)])},
                   path)
    # a fresh process: torch warns once per process as a nested tensor is made
    code = ("import sys; from qlis.models.checkpoints import load_state_dict\n"
            "try:\n    load_state_dict(sys.argv[1])\nexcept Exception as err:\n    print(err)")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert run.stderr == "" and "'odd' is a nested tensor" in run.stdout, run
    assert "to_dense" not in run.stdout  # what a nested tensor cannot do
    assert "to_padded_tensor" in run.stdout


# 4. FIFOs, devices and sockets


def test_fifos_devices_and_sockets_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.pt")
    refused(tmp_path / "model.pt", "FIFO")
    refused("/dev/zero", "device")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.pt"))
        refused(tmp_path / "sock.pt", "socket")
    folder = tmp_path / "hf"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    refused(folder, "FIFO")
    os.remove(folder / "model.safetensors")
    os.mkfifo(folder / "model.safetensors.index.json")
    refused(folder, "FIFO")
    os.remove(folder / "model.safetensors.index.json")
    index = {"weight_map": {"w": "model-1.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    os.mkfifo(folder / "model-1.safetensors")
    refused(folder, "FIFO")


def test_a_shard_index_that_is_a_folder_is_named(tmp_path):
    (tmp_path / "model.safetensors.index.json").mkdir()
    refused(tmp_path, "model.safetensors.index.json", "a folder")


# 5. Hugging Face folders that escape their folder


def sharded_folder(root: Path, shard: str = "model-1.safetensors") -> Path:
    folder = root / "hf"
    folder.mkdir(exist_ok=True)
    save_file({"w": torch.ones(2)}, folder / "model-1.safetensors")
    index = {"metadata": {"total_size": 8}, "weight_map": {"w": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_shards_must_resolve_inside_the_folder(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.full((2,), 7.0)}, other / "x.safetensors")
    assert torch.equal(load_state_dict(sharded_folder(tmp_path))["w"], torch.ones(2))
    for shard in ("../other/x.safetensors", str(other / "x.safetensors"), "/etc/passwd"):
        refused(sharded_folder(tmp_path, shard), "outside the model folder")
    folder = sharded_folder(tmp_path, "link.safetensors")
    (folder / "link.safetensors").symlink_to(other / "x.safetensors")
    refused(folder, "outside the model folder")
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").symlink_to(other / "x.safetensors")
    refused(folder, "outside the model folder")


def test_a_hugging_face_cache_snapshot_may_link_to_its_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, repo / "blobs" / "f00d", metadata={"format": "pt"})
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    assert torch.equal(load_state_dict(snapshot)["w"], torch.ones(3))
    assert read_metadata(snapshot) == {"format": "pt"}


@pytest.mark.parametrize(
    "index, words",
    [
        ({"weight_map": {"w": 3}}, ("'w'", "int, not a file name")),
        ({"weight_map": {"w": None}}, ("NoneType",)),
        ({"weight_map": {"w": ["a"]}}, ("list",)),
        ({"weight_map": ["w"]}, ("no 'weight_map' object",)),
        ([1, 2], ("no 'weight_map' object",)),
        ({"weight_map": {"w": "model-1.safetensors", "v": "model-1.safetensors"}},
         ("'v'", "does not hold it")),
        ({"weight_map": {"w": "missing.safetensors"}}, ("'missing.safetensors' is missing",)),
        ({"weight_map": {"w": "a\u0000b"}}, ("cannot resolve",)),
        # the folder itself, or a folder in it: named as the index's, not the user's fault
        *[({"weight_map": {"w": shard}}, (f"'{shard}', which names no file",))
          for shard in ("", ".", "./", "sub/", "a/..")],
    ],
)
def test_bad_shard_indexes_get_one_line(tmp_path, index, words):
    folder = sharded_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(folder, *words)


def test_hostile_index_json_is_bounded(tmp_path, monkeypatch):
    folder = sharded_folder(tmp_path)
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": [' + "[]," * 120000 + "[]]}")
    refused(folder, "JSON arrays and objects")
    index.write_text('{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}")
    refused(folder, "nested too deeply")
    index.write_text('{"weight_map": {"w": ' + "9" * 5000 + "}}")  # Python said: raise its limit
    refused(folder, "not valid JSON (an integer of 5000 digits is out of range")
    index.write_bytes(b'{"weight_map": \xff}')
    refused(folder, "not valid JSON")
    monkeypatch.setattr(qlis.models.checkpoints, "_MAX_INDEX_BYTES", 100)
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}, "pad": "x" * 200}))
    refused(folder, "is larger than 100 B, the most accepted for a JSON file")


def test_a_tensor_in_two_shards_or_another_than_the_index_says_is_refused(tmp_path):
    folder = sharded_folder(tmp_path)
    save_file({"w": torch.zeros(2)}, folder / "model-2.safetensors")
    weight_map = {"w": "model-1.safetensors", "v": "model-2.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(folder, "'w' is in shard 'model-2.safetensors'", "puts it in 'model-1.safetensors'")
    save_file({"w": torch.zeros(2), "x": torch.zeros(1)}, folder / "model-1.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    refused(folder, "'x' is in shard 'model-1.safetensors'", "does not list it")


def test_a_bin_shard_in_a_safetensors_index_is_read_for_its_metadata_too(tmp_path):
    """load_state_dict reads a .bin shard that the index names; read_metadata (which pack
    calls next) parsed it as safetensors and refused the folder ("header too large")."""
    folder = sharded_folder(tmp_path)
    save_file({"w": torch.ones(2)}, folder / "model-1.safetensors", metadata={"format": "pt"})
    torch.save({"v": torch.zeros(2)}, folder / "model-2.bin")
    weight_map = {"w": "model-1.safetensors", "v": "model-2.bin"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert set(load_state_dict(folder)) == {"w", "v"}
    assert read_metadata(folder) == {"format": "pt"}


# 6. Crafted safetensors headers


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize(
    "header, data, words",
    [
        ({"a": entry("F32", [0, 2**62, 2**62], 0, 0)}, b"", ("'a'", "at most 2**53")),
        ({"a": entry("F32", [1, 0, 2**62], 0, 0)}, b"", ("'a'", "at most 2**53")),
        ({"a": entry("F32", [1] * 65, 0, 4)}, bytes(4), ("65 dimensions",)),
        ({"a": entry("F8_E4M3", [2], 0, 2)}, bytes(2), ("F8_E4M3", "does not store")),
        ({"a": entry("C64", [1], 0, 8)}, bytes(8), ("'a'",)),
        ({"a": entry("F32", [2**40], 0, 2**42)}, bytes(8), ("not a readable safetensors",)),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, bytes(8),
         ("not a readable",)),
        ({"a": entry("BOOL", [2], 0, 2)}, b"\x01\x02", ("values other than 0 and 1",)),
    ],
)
def test_crafted_safetensors_headers_get_one_line(tmp_path, header, data, words):
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    refused(path, *words)


def test_deep_and_junk_headers_cost_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"j":' + b"[" * 5000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"]" * 5000 + b"}}" + bytes(4))
    refused(path, "not a readable safetensors file")
    junk = entry("F32", [1], 0, 4) | {"junk": [[]] * 100}  # ignored by safetensors, and by us
    path.write_bytes(safetensors_bytes({"a": junk}, struct.pack("<f", 2.5)))
    assert load_state_dict(path)["a"].item() == 2.5
    path.write_bytes(struct.pack("<Q", 2**63) + bytes(16))
    refused(path, "not a readable safetensors file")


def test_a_header_naming_a_tensor_twice_is_refused(tmp_path):
    """The safetensors library keeps the last entry of a name: a [64, 32] tensor read as
    the [32, 64] given after it over the same bytes, silently."""
    path = tmp_path / "m.safetensors"
    twice = (b'{"w":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]},'
             b'"w":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}}')
    twice += b" " * (-len(twice) % 8)
    path.write_bytes(struct.pack("<Q", len(twice)) + twice + bytes(32))
    refused(path, "names a tensor twice")
    # JSON may spell a key with escapes, which the library decodes: the same name twice...
    escaped = twice.replace(b'"w":{"dtype":"F32","shape":[2,4]',
                            b'"\\u0077":{"dtype":"F32","shape":[2,4]').strip()
    escaped += b" " * (-len(escaped) % 8)
    path.write_bytes(struct.pack("<Q", len(escaped)) + escaped + bytes(32))
    refused(path, "names a tensor twice")
    escaped = twice.replace(b'"data_offsets":[0,32]}}', b'"data_offs\\u0065ts":[0,32]}}')
    escaped += b" " * (-len(escaped) % 8)
    path.write_bytes(struct.pack("<Q", len(escaped)) + escaped + bytes(32))
    refused(path, "names a tensor twice")
    # ...and a file whose only entry spells its keys so is no duplicate
    single = b'{"w":{"dtyp\\u0065":"F32","shape":[2,4],"data_offs\\u0065ts":[0,32]}}'
    single += b" " * (-len(single) % 8)
    path.write_bytes(struct.pack("<Q", len(single)) + single + struct.pack("<8f", *range(8)))
    assert torch.equal(load_state_dict(path)["w"], torch.arange(8.0).reshape(2, 4))
    # the words an entry holds, in a metadata string and as a tensor's name, are no entry
    save_file({"data_offsets": torch.ones(2)}, path,
              metadata={"note": '"data_offsets": [0, 8]'})
    assert torch.equal(load_state_dict(path)["data_offsets"], torch.ones(2))


def test_safetensors_tensors_are_read_when_used_and_unaligned_data_is_read_right(tmp_path):
    header = {"u": entry("U8", [3], 0, 3), "f": entry("F32", [2], 3, 11),
              "h": entry("F16", [1], 11, 13), "z": entry("F64", [0, 5], 13, 13)}
    data = b"\x01\x02\x03" + struct.pack("<2f", 1.5, -2.0) + struct.pack("<e", 0.25)
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    state = load_state_dict(path)
    assert state["f"].tolist() == [1.5, -2.0] and state["h"].item() == 0.25
    assert state["u"].tolist() == [1, 2, 3] and state["z"].shape == (0, 5)
    save_file({"a": torch.randn(8, 8), "b": torch.randn(16)}, path)
    state = load_state_dict(path)
    with safe_open(str(path), "pt") as f:
        expected = {n: f.get_tensor(n) for n in f.offset_keys()}
    assert all(torch.equal(state[n], expected[n]) for n in expected)


def _mapped(path: Path) -> int:
    """How many mappings of ``path`` this process holds."""
    return Path("/proc/self/maps").read_text().count(str(path.resolve()))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("size", [16, 1 << 19])  # read, and mapped
def test_a_file_replaced_after_its_header_was_read_is_refused_not_mixed_in(tmp_path, size):
    """Tensors are read long after the header: a file swapped in meanwhile (a download
    finishing) was read as the model, silently; a pipe put there blocked the read."""
    path, other = tmp_path / "m.safetensors", tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(size)}, path)
    save_file({"w": torch.ones(size)}, other)
    state = load_state_dict(path)
    os.replace(other, path)
    with pytest.raises(InputError, match="changed while qlis read it"):
        state["w"]
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(InputError, match="not a regular file"):
        state["w"]


def _checkpoint_claiming(path: Path, numel: int) -> None:
    """A zip checkpoint as torch.save writes it, whose one storage's pickle claims ``numel``
    floats where its record holds 16."""

    class Claim:
        pass

    class Rebuilt:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Claim(), 0, (numel,), (1,), False, {})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(
                obj, Claim) else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"w": Rebuilt()})
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, record in (("data.pkl", data.getvalue()), ("byteorder", b"little"),
                         ("data/0", torch.arange(16.0).numpy().tobytes())):
        writer.write_record(name, record, len(record))
    writer.write_end_of_file()


def test_a_storage_claiming_more_than_its_record_is_refused(tmp_path):
    """Mapped, the storage ran on past its record: the zip's directory read as weights."""
    _checkpoint_claiming(tmp_path / "honest.pt", 16)
    assert torch.equal(load_state_dict(tmp_path / "honest.pt")["w"], torch.arange(16.0))
    _checkpoint_claiming(tmp_path / "claims.pt", 48)
    refused(tmp_path / "claims.pt", "record size", "does not match")


def test_legacy_and_code_running_checkpoints_are_refused_with_the_reason(tmp_path):
    """A legacy (pre-zip) pickle allocates every storage it claims before reading any; a
    pickle that runs os.system was told it is not a checkpoint (torch 2.13 spells its
    "unsupported GLOBAL" otherwise)."""
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    refused(tmp_path / "legacy.pt", "legacy format", "torch 1.6")

    class Runs:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"w": Runs()}, tmp_path / "runs.pt")
    refused(tmp_path / "runs.pt", "would run code")


def test_a_bool_tensor_of_other_bytes_in_a_torch_file_is_refused(tmp_path):
    flags = torch.tensor([2, 3, 0, 1], dtype=torch.uint8).view(torch.bool)
    torch.save({"mask": flags}, tmp_path / "flags.pt")
    refused(tmp_path / "flags.pt", "bool tensor 'mask'", "other than 0 and 1")


def test_a_shard_index_giving_a_tensor_twice_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s0.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "s0.safetensors", "a": "s1.safetensors"}}')
    refused(tmp_path, "key 'a' is given twice")


def test_a_large_tensor_is_mapped_while_it_lives_and_writes_never_reach_the_file(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"small": torch.ones(4), "big": torch.arange(1 << 19, dtype=torch.float32)}, path)
    before = path.read_bytes()
    state = load_state_dict(path)
    assert isinstance(state, qlis.models.checkpoints.MappedState) and _mapped(path) == 0
    big = state["big"]
    small = state["small"]  # read into memory: no mapping
    assert _mapped(path) == 1 and small.tolist() == [1.0] * 4
    big[:10] = -1  # copy-on-write: this tensor only
    assert state["big"][:10].tolist() == list(range(10)) and path.read_bytes() == before
    del big
    assert _mapped(path) == 0  # released with its tensor: a pass holds what it uses


def test_read_safetensors_into_fills_a_model_in_place(tmp_path):
    """Every dtype, a 0-d and an empty tensor, unaligned data, and a stored dtype that differs
    from the model's (converted as load_state_dict would): read into the model's own memory."""
    state = {"w": torch.randn(5, 3), "half": torch.randn(7).half(), "b": torch.randn(3).bfloat16(),
             "mask": torch.tensor([True, False, True]), "step": torch.tensor(41),
             "empty": torch.zeros(0, 4), "u": torch.arange(3, dtype=torch.uint8)}
    path = tmp_path / "m.safetensors"
    save_file(state, path)
    model = {name: torch.zeros_like(t) for name, t in state.items()}
    model["half"] = torch.zeros(7)  # float32 in the model, float16 in the file
    pointers = {name: t.data_ptr() for name, t in model.items()}
    qlis.models.checkpoints.read_safetensors_into(path, model)
    for name, tensor in state.items():
        assert torch.equal(model[name], tensor.to(model[name].dtype)), name
        assert model[name].data_ptr() == pointers[name]  # no new tensors: the model's own


@pytest.mark.parametrize(("change", "words"), [
    (lambda m: m.pop("w"), "not the model's"),
    (lambda m: m.update(extra=torch.zeros(1)), "not the model's"),
    (lambda m: m.update(w=torch.zeros(3, 5)), r"has shape \[5, 3\]"),
    (lambda m: m.update(w=torch.zeros(3, 5).t()), "not contiguous"),
])
def test_read_safetensors_into_refuses_a_model_it_does_not_fit_before_reading(
        tmp_path, change, words):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(5, 3), "v": torch.randn(2)}, path)
    model = {"w": torch.zeros(5, 3), "v": torch.zeros(2)}
    change(model)
    with pytest.raises(InputError, match=words):
        qlis.models.checkpoints.read_safetensors_into(path, model)
    assert all(not t.any() for t in model.values())  # nothing was read


def test_read_safetensors_into_refuses_corrupt_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4)}, path)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(InputError, match="not a readable safetensors file"):
        qlis.models.checkpoints.read_safetensors_into(path, {"w": torch.zeros(4)})
    header = {"m": entry("BOOL", [2], 0, 2)}
    path.write_bytes(safetensors_bytes(header, b"\x01\x07"))
    with pytest.raises(InputError, match="bool tensor"):
        qlis.models.checkpoints.read_safetensors_into(path, {"m": torch.zeros(2, dtype=torch.bool)})


@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E5M2", "X"]),
            st.lists(st.integers(0, 5), max_size=3),
            st.sampled_from([0, 0, 0, -1, 2]),  # mostly valid offsets, sometimes not
        ),
        max_size=4,
    ),
    extra=st.sampled_from([0, 0, 0, -3, 1]),
)
def test_fuzzed_safetensors_headers_load_right_or_get_one_line(tmp_path_factory, entries,
                                                                extra):
    widths = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F8_E5M2": 1, "X": 1}
    header, offset = {}, 0
    for i, (dtype, shape, skew) in enumerate(entries):
        size = int(np.prod(shape)) * widths[dtype]
        header[f"t{i}"] = entry(dtype, shape, offset, max(offset, offset + size + skew))
        offset = max(offset, offset + size + skew)
    data = bytes(max(0, offset + extra))
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    try:
        state = load_state_dict(path)
    except InputError as err:
        assert "\n" not in str(err)
        return
    with safe_open(str(path), "pt") as f:
        assert all(torch.equal(state[n], f.get_tensor(n)) for n in f.offset_keys())


# 7. Writing safetensors: metadata, names safetensors cannot hold, atomic, full disk


def layout_of(state: dict[str, torch.Tensor]) -> list:
    return [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in state.items()]


def test_write_safetensors_carries_metadata(tmp_path):
    source = tmp_path / "source.safetensors"
    state = {"w": torch.randn(3, 2), "b": torch.arange(4), "m": torch.tensor([True, False])}
    save_file(state, source, metadata={"format": "pt", "note": "é"})
    metadata = read_metadata(source)
    assert metadata == {"format": "pt", "note": "é"}
    out = tmp_path / "out.safetensors"
    write_safetensors(out, layout_of(state), state.__getitem__, metadata=metadata)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == metadata
        assert all(torch.equal(f.get_tensor(n), state[n]) for n in state)
    torch.save(state, tmp_path / "m.pt")
    assert read_metadata(tmp_path / "m.pt") is None
    folder = sharded_folder(tmp_path)
    save_file({"v": torch.ones(1)}, folder / "model-1.safetensors",
              metadata={"format": "pt", "shard": "1"})
    save_file({"w": torch.ones(1)}, folder / "model-2.safetensors",
              metadata={"format": "pt", "shard": "2"})
    weight_map = {"v": "model-1.safetensors", "w": "model-2.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert read_metadata(folder) == {"format": "pt"}  # what every shard agrees on


@pytest.mark.parametrize("jobs", [1, 3])
def test_write_safetensors_places_every_tensor_despite_short_writes(tmp_path, monkeypatch, jobs):
    """Threads write each tensor at its offset; a write the kernel cuts short is resumed."""
    state = {"e": torch.zeros(0, 3), "w": torch.randn(5, 7), "s": torch.tensor(2.5),
             "h": torch.randn(9).half(), "b": torch.arange(6)}
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pwrite(fd, data[:5], offset))
    out = tmp_path / "out.safetensors"
    write_safetensors(out, layout_of(state), state.__getitem__, jobs=jobs)
    monkeypatch.undo()
    reference = tmp_path / "reference.safetensors"
    save_file(state, reference)
    with safe_open(str(out), "pt") as f:
        assert all(torch.equal(f.get_tensor(n), state[n]) for n in state)
    assert out.stat().st_size == reference.stat().st_size


@pytest.mark.parametrize("jobs", [1, 2])
def test_write_safetensors_takes_a_tensor_in_pieces(tmp_path, jobs):
    """A tensor given as consecutive flat pieces lands as the whole tensor would; pieces that
    add up to fewer or more values than announced, or of another dtype, are refused and
    leave nothing."""
    state = {"w": torch.randn(6, 5), "e": torch.zeros(0, 2), "h": torch.randn(7).half()}

    def pieces(name: str):
        flat = state[name].reshape(-1)
        return (flat[i : i + 4] for i in range(0, flat.numel(), 4))

    out = tmp_path / "out.safetensors"
    write_safetensors(out, layout_of(state), pieces, jobs=jobs)
    reference = tmp_path / "reference.safetensors"
    write_safetensors(reference, layout_of(state), state.__getitem__)
    assert out.read_bytes() == reference.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    for supplied, words in [([torch.ones(4), torch.ones(5)], "fewer values"),
                         ([torch.ones(4), torch.ones(7)], "read as more values"),
                         ([torch.ones(10, dtype=torch.float64)], "torch.float64 values")]:
        with pytest.raises(InputError, match=words):
            write_safetensors(bad / "o.safetensors", [("w", "float32", [2, 5])],
                              lambda _, supplied=supplied: iter(supplied), jobs=jobs)
        assert list(bad.iterdir()) == []


@pytest.mark.parametrize(
    "name, metadata, words",
    [
        ("__metadata__", None, ("reserved by safetensors",)),
        ("w\ud800", None, ("'w\\ud800'", "lone surrogate")),
        ("w", {"k": 1}, ("is a int",)),
        ("w", {"k": "\udc80"}, ("lone surrogate",)),
    ],
)
def test_write_safetensors_refuses_what_safetensors_cannot_hold(tmp_path, name, metadata,
                                                                 words):
    out = tmp_path / "out.safetensors"
    with pytest.raises(InputError) as info:
        write_safetensors(out, [(name, "float32", [2])], lambda _: torch.ones(2),
                          metadata=metadata)
    assert all(w in str(info.value) for w in words), info.value
    assert list(tmp_path.iterdir()) == []


def test_write_safetensors_reports_a_full_disk_in_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out.safetensors"

    def read(name: str) -> torch.Tensor:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(InputError, match="No space left on device"):
        write_safetensors(out, [("w", "float32", [2])], read)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="was read as torch.float64"):
        write_safetensors(out, [("w", "float32", [2])], lambda _: torch.ones(2).double())
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"keep")
    with pytest.raises(InputError, match="exists"):
        write_safetensors(out, [("w", "float32", [2])], lambda _: torch.ones(2), overwrite=False)
    assert out.read_bytes() == b"keep"


def test_a_full_disk_while_sharding_names_the_shard_not_its_hidden_partial(tmp_path):
    def read(name: str) -> torch.Tensor:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(InputError) as info:
        write_sharded_safetensors(tmp_path, [("w", "float32", [2])], read, 1 << 20)
    assert str(info.value).startswith(
        f"{tmp_path / 'model-00001-of-00001.safetensors'}: could not be written (No space")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_write_safetensors_on_a_real_full_device(tmp_path, monkeypatch):
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):  # the temporary file lands on /dev/full
        return real_open("/dev/full", mode, *args, **kwargs) if "w" in mode else real_open(
            file, mode, *args, **kwargs)

    monkeypatch.setattr(qlis.models.checkpoints, "open", full_open, raising=False)
    out = tmp_path / "out.safetensors"
    with pytest.raises(InputError, match="No space left on device"):
        write_safetensors(out, [("w", "float32", [2**16])], lambda _: torch.ones(2**16))
    assert list(tmp_path.iterdir()) == []


# 8. State dicts and modules given from Python


def test_as_state_dict_validates_like_the_file_readers():
    for kind, tensor in odd_tensors().items():
        with pytest.raises(InputError, match="'odd'"):
            as_state_dict({"fine": torch.ones(2), "odd": tensor})
        assert kind
    with pytest.raises(InputError, match="is a int, not a tensor"):
        as_state_dict({"w": 3})
    with pytest.raises(InputError, match="names must be strings"):
        as_state_dict({0: torch.ones(2)})
    with pytest.raises(InputError, match="repeats its elements"):
        as_state_dict({"w": torch.zeros(1).expand(20000, 20000)})
    with pytest.raises(InputError, match="tensor subclass"):
        as_state_dict({"w": torch.nn.parameter.UninitializedParameter()})


def test_as_state_dict_keeps_views_and_tied_weights_without_copies():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    model[1].weight = torch.nn.Parameter(torch.randn(10, 4))
    model[0].weight = model[1].weight  # tied
    state = as_state_dict(model)
    assert state["0.weight"].data_ptr() == state["1.weight"].data_ptr()
    assert type(state["0.weight"]) is torch.Tensor and not state["0.weight"].requires_grad
    small = torch.randn(4).expand(3, 4)
    assert as_state_dict({"b": small})["b"].data_ptr() == small.data_ptr()  # not copied
    assert list(checked_state([("w", torch.ones(1))])) == ["w"]


# The command line: each class ends in one line on stderr and exit code 2


def test_the_cli_gives_one_line_for_each_class(tmp_path):
    from click.testing import CliRunner

    from qlis.cli.main import cli

    files = {}
    files["expand"] = tmp_path / "expand.pt"
    torch.save({"w": torch.zeros(1).expand(20000, 20000)}, files["expand"])
    files["qint8"] = tmp_path / "q.pt"
    torch.save({"w": odd_tensors()["qint8"]}, files["qint8"])
    files["fifo"] = tmp_path / "fifo.pt"
    os.mkfifo(files["fifo"])
    files["escape"] = sharded_folder(tmp_path, "../m.pt")
    files["header"] = tmp_path / "h.safetensors"
    files["header"].write_bytes(safetensors_bytes({"a": entry("F32", [1] * 65, 0, 4)}, bytes(4)))
    for kind, path in files.items():
        for args in (["inspect", str(path)], ["pack", str(path), "-o", str(tmp_path / "o.qlis")]):
            result = CliRunner().invoke(cli, args)
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1, (kind, result.stderr)
            assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.qlis").exists()


def test_a_damaged_pt_record_is_refused_not_loaded(tmp_path):
    """torch.load never checks a zip checkpoint's CRC-32s: a flipped byte in a tensor's
    record would be packed silently."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.full((256,), 1.5)}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.full((256,), 1.5))
    data = bytearray(path.read_bytes())
    at = data.find(np.float32(1.5).tobytes() * 4)
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    refused(path, "damaged", "CRC-32")


def test_a_pt_record_size_past_the_end_is_named(tmp_path):
    """A zip record whose central-directory size runs past the file raised a bare EOFError:
    the message read 'damaged ()'."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.full((256,), 1.5)}, path)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02", data.find(b"data/0") - 200)
    struct.pack_into("<II", data, at + 20, 0xFFFFFFF0, 0xFFFFFFF0)
    path.write_bytes(bytes(data))
    assert "()" not in refused(path, "damaged (")


def test_a_checkpoint_whose_records_are_compressed_is_refused(tmp_path):
    """torch.load maps a record's bytes as the tensor's: a deflated .pt loaded (and packed)
    as garbage, silently."""
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.randn(16, 16)}, plain)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(deflated, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED)
    assert torch.equal(load_state_dict(plain)["w"], torch.load(plain)["w"])
    with pytest.raises(InputError, match="is compressed"):
        load_state_dict(deflated)


def test_a_safetensors_file_that_cannot_be_mapped_is_an_input_error(tmp_path, monkeypatch):
    """Under an address-space limit, mapping a large file raised MemoryError: a traceback."""
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(4, 4)}, path)

    def refuse(*args, **kwargs):
        raise MemoryError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr(qlis.models.checkpoints, "safe_open", refuse)
    with pytest.raises(InputError, match="cannot be mapped into memory"):
        load_state_dict(path)
