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


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory: pytest.TempPathFactory):
    """The same two paths with the UNet in 4-bit (bitsandbytes nf4 + double quant on the CPU, fp32 compute)."""
    folder = tmp_path_factory.mktemp("speed-qlora")
    patch = pytest.MonkeyPatch()
    patch.setattr(diffusion_speed, "BACKEND", "eager")
    try:
        out = {name: run_recipe(tiny({**changes, "method.name": "qlora"}), folder, name, show_progress=False)
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


def test_fast_and_plain_qlora_paths_give_the_same_first_10_losses(qlora_runs):
    """The 4-bit UNet through the fast path (dynamo's capture of bitsandbytes' MatMul4Bit and its torch.library ops)
    trains what the plain QLoRA loop trains. Tolerance 1e-5 relative, as for LoRA: both dequantize the same nf4 weights
    with the same kernel; only summation order differs (measured: 1.1e-7 at most over the 10 losses)."""
    plain, fast = losses(qlora_runs["plain"]), losses(qlora_runs["fast"])
    assert len(plain) == len(fast) == 10
    assert fast == pytest.approx(plain, rel=1e-5)
    assert qlora_runs["fast"].summary()["speed"]["compiled"]


def test_compiled_qlora_unet_is_one_graph_without_breaks(qlora_runs):
    """The run records what dynamo made of the 4-bit UNet: one graph (one static micro-batch shape), no graph break
    (a break per Linear4bit would be ~200 graphs on SD 1.5, each compiled and replayed separately)."""
    report = qlora_runs["fast"].summary()["compile"]
    assert report["graphs"] == 1 and report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert "compile" not in qlora_runs["plain"].summary()


def test_compile_watch_reports_breaks_and_cudagraph_skips():
    """A function with a graph break (a print) is two graphs and one break; the warning names both, and a skipped CUDA
    graph (counted by inductor) gets its own line."""
    from torch._dynamo.utils import counters

    watch = diffusion_speed.CompileWatch()

    def broken(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        print("graph break here")
        return y + 1

    torch._dynamo.reset()
    torch.compile(broken, backend="eager")(torch.ones(3))
    counters["inductor"]["cudagraph_skips"] += 1  # what inductor does when it runs a graph without CUDA graphs
    try:
        report = watch.report()
    finally:
        counters["inductor"]["cudagraph_skips"] -= 1
    assert report["graphs"] == 2 and report["graph_breaks"] == 1 and report["cudagraph_skips"] == 1
    warnings = diffusion_speed.CompileWatch.warnings(report)
    assert len(warnings) == 2 and "1 graph breaks (2 graphs" in warnings[0] and "skipped 1 time" in warnings[1]


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


# ---------------------------------------------------------------- what the compiled 4-bit step keeps for backward


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors the compiled forward computes and keeps for backward, after the min-cut partitioner that inductor
    uses (the model's own weights, which stay in memory anyway, left out)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    saved: list[torch.Tensor] = []

    def forward_compiler(gm: torch.fx.GraphModule, _: object) -> object:
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.extend(n.meta["val"] for n in outputs if isinstance(n, torch.fx.Node) and n.op != "placeholder"
                     and isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm)

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        return aot_module_simplified(gm, inputs, fw_compiler=forward_compiler, bw_compiler=lambda g, _: make_boxed_func(g),
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(model, backend=backend, dynamic=False)(x)
    out.float().sum().backward()
    return saved


def feed_forward(four_bit: bool) -> torch.nn.Module:
    """A GEGLU-sized feed-forward (64 -> 256 -> 64) with LoRA r4 on both Linears, frozen base in bf16 or nf4."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    from peftlab.models.diffusion import cast_4bit_outputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model = model.to(torch.bfloat16).requires_grad_(False)
    if four_bit:
        for i in (0, 2):
            plain = model[i]
            # bf16 bias, as diffusers loads it (an fp32 bias is cast in place by Linear4bit's first forward)
            model[i] = bnb.nn.Linear4bit(plain.in_features, plain.out_features, compute_dtype=torch.bfloat16,
                                         quant_type="nf4").to(torch.bfloat16)
            model[i].load_state_dict(plain.state_dict())
            model[i].to("cpu")  # quantizes
        cast_4bit_outputs(model)
    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), model).train()


def test_compiled_4bit_step_keeps_no_dequantized_weight_for_backward():
    """Why compiled QLoRA stays below LoRA's memory: bitsandbytes' MatMul4Bit dequantizes again in backward, so the
    partitioned graph keeps exactly LoRA's activations and no bf16 copy of a 4-bit weight. A plain dequantize-then-
    F.linear is the classic failure this check finds: its dequantized weight is kept for the input's gradient."""
    import bitsandbytes as bnb

    x = torch.randn(2, 16, 64, requires_grad=True)
    lora = saved_for_backward(feed_forward(False), x)
    qlora = saved_for_backward(feed_forward(True), x)
    assert [(t.shape, t.dtype) for t in qlora] == [(t.shape, t.dtype) for t in lora]

    layer = feed_forward(True)[2].base_layer

    def naive(h: torch.Tensor) -> torch.Tensor:
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        return torch.nn.functional.linear(h.to(torch.bfloat16), weight, layer.bias)

    kept = saved_for_backward(naive, torch.randn(2, 16, 256, requires_grad=True))
    assert (64, 256) in [tuple(t.shape) for t in kept]


def fp32_bias_4bit_layer() -> torch.nn.Module:
    """A Linear4bit (bf16 compute) whose bias is fp32, as k-bit prep 'peft' leaves it."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 64).state_dict())
    return layer.to("cpu")


def test_4bit_biases_are_cast_before_compile_not_inside_it():
    """bitsandbytes' forward casts such a bias in place (bias.data = ...), which dynamo cannot trace: a graph break per
    layer (60 breaks, 97 graphs on the tiny twin's compiled bf16 UNet with kbit_prep peft). settle_4bit_biases does the
    same cast before compile, and the QLoRA set-up runs it: the layer is then one graph."""
    from peftlab.models.diffusion import settle_4bit_biases

    x = torch.randn(2, 64)
    torch._dynamo.reset()
    assert torch._dynamo.explain(fp32_bias_4bit_layer())(x).graph_break_count >= 1
    layer = fp32_bias_4bit_layer()
    assert settle_4bit_biases(torch.nn.Sequential(layer)) == 1 and layer.bias.dtype == torch.bfloat16
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0

    import bitsandbytes as bnb

    recipe = tiny({"method.name": "qlora", "method.quant.kbit_prep": "peft", "train.precision": "bf16"})
    unet = diffusion.build(recipe, torch.device("cpu")).parts.unet
    biases = {m.bias.dtype for m in unet.modules() if isinstance(m, bnb.nn.Linear4bit) and m.bias is not None}
    assert biases == {torch.bfloat16}
