"""GPU benchmark of peftlab's diffusion path: the sd15-vangogh recipe on preset:sd15, LoRA vs QLoRA.

Same workload as ../shared/bench-hf/sd15_lora.py (the plain Hugging Face reference, experiment C): the SD 1.5
UNet (860M), VAE and CLIP ViT-L/14 text tower with random weights, 512 px, batch 1 x grad accumulation 4, lr 1e-4,
LoRA r16/alpha32/dropout 0.05 on to_k,to_q,to_v,to_out.0, bf16 through accelerate. Data: the bundled Van Gogh
images (upscaled to 512 px; speed does not depend on pixel values) and their captions. No sample grid (random
weights draw noise). Variants (--variant):

  lora               the original LoRA
  qlora              peftlab's QLoRA: nf4 UNet, k-bit prep 'lean' (dtypes kept), Linear4bit outputs in bf16
  qlora_peft_upcast  the original's QLoRA: peft's prepare_model_for_kbit_training (fp32 upcast), stock Linear4bit
  qlora_lean_stock   'lean' prep but stock Linear4bit outputs: isolates the fp32-activation effect
  lora_cache         LoRA with data.images.cache=true (latents + text embeddings once, VAE/text encoder off the GPU)
  qlora_cache        peftlab's QLoRA with the cache
  lora_fast          issue 15: the cache + diffusion.speed's defaults (measured micro-batch, channels_last, compiled
                     UNet with CUDA graphs, fused AdamW)
  qlora_fast         the same for QLoRA
  qlora_fast_eager   QLoRA fast without torch.compile (is bitsandbytes' 4-bit path faster compiled or not?)
  lora_plain         diffusers' loop as before issue 15: no cache, every diffusion.speed switch off
The variants before issue 15 (lora ... qlora_cache) now run with diffusion.speed's defaults unless lora_plain's
switches are added with --set.

Throughput: micro-steps/s (it/s, what the original printed) and images/s from metrics.jsonl (one record per
optimizer step) after --warmup optimizer steps; peak memory: the CUDA allocator's peak over training, weights
included. --explain needs no GPU: it counts the UNet's parameters by layer kind on the meta device and measures,
at SD 1.5's shapes, the activation bytes one feed-forward block saves for backward under bf16 autocast with an
nn.Linear, a stock Linear4bit and peftlab's cast (docs/diffusion-qlora-memory.md explains the figures).

    python bench/bench_diffusion.py --variant lora --out $OUT/peftlab_lora.json
    python bench/bench_diffusion.py --variant qlora --out $OUT/peftlab_qlora.json
    python bench/bench_diffusion.py --explain --out $OUT/explain.json
CPU smoke test: python bench/bench_diffusion.py --tiny --variant qlora --warmup 1 --steps 2 --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from peftlab.runs import atomic_write_json, environment

VARIANTS = {
    "lora": ["method.name=lora"],
    "qlora": ["method.name=qlora"],
    "qlora_peft_upcast": ["method.name=qlora", "method.quant.kbit_prep=peft", "diffusion.cast_4bit_outputs=false"],
    "qlora_lean_stock": ["method.name=qlora", "diffusion.cast_4bit_outputs=false"],
    "lora_cache": ["method.name=lora", "data.images.cache=true"],
    "qlora_cache": ["method.name=qlora", "data.images.cache=true"],
    "lora_fast": ["method.name=lora", "data.images.cache=true"],
    "qlora_fast": ["method.name=qlora", "data.images.cache=true"],
    "qlora_fast_eager": ["method.name=qlora", "data.images.cache=true", "diffusion.speed.compile=false"],
    "lora_plain": ["method.name=lora", "diffusion.speed.channels_last=false", "diffusion.speed.micro_batch=recipe",
                   "diffusion.speed.compile=false", "diffusion.speed.fused_optimizer=false"],
}
GIB = 1024**3


def overrides(args: argparse.Namespace) -> list[str]:
    base = [] if args.tiny else ["model.source=preset:sd15"]
    return [*base, *VARIANTS[args.variant], f"train.max_steps={args.warmup + args.steps}",
            f"train.logging_steps={args.log_every}", "eval.prompts=[]", *args.set]


def measure(records: list[dict], warmup: int) -> dict:
    """Rates between the record at optimizer step `warmup` and the last one (a log is a device sync: with
    --log-every > 1 the steps between two records run without one)."""
    train = [r for r in records if r.get("kind") == "train"]
    start, end = next(r for r in train if r["step"] == warmup), train[-1]
    seconds = end["time"] - start["time"]
    micro = end["micro_steps"] - start["micro_steps"]
    return {
        "measured_micro_steps": micro,
        "seconds": round(seconds, 3),
        "it_per_s": round(micro / seconds, 3),
        "images_per_s": round((end["samples"] - start["samples"]) / seconds, 3),
        "optimizer_steps_per_s": round((end["step"] - start["step"]) / seconds, 4),
    }


def bench(args: argparse.Namespace) -> dict:
    from peftlab.cli import quiet_libraries
    from peftlab.config import load_recipe
    from peftlab.runner import run_recipe

    quiet_libraries()
    recipe_name = "tiny-sd-vangogh" if args.tiny else "sd15-vangogh"
    recipe = load_recipe(recipe_name, overrides(args))
    run = run_recipe(recipe, Path(args.runs_dir), f"bench-{args.variant}", overwrite=True, show_progress=False)
    summary = run.summary()
    peaks = ("peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_mem_rss_gib")
    return {
        "name": f"peftlab_{args.variant}",
        "recipe": recipe_name,
        "overrides": overrides(args),
        "environment": environment(),
        "metrics": {**measure(run.metrics(), args.warmup), **{k: summary.get(k) for k in peaks}},
        "summary": {k: summary.get(k) for k in ("runtime_s", "steps", "it_per_s", "samples_per_s", "final_train_loss",
                                                 "precision", "notes", "unet", "latent_cache", "trainable_params", "speed",
                                                 "compile_cache", "compile", "attn_implementation")},
        "first_record_time_s": next(r["time"] for r in run.metrics() if r.get("kind") == "train"),
    }


# ---------------------------------------------------------------- --explain: where QLoRA's memory goes (CPU)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward, weights excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        module(x)
    return sum(seen.values())


def quantized_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The module with every nn.Linear replaced by bitsandbytes' nf4 Linear4bit (bf16 compute), as diffusers does."""
    import copy

    import bitsandbytes as bnb

    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4")
            q.load_state_dict(child.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, q.to("cpu"))
    return module


