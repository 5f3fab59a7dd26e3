"""Text-to-image LoRA/QLoRA on a Stable Diffusion UNet, as diffusers' train_text_to_image_lora.py trains it
(declared in diffusion_task.py; the hf engine's accelerate loop runs `Conditioning` as its loss).

Frozen VAE and text encoder (in the training precision), LoRA on the UNet's attention projections through
peft (`unet.add_adapter`), the UNet in 4-bit for QLoRA, the noise-prediction objective of the scheduler
(epsilon or v-prediction, optional Min-SNR weighting), accelerate for gradient accumulation and mixed
precision. The run folder gets the same metrics.jsonl / summary.json as the other tasks, an adapter that
`StableDiffusionPipeline.load_lora_weights()` loads, and samples/grid.png: base vs adapter, fixed prompts
and seeds. Optional caching encodes latents and captions once, and the summary says what that saved.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peftlab.config import Recipe
from peftlab.data.images import ImageCaptions, ImageStats, build_image_data
from peftlab.distributed import sum_over_ranks
from peftlab.engines import EngineResult, TrainJob
from peftlab.engines.optimizers import resolve_optimizer
from peftlab.errors import PeftlabError
from peftlab.models import adapt
from peftlab.models import diffusion as sd
from peftlab.models.precision import DTYPES, resolve_precision
from peftlab.report.grids import Grid
from peftlab.runs import RunDir, atomic_dir
from peftlab.tasks import diffusion_speed as speed
from peftlab.tasks.base import Exported, Prepared
from peftlab.tasks.common import Checkup
from peftlab.watch.console import say
from peftlab.watch.guard import RunContext
from peftlab.watch.progress import phase

MODEL_TYPE = "sd-unet"
GRID_FILE = "grid.png"
GIB = 1024**3


@dataclass
class DiffusionSetup:
    parts: sd.SdParts
    data: ImageCaptions
    stats: ImageStats
    context: RunContext
    params: adapt.ParamCount
    unet_facts: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.context.precision]


def build(recipe: Recipe, device: torch.device) -> DiffusionSetup:
    """Load the parts, quantize and prepare the UNet for QLoRA, inject LoRA, read the images."""
    from peft import PeftModel

    precision = resolve_precision(recipe.train.precision, MODEL_TYPE)
    dtype = DTYPES[precision]
    quant = sd.unet_quantization_config(recipe.method.quant, dtype) if recipe.method.name == "qlora" else None
    parts = sd.load_parts(recipe.model, dtype, device, quant)
    data, stats = build_image_data(recipe.data, parts.tokenizer, recipe.seed)
    unet, notes = parts.unet, list(parts.notes)
    loaded, breakdown = sd.param_bytes_by_dtype(unet), sd.param_breakdown(unet)
    if quant is None:
        unet.requires_grad_(False)
    else:
        notes += prepare_4bit_unet(recipe, unet, precision)
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    adapt.check_targets(unet, recipe.method.lora)
    unet.add_adapter(adapt.lora_config(recipe.method.lora, init_lora_weights="gaussian"))
    if precision == "fp16":  # fp16 LoRA weights underflow in Adam updates (diffusers casts them too)
        from diffusers.training_utils import cast_training_params

        cast_training_params(unet, dtype=torch.float32)
    facts = {
        "params_by_kind": breakdown,  # of the base UNet: what 4-bit can and cannot shrink
        "param_bytes_loaded": loaded,
        "param_bytes_prepared": sd.param_bytes_by_dtype(unet),
        "weight_forecast_gib": sd.weight_forecast(breakdown, 4 if precision == "fp32" else 2),
    }
    attn = speed.set_attention(unet, recipe.model.attn_implementation)
    context = RunContext(MODEL_TYPE, precision, attn, recipe.train.lr, recipe.method.name, recipe.method.quant.compute_dtype)
    params = adapt.ParamCount(*PeftModel.get_nb_trainable_parameters(unet))  # peft's count, 4-bit aware
    return DiffusionSetup(parts, data, stats, context, params, facts, notes)


def prepare_4bit_unet(recipe: Recipe, unet: Any, precision: str) -> list[str]:
    """What a 4-bit UNet gets before its LoRA, in training and for inference alike: k-bit preparation and the
    cast of Linear4bit outputs to the autocast dtype. Returns the notes."""
    # No checkpointing flag here: peft's version of it calls get_input_embeddings(), which a UNet lacks;
    # diffusers' own checkpointing is non-reentrant and needs no input grads.
    notes = adapt.prepare_kbit(unet, recipe.method.quant.kbit_prep, gradient_checkpointing=False)
    if settled := sd.settle_4bit_biases(unet):
        notes.append(f"{settled} Linear4bit biases cast to the 4-bit compute dtype now, as their first forward would "
                     "(done there, it is a graph break per layer under torch.compile)")
    if recipe.diffusion.cast_4bit_outputs and precision != "fp32":
        hooked = sd.cast_4bit_outputs(unet)
        notes.append(f"{hooked} Linear4bit layers return the autocast dtype ({precision}), as nn.Linear does")
    return notes


def trained_unet(recipe: Recipe, device: torch.device) -> dict[str, Any]:
    """The pipeline parts a QLoRA adapter was trained with (its 4-bit UNet, prepared as in training), as
    `load_pipeline` components; none for LoRA, whose base is the plain pipeline."""
    if recipe.method.name != "qlora":
        return {}
    precision = resolve_precision(recipe.train.precision, MODEL_TYPE)
    dtype = DTYPES[precision]
    parts = sd.load_parts(recipe.model, dtype, device, sd.unet_quantization_config(recipe.method.quant, dtype))
    prepare_4bit_unet(recipe, parts.unet, precision)
    return {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder, "tokenizer": parts.tokenizer}


# ---------------------------------------------------------------- the objective


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: Any,
                   snr_gamma: float | None) -> torch.Tensor:
    """MSE on the scheduler's target; with snr_gamma, Min-SNR weighting (Hang et al. 2023) as diffusers does."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (loss * weights).mean()


