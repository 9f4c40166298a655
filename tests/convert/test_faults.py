"""Faults of `muco data convert` (issue 12): an interrupted --overwrite, killed workers, undecodable lines and
over-long texts. The interruption tests run the real converter in a subprocess and kill it mid-conversion: an
image path that is a FIFO nobody writes to blocks the converter at a known record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from muco.cli.convert import build_parser, main
from muco.convert.m3t import convert_jsonl
from muco.convert.pairs import convert_pairs
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS
from muco.data.shards import resolve_shards

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and signals")


def reject_messages(path: Path) -> dict[str, str]:
    return {r["key"]: r["message"] for r in map(json.loads, path.read_text().splitlines())}


def tar_count(path: str) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers()})


def write_records(path: Path, rec_json, keys: list[str], image: str = "a.jpg", block_at: int | None = None) -> Path:
    """One JSONL line per key; the line ``block_at`` points at ``fifo.png`` (the converter blocks there)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, key in enumerate(keys):
            f.write(json.dumps({"key": key, "image": "fifo.png" if i == block_at else image, **rec_json(key)}) + "\n")
    return path


@pytest.fixture
def root(tmp_path, photos) -> Path:
    root = tmp_path / "img"
    root.mkdir()
    photos[0].save(root / "a.jpg", quality=90)
    os.mkfifo(root / "fifo.png")
    return root


def start_convert(src: Path, root: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "muco", "data", "convert", str(src), "--image-root", str(root), "--output",
         str(out / "s-%06d.tar"), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)  # its own process group: a stray worker can be cleaned up without touching ours


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"converter exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- processes: psutil when installed, else /proc -----------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, cmdline) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(d)] = (int(fields[1]), fields[0], cmd)
    return out


def descendants(pid: int) -> dict[int, str]:
    """pid -> cmdline of every live descendant of ``pid``."""
    try:
        import psutil

        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
        out = {}
        for k in kids:
            try:
                out[k.pid] = " ".join(k.cmdline())
            except psutil.Error:
                pass
        return out
    except ImportError:
        table = _proc_table()
        out, todo = {}, [pid]
        while todo:
            parent = todo.pop()
            for p, (ppid, _, cmd) in table.items():
                if ppid == parent and p not in out:
                    out[p] = cmd
                    todo.append(p)
        return out


