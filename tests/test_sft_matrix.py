"""`peftlab matrix --methods lora,qlora`: identical settings, a real 4-bit model for qlora, one comparison table."""

from __future__ import annotations

import re

import bitsandbytes as bnb

from peftlab.runs import RunDir
from peftlab.tasks import sft


def test_matrix_runs_lora_and_qlora_and_compares_them(cli, fast_sets, runs_dir, monkeypatch):
    built = {}
    build = sft.build

    def spy(recipe, *args, **kwargs):
        built[recipe.method.name] = setup = build(recipe, *args, **kwargs)
        return setup

    monkeypatch.setattr(sft, "build", spy)
    code, lines = cli("matrix", "tiny-gemma2-dolly", "--methods", "lora,qlora", *fast_sets,
                      "--set", "train.max_steps=2", "--runs-dir", str(runs_dir), "--name", "m")
    assert code == 0, "\n".join(lines)

    def linear4bit(method: str) -> int:
        return sum(isinstance(m, bnb.nn.Linear4bit) for m in built[method].model.modules())

    assert linear4bit("qlora") >= 7 * 2  # every targeted projection of both layers is 4-bit
    assert linear4bit("lora") == 0
    summaries = {m: RunDir(runs_dir / f"m-{m}").summary() for m in ("lora", "qlora")}
    assert all(s["status"] == "completed" and s["steps"] == 2 for s in summaries.values())
    # Identical settings: the two resolved recipes differ in method.name only.
    configs = {m: (runs_dir / f"m-{m}" / "config.yaml").read_text() for m in ("lora", "qlora")}
    assert configs["lora"].replace("name: lora", "name: qlora", 1) == configs["qlora"]
    table = [line for line in lines if "m-lora" in line or "m-qlora" in line]
    assert any("m-lora" in line and "completed" in line for line in table)
    assert any("m-qlora" in line and "completed" in line for line in table)
    assert any(re.search(r"m-qlora vs m-lora: \d+\.\d+x (faster|slower), \d+\.\d% (more|less) memory", line)
               for line in lines)
    # issue 14 item 5: run n/N with the overall ETA, and every long phase of each run shows its progress
    runs = [line for line in lines if line.startswith("[run ")]
    assert len(runs) == 2 and runs[0] == "[run 1/2] m-lora  elapsed 0s  overall eta n/a"
    assert re.fullmatch(r"\[run 2/2\] m-qlora  elapsed \d+s  overall eta \d+s", runs[1]), runs
    assert re.fullmatch(r"\[runs\] 2/2 in \S+", next(line for line in lines if line.startswith("[runs]")))
    for done in ("tokenizing: done in", "loading the model preset:tiny-gemma2: done in", "train: done in",
                 "evaluating on validation: done in", "generating samples: done in"):
        assert sum(line.startswith(done) for line in lines) == 2, done  # once per run
    assert sum(line == "train 0/2 ..." for line in lines) == 2
    assert not any("\x1b" in line for line in lines)  # not a terminal: plain lines, no ANSI
