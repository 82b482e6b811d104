"""Crafted quantizer parameters: one clear ArchiveError from every reader, never a traceback.

For every built-in quantizer config a real archive is written, then its parameters (and the
header fields they depend on: n_levels, group_size, the codes) are mutated: a key dropped or
added, another dtype or shape, NaN/inf/0/negative values, an unsorted or short codebook, a
huge group size, codes beyond the grid. ``qlis.load``, the low-bit runtime and ``qlis info
--verify`` must each refuse such a file with one line, within a small memory bound. Every
crafted file carries correct CRCs, so the reader really gets to the parameters.
"""

from __future__ import annotations

import copy
import resource
import sys
from collections.abc import Callable

import google_crc32c
import numpy as np
import pytest
import torch
from archive_layout import build, split
from cli_helpers import one_line_error, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qlis
from qlis.archive.codecs import get_codec
from qlis.archive.file import write_tensors
from qlis.archive.format import ALIGN
from qlis.cli.main import cli
from qlis.errors import ArchiveError
from qlis.models.tensors import same_bits
from qlis.quantize.quantizers import get_quantizer

NAME = "fc.weight"
MEMORY_BOUND = 50 << 20  # bytes a refused tiny file may add to the process's peak
TMP_FIXTURE = [HealthCheck.function_scoped_fixture]

# config, and each stored parameter's kind: what values it may hold
CONFIGS: dict[str, tuple[dict, dict[str, str]]] = {
    "uniform-tensor": ({"id": "uniform", "step": 0.005}, {"step": "scale", "offset": "offset"}),
    "uniform-channel": ({"id": "uniform", "step": 0.05, "granularity": "channel"},
                        {"step": "scale", "offset": "offset"}),
    "affine-tensor": ({"id": "affine", "bits": 8}, {"scale": "scale", "zero_point": "zero"}),
    "affine-channel": ({"id": "affine", "bits": 4, "granularity": "channel"},
                       {"scale": "scale", "zero_point": "zero"}),
    "group-symmetric": ({"id": "group", "bits": 4, "group_size": 8, "symmetric": True},
                        {"scale": "scale"}),
    "group-asymmetric": ({"id": "group", "bits": 4, "group_size": 8},
                         {"scale": "scale", "zero_point": "zero"}),
    "kmeans": ({"id": "kmeans", "bits": 3}, {"codebook": "codebook"}),
    "binary": ({"id": "binary", "granularity": "channel"}, {"alpha": "alpha"}),
}


