"""GPU benchmark of the fast engine's step: gemma2-dolly (batch 1 x grad accumulation 8, max length 768, LoRA
r16/alpha32/dropout 0.05 on q,k,v,o,gate,up,down, lr 2e-4 cosine) on preset:gemma-2-2b at Dolly lengths.

Workload = the reference's (../shared/bench-hf/sft_gemma2.py): Dolly-15k lengths from its data/sft_lengths.json
truncated at 768, BOS + random ids, every token trained; the random weights of the real architecture. The
recipe's optimizer step (8 rows) is kept and executed as packed rows of the planner's token budget
(engines/fast/planner.py); `--rows-per-step` changes the step (the "planner's batch" variant, not the recipe).
Measured: `--warmup` optimizer steps (the first compiles; its time is reported as compile_s), then `--steps`
steps timed with one device sync at each end (no sync per step, as in training). MFU: engines/fast/flops.py,
the reference's formula, / 989.4 TFLOP/s. `--reference FILE ...` folds the reference's JSON results in and
writes the ratios.

    python bench/bench_fast.py --out $OUT/fast.json --reference $OUT/hf_seed_lora.json $OUT/hf_tuned_lora.json
CPU smoke test: python bench/bench_fast.py --tiny --warmup 1 --steps 2 --out /tmp/fast.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from peftlab.config import LoraSettings, ModelConfig, QuantSettings, TrainConfig
from peftlab.engines.fast import FastLoop, FastModel, LoopSettings, PackedBatch, pack_step
from peftlab.engines.fast.compile import CompileCache, cache_key, compile_layers, compile_loss_core
from peftlab.engines.fast.flops import PEAK_FLOPS, model_flops
from peftlab.engines.fast.planner import plan, trial_peak_gib
from peftlab.models import adapt, loader
from peftlab.runs import atomic_write_json

GIB = 1024**3
MAX_LENGTH = 768
LENGTHS = Path(__file__).resolve().parent.parent / ".bench-hf" / "data" / "sft_lengths.json"


class Counter:
    """StepHooks: token counts of the consumed micro-batches (host ints, no sync)."""

    def __init__(self) -> None:
        self.tokens = self.sum_sq = self.rows = self.micro_batches = self.padded = 0

    def on_micro_batch(self, batch: PackedBatch) -> None:
        self.tokens += batch.tokens
        self.sum_sq += batch.sum_sq
        self.rows += batch.documents
        self.micro_batches += 1
        self.padded += batch.budget

    def on_log(self, record: dict[str, float]) -> None:
        pass

    def on_step_end(self, step: int) -> bool:
        return False


def dolly_rows(n: int, vocab: int, lengths_file: Path, seed: int = 0) -> list[dict]:
    """As the reference's make_dataset: lengths drawn from Dolly's, truncated at 768, BOS (2) + random ids."""
    lengths = json.loads(lengths_file.read_text())["lengths"] if lengths_file.is_file() else [113, 387, 60, 768]
    rng = np.random.default_rng(seed)
    rows = []
    for n_tokens in np.minimum(rng.choice(lengths, size=n), MAX_LENGTH):
        ids = [2] + rng.integers(4, vocab, size=int(n_tokens) - 1).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def build(tiny: bool, device: torch.device, qlora: bool = False) -> tuple[FastModel, float]:
    """The recipe's model: random weights of the architecture; qlora: the preset's weights loaded in 4 bits as
    the qlora method loads them (bitsandbytes NF4, double quantization, compute dtype = precision, lean k-bit
    preparation)."""
    source = ModelConfig(source="preset:tiny-gemma2" if tiny else "preset:gemma-2-2b")
    config = loader.load_model_config(source)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if qlora:
        quant = adapt.bnb_quantization_config(QuantSettings(), compute_dtype=dtype)
        model = loader.load_causal_lm(source, dtype, "eager", quantization_config=quant)
        adapt.prepare_kbit(model, "lean", gradient_checkpointing=False)
    else:
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    peft_model = adapt.apply_lora(model, LoraSettings())  # the recipe's LoRA: r16/alpha32/dropout 0.05, 7 targets
    builder = torch.compile(create_block_mask(), dynamic=False) if device.type == "cuda" else None
    fast = FastModel(peft_model, "sft", "bf16" if device.type == "cuda" else "fp32", ce_chunk=2048,
                     mask_builder=builder)
    return fast, time.perf_counter() - t0


def create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask as builder

    return builder


def say(line: str) -> None:
    print(line, flush=True)


def timed_step(loop: FastLoop, micro: list[PackedBatch], hooks: Counter, sync: bool) -> float:
    t0 = time.perf_counter()
    loop.step(micro, hooks)
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> tuple[dict, tuple[FastModel, TrainConfig, FastLoop, list]]:
    """The measured run -> (its result, what the optional extras (profile, graphs vs eager) reuse)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast, init_s = build(args.tiny, device, args.qlora)
    n_steps = args.warmup + args.steps + 64
    rows = dolly_rows(n_steps * args.rows_per_step, fast.config.vocab_size, Path(args.lengths))
    steps = [rows[i:i + args.rows_per_step] for i in range(0, len(rows), args.rows_per_step)]
    device_gib = torch.cuda.get_device_properties(0).total_memory / GIB if device.type == "cuda" else None
    sample = steps[-64:]
    preferred = plan(sample, "sft", batch_size=1, max_length=MAX_LENGTH)  # padding only: the usual plan
    cache = CompileCache(cache_key(fast, preferred.budget, False, preferred.sizes))
    cache_hit = cache.load() if args.compile else False
    if args.compile:  # before planning: the planner's first trial step is the compile
        backend = "inductor" if device.type == "cuda" else "aot_eager"
        compile_layers(fast, mode=args.compile_mode, backend=backend)
        compile_loss_core(fast, backend=backend)
    t0 = time.perf_counter()
    chosen = plan(sample, "sft", batch_size=1, max_length=MAX_LENGTH,
                  trial_peak_gib=trial_peak_gib(fast, "sft", MAX_LENGTH) if device.type == "cuda" else None,
                  memory_limit_gib=args.memory_limit_gib, device_gib=device_gib,
                  held_gib=torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None)
    plan_s = time.perf_counter() - t0
    say(f"init {init_s:.1f}s; plan (with the compile of its trial shapes) {plan_s:.1f}s: {chosen.describe()}")
    budget = args.budget or chosen.budget
    sizes = () if args.budget or not args.row_sizes else chosen.sizes
    checkpointing = chosen.gradient_checkpointing if not args.budget else False
    fast.set_checkpointing(checkpointing)
    train = TrainConfig(lr=2e-4, scheduler="cosine", warmup_ratio=0.03)
    graphs = args.cuda_graphs and device.type == "cuda" and not checkpointing
    loop = FastLoop(fast, LoopSettings.from_train_config(train, total_steps=n_steps), cuda_graphs=graphs)
    packed = [[b.pin_memory() if device.type == "cuda" else b for b in pack_step(s, budget, "sft", 1, sizes=sizes)]
              for s in steps[:args.warmup + args.steps]]
    fast.peft_model.train()
    hooks = Counter()
    warm = [timed_step(loop, packed[i], hooks, sync=True) for i in range(args.warmup)]
    say(f"warm-up steps (the first compiles): {[round(w, 2) for w in warm]} s")
    saved = cache.save() if args.compile else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hooks = Counter()
    t0 = time.perf_counter()
    for micro in packed[args.warmup:]:
        loop.step(micro, hooks)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    flops = model_flops(fast.config, hooks.tokens, hooks.sum_sq, checkpointing)
    result = {
        "name": args.name, "recipe": "gemma2-dolly", "model": "preset:tiny-gemma2" if args.tiny else "preset:gemma-2-2b",
        "method": "qlora" if args.qlora else "lora", "rows_per_step": args.rows_per_step, "compile": args.compile,
        "plan": chosen.as_dict() | {"describe": chosen.describe()},
        "budget": budget, "row_sizes": list(sizes), "gradient_checkpointing": checkpointing,
        "cuda_graphs": graphs, "graph_failure": loop.graph_failure,
        "metrics": {
            "measured_steps": args.steps, "seconds": round(seconds, 3),
            "steps_per_s": round(args.steps / seconds, 3), "samples_per_s": round(hooks.rows / seconds, 2),
            "tokens_per_s": round(hooks.tokens / seconds, 1), "mfu": round(flops / seconds / PEAK_FLOPS, 4),
            "model_tflops_per_s": round(flops / seconds / 1e12, 2),
            "padding_fraction": round(1 - hooks.tokens / hooks.padded, 4),
            "micro_batches_per_step": round(hooks.micro_batches / args.steps, 2),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if device.type == "cuda" else None,
        },
        "startup": {"init_s": round(init_s, 1), "plan_and_trial_compile_s": round(plan_s, 1),
                    "warmup_step_s": [round(x, 2) for x in warm],
                    "compile_s": round(plan_s + warm[0] - float(np.median(warm[1:] or warm)), 1),
                    "compile_cache": {"hit": cache_hit, "saved": saved}},
        "flops_model": "engines/fast/flops.py (= bench-hf sft_gemma2.model_flops)",
    }
    return result, (fast, train, loop, packed)


