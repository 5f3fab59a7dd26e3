"""What every Trainer-based task shares: the TrainingArguments a recipe maps to, the optimizer a
machine can run, and the throughput summary of a finished run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from peftlab.config import Recipe
from peftlab.distributed import trainer_strategy_arguments
from peftlab.metrics import lower_is_better
from peftlab.reliability import carried_state, checkpoint_args, train_resumable
from peftlab.runs import RunDir, atomic_dir, atomic_write_json
from peftlab.watch.guard import RunContext
from peftlab.watch.memory import memory_kind
from peftlab.watch.monitor import BatchCounter

# bitsandbytes optimizers (8-bit states, paged memory) need a CUDA GPU.
GPU_ONLY_OPTIMIZERS = ("8bit", "paged", "bnb", "4bit")
CPU_OPTIMIZER = "adamw_torch"


def resolve_optimizer(name: str) -> tuple[str, str | None]:
    """(optimizer to use here, a note when it differs from the recipe's)."""
    if torch.cuda.is_available() or not any(part in name for part in GPU_ONLY_OPTIMIZERS):
        return name, None
    return CPU_OPTIMIZER, (f"optimizer: train.optimizer={name} needs a CUDA GPU (bitsandbytes); "
                           f"this CPU run uses {CPU_OPTIMIZER} instead")


def trainer_arguments(recipe: Recipe, run: RunDir, precision: str, report_to: list[str] | None = None) -> dict[str, Any]:
    """TrainingArguments fields common to every task (each task adds its own)."""
    t = recipe.train
    best = {}
    if t.best_metric:  # config checks that eval and save steps line up
        best = {"load_best_model_at_end": True, "greater_is_better": not lower_is_better(t.best_metric)}
    return dict(
        output_dir=str(run.checkpoints_path),
        run_name=run.name,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        # transformers 5: warmup_steps takes a step count, or a ratio of the run when below 1
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=resolve_optimizer(t.optimizer)[0],
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # the filter is what hid NaN losses as 0.0: the guard needs raw values
        **trainer_strategy_arguments(),
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        **checkpoint_args(t),
        **best,
        report_to=report_to or "none",
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
        label_names=["labels"],
        disable_tqdm=True,
    )


def throughput(trainer: Any, counter: BatchCounter, runtime: float, train_loss: float) -> dict[str, Any]:
    """Summary fields of a finished training loop, from the batches it consumed."""
    counter = counter.total()
    history = [h for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    return {
        "runtime_s": round(runtime, 3),
        "steps": steps,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "steps_per_s": round(steps / runtime, 4),
        "samples": counter.samples,
        "samples_per_s": round(counter.samples / runtime, 3),
        "tokens": counter.tokens,
        "tokens_per_s": round(counter.tokens / runtime, 2),
        "padded_tokens": counter.padded_tokens,
        "padded_tokens_per_s": round(counter.padded_tokens / runtime, 2),
        "trained_tokens": counter.trained_tokens,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss": train_loss,
        "memory_kind": memory_kind(),
    }


class CountsBatches:
    """Mixin for a Trainer subclass: every micro-batch the loop consumes goes into `counter` (not what the
    dataloader prefetched), so throughput counts real work."""

    def __init__(self, *args: Any, counter: BatchCounter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter = counter

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.counter.add(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


def resumed_counter(counter_class: type[BatchCounter], resume_from: Path | None) -> tuple[BatchCounter, float]:
    """The counter and training seconds of the run so far (zero for a fresh run), as the checkpoint carried them."""
    carried = carried_state(resume_from)
    return counter_class(**carried.get("counter", {})), carried.get("runtime_s", 0.0)


def train_counted(trainer: Any, recipe: Recipe, resume_from: Path | None, seconds_before: float) -> tuple[Any, float]:
    """trainer.train(), resumable, with the counter and clock saved in every checkpoint;
    returns (the Trainer's result, training seconds including the run's earlier sessions)."""
    start = time.perf_counter() - seconds_before
    result = train_resumable(trainer, recipe.train, resume_from,
                             carry=lambda: {"counter": trainer.counter.as_dict(), "runtime_s": time.perf_counter() - start})
    return result, time.perf_counter() - start


def save_adapter(run: RunDir, model: Any, tokenizer: Any, extra_json: dict[str, Any] | None = None) -> None:
    """adapter/ (LoRA weights as safetensors, tokenizer, any extra JSON files), swapped in whole; by rank 0 only."""
    if not run.writer:
        return
    with atomic_dir(run.adapter_path) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for name, data in (extra_json or {}).items():
            atomic_write_json(folder / name, data)


def run_context(recipe: Recipe) -> RunContext:
    """Model family, precision and attention this recipe runs with (what the guard and the loaders need)."""
    from peftlab.models import loader
    from peftlab.models.precision import resolve_precision

    model_type = loader.load_model_config(recipe.model).model_type
    precision = resolve_precision(recipe.train.precision, model_type)
    attn = loader.attention_implementation(recipe.model.attn_implementation, model_type)
    return RunContext(model_type, precision, attn, recipe.train.lr, recipe.method.name, recipe.method.quant.compute_dtype)


def announce(recipe: Recipe, context: Any, params: Any, notes: list[str]) -> None:
    """The lines every task prints before training: model, method, precision, parameter counts, notes."""
    from peftlab.models import loader
    from peftlab.watch.console import say

    say(f"model {loader.describe_source(recipe.model)} | {recipe.method.name} | {context.precision} | "
        f"attention {context.attn_implementation}")
    say(str(params))
    for note in notes:
        say(f"note: {note}")
