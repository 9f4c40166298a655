"""Test data shaped like the project's records: real photos as JPEG bytes, M3T record JSON whose texts name their
key, turn and candidate (so tests can check pairing and candidate choice)."""

from __future__ import annotations

import io

from PIL import Image


def jpeg(im: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def record_json(key: str, turns: int = 7, cands: int = 2) -> dict:
    """Texts name their key, turn and candidate, so tests can check pairing and candidate choice."""
    return {
        "turns": [
            {"task": f"task{i}", "queries": [f"{key} q{i} c{j}?" for j in range(cands)],
             "target": f"{key} t{i}"}
            for i in range(turns)
        ],
        "caption": f"a dense caption of {key}",
    }