class Net(nn.Module):
    """A quantized Linear in a module (the low-bit runtime replaces it in its parent)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


# -- crafting files ----------------------------------------------------------------------------


class Crafted:
    """A header and data section being edited; new records go at the end with their CRC."""

    def __init__(self, header: dict, data: bytes) -> None:
        self.header = copy.deepcopy(header)
        self.data = bytearray(data)
        self.entry = next(t for t in self.header["tensors"] if t["name"] == NAME)
        self.params = {
            key: np.frombuffer(self.record(r), np.dtype(r["dtype"]).newbyteorder("<"))
            .reshape(r["shape"]).astype(r["dtype"])
            for key, r in self.entry["params"].items()
        }

    def record(self, record: dict) -> bytes:
        return bytes(self.data[record["offset"] : record["offset"] + record["length"]])

    def add(self, blob: bytes) -> dict:
        self.data += bytes(-len(self.data) % ALIGN)
        record = {"offset": len(self.data), "length": len(blob),
                  "crc32c": google_crc32c.value(blob)}
        self.data += blob
        return record

    def set_param(self, key: str, array: np.ndarray | None) -> None:
        """Store ``array`` as parameter ``key`` (None: drop it)."""
        if array is None:
            self.entry["params"].pop(key, None)
            self.params.pop(key, None)
            return
        array = np.asarray(array)
        little = array.astype(array.dtype.newbyteorder("<"))
        self.entry["params"][key] = {"shape": list(array.shape), "dtype": array.dtype.name,
                                     **self.add(little.tobytes())}
        self.params[key] = array

    def set_codes(self, codes: np.ndarray) -> None:
        self.entry["codec"] = {"id": "raw"}
        self.entry["data"] = self.add(np.ascontiguousarray(codes).tobytes())

    def codes(self) -> np.ndarray:
        assert self.entry["codec"]["id"] == "raw"
        width = np.uint8 if self.entry["n_levels"] <= 256 else np.dtype("<u2")
        return np.frombuffer(self.record(self.entry["data"]), width).copy()

    def file_bytes(self) -> bytes:
        return build(self.header, bytes(self.data))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[dict, bytes]]:
    """A real archive per config (raw codes, so that codes can be rewritten)."""
    folder = tmp_path_factory.mktemp("params")
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc.weight[:, ::5] = 0.0  # pruned weights: kmeans' zero entry, binary's 3 levels
    files = {}
    for name, (config, _) in CONFIGS.items():
        path = qlis.save(qlis.compress(model, "quant", quantizer=config), folder / f"{name}.qlis",
                         codec="raw")
        files[name] = split(path.read_bytes())
    return files


# -- what every reader must do with a crafted file ---------------------------------------------


def _peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak << 10


def _refused_by_load(path, model: nn.Module | None = None, **kwargs) -> str:
    with pytest.raises(ArchiveError) as caught:
        qlis.load(path, model=model, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and NAME in message, message
    return message


def assert_refused(path, lowbit: bool = True) -> str:
    """Refused by the float loader, the low-bit loader and ``qlis info --verify``, each in
    one line naming the tensor, without raising the process's peak memory noticeably."""
    before = _peak_bytes()
    message = _refused_by_load(path)
    if lowbit:
        with torch.device("meta"):
            model = Net()
        _refused_by_load(path, model, runtime="lowbit")
        assert model.fc.weight.is_meta  # untouched
    line = one_line_error(cli, "qlis: error:", "info", "--verify", path)
    assert NAME in line
    assert _peak_bytes() - before < MEMORY_BOUND
    return message


def refused_or_read(path) -> str:
    """'ok' when every reader reads the file, 'refused' when every one refuses it in one line;
    any other exception propagates."""
    before = _peak_bytes()
    try:
        qlis.load(path)
    except ArchiveError as err:
        assert "\n" not in str(err)
        assert_refused(path)
        return "refused"
    with torch.device("meta"):
        model = Net()
    qlis.load(path, model=model, runtime="lowbit")
    assert run(cli, "info", "--verify", path).exit_code == 0
    assert _peak_bytes() - before < MEMORY_BOUND
    return "ok"


# -- mutations that no quantizer writes ---------------------------------------------------------

Mutation = Callable[[Crafted, str], None]


def _at(value: float, index: int = 0) -> Mutation:
    def mutate(c: Crafted, key: str) -> None:
        array = c.params[key].copy()
        array.reshape(-1)[index % array.size] = value
        c.set_param(key, array)
    return mutate


def _shifted(delta: float, index: int = 0) -> Mutation:
    def mutate(c: Crafted, key: str) -> None:
        array = c.params[key].copy()
        array.reshape(-1)[index % array.size] += delta
        c.set_param(key, array)
    return mutate


def _negated(c: Crafted, key: str) -> None:
    array = c.params[key].copy()
    flat = array.reshape(-1)
    flat[np.argmax(np.abs(flat))] *= -1
    c.set_param(key, array)


def _other_dtype(c: Crafted, key: str) -> None:
    array = c.params[key]
    c.set_param(key, array.astype(np.float16 if array.dtype == np.float32 else np.float32))


def _one_per_row(c: Crafted, key: str) -> None:
    """A parameter shaped per row where one per tensor is stored, and vice versa."""
    array = c.params[key]
    rows = c.entry["shape"][0]
    if array.size == 1:
        c.set_param(key, np.repeat(array.reshape(-1), rows))
    else:
        c.set_param(key, array.reshape(-1)[:1].copy())


def _unsorted(c: Crafted, key: str) -> None:
    array = c.params[key].copy()
    array[[0, -1]] = array[[-1, 0]]
    c.set_param(key, array)


