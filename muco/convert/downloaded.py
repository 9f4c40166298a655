"""Images fetched from their URLs (``muco data download``), and the join that lets the converter read them.

The released M3T parquet names each row's image by a relative path and a URL; the images themselves must be
fetched. :func:`download_images` hands a de-duplicated list of them (one entry per image path, in the order of
first appearance) to img2dataset, which fetches them in parallel and in shards, and writes into the output
directory::

    urls.parquet          the list img2dataset reads (``url``, ``image_path``); the settings in its metadata
    00000/000000003.jpg   an image, its bytes as served: neither decoded nor re-encoded (the converter decodes
                          every image fully and rejects an unreadable one as ``bad_image``); named .jpg
                          whatever its format (the converter tells the format from the bytes)
    00000.parquet         one row per image of the shard: key, url, image_path, status (``success`` or
                          ``failed_to_download``), error_message (e.g. ``HTTP Error 404: Not Found``), sha256
    00000_stats.json      the shard's counts and error messages, written when the shard is complete

A shard without its stats file is unfinished; a rerun (img2dataset's incremental mode) redoes only those, so an
interrupted download resumes where it stopped. Failed images of finished shards are not retried.

The join: :func:`load_index` reads the finished shards' parquets into a map image path -> file or failure, and
:func:`downloaded_items` rewrites the converter's input rows with it, in the main process (the index is never
sent to the workers): the row's image path becomes the downloaded file's path relative to the download
directory, or the row is marked with the failure, which the preparer turns into a ``download_failed`` (or
``not_downloaded``) reject through :func:`download_failure`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from muco.convert.images import ImageError

URL_LIST = "urls.parquet"
URL_COLUMN = "url"  # img2dataset's own name for the URL, in the list and in its shard parquets
PATH_COLUMN = "image_path"  # the image's relative path, kept by img2dataset as an additional column
METADATA_KEY = b"muco.download"  # urls.parquet's schema metadata: the settings; marks a muco download directory
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shard names 00000 ... 99999
IMAGE_EXTENSION = "jpg"  # img2dataset's encode_format: the file name's extension only (bytes are as served)
DOWNLOAD_ERROR_FIELD = "_download_error"  # the row field the join sets; underscore: no parquet column has it
IMG2DATASET_INSTALL = ("pip install -c constraints-cpu.txt '.[download]' && "
                       "pip install -c constraints-cpu.txt --no-deps img2dataset==1.47.0")


class DownloadFailure(NamedTuple):
    """Why a row's image is not in the download: ``reason`` (the reject category) and a message."""

    reason: str
    message: str


# ---------------------------------------------------------------------------------------------- the URL list


def check_inputs(parquets: Sequence[str | os.PathLike], url_cols: Sequence[str],
                 path_cols: Sequence[str]) -> list[str]:
    """The inputs as paths, after checking that each exists and has every URL and path column."""
    import pyarrow.parquet as pq

    if not parquets:
        raise ValueError("no input parquet given; name the parquet file(s) with the image URLs")
    if len(url_cols) != len(path_cols) or not url_cols:
        raise ValueError(f"give one --url-col per --path-col (got {len(url_cols)} and {len(path_cols)})")
    paths = [str(p) for p in parquets]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} does not exist or is not a file; fix the path")
        names = pq.read_schema(path).names
        for col, flag, what in [(c, "--url-col", "the image URLs") for c in url_cols] + \
                               [(c, "--path-col", "the image paths") for c in path_cols]:
            if col not in names:
                raise ValueError(f"{path} has no column {col!r} ({what}); its columns: {', '.join(names)}; "
                                 f"name the right one with {flag}")
    return paths