def draw_per_sample(latent_params: torch.Tensor, scaling_factor: float, num_timesteps: int,
                    noise_offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents sampled from the VAE's distribution (mean, logvar stacked on dim 1: (b, 2C, h, w)), the noise and the
    timesteps, scaled latents (b, C, h, w). Every random number of sample i is drawn before any of sample i+1, so
    the same images give the same draws however an optimizer step groups them into micro-batches (diffusers draws
    per tensor, which ties the draws to the micro-batch size)."""
    mean, logvar = latent_params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # DiagonalGaussianDistribution's clamp
    one, device, dtype = (1, *mean.shape[1:]), mean.device, mean.dtype
    eps, noise, steps = [], [], []
    for _ in range(mean.shape[0]):
        eps.append(torch.randn(one, device=device, dtype=dtype))
        n = torch.randn(one, device=device, dtype=dtype)
        if noise_offset:
            n = n + noise_offset * torch.randn(one[:2] + (1, 1), device=device, dtype=dtype)
        noise.append(n)
        steps.append(torch.randint(0, num_timesteps, (1,), device=device))
    latents = (mean + std * torch.cat(eps)) * scaling_factor
    return latents, torch.cat(noise), torch.cat(steps).long()


def noise_prediction_loss(unet: Any, latent_params: torch.Tensor, states: torch.Tensor, parts: sd.SdParts,
                          recipe: Recipe, kind: str, plan: speed.SpeedPlan | None = None) -> torch.Tensor:
    """Sample the latents, noise them at random timesteps, predict the noise (or velocity) from the text states,
    score it. `plan`: the fast step's input layout and CUDA-graph bookkeeping (None: as diffusers' loop)."""
    d, scheduler = recipe.diffusion, parts.noise_scheduler
    latents, noise, timesteps = draw_per_sample(latent_params, parts.vae.config.scaling_factor,
                                                scheduler.config.num_train_timesteps, d.noise_offset)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    if plan is not None and plan.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    if plan is not None and plan.cuda_graphs:  # a new iteration: the previous replay's outputs are consumed
        torch.compiler.cudagraph_mark_step_begin()
    pred = unet(noisy, timesteps, states, return_dict=False)[0]
    return diffusion_loss(pred, target, timesteps, scheduler, d.snr_gamma)


def prediction_type(recipe: Recipe, scheduler: Any) -> str:
    if recipe.diffusion.prediction_type != "auto":
        scheduler.register_to_config(prediction_type=recipe.diffusion.prediction_type)
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise PeftlabError(f"the model's scheduler predicts '{kind}'; fix: set diffusion.prediction_type to epsilon "
                           "or v_prediction")
    return kind


# ---------------------------------------------------------------- what the UNet is conditioned on


class LatentCache(torch.utils.data.Dataset):
    """VAE latent distributions and text embeddings, encoded once (both orientations when flipping)."""

    def __init__(self, data: ImageCaptions, parts: sd.SdParts, dtype: torch.dtype, batch_size: int) -> None:
        if not data.cfg.center_crop:
            raise PeftlabError("data.images.cache: a cached latent fixes one crop, but center_crop=false asks for a "
                               "random crop per step; fix: data.images.center_crop=true or data.images.cache=false")
        self.flip = data.cfg.random_flip
        self.rng = data.rng
        start = time.perf_counter()
        orientations = (False, True) if self.flip else (False,)
        self.latents = torch.stack([self._encode_images(data, parts, dtype, flip, batch_size) for flip in orientations], 1)
        self.states = torch.cat([_encode_text(parts, ids) for ids in data.input_ids.split(batch_size)]).cpu()
        self.seconds = time.perf_counter() - start
        self.encoded_images = len(data) * len(orientations)

    @staticmethod
    def _encode_images(data: ImageCaptions, parts: sd.SdParts, dtype: torch.dtype, flip: bool, batch_size: int) -> torch.Tensor:
        out = []
        for chunk in torch.arange(len(data)).split(batch_size):
            pixels = torch.stack([data.pixels(int(i), flip, center=True) for i in chunk])
            out.append(_encode_pixels(parts, pixels, dtype).cpu())
        return torch.cat(out)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        orientation = int(self.flip and self.rng.random() < 0.5)
        return {"latent_params": self.latents[index, orientation], "states": self.states[index], "index": index}


@torch.no_grad()
def _encode_pixels(parts: sd.SdParts, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The latent distribution's parameters (mean, logvar on dim 1): `draw_per_sample` samples them."""
    vae = parts.vae
    return vae.encode(pixels.to(vae.device, dtype=dtype)).latent_dist.parameters


