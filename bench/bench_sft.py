"""GPU benchmark of peftlab's SFT path: the gemma2-dolly recipe on preset:gemma-2-2b.

Same workload as ../shared/bench-hf/sft_gemma2.py (the plain Hugging Face reference): the real
google/gemma-2-2b architecture with random weights, Dolly-15k's real length distribution (peftlab
tokenizes the real bundled rows with the GPT-2 BPE, as the reference counted them), the seed settings
(batch 1, grad accumulation 8, max length 768, gradient checkpointing, bf16, r16/alpha32 on 7 targets).
Throughput is measured from metrics.jsonl (one record per optimizer step) after `--warmup` steps, like
the reference; peak memory is the CUDA allocator's peak over training (weights included).

    python bench/bench_sft.py --method lora --out $OUT/peftlab_lora.json
    python bench/bench_sft.py --method qlora --out $OUT/peftlab_qlora.json
CPU smoke test: python bench/bench_sft.py --tiny --steps 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftlab.cli import quiet_libraries
from peftlab.config import load_recipe
from peftlab.runner import run_recipe
from peftlab.runs import atomic_write_json, environment


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.source={'preset:tiny-gemma2' if args.tiny else 'preset:gemma-2-2b'}",
        f"method.name={args.method}",
        f"train.max_steps={args.warmup + args.steps}",
        "train.logging_steps=1",
        "train.eval_steps=null",
        "train.save_steps=null",
        "data.eval_max_samples=16",
        "eval.compare_base=false",
        "eval.max_new_tokens=8",
        *args.set,
    ]


def measure(records: list[dict], warmup: int) -> dict:
    """Rates over the steps after `warmup`, from the monitor's cumulative counters (bench_classify uses it too)."""
    train = [r for r in records if r.get("kind") == "train"]
    start, end = train[warmup - 1], train[-1]
    seconds = end["time"] - start["time"]
    steps = end["step"] - start["step"]
    samples = end["samples"] - start["samples"]
    padded = end["padded_tokens"] - start["padded_tokens"]
    return {
        "measured_steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 4),
        "samples_per_s": round(samples / seconds, 3),
        "tokens_per_s": round((end["tokens"] - start["tokens"]) / seconds, 1),
        "padded_tokens_per_s": round(padded / seconds, 1),
        "mean_padded_len": round(padded / samples, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["lora", "qlora"], default="lora")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override")
    ap.add_argument("--runs-dir", default="/tmp/peftlab-bench-runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    quiet_libraries()
    recipe = load_recipe("gemma2-dolly", overrides(args))
    run = run_recipe(recipe, Path(args.runs_dir), f"bench-{args.method}", overwrite=True, show_progress=False)
    summary = run.summary()
    result = {
        "name": f"peftlab_{args.method}",
        "recipe": "gemma2-dolly",
        "overrides": overrides(args),
        "environment": environment(),
        "metrics": {**measure(run.metrics(), args.warmup),
                    **{k: summary.get(k) for k in ("peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_mem_rss_gib")}},
        "summary": {k: summary.get(k) for k in ("runtime_s", "steps", "tokens_per_s", "samples_per_s", "final_train_loss",
                                                 "precision", "attn_implementation", "notes", "data")},
    }
    atomic_write_json(Path(args.out), result)
    print("RESULT", json.dumps(result["metrics"]))


if __name__ == "__main__":
    main()