def alive(pid: int) -> bool:
    """Running (not a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rindex(")") + 2] != "Z"


def workers_of(pid: int) -> dict[int, str]:
    return {p: c for p, c in descendants(pid).items() if "spawn_main" in c}


# -- 1. an interrupted --overwrite ---------------------------------------------------------------------------------
def test_killed_overwrite_leaves_nothing_stale(tmp_path, root, rec_json):
    """SIGKILL during `--overwrite` over a complete 80-sample set: a reader must not see the old counts."""
    out = tmp_path / "out"
    old = convert_jsonl(write_records(tmp_path / "old.jsonl", rec_json, [f"old{i}" for i in range(80)]), root,
                        str(out / "s-%06d.tar"), max_samples_per_shard=40)
    assert [s["num_samples"] for s in old.shards] == [40, 40]
    assert resolve_shards(str(out / "manifest.json")).num_samples == 80

    # 40 good records (the first 32-record chunk finishes shards 0..6 of 4), then one that blocks
    src = write_records(tmp_path / "new.jsonl", rec_json, [f"new{i}" for i in range(41)], block_at=40)
    proc = start_convert(src, root, out, "--overwrite", "--max-samples-per-shard", "4", "--workers", "0")
    try:
        wait_for(lambda: (out / "s-000006.tar").exists(), 60, "new shards", proc)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    # what training reads: the manifest. Either it is gone, or every count it states is true.
    try:
        shards = resolve_shards(str(out / "manifest.json"))
    except FileNotFoundError as e:
        assert "does not exist" in str(e) and "muco data convert" in str(e)
    else:
        assert shards.num_samples == sum(tar_count(u) for u in shards.urls), "stale manifest read as current"

    # re-running the same command finishes a consistent, shorter set; nothing of the old set stays listed
    (root / "fifo.png").unlink()
    write_records(src, rec_json, [f"new{i}" for i in range(6)])
    assert main([str(src), "--image-root", str(root), "--output", str(out / "s-%06d.tar"), "--overwrite",
                 "--max-samples-per-shard", "4"]) == 0
    shards = resolve_shards(str(out / "manifest.json"))
    assert shards.num_samples == 6 == sum(tar_count(u) for u in shards.urls)
    assert sorted(p.name for p in out.glob("s-*.tar*")) == ["s-000000.tar", "s-000001.tar"]


def test_sigkill_then_rerun_resumes_to_the_same_bytes(tmp_path, root, rec_json, photos, capsys):
    """A real SIGKILL mid-shard (an unfinished .tmp on disk); the same command again continues after the finished
    shards and ends with exactly the files of an uninterrupted run."""
    src = write_records(tmp_path / "r.jsonl", rec_json, [f"k{i}" for i in range(13)], block_at=10)
    out = tmp_path / "out"
    proc = start_convert(src, root, out, "--max-samples-per-shard", "4", "--workers", "0")
    try:  # k0-k3, k4-k7 finished and journaled; k8, k9 in the open shard; blocked at k10
        wait_for(lambda: (out / "s-000002.tar.tmp").exists(), 60, "two finished shards", proc)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait(10)
    assert sorted(p.name for p in out.glob("s-*")) == [
        "s-000000.tar", "s-000001.tar", "s-000002.tar.tmp", "s-progress.jsonl"]
    finished = {n: (out / n).stat() for n in ("s-000000.tar", "s-000001.tar")}
    (root / "fifo.png").unlink()
    photos[1].save(root / "fifo.png")
    ref = tmp_path / "ref"
    convert_jsonl(src, root, str(ref / "s-%06d.tar"), max_samples_per_shard=4)
    assert main([str(src), "--image-root", str(root), "--output", str(out / "s-%06d.tar"),
                 "--max-samples-per-shard", "4"]) == 0
    text = capsys.readouterr().out
    assert "wrote 13 samples into 4 shards" in text and "(resumed after 2 verified shards)" in text
    for name, before in finished.items():  # verified, not rewritten: the same file, untouched
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names and "s-000003.tar" in names
    for name in names:
        if name != "s-progress.jsonl":  # its header names the place; the rest is compared in test_parts
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_overwrite_removes_every_old_shard_and_manifest(tmp_path, root, rec_json):
    """A shorter new set leaves no old shard behind, also past a gap in the numbering, and no old manifest
    (not even one at the default place when the new one goes elsewhere) lists removed or rewritten shards."""
    out = tmp_path / "out"
    convert_jsonl(write_records(tmp_path / "old.jsonl", rec_json, [f"old{i}" for i in range(20)]), root,
                  str(out / "s-%06d.tar"), max_samples_per_shard=4)
    (out / "s-000002.tar").unlink()  # a gap: shards 3 and 4 are still old ones
    (out / "s-000009.tar.tmp").write_bytes(b"left by a killed run")
    src = write_records(tmp_path / "new.jsonl", rec_json, [f"new{i}" for i in range(3)])
    convert_jsonl(src, root, str(out / "s-%06d.tar"), max_samples_per_shard=4, overwrite=True,
                  manifest=str(tmp_path / "elsewhere.json"))
    assert sorted(p.name for p in out.glob("s-*.tar*")) == ["s-000000.tar"]
    assert not (out / "manifest.json").exists()
    assert resolve_shards(str(tmp_path / "elsewhere.json")).num_samples == 3


def test_existing_manifest_needs_overwrite(tmp_path, root, rec_json):
    """A manifest at the target path is output too: without --overwrite it is not silently replaced."""
    out = tmp_path / "out"
    src = write_records(tmp_path / "r.jsonl", rec_json, ["a", "b"])
    convert_jsonl(src, root, str(out / "s-%06d.tar"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_jsonl(src, root, str(out / "t-%06d.tar"))  # other shard names, same manifest.json
    # a wrong input or image root fails before the earlier conversion is touched
    with pytest.raises(FileNotFoundError, match="fix the path"):
        convert_jsonl(tmp_path / "typo.jsonl", root, str(out / "s-%06d.tar"), overwrite=True)
    with pytest.raises(FileNotFoundError, match="--image-root"):
        convert_jsonl(src, tmp_path / "nope", str(out / "s-%06d.tar"), overwrite=True)
    assert resolve_shards(str(out / "manifest.json")).urls == [str(out / "s-000000.tar")]


def survivors_after(children: dict[int, str], seconds: float) -> dict[int, str]:
    """The children still alive after waiting up to ``seconds`` for them to go."""
    end = time.monotonic() + seconds
    while any(alive(p) for p in children) and time.monotonic() < end:
        time.sleep(0.1)
    return {p: c for p, c in children.items() if alive(p)}


def reap(proc, children: dict[int, str]) -> None:
    """Leave nothing running, whatever the test's outcome."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for p in children:
        if alive(p):
            os.kill(p, signal.SIGKILL)


