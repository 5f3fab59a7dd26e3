"""The diffusion task end to end on the tiny SD twin: LoRA and QLoRA train, the adapter loads into a stock
diffusers pipeline and reproduces the run's own samples, the grid has its documented size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftlab.config import load_recipe, with_overrides
from peftlab.matrix import run_matrix
from peftlab.report.grids import combine_run_grids, load_grid
from peftlab.tasks import diffusion

FAST = {
    "data.max_samples": 8,
    "train.max_steps": 3,
    "train.lr": 5e-3,  # a clearly visible adapter after 3 steps
    "train.logging_steps": 1,
    "eval.prompts": ["a village church at dusk"],
    "diffusion.sample_seeds": [0, 1],
    "diffusion.sample_steps": 2,
}


def tiny(changes: dict | None = None):
    return with_overrides(load_recipe("tiny-sd-vangogh"), {**FAST, **(changes or {})})


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory: pytest.TempPathFactory):
    """`peftlab matrix tiny-sd-vangogh --methods lora,qlora`, once for the module."""
    runs = run_matrix(tiny(), ["lora", "qlora"], tmp_path_factory.mktemp("runs"), "sd", show_progress=False)
    return {run.summary()["method"]: run for run in runs}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_trains_with_finite_loss_and_logs_every_step(matrix_runs, method):
    run = matrix_runs[method]
    summary = run.summary()
    records = [r for r in run.metrics() if r["kind"] == "train"]
    assert summary["status"] == "completed"
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["it_per_s"] > 0 for r in records)
    assert summary["micro_steps"] == 3 * load_recipe("tiny-sd-vangogh").train.grad_accum
    assert summary["samples"] == summary["micro_steps"] * load_recipe("tiny-sd-vangogh").train.batch_size


def test_qlora_unet_is_4bit_and_lora_only_trains_lora(matrix_runs):
    loaded = matrix_runs["qlora"].summary()["unet"]["param_bytes_loaded"]
    assert "uint8" in loaded  # packed nf4 weights
    assert "uint8" not in matrix_runs["lora"].summary()["unet"]["param_bytes_loaded"]
    for method in ("lora", "qlora"):
        setup = diffusion.build(tiny({"method.name": method}), torch.device("cpu"))
        trainable = [n for n, p in setup.parts.unet.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert setup.params.trainable == sum(p.numel() for p in setup.parts.unet.parameters() if p.requires_grad)


def test_grid_png_is_rows_by_columns_of_cells(matrix_runs):
    recipe = tiny()
    res = recipe.data.images.resolution
    rows = len(recipe.eval.prompts) * len(recipe.diffusion.sample_seeds)
    for run in matrix_runs.values():
        png = run.samples_path / diffusion.GRID_FILE
        assert Image.open(png).size == (2 * res, rows * res)  # columns: base, adapter
        assert load_grid(png).columns == ["base", "adapter"]


def test_matrix_grid_puts_runs_side_by_side_without_duplicate_bases(matrix_runs, tmp_path):
    runs = list(matrix_runs.values())
    grid = load_grid(combine_run_grids(runs, tmp_path / "grid.png"))
    # lora's base is the fp32 UNet, qlora's the 4-bit one: both kept; each adapter once
    assert grid.columns == ["sd-lora: base", "sd-lora: adapter", "sd-qlora: base", "sd-qlora: adapter"]
    assert combine_run_grids(runs[:1], tmp_path / "one.png") is None  # nothing to compare


def test_adapter_loads_into_stock_pipeline_and_reproduces_the_run(matrix_runs):
    """load_lora_weights() gives the images the run's own grid shows (alpha restored from the metadata),
    and they differ from the base model's."""
    run, recipe = matrix_runs["lora"], tiny()
    grid = load_grid(run.samples_path / diffusion.GRID_FILE)
    pipeline = diffusion.load_for_inference(run, recipe)
    prompt, seeds = recipe.eval.prompts[0], recipe.diffusion.sample_seeds
    adapted = [np.asarray(img, dtype=np.float32) for img in diffusion.render(pipeline, recipe, prompt, seeds)]
    pipeline.unload_lora_weights()
    base = [np.asarray(img, dtype=np.float32) for img in diffusion.render(pipeline, recipe, prompt, seeds)]
    for row, (with_lora, without) in enumerate(zip(adapted, base, strict=True)):
        # < 0.3 of 255: PNG rounding; the LoRA scale alpha/r = 2 restored (at scale 1 the gap is several units)
        assert np.abs(with_lora - np.asarray(grid.cells[row][1], dtype=np.float32)).mean() < 0.3
        assert np.abs(without - np.asarray(grid.cells[row][0], dtype=np.float32)).mean() < 0.3
        assert np.abs(with_lora - without).mean() > 2.0  # the adapter changes the output


