"""Fixtures for the evaluation tests: image files on disk, a tiny adapter-wrapped encoder, MMEB parquet files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory, photos) -> Path:
    """Small real photos saved as PNG files named 0.png .. 5.png."""
    d = tmp_path_factory.mktemp("images")
    for i, im in enumerate(photos):
        im.resize((48, 40)).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="session")
def tiny_encoder(tiny_tok):
    """MuCoEncoder over a random-init tiny Qwen2-VL with a LoRA adapter whose B matrices are non-zero."""
    from muco.encoder import MuCoEncoder
    from tests.adapted import adapted_tiny_backbone

    return MuCoEncoder.from_parts(tiny_tok, adapted_tiny_backbone(tiny_tok, seed=0), image_policy="tiny")


# Columns of the released MMEB test files, in file order: plain strings, and lists of strings for the candidates.
# MMEB_Test_Instruct: ziyjiang/MMEB_Test_Instruct (read by the released MuCo evaluation); MMEB-eval:
# TIGER-Lab/MMEB-eval (VLM2Vec v1), the instruction inside qry_text and inside each image candidate's tgt_text.
MMEB_FILE_COLUMNS = {
    "MMEB_Test_Instruct": ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"),
    "MMEB-eval": ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"),
}


@pytest.fixture
def write_mmeb_parquet():
    """``write(path, rows, layout)``: a parquet file shaped like the released ones (``test-00000-of-00001``).

    Its schema has the layout's columns in order, ``string`` and ``list<string>``, and the Hugging Face
    ``datasets`` features (``Value("string")``, ``Sequence(Value("string"))``) in the ``huggingface`` metadata.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path: Path, rows: list[dict], layout: str) -> Path:
        cols = MMEB_FILE_COLUMNS[layout]
        lists = ("tgt_text", "tgt_img_path")
        value = {"dtype": "string", "_type": "Value"}
        features = {c: {"feature": value, "_type": "Sequence"} if c in lists else value for c in cols}
        schema = pa.schema([(c, pa.list_(pa.string()) if c in lists else pa.string()) for c in cols],
                           metadata={"huggingface": json.dumps({"info": {"features": features}})})
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        return path

    return write
