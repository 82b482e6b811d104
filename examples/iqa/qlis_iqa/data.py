"""AGIQA-3K and AGIQA-1K annotations, image paths, and the fixed train/test split file.

A loader reads the scores, checks which images exist, and keeps the rest: rows whose image is
missing are reported (count and first names) and skipped. Unreadable images are found when
they are decoded (see features.py) and skipped the same way, before any training starts.
The split is drawn once from the annotated names with a fixed seed and written to a JSON file,
so every run and every compressed variant is evaluated on the same test images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlis.archive.atomic import atomic_path
from qlis_iqa.errors import IQAError

DATASETS = ("agiqa-3k", "agiqa-1k")


@dataclass(frozen=True)
class Sample:
    """One annotated image: its file name, path and mean opinion score."""

    name: str
    path: Path
    mos: float


@dataclass
class IQADataset:
    """The annotated images of a dataset whose file exists, and the names whose image does not."""

    name: str
    root: Path
    samples: list[Sample]
    missing: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, Sample]:
        return {s.name: s for s in self.samples}

    def missing_report(self) -> str:
        """'' or one line: how many annotated rows have no image, and the first few names."""
        if not self.missing:
            return ""
        return (
            f"{self.name}: {len(self.missing)} annotated image(s) missing, skipped "
            f"(first: {', '.join(self.missing[:5])})"
        )


def _build(name: str, root: Path, images: Path, rows: list[tuple[str, float]]) -> IQADataset:
    if not rows:
        raise IQAError(f"{name}: the annotation file under {root} has no rows")
    samples, missing = [], []
    for img, mos in rows:
        path = images / img
        if path.is_file():
            samples.append(Sample(img, path, mos))
        else:
            missing.append(img)
    if not samples:
        raise IQAError(
            f"{name}: none of the {len(rows)} annotated images is in {images} "
            f"(first expected: {rows[0][0]}); point --root at the folder that holds them"
        )
    return IQADataset(name, root, samples, missing)


def _check_columns(path: Path, header: list[str], needed: tuple[str, ...]) -> None:
    absent = [c for c in needed if c not in header]
    if absent:
        raise IQAError(
            f"{path}: expected column(s) {', '.join(needed)}, missing {', '.join(absent)} "
            f"(found: {', '.join(map(str, header))})"
        )


def _float(path: Path, line: int, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise IQAError(f"{path}, row {line}: score {value!r} is not a number") from None


def _read_csv(path: Path, name_col: str, score_col: str) -> list[tuple[str, float]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        _check_columns(path, list(reader.fieldnames or []), (name_col, score_col))
        return [
            (row[name_col].strip(), _float(path, i, row[score_col]))
            for i, row in enumerate(reader, start=2)
            if row[name_col] and row[name_col].strip()
        ]


def _read_xlsx(path: Path, name_col: str, score_col: str) -> list[tuple[str, float]]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a bad file
        raise IQAError(f"{path}: not a readable .xlsx file ({exc})") from None
    rows = list(book.worksheets[0].iter_rows(values_only=True))
    book.close()
    if not rows:
        raise IQAError(f"{path}: the sheet is empty")
    header = [str(c).strip() if c is not None else "" for c in rows[0]]
    _check_columns(path, header, (name_col, score_col))
    i_name, i_score = header.index(name_col), header.index(score_col)
    return [
        (str(r[i_name]).strip(), _float(path, line, r[i_score]))
        for line, r in enumerate(rows[1:], start=2)
        if r[i_name] is not None and str(r[i_name]).strip()
    ]


def load_agiqa3k(root: str | Path, images: str | Path | None = None) -> IQADataset:
    """AGIQA-3K: `ROOT/data.csv` (columns name, mos_quality) and images in `ROOT/images`."""
    root = Path(root)
    ann = root / "data.csv"
    if not ann.is_file():
        raise IQAError(f"AGIQA-3K: {ann} not found; --root must hold data.csv and images/")
    rows = _read_csv(ann, "name", "mos_quality")
    return _build("agiqa-3k", root, Path(images) if images else root / "images", rows)


def load_agiqa1k(root: str | Path, images: str | Path | None = None) -> IQADataset:
    """AGIQA-1K: `AIGC_MOS_Zscore.xlsx` (Image, MOS) or `AIGC_all.csv` (Image, Score), `file/`.

    The official z-scored MOS sheet is preferred when both annotation files are present.
    """
    root = Path(root)
    xlsx, csv_path = root / "AIGC_MOS_Zscore.xlsx", root / "AIGC_all.csv"
    if xlsx.is_file():
        rows = _read_xlsx(xlsx, "Image", "MOS")
    elif csv_path.is_file():
        rows = _read_csv(csv_path, "Image", "Score")
    else:
        raise IQAError(
            f"AGIQA-1K: neither {xlsx.name} nor {csv_path.name} in {root}; --root must hold "
            "one of them and the unzipped images in file/"
        )
    return _build("agiqa-1k", root, Path(images) if images else root / "file", rows)


def load_dataset(name: str, root: str | Path, images: str | Path | None = None) -> IQADataset:
    """Load 'agiqa-3k' or 'agiqa-1k' from its root folder."""
    if name == "agiqa-3k":
        return load_agiqa3k(root, images)
    if name == "agiqa-1k":
        return load_agiqa1k(root, images)
    raise IQAError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")


@dataclass(frozen=True)
class Split:
    """A fixed train/test partition of a dataset's annotated image names."""

    dataset: str
    seed: int
    test_fraction: float
    limit: int | None
    train: list[str]
    test: list[str]

    def digest(self) -> str:
        """SHA-256 of the split's content: identifies it in checkpoints and archives."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        """Write the split file atomically (its folder must exist)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                dataset=str(d["dataset"]),
                seed=int(d["seed"]),
                test_fraction=float(d["test_fraction"]),
                limit=None if d.get("limit") is None else int(d["limit"]),
                train=[str(n) for n in d["train"]],
                test=[str(n) for n in d["test"]],
            )
        except FileNotFoundError:
            raise IQAError(f"split file {path} not found") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise IQAError(f"{path}: not a qlis-iqa split file ({exc})") from None


def make_split(
    dataset: str,
    names: list[str],
    seed: int = 0,
    test_fraction: float = 0.2,
    limit: int | None = None,
) -> Split:
    """Shuffle the sorted names with `seed`, keep `limit` of them, put `test_fraction` in test."""
    if not 0.0 < test_fraction < 1.0:
        raise IQAError(f"test fraction must be between 0 and 1, got {test_fraction}")
    order = sorted(set(names))
    random.Random(seed).shuffle(order)
    if limit is not None:
        if limit < 2:
            raise IQAError(f"--limit must be at least 2, got {limit}")
        order = order[:limit]
    n_test = max(1, round(len(order) * test_fraction))
    if n_test >= len(order):
        raise IQAError(f"{len(order)} image(s) cannot be split into train and test")
    train, test = sorted(order[n_test:]), sorted(order[:n_test])
    return Split(dataset, seed, test_fraction, limit, train, test)


def split_samples(ds: IQADataset, names: list[str]) -> tuple[list[Sample], list[str]]:
    """The samples of `names` that have an image, and the names that do not (to report)."""
    by_name = ds.by_name()
    found = [by_name[n] for n in names if n in by_name]
    return found, [n for n in names if n not in by_name]
