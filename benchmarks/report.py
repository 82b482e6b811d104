"""Shared by the benchmark scripts: the machine line, timing a command in its own process,
and writing one section of docs/benchmarks.md (between markers) without touching the others."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
TITLE = "# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh.\n"


def machine() -> str:
    """One line naming the machine, so every table says where it was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def command() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else TITLE
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n"
    )
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def run(args: list[str], cgroup: Path | None = None) -> tuple[float, int, int]:
    """(seconds, peak RSS in bytes, exit code) of one command in a fresh process, inside
    ``cgroup`` (a v1 memory cgroup folder) when given."""
    code = (
        "import json, os, resource, subprocess, sys\n"
        "group = os.environ.get('QLIS_BENCH_CGROUP')\n"
        "pre = (lambda: open(group + '/cgroup.procs', 'w').write(str(os.getpid()))) "
        "if group else None\n"
        "r = subprocess.run(sys.argv[1:], preexec_fn=pre, capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps([r.returncode, peak]))\n"
    )
    env = {"QLIS_BENCH_CGROUP": str(cgroup)} if cgroup else {}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, **env})
    seconds = time.perf_counter() - start
    returncode, peak_kib = json.loads(out.stdout.strip().splitlines()[-1])
    if returncode != 0 and cgroup is None:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr}")
    return seconds, peak_kib * 1024, returncode