def explain(resolution: int) -> dict:
    """SD 1.5 UNet: parameters by kind, weight GiB per method, and the feed-forward activations per image."""
    from diffusers.models.attention import FeedForward

    from peftlab.models.diffusion import SD15_UNET, cast_4bit_outputs, meta_unet, param_breakdown, weight_forecast

    kinds = param_breakdown(meta_unet(SD15_UNET))
    side = resolution // 8
    # (latent tokens, channels, transformer blocks at that size: 2 down + 3 up, or the mid block's 1)
    levels = [(side**2, 320, 5), ((side // 2) ** 2, 640, 5), ((side // 4) ** 2, 1280, 5), ((side // 8) ** 2, 1280, 1)]
    per_level, totals = [], {"lora": 0, "qlora_stock": 0, "qlora_cast": 0}
    torch.manual_seed(0)
    for tokens, channels, blocks in levels:
        ff = FeedForward(channels, mult=4, activation_fn="geglu").to(torch.bfloat16).requires_grad_(False)  # frozen base
        stock = quantized_copy(ff)
        cast = quantized_copy(ff)
        cast_4bit_outputs(cast)
        # CUDA autocast runs LayerNorm in fp32, so the feed-forward's input is fp32 (and requires grad: LoRA upstream)
        x = torch.randn(1, tokens, channels, requires_grad=True)
        row = {"tokens": tokens, "channels": channels, "blocks": blocks,
               "lora": saved_bytes(ff, x), "qlora_stock": saved_bytes(stock, x), "qlora_cast": saved_bytes(cast, x)}
        per_level.append(row)
        for key in totals:
            totals[key] += row[key] * blocks
    return {
        "unet_params_by_kind": kinds,
        "unet_params_total": sum(kinds.values()),
        "unet_weight_gib_bf16": weight_forecast(kinds, 2),
        "resolution": resolution,
        "feedforward_saved_bytes_per_block": per_level,
        "feedforward_saved_gib_per_image": {k: round(v / GIB, 3) for k, v in totals.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=list(VARIANTS), default="lora")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps (of 4 micro-steps) left out of the timing")
    ap.add_argument("--steps", type=int, default=15, help="measured optimizer steps (60 micro-steps, as the reference)")
    ap.add_argument("--log-every", type=int, default=1, help="train.logging_steps; --warmup must be a multiple")
    ap.add_argument("--tiny", action="store_true", help="tiny-sd-vangogh on preset:tiny-sd (CPU smoke test)")
    ap.add_argument("--explain", action="store_true", help="parameter and activation accounting only (CPU)")
    ap.add_argument("--resolution", type=int, default=512, help="--explain: image size")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override")
    ap.add_argument("--runs-dir", default="/tmp/peftlab-bench-runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = {"name": "explain", **explain(args.resolution)} if args.explain else bench(args)
    atomic_write_json(Path(args.out), result)
    print("RESULT", json.dumps(result.get("metrics") or result["feedforward_saved_gib_per_image"]))


if __name__ == "__main__":
    main()
