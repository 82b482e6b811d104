"""Fixtures of the IQA tests: tiny random CLIP/DINO backbones, the 12-image AGIQA-3K sample and
one trained run per family, shared by the whole session.

Without the `iqa` extra (transformers, pillow, openpyxl) these tests are not collected.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

MISSING = [m for m in ("transformers", "PIL", "openpyxl", "matplotlib") if find_spec(m) is None]
if MISSING:
    collect_ignore_glob = ["test_*.py"]

DATA = Path(__file__).resolve().parents[1] / "data" / "iqa" / "agiqa-3k-sample"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """12 AGIQA-3K images (64x64) with their data.csv rows."""
    return DATA


@pytest.fixture(scope="session")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-initialised backbones saved with save_pretrained."""
    from qlis_iqa.backbones import save_random_backbone

    root = tmp_path_factory.mktemp("backbones")
    return {fam: save_random_backbone(fam, root / fam, "tiny", seed=1) for fam in ("clip", "dino")}


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, backbones: dict[str, Path]) -> dict:
    """One epoch of training per family on the sample (6 train / 6 test images)."""
    from qlis_iqa.train import TrainConfig, train_run

    root = tmp_path_factory.mktemp("runs")
    return {
        fam: train_run(
            fam,
            "agiqa-3k",
            DATA,
            root / fam,
            weights=backbones[fam],
            config=TrainConfig(epochs=1, batch_size=4),
            test_fraction=0.5,
            log=lambda m: None,
        )
        for fam in ("clip", "dino")
    }


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A file standing for a model: the checks under test fail before it would be read."""
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"checkpoint")
    return path
