"""The reference engine: trl's SFTTrainer (causal LM), the HF Trainer (sequence classification), and an
accelerate loop for a task's own loss (diffusion's noise prediction, as diffusers' LoRA script runs it).

The Trainers are adapted to the training hooks by one TrainerCallback; checkpoints, resume and interrupts
go through reliability/ (the Trainer's own checkpoint format). The accelerate loop writes checkpoints that
reliability/checkpoints.py accepts as complete (trainable weights as safetensors, optimizer, scheduler and
RNG as torch zip files, trainer_state.json last).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from peftlab.config import TrainConfig
from peftlab.distributed import one_gpu_per_process, trainer_strategy_arguments
from peftlab.engines import EngineResult, Prediction, TrainJob
from peftlab.engines.hooks import TrainingHooks
from peftlab.engines.optimizers import resolve_optimizer
from peftlab.errors import PeftlabError
from peftlab.metrics import lower_is_better
from peftlab.reliability import TrainingInterrupted, checkpoint_args, train_resumable
from peftlab.reliability.checkpoints import STATE_FILE, CarryState, prune
from peftlab.reliability.interrupt import StopRequest, on_stop_signals
from peftlab.runs import atomic_write_json, honour_umask
from peftlab.watch.epochs import EpochCallback
from peftlab.watch.guard import check_batch_labels
from peftlab.watch.memory import peak_memory
from peftlab.watch.monitor import BatchCounter
from peftlab.watch.progress import Progress, phase


def trainer_arguments(t: TrainConfig, seed: int, output_dir: Path, precision: str) -> dict[str, Any]:
    """TrainingArguments fields common to every Trainer-based job."""
    best = {}
    if t.best_metric:  # config checks that eval and save steps line up
        best = {"load_best_model_at_end": True, "greater_is_better": not lower_is_better(t.best_metric)}
    return dict(
        output_dir=str(output_dir),
        run_name=Path(output_dir).parent.name,
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
        report_to="none",  # trackers are fed by the hooks (tracking.py), the same for every engine
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        label_names=["labels"],
        disable_tqdm=True,
    )


class HooksCallback(TrainerCallback):
    """The Trainer's events, as the training hooks' plain calls."""

    def __init__(self, hooks: TrainingHooks) -> None:
        self.hooks = hooks

    def on_train_begin(self, args, state, control, **kwargs):
        self.hooks.train_begin(state.max_steps, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.hooks.step_end(state.global_step)
        # The last step is logged whatever logging_steps says (as the other loops do): with max_steps below
        # logging_steps the run would otherwise end with no loss at all.
        control.should_log |= state.global_step >= state.max_steps
        control.should_training_stop |= self.hooks.should_stop()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.hooks.log_train(state.global_step, state.epoch, logs.get("loss"), logs.get("grad_norm"),
                                 logs.get("learning_rate"))
        elif "eval_loss" in logs:
            self.hooks.log_eval(state.global_step, state.epoch, logs)
            control.should_training_stop |= self.hooks.should_stop()

    def on_train_end(self, args, state, control, **kwargs):
        self.hooks.train_end()


class CountsBatches:
    """Mixin for a Trainer subclass: every micro-batch the loop consumes goes to the hooks (not what the
    dataloader prefetched), so throughput counts real work."""

    def __init__(self, *args: Any, hooks: TrainingHooks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = hooks

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.hooks.micro_batch(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


class CountingSFTTrainer(CountsBatches, SFTTrainer):
    """SFTTrainer that counts the tokens of every consumed micro-batch and refuses all-masked ones."""

    def __init__(self, *args: Any, hooks: TrainingHooks, **kwargs: Any) -> None:
        super().__init__(*args, hooks=hooks, **kwargs)
        self.data_collator = self._refusing_all_masked(self.data_collator)

    def _refusing_all_masked(self, collate: Any) -> Any:
        # Checked on the CPU batch, before it reaches the device: no host sync per micro-batch.
        def collate_checked(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(features)
            check_batch_labels(int(BatchCounter.trained_in(batch["labels"])), self.state.global_step)
            return batch

        return collate_checked


class CountingTrainer(CountsBatches, Trainer):
    """Trainer that counts the tokens of every consumed micro-batch (real and padded)."""


def check_labels_reach_model(trainer: Trainer, num_labels: int) -> None:
    """The Trainer drops dataset columns the model's forward does not name, at INFO level only: look at
    the first batch the model would see."""
    batch = next(iter(trainer.get_train_dataloader()))
    if "labels" not in batch:
        raise PeftlabError(
            f"the training batches reach the model without labels (batch keys: {', '.join(sorted(batch))}): "
            "preprocessing dropped them; fix: check data.columns.label and that the model's forward takes `labels`"
        )
    labels = batch["labels"]
    if labels.dim() != 1 or int(labels.min()) < 0 or int(labels.max()) >= num_labels:
        raise PeftlabError(
            f"the first training batch has labels {labels.tolist()[:8]}, not class ids in 0..{num_labels - 1}; "
            "fix: check data.columns.label"
        )


def sft_config(t: TrainConfig, seed: int, output_dir: Path, precision: str, max_length: int | None) -> SFTConfig:
    """trl's arguments for a causal-LM job: the common ones plus packing-free padding and truncation."""
    return SFTConfig(**trainer_arguments(t, seed, output_dir, precision), padding_free=t.padding_free,
                     max_length=None if t.padding_free else max_length)


