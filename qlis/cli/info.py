"""``qlis info``: what an archive holds, from its validated header alone, so that it starts
without torch and answers in under two seconds for a header of 100,000 tensors. ``--verify``
reads every record through the archive reader (torch), loaded by name as the commands are.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import click

from qlis.archive.format import (
    TensorEntry,
    describe_entries,
    element_size,
    no_cyclic_gc,
    planned_bits,
    read_header_file,
)
from qlis.cli.console import (
    PATH,
    LazyCommandGroup,
    check_input,
    describe_rel_mse,
    echo_json_with_list,
    echo_table,
    escape,
    human_bytes,
    strict_json,
)

VERIFY = "qlis.cli.model_commands:verified_runtime"
"""Reads and checks every record of an archive; returns how each layer would run packed."""


_SHOWN_CHARACTERS = 200
"""A longer header value is cut in the table (``--format json`` gives it whole)."""


def _setting(value: object) -> str:
    """A header value on one line: plain for scalars, compact JSON otherwise, cut after
    `_SHOWN_CHARACTERS` (a metadata string may be megabytes)."""
    text = value if isinstance(value, str) else strict_json(value, separators=(", ", ": "))
    if len(text) > _SHOWN_CHARACTERS:
        text = f"{text[:_SHOWN_CHARACTERS]}... ({len(text):,} characters; --format json: all)"
    return escape(text)


def _flat(values: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings as dotted keys (``policy.bits_levels``), one per line in `info`."""
    flat: dict[str, object] = {}

    def add(key: str, value: object) -> None:  # "a.b" beside {"a": {"b"}}: both shown
        while key in flat:
            key += " (again)"
        flat[key] = value

    for key, value in values.items():
        if isinstance(value, dict) and value:
            for inner, item in _flat(value, f"{prefix}{key}.").items():
                add(inner, item)
        else:
            add(f"{prefix}{key}", value)
    return flat


def _section(title: str, values: dict | None) -> list[str]:
    if not values:
        return [f"{title}: none recorded"]
    return [f"{title}:"] + [f"  {escape(k)} = {_setting(v)}" for k, v in _flat(values).items()]


def _text(value: object) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _info_row(entry: TensorEntry) -> tuple[str, ...]:
    """A tensor's line: what `describe_entries` says, as text."""
    return (entry.name, "x".join(map(str, entry.shape)) or "scalar", entry.dtype,
            _text(entry.quantizer and entry.quantizer["id"]), _text(planned_bits(entry)),
            _text((entry.plan or {}).get("k")), _text(entry.codec["id"]),
            human_bytes(entry.stored_bytes))


@click.command()
@click.argument("path", type=PATH)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--verify", is_flag=True,
              help="Also read and check every record, and say how each layer would run with "
                   "the low-bit runtime (reads the whole file; loads torch).")
def info(path: Path, fmt: str, verify: bool) -> None:
    """What an archive holds: metadata, writer and compression settings, then per tensor the
    quantizer, bits, k, codec and size, then the totals and the quality measured at them.
    Reads the header only, unless --verify."""
    with no_cyclic_gc():
        _info(path, fmt, verify)


