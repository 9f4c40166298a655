"""Training pairs/s with K=7 turns vs K=1 at equal images per batch, next to the analytic FLOP ratio (issue #4).

One training step is the real computation: ``PretrainCollator`` (policy resize, uint8 patches, templates,
tokeniser) -> ``Embedder`` on the query batch and on the target batch -> ``pretrain_loss`` -> backward -> AdamW.
Both settings use the same model, the same photos per repetition (scikit-image's real photos at the pretraining
resolution, short side 640) and the same M3T-like records (7 turns: queries of 15-25 words, short answers, an
80-120-word dense caption as the ``ret`` target); K=1 takes one turn per image (``draw_turns`` with K=1, i.e.
the first turn of a random permutation, the paper's 1-turn baseline), K=7 all 7. Repetitions alternate the
order (7,1), (1,7), ... so machine noise hits both; one warm-up step per setting is not counted.

The analytic count (``_shapes.step_flops``) counts matmul FLOPs of vision tower + merger + LLM (+ LoRA) over
the actual token counts, attention's quadratic term included:

* ``paper``   every matmul x3 for forward + backward (the convention behind the paper's Tab. 5 PFLOPs);
* ``trained`` what this model needs: the frozen vision tower and merger run forward only, frozen LLM weights
  need the input gradient but no weight gradient (x2), LoRA and attention x3;
* ``exec``    ``trained`` over padded widths with full-square attention (what the CPU kernels multiply).

Phases (CPU execution is synchronous, so hook and call timings are exact): collate, vision forward (hooks on
``visual``), input embedding (hooks on ``embed_tokens``, the TokenRows layer), LLM forward (hooks on
``language_model``, query + target), glue (the rest of the embedder forward: uint8 -> float pixels, M-RoPE
index, image scatter, pooling), loss, backward (LLM only: the frozen vision tower stays out of autograd, with
``--grad-ckpt`` too; the run checks that no vision output required grad), optimizer step.

Timing defaults suit a shared 2-core machine: one intra-op thread and process CPU time (``--clock cpu``), so a
step is not charged for the time other processes hold the cores; ``--threads 2 --clock wall`` on an idle machine.
glibc is told to keep freed memory (``keep_freed_memory``), as CUDA's caching allocator would; without it every
large tensor faults in fresh pages each step, which costs K=7 more than K=1 (``--no-malloc-cache``).
Per-K pairs/s use the median step; the headline ratio is the median over repetitions of the paired ratio.

MFU (model FLOPs utilisation, on CUDA): the ``trained`` count without recomputation over the unpadded tokens
(the model's useful work) per second of model time (the step without collation, which the trainer's loader
workers overlap), over the peak dense bf16 rate of the GPU (H100/H200 989 TFLOP/s, A100 312; ``--peak-tflops``
for others). HFU: the same for the ``exec`` count with the recomputation of ``--grad-ckpt`` (what ran).

The last line reads ``ratio=<measured pairs/s K=7 / K=1> flop_ratio=<pairs per FLOP K=7 / K=1, paper count>``;
the one before it ``mfu K=7=<%> K=1=<%>`` (``n/a`` without a known peak).

    python benchmarks/bench_turns.py                               # cpu-2b-shape, 3 images/batch, ~1.5-2.5 min
    python benchmarks/bench_turns.py --preset tiny --images 8
    python benchmarks/bench_turns.py --short-side 320 --reps 2     # quick run (~170 visual tokens per image)
    python benchmarks/bench_turns.py --grad-ckpt                   # as every recipe config trains
    python benchmarks/bench_turns.py --device cuda --preset 2b --bf16 --dtype bfloat16 --grad-ckpt --images 16 \
        --reps 10 --attn flash_attention_2                         # the 2B recipe step's MFU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shapes import Arch, StepShape, forward_flops, m3t_record, photos, split, step_flops  # noqa: E402

from muco.data.m3t.collate import PretrainCollator, PretrainSample  # noqa: E402
from muco.data.m3t.turns import draw_turns
from muco.data.seeds import sample_rng
from muco.inputs.image_policy import PRESETS as POLICIES  # noqa: E402
from muco.inputs.image_policy import ImagePolicy  # noqa: E402
from muco.inputs.tokenizer import SpecialTokenIds, qwen_offline_tokenizer  # noqa: E402
from muco.losses.pretrain import pretrain_loss  # noqa: E402
from muco.model import backbone as backbone_mod  # noqa: E402
from muco.model.backbone import AdapterConfig, BackboneConfig, build_backbone, unwrap_qwen2vl  # noqa: E402
from muco.model.embedder import Embedder  # noqa: E402
from muco.train.optim import param_groups  # noqa: E402

# A trial preset (registered into muco's preset table at run time only; proposed as the new `cpu-2b-shape`):
PHASES = ("collate", "vision", "embed", "llm", "glue", "loss", "backward", "optim")
TURNS = (7, 1)
# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name (SXM parts; first match wins)
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s or None, device name) for the MFU denominator."""
    if device.type != "cuda":
        return (override_tflops * 1e12 if override_tflops else None), "cpu"
    name = torch.cuda.get_device_name(device)
    if override_tflops:
        return override_tflops * 1e12, name
    return next((v for k, v in PEAK_BF16 if k in name), None), name


