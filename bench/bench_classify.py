"""GPU benchmark of peftlab's classification path: the dialogpt-banking77 recipe on preset:dialogpt-medium.

Same workload as ../shared/bench-hf/seqcls_gpt2.py (the plain Hugging Face reference, experiment B): the
microsoft/DialoGPT-medium architecture (GPT-2, 24 x 1024, 355M) with random weights, the real Banking77
training queries tokenized with GPT-2's BPE (median 11, mean 13.8 tokens), 77 labels, and the original
settings of the recipe: batch 16, every query padded to 128, fp16, LoRA r16/alpha32/dropout 0.1 on
c_attn,c_proj with the `score` head trained, paged 8-bit AdamW, no gradient checkpointing; QLoRA = nf4 + double
quant, fp16 compute, peft's k-bit prep, which turned gradient checkpointing on. One difference from the reference: peftlab loads the
frozen weights in the compute dtype (fp16) instead of fp32 under fp16 autocast.

Throughput is measured from metrics.jsonl (one record per optimizer step) after `--warmup` steps:
samples/s, real (attention-mask) and padded tokens/s. Peak memory is the CUDA allocator's peak over
training, weights included. No validation or test pass runs (the measurement is training speed).

    python bench/bench_classify.py --method lora --out $OUT/classify_lora.json --steps 60
    python bench/bench_classify.py --method qlora --out $OUT/classify_qlora.json --steps 60
    python bench/bench_classify.py --method lora --variant tuned --out $OUT/classify_lora_tuned.json
    python bench/bench_classify.py --method lora --variant fast --steps 600 --set train.logging_steps=20 --out ...
CPU smoke test: python bench/bench_classify.py --tiny --warmup 1 --steps 2 --out /tmp/classify.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_sft import measure

from peftlab.cli import quiet_libraries
from peftlab.config import load_recipe
from peftlab.runner import run_recipe
from peftlab.runs import atomic_write_json, environment

# "seed" = the recipe as the original ran it; "tuned" = what bench-hf's tuned rows change with stock options:
# dynamic padding, bf16, no gradient checkpointing, dtypes kept by the k-bit prep.
VARIANTS = {
    "seed": [],
    "tuned": ["data.classify.padding=longest", "train.precision=bf16", "method.quant.compute_dtype=bf16",
              "train.gradient_checkpointing=false", "method.quant.kbit_prep=lean"],
}
# "fast" = tuned on the fast engine (issue 11), which runs fused AdamW in place of the recipe's paged 8-bit AdamW.
VARIANTS["fast"] = [*VARIANTS["tuned"], "train.engine=fast", "train.optimizer=adamw_torch"]
SUMMARY_KEYS = ("runtime_s", "steps", "samples_per_s", "tokens_per_s", "padded_tokens_per_s", "final_train_loss",
                "precision", "attn_implementation", "notes", "data")
MEMORY_KEYS = ("peak_mem_allocated_gib", "peak_mem_reserved_gib", "peak_mem_rss_gib")


def overrides(args: argparse.Namespace) -> list[str]:
    tiny = ["model.source=preset:tiny-gpt2", "train.precision=fp32"]  # a CPU has no fp16 autocast
    return [
        *(tiny if args.tiny else ["model.source=preset:dialogpt-medium"]),
        f"method.name={args.method}",
        # In the original, gradient checkpointing came from peft's k-bit prep, i.e. with QLoRA only (as in bench-hf B1)
        *(["train.gradient_checkpointing=false"] if args.method == "lora" else []),
        f"train.max_steps={args.warmup + args.steps}",
        "train.logging_steps=1",
        "train.eval_steps=null",
        "train.save_steps=null",
        "train.best_metric=null",
        "data.eval_fraction=0",  # training speed only: no validation split, no test pass
        "data.classify.test=null",
        *VARIANTS[args.variant],
        *args.set,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["lora", "qlora"], default="lora")
    ap.add_argument("--variant", choices=list(VARIANTS), default="seed")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tiny", action="store_true", help="preset:tiny-gpt2, for a CPU smoke test")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override, e.g. train.batch_size=128")
    ap.add_argument("--runs-dir", default="/tmp/peftlab-bench-runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    quiet_libraries()
    name = f"peftlab_classify_{args.method}_{args.variant}"
    recipe = load_recipe("dialogpt-banking77", overrides(args))
    run = run_recipe(recipe, Path(args.runs_dir), name, overwrite=True, show_progress=False)
    summary = run.summary()
    result = {
        "name": name,
        "recipe": "dialogpt-banking77",
        "overrides": overrides(args),
        "environment": environment(),
        "metrics": {**measure(run.metrics(), args.warmup), **{k: summary.get(k) for k in MEMORY_KEYS}},
        "summary": {k: summary.get(k) for k in SUMMARY_KEYS},
    }
    atomic_write_json(Path(args.out), result)
    print("RESULT", json.dumps(result["metrics"]))


if __name__ == "__main__":
    main()
