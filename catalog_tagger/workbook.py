"""Review workbooks: written with openpyxl for people, read back strictly for ``learn``.

The sheet a reviewer sees: an instruction line, a frozen header row, then one row per
photo with its thumbnail, an empty ``correct_label`` cell (a drop-down of the class names
and ``other``), the model's label and top-k scores, why the photo was chosen, its id and
path. The class list lives on a hidden sheet the drop-down refers to, so names with
commas or slashes need no quoting and the list has no 255-character limit.

Reading accepts what spreadsheets and people do to a file (the header anywhere in the
first rows, extra columns, reordered columns, "Correct label" for ``correct_label``) and
refuses, in one sentence naming the file and row, what would train a wrong model.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, OutputError

if TYPE_CHECKING:
    from .review import ReviewItem

REVIEW_SHEET = "review"
CLASSES_SHEET = "classes"
INSTRUCTIONS = ("Pick the true garment type of each photo in the correct_label column (drop-down); choose "
                "'{other}' if it is none of these (or type a name of your own, e.g. Watch, and learn with "
                "--new-classes), leave it empty to skip. Rows marked 'random' measure the "
                "model: label them all. Then run: catalog-tagger learn THIS_FILE --out NEW_MODEL_FOLDER")
# How far down a sheet ``learn`` looks for the header row (an instruction line or two above it is fine).
HEADER_SEARCH_ROWS = 20
ENCRYPTED_MAGIC = b"\xd0\xcf\x11\xe0"  # OLE2: an encrypted .xlsx, or an old binary .xls
REVIEW_COLUMNS = ("path", "correct_label", "image_id", "why")
# Columns that must not appear twice: reading the first of two answer (or photo) columns
# would silently drop a second reviewer's labels or pair labels with the wrong photos.
UNIQUE_COLUMNS = ("path", "correct_label")
# A European-locale Excel saves "CSV" with ';', some exports use tabs.
CSV_DELIMITERS = (",", ";", "\t")
# A cell formula in sheet XML (<f>, <f t="shared" ...>, <x:f>); <formula1> of a drop-down is not one.
FORMULA_ELEMENT = re.compile(rb"<(?:\w+:)?f[\s>/]")


@dataclass(frozen=True)
class ReviewRow:
    """One row of a review file; ``where`` names it for messages (file and row number)."""

    where: str
    image_id: str
    path: str
    correct_label: str
    why: str


def write_review_workbook(out: Path, items: Sequence[ReviewItem], classes: Sequence[str],
                          thumbnail_size: int) -> None:
    """Write the review workbook atomically (temporary file, then rename)."""
    from openpyxl import Workbook
    from openpyxl.drawing.image import Image as XLImage
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet.datavalidation import DataValidation

    from .review import OTHER, thumbnails

    k = max((len(item.topk) for item in items), default=1)
    header = ["thumbnail", "correct_label", "label", "confidence"]
    for j in range(2, k + 1):
        header += [f"label_{j}", f"score_{j}"]
    header += ["why", "image_id", "path"]

    wb = Workbook()
    ws = wb.active
    ws.title = REVIEW_SHEET
    ws["A1"] = INSTRUCTIONS.format(other=OTHER)
    ws["A1"].font = Font(bold=True)
    ws.append(header)
    for cell in ws[2]:
        cell.font = Font(bold=True)
        cell.fill = PatternFill("solid", fgColor="DDDDDD")
    ws.freeze_panes = "A3"  # instruction line and header stay in view
    row_height = thumbnail_size * 0.75 + 4  # points; pixels * 3/4
    for r, (item, jpeg) in enumerate(zip(items, thumbnails([i.path for i in items], thumbnail_size)), start=3):
        values: list[Any] = [None, None, item.label, round(item.confidence, 4)]
        for j in range(1, k):
            label, score = item.topk[j] if j < len(item.topk) else ("", None)
            values += [label, round(score, 4) if score is not None else None]
        values += [item.why, item.image_id, item.path]
        ws.append(values)
        for cell in ws[r]:
            # openpyxl stores text starting with "=" as a formula; a file name or id such as
            # =HYPERLINK(...) must stay text that a spreadsheet shows and never runs.
            if isinstance(cell.value, str) and cell.value.startswith("="):
                cell.data_type = "s"
        ws.row_dimensions[r].height = row_height
        if jpeg is not None:
            image = XLImage(io.BytesIO(jpeg))
            ws.add_image(image, f"A{r}")
    last = len(items) + 2
    widths = {"thumbnail": thumbnail_size / 7 + 2, "correct_label": 18, "label": 14, "why": 11,
              "image_id": 24, "path": 60}
    for j, name in enumerate(header, start=1):
        ws.column_dimensions[get_column_letter(j)].width = widths.get(name, 11)
    middle = Alignment(vertical="center")  # next to the thumbnail, not below it
    for row in ws.iter_rows(min_row=3, max_row=last, min_col=2, max_col=len(header)):
        for cell in row:
            cell.alignment = middle

    lists = wb.create_sheet(CLASSES_SHEET)
    for i, name in enumerate([*classes, OTHER], start=1):
        lists.cell(row=i, column=1, value=name)
    lists.sheet_state = "hidden"
    # A warning, not a stop: a name typed in (Watch) is how a reviewer asks for a class of
    # their own (learn --new-classes); learn still refuses one that looks like a typo of a class.
    validation = DataValidation(
        type="list", formula1=f"={CLASSES_SHEET}!$A$1:$A${len(classes) + 1}", allow_blank=True,
        showErrorMessage=True, errorStyle="warning", errorTitle="Not one of the classes",
        error=f"Keep this name only for a class of your own (learn --new-classes); choose '{OTHER}' if the "
              "photo shows none of the classes.",
    )
    ws.add_data_validation(validation)
    if items:
        validation.add(f"B3:B{last}")
    ws.auto_filter.ref = f"A2:{get_column_letter(len(header))}{last}"

    buf = io.BytesIO()
    wb.save(buf)
    atomic_write(out, buf.getvalue())


def atomic_write(out: Path, data: bytes) -> None:
    from .checkpoint import atomic_write_bytes

    try:
        atomic_write_bytes(Path(out), data)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc


def _norm(name: Any) -> str:
    return "_".join(str(name).strip().lower().split()) if name is not None else ""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def read_review_rows(path: Path, require_filled: bool = True) -> list[ReviewRow]:
    """Every photo row of a review workbook (.xlsx) or CSV (``path``, ``correct_label``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"review file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        if head.startswith(ENCRYPTED_MAGIC):
            raise DataError(f"{path} is password-protected (or an old .xls workbook); save it as .xlsx without "
                            "a password")
        if not zipfile.is_zipfile(path):
            if _looks_like_csv(path):
                raise DataError(f"{path} is a CSV file named .xlsx; rename it to .csv")
            raise DataError(f"{path} is not a readable .xlsx workbook (corrupt or truncated?)")
        rows = _read_xlsx(path)
    elif suffix == ".csv":
        if head.startswith(b"PK"):
            raise DataError(f"{path} is a workbook named .csv; rename it to .xlsx")
        rows = _read_csv(path)
    else:
        raise DataError(f"{path}: review files are .xlsx workbooks or .csv files")
    if require_filled and not any(r.correct_label for r in rows):
        raise DataError(f"{path} has no row with correct_label filled in; label some photos first")
    return rows


def _looks_like_csv(path: Path) -> bool:
    try:
        first = path.read_bytes()[:4096].decode("utf-8-sig").splitlines()[0]
    except (UnicodeDecodeError, IndexError, OSError):
        return False
    return "," in first or ";" in first or "\t" in first


def _header_columns(names: Sequence[Any]) -> dict[str, int]:
    columns: dict[str, int] = {}
    for j, name in enumerate(names):
        key = _norm(name)
        if key in REVIEW_COLUMNS and key not in columns:
            columns[key] = j
    return columns


def _refuse_repeated(path: Path, names: Sequence[Any], columns: dict[str, int],
                     column_name: Callable[[int], str]) -> None:
    for key in UNIQUE_COLUMNS:
        first = columns[key]
        second = next((j for j, name in enumerate(names) if j != first and _norm(name) == key), None)
        if second is not None:
            raise DataError(f"{path}: columns {column_name(first)} ({str(names[first]).strip()!r}) and "
                            f"{column_name(second)} ({str(names[second]).strip()!r}) both read as {key}; keep "
                            "one of them and delete or rename the other")


def _missing_header(path: Path) -> DataError:
    return DataError(f"{path} has no header row with the columns 'path' and 'correct_label' (the header row was "
                     "deleted or renamed); restore it as `catalog-tagger review` wrote it")


def _read_xlsx(path: Path) -> list[ReviewRow]:
    from openpyxl import load_workbook

    try:
        wb = load_workbook(path, data_only=True)
    except Exception as exc:  # openpyxl raises KeyError, BadZipFile, XML errors... for broken files
        raise DataError(f"{path} is not a readable .xlsx workbook ({exc.__class__.__name__}: {exc})") from exc
    sheets = [wb[REVIEW_SHEET]] if REVIEW_SHEET in wb.sheetnames else []
    sheets += [ws for ws in wb.worksheets if ws.title != REVIEW_SHEET and ws.sheet_state == "visible"]
    # Every sheet with the header counts: people copy the sheet ("review (2)") and answer
    # in the copy. learn keeps one row per photo and refuses two different answers.
    rows: list[ReviewRow] | None = None
    for ws in sheets:
        for r, values in enumerate(ws.iter_rows(max_row=HEADER_SEARCH_ROWS, values_only=True), start=1):
            columns = _header_columns(values)
            if "path" in columns and "correct_label" in columns:
                rows = (rows or []) + _rows_below(path, ws, r, values, columns)
                break
    if rows is None:
        raise _missing_header(path)
    return rows


def _rows_below(path: Path, ws: Any, header_row: int, header: Sequence[Any],
                columns: dict[str, int]) -> list[ReviewRow]:
    from openpyxl.utils import get_column_letter

    _refuse_repeated(path, header, columns, lambda j: get_column_letter(j + 1))
    for merged in ws.merged_cells.ranges:
        if merged.max_row <= header_row:
            continue
        for key, j in columns.items():
            if merged.min_col <= j + 1 <= merged.max_col:
                raise DataError(f"{path}: cells {merged.coord} are merged; unmerge them so that every photo has its "
                                f"own {key}")
    rows = []
    for r, values in enumerate(ws.iter_rows(min_row=header_row + 1, values_only=True), start=header_row + 1):
        get = {k: _cell(values[j]) if j < len(values) else "" for k, j in columns.items()}
        where = f"{path.name} row {r}" if ws.title == REVIEW_SHEET else f"{path.name} sheet '{ws.title}' row {r}"
        rows.append(ReviewRow(where, get.get("image_id", ""), get["path"],
                              get["correct_label"], get.get("why", "")))
    if any(row.path and not row.correct_label for row in rows) and _has_formulas(path):
        _refuse_unsaved_formulas(path, ws.title, header_row, columns["correct_label"], rows)
    return _checked(rows, path.parent)


def _has_formulas(path: Path) -> bool:
    """Whether any sheet holds a cell formula: a cheap look at the XML that spares most
    workbooks (people type or pick their answers) a second, slower load."""
    with zipfile.ZipFile(path) as zf:
        return any(FORMULA_ELEMENT.search(zf.read(name)) for name in zf.namelist()
                   if name.startswith("xl/worksheets/") and name.endswith(".xml"))


def _refuse_unsaved_formulas(path: Path, title: str, header_row: int, column: int, rows: list[ReviewRow]) -> None:
    """Refuse correct_label formulas that have no saved value.

    ``data_only`` reads a formula's value as the spreadsheet program last saved it; a
    workbook written by a script (openpyxl, pandas) saves none, so those answers would read
    as "not reviewed". Both cases store an empty result the same way, so a formula that
    evaluated to "" is told apart by its neighbours: a program that saved any answer
    formula's value saved them all.
    """
    from openpyxl import load_workbook

    wb = load_workbook(path, read_only=True)
    try:
        unsaved = []
        for row, cells in zip(rows, wb[title].iter_rows(min_row=header_row + 1, min_col=column + 1,
                                                         max_col=column + 1)):
            if cells and cells[0].data_type == "f":
                if row.correct_label:
                    return
                if row.path:
                    unsaved.append(row)
    finally:
        wb.close()
    if unsaved:
        raise DataError(f"{unsaved[0].where}: correct_label holds a formula with no saved value; open and save the "
                        "workbook in Excel or LibreOffice, or type the labels")


def _csv_delimiter(first_line: str) -> str:
    """The delimiter under which the header names both ``path`` and ``correct_label``;
    a comma when none or more than one does (the header error then says what is missing)."""
    fits = [d for d in CSV_DELIMITERS
            if {"path", "correct_label"} <= {_norm(n) for n in next(csv.reader([first_line], delimiter=d), [])}]
    return fits[0] if len(fits) == 1 else ","


def _read_csv(path: Path) -> list[ReviewRow]:
    """Text cells exactly as written; extra fields past the header (a delimiter at the end
    of every row, as many exporters write) are ignored, never shifting a column."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            first = fh.readline()
            reader = csv.reader(itertools.chain([first], fh), delimiter=_csv_delimiter(first))
            header = next(reader, [])
            columns = _header_columns(header)
            if "path" not in columns or "correct_label" not in columns:
                raise _missing_header(path)
            _refuse_repeated(path, header, columns, lambda j: str(j + 1))
            line = reader.line_num
            for values in reader:
                get = {k: values[j].strip() if j < len(values) else "" for k, j in columns.items()}
                rows.append(ReviewRow(f"{path.name} line {line + 1}", get.get("image_id", ""), get["path"],
                                      get["correct_label"], get.get("why", "")))
                line = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as a CSV file: {exc}") from exc
    return _checked(rows, path.parent)


def _checked(rows: list[ReviewRow], base: Path) -> list[ReviewRow]:
    """Drop blank rows, resolve relative paths against the file's folder, and refuse a
    label without a photo."""
    out = []
    for row in rows:
        if not row.path and not row.image_id and not row.correct_label:
            continue
        if not row.path:
            if row.correct_label:
                raise DataError(f"{row.where} has a correct_label but no path")
            continue
        path = row.path if os.path.isabs(row.path) else os.path.join(os.path.abspath(base), row.path)
        out.append(ReviewRow(row.where, row.image_id, path, row.correct_label, row.why))
    return out
