"""Conversions that fit a cluster (issue 14): `--part I/N` + `muco data merge-manifests` give what one job gives,
a conversion resumes after a kill to the same bytes, a complete one is not redone, other settings are refused, a
wrong image root stops at once, and progress is reported."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from muco.cli import main as muco_main
from muco.cli.data import usage as data_usage
from muco.convert import m3t
from muco.convert.m3t import convert_jsonl, convert_parquet
from muco.convert.parts import Journal, merge_parts, part_range
from muco.convert.pipeline import ConvertOptions, ImageRootError, Progress, prepared, run_conversion
from muco.data.shards import resolve_shards
from tests.convert.conftest import released_row

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# two files; bad rows spread over both, so that parts and shards start and end next to rejects
A_BAD = {2: "missing.jpg", 5: None, 7: "missing.jpg"}  # None: 5 turns (turn_count)
B_BAD = {1: "garbage.jpg", 4: "missing.jpg"}


@pytest.fixture
def two_files(tmp_path, jpegs) -> tuple[list[str], Path]:
    """A.parquet (10 rows, row groups of 3) and B.parquet (7 rows, row groups of 4): 17 rows, 12 good."""
    root = tmp_path / "images"
    root.mkdir()
    for i, data in enumerate(jpegs):
        (root / f"{i}.jpg").write_bytes(data)
    (root / "garbage.jpg").write_bytes(b"not an image")
    paths = []
    for name, n, bad, group in (("A", 10, A_BAD, 3), ("B", 7, B_BAD, 4)):
        rows = []
        for r in range(n):
            image = bad.get(r, f"{r % len(jpegs)}.jpg") or f"{r % len(jpegs)}.jpg"
            rows.append(released_row(r, image, turns=5 if r in bad and bad[r] is None else 7))
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
        paths.append(str(path))
    return paths, root


def samples(manifest: Path) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every shard, in manifest order: the content and key order of a conversion."""
    out = []
    for shard in json.loads(manifest.read_text())["shards"]:
        with tarfile.open(manifest.parent / shard["name"]) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def same_as_ref(out: Path, ref: Path) -> None:
    """Shards, manifest and rejects byte for byte; the journals' checkpoints too (their headers name the place)."""
    journal = "t-progress.jsonl"
    assert {k: v for k, v in files_of(out).items() if k != journal} == \
        {k: v for k, v in files_of(ref).items() if k != journal}
    assert Journal.read(out / journal).checkpoints == Journal.read(ref / journal).checkpoints


def run_parts(paths, root, out: Path, count: int, **kw) -> None:
    for i in range(count):
        s = convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=2, part=(i, count), **kw)
        assert s.part == (i, count)


@pytest.mark.parametrize("count", [3, 4, 20])
def test_parts_merge_to_the_single_job(tmp_path, two_files, count):
    """3 and 4: part boundaries inside row groups and across the two files; 20: more parts than rows."""
    paths, root = two_files
    one = convert_parquet(paths, root, str(tmp_path / "one" / "t-%06d.tar"), max_samples_per_shard=2)
    assert (one.written, one.rejected) == (12, 5)
    out = tmp_path / "parts"
    run_parts(paths, root, out, count)
    merged = merge_parts([str(out)])
    assert (merged.parts, merged.written, merged.rejected, merged.reasons) == (count, 12, 5, one.reasons)

    assert samples(out / "manifest.json") == samples(tmp_path / "one" / "manifest.json")
    assert (out / "rejects.jsonl").read_bytes() == (tmp_path / "one" / "rejects.jsonl").read_bytes()
    single, whole = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "one", out))
    for field in ("num_samples", "rejected", "reasons", "turns", "source", "max_text_chars"):
        assert whole[field] == single[field], field
    assert resolve_shards(str(out / "manifest.json")).num_samples == 12
    # the parts' own files never collide, and the keys are the single job's (real row numbers)
    assert (out / "t-p0001-000000.tar").exists() and (out / "manifest-p0001.json").exists()
    assert [n for n, _ in samples(out / "manifest.json")][:2] == ["A_000000000.jpg", "A_000000000.json"]


def wreck_row_groups(path: str, groups: list[int]) -> None:
    """Overwrite the data of these row groups (the footer stays valid): reading one of them fails."""
    meta = pq.ParquetFile(path).metadata
    with open(path, "r+b") as f:
        for g in groups:
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                f.seek(first)
                f.write(b"\xff" * col.total_compressed_size)


