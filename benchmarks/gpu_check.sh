#!/usr/bin/env bash
# GPU checks in one go (under 10 minutes on one H100/H200; issue #17): device, CUDA pixel parity, the MFU of the
# 2B recipe step at M3T shapes (bench_turns.py: random-init 2B, LoRA r=64, bf16 weights + autocast, gradient
# checkpointing; warm-up, then >= 10 timed steps per K) with sdpa and, where flash_attn imports, flash-attention 2
# (the same runs give the K=7 / K=1 pairs/s ratio), GradCache's step time and peak memory vs chunk size
# (bench_grad_cache.py on CUDA), a FSDP2 distributed-checkpoint save + resume of the 2B recipe under
# configs/strategy/fsdp.yaml (`muco fit`, 1 or 2 GPUs) on local disk, and last the MFU padding-free
# (backbone.padding_free, with flash-attention 2 where it imports, else sdpa). Every section runs under its own
# timeout inside one time budget (BUDGET_S, default 570 s), a failed section does not stop the next, and a
# one-screen summary ends the output. Needs the packages of pyproject.toml; the demo shards come from data/demo
# or are built under OUT_DIR (a few seconds).
#   bash benchmarks/gpu_check.sh [out_dir]                        # out_dir on local disk (default runs/gpu_check)
#   GPU_CHECK_CPU_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/out   # the same sections, tiny sizes, on CPU (~2 min)
# Environment: PYTHON, BUDGET_S, IMAGES (images per step, 32), REPS (timed steps per K, 10), WARMUP (2), GC_CHUNKS
# ("0 16 8 4"), GC_IMAGES (32), FIT_SINGLE=1 (also the older 20-step single-GPU `muco fit` of the recipe).
set -u
OUT_DIR=${1:-runs/gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import muco from the checkout
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
BUDGET_S=${BUDGET_S:-570}
STEPS=${STEPS:-20}
SUMMARY=()

section() { echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }
note() { SUMMARY+=("$(printf '%-34s %s' "$1" "$2")"); }  # name, result
# the seconds a section may run: its cap, or what is left of the budget; 0 when under 20 s are left
cap() { local left=$((BUDGET_S - SECONDS)); ((left < 20)) && { echo 0; return; }; ((left < $1)) && echo "$left" || echo "$1"; }
run_timed() {  # cap_s log cmd...: runs under timeout, output to the screen (warnings dropped) and to log
  local t; t=$(cap "$1"); local log=$2; shift 2
  if ((t == 0)); then echo "skipped: out of the time budget (BUDGET_S=$BUDGET_S)"; echo "skipped: budget" > "$log"; return 125; fi
  timeout -k 10 "$t" "$@" > "$log" 2>&1
  local rc=$?
  grep -v -i -e "warn" -e "deprecated" -e "It is recommended" -e "IterableDataset" "$log" | tail -n "${TAIL:-40}"
  ((rc == 124 || rc == 137)) && echo "TIMED OUT after ${t}s"
  return $rc
}
status() { case $1 in 0) echo ok;; 124|137) echo "TIMEOUT";; 125) echo "skipped (budget)";; *) echo "FAILED rc=$1";; esac; }

if [ "$SMOKE" = 1 ]; then
  # tiny model and sizes on CPU: checks that every section's commands run, not the numbers
  CUDA=0; IMAGES=${IMAGES:-2}; REPS=${REPS:-1}; WARMUP=1; GC_CHUNKS=${GC_CHUNKS:-"0 1"}; GC_IMAGES=${GC_IMAGES:-2}
  TURNS_ARGS=(--device cpu --preset tiny --policy tiny --threads 1 --clock wall)
  GC_ARGS=(--device cpu --preset tiny --m3t --policy tiny --repeats 1)
  MODEL_ARGS=(--model.init_args.tokenizer qwen-offline --model.init_args.backbone.preset tiny
    --model.init_args.backbone.gradient_checkpointing true --model.init_args.backbone.adapter "{kind: lora, r: 8, alpha: 8}"
    --trainer.accelerator cpu --trainer.precision 32-true --data.init_args.image_policy tiny
    --data.init_args.batch_size 4 --data.init_args.num_workers 0)
else
  CUDA=1; IMAGES=${IMAGES:-32}; REPS=${REPS:-10}; WARMUP=${WARMUP:-2}; GC_CHUNKS=${GC_CHUNKS:-"0 16 8 4"}; GC_IMAGES=${GC_IMAGES:-32}
  TURNS_ARGS=(--device cuda --preset 2b --dtype bfloat16 --threads 0)
  GC_ARGS=(--device cuda --preset 2b --dtype bfloat16 --repeats 2)
  # configs/m3t_2b.yaml's model and trainer with a random-init 2B (no weights on these machines)
  MODEL_ARGS=(--model.init_args.tokenizer qwen-offline --model.init_args.backbone.preset 2b
    --model.init_args.backbone.dtype bfloat16 --model.init_args.backbone.gradient_checkpointing true
    --model.init_args.backbone.adapter "{kind: lora, r: 64, alpha: 64}" --model.init_args.optim.lr 5e-5
    --trainer.accelerator gpu --trainer.precision bf16-mixed --data.init_args.image_policy pretrain
    --data.init_args.batch_size 32 --data.init_args.num_workers 6)