def build_url_list(parquets: Sequence[str | os.PathLike], url_cols: Sequence[str] = ("url",),
                   path_cols: Sequence[str] = ("qry_image_path",), max_images: int | None = None
                   ) -> tuple[Any, dict[str, Any]]:
    """(table ``url``, ``image_path``, info): one entry per image path, in the order of first appearance over the
    files and column pairs, at most ``max_images``. The order depends on the inputs alone, so a rerun builds the
    same list and img2dataset's shard numbers mean the same images. Rows without a URL or a path are counted in
    the info (``without_url``), and so are paths given with several URLs (``conflicts``; the first is kept)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = check_inputs(parquets, url_cols, path_cols)
    parts = []
    for path in paths:
        for u, p in zip(url_cols, path_cols):
            t = pq.read_table(path, columns=list(dict.fromkeys([u, p])))
            url = pc.utf8_trim_whitespace(t[u].cast(pa.string()))  # urllib refuses a URL with spaces around it
            parts.append(pa.table({URL_COLUMN: url, PATH_COLUMN: t[p].cast(pa.string())}))
    table = pa.concat_tables(parts)
    rows = table.num_rows
    present = pc.fill_null(pc.and_(pc.not_equal(table[URL_COLUMN], ""), pc.not_equal(table[PATH_COLUMN], "")),
                           False)  # null: no URL or no path
    table = table.filter(present)
    table = table.append_column("order", pa.array(range(table.num_rows), pa.int64()))
    groups = table.group_by(PATH_COLUMN).aggregate([("order", "min"), (URL_COLUMN, "count_distinct")])
    first = pc.sort_indices(groups["order_min"])
    table = table.take(pc.take(groups["order_min"], first)).select([URL_COLUMN, PATH_COLUMN])
    if max_images is not None:
        table = table.slice(0, max_images)
    info = {"sources": paths, "url_cols": list(url_cols), "path_cols": list(path_cols), "rows": rows,
            "without_url": rows - int(pc.sum(present.cast(pa.int64())).as_py() or 0),
            "conflicts": int(pc.sum(pc.greater(groups[f"{URL_COLUMN}_count_distinct"], 1)).as_py() or 0),
            "images": table.num_rows, "max_images": max_images}
    return table, info


def _finished_shards(directory: str) -> set[int]:
    """Shards whose stats file exists: img2dataset writes it last, and skips these shards on a rerun."""
    out = set()
    for f in glob.glob(os.path.join(glob.escape(directory), "*_stats.json")):
        head = os.path.basename(f).split("_")[0]
        if head.isdigit():
            out.add(int(head))
    return out


def read_settings(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The settings a ``muco data download`` stored in ``<directory>/urls.parquet``; None if it is not one."""
    import pyarrow.parquet as pq

    path = os.path.join(directory, URL_LIST)
    if not os.path.isfile(path):
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
    except (OSError, ValueError):
        return None


