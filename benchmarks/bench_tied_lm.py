"""A language model whose output layer is tied to its input embedding, compressed with rd.

No tied pretrained model can be downloaded here, so this script TRAINS one: a small GPT-2
(4 layers of width 128, a 4,096-word vocabulary, 1.3 M parameters, the tied table 40% of
them) on English paragraphs taken from the docstrings of the installed torch, numpy, scipy
and transformers (a few minutes on 2 cores; kept in the system temp folder and reused).
Paragraphs held apart from training give the calibration text (128) and the evaluation
text (300). Quality: the mean cosine of the next-token logits to the float model's (what rd's
calibration measures) and the increase of the held-out negative log-likelihood per token.

    python benchmarks/bench_tied_lm.py               # writes docs/benchmarks.md
    python benchmarks/bench_tied_lm.py --no-write

Exits 0 with a line saying why where transformers or tokenizers cannot be had.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

import qlis
from report import command, machine, write_section

VOCAB = 4096
CONTEXT = 64
EVALUATION, CALIBRATION = 300, 128  # paragraphs held apart from training
CALIB_BATCH = 8
BITS = [2.25, 2.5, 2.75, 3.0, 3.5, 4.0]
PACKAGES = ("transformers", "numpy", "scipy", "torch")

try:
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
except ImportError as missing:  # pragma: no cover - what the script says where it cannot run
    print(f"bench_tied_lm: skipped: {missing}")
    sys.exit(0)


def paragraphs() -> list[str]:
    """Prose paragraphs of the installed packages' docstrings, deduplicated, in a fixed
    shuffled order (code, tables and doctests left out)."""
    site = Path(transformers.__file__).parent.parent
    found: list[str] = []
    for package in PACKAGES:
        for path in sorted((site / package).rglob("*.py"))[:4000]:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Module):
                    for part in (ast.get_docstring(node) or "").split("\n\n"):
                        text = " ".join(part.split())
                        if 40 < len(text) < 400 and not re.search(r"[>{}=\[\]]{2}", text):
                            found.append(text)
    found = list(dict.fromkeys(found))
    random.Random(0).shuffle(found)
    return found


def trained_model(folder: Path, steps: int) -> None:
    """Train the tied GPT-2 and its word-level tokenizer into ``folder``, with the held-apart
    paragraphs beside it."""
    texts = paragraphs()
    evaluation, calibration = texts[:EVALUATION], texts[EVALUATION:EVALUATION + CALIBRATION]
    train = texts[EVALUATION + CALIBRATION:]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(train, trainers.WordLevelTrainer(
        vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "<|endoftext|>"]))
    ids: list[int] = []
    for text in train:
        ids += [*tokenizer.encode(text).ids, 2]
    data = torch.tensor(ids)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=4, n_head=4,
                                     n_positions=CONTEXT, bos_token_id=2, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        for group in optimizer.param_groups:  # warm-up, then linear decay to a tenth
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * max(0.1, 1 - step / steps)
        starts = torch.randint(0, len(data) - CONTEXT - 1, (32,))
        batch = torch.stack([data[s:s + CONTEXT] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            print(f"  training step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(folder)
    (folder / "evaluation.txt").write_text("\n".join(evaluation) + "\n")
    (folder / "calibration.txt").write_text("\n".join(calibration) + "\n")


def batches(tokenizer: object, path: Path, size: int) -> list[dict[str, torch.Tensor]]:
    lines = [line for line in path.read_text().splitlines() if line]
    out = []
    for i in range(0, len(lines), size):
        encoded = tokenizer(lines[i:i + size], padding=True, truncation=True,
                            max_length=CONTEXT, return_tensors="pt")
        out.append({"input_ids": encoded["input_ids"],
                    "attention_mask": encoded["attention_mask"]})
    return out


class Scorer:
    """Logits cosine to the float model's and negative log-likelihood per token, on the
    evaluation paragraphs."""

    def __init__(self, model: torch.nn.Module, evaluation: list[dict[str, torch.Tensor]]):
        self.evaluation = evaluation
        with torch.inference_mode():
            self.reference = [model(**batch).logits for batch in evaluation]
        self.float_nll = self(model)[1]

    def __call__(self, model: torch.nn.Module) -> tuple[float, float]:
        cosines, nll, count = [], 0.0, 0
        with torch.inference_mode():
            for batch, reference in zip(self.evaluation, self.reference, strict=True):
                logits = model(**batch).logits
                mask = batch["attention_mask"].bool()
                cosines.append(torch.nn.functional.cosine_similarity(
                    logits.double(), reference.double(), dim=-1)[mask])
                logp = logits[:, :-1].log_softmax(-1)
                targets, kept = batch["input_ids"][:, 1:], mask[:, 1:]
                nll -= logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[kept].sum().item()
                count += int(kept.sum())
        return torch.cat(cosines).mean().item(), nll / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=900, help="training steps")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "qlis-bench" / "tied-gpt2")
    parser.add_argument("--bits", type=float, nargs="+", default=BITS)
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    folder = args.workdir / f"steps{args.steps}"
    if not (folder / "model.safetensors").exists():
        print(f"training the tied GPT-2 ({args.steps} steps) into {folder}", flush=True)
        started = time.perf_counter()
        trained_model(folder, args.steps)
        print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    params = sum(p.numel() for p in model.parameters())
    calibration = batches(tokenizer, folder / "calibration.txt", CALIB_BATCH)
    score = Scorer(model, batches(tokenizer, folder / "evaluation.txt", 50))
    rows = []
    for bits in args.bits:
        for label, calib in (("rd data-free", None), ("rd calibrated", calibration)):
            started = time.perf_counter()
            result = qlis.compress(model, calib=calib, target_bits_per_weight=bits)
            seconds = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "tied.qlis"
                qlis.save(result, path)
                size = os.path.getsize(path)
            compressed = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
            compressed.load_state_dict(result.state_dict(), strict=False)
            cosine, nll = score(compressed)
            table = next(layer for layer in result.layers
                         if layer.name == "transformer.wte.weight")
            row = (f"| {label} | {bits} | {size:,} | {8 * size / params:.3f} | {cosine:.5f} | "
                   f"{nll - score.float_nll:+.4f} | {seconds:.1f} | "
                   f"{table.reconstruction or 'nearest'} |")
            print(row, flush=True)
            rows.append(row)
    text = "\n".join([
        "## A tied language model (`benchmarks/bench_tied_lm.py`)", "",
        f"Machine: {machine()}. Command: `{command()}`.", "",
        f"A GPT-2 of 4 layers, width 128, {VOCAB:,}-word vocabulary ({params:,} parameters; "
        "the output layer tied to the input embedding, 40% of the weights) TRAINED HERE for "
        f"{args.steps} steps on docstring paragraphs of the installed packages: a small "
        "model of our own, not a pretrained one. Calibration: 128 held-apart paragraphs in "
        "batches of 8; quality on 300 others: mean cosine of the next-token logits to the "
        f"float model's, and the increase of the negative log-likelihood per token (float: "
        f"{score.float_nll:.4f}).", "",
        "| method | target b/w | archive bytes | real b/w | logits cosine | NLL change | "
        "compress s | the tied table |",
        "|---|---|---|---|---|---|---|---|", *rows])
    if not args.no_write:
        write_section("bench_tied_lm", text)


if __name__ == "__main__":
    main()