fi

section "device"
if command -v nvidia-smi > /dev/null; then nvidia-smi -L; else echo "no nvidia-smi"; fi
$PY - <<'PY' 2>&1 | grep -v -i warn | tee "$OUT_DIR/device.txt"
import importlib.util, torch, transformers, lightning
print("torch", torch.__version__, "transformers", transformers.__version__, "lightning", lightning.__version__)
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("cuda devices", n, *(torch.cuda.get_device_name(i) for i in range(n)))
fa = importlib.util.find_spec("flash_attn") is not None
if fa:
    try:
        import flash_attn
        print("flash_attn", flash_attn.__version__)
    except Exception as e:  # installed but broken (ABI): treated as absent
        print("flash_attn import failed:", e); fa = False
print("flash_attn_ok", int(fa), "gpus", n)
PY
NGPU=$(awk '/^flash_attn_ok/ {print $4}' "$OUT_DIR/device.txt"); NGPU=${NGPU:-0}
FA_OK=$(awk '/^flash_attn_ok/ {print $2}' "$OUT_DIR/device.txt"); FA_OK=${FA_OK:-0}
if [ "$CUDA" = 1 ] && ((NGPU == 0)); then
  echo "no CUDA device: run with GPU_CHECK_CPU_SMOKE=1 for the CPU smoke mode"; CUDA=0
fi
note device "$(grep '^cuda devices' "$OUT_DIR/device.txt" || echo '?'); flash_attn=$FA_OK"

section "pixel normalisation on CUDA equals the CPU path"
if [ "$CUDA" = 1 ]; then
  run_timed 90 "$OUT_DIR/pixels.log" $PY -m pytest -q -p no:cacheprovider tests/data/test_pixels.py -k cuda
  note "pixel parity (CUDA)" "$(status $?)"
else echo "skipped: no CUDA"; note "pixel parity (CUDA)" "skipped: no CUDA"; fi

mfu() {  # attn [padding-free]: the 2B step, K=7 and K=1, bf16, gradient checkpointing, REPS timed steps per K
  local attn=$1 pf=${2:-} name=$1
  [ -n "$pf" ] && name="$attn padding-free"
  section "2B recipe step at M3T shapes, $name: MFU and K=7 vs K=1 ($IMAGES images, $REPS timed steps per K)"
  local log="$OUT_DIR/mfu_$attn${pf:+_padding_free}.log"
  run_timed 150 "$log" $PY benchmarks/bench_turns.py "${TURNS_ARGS[@]}" --bf16 --grad-ckpt \
    --images "$IMAGES" --reps "$REPS" --warmup "$WARMUP" --attn "$attn" ${pf:+--padding-free}
  local rc=$?
  if ((rc == 0)); then
    note "MFU $name" "$(grep '^mfu ' "$log") (model time; $(grep -o 'peak GPU memory.*' "$log" || echo 'cpu'))"
    note "K=7/K=1 pairs/s, $name" "$(tail -n 1 "$log")"
  else note "MFU $name" "$(status $rc)"; fi
}
mfu sdpa
BEST=sdpa
if [ "$CUDA" = 1 ] && [ "$FA_OK" = 1 ]; then mfu flash_attention_2; BEST=flash_attention_2
else
  why=$([ "$CUDA" = 1 ] && echo "flash_attn does not import" || echo "no CUDA")
  section "2B recipe step, flash_attention_2"; echo "skipped: $why"; note "MFU flash_attention_2" "skipped: $why"
fi

section "GradCache: step time and peak memory vs chunk size ($GC_IMAGES images x 7 turns; chunks $GC_CHUNKS)"
# shellcheck disable=SC2086
TAIL=12 run_timed 180 "$OUT_DIR/grad_cache.log" $PY benchmarks/bench_grad_cache.py "${GC_ARGS[@]}" \
  $([ "$CUDA" = 1 ] && echo --bf16) --images "$GC_IMAGES" --turns 7 --chunks $GC_CHUNKS
rc=$?
if ((rc == 0)); then
  note "GradCache (chunk: x time, x peak)" "$(awk '$1 ~ /^(none|[0-9]+)$/ && NF == 5 {printf "%s: %s, %s; ", $1, $3, $5}' "$OUT_DIR/grad_cache.log")"
else note "GradCache" "$(status $rc)"; fi