def build_trainer(job: TrainJob, hooks: TrainingHooks) -> Trainer:
    common = dict(model=job.model, train_dataset=job.train_dataset, eval_dataset=job.eval_dataset,
                  processing_class=job.tokenizer, hooks=hooks, callbacks=[HooksCallback(hooks)])
    if job.loss_kind == "causal_lm":
        args = one_gpu_per_process(sft_config(job.train, job.seed, job.checkpoints, job.precision, job.max_length))
        trainer = CountingSFTTrainer(args=args, **common)
    else:
        args = trainer_arguments(job.train, job.seed, job.checkpoints, job.precision)
        trainer = CountingTrainer(args=one_gpu_per_process(TrainingArguments(**args)), data_collator=job.collator,
                                  compute_metrics=job.compute_metrics, **common)
        check_labels_reach_model(trainer, job.model.config.num_labels)
    trainer.remove_callback(PrinterCallback)  # the hooks print the metrics
    return trainer


class HfEngine:
    name = "hf"

    @classmethod
    def supports(cls, job: TrainJob) -> str | None:
        if job.loss_kind == "custom" and job.loss_fn is None:
            return "a custom-loss job needs the task's loss_fn"
        return None  # every loss kind, every device: the reference

    def train(self, job: TrainJob, hooks: TrainingHooks, resume_from: Path | None) -> EngineResult:
        if job.loss_kind == "custom":
            return AccelerateLoop(job, hooks).run(resume_from)
        trainer = build_trainer(job, hooks)
        epochs = EpochCallback(hooks.run, hooks.counter) if job.epoch_records else None
        if epochs:
            trainer.add_callback(epochs)
        result = train_resumable(trainer, job.train, resume_from, carry=hooks.carry)
        state = trainer.state
        history = [h for h in state.log_history if "loss" in h]
        fields = dict(epochs.peak_memory()) if epochs else {}
        if state.best_model_checkpoint:
            fields.update(best_checkpoint=state.best_model_checkpoint, best_metric=state.best_metric)
        return EngineResult(
            steps=state.global_step, epochs=round(state.epoch or 0.0, 4), runtime_s=hooks.runtime(),
            final_train_loss=history[-1]["loss"] if history else None, mean_train_loss=result.training_loss,
            evaluate=lambda dataset, prefix: followed(trainer, dataset, prefix, trainer.evaluate),
            predict=lambda dataset, prefix: _prediction(followed(trainer, dataset, prefix, trainer.predict)),
            fields=fields)