def _top(c: Crafted) -> int:
    return c.entry["n_levels"] - 1


MUTATIONS: dict[str, dict[str, Mutation]] = {
    "any": {
        "dropped": lambda c, key: c.set_param(key, None),
        "other dtype": _other_dtype,
        "one more value": lambda c, key: c.set_param(key, np.append(c.params[key].reshape(-1),
                                                                     c.params[key].flat[-1])),
        "extra axis": lambda c, key: c.set_param(key, c.params[key][None]),
        "one per row or tensor": _one_per_row,
        "NaN": _at(float("nan")),
        "inf": _at(float("inf"), -1),
        "-inf": _at(float("-inf")),
    },
    "scale": {"zero": _at(0.0, -1), "negative": _negated,
              "finite, but its top code's value is not": _at(1e38, -1)},
    "zero": {
        "beyond the top code": lambda c, key: _at(_top(c) + 1)(c, key),
        "below code 0": _at(-1.0, -1),
        "a fraction": _shifted(0.5),
    },
    "offset": {"a fraction": _shifted(0.5)},
    "alpha": {"negative": _at(-1.0)},
    "codebook": {
        "unsorted": _unsorted,
        "one entry short": lambda c, key: c.set_param(key, c.params[key][:-1].copy()),
    },
}


def _levels_plus_one(c: Crafted) -> None:
    c.entry["n_levels"] += 1


def _huge_group(c: Crafted) -> None:
    c.entry["quantizer"]["group_size"] = 1 << 26


def _codes_beyond(c: Crafted) -> None:
    codes = c.codes()
    codes[3] = c.entry["n_levels"]
    c.set_codes(codes)


def _unknown_param(c: Crafted) -> None:
    c.set_param("bogus", np.ones(1, np.float32))


def header_mutations(name: str) -> dict[str, Callable[[Crafted], None]]:
    """Mutations of the entry itself that make its parameters or codes wrong for it."""
    config, _ = CONFIGS[name]
    found = {"unknown parameter": _unknown_param}
    if config["id"] != "uniform":  # an unbounded grid takes any alphabet
        found["n_levels + 1"] = _levels_plus_one
    if config["id"] == "group":
        found["group size 2**26"] = _huge_group
    if name != "affine-tensor":  # 256 levels: every uint8 code is on the grid
        found["codes beyond the grid"] = _codes_beyond
    return found


CASES = sorted(
    [(name, key, label) for name, (_, kinds) in CONFIGS.items() for key, kind in kinds.items()
     for label in (*MUTATIONS["any"], *MUTATIONS[kind])]
    + [(name, None, label) for name in CONFIGS for label in header_mutations(name)],
    key=str,
)


def crafted(bases, name: str, key: str | None, label: str) -> Crafted:
    c = Crafted(*bases[name])
    if key is None:
        header_mutations(name)[label](c)
    else:
        kind = CONFIGS[name][1][key]
        (MUTATIONS["any"] | MUTATIONS[kind])[label](c, key)
    return c


@pytest.mark.parametrize("name, key, label", CASES, ids=[" ".join(map(str, c)) for c in CASES])
def test_crafted_parameters_are_refused_by_every_reader(tmp_path, bases, name, key, label):
    path = tmp_path / "h.qlis"
    path.write_bytes(crafted(bases, name, key, label).file_bytes())
    message = assert_refused(path)
    if key is not None:
        assert repr(key) in message  # names the parameter


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_base_files_read(tmp_path, bases, name):
    path = tmp_path / "b.qlis"
    path.write_bytes(Crafted(*bases[name]).file_bytes())
    assert refused_or_read(path) == "ok"


