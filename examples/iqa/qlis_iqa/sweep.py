"""The paper's Table 1 as one run: a trained model under uniform pruning, uniform quantization,
LAP, LAQ and LAPQ, each evaluated on the same fixed test split.

Every variant compresses the whole model (backbone and head) with `qlis.compress`, loads the
dequantized tensors into a copy of the model, and scores the test images; frozen outputs are
cached by fingerprint, so a variant whose frozen tensors did not change (and any rerun) reuses
them. Each row reports SRCC/KRCC/PLCC, the paper's CR and HCR, and the real ratio: original
tensor bytes / bytes of the .qlis archive on disk. Extra rows (per-channel quantization, budget
mode) sit beside the paper's LAPQ to show what qlis adds to it.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import qlis
from qlis_iqa.backbones import RANDOM_LABEL
from qlis_iqa.data import Sample
from qlis_iqa.errors import IQAError
from qlis_iqa.evaluate import Log, predict_samples, skipped_report
from qlis_iqa.features import FeatureCache
from qlis_iqa.models import KEY, IQAModel, load_state, model_from_metadata, state_nbytes
from qlis_iqa.pack import write_archive

PAPER_K = (1.5, 1.0, 0.5, 0.25)
PAPER_BITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Variant:
    """One row of the sweep: a qlis policy and its options (policy None: the baseline)."""

    name: str
    policy: str | None
    options: dict[str, Any] = field(default_factory=dict, hash=False)


def paper_variants() -> list[Variant]:
    """Table 1 of the paper: Baseline, P level k, Q b-bit, LAP, LAQ, LAPQ (per-tensor)."""
    return [
        Variant("Baseline", None),
        *(Variant(f"P level {k}", "prune", {"k": k}) for k in PAPER_K),
        *(Variant(f"Q {b}-bit", "quant", {"bits": b}) for b in PAPER_BITS),
        Variant("LAP", "lap"),
        Variant("LAQ", "laq"),
        Variant("LAPQ", "lapq"),
    ]


def extra_variants(per_channel: bool = False, target_ratios: Sequence[float] = ()) -> list[Variant]:
    """Rows beyond the paper: per-channel LAQ/LAPQ, and LAPQ in budget mode at given paper CRs."""
    rows = []
    if per_channel:
        rows += [
            Variant("LAQ [channel]", "laq", {"granularity": "channel"}),
            Variant("LAPQ [channel]", "lapq", {"granularity": "channel"}),
        ]
    for ratio in target_ratios:
        if not ratio >= 1.0:
            raise IQAError(f"--target-ratio must be >= 1, got {ratio}")
        opts: dict[str, Any] = {"target_ratio": float(ratio)}
        suffix = f"budget {ratio:g}x"
        if per_channel:
            opts["granularity"] = "channel"
            suffix += ", channel"
        rows.append(Variant(f"LAPQ [{suffix}]", "lapq", opts))
    return rows


def pick_variants(variants: list[Variant], only: str | None) -> list[Variant]:
    """Keep the rows named in `only` (comma-separated, case-insensitive); all when None."""
    if not only:
        return variants
    wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
    known = {v.name.lower() for v in variants}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        rows = ", ".join(v.name for v in variants)
        raise IQAError(f"--only: unknown row(s) {', '.join(unknown)}; rows: {rows}")
    return [v for v in variants if v.name.lower() in wanted]


@dataclass
class SweepRow:
    """Metrics and sizes of one variant."""

    variant: str
    policy: str
    options: str
    srcc: float
    krcc: float
    plcc: float
    plcc_logistic: float
    cr: float
    hcr: float
    real_ratio: float
    file_bytes: int
    sparsity: float
    mean_bits: float
    test_images: int
    seconds: float
    backbone: str


def _plan_stats(result: Any) -> tuple[float, float]:
    """Weighted sparsity and mean bits (over quantized weights) of the selected layers."""
    layers = list(result.layers)
    total = sum(p.numel for p in layers) or 1
    sparsity = sum(p.sparsity * p.numel for p in layers) / total
    quant = [p for p in layers if p.bits is not None]
    qn = sum(p.numel for p in quant)
    bits = sum(p.bits * p.numel for p in quant) / qn if qn else math.nan
    return sparsity, bits


def _options_text(v: Variant, beta: float) -> str:
    opts = dict(v.options)
    if v.policy in ("lap", "laq", "lapq"):
        opts["beta"] = beta
    return ", ".join(f"{k}={val}" for k, val in opts.items())


def run_sweep(
    model: IQAModel,
    samples: Sequence[Sample],
    out_dir: str | Path,
    variants: Sequence[Variant],
    cache: FeatureCache | None,
    baseline_file: str | Path | None = None,
    model_metadata: dict[str, str] | None = None,
    beta: float = 0.5,
    archives: bool = True,
    codec: str = "huffman",
    logistic: bool = False,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    log: Log = print,
) -> list[SweepRow]:
    """Evaluate each variant on `samples`; write each compressed model to OUT/archives/*.qlis.

    The baseline's real ratio is measured on `baseline_file` (its safetensors checkpoint);
    `model_metadata` (e.g. the checkpoint's dataset and split) is copied into every archive.
    """
    out = Path(out_dir)
    original = state_nbytes(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metadata = model.metadata()
    passthrough = {k: v for k, v in (model_metadata or {}).items() if k not in metadata}
    rows: list[SweepRow] = []
    for v in variants:
        start = time.perf_counter()
        if v.policy is None:
            candidate, cr, hcr, sparsity, bits = model, 1.0, 1.0, 0.0, math.nan
            size = Path(baseline_file).stat().st_size if baseline_file else 0
        else:
            result = qlis.compress(state, policy=v.policy, beta=beta, **v.options)
            candidate = model_from_metadata(metadata).to(next(model.parameters()).device)
            load_state(candidate, result.state_dict(), f"{v.name} state")
            cr, hcr = float(result.cr), float(result.hcr)
            sparsity, bits = _plan_stats(result)
            size = 0
            if archives:
                path = out / "archives" / f"{_slug(v.name)}.qlis"
                extra = {KEY + "variant": v.name, **passthrough}
                size = write_archive(model, result, path, codec, extra).file_bytes
        preds = predict_samples(
            candidate, samples, cache, batch_size, workers, progress, f"eval {v.name}"
        )
        if preds.skipped and not rows:
            log(skipped_report("test", preds.skipped))
        m = preds.metrics(logistic)
        rows.append(
            SweepRow(
                variant=v.name,
                policy=v.policy or "none",
                options=_options_text(v, beta),
                srcc=m["srcc"],
                krcc=m["krcc"],
                plcc=m["plcc"],
                plcc_logistic=m.get("plcc_logistic", math.nan),
                cr=cr,
                hcr=hcr,
                real_ratio=original / size if size else math.nan,
                file_bytes=size,
                sparsity=sparsity,
                mean_bits=bits,
                test_images=len(preds.names),
                seconds=time.perf_counter() - start,
                backbone=model.label,
            )
        )
        log(_row_line(rows[-1]))
    return rows


def _slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() or c == "." else "-" for c in name)
    return "-".join(p for p in keep.split("-") if p)


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _row_line(r: SweepRow) -> str:
    return (
        f"{r.variant:<28} SRCC {_fmt(r.srcc, 4)}  KRCC {_fmt(r.krcc, 4)}  PLCC {_fmt(r.plcc, 4)}  "
        f"CR {_fmt(r.cr, 2)}  HCR {_fmt(r.hcr, 2)}  real {_fmt(r.real_ratio, 2)}  "
        f"({r.seconds:.1f} s)  [{r.backbone}]"
    )


CSV_FIELDS = list(SweepRow.__dataclass_fields__)


def write_csv(rows: Sequence[SweepRow], path: str | Path) -> Path:
    """All columns of every row, the backbone label in each."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: (f"{val:.6g}" if isinstance(val, float) else val)
                    for k, val in r.__dict__.items()
                }
            )
    return path


def markdown_table(rows: Sequence[SweepRow], title: str, logistic: bool = False) -> str:
    """The sweep as a markdown section; a random-initialised backbone is said in the title."""
    label = rows[0].backbone if rows else ""
    lines = [f"### {title}", ""]
    if label == RANDOM_LABEL:
        lines += [
            f"**{RANDOM_LABEL}**: these correlations measure nothing about image quality and "
            "must not be compared with the paper's numbers; the sizes and ratios are real.",
            "",
        ]
    head = ["Variant", "SRCC", "KRCC", "PLCC"] + (["PLCC (logistic)"] if logistic else [])
    head += ["CR (paper)", "HCR (paper)", "real ratio", "file bytes", "sparsity", "mean bits"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [r.variant, _fmt(r.srcc, 4), _fmt(r.krcc, 4), _fmt(r.plcc, 4)]
        cells += [_fmt(r.plcc_logistic, 4)] if logistic else []
        cells += [
            _fmt(r.cr, 2),
            _fmt(r.hcr, 2),
            _fmt(r.real_ratio, 2),
            f"{r.file_bytes:,}",
            _fmt(r.sparsity, 3),
            _fmt(r.mean_bits, 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0].test_images if rows else 0
    lines += [
        "",
        f"{n} test images, backbone: {label}. CR/HCR: the paper's ratios (bits per kept "
        "weight, Huffman-coded for HCR, no index cost); real ratio: original tensor bytes / "
        "bytes of the .qlis archive on disk (Baseline: of the safetensors checkpoint).",
        "",
    ]
    return "\n".join(lines)


def plot(rows: Sequence[SweepRow], path: str | Path, title: str) -> Path:
    """SRCC against compression: paper HCR (filled) and real archive ratio (hollow)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if math.isnan(r.srcc):
            continue
        ax.scatter(r.hcr, r.srcc, color="tab:blue")
        ax.annotate(
            r.variant, (r.hcr, r.srcc), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
        if not math.isnan(r.real_ratio) and r.policy != "none":
            ax.scatter(r.real_ratio, r.srcc, facecolors="none", edgecolors="tab:orange")
    ax.scatter([], [], color="tab:blue", label="paper HCR")
    ax.scatter([], [], facecolors="none", edgecolors="tab:orange", label="real archive ratio")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xlabel("compression ratio (log scale)")
    ax.set_ylabel("SRCC on the fixed test split")
    label = rows[0].backbone if rows else ""
    ax.set_title(title if label in title else f"{title}\n[{label}]", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_outputs(
    rows: Sequence[SweepRow], out_dir: str | Path, title: str, logistic: bool = False
) -> dict[str, Path]:
    """sweep.md, sweep.csv and sweep.png in OUT_DIR."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "sweep.md"
    md.write_text(markdown_table(rows, title, logistic), encoding="utf-8")
    return {
        "markdown": md,
        "csv": write_csv(rows, out / "sweep.csv"),
        "plot": plot(rows, out / "sweep.png", title),
    }
