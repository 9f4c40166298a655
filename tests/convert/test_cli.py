"""`muco data convert` (:mod:`muco.cli.convert`): exit codes, the summary line, a re-run, other settings refused."""

from __future__ import annotations

import pytest

from muco.cli.convert import main

pytest.importorskip("pyarrow")


def test_cli(tmp_path, released, capsys):
    path, root = released
    argv = [str(path), "--image-root", str(root), "--output", str(tmp_path / "c/t-%06d.tar"),
            "--workers", "0",
            "--max-samples-per-shard", "100"]
    assert main(argv) == 0
    assert "wrote 6 samples into 1 shards; rejected 6" in capsys.readouterr().out
    shard = tmp_path / "c" / "t-000000.tar"
    before = shard.stat().st_mtime_ns
    assert main(argv) == 0  # the same command again: verified, nothing re-written
    out = capsys.readouterr().out
    assert "wrote 6 samples into 1 shards; rejected 6" in out and "already complete" in out
    assert shard.stat().st_mtime_ns == before
    assert main([*argv, "--turns", "5"]) == 2  # other settings: refused, naming the setting and the fix
    err = capsys.readouterr().err
    assert "options.turns: 7 then, 5 now" in err and "--overwrite" in err
    assert main([*argv, "--overwrite", "--turns", "5"]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out  # only the 5-turn row matches --turns 5