def is_download_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a ``muco data download`` output directory (it holds our ``urls.parquet``)."""
    return path is not None and os.path.isdir(path) and read_settings(path) is not None


def _check_resumable(directory: str, table: Any, shard_size: int) -> None:
    """Refuse to resume a download of another list: img2dataset skips finished shards by number alone, so a rerun
    must give every finished shard the same images. A longer list (a larger --max-images) may follow a shorter
    one unless the shorter one ended in a finished partial shard, which img2dataset would never fill; a shorter
    one is refused (the finished shards would hold more than it lists)."""
    import pyarrow.parquet as pq

    finished = _finished_shards(directory)
    if not finished:
        return
    old_settings = read_settings(directory)
    if old_settings is None:
        raise ValueError(f"{directory} holds img2dataset shards that `muco data download` did not write (no "
                         f"{URL_LIST}); choose a new --output")
    if old_settings["shard_size"] != shard_size:
        raise ValueError(f"{directory} was downloaded with --shard-size {old_settings['shard_size']}; rerun with "
                         f"--shard-size {old_settings['shard_size']} to resume it, or choose a new --output")
    old = pq.read_table(os.path.join(directory, URL_LIST))
    n = min(old.num_rows, table.num_rows)
    if not old.slice(0, n).equals(table.slice(0, n)):
        raise ValueError(f"{directory} holds a download of another image list (other inputs, --url-col, --path-col "
                         "or --max-images); rerun with the same arguments to resume it, or choose a new --output")
    if table.num_rows < old.num_rows:
        raise ValueError(f"{directory} holds a download of {old.num_rows} images, more than the {table.num_rows} "
                         "asked for; rerun with the --max-images that started it, or choose a new --output")
    last = old.num_rows // shard_size
    if table.num_rows > old.num_rows and old.num_rows % shard_size and last in finished:
        raise ValueError(f"{directory} holds a finished download of {old.num_rows} images whose last shard is not "
                         f"full, so it cannot grow to {table.num_rows}; choose a new --output for the larger one")


# ---------------------------------------------------------------------------------------------- the download


@dataclass
class DownloadSummary:
    """The state of a download directory, from img2dataset's per-shard stats files."""

    output: str
    images: int = 0  # in the list
    ok: int = 0
    failed: Counter = field(default_factory=Counter)  # error message -> images
    shards: int = 0
    finished_shards: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def unfinished_shards(self) -> int:
        return self.shards - self.finished_shards

    def __str__(self) -> str:
        out = self.output
        reasons = self.failed.most_common()
        why = ", ".join(f"{msg!r} {n}" for msg, n in reasons[:3])
        if len(reasons) > 3:
            why += f", {len(reasons) - 3} other reasons {sum(n for _, n in reasons[3:])}"
        line = f"downloaded {self.ok} of {self.images} images into {out}"
        line += f" (failed {sum(self.failed.values())}: {why})" if reasons else " (none failed)"
        if self.unfinished_shards:
            line += (f"; {self.unfinished_shards} of {self.shards} shards unfinished: rerun the same command to "
                     "resume")
        return (line + f"; per-image status: {out}/<shard>.parquet, stats: {out}/<shard>_stats.json; convert with "
                f"--image-root {out}")