@torch.no_grad()
def _encode_text(parts: sd.SdParts, input_ids: torch.Tensor) -> torch.Tensor:
    return parts.text_encoder(input_ids.to(parts.text_encoder.device), return_dict=False)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- training


class ImageCounter:
    """Images and micro-steps of the micro-batches the loop consumed (diffusion has no tokens)."""

    def __init__(self, samples: int = 0, micro_steps: int = 0) -> None:
        self.samples, self.micro_steps = samples, micro_steps

    def add(self, batch: dict[str, Any]) -> None:
        self.samples += len(batch["index"])
        self.micro_steps += 1

    def as_dict(self) -> dict[str, int]:
        return {"samples": self.samples, "micro_steps": self.micro_steps}

    def total(self) -> ImageCounter:
        return ImageCounter(*sum_over_ranks([self.samples, self.micro_steps]))

    def rates_since(self, last: ImageCounter, seconds: float) -> dict[str, Any]:
        return {"samples": self.samples, "samples_per_s": round((self.samples - last.samples) / seconds, 3),
                # micro-steps/s: what the original printed as it/s
                "it_per_s": round((self.micro_steps - last.micro_steps) / seconds, 4), "micro_steps": self.micro_steps}

    def summary(self, runtime: float) -> dict[str, Any]:
        c = self.total()
        return {"micro_steps": c.micro_steps, "it_per_s": round(c.micro_steps / runtime, 4), "samples": c.samples,
                "samples_per_s": round(c.samples / runtime, 3)}


