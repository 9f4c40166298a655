"""Reading MMEB test splits from local parquet or JSON-lines files (no hub, no pickles), in either layout.

Two layouts are in circulation, told apart per file by their columns (:func:`detect_layout`):

- ``MMEB_Test_Instruct`` (ziyjiang/MMEB_Test_Instruct, read by the released MuCo evaluation): ``qry_inst``,
  ``qry_text``, ``qry_img_path``, ``tgt_inst``, ``tgt_text`` (list), ``tgt_img_path`` (list);
- ``MMEB-eval`` (TIGER-Lab/MMEB-eval, VLM2Vec v1): ``qry_text``, ``qry_img_path``, ``tgt_text`` (list),
  ``tgt_img_path`` (list), the instruction inside ``qry_text`` (and inside each image candidate's ``tgt_text``).

A file with neither set of columns is refused with one line naming the columns it has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from muco.eval.errors import EvalDataError
from muco.eval.text import INSTRUCT, LAYOUTS, MMEB_EVAL, MMEBQuery

LAYOUT_COLUMNS = {
    INSTRUCT: ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"),
    MMEB_EVAL: ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"),
}
COLUMNS = LAYOUT_COLUMNS[INSTRUCT]  # every column either layout uses
# MMEB_Test_Instruct columns a split may lack (read as empty): t2i / cls parsers never read some of them
OPTIONAL = {"tgt_inst": "", "tgt_img_path": (), "qry_img_path": "", "qry_text": ""}
LIST_COLUMNS = ("tgt_text", "tgt_img_path")


def _describe(layout: str) -> str:
    return f"{layout} ({', '.join(c + ' (list)' if c in LIST_COLUMNS else c for c in LAYOUT_COLUMNS[layout])})"


def detect_layout(columns: Iterable[str]) -> str:
    """The layout of a file with these columns; anything else raises :class:`EvalDataError` naming them.

    ``qry_inst`` marks MMEB_Test_Instruct (which also needs ``tgt_text``; the other columns may be absent). A file
    without ``qry_inst`` and ``tgt_inst`` but with all four MMEB-eval columns is MMEB-eval. Other columns are
    ignored.
    """
    found = set(columns)
    if {"qry_inst", "tgt_text"} <= found:
        return INSTRUCT
    if "qry_inst" not in found and "tgt_inst" not in found and set(LAYOUT_COLUMNS[MMEB_EVAL]) <= found:
        return MMEB_EVAL
    expected = " or ".join(_describe(layout) for layout in LAYOUTS)
    raise EvalDataError(f"unknown MMEB layout: columns {sorted(found)}; expected {expected}")


def data_files(path: str | Path) -> list[Path]:
    """The files of one split: a parquet / jsonl file, or a directory of them (HF snapshot shards)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"MMEB data {path} does not exist")
    for pattern in ("test*.parquet", "*.parquet", "test*.jsonl", "*.jsonl"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"no *.parquet or *.jsonl files in {path}")