def test_part_ranges_and_row_groups(two_files):
    """A range reads only the row groups that hold its rows (the metadata gives the counts): the others may even
    be unreadable."""
    paths, _ = two_files
    assert [part_range(17, i, 4) for i in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 17)]
    assert [part_range(2, i, 5) for i in range(5)] == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2)]
    wreck_row_groups(paths[0], [0, 1])  # A's rows 0-5
    wreck_row_groups(paths[1], [1])  # B's rows 4-6
    src = m3t.parquet_items(paths, m3t.PARQUET_COLUMNS)
    assert src.known_count() == 17
    assert [(i, k) for i, _, k in src.items(7, 12)] == [
        (7, "A_000000007"), (8, "A_000000008"), (9, "A_000000009"), (0, "B_000000000"), (1, "B_000000001")]
    assert [r["pos_text"][0] for _, r, _ in src.items(8, 11)] == ["r8 t0", "r9 t0", "r0 t0"]  # the rows themselves
    with pytest.raises(OSError):  # the wrecked groups do fail when read
        list(src.items(5, 7))


def test_jsonl_parts_and_cross_part_duplicates(tmp_path, m3t_jsonl, rec_json):
    path, root = m3t_jsonl  # 7 lines; key "a" on lines 2 and 4
    one = convert_jsonl(path, root, str(tmp_path / "one" / "s-%03d.tar"))
    for i in range(2):  # lines 1-3 | 4-7: the second "a" is in another part than the first
        convert_jsonl(path, root, str(tmp_path / "p" / "s-%03d.tar"), part=(i, 2))
    with pytest.raises(ValueError, match="key 'a' is written by part 0 and part 1: .*duplicate keys across parts"):
        merge_parts([str(tmp_path / "p")])
    assert one.reasons["duplicate_key"] == 1  # what one job does with it

    # without duplicates the union is the single job, rejects (with line numbers) included
    lines = path.read_text().splitlines()
    (tmp_path / "nodup.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n\n")
    one = convert_jsonl(tmp_path / "nodup.jsonl", root, str(tmp_path / "one2" / "s-%03d.tar"))
    for i in range(4):
        convert_jsonl(tmp_path / "nodup.jsonl", root, str(tmp_path / "r" / "s-%03d.tar"), part=(i, 4))
    merged = merge_parts(sorted(str(p) for p in (tmp_path / "r").glob("manifest-p*.json")))
    assert (merged.written, merged.rejected) == (one.written, one.rejected) == (3, 3)
    assert samples(tmp_path / "r" / "manifest.json") == samples(tmp_path / "one2" / "manifest.json")
    assert (tmp_path / "r" / "rejects.jsonl").read_text() == (tmp_path / "one2" / "rejects.jsonl").read_text()


def test_merge_refuses_missing_unfinished_and_mixed_parts(tmp_path, two_files, monkeypatch):
    paths, root = two_files
    out = tmp_path / "p"
    for i in (0, 2):
        convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=2, part=(i, 3))
    with pytest.raises(FileNotFoundError, match=r"part 1/3 is missing: .*manifest-p0001.json does not exist and "
                                                r"it has not started .*--part 1/3"):
        merge_parts([str(out)])

    real = m3t.prepare_row

    def dies_at_b0(index, row, key, opts):
        if key == "B_000000000":
            raise RuntimeError("killed")
        return real(index, row, key, opts)

    monkeypatch.setattr(m3t, "prepare_row", dies_at_b0)
    with pytest.raises(RuntimeError):  # part 1 is rows A5..A9, B0: one shard (A6, A8) finished
        convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=2, part=(1, 3))
    with pytest.raises(FileNotFoundError, match="it has not finished .*records 1 finished shards"):
        merge_parts(sorted(str(p) for p in out.glob("manifest-p*.json")))
    monkeypatch.setattr(m3t, "prepare_row", real)

    # part 1 from another command (other shard size): refused, the setting named
    with pytest.raises(ValueError, match="max_samples_per_shard: 2 then, 3 now"):  # its own journal refuses first
        convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=3, part=(1, 3))
    convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=3, part=(1, 3), overwrite=True)
    with pytest.raises(ValueError, match="come from different conversions .*max_samples_per_shard"):
        merge_parts([str(out)])
    assert not (out / "manifest.json").exists() and not (out / "rejects.jsonl").exists()


