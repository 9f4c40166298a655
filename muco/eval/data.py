"""Reading MMEB_Test_Instruct test splits from local parquet or JSON-lines files (no hub, no pickles)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

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
                raise ValueError(f"row {row}: column {column!r} holds a list as non-JSON text; convert the "
                                 "file to real list columns") from None
            return _str_list(parsed, column, row)
        return (value,)
    if isinstance(value, Iterable):
        return tuple("" if v is None else str(v) for v in value)
    raise ValueError(f"row {row}: column {column!r} must be a list of strings, got {type(value).__name__}")


def row_to_query(row: Mapping[str, Any], index: int = 0) -> MMEBQuery:
    missing = [c for c in COLUMNS if c not in row and c not in OPTIONAL]
    if missing:
        raise ValueError(f"row {index} lacks the MMEB columns {missing}; got {sorted(row)}")
    get = {c: row.get(c, OPTIONAL.get(c)) for c in COLUMNS}
    return MMEBQuery(
        qry_inst=str(get["qry_inst"] or ""),
        qry_text=str(get["qry_text"] or ""),
        qry_img_path=str(get["qry_img_path"] or ""),
        tgt_inst=str(get["tgt_inst"] or ""),
        tgt_text=_str_list(get["tgt_text"], "tgt_text", index),
        tgt_img_path=_str_list(get["tgt_img_path"], "tgt_img_path", index),
    )


def _rows(file: Path) -> Iterator[dict[str, Any]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            yield from batch.to_pylist()
    elif file.suffix in (".jsonl", ".json"):
        with file.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        raise ValueError(f"unsupported MMEB data file {file}; use .parquet or .jsonl")


def load_queries(path: str | Path, limit: int | None = None) -> list[MMEBQuery]:
    """All rows of a split (the first ``limit`` when given), in file order."""
    out: list[MMEBQuery] = []
    for file in data_files(path):
        for row in _rows(file):
            if limit is not None and len(out) >= limit:
                return out
            out.append(row_to_query(row, len(out)))
    if not out:
        raise ValueError(f"MMEB data {path} holds no rows")
    return out