# -- 2. killing the converter stops its workers --------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_converter_leaves_no_worker(tmp_path, root, rec_json, sig):
    src = write_records(tmp_path / "r.jsonl", rec_json, [f"k{i}" for i in range(40)], block_at=10)
    out = tmp_path / "out"
    proc = start_convert(src, root, out, "--workers", "2")
    children: dict[int, str] = {}
    try:
        wait_for(lambda: len(workers_of(proc.pid)) >= 2, 60, "2 workers", proc)
        time.sleep(1.0)  # workers initialised; one of them blocks on the FIFO
        children = descendants(proc.pid)
        os.kill(proc.pid, sig)
        proc.wait(60)
        survivors = survivors_after(children, 10)
        assert not survivors, f"{sig.name}: children outlived the converter: {survivors}"
    finally:
        reap(proc, children)
    if sig != signal.SIGKILL:  # handled: one line that names the problem and the fix, no traceback
        err = proc.stderr.read()
        assert proc.returncode == 128 + sig, err
        assert err.count("\n") == 1 and "interrupted" in err and "--overwrite" in err, err
        assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()


def test_dead_worker_stops_the_conversion(tmp_path, root, rec_json):
    """A worker killed from outside (e.g. by the OOM killer): one line, exit 2, the other worker stopped."""
    src = write_records(tmp_path / "r.jsonl", rec_json, [f"k{i}" for i in range(40)], block_at=10)
    proc = start_convert(src, root, tmp_path / "out", "--workers", "2")
    children: dict[int, str] = {}
    try:
        wait_for(lambda: len(workers_of(proc.pid)) >= 2, 60, "2 workers", proc)
        time.sleep(1.0)
        children = descendants(proc.pid)
        os.kill(min(workers_of(proc.pid)), signal.SIGKILL)
        proc.wait(60)
        assert not survivors_after(children, 10)
    finally:
        reap(proc, children)
    err = proc.stderr.read()
    assert proc.returncode == 2 and err.count("\n") == 1 and "worker process died" in err, err


# -- 3. undecodable and malformed lines ----------------------------------------------------------------------------
def test_bad_lines_are_rejects_with_line_numbers(tmp_path, root, rec_json, capsys):
    good = [json.dumps({"key": k, "image": "a.jpg", **rec_json(k)}).encode() for k in ("g1", "g2", "g3", "g4")]
    lines = [
        b"\xef\xbb\xbf" + good[0],  # a UTF-8 byte-order mark on line 1 is fine
        b'{"key": "latin", "caption": "caf\xe9"}',  # Latin-1, not UTF-8
        good[1],
        b"[" * 100_000,  # nested past the JSON parser's recursion limit
        b'{"key": "big", "n": ' + b"9" * 5000 + b"}",  # an integer past Python's digit limit
        b"[1, 2]",  # JSON, but not an object
        b'{"key": "x", "image": "a.jpg", "turns": "seven"}',  # wrong schema
        good[2],
        b"\xff\xfe\x00",
        good[3],
    ]
    src = tmp_path / "r.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    rc = main([str(src), "--image-root", str(root), "--output", str(out / "s-%06d.tar"), "--workers", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "wrote 4 samples" in text and "rejected 6" in text
    assert resolve_shards(str(out / "manifest.json")).num_samples == 4
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "encoding"), (4, "json"), (5, "json"), (6, "json"), (7, "type"), (9, "encoding")]
    assert all(r["message"].startswith(f"line {r['line']}: ") for r in rejects)
    assert "not valid UTF-8" in rejects[0]["message"] and "0xe9" in rejects[0]["message"]
    assert rejects[4]["key"] == "x" and "turns" in rejects[4]["message"]


