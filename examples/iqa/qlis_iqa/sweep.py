"""The paper's Table 1 as one run: a trained model under uniform pruning, uniform quantization,
LAP, LAQ and LAPQ, each evaluated on the same fixed test split.

Every variant compresses the whole model (backbone and head) with `qlis.compress`, loads the
dequantized tensors into a copy of the model, and scores the test images; frozen outputs are
cached by fingerprint, so a variant whose frozen tensors did not change (and any rerun) reuses
them. Each row reports SRCC/KRCC/PLCC, the paper's CR and HCR, and the real ratio: original
tensor bytes / bytes of the .qlis archive on disk. Extra rows (per-channel quantization, budget
mode) sit beside the paper's LAPQ to show what qlis adds to it.

Rows of qlis's rate-distortion policy "rd" take calibration data: a few training-split images
run through the whole model (see pack.calibration). They target a real archive ratio
(`target_ratio`) or an allowed SRCC drop. An SRCC drop is not something qlis can measure, so it
is met by a short search: the output-quality target `min_cosine` is bisected over
COSINE_LADDER, each candidate scored on a validation set of other training images, and the
smallest archive whose validation SRCC stays within the drop is kept (the test split is never
looked at). The table and the plot put paper and rd rows side by side: SRCC vs REAL ratio.
"""

from __future__ import annotations

import csv
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlis import QlisError, QualityWarning
from qlis.archive.atomic import atomic_path
from qlis_iqa.backbones import RANDOM_LABEL
from qlis_iqa.created_paths import SWEEP_FILES
from qlis_iqa.data import Sample
from qlis_iqa.errors import IQAError
from qlis_iqa.evaluate import Log, predict_samples, skipped_report
from qlis_iqa.features import FeatureCache
from qlis_iqa.metrics import LogisticFit, logistic_fit, srcc
from qlis_iqa.models import (
    KEY,
    IQAModel,
    load_model,
    state_nbytes,
    with_result,
)
from qlis_iqa.pack import CentredScores, calibration, compress_model, write_archive
from qlis_iqa.train import TrainConfig, refit_compressed

PAPER_K = (1.5, 1.0, 0.5, 0.25)
PAPER_BITS = (1, 2, 4, 8)
COSINE_LADDER = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)


@dataclass(frozen=True)
class Variant:
    """One row of the sweep: a qlis policy and its options (policy None: the baseline).

    `srcc_drop` (policy "rd"): the allowed validation SRCC drop that picks `min_cosine`.
    `kind`: "baseline", "paper", "extra" (qlis options on paper policies) or "rd".
    """

    name: str
    policy: str | None
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    srcc_drop: float | None = None
    kind: str = "paper"


def paper_variants() -> list[Variant]:
    """Table 1 of the paper: Baseline, P level k, Q b-bit, LAP, LAQ, LAPQ (per-tensor)."""
    return [
        Variant("Baseline", None, kind="baseline"),
        *(Variant(f"P level {k}", "prune", {"k": k}) for k in PAPER_K),
        *(Variant(f"Q {b}-bit", "quant", {"bits": b}) for b in PAPER_BITS),
        Variant("LAP", "lap"),
        Variant("LAQ", "laq"),
        Variant("LAPQ", "lapq"),
    ]


def extra_variants(per_channel: bool = False, paper_crs: Sequence[float] = ()) -> list[Variant]:
    """Rows beyond the paper: per-channel LAQ/LAPQ, and LAPQ in budget mode at given paper CRs."""
    rows = []
    if per_channel:
        rows += [
            Variant("LAQ [channel]", "laq", {"granularity": "channel"}, kind="extra"),
            Variant("LAPQ [channel]", "lapq", {"granularity": "channel"}, kind="extra"),
        ]
    for ratio in paper_crs:
        if not ratio >= 1.0:
            raise IQAError(f"--paper-cr must be >= 1, got {ratio}")
        opts: dict[str, Any] = {"paper_cr": float(ratio)}
        suffix = f"budget {ratio:g}x"
        if per_channel:
            opts["granularity"] = "channel"
            suffix += ", channel"
        rows.append(Variant(f"LAPQ [{suffix}]", "lapq", opts, kind="extra"))
    return rows


