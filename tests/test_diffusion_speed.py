"""The diffusion task's fast step (diffusion.speed) trains what the plain loop trains: the same first 10 losses on the
tiny SD twin, an adapter that diffusers' own loader takes, random draws that do not depend on the micro-batch, and a
micro-batch planner that keeps the optimizer step's images."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peftlab.config import load_recipe, with_overrides
from peftlab.errors import PeftlabError
from peftlab.runner import run_recipe
from peftlab.tasks import diffusion, diffusion_speed

# bs 2 x GA 2: the fast path regroups it into one micro-batch of 4. LoRA dropout 0: a dropout mask is one draw per
# tensor, so its values follow the micro-batch shape (and a compiled graph draws through its own generator).
COMMON = {"data.max_samples": 8, "train.max_steps": 10, "train.logging_steps": 1, "train.batch_size": 2,
          "train.grad_accum": 2, "method.lora.dropout": 0.0, "eval.prompts": []}
PLAIN = {"data.images.cache": False, "diffusion.speed.channels_last": False, "diffusion.speed.micro_batch": "recipe", "diffusion.speed.compile": False,
         "diffusion.speed.fused_optimizer": False, "diffusion.speed.encoder_timing_every": 3}
FAST = {"diffusion.speed.micro_batch": 4, "diffusion.speed.compile": True}


def tiny(changes: dict) -> object:
    return with_overrides(load_recipe("tiny-sd-vangogh"), {**COMMON, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """The plain loop (encoders every micro-step) and the fast one (latent cache, micro-batch 4, channels_last, compiled
    UNet, fused AdamW) on the same recipe.
    The compile runs dynamo's graph capture with the eager backend: the same captured graph inductor would get,
    without minutes of C++ code generation on a CPU."""
    folder = tmp_path_factory.mktemp("speed")
    patch = pytest.MonkeyPatch()
    patch.setattr(diffusion_speed, "BACKEND", "eager")
    try:
        out = {name: run_recipe(tiny(changes), folder, name, show_progress=False)
               for name, changes in (("plain", PLAIN), ("fast", FAST))}
    finally:
        patch.undo()
    return out


def losses(run) -> list[float]:
    return [r["loss"] for r in run.metrics() if r.get("kind") == "train"]


def test_fast_and_plain_paths_give_the_same_first_10_losses(runs):
    """Tolerance 1e-5 relative: both runs are fp32 on the CPU and draw the same random numbers for the same images;
    what differs is the order of summation (latents encoded 8 at a time once vs 2 per micro-step, one mean over 4
    images vs two means over 2, NHWC convolutions, the fused AdamW kernel), i.e. rounding, measured at <= 2e-7 after 10 optimizer steps. A changed draw or a lost image moves
    these losses by 1e-2 or more."""
    plain, fast = losses(runs["plain"]), losses(runs["fast"])
    assert len(plain) == len(fast) == 10
    assert fast == pytest.approx(plain, rel=1e-5)
    speed = runs["fast"].summary()["speed"]
    assert speed["micro_batch"] == 4 and speed["grad_accum"] == 1 and speed["compiled"] and speed["channels_last"]
    assert runs["fast"].summary()["latent_cache"]["enabled"] and not runs["plain"].summary()["latent_cache"]["enabled"]
    assert runs["plain"].summary()["speed"]["micro_batch"] == 2


def test_fast_runs_adapter_loads_with_diffusers_load_lora_weights(runs):
    """StableDiffusionPipeline.load_lora_weights (through load_for_inference) takes the fast run's adapter (no
    compile wrapper in its names) and puts every trained LoRA tensor into the UNet, value for value."""
    run = runs["fast"]
    pipeline = diffusion.load_for_inference(run, load_recipe(str(run.path / "config.yaml")))
    saved = load_file(str(run.adapter_path / "pytorch_lora_weights.safetensors"))
    assert saved and not any("_orig_mod" in key for key in saved)
    loaded = {name: p for name, p in pipeline.unet.named_parameters() if ".lora_" in name}
    assert len(loaded) == len(saved)
    for key, value in saved.items():
        # unet.<module>.lora.down.weight (diffusers' format) -> <module>.lora_A.<adapter>.weight (peft's)
        module, _, kind = key.removeprefix("unet.").partition(".lora.")
        prefix = f"{module}.lora_{'A' if kind.startswith('down') else 'B'}."
        (name,) = [n for n in loaded if n.startswith(prefix)]
        assert torch.equal(loaded[name].detach().to(value.dtype), value), name


def test_encoders_are_timed_on_a_sample_of_micro_steps(runs):
    """Without the cache the VAE + text encoder are timed (a device sync) on one micro-step in encoder_timing_every."""
    report = runs["plain"].summary()["latent_cache"]
    micro_steps = runs["plain"].summary()["micro_steps"]
    assert micro_steps == 20
    assert report["encode_steps_timed"] == 7  # micro-steps 0, 3, 6, ..., 18
    assert report["encode_s_per_step"] > 0


def test_random_draws_do_not_depend_on_the_micro_batch():
    params = torch.randn(4, 8, 8, 8)
    torch.manual_seed(0)
    whole = diffusion.draw_per_sample(params, 0.18, 1000, 0.1)
    torch.manual_seed(0)
    halves = [diffusion.draw_per_sample(part, 0.18, 1000, 0.1) for part in params.split(2)]
    for got, want in zip(whole, (torch.cat(parts) for parts in zip(*halves, strict=True)), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("per_step", "limit", "expected"), [(16, 10.0, 8), (16, 100.0, 16), (12, 9.5, 6), (4, 2.5, 1),
                                                             (4, 0.5, 1)])
def test_largest_micro_batch_is_the_largest_divisor_that_fits(per_step, limit, expected):
    """Predicted peak = fixed (2) + micro-batch x per image (1); only divisors keep the optimizer step's images."""
    assert diffusion_speed.largest_micro_batch(per_step, 2.0, 1.0, limit) == expected


def test_micro_batch_auto_keeps_the_recipe_batch_without_cuda():
    recipe = tiny({})
    micro, why = diffusion_speed.plan_micro_batch(recipe, torch.device("cpu"), lambda n: torch.zeros(()), [])
    assert micro == 2 and "CUDA" in why["micro_batch_from"]
    plan = diffusion_speed.SpeedPlan(4, 1)
    job = plan.job_train(recipe)
    assert (job.batch_size, job.grad_accum, job.optimizer) == (4, 1, "adamw_torch_fused")


@pytest.mark.parametrize(("override", "message"), [
    ("diffusion.speed.micro_batch=3", "diffusion.speed.micro_batch 3 does not divide the 4 images"),
    ("diffusion.speed.micro_batch=0", "diffusion.speed.micro_batch: must be auto, recipe or a positive number"),
    ("diffusion.speed.compile=sometimes", "diffusion.speed.compile: Input should be 'auto', True or False"),
    ("model.attn_implementation=flex_attention", "'flex_attention' is not a UNet attention; fix: auto (= sdpa) or eager"),
])
def test_bad_speed_settings_are_one_line_errors(override, message):
    with pytest.raises(PeftlabError, match="fix|Input should") as info:
        load_recipe("tiny-sd-vangogh", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_writing_a_preset_leaves_the_callers_random_stream_alone(tmp_path):
    """The first run on a fresh cache writes the preset inside its own set-up: before the fix that reseeded torch's
    RNG there, so that run's LoRA init and noise differed from every later run of the same recipe."""
    from peftlab.models import diffusion as sd

    torch.manual_seed(7)
    state = torch.get_rng_state()
    sd._write_preset(sd.get_preset("tiny-sd"), tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