class _PredictionSteps(TrainerCallback):
    """Each evaluation batch, as one step of a progress phase (the Trainer's own tqdm is off: disable_tqdm)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_prediction_step(self, args, state, control, **kwargs):
        self.progress.advance()


def followed(trainer: Trainer, dataset: Any, prefix: str, call: Callable[..., Any]) -> Any:
    """`trainer.evaluate` or `.predict` on `dataset` after training, with n/N batches, elapsed and ETA shown."""
    name = {"eval": "validation"}.get(prefix, prefix)
    batches = math.ceil(len(dataset) / (trainer.args.eval_batch_size * trainer.args.world_size))  # this rank's share
    with phase(f"evaluating on {name}", total=batches) as progress:
        callback = _PredictionSteps(progress)
        trainer.add_callback(callback)
        try:
            return call(dataset, metric_key_prefix=prefix)
        finally:
            trainer.remove_callback(callback)


def _prediction(output: Any) -> Prediction:
    return Prediction(output.predictions, output.label_ids, output.metrics)


# ---------------------------------------------------------------- a task's own loss, on accelerate


def make_optimizer(t: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    name, _ = resolve_optimizer(t.optimizer)
    kwargs = {"lr": t.lr, "weight_decay": t.weight_decay}
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, fused=name.endswith("fused") or None, **kwargs)
    if name in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, **kwargs)
    raise PeftlabError(f"train.optimizer '{name}': not available in the accelerate loop (custom-loss tasks such as diffusion); "
                       "use adamw_torch, "
                       "adamw_torch_fused, adamw_8bit or paged_adamw_8bit")


def total_steps(t: TrainConfig, micro_batches_per_epoch: int) -> int:
    return t.max_steps or max(1, math.ceil(t.epochs * micro_batches_per_epoch / t.grad_accum))


class AccelerateLoop:
    """The accumulate / backward / clip / step loop of diffusers' LoRA scripts, with the hooks' records every
    logging step, checkpoints every save_steps, and a checkpoint on SIGINT/SIGTERM."""

    def __init__(self, job: TrainJob, hooks: TrainingHooks) -> None:
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.state import AcceleratorState

        self.job, self.hooks, t = job, hooks, job.train
        # accelerate's state is per process and refuses a second precision: a matrix or sweep trains several runs
        # in one process (the HF Trainer resets it the same way).
        AcceleratorState._reset_state(reset_partial_state=True)
        # Pinned batches copied with non_blocking: a copy from pageable memory waits for the GPU, a host sync per
        # micro-batch.
        self.accelerator = Accelerator(mixed_precision=job.precision if job.precision in ("bf16", "fp16") else "no",
                                       gradient_accumulation_steps=t.grad_accum, cpu=not torch.cuda.is_available(),
                                       dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()))
        self.losses: list[torch.Tensor] = []
        self.logged = 0  # micro-batches at the previous record
        self.final_loss: float | None = None  # of the last logging window

    def run(self, resume_from: Path | None) -> EngineResult:
        from transformers import get_scheduler

        job, t, accelerator = self.job, self.job.train, self.accelerator
        loader = torch.utils.data.DataLoader(job.train_dataset, batch_size=t.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(job.seed),
                                             pin_memory=torch.cuda.is_available())
        steps = total_steps(t, len(loader))
        warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * steps)
        params = [p for p in job.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(t, params)
        scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
        model, optimizer, loader, scheduler = accelerator.prepare(job.model, optimizer, loader, scheduler)
        start = self._restore(resume_from, model, optimizer, scheduler)
        request = StopRequest()
        with on_stop_signals(request.handle):
            # A checkpoint taken at the last step has nothing left to train: only what follows training.
            step = self._loop(model, optimizer, loader, scheduler, params, steps, start, request) if start < steps else start
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # the task samples with its own autocast
        micro = step * t.grad_accum
        return EngineResult(
            steps=step, epochs=round(micro / len(loader), 4), runtime_s=self.hooks.runtime(),
            final_train_loss=self.final_loss,
            mean_train_loss=torch.stack(self.losses).float().mean().item() if self.losses else None)

    def _loop(self, model: Any, optimizer: Any, loader: Any, scheduler: Any, params: list, steps: int, step: int,
              request: StopRequest) -> int:
        accelerator, t, hooks = self.accelerator, self.job.train, self.hooks
        model.train()
        hooks.train_begin(steps, step)
        grad_norm = None
        try:
            for batch in _forever(loader, skip=step * t.grad_accum):
                with accelerator.accumulate(model):
                    loss = self.job.loss_fn(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                self.losses.append(loss.detach())
                hooks.micro_batch(batch)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                hooks.step_end(step)
                # No forced record at a stop: the open window travels in the checkpoint (see _save), so the resumed
                # run logs it where the uninterrupted run does.
                if step % t.logging_steps == 0 or step == steps:
                    self._log(step, grad_norm, scheduler.get_last_lr()[0], len(loader))
                if (t.save_steps and step % t.save_steps == 0) or request.signal_name:
                    checkpoint = self._save(step, model, optimizer, scheduler)
                    if request.signal_name:
                        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
                        raise TrainingInterrupted(request.signal_name, step, checkpoint)
                if step >= steps or hooks.should_stop():
                    break
        finally:
            hooks.train_end()
        return step

    def _log(self, step: int, grad_norm: Any, lr: float, per_epoch: int) -> None:
        window = torch.stack(self.losses[self.logged:]).float().mean().item()
        self.logged = len(self.losses)
        self.final_loss = window
        epoch = len(self.losses) / per_epoch
        self.hooks.log_train(step, epoch, window, None if grad_norm is None else float(grad_norm), lr, **peak_memory())

    # ------------------------------------------------------------ checkpoints

    def _save(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> Path:
        """checkpoint-N/: trainable weights, optimizer, scheduler, RNG; trainer_state.json last (what makes it complete)."""
        from safetensors.torch import save_file

        folder = self.job.checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().contiguous().cpu() for n, p in self.accelerator.unwrap_model(model).named_parameters()
                     if p.requires_grad}
        save_file(trainable, str(folder / "trainable.safetensors"))
        honour_umask(folder / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "losses": torch.stack(self.losses).cpu() if self.losses else None,
                    "logged": self.logged, "final_loss": self.final_loss}, folder / "training_state.pt")
        torch.save(_rng_state(), folder / "rng_state.pt")
        atomic_write_json(folder / STATE_FILE, {"global_step": step, "stateful_callbacks": {
            CarryState.__name__: {"args": {}, "attributes": self.hooks.carry()}}})
        prune(self.job.checkpoints, self.job.train.save_total_limit, None)
        return folder

    def _restore(self, checkpoint: Path | None, model: Any, optimizer: Any, scheduler: Any) -> int:
        if checkpoint is None:
            return 0
        from safetensors.torch import load_file

        self.accelerator.unwrap_model(model).load_state_dict(load_file(str(checkpoint / "trainable.safetensors")), strict=False)
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)  # tensors and numbers only: no pickle
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.losses = list(state["losses"]) if state["losses"] is not None else []
        # The logging window open at the checkpoint: its losses are in `losses` from `logged` on.
        self.logged, self.final_loss = state.get("logged", len(self.losses)), state.get("final_loss")
        _set_rng_state(torch.load(checkpoint / "rng_state.pt", weights_only=True))
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))["global_step"]


def _forever(loader: Any, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Epoch after epoch; a resumed run replays the seeded shuffle and skips what it already trained on."""
    while True:
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch


def _rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and numbers (so that torch.load needs no pickle)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
