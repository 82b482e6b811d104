"""AGIQA-3K and AGIQA-1K annotations, image paths, and the fixed train/test split file.

A loader reads the scores, checks which images exist, and keeps the rest: rows whose image is
missing are reported (count and first names) and skipped. Unreadable images are found when
they are decoded (see features.py) and skipped the same way, before any training starts.
The annotation file is user data: it is read bounded (a regular file of at most
MAX_ANNOTATION_BYTES, strict UTF-8), and a score that is not a finite number or an image name
that leaves the images folder is an IQAError naming the row. A name annotated twice with
different scores is ambiguous (the official AGIQA-1K sheet has one): its rows are reported and
skipped, like a missing image.
The split is drawn once from the annotated names with a fixed seed and written to a JSON file,
so every run and every compressed variant is evaluated on the same test images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from qlis.archive.atomic import atomic_path
from qlis.cli.console import escape, human_bytes
from qlis.json_input import read_json_file
from qlis.regular_files import read_small_file
from qlis_iqa.errors import IQAError

DATASETS = ("agiqa-3k", "agiqa-1k")
ANNOTATIONS = {"agiqa-3k": ("data.csv",), "agiqa-1k": ("AIGC_MOS_Zscore.xlsx", "AIGC_all.csv")}
IMAGES = {"agiqa-3k": "images", "agiqa-1k": "file"}
MAX_ANNOTATION_BYTES = 1 << 26  # 64 MiB: AGIQA-3K's data.csv (prompts included) is 435 KiB
MAX_XLSX_UNPACKED_BYTES = 1 << 28  # AGIQA-1K's sheet unpacks to 346 KiB
MAX_SPLIT_BYTES = 1 << 26  # a split of a million names


@dataclass(frozen=True)
class Sample:
    """One annotated image: its file name, path and mean opinion score."""

    name: str
    path: Path
    mos: float


@dataclass
class IQADataset:
    """The annotated images of a dataset whose file exists, the names whose image does not, and
    the names left out because they are annotated twice with different scores."""

    name: str
    root: Path
    samples: list[Sample]
    missing: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, Sample]:
        return {s.name: s for s in self.samples}

    def missing_report(self) -> str:
        """'' or a line per problem: annotated rows without an image, names annotated twice."""
        lines = []
        if self.missing:
            lines.append(
                f"{self.name}: {len(self.missing)} annotated image(s) missing, skipped "
                f"(first: {', '.join(map(shown_name, self.missing[:5]))})"
            )
        if self.ambiguous:
            lines.append(
                f"{self.name}: {len(self.ambiguous)} image(s) annotated twice with different "
                f"scores, skipped (first: {'; '.join(self.ambiguous[:3])})"
            )
        return "\n".join(lines)


def shown_name(name: str, limit: int = 100) -> str:
    """An image name for a message: escaped, and cut to ``limit`` characters (a score file's
    name may be 100,000 characters long; five of them made one line of half a megabyte)."""
    text = escape(name)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Row(NamedTuple):
    """One annotation: its line in the file (1 = the header), image name and score."""

    line: int
    name: str
    mos: float


def dataset_paths(name: str, root: str | Path) -> tuple[list[Path], Path]:
    """The annotation file(s) a dataset may be read from and its images folder: the inputs
    that no output of qlis-iqa may replace or write into."""
    if name not in DATASETS:
        raise IQAError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    root = Path(root)
    return [root / f for f in ANNOTATIONS[name]], root / IMAGES[name]


def _unique(path: Path, rows: Iterable[Row]) -> tuple[list[Row], list[str]]:
    """Rows with one score per name, and a description of each name scored differently twice
    (all its rows are left out: which score is right cannot be told)."""
    first: dict[str, Row] = {}
    conflicts: dict[str, list[int]] = {}
    for row in rows:
        seen = first.setdefault(row.name, row)
        if seen is not row and seen.mos != row.mos:
            conflicts.setdefault(row.name, [seen.line]).append(row.line)
    described = [
        f"'{shown_name(n)}' in rows {' and '.join(map(str, lines[:10]))} of {escape(str(path))}"
        for n, lines in conflicts.items()
    ]
    return [r for r in first.values() if r.name not in conflicts], described


def _is_file(path: Path) -> bool:
    """Whether an annotated image is there. A name no file can have (a part over 255 bytes,
    a path past PATH_MAX) or a folder that cannot be searched is an OSError of `Path.is_file`:
    one such row ended the whole load, where a missing image is reported and skipped."""
    try:
        return path.is_file()
    except OSError:
        return False


def _build(name: str, root: Path, images: Path, path: Path, rows: list[Row]) -> IQADataset:
    if not rows:
        raise IQAError(f"{name}: the annotation file under {root} has no rows")
    unique, ambiguous = _unique(path, rows)
    samples, missing = [], []
    for row in unique:
        file = images / row.name
        if _is_file(file):
            samples.append(Sample(row.name, file, row.mos))
        else:
            missing.append(row.name)
    if not unique:  # the images may all be there: "none is in IMAGES" sent the user astray
        raise IQAError(f"{name}: every image of {escape(str(path))} is annotated twice with "
                       f"different scores (first: {ambiguous[0]}); keep one score per image")
    if not samples:
        raise IQAError(
            f"{name}: none of the {len(rows)} annotated images is in {images} "
            f"(first expected: {shown_name(rows[0].name)}); point --root at the folder that "
            "holds them"
        )
    return IQADataset(name, root, samples, missing, ambiguous)


def _check_columns(path: Path, header: list[str], needed: tuple[str, ...]) -> None:
    absent = [c for c in needed if c not in header]
    if absent:
        raise IQAError(
            f"{path}: expected column(s) {', '.join(needed)}, missing {', '.join(absent)} "
            f"(found: {escape(', '.join(map(str, header)))})"
        )
    repeated = [c for c in needed if header.count(c) > 1]
    if repeated:  # which copy is meant? (a CSV reader takes the last, a sheet the first)
        raise IQAError(f"{path}: column {escape(repeated[0])} appears "
                       f"{header.count(repeated[0])} times in the header; keep one")


_DECIMAL = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                      r"|(?i:nan|inf|infinity))")
"""A score as text: ASCII digits, a point and an exponent, or a word for a non-finite
number (refused as such); Python's float() also reads "4_5" as 45, and other scripts'
digits."""


MAX_SCORE = 1e9
"""The largest score's size: float32 training squares the scores' errors (1e20 overflows
it, and larger scores passed the check only to end in "training diverged")."""


def _score(path: Path, line: int, value: object) -> float:
    """A finite score: NaN or infinity would train a NaN model and give NaN correlations.
    A spreadsheet's empty or missing cell (None) is no score, and its TRUE / FALSE no number
    (the same words in a CSV are refused too)."""
    if value is None:
        raise IQAError(f"{path}, row {line}: no score")
    try:
        if isinstance(value, bool) or isinstance(value, str) and not _DECIMAL.fullmatch(
                value.strip()):
            raise TypeError
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise IQAError(f"{path}, row {line}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise IQAError(f"{path}, row {line}: score {value!r} is not a finite number")
    if abs(score) > MAX_SCORE:
        raise IQAError(f"{path}, row {line}: score {value!r} is past any rating scale (at "
                       f"most {MAX_SCORE:g} in size: training computes in float32)")
    return score


def _row(path: Path, line: int, name: str, score: object) -> Row:
    """The row, if its image name stays in the images folder: an absolute name or one with a
    '..' part would read an image from elsewhere (a test image could be trained on)."""
    parts = Path(name)
    if parts.anchor or ".." in parts.parts:
        raise IQAError(
            f"{path}, row {line}: image name {name!r} leaves the images folder; "
            "names are relative to it"
        )
    # one spelling per file: "./a.png" and "a.png" were two samples, one in train, one in test
    return Row(line, parts.as_posix(), _score(path, line, score))


def _read_text(path: Path) -> str:
    """The annotation file as strict UTF-8 text (a byte order mark is allowed)."""
    data = read_small_file(path, MAX_ANNOTATION_BYTES, expected="an annotation file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise IQAError(
            f"{path}, row {line}: not UTF-8 text (invalid byte at offset {err.start}); "
            "save the annotation file as UTF-8"
        ) from None


def _read_csv(path: Path, name_col: str, score_col: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        _check_columns(path, list(reader.fieldnames or []), (name_col, score_col))
        return [
            _row(path, reader.line_num, row[name_col].strip(), row[score_col])
            for row in reader
            if row[name_col] and row[name_col].strip()
        ]
    except csv.Error as err:  # e.g. a field over csv.field_size_limit() characters
        line = reader.reader.line_num  # the DictReader's count stops at the last good row
        raise IQAError(f"{path}, row {line}: not readable as CSV ({err})") from None


def _unpacked_size(path: Path, packed: bytes) -> int:
    """The bytes an .xlsx (a zip) declares its members to unpack to: Python's zip reader never
    inflates a member past its declared size, so this bounds what openpyxl can allocate (a
    zip bomb of a few KiB otherwise inflates to gigabytes)."""
    try:
        with zipfile.ZipFile(io.BytesIO(packed)) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise IQAError(f"{path}: not a readable .xlsx file ({exc})") from None


def _read_xlsx(path: Path, name_col: str, score_col: str) -> list[Row]:
    import openpyxl

    packed = read_small_file(path, MAX_ANNOTATION_BYTES, expected="an annotation file")
    unpacked = _unpacked_size(path, packed)
    if unpacked > MAX_XLSX_UNPACKED_BYTES:
        raise IQAError(f"{path} unpacks to {human_bytes(unpacked)}, more than the "
                       f"{human_bytes(MAX_XLSX_UNPACKED_BYTES)} accepted for an annotation sheet")
    try:  # read-only openpyxl parses the sheet as it is iterated: its errors come here too
        book = openpyxl.load_workbook(io.BytesIO(packed), read_only=True, data_only=True)
        sheet = book.worksheets[0]
        sheet.reset_dimensions()  # a <dimension> that understates the sheet cut its columns
        first = next(sheet.iter_rows(max_row=1, values_only=True), None)
        if first is None:
            raise IQAError(f"{path}: the sheet is empty")
        header = [str(c).strip() if c is not None else "" for c in first]
        _check_columns(path, header, (name_col, score_col))
        i_name, i_score = header.index(name_col), header.index(score_col)
        # only the columns read: each row is otherwise padded to the sheet's widest (16,384
        # cells for a cell in column XFD: an 81 KB sheet of 16,000 rows took 2.4 GB)
        rows = list(sheet.iter_rows(min_row=2, max_col=max(i_name, i_score) + 1,
                                    values_only=True))
        book.close()
    except IQAError:
        raise
    except Exception as exc:  # openpyxl raises many types for a bad file
        raise IQAError(f"{path}: not a readable .xlsx file ({exc})") from None

    def cell(row: tuple, index: int) -> object:  # a sheet's rows may stop short
        return row[index] if index < len(row) else None

    return [
        _row(path, line, str(name).strip(), cell(r, i_score))
        for line, r in enumerate(rows, start=2)
        if (name := cell(r, i_name)) is not None and str(name).strip()
    ]


def load_agiqa3k(root: str | Path, images: str | Path | None = None) -> IQADataset:
    """AGIQA-3K: `ROOT/data.csv` (columns name, mos_quality) and images in `ROOT/images`."""
    (ann,), default_images = dataset_paths("agiqa-3k", root)
    if not ann.exists():
        other = [n for n in ("AIGC_MOS_Zscore.xlsx", "AIGC_all.csv") if (Path(root) / n).exists()]
        hint = (f" ({root} holds {other[0]}, AGIQA-1K's annotations: pass --dataset agiqa-1k)"
                if other else "")
        raise IQAError(f"AGIQA-3K: {ann} not found; --root must hold data.csv and images/{hint}")
    rows = _read_csv(ann, "name", "mos_quality")
    return _build("agiqa-3k", Path(root), Path(images or default_images), ann, rows)


def load_agiqa1k(root: str | Path, images: str | Path | None = None) -> IQADataset:
    """AGIQA-1K: `AIGC_MOS_Zscore.xlsx` (Image, MOS) or `AIGC_all.csv` (Image, Score), `file/`.

    The official z-scored MOS sheet is preferred when both annotation files are present.
    """
    (xlsx, csv_path), default_images = dataset_paths("agiqa-1k", root)
    if xlsx.exists():
        ann, rows = xlsx, _read_xlsx(xlsx, "Image", "MOS")
    elif csv_path.exists():
        ann, rows = csv_path, _read_csv(csv_path, "Image", "Score")
    else:
        hint = (f" ({root} holds data.csv, AGIQA-3K's annotations: pass --dataset agiqa-3k)"
                if (Path(root) / "data.csv").exists() else "")
        raise IQAError(
            f"AGIQA-1K: neither {xlsx.name} nor {csv_path.name} in {root}; --root must hold "
            f"one of them and the unzipped images in file/{hint}"
        )
    return _build("agiqa-1k", Path(root), Path(images or default_images), ann, rows)


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
        """The split file at `path`, read bounded (it may be named by a checkpoint's metadata:
        a FIFO or /dev/zero there must not block or fill memory)."""
        d = read_json_file(path, "split file", MAX_SPLIT_BYTES, dict)
        missing = [k for k in ("dataset", "seed", "test_fraction", "train", "test") if k not in d]
        if missing:
            raise IQAError(f"{path}: not a qlis-iqa split file (no {', '.join(missing)})")
        problem = _split_problem(d)
        if problem:
            raise IQAError(f"{path}: not a usable qlis-iqa split file ({problem})")
        return cls(d["dataset"], d["seed"], float(d["test_fraction"]), d.get("limit"),
                   d["train"], d["test"])


def _split_problem(d: dict) -> str:
    """What is wrong with a split file's fields ("" if nothing): checked by type, because a
    string 'abc' iterates as three names, and consistency, because a name in both lists (or
    twice in test) would evaluate on training images or weigh one image many times."""

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def names(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(n, str) for n in v)

    fraction = d["test_fraction"]
    if not isinstance(d["dataset"], str):
        return "dataset is not a string"
    if not (integer(d["seed"]) and 0 <= d["seed"] < 2**63):
        return "seed is not an integer in [0, 2^63)"
    if not (integer(fraction) or isinstance(fraction, float)) or not 0 < fraction < 1:
        return "test_fraction is not a number in (0, 1)"
    if d.get("limit") is not None and not (integer(d["limit"]) and d["limit"] >= 2):
        return "limit is not null or an integer of at least 2"
    if not (names(d["train"]) and names(d["test"])):
        return "train and test must be lists of image names"
    for key in ("train", "test"):
        if len(set(d[key])) != len(d[key]):
            return f"a name appears twice in {key}"
    both = sorted(set(d["train"]) & set(d["test"]))
    if both:
        return f"{len(both)} name(s) in both train and test (first: {both[0][:80]!r})"
    return ""


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