def read_summary(directory: str | os.PathLike) -> DownloadSummary:
    """Add up img2dataset's ``<shard>_stats.json`` of a download directory."""
    directory = str(directory)
    settings = read_settings(directory) or {}
    summary = DownloadSummary(directory, images=settings.get("images", 0), info=settings)
    shard_size = settings.get("shard_size") or 1
    summary.shards = math.ceil(summary.images / shard_size)
    for shard in sorted(_finished_shards(directory)):
        if shard >= summary.shards:
            continue  # left by a longer download of the same list: not part of this one
        with open(os.path.join(directory, f"{shard:0{SHARD_DIGITS}d}_stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
        summary.finished_shards += 1
        summary.ok += int(stats.get("successes", 0))
        for msg, n in (stats.get("status_dict") or {}).items():
            if msg != "success":
                summary.failed[msg] += int(n)
    return summary


def import_img2dataset() -> Any:
    """img2dataset, imported offline: albumentations (one of its imports) asks PyPI for a newer version of itself
    at import, in this process and in each one img2dataset spawns, unless told not to."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # inherited by the spawned processes
    try:
        import img2dataset
    except ImportError as e:
        raise ImportError(f"img2dataset is not installed ({e}); install it with: {IMG2DATASET_INSTALL}") from None
    return img2dataset


def download_images(parquets: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                    url_cols: Sequence[str] = ("url",), path_cols: Sequence[str] = ("qry_image_path",),
                    processes: int = 1, threads: int = 64, timeout: float = 10, retries: int = 0,
                    shard_size: int = 10000, max_images: int | None = None) -> DownloadSummary:
    """Fetch the images named by ``url_cols`` / ``path_cols`` (pairs) of the parquets into ``output`` with
    img2dataset (``processes`` processes of ``threads`` threads, ``shard_size`` images per shard), resuming an
    earlier run of the same list there. Returns the summary of the whole directory (earlier runs included)."""
    for name, value in (("--processes", processes), ("--threads", threads), ("--shard-size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if timeout <= 0 or retries < 0 or (max_images is not None and max_images < 1):
        raise ValueError("--timeout must be > 0, --retries >= 0 and --max-images >= 1")
    check_inputs(parquets, url_cols, path_cols)  # before the slow import: a wrong input fails at once
    img2dataset = import_img2dataset()
    table, info = build_url_list(parquets, url_cols, path_cols, max_images)
    if table.num_rows == 0:
        raise ValueError(f"no row of {', '.join(map(str, parquets))} has both a URL and an image path; check "
                         "--url-col / --path-col")
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    _check_resumable(output, table, shard_size)
    _write_url_list(output, table, {**info, "shard_size": shard_size})
    # img2dataset sets its own SIGINT handler (it exits with status 0); restore ours, and report Ctrl-C as one
    old = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(
            url_list=os.path.join(output, URL_LIST), input_format="parquet", url_col=URL_COLUMN,
            save_additional_columns=[PATH_COLUMN], output_folder=output, output_format="files",
            processes_count=processes, thread_count=threads, number_sample_per_shard=shard_size,
            oom_shard_count=SHARD_DIGITS, timeout=timeout, retries=retries, incremental_mode="incremental",
            distributor="multiprocessing", enable_wandb=False,
            # keep the bytes as served: img2dataset would otherwise decode with OpenCV and re-encode everything
            # (PNGs, WebPs) as JPEG, losing quality; the converter decodes each image anyway
            resize_mode="no", disable_all_reencoding=True, encode_format=IMAGE_EXTENSION,
            extract_exif=False, compute_hash="sha256")
    except SystemExit:  # its SIGINT handler
        raise KeyboardInterrupt from None
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return read_summary(output)


def _write_url_list(directory: str, table: Any, settings: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    path = os.path.join(directory, URL_LIST)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(settings).encode()})
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)  # a killed run leaves the old list or the new one, never half of one


# ---------------------------------------------------------------------------------------------- the join


class DownloadIndex:
    """Image path -> downloaded file (relative to the download directory) or failure, over the finished shards.

    Memory: about 160 bytes per image (M3T's 5.1 M images: under 1 GB), in the main process only."""

    def __init__(self, directory: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        self.directory = str(directory)
        settings = read_settings(self.directory)
        if settings is None:
            raise FileNotFoundError(f"{self.directory} is not a `muco data download` output (no {URL_LIST}); run "
                                    "muco data download first, or fix the directory")
        self.settings = settings
        shard_size = settings["shard_size"]
        shards = math.ceil(settings["images"] / shard_size)
        finished = {s for s in _finished_shards(self.directory) if s < shards}
        self.files: dict[str, int] = {}  # path -> key (an int: a third of the memory of the file name)
        self.failures: dict[str, tuple[str, str | None, str]] = {}  # path -> (status, error message, url)
        self.key_digits = 0
        for shard in sorted(finished):
            name = os.path.join(self.directory, f"{shard:0{SHARD_DIGITS}d}.parquet")
            cols = pq.read_table(name, columns=["key", "status", "error_message", URL_COLUMN, PATH_COLUMN])
            for key, status, error, url, path in zip(*(cols[c].to_pylist() for c in cols.column_names)):
                if status == "success":
                    self.files[path] = int(key)
                    self.key_digits = len(key)
                else:
                    self.failures[path] = (status, error, url)
        # the images of unfinished shards: told apart from images that were never listed
        self.unfinished: set[str] = set()
        missing = sorted(set(range(shards)) - finished)
        if missing:
            urls = pq.read_table(os.path.join(self.directory, URL_LIST), columns=[PATH_COLUMN])[PATH_COLUMN]
            for shard in missing:
                self.unfinished.update(urls.slice(shard * shard_size, shard_size).to_pylist())

    def file(self, key: int) -> str:
        """The file of a key, relative to the download directory (img2dataset's ``<shard>/<key>.jpg``); the shard
        is the key's leading digits."""
        name = f"{key:0{self.key_digits}d}"
        return f"{name[:SHARD_DIGITS]}/{name}.{IMAGE_EXTENSION}"

    def resolve(self, path: Any) -> str | DownloadFailure | None:
        """The downloaded file of an image path, or why there is none; None for a row without an image path (the
        converter rejects it as it does without a download)."""
        if not isinstance(path, str) or not path:
            return None
        key = self.files.get(path)
        if key is not None:
            return self.file(key)
        failure = self.failures.get(path)
        if failure is not None:
            status, error, url = failure
            return DownloadFailure("download_failed", f"image {path} was not downloaded from {url}: "
                                                      f"{error or status} (img2dataset: {status})")
        if path in self.unfinished:
            return DownloadFailure("not_downloaded", f"image {path} is in an unfinished shard of the download "
                                                     f"{self.directory}; rerun muco data download to finish it")
        return DownloadFailure("not_downloaded", f"image {path} is not in the download {self.directory} (its row "
                                                 "had no URL, or it was past --max-images)")


def load_index(download_dir: str | os.PathLike) -> DownloadIndex:
    """The index of a download directory (see :class:`DownloadIndex`)."""
    return DownloadIndex(download_dir)


class DownloadedSource:
    """A conversion source (``muco.convert.sources``: ``items(start, stop)``, ``count()``, ``unit``, ...) whose rows
    are rewritten by :func:`downloaded_items`; everything else is the wrapped source's. Its fingerprint names the
    download too, so a resumed conversion must read the same one."""

    def __init__(self, source: Any, index: DownloadIndex, path_field: str) -> None:
        self.source, self.index, self.path_field = source, index, path_field

    def __getattr__(self, name: str) -> Any:  # unit, description, count, known_count, ...
        if name == "source":  # not set yet (a copy being built): no endless recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any, Any]]:
        return _rewrite(self.source.items(start, stop), self.index, self.path_field)

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        return self.items()

    def fingerprint(self) -> dict[str, Any]:
        return {**self.source.fingerprint(), "downloaded": os.path.abspath(self.index.directory)}


def _rewrite(items: Iterable[tuple[int, Any, Any]], index: DownloadIndex,
             path_field: str) -> Iterator[tuple[int, Any, Any]]:
    for i, row, key in items:
        found = index.resolve(row.get(path_field))
        if isinstance(found, DownloadFailure):
            row = {**row, DOWNLOAD_ERROR_FIELD: tuple(found)}
        elif found is not None:
            row = {**row, path_field: found}
        yield i, row, key


def downloaded_items(items: Any, download: str | os.PathLike | DownloadIndex,
                     path_field: str = "qry_image_path") -> Any:
    """The converter's parquet items (``(row, row dict, key)``, see ``muco.convert.sources``) with each row's
    ``path_field`` rewritten to the downloaded file (relative to the download directory, which becomes the image
    root), or the row marked with why its image is not there, for :func:`download_failure`. ``items`` is an
    iterable of items (then so is the result) or a source with ``items(start, stop)`` (then the result is a
    :class:`DownloadedSource`). Runs in the main process: the index never travels to the workers. The index is
    loaded now, so a wrong directory fails before an earlier conversion is replaced."""
    index = download if isinstance(download, DownloadIndex) else load_index(download)
    if callable(getattr(items, "items", None)) and not isinstance(items, dict):
        return DownloadedSource(items, index, path_field)
    return _rewrite(items, index, path_field)


def download_failure(row: dict[str, Any]) -> ImageError | None:
    """The reject of a row that :func:`downloaded_items` marked (reason ``download_failed`` / ``not_downloaded``,
    with img2dataset's message), or None."""
    failure = row.get(DOWNLOAD_ERROR_FIELD)
    if failure is None:
        return None
    reason, message = failure
    return ImageError(reason, message)


__all__ = ["DOWNLOAD_ERROR_FIELD", "IMG2DATASET_INSTALL", "PATH_COLUMN", "URL_COLUMN", "URL_LIST", "DownloadFailure",
           "DownloadIndex", "DownloadSummary", "DownloadedSource", "build_url_list", "check_inputs", "download_failure",
           "download_images", "downloaded_items", "import_img2dataset", "is_download_dir", "load_index",
           "read_settings", "read_summary"]
