"""SFT of a causal LM with LoRA/QLoRA on instruction or conversation data (declared in sft_task.py).

`build` turns a recipe into a ready model + data; `prepare` / `save` / `finish` are this task's part of
the training skeleton (training.py), an engine runs the loop (the hf engine: trl's SFTTrainer). The tiny
CPU twin and the GPU run differ only in the recipe.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.config import Recipe
from peftlab.data.conversations import DataFormat, build_sft_data, generation_prompt_ids
from peftlab.data.instructions import IGNORE_INDEX, InstructionData, adds_bos
from peftlab.distributed import root_unsharded, shards_weights
from peftlab.engines import EngineResult, TrainJob
from peftlab.models import adapt, loader
from peftlab.models.base import trained_base
from peftlab.models.memory import GIB, estimate_memory
from peftlab.runs import RunDir, atomic_write_text
from peftlab.tasks.base import Exported, Prepared
from peftlab.tasks.common import Checkup, announce, run_context, save_adapter
from peftlab.watch.console import say
from peftlab.watch.guard import RunContext
from peftlab.watch.progress import phase

# Real data has a long tail (Dolly at the seed's 768 tokens: ~2% of prompts alone fill it, ~4% are cut):
# a few such rows are normal, this many means max_length is wrong for the data.
MAX_DROPPED_RATE = 0.05
MAX_TRUNCATION_RATE = 0.2
# A response-less row trains only the end-of-sequence token: a few are noise, many teach the model to stop at once.
MAX_EMPTY_RATE = 0.05


@dataclass
class SftSetup:
    model: Any  # a PeftModel
    tokenizer: Any
    data: InstructionData
    context: RunContext
    params: adapt.ParamCount
    notes: list[str] = field(default_factory=list)
    data_format: DataFormat | None = None


def build(recipe: Recipe, data: bool = True) -> SftSetup:
    from transformers import set_seed

    set_seed(recipe.seed)
    context = run_context(recipe)
    tokenizer = loader.load_tokenizer(recipe.model)
    # The data sets the chat template on the tokenizer (saved with the adapter) for conversation formats.
    instruction_data, data_format, data_notes = build_sft_data(recipe.data, tokenizer, recipe.seed) if data else (
        None, None, [])
    model, notes = _load_adapted_model(recipe)
    model.config.pad_token_id = tokenizer.pad_token_id
    notes += loader.tokenizer_notes(recipe.model) + data_notes
    return SftSetup(model, tokenizer, instruction_data, context, adapt.count_params(model), notes, data_format)


def _load_adapted_model(recipe: Recipe) -> tuple[Any, list[str]]:
    model, notes = trained_base(recipe, loader.load_causal_lm, shards_weights=shards_weights())
    return adapt.apply_lora(model, recipe.method.lora), notes


def prepare(recipe: Recipe, run: RunDir) -> Prepared:
    """Model and data for the training skeleton, with the memory estimate recorded before training."""
    setup = build(recipe)
    _announce(recipe, setup)
    t = recipe.train
    estimate = estimate_memory(setup.model, t.batch_size, recipe.data.max_length, t.gradient_checkpointing,
                               4 if setup.context.precision == "fp32" else 2)
    job = TrainJob(setup.model, setup.tokenizer, setup.data.train, setup.data.eval, "causal_lm", t, recipe.seed,
                   setup.context.precision, run.checkpoints_path, max_length=recipe.data.max_length)
    summary = dict(data=setup.data.stats.as_dict(), data_format=setup.data_format.as_dict(),
                   precision=setup.context.precision,
                   attn_implementation=setup.context.attn_implementation, notes=setup.notes,
                   memory_estimate={**asdict(estimate), "total_gib": estimate.total_gib})
    return Prepared(recipe, job, setup, setup.context, summary)


def save(run: RunDir, prepared: Prepared) -> None:
    save_adapter(run, prepared.setup.model, prepared.setup.tokenizer)


def finish(run: RunDir, prepared: Prepared, result: EngineResult) -> dict[str, Any]:
    """Validation loss and perplexity, then the samples."""
    setup = prepared.setup
    metrics = evaluate(result, setup.data)
    write_samples(run, prepared.recipe, setup.model, setup.tokenizer, setup.data_format.prompt_style)
    return metrics


def _announce(recipe: Recipe, setup: SftSetup) -> None:
    s = setup.data.stats
    announce(recipe, setup.context, setup.params, setup.notes)
    say(setup.data_format.line())
    say(f"data: {s.train_rows} train / {s.eval_rows} eval rows, {s.tokens_mean:.0f} tokens mean, "
        f"{100 * s.truncation_rate:.1f}% truncated at {recipe.data.max_length}"
        + (f", {s.dropped_fully_masked} dropped (prompt fills max_length)" if s.dropped_fully_masked else ""))


def evaluate(result: EngineResult, data: InstructionData) -> dict[str, Any]:
    if data.eval is None:
        return {"eval_loss": None, "perplexity": None}
    loss = result.evaluate(data.eval, "eval")["eval_loss"]
    return {"eval_loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else None}


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, recipe: Recipe, max_new_tokens: int | None = None,
             style: str = "dolly") -> str:
    """Greedy answer to `prompt` rendered as the run trained (style: dolly | chat | text, DataFormat.prompt_style)."""
    input_ids = torch.tensor([generation_prompt_ids(prompt, style, tokenizer, recipe.data)], device=model.device)
    model.eval()
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens or recipe.eval.max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def write_samples(run: RunDir, recipe: Recipe, model: Any, tokenizer: Any, style: str = "dolly") -> None:
    """Greedy generations for the recipe's fixed prompts, adapter vs base model, side by side; written by rank 0.
    Under FSDP/ZeRO-3 every rank generates: each forward pass gathers the sharded weights from all ranks."""
    if not run.writer and not shards_weights():
        return
    rows = []
    total = len(recipe.eval.prompts) * (2 if recipe.eval.compare_base else 1)
    with root_unsharded(model), phase("generating samples", total) as progress:
        for prompt in recipe.eval.prompts:
            row = {"prompt": prompt, "adapter": generate(model, tokenizer, prompt, recipe, style=style)}
            progress.advance()
            if recipe.eval.compare_base:
                with model.disable_adapter():
                    row["base"] = generate(model, tokenizer, prompt, recipe, style=style)
                progress.advance()
            rows.append(row)
    if not run.writer:
        return
    atomic_write_text(run.samples_path / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    lines = ["# Generations", ""]
    for r in rows:
        lines += [f"## {r['prompt']}", "", "**adapter:** " + r["adapter"], ""]
        if "base" in r:
            lines += ["**base:** " + r["base"], ""]
    atomic_write_text(run.samples_path / "generations.md", "\n".join(lines))


def load_for_inference(run: RunDir, recipe: Recipe) -> tuple[Any, Any]:
    """Base model + saved adapter + saved tokenizer, as `peftlab generate` and the tests use them."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, _ = trained_base(recipe, loader.load_causal_lm)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_path)
    loader.refuse_pickled_weights(run.adapter_path, recipe.model.allow_pickle, "adapter")
    return PeftModel.from_pretrained(base, run.adapter_path), tokenizer