def rd_variants(
    target_ratios: Sequence[float] = (), srcc_drops: Sequence[float] = ()
) -> list[Variant]:
    """Rows of policy "rd": at real archive ratios, and at allowed SRCC drops (validation)."""
    rows = []
    for ratio in target_ratios:
        if not (ratio >= 1.0 and math.isfinite(ratio)):
            raise IQAError(f"an rd target ratio must be a finite number >= 1, got {ratio}")
        rows.append(Variant(f"rd [{ratio:g}x]", "rd", {"target_ratio": float(ratio)}, kind="rd"))
    for drop in srcc_drops:
        if not 0.0 <= drop < 1.0:
            raise IQAError(f"an allowed SRCC drop must be in [0, 1), got {drop}")
        rows.append(Variant(f"rd [SRCC -{drop:g}]", "rd", srcc_drop=float(drop), kind="rd"))
    return rows


@dataclass
class RDData:
    """Training-split data of the rd rows: calibration batches and a disjoint validation set."""

    calib: CentredScores
    validation: list[Sample]


def rd_data(
    model: IQAModel,
    train_samples: Sequence[Sample],
    calib_images: int = 32,
    val_images: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> RDData:
    """Split (seeded) training images into `calib_images` for calibration and the validation set.

    Both need at least 3 images; the validation set is what SRCC-drop rows are tuned on.
    """
    order = list(train_samples)
    random.Random(seed).shuffle(order)
    n_calib = min(calib_images, len(order) - 3)
    validation = order[n_calib : n_calib + val_images]
    if n_calib < 3 or len(validation) < 3:
        raise IQAError(
            f"rd rows need training images for calibration and validation; {len(order)} is too few"
        )
    calib = calibration(model, order[:n_calib], n_calib, batch_size, seed)
    return RDData(calib, validation)


@dataclass
class RefitData:
    """What the rows with a refit head train it on: the training split's images (those the
    model was trained on) and the settings (the paper's by default)."""

    samples: list[Sample]
    config: TrainConfig = field(default_factory=TrainConfig)


REFIT_SUFFIX = " + head refit"


def refit_variant(variant: Variant) -> Variant:
    """The row beside an rd row whose MLP head is trained again on its compressed backbone."""
    return Variant(variant.name + REFIT_SUFFIX, variant.policy, variant.options,
                   variant.srcc_drop, kind="refit")


def pick_variants(variants: list[Variant], only: str | None) -> list[Variant]:
    """Keep the rows named in `only` (comma-separated outside brackets, case-insensitive, as
    "LAPQ [budget 20x, channel]" is one row); all when None.

    A selection that names no row (``--only ","``) is refused: it would write empty tables;
    so are two rows of one name (``--paper-cr 3 --paper-cr 3.0000001``), which wrote one
    archive and two rows of its table.
    """
    seen: dict[str, Variant] = {}
    for v in variants:
        if seen.setdefault(_slug(v.name), v) is not v:
            raise IQAError(f"two rows are named alike ({seen[_slug(v.name)].name!r} and "
                           f"{v.name!r}: the same archive); give each value once, and values "
                           "that differ in their first six digits")
    if only is None:
        return variants
    wanted = [w.strip().lower() for w in _outside_brackets(only) if w.strip()]
    known = {v.name.lower() for v in variants}
    unknown = [w for w in wanted if w not in known]
    rows = ", ".join(v.name for v in variants)
    if not wanted:
        raise IQAError(f"--only {only!r} names no row; rows: {rows}")
    if unknown:
        raise IQAError(f"--only: unknown row(s) {', '.join(unknown)}; rows: {rows}")
    return [v for v in variants if v.name.lower() in wanted]


def _outside_brackets(text: str) -> list[str]:
    """``text`` split at the commas that no [...] encloses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        elif c == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


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
    logistic_fit: str  # "", "ok" or "degenerate: why" (then plcc_logistic is NaN)
    cr: float
    hcr: float
    real_ratio: float
    file_bytes: int
    sparsity: float
    mean_bits: float
    test_images: int
    seconds: float
    backbone: str
    kind: str = "paper"


def _plan_stats(result: Any) -> tuple[float, float]:
    """Weighted sparsity and mean bits (over quantized weights) of the selected layers."""
    layers = list(result.layers)
    total = sum(p.numel for p in layers) or 1
    sparsity = sum(p.sparsity * p.numel for p in layers) / total
    quant = [p for p in layers if p.bits is not None]
    qn = sum(p.numel for p in quant)
    bits = sum(p.bits * p.numel for p in quant) / qn if qn else math.nan
    return sparsity, bits


def _options_text(policy: str | None, options: dict[str, Any], beta: float, note: str) -> str:
    opts = dict(options)
    if policy in ("lap", "laq", "lapq"):
        opts["beta"] = beta
    text = ", ".join(f"{k}={val}" for k, val in opts.items())
    return f"{text} ({note})" if note else text


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
    codec: str = "ans",
    logistic: bool = False,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    rd: RDData | None = None,
    runtime: str = "float",
    refit: RefitData | None = None,
    log: Log = print,
) -> list[SweepRow]:
    """Evaluate each variant on `samples`; write each compressed model to OUT/archives/*.qlis.

    The baseline's real ratio is measured on `baseline_file` (its safetensors checkpoint);
    `model_metadata` (e.g. the checkpoint's dataset and split) is copied into every archive.
    `rd` (see `rd_data`) gives rd rows their calibration data; SRCC-drop rows need it. A row
    qlis refuses (e.g. a size target out of reach) is logged and left out. With
    ``runtime="lowbit"`` every compressed row is scored by its archive loaded with the low-bit
    runtime (layers kept packed), which must give the dequantized model's SRCC. With `refit`,
    each rd row gets a row beside it (`refit_variant`) whose MLP head, started from the float
    model's, is trained again on the compressed backbone's outputs of `refit.samples` and
    stored as the rd row stored its head (`CompressionResult.with_tensors`): SRCC with and
    without, labelled apart.
    """
    if runtime == "lowbit" and not archives:
        raise IQAError("the low-bit runtime scores the archives: do not pass --no-archives")
    if any(v.srcc_drop is not None for v in variants) and rd is None:
        raise IQAError("rd rows with an SRCC-drop target need training images (rd_data)")
    out = Path(out_dir)
    if archives:
        make_folder(make_folder(out) / "archives")
    original = state_nbytes(model)
    metadata = model.metadata()
    passthrough = {k: v for k, v in (model_metadata or {}).items() if k not in metadata}
    searching = rd is not None and any(v.srcc_drop is not None for v in variants)
    search = _QualitySearch(model, rd, beta, batch_size) if searching else None
    rows: list[SweepRow] = []

    def compressed(v: Variant, result: Any, candidate: IQAModel, started: float) -> Scored:
        """A compressed row's model and sizes, its archive written when `archives` (then
        loaded packed for the low-bit runtime)."""
        size = 0
        if archives:
            path = archive_path(out, v)
            extra = {KEY + "variant": v.name, **passthrough}
            known = len(result.warnings)
            with warnings.catch_warnings():  # the archive's (a size target missed): a line
                warnings.simplefilter("ignore", QualityWarning)
                size = write_archive(model, result, path, codec, extra, overwrite=True
                                     ).file_bytes
            for warning in result.warnings[known:]:
                log(f"{v.name}: warning: {warning}")
            if runtime == "lowbit":
                device = next(model.parameters()).device
                candidate = load_model(path, runtime="lowbit")[0].to(device)
        return Scored(candidate, float(result.cr), float(result.hcr), *_plan_stats(result),
                      size, started)

    for v in variants:
        start = time.perf_counter()
        options, note = dict(v.options), ""
        if v.policy is None:
            size = Path(baseline_file).stat().st_size if baseline_file else 0
            scored = Scored(model, 1.0, 1.0, 0.0, math.nan, size, start)
        else:
            calib = rd.calib if v.policy == "rd" and rd is not None else None
            try:
                with warnings.catch_warnings():  # the result's warnings: one line each, below
                    warnings.simplefilter("ignore", QualityWarning)
                    if v.srcc_drop is not None and search is not None:
                        options["min_cosine"], note = search.min_cosine_for(v.srcc_drop)
                    result = compress_model(model, v.policy, beta, calib, **options)
            except QlisError as exc:  # e.g. a size target this model cannot reach
                log(f"{v.name}: skipped ({exc})")
                continue
            for warning in result.warnings:
                log(f"{v.name}: warning: {warning}")
            scored = compressed(v, result, with_result(model, result, v.name), start)
        options_text = _options_text(v.policy, options, beta, note)
        rows.append(_scored_row(v, scored, samples, cache, batch_size, workers, progress,
                                options_text, original, model.label, logistic, log,
                                first=not rows))
        log(_row_line(rows[-1]))
        if refit is not None and v.kind == "rd":
            start = time.perf_counter()
            row = refit_variant(v)
            head = refit_compressed(model, result, refit.samples, cache, refit.config,
                                    batch_size, workers, progress)
            scored = compressed(row, head.result, head.model, start)
            rows.append(_scored_row(row, scored, samples, cache, batch_size, workers,
                                    progress, options_text, original, model.label, logistic,
                                    log, first=False))
            log(_row_line(rows[-1]))
    return rows


@dataclass
class Scored:
    """A row's model and sizes, before it is scored on the test images."""

    model: IQAModel
    cr: float
    hcr: float
    sparsity: float
    mean_bits: float
    file_bytes: int
    started: float


def _scored_row(
    v: Variant, scored: Scored, samples: Sequence[Sample], cache: FeatureCache | None,
    batch_size: int, workers: int, progress: bool, options: str, original: int, label: str,
    logistic: bool, log: Log, first: bool,
) -> SweepRow:
    """`scored`'s metrics on the test `samples` as a row of the table (`first`: the sweep's
    first row, which reports the images it could not read)."""
    preds = predict_samples(
        scored.model, samples, cache, batch_size, workers, progress, f"eval {v.name}"
    )
    if preds.skipped and first:
        log(skipped_report("test", preds.skipped))
    m = preds.metrics()
    fit = logistic_fit(preds.pred, preds.mos) if logistic else None
    why = preds.undefined({**m, **({"plcc_logistic": fit.plcc} if fit else {})})
    if why:  # the table shows "—": say why, beside the row
        log(f"{v.name}: {why}")
    return SweepRow(
        variant=v.name,
        policy=v.policy or "none",
        options=options,
        srcc=m["srcc"],
        krcc=m["krcc"],
        plcc=m["plcc"],
        plcc_logistic=fit.plcc if fit else math.nan,
        logistic_fit=_fit_text(fit),
        cr=scored.cr,
        hcr=scored.hcr,
        real_ratio=original / scored.file_bytes if scored.file_bytes else math.nan,
        file_bytes=scored.file_bytes,
        sparsity=scored.sparsity,
        mean_bits=scored.mean_bits,
        test_images=len(preds.names),
        seconds=time.perf_counter() - scored.started,
        backbone=label,
        kind=v.kind,
    )


class _QualitySearch:
    """Bisect COSINE_LADDER for the smallest archive within an allowed validation SRCC drop.

    Assumes the validation SRCC does not fall as min_cosine rises; validation SRCCs are
    remembered across the drops asked for, so a few drops cost a few compressions each.
    """

    def __init__(self, model: IQAModel, rd: RDData, beta: float, batch_size: int) -> None:
        self.model, self.rd, self.beta, self.batch_size = model, rd, beta, batch_size
        self.baseline = self._srcc(model)
        self.memo: dict[int, float] = {}

    def _srcc(self, model: IQAModel) -> float:
        preds = predict_samples(model, self.rd.validation, None, self.batch_size, desc="validate")
        return srcc(preds.pred, preds.mos)

    def _validation_srcc(self, i: int) -> float:
        if i not in self.memo:
            result = compress_model(
                self.model, "rd", self.beta, self.rd.calib, min_cosine=COSINE_LADDER[i]
            )
            self.memo[i] = self._srcc(with_result(self.model, result, "search"))
        return self.memo[i]

    def min_cosine_for(self, drop: float) -> tuple[float, str]:
        """The chosen min_cosine, and a note saying how it was chosen."""
        floor = self.baseline - drop
        top = len(COSINE_LADDER) - 1
        if math.isnan(self.baseline):  # no drop can be measured from an undefined SRCC
            return COSINE_LADDER[top], (
                f"the uncompressed model's validation SRCC is undefined on "
                f"{len(self.rd.validation)} training images (their MOS or its scores are all "
                f"equal): drop {drop:g} cannot be measured; the top of the ladder was used")

        def ok(i: int) -> bool:
            value = self._validation_srcc(i)
            return not math.isnan(value) and value >= floor

        lo, hi = 0, len(COSINE_LADDER) - 1
        met = ok(hi)
        while met and lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        chosen = hi
        note = (
            f"validation SRCC {_fmt(self.memo[chosen], 3)} vs {_fmt(self.baseline, 3)} on "
            f"{len(self.rd.validation)} training images"
            + ("" if met else f"; drop {drop:g} not met even at the top of the ladder")
        )
        return COSINE_LADDER[chosen], note


def make_folder(path: str | Path) -> Path:
    """Create an output folder whose parent exists (a missing parent is never created)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise IQAError(f"{path.parent}: no such folder (create it first)")
    path.mkdir(exist_ok=True)
    return path


def _fit_text(fit: LogisticFit | None) -> str:
    if fit is None:
        return ""
    return f"degenerate: {fit.reason}" if fit.degenerate else "ok"


def archive_path(out_dir: Path, variant: Variant) -> Path:
    """Where a sweep into OUT_DIR writes a variant's archive."""
    return out_dir / "archives" / f"{_slug(variant.name)}.qlis"


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
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
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
        if logistic:
            degenerate = r.logistic_fit.startswith("degenerate")
            cells.append("degenerate fit" if degenerate else _fmt(r.plcc_logistic, 4))
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
    if logistic and any(r.logistic_fit.startswith("degenerate") for r in rows):
        lines += [
            "degenerate fit: the 4-parameter logistic collapsed to a step function, so no "
            "PLCC (logistic) is given (the reason is in sweep.csv, column logistic_fit).",
            "",
        ]
    lines += side_by_side(rows)
    return "\n".join(lines)


def side_by_side(rows: Sequence[SweepRow]) -> list[str]:
    """Markdown lines: every row with an archive, by real ratio, paper and rd rows together."""
    sized = sorted((r for r in rows if not math.isnan(r.real_ratio)), key=lambda r: r.real_ratio)
    if not sized:
        return []
    lines = [
        "#### SRCC vs real archive ratio (paper and rd rows side by side)",
        "",
        "| real ratio | SRCC | kind | Variant | file bytes |",
        "|---|---|---|---|---|",
    ]
    for r in sized:
        cells = [_fmt(r.real_ratio, 2), _fmt(r.srcc, 4), r.kind, r.variant, f"{r.file_bytes:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


PLOT_STYLE = {  # kind -> matplotlib marker style and legend label
    "baseline": ({"marker": "*", "s": 120, "color": "black"}, "baseline (checkpoint)"),
    "paper": ({"marker": "o", "color": "tab:blue"}, "paper policies"),
    "extra": ({"marker": "s", "color": "tab:gray"}, "paper policies, qlis options"),
    "rd": ({"marker": "^", "color": "tab:orange"}, "qlis rd (calibrated)"),
    "refit": ({"marker": "v", "color": "tab:green"}, "qlis rd, MLP head refit"),
}


def plot(rows: Sequence[SweepRow], path: str | Path, title: str) -> Path:
    """SRCC against the REAL archive ratio, one marker per kind of row; rd rows joined."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    shown = [r for r in rows if not (math.isnan(r.srcc) or math.isnan(r.real_ratio))]
    for kind, (style, legend) in PLOT_STYLE.items():
        group = sorted((r for r in shown if r.kind == kind), key=lambda r: r.real_ratio)
        if not group:
            continue
        x, y = [r.real_ratio for r in group], [r.srcc for r in group]
        ax.scatter(x, y, label=legend, **style)
        if kind in ("rd", "refit") and len(group) > 1:
            ax.plot(x, y, color=style["color"], alpha=0.5)
        for r in group:
            ax.annotate(
                r.variant,
                (r.real_ratio, r.srcc),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xlabel("real compression ratio: original tensor bytes / archive bytes (log scale)")
    ax.set_ylabel("SRCC on the fixed test split")
    label = rows[0].backbone if rows else ""
    missing = len(rows) - len(shown)
    note = f" ({missing} row(s) without an archive not shown)" if missing else ""
    ax.set_title((title if label in title else f"{title}\n[{label}]") + note, fontsize=9)
    if shown:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def output_files(out_dir: str | Path, variants: Sequence[Variant],
                 archives: bool = True, refit: bool = False) -> list[Path]:
    """Every file a sweep of `variants` writes in OUT_DIR (`refit`: with the rows of a refit
    head): none of them may be an input."""
    out = Path(out_dir)
    files = [out / name for name in SWEEP_FILES.values()]
    if archives:
        files += [archive_path(out, v) for v in variants if v.policy is not None]
        files += [archive_path(out, refit_variant(v)) for v in variants
                  if refit and v.kind == "rd"]
    return files


def write_outputs(
    rows: Sequence[SweepRow], out_dir: str | Path, title: str, logistic: bool = False
) -> dict[str, Path]:
    """sweep.md, sweep.csv and sweep.png in OUT_DIR."""
    out = make_folder(out_dir)
    md = out / SWEEP_FILES["markdown"]
    with atomic_path(md) as tmp:
        tmp.write_text(markdown_table(rows, title, logistic), encoding="utf-8")
    return {
        "markdown": md,
        "csv": write_csv(rows, out / SWEEP_FILES["csv"]),
        "plot": plot(rows, out / SWEEP_FILES["plot"], title),
    }
