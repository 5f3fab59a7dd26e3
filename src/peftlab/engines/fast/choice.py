"""`train.engine: auto` weighs the fast engine's cold compile against the length of the run.

The fast engine's steps are many times the hf engine's, but its first step waits for torch.compile (and the
planner's trial): minutes on a cold compile cache, seconds on a warm one (bench/README.md, Issue 11). A run
shorter than that compile finishes sooner on the hf engine, so `auto` takes hf for it and says so in one line;
with the compile cache warm, or a run longer than the compile, it takes fast. `train.engine: fast` never weighs.

Constants (H200 measurements in bench/README.md; rough on other GPUs, which is all a choice between minutes and
seconds needs):
  * COLD_COMPILE_S: gemma-2-2b (preset), the gemma2-dolly recipe's 8-row step on an empty compile cache, three row
    shapes (the planner's budget, 3/4 and 1/2 of it), CUDA graphs: the planner's trial with the first shape's
    compile 49.1 s, the two other shapes' compiles and captures 46.1 s and 48.2 s: 143 s in the engine
    ("Issue 11, fourth pass"); with two shapes, 149.4 s from launch to the first step, about 25 s of it before the
    engine ("Issue 11, second pass"). Gemma 3 270M: 100.9 s ("third pass").
  * HF_PARAM_TOKENS_PER_S: the hf engine's non-padding tokens/s times the model's parameter count, about constant
    across sizes as a step's work is about 6 x parameters x tokens: Gemma 3 270M (271.9M parameters) 3,595
    tokens/s = 9.8e11; gemma-2-2b (2.61B) 260 tokens/s through the CLI = 6.8e11 and 373 tokens/s in the plain
    stack's reference = 9.7e11. The higher value is taken: it counts a short run as short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

COLD_COMPILE_S = 145.0
HF_PARAM_TOKENS_PER_S = 9.8e11


def hf_seconds(total_tokens: int, parameters: int) -> float:
    """Expected training seconds of the hf engine: total_tokens (non-padding, the whole run) x parameters /
    HF_PARAM_TOKENS_PER_S."""
    return total_tokens * parameters / HF_PARAM_TOKENS_PER_S


def weigh_compile(cache_hit: bool, total_tokens: int, parameters: int) -> str | None:
    """Why `auto` should run hf instead of fast (the line's text), or None for fast.

    cache_hit: the compile cache of this job's shapes is on disk; total_tokens: non-padding tokens the run trains;
    parameters: the model's parameter count. hf when the cache misses and the hf run would take less than a cold
    compile (constants in the module docstring)."""
    run_s = hf_seconds(total_tokens, parameters)
    if cache_hit or run_s >= COLD_COMPILE_S:
        return None
    return (f"the fast engine's cold compile (~{COLD_COMPILE_S:.0f} s) exceeds this run (~{run_s:.0f} s); "
            "train.engine=fast forces it")


def run_tokens(dataset: Sequence[Mapping[str, Any]], steps: int, rows_per_step: int) -> int:
    """Non-padding tokens of a run of `steps` optimizer steps of `rows_per_step` rows: the mean row length of
    `dataset` (rows with input_ids) times the rows trained."""
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else [row["input_ids"] for row in dataset]
    lengths = [len(ids) for ids in column]  # a datasets column: one read, not a Python loop over rows
    return round(sum(lengths) / max(len(lengths), 1) * steps * rows_per_step)