def test_generate_cli_writes_pngs_and_prints_their_paths(matrix_runs, cli):
    run = matrix_runs["lora"]
    code, lines = cli("generate", str(run.path), "--prompt", "a wheat field", "--seed", "3", "--seed", "4", "--steps", "2")
    paths = [Path(line) for line in lines if line.endswith(".png")]
    assert code == 0 and len(paths) == 2
    assert all(p.is_file() and Image.open(p).size == (64, 64) for p in paths)
    assert any(line.startswith("loading the pipeline") for line in lines)  # the long phases show progress
    assert any(line.startswith("generating images: done") and line.endswith("(2/2)") for line in lines)


def test_latent_cache_reports_its_saving(tmp_path):
    from peftlab.runner import run_recipe

    run = run_recipe(tiny({"data.images.cache": True, "eval.prompts": []}), tmp_path, "cached", show_progress=False)
    cache = run.summary()["latent_cache"]
    assert cache["enabled"] and cache["build_s"] > 0
    assert cache["step_s_without_cache_est"] > cache["step_s"]
    assert not (run.samples_path / diffusion.GRID_FILE).exists()  # no prompts, no grid


def test_peft_kbit_prep_upcasts_what_4bit_leaves_and_lean_does_not():
    """The original's QLoRA memory anomaly on CPU: with bf16 weights, peft's preparation turns every
    non-quantized UNet weight into fp32; 'lean' keeps them in bf16."""
    prepared = {}
    for mode in ("peft", "lean"):
        recipe = tiny({"method.name": "qlora", "method.quant.kbit_prep": mode, "train.precision": "bf16"})
        prepared[mode] = diffusion.build(recipe, torch.device("cpu")).unet_facts["param_bytes_prepared"]
    assert prepared["peft"]["float32"] > 2 * prepared["lean"].get("float32", 0)
    assert prepared["lean"]["bfloat16"] > prepared["peft"].get("bfloat16", 0)


def test_cast_4bit_outputs_gives_linear4bit_the_autocast_dtype():
    """nn.Linear under autocast returns bf16 even for fp32 input (what CUDA's fp32 norms feed it); bitsandbytes'
    Linear4bit returns the input dtype, unless hooked."""
    import bitsandbytes as bnb

    from peftlab.models.diffusion import cast_4bit_outputs

    linear = torch.nn.Linear(64, 64)
    quantized = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
    quantized.load_state_dict(linear.state_dict())
    quantized = quantized.to("cpu")  # quantizes on the move to a device
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x).dtype == torch.bfloat16
        assert quantized(x).dtype == torch.float32
        assert cast_4bit_outputs(torch.nn.Sequential(quantized)) == 1
        assert quantized(x).dtype == torch.bfloat16
    assert quantized(x).dtype == torch.float32  # outside autocast: untouched


