"""Hand-crafted and generated hostile .qlis headers: one clear ArchiveError, never a traceback.

Every crafted file here carries a correct header CRC (and correct record CRCs where the record
lies in the file), so the reader really parses and validates what it is given.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import google_crc32c
import pytest
import torch
from archive_layout import build, split
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import qlis
from qlis.archive.file import write_tensors
from qlis.archive.format import (
    ALIASES_VERSION,
    ALIGN,
    COMPACT_VERSION,
    MAGIC,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    PREFIX,
    VERSION,
    read_header_file,
    scan_json,
)
from qlis.cli.main import cli
from qlis.errors import ArchiveError

TMP_FIXTURE = [HealthCheck.function_scoped_fixture]
LIMIT = 256 << 20  # decoded-bytes limit for generated files: keeps the fuzz light on memory


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[dict, bytes]:
    gen = torch.Generator().manual_seed(0)
    state = {
        "fc.weight": torch.randn(8, 12, generator=gen),
        "fc.bias": torch.randn(8, generator=gen),
        "emb.weight": torch.randn(6, 4, generator=gen).half(),
        "steps": torch.tensor(3),
    }
    path = tmp_path_factory.mktemp("hostile") / "m.qlis"
    qlis.save(qlis.compress(state, "lapq", granularity="channel"), path, codec="ans")
    return split(path.read_bytes())


def outcome(tmp_path, data: bytes) -> str:
    """'ok' for a valid read, 'refused' for an ArchiveError; anything else propagates."""
    path = tmp_path / "h.qlis"
    path.write_bytes(data)
    try:
        state = qlis.load(path, max_decoded_bytes=LIMIT)
    except ArchiveError as err:
        assert "\n" not in str(err)
        return "refused"
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    return "ok"


def _is_int(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**32


def quantized(header: dict) -> dict:
    return next(e for e in header["tensors"] if "quantizer" in e)


def plain(header: dict) -> dict:
    return next(e for e in header["tensors"] if "quantizer" not in e)


def first_param(header: dict) -> dict:
    return next(iter(quantized(header)["params"].values()))


# Each class of attack from the issue, with several members; every one must be refused.
CASES = {
    # numbers JSON allows but nothing should hold
    "5000-digit int": lambda h: b'{"format":"qlis","version":2,"tensors":[],"x":' + b"9" * 5000
    + b"}",
    "25-digit offset": lambda h: quantized(h)["data"].update(offset=10**25),
    "negative offset": lambda h: quantized(h)["data"].update(offset=-64),
    "crc over 32 bits": lambda h: quantized(h)["data"].update(crc32c=1 << 40),
    "crc a string with a newline and an escape": lambda h: quantized(h)["data"].update(
        crc32c="\n\x1b[2J"),
    "summary ratio a string with a newline": lambda h: h["summary"].update(cr="1\n2"),
    "float length": lambda h: quantized(h)["data"].update(length=3.0),
    "bool length": lambda h: quantized(h)["data"].update(length=True),
    "NaN in plan": lambda h: json.dumps(h).replace('"k": ', '"k": NaN, "x": ', 1).encode(),
    "Infinity summary": lambda h: json.dumps(h).replace('"cr": ', '"cr": Infinity, "y": ', 1)
    .encode(),
    "1e999": lambda h: json.dumps(h).replace('"qlis": ', '"qlis": 1e999, "z": ', 1).encode(),
    "1E+999 in compression": lambda h: json.dumps(h).replace('"beta": ', '"beta": 1E+999, "z": ', 1)
    .encode(),
    "20-digit integer": lambda h: h.update(compression={"seed": 10**19}),
    "duplicate key among colons in strings": lambda h: json.dumps(
        dict(h, metadata={"a:b": "c:d", "e": "f"})).replace('"e": "f"', '"e": "f", "e": "g"')
    .encode(),
    # entries missing fields
    **{
        f"missing {key}": (lambda field: lambda h: quantized(h).pop(field))(key)
        for key in ("shape", "dtype", "codec", "data", "n_levels", "params")
    },
    "missing crc": lambda h: plain(h)["data"].pop("crc32c"),
    "missing param shape": lambda h: first_param(h).pop("shape"),
    "missing param dtype": lambda h: first_param(h).pop("dtype"),
    "entry is a list": lambda h: h["tensors"].append(["x"]),
    "unknown entry field": lambda h: plain(h).update(extra=1),
    # wrong JSON types
    "params a list": lambda h: quantized(h).update(params=[1, 2]),
    "params a string": lambda h: quantized(h).update(params="scale"),
    "param a number": lambda h: quantized(h)["params"].update(scale=3),
    "param dtype float64": lambda h: first_param(h).update(dtype="float64"),
    "plan a list": lambda h: quantized(h).update(plan=[0.5]),
    "plan bits a string": lambda h: quantized(h)["plan"].update(bits="4"),
    "plan reconstruction a number": lambda h: quantized(h)["plan"].update(reconstruction=1),
    "plan reconstruction too long": lambda h: quantized(h)["plan"].update(
        reconstruction="x" * 201),
    "writer a string": lambda h: h.update(writer="qlis"),
    "compression a list": lambda h: h.update(compression=[1]),
    "summary nested": lambda h: h.update(summary={"cr": {"a": 1}}),
    "metadata number": lambda h: h.update(metadata={"a": 1}),
    "version string": lambda h: h.update(version="2"),
    # shapes
    "33 dims": lambda h: plain(h).update(shape=[1] * (MAX_DIMS + 1)),
    "65 dims": lambda h: plain(h).update(shape=[1] * 65),
    "bool dims": lambda h: plain(h).update(shape=[True, True]),
    "float dims": lambda h: plain(h).update(shape=[2.0]),
    "zero-size overflow": lambda h: plain(h).update(shape=[0, 1 << 40, 1 << 40]),
    "zero-size 62-bit": lambda h: plain(h).update(shape=[0] + [1 << 62] * 4),
    "huge dim": lambda h: plain(h).update(shape=[1 << 63]),
    "negative dim": lambda h: plain(h).update(shape=[-8]),
    # codecs and quantizers
    "auto codec": lambda h: quantized(h).update(codec={"id": "auto"}),
    "auto in auto": lambda h: quantized(h).update(
        codec={"id": "auto", "candidates": [{"id": "auto", "candidates": [{"id": "auto"}]}]}
    ),
    "nested codec param": lambda h: quantized(h).update(codec={"id": "ans", "x": {"id": "ans"}}),
    "unknown codec": lambda h: quantized(h).update(codec={"id": "zstd"}),
    "codec id a number": lambda h: quantized(h).update(codec={"id": 7}),
    "unknown quantizer": lambda h: quantized(h).update(quantizer={"id": "evil"}),
    "nested quantizer": lambda h: quantized(h).update(quantizer={"id": "affine", "bits": [8]}),
    "quantized int dtype": lambda h: quantized(h).update(dtype="int64"),
    "alphabet 65537": lambda h: quantized(h).update(n_levels=65537),
    "alphabet 0": lambda h: quantized(h).update(n_levels=0),
    # records
    "overlap": lambda h: plain(h)["data"].update(offset=quantized(h)["data"]["offset"]),
    "unaligned": lambda h: plain(h)["data"].update(offset=plain(h)["data"]["offset"] + 1),
    "duplicate key": lambda h: json.dumps(h).replace('"dtype": ', '"dtype": "x", "dtype": ', 1)
    .encode(),
    "non-ascii": lambda h: json.dumps(h, ensure_ascii=False).replace("fc.bias", "fc.bïas")
    .encode(),
    # decompression bombs: declared sizes over the limit, checked before allocation
    "float64 bomb": lambda h: plain(h).update(shape=[1 << 17, 1 << 17], dtype="float64"),
    "code bomb": lambda h: quantized(h).update(shape=[1 << 20, 1 << 10]),
    "many small bombs": lambda h: h["tensors"].extend(
        dict(copy.deepcopy(plain(h)), name=f"b{i}", shape=[1 << 22]) for i in range(20)
    ),
    # old and future versions
    "version 1": lambda h: h.update(version=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_headers_are_refused_in_one_line(tmp_path, base, case):
    header, data = copy.deepcopy(base[0]), base[1]
    changed = CASES[case](header)
    raw = changed if isinstance(changed, bytes) else json.dumps(header).encode()
    assert outcome(tmp_path, build(raw, data)) == "refused"


def test_the_base_file_reads(tmp_path, base):
    assert outcome(tmp_path, build(*base)) == "ok"


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_a_regular_file_the_system_cannot_read_is_refused_by_name():
    with pytest.raises(ArchiveError, match=r"^/proc/self/mem: cannot be read \("):
        qlis.open("/proc/self/mem")  # stat calls it regular; reading it fails


def test_a_record_the_disk_fails_to_give_is_refused_by_file_and_tensor(tmp_path, base,
                                                                       monkeypatch):
    path = tmp_path / "m.qlis"
    path.write_bytes(build(*base))
    with qlis.open(path) as archive:
        monkeypatch.setattr(os, "pread", lambda *args: (_ for _ in ()).throw(
            OSError(errno.EIO, "Input/output error")))
        with pytest.raises(ArchiveError, match=r"m\.qlis: .*fc\.weight.*cannot be read "
                                               r"\(Input/output error\)"):
            archive.read("fc.weight")


def test_other_versions_are_refused_with_the_reason(tmp_path, base):
    for version, word in ((1, "older"), (6, "newer")):
        path = tmp_path / "v.qlis"
        path.write_bytes(build(*base, version=version))
        with pytest.raises(ArchiveError, match=f"version {version}.*{word}"):
            qlis.open(path)


def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path):
    """A byte of 2 read as True: a file the format does not allow, unpacked to other bytes."""
    path = tmp_path / "b.qlis"
    write_tensors(path, {"m": torch.tensor([True, False, True, True])})
    header, data = split(path.read_bytes())
    record = header["tensors"][0]["data"]
    assert header["tensors"][0]["codec"] == {"id": "raw"}  # the bytes are the values
    values = bytearray(data)
    values[record["offset"] + 1] = 2
    record["crc32c"] = google_crc32c.value(bytes(values[:record["length"]]))
    path.write_bytes(build(header, bytes(values)))
    with qlis.open(path) as archive:
        for read in (archive.read, lambda name: list(archive.read_pieces(name))):
            with pytest.raises(ArchiveError, match="'m': a bool tensor holds bytes other "
                               "than 0 and 1"):
                read("m")


def _deflated_file(stored: bytes, data: bytes) -> bytes:
    """A version-5 file whose stored header is ``stored`` as it is, its CRC recomputed."""
    pad = -(-(PREFIX.size + len(stored)) // ALIGN) * ALIGN - PREFIX.size - len(stored)
    prefix = PREFIX.pack(MAGIC, COMPACT_VERSION, google_crc32c.value(stored),
                         len(stored), len(data))
    return prefix + stored + b" " * pad + data


def _with_preset_dictionary(text: bytes) -> bytes:
    deflater = zlib.compressobj(zdict=b'{"format":"qlis"')
    return deflater.compress(text) + deflater.flush()


@pytest.mark.parametrize("damage, message", [
    (lambda z: z[: len(z) // 2], "its zlib stream stops short"),
    (lambda z: z + b"}", "bytes other than spaces after its zlib stream"),
    (lambda z: z + b"  " + zlib.compress(b"{}"), "bytes other than spaces after"),
    (lambda z: b"{" + z[1:], "its zlib stream"),
    (lambda z: _with_preset_dictionary(zlib.decompress(z)), "asks for a preset dictionary"),
])
def test_a_deflated_header_that_is_not_one_whole_stream_is_refused(tmp_path, base, damage,
                                                                     message):
    header = zlib.compress(json.dumps(base[0]).encode())
    assert outcome(tmp_path, _deflated_file(header, base[1])) == "ok"
    path = tmp_path / "damaged.qlis"
    path.write_bytes(_deflated_file(damage(header), base[1]))
    with pytest.raises(ArchiveError, match=message):
        qlis.open(path)


def test_a_header_that_inflates_past_the_cap_is_refused_before_it_is_inflated(tmp_path, base):
    """A few kilobytes that would inflate to 64 GiB: the reader stops at the cap."""
    inflater = zlib.compressobj(9)
    bomb = inflater.compress(b"[" + b" " * (MAX_HEADER_BYTES + 100) + b"]") + inflater.flush()
    assert len(bomb) < MAX_HEADER_BYTES >> 10
    path = tmp_path / "bomb.qlis"
    path.write_bytes(_deflated_file(bomb, base[1]))
    with pytest.raises(ArchiveError, match="header inflates past the 64 MiB cap"):
        qlis.open(path)


@pytest.mark.parametrize("stated, shown", [("2", '"2"'), (2.0, "2.0"), ([2], "a JSON list")])
def test_a_header_version_of_another_type_is_shown_as_written(tmp_path, base, stated, shown):
    """The string "2" was reported as "header version 2 is not the file's version 2"."""
    header = copy.deepcopy(base[0])
    header["version"] = stated
    path = tmp_path / "v.qlis"
    path.write_bytes(build(json.dumps(header).encode(), base[1]))
    with pytest.raises(ArchiveError, match=f"header version {re.escape(shown)} is not the "
                       "file's version"):
        qlis.open(path)


# -- a generator and a mutator of headers (hypothesis) ----------------------------------------

hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, 1, 64, 255, 256, 65536, 1 << 31, 1 << 32, 1 << 62, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["raw", "ans", "huffman", "bitpack", "sparse", "auto", "affine", "float32",
                     "float16", "bool", "uint8", "kmeans", "group", "uniform"]),
)
json_values = st.recursive(
    hostile_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every (container, key) in a JSON document, to pick a place to mutate."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield node, key
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield node, i
            yield from _paths(value, (*prefix, i))


def mutated(header: dict, data) -> dict:
    """``header`` with one to three random edits anywhere (hypothesis draws them)."""
    header = copy.deepcopy(header)
    for _ in range(data.draw(st.integers(1, 3))):
        places = list(_paths(header))
        container, key = data.draw(st.sampled_from(places))
        action = data.draw(st.sampled_from(["replace", "delete", "insert", "copy"]))
        if action == "replace":
            container[key] = data.draw(json_values)
        elif action == "delete":
            del container[key]
        elif action == "insert" and isinstance(container, dict):
            container[data.draw(st.text(max_size=6))] = data.draw(json_values)
        elif action == "insert":
            container.insert(key, data.draw(json_values))
        else:  # copy a sibling's value: a shared record, a duplicated entry
            source = data.draw(st.sampled_from(places))
            container[key] = copy.deepcopy(source[0][source[1]])
    return header


@settings(max_examples=300, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(data=st.data())
def test_mutated_headers_are_refused_or_read(tmp_path, base, data):
    assert outcome(tmp_path, build(mutated(base[0], data), base[1])) in ("ok", "refused")


def _some_of(keys: list[str], values) -> st.SearchStrategy[dict]:
    """Objects holding any subset of ``keys`` (each value from ``values``), or anything."""
    return st.fixed_dictionaries({}, optional={k: values for k in keys}) | json_values


informative_sections = st.fixed_dictionaries({}, optional={
    "summary": _some_of(["original_bytes", "source_bytes", "cr", "hcr", "x"], hostile_scalars),
    "distortion": _some_of(["weight_rel_mse", "weight_rel_mse_max", "output"], json_values),
    "compression": _some_of(["policy", "plan", "beta"], json_values),
    "writer": _some_of(["name", "version"], hostile_scalars),
    "metadata": json_values,
    "aliases": _some_of(["head.weight", "fc.weight", "x"],
                        st.sampled_from(["fc.weight", "emb.weight", "steps", "nope"])
                        | hostile_scalars),
})


@settings(max_examples=150, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(data=st.data())
def test_info_shows_or_refuses_every_mutated_header(tmp_path, base, data):
    """`qlis info` reads every section a header may hold (summary, distortion, compression,
    plans): whatever they hold, it prints or refuses in one line, and --verify agrees with
    loading the file."""
    header = mutated(base[0], data) if data.draw(st.booleans()) else copy.deepcopy(base[0])
    header.update(data.draw(informative_sections))
    if "aliases" in header and data.draw(st.booleans()):  # else refused: a version 2 file
        header["version"] = ALIASES_VERSION
    raw = build(header, base[1], header.get("version") if _is_int(header.get("version"))
                else VERSION)
    path = tmp_path / "h.qlis"
    path.write_bytes(raw)
    loaded = outcome(tmp_path, raw)
    for options in ([], ["--format", "json"], ["--verify"]):
        result = CliRunner().invoke(cli, ["info", str(path), *options])
        assert result.exit_code in (0, 2), (options, result.exception)
        if result.exit_code == 2:
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("qlis: error:")
        if options == ["--verify"]:
            assert (result.exit_code == 0) == (loaded == "ok"), result.output


def test_info_shows_both_of_two_settings_that_flatten_to_one_name(tmp_path, base):
    """``"a.b": 1`` beside ``"a": {"b": 2}``: the table showed one of them, the other lost."""
    header = copy.deepcopy(base[0])
    header["compression"] = {"a.b": 1, "a": {"b": 2}}
    path = tmp_path / "h.qlis"
    path.write_bytes(build(header, base[1]))
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "  a.b = 1\n" in result.output and "  a.b (again) = 2\n" in result.output


def test_info_shows_a_huge_paper_ratio_in_a_few_characters(tmp_path, base):
    header = copy.deepcopy(base[0])
    header.setdefault("summary", {})["cr"] = 1e308
    path = tmp_path / "h.qlis"
    path.write_bytes(build(header, base[1]))
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "CR 1e+308" in result.output and "0" * 30 not in result.output


def _record(draw, data: bytearray) -> dict:
    offset = draw(st.sampled_from([0, 64, 128, 4096, 1 << 40, -64])) if draw(
        st.booleans()
    ) else draw(st.integers(0, len(data) // ALIGN)) * ALIGN
    length = draw(st.integers(0, 300) | st.sampled_from([1 << 50, -1]))
    inside = offset >= 0 and length >= 0 and offset + length <= len(data)
    crc = google_crc32c.value(bytes(data[offset : offset + length])) if inside else 0
    return {"offset": offset, "length": length, "crc32c": draw(st.just(crc) | hostile_scalars)}


@st.composite
def generated_files(draw) -> bytes:
    """Whole headers built field by field: mostly well-formed, each field sometimes hostile."""
    data = bytearray(draw(st.binary(min_size=0, max_size=512)))
    data += bytes(-len(data) % ALIGN)

    def field(valid):
        return draw(valid if draw(st.integers(0, 5)) else json_values)

    tensors = []
    for i in range(draw(st.integers(0, 4))):
        entry = {
            "name": field(st.just(f"t{i}")),
            "shape": field(st.lists(st.integers(0, 12), max_size=3)),
            "dtype": field(st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool"])),
            "codec": field(st.sampled_from([{"id": c} for c in ("raw", "ans", "huffman",
                                                                  "sparse")])
                           | st.builds(lambda b: {"id": "bitpack", "bits": b}, st.integers(1, 9))),
            "data": field(st.just(_record(draw, data))),
        }
        if draw(st.booleans()):
            n_levels = field(st.integers(1, 300))
            entry["quantizer"] = field(st.sampled_from([
                {"id": "affine", "bits": 4, "granularity": "tensor"},
                {"id": "kmeans", "bits": 2},
                {"id": "binary", "granularity": "channel"},
            ]))
            entry["n_levels"] = n_levels
            name = draw(st.sampled_from(["scale", "zero_point", "codebook", "alpha"]))
            param = {**_record(draw, data), "shape": [draw(st.integers(0, 40))],
                     "dtype": draw(st.sampled_from(["float32", "float16"]))}
            entry["params"] = field(st.just({name: param}))
        if draw(st.booleans()):
            del entry[draw(st.sampled_from(sorted(entry)))]
        tensors.append(entry)
    header = {
        "format": field(st.just("qlis")),
        "version": field(st.just(VERSION)),
        "writer": field(st.just({"name": "qlis", "version": "0"})),
        "metadata": field(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
        "compression": field(st.none()),
        "tensors": tensors,
    }
    return build(header, bytes(data))


@settings(max_examples=300, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(raw=generated_files())
def test_generated_headers_are_refused_or_read(tmp_path, raw):
    assert outcome(tmp_path, raw) in ("ok", "refused")


# -- headers that are costly to parse ---------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    import google_crc32c, qlis
    from qlis.archive.format import ALIGN, MAGIC, PREFIX, VERSION
    body = {body}
    pad = -(-(PREFIX.size + len(body)) // ALIGN) * ALIGN - PREFIX.size - len(body)
    path = sys.argv[1]
    with open(path, "wb") as f:
        f.write(PREFIX.pack(MAGIC, VERSION, google_crc32c.value(body), len(body), 0))
        f.write(body + b" " * pad)
    del body
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        qlis.open(path)
        print("ACCEPTED")
    except qlis.ArchiveError as err:
        print("REFUSED", err)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PEAK_KIB", peak - before, time.perf_counter() - start)
    """
)