def test_resume_after_a_kill_is_byte_identical(tmp_path, two_files, monkeypatch):
    paths, root = two_files
    ref = tmp_path / "ref"
    convert_parquet(paths, root, str(ref / "t-%06d.tar"), max_samples_per_shard=2)

    out = tmp_path / "out"
    real, calls, dying = m3t.prepare_row, [], [True]

    def dies_at_row_9(index, row, key, opts):  # counts what is read; the first run dies at A9
        calls.append(key)
        if key == "A_000000009" and dying.pop() if dying else False:
            raise RuntimeError("killed")
        return real(index, row, key, opts)

    monkeypatch.setattr(m3t, "prepare_row", dies_at_row_9)
    with pytest.raises(RuntimeError):
        convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=2)
    journal = Journal.read(out / "t-progress.jsonl")
    assert [c.shard["name"] for c in journal.checkpoints] == ["t-000000.tar", "t-000001.tar"]
    assert journal.checkpoints[-1].next == 6 and journal.checkpoints[-1].rejected == 2
    # what a SIGKILL leaves besides: the open shard's .tmp, a torn journal line, rejects past the checkpoint
    (out / "t-000002.tar.tmp").write_bytes(b"half a tar")
    with open(out / "t-progress.jsonl", "a") as f:
        f.write('{"next": 8, "writ')
    with open(out / "rejects.jsonl", "a") as f:
        f.write('{"key": "A_000000007", "row": 7, "reason": "missing_image"}\n')

    calls.clear()
    s = convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=2)
    assert calls[0] == "A_000000006" and len(calls) == 11  # rows 6.. only: the first 6 were not read again
    assert s.resumed_shards == 2 and (s.written, s.rejected) == (12, 5)
    same_as_ref(out, ref)

    # a complete conversion re-run: verified, nothing re-read or re-written
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls.clear()
    s = convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=2)
    assert s.already_complete and calls == [] and (s.written, len(s.shards)) == (12, 6)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # a damaged shard is found by its hash and rewritten from there on
    data = bytearray((out / "t-000004.tar").read_bytes())
    data[600] ^= 1
    (out / "t-000004.tar").write_bytes(bytes(data))
    calls.clear()
    s = convert_parquet(paths, root, str(out / "t-%06d.tar"), max_samples_per_shard=2)
    assert s.resumed_shards == 4 and calls == ["B_000000002", "B_000000003", "B_000000004", "B_000000005",
                                               "B_000000006"]
    same_as_ref(out, ref)


def test_changed_settings_are_refused(tmp_path, two_files, capsys):
    paths, root = two_files
    argv = [*paths, "--image-root", str(root), "--output", str(tmp_path / "o" / "t-%06d.tar"),
            "--max-samples-per-shard", "2", "--progress", "off"]
    assert muco_main(["data", "convert", *argv]) == 0
    assert muco_main(["data", *argv, "--workers", "3", "--limit", "17"]) == 2  # `convert` may be left out
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input.limit: null then, 17 now" in err and "--overwrite" in err, err
    assert muco_main(["data", *argv, "--max-side", "64"]) == 2
    assert "options.max_side: null then, 64 now" in capsys.readouterr().err
    assert muco_main(["data", *argv, "--max-side", "64", "--overwrite"]) == 0
    assert "wrote 12 samples" in capsys.readouterr().out


def test_wrong_image_root_stops_at_once(tmp_path, two_files, m3t_jsonl, capsys):
    paths, root = two_files
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    out = tmp_path / "o"
    argv = [*paths, "--image-root", str(wrong), "--output", str(out / "t-%06d.tar"), "--early-abort", "2"]
    assert muco_main(["data", "convert", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the first 2 rows all failed with missing_image" in err, err
    assert f"{wrong}/0.jpg" in err and "fix --image-root" in err
    assert not out.exists() or list(out.iterdir()) == []  # no manifest, no journal, no rejects
    # the default K, and a whole input shorter than it: every record without its image is enough
    path, _ = m3t_jsonl
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(x for x in path.read_text().splitlines() if '"key": "b"' in x or '"big"' in x))
    with pytest.raises(ImageRootError, match="the first 2 lines all failed"):
        convert_jsonl(good, wrong, str(out / "s-%03d.tar"))
    # a resumable fix: the right root converts from scratch
    assert convert_jsonl(good, m3t_jsonl[1], str(out / "s-%03d.tar")).written == 2


def test_progress_lines_when_not_a_terminal(tmp_path, two_files, capsys):
    paths, root = two_files
    assert muco_main(["data", "convert", *paths, "--image-root", str(root), "--output",
                      str(tmp_path / "o" / "t-%06d.tar"), "--log-every", "0", "--part", "1/2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) >= 3 and all(x.startswith("muco data convert part 1/2: ") for x in err), err
    assert "1/9 (11.1%) rows" in err[0] and "rows/s" in err[0] and "good samples/s" in err[0] and "ETA" in err[0]
    assert "9/9 (100.0%) rows" in err[-1] and "done in" in err[-1]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    p = Progress("auto", stream=tty)
    assert p.mode == "bar"
    run_conversion(lambda i, x, k, o: prepared(k, [("txt", x.encode())]), [(i, "x", f"k{i}") for i in range(50)],
                   str(tmp_path / "b" / "t-%06d.tar"), ConvertOptions(str(tmp_path)), max_samples_per_shard=10,
                   max_bytes_per_shard=1 << 20, workers=0, manifest=None, rejects=None, overwrite=False,
                   source="test", progress=p)
    assert "50/50" in tty.getvalue() and "good samples/s" in tty.getvalue()


def test_data_command_dispatch(capsys, tmp_path):
    assert muco_main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("convert", "merge-manifests", "download")) and out == data_usage() + "\n"
    assert muco_main(["data", "merge-manifests", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no part manifest" in err and "--part I/N" in err
    with pytest.raises(SystemExit):
        muco_main(["data", "convert", "x.parquet", "--image-root", ".", "--output", "o/%d.tar", "--part", "3/3"])
    assert "0 <= I < N" in capsys.readouterr().err
