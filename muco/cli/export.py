"""`muco export`: merge the adapter and write a Hugging Face-format directory (:mod:`muco.export`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from muco.export import __doc__ as export_doc
from muco.export import export
from muco.train.checkpoint import load_encoder


def main(argv: Sequence[str] | None = None) -> int:
    """``muco export --checkpoint PATH --output DIR [--dtype D] [--image-policy NAME] [--overwrite]``."""
    p = argparse.ArgumentParser(prog="muco export", description=(export_doc or "").split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="anything muco.train.checkpoint.load_encoder accepts")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype of the export (default: keep)")
    p.add_argument("--image-policy", default=None,
                   help="image policy preset to record (default: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kw = {} if args.image_policy is None else {"image_policy": args.image_policy}
    enc = load_encoder(args.checkpoint, device="cpu", **kw)
    export(enc.backbone, enc.tokenizer, enc.image_policy, args.output, dtype=args.dtype,
           overwrite=args.overwrite, inplace=True)
    print(f"exported to {args.output}")
    return 0