class Conditioning:
    """The task's loss per micro-batch: latent distributions and text states from the cache or the frozen encoders
    (timed on one micro-step in `encoder_timing_every`, for the cache report: timing needs a device sync), then the
    noise-prediction loss of the UNet (the compiled one when the plan has it)."""

    def __init__(self, recipe: Recipe, setup: DiffusionSetup, device: torch.device, cached: bool, kind: str) -> None:
        self.recipe, self.setup, self.device, self.cached, self.kind = recipe, setup, device, cached, kind
        self.plan: speed.SpeedPlan | None = None  # set once the micro-batch is planned
        self.micro_steps = 0
        self.encode_s, self.encode_timed = 0.0, 0  # VAE + text encoder seconds over the timed micro-steps (uncached)

    def condition(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.setup.parts
        if self.cached:
            return (batch["latent_params"].to(self.device, non_blocking=True),
                    batch["states"].to(self.device, non_blocking=True))
        timed = self.micro_steps % self.recipe.diffusion.speed.encoder_timing_every == 0
        if timed:
            _sync(self.device)
            begin = time.perf_counter()
        params = _encode_pixels(parts, batch["pixel_values"], self.setup.dtype)
        states = _encode_text(parts, batch["input_ids"])
        if timed:
            _sync(self.device)
            self.encode_s += time.perf_counter() - begin
            self.encode_timed += 1
        return params, states

    def encode_s_per_micro_step(self) -> float:
        return self.encode_s / max(self.encode_timed, 1)

    def loss(self, unet: Any, params: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        # The engine hands over the module itself on one GPU (then the compiled callable runs it); a wrapper (DDP)
        # runs eagerly, so that its gradient synchronisation stays in the step.
        if plan is not None and plan.compiled is not None and unet is self.setup.parts.unet:
            unet = plan.compiled
        return noise_prediction_loss(unet, params, states, self.setup.parts, self.recipe, self.kind, plan)

    def __call__(self, unet: Any, batch: dict[str, Any]) -> torch.Tensor:
        params, states = self.condition(batch)
        self.micro_steps += 1
        return self.loss(unet, params, states)

    def probe_loss(self, dataset: Any, size: int) -> torch.Tensor:
        """The eager loss of `size` images of `dataset`, read without its random flips/crops (for memory probes)."""
        rows = [i % len(dataset) for i in range(size)]
        if isinstance(dataset, LatentCache):
            params, states = dataset.latents[rows, 0].to(self.device), dataset.states[rows].to(self.device)
        else:
            pixels = torch.stack([dataset.pixels(i, False, center=True) for i in rows])
            params = _encode_pixels(self.setup.parts, pixels, self.setup.dtype)
            states = _encode_text(self.setup.parts, dataset.input_ids[rows])
        dtype = self.setup.dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return noise_prediction_loss(self.setup.parts.unet, params, states, self.setup.parts, self.recipe, self.kind)


@dataclass
class DiffusionRun:
    """What `prepare` hands to `save` and `finish`."""

    setup: DiffusionSetup
    cache: LatentCache | None
    conditioning: Conditioning
    device: torch.device


def prepare(recipe: Recipe, run: RunDir) -> Prepared:
    """UNet with LoRA and the image data (or their cached encodings) for the training skeleton; the
    engine calls `Conditioning` for the loss of each micro-batch."""
    from accelerate.utils import set_seed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(recipe.seed)
    setup = build(recipe, device)
    kind = prediction_type(recipe, setup.parts.noise_scheduler)
    cache = _build_cache(recipe, setup, device)
    _, note = resolve_optimizer(recipe.train.optimizer)
    setup.notes += [note] if note else []
    conditioning = Conditioning(recipe, setup, device, cache is not None, kind)
    dataset = cache or setup.data
    unet = setup.parts.unet
    trainable = [p for p in unet.parameters() if p.requires_grad]
    micro, why = speed.plan_micro_batch(recipe, device, lambda n: conditioning.probe_loss(dataset, n), trainable)
    plan = conditioning.plan = speed.apply(recipe, unet, device, setup.context.precision, micro, why)
    setup.notes += plan.notes
    _announce(recipe, setup, kind, cache)
    job = TrainJob(unet, setup.parts.tokenizer, dataset, None, "custom", plan.job_train(recipe), recipe.seed,
                   setup.context.precision, run.checkpoints_path, loss_fn=conditioning)
    summary = dict(data=setup.stats.as_dict(), precision=setup.context.precision,
                   attn_implementation=setup.context.attn_implementation, prediction_type=kind, notes=setup.notes,
                   trainable_params=setup.params.trainable, total_params=setup.params.total, unet=setup.unet_facts,
                   speed=plan.facts)
    return Prepared(recipe, job, DiffusionRun(setup, cache, conditioning, device), setup.context, summary,
                    counter_class=ImageCounter)


def save(run: RunDir, prepared: Prepared) -> None:
    save_adapter(run, prepared.setup.setup.parts.unet)


def finish(run: RunDir, prepared: Prepared, result: EngineResult) -> dict[str, Any]:
    """The cache report and the sample grid (base vs adapter)."""
    state, recipe = prepared.setup, prepared.recipe
    summary = {"latent_cache": cache_report(state, prepared.counter.total(), result.runtime_s)}
    plan = state.conditioning.plan
    if plan is not None and plan.watch is not None:
        summary["compile"] = plan.watch.report()
        for warning in speed.CompileWatch.warnings(summary["compile"]):
            say(f"warning: {warning}")
    if plan is not None and plan.cache is not None and run.writer:
        summary["compile_cache"] = plan.save_compile_cache()
    if state.cache is not None:
        _place_frozen(state.setup.parts, state.device)
    if recipe.eval.prompts and run.writer:
        grid = sample_grid(recipe, state.setup, state.setup.parts.unet)
        grid.save(run.samples_path / GRID_FILE)
        say(f"samples: {run.samples_path / GRID_FILE} ({len(grid.rows)} rows x {len(grid.columns)} columns)")
    return summary


def cache_report(state: DiffusionRun, counted: ImageCounter, runtime: float) -> dict[str, Any]:
    """What caching saves per micro-step: measured encode time vs the step time (one side is an estimate)."""
    micro = max(counted.micro_steps, 1)
    step_s = runtime / micro
    per_step_images = counted.samples / micro
    cache = state.cache
    if cache is not None:
        encode = cache.seconds / max(cache.encoded_images, 1) * per_step_images
        return {"enabled": True, "build_s": round(cache.seconds, 3), "step_s": round(step_s, 4),
                "step_s_without_cache_est": round(step_s + encode, 4),
                "saved_pct_est": round(100 * encode / (step_s + encode), 1)}
    encode = state.conditioning.encode_s_per_micro_step()
    return {"enabled": False, "encode_s_per_step": round(encode, 4), "encode_steps_timed": state.conditioning.encode_timed, "step_s": round(step_s, 4),
            "step_s_with_cache_est": round(step_s - encode, 4), "saved_pct_est": round(100 * encode / step_s, 1)}


def _build_cache(recipe: Recipe, setup: DiffusionSetup, device: torch.device) -> LatentCache | None:
    if not recipe.data.images.cached:
        return None
    cache = LatentCache(setup.data, setup.parts, setup.dtype, recipe.train.batch_size)
    if device.type == "cuda":  # not needed until sampling: give their memory to training
        freed = sum(p.numel() * p.element_size() for m in (setup.parts.vae, setup.parts.text_encoder) for p in m.parameters())
        _place_frozen(setup.parts, torch.device("cpu"))
        torch.cuda.empty_cache()
        setup.notes.append(f"cache: VAE and text encoder moved off the GPU while training (-{freed / GIB:.2f} GiB)")
    return cache


def _place_frozen(parts: sd.SdParts, device: torch.device) -> None:
    parts.vae.to(device)
    parts.text_encoder.to(device)


def _announce(recipe: Recipe, setup: DiffusionSetup, kind: str, cache: LatentCache | None) -> None:
    s, facts = setup.stats, setup.unet_facts
    say(f"model {sd.describe_source(recipe.model)} | {recipe.method.name} | {setup.context.precision} | "
        f"{kind} | attention {setup.context.attn_implementation}")
    say(str(setup.params))
    say(f"unet weights by dtype (bytes): loaded {facts['param_bytes_loaded']} -> prepared {facts['param_bytes_prepared']}")
    for note in setup.notes:
        say(f"note: {note}")
    say(f"data: {s.images} images at {recipe.data.images.resolution} px ({s.upscaled} upscaled, smallest side "
        f"{s.min_side_px} px), captions {s.caption_tokens_mean:.0f} tokens mean, {s.captions_truncated} truncated at 77"
        + (f"; cached in {cache.seconds:.1f} s" if cache else ""))


# ---------------------------------------------------------------- outputs


def save_adapter(run: RunDir, unet: Any) -> None:
    """adapter/ in diffusers' LoRA format (what train_text_to_image_lora.py writes), with the LoRA config as
    metadata so that load_lora_weights() restores alpha, not just the rank."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    with atomic_dir(run.adapter_path) as folder:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def render(pipeline: Any, recipe: Recipe, prompt: str, seeds: list[int], steps: int | None = None) -> list[Any]:
    """One image per seed; CPU generators make the same seed give the same noise on every device."""
    res = recipe.data.images.resolution
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline([prompt] * len(seeds), num_inference_steps=steps or recipe.diffusion.sample_steps,
                    guidance_scale=recipe.diffusion.guidance_scale, height=res, width=res, generator=generators).images


def sample_grid(recipe: Recipe, setup: DiffusionSetup, unet: Any) -> Grid:
    """Rows: prompt x seed; columns: the base model (adapter disabled), then the adapter."""
    parts, seeds = setup.parts, recipe.diffusion.sample_seeds
    pipeline = sd.load_pipeline(recipe.model, setup.dtype, unet.device, unet=unet, vae=parts.vae,
                                text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    unet.eval()
    columns: dict[str, list[Any]] = {}
    variants: list[tuple[str, Callable[[], None]]] = [("adapter", unet.enable_adapters)]
    if recipe.eval.compare_base:
        variants.insert(0, ("base", unet.disable_adapters))
    # As in training (and diffusers' log_validation): weights that k-bit prep 'peft' left in fp32 meet bf16 inputs.
    images = len(variants) * len(recipe.eval.prompts) * len(seeds)
    with (torch.autocast(unet.device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32),
          phase("drawing the sample grid (images)", total=images) as progress):
        for label, switch in variants:
            switch()
            columns[label] = []
            for prompt in recipe.eval.prompts:
                columns[label] += render(pipeline, recipe, prompt, seeds)
                progress.advance(by=len(seeds))
    unet.enable_adapters()
    rows = [f"seed {seed}: {prompt}" for prompt in recipe.eval.prompts for seed in seeds]
    cells = [[columns[label][r] for label in columns] for r in range(len(rows))]
    return Grid(rows, list(columns), recipe.data.images.resolution, cells)


def load_for_inference(run: RunDir, recipe: Recipe, dequantize: bool = False) -> Any:
    """The pipeline the adapter was trained on (for qlora its 4-bit UNet, prepared as in training, or that UNet
    dequantised with `dequantize`) with the run's adapter loaded."""
    precision = resolve_precision(recipe.train.precision, MODEL_TYPE)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    components = trained_unet(recipe, device)
    if dequantize and components:
        components["unet"] = sd.dequantize_unet(components["unet"])
    with phase(f"loading the pipeline {recipe.model.source}"):
        pipeline = sd.load_pipeline(recipe.model, DTYPES[precision], device, **components)
    try:
        pipeline.load_lora_weights(str(run.adapter_path))
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise PeftlabError(f"run '{run.path}': its adapter does not load into {recipe.model.source} ({first}); fix: "
                           "the base model changed since training (preset definition or model.revision): retrain, "
                           "or point model.source in config.yaml at the base it was trained on") from None
    # The injected LoRA layers are new modules in training mode (diffusers 0.42): without this, LoRA dropout
    # stays on and every image is drawn with a random mask.
    pipeline.unet.eval()
    return pipeline


def export(run: RunDir, recipe: Recipe, folder: Path) -> Exported:
    """The whole pipeline with the LoRA fused into its UNet (for qlora: into the dequantised 4-bit UNet, the weights
    it was trained against), as StableDiffusionPipeline.from_pretrained loads it."""
    pipeline = load_for_inference(run, recipe, dequantize=True)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Exported("diffusers", "text-to-image", "StableDiffusionPipeline.from_pretrained('{path}')")


def generate_images(pipeline: Any, recipe: Recipe, prompts: list[str], out_dir: Path, seeds: list[int] | None = None,
                    steps: int | None = None) -> list[Path]:
    """PNG files `<prompt-slug>-seed<N>.png` in out_dir, one per prompt and seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = seeds or recipe.diffusion.sample_seeds[:1]
    paths = []
    with phase("generating images", total=len(prompts) * len(seeds)) as progress:
        for prompt in prompts:
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
            for seed, image in zip(seeds, render(pipeline, recipe, prompt, seeds, steps), strict=True):
                path = out_dir / f"{slug}-seed{seed}.png"
                image.save(path)
                paths.append(path)
            progress.advance(by=len(seeds))
    return paths


def doctor(recipe: Recipe) -> list[str]:
    """`peftlab doctor` for a diffusion recipe: data, what trains, weight bytes per method, one micro-step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = build(recipe, device)
    kind = prediction_type(recipe, setup.parts.noise_scheduler)
    _announce(recipe, setup, kind, None)
    say(f"unet weight GiB by method (params by kind {setup.unet_facts['params_by_kind']}): "
        f"{setup.unet_facts['weight_forecast_gib']}")
    s, up = setup.stats, Checkup()
    if s.upscaled:
        say(f"note: {s.upscaled}/{s.images} images are smaller than {recipe.data.images.resolution} px and get upscaled "
            "(soft detail); larger images or a lower data.images.resolution train sharper")
    up.check(s.captions_truncated <= 0.2 * s.images, f"{s.captions_truncated}/{s.images} captions longer than 77 tokens",
             f"{s.captions_truncated}/{s.images} captions are cut at the text encoder's 77 tokens: shorten them")
    unet = setup.parts.unet
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    up.check(bool(trainable) and all(".lora_" in n for n in trainable), f"{len(trainable)} trainable tensors, all LoRA",
             f"trainable tensors outside LoRA or none at all: {[n for n in trainable if '.lora_' not in n][:3]}")
    batch = next(iter(torch.utils.data.DataLoader(setup.data, batch_size=recipe.train.batch_size)))
    params = _encode_pixels(setup.parts, batch["pixel_values"], setup.dtype)
    states = _encode_text(setup.parts, batch["input_ids"])
    with torch.autocast(device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32):
        loss = noise_prediction_loss(unet, params, states, setup.parts, recipe, kind)
    loss.backward()
    grads = all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)
    up.check(math.isfinite(loss.item()) and loss.item() > 0, f"forward: loss {loss.item():.4f} is finite and > 0",
             f"forward: loss {loss.item()} is not finite and > 0 (precision, learning rate: see the guard's causes)")
    up.check(grads, "backward: all LoRA gradients finite", "backward: non-finite LoRA gradients")
    return up.problems
