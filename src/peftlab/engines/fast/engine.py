"""`train.engine: fast`: the fast engine behind the engine seam (engines/__init__.py).

The optimisation loop is FastTrainer's (packed rows, flex masks, chunked CE, regional compile); this module adapts
it to the seam: the training hooks, checkpoint-N/ folders that reliability/checkpoints.py accepts (trainable
weights as safetensors, the engine state as a weights-only torch file, trainer_state.json last), resume,
SIGINT/SIGTERM, and evaluation. Evaluation and prediction run through the hf engine's Trainer on the same model
(small next to training; the same eval_loss and metrics definitions on both engines).

Several processes (torchrun, `--gpus N`): FastLoop is data-parallel, and everything here is called by every rank at
the same step: checkpoints gather each rank's RNG state and counters and rank 0 writes them (the weights and the
optimizer state are replicated), evaluation is the Trainer's own sharded one (the hf engine's numbers), a signal on
any rank stops all of them at one step (FastLoop's votes), and the guard decides on rank 0's reading (hooks.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from peftlab.distributed import gather, ranks, strategy
from peftlab.engines import EngineResult, Prediction, TrainJob
from peftlab.engines.fast.choice import run_tokens, weigh_compile
from peftlab.engines.fast.compile import CompileCache, eager
from peftlab.engines.fast.loop import StepHooks
from peftlab.engines.fast.packing import PackedBatch, steps_per_epoch, total_steps
from peftlab.engines.fast.trainer import FastTrainer, compile_cache_key, unsupported
from peftlab.engines.hooks import TrainingHooks
from peftlab.reliability import TrainingInterrupted
from peftlab.reliability.checkpoints import STATE_FILE, CarryState, prune
from peftlab.reliability.interrupt import StopRequest, on_stop_signals
from peftlab.runs import atomic_write_json, honour_umask
from peftlab.watch.console import say
from peftlab.watch.epochs import EpochCallback

TASKS = {"causal_lm": "sft", "sequence_classification": "classify"}
ENGINE_STATE = "fast_engine_state.pt"


class FastEngine:
    name = "fast"

    @classmethod
    def supports(cls, job: TrainJob) -> str | None:
        if job.train.engine == "auto" and not torch.cuda.is_available():
            return "no CUDA device (auto keeps the hf reference on the CPU; --set train.engine=fast runs it there)"
        if ranks().distributed and strategy() != "ddp":
            return (f"--strategy {strategy()} (the fast engine replicates the model on every GPU, as DDP; sharding "
                    "runs on the hf engine)")
        base = job.model.get_base_model() if hasattr(job.model, "get_base_model") else job.model
        model_type = getattr(getattr(base, "config", None), "model_type", "unknown")
        method = ("qlora" if getattr(base, "is_loaded_in_4bit", False) else
                  "8-bit LoRA" if getattr(base, "is_loaded_in_8bit", False) else "lora")
        why = unsupported(model_type, TASKS.get(job.loss_kind, job.loss_kind), job.precision, method)
        if why is None and job.train.best_metric:
            why = "train.best_metric (keeping the best checkpoint is not built in the fast engine)"
        if why is None and job.train.optimizer not in ("adamw_torch", "adamw_torch_fused"):
            why = f"train.optimizer {job.train.optimizer} (the fast engine runs fused AdamW)"
        if why is None and job.loss_kind == "causal_lm" and job.max_length is None:
            why = "no data.max_length (the token budget must hold the longest row)"
        if why is None and job.train.engine == "auto":
            why = _auto_weighs(job)
        return why

    def train(self, job: TrainJob, hooks: TrainingHooks, resume_from: Path | None) -> EngineResult:
        task = TASKS[job.loss_kind]
        pad = job.tokenizer.pad_token_id if task == "classify" and job.tokenizer is not None else None
        fast = FastTrainer(job.model, task, job.train, job.precision, job.max_length or 0, pad)
        t = job.train
        batch = t.batch_size * ranks().world_size  # rows per micro-batch, all processes: the recipe's is per process
        max_steps = total_steps(len(job.train_dataset), batch, t.grad_accum, t.epochs, t.max_steps)
        resume = _load(job.model, resume_from)
        start = resume["step"] if resume else 0
        evaluator = _evaluator(job)
        adapter = _Hooks(job, hooks, fast, steps_per_epoch(len(job.train_dataset), batch, t.grad_accum),
                         evaluator)
        hooks.train_begin(max_steps, start)
        try:
            with on_stop_signals(adapter.request.handle):
                report = fast.fit(job.train_dataset, job.seed, adapter, resume)
        finally:
            hooks.train_end()
        # A signal that reached any rank stopped every rank at this step (FastLoop's votes): all of them say so.
        signal_name = next((name for name in gather(adapter.request.signal_name) if name), None)
        if signal_name:
            checkpoint = adapter.checkpoint_at(report.steps)
            raise TrainingInterrupted(signal_name, report.steps, checkpoint, every_rank=True)
        return EngineResult(
            steps=report.steps, epochs=round(report.steps / adapter.per_epoch, 4), runtime_s=hooks.runtime(),
            final_train_loss=adapter.final_loss, mean_train_loss=report.mean_loss,
            evaluate=lambda dataset, prefix: _followed(evaluator(), dataset, prefix, "evaluate"),
            predict=lambda dataset, prefix: _prediction(_followed(evaluator(), dataset, prefix, "predict")),
            fields={**report.as_summary(), **(adapter.epochs.peak_memory() if adapter.epochs else {})})


def _auto_weighs(job: TrainJob) -> str | None:
    """auto on CUDA: hf for a run shorter than the fast engine's cold compile (choice.py), said in one line. A run
    that already has checkpoints keeps the engine that wrote them (their states differ)."""
    checkpoints = list(job.checkpoints.glob("checkpoint-*")) if job.checkpoints.is_dir() else []
    if checkpoints:
        if any((c / ENGINE_STATE).is_file() for c in checkpoints):
            return None
        why = "the run's checkpoints are the hf engine's"
    else:
        t, task = job.train, TASKS[job.loss_kind]
        key = compile_cache_key(job.model, task, t, job.precision, job.max_length or 0, job.train_dataset, job.seed,
                                ranks().world_size)
        steps = total_steps(len(job.train_dataset), t.batch_size, t.grad_accum, t.epochs, t.max_steps)
        why = weigh_compile(CompileCache(key).path.is_file(),
                            run_tokens(job.train_dataset, steps, t.batch_size * t.grad_accum), _parameters(job.model))
    if why:
        say(f"auto: hf, {why}")
    return why


def _parameters(model: Any) -> int:
    """All parameters, 4-bit ones counted unpacked (peft's count; a plain module: its numel)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()[1]
    return sum(p.numel() for p in model.parameters())


class _Hooks(StepHooks):
    """The fast loop's StepHooks, as the seam's training hooks + checkpoints + signals."""

    def __init__(self, job: TrainJob, hooks: TrainingHooks, fast: FastTrainer, per_epoch: int, evaluator: Any) -> None:
        self.job, self.hooks, self.fast, self.per_epoch = job, hooks, fast, max(per_epoch, 1)
        self.evaluator = evaluator
        self.epochs = EpochCallback(hooks.run, hooks.counter) if job.epoch_records else None
        if self.epochs:
            self.epochs.on_epoch_begin(None, None, None)
        self.request = StopRequest()
        self.final_loss: float | None = None
        self.saved: tuple[int, Path] | None = None  # the last checkpoint: (step, folder)

    def on_micro_batch(self, batch: PackedBatch) -> None:
        # The monitor's counter reads padded batches; a packed row's padding is one trailing segment, so its real
        # part (documents counted by their position 0) is what it counts as tokens, and the whole row as padded.
        n = batch.tokens
        counted = {"input_ids": batch.input_ids[:, :n], "position_ids": batch.position_ids[:, :n],
                   "padded_numel": batch.budget}
        counted["labels"] = batch.class_labels if self.fast.task == "classify" else batch.targets[None, :n]
        self.hooks.micro_batch(counted)

    def on_log(self, record: dict[str, float]) -> None:
        self.final_loss = record["loss"]
        self.hooks.log_train(int(record["step"]), record["step"] / self.per_epoch, record["loss"],
                             record["grad_norm"], record["learning_rate"])

    def on_step_end(self, step: int) -> bool:
        self.hooks.step_end(step)
        t = self.job.train
        if t.eval_steps and step % t.eval_steps == 0 and self.job.eval_dataset is not None:
            self.evaluate(step)
        if self.epochs and step % self.per_epoch == 0:  # the hf engine's kind=epoch records, same callback
            self.epochs.on_epoch_end(None, SimpleNamespace(epoch=step / self.per_epoch, global_step=step), None)
            self.epochs.on_epoch_begin(None, None, None)
        if t.save_steps and step % t.save_steps == 0:
            self.save(step)
        return bool(self.request.signal_name) or self.hooks.should_stop()

    def evaluate(self, step: int) -> None:
        """An evaluation at eval_steps, with the model's own attention (padded batches) and eager layers, then back to
        training."""
        model = self.fast.model
        model.restore_attention()
        try:
            with eager():  # padded eval batches would recompile the static-shape layers
                metrics = self.evaluator().evaluate(self.job.eval_dataset, metric_key_prefix="eval")
        finally:
            model.use_packed_attention()
            model.peft_model.train()
        if self.epochs:
            self.epochs.on_evaluate(None, None, None, metrics=metrics)
        self.hooks.log_eval(step, step / self.per_epoch, metrics)

    def checkpoint_at(self, step: int) -> Path:
        """The checkpoint of `step`: the one on_step_end took there (save_steps), else a new one."""
        return self.saved[1] if self.saved and self.saved[0] == step else self.save(step)

    def save(self, step: int) -> Path:
        """checkpoint-N/: trainable weights, the engine state (optimizer, schedule, every rank's RNG),
        trainer_state.json last. Every rank calls it (its RNG state and counters are gathered); rank 0 writes."""
        from safetensors.torch import save_file

        folder = self.job.checkpoints / f"checkpoint-{step}"
        state, carried = self.fast.state_dict(step), self.hooks.carry(every_rank=True)
        self.saved = (step, folder)
        if not self.hooks.run.writer:
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().contiguous().cpu() for n, p in self.fast.model.trainable_parameters()}
        save_file(weights, str(folder / "trainable.safetensors"))
        honour_umask(folder / "trainable.safetensors")
        torch.save(state, folder / ENGINE_STATE)
        atomic_write_json(folder / STATE_FILE, {"global_step": step, "stateful_callbacks": {
            CarryState.__name__: {"args": {}, "attributes": carried}}})
        prune(self.job.checkpoints, self.job.train.save_total_limit, None)
        return folder