def test_sd15_preset_is_the_published_unet_and_4bit_only_shrinks_its_linears():
    from peftlab.models.diffusion import SD15_UNET, meta_unet, param_breakdown, weight_forecast

    kinds = param_breakdown(meta_unet(SD15_UNET))
    assert sum(kinds.values()) == 859_520_964  # runwayml/stable-diffusion-v1-5's UNet
    assert kinds["conv"] > 2 * kinds["linear"]  # most weights are convolutions: bitsandbytes leaves them alone
    gib = weight_forecast(kinds)
    assert gib["qlora_lean_gib"] < gib["lora_gib"] < gib["qlora_peft_upcast_gib"]


def test_image_data_errors_name_the_field_and_the_fix(tmp_path):
    from peftlab.errors import PeftlabError

    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(PeftlabError, match="no metadata.jsonl.*file_name"):
        diffusion.build(tiny({"data.source": str(tmp_path)}), torch.device("cpu"))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "caption": "x"}) + "\n")
    with pytest.raises(PeftlabError, match="column 'text' \\(for caption\\) not found.*data.columns.caption"):
        diffusion.build(tiny({"data.source": str(tmp_path)}), torch.device("cpu"))
    with pytest.raises(PeftlabError, match="data.images.resolution: must be a multiple of 8"):
        tiny({"data.images.resolution": 60})
    with pytest.raises(PeftlabError, match="center_crop=true or data.images.cache=false"):
        run_dir = tmp_path / "runs"
        from peftlab.runner import run_recipe

        run_recipe(tiny({"data.images.cache": True, "data.images.center_crop": False}), run_dir, "x", show_progress=False)


def test_crop_is_square_at_resolution_and_scaled_to_unit_range():
    from peftlab.config import ImageDataConfig
    from peftlab.data.images import ImageCaptions

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    data = ImageCaptions([image], torch.zeros(1, 77, dtype=torch.long), ImageDataConfig(resolution=32, center_crop=False), 0)
    pixels = data.pixels(0, flip=False)
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.equal(data.pixels(0, flip=True, center=True), data.pixels(0, flip=False, center=True).flip(-1))


def test_bf16_qlora_trains_and_samples_under_autocast(tmp_path):
    """The GPU configuration on CPU: bf16 weights, accelerate's autocast, 4-bit UNet with bf16 Linear4bit outputs,
    and the sample grid rendered under autocast."""
    from peftlab.runner import run_recipe

    recipe = tiny({"method.name": "qlora", "train.precision": "bf16", "train.max_steps": 2,
                   "diffusion.sample_seeds": [0], "diffusion.sample_steps": 1})
    run = run_recipe(recipe, tmp_path, "bf16", show_progress=False)
    summary = run.summary()
    assert summary["precision"] == "bf16" and math.isfinite(summary["final_train_loss"])
    assert any("Linear4bit layers return the autocast dtype (bf16)" in note for note in summary["notes"])
    assert set(summary["unet"]["param_bytes_prepared"]) == {"bfloat16", "uint8"}  # no fp32 copies
    assert Image.open(run.samples_path / diffusion.GRID_FILE).size == (2 * 64, 64)


def test_doctor_checks_a_diffusion_recipe(cli):
    code, lines = cli("doctor", "tiny-sd-vangogh", "--set", "data.max_samples=4")
    assert code == 0, lines[-3:]
    assert any(line.startswith("ok") and "all LoRA" in line for line in lines)
    assert any("forward: loss" in line for line in lines)


def test_health_guard_stops_a_diverging_run(tmp_path):
    from peftlab.errors import GuardFailure
    from peftlab.runner import run_recipe

    with pytest.raises(GuardFailure, match="loss is nan.*train.lr"):
        run_recipe(tiny({"train.lr": 1e6, "train.max_steps": 6, "eval.prompts": []}), tmp_path, "boom", show_progress=False)
    summary = json.loads((tmp_path / "boom" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == "health guard"
    # issue 12 item 2: any guard stop saves the adapter first (the state it stopped in, for inspection)
    assert (tmp_path / "boom" / "adapter").is_dir() and summary["adapter"] == str(tmp_path / "boom" / "adapter")
