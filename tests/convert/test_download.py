"""`muco data download` (img2dataset) and the convert join, end to end and offline: a real HTTP server on the
loopback address serves real images, some URLs 404, one serves bytes that are no image, one answers after the
timeout; the real img2dataset fetches them (no mocks), then the converter reads the download."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from muco.cli.download import main as download_main
from muco.convert.downloaded import (
    DOWNLOAD_ERROR_FIELD,
    URL_LIST,
    build_url_list,
    download_images,
    downloaded_items,
    is_download_dir,
    read_summary,
)
from tests.convert.conftest import released_row

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
# find_spec, not importorskip: importing img2dataset here before muco sets NO_ALBUMENTATIONS_UPDATE would ask PyPI
needs_img2dataset = pytest.mark.skipif(importlib.util.find_spec("img2dataset") is None,
                                       reason="img2dataset is not installed (pip install --no-deps img2dataset)")

SLOW_S = 6  # the slow URL answers after this; the downloads time out after TIMEOUT_S (a margin for a busy machine)
TIMEOUT_S = 2
SHARD = 4  # images per shard: the 8 distinct images make 2 shards


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 that serves ``files`` (path -> bytes), answers /slow/* after SLOW_S,
    404s anything else, and counts the requests per path."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests, self.lock, self.stop = files, Counter(), threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's name
                with server.lock:
                    server.requests[self.path] += 1
                if self.path.startswith("/slow/"):
                    server.stop.wait(SLOW_S)  # cut short at teardown
                body = server.files.get(self.path)
                try:
                    if body is None:
                        self.send_error(404)
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (the slow URL): nothing to answer
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="image-server", daemon=True)
        self.thread.start()

    def counts(self) -> Counter:
        with self.lock:
            return Counter(self.requests)

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, jpegs, photos):
    """(server, M3T-shaped parquet with a ``url`` column, served bytes by image path). Rows, in order: 0.jpg,
    1.jpg, a 404, 0.jpg again (the same image: fetched once), a slow one, a PNG, bytes that are no image, a row
    without a URL, 3.jpg, 4.jpg. Distinct images with a URL: 8, so shard 0 = 0, 1, 404, slow; shard 1 = the rest."""
    import io

    png = io.BytesIO()
    photos[5].save(png, format="PNG")
    by_path = {"imgs/0.jpg": jpegs[0], "imgs/1.jpg": jpegs[1], "imgs/5.png": png.getvalue(), "imgs/3.jpg": jpegs[3],
               "imgs/4.jpg": jpegs[4], "imgs/corrupt.jpg": b"\xff\xd8 not really a JPEG", "imgs/slow.jpg": jpegs[2]}
    urls = {p: f"/img/{Path(p).name}" for p in by_path}
    urls |= {"imgs/slow.jpg": "/slow/s.jpg", "imgs/404.jpg": "/img/404.jpg"}
    server = ImageServer({urls[p]: b for p, b in by_path.items()})
    rows = []
    for r, path in enumerate(["imgs/0.jpg", "imgs/1.jpg", "imgs/404.jpg", "imgs/0.jpg", "imgs/slow.jpg", "imgs/5.png",
                              "imgs/corrupt.jpg", "imgs/2.jpg", "imgs/3.jpg", "imgs/4.jpg"]):
        url = urls.get(path)  # imgs/2.jpg: none
        rows.append({**released_row(r, path), "url": None if url is None else server.base + url})
    parquet = tmp_path_factory.mktemp("m3t") / "M3T.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=3)
    yield server, parquet, by_path
    server.close()


@pytest.fixture(scope="module")
def downloaded(served, tmp_path_factory):
    """One real img2dataset download of ``served`` (1 process, 4 threads): (directory, summary, requests)."""
    if importlib.util.find_spec("img2dataset") is None:
        pytest.skip("img2dataset is not installed")
    server, parquet, _ = served
    out = tmp_path_factory.mktemp("dl") / "images"
    summary = download_images([parquet], out, processes=1, threads=4, timeout=TIMEOUT_S, shard_size=SHARD)
    return out, summary, server.counts()


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    return samples


def test_url_list_is_deduplicated_in_first_order(served):
    _, parquet, _ = served
    table, info = build_url_list([parquet])
    assert table.column("image_path").to_pylist() == [
        "imgs/0.jpg", "imgs/1.jpg", "imgs/404.jpg", "imgs/slow.jpg", "imgs/5.png", "imgs/corrupt.jpg",
        "imgs/3.jpg", "imgs/4.jpg"]
    assert (info["rows"], info["without_url"], info["images"], info["conflicts"]) == (10, 1, 8, 0)
    assert build_url_list([parquet], max_images=3)[0].num_rows == 3


@needs_img2dataset
def test_download_keeps_images_status_and_stats(downloaded, served):
    out, summary, requests = downloaded
    _, _, by_path = served
    assert (summary.images, summary.ok, summary.shards, summary.finished_shards) == (8, 6, 2, 2)
    assert summary.failed == {"HTTP Error 404: Not Found": 1, "timed out": 1}
    assert str(summary).startswith(f"downloaded 6 of 8 images into {out} (failed 2: 'HTTP Error 404: Not Found' 1")
    # every distinct URL fetched once, the shared image too, and nothing else
    assert set(requests.values()) == {1} and len(requests) == 8
    # img2dataset's stats and per-image status are kept
    assert sorted(p.name for p in out.glob("*_stats.json")) == ["00000_stats.json", "00001_stats.json"]
    assert json.loads((out / "00000_stats.json").read_text())["failed_to_download"] == 2
    status = pq.read_table(out / "00000.parquet").to_pylist()
    failed = {r["image_path"]: (r["status"], r["error_message"]) for r in status if r["status"] != "success"}
    assert failed == {"imgs/404.jpg": ("failed_to_download", "HTTP Error 404: Not Found"),
                      "imgs/slow.jpg": ("failed_to_download", "timed out")}
    # the bytes as served, PNG included (named .jpg: img2dataset's file name; the converter reads the format)
    ok = {r["image_path"]: r["key"] for r in pq.read_table(out / "00001.parquet").to_pylist()}
    assert (out / "00001" / f"{ok['imgs/5.png']}.jpg").read_bytes() == by_path["imgs/5.png"]
    assert not (out / "_tmp").exists() and is_download_dir(out)


@needs_img2dataset
def test_convert_reads_the_download(downloaded, served, tmp_path):
    from muco.convert.m3t import convert_parquet

    out, _, _ = downloaded
    _, parquet, by_path = served
    shards = tmp_path / "shards"
    # the download directory as the image root: detected, rows joined to their downloaded files
    s = convert_parquet(parquet, out, str(shards / "train-%06d.tar"), batch_rows=4)
    assert (s.written, s.rejected) == (6, 4)
    assert s.reasons == {"download_failed": 2, "bad_image": 1, "not_downloaded": 1}
    samples = read_shards(shards)
    assert sorted(samples) == [f"M3T_{r:09d}" for r in (0, 1, 3, 5, 8, 9)]
    assert samples["M3T_000000003"]["jpg"] == by_path["imgs/0.jpg"]  # the shared image, downloaded once
    assert samples["M3T_000000009"]["jpg"] == by_path["imgs/4.jpg"]
    assert samples["M3T_000000005"]["png"] == by_path["imgs/5.png"]  # kept as the PNG it is
    rejects = {r["row"]: r for r in map(json.loads, (shards / "rejects.jsonl").read_text().splitlines())}
    assert [(r, x["reason"]) for r, x in sorted(rejects.items())] == [
        (2, "download_failed"), (4, "download_failed"), (6, "bad_image"), (7, "not_downloaded")]
    assert "imgs/404.jpg" in rejects[2]["message"] and "HTTP Error 404: Not Found" in rejects[2]["message"]
    assert "timed out" in rejects[4]["message"] and "/slow/s.jpg" in rejects[4]["message"]
    assert "unreadable" in rejects[6]["message"]  # served, but no image: the converter's full decode finds it
    assert "no URL" in rejects[7]["message"]


@needs_img2dataset
def test_downloaded_items_marks_rows_in_the_main_process(downloaded):
    out, _, _ = downloaded
    items = [(0, {"qry_image_path": "imgs/404.jpg"}, "k0"), (1, {"qry_image_path": "imgs/3.jpg"}, "k1"),
             (2, {"qry_image_path": None}, "k2")]
    rows = [row for _, row, _ in downloaded_items(items, out)]
    assert rows[0][DOWNLOAD_ERROR_FIELD][0] == "download_failed"
    assert (out / rows[1]["qry_image_path"]).is_file() and DOWNLOAD_ERROR_FIELD not in rows[1]
    assert rows[2] == {"qry_image_path": None}  # no path: left to the converter's missing_image


@needs_img2dataset
def test_rerun_resumes_only_unfinished_shards(downloaded, served, tmp_path, capsys):
    server, parquet, _ = served
    out = tmp_path / "images"
    shutil.copytree(downloaded[0], out)
    (out / "00001_stats.json").unlink()  # as if the run had been killed during shard 1
    assert "1 of 2 shards unfinished" in str(read_summary(out))
    before = server.counts()
    args = [str(parquet), "--output", str(out), "--processes", "1", "--threads", "4", "--timeout", str(TIMEOUT_S),
            "--shard-size", str(SHARD)]
    assert download_main(args) == 0
    fetched = server.counts() - before
    assert fetched == Counter({"/img/5.png": 1, "/img/corrupt.jpg": 1, "/img/3.jpg": 1, "/img/4.jpg": 1})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"downloaded 6 of 8 images into {out} (failed 2:") and "unfinished" not in line
    # a rerun of another list, or with another shard size, would mix images into finished shards: refused
    assert download_main(args[:-1] + ["3"]) == 2
    assert "rerun with --shard-size 4 to resume it" in capsys.readouterr().err
    assert download_main(args + ["--path-col", "qry_sentence"]) == 2
    assert "another image list" in capsys.readouterr().err
    assert download_main(args + ["--max-images", "3"]) == 2
    assert "holds a download of 8 images, more than the 3 asked for" in capsys.readouterr().err
    # a finished trial of 6 images (--max-images 6) ends in a partial shard, which img2dataset would never fill
    trial = pq.read_table(out / URL_LIST)
    pq.write_table(trial.slice(0, 6), out / URL_LIST)  # the schema metadata (the settings) comes along
    assert download_main(args) == 2
    assert "cannot grow to 8" in capsys.readouterr().err


def test_cli_errors_are_one_line(served, tmp_path, capsys):
    _, parquet, _ = served
    out = str(tmp_path / "o")
    assert download_main([str(tmp_path / "nope.parquet"), "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.parquet does not exist" in err and "fix the path" in err
    assert download_main([str(parquet), "--output", out, "--url-col", "image_url"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no column 'image_url'" in err and "qry_image_path" in err
    assert "--url-col" in err
    assert download_main([str(parquet), "--output", out, "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_convert_refuses_a_directory_that_is_no_download(served, tmp_path):
    from muco.convert.m3t import convert_parquet

    _, parquet, _ = served
    with pytest.raises(FileNotFoundError, match="is not a `muco data download` output"):
        convert_parquet(parquet, None, str(tmp_path / "s" / "t-%06d.tar"), downloaded=tmp_path)
    assert not (tmp_path / "s").exists()  # refused before any output is written
