"""Print the side-by-side table of a bench/run_gpu_classify.sh result folder (markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

from report_sft import fmt, load

ROWS = [(f"{stack}_{variant}_{method}" if stack == "hf" else f"peftlab_{method}_{variant}", stack, method, variant)
        for variant in ("seed", "tuned") for method in ("lora", "qlora") for stack in ("hf", "peftlab")]


def main() -> None:
    folder = Path(sys.argv[1])
    print("| stack | method | settings | steps/s | samples/s | padded tokens/s | real tokens/s | peak alloc GiB | "
          "peak reserved GiB | steps measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, stack, method, variant in ROWS:
        m = load(folder, name)
        print(f"| {'plain HF (Trainer)' if stack == 'hf' else 'peftlab'} | {method} | {variant} | "
              f"{fmt(m.get('steps_per_s'), '.3f')} | {fmt(m.get('samples_per_s'), '.1f')} | "
              f"{fmt(m.get('padded_tokens_per_s'), '.0f')} | {fmt(m.get('tokens_per_s'), '.0f')} | "
              f"{fmt(m.get('peak_mem_allocated_gib', m.get('peak_alloc_gib')), '.2f')} | "
              f"{fmt(m.get('peak_mem_reserved_gib', m.get('peak_reserved_gib')), '.2f')} | {fmt(m.get('measured_steps'), 'd')} |")


if __name__ == "__main__":
    main()
