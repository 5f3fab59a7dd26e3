"""Print the side-by-side table of a bench/run_gpu_sft.sh result folder (markdown)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("hf_seed_lora", "plain HF (trl SFTTrainer)", "lora"), ("peftlab_lora", "peftlab", "lora"),
        ("hf_seed_qlora", "plain HF (trl SFTTrainer)", "qlora"), ("peftlab_qlora", "peftlab", "qlora")]


def load(folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()).get("metrics", {}) if path.exists() else {}


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    folder = Path(sys.argv[1])
    print("| stack | method | opt steps/s | samples/s | non-pad tokens/s | peak alloc GiB | peak reserved GiB | steps measured |")
    print("|---|---|---|---|---|---|---|---|")
    for name, stack, method in ROWS:
        m = load(folder, name)
        print(f"| {stack} | {method} | {fmt(m.get('steps_per_s'), '.3f')} | {fmt(m.get('samples_per_s'), '.2f')} | "
              f"{fmt(m.get('tokens_per_s'), '.0f')} | {fmt(m.get('peak_mem_allocated_gib', m.get('peak_alloc_gib')), '.2f')} | "
              f"{fmt(m.get('peak_mem_reserved_gib', m.get('peak_reserved_gib')), '.2f')} | {fmt(m.get('measured_steps'), 'd')} |")


if __name__ == "__main__":
    main()
