"""`peftlab generate` (any reload for inference) runs the adapter on the base it was trained on: a QLoRA
run's model scores what the run recorded at the end of training (issue 12, item 5)."""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainingArguments
from trl import SFTTrainer

from peftlab.config import load_recipe
from peftlab.data.instructions import build_instruction_data
from peftlab.engines.hf import sft_config
from peftlab.models import loader
from peftlab.runner import run_recipe
from peftlab.runs import RunDir
from peftlab.tasks import classify, sft


@pytest.fixture(autouse=True)
def one_bnb_cpu_path(monkeypatch):
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at a layer's first no-grad forward in
    eval mode, and that kernel computes differently: the same model then scores differently depending on
    which forward came first (measured: 18.1014 then 18.0992 for one model). Both sides of these tests run
    the one dequantizing path (a GPU has no such switch)."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)


# The unquantized base of the old reload missed by 2e-3 relative here (18.1359 vs 18.0975); the 4-bit base
# matches to 1.3e-6 (kernel order).
LOSS_TOLERANCE = 1e-5


def quantized_layers(model) -> int:
    return sum(type(m).__name__ == "Linear4bit" for m in model.modules())


@pytest.mark.parametrize("kbit_prep", ["lean", "peft"])
def test_a_qlora_sft_run_reloads_on_its_4bit_base(kbit_prep, tiny_recipe, runs_dir, tmp_path):
    recipe = tiny_recipe({"method.name": "qlora", "method.quant.kbit_prep": kbit_prep, "eval.compare_base": False})
    run = run_recipe(recipe, runs_dir, "q", show_progress=False)
    model, tokenizer = sft.load_for_inference(run, load_recipe(str(run.config_path)))  # what `generate` uses
    assert quantized_layers(model) > 0
    data = build_instruction_data(recipe.data, loader.load_tokenizer(recipe.model), recipe.seed)
    args = sft_config(recipe.train, recipe.seed, RunDir(tmp_path).checkpoints_path, "fp32", recipe.data.max_length)
    evaluator = SFTTrainer(model=model, args=args,
                           train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer)
    assert evaluator.evaluate()["eval_loss"] == pytest.approx(run.summary()["eval_loss"], rel=LOSS_TOLERANCE)


def test_a_qlora_classify_run_reloads_on_its_4bit_base(tiny_classifier, runs_dir, tmp_path):
    recipe = tiny_classifier({"method.name": "qlora", "method.quant.kbit_prep": "peft", "train.max_steps": 4,
                              "data.classify.test": None})
    run = run_recipe(recipe, runs_dir, "qc", show_progress=False)
    model, tokenizer, labels = classify.load_for_inference(run, load_recipe(str(run.config_path)))
    assert quantized_layers(model) > 0
    setup = classify.build(recipe)
    evaluator = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                            per_device_eval_batch_size=recipe.train.batch_size),
                        data_collator=classify.collator(recipe, tokenizer), compute_metrics=classify.metrics.compute_metrics)
    scores = evaluator.evaluate(setup.data.eval)
    summary = run.summary()
    assert scores["eval_loss"] == pytest.approx(summary["eval_loss"], rel=LOSS_TOLERANCE)
    assert scores["eval_accuracy"] == summary["eval_accuracy"]