def export(run: RunDir, recipe: Recipe, folder: Path) -> Exported:
    """The adapter merged into the base it was trained on (dequantised for qlora) + the run's tokenizer."""
    from transformers import AutoTokenizer

    from peftlab.models.merge import merged_model

    loader.refuse_pickled_weights(run.adapter_path, recipe.model.allow_pickle, "adapter")
    base, _ = trained_base(recipe, loader.load_causal_lm)
    merged_model(base, run.adapter_path).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(run.adapter_path).save_pretrained(folder)
    return Exported("transformers", "text-generation", "AutoModelForCausalLM.from_pretrained('{path}')")


# ---------------------------------------------------------------- doctor


def show_example(tokenizer: Any, example: dict[str, Any]) -> None:
    """The example as the model reads it, each run of masked or trained tokens on its own marked block (a
    conversation alternates: system/user masked, each assistant turn TRAINED)."""
    ids, labels = example["input_ids"], example["labels"]
    trained = sum(1 for label in labels if label != IGNORE_INDEX)
    say(f"example: {len(ids) - trained} prompt tokens masked (-100), {trained} tokens trained")
    for is_trained, run in itertools.groupby(zip(ids, labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX):
        lines = tokenizer.decode([i for i, _ in run]).split("\n")
        if len(lines) > 1 and not lines[-1]:  # a block that ends a line: no empty continuation line
            lines.pop()
        say(("  TRAINED | " if is_trained else "  masked  | ") + "\n          | ".join(lines))


def forward_backward(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float, bool]:
    """Loss of one padded batch and whether every LoRA gradient is finite."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], device=model.device)

    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], device=model.device)
    model.train()
    out = model(input_ids=padded("input_ids", pad), attention_mask=mask, labels=padded("labels", IGNORE_INDEX))
    out.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grads_finite


def doctor(recipe: Recipe) -> list[str]:
    """`peftlab doctor` for an SFT recipe: what the loss sees (one example with masked and trained tokens marked),
    masking, lengths and truncation, one forward+backward, parameters and the memory estimate."""
    setup = build(recipe)
    c, s = setup.context, setup.data.stats
    announce(recipe, c, setup.params, setup.notes)
    say(setup.data_format.line())
    show_example(setup.tokenizer, setup.data.train[0])
    up = Checkup()
    say(f"lengths (tokens, after truncation at {recipe.data.max_length}): mean {s.tokens_mean}, median {s.tokens_median}, "
        f"p90 {s.tokens_p90}, max {s.tokens_max}; truncated {s.truncated}/{s.rows} ({100 * s.truncation_rate:.1f}%)")
    total = s.trained_tokens + s.masked_tokens
    say(f"label tokens over {s.rows} rows: {s.trained_tokens} trained, {s.masked_tokens} masked "
        f"({100 * s.masked_tokens / max(total, 1):.1f}% masked)")
    dropped = s.dropped_fully_masked / max(s.rows, 1)
    up.check(dropped <= MAX_DROPPED_RATE,
             f"{s.dropped_fully_masked}/{s.rows} examples fully masked and dropped ({100 * dropped:.1f}% <= "
             f"{100 * MAX_DROPPED_RATE:.0f}%)",
             f"{s.dropped_fully_masked}/{s.rows} examples ({100 * dropped:.1f}%) have every label masked (prompt fills "
             "data.max_length) and are dropped: raise data.max_length")
    empty = s.empty_responses / max(s.rows, 1)
    up.check(empty <= MAX_EMPTY_RATE, f"{s.empty_responses}/{s.rows} responses empty ({100 * empty:.1f}% <= "
             f"{100 * MAX_EMPTY_RATE:.0f}%)",
             f"{s.empty_responses}/{s.rows} responses ({100 * empty:.1f}%) are empty and train the end-of-sequence token "
             "alone: check data.columns.response")
    first = setup.data.train[0]["input_ids"]
    bos = setup.tokenizer.bos_token_id
    up.check(not (len(first) > 1 and first[0] == first[1] == bos and adds_bos(setup.tokenizer)),
             "prompts start with at most one BOS", "prompts start with <bos><bos>: drop the BOS from data.template")
    up.check(s.truncation_rate < MAX_TRUNCATION_RATE,
             f"truncation rate {100 * s.truncation_rate:.1f}% < {100 * MAX_TRUNCATION_RATE:.0f}%",
             f"{100 * s.truncation_rate:.1f}% of examples are truncated: raise data.max_length")
    batch = [setup.data.train[i] for i in range(min(recipe.train.batch_size, len(setup.data.train)))]
    loss, grads_ok = forward_backward(setup.model, setup.tokenizer, batch)
    up.check(math.isfinite(loss) and loss > 0, f"forward: loss {loss:.4f} is finite and > 0",
             f"forward: loss {loss} is not finite and > 0 (see the guard's causes: precision, attention, masking)")
    up.check(grads_ok, "backward: all LoRA gradients finite", "backward: non-finite LoRA gradients")
    t = recipe.train
    est = estimate_memory(setup.model, t.batch_size, recipe.data.max_length, t.gradient_checkpointing,
                          4 if c.precision == "fp32" else 2)
    say(f"memory estimate at batch {recipe.train.batch_size} x {recipe.data.max_length} tokens: ~{est.total_gib:.2f} GiB "
        f"(weights {est.weights_gib:.2f}, LoRA params+grads+AdamW {est.trainable_state_gib:.2f}, "
        f"activations {est.activations_gib:.2f}, logits {est.logits_gib:.2f})")
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0] / GIB
        up.check(est.total_gib < free, f"fits: {free:.1f} GiB free on the GPU",
                 f"estimate {est.total_gib:.1f} GiB > {free:.1f} GiB free: lower train.batch_size or data.max_length, "
                 "turn on train.gradient_checkpointing, or use method.name=qlora")
    return up.problems