COSTLY = {
    "16 MiB of []": 'b"[" + b"[]," * ((16 << 20) // 3 - 1) + b"[]]"',
    "deep nesting": 'b"[" * 100000 + b"]" * 100000',
    "64 MiB + 1 header": 'b" " * ((64 << 20) + 1)',
    "many floats": 'b"[" + b"1.5," * ((48 << 20) // 4 - 1) + b"1.5]"',
}


def test_the_scan_lets_the_items_of_100000_tensors_through():
    """80 items a tensor (a mixture of experts' small tensors): the 4,000,000 of version 4
    refused a pack of 50,000 after all its work."""
    assert scan_json(b'{"a":[' + b"0," * 8_000_000 + b"0]}") == 1
    with pytest.raises(ArchiveError, match="over 10000000 JSON items"):
        scan_json(b"[" + b"0," * 10_000_000 + b"0]")


@pytest.mark.parametrize("case", sorted(COSTLY))
def test_costly_headers_are_refused_before_parsing(tmp_path, case):
    script = PEAK_SCRIPT.format(body=COSTLY[case])
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c.qlis")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "REFUSED" in out, out
    extra_kib = int(out.split("PEAK_KIB")[1].split()[0])
    assert extra_kib < 200 * 1024, out  # far below what parsing them would take


