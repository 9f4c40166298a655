"""The shipped run configs parse and encode the paper's recipe (METHOD.md §11)."""

from __future__ import annotations

import pytest
import yaml

from tests.train.conftest import REPO, run_muco


@pytest.mark.parametrize("run", ["m3t_2b", "m3t_7b"])
def test_pretraining_presets_follow_the_recipe(run, tmp_path):
    res = run_muco("fit", "--config", f"configs/{run}.yaml", "--config", "configs/strategy/fsdp.yaml",
                   "--print_config", cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load(res.stdout)
    t, m, d = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    images_per_step = d["batch_size"] * t["devices"] * t["num_nodes"]
    assert images_per_step == 1024
    assert t["max_steps"] == d["samples_per_epoch"] // images_per_step + 1 == 4984  # one epoch of M3T
    assert t["precision"] == "bf16-mixed" and t["gradient_clip_val"] == 1.0
    assert m["temperature"] == 0.02 and m["optim"]["lr"] == 5e-5 and m["optim"]["schedule"] == "constant"
    assert m["backbone"]["adapter"] == {**m["backbone"]["adapter"], "kind": "lora", "r": 64, "alpha": 64}
    assert m["backbone"]["gradient_checkpointing"] and m["backbone"]["freeze_vision"]
    assert d["turns_per_sample"] == 7 and d["image_policy"] == "pretrain"
    # the tokenizer follows the weights directory, also after an override
    assert m["tokenizer"] == m["backbone"]["pretrained"]  # data.tokenizer is linked to it by the CLI
    assert t["strategy"]["init_args"]["data_parallel_size"] == t["devices"] * t["num_nodes"]


def test_interpolation_follows_overrides():
    res = run_muco("fit", "--config", "configs/m3t_2b.yaml", "--model.init_args.backbone.pretrained=/w/other",
                   "--trainer.num_nodes=2", "--config", "configs/strategy/fsdp.yaml", "--print_config", cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load(res.stdout)
    assert cfg["model"]["init_args"]["tokenizer"] == "/w/other"
    assert cfg["trainer"]["strategy"]["init_args"]["data_parallel_size"] == 16
