"""Reading MMEB_Test_Instruct test splits from local parquet or JSON-lines files (no hub, no pickles)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from muco.eval.errors import EvalDataError
from muco.eval.text import MMEBQuery

COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")
# t2i / cls splits may lack target-side columns that their parser never reads
OPTIONAL = {"tgt_inst": "", "tgt_img_path": (), "qry_img_path": "", "qry_text": ""}


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


def row_to_query(row: Mapping[str, Any], index: int = 0) -> MMEBQuery:
    """One MMEB row; a row it cannot use raises :class:`EvalDataError` naming ``index``."""
    if not isinstance(row, Mapping):
        raise EvalDataError(f"expected a JSON object per row, got {type(row).__name__}", row=index)
    missing = [c for c in COLUMNS if c not in row and c not in OPTIONAL]
    if missing:
        raise EvalDataError(f"lacks the MMEB columns {missing}; got {sorted(row)}", row=index)
    get = {c: row.get(c, OPTIONAL.get(c)) for c in COLUMNS}
    return MMEBQuery(
        qry_inst=str(get["qry_inst"] or ""),
        qry_text=str(get["qry_text"] or ""),
        qry_img_path=str(get["qry_img_path"] or ""),
        tgt_inst=str(get["tgt_inst"] or ""),
        tgt_text=_str_list(get["tgt_text"], "tgt_text", index),
        tgt_img_path=_str_list(get["tgt_img_path"], "tgt_img_path", index),
    )


def _rows(file: Path, first_row: int) -> Iterator[dict[str, Any]]:
    """The rows of one file; a file or line it cannot read raises :class:`EvalDataError` naming file, line and row
    (``first_row``: the split's row number of this file's first row)."""
    if file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(file)
            cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=1024, columns=cols):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise EvalDataError(f"cannot read the parquet file ({type(e).__name__}: {e})", file=file,
                                what="data") from e
    elif file.suffix in (".jsonl", ".json"):
        row = first_row
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
                yield obj
                row += 1
    else:
        raise EvalDataError("unsupported MMEB data file; use .parquet or .jsonl", file=file, what="data")


def load_queries(path: str | Path, limit: int | None = None) -> list[MMEBQuery]:
    """All rows of a split (the first ``limit`` when given), in file order.

    A missing ``path`` raises FileNotFoundError; a file, line or row that cannot be used raises
    :class:`EvalDataError` naming the file and the row (0-based over the split, as in ``<task>.pred.jsonl``).
    """
    out: list[MMEBQuery] = []
    for file in data_files(path):
        for row in _rows(file, len(out)):
            if limit is not None and len(out) >= limit:
                return out
            try:
                out.append(row_to_query(row, len(out)))
            except EvalDataError as e:
                raise EvalDataError(e.reason, row=e.row, file=file, what="data") from e
    if not out:
        raise EvalDataError("holds no rows", file=path, what="data")
    return out