def _reference_members(value) -> int:
    if isinstance(value, dict):
        return len(value) + sum(map(_reference_members, value.values()))
    return sum(map(_reference_members, value)) if isinstance(value, list) else 0


def _reference_depth(value) -> int:
    if isinstance(value, dict | list):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((_reference_depth(c) for c in children), default=0)
    return 0


@settings(max_examples=200, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(value=json_values, chunk=st.integers(1, 9))
def test_the_pre_parse_scan_ignores_strings_and_chunk_edges(monkeypatch, value, chunk):
    import qlis.archive.format as fmt

    monkeypatch.setattr(fmt, "_SCAN_CHUNK", chunk)
    depth = _reference_depth(value)
    text = json.dumps([value, '\\"[[[{{', "]]\\\\", '"']).encode()
    monkeypatch.setattr(fmt, "MAX_JSON_DEPTH", depth + 1)
    fmt.scan_json(text)  # strings full of brackets, quotes and backslashes do not count
    monkeypatch.setattr(fmt, "MAX_JSON_DEPTH", depth)
    with pytest.raises(ArchiveError, match="nests"):
        fmt.scan_json(text)


@settings(max_examples=200, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(value=json_values, chunk=st.integers(1, 9))
def test_both_scans_agree_on_headers_without_backslashes(monkeypatch, value, chunk):
    """The fast scan (no backslash: quotes alternate) counts what the escape-aware one does."""
    import qlis.archive.format as fmt

    text = json.dumps([value, "[[{:,", "]]}"]).encode()
    assume(b"\\" not in text)
    monkeypatch.setattr(fmt, "_SCAN_CHUNK", chunk)
    depth = _reference_depth(value)
    monkeypatch.setattr(fmt, "MAX_JSON_DEPTH", depth + 1)
    assert fmt._scan_plain(text) == fmt._scan_escaped(text) == _reference_members(value)
    monkeypatch.setattr(fmt, "MAX_JSON_DEPTH", depth)
    for scan in (fmt._scan_plain, fmt._scan_escaped):
        with pytest.raises(ArchiveError, match="nests"):
            scan(text)


def _dumps_repeating(value, target) -> str:
    """``value`` as JSON, with the object ``target`` (found by identity) repeating its first
    key and value: parsed, it is the same object, so only the repeat can be refused."""
    if isinstance(value, dict):
        pairs = [f"{json.dumps(k)}: {_dumps_repeating(v, target)}" for k, v in value.items()]
        if value is target:
            pairs.append(pairs[0])
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dumps_repeating(v, target) for v in value) + "]"
    return json.dumps(value)


def _objects(value):
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _objects(v)
    elif isinstance(value, list):
        for v in value:
            yield from _objects(v)


@settings(max_examples=60, deadline=None, suppress_health_check=TMP_FIXTURE)
@given(data=st.data())
def test_a_repeated_key_anywhere_is_refused_by_every_reader(tmp_path, base, data):
    """Any object of the header (an entry, a record, a config, a plan, a section) that repeats
    a key: refused by the loaders and by the header-only reader of ``qlis info`` alike."""
    header = copy.deepcopy(base[0])
    header["compression"] = {"policy": "lapq", "options": {"beta": 0.5, "grid": {"a": [1]}}}
    objects = [o for o in _objects(header) if o]
    target = data.draw(st.sampled_from(objects))
    path = tmp_path / "r.qlis"
    path.write_bytes(build(_dumps_repeating(header, None).encode(), base[1]))
    read_header_file(path)  # the same header, written the same way, without the repeat
    path.write_bytes(build(_dumps_repeating(header, target).encode(), base[1]))
    for read in (read_header_file, qlis.open):
        with pytest.raises(ArchiveError, match="repeats a key"):
            read(path)


def test_an_overlap_names_both_records(tmp_path, base):
    header = copy.deepcopy(base[0])
    plain(header)["data"]["offset"] = quantized(header)["data"]["offset"]
    path = tmp_path / "o.qlis"
    path.write_bytes(build(header, base[1]))
    with pytest.raises(ArchiveError, match=r"tensor '.*': record overlaps the record of tensor"):
        qlis.open(path)
