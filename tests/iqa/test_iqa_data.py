"""AGIQA-3K/1K loaders and the fixed split: missing rows reported, bad files a clear error."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

import openpyxl
import pytest
from iqa_helpers import SHARED_3K, make_agiqa3k, write_image

from qlis_iqa.data import Split, load_agiqa1k, load_agiqa3k, load_dataset, make_split
from qlis_iqa.errors import IQAError


def test_agiqa3k_sample(sample_root: Path) -> None:
    ds = load_agiqa3k(sample_root)
    assert ds.name == "agiqa-3k" and len(ds.samples) == 12 and not ds.missing
    assert all(s.path.is_file() and 0 < s.mos < 5 for s in ds.samples)


def test_agiqa3k_missing_images_are_reported_not_fatal(tmp_path: Path) -> None:
    root = make_agiqa3k(tmp_path / "d", 6, bad={1: "missing", 4: "missing"})
    ds = load_agiqa3k(root)
    assert len(ds.samples) == 4 and ds.missing == ["sd1.5_normal_001.jpg", "sd1.5_normal_004.jpg"]
    report = ds.missing_report()
    assert "2 annotated image(s) missing" in report and "sd1.5_normal_001.jpg" in report


def test_agiqa3k_errors(tmp_path: Path) -> None:
    with pytest.raises(IQAError, match="data.csv not found"):
        load_agiqa3k(tmp_path)
    (tmp_path / "data.csv").write_text("name,score\na.jpg,1\n")
    with pytest.raises(IQAError, match="missing mos_quality"):
        load_agiqa3k(tmp_path)
    (tmp_path / "data.csv").write_text("name,mos_quality\n")
    with pytest.raises(IQAError, match="no rows"):
        load_agiqa3k(tmp_path)
    (tmp_path / "data.csv").write_text("name,mos_quality\na.jpg,1\n")
    with pytest.raises(IQAError, match="none of the 1 annotated images"):
        load_agiqa3k(tmp_path)
    (tmp_path / "data.csv").write_text("name,mos_quality\na.jpg,high\n")
    with pytest.raises(IQAError, match="not a number"):
        load_agiqa3k(tmp_path)
    with pytest.raises(IQAError, match="unknown dataset"):
        load_dataset("koniq", tmp_path)


def _agiqa1k(root: Path, with_xlsx: bool) -> Path:
    """Synthetic AGIQA-1K: file/ named {deepai|dreamStudio}_{main}_{second}_{place}_{style}.jpg,
    plus the official file's malformed row (no image)."""
    (root / "file").mkdir(parents=True)
    names = [
        f"{g}_{m}_{s}_{p}_{st}.jpg"
        for g in ("deepai", "dreamStudio")
        for m, s, p, st in ((0, 0, 0, 0), (1, 2, 1, 1), (3, 4, 0, 1))
    ]
    for i, n in enumerate(names):
        write_image(root / "file" / n, i)
    rows = [(n, 1.0 + i / 2) for i, n in enumerate(names)] + [("dreamStudio_8_9_1_.jpg", 2.0)]
    with (root / "AIGC_all.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image", "Score"])
        w.writerows(rows)
    if with_xlsx:
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(["Image", "Prompt", "MOS"])
        for n, s in rows:
            sheet.append([n, "bird, anime style", s * 10])
        book.save(root / "AIGC_MOS_Zscore.xlsx")
    return root


@pytest.mark.parametrize("with_xlsx", [True, False])
def test_agiqa1k(tmp_path: Path, with_xlsx: bool) -> None:
    ds = load_agiqa1k(_agiqa1k(tmp_path, with_xlsx))
    assert ds.name == "agiqa-1k" and len(ds.samples) == 6
    assert ds.missing == ["dreamStudio_8_9_1_.jpg"]
    assert ds.samples[1].mos == pytest.approx(15.0 if with_xlsx else 1.5)  # xlsx preferred


