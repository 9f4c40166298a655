#!/usr/bin/env bash
# GPU checks in one go (a few minutes on one H100): CUDA pixel parity, the K=7 vs K=1 step on the real 2B shapes
# in bf16, and the 2B recipe (configs/m3t_2b.yaml, random init, the demo digits upsampled to the pretraining
# resolution) as a short `muco fit` under DDP-less single GPU and under FSDP2. Needs the demo shards
# (`python -m muco.demo.build` or `make demo`) and the packages of pyproject.toml.
#   bash benchmarks/gpu_check.sh [out_dir]
set -u
OUT_DIR=${1:-runs/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import muco from the checkout
STEPS=${STEPS:-20}

section() { echo; echo "=== $* ($(date +%T))"; }

section "device"
nvidia-smi -L
$PY -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"

section "pixel normalisation on CUDA equals the CPU path"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/data/test_pixels.py

section "K=7 vs K=1 training step, 2B shapes, bf16, gradient checkpointing"
timeout 240 $PY benchmarks/bench_turns.py --device cuda --preset 2b --bf16 --grad-ckpt --images 16 --reps 3 \
  --threads 0 2>&1 | grep -v Warning

fit() {  # name, extra args...
  local name=$1; shift
  section "muco fit: 2B recipe, $name"
  # configs/m3t_2b.yaml's model and trainer with a random-init 2B (no weights on this machine)
  timeout 400 $PY -m muco fit --config configs/tiny.yaml "$@" \
    --model.init_args.tokenizer qwen-offline --model.init_args.backbone.preset 2b \
    --model.init_args.backbone.dtype bfloat16 --model.init_args.backbone.gradient_checkpointing true \
    --model.init_args.backbone.adapter "{kind: lora, r: 64, alpha: 64}" --model.init_args.optim.lr 5e-5 \
    --trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.devices 1 --trainer.num_nodes 1 \
    --trainer.max_steps "$STEPS" --trainer.log_every_n_steps 5 --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$OUT_DIR/$name" \
    --data.init_args.image_policy pretrain --data.init_args.val_shards null \
    --data.init_args.samples_per_epoch 1500 --data.init_args.batch_size 32 --data.init_args.num_workers 6 \
    2>&1 | grep -v -i "warn" | tail -n 15
  $PY - "$OUT_DIR/$name" <<'PY'
import sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = Path(sys.argv[1])
if not any(run.glob("events.out.tfevents.*")):
    sys.exit("no TensorBoard events in the run directory")
ea = EventAccumulator(str(run)); ea.Reload()
for tag in sorted(ea.Tags()["scalars"]):
    if tag.startswith(("perf/", "train/loss", "train/grad_norm")):
        v = ea.Scalars(tag)
        print(f"{tag:<28} first {v[0].value:10.4g} (step {v[0].step})  last {v[-1].value:10.4g} (step {v[-1].step})")
PY
}
fit single
STEPS=${FSDP_STEPS:-10} fit fsdp --config configs/strategy/fsdp.yaml
section "done"