DEMO=${DEMO:-data/demo}
if [ ! -f "$DEMO/train/manifest.json" ]; then
  DEMO=$OUT_DIR/demo
  [ -f "$DEMO/train/manifest.json" ] || $PY -c "import sys; from muco.demo.build import build_demo_data; build_demo_data(sys.argv[1])" \
    "$DEMO" > "$OUT_DIR/demo.log" 2>&1 || { echo "building the demo shards failed:"; tail -n 5 "$OUT_DIR/demo.log"; }
fi

fit() {  # cap_s run_dir log extra args...: the recipe's `muco fit` on the demo digits (upsampled on GPU)
  local c=$1 dir=$2 log=$3; shift 3
  TAIL=${TAIL:-15} run_timed "$c" "$log" $PY -m muco fit --config configs/tiny.yaml "$@" "${MODEL_ARGS[@]}" \
    --trainer.num_nodes 1 --trainer.log_every_n_steps 1 --trainer.limit_val_batches 0 \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$dir" \
    --data.init_args.train_shards "$DEMO/train/manifest.json" --data.init_args.val_shards null \
    --data.init_args.samples_per_epoch 1500
}
scalars() {  # run_dir: first and last perf/ train/loss train/grad_norm values of the TensorBoard events
  $PY - "$1" <<'PY'
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

if [ "${FIT_SINGLE:-0}" = 1 ]; then
  section "muco fit: 2B recipe, single device, $STEPS steps"
  rm -rf "$OUT_DIR/single"
  fit 300 "$OUT_DIR/single" "$OUT_DIR/single.log" --trainer.devices 1 --trainer.max_steps "$STEPS"
  rc=$?; note "muco fit single" "$(status $rc)"; ((rc == 0)) && scalars "$OUT_DIR/single"
fi

# FSDP2 (AtomicModelParallelStrategy, save_distributed_checkpoint) on 2 GPUs if present, else 1 (data_parallel_size 1
# is accepted); tiny.yaml's ModelCheckpoint saves last.ckpt every 5 steps: 5 steps, then the same command to step 10
FSDP_DEV=$([ "$CUDA" = 1 ] && ((NGPU >= 2)) && echo 2 || echo 1)
FSDP_DIR=$OUT_DIR/fsdp
rm -rf "$FSDP_DIR"
fsdp_fit() { fit 150 "$FSDP_DIR" "$1" --config configs/strategy/fsdp.yaml --trainer.devices "$FSDP_DEV" --trainer.max_steps "$2"; }
global_step() { $PY -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=True)['global_step'])" \
  "$FSDP_DIR/checkpoints/last.ckpt/meta.pt" 2>/dev/null || echo none; }
section "FSDP2 save: muco fit under configs/strategy/fsdp.yaml, $FSDP_DEV device(s), 5 steps, checkpoint in $FSDP_DIR"
TAIL=6 fsdp_fit "$OUT_DIR/fsdp_save.log" 5
rc1=$?; step1=$(global_step)
ls -la "$FSDP_DIR/checkpoints/last.ckpt" 2>/dev/null | head -n 8
echo "saved global_step: $step1"
section "FSDP2 resume: the same command to step 10"
TAIL=6 fsdp_fit "$OUT_DIR/fsdp_resume.log" 10
rc2=$?; step2=$(global_step)
restored=$(grep -c "Restored all states" "$OUT_DIR/fsdp_resume.log")
echo "resumed global_step: $step2; 'Restored all states' lines: $restored"
((rc2 == 0)) && scalars "$FSDP_DIR"
if ((rc1 == 0 && rc2 == 0)) && [ "$step1" = 5 ] && [ "$step2" = 10 ] && ((restored > 0)); then
  note "FSDP2 save + resume ($FSDP_DEV dev)" "ok: saved at step 5, restored, continued to step 10"
elif ((rc1 == 125)); then
  note "FSDP2 save + resume ($FSDP_DEV dev)" "skipped (budget)"
else
  note "FSDP2 save + resume ($FSDP_DEV dev)" "FAILED: save $(status $rc1) step $step1, resume $(status $rc2) step $step2, restored=$restored"
fi

# Last, so that the FSDP2 check gets its budget first. Padding-free runs flash-attention 2's varlen kernel (or SDPA
# sequence by sequence); MFU counts the same unpadded work either way, so the gain shows as MFU.
# (data.length_bucketing changes which samples share a batch, not one step's kernels: benchmarks/bench_padding.py)
mfu "$BEST" padding-free

section "summary (${SECONDS}s of BUDGET_S=$BUDGET_S; logs in $OUT_DIR)"
[ "$SMOKE" = 1 ] && echo "CPU SMOKE MODE: tiny model, tiny sizes; the numbers mean nothing"
printf '%s\n' "${SUMMARY[@]}"
if [ "$CUDA" = 1 ]; then echo "target: MFU >= 35% for the 2B step (K=7) on one H100/H200"; fi
# exit status: 1 when a section failed or timed out (skipped ones do not count)
printf '%s\n' "${SUMMARY[@]}" | grep -q -e FAILED -e TIMEOUT && exit 1
exit 0
