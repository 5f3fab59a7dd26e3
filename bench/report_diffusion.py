"""Print the side-by-side table of a bench/run_gpu_diffusion.sh result folder (markdown)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from report_sft import fmt

ROWS = [
    ("C1_seed_lora", "plain HF", "LoRA"),
    ("peftlab_lora", "peftlab", "LoRA"),
    ("C2_seed_qlora", "plain HF", "QLoRA, peft k-bit prep (fp32 upcast)"),
    ("peftlab_qlora_peft_upcast", "peftlab", "QLoRA, kbit_prep=peft, stock Linear4bit"),
    ("C3_seed_qlora_no_kbit_prep", "plain HF", "QLoRA, no k-bit prep"),
    ("peftlab_qlora_lean_stock", "peftlab", "QLoRA, kbit_prep=lean, stock Linear4bit"),
    ("peftlab_qlora", "peftlab", "QLoRA (default: lean + bf16 Linear4bit outputs)"),
    ("peftlab_lora_cache", "peftlab", "LoRA + latent cache"),
    ("peftlab_qlora_cache", "peftlab", "QLoRA + latent cache"),
    ("C4_tuned_lora_bs4", "plain HF", "LoRA bs4 x GA1"),
    ("peftlab_lora_bs4", "peftlab", "LoRA bs4 x GA1"),
    ("C5_tuned_qlora_bs4_no_kbit_prep", "plain HF", "QLoRA bs4 x GA1, no k-bit prep"),
    ("peftlab_qlora_bs4", "peftlab", "QLoRA bs4 x GA1"),
    ("peftlab_lora_fast", "peftlab", "LoRA fast (issue 15), the recipe's bs1 x GA4"),
    ("peftlab_qlora_fast", "peftlab", "QLoRA fast (issue 15), the recipe's bs1 x GA4"),
    ("peftlab_qlora_fast_eager", "peftlab", "QLoRA fast without compile, bs1 x GA4"),
    ("peftlab_lora_fast_bs16", "peftlab", "LoRA fast, bs16 x GA1"),
    ("peftlab_qlora_fast_warm", "peftlab", "QLoRA fast, warm compile cache, bs1 x GA4"),
]


def main() -> None:
    folder = Path(sys.argv[1])
    print("| stack | run | it/s | images/s | peak alloc GiB | peak reserved GiB | micro-steps measured |")
    print("|---|---|---|---|---|---|---|")
    for name, stack, what in ROWS:
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text()).get("metrics", {})
        micro = m.get("measured_micro_steps")
        print(f"| {stack} | {what} | {fmt(m.get('it_per_s'), '.2f')} | {fmt(m.get('images_per_s'), '.2f')} | "
              f"{fmt(m.get('peak_mem_allocated_gib', m.get('peak_alloc_gib')), '.2f')} | "
              f"{fmt(m.get('peak_mem_reserved_gib', m.get('peak_reserved_gib')), '.2f')} | "
              f"{fmt(micro, 'd') if micro is not None else 'n/a'} |")
    compiled = [(what, json.loads((folder / f"{name}.json").read_text())) for name, _, what in ROWS
                if (folder / f"{name}.json").exists()]
    compiled = [(what, r) for what, r in compiled if (r.get("summary") or {}).get("compile")]
    if compiled:
        print("\n| peftlab run | s to the first record (compile included) | graphs | graph breaks | CUDA-graph skips |")
        print("|---|---|---|---|---|")
        for what, r in compiled:
            c = r["summary"]["compile"]
            print(f"| {what} | {fmt(r.get('first_record_time_s'), '.1f')} | {c['graphs']} | {c['graph_breaks']} | "
                  f"{c['cudagraph_skips']} |")
    explain = folder / "explain.json"
    if explain.exists():
        e = json.loads(explain.read_text())
        print(f"\nfeed-forward activations saved per {e['resolution']} px image (GiB): {e['feedforward_saved_gib_per_image']}")
        print(f"UNet weights (GiB): {e['unet_weight_gib_bf16']}")


if __name__ == "__main__":
    main()
