"""`muco data convert` (:mod:`muco.cli.convert`): exit codes, the summary line, the refusal to overwrite."""

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
    assert main(argv) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--turns", "5"]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out  # only the 5-turn row matches --turns 5
