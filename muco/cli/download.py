"""`muco data download`: fetch the images of released parquets (M3T, MMEB-train) from their URLs with img2dataset,
into a directory that `muco data convert --image-root` reads (see :mod:`muco.convert.downloaded`)."""

from __future__ import annotations

import argparse
import os
import sys

from muco.convert.downloaded import download_images

DESCRIPTION = ("Download the images named by the URL column of released parquet file(s), one per distinct image "
               "path, with img2dataset: in parallel, in shards, resumable (a rerun of the same command continues).")
EPILOG = (
    "The output holds the images (<shard>/<key>.jpg, bytes as served, whatever the format), the per-image status "
    "(<shard>.parquet: url, image_path, status, error_message) and img2dataset's per-shard stats "
    "(<shard>_stats.json). Convert with `muco data convert M3T.parquet --image-root <output> ...`: each row then "
    "reads its downloaded image, and a row whose image failed to download is rejected as download_failed with "
    "img2dataset's message. Failed images of finished shards are not retried. Exit status: 0 some images "
    "downloaded, 1 none, 2 bad arguments or inputs, 130 interrupted (rerun to resume)."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muco data download", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("inputs", nargs="+", help="parquet file(s) with image URLs and image paths (e.g. M3T.parquet)")
    p.add_argument("--output", required=True, help="download directory (created; a rerun resumes it)")
    p.add_argument("--url-col", action="append", default=None, metavar="COL",
                   help="column of the image URLs (default: url); repeat, paired with --path-col, for several")
    p.add_argument("--path-col", action="append", default=None, metavar="COL",
                   help="column of the images' relative paths, their names in the join (default: qry_image_path)")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="download processes (default: cores)")
    p.add_argument("--threads", type=int, default=64, help="download threads per process (default 64)")
    p.add_argument("--timeout", type=float, default=10, help="seconds to wait for a server (default 10)")
    p.add_argument("--retries", type=int, default=0, help="extra tries of a failed image (default 0)")
    p.add_argument("--shard-size", type=int, default=10000,
                   help="images per shard, the unit of resuming (default 10000; keep it when resuming)")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="download only the first N distinct images (a trial); a rerun with a larger N continues "
                        "it when the trial's N was a multiple of --shard-size")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url_cols, path_cols = args.url_col or ["url"], args.path_col or ["qry_image_path"]
    try:
        summary = download_images(args.inputs, args.output, url_cols=url_cols, path_cols=path_cols,
                                  processes=args.processes, threads=args.threads, timeout=args.timeout,
                                  retries=args.retries, shard_size=args.shard_size, max_images=args.max_images)
    except KeyboardInterrupt:
        print(f"muco data download: interrupted; the finished shards are kept in {args.output}: rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError) as e:
        print(f"muco data download: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.ok else 1