def preset_dims(name: str) -> dict:
    return backbone_mod.PRESETS[name]


def default_lora_r(name: str) -> int:
    """The LoRA rank whose FLOPs are the same share of the LLM linears' as r=64 on 2B (5.6 %), at least 2."""
    base, lora1 = Arch.from_preset(preset_dims(name), lora_r=1).lm_linear_per_token()
    base2b, lora2b = Arch.from_preset(backbone_mod.PRESETS["2b"], lora_r=64).lm_linear_per_token()
    return max(2, round(lora2b / base2b * base / lora1))


class PhaseClock:
    """Accumulates time inside the ``visual``, input-embedding and ``language_model`` forwards (hooks), and
    counts the vision forwards whose output is part of the autograd graph (0 for a frozen tower)."""

    def __init__(self, model: torch.nn.Module, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.spent: dict[str, float] = defaultdict(float)
        self._t0: dict[str, float] = {}
        self.vision_calls = self.vision_in_graph = 0
        qwen = unwrap_qwen2vl(model)
        qwen.visual.register_forward_hook(self._vision_output)
        # the input embedding (TokenRows: frozen table + the two trained rows) runs outside `language_model`, which gets
        # `inputs_embeds` from `Qwen2VLModel.forward`
        for name, mod in (("vision", qwen.visual), ("embed", qwen.get_input_embeddings()),
                          ("llm", qwen.language_model)):
            mod.register_forward_pre_hook(self._enter(name))
            mod.register_forward_hook(self._leave(name))

    def _enter(self, name: str) -> Callable:
        def hook(*_: object) -> None:
            self._t0[name] = self.now()

        return hook

    def _leave(self, name: str) -> Callable:
        def hook(*_: object) -> None:
            self.spent[name] += self.now() - self._t0.pop(name)

        return hook

    def _vision_output(self, _mod: torch.nn.Module, _args: object, out: object) -> None:
        self.vision_calls += 1
        self.vision_in_graph += bool(out.pooler_output.requires_grad or out.last_hidden_state.requires_grad)

    def take(self) -> dict[str, float]:
        out, self.spent = dict(self.spent), defaultdict(float)
        return out


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never trim it, so freed tensors' pages are reused.

    PyTorch's CPU allocator has no cache; glibc mmaps large blocks and unmaps them on free, so each step's big
    tensors (activations, their gradients) fault in fresh zeroed pages, which
    is slow in this VM. CUDA's caching allocator never pays this, so the benchmark emulates it by default.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_max, m_trim_threshold = -4, -1
        # -1 = SIZE_MAX: never trim (a finite threshold below a K=7 step's ~3 GB peak would still give it back)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    except (OSError, AttributeError):  # not glibc
        return False


def make_samples(records: list[dict], images: list, keys: list[str], k: int, seed: int, rep: int) -> list:
    out = []
    for rec, im, key in zip(records, images, keys):
        queries, targets = draw_turns(rec["turns"], k, sample_rng(seed, rep, key))
        out.append(PretrainSample(key=key, image=im, queries=queries, targets=targets))
    return out


def to_device(x: object, device: torch.device) -> object:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def train_step(embedder: Embedder, collator: PretrainCollator, samples: list, opt: torch.optim.Optimizer | None,
               clock: PhaseClock, bf16: bool, device: torch.device | None = None,
               ) -> tuple[dict[str, float], dict, tuple[int, float]]:
    """One step; returns (phase -> seconds on the clock's time base, batch, (page faults, system CPU s))."""
    now = clock.now
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = now()
    batch = collator(samples)
    device = device or torch.device("cpu")
    if device.type != "cpu":  # the host-to-device copy is part of the collate phase
        batch = to_device(batch, device)
    t1 = now()
    keys, turns = batch["keys"], batch["num_turns"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        q = embedder(batch["query"], turns, keys)
        t = embedder(batch["target"], turns, keys)
    t2 = now()
    out = pretrain_loss(q.emb, t.emb, q.sample_id, tau=0.02)  # gid = image index (single process)
    t3 = now()
    out.loss.backward()
    t4 = now()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    t5 = now()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    hooks = clock.take()
    ph = {"collate": t1 - t0, "vision": hooks.get("vision", 0.0), "embed": hooks.get("embed", 0.0),
          "llm": hooks.get("llm", 0.0), "loss": t3 - t2, "backward": t4 - t3, "optim": t5 - t4}
    ph["glue"] = (t2 - t1) - ph["vision"] - ph["embed"] - ph["llm"]
    return ph, batch, (r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime)


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:.3f} T" if x >= 1e12 else f"{x / 1e9:.1f} G"


def print_split(rows: list[tuple[str, Arch, list[StepShape], list[StepShape]]]) -> None:
    """Forward-FLOP split (ideal count) for (label, arch, K=1 steps, K=7 steps)."""
    print("\nforward-FLOP split, mean per step (ideal count: unpadded, causal; v.attn/v: attention share of the"
          " vision blocks; l.attn/l: of the LLM)")
    print(f"{'model @ shapes':<34}{'K':>2} {'fwd FLOPs':>10} {'vision':>7} {'v.attn/v':>9} {'merger':>7} "
          f"{'llm':>6} {'l.attn/l':>9} {'K7/K1 fwd':>10} {'7*F1/F7':>8}")
    for label, arch, s1, s7 in rows:
        sp = {1: split(arch, s1), 7: split(arch, s7)}
        f1, f7 = sp[1]["total"] / len(s1), sp[7]["total"] / len(s7)
        for k in (1, 7):
            x = sp[k]
            extra = f"{f7 / f1:>10.3f} {7 * f1 / f7:>8.2f}" if k == 7 else ""
            n = len(s1 if k == 1 else s7)
            print(f"{label if k == 1 else '':<34}{k:>2} {fmt_flops(x['total'] / n):>10} {x['vision']:>7.1%} "
                  f"{x['v_attn/v']:>9.1%} {x['merger']:>7.1%} {x['llm']:>6.1%} {x['l_attn/l']:>9.1%} {extra}")


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    presets = sorted(backbone_mod.PRESETS)
    ap.add_argument("--preset", default="cpu-2b-shape", choices=presets)
    ap.add_argument("--images", type=int, default=3, help="images per batch (equal for both K)")
    ap.add_argument("--reps", type=int, default=4, help="timed steps per K (after the warm-up steps)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per K")
    ap.add_argument("--policy", default="pretrain", choices=sorted(POLICIES), help="image resolution policy")
    ap.add_argument("--short-side", type=int, default=None,
                    help="override the policy's short side (e.g. 320 for a quick run); photos are cut to it")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: 2B's r=64 LoRA FLOP share)")
    ap.add_argument("--no-optim", action="store_true", help="skip the AdamW step")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="gradient checkpointing (non-reentrant), as in every recipe config")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (loss stays fp32)")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                    help="attention kernel (flash_attention_2 needs the flash_attn package and a CUDA device)")
    ap.add_argument("--padding-free", action="store_true",
                    help="backbone.padding_free: each batch as one packed row (varlen attention; exec F still "
                         "counts padded widths)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="backbone weights dtype (the 2B recipe keeps the frozen base in bfloat16)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s for MFU (default: by GPU name, H100/H200 989, A100 312)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                    help="cpu: process CPU time (robust on a shared machine; use with --threads 1); wall: wall time")
    ap.add_argument("--no-malloc-cache", action="store_true",
                    help="let glibc return freed memory to the OS (every large tensor then page-faults afresh)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="torch.profiler of one extra step per K: top ops")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: on CUDA every phase boundary synchronises and the "
                    "clock is wall time")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        args.clock = "wall"
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes via PEFT
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_malloc_cache:
        keep_freed_memory()
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        def now() -> float:  # phase timings need the queued kernels finished
            torch.cuda.synchronize(device)
            return time.perf_counter()
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    policy = ImagePolicy.preset(args.policy)
    if args.short_side is not None:
        policy = replace(policy, short_side=args.short_side)
    side = policy.short_side or 640
    pics = photos(side)
    records = [m3t_record(args.seed * 1000 + i) for i in range(len(pics))]

    tok = qwen_offline_tokenizer()
    lora_r = args.lora_r if args.lora_r is not None else default_lora_r(args.preset)
    cfg = BackboneConfig(preset=args.preset, adapter=AdapterConfig(r=lora_r, alpha=lora_r),
                         gradient_checkpointing=args.grad_ckpt, attn_implementation=args.attn, seed=args.seed,
                         dtype=args.dtype, padding_free=args.padding_free)
    backbone = build_backbone(cfg, tok)
    embedder = Embedder(backbone, SpecialTokenIds.from_tokenizer(tok).emb, args.padding_free).to(device).train()
    opt = None if args.no_optim else torch.optim.AdamW(param_groups(embedder, 0.01), lr=5e-5)
    clock = PhaseClock(backbone, now)
    collator = PretrainCollator(tok, policy)
    arch = Arch.from_config(unwrap_qwen2vl(backbone).config, lora_r)
    arch2b = Arch.from_preset(backbone_mod.PRESETS["2b"], 64)
    n_params = sum(p.numel() for p in embedder.parameters())
    n_train = sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    print(f"preset={args.preset} lora_r={lora_r} params={n_params / 1e6:.1f}M trainable={n_train / 1e6:.2f}M "
          f"images/batch={args.images} reps={args.reps} policy={args.policy} short_side={side} "
          f"threads={torch.get_num_threads()} clock={args.clock} malloc_cache={not args.no_malloc_cache} "
          f"bf16={args.bf16} grad_ckpt={args.grad_ckpt} optim={opt is not None} attn={args.attn} "
          f"dtype={args.dtype} padding_free={args.padding_free} "
          f"(setup {time.perf_counter() - start:.1f} s)")

    def batch_for(rep: int) -> tuple[list, list, list[str]]:
        idx = [(rep * args.images + i) % len(pics) for i in range(args.images)]
        return ([records[i] for i in idx], [pics[i][1] for i in idx], [f"{pics[i][0]}-{rep}" for i in idx])

    phases: dict[int, list[dict[str, float]]] = {k: [] for k in TURNS}
    shapes: dict[int, list[StepShape]] = {k: [] for k in TURNS}
    faults: dict[int, list[tuple[int, float]]] = {k: [] for k in TURNS}
    for w in range(args.warmup):  # not counted
        recs, ims, keys = batch_for(-1 - w)
        for k in TURNS:
            train_step(embedder, collator, make_samples(recs, ims, keys, k, args.seed, -1 - w), opt, clock,
                       args.bf16, device)
    for rep in range(args.reps):
        recs, ims, keys = batch_for(rep)
        for k in TURNS if rep % 2 == 0 else TURNS[::-1]:
            gc.collect()  # outside the timed step
            ph, batch, fault = train_step(embedder, collator, make_samples(recs, ims, keys, k, args.seed, rep),
                                          opt, clock, args.bf16, device)
            phases[k].append(ph)
            faults[k].append(fault)
            shapes[k].append(StepShape.from_batch(batch))

    # ---------------------------------------------------------------- measured
    B, R = args.images, args.reps
    step_t = {k: [sum(p.values()) for p in phases[k]] for k in TURNS}
    model_t = {k: [sum(v for n, v in p.items() if n != "collate") for p in phases[k]] for k in TURNS}
    rate = {k: k * B / statistics.median(step_t[k]) for k in TURNS}  # pairs/s at the median step
    rate_model = {k: k * B / statistics.median(model_t[k]) for k in TURNS}
    paired = [7 * t1 / t7 for t7, t1 in zip(step_t[7], step_t[1])]  # per rep: pairs/s K=7 over K=1
    ratio = statistics.median(paired)
    ratio_sum = (7 * sum(step_t[1])) / sum(step_t[7])
    ratio_model = statistics.median(7 * t1 / t7 for t7, t1 in zip(model_t[7], model_t[1]))

    def flops(k: int, a: Arch, mode: str, executed: bool = False, canonical: bool = False) -> float:
        return sum(step_flops(a, s.canonical(2760) if canonical else s, mode, executed, args.grad_ckpt)
                   for s in shapes[k])

    def pair_ratio(a: Arch, mode: str, executed: bool = False, canonical: bool = False) -> float:
        """Pairs per FLOP, K=7 over K=1, over all measured steps."""
        return 7 * flops(1, a, mode, executed, canonical) / flops(7, a, mode, executed, canonical)

    flop_ratio = pair_ratio(arch, "paper")
    f_exec = {k: flops(k, arch, "trained", executed=True) for k in TURNS}

    print("\nper step: tokens, time (median over reps), FLOPs (forward + backward, mean)")
    print(f"{'K':>2} {'pairs':>5} {'vis/img':>7} {'q tok':>6} {'q pad':>6} {'t tok':>6} {'t pad':>6} "
          f"{'step s':>7} {'pairs/s':>8} {'pairs/s*':>8} {'paper F':>9} {'trained F':>9} {'exec F':>9} "
          f"{'exec GF/s':>9} {'faults':>8} {'sys s':>6}")
    for k in TURNS:
        ss = shapes[k]
        vis = statistics.mean(p // 4 for s in ss for p in s.patches)
        ql = statistics.mean(n for s in ss for n in s.query_len)
        tl = statistics.mean(n for s in ss for n in s.target_len)
        qp, tp = statistics.mean(s.query_width for s in ss), statistics.mean(s.target_width for s in ss)
        print(f"{k:>2} {k * B:>5} {vis:>7.0f} {ql:>6.0f} {qp:>6.0f} {tl:>6.0f} {tp:>6.0f} "
              f"{statistics.median(step_t[k]):>7.3f} {rate[k]:>8.3f} {rate_model[k]:>8.3f} "
              f"{fmt_flops(flops(k, arch, 'paper') / R):>9} {fmt_flops(flops(k, arch, 'trained') / R):>9} "
              f"{fmt_flops(f_exec[k] / R):>9} {f_exec[k] / sum(model_t[k]) / 1e9:>9.1f} "
              f"{statistics.mean(f[0] for f in faults[k]):>8.0f} {statistics.mean(f[1] for f in faults[k]):>6.2f}")
    print("(vis/img: visual tokens per image; q/t tok: tokens per query/target sequence, pad: padded width;\n"
          " pairs/s*: without collation; paper F: every matmul x3; trained F: frozen vision tower forward only,\n"
          " frozen LLM weights without weight gradient; exec F: trained F over padded widths, full-square\n"
          " attention; exec GF/s: exec F / model time without collation; faults, sys s: page faults and system\n"
          " CPU time per step)")

    print("\nwhere the time goes: ms per step (mean over reps), share of the step, GFLOP/s (exec count)")
    print(f"{'phase':<9}" + "".join(f"{f'K={k} ms':>10}{'%':>7}" for k in TURNS) + f"{'K7/K1':>7}"
          + "".join(f"{f'GF/s K={k}':>11}" for k in TURNS))
    fwd = {k: [forward_flops(arch, s, executed=True) for s in shapes[k]] for k in TURNS}
    recompute = 1.0 if args.grad_ckpt else 0.0

    def phase_flops(k: int, name: str) -> float:
        out = 0.0
        for f in fwd[k]:
            llm = f["lm_linear"] + f["lm_lora"] + f["lm_attn"]
            out += {"vision": f["vision_linear"] + f["vision_attn"] + f["merger"], "llm": llm,
                    "backward": f["lm_linear"] + 2 * f["lm_lora"] + 2 * f["lm_attn"] + recompute * llm}[name]
        return out

    for name in PHASES:
        ms = {k: 1e3 * statistics.mean(p[name] for p in phases[k]) for k in TURNS}
        share = {k: ms[k] / (1e3 * statistics.mean(step_t[k])) for k in TURNS}
        gf = ""
        if name in ("vision", "llm", "backward"):
            gf = "".join(f"{phase_flops(k, name) / max(sum(p[name] for p in phases[k]), 1e-9) / 1e9:>11.1f}"
                         for k in TURNS)
        print(f"{name:<9}" + "".join(f"{ms[k]:>10.1f}{share[k]:>7.1%}" for k in TURNS)
              + f"{ms[7] / max(ms[1], 1e-9):>7.2f}{gf}")
    print(f"{'total':<9}" + "".join(f"{1e3 * statistics.mean(step_t[k]):>10.1f}{1:>7.0%}" for k in TURNS)
          + f"{statistics.mean(step_t[7]) / statistics.mean(step_t[1]):>7.2f}")
    print("(vision: visual tower + merger forward; embed: input embedding incl. PEFT's trainable-token wrapper;\n"
          " llm: language_model forward, query + target; glue: rest of the forward (pixel normalisation, M-RoPE\n"
          " index, image scatter, pooling); backward: LLM only (the vision tower is frozen))")
    frozen = not any(p.requires_grad for p in unwrap_qwen2vl(backbone).visual.parameters())
    print(f"vision tower {'frozen' if frozen else 'trainable'}: {clock.vision_in_graph} of {clock.vision_calls} "
          f"vision forwards in the autograd graph (grad_ckpt={args.grad_ckpt})")
    if frozen and clock.vision_in_graph:
        print("WARNING: the frozen vision tower ran backward: the backward time above includes it")

    # ---------------------------------------------------------------- analytic
    rows = [(f"{args.preset} (r={lora_r}) @ bench", arch, shapes[1], shapes[7])]
    for name in ("cpu-2b-shape",):
        if name != args.preset:
            r = default_lora_r(name)
            rows.append((f"{name} (r={r}) @ bench", Arch.from_preset(preset_dims(name), r), shapes[1], shapes[7]))
    rows += [("2b (r=64) @ bench", arch2b, shapes[1], shapes[7]),
             ("2b (r=64) @ 690 vis tok (640x853)", arch2b, [s.canonical(2760) for s in shapes[1]],
              [s.canonical(2760) for s in shapes[7]])]
    print_split(rows)

    print("\npairs per FLOP, K=7 over K=1 (analytic, over the measured steps)")
    print(f"  {args.preset:<13} @ bench: paper x3 {flop_ratio:.2f}  trained {pair_ratio(arch, 'trained'):.2f}  "
          f"exec {pair_ratio(arch, 'trained', executed=True):.2f}")
    print(f"  {'2b':<13} @ bench: paper x3 {pair_ratio(arch2b, 'paper'):.2f}  "
          f"trained {pair_ratio(arch2b, 'trained'):.2f}")
    print(f"  {'2b':<13} @ 690:   paper x3 {pair_ratio(arch2b, 'paper', canonical=True):.2f}  "
          f"trained {pair_ratio(arch2b, 'trained', canonical=True):.2f}   (paper Tab. 5: 7 x 17.5 / 18.0 = 6.81)")
    per_1024 = {}
    for k in TURNS:
        fw = [forward_flops(arch2b, s.canonical(2760)) for s in shapes[k]]
        scale = 3 * 1024 / sum(len(s.patches) for s in shapes[k]) / 1e15
        per_1024[k] = (scale * sum(sum(f.values()) for f in fw),
                       scale * sum(sum(f.values()) - f["vision_attn"] for f in fw))
    print(f"  2b @ 690, PFLOPs per 1,024 images (x3): K=1 {per_1024[1][0]:.1f}, K=7 {per_1024[7][0]:.1f}; without "
          f"the vision-attention term K=1 {per_1024[1][1]:.1f}, K=7 {per_1024[7][1]:.1f} (Tab. 5: 17.5, 18.0)")

    exec_ratio = pair_ratio(arch, "trained", executed=True)
    print(f"\nmeasured pairs/s K=7 / K=1: {ratio:.2f} (median of per-rep pairs: "
          f"{', '.join(f'{x:.2f}' for x in paired)}); from summed times {ratio_sum:.2f}; "
          f"without collation {ratio_model:.2f}")
    verdict = "met" if ratio >= 0.9 * flop_ratio else "NOT met"
    print(f"target measured >= 0.9 x flop_ratio = {0.9 * flop_ratio:.2f}: {verdict} "
          f"(measured / flop_ratio {ratio / flop_ratio:.3f}; measured / exec ratio {ratio / exec_ratio:.3f})")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for k in TURNS:
            recs, ims, keys = batch_for(R)
            samples = make_samples(recs, ims, keys, k, args.seed, R)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(embedder, collator, samples, opt, clock, args.bf16, device)
            print(f"\ntorch.profiler, K={k}: top ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=44))

    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    peak, dev_name = peak_flops(device, args.peak_tflops)
    mfu = {}
    print(f"\nMFU on {dev_name} (peak bf16 {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}; model time, "
          f"no collation; attn={args.attn})")
    for k in TURNS:
        secs = sum(model_t[k])
        model_f = sum(step_flops(arch, s, "trained") for s in shapes[k])  # useful work: no recompute, no padding
        hw_f = sum(step_flops(arch, s, "trained", True, args.grad_ckpt) for s in shapes[k])
        mfu[k] = model_f / secs / peak if peak else None
        pct = (lambda x: f"{x:.1%}") if peak else (lambda x: "n/a")
        print(f"  K={k}: model {model_f / secs / 1e12:8.3g} TFLOP/s  MFU {pct(model_f / secs / (peak or 1))}   "
              f"exec+recompute {hw_f / secs / 1e12:8.3g} TFLOP/s  HFU {pct(hw_f / secs / (peak or 1))}")
    print(f"(total runtime {time.perf_counter() - start:.0f} s)")
    print("mfu " + " ".join(f"K={k}={mfu[k]:.1%}" if mfu[k] is not None else f"K={k}=n/a" for k in TURNS))
    print(f"ratio={ratio:.2f} flop_ratio={flop_ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