def graph_equality(fast: FastModel, train: TrainConfig, packed: list[list[PackedBatch]], n: int) -> dict:
    """The first `n` optimizer-step losses from the same LoRA weights with CUDA graphs and eagerly (the same
    compiled kernels either way), LoRA dropout off in both (a capture's warm-up runs draw random numbers, so with
    dropout the two runs would see different masks). -> the losses and their largest relative difference."""
    for module in fast.peft_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    start = {name: p.detach().clone() for name, p in fast.trainable_parameters()}
    losses = {}
    for graphs in (True, False):
        with torch.no_grad():
            for name, p in fast.trainable_parameters():
                p.copy_(start[name])
        loop = FastLoop(fast, LoopSettings.from_train_config(train, total_steps=n), cuda_graphs=graphs)
        losses[graphs] = [loop.step(micro, Counter())[0].item() for micro in packed[:n]]
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True))
    return {"steps": n, "graphs": losses[True], "eager": losses[False], "max_rel_diff": diff}


def profiled(loop: FastLoop, packed: list[list[PackedBatch]], args: argparse.Namespace) -> dict:
    """torch.profiler over `packed` steps (already compiled shapes): the wall time per step (the profiler slows the
    host) against the GPU's busy time (the kernels' own times; one stream), the top kernels/ops by device time in
    `<out>.profile.txt`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    hooks = Counter()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for micro in packed:
            loop.step(micro, hooks)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    # device-side events only: an op (aten::mm) or a kernel's launch record carries its kernels' time again
    device_events = [e for e in events if e.device_type.name == "CUDA"]
    busy_us = sum(e.self_device_time_total for e in device_events)
    kernels = sum(e.count for e in device_events)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=40, max_name_column_width=70)
    Path(args.out).with_suffix(".profile.txt").write_text(
        f"{len(packed)} optimizer steps, {args.rows_per_step} rows each; wall {wall:.3f} s, GPU busy "
        f"{busy_us / 1e6:.3f} s\n{table}\n")
    return {"steps": len(packed), "wall_s_per_step": round(wall / len(packed), 4),
            "gpu_busy_s_per_step": round(busy_us / 1e6 / len(packed), 4),
            "gpu_busy_fraction": round(busy_us / 1e6 / wall, 3), "kernels_per_step": round(kernels / len(packed), 1)}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "accelerate", "trl"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def with_references(result: dict, files: list[str]) -> dict:
    """Add the reference runs (bench-hf JSON) and the ratios fast / reference of tokens/s and MFU."""
    refs = {}
    for file in files:
        path = Path(file)
        if path.is_file():
            ref = json.loads(path.read_text())
            refs[ref.get("name", path.stem)] = {"status": ref.get("status"), "args": ref.get("args"),
                                                **{k: (ref.get("metrics") or {}).get(k) for k in
                                                   ("tokens_per_s", "mfu", "samples_per_s", "peak_alloc_gib",
                                                    "measured_steps")}}
        else:
            refs[path.stem] = {"status": "missing"}
    result["reference"] = refs
    ours = result["metrics"]
    result["ratios"] = {name: {"tokens_per_s": round(ours["tokens_per_s"] / r["tokens_per_s"], 2),
                               "mfu": round(ours["mfu"] / r["mfu"], 2) if r.get("mfu") else None}
                        for name, r in refs.items() if r.get("tokens_per_s")}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="fast_lora")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows-per-step", type=int, default=8, help="the recipe's batch 1 x grad accumulation 8")
    ap.add_argument("--budget", type=int, default=None, help="tokens per micro-batch (default: the planner's)")
    ap.add_argument("--row-sizes", action=argparse.BooleanOptionalAction, default=True,
                    help="cut packed rows to the planner's smaller size when they fit (--no-row-sizes: one shape)")
    ap.add_argument("--memory-limit-gib", type=float, default=None, help="train.memory_limit_gib for the planner")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the layers (e.g. reduce-overhead)")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="replay each micro-step as a CUDA graph (engines/fast/graphs.py)")
    ap.add_argument("--compare-eager", type=int, default=0,
                    help="then this many steps with graphs and eagerly from the same weights, dropout off")
    ap.add_argument("--profile", type=int, default=0, help="then profile this many steps (<out>.profile.txt)")
    ap.add_argument("--qlora", action="store_true", help="the 4-bit base of method qlora (bitsandbytes NF4)")
    ap.add_argument("--tiny", action="store_true", help="tiny-gemma2 on the CPU (smoke test)")
    ap.add_argument("--lengths", default=str(LENGTHS))
    ap.add_argument("--reference", nargs="*", default=[], help="bench-hf result JSON files to compare with")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("PEFTLAB_CACHE", "/tmp/peftlab-cache")
    measured, (fast, train, loop, packed) = run(args)
    result = with_references({"device": versions().get("gpu", "cpu"), "versions": versions(), **measured},
                             args.reference)
    atomic_write_json(Path(args.out), result)  # now: the extras below may run into the caller's time limit
    print("RESULT", json.dumps({"name": args.name, **result["metrics"], **result["startup"], "ratios": result["ratios"]}))
    if args.profile:
        result["profile"] = profiled(loop, packed[args.warmup:args.warmup + args.profile], args)
        atomic_write_json(Path(args.out), result)
    if args.compare_eager and result["cuda_graphs"]:  # last: switching dropout off recompiles the layers
        result["graphs_vs_eager"] = graph_equality(fast, train, packed, args.compare_eager)
        atomic_write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