def _without_dimension(path: Path, instead: bytes = b"") -> None:
    """The sheet without its <dimension> element, as many writers other than Excel leave it
    (then openpyxl gives each row only the cells it has), or with ``instead``."""
    packed = io.BytesIO()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(packed, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.startswith("xl/worksheets/sheet"):
                data = re.sub(rb"<dimension[^>]*/>", instead, data)
            target.writestr(name, data)
    path.write_bytes(packed.getvalue())


@pytest.mark.parametrize("ref", [b"A1", b"A1:B2"])
def test_an_xlsx_dimension_that_understates_the_sheet_loses_nothing(tmp_path: Path, ref):
    """openpyxl's read-only sheets trust it: the MOS column was cut off, "missing MOS"."""
    root = _agiqa1k(tmp_path, with_xlsx=True)
    _without_dimension(root / "AIGC_MOS_Zscore.xlsx", b'<dimension ref="' + ref + b'"/>')
    ds = load_agiqa1k(root)
    assert len(ds.samples) == 6 and ds.samples[1].mos == pytest.approx(15.0)


def test_an_xlsx_row_that_stops_short_or_holds_a_boolean_is_named(tmp_path: Path) -> None:
    root = _agiqa1k(tmp_path, with_xlsx=True)
    book = openpyxl.load_workbook(root / "AIGC_MOS_Zscore.xlsx")
    book.active.append(["img_short.jpg"])  # no prompt, no score
    book.save(root / "AIGC_MOS_Zscore.xlsx")
    _without_dimension(root / "AIGC_MOS_Zscore.xlsx")
    with pytest.raises(IQAError, match=r"row 9: no score"):
        load_agiqa1k(root)
    book = openpyxl.load_workbook(root / "AIGC_MOS_Zscore.xlsx")
    book.active.delete_rows(9)
    book.active.append(["img_true.jpg", "prompt", True])
    book.save(root / "AIGC_MOS_Zscore.xlsx")
    with pytest.raises(IQAError, match=r"row 9: score True is not a number"):
        load_agiqa1k(root)


def test_an_xlsx_sheet_with_a_far_cell_on_each_row_reads_its_two_columns(tmp_path: Path):
    root = _agiqa1k(tmp_path, with_xlsx=True)
    book = openpyxl.load_workbook(root / "AIGC_MOS_Zscore.xlsx")
    for row in range(1, book.active.max_row + 1):
        book.active.cell(row=row, column=16384, value="far")  # column XFD
    book.save(root / "AIGC_MOS_Zscore.xlsx")
    ds = load_agiqa1k(root)
    assert len(ds.samples) == 6 and ds.samples[1].mos == pytest.approx(15.0)


@pytest.mark.parametrize("with_xlsx", [True, False])
def test_a_score_column_twice_in_the_header_is_refused(tmp_path: Path, with_xlsx: bool):
    root = _agiqa1k(tmp_path, with_xlsx)
    if with_xlsx:
        book = openpyxl.load_workbook(root / "AIGC_MOS_Zscore.xlsx")
        book.active.cell(row=1, column=2, value="MOS")
        book.save(root / "AIGC_MOS_Zscore.xlsx")
    else:
        text = (root / "AIGC_all.csv").read_text().splitlines()
        text = ["Image,Score,Score"] + [line + ",9" for line in text[1:]]
        (root / "AIGC_all.csv").write_text("\n".join(text) + "\n")
    column = "MOS" if with_xlsx else "Score"
    with pytest.raises(IQAError, match=f"column {column} appears 2 times in the header"):
        load_agiqa1k(root)


def test_agiqa1k_scores_only_is_a_clear_error(tmp_path: Path) -> None:
    root = _agiqa1k(tmp_path, with_xlsx=False)
    for p in (root / "file").iterdir():
        p.unlink()
    with pytest.raises(IQAError, match=r"none of the 7 annotated images is in .*file"):
        load_agiqa1k(root)
    with pytest.raises(IQAError, match="neither AIGC_MOS_Zscore.xlsx nor AIGC_all.csv"):
        load_agiqa1k(tmp_path / "file")


def test_split_is_fixed_and_round_trips(tmp_path: Path) -> None:
    names = [f"img{i}.jpg" for i in range(50)]
    a = make_split("agiqa-3k", names, seed=3)
    b = make_split("agiqa-3k", list(reversed(names)), seed=3)
    assert a == b and len(a.test) == 10 and len(a.train) == 40
    assert not set(a.train) & set(a.test)
    assert make_split("agiqa-3k", names, seed=4).test != a.test
    loaded = Split.load(a.save(tmp_path / "split.json"))
    assert loaded == a and loaded.digest() == a.digest()
    small = make_split("agiqa-3k", names, seed=3, limit=10)
    assert len(small.train) == 8 and len(small.test) == 2
    with pytest.raises(IQAError, match="not a qlis-iqa split"):
        (tmp_path / "bad.json").write_text("{}")
        Split.load(tmp_path / "bad.json")
    with pytest.raises(IQAError, match="test fraction"):
        make_split("agiqa-3k", names, test_fraction=1.0)


@pytest.mark.skipif(not SHARED_3K.is_dir(), reason="../shared/data/agiqa-3k absent (fresh clone)")
def test_real_agiqa3k_has_all_images() -> None:
    ds = load_agiqa3k(SHARED_3K)
    assert len(ds.samples) == 2982 and not ds.missing


def test_a_root_of_the_other_dataset_names_the_dataset_option(tmp_path: Path) -> None:
    """AGIQA-1K's annotations under --root without --dataset agiqa-1k (and the reverse): the
    error says which --dataset the folder is for."""
    one_k = tmp_path / "1k"
    one_k.mkdir()
    (one_k / "AIGC_all.csv").write_text("Image,Score\na.jpg,1.0\n")
    with pytest.raises(IQAError, match="holds AIGC_all.csv.*--dataset agiqa-1k"):
        load_agiqa3k(one_k)
    three_k = make_agiqa3k(tmp_path / "3k", 2)
    with pytest.raises(IQAError, match="holds data.csv.*--dataset agiqa-3k"):
        load_agiqa1k(three_k)
    with pytest.raises(IQAError, match=r"images/$"):  # no hint where there is nothing to name
        load_agiqa3k(tmp_path)