def _info(path: Path, fmt: str, verify: bool) -> None:
    header = read_header_file(check_input(path, "file"))
    entries = header.entries
    runtime = None
    if verify:  # torch and the codecs' kernels: loaded by name, as the commands are
        runtime = LazyCommandGroup.load(VERIFY)(path)
    summary, metadata, aliases = header.summary, header.metadata, header.aliases
    writer, compression, distortion = header.writer, header.compression, header.distortion
    archive_bytes = path.stat().st_size
    original = sum(entry.numel * element_size(entry.dtype) for entry in entries.values())
    source = summary.source_bytes
    totals = {
        "tensors": len(entries),
        "original_bytes": original,
        "source_file_bytes": source,
        "archive_bytes": archive_bytes,
        "real_ratio": original / archive_bytes,
        "real_ratio_vs_source_file": source / archive_bytes if source else None,
        "paper_cr": summary.cr,
        "paper_hcr": summary.hcr,
        "verified": verify,
    }
    if fmt == "json":
        echo_json_with_list({"metadata": metadata, "writer": writer,
                             "compression": compression, "distortion": distortion},
                            "tensors", describe_entries(entries),
                            {"aliases": aliases, "runtime": runtime, "totals": totals})
        return
    lines = _section("metadata", metadata)
    if isinstance(writer, dict) and {"name", "version"} <= writer.keys():
        writer = f"{writer['name']} {writer['version']}"
    lines.append(f"writer: {_setting(writer) if writer else 'not recorded'}")
    settings = {k: v for k, v in (compression or {}).items() if k != "plan"}
    lines += _section("compression", settings)
    click.echo("\n".join(lines) + "\n")
    headers = ("tensor", "shape", "dtype", "quantizer", "bits", "k", "codec", "size")
    echo_table(headers, map(_info_row, entries.values()), right=(4, 5, 7))
    if aliases:
        click.echo("tied tensors, stored once: " + ", ".join(
            f"{escape(alias)} = {escape(name)}" for alias, name in aliases.items()))
    click.echo(
        f"\noriginal tensors: {human_bytes(original)}   archive: {human_bytes(archive_bytes)}"
        f"   real ratio: {totals['real_ratio']:.2f}x"
    )
    if source:
        click.echo(f"source file: {human_bytes(source)}   real ratio vs the file: "
                   f"{totals['real_ratio_vs_source_file']:.2f}x")
    paper = [f"{name} {value:.2f}" if value < 1e6 else f"{name} {value:.3g}"  # a header's
             for name, value in (("CR", summary.cr), ("HCR", summary.hcr))  # 1e308: 309 digits
             if value is not None]
    if paper:
        click.echo("paper ratios (idealised: pruned zeros count as free, no index or metadata "
                   "cost): " + "   ".join(paper))
    click.echo("\n".join(_quality_lines(distortion)))
    paths = Counter(row["path"] for row in runtime or ())
    if paths:
        click.echo("runtime (qlis.load(..., runtime=\"lowbit\"), docs/runtime.md): "
                   + ", ".join(f"{n} layers {_RUNTIME_PATHS[p]}" for p, n in sorted(paths.items())))
    if verify:
        click.echo("all records verified")


def _quality_lines(distortion: object) -> list[str]:
    """The quality the writer measured, beside the ratios: the weight error (a mean over the
    layers, and the worst), and the output quality when it was measured on data, labelled
    as `CompressionResult.describe_quality` labels it (held out or not, synthetic or not);
    a calibrated archive's weight error alone says little of its outputs."""
    if not isinstance(distortion, dict):
        return ["distortion: none recorded"]
    lines = []
    mean, worst = distortion.get("weight_rel_mse"), distortion.get("weight_rel_mse_max")
    if mean is not None:
        lines.append(f"distortion: {describe_rel_mse(mean)}, the mean per layer" + (
            f"; worst layer {worst:.4g}" if _is_finite_number(worst) else ""))
    output = distortion.get("output")
    if isinstance(output, dict) and _is_finite_number(output.get("cosine")):
        batches = output.get("batches")
        count = (f"{batches} " if isinstance(batches, int) and not isinstance(batches, bool)
                 else "")
        plural = "es" if batches != 1 else ""
        where = (f"{count}held-out calibration batch{plural}" if output.get("held_out") is True
                 else "the calibration data (not held out)")
        if output.get("synthetic") is True:
            where += " (synthetic inputs, not your data)"
        stderr = output.get("cosine_stderr")
        spread = f" ± {stderr:.5f}" if _is_finite_number(stderr) else ""
        rel_mse = output.get("rel_mse")
        lines.append(f"output quality on {where}: cosine {output['cosine']:.5f}{spread}, " + (
            f"relative MSE {rel_mse:.2e}" if _is_finite_number(rel_mse)
            else "NOT FINITE (the compressed model outputs NaN or inf)"))
    return lines or ["distortion: none recorded"]


def _is_finite_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


_RUNTIME_PATHS = {"int8": "int8 (packed int8 weights)",
                  "dequant": "dequant (codes packed, dequantized per call)",
                  "float": "float (not quantized)"}