def _load(model: Any, checkpoint: Path | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(checkpoint / "trainable.safetensors")), strict=False)
    return torch.load(checkpoint / ENGINE_STATE, weights_only=True)  # tensors and numbers only: no pickle


def _evaluator(job: TrainJob) -> Any:
    """A Trainer for evaluation/prediction only, built when first asked (the hf engine's definitions). Built without
    gradient checkpointing: building it must not change the model that is still training."""
    from peftlab.engines.hf import sft_config, trainer_arguments

    t = job.train.model_copy(update={"gradient_checkpointing": False})

    @cache
    def build() -> Any:
        from transformers import PrinterCallback

        if job.loss_kind == "causal_lm":
            from trl import SFTTrainer

            trainer = SFTTrainer(model=job.model, args=sft_config(t, job.seed, job.checkpoints, job.precision,
                                                                  job.max_length),
                                 train_dataset=job.train_dataset, eval_dataset=job.eval_dataset,
                                 processing_class=job.tokenizer)
        else:
            from transformers import Trainer, TrainingArguments

            trainer = Trainer(model=job.model, args=TrainingArguments(**trainer_arguments(t, job.seed, job.checkpoints,
                                                                                          job.precision)),
                              eval_dataset=job.eval_dataset, data_collator=job.collator,
                              compute_metrics=job.compute_metrics, processing_class=job.tokenizer)
        trainer.remove_callback(PrinterCallback)  # the hooks record and print the evaluations, as for the hf engine
        return trainer

    return build


def _followed(trainer: Any, dataset: Any, prefix: str, method: str) -> Any:
    from peftlab.engines.hf import followed  # trl: imported when evaluating, as _evaluator does

    return followed(trainer, dataset, prefix, getattr(trainer, method))


def _prediction(output: Any) -> Prediction:
    return Prediction(output.predictions, output.label_ids, output.metrics)