@settings(max_examples=60, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(data=st.data())
def test_bad_values_anywhere_are_refused(tmp_path, bases, data):
    """NaN, inf, zero or negative at any index of a scale or step; NaN or inf anywhere."""
    name = data.draw(st.sampled_from(sorted(CONFIGS)))
    kinds = CONFIGS[name][1]
    key = data.draw(st.sampled_from(sorted(kinds)))
    bad = [float("nan"), float("inf"), float("-inf")]
    if kinds[key] == "scale":
        bad.append(st.floats(max_value=0.0, allow_nan=False))
    elif kinds[key] == "alpha":
        bad.append(st.floats(max_value=-1e-30, allow_nan=False))
    value = data.draw(st.one_of(*(v if isinstance(v, st.SearchStrategy) else st.just(v)
                                  for v in bad)))
    c = Crafted(*bases[name])
    _at(value, data.draw(st.integers(0, 1 << 10)))(c, key)
    path = tmp_path / "v.qlis"
    path.write_bytes(c.file_bytes())
    assert_refused(path)


@settings(max_examples=60, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(data=st.data())
def test_combined_mutations_are_refused_or_read(tmp_path, bases, data):
    """Several mutations at once (some may undo others): every reader agrees, and nothing
    but an ArchiveError comes out."""
    name = data.draw(st.sampled_from(sorted(CONFIGS)))
    c = Crafted(*bases[name])
    for _ in range(data.draw(st.integers(1, 3))):
        options = [(None, label) for label in header_mutations(name)]
        # a parameter an earlier mutation emptied has no value left to mutate
        options += [(key, label) for key, kind in CONFIGS[name][1].items()
                    if key in c.params and c.params[key].size
                    for label in (*MUTATIONS["any"], *MUTATIONS[kind])]
        key, label = data.draw(st.sampled_from(options))
        if key is None:
            header_mutations(name)[label](c)
        else:
            (MUTATIONS["any"] | MUTATIONS[CONFIGS[name][1][key]])[label](c, key)
    path = tmp_path / "m.qlis"
    path.write_bytes(c.file_bytes())
    assert refused_or_read(path) in ("ok", "refused")


# -- a tiny file that would decode to a large tensor --------------------------------------------


def test_parameters_are_checked_before_the_codes_are_decoded(tmp_path, bases):
    """4096 x 4096 constant codes take 6 bytes of ans: with a NaN scale the file is refused
    before 16 MB of codes and 64 MB of floats are allocated."""
    c = Crafted(*bases["affine-tensor"])
    c.entry["shape"] = [4096, 4096]
    c.entry["codec"] = {"id": "ans"}
    c.entry["data"] = c.add(get_codec("ans").encode(np.zeros(1 << 24, np.uint8)))
    _at(float("nan"))(c, "scale")
    path = tmp_path / "bomb.qlis"
    path.write_bytes(c.file_bytes())
    assert path.stat().st_size < 4096
    assert_refused(path, lowbit=False)


# -- what qlis writes, it reads -----------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(config=st.sampled_from([config for config, _ in CONFIGS.values()]),
       shape=st.sampled_from([(), (0, 4), (5,), (6, 24), (3, 2, 3, 3), (4, 9)]),
       fill=st.sampled_from(["normal", "zeros", "positive", "pruned"]),
       seed=st.integers(0, 2**31 - 1))
def test_every_builtin_quantizer_writes_what_it_reads(tmp_path, config, shape, fill, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    if fill == "zeros":
        weight = torch.zeros(shape)
    elif fill == "positive":  # one sign: uniform's offset lies outside its codes
        weight = weight.abs() + 3.0
    elif fill == "pruned":
        weight = torch.where(torch.rand(shape, generator=gen) < 0.5, 0.0, weight)
    q = get_quantizer(config).quantize(weight)
    path = write_tensors(tmp_path / "w.qlis", {"w": q})
    with qlis.open(path) as archive:
        assert archive.read_params("w").keys() == q.params.keys()
        assert same_bits(archive.read("w"), q.dequantize())


def test_the_writer_refuses_parameters_the_reader_would(tmp_path):
    q = get_quantizer({"id": "kmeans", "bits": 2}).quantize(torch.randn(4, 8))
    q.params["codebook"] = q.params["codebook"][::-1].copy()
    with pytest.raises(qlis.InputError, match="w: .*'codebook' must be sorted"):
        write_tensors(tmp_path / "w.qlis", {"w": q})
    assert not (tmp_path / "w.qlis").exists()
