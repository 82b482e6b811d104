"""``qlis unpack``: an archive's dequantized tensors written out as .safetensors (one file
or Hugging Face shards) or .pt. Apart from the commands that compress (qlis.cli.model_commands)
so that it starts without what only they load (the plans, policies and GPTQ): start-up is a
fair part of an unpack.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click
import torch

import qlis
from qlis.archive.atomic import atomic_path
from qlis.cli.console import (
    PATH,
    check_input,
    check_output,
    check_output_dir,
    escape,
    human_bytes,
    parse_size,
)
from qlis.cli.progress import QUIET, progress_bars
from qlis.errors import InputError
from qlis.models.checkpoints import write_safetensors, write_sharded_safetensors
from qlis.workers.memory import keep_freed_memory_for_reuse

SOURCE_METADATA = "source_metadata."
"""The prefix of the archive metadata that `qlis pack` carries from a safetensors source, and
that unpack gives back as the output's own metadata."""


def _shards(output: Path, *args: Any, overwrite: bool) -> list[Path]:
    """`write_sharded_safetensors` into ``output``, made for it when absent and removed again
    when the shards fail (it then holds nothing of ours)."""
    made = not output.exists()
    output.mkdir(exist_ok=True)
    try:
        return write_sharded_safetensors(output, *args, overwrite=overwrite)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                output.rmdir()
        raise


@click.command()
@click.argument("path", type=PATH)
@click.option("-o", "--output", type=PATH, required=True,
              help="OUT.safetensors or OUT.pt: the dequantized tensors (with "
                   "--max-shard-size: a folder).")
@click.option("--max-shard-size", metavar="SIZE",
              help="Write Hugging Face shards of at most SIZE (e.g. 5GB, 500MiB) and their "
                   "index into the folder OUTPUT, as save_pretrained does (an earlier set's "
                   "shards there, and a model.safetensors that would be loaded instead, are "
                   "removed once the new set is complete).")
@click.option("--jobs", "-j", type=click.IntRange(1, 1024),
              help="Threads that decode tensors side by side (default: every core); the "
                   "output is the same bytes whatever N.")
@QUIET
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def unpack(path, output, max_shard_size, jobs, quiet, force) -> None:
    """Write the dequantized tensors of an archive as .safetensors or .pt (a tied tensor under
    each of its names: copied in .safetensors, which cannot share, shared in .pt)."""
    check_input(path, "file")
    if max_shard_size is not None:
        max_bytes = parse_size(max_shard_size, "--max-shard-size")
        if not output.is_dir() and output.suffix.lower() in (".safetensors", ".pt", ".pth"):
            raise InputError(f"{output}: --max-shard-size writes a folder of shards; name "
                             f"it without {output.suffix} (or leave --max-shard-size out "
                             "for one file)")
        check_output_dir(output, force)  # the input, a file, is refused as not a folder
    else:
        check_output(output, force, (".safetensors", ".pt", ".pth"), inputs=[path])
    keep_freed_memory_for_reuse()  # a tensor at a time, thousands of times: see its doc
    with qlis.open(path) as archive:
        stored = {row["name"]: row for row in archive.tensor_info()}
        names = archive.names()  # tied tensors under each name: a copy each
        rows = [stored[archive.entry(name).name] for name in names]
        total = sum(row["original_bytes"] for row in rows)
        layout = [(name, r["dtype"], r["shape"]) for name, r in zip(names, rows, strict=True)]
        source = {k.removeprefix(SOURCE_METADATA): v for k, v in archive.metadata.items()
                  if k.startswith(SOURCE_METADATA)} or None
        with progress_bars(quiet) as bar:
            progress = bar("unpacking", len(rows), "tensors")
            if max_shard_size is not None:
                files = _shards(output, layout, archive.read_pieces, max_bytes, progress,
                                source, jobs, [path], overwrite=force)
            elif output.suffix.lower() == ".safetensors":
                write_safetensors(output, layout, archive.read_pieces, progress=progress,
                                  metadata=source, overwrite=force, jobs=jobs)
            else:
                _save_pt(archive.load(progress=progress), output, force)
    shards = f" in {len(files) - 1} shards" if max_shard_size is not None else ""
    click.echo(f"{escape(str(output))}: {len(rows)} tensors, {human_bytes(total)}{shards}")


def _save_pt(state: dict, output: Path, force: bool) -> None:
    """torch.save, atomically; its write failures (a RuntimeError from the zip writer, e.g. a
    full disk) become one line, and nothing is left behind."""
    try:
        with atomic_path(output, overwrite=force) as tmp:
            torch.save(state, tmp)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "write failed"
        raise InputError(f"{output}: could not be written ({reason}); is the disk full?") from None
