"""Sequence classification with a decoder LM (DialoGPT on Banking77): LoRA/QLoRA on the HF Trainer.

The model is AutoModelForSequenceClassification with LoRA of task type SEQ_CLS, so peft trains the
new `score` head in full (modules_to_save) and saves it with the adapter; the label names are saved
beside it. GPT-2-style models pool the last non-pad token, so pad = eos and the config knows the pad
id. Guards: the label column at load and the labels of the first batch the model sees (the original
run lost its `label` column in preprocessing without a word), a trainable head, finite metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from peftlab import metrics
from peftlab.config import Recipe
from peftlab.data.intents import ClassData, build_class_data
from peftlab.distributed import shards_weights
from peftlab.engines import EngineResult, TrainJob
from peftlab.engines.optimizers import resolve_optimizer
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.models import adapt, loader
from peftlab.models.base import trained_base
from peftlab.runs import RunDir, atomic_write_json
from peftlab.tasks.base import Exported, Prepared
from peftlab.tasks.common import Checkup, announce, run_context, save_adapter
from peftlab.watch.console import print_table, say
from peftlab.watch.guard import HealthGuard, RunContext
from peftlab.watch.monitor import BatchCounter

LABELS_FILE = "labels.json"  # in adapter/: id2label / label2id, which peft's adapter files do not carry
REPORT_FILE = "classification_report.json"
CONFUSION_FILE = "confusion_matrix.png"
METRIC_NAMES = ("loss", "accuracy", "f1", "f1_weighted")  # reported as eval_* (validation) and test_*


@dataclass
class ClassifySetup:
    model: Any  # a PeftModelForSequenceClassification
    tokenizer: Any
    data: ClassData
    context: RunContext
    params: adapt.ParamCount
    notes: list[str] = field(default_factory=list)


class LabelCounter(BatchCounter):
    """BatchCounter for one label per row: every row of a batch is trained."""

    @staticmethod
    def trained_in(labels: Any) -> int:
        return labels.numel()


def build(recipe: Recipe) -> ClassifySetup:
    from transformers import set_seed

    set_seed(recipe.seed)
    context = run_context(recipe)
    tokenizer = loader.load_tokenizer(recipe.model)  # pad = eos when the model has no pad token
    data = build_class_data(recipe.data, tokenizer, recipe.seed)
    if data.eval is None and (recipe.train.eval_steps or recipe.train.best_metric):
        raise PeftlabError("train.eval_steps / train.best_metric need a validation set, and data.eval_fraction is 0; "
                           "fix: set data.eval_fraction > 0, or train.eval_steps=null and train.best_metric=null")
    model, notes = _load_adapted_model(recipe, data.labels, tokenizer.pad_token_id)
    notes += loader.tokenizer_notes(recipe.model)
    notes += _speed_notes(recipe)
    return ClassifySetup(model, tokenizer, data, context, adapt.count_params(model), notes)


def _load_adapted_model(recipe: Recipe, labels: list[str], pad_token_id: int) -> tuple[Any, list[str]]:
    model, notes = trained_base(recipe, loader.load_sequence_classifier, shards_weights=shards_weights(), labels=labels,
                                pad_token_id=pad_token_id)
    model = adapt.apply_lora(model, recipe.method.lora, task_type="SEQ_CLS")
    head = trainable_head(model)
    # Mixed precision keeps fp32 master weights: an fp16 trainable tensor fails in the GradScaler
    # ("Attempting to unscale FP16 gradients"). peft upcasts the LoRA matrices; the head copy too, here.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    notes.append(f"classification head {', '.join(head)}: new ({len(labels)} labels), trained in full, saved with the adapter")
    return model, notes


def trainable_head(model: Any) -> list[str]:
    """Names of the trainable head modules; a frozen random head would make every run useless."""
    names = sorted({n.split(".modules_to_save.")[0].rsplit(".", 1)[-1]
                    for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n})
    if not names:
        raise PeftlabError(
            "the classification head is not trainable (no modules_to_save parameter requires grad): the model's head "
            "is not named 'score' or 'classifier'; fix: use a model with a standard sequence-classification head"
        )
    return names


def _speed_notes(recipe: Recipe) -> list[str]:
    notes = []
    _, note = resolve_optimizer(recipe.train.optimizer)
    if note:
        notes.append(note)
    if recipe.train.gradient_checkpointing:
        why = " (peft's k-bit prep turns it on by default)" if recipe.method.name == "qlora" else ""
        notes.append(f"gradient checkpointing on{why}: less activation memory, ~30% slower steps; "
                     "a 355M model rarely needs it: --set train.gradient_checkpointing=false")
    return notes


def collator(recipe: Recipe, tokenizer: Any) -> DataCollatorWithPadding:
    if recipe.data.classify.padding == "max_length":  # the original: every query padded to max_length
        return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=recipe.data.max_length)
    # A multiple of 8: tensor-core friendly, and few distinct shapes (each new one costs kernel set-up time)
    return DataCollatorWithPadding(tokenizer, padding="longest", pad_to_multiple_of=8)


def prepare(recipe: Recipe, run: RunDir) -> Prepared:
    """Model and data for the training skeleton: one class id per row, the task's padding, its metrics."""
    setup = build(recipe)
    _announce(recipe, setup)
    job = TrainJob(setup.model, setup.tokenizer, setup.data.train, setup.data.eval, "sequence_classification",
                   recipe.train, recipe.seed, setup.context.precision, run.checkpoints_path,
                   max_length=recipe.data.max_length, collator=collator(recipe, setup.tokenizer),
                   compute_metrics=metrics.compute_metrics, epoch_records=True)
    summary = dict(data=setup.data.stats.as_dict(), labels=setup.data.labels, precision=setup.context.precision,
                   attn_implementation=setup.context.attn_implementation, notes=setup.notes,
                   f1_definition=metrics.F1_DEFINITION)
    return Prepared(recipe, job, setup, setup.context, summary, counter_class=LabelCounter)


