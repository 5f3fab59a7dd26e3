"""Per-run JSON and the scaling table of bench/run_gpu_multi.sh: tokens/s on 1 and 2 GPUs (DDP, FSDP), scaling
efficiency = tokens/s(2 GPUs) / (2 x tokens/s(1 GPU)) (weak scaling: the per-GPU batch stays the same), peak
memory per rank.

    python bench/report_multi.py RUNS_DIR OUT_DIR [--warmup 3]

Run folders are named SETTINGS-METHOD-NG[-STRATEGY] (e.g. tuned-qlora-2g-fsdp); tokens/s comes from the
run's metrics.jsonl (non-padding tokens summed over ranks, per optimizer step after the warmup steps), as
bench_sft.py measures it. Fast-engine runs (settings `fast`) also carry the summary's steady-state tokens/s (every
rank's tokens over the steps that compiled nothing) and per-GPU MFU; their scaling efficiency uses the steady rate,
as a step that compiles a second row shape may come after the warmup.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bench_sft import measure

from peftlab.runs import atomic_write_json, read_jsonl

NAME = re.compile(r"^(?P<settings>\w+)-(?P<method>q?lora)-(?P<gpus>\d+)g(?:-(?P<strategy>\w+))?$")


def peaks(summary: dict) -> list[float | None]:
    """Peak memory per rank in GiB: the CUDA allocator's peak on GPUs, the resident set on CPUs."""
    ranks = summary.get("peak_mem_per_rank") or [summary]
    return [r.get("peak_mem_allocated_gib", r.get("peak_mem_rss_gib")) for r in ranks]


def result(folder: Path, warmup: int) -> dict | None:
    match = NAME.match(folder.name)
    if not match or not (folder / "summary.json").is_file():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    train = [r for r in read_jsonl(folder / "metrics.jsonl") if r.get("kind") == "train"]
    metrics = measure(train, warmup) if len(train) > warmup else {}
    return {**match.groupdict(), "gpus": int(match["gpus"]), "strategy": match["strategy"] or "single",
            "run": folder.name, "status": summary.get("status"), "reason": summary.get("reason"),
            "world_size": summary.get("world_size", 1), "steps": summary.get("steps"), "metrics": metrics,
            "engine": summary.get("engine"), "steady_tokens_per_s": summary.get("steady_tokens_per_s"),
            "mfu": summary.get("mfu"), "compile_s": summary.get("compile_s"),
            "peak_gib_per_rank": peaks(summary), "environment": summary.get("environment")}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: list[dict]) -> list[str]:
    by = {(r["settings"], r["method"], r["gpus"], r["strategy"]): r for r in results}
    rate = {k: r["steady_tokens_per_s"] or r["metrics"].get("tokens_per_s") for k, r in by.items()}
    lines = ["| settings | method | GPUs | strategy | status | tokens/s | steady tokens/s | MFU per GPU | "
             "scaling efficiency | peak GiB per rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (settings, method, gpus, strategy), r in sorted(by.items()):
        one = rate.get((settings, method, 1, "single"))
        mine = rate[(settings, method, gpus, strategy)]
        eff = mine / (gpus * one) if gpus > 1 and mine and one else None
        mem = ", ".join(fmt(p, ".2f") for p in r["peak_gib_per_rank"])
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"| {settings} | {method} | {gpus} | {strategy} | {r['status']} | "
                     f"{fmt(r['metrics'].get('tokens_per_s'), '.0f')} | {fmt(r['steady_tokens_per_s'], '.0f')} | "
                     f"{fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | "
                     f"{fmt(None if eff is None else 100 * eff, '.1f')}{'%' if eff is not None else ''} | {mem} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    results = [r for f in sorted(args.runs.iterdir()) if f.is_dir() and (r := result(f, args.warmup))]
    for r in results:
        atomic_write_json(args.out / f"{r['run']}.json", r)
    lines = table(results)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
