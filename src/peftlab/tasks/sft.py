"""Instruction SFT of a causal LM with LoRA/QLoRA, on trl's SFTTrainer.

`build` turns a recipe into a ready model + data; `train` runs it into a run folder. The tiny CPU
twin and the GPU run differ only in the recipe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from peftlab.config import Recipe
from peftlab.data.instructions import InstructionData, build_instruction_data, render_prompt
from peftlab.models import adapt, loader
from peftlab.models.base import trained_base
from peftlab.models.precision import DTYPES
from peftlab.reliability import TrainingInterrupted
from peftlab.runs import RunDir, atomic_write_text
from peftlab.tasks.common import (
    CountsBatches,
    announce,
    resumed_counter,
    run_context,
    save_adapter,
    throughput,
    train_counted,
    trainer_arguments,
)
from peftlab.watch.console import Progress, say
from peftlab.watch.guard import HealthGuard, RunContext, check_batch_labels
from peftlab.watch.memory import peak_memory_all_ranks, reset_peak_memory
from peftlab.watch.monitor import BatchCounter, MonitorCallback


@dataclass
class SftSetup:
    model: Any  # a PeftModel
    tokenizer: Any
    data: InstructionData
    context: RunContext
    params: adapt.ParamCount
    notes: list[str] = field(default_factory=list)


def build(recipe: Recipe, data: bool = True) -> SftSetup:
    from transformers import set_seed

    set_seed(recipe.seed)
    context = run_context(recipe)
    tokenizer = loader.load_tokenizer(recipe.model)
    instruction_data = build_instruction_data(recipe.data, tokenizer, recipe.seed) if data else None
    model, notes = _load_adapted_model(recipe, DTYPES[context.precision], context.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.model.source.startswith("preset:"):
        notes.append(loader.presets.tokenizer_note(recipe.model.source.removeprefix("preset:")))
    return SftSetup(model, tokenizer, instruction_data, context, adapt.count_params(model), notes)


def _load_adapted_model(recipe: Recipe, dtype: torch.dtype, attn: str) -> tuple[Any, list[str]]:
    quant = None
    if recipe.method.name == "qlora":
        quant = adapt.bnb_quantization_config(recipe.method.quant, compute_dtype=dtype)
    model = loader.load_causal_lm(recipe.model, dtype, attn, quant)
    notes = []
    if quant is not None:
        notes += adapt.prepare_kbit(model, recipe.method.quant.kbit_prep, recipe.train.gradient_checkpointing)
    return adapt.apply_lora(model, recipe.method.lora), notes


class CountingSFTTrainer(CountsBatches, SFTTrainer):
    """SFTTrainer that counts the tokens of every consumed micro-batch and refuses all-masked ones."""

    def __init__(self, *args: Any, counter: BatchCounter, **kwargs: Any) -> None:
        super().__init__(*args, counter=counter, **kwargs)
        self.data_collator = self._refusing_all_masked(self.data_collator)

    def _refusing_all_masked(self, collate: Any) -> Any:
        # Checked on the CPU batch, before it reaches the device: no host sync per micro-batch.
        def collate_checked(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(features)
            check_batch_labels(int(BatchCounter.trained_in(batch["labels"])), self.state.global_step)
            return batch

        return collate_checked


def training_arguments(recipe: Recipe, run: RunDir, precision: str) -> SFTConfig:
    t = recipe.train
    return SFTConfig(
        **trainer_arguments(recipe, run, precision),
        padding_free=t.padding_free,
        max_length=None if t.padding_free else recipe.data.max_length,
    )


def train(recipe: Recipe, run: RunDir, show_progress: bool = True, resume_from: Path | None = None,
          callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Build, train (or continue from the checkpoint `resume_from`), evaluate, save the adapter and
    samples; returns the summary fields."""
    from peftlab.doctor import estimate_memory

    setup = build(recipe)
    _announce(recipe, setup)
    estimate = estimate_memory(setup.model, recipe, 4 if setup.context.precision == "fp32" else 2)
    run.update_summary(data=setup.data.stats.as_dict(), precision=setup.context.precision,
                       attn_implementation=setup.context.attn_implementation, notes=setup.notes,
                       memory_estimate={**asdict(estimate), "total_gib": estimate.total_gib})
    counter, seconds_before = resumed_counter(BatchCounter, resume_from)
    guard = HealthGuard(setup.context, recipe.watch.patience) if recipe.watch.guard else None
    trainer = CountingSFTTrainer(
        model=setup.model,
        args=training_arguments(recipe, run, setup.context.precision),
        train_dataset=setup.data.train,
        eval_dataset=setup.data.eval,
        processing_class=setup.tokenizer,
        counter=counter,
        callbacks=[MonitorCallback(run, counter, guard, Progress("train", show_progress)), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # our monitor prints the metrics
    reset_peak_memory()
    try:
        result, runtime = train_counted(trainer, recipe, resume_from, seconds_before)
    except TrainingInterrupted:
        save_adapter(run, setup.model, setup.tokenizer)
        raise
    summary = throughput(trainer, counter, runtime, result.training_loss)
    summary.update(peak_memory_all_ranks())
    summary.update(_evaluate(trainer, setup.data))
    save_adapter(run, setup.model, setup.tokenizer)
    write_samples(run, recipe, setup.model, setup.tokenizer)
    return summary


def _announce(recipe: Recipe, setup: SftSetup) -> None:
    s = setup.data.stats
    announce(recipe, setup.context, setup.params, setup.notes)
    say(f"data: {s.train_rows} train / {s.eval_rows} eval rows, {s.tokens_mean:.0f} tokens mean, "
        f"{100 * s.truncation_rate:.1f}% truncated at {recipe.data.max_length}"
        + (f", {s.dropped_fully_masked} dropped (prompt fills max_length)" if s.dropped_fully_masked else ""))


def _evaluate(trainer: SFTTrainer, data: InstructionData) -> dict[str, Any]:
    if data.eval is None:
        return {"eval_loss": None, "perplexity": None}
    loss = trainer.evaluate()["eval_loss"]
    return {"eval_loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else None}


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, recipe: Recipe, max_new_tokens: int | None = None) -> str:
    text = render_prompt({"instruction": prompt, "context": ""}, recipe.data)
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    model.eval()
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens or recipe.eval.max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def write_samples(run: RunDir, recipe: Recipe, model: Any, tokenizer: Any) -> None:
    """Greedy generations for the recipe's fixed prompts, adapter vs base model, side by side; by rank 0 only."""
    if not run.writer:
        return
    rows = []
    for prompt in recipe.eval.prompts:
        row = {"prompt": prompt, "adapter": generate(model, tokenizer, prompt, recipe)}
        if recipe.eval.compare_base:
            with model.disable_adapter():
                row["base"] = generate(model, tokenizer, prompt, recipe)
        rows.append(row)
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