def save(run: RunDir, prepared: Prepared) -> None:
    save_adapter_and_labels(run, prepared.setup)


def finish(run: RunDir, prepared: Prepared, result: EngineResult) -> dict[str, Any]:
    """Validation and test metrics, the per-class report and the confusion matrix."""
    results = evaluate(result, prepared.setup, run)
    _show_results(results)
    return results


def save_adapter_and_labels(run: RunDir, setup: ClassifySetup) -> None:
    """adapter/ with the label names, which peft's adapter files do not carry."""
    labels = setup.data.labels
    save_adapter(run, setup.model, setup.tokenizer, {LABELS_FILE: {
        "id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}})


def evaluate(engine: EngineResult, setup: ClassifySetup, run: RunDir) -> dict[str, Any]:
    """Validation metrics (eval_*) and test metrics (test_*), the per-class report and the confusion
    matrix of the test set (of validation when there is no test set). NaN anywhere is a failure."""
    results: dict[str, Any] = {}
    detailed = None
    for prefix, dataset in (("eval", setup.data.eval), ("test", setup.data.test)):
        if dataset is None:
            continue
        prediction = engine.predict(dataset, prefix)
        results.update({f"{prefix}_{name}": prediction.metrics.get(f"{prefix}_{name}") for name in METRIC_NAMES})
        detailed = (prefix, prediction)
    _require_finite(results, setup.context)
    if detailed is not None and run.writer:  # every rank predicts (a collective); rank 0 writes the files
        prefix, prediction = detailed
        predicted = metrics.predicted_classes(prediction.predictions)
        names = setup.data.labels
        atomic_write_json(run.path / REPORT_FILE, {"split": prefix, "f1_definition": metrics.F1_DEFINITION,
                                                   **metrics.per_class_report(prediction.label_ids, predicted, names)})
        metrics.plot_confusion_matrix(prediction.label_ids, predicted, names, run.path / CONFUSION_FILE,
                                      f"{run.name}: {prefix} set, accuracy {results[f'{prefix}_accuracy']:.3f}")
    return results


def _require_finite(results: dict[str, Any], context: RunContext) -> None:
    for key, value in results.items():
        if value is None or not math.isfinite(value):
            problem = f"{key} is {value} after training"
            raise GuardFailure(f"{problem}; {HealthGuard(context).diagnosis(problem)}")


def _announce(recipe: Recipe, setup: ClassifySetup) -> None:
    s = setup.data.stats
    announce(recipe, setup.context, setup.params, setup.notes)
    say(f"data: {s.num_labels} labels, {s.train_rows} train / {s.eval_rows} validation / {s.test_rows} test rows "
        f"({s.train_per_class_min}-{s.train_per_class_max} train rows per class), {s.tokens_mean:.0f} tokens mean, "
        f"{100 * s.truncation_rate:.1f}% truncated at {recipe.data.max_length}, padding {recipe.data.classify.padding}")


def _show_results(summary: dict[str, Any]) -> None:
    rows = []
    for prefix, title in (("eval", "validation"), ("test", "test")):
        if f"{prefix}_accuracy" in summary:
            rows.append([title] + [f"{summary[f'{prefix}_{name}']:.4f}" for name in ("accuracy", "f1", "f1_weighted", "loss")])
    if rows:
        print_table(["split", "accuracy", "f1 (macro)", "f1 weighted", "loss"], rows, title="classification")


def doctor(recipe: Recipe) -> list[str]:
    """`peftlab doctor` for a classify recipe: labels and lengths, the first batch exactly as the Trainer hands it
    to the model, one forward + backward."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    from peftlab.engines.hf import check_labels_reach_model, trainer_arguments

    setup = build(recipe)
    _announce(recipe, setup)
    s, up, labels = setup.data.stats, Checkup(), setup.data.labels
    say(f"labels in id order: {', '.join(labels[:6])}" + (f", ... ({len(labels)} in all)" if len(labels) > 6 else ""))
    up.check(s.truncation_rate < 0.05, f"{100 * s.truncation_rate:.1f}% of train rows truncated at {recipe.data.max_length}",
             f"{100 * s.truncation_rate:.1f}% of train rows are cut at data.max_length={recipe.data.max_length}: raise it")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(**trainer_arguments(recipe.train, recipe.seed, Path(tmp), setup.context.precision))
        trainer = Trainer(model=setup.model, args=args, train_dataset=setup.data.train, eval_dataset=setup.data.eval,
                          data_collator=collator(recipe, setup.tokenizer))
        try:
            check_labels_reach_model(trainer, len(labels))
            up.check(True, "the first training batch carries class ids in range to the model", "")
        except PeftlabError as exc:
            up.check(False, "", str(exc))
            return up.problems
        batch = next(iter(trainer.get_train_dataloader()))
    setup.model.train()
    loss = setup.model(**batch).loss
    loss.backward()
    grads = all(torch.isfinite(p.grad).all() for p in setup.model.parameters() if p.grad is not None)
    up.check(math.isfinite(loss.item()), f"forward: loss {loss.item():.4f} is finite (chance level: "
             f"{math.log(len(labels)):.2f})", f"forward: loss {loss.item()} is not finite (precision: see the guard's causes)")
    up.check(grads, "backward: LoRA and head gradients finite", "backward: non-finite gradients")
    return up.problems


def load_for_inference(run: RunDir, recipe: Recipe) -> tuple[Any, Any, list[str]]:
    """Base model + saved adapter (LoRA and head) + tokenizer + label names, as a run saved them."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    labels = saved_labels(run)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_path)
    base, _ = trained_base(recipe, loader.load_sequence_classifier, labels=labels, pad_token_id=tokenizer.pad_token_id)
    loader.refuse_pickled_weights(run.adapter_path, recipe.model.allow_pickle, "adapter")
    return PeftModel.from_pretrained(base, run.adapter_path), tokenizer, labels


def saved_labels(run: RunDir) -> list[str]:
    """The label names in id order, as the run saved them beside its adapter."""
    saved = json.loads((run.adapter_path / LABELS_FILE).read_text(encoding="utf-8"))
    return [saved["id2label"][str(i)] for i in range(len(saved["id2label"]))]


def export(run: RunDir, recipe: Recipe, folder: Path) -> Exported:
    """The adapter (LoRA + the trained head) merged into the base it was trained on (dequantised for qlora), with
    the label names in config.json, + the run's tokenizer."""
    from transformers import AutoTokenizer

    from peftlab.models.merge import merged_model

    labels, tokenizer = saved_labels(run), AutoTokenizer.from_pretrained(run.adapter_path)
    loader.refuse_pickled_weights(run.adapter_path, recipe.model.allow_pickle, "adapter")
    base, _ = trained_base(recipe, loader.load_sequence_classifier, labels=labels, pad_token_id=tokenizer.pad_token_id)
    merged_model(base, run.adapter_path).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Exported("transformers", "text-classification", "AutoModelForSequenceClassification.from_pretrained('{path}')",
                    [f"{len(labels)} labels, names in config.json (id2label)"])


@torch.no_grad()
def predict(model: Any, tokenizer: Any, labels: list[str], texts: list[str], max_length: int) -> list[tuple[str, float]]:
    """(label, probability) per text."""
    model.eval()
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(model.device)
    probs = torch.softmax(model(**batch).logits.float(), dim=-1).cpu().numpy()
    best = np.argmax(probs, axis=-1)
    return [(labels[i], float(probs[row, i])) for row, i in enumerate(best)]


@torch.no_grad()
def accuracy(job: TrainJob) -> float:
    """Validation accuracy (fraction of eval rows whose argmax label is right) of the job's model as it stands: before
    the first step (a Listener's job_ready), the base, LoRA at its zero init and the new head, so the numbers that
    step sees: the baseline for "before fine-tuning". The model's train/eval mode and the RNG state are restored,
    so the run trains as it would without the measurement."""
    from torch.utils.data import DataLoader

    from peftlab.models.precision import DTYPES

    if job.eval_dataset is None:
        raise PeftlabError("data.eval_fraction is 0: there are no held-out rows to measure accuracy on; fix: set "
                           "data.eval_fraction > 0")
    model, training = job.model, job.model.training
    model.eval()
    # bitsandbytes' Linear4bit on a CPU with AVX512-BF16 repacks its weight for inference in an eval-mode forward
    # (bnb nn/modules.py Linear4bit.forward); when that is its first forward, the training forward after it fails
    # ("a view of a leaf Variable ... in-place": demo-tiny-intents QLoRA; the Trainer's evaluations come after a
    # training step and are unaffected). It has no dropout: in train mode it computes what the first step computes.
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.train()
    correct = 0
    batches = DataLoader(job.eval_dataset, batch_size=job.train.batch_size, collate_fn=job.collator)
    # the Trainer's autocast: under mixed precision the trained (upcast) head meets half-precision hidden states;
    # fork_rng: the DataLoader draws a base seed from the global generator, which the run's first step would see
    with torch.random.fork_rng(), torch.autocast(model.device.type, dtype=DTYPES[job.precision],
                                                 enabled=job.precision != "fp32"):
        for batch in batches:
            labels = batch.pop("labels")
            logits = model(**batch.to(model.device)).logits
            correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
    model.train(training)
    return correct / len(job.eval_dataset)