def _str_list(value: Any, column: str, row: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        if value.startswith("[") and value.endswith("]"):
            # a list stored as text: JSON is safe to parse; Python reprs are refused (never eval data)
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                raise EvalDataError(f"column {column!r} holds a list as non-JSON text; convert the file to "
                                    "real list columns", row=row) from None
            return _str_list(parsed, column, row)
        return (value,)
    if isinstance(value, Iterable):
        return tuple("" if v is None else str(v) for v in value)
    raise EvalDataError(f"column {column!r} must be a list of strings, got {type(value).__name__}", row=row)


def row_to_query(row: Mapping[str, Any], index: int = 0, *, layout: str | None = None,
                 parser: str | None = None) -> MMEBQuery:
    """One MMEB row of ``layout`` (``None``: detected from the row's keys) whose texts follow ``parser``.

    A row it cannot use raises :class:`EvalDataError` naming ``index``. An MMEB-eval row is held as
    :class:`MMEBQuery` describes: its ``qry_text`` (instruction and text) as the instruction.
    """
    if not isinstance(row, Mapping):
        raise EvalDataError(f"expected a JSON object per row, got {type(row).__name__}", row=index)
    if layout is None:
        try:
            layout = detect_layout(row)
        except EvalDataError as e:
            raise EvalDataError(e.reason, row=index) from e
    optional = OPTIONAL if layout == INSTRUCT else {}
    missing = [c for c in LAYOUT_COLUMNS[layout] if c not in row and c not in optional]
    if missing:
        raise EvalDataError(f"lacks the {layout} columns {missing}; got {sorted(row)}", row=index)
    get = {c: row.get(c, optional.get(c)) for c in LAYOUT_COLUMNS[layout]}
    tgt_text = _str_list(get["tgt_text"], "tgt_text", index)
    tgt_img_path = _str_list(get["tgt_img_path"], "tgt_img_path", index)
    if layout == MMEB_EVAL:
        return MMEBQuery(qry_inst=str(get["qry_text"] or ""), qry_text="", qry_img_path=str(get["qry_img_path"] or ""),
                         tgt_inst="", tgt_text=tgt_text, tgt_img_path=tgt_img_path, parser=parser, layout=layout)
    return MMEBQuery(
        qry_inst=str(get["qry_inst"] or ""),
        qry_text=str(get["qry_text"] or ""),
        qry_img_path=str(get["qry_img_path"] or ""),
        tgt_inst=str(get["tgt_inst"] or ""),
        tgt_text=tgt_text,
        tgt_img_path=tgt_img_path,
        parser=parser,
    )


def _rows(file: Path, first_row: int) -> Iterator[tuple[str | None, Any]]:
    """``(layout, row)`` for the rows of one file; a file or line it cannot read raises :class:`EvalDataError`
    naming file, line and row (``first_row``: the split's row number of this file's first row).

    A parquet file's layout comes from its schema; a JSONL file's from its first row (``None`` when that row is
    not a JSON object, which then fails as a row).
    """
    if file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
        except (pa.ArrowException, OSError) as e:
            raise EvalDataError(f"cannot read the parquet file ({type(e).__name__}: {e})", file=file,
                                what="data") from e
        try:
            layout = detect_layout(names)
        except EvalDataError as e:
            raise EvalDataError(e.reason, file=file, what="data") from e
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[c for c in LAYOUT_COLUMNS[layout] if c in names]):
                for row in batch.to_pylist():
                    yield layout, row
        except (pa.ArrowException, OSError) as e:
            raise EvalDataError(f"cannot read the parquet file ({type(e).__name__}: {e})", file=file,
                                what="data") from e
    elif file.suffix in (".jsonl", ".json"):
        row = first_row
        first_layout = None
        with file.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise EvalDataError(f"line {line_no} is not UTF-8 ({e.reason} at byte {e.start})", row=row,
                                        file=file, what="data") from e
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip())
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"line {line_no} is not valid JSON ({e.msg} at character {e.pos + 1})",
                                        row=row, file=file, what="data") from e
                if row == first_row and isinstance(obj, Mapping):
                    try:
                        first_layout = detect_layout(obj)
                    except EvalDataError as e:  # the file's layout, decided by its first row
                        raise EvalDataError(e.reason, file=file, what="data") from e
                yield first_layout, obj
                row += 1
    else:
        raise EvalDataError("unsupported MMEB data file; use .parquet or .jsonl", file=file, what="data")


def load_queries(path: str | Path, limit: int | None = None, parser: str | None = None) -> list[MMEBQuery]:
    """All rows of a split (the first ``limit`` when given), in file order, their texts following ``parser``.

    Each file's layout is detected on its own (:func:`detect_layout`). A missing ``path`` raises
    FileNotFoundError; a file, line or row that cannot be used raises :class:`EvalDataError` naming the file and
    the row (0-based over the split, as in ``<task>.pred.jsonl``).
    """
    out: list[MMEBQuery] = []
    for file in data_files(path):
        for layout, row in _rows(file, len(out)):
            if limit is not None and len(out) >= limit:
                return out
            try:
                out.append(row_to_query(row, len(out), layout=layout, parser=parser))
            except EvalDataError as e:
                raise EvalDataError(e.reason, row=e.row, file=file, what="data") from e
            except ValueError as e:  # e.g. an unknown parser
                raise EvalDataError(str(e), row=len(out), file=file, what="data") from e
    if not out:
        raise EvalDataError("holds no rows", file=path, what="data")
    return out