def test_pair_jsonl_undecodable_line(tmp_path, root):
    ok = {"query": {"text": "q"}, "positive": {"text": "p"}}
    src = tmp_path / "p.jsonl"
    src.write_bytes(json.dumps({"key": "a", **ok}).encode() + b"\n" + b'{"key": "b\xff", "query": 1}\n'
                    + json.dumps({"key": "c", **ok}).encode() + b"\n")
    s = convert_pairs(src, root, str(tmp_path / "o" / "p-%06d.tar"))
    assert (s.written, s.rejected, dict(s.reasons)) == (2, 1, {"encoding": 1})
    (rej,) = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert rej["line"] == 2 and rej["key"] == "p_000000002" and rej["message"].startswith("line 2: ")


# -- 4. length limits ----------------------------------------------------------------------------------------------
def test_length_limits(tmp_path, root, rec_json):
    def rec(key: str, target: str | None = None, query: str | None = None) -> dict:
        r = rec_json(key)
        if target is not None:
            r["turns"][6]["target"] = target
        if query is not None:
            r["turns"][2]["queries"][1] = query
        return {"key": key, "image": "a.jpg", **r}

    assert 0 < MAX_TEXT_CHARS < MAX_SEQUENCE_CHARS
    lines = [rec("ok"), rec("longtarget", target="x" * (MAX_TEXT_CHARS + 1)),
             rec("edge", target="y" * MAX_TEXT_CHARS),
             rec("longseq", query="z " * (MAX_TEXT_CHARS // 2))]  # under the per-text limit
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    # defaults: the target one over the per-text limit is rejected
    s = convert_jsonl(src, root, str(tmp_path / "a" / "s-%06d.tar"))
    assert (s.written, dict(s.reasons)) == (3, {"too_long": 1})
    (rej,) = [json.loads(x) for x in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert rej["key"] == "longtarget" and "turns[6].target" in rej["message"]
    assert f"{MAX_TEXT_CHARS + 1:,} characters" in rej["message"] and "--max-text-chars" in rej["message"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (manifest["max_text_chars"], manifest["max_sequence_chars"]) == (MAX_TEXT_CHARS, MAX_SEQUENCE_CHARS)

    # per sequence: the sum over turns (longest candidate of each) of the query side
    s = convert_jsonl(src, root, str(tmp_path / "b" / "s-%06d.tar"), max_text_chars=0,
                      max_sequence_chars=MAX_TEXT_CHARS)
    assert (s.written, dict(s.reasons)) == (1, {"too_long": 3})
    msgs = reject_messages(tmp_path / "b" / "rejects.jsonl")
    assert "query sequence" in msgs["longseq"] and "--max-sequence-chars" in msgs["longseq"]
    assert "target sequence" in msgs["longtarget"]

    # the CLI exposes both; 0 turns a limit off
    assert main([str(src), "--image-root", str(root), "--output", str(tmp_path / "c" / "s-%06d.tar"),
                 "--max-text-chars", "0", "--max-sequence-chars", "0"]) == 0
    assert resolve_shards(str(tmp_path / "c" / "manifest.json")).num_samples == 4
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert str(MAX_TEXT_CHARS) in helps["max_text_chars"] and str(MAX_SEQUENCE_CHARS) in helps["max_sequence_chars"]


def test_pair_length_limits(tmp_path, root):
    pairs = [{"key": "ok", "query": {"text": "q"}, "positive": {"text": "p"}},
             {"key": "longneg", "query": {"text": "q"}, "positive": {"text": "p"},
              "negatives": [{"text": "n" * 300}]},
             {"key": "longpair", "query": {"text": "q" * 150}, "positive": {"text": "p" * 150}}]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in pairs))
    s = convert_pairs(src, root, str(tmp_path / "o" / "p-%06d.tar"), max_text_chars=200, max_sequence_chars=250)
    assert (s.written, dict(s.reasons)) == (1, {"too_long": 2})
    msgs = reject_messages(tmp_path / "o" / "rejects.jsonl")
    assert "negatives[0].text" in msgs["longneg"] and "query sequence" in msgs["longpair"]
